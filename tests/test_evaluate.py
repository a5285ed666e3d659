"""Tests of cptoy.evaluate: the one evaluation protocol (teacher-forced acceptance, repetition,
decoding benchmark, verification cost, tables, held-out prompts)."""

from __future__ import annotations

import math

import pytest
import torch
from fakes import FakeMTP, TrigramBackbone

from cptoy.cp import CPDist
from cptoy.evaluate import (
    METHOD_LABELS,
    BenchRow,
    CostRow,
    best_n_draft,
    decode_benchmark,
    format_table,
    heads_only_generate,
    heldout_prompts,
    predicted_speedup,
    repetition,
    teacher_forced_acceptance,
    verify_cost,
    whitespace_share,
)


def _tiny_mtp(n=4, rank=3, V=16, block=48, seed=0, sharp=True):
    from cptoy.heads import MTPModel
    from cptoy.model import GPTConfig

    torch.manual_seed(seed)
    cfg = GPTConfig.preset("tiny", vocab_size=V, block_size=block)
    model = MTPModel(cfg, n, rank).eval()
    with torch.no_grad():
        if sharp:
            model.backbone.wte.weight.mul_(20.0)  # clear argmaxes: no float near-ties
        if model.heads.gate is not None:
            torch.nn.init.normal_(model.heads.gate.weight, std=1.0)
        model.heads.transform_weight.normal_(0, 0.3)  # heads that differ from the backbone
    return model


