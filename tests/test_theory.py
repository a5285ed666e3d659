"""Tests for cptoy.theory: exact expected tokens per forward against simulation and closed forms."""

import math

import pytest
import torch

from cptoy.cp import CPDist, fit_cp
from cptoy.joint import HMM, marginals, product_of_marginals, tv
from cptoy.theory import (
    acceptance_rate,
    expected_tokens_per_forward,
    greedy_tokens_per_forward,
    leviathan_expected_tokens,
    simulate_tokens_per_forward,
)


def random_joint(n: int, V: int, seed: int, zeros: float = 0.0) -> torch.Tensor:
    """A random joint (V,)*n; a fraction ``zeros`` of its entries set to exactly 0."""
    g = torch.Generator().manual_seed(seed)
    P = torch.rand((V,) * n, generator=g, dtype=torch.float64) ** 4
    if zeros:
        P = P * (torch.rand(P.shape, generator=g, dtype=torch.float64) >= zeros)
    return P / P.sum()


# ---------------------------------------------------------------- acceptance_rate
def test_acceptance_rate_properties():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(7, generator=g, dtype=torch.float64)
    q = torch.rand(7, generator=g, dtype=torch.float64)
    p, q = p / p.sum(), q / q.sum()
    a = acceptance_rate(p, q)
    assert 0 <= a <= 1
    assert math.isclose(a, acceptance_rate(q, p))  # symmetric
    assert math.isclose(a, 1 - tv(p, q))
    assert math.isclose(acceptance_rate(p, p), 1.0)
    disjoint = acceptance_rate(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    assert disjoint == 0.0


def test_acceptance_rate_is_one_step_of_exact_theory():
    # n = 2 with independent tokens: Pr(draft accepted) = acceptance_rate of the 2nd marginals
    p1 = torch.tensor([0.3, 0.7], dtype=torch.float64)
    p2 = torch.tensor([0.625, 0.375], dtype=torch.float64)
    q2 = torch.tensor([0.1, 0.9], dtype=torch.float64)
    P, Q = p1[:, None] * p2[None], p1[:, None] * q2[None]
    E = expected_tokens_per_forward(P, Q)
    assert math.isclose(E, 1 + acceptance_rate(p2, q2), rel_tol=1e-12)


def test_acceptance_rate_bad_input():
    with pytest.raises(ValueError, match="p has negative"):
        acceptance_rate(torch.tensor([1.2, -0.2]), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="q must sum to 1"):
        acceptance_rate(torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.6]))
    with pytest.raises(ValueError, match="p and q must have the same shape"):
        acceptance_rate(torch.tensor([0.5, 0.5]), torch.tensor([0.2, 0.3, 0.5]))


# ---------------------------------------------------------------- expected tokens per forward
@pytest.mark.parametrize("case", ["hmm_rank1", "hmm_rank2", "random", "random_zeros"])
def test_exact_matches_simulation(case):
    if case.startswith("hmm"):
        P = HMM(4, 6, seed=1).joint(3)
        r = 1 if case == "hmm_rank1" else 2
        Q = fit_cp(P, r, n_iter=200, seed=0).dist
    else:
        z = 0.3 if case == "random_zeros" else 0.0
        P = random_joint(3, 5, seed=2, zeros=z)
        Q = random_joint(3, 5, seed=3)
    E, by_pos = expected_tokens_per_forward(P, Q, return_by_position=True)
    mean, se = simulate_tokens_per_forward(P, Q, num_steps=40_000, seed=7, return_stderr=True)
    assert abs(mean - E) < 4 * se, (E, mean, se)
    assert by_pos.shape == (2,) and (by_pos[1] <= by_pos[0]).item()
    assert math.isclose(E, 1 + float(by_pos.sum()))


def test_exact_detects_wrong_acceptance_rule():
    # a simulation that accepted every draft would be far from E: the test has power
    P = HMM(4, 6, seed=1).joint(3)
    Q = product_of_marginals(P)
    E = expected_tokens_per_forward(P, Q)
    _, se = simulate_tokens_per_forward(P, Q, num_steps=40_000, seed=7, return_stderr=True)
    assert 3.0 - E > 20 * se


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_q_equal_p_gives_n(n):
    P = HMM(3, 4, seed=0).joint(n)
    E, by_pos = expected_tokens_per_forward(P, P, return_by_position=True)
    assert math.isclose(E, n, rel_tol=1e-12)
    assert by_pos.shape == (n - 1,)
    assert simulate_tokens_per_forward(P, P, num_steps=2000, seed=0) == n


def test_exact_rank_s_cp_of_hmm_gives_n():
    h = HMM(4, 6, seed=2)
    assert math.isclose(expected_tokens_per_forward(h.joint(3), h.joint_cp(3)), 3.0, rel_tol=1e-12)


