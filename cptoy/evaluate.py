"""One evaluation protocol for drafting and decoding, used by ``bench/``, the notebooks and widgets.

Every speed or acceptance number in cptoy comes from a function in this module, so a notebook,
a widget and ``bench/RESULTS.md`` cannot disagree about what a figure means.

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

Decoding speed (:func:`decode_benchmark`)
    ``cptoy.decoding.generate`` on held-out prompts, all strategies of one model interleaved
    prompt by prompt in one run, KV cache everywhere: tokens per forward, wall-clock tokens per
    second, speed-up over autoregressive decoding *of the same model in the same run*, the share
    of time spent drafting, and beside every speed figure the repetition of the output
    (:func:`repetition`) and, for code, its share of whitespace (:func:`whitespace_share`), so a
    model stuck in a whitespace loop cannot pass for a fast one. Each method carries a label:
    lossless (its output has exactly the backbone's distribution) or lossy / verifier-free.

Verification cost (:func:`verify_cost`)
    Time of a k-token cached forward relative to a 1-token forward on this machine, and the
    ceiling it implies for wall-clock speed-up: with k tokens per forward at best,
    ``speed-up <= k * t(1) / (t(k) + drafting)``.

Held-out data (:func:`heldout_text`, :func:`heldout_ids`, :func:`heldout_prompts`) comes from the
corpora's validation split (``cptoy.data.load_corpus``), never from training text.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields, is_dataclass

import torch

from cptoy._checks import (
    check_positive_int,
    check_prompt_ids,
    check_temperature,
    check_token_ids,
)
from cptoy.cp import CPDist
from cptoy.speculative import propose_from_cp, sample_rows
from cptoy.verifierfree import decode_unverified

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
    "format_table",
    "heldout_text",
    "heldout_ids",
    "heldout_prompts",
    "rows_as_dicts",
]

# What each decoding method guarantees about its output (background.md section 3).
METHOD_LABELS = {
    "ar": "lossless (reference)",
    "self-spec": "lossless",
    "lookup": "lossless",
    "heads-only": "lossy, verifier-free",
}
_CHUNK_BYTES = 32 * 2**20  # budget for one chunk's (c, k, r, V) float64 factors


# ====================================================================== small validation
def _backbone(model):
    bb = getattr(model, "backbone", None)
    return bb if bb is not None else model


def _check_n_draft(model, n_draft) -> int:
    n_future = getattr(model, "n_future", None)
    heads = getattr(model, "heads", None)
    if heads is None or not hasattr(heads, "draft") or n_future is None or n_future < 2:
        raise TypeError("model must be an MTPModel with CP heads and n_future >= 2 "
                        "(model.heads.draft, model.n_future)")
    k = n_future - 1 if n_draft is None else n_draft
    check_positive_int(k, "n_draft")
    if k > n_future - 1:
        raise ValueError(f"n_draft must be in [1, n_future - 1 = {n_future - 1}], got {k}")
    return k


def _nanmean(xs) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


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


def _conditional_rates(prefix: list[float]) -> list[float]:
    out, prev = [], 1.0
    for p in prefix:
        out.append(p / prev if prev > 0 else float("nan"))
        prev = p
    return out


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
    from cptoy.decoding import check_routing

    t_start = time.perf_counter()
    k = _check_n_draft(model, n_draft)
    T = check_temperature(temperature)
    check_routing(routing, model)
    backbone = _backbone(model)
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
            H = backbone(w[None].to(_device(backbone)))[0]  # (L, d)
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
        greedy_acceptance=_conditional_rates(g_prefix),
        spec_acceptance=_conditional_rates(s_prefix),
        greedy_per_position=1 + G.sum(1), spec_per_position=1.0 + S.sum(1),
        positions=torch.cat(pos_all), context_starts=torch.cat(start_all), seconds=time.perf_counter() - t_start,
    )


def _device(module) -> torch.device:
    try:
        return next(module.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


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


# ====================================================================== output quality
def repetition(tokens, n: int = 4) -> float:
    """Fraction of repeated n-grams in a token sequence.

    Among the ``len(tokens) - n + 1`` n-grams of ``tokens`` (windows at every start, overlapping),
    the fraction whose exact n tokens already occurred as an n-gram starting at an earlier
    position. 0.0 for text without repeats; close to 1 for a loop. NaN when ``tokens`` holds fewer
    than ``n`` tokens (there is no n-gram to count).

    >>> repetition([1, 2, 3, 4, 1, 2, 3, 4], n=4)   # 5 4-grams, the last one repeats the first
    0.2
    """
    check_positive_int(n, "n")
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
        tokens = tokens.tolist()
    elif isinstance(tokens, str):
        raise TypeError("tokens must be a sequence of token ids, not a str")
    tokens = list(tokens)
    m = len(tokens) - n + 1
    if m <= 0:
        return float("nan")
    seen: set[tuple] = set()
    rep = 0
    for i in range(m):
        g = tuple(tokens[i:i + n])
        rep += g in seen
        seen.add(g)
    return rep / m


def whitespace_share(text: str) -> float:
    """Fraction of the characters of ``text`` that are whitespace (``str.isspace``: spaces,
    tabs, newlines); NaN for the empty string."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not text:
        return float("nan")
    return sum(ch.isspace() for ch in text) / len(text)