# ============================================================================ repetition
def test_repetition_handmade_sequences():
    assert repetition([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(1 / 5)
    assert repetition([7] * 10) == pytest.approx(6 / 7)  # 7 4-grams, all but the first repeat
    assert repetition(list(range(20))) == 0.0
    assert repetition([1, 2, 1, 3, 1], n=1) == pytest.approx(2 / 5)
    assert repetition([1, 2, 1, 2, 1, 2], n=2) == pytest.approx(3 / 5)  # 12 21 12 21 12
    assert repetition(torch.tensor([1, 2, 3, 4, 1, 2, 3, 4])) == pytest.approx(0.2)
    assert math.isnan(repetition([1, 2, 3]))
    with pytest.raises(TypeError, match="tokens"):
        repetition("abcdabcd")
    with pytest.raises(ValueError, match="n must be >= 1"):
        repetition([1, 2], n=0)


def test_whitespace_share():
    assert whitespace_share("a b\n") == pytest.approx(0.5)
    assert whitespace_share("    \t\n") == 1.0
    assert whitespace_share("abc") == 0.0
    assert math.isnan(whitespace_share(""))
    with pytest.raises(TypeError, match="text"):
        whitespace_share([1, 2])


# ============================================================================ teacher forcing
def _reference(model, ids, res, T):
    """Slow loop: one uncached forward per position, the full CP from heads.forward, tempered
    and conditioned with CPDist methods (a different code path from the batched one)."""
    k = res.n_draft
    greedy, spec = [], []
    for t, s in zip(res.positions.tolist(), res.context_starts.tolist(), strict=True):
        ctx = ids[s:t + k + 1]  # true text up to y_{k+1}'s context
        H = model.backbone(ctx[None])[0]  # (len, d)
        h = H[t - s]  # hidden at x_t
        x1 = ids[t + 1]
        y = ids[t + 2:t + k + 2]  # (k,)
        full = model.heads(h[None])  # CPDist, batch (1,)
        mode = full.condition(x1.view(1, 1)).mode()[0, :k]
        acc = 0
        while acc < k and int(mode[acc]) == int(y[acc]):
            acc += 1
        greedy.append(1 + acc)
        cond = (full.tempered(T) if T > 0 else full).condition(x1.view(1, 1)).to(torch.float64)
        prob, total = 1.0, 1.0
        for j in range(k):
            dj = cond.condition(y[:j].view(1, j)) if j else cond
            q = dj.log_marginal(0)[0].exp()  # (V,)
            lg = model.backbone.logits(H[t - s + 1 + j]).double()
            if T == 0:
                a = float(q.argmax() == lg.argmax())
            else:
                a = float(torch.minimum(torch.softmax(lg / T, -1), q).sum())
            prob *= a
            total += prob
        spec.append(total)
    return torch.tensor(greedy), torch.tensor(spec, dtype=torch.float64)


@pytest.mark.parametrize("T", [1.0, 0.7, 0.0])
def test_teacher_forced_equals_slow_reference(T):
    model = _tiny_mtp()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 16, (110,), generator=g)
    res = teacher_forced_acceptance(model, ids, n_draft=3, temperature=T, max_positions=None,
                                    min_context=4)
    # windows of 48 tokens cover every position with >= 4 tokens of context exactly once
    assert res.positions.tolist() == list(range(3, 110 - 3 - 1))
    assert ((res.positions - res.context_starts) >= 3).all()
    assert ((res.positions + 3 + 1 - res.context_starts) < 48).all()
    with torch.no_grad():
        ref_g, ref_s = _reference(model, ids, res, T)
    assert torch.equal(res.greedy_per_position, ref_g)
    torch.testing.assert_close(res.spec_per_position, ref_s, atol=2e-5, rtol=0)
    assert res.greedy_tokens_per_forward == pytest.approx(float(ref_g.double().mean()))
    assert res.spec_tokens_per_forward == pytest.approx(float(ref_s.mean()), abs=2e-5)
    # the summaries are consistent: 1 + sum(prefix), conditional rates multiply to the prefix
    assert res.spec_tokens_per_forward == pytest.approx(1 + sum(res.spec_prefix))
    if min(res.spec_prefix) > 0:
        assert math.prod(res.spec_acceptance) == pytest.approx(res.spec_prefix[-1])
    assert 1.0 <= res.spec_tokens_per_forward <= 4.0
    if T > 0:
        assert 0.0 < res.spec_prefix[0] < 1.0  # not a degenerate model


def _expert_reference(model, ids, res, T):
    """Slow loop for one-expert routing: expert a ~ posterior gate (its argmax at T = 0 and
    for greedy match), drafts and q from that expert's factors; exact expectation over a."""
    k = res.n_draft
    greedy, spec = [], []
    for t, s in zip(res.positions.tolist(), res.context_starts.tolist(), strict=True):
        H = model.backbone(ids[s:t + k + 1][None])[0]
        h, x1, y = H[t - s], ids[t + 1], ids[t + 2:t + k + 2]
        full = model.heads(h[None])
        post1 = full.condition(x1.view(1, 1))  # untempered: greedy match
        top = int(post1.log_weights[0].argmax())
        mode = post1.log_factors[0, :k, top].argmax(-1)
        acc = 0
        while acc < k and int(mode[acc]) == int(y[acc]):
            acc += 1
        greedy.append(1 + acc)
        cond = (full.tempered(T) if T > 0 else full).condition(x1.view(1, 1)).to(torch.float64)
        w = cond.weights[0]  # (r,)
        lgs = [model.backbone.logits(H[t - s + 1 + j]).double() for j in range(k)]
        total = 1.0
        for j in range(k):
            if T == 0:
                a_top = int(cond.log_weights[0].argmax())
                ok = all(int(cond.log_factors[0, i, a_top].argmax()) == int(lgs[i].argmax())
                         for i in range(j + 1))
                total += float(ok)
            else:
                pr = 0.0
                for a in range(cond.rank):
                    prod = 1.0
                    for i in range(j + 1):
                        q = cond.log_factors[0, i, a].exp()
                        prod *= float(torch.minimum(torch.softmax(lgs[i] / T, -1), q).sum())
                    pr += float(w[a]) * prod
                total += pr
        spec.append(total)
    return torch.tensor(greedy), torch.tensor(spec, dtype=torch.float64)


@pytest.mark.parametrize("T", [0.8, 0.0])
def test_teacher_forced_one_expert_routing_equals_slow_reference(T):
    model = _tiny_mtp()
    ids = torch.randint(0, 16, (80,), generator=torch.Generator().manual_seed(2))
    res = teacher_forced_acceptance(model, ids, n_draft=3, temperature=T, max_positions=None,
                                    min_context=4, routing="expert")
    with torch.no_grad():
        ref_g, ref_s = _expert_reference(model, ids, res, T)
    assert torch.equal(res.greedy_per_position, ref_g)
    torch.testing.assert_close(res.spec_per_position, ref_s, atol=2e-5, rtol=0)
    mix = teacher_forced_acceptance(model, ids, n_draft=3, temperature=T, max_positions=None,
                                    min_context=4)
    assert torch.equal(mix.positions, res.positions)
    if T > 0:  # E_a[1 - TV(p, q_a)] <= 1 - TV(p, mixture) at the first draft (convexity)
        assert res.spec_prefix[0] <= mix.spec_prefix[0] + 1e-9


def test_teacher_forced_with_a_shortlist():
    model = _tiny_mtp()
    ids = torch.randint(0, 16, (80,), generator=torch.Generator().manual_seed(2))
    kw = dict(n_draft=3, temperature=0.8, max_positions=None, min_context=4)
    full = teacher_forced_acceptance(model, ids, **kw)
    model.heads.set_draft_vocab(list(range(8)))  # half the vocabulary: true tokens fall outside
    short = teacher_forced_acceptance(model, ids, **kw)
    one = teacher_forced_acceptance(model, ids, routing="expert", **kw)
    for res in (short, one):
        assert not torch.isnan(res.spec_per_position).any()
        assert 1.0 <= res.spec_tokens_per_forward <= 4.0
    assert short.spec_tokens_per_forward != full.spec_tokens_per_forward
    # the greedy drafts are shortlisted tokens, so a true token outside never matches
    outside = ids[short.positions + 2] >= 8
    assert (short.greedy_per_position[outside] == 1).all()
    model.heads.set_draft_vocab(None)
    with pytest.raises(ValueError, match="routing"):
        teacher_forced_acceptance(model, ids, routing="top-1", **kw)


def test_teacher_forced_n_draft_max_positions_and_determinism():
    model = _tiny_mtp(n=5, rank=2)
    ids = torch.randint(0, 16, (300,), generator=torch.Generator().manual_seed(2))
    a = teacher_forced_acceptance(model, ids, n_draft=2, max_positions=50, seed=3)
    b = teacher_forced_acceptance(model, ids, n_draft=2, max_positions=50, seed=3)
    assert a.n_positions == 50 and len(a.spec_prefix) == 2
    assert torch.equal(a.positions, b.positions)
    assert a.spec_tokens_per_forward == b.spec_tokens_per_forward
    # the same positions for every k: fewer drafts give the leading entries of more drafts
    c = teacher_forced_acceptance(model, ids, n_draft=4, max_positions=50, seed=3)
    assert torch.equal(a.positions, c.positions)
    assert a.spec_prefix == pytest.approx(c.spec_prefix[:2], abs=1e-6)
    assert a.greedy_prefix == pytest.approx(c.greedy_prefix[:2], abs=1e-12)
    full = teacher_forced_acceptance(model, ids, max_positions=None)
    assert full.n_draft == 4 and full.n_positions == 300 - 15 - 4 - 1
    assert "teacher-forced" in full.summary()


class _CycleHeads(torch.nn.Module):
    """Oracle heads for the text 0, 1, .., V-1, 0, 1, ..: the drafts after x_1 are x_1 + 1, ..
    (point masses), or a constant wrong token when ``wrong``."""

    def __init__(self, V, n_future, wrong=False):
        super().__init__()
        self.V, self.n_future, self.rank, self.wrong = V, n_future, 1, wrong

    def draft(self, hidden, first_tokens, temperature, n_draft=None):
        k = self.n_future - 1 if n_draft is None else n_draft
        c = first_tokens.shape[0]
        lf = torch.full((c, k, 1, self.V), -1e30, dtype=torch.float64)
        for j in range(k):
            tok = (first_tokens + 2) % self.V if self.wrong else (first_tokens + 1 + j) % self.V
            lf[torch.arange(c), j, 0, tok] = 0.0
        return CPDist(torch.zeros(c, 1, dtype=torch.float64), lf)


def _cycle_model(V=5, n=4, wrong=False):
    table = torch.zeros(V + 1, V, V, dtype=torch.float64)
    for cur in range(V):
        table[:, cur, (cur + 1) % V] = 60.0  # p(successor) = 1 - (V-1) e^-60
    bb = TrigramBackbone(V, block_size=40, table=table)
    return FakeMTP(bb, _CycleHeads(V, n, wrong), n)


@pytest.mark.parametrize("T", [1.0, 0.5, 0.0])
def test_oracle_heads_get_n_tokens_per_forward(T):
    n = 4
    model = _cycle_model(n=n)
    ids = torch.arange(100) % 5
    res = teacher_forced_acceptance(model, ids, temperature=T, max_positions=None, min_context=2)
    assert res.greedy_tokens_per_forward == n
    assert res.spec_tokens_per_forward == pytest.approx(n, abs=1e-12)
    assert res.spec_acceptance == pytest.approx([1.0] * (n - 1))
    bad = teacher_forced_acceptance(_cycle_model(n=n, wrong=True), ids, temperature=T,
                                    max_positions=None, min_context=2)
    # wrong heads draft x_1 + 2 where the text has x_1 + 1: nothing is ever accepted
    assert bad.greedy_tokens_per_forward == 1.0
    assert bad.spec_tokens_per_forward == pytest.approx(1.0, abs=1e-12)


def test_teacher_forced_rejects_bad_input():
    model = _tiny_mtp()
    ids = torch.randint(0, 16, (60,))
    with pytest.raises(ValueError, match="n_draft"):
        teacher_forced_acceptance(model, ids, n_draft=4)
    with pytest.raises(TypeError, match="n_draft"):
        teacher_forced_acceptance(model, ids, n_draft=1.5)
    with pytest.raises(ValueError, match="temperature"):
        teacher_forced_acceptance(model, ids, temperature=-1)
    with pytest.raises(ValueError, match="1-D"):
        teacher_forced_acceptance(model, ids[None])
    with pytest.raises(TypeError, match="integer"):
        teacher_forced_acceptance(model, ids.float())
    with pytest.raises(ValueError, match="outside"):
        teacher_forced_acceptance(model, ids + 16)
    with pytest.raises(ValueError, match="at least"):
        teacher_forced_acceptance(model, ids[:10])
    with pytest.raises(TypeError, match="MTPModel"):
        teacher_forced_acceptance(model.backbone, ids)


# ============================================================================ decoding benchmark
def test_decode_benchmark_rows_and_greedy_equality():
    model = _tiny_mtp(n=4, rank=2, block=64)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 16, (6,), generator=g).tolist() for _ in range(3)]
    rows = decode_benchmark(model, prompts, temperature=0, max_new_tokens=24,
                            strategies=("ar", "self-spec", "lookup", "heads-only"),
                            decode=lambda ids: " ".join(map(str, ids)), name="tiny")
    by = {r.strategy: r for r in rows}
    assert list(by) == ["ar", "self-spec", "lookup", "heads-only"]
    assert all(r.label == METHOD_LABELS[r.strategy] for r in rows)
    ar = by["ar"]
    assert ar.tokens_per_forward == 1.0
    assert ar.tokens == 3 * 24 and ar.forwards == 3 * 24 and ar.n_draft == 0
    for s in ("self-spec", "lookup"):  # lossless: greedy output equals AR token for token
        assert by[s].equal_to_ar == 1.0
        assert by[s].texts == ar.texts
        assert 1.0 <= by[s].tokens_per_forward <= 4.0
        assert by[s].speedup == pytest.approx(by[s].tokens_per_second / ar.tokens_per_second)
    assert by["self-spec"].n_draft == 3 and len(by["self-spec"].acceptance) == 3
    assert by["heads-only"].tokens_per_forward == 4.0  # 24 tokens in 6 forwards of 4
    for r in rows:
        assert 0.0 < r.whitespace < 1.0  # the decode given inserts spaces
        assert 0.0 <= r.draft_share < 1.0
    table = format_table(rows)
    lines = table.splitlines()
    assert len(lines) == 2 + 4 and "tokens/forward" in lines[0] and "repeated 4-grams" in lines[0]
    assert "lossy, verifier-free" in table


