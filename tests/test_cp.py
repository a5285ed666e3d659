"""Tests for cptoy.cp: CPDist densities, conditioning, sampling, and fit_cp (EM, HALS, ALS)."""

import math

import pytest
import torch
from stats import pooled_chisquare

from cptoy.cp import CPDist, fit_cp, kl_to_cp
from cptoy.joint import HMM


def planted(rank: int, n: int, V: int, seed: int) -> CPDist:
    """A random rank-``rank`` CP distribution with peaky factors, float64, no batch."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(rank, generator=g, dtype=torch.float64) + 0.2
    F = torch.rand(n, rank, V, generator=g, dtype=torch.float64) ** 3 + 0.01
    return CPDist.from_probs(w / w.sum(), F / F.sum(-1, keepdim=True))


# ---------------------------------------------------------------- densities
def test_to_tensor_matches_tensorly():
    import tensorly as tl

    d = planted(3, 3, 5, seed=1)
    ref = tl.cp_to_tensor((d.weights.numpy(), [d.factors[s].T.numpy() for s in range(d.n)]))
    torch.testing.assert_close(d.to_tensor(), torch.tensor(ref), rtol=1e-12, atol=1e-14)
    assert abs(float(d.to_tensor().sum()) - 1.0) < 1e-12


def test_log_prob_equals_log_of_dense_entries():
    d = planted(4, 3, 4, seed=2)
    P = d.to_tensor()
    x = torch.cartesian_prod(*[torch.arange(4)] * 3)  # (64, 3) every tuple
    torch.testing.assert_close(d.log_prob(x), P[x[:, 0], x[:, 1], x[:, 2]].log())


def test_log_prob_batched_with_sample_dims():
    g = torch.Generator().manual_seed(0)
    d = CPDist.from_logits(torch.randn(2, 3, generator=g), torch.randn(2, 3, 3, 4, generator=g))
    x = torch.randint(0, 4, (5, 2, 3), generator=g)  # (S, B, n)
    lp = d.log_prob(x)  # (S, B)
    assert lp.shape == (5, 2)
    for b in range(2):
        P = d[b].to_tensor()
        torch.testing.assert_close(lp[:, b], P[x[:, b, 0], x[:, b, 1], x[:, b, 2]].log())


@pytest.mark.parametrize("prefix", [[1], [0, 3], [2]])
def test_condition_equals_dense_conditional(prefix):
    d = planted(3, 3, 4, seed=3)
    P = d.to_tensor()
    dense = P[tuple(prefix)] / P[tuple(prefix)].sum()
    torch.testing.assert_close(d.condition(torch.tensor(prefix)).to_tensor(), dense)


@pytest.mark.parametrize("positions", [[0], [2], [0, 2], [2, 0], [1, 2]])
def test_marginal_equals_dense_marginal(positions):
    d = planted(3, 3, 4, seed=4)
    P = d.to_tensor()
    others = tuple(s for s in range(3) if s not in positions)
    dense = P.sum(dim=others) if others else P
    kept = sorted(positions)  # axis order of `dense`
    dense = dense.permute([kept.index(p) for p in positions])
    torch.testing.assert_close(d.marginal(positions).to_tensor(), dense)
    if len(positions) == 1:
        torch.testing.assert_close(d.log_marginal(positions[0]).exp(), dense)


def test_mode_is_greedy_sequential_argmax():
    d = planted(3, 3, 5, seed=5)
    P = d.to_tensor()
    path = []
    for _ in range(3):
        sub = P[tuple(path)]
        m = sub.sum(dim=tuple(range(1, sub.dim()))) if sub.dim() > 1 else sub
        path.append(int(m.argmax()))
    assert d.mode().tolist() == path


def test_sample_frequencies_match_to_tensor():
    d = planted(3, 3, 4, seed=6)
    g = torch.Generator().manual_seed(123)
    x = d.sample(40_000, generator=g)  # (N, 3)
    assert x.shape == (40_000, 3)
    counts = torch.bincount(x[:, 0] * 16 + x[:, 1] * 4 + x[:, 2], minlength=64)
    res = pooled_chisquare(counts, d.to_tensor())
    assert res.pvalue > 1e-3, res
    # and the check can fail: the same samples against a different distribution
    other = planted(3, 3, 4, seed=7).to_tensor()
    assert pooled_chisquare(counts, other).pvalue < 1e-6


def test_sample_return_experts_shapes():
    d = planted(2, 3, 4, seed=8)
    x, e = d.sample(7, generator=torch.Generator().manual_seed(0), return_experts=True)
    assert x.shape == (7, 3) and e.shape == (7,) and int(e.max()) < 2


# ---------------------------------------------------------------- EM
@pytest.mark.parametrize("seed", [0, 1, 3])
def test_em_recovers_planted_rank(seed):
    d = planted(3, 3, 6, seed=seed)
    fit = fit_cp(d.to_tensor(), 3, method="em", n_iter=2000, tol=1e-14, restarts=3, seed=seed)
    assert fit.kl < 1e-8
    assert abs(kl_to_cp(d.to_tensor(), fit.dist) - fit.kl) < 1e-12


def test_em_cannot_fit_planted_rank_with_fewer_experts():
    d = planted(3, 3, 6, seed=0)
    assert fit_cp(d.to_tensor(), 2, n_iter=500, restarts=2).kl > 1e-3


@pytest.mark.parametrize("seed", [0, 1])
def test_em_history_is_monotone(seed):
    P = HMM(4, 8, seed=seed).joint(3)
    h = fit_cp(P, 3, n_iter=300, tol=0.0, seed=seed).history
    assert len(h) > 50  # tol=0 stops only at the first (round-off sized) increase
    assert all(b <= a + 1e-12 for a, b in zip(h, h[1:], strict=False))
    assert h[-1] < h[0]


@pytest.mark.parametrize("seed", [0, 2])
def test_em_kl_non_increasing_in_rank_on_hmm(seed):
    hmm = HMM(4, 8, seed=seed)
    P = hmm.joint(3)
    kls = [fit_cp(P, r, n_iter=500, restarts=3, seed=0).kl for r in (1, 2, 3, 4, 5)]
    for a, b in zip(kls, kls[1:], strict=False):
        assert b <= a + max(1e-5, 1e-3 * a), kls
    assert kls[0] > 0.1  # rank 1 really is bad on a sticky HMM
    assert kls[3] < 1e-5  # rank S = 4 is exact for n = 3 (see HMM.joint_cp)


def test_em_rank_one_is_product_of_marginals():
    P = HMM(3, 6, seed=1).joint(3)
    fit = fit_cp(P, 1, n_iter=5)
    for s in range(3):
        marg = P.sum(dim=tuple(t for t in range(3) if t != s))
        torch.testing.assert_close(fit.dist.factors[s, 0], marg)


# ---------------------------------------------------------------- tensorly HALS / ALS
@pytest.mark.parametrize("method", ["hals", "als"])
def test_tensorly_methods_return_valid_simplex_cp(method):
    P = HMM(3, 6, seed=0).joint(3)
    fit = fit_cp(P, 3, method=method, n_iter=100, restarts=2, seed=0)
    d = fit.dist
    assert fit.method == method and d.rank == 3 and d.n == 3 and d.vocab_size == 6
    w, F = d.weights, d.factors
    assert torch.isfinite(w).all() and torch.isfinite(F).all()
    assert (w >= 0).all() and (F >= 0).all()
    torch.testing.assert_close(w.sum(), torch.tensor(1.0, dtype=w.dtype))
    torch.testing.assert_close(F.sum(-1), torch.ones(3, 3, dtype=F.dtype))
    assert math.isfinite(fit.kl) and fit.kl >= 0
    assert abs(kl_to_cp(P, d) - fit.kl) < 1e-12
    assert fit.kl < 0.5  # a real fit, not a uniform fallback


def test_em_beats_or_matches_hals_in_kl():
    P = HMM(4, 8, seed=0).joint(3)
    em = fit_cp(P, 2, n_iter=500, restarts=3).kl
    hals = fit_cp(P, 2, method="hals", n_iter=200, restarts=3).kl
    assert em <= hals + 1e-9


# ---------------------------------------------------------------- bad input
def test_fit_cp_rejects_bad_input():
    P = HMM(2, 4, seed=0).joint(2)
    with pytest.raises(ValueError, match="P.*negative"):
        Q = P.clone()
        Q[0, 0], Q[0, 1] = -0.01, Q[0, 1] + Q[0, 0] + 0.01
        fit_cp(Q, 2)
    with pytest.raises(ValueError, match="P must sum to 1"):
        fit_cp(P * 1.1, 2)
    with pytest.raises(ValueError, match="P contains NaN"):
        Q = P.clone()
        Q[1, 1] = float("nan")
        fit_cp(Q, 2)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        fit_cp(P, 0)
    with pytest.raises(ValueError, match="P must have shape"):
        fit_cp(torch.full((2, 3), 1 / 6, dtype=torch.float64), 1)
    with pytest.raises(ValueError, match="method"):
        fit_cp(P, 1, method="svd")
    with pytest.raises(TypeError, match="rank must be an int"):
        fit_cp(P, 1.5)


def test_cpdist_rejects_bad_probs():
    with pytest.raises(ValueError, match="weights"):
        CPDist.from_probs(torch.tensor([0.5, 0.6]), torch.full((2, 2, 3), 1 / 3))
    with pytest.raises(ValueError, match="factors"):
        CPDist.from_probs(torch.tensor([0.5, 0.5]), torch.full((2, 2, 3), 0.3))
    with pytest.raises(ValueError, match="x holds token ids outside"):
        planted(2, 2, 3, 0).log_prob(torch.tensor([0, 3]))