# ====================================================================== verifier-free baseline
class _HeadsOnly:
    """The heads-only rule of :func:`cptoy.verifierfree.decode_unverified`: x_1 from the
    backbone (sampled at T, argmax at 0), then every draft of the heads after it, kept."""

    def __init__(self, model, k: int, T: float, gen: torch.Generator):
        self.model, self.bb, self.k, self.T, self.gen = model, _backbone(model), k, T, gen

    def forward(self, chunk: list[int], cache, room: int):
        h = self.bb(torch.tensor([chunk], dtype=torch.long), cache)[:, -1]  # (1, d)
        return h, self.bb.logits(h)[0].double()  # (V,)

    def choose(self, state, room: int) -> tuple[list[int], int]:
        h, lg = state
        T, gen = self.T, self.gen
        x1 = int(lg.argmax()) if T == 0 else int(sample_rows(torch.softmax(lg / T, -1), gen))
        if room < 2:
            return [x1], 0
        kk = min(self.k, room - 1)
        dist = self.model.heads.draft(h, torch.tensor([x1]), T if T > 0 else 1.0, n_draft=kk)
        drafts = propose_from_cp(dist[0].detach().to("cpu", torch.float64), kk, T, gen).tokens
        return [x1] + drafts, 0


@torch.no_grad()
def heads_only_generate(model, prompt_ids, max_new_tokens: int, temperature: float = 1.0,
                        seed: int | None = 0, n_draft: int | None = None):
    """Verifier-free multi-token decoding (lossy): keep every draft without checking it.

    Each forward over ``[x_1, d_2..d_{k+1}]`` (KV cache) yields, at its last position, the
    backbone's next token x_1' (sampled at ``temperature``, argmax at 0) and the heads' drafts
    after it (sampled from the tempered CP conditioned on x_1', its mode at 0). All k + 1 tokens
    are kept, so tokens per forward is k + 1 by construction, but the output no longer has the
    backbone's distribution. Returns a ``cptoy.decoding.Generation`` (arrivals "first" for the
    backbone's tokens, "draft" for the unchecked ones).
    """
    k = _check_n_draft(model, n_draft)
    T = check_temperature(temperature)
    check_positive_int(max_new_tokens, "max_new_tokens")
    bb = _backbone(model)
    prompt = check_prompt_ids(prompt_ids, bb.config.vocab_size)
    if len(prompt) + max_new_tokens > bb.config.block_size:
        raise ValueError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"block_size {bb.config.block_size}")
    gen = torch.Generator()
    gen.manual_seed(seed) if seed is not None else gen.seed()
    return decode_unverified(model, bb, prompt, max_new_tokens, _HeadsOnly(model, k, T, gen),
                             "heads-only", T)