def test_benchmark_columns_measure_speed_and_output():
    """Speed-up is wall-clock against AR: with a backbone whose forward costs 4 ms and perfect
    drafts it is about the ratio of forwards; repetition and whitespace are those of the text:
    a backbone that counts 0, 1, 2, 0, .. repeats 16 of its 19 4-grams in 22 tokens, and
    "1 2 0 .." is 21 spaces in 43 characters."""
    import time

    from fakes import FakeMTP, GreedyChainHeads, TrigramBackbone

    class Slow(TrigramBackbone):
        def forward(self, idx, cache=None):
            time.sleep(0.004)
            return super().forward(idx, cache)

    table = torch.full((4, 3, 3), -5.0, dtype=torch.float64)
    for cur in range(3):
        table[:, cur, (cur + 1) % 3] = 5.0  # next = cur + 1 (mod 3), whatever came before
    bb = Slow(3, block_size=64, table=table)
    model = FakeMTP(bb, GreedyChainHeads(bb, 4), 4)
    rows = decode_benchmark(model, [[0], [1, 2]], strategies=("ar", "self-spec"), temperature=0,
                            max_new_tokens=22, decode=lambda ids: " ".join(map(str, ids)),
                            warmup=False)
    ar, spec = rows
    assert ar.texts[0].startswith("1 2 0 1") and spec.texts == ar.texts
    for r in rows:
        assert r.repetition == pytest.approx(16 / 19) and r.whitespace == pytest.approx(21 / 43)
    assert spec.forwards == 2 * 7 and ar.forwards == 2 * 22  # 1 + 4 + 4 + 4 + 4 + 4 + 1 = 22
    assert 2.0 < spec.speedup < 1.3 * 22 / 7, spec.speedup


