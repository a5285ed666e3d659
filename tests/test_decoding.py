"""Tests of cptoy.decoding: losslessness (greedy equality and an exact goodness-of-fit test),
exact stopping, consistent stats and a correct KV-cache rollback.

Most tests use the fakes of tests/fakes.py, whose next-token distribution is a known trigram
table, so the exact distribution of generated text can be enumerated; a few use a real tiny GPT
(cptoy.model) with stand-in CP heads, and the real MTPModel once cptoy.heads exists.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
import torch
from fakes import FakeMTP, LinearCPHeads, OracleGreedyHeads, TrigramBackbone, make_fake
from scipy.stats import chisquare
from stats import exact_ar, generate_pvalue

import cptoy.decoding as decoding
import cptoy.speculative as speculative
from cptoy.decoding import Generation, generate, lookup_drafts

STRATS = ("ar", "self-spec", "lookup")


def _check_stats(g: Generation, model, prompt, max_new, eos_id=None):
    """Every stats invariant the module promises; returns nothing, asserts."""
    s, toks = g.stats, g.tokens
    assert 1 <= len(toks) <= max_new
    assert sum(s.gained_per_forward) == len(toks)
    assert s.gained_per_forward[0] == 1 and all(x >= 1 for x in s.gained_per_forward)
    assert s.forward_passes == 1 + s.n_steps == len(s.gained_per_forward)
    assert len(s.accepted_per_step) == len(s.drafted_per_step) == len(s.experts) == s.n_steps
    assert all(0 <= a <= d for a, d in zip(s.accepted_per_step, s.drafted_per_step, strict=True))
    assert len(s.arrival) == len(toks)
    assert s.arrival[0] == "first"
    assert set(s.arrival) <= set(decoding.ARRIVALS) - {"draft"}  # verified: nothing unchecked
    assert s.arrival.count("accepted") == sum(s.accepted_per_step)
    assert sum(s.accepted_by_position) == sum(s.accepted_per_step)
    assert all(0 <= a <= t for a, t in zip(s.accepted_by_position, s.attempted_by_position,
                                               strict=True))
    # attempts at position j never exceed attempts at position j - 1 (left to right)
    assert all(b <= a for a, b in zip(s.attempted_by_position, s.attempted_by_position[1:],
                                      strict=False))
    # each step gains its accepted drafts plus one token, except a step ended by an eos draft
    for i, (gain, acc) in enumerate(zip(s.gained_per_forward[1:], s.accepted_per_step,
                                            strict=True)):
        last = i == s.n_steps - 1
        assert gain == acc + 1 or (last and eos_id is not None and gain == acc)
    if g.stats.strategy == "ar":
        assert s.gained_per_forward == [1] * len(toks)
        assert set(s.arrival) == {"first"}
    if eos_id is not None:
        assert eos_id not in toks[:-1]
        assert len(toks) == max_new or toks[-1] == eos_id
    else:
        assert len(toks) == max_new
    assert s.wall_time >= s.prefill_time + s.verify_time + s.draft_time - 1e-6
    # the KV-cache invariant: prompt + tokens[:-1] are cached
    assert g.cache.length == len(prompt) + len(toks) - 1
    if isinstance(getattr(model, "backbone", model), TrigramBackbone):
        assert g.cache.tokens[0].tolist() == (list(prompt) + toks)[:-1]


# ============================================================================ validation
def test_rejects_bad_inputs():
    m = make_fake("random", V=3, n=3, block_size=16)
    with pytest.raises(ValueError, match="prompt_ids"):
        generate(m, [], 3)
    with pytest.raises(ValueError, match="prompt_ids"):
        generate(m, torch.zeros(2, 3, dtype=torch.long), 3)  # batch size 2
    with pytest.raises(ValueError, match="prompt_ids"):
        generate(m, [0, 3], 3)  # id outside V = 3
    with pytest.raises(TypeError, match="prompt_ids"):
        generate(m, torch.zeros(3), 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(m, [0] * 10, 7)  # 17 > block_size 16
    generate(m, [0] * 10, 6)  # 16 fits
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(m, [0], 0)
    with pytest.raises(ValueError, match="temperature"):
        generate(m, [0], 3, temperature=-0.1)
    with pytest.raises(ValueError, match="temperature"):
        generate(m, [0], 3, temperature=float("nan"))
    with pytest.raises(ValueError, match="strategy"):
        generate(m, [0], 3, strategy="medusa")
    with pytest.raises(ValueError, match="n_draft"):
        generate(m, [0], 3, strategy="self-spec", n_draft=3)  # n_future - 1 = 2
    with pytest.raises(ValueError, match="n_future"):
        generate(make_fake("random", n=1), [0], 3, strategy="self-spec")
    with pytest.raises(ValueError, match="eos_id"):
        generate(m, [0], 3, eos_id=5)
    with pytest.raises(TypeError, match="self-spec"):
        generate(m.backbone, [0], 3, strategy="self-spec")  # a bare backbone has no heads
    # "ar" and "lookup" work on a bare backbone
    assert len(generate(m.backbone, [0, 1], 5, strategy="lookup", seed=0).tokens) == 5


def test_lookup_drafts():
    assert lookup_drafts([5, 6, 7, 8, 5, 6], ngram=2, k=3) == [7, 8, 5]
    assert lookup_drafts([5, 6, 7, 8, 5, 6], ngram=2, k=1) == [7]
    # the last (latest) earlier occurrence wins
    assert lookup_drafts([1, 2, 9, 1, 2, 8, 1, 2], ngram=2, k=2) == [8, 1]
    # fallback to a shorter n-gram: [4, 2] never occurred before, [2] did
    assert lookup_drafts([2, 7, 3, 4, 2], ngram=3, k=2) == [7, 3]
    assert lookup_drafts([1, 2, 3], ngram=3, k=4) == []
    assert lookup_drafts([1], ngram=3, k=4) == []
    # overlapping matches copy into the suffix
    assert lookup_drafts([0, 0, 0], ngram=2, k=3) == [0]


def test_sampler_is_exact_and_skips_zero_mass():
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.3, 0.0], dtype=torch.float64)
    draws = decoding.sample_rows(p.expand(20000, 6), gen)  # (20000,) one per row
    counts = torch.bincount(draws, minlength=6)
    assert counts[p == 0].sum() == 0
    assert chisquare(counts[p > 0].numpy(), (20000 * p[p > 0]).numpy()).pvalue > 1e-3
    # unnormalised rows are fine (the residual is normalised by the sampler's own total)
    assert decoding.sample_rows(torch.tensor([0.0, 0.0, 3.0]), gen).item() == 2


def test_cp_proposal_equals_cpdist_conditionals():
    """q used for acceptance = CPDist.condition(drafts[:j]).log_marginal(0), gate = posterior."""
    from cptoy.cp import CPDist

    g = torch.Generator().manual_seed(0)
    for r, k in [(1, 3), (4, 1), (5, 4)]:
        dist = CPDist.from_logits(torch.randn(r, generator=g, dtype=torch.float64),
                                  3 * torch.randn(k, r, 7, generator=g, dtype=torch.float64))
        drafts = dist.sample(1, g)[0].tolist()
        q = speculative.MixtureQ(dist, drafts)
        for j in range(k):
            sub = dist if j == 0 else dist.condition(torch.tensor(drafts[:j]))
            ref = sub.log_marginal(0).exp()
            assert torch.allclose(q.row(j), ref, atol=1e-12)
            assert torch.allclose(q.rows()[j], ref, atol=1e-12)
            assert math.isclose(q.at[j], float(ref[drafts[j]]), rel_tol=1e-10)
            assert torch.allclose(q.log_gates[j].exp(), sub.weights, atol=1e-12)


# ============================================================================ greedy equality
def test_ar_greedy_equals_uncached_reference():
    """The shared cached loop with no drafts is plain greedy decoding (checked independently)."""
    for seed in range(5):
        m = make_fake("random", V=4, seed=seed)
        for prompt in ([0], [1, 2], [3, 3, 0, 1]):
            g = generate(m, prompt, 12, temperature=0, strategy="ar")
            assert g.tokens == m.backbone.greedy(prompt, 12)


@pytest.mark.parametrize("kind", ["random", "chain", "greedy"])
def test_greedy_spec_equals_ar_on_fakes(kind):
    gen = torch.Generator().manual_seed(0)
    multi_token_chunks = 0
    for V, n, rank in [(3, 2, 1), (3, 3, 2), (4, 4, 3), (5, 3, 4), (3, 5, 1)]:
        if kind == "chain" and V ** (n - 1) > 64:
            continue
        for seed in range(3):
            m = make_fake(kind, V=V, n=n, rank=rank, seed=seed)
            for _ in range(4):
                P = int(torch.randint(1, 6, (1,), generator=gen))
                prompt = torch.randint(0, V, (P,), generator=gen).tolist()
                ref = generate(m, prompt, 15, temperature=0, strategy="ar").tokens
                for strat in ("self-spec", "lookup"):
                    m.backbone.calls, m.backbone.chunk_sizes = 0, []
                    g = generate(m, prompt, 15, temperature=0, strategy=strat)
                    assert g.tokens == ref, (kind, V, n, rank, prompt, strat)
                    _check_stats(g, m, prompt, 15)
                    assert m.backbone.calls == g.stats.forward_passes
                    assert m.backbone.chunk_sizes[1:] == [1 + d for d in g.stats.drafted_per_step]
                    multi_token_chunks += sum(c > 1 for c in m.backbone.chunk_sizes[1:])
    assert multi_token_chunks > 50  # the multi-token verification path really ran


def test_greedy_acceptance_good_and_bad_heads():
    """Perfect greedy heads accept everything (n tokens per step); random heads reject some."""
    prompt = [0, 1]
    good = make_fake("greedy", V=4, n=4, seed=3)
    g = generate(good, prompt, 31, temperature=0, strategy="self-spec")
    assert g.stats.acceptance_by_position == [1.0, 1.0, 1.0]
    assert g.stats.gained_per_forward == [1] + [4] * 7 + [2]  # 1 + 28 + 2 = 31
    assert g.stats.arrival[1:5] == ["accepted", "accepted", "accepted", "bonus"]
    bad = make_fake("random", V=4, n=4, rank=2, seed=3)
    b = generate(bad, prompt, 31, temperature=0, strategy="self-spec")
    assert b.tokens == g.tokens
    assert b.stats.accepted_by_position[0] < b.stats.attempted_by_position[0]
    assert b.stats.tokens_per_forward < g.stats.tokens_per_forward
    assert "replacement" in b.stats.arrival


# ============================================================================ exact distribution
def _gof_pvalue(model, prompt, m, temperature, runs, **kw) -> float:
    """Chi-square goodness of fit of the first m generated tokens against exact AR sampling."""
    exact = model.backbone.exact_distribution(prompt, m, temperature)
    return generate_pvalue(model, prompt, m, temperature, runs, exact, **kw)


RUNS = 3000


@pytest.fixture(scope="module")
def dist_model():
    # V = 3, n = 4, rank 2 random heads: three drafts in the first step, many rejections
    return make_fake("random", V=3, n=4, rank=2, seed=7, scale=1.5)


def test_self_spec_sampling_is_exact(dist_model):
    p = _gof_pvalue(dist_model, [0, 1], 4, 0.8, RUNS, strategy="self-spec")
    assert p > 1e-3, p


def test_self_spec_with_perfect_heads_is_exact():
    # q == p: every draft accepted, the bonus path and multi-step cache rollbacks are exercised
    m = make_fake("chain", V=3, n=3, seed=11)
    g = generate(m, [2], 5, temperature=1.3, strategy="self-spec", seed=0)
    assert g.stats.accepted_per_step == g.stats.drafted_per_step  # all accepted
    p = _gof_pvalue(m, [2], 5, 1.3, 2000, strategy="self-spec")
    assert p > 1e-3, p


def test_lookup_sampling_is_exact(dist_model):
    # a repetitive prompt so that lookup finds matches and drafts (point-mass q)
    prompt = [0, 1, 2, 0, 1, 2, 0, 1]
    g = generate(dist_model, prompt, 4, temperature=1.0, strategy="lookup", seed=0)
    assert g.stats.drafted_per_step[0] >= 2
    p = _gof_pvalue(dist_model, prompt, 4, 1.0, RUNS, strategy="lookup")
    assert p > 1e-3, p


def test_goodness_of_fit_has_power(dist_model, monkeypatch):
    """Negative controls: a broken accept rule or a broken residual is caught by the same test."""
    monkeypatch.setattr(speculative, "accept", lambda p_d, q_d, u: True)  # always accept
    p = _gof_pvalue(dist_model, [0, 1], 4, 0.8, RUNS, strategy="self-spec")
    assert p < 1e-6, p
    monkeypatch.undo()
    monkeypatch.setattr(speculative, "residual", lambda p, q: p)  # replacement from p, not p - q
    p = _gof_pvalue(dist_model, [0, 1], 4, 0.8, RUNS, strategy="self-spec")
    assert p < 1e-6, p


# ============================================================================ stopping, stats
@pytest.mark.parametrize("strategy", STRATS)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_max_new_tokens_is_exact(strategy, temperature):
    for kind in ("chain", "random"):
        m = make_fake(kind, V=3, n=4, rank=2, seed=2)
        prompt = [0, 1, 2, 0, 1]
        for max_new in range(1, 12):
            m.backbone.calls = 0
            g = generate(m, prompt, max_new, temperature=temperature, strategy=strategy,
                         seed=max_new)
            assert len(g.tokens) == max_new
            _check_stats(g, m, prompt, max_new)
            assert m.backbone.calls == g.stats.forward_passes


@pytest.mark.parametrize("strategy", STRATS)
def test_eos_is_exact(strategy):
    """Output stops right after the first eos, wherever it arrives (including as a draft)."""
    arrivals = Counter()
    for seed in range(40):
        for kind in ("chain", "random"):
            m = make_fake(kind, V=4, n=4, rank=2, seed=seed % 5)
            prompt = [0, 1, 2, 3, 0, 1]
            temperature = 0.0 if seed % 2 else 1.0
            eos = seed % 4
            full = generate(m, prompt, 25, temperature=temperature, strategy=strategy, seed=seed)
            g = generate(m, prompt, 25, temperature=temperature, strategy=strategy, seed=seed,
                         eos_id=eos)
            _check_stats(g, m, prompt, 25, eos_id=eos)
            # same seed: identical random stream up to the eos, so the output is a prefix
            cut = full.tokens.index(eos) + 1 if eos in full.tokens else len(full.tokens)
            assert g.tokens == full.tokens[:cut]
            if g.tokens[-1] == eos:
                arrivals[g.stats.arrival[-1]] += 1
    assert sum(arrivals.values()) > 20
    if strategy != "ar":
        assert arrivals["accepted"] > 0  # eos arrived as an accepted draft at least once


def test_stats_and_records_are_consistent():
    m = make_fake("random", V=4, n=4, rank=3, seed=5)
    prompt = [1, 2, 3]
    g = generate(m, prompt, 30, temperature=0.9, strategy="self-spec", seed=3, record_steps=True)
    _check_stats(g, m, prompt, 30)
    s = g.stats
    assert len(g.steps) == s.n_steps
    assert len(s.attempted_by_position) == 3
    emitted = [t for r in g.steps for t in r.emitted]
    assert [g.tokens[0]] + emitted == g.tokens
    for r, n_acc in zip(g.steps, s.accepted_per_step, strict=True):
        k = len(r.drafts)
        assert r.p.shape == (k + 1, 4) and r.q.shape == (k, 4)
        assert torch.allclose(r.p.sum(-1), torch.ones(k + 1, dtype=torch.float64))
        assert torch.allclose(r.q.sum(-1), torch.ones(k, dtype=torch.float64))
        assert r.accepted == [True] * n_acc + ([False] if n_acc < k else [])
        if k == 0:  # the last step may have no room for drafts: a plain AR step
            assert r.gate_prior is None and r.final_kind == "first"
            continue
        assert math.isclose(sum(r.gate_prior), 1, abs_tol=1e-6)
        assert math.isclose(sum(r.gate_posterior), 1, abs_tol=1e-9)
        assert r.gates[0] == r.gate_posterior and len(r.gates) == k
        assert 0 <= r.expert < 3
        for j, d in enumerate(r.drafts[: len(r.accept_prob)]):
            assert math.isclose(r.accept_prob[j], min(1.0, float(r.p[j, d] / r.q[j, d])))
        # p rows are the exact tempered trigram distributions of the context
        ctx = prompt + g.tokens[: r.context_length - len(prompt) + 1]
        assert torch.allclose(r.p[0], m.backbone.next_probs(ctx, 0.9), atol=1e-12)
        # the gate after x1 is the heads' posterior: w'_a ∝ w_a q_{1,a}(x1) (tempered factors)
        full = m.heads(torch.nn.functional.one_hot(
            m.backbone.states(torch.tensor([ctx[:-1]]))[:, -1:], m.backbone.config.n_embd
        ).double())[0, 0].tempered(0.9)
        post = full.posterior_log_weights(torch.tensor([r.x1])).exp()
        assert torch.allclose(post, torch.tensor(r.gate_posterior, dtype=torch.float64))
    assert m.heads.draft_calls == sum(1 for d in s.drafted_per_step if d > 0)
    assert s.draft_time > 0 and s.verify_time > 0 and s.prefill_time > 0


def test_deterministic_given_seed():
    m = make_fake("random", V=4, n=3, rank=2, seed=1)
    for strat in STRATS:
        a = generate(m, [0, 1], 20, temperature=1.0, strategy=strat, seed=42).tokens
        b = generate(m, [0, 1], 20, temperature=1.0, strategy=strat, seed=42).tokens
        c = [generate(m, [0, 1], 20, temperature=1.0, strategy=strat, seed=s).tokens
             for s in range(5)]
        assert a == b
        assert len({tuple(x) for x in c}) > 1


def test_restores_train_mode():
    m = make_fake("random")
    m.train()
    generate(m, [0], 3, strategy="self-spec", seed=0)
    assert m.training
    m.eval()
    generate(m, [0], 3, strategy="self-spec", seed=0)
    assert not m.training


# ============================================================================ a real tiny GPT
def _tiny_gpt(V=16, seed=0, sharp=1.0):
    from cptoy.model import GPT, GPTConfig

    torch.manual_seed(seed)
    gpt = GPT(GPTConfig.preset("tiny", vocab_size=V, block_size=48)).eval()
    with torch.no_grad():
        gpt.wte.weight.mul_(sharp)  # sharper next-token distributions than the 0.02 init
    return gpt


def test_real_gpt_greedy_equality_and_cache_rollback():
    gen = torch.Generator().manual_seed(0)
    for seed in range(3):
        gpt = _tiny_gpt(V=16, seed=seed, sharp=40.0)
        for n, rank in [(2, 1), (3, 4), (5, 2)]:
            prompt = torch.randint(0, 16, (5,), generator=gen).tolist()
            ref = gpt.generate_greedy(torch.tensor([prompt]), 30, use_cache=False)[0, 5:].tolist()
            ar = generate(gpt, prompt, 30, temperature=0, strategy="ar")
            assert ar.tokens == ref
            bad = FakeMTP(gpt, LinearCPHeads(32, 16, n, rank, seed=seed, scale=0.3), n)
            good = FakeMTP(gpt, OracleGreedyHeads(gpt, prompt + ref, n), n)
            for model, strat in [(bad, "self-spec"), (good, "self-spec"), (bad, "lookup")]:
                g = generate(model, prompt, 30, temperature=0, strategy=strat)
                assert g.tokens == ref, (seed, n, rank, strat)
                _check_stats(g, model, prompt, 30)
                # rollback: the cached state equals a fresh uncached forward of the sequence
                full = torch.tensor([(prompt + g.tokens)[:-1]])
                with torch.no_grad():
                    h = gpt(full)[:, -1]
                assert torch.allclose(g.last_hidden, h, atol=1e-5)
                assert int(gpt.logits(g.last_hidden).argmax()) == g.tokens[-1]
            g = generate(good, prompt, 30, temperature=0, strategy="self-spec")
            assert g.stats.accepted_per_step == g.stats.drafted_per_step  # oracle: all accepted


def test_real_gpt_sampling_is_exact():
    """Exact enumeration through a real GPT with a KV cache (V = 3) and random linear heads."""
    gpt = _tiny_gpt(V=3, seed=4, sharp=2.0).double()  # p spread out: max prob about 0.6
    model = FakeMTP(gpt, LinearCPHeads(32, 3, 3, 2, seed=1, scale=0.3).double(), 3)
    prompt, m, T = [0, 2, 1], 4, 1.0
    exact = {}
    with torch.no_grad():
        for seq in itertools.product(range(3), repeat=m):
            lp = torch.log_softmax(gpt.logits(gpt(torch.tensor([prompt + list(seq)]))) / T, -1)[0]
            P = len(prompt)
            exact[seq] = math.exp(sum(float(lp[P - 1 + i, t]) for i, t in enumerate(seq)))
    model.backbone.exact_distribution = lambda prompt_, m_, t_: exact
    acc = att = 0
    for s in range(100):
        st = generate(model, prompt, m, temperature=T, strategy="self-spec", seed=s).stats
        acc, att = acc + sum(st.accepted_per_step), att + sum(st.drafted_per_step)
    assert 0.2 < acc / att < 0.9  # both the accept and the residual paths run
    p = _gof_pvalue(model, prompt, m, T, 1500, strategy="self-spec")
    assert p > 1e-3, p


# ============================================================================ real MTPModel
@pytest.mark.parametrize("n,rank,expert_dim", [(2, 1, None), (4, 4, None), (3, 3, 8)])
def test_mtp_model_greedy_equality(n, rank, expert_dim):
    from cptoy.heads import MTPModel
    from cptoy.model import GPTConfig

    gen = torch.Generator().manual_seed(n)
    torch.manual_seed(n)
    cfg = GPTConfig.preset("tiny", vocab_size=16, block_size=48)
    model = MTPModel(cfg, n, rank, expert_dim=expert_dim).eval()
    with torch.no_grad():
        model.backbone.wte.weight.mul_(20.0)  # clear argmaxes: no float near-ties
        if model.heads.gate is not None:
            torch.nn.init.normal_(model.heads.gate.weight, std=1.0)
    for _ in range(3):
        prompt = torch.randint(0, 16, (4,), generator=gen).tolist()
        ref = model.backbone.generate_greedy(torch.tensor([prompt]), 25, use_cache=False)
        ref = ref[0, 4:].tolist()
        assert generate(model, prompt, 25, temperature=0, strategy="ar").tokens == ref
        for strat in ("self-spec", "lookup"):
            g = generate(model, prompt, 25, temperature=0, strategy=strat)
            assert g.tokens == ref
            _check_stats(g, model, prompt, 25)
            h = model.backbone(torch.tensor([(prompt + g.tokens)[:-1]]))[:, -1]
            assert torch.allclose(g.last_hidden, h, atol=1e-5)
        g = generate(model, prompt, 25, temperature=0.8, strategy="self-spec", seed=0,
                     record_steps=True)
        _check_stats(g, model, prompt, 25)
        assert len(g.steps) == g.stats.n_steps
        assert any(len(r.drafts) == n - 1 for r in g.steps)
        if rank > 1:
            assert all(len(r.gate_prior) == rank for r in g.steps if r.drafts)


# ============================================================================ cheap drafting
def _sampling_mtp(rank=3, V=4, seed=3):
    """A real MTPModel (tiny GPT, float64) with perturbed heads: q differs from p."""
    from cptoy.heads import MTPModel
    from cptoy.model import GPTConfig

    torch.manual_seed(seed)
    model = MTPModel(GPTConfig.preset("tiny", vocab_size=V, block_size=32), 4, rank).double()
    with torch.no_grad():
        model.backbone.wte.weight.mul_(2.0)  # p spread over V (max about 0.6), not uniform
        for p in model.heads.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model.eval()
    return model


def _attach_exact(model, prompt, m, T):
    exact = exact_ar(model.backbone, prompt, m, T)
    model.backbone.exact_distribution = lambda prompt_, m_, t_: exact


@pytest.mark.parametrize("routing,shortlist", [("expert", None), ("expert", [0, 2]),
                                               ("mixture", [1, 2, 3])])
def test_cheap_drafting_is_exact(routing, shortlist):
    """One-expert routing and a drafting shortlist keep self-spec sampling exact (real heads)."""
    model = _sampling_mtp()
    model.heads.set_draft_vocab(shortlist)
    prompt, m, T = [0, 3, 1], 4, 0.9
    _attach_exact(model, prompt, m, T)
    acc = att = 0
    for s in range(60):
        g = generate(model, prompt, m, temperature=T, strategy="self-spec", seed=s,
                     routing=routing)
        acc, att = acc + sum(g.stats.accepted_per_step), att + sum(g.stats.drafted_per_step)
    assert 0.1 < acc / att < 0.95  # both the accept and the residual paths run
    p = _gof_pvalue(model, prompt, m, T, 2000, strategy="self-spec", routing=routing)
    assert p > 1e-3, p


def test_cheap_drafting_greedy_equality_and_records():
    model = _sampling_mtp(rank=3, V=16, seed=5)
    model.heads.set_draft_vocab(list(range(0, 16, 2)))
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        prompt = torch.randint(0, 16, (4,), generator=gen).tolist()
        ref = generate(model, prompt, 20, temperature=0, strategy="ar").tokens
        for routing in ("mixture", "expert"):
            g = generate(model, prompt, 20, temperature=0, strategy="self-spec", routing=routing)
            assert g.tokens == ref
            g = generate(model, prompt, 20, temperature=0.8, strategy="self-spec", seed=1,
                         routing=routing, record_steps=True)
            for r in g.steps:
                assert all(d % 2 == 0 for d in r.drafts)  # drafts come from the shortlist
                if r.drafts:
                    assert r.q.shape == (len(r.drafts), 16)
                    assert torch.allclose(r.q.sum(-1), torch.ones(len(r.drafts),
                                                                  dtype=torch.float64))
                    assert (r.q[:, 1::2] == 0).all()
                    if routing == "expert":  # q is the drawn expert's factor
                        assert r.gates[0][r.expert] == 1.0
    with pytest.raises(ValueError, match="routing"):
        generate(model, [1], 3, strategy="self-spec", routing="top-2")
    fake = make_fake("random", V=3, n=3, rank=2)
    with pytest.raises(TypeError, match="routing"):
        generate(fake, [1], 3, strategy="self-spec", routing="expert")


def test_cheap_drafting_test_has_power(monkeypatch):
    """Negative control: one-expert drafts tested against a q they were not drawn from (the
    uniform distribution) are caught by the same goodness-of-fit test."""
    model = _sampling_mtp()
    prompt, m, T = [0, 3, 1], 4, 0.9
    _attach_exact(model, prompt, m, T)
    heads = model.heads
    real = heads.draft_step

    def wrong_q(hidden, x1, k, temperature, generator=None, routing="mixture"):
        st = real(hidden, x1, k, temperature, generator, "expert")
        V = heads.vocab_size
        st.probs = torch.full((k, V), 1.0 / V, dtype=torch.float64)
        st.q_at = [1.0 / V] * k
        return st

    monkeypatch.setattr(heads, "draft_step", wrong_q)
    p = _gof_pvalue(model, prompt, m, T, 2000, strategy="self-spec", routing="expert")
    assert p < 1e-6, p