# ====================================================================== decoding benchmark
@dataclass
class BenchRow:
    """One (model, strategy, temperature) row of :func:`decode_benchmark`: sums over prompts."""

    model: str  # the model's name in the table
    strategy: str  # "ar", "self-spec", "lookup" or "heads-only"
    label: str  # lossless / lossy, verifier-free (METHOD_LABELS)
    temperature: float  # 0 = greedy
    n_draft: int  # drafts per step (0 for "ar")
    prompts: int  # number of prompts decoded
    tokens: int  # new tokens over all prompts
    forwards: int  # backbone forwards over all prompts (prefills included)
    tokens_per_forward: float  # tokens / forwards
    tokens_per_second: float  # tokens / wall seconds (all prompts)
    speedup: float  # tokens_per_second / that of "ar" in the same run (nan without "ar")
    draft_share: float  # drafting time / wall time
    forward_share: float  # backbone forwards (prefill + verification) time / wall time
    repetition: float  # mean over prompts of repetition(tokens, 4)
    whitespace: float  # mean over prompts of whitespace_share(decoded) (nan without decode)
    acceptance: list[float]  # accepted / attempted by draft position 2, 3, ...
    equal_to_ar: float  # fraction of prompts whose tokens equal "ar"'s (temperature 0; else nan)
    seconds: float  # wall seconds over all prompts
    texts: list[str] = field(default_factory=list, repr=False)  # decoded outputs (with decode)
    generations: list = field(default_factory=list, repr=False)  # the Generation objects


def _run(model, strategy, prompt, max_new, T, seed, n_draft, lookup_ngram, eos_id,
         routing="mixture"):
    from cptoy.decoding import generate

    if strategy == "heads-only":
        return heads_only_generate(model, prompt, max_new, T, seed=seed, n_draft=n_draft)
    return generate(model, prompt, max_new, temperature=T, strategy=strategy, seed=seed,
                    eos_id=eos_id, n_draft=None if strategy == "ar" else n_draft,
                    lookup_ngram=lookup_ngram,
                    routing=routing if strategy == "self-spec" else "mixture")


@dataclass
class Method:
    """One decoding method in a benchmark run: a model, a strategy and its drafts per step."""

    name: str  # shown in the "model" column
    model: object  # MTPModel (a bare backbone for "ar" / "lookup")
    strategy: str  # "ar", "self-spec", "lookup" or "heads-only"
    n_draft: int | None = None  # drafts per step (None: the model's n_future - 1)
    routing: str = "mixture"  # self-spec drafter: "mixture" or "expert" (cptoy.decoding)


def _check_method(m: Method) -> Method:
    if not isinstance(m, Method):
        raise TypeError(f"methods must hold Method objects, got {type(m).__name__}")
    if m.strategy not in METHOD_LABELS:
        raise ValueError(f"strategy must be one of {tuple(METHOD_LABELS)}, got {m.strategy!r}")
    if m.strategy in ("self-spec", "heads-only"):
        k = _check_n_draft(m.model, m.n_draft)
    elif m.strategy == "lookup":
        nf = getattr(m.model, "n_future", None)
        k = m.n_draft if m.n_draft is not None else (nf - 1 if nf and nf >= 2 else 4)
        check_positive_int(k, "n_draft")
    else:
        k = 0
    from cptoy.decoding import check_routing

    check_routing(m.routing, m.model if m.strategy == "self-spec" else None)
    return Method(m.name, m.model, m.strategy, k, m.routing)


