"""A method that declares ``sum_aggregated`` really aggregates through the mean alone:
secure aggregation and client-level DP rely on it (they never see the individual updates,
or see them noised), so the declaration is checked against the method's own aggregate."""

from __future__ import annotations

import pytest
import torch

from fedlora.aggregation import AdapterSpec, ClientUpdate, available_methods, get_method

from .contract.helpers import builtin_methods

SPEC = AdapterSpec({"q": (12, 10), "v": (12, 10)}, rank=3, alpha=6)
SUMMED = [n for n in available_methods() if get_method(n).sum_aggregated]
NOT_SUMMED = [n for n in available_methods() if not get_method(n).sum_aggregated]


def _updates(method, state, round_: int, gen: torch.Generator) -> list[ClientUpdate]:
    out = []
    for k, n in enumerate((7, 19, 4)):
        start = method.client_start(method.downlink(state, first_contact=True), SPEC, seed=k,
                                    round=round_)
        roles = method.uplink_in_round(round_)
        factors = {m: {r: init[r] + 0.1 * torch.randn(init[r].shape, generator=gen)
                       for r in roles} for m, init in start.init.items()}
        head = {"w": state.head["w"] + torch.randn(4, generator=gen)}
        out.append(ClientUpdate(factors, num_examples=n, scaling=start.scaling, head=head,
                                node=f"n{k}"))
    return out


def _close(a, b) -> None:
    for m in a.factors:
        for r in a.factors[m]:
            torch.testing.assert_close(a.factors[m][r], b.factors[m][r], rtol=1e-5, atol=1e-6)
    for k in a.head:
        torch.testing.assert_close(a.head[k], b.head[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weighting", ["examples", "uniform"])
@pytest.mark.parametrize("name", SUMMED)
def test_aggregate_of_the_mean_equals_aggregate_of_the_updates(name: str, weighting: str) -> None:
    method = get_method(name, weighting=weighting)
    gen = torch.Generator().manual_seed(3)
    state = method.init_state(SPEC, {"w": torch.zeros(4)})
    for round_ in (1, 2, 3):  # rolora alternates its role: several rounds
        updates = _updates(method, state, round_, gen)
        weights = method.weights(updates)
        reference = method.uplink_reference(state, round_)
        # Every client starts from the reference in the roles it sends.
        for u in updates:
            assert set(u.factors) == set(reference)
            for m in reference:
                assert set(u.factors[m]) == set(reference[m])
        mean = {m: {r: sum(w * u.factors[m][r] for w, u in zip(weights, updates, strict=True))
                    for r in reference[m]} for m in reference}
        head = {"w": sum(w * u.head["w"] for w, u in zip(weights, updates, strict=True))}
        expected = method.aggregate(state, updates)
        _close(method.aggregate_mean(state, mean, head), expected)
        state = expected


@pytest.mark.parametrize("name", SUMMED)
def test_the_reference_is_where_clients_start(name: str) -> None:
    method = get_method(name)
    gen = torch.Generator().manual_seed(5)
    state = method.init_state(SPEC, {"w": torch.zeros(4)})
    state = method.aggregate(state, _updates(method, state, 1, gen))
    reference = method.uplink_reference(state, 2)
    start = method.client_start(method.downlink(state, first_contact=True), SPEC, seed=9, round=2)
    for m, roles in reference.items():
        for r, tensor in roles.items():
            torch.testing.assert_close(start.init[m][r], tensor)


@pytest.mark.parametrize("name", NOT_SUMMED)
def test_methods_that_need_each_update_refuse_the_mean(name: str) -> None:
    method = get_method(name)
    state = method.init_state(SPEC, {"w": torch.zeros(4)})
    with pytest.raises(TypeError, match="individual updates"):
        method.aggregate_mean(state, {}, {})


def test_the_linear_methods_are_the_ones_the_design_names() -> None:
    builtin = set(SUMMED) & set(builtin_methods())  # plug-ins declare their own
    assert builtin == {"fedavg", "ffa", "fedsvd", "fedsb", "rolora", "fedsa"}


@pytest.mark.parametrize("name", [n for n in SUMMED if get_method(n).init_round_roles])
def test_the_init_round_also_aggregates_through_its_mean(name: str) -> None:
    """Secure aggregation sums the init round too (e.g. Fed-SB's gradient estimates)."""
    method = get_method(name)
    gen = torch.Generator().manual_seed(1)
    shapes = method.init_round_shapes(SPEC)  # e.g. Fed-SB's sketches: not d_out x d_in
    updates = [ClientUpdate({m: {r: torch.randn(shapes[m][r], generator=gen)
                                 for r in method.init_round_roles}
                             for m in SPEC.shapes}, num_examples=n,
                            scaling=SPEC.scaling) for n in (3, 9)]
    weights = method.weights(updates)
    mean = ClientUpdate({m: {r: sum(w * u.factors[m][r] for w, u in zip(weights, updates,
                                                                          strict=True))
                             for r in method.init_round_roles} for m in SPEC.shapes},
                        num_examples=1, scaling=SPEC.scaling)
    _close(method.init_from_updates(SPEC, [mean]), method.init_from_updates(SPEC, updates))
