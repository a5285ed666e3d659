"""Draft quality and decoding cost, measured one way for ``bench/``, the notebooks and widgets.

Draft quality, without the traps of decoding from a weak model (:func:`teacher_forced_acceptance`)
    Held-out text, teacher forced: at every held-out position t the *true* next token is
    ``x_1``; the heads, conditioned on it, draft positions 2..k+1, which are scored against the
    true continuation. Two figures, each as expected tokens per forward ``1 + sum_j Pr(the first
    j drafts are accepted)`` and as acceptance by draft position:

    * greedy match: the drafts are the CP's greedy mode (what temperature-0 decoding drafts) and
      count while they equal the true text;
    * speculative: the acceptance probability of the speculative-sampling rule ``min(1, p/q)``
      at each drafted position *given the true prefix*, computed exactly in expectation:
      ``sum_v min(p(v), q(v)) = 1 - TV(p, q)`` with p the backbone's ``softmax(logits / T)`` and
      q the tempered CP conditional the drafts would be sampled from (at T = 0: 1 if the argmax
      of q equals the argmax of p, else 0).

Verification cost (:func:`verify_cost`)
    Time of a k-token cached forward relative to a 1-token forward on this machine, and the
    ceiling it implies for wall-clock speed-up: with k tokens per forward at best,
    ``speed-up <= k * t(1) / (t(k) + drafting)`` (:func:`predicted_speedup`).

Held-out data (:func:`heldout_text`, :func:`heldout_ids`, :func:`heldout_prompts`) comes from the
corpora's validation split (``cptoy.data.load_corpus``), never from training text.

Decoding speed is measured by :mod:`cptoy.benchmark` (``benchmark_methods``,
``decode_benchmark``, ``repetition``, ``format_table``, re-exported here) and the heads-only
decoder lives in :mod:`cptoy.verifierfree`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from cptoy._checks import check_positive_int, check_temperature, check_token_ids
from cptoy.benchmark import (  # noqa: F401 (re-exported: the names bench/ and notebooks use)
    BENCH_COLUMNS,
    METHOD_LABELS,
    BenchRow,
    Method,
    benchmark_methods,
    decode_benchmark,
    format_table,
    repetition,
    whitespace_share,
)
from cptoy.cp import CPDist
from cptoy.data import load_corpus
from cptoy.decoding import backbone_of, check_n_draft, check_routing, device_of
from cptoy.theory import conditional_rates
from cptoy.verifierfree import heads_only_generate  # noqa: F401 (re-exported)

__all__ = [
    "TFResult",
    "BenchRow",
    "CostRow",
    "METHOD_LABELS",
    "teacher_forced_acceptance",
    "repetition",
    "whitespace_share",
    "decode_benchmark",
    "benchmark_methods",
    "Method",
    "heads_only_generate",
    "verify_cost",
    "predicted_speedup",
    "best_n_draft",
    "format_table",
    "heldout_text",
    "heldout_ids",
    "heldout_prompts",
]

_CHUNK_BYTES = 32 * 2**20  # budget for one chunk's (c, k, r, V) float64 factors


# ====================================================================== teacher forcing
@dataclass
class TFResult:
    """Teacher-forced draft acceptance on held-out text (see :func:`teacher_forced_acceptance`).

    Lists are indexed by draft position: entry j is draft position j + 2 (the first draft after
    x_1). ``*_prefix`` entry j = Pr(drafts 2..j+2 all accepted), so tokens per forward is
    ``1 + sum(prefix)``; ``*_acceptance`` entry j = Pr(draft j+2 accepted | the drafts before it
    were), comparable with ``GenerationStats.acceptance_by_position`` of real decoding.
    """

    n_draft: int  # k drafts per step: at most k + 1 tokens per forward
    temperature: float  # of p and of the drafting CP (0: greedy verification)
    n_positions: int  # held-out positions evaluated
    greedy_tokens_per_forward: float  # 1 + E[leading CP-mode drafts equal to the true text]
    spec_tokens_per_forward: float  # 1 + sum_j E[prod_{i<=j} sum_v min(p_i, q_i)]
    greedy_prefix: list[float]  # (k,) Pr(first j drafts equal the text)
    spec_prefix: list[float]  # (k,) expected Pr(first j drafts accepted by min(1, p/q))
    greedy_acceptance: list[float]  # (k,) conditional rate by draft position
    spec_acceptance: list[float]  # (k,) conditional rate by draft position
    greedy_per_position: torch.Tensor = field(repr=False)  # (N,) int64 tokens per forward
    spec_per_position: torch.Tensor = field(repr=False)  # (N,) float64 expected tokens per forward
    positions: torch.Tensor = field(repr=False)  # (N,) index t into ids of each position's x_t
    context_starts: torch.Tensor = field(repr=False)  # (N,) first index of each one's context
    seconds: float = 0.0  # wall time of the evaluation

    def summary(self) -> str:
        acc = " ".join(f"{a:.2f}" for a in self.spec_acceptance)
        return (f"teacher-forced, {self.n_positions} held-out positions, k={self.n_draft} drafts, "
                f"T={self.temperature:g}: tokens/forward greedy-match "
                f"{self.greedy_tokens_per_forward:.3f}, speculative "
                f"{self.spec_tokens_per_forward:.3f} (acceptance by position {acc})")


def _windows(N: int, block: int, k: int, min_context: int) -> list[tuple[int, int, int]]:
    """Windows (start, end, first) over ids[0:N]: forward ids[start:end], evaluate local
    positions first .. end - start - k - 2 (each needs k + 1 true tokens after it). Consecutive
    windows cover consecutive positions exactly once."""
    out = []
    start, first = 0, min_context - 1
    while True:
        end = min(start + block, N)
        last = end - start - k - 2  # last evaluable local position
        if last < first:
            break
        out.append((start, end, first))
        if end == N:
            break
        nxt = start + last + 1  # next absolute position to evaluate
        start = nxt - (min_context - 1)
        first = min_context - 1
    return out


@torch.no_grad()
def teacher_forced_acceptance(
    model,
    ids,
    n_draft: int | None = None,
    temperature: float = 1.0,
    max_positions: int | None = 2048,
    seed: int = 0,
    min_context: int = 16,
    routing: str = "mixture",
) -> TFResult:
    """Teacher-forced acceptance of the CP heads' drafts on held-out token ids.

    model: an ``MTPModel`` (``backbone``, ``heads.draft``, ``n_future``).
    ids: (T,) int64 held-out token ids (or a list of ints).
    n_draft: k drafts per position, 1 <= k <= n_future - 1 (default n_future - 1).
    temperature: T >= 0 of the speculative figure: p = softmax(logits / T) and q from the heads
        tempered by T (at T = 0: argmax agreement). The greedy-match figure always uses the
        untempered CP's mode, like temperature-0 decoding.
    max_positions: evaluate at most this many positions (None: all). When there are more,
        whole windows are drawn at random (generator seeded with ``seed``).
    min_context: every evaluated position has at least this many tokens of context.
    routing: the drafter evaluated, as in ``cptoy.decoding.generate``: "mixture" (q = the CP
        conditional) or "expert" (one expert drawn from the posterior gate drafts every
        position and is the q of the test; at T = 0 and for greedy match, the gate's argmax).
        For "expert" the speculative figure is the exact expectation over the expert drawn:
        ``sum_a w_a(x_1) prod_{i<=j} sum_v min(p_i(v), q_{i,a}(v))``.

    The evaluated positions and their contexts depend on the model's ``n_future``, not on
    ``n_draft``, so results for different k are on the same positions, and the first j entries
    of ``*_prefix`` for k drafts equal those of an evaluation with j drafts.

    Positions: the text is cut into windows of ``block_size`` tokens; one backbone forward per
    window gives hidden states h_t (1, L, d) and p at every position; the heads draft from h_t
    conditioned on x_1 = ids[t + 1], batched over positions. For position t with true
    continuation y_j = ids[t + j] (j = 2..k+1):

    * greedy: d = mode of the CP given x_1; accepted drafts = number of leading j with d_j = y_j;
    * speculative: q_j = the CP conditional of position j given x_1 and y_2..y_{j-1} (the gate
      updated by Bayes' rule), p_j = the backbone's distribution after ids[..t + j - 1];
      a_j = sum_v min(p_j(v), q_j(v)); expected accepted drafts = sum_j prod_{i<=j} a_i.
      (Drawing d_j ~ q_j and accepting with min(1, p_j(d_j)/q_j(d_j)) accepts with probability
      exactly a_j, so this is the expectation of the sampled rule, without sampling noise.)

    Returns a :class:`TFResult`.
    """
    t_start = time.perf_counter()
    k = check_n_draft(model, n_draft)
    T = check_temperature(temperature)
    check_routing(routing, model)
    backbone = backbone_of(model)
    V, block = backbone.config.vocab_size, backbone.config.block_size
    ids = check_token_ids(ids, V)
    check_positive_int(min_context, "min_context")
    if max_positions is not None:
        check_positive_int(max_positions, "max_positions")
    # windows leave room for the model's most drafts whatever k is, so that evaluations with
    # different n_draft use the same positions and contexts (their first drafts agree exactly)
    k_win = max(k, getattr(model, "n_future", k + 1) - 1)
    if min_context + k_win + 1 > block:
        raise ValueError(f"min_context + n_future = {min_context + k_win + 1} must fit in "
                         f"block_size {block}")
    wins = _windows(ids.numel(), block, k_win, min_context)
    if not wins:
        raise ValueError(f"ids holds {ids.numel()} tokens; at least min_context + n_future = "
                         f"{min_context + k_win + 1} are needed")
    if max_positions is not None:
        counts = [e - s - k_win - 1 - f for s, e, f in wins]
        if sum(counts) > max_positions:
            g = torch.Generator().manual_seed(seed)
            order = torch.randperm(len(wins), generator=g).tolist()
            chosen, total = [], 0
            for i in order:
                if total >= max_positions:
                    break
                chosen.append(i)
                total += counts[i]
            wins = [wins[i] for i in sorted(chosen)]

    heads = model.heads
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    g_acc, s_cum, pos_all, start_all = [], [], [], []
    remaining = max_positions if max_positions is not None else 1 << 62
    try:
        for start, end, first in wins:
            if remaining <= 0:
                break
            w = ids[start:end]  # (L,)
            L = w.numel()
            H = backbone(w[None].to(device_of(backbone)))[0]  # (L, d)
            logits = backbone.logits(H).to("cpu", torch.float64)  # (L, V)
            t_loc = torch.arange(first, L - k_win - 1)[:remaining]  # (m,) local positions
            remaining -= t_loc.numel()
            idx_y = t_loc[:, None] + 2 + torch.arange(k)  # (m, k): positions of y_2..y_{k+1}
            Y = w[idx_y]  # (m, k) true continuation
            X1 = w[t_loc + 1]  # (m,)
            r_guess = getattr(heads, "rank", 1)
            c = max(1, _CHUNK_BYTES // (8 * k * max(r_guess, 1) * V))
            for lo in range(0, t_loc.numel(), c):
                tl, y, x1 = t_loc[lo:lo + c], Y[lo:lo + c], X1[lo:lo + c]
                h = H[tl]  # (c, d)
                d1 = _draft(heads, h, x1.to(h.device), 1.0, k)
                top = d1.log_weights.argmax(-1)  # (c,) the expert greedy one-expert routing uses
                if routing == "expert":
                    mode = d1.log_factors[torch.arange(len(top)), :, top].argmax(-1)  # (c, k)
                else:
                    mode = d1.mode().cpu()  # (c, k)
                match = (mode == y).long().cumprod(1)  # (c, k): first j drafts all equal y
                g_acc.append(match)
                dT = d1 if T in (0.0, 1.0) else _draft(heads, h, x1.to(h.device), T, k)
                lg = logits[tl[:, None] + 1 + torch.arange(k)]  # (c, k, V): p after y_<j
                if routing == "expert":
                    s_cum.append(_expert_acceptance(dT, lg, T, top))
                else:
                    q = _true_prefix_conditionals(dT, y)  # (c, k, V) float64
                    if T == 0:
                        a = (q.argmax(-1) == lg.argmax(-1)).double()  # (c, k)
                    else:
                        p = torch.softmax(lg / T, dim=-1)
                        a = torch.minimum(p, q).sum(-1).clamp(max=1.0)  # (c, k)
                    s_cum.append(a.cumprod(1))
                pos_all.append(tl + start)
                start_all.append(torch.full_like(tl, start))
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    G = torch.cat(g_acc)  # (N, k)
    S = torch.cat(s_cum)  # (N, k)
    g_prefix = G.double().mean(0).tolist()
    s_prefix = S.mean(0).tolist()
    return TFResult(
        n_draft=k, temperature=T, n_positions=G.shape[0],
        greedy_tokens_per_forward=1.0 + sum(g_prefix),
        spec_tokens_per_forward=1.0 + sum(s_prefix),
        greedy_prefix=g_prefix, spec_prefix=s_prefix,
        greedy_acceptance=conditional_rates(g_prefix),
        spec_acceptance=conditional_rates(s_prefix),
        greedy_per_position=1 + G.sum(1), spec_per_position=1.0 + S.sum(1),
        positions=torch.cat(pos_all), context_starts=torch.cat(start_all), seconds=time.perf_counter() - t_start,
    )


def _draft(heads, h, x1, temperature: float, k: int) -> CPDist:
    """The heads' CP over drafted positions 2..k+1 given x1 (batch (c,)), detached, CPU."""
    dist = heads.draft(h, x1, temperature, n_draft=k)
    if dist.n < k:
        raise RuntimeError(f"heads drafted {dist.n} positions, {k} needed")
    return CPDist(dist.log_weights.detach().cpu(), dist.log_factors[..., :k, :, :].detach().cpu())


def _expert_acceptance(dist, lg: torch.Tensor, T: float, top: torch.Tensor) -> torch.Tensor:
    """Pr(first j drafts accepted) (c, k) for one-expert routing, given the true prefix.

    dist: CPDist batch (c,), n = k, conditioned on x_1 (weights = posterior gate); lg (c, k, V)
    the backbone's logits after each true prefix. T > 0: expectation over the expert drawn from
    the gate of prod_{i<=j} sum_v min(p_i, q_{i,a}); T = 0: the gate's argmax ``top`` (c,) drafts
    and draft j counts while argmax q_{j,top} == argmax p_j.
    """
    lf = dist.log_factors.double()  # (c, k, r, V)
    if T == 0:
        q_top = lf[torch.arange(lf.shape[0]), :, top]  # (c, k, V)
        return (q_top.argmax(-1) == lg.argmax(-1)).double().cumprod(1)
    p = torch.softmax(lg / T, dim=-1)  # (c, k, V)
    a = torch.minimum(p[:, :, None], lf.exp()).sum(-1).clamp(max=1.0)  # (c, k, r)
    w = dist.log_weights.double().exp()  # (c, r)
    return (w[:, None] * a.cumprod(1)).sum(-1)  # (c, k)


def _true_prefix_conditionals(dist, y: torch.Tensor) -> torch.Tensor:
    """q_j(.) = CP conditional of drafted position j given the true y_<j, for every j.

    dist: CPDist batch (c,), n = k (already conditioned on x_1); y (c, k). Returns (c, k, V)
    float64. The gate after y_<j is softmax(log w + sum_{i<j} log q_{i,a}(y_i)) (a y_i outside a
    drafting shortlist leaves it unchanged).
    """
    lw = dist.log_weights.double()  # (c, r)
    lf = dist.log_factors.double()  # (c, k, r, V)
    c, k, r, _ = lf.shape
    ll = lf.gather(-1, y.view(c, k, 1, 1).expand(c, k, r, 1)).squeeze(-1)  # (c, k, r)
    # a true token outside a drafting shortlist has q = 0 under every expert: it says nothing
    # about the expert, so the gate stays where it was (instead of 0/0)
    ll = torch.where(torch.isinf(ll).all(-1, keepdim=True), torch.zeros_like(ll), ll)
    before = torch.cat([torch.zeros_like(ll[:, :1]), ll[:, :-1].cumsum(1)], dim=1)  # (c, k, r)
    log_gates = torch.log_softmax(lw[:, None] + before, dim=-1)  # (c, k, r)
    return torch.logsumexp(log_gates[..., None] + lf, dim=2).exp()  # (c, k, V)


# ====================================================================== verification cost
def _low_quartile(xs: list[float]) -> float:
    """The 25th percentile of ``xs`` (nearest rank)."""
    ys = sorted(xs)
    return ys[max(0, math.ceil(0.25 * len(ys)) - 1)]


@dataclass
class CostRow:
    """Cost of verifying k tokens in one cached forward, relative to a 1-token forward."""

    k: int  # tokens in the forward (x_1 plus k - 1 drafts)
    ms: float  # milliseconds of a k-token cached forward plus its logits (lower quartile)
    ratio: float  # t(k) / t(1)
    ceiling: float  # k * t(1) / t(k): wall-clock speed-up if every draft were accepted, free
    draft_ms: float  # milliseconds to draft k - 1 tokens (lower quartile; nan: k = 1 / no heads)
    draft_ratio: float  # draft_ms / t(1)
    ceiling_with_draft: float  # k * t(1) / (t(k) + draft_ms) (nan where the heads can't draft)


@torch.no_grad()
def verify_cost(model, k_values=(1, 2, 3, 4, 5, 6), context_length: int = 64,
                repeats: int = 30, seed: int = 0, temperature: float = 0.8,
                routing: str = "mixture") -> list[CostRow]:
    """Time a k-token cached forward (plus logits) after ``context_length`` cached tokens, for
    each k, relative to k = 1; and, if the model has heads, the time to draft k - 1 tokens.

    Drafting is timed exactly as ``cptoy.decoding.generate`` drafts one step at ``temperature``
    with ``routing``: the heads' call, sampling the drafts and building q (everything the
    decoder counts as draft time), so ``draft_ratio`` is the share a decoding step pays.

    Every round times every k once, in a random order (seeded), and the cache is rolled back
    after each forward. Each figure is the lower quartile over ``repeats`` rounds: on a shared
    CPU a sizeable fraction of calls is preempted by other processes (+4 to 10 ms on a 1.5 ms
    forward, measured here), which would move a median; the lower quartile is the cost of the
    computation itself.
    """
    bb = backbone_of(model)
    T = check_temperature(temperature)
    if isinstance(k_values, int):
        k_values = (k_values,)
    ks = [check_positive_int(k, "k_values entries") for k in k_values]
    if 1 not in ks:
        ks = [1] + ks
    ks = sorted(set(ks))
    check_positive_int(context_length, "context_length")
    check_positive_int(repeats, "repeats")
    V, block = bb.config.vocab_size, bb.config.block_size
    if context_length + max(ks) > block:
        raise ValueError(f"context_length + max(k_values) = {context_length + max(ks)} exceeds "
                         f"block_size {block}")
    n_future = getattr(model, "n_future", None)
    heads = getattr(model, "heads", None)
    drafter = heads if hasattr(heads, "propose") and n_future is not None else None
    check_routing(routing, model if drafter is not None else None)
    g = torch.Generator().manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)  # the drafts' sampling
    ids = torch.randint(0, V, (1, context_length + max(ks)), generator=g)
    was_training = getattr(model, "training", False)
    model.eval()
    dev = device_of(bb)
    ids = ids.to(dev)
    times = {k: [] for k in ks}
    dtimes = {k: [] for k in ks}
    try:
        cache = bb.new_cache(1)
        H = bb(ids[:, :context_length], cache)
        h_last = H[:, -1]
        x1 = int(ids[0, context_length])
        for rep in range(repeats + 2):  # two warm-up rounds
            order = [ks[i] for i in torch.randperm(len(ks), generator=g).tolist()]
            for k in order:  # a fresh order every round: no aliasing with periodic load
                t0 = time.perf_counter()
                Hk = bb(ids[:, context_length:context_length + k], cache)
                bb.logits(Hk)
                t1 = time.perf_counter()
                cache.truncate(context_length)
                dt = float("nan")
                if drafter is not None and 2 <= k <= n_future:
                    t2 = time.perf_counter()
                    prop = drafter.propose(h_last, x1, k - 1, T, gen, routing)  # ints: synced
                    if T > 0:
                        _ = prop.q.at  # what the decoder reads to verify (lazy until then)
                    dt = time.perf_counter() - t2
                if rep >= 2:
                    times[k].append(t1 - t0)
                    dtimes[k].append(dt)
    finally:
        if was_training:
            model.train()
    t1 = _low_quartile(times[1])
    rows = []
    for k in ks:
        tk = _low_quartile(times[k])
        dk = _low_quartile(dtimes[k]) if not math.isnan(dtimes[k][0]) else float("nan")
        rows.append(CostRow(
            k=k, ms=1e3 * tk, ratio=tk / t1, ceiling=k * t1 / tk, draft_ms=1e3 * dk,
            draft_ratio=dk / t1,
            ceiling_with_draft=(1.0 if k == 1 else k * t1 / (tk + dk)),  # nan: no drafts
        ))
    return rows


def predicted_speedup(tokens_per_forward: float, cost: list[CostRow], k: int) -> float:
    """Wall-clock speed-up that ``tokens_per_forward`` implies with k-token verification forwards:
    ``tokens_per_forward * t(1) / (t(k) + drafting(k - 1))`` (k = n_draft + 1), from
    :func:`verify_cost` rows. It ignores the per-step bookkeeping in Python."""
    by = {c.k: c for c in cost}
    if 1 not in by or k not in by:
        raise ValueError(f"cost must hold rows for k = 1 and k = {k}, has {sorted(by)}")
    c = by[k]
    d = 0.0 if math.isnan(c.draft_ms) else c.draft_ms
    return tokens_per_forward * by[1].ms / (c.ms + d)


def best_n_draft(prefix, cost: list[CostRow]) -> tuple[int, float]:
    """The number of drafts per step that the cost model favours, and its predicted speed-up.

    prefix: (m,) Pr(drafts 1..j all accepted), j = 1..m, e.g. ``spec_prefix`` of
        :func:`teacher_forced_acceptance` or a checkpoint's recorded ``prefix``; with k - 1
        drafts a step yields ``1 + sum(prefix[:k - 1])`` tokens per forward on average.
    cost: :func:`verify_cost` rows of the drafting model (rows for k = 1 and each k to weigh).

    Returns ``(n_draft, speed-up)``: the k - 1 in 1..m with a cost row that maximises
    :func:`predicted_speedup`. A k-token verify costs far less than k 1-token forwards, but its
    cost need not grow smoothly in k either (a matrix library may switch kernels at some k; see
    bench/RESULTS.md), so fewer drafts can be faster although they accept fewer tokens.
    """
    pre = [float(p) for p in prefix]
    if not pre or any(not 0 <= p <= 1 for p in pre):
        raise ValueError(f"prefix must be a non-empty list of probabilities, got {prefix!r}")
    if any(b > a + 1e-9 for a, b in zip(pre, pre[1:], strict=False)):
        raise ValueError(f"prefix must be non-increasing (Pr(first j accepted)), got {prefix!r}")
    ks = sorted(c.k for c in cost if 2 <= c.k <= len(pre) + 1)
    if not ks:
        raise ValueError(f"cost has no row for k in 2..{len(pre) + 1}: {sorted(c.k for c in cost)}")
    best = max(ks, key=lambda k: predicted_speedup(1 + sum(pre[: k - 1]), cost, k))
    return best - 1, predicted_speedup(1 + sum(pre[: best - 1]), cost, best)


# ====================================================================== held-out data
def heldout_text(corpus: str = "code", max_chars: int | None = 200_000) -> str:
    """The first ``max_chars`` characters (None: all) of a corpus's validation split
    (``cptoy.data.load_corpus(corpus).val``): text no shipped model was trained on."""
    if corpus not in ("code", "shakespeare"):
        raise ValueError(f"corpus must be 'code' or 'shakespeare', got {corpus!r}")
    if max_chars is not None:
        check_positive_int(max_chars, "max_chars")
    text = load_corpus(corpus).val
    return text if max_chars is None else text[:max_chars]


def heldout_ids(corpus: str, tokenizer, max_chars: int | None = 200_000) -> torch.Tensor:
    """:func:`heldout_text` encoded with ``tokenizer``: (T,) int64."""
    return torch.tensor(tokenizer.encode(heldout_text(corpus, max_chars)), dtype=torch.long)


def heldout_prompts(corpus: str, tokenizer, num: int = 8, prompt_tokens: int = 32,
                    seed: int = 0, max_chars: int | None = 200_000) -> list[list[int]]:
    """``num`` prompts of exactly ``prompt_tokens`` tokens from held-out text, each starting at
    the beginning of a non-blank line, at line numbers drawn with a generator seeded by ``seed``
    (distinct lines, in text order)."""
    check_positive_int(num, "num")
    check_positive_int(prompt_tokens, "prompt_tokens")
    text = heldout_text(corpus, max_chars)
    starts, pos = [], 0
    for line in text.splitlines(keepends=True):
        if line.strip() and len(text) - pos > 16 * prompt_tokens:
            starts.append(pos)
        pos += len(line)
    if len(starts) < num:
        raise ValueError(f"held-out text has {len(starts)} usable lines, fewer than num={num}")
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in torch.randperm(len(starts), generator=g).tolist():
        s = starts[i]
        ids = tokenizer.encode(text[s:s + 16 * prompt_tokens])
        if len(ids) >= prompt_tokens:
            out.append((s, ids[:prompt_tokens]))
        if len(out) == num:
            break
    if len(out) < num:
        raise ValueError(f"found only {len(out)} prompts of {prompt_tokens} tokens")
    return [ids for _, ids in sorted(out)]