def benchmark_methods(
    methods,
    prompts,
    temperature: float = 0.8,
    max_new_tokens: int = 64,
    seed: int = 0,
    decode=None,
    lookup_ngram: int = 3,
    eos_id: int | None = None,
    warmup: bool = True,
) -> list[BenchRow]:
    """Decode every prompt with every :class:`Method`, interleaved, and measure each.

    Prompt i is decoded by every method in turn (with seed ``seed + i``) before prompt i + 1,
    so load from other processes hits all methods alike. Speed-up is relative to the first
    method whose strategy is "ar" (give the same backbone). ``warmup`` decodes the first prompt
    once per method, untimed. Returns one :class:`BenchRow` per method, in order.
    """
    methods = [_check_method(m) for m in methods]
    if not methods:
        raise ValueError("methods must not be empty")
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    T = check_temperature(temperature)
    check_positive_int(max_new_tokens, "max_new_tokens")
    if decode is not None and not callable(decode):
        raise TypeError("decode must be a callable (tokenizer.decode) or None")

    def run(m, prompt, s):
        return _run(m.model, m.strategy, prompt, max_new_tokens if s is not None else
                    min(8, max_new_tokens), T, seed if s is None else s, m.n_draft,
                    lookup_ngram, eos_id, m.routing)

    if warmup:
        for m in methods:
            run(m, prompts[0], None)
    gens: list[list] = [[] for _ in methods]
    for i, prompt in enumerate(prompts):
        for j, m in enumerate(methods):
            gens[j].append(run(m, prompt, seed + i))

    ar = next((j for j, m in enumerate(methods) if m.strategy == "ar"), None)
    rows = []
    for m, gs in zip(methods, gens, strict=True):
        tokens = sum(len(g.tokens) for g in gs)
        forwards = sum(g.stats.forward_passes for g in gs)
        wall = sum(g.stats.wall_time for g in gs)
        draft_t = sum(g.stats.draft_time for g in gs)
        fwd_t = sum(g.stats.prefill_time + g.stats.verify_time for g in gs)
        att = [sum(x) for x in zip(*[g.stats.attempted_by_position for g in gs], strict=True)]
        acc = [sum(x) for x in zip(*[g.stats.accepted_by_position for g in gs], strict=True)]
        texts = [decode(g.tokens) for g in gs] if decode is not None else []
        equal = float("nan")
        if T == 0 and ar is not None:
            equal = sum(g.tokens == a.tokens for g, a in zip(gs, gens[ar], strict=True)) / len(gs)
        rows.append(BenchRow(
            model=m.name, strategy=m.strategy, label=METHOD_LABELS[m.strategy], temperature=T,
            n_draft=m.n_draft, prompts=len(gs), tokens=tokens, forwards=forwards,
            tokens_per_forward=tokens / forwards,
            tokens_per_second=tokens / wall if wall > 0 else float("nan"), speedup=float("nan"),
            draft_share=draft_t / wall if wall > 0 else float("nan"),
            forward_share=fwd_t / wall if wall > 0 else float("nan"),
            repetition=_nanmean(repetition(g.tokens) for g in gs),
            whitespace=_nanmean(whitespace_share(t) for t in texts),
            acceptance=[a / t if t else float("nan") for a, t in zip(acc, att, strict=True)],
            equal_to_ar=equal, seconds=wall, texts=texts, generations=gs,
        ))
    if ar is not None:
        for r in rows:
            r.speedup = r.tokens_per_second / rows[ar].tokens_per_second
    return rows


def decode_benchmark(
    model,
    prompts,
    strategies=("ar", "self-spec", "lookup"),
    temperature: float = 0.8,
    max_new_tokens: int = 64,
    seed: int = 0,
    decode=None,
    n_draft: int | None = None,
    lookup_ngram: int = 3,
    eos_id: int | None = None,
    name: str = "model",
    warmup: bool = True,
) -> list[BenchRow]:
    """Decode every prompt with every strategy of one model and measure speed and quality.

    model: an ``MTPModel`` (a bare backbone for "ar" / "lookup" only).
    prompts: a list of prompts, each a list of token ids (or a 1-D tensor).
    strategies: a subset of ("ar", "self-spec", "lookup", "heads-only"); speed-up is relative
        to "ar", which should be among them.
    temperature: >= 0 (0 greedy). seed: prompt i is decoded with seed ``seed + i`` by every
        strategy. n_draft: drafts per step (default: the model's n_future - 1; lookup on a bare
        backbone: 4). decode: ``tokenizer.decode`` for the whitespace share and the texts.
    warmup: decode the first prompt once per strategy, untimed, before measuring.

    One interleaved run (:func:`benchmark_methods`). Returns one :class:`BenchRow` per strategy.
    """
    if isinstance(strategies, str):
        strategies = (strategies,)
    strategies = tuple(strategies)
    if not strategies or any(s not in METHOD_LABELS for s in strategies):
        raise ValueError(f"strategies must be a non-empty subset of {tuple(METHOD_LABELS)}, "
                         f"got {strategies}")
    if len(set(strategies)) != len(strategies):
        raise ValueError(f"strategies must be distinct, got {strategies}")
    methods = [Method(name, model, s, None if s == "ar" else n_draft) for s in strategies]
    return benchmark_methods(methods, prompts, temperature=temperature,
                             max_new_tokens=max_new_tokens, seed=seed, decode=decode,
                             lookup_ngram=lookup_ngram, eos_id=eos_id, warmup=warmup)


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
    from cptoy.decoding import check_routing

    bb = _backbone(model)
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
    dev = _device(bb)
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


