"""FLoRA's server-side stacking: exact layout, written once, no aliasing, threads restored."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from fedlora.aggregation import AdapterSpec, ClientUpdate, GlobalState, flora, get_method

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


def test_new_state_owns_its_memory_and_downlink_references_it(two_threads: None) -> None:
    """The stack is written into fresh memory (no tensor shared with the previous state or
    an update, so neither can change it, and checkpoints see no shared storage); the
    downlink hands out the state's own tensors, copying nothing."""
    first, new, ups = two_rounds()
    others = [t for f in first.factors.values() for t in f.values()]
    others += [t for u in ups for f in u.factors.values() for t in f.values()]
    seen = {t.untyped_storage().data_ptr() for t in others if t.numel()}
    mine = [t for f in new.factors.values() for t in f.values()]
    ptrs = [t.untyped_storage().data_ptr() for t in mine]
    assert not seen & set(ptrs) and len(set(ptrs)) == len(ptrs)
    down = get_method("flora").downlink(new)
    assert all(down[m][r] is new.factors[m][r] for m in SPEC.shapes for r in ("A", "B"))


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


def test_thread_count_is_restored_when_stacking_fails(
    two_threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: object) -> None:
        assert torch.get_num_threads() == 1  # stacking runs on the calling thread only
        raise MemoryError("no room for the stack")

    monkeypatch.setattr(flora, "_stack", fail)
    method = get_method("flora")
    with pytest.raises(MemoryError):
        method.aggregate(method.init_state(SPEC), updates(torch.Generator().manual_seed(4)))
    assert torch.get_num_threads() == 2
