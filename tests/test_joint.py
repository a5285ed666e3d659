"""Tests for cptoy.joint: the HMM toy language, corpus joints and the joint toolkit."""

import math

import pytest
import torch
from stats import pooled_chisquare

from cptoy.cp import CPDist, fit_cp
from cptoy.joint import (
    HMM,
    OTHER,
    conditional,
    corpus_joint,
    entropy,
    kl,
    marginals,
    product_of_marginals,
    text_joint,
    tv,
)


# ---------------------------------------------------------------- HMM
def test_hmm_parameters_are_distributions_and_seeded():
    h = HMM(4, 10, stickiness=0.8, seed=3)
    assert h.transition.shape == (4, 4) and h.emission.shape == (4, 10) and h.initial.shape == (4,)
    assert h.transition.dtype == torch.float64
    torch.testing.assert_close(h.transition.diagonal(), torch.full((4,), 0.8, dtype=torch.float64))
    torch.testing.assert_close(h.transition.sum(1), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(h.emission.sum(1), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(h.initial @ h.transition, h.initial)  # stationary
    h2 = HMM(4, 10, stickiness=0.8, seed=3)
    assert torch.equal(h.emission, h2.emission) and torch.equal(h.transition, h2.transition)
    assert not torch.equal(h.emission, HMM(4, 10, stickiness=0.8, seed=4).emission)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_hmm_joint_sums_to_one(n):
    P = HMM(3, 5, seed=0).joint(n)
    assert P.shape == (5,) * n and P.dtype == torch.float64
    assert (P >= 0).all()
    assert abs(float(P.sum()) - 1) < 1e-12


@pytest.mark.parametrize("context", [None, [2, 4, 4, 0]])
def test_hmm_joint_is_consistent_across_n(context):
    h = HMM(3, 5, seed=1)
    P4, P3 = h.joint(4, context), h.joint(3, context)
    torch.testing.assert_close(P4.sum(-1), P3)  # drop the last token
    if context is None:  # stationary start: dropping the first token changes nothing
        torch.testing.assert_close(P4.sum(0), P3)
    torch.testing.assert_close(P3.sum((1, 2)), h.next_token_probs(context))


def test_hmm_joint_after_context_is_the_chain_rule():
    h = HMM(3, 5, seed=2)
    context = [1, 3]
    P4 = h.joint(4)
    torch.testing.assert_close(h.joint(2, context), conditional(P4, context))


def test_hmm_joint_matches_sample_frequencies():
    h = HMM(3, 4, stickiness=0.8, seed=0)
    x = h.sample(3, num=30_000, seed=11)  # (N, 3)
    assert x.shape == (30_000, 3) and x.dtype == torch.long
    counts = torch.bincount(x[:, 0] * 16 + x[:, 1] * 4 + x[:, 2], minlength=64)
    assert pooled_chisquare(counts, h.joint(3)).pvalue > 1e-3
    # the same counts are far from a non-sticky HMM's joint
    assert pooled_chisquare(counts, HMM(3, 4, stickiness=0.0, seed=0).joint(3)).pvalue < 1e-6


def test_hmm_sample_is_deterministic_given_seed():
    h = HMM(3, 6, seed=0)
    assert torch.equal(h.sample(20, 3, seed=5), h.sample(20, 3, seed=5))
    assert not torch.equal(h.sample(20, 3, seed=5), h.sample(20, 3, seed=6))
    g = torch.Generator().manual_seed(5)
    assert torch.equal(h.sample(20, 3, generator=g), h.sample(20, 3, seed=5))


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("context", [None, [0, 1, 1]])
def test_hmm_joint_cp_is_exact_for_n_up_to_3(n, context):
    h = HMM(4, 6, seed=3)
    cp = h.joint_cp(n, context)
    assert isinstance(cp, CPDist) and cp.rank == 4 and cp.n == n
    torch.testing.assert_close(cp.to_tensor(), h.joint(n, context), rtol=0, atol=1e-14)


def test_hmm_joint_of_four_tokens_is_not_rank_s():
    h = HMM(2, 6, stickiness=0.7, seed=0)
    with pytest.raises(ValueError, match="not exactly rank S"):
        h.joint_cp(4)
    # EM at rank S = 2 on n = 4 stays away from 0 (measured 0.012), unlike n = 3 (7e-7)
    assert fit_cp(h.joint(3), 2, n_iter=1000, tol=1e-14, restarts=3).kl < 1e-5
    assert fit_cp(h.joint(4), 2, n_iter=1000, tol=1e-14, restarts=3).kl > 1e-3


def test_hmm_identity_transition_is_rank_s_for_any_n():
    h = HMM(3, 5, stickiness=1.0, seed=0)
    torch.testing.assert_close(h.initial, torch.full((3,), 1 / 3, dtype=torch.float64))
    torch.testing.assert_close(h.joint_cp(5).to_tensor(), h.joint(5), rtol=0, atol=1e-14)


def test_hmm_from_params_and_context_posterior():
    T = torch.tensor([[0.5, 0.5], [0.5, 0.5]], dtype=torch.float64)
    E = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # state = token
    h = HMM.from_params(T, E)
    torch.testing.assert_close(h.joint(2), torch.full((2, 2), 0.25, dtype=torch.float64))
    # sticky version: after seeing token 0, next state is 0 with 0.9
    h = HMM.from_params(torch.tensor([[0.9, 0.1], [0.1, 0.9]], dtype=torch.float64), E)
    expected = torch.tensor([0.9, 0.1], dtype=torch.float64)
    torch.testing.assert_close(h.state_posterior([1, 0]), expected)
    with pytest.raises(ValueError, match="context has probability 0"):
        HMM.from_params(T, E, initial=torch.tensor([1.0, 0.0], dtype=torch.float64)).joint(1, [1])


def test_hmm_bad_input():
    with pytest.raises(ValueError, match="stickiness"):
        HMM(3, 4, stickiness=1.5)
    with pytest.raises(ValueError, match="n_states"):
        HMM(0, 4)
    with pytest.raises(ValueError, match="emission_concentration"):
        HMM(2, 4, emission_concentration=0.0)
    with pytest.raises(ValueError, match="context holds token ids"):
        HMM(2, 4).joint(2, [7])
    with pytest.raises(ValueError, match="transition must sum to 1"):
        HMM.from_params(torch.ones(2, 2), torch.full((2, 3), 1 / 3))
    with pytest.raises(ValueError, match="emission must have shape"):
        HMM.from_params(torch.eye(2), torch.full((3, 3), 1 / 3))


# ---------------------------------------------------------------- toolkit
def test_marginals_and_product_of_marginals():
    P = HMM(3, 4, seed=0).joint(3)
    ms = marginals(P)
    assert len(ms) == 3 and all(m.shape == (4,) for m in ms)
    torch.testing.assert_close(ms[1], P.sum((0, 2)))
    Q = product_of_marginals(P)
    outer = ms[0][:, None, None] * ms[1][None, :, None] * ms[2][None, None, :]
    torch.testing.assert_close(Q, outer)
    torch.testing.assert_close(product_of_marginals(P, as_cp=True).to_tensor(), Q)


def test_product_of_marginals_beats_random_rank_one():
    P = HMM(3, 5, seed=4).joint(3)
    best = kl(P, product_of_marginals(P))
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        f = torch.rand(3, 1, 5, generator=g, dtype=torch.float64) + 0.05
        Q = CPDist(torch.zeros(1, dtype=torch.float64), (f / f.sum(-1, keepdim=True)).log())
        assert kl(P, Q) > best
    # near-optimal perturbations are worse too (first-order optimality)
    ms = marginals(P)
    for eps in (1e-3, -1e-3):
        m0 = ms[0].clone()
        m0[0] += eps
        m0[1] -= eps
        Q = m0[:, None, None] * ms[1][None, :, None] * ms[2][None, None, :]
        assert kl(P, Q) > best


def test_conditional_entropy_kl_tv():
    P = torch.tensor([[0.5, 0.0], [0.25, 0.25]], dtype=torch.float64)
    torch.testing.assert_close(conditional(P, [1]), torch.tensor([0.5, 0.5], dtype=torch.float64))
    torch.testing.assert_close(conditional(P, [0]), torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert math.isclose(entropy(P), -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))
    U = torch.full((2, 2), 0.25, dtype=torch.float64)
    assert math.isclose(kl(P, U), 0.5 * math.log(2) + 2 * 0.25 * math.log(1.0))
    assert kl(U, P) == float("inf")
    assert kl(P, P) == 0.0
    assert math.isclose(tv(P, U), 0.25)
    assert math.isclose(entropy(U), math.log(4))
    with pytest.raises(ValueError, match="probability 0"):
        conditional(torch.tensor([[0.0, 0.0], [0.5, 0.5]], dtype=torch.float64), [0])
    with pytest.raises(ValueError, match="prefix must hold"):
        conditional(P, [0, 1])


def test_toolkit_validation_names_the_argument():
    P = torch.full((3, 3), 1 / 9, dtype=torch.float64)
    with pytest.raises(ValueError, match="P has negative"):
        entropy(torch.tensor([1.5, -0.5]))
    with pytest.raises(ValueError, match="P must sum to 1"):
        marginals(P * 2)
    with pytest.raises(ValueError, match="P contains NaN"):
        entropy(torch.tensor([float("nan"), 1.0]))
    with pytest.raises(ValueError, match="Q contains NaN"):
        kl(torch.tensor([0.5, 0.5]), torch.tensor([float("inf"), 0.5]))
    with pytest.raises(ValueError, match="P must have shape"):
        marginals(torch.full((2, 3), 1 / 6))
    with pytest.raises(ValueError, match="P and Q must have the same shape"):
        tv(P, torch.full((9,), 1 / 9))
    with pytest.raises(ValueError, match="Q must sum to 1"):
        kl(P, P * 0.5)


# ---------------------------------------------------------------- corpus joints
def test_corpus_joint_exact_counts():
    #          ab.c  ab.d  ab.c   ab (too short)
    text = "xabcaabdzabca ab"
    cj = text_joint(text, "ab", 2)
    assert cj.count == 3  # the final "ab" has only one token after it
    # continuations: "ca", "dz", "ca"
    counts = {(a, b): int(cj.counts[i, j])
              for i, a in enumerate(cj.labels()) for j, b in enumerate(cj.labels())
              if cj.counts[i, j] > 0}
    assert counts == {("c", "a"): 2, ("d", "z"): 1}
    assert abs(float(cj.P.sum()) - 1) < 1e-15
    torch.testing.assert_close(cj.P, cj.counts.double() / 3)
    assert set(cj.vocab) == {ord(c) for c in "acdz"}
    assert cj.vocab[:2] == [ord("a"), ord("c")]  # most frequent first (ties by id)


def test_corpus_joint_top_k_other_bucket():
    tokens = [9, 1, 2, 9, 1, 3, 9, 1, 2, 9, 4, 5, 9]
    cj = corpus_joint(tokens, [9], 2, top_k=2)
    # continuations after 9: (1,2), (1,3), (1,2), (4,5); frequencies 1:3, 2:2, 3,4,5: 1
    assert cj.vocab == [1, 2, OTHER] and cj.count == 4
    expected = torch.zeros(3, 3, dtype=torch.int64)
    expected[0, 1] = 2  # (1, 2)
    expected[0, 2] = 1  # (1, 3 -> other)
    expected[2, 2] = 1  # (4 -> other, 5 -> other)
    assert torch.equal(cj.counts, expected)
    assert cj.labels(lambda t: f"t{t}") == ["t1", "t2", "<other>"]
    # no bucket when top_k covers everything
    assert OTHER not in corpus_joint(tokens, [9], 2, top_k=10).vocab
    # empty context: every position with n tokens after it
    assert corpus_joint(tokens, [], 1).count == len(tokens)


def test_corpus_joint_errors():
    with pytest.raises(ValueError, match="never occurs"):
        text_joint("abcabc", "zz", 2)
    with pytest.raises(ValueError, match="never occurs"):
        text_joint("xxabc", "ab", 2)  # the only occurrence lacks two tokens after it
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        corpus_joint([1, 2, 3], [1], 1, top_k=0)
    with pytest.raises(TypeError, match="tokens must be a 1-D sequence of ints"):
        corpus_joint([[1, 2], [3, 4]], [1], 1)
    with pytest.raises(ValueError, match="tokens must hold token ids >= 0"):
        corpus_joint([1, -2, 3], [1], 1)
    with pytest.raises(TypeError, match="use text_joint"):
        corpus_joint("abc", "a", 1)