# ====================================================================== markdown tables
def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        a = abs(v)
        return f"{v:.0f}" if a >= 100 else f"{v:.1f}" if a >= 10 else f"{v:.2f}"
    if isinstance(v, (list, tuple)):
        return " / ".join(_fmt(x) for x in v) if v else "–"
    return str(v).replace("|", "\\|").replace("\n", " ")


BENCH_COLUMNS = [
    ("model", "model"), ("method", "strategy"), ("kind", "label"), ("T", "temperature"),
    ("drafts", "n_draft"), ("tokens/forward", "tokens_per_forward"),
    ("tokens/s", "tokens_per_second"), ("speed-up vs AR", "speedup"),
    ("draft share", "draft_share"), ("repeated 4-grams", "repetition"),
    ("whitespace", "whitespace"), ("acceptance by position", "acceptance"),
]


def format_table(rows, columns=None) -> str:
    """A markdown table of ``rows`` (dataclasses or dicts).

    columns: list of field names or (header, field name | callable(row)) pairs; default: every
    field whose values are scalars (for :class:`BenchRow`: :data:`BENCH_COLUMNS`). Floats print
    with 2 decimals (1 from 10, none from 100), NaN and None as "–", lists joined by " / ".
    """
    rows = list(rows)
    if not rows:
        raise ValueError("rows is empty")
    dicts = []
    for r in rows:
        if is_dataclass(r) and not isinstance(r, type):
            dicts.append({f.name: getattr(r, f.name) for f in fields(r)})
        elif isinstance(r, dict):
            dicts.append(r)
        else:
            raise TypeError(f"rows must be dataclasses or dicts, got {type(r).__name__}")
    if columns is None:
        if all(isinstance(r, BenchRow) for r in rows):
            columns = BENCH_COLUMNS
        else:
            columns = [k for k, v in dicts[0].items()
                       if isinstance(v, (int, float, str, bool)) or v is None]
    cols = [(c, c) if isinstance(c, str) else tuple(c) for c in columns]
    for _h, key in cols:
        if isinstance(key, str) and any(key not in d for d in dicts):
            raise ValueError(f"column {key!r} is not a field of every row")
    lines = ["| " + " | ".join(h for h, _ in cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    for r, d in zip(rows, dicts, strict=True):
        cells = [_fmt(key(r) if callable(key) else d[key]) for _, key in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ====================================================================== held-out data
def heldout_text(corpus: str = "code", max_chars: int | None = 200_000) -> str:
    """The first ``max_chars`` characters (None: all) of a corpus's validation split
    (``cptoy.data.load_corpus(corpus).val``): text no shipped model was trained on."""
    from cptoy.data import load_corpus

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


def rows_as_dicts(rows) -> list[dict]:
    """Plain dicts of result rows (for json), lists and scalars only."""
    out = []
    for r in rows:
        d = {f.name: getattr(r, f.name) for f in fields(r)} if is_dataclass(r) else dict(r)
        out.append({k: v for k, v in d.items() if k not in ("texts", "generations")
                    and (isinstance(v, (int, float, str, bool, list)) or v is None)})
    return out