def test_decode_benchmark_sampling_and_validation():
    model = _tiny_mtp(n=3, rank=2, block=64, sharp=False)
    prompts = [[1, 2, 3, 4], [5, 6, 7]]
    rows = decode_benchmark(model, prompts, temperature=0.8, max_new_tokens=16, n_draft=1,
                            strategies=("ar", "self-spec"), warmup=False)
    assert [r.strategy for r in rows] == ["ar", "self-spec"]
    assert all(math.isnan(r.equal_to_ar) and math.isnan(r.whitespace) for r in rows)
    assert rows[1].n_draft == 1 and len(rows[1].acceptance) == 1
    again = decode_benchmark(model, prompts, temperature=0.8, max_new_tokens=16, n_draft=1,
                             strategies=("ar", "self-spec"), warmup=False)
    assert [g.tokens for g in again[1].generations] == [g.tokens for g in rows[1].generations]
    with pytest.raises(ValueError, match="strategies"):
        decode_benchmark(model, prompts, strategies=("ar", "beam"))
    with pytest.raises(ValueError, match="prompts"):
        decode_benchmark(model, [])
    with pytest.raises(ValueError, match="n_draft"):
        decode_benchmark(model, prompts, n_draft=5)
    with pytest.raises(TypeError, match="decode"):
        decode_benchmark(model, prompts, decode="utf-8")