def test_product_of_marginals_dense_equals_rank_one_cpdist():
    P = HMM(4, 6, seed=3).joint(3)
    dense = expected_tokens_per_forward(P, product_of_marginals(P))
    ms = marginals(P)
    rank1 = CPDist.from_probs(torch.ones(1, dtype=torch.float64), torch.stack(ms)[:, None, :])
    assert math.isclose(dense, expected_tokens_per_forward(P, rank1), rel_tol=1e-12)
    # rank 1 cannot condition: its drafts ignore x_1, so its per-position acceptance is
    # computed from the marginals alone at position 2
    E, by_pos = expected_tokens_per_forward(P, rank1, return_by_position=True)
    P12 = P.sum(-1)
    p2_given_1 = P12 / P12.sum(-1, keepdim=True)
    manual = sum(float(ms[0][a]) * acceptance_rate(p2_given_1[a], ms[1]) for a in range(6))
    assert math.isclose(float(by_pos[0]), manual, rel_tol=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_expected_tokens_in_range(seed):
    P = random_joint(3, 4, seed=seed, zeros=0.2)
    Q = random_joint(3, 4, seed=seed + 100)
    E = expected_tokens_per_forward(P, Q)
    assert 1.0 <= E <= 3.0 and math.isfinite(E)


def test_zero_probability_prefixes_do_not_produce_nan():
    P = torch.zeros(3, 3, 3, dtype=torch.float64)
    P[0, 1, 2] = 0.5
    P[2, 2, 2] = 0.5  # x_1 = 1 never happens; most prefixes have probability 0
    Q = torch.full((3, 3, 3), 1 / 27, dtype=torch.float64)
    E, by_pos = expected_tokens_per_forward(P, Q, return_by_position=True)
    assert math.isfinite(E) and torch.isfinite(by_pos).all()
    torch.testing.assert_close(by_pos, torch.tensor([1 / 3, 1 / 9], dtype=torch.float64))


def test_q_that_cannot_condition_on_x1_raises():
    P = torch.full((2, 2), 0.25, dtype=torch.float64)
    Q = torch.tensor([[0.5, 0.5], [0.0, 0.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match="Q gives probability 0 to first token 1"):
        expected_tokens_per_forward(P, Q)


def test_expected_tokens_bad_input():
    P = HMM(2, 3, seed=0).joint(2)
    with pytest.raises(ValueError, match="P and Q must have the same shape"):
        expected_tokens_per_forward(P, HMM(2, 3, seed=0).joint(3))
    with pytest.raises(ValueError, match="Q must sum to 1"):
        expected_tokens_per_forward(P, P * 0.9)
    with pytest.raises(ValueError, match="P has negative"):
        expected_tokens_per_forward(P - 0.2, P)


# ---------------------------------------------------------------- closed forms
@pytest.mark.parametrize("alpha,k", [(0.0, 3), (0.5, 1), (0.7, 4), (0.95, 2), (1.0, 5)])
def test_leviathan_closed_form_vs_iid_simulation(alpha, k):
    closed = leviathan_expected_tokens(alpha, k)
    assert math.isclose(closed, sum(alpha**i for i in range(k + 1)))
    g = torch.Generator().manual_seed(0)
    u = torch.rand(50_000, k, generator=g, dtype=torch.float64) < alpha  # (N, k) accepted?
    run = torch.cumprod(u.double(), dim=1).sum(1) + 1  # 1 + accepted drafts before a rejection
    se = float(run.std()) / math.sqrt(len(run)) + 1e-12
    assert abs(float(run.mean()) - closed) <= 4 * se + 1e-12


def test_leviathan_equals_exact_theory_for_iid_acceptance():
    # P and Q are products of identical position distributions: acceptance is i.i.d.
    p = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    q = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    P = p[:, None, None, None] * p[None, :, None, None] * p[None, None, :, None] * p
    Q = p[:, None, None, None] * q[None, :, None, None] * q[None, None, :, None] * q
    E = expected_tokens_per_forward(P, Q)
    assert math.isclose(E, leviathan_expected_tokens(acceptance_rate(p, q), 3), rel_tol=1e-12)


def test_leviathan_bad_input():
    with pytest.raises(ValueError, match="alpha"):
        leviathan_expected_tokens(1.1, 2)
    with pytest.raises(ValueError, match="k must be"):
        leviathan_expected_tokens(0.5, -1)


def test_greedy_tokens_per_forward():
    P = torch.zeros(3, 3, 3, dtype=torch.float64)
    P[0, 1, 2], P[0, 1, 0], P[1, 0, 0] = 0.4, 0.2, 0.4  # argmax x1 = 0, then 1, then 2
    assert greedy_tokens_per_forward(P, P) == 3
    Q = torch.zeros(3, 3, 3, dtype=torch.float64)
    Q[0, 1, 0], Q[0, 2, 2], Q[1, 1, 1] = 0.5, 0.1, 0.4  # agrees on x2 = 1, not on x3
    assert greedy_tokens_per_forward(P, Q) == 2
    Q2 = torch.zeros(3, 3, 3, dtype=torch.float64)
    Q2[0, 2, 2] = 0.5
    Q2[1, 1, 1] = 0.5
    assert greedy_tokens_per_forward(P, Q2) == 1


def test_conditional_rates_undo_the_prefix_product():
    from cptoy.theory import conditional_rates

    rates = [0.5, 0.4, 0.25]
    prefix = [0.5, 0.2, 0.05]  # cumulative products of the rates
    assert conditional_rates(prefix) == pytest.approx(rates)
    out = conditional_rates([0.3, 0.0, 0.0])
    assert out[:2] == [0.3, 0.0] and math.isnan(out[2])
