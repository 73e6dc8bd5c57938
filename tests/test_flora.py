"""FLoRA's server-side stacking: exact layout, kept by reference (nothing copied), streamed
to the wire bit-identically, checkpoints and resume unchanged."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from fedlora.aggregation import AdapterSpec, ClientUpdate, GlobalState, Stacked, get_method
from fedlora.protos import Envelope, decode, encode, payload_bytes

# Big enough that two rounds (rank 8, then 14) stay below min(d_out, d_in): no compression.
SPEC = AdapterSpec({"q": (24, 18), "up": (40, 16)}, rank=4, alpha=8)
RANKS = (1, 3, 4)


def updates(gen: torch.Generator, ranks: tuple[int, ...] = RANKS) -> list[ClientUpdate]:
    """Random heterogeneous-rank updates (what the codec decodes: float32, contiguous)."""
    return [
        ClientUpdate(
            factors={
                m: {"A": torch.randn(r, d_in, generator=gen),
                    "B": torch.randn(d_out, r, generator=gen)}
                for m, (d_out, d_in) in SPEC.shapes.items()
            },
            num_examples=7 + 5 * k,
            scaling=SPEC.alpha / r,
            node=f"n{k}",
        )
        for k, r in enumerate(ranks)
    ]


@pytest.fixture
def two_threads() -> Iterator[None]:
    """Aggregate with two intra-op threads, as on the 2-core server, then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def two_rounds() -> tuple[GlobalState, GlobalState, list[ClientUpdate]]:
    method = get_method("flora")
    gen = torch.Generator().manual_seed(0)
    first = method.aggregate(method.init_state(SPEC), updates(gen))
    round2 = updates(gen, (2, 4))
    return first, method.aggregate(first, round2), round2


def test_stack_is_bitwise_the_concatenation_in_the_docstring(two_threads: None) -> None:
    """B_acc <- [B_acc, B_1 ... B_K], A_acc <- [A_acc; p_1 s_1 A_1; ...] with no rounding
    beyond the one product p_k s_k A_k (a second round, so the old stack is carried)."""
    first, new, ups = two_rounds()
    total = sum(u.num_examples for u in ups)
    for m in SPEC.shapes:
        old = first.factors[m]
        want_b = torch.cat([old["B"]] + [u.factors[m]["B"] for u in ups], 1)
        want_a = torch.cat(
            [old["A"]]
            + [u.factors[m]["A"] * (u.num_examples / total * u.scaling) for u in ups], 0
        )
        got = new.factors[m]
        assert torch.equal(got["B"], want_b) and torch.equal(got["A"], want_a)
        assert got["B"].dtype == got["A"].dtype == torch.float32
        assert got["B"].is_contiguous() and got["A"].is_contiguous()


def test_new_state_references_the_round_blocks_and_copies_nothing() -> None:
    """The round writes no factor memory: the new B_acc, A_acc hold the previous blocks and
    the updates' own tensors by reference (p_k s_k kept as a scalar), the previous state
    and the updates are unchanged, and the downlink hands out the state's own objects."""
    first, new, ups = two_rounds()
    before = {k: t.clone() for k, t in first.tensors().items()}
    for m in SPEC.shapes:
        b, a = new.factors[m]["B"], new.factors[m]["A"]
        assert isinstance(b, Stacked) and isinstance(a, Stacked)
        old_b, old_a = first.factors[m]["B"], first.factors[m]["A"]
        want_b = [*old_b.blocks, *(u.factors[m]["B"] for u in ups)]
        want_a = [*old_a.blocks, *(u.factors[m]["A"] for u in ups)]
        ptr = lambda t: t.untyped_storage().data_ptr()  # noqa: E731
        assert [ptr(t) for t in b.blocks] == [ptr(t) for t in want_b]
        assert [ptr(t) for t in a.blocks] == [ptr(t) for t in want_a]
        total = sum(u.num_examples for u in ups)
        assert a.scales[len(old_a.blocks):] == tuple(
            u.num_examples / total * u.scaling for u in ups)
        assert a.scales[:len(old_a.blocks)] == old_a.scales and set(b.scales) == {1.0}
    assert all(torch.equal(t, before[k]) for k, t in first.tensors().items())
    down = get_method("flora").downlink(new)
    assert all(down[m][r] is new.factors[m][r] for m in SPEC.shapes for r in ("A", "B"))
    # Read-only: an in-place method would only change a temporary copy.
    with pytest.raises(AttributeError, match="read-only"):
        new.factors["q"]["A"].mul_(2.0)


@pytest.mark.parametrize("wire", ["float32", "float16", "bfloat16"])
def test_downlink_streams_the_blocks_bit_identically(wire: str) -> None:
    """The codec writes the blocks straight into the wire buffer: the same bytes as the
    dense stack, and it decodes to the dense stack."""
    _, new, _ = two_rounds()
    down = get_method("flora").downlink(new)
    flat = {m: {r: t.dense() for r, t in roles.items()} for m, roles in down.items()}
    env = lambda f: Envelope(method="flora", round=3, direction="down", factors=f)  # noqa: E731
    data = encode(env(down), wire)
    assert data == encode(env(flat), wire)
    assert payload_bytes(env(down), wire) == payload_bytes(data)
    back = decode(data)
    dt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[wire]
    for m, roles in flat.items():
        for r, t in roles.items():
            assert torch.equal(back.factors[m][r], t.to(dt).float())


def test_checkpoint_round_trip_and_resume_give_the_same_rounds() -> None:
    """tensors() writes the stack out; a state rebuilt from it aggregates like the original."""
    first, new, round2 = two_rounds()
    method = get_method("flora")
    resumed = GlobalState.from_tensors(first.round, first.tensors(), first.meta)
    assert all(isinstance(t, torch.Tensor) for f in resumed.factors.values() for t in f.values())
    again = method.aggregate(resumed, round2)
    assert again.tensors().keys() == new.tensors().keys()
    assert all(torch.equal(t, new.tensors()[k]) for k, t in again.tensors().items())
    for m in SPEC.shapes:
        u, v = method.delta(new, m)
        assert torch.equal(u @ v, new.factors[m]["B"].dense() @ new.factors[m]["A"].dense())


def test_thread_count_is_restored_and_does_not_change_the_result(two_threads: None) -> None:
    method = get_method("flora")
    gen = torch.Generator().manual_seed(3)
    state, ups = method.init_state(SPEC), updates(gen)
    on_two = method.aggregate(state, ups)
    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)
    on_one = method.aggregate(state, ups)
    assert torch.get_num_threads() == 1
    assert all(torch.equal(on_two.tensors()[k], t) for k, t in on_one.tensors().items())