def test_heads_only_is_verifier_free():
    model = _tiny_mtp(n=4, rank=2, block=64)
    g = heads_only_generate(model, [1, 2, 3], 10, temperature=0, n_draft=3)
    assert len(g.tokens) == 10 and g.stats.gained_per_forward == [4, 4, 2]
    assert g.stats.arrival[:4] == ["first", "draft", "draft", "draft"]
    # the first token of each forward is the backbone's greedy token after the context so far
    ctx = [1, 2, 3] + g.tokens
    with torch.no_grad():
        for i in (0, 4, 8):
            h = model.backbone(torch.tensor([ctx[:3 + i]]))[0, -1]
            assert int(model.backbone.logits(h).argmax()) == g.tokens[i]
    s1 = heads_only_generate(model, [1, 2, 3], 10, temperature=1.0, seed=4)
    s2 = heads_only_generate(model, [1, 2, 3], 10, temperature=1.0, seed=4)
    assert s1.tokens == s2.tokens


# ============================================================================ verification cost
def test_verify_cost_rows():
    model = _tiny_mtp(n=4, rank=2, block=64)
    rows = verify_cost(model, k_values=(2, 4), context_length=16, repeats=3)
    assert [r.k for r in rows] == [1, 2, 4]
    assert rows[0].ratio == 1.0 and rows[0].ceiling == 1.0 and math.isnan(rows[0].draft_ms)
    for r in rows[1:]:
        assert r.ms > 0 and r.ceiling == pytest.approx(r.k / r.ratio)
        assert r.draft_ms > 0 and r.ceiling_with_draft < r.ceiling
    bare = verify_cost(model.backbone, k_values=(1, 3), context_length=8, repeats=2)
    assert all(math.isnan(r.draft_ms) for r in bare)
    with pytest.raises(ValueError, match="block_size"):
        verify_cost(model, k_values=(6,), context_length=60)


def test_predicted_speedup_arithmetic():
    nan = float("nan")
    cost = [CostRow(1, 2.0, 1.0, 1.0, nan, nan, 1.0), CostRow(4, 3.0, 1.5, 8 / 3, 1.0, 0.5, 2.0)]
    assert predicted_speedup(2.5, cost, 4) == pytest.approx(2.5 * 2.0 / 4.0)
    with pytest.raises(ValueError, match="k = 3"):
        predicted_speedup(2.0, cost, 3)


def test_best_n_draft_follows_the_cost_of_each_verify_length():
    nan = float("nan")

    def row(k, ms, draft_ms):  # t(1) = 10 ms
        return CostRow(k, ms, ms / 10, k * 10 / ms, draft_ms, draft_ms / 10, nan)

    prefix = [0.5, 0.25, 0.125]  # tokens/forward 1.5, 1.75, 1.875 with 1, 2, 3 drafts
    smooth = [row(1, 10, nan), row(2, 11, 0.5), row(3, 12, 1.0), row(4, 13, 1.5)]
    # 1.5 * 10 / 11.5 = 1.304, 1.75 * 10 / 13 = 1.346, 1.875 * 10 / 14.5 = 1.293
    assert best_n_draft(prefix, smooth) == (2, pytest.approx(17.5 / 13))
    cliff = [row(1, 10, nan), row(2, 11, 0.5), row(3, 12, 1.0), row(4, 18, 1.5)]
    assert best_n_draft(prefix, cliff)[0] == 2
    cheap = [row(1, 10, nan), row(2, 10.2, 0.1), row(3, 10.4, 0.2), row(4, 10.6, 0.3)]
    assert best_n_draft(prefix, cheap) == (3, pytest.approx(18.75 / 10.9))
    # only the lengths the cost rows hold are weighed, and at most len(prefix) drafts
    assert best_n_draft(prefix, [row(1, 10, nan), row(2, 11, 0.5)]) == (1, pytest.approx(15 / 11.5))
    assert best_n_draft([0.9], smooth)[0] == 1
    with pytest.raises(ValueError, match="non-increasing"):
        best_n_draft([0.2, 0.5], smooth)
    with pytest.raises(ValueError, match="probabilities"):
        best_n_draft([1.5], smooth)
    with pytest.raises(ValueError, match="no row"):
        best_n_draft(prefix, [row(1, 10, nan), row(5, 20, 2.0)])


# ============================================================================ tables
def test_format_table_dicts_and_columns():
    rows = [dict(a=1, b=0.12345, c="x|y", d=[0.5, float("nan")]), dict(a=2, b=123.4, c="z",
                                                                         d=[])]
    t = format_table(rows, columns=["a", ("B value", "b"), ("c", "c"), ("twice a", lambda r:
                                                                          2 * r["a"])])
    assert t.splitlines() == [
        "| a | B value | c | twice a |", "|---|---|---|---|",
        "| 1 | 0.12 | x\\|y | 2 |", "| 2 | 123 | z | 4 |"]
    assert format_table(rows).splitlines()[0] == "| a | b | c |"  # lists skipped by default
    assert "0.50 / –" in format_table(rows, columns=["d"])
    with pytest.raises(ValueError, match="empty"):
        format_table([])
    with pytest.raises(ValueError, match="column"):
        format_table(rows, columns=["nope"])
    with pytest.raises(TypeError, match="dataclasses or dicts"):
        format_table([1, 2])
    assert BenchRow.__dataclass_fields__  # the default columns belong to BenchRow


# ============================================================================ held-out prompts
def test_heldout_prompts_are_deterministic_line_starts():
    from cptoy.data import ByteTokenizer
    from cptoy.evaluate import heldout_text

    tok = ByteTokenizer()
    a = heldout_prompts("shakespeare", tok, num=4, prompt_tokens=20, seed=1, max_chars=50_000)
    b = heldout_prompts("shakespeare", tok, num=4, prompt_tokens=20, seed=1, max_chars=50_000)
    assert a == b and len(a) == 4 and all(len(p) == 20 for p in a)
    text = heldout_text("shakespeare", 50_000)
    for p in a:
        s = tok.decode(p)
        i = text.find(s)
        assert i >= 0 and (i == 0 or text[i - 1] == "\n") and s.strip()
    assert heldout_prompts("shakespeare", tok, num=4, prompt_tokens=20, seed=2,
                           max_chars=50_000) != a
    with pytest.raises(ValueError, match="corpus"):
        heldout_text("latin")


def test_benchmark_methods_interleaves_models_on_one_backbone():
    from cptoy.evaluate import Method, benchmark_methods

    m2 = _tiny_mtp(n=4, rank=2, block=64)
    m1 = _tiny_mtp(n=4, rank=1, block=64)
    m1.backbone.load_state_dict(m2.backbone.state_dict())  # same backbone, other heads
    prompts = [[1, 2, 3, 4], [9, 8, 7]]
    methods = [Method("bb", m2.backbone, "ar"), Method("r1 n=3", m1, "self-spec", 2),
               Method("r2 n=4", m2, "self-spec"), Method("lookup", m2.backbone, "lookup", 2)]
    rows = benchmark_methods(methods, prompts, temperature=0, max_new_tokens=20)
    assert [r.model for r in rows] == ["bb", "r1 n=3", "r2 n=4", "lookup"]
    assert [r.n_draft for r in rows] == [0, 2, 3, 2]
    assert all(r.equal_to_ar == 1.0 for r in rows)
    for r in rows:
        assert 0 < r.forward_share <= 1 and r.draft_share + r.forward_share <= 1 + 1e-9
    with pytest.raises(TypeError, match="Method"):
        benchmark_methods([("ar", m2)], prompts)
    with pytest.raises(TypeError, match="MTPModel"):
        benchmark_methods([Method("x", m2.backbone, "self-spec")], prompts)
