"""Decoding: plain autoregressive, self-speculative (CP heads) and prompt-lookup drafting.

One entry point, :func:`generate`, with three strategies that share one verification routine:

``"ar"``
    Cached autoregressive decoding: a prefill forward over the prompt, then one token per
    forward of the backbone.
``"self-spec"``
    cptoy's self-speculative step (``background.md`` section 3). The backbone's own next-token
    distribution p gives ``x_1``; the CP heads at the same position, conditioned on ``x_1``
    (posterior gate), draft ``d_2..d_n``; one forward over ``[x_1, d_2..d_n]`` gives p at every
    drafted position; ``d_j`` is accepted left to right with probability
    ``min(1, p(d_j) / q(d_j | x_1, d_<j))``; the first rejection is replaced by a draw from
    ``norm(max(0, p - q))``; if every draft is accepted a bonus token comes from p at the last
    position. The replacement / bonus token is the next step's ``x_1``.
``"lookup"``
    Prompt lookup (a learning-free n-gram drafter): copy what followed the last earlier
    occurrence of the context's last few tokens. q is a point mass on each draft, so the
    acceptance probability is ``min(1, p(d))`` and the residual is ``norm(max(0, p - onehot(d)))``.

All three are *lossless*: at ``temperature=0`` the tokens equal greedy decoding token for token
(up to float ties between differently shaped forwards), at ``temperature > 0`` they have exactly
the distribution of autoregressive sampling from ``softmax(logits / temperature)``.

Batch size is 1: :func:`generate` decodes one sequence. All randomness comes from one
``torch.Generator`` seeded by ``seed``; the accept / residual arithmetic runs in float64 on the
CPU.

Drafts at temperature T > 0 are drawn ancestrally from the heads' tempered CP (an expert from the
posterior gate, then every position from that expert's factors); each is verified against the
CP's mixture conditional ``q(d_j | x_1, d_<j)`` (the expert marginalised, which is the drafts'
law given what the verifier has seen), computed in float64 from the same tempered factors. At
T = 0 the drafts are ``CPDist.mode()`` of the untempered CP and acceptance is ``d_j == argmax p``.

Routing (``routing=``, self-spec only). ``"mixture"`` is the above. ``"expert"`` reads the CP as a
mixture of experts with top-1 routing: one expert is drawn from the posterior gate (its argmax at
T = 0), only that expert's factors are computed, and q is that expert's factor at each drafted
position. Lossless too (conditioned on the expert, the drafts come from q and are tested against
q), and cheaper: position 1 for the posterior plus k factors of one expert, instead of
r (k + 1) factors. Its acceptance is lower in expectation (``E_a[1 - TV(p, q_a)] <=
1 - TV(p, sum_a w_a q_a)``), which ``cptoy.evaluate`` measures.

Counting. The prefill forward yields the first new token (arrival ``"first"``). Each later forward
(a *step*) verifies ``[x_1, drafts]`` and gains ``accepted + 1`` tokens (the accepted drafts and
the replacement / bonus token; a step ended by an accepted eos draft gains only the drafts). So
``stats.gained_per_forward[0] == 1`` is the prefill and ``sum(stats.gained_per_forward) ==
len(tokens)``; for ``"ar"`` every entry is 1. Arrivals: ``x_1`` of a step is the previous step's
``"replacement"`` or ``"bonus"``; a step with no drafts (no room left, or no lookup match) gives a
plain backbone token, ``"first"``. A step drafts at most ``max_new_tokens - len(tokens) - 1``
tokens, so the output never overshoots and no drafted token is thrown away for length.

At the end, ``Generation.cache`` holds the prompt and every new token but the last
(``cache.length == len(prompt) + len(tokens) - 1``) and ``Generation.last_hidden`` is the hidden
state at its last position, the one whose logits gave ``tokens[-1]``.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field

import torch

from cptoy._checks import check_positive_int, check_prompt_ids, check_temperature

__all__ = ["Generation", "GenerationStats", "StepRecord", "generate", "lookup_drafts", "STRATEGIES"]

STRATEGIES = ("ar", "self-spec", "lookup")
ARRIVALS = ("first", "accepted", "replacement", "bonus")
DEFAULT_LOOKUP_DRAFTS = 4  # drafts per step for "lookup" when the model has no MTP heads


# ====================================================================== results
@dataclass
class GenerationStats:
    """What one :func:`generate` call did. Lists indexed by forward pass or by step.

    A *step* is one verification forward after the prefill; ``forward_passes == 1 + n_steps``.
    """

    strategy: str  # "ar", "self-spec" or "lookup"
    temperature: float  # sampling temperature (0 = greedy)
    forward_passes: int = 0  # backbone forwards, the prefill included
    gained_per_forward: list[int] = field(default_factory=list)  # tokens gained; [0] = prefill
    drafted_per_step: list[int] = field(default_factory=list)  # drafts verified in each step
    accepted_per_step: list[int] = field(default_factory=list)  # accepted drafts in each step
    attempted_by_position: list[int] = field(default_factory=list)  # [j]: draft j+2 tested
    accepted_by_position: list[int] = field(default_factory=list)  # [j]: draft j+2 accepted
    experts: list[int | None] = field(default_factory=list)  # per step: the drafting expert
    arrival: list[str] = field(default_factory=list)  # per token: first/accepted/replacement/bonus
    wall_time: float = 0.0  # seconds for the whole call
    prefill_time: float = 0.0  # seconds for the prefill forward (and its logits)
    draft_time: float = 0.0  # seconds drafting: heads call, sampling, q (or the n-gram search)
    verify_time: float = 0.0  # seconds in the verification forwards (backbone + logits)

    @property
    def n_steps(self) -> int:
        """Verification forwards after the prefill."""
        return len(self.drafted_per_step)

    @property
    def tokens_per_forward(self) -> float:
        """Mean tokens gained per forward pass, the prefill included (1.0 for "ar")."""
        return sum(self.gained_per_forward) / max(self.forward_passes, 1)

    @property
    def tokens_per_step(self) -> float:
        """Mean tokens gained per verification step (prefill excluded); nan without steps.

        This is the steady-state figure that ``1 + sum_k Pr(first k drafts accepted)`` predicts.
        """
        steps = self.gained_per_forward[1:]
        return sum(steps) / len(steps) if steps else float("nan")

    @property
    def acceptance_by_position(self) -> list[float]:
        """Accepted / attempted for draft positions 2, 3, ... (nan where never attempted)."""
        return [a / t if t else float("nan")
                for a, t in zip(self.accepted_by_position, self.attempted_by_position,
                                strict=True)]

    @property
    def tokens_per_second(self) -> float:
        return len(self.arrival) / self.wall_time if self.wall_time > 0 else float("nan")


@dataclass
class StepRecord:
    """One verification step, for the stepper widget (``generate(..., record_steps=True)``).

    ``k`` drafts; ``p`` has one row per verified position (x_1 and every draft), the last row is
    the distribution after the last draft (where a bonus comes from). At temperature 0 ``p`` and
    ``q`` are the untempered (T = 1) distributions, shown for display; decisions use argmax.
    """

    context_length: int  # tokens before x_1 (prompt + earlier new tokens)
    x1: int  # the step's first token (the previous step's replacement/bonus, or the prefill token)
    x1_arrival: str  # how x_1 arrived: "first", "replacement" or "bonus"
    drafts: list[int]  # d_2 .. d_{k+1}
    expert: int | None  # expert sampled for the drafts (greedy: argmax of the posterior gate)
    gate_prior: list[float] | None  # heads' gate weights before conditioning on x_1
    gate_posterior: list[float] | None  # gate after conditioning on x_1
    gates: list[list[float]] | None  # gate used for q at each draft: after x_1 and d_<j
    p: torch.Tensor  # (k + 1, V) float64: backbone p after x_1, after d_2, ...
    q: torch.Tensor  # (k, V) float64: q(. | x_1, d_<j) the drafts were drawn from
    accept_prob: list[float]  # min(1, p(d_j) / q(d_j)) (greedy: 1.0 if d_j == argmax p else 0)
    accepted: list[bool]  # decisions, left to right; stops at the first rejection (or an eos)
    final_token: int | None  # replacement or bonus token (None if an accepted draft was eos)
    final_kind: str | None  # "replacement", "bonus", "first" (no drafts) or None
    emitted: list[int]  # tokens this step added to the output


@dataclass
class Generation:
    """Result of :func:`generate`: the new tokens (prompt excluded) and the stats."""

    tokens: list[int]  # new tokens only
    stats: GenerationStats
    steps: list[StepRecord] | None = field(default=None, repr=False)  # when record_steps=True
    # The decoder state at the end, for checks and continuation. The cache holds the prompt and
    # every new token except the last one (length == len(prompt) + len(tokens) - 1);
    # last_hidden (1, d) is the hidden state at the last cached position, whose logits gave
    # tokens[-1].
    cache: object = field(default=None, repr=False)
    last_hidden: torch.Tensor | None = field(default=None, repr=False)


# ====================================================================== the lossless rule
# Module-level so that tests can break them on purpose (monkeypatch) and check that the
# goodness-of-fit test notices.
def _accept(p_d: float, q_d: float, u: float) -> bool:
    """Speculative sampling: accept a draft d ~ q with probability min(1, p(d)/q(d)).

    ``u`` is uniform on [0, 1); ``u * q < p`` avoids the division and is exactly that event.
    """
    return u * q_d < p_d


def _residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The replacement distribution after a rejection, norm(max(0, p - q)), float64 (V,).

    After a rejection the mass of max(0, p - q) is positive in exact arithmetic (it equals
    TV(p, q) and a rejection needs p(d) < q(d)). If rounding leaves none at all, p itself is
    returned: that only happens when p and q agree to about 1e-16.
    """
    r = (p - q).clamp_min(0.0)
    s = r.sum()
    return r / s if s > 0 else p


def _probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / T) in float64 on the CPU; at T = 0 the untempered softmax (display only)."""
    x = logits.detach().to("cpu", torch.float64)
    return torch.softmax(x / temperature if temperature > 0 else x, dim=-1)


def sample_rows(probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One draw from each row of ``probs`` (..., V) (nonnegative, not necessarily normalised).

    Inverse-CDF sampling: the first index whose cumulative mass exceeds u * total, u ~ U[0, 1).
    A zero-probability entry is never chosen (its CDF step is empty). It is exact in law like
    ``torch.multinomial`` and about 20x faster on this CPU for V = 4096 (which matters: this runs
    inside every decode step).
    """
    cdf = probs.cumsum(-1)  # (..., V)
    u = torch.rand(cdf.shape[:-1] + (1,), dtype=cdf.dtype, generator=gen) * cdf[..., -1:]
    idx = torch.searchsorted(cdf, u, right=True).squeeze(-1)  # (...)
    if bool((idx >= probs.shape[-1]).any()):  # u * total rounded up to total (rare)
        last = (probs > 0).cumsum(-1).argmax(-1)  # (...): index of the last positive entry
        idx = torch.minimum(idx, last)
    return idx


def _draw(p: torch.Tensor, gen: torch.Generator) -> int:
    """One token from a distribution p (V,)."""
    return int(sample_rows(p, gen))


class _CPProposal:
    """The draft distribution q of one self-spec step, evaluated lazily.

    ``dist`` is the heads' CPDist over the drafted positions (batch (), float64) and ``drafts``
    the k drafted tokens, both in the heads' drafting space: the vocabulary, or the K tokens of a
    shortlist ``vocab`` (K,) (entry i = token ``vocab[i]``; ``V`` is then the vocabulary size).
    ``at[j]`` = q(d_j | x_1, d_<j) for every j (needs only (k, r) numbers); ``row(j)`` = the
    whole conditional over the vocabulary (V,), needed for a residual after a rejection (at most
    once per step) and for the step records. Both are the CP conditional mixture under the
    posterior gate: ``dist.condition(drafts[:j]).log_marginal(0)`` (checked in the tests).
    """

    def __init__(self, dist, drafts: list[int], vocab: torch.Tensor | None = None,
                 V: int | None = None, at: list[float] | None = None,
                 probs: torch.Tensor | None = None):
        k = len(drafts)
        self.vocab, self.V = vocab, V
        if probs is None and dist.rank == 1:
            probs = dist.log_factors[:k, 0].exp()
        self.probs = probs  # (k, K): q is this one factor (rank 1, one-expert routing), or None
        if probs is not None:
            self.log_gates = probs.new_zeros(k, 1)
            self.at = at if at is not None else probs[torch.arange(k), drafts].tolist()
            return
        self.lf = dist.log_factors[:k]  # (k, r, K)
        d = torch.tensor(drafts, dtype=torch.long)
        ll = self.lf.gather(-1, d.view(k, 1, 1).expand(k, dist.rank, 1)).squeeze(-1)  # (k, r)
        before = torch.cat([torch.zeros_like(ll[:1]), ll[:-1].cumsum(0)])  # sum_{i<j} ll_i
        self.log_gates = torch.log_softmax(dist.log_weights + before, dim=-1)  # (k, r)
        self.at = torch.logsumexp(self.log_gates + ll, dim=-1).exp().tolist()  # k floats

    def _full(self, q: torch.Tensor) -> torch.Tensor:
        if self.vocab is None:
            return q
        out = q.new_zeros(q.shape[:-1] + (self.V,))
        out[..., self.vocab] = q
        return out

    def row(self, j: int) -> torch.Tensor:
        if self.probs is not None:
            return self._full(self.probs[j])
        return self._full(torch.logsumexp(self.log_gates[j].unsqueeze(-1) + self.lf[j], dim=0).exp())

    def rows(self) -> torch.Tensor:
        if self.probs is not None:
            return self._full(self.probs[: len(self.at)])
        return self._full(torch.logsumexp(self.log_gates.unsqueeze(-1) + self.lf, dim=1).exp())


class _PointProposal:
    """q of a deterministic drafter (prompt lookup): a point mass on each draft."""

    def __init__(self, drafts: list[int], vocab_size: int):
        self.drafts, self.V = drafts, vocab_size
        self.at = [1.0] * len(drafts)

    def row(self, j: int) -> torch.Tensor:
        r = torch.zeros(self.V, dtype=torch.float64)
        r[self.drafts[j]] = 1.0
        return r

    def rows(self) -> torch.Tensor:
        r = torch.zeros(len(self.drafts), self.V, dtype=torch.float64)
        if self.drafts:
            r[torch.arange(len(self.drafts)), torch.tensor(self.drafts)] = 1.0
        return r


def _verify(logits, drafts, q, temperature, gen, eos_id, keep_p=False):
    """Verify ``drafts`` (k tokens) against the backbone's logits (k + 1, V).

    Row i of ``logits`` is the distribution of the token after x_1, d_2, .., i.e. the target p
    for draft i (rows 0..k-1) and for the bonus (row k). ``q`` is the proposal the drafts were
    drawn from (``_CPProposal`` / ``_PointProposal``; unused at temperature 0). At temperature 0
    the float64 p is only built when ``keep_p`` (for the step records); decisions use argmax.

    Returns (n_accepted, final_token | None, final_kind | None, accept_probs, decisions, p).
    Stops right after an accepted eos draft (final_token None).
    """
    k = len(drafts)
    greedy = temperature == 0
    p = _probs(logits, temperature) if keep_p else None  # (k + 1, V) float64, for the records

    def p_row(i: int) -> torch.Tensor:  # (V,) float64; only the rows a step reaches are built
        return p[i] if p is not None else _probs(logits[i], temperature)

    accept_probs: list[float] = []
    decisions: list[bool] = []
    for i, d in enumerate(drafts):
        if greedy:
            target = int(logits[i].argmax())
            ok = d == target
            accept_probs.append(1.0 if ok else 0.0)
        else:
            p_i = p_row(i)
            p_d, q_d = float(p_i[d]), q.at[i]
            accept_probs.append(min(1.0, p_d / q_d) if q_d > 0 else 1.0)
            u = float(torch.rand((), dtype=torch.float64, generator=gen))
            ok = _accept(p_d, q_d, u)
        decisions.append(ok)
        if not ok:
            final = target if greedy else _draw(_residual(p_i, q.row(i)), gen)
            return i, final, "replacement", accept_probs, decisions, p
        if eos_id is not None and d == eos_id:
            return i + 1, None, None, accept_probs, decisions, p
    final = int(logits[k].argmax()) if greedy else _draw(p_row(k), gen)
    return k, final, ("bonus" if k > 0 else "first"), accept_probs, decisions, p


# ====================================================================== drafters
def lookup_drafts(context, ngram: int, k: int) -> list[int]:
    """Prompt-lookup drafts: up to ``k`` tokens that followed the last earlier occurrence of the
    last ``ngram`` tokens of ``context`` (a list of ints), falling back to shorter n-grams down to
    1; ``[]`` when nothing matches.

    >>> lookup_drafts([5, 6, 7, 8, 5, 6], ngram=2, k=3)
    [7, 8, 5]
    """
    context = list(context)
    L = len(context)
    if k <= 0 or L < 2:
        return []
    for g in range(min(ngram, L - 1), 0, -1):
        pattern = context[L - g:]
        for start in range(L - g - 1, -1, -1):  # latest earlier occurrence first
            if context[start:start + g] == pattern:
                return context[start + g:start + g + k]  # non-empty: start + g <= L - 1
    return []


def _cp_drafts(draft, takes_k, h_last, x1, k, temperature, gen, device, record,
               routing="mixture", heads=None):
    """Draft k tokens from the CP heads conditioned on x1.

    Returns (drafts, proposal | None, expert, extra-record dict). The proposal evaluates
    q(. | x_1, d_2..d_{j+1}), the CP conditional mixture under the posterior gate, from the very
    distribution the drafts were sampled from (same tempered factors, in float64); with
    ``routing="expert"`` it is the chosen expert's factors (a rank-1 CP). cptoy's heads do all
    of this in one lean call (``CPHeads.draft_step``), over their drafting shortlist when they
    have one (then only the residual after a rejection is spread over the vocabulary); other
    heads only need ``draft(hidden, first_tokens, temperature[, n_draft])``.
    """
    if hasattr(heads, "draft_step"):
        step = heads.draft_step(h_last, x1, k, temperature, gen, routing)
        drafts = step.tokens
        if temperature == 0 and not record:
            return drafts, None, step.expert, {}
        vocab = step.vocab.cpu() if step.vocab is not None else None
        if step.mixture is None:  # q is one factor: its probabilities are at hand
            q = _CPProposal(None, step.index, vocab, heads.vocab_size, step.q_at,
                            step.factor_probs().cpu())
        else:
            q = _CPProposal(step.mixture.to("cpu"), step.index, vocab, heads.vocab_size)
        extra = {}
        if record:
            r = heads.rank
            post = step.log_posterior.exp().tolist() if step.log_posterior is not None else [1.0]
            if routing == "expert" and r > 1:
                one = [float(a == step.expert) for a in range(r)]
                gates = [one] * len(drafts)  # q is the drawn expert's factor
            else:
                gates = q.log_gates.exp().tolist()
            extra = dict(gate_posterior=post, gates=gates)
        return drafts, q, step.expert, extra
    t_heads = temperature if temperature > 0 else 1.0  # greedy drafts are the mode of the T=1 CP
    first = torch.tensor([x1], dtype=torch.long, device=device)
    if takes_k:  # compute only the k positions this step needs
        dist = draft(h_last, first, t_heads, n_draft=k)  # CPDist, batch (1,), positions 2..k+1
    else:
        dist = draft(h_last, first, t_heads)  # CPDist, batch (1,), positions 2..n
    dist = dist[0].detach()  # batch ()
    if dist.n < k:
        raise RuntimeError(f"heads drafted {dist.n} positions, {k} needed")
    if temperature == 0:  # greedy: any drafts are lossless, q is not needed
        drafts = [int(t) for t in dist.mode()[:k]]
        expert = int(dist.log_weights.argmax())
        if not record:
            return drafts, None, expert, {}
    dist = dist.to("cpu", torch.float64)  # the exact q, in float64
    if temperature > 0:
        # ancestral sampling from the CP: an expert from the posterior gate, then every drafted
        # position from that expert's factor. The drafts' law is the CP conditional; acceptance
        # uses its mixture conditionals q(d_j | x_1, d_<j), which marginalise the expert.
        expert = int(sample_rows(dist.weights, gen)) if dist.rank > 1 else 0
        drafts = sample_rows(dist.log_factors[:k, expert].exp(), gen).tolist()  # (k,)
    q = _CPProposal(dist, drafts) if (temperature > 0 or record) else None
    extra = {}
    if record:
        extra = dict(gate_posterior=dist.weights.tolist(), gates=q.log_gates.exp().tolist())
    return drafts, q, expert, extra


def _takes_n_draft(fn) -> bool:
    try:
        return "n_draft" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


ROUTINGS = ("mixture", "expert")


def check_routing(routing, model=None) -> str:
    """Validate ``routing``; with a model, check its heads can route to one expert."""
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    if routing == "expert" and model is not None:
        heads = getattr(model, "heads", None)
        if heads is None or not hasattr(heads, "draft_step"):
            raise TypeError("routing='expert' needs heads with draft_step() "
                            "(cptoy.heads.CPHeads, cptoy.firsttoken.FirstTokenHeads)")
    return routing


def _draft_fn(model):
    heads = getattr(model, "heads", None)
    if heads is not None and hasattr(heads, "draft"):
        return heads.draft
    if hasattr(model, "draft"):
        return model.draft
    raise TypeError("strategy 'self-spec' needs a model with CP heads (model.heads.draft)")


def _backbone(model):
    """An MTPModel's backbone, or the model itself when it is a bare backbone."""
    bb = getattr(model, "backbone", None)
    return bb if bb is not None else model


def _device(module) -> torch.device:
    try:
        return next(module.parameters()).device
    except (AttributeError, StopIteration):
        try:
            return next(module.buffers()).device
        except (AttributeError, StopIteration):
            return torch.device("cpu")


# ====================================================================== validation
# ====================================================================== generate
def generate(
    model,
    prompt_ids,
    max_new_tokens: int,
    temperature: float = 1.0,
    strategy: str = "ar",
    seed: int | None = None,
    eos_id: int | None = None,
    n_draft: int | None = None,
    lookup_ngram: int = 3,
    record_steps: bool = False,
    routing: str = "mixture",
) -> Generation:
    """Generate up to ``max_new_tokens`` tokens after ``prompt_ids`` (batch size 1).

    model:
        an ``MTPModel`` (``.backbone`` with ``forward(idx (1, T), cache) -> (1, T, d)``,
        ``logits(hidden) -> (..., V)``, ``new_cache(1)``, ``config.block_size``; ``.heads.draft``
        and ``.n_future`` for "self-spec"), or a bare backbone for "ar" and "lookup".
    prompt_ids: list of ints, (T,) or (1, T) integer tensor; T >= 1.
    max_new_tokens: >= 1; ``len(prompt) + max_new_tokens`` must fit in ``block_size``.
    temperature: >= 0; 0 is greedy (argmax), otherwise sampling from softmax(logits / T).
    strategy: "ar", "self-spec" or "lookup" (see the module docstring).
    seed: seeds the one ``torch.Generator`` used for every random draw (None: random).
    eos_id: stop right after emitting this token (also when it arrives as an accepted draft).
    n_draft: drafts per step, at most; default ``n_future - 1`` (self-spec: must be <= that;
        lookup on a bare backbone: 4). Ignored for "ar".
    lookup_ngram: longest n-gram the lookup drafter matches (it falls back to shorter ones).
    record_steps: keep a :class:`StepRecord` per step (p and q vectors: memory O(steps * V)).
    routing: "mixture" (q = the CP's mixture conditional) or "expert" (draft from one expert
        drawn from the posterior gate, q = its factors; cheaper), self-spec only; see the module
        docstring.

    Returns a :class:`Generation`; the model's train/eval mode is restored afterwards.
    """
    t_start = time.perf_counter()
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    backbone = _backbone(model)
    cfg = backbone.config
    V, block = cfg.vocab_size, cfg.block_size
    prompt = check_prompt_ids(prompt_ids, V)
    check_positive_int(max_new_tokens, "max_new_tokens")
    if len(prompt) + max_new_tokens > block:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} plus the prompt's {len(prompt)} tokens exceeds the "
            f"block_size {block}; shorten prompt_ids or lower max_new_tokens"
        )
    temperature = check_temperature(temperature)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if eos_id is not None:
        if isinstance(eos_id, bool) or not isinstance(eos_id, int):
            raise TypeError(f"eos_id must be an int or None, got {type(eos_id).__name__}")
        if not 0 <= eos_id < V:
            raise ValueError(f"eos_id must be in [0, {V}), got {eos_id}")
    check_positive_int(lookup_ngram, "lookup_ngram")
    n_future = getattr(model, "n_future", None)
    check_routing(routing, model if strategy == "self-spec" else None)
    if strategy == "self-spec":
        _draft_fn(model)  # raises TypeError without heads
        if n_future is None or n_future < 2:
            raise ValueError(f"strategy 'self-spec' needs model.n_future >= 2, got {n_future}")
        max_draft = n_future - 1
        if n_draft is None:
            n_draft = max_draft
        check_positive_int(n_draft, "n_draft")
        if n_draft > max_draft:
            raise ValueError(
                f"n_draft must be <= n_future - 1 = {max_draft} for 'self-spec', got {n_draft}"
            )
    elif strategy == "lookup":
        if n_draft is None:
            has_heads = n_future is not None and n_future >= 2
            n_draft = n_future - 1 if has_heads else DEFAULT_LOOKUP_DRAFTS
        check_positive_int(n_draft, "n_draft")
    else:
        n_draft = 0

    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)

    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.no_grad():
            out = _decode(model, backbone, prompt, max_new_tokens, temperature, strategy, gen,
                          eos_id, n_draft, lookup_ngram, record_steps, routing)
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    out.stats.wall_time = time.perf_counter() - t_start
    return out


def _decode(model, backbone, prompt, max_new, temperature, strategy, gen, eos_id, n_draft,
            lookup_ngram, record, routing="mixture") -> Generation:
    device = _device(backbone)
    P = len(prompt)
    stats = GenerationStats(strategy=strategy, temperature=temperature,
                            attempted_by_position=[0] * n_draft,
                            accepted_by_position=[0] * n_draft)
    steps: list[StepRecord] | None = [] if record else None
    V = backbone.config.vocab_size
    if strategy == "self-spec":
        draft = _draft_fn(model)
        takes_k = _takes_n_draft(draft)
        heads = getattr(model, "heads", None)

    # ---------------------------------------------------------------- prefill
    t0 = time.perf_counter()
    cache = backbone.new_cache(1)
    H = backbone.forward(torch.tensor([prompt], dtype=torch.long, device=device), cache)  # (1,P,d)
    h_last = H[:, -1]  # (1, d)
    logits_last = backbone.logits(h_last)[0]  # (V,)
    stats.prefill_time = time.perf_counter() - t0
    if temperature == 0:
        first = int(logits_last.argmax())
    else:
        first = _draw(_probs(logits_last, temperature), gen)
    tokens = [first]
    stats.arrival.append("first")
    stats.forward_passes = 1
    stats.gained_per_forward.append(1)

    # ---------------------------------------------------------------- steps
    # INVARIANT at the top of every iteration (and at the end):
    #   cache holds prompt + tokens[:-1], i.e. cache.length == P + len(tokens) - 1;
    #   h_last (1, d) is the hidden state at the last cached position (index P + len(tokens) - 2),
    #   and its logits gave tokens[-1], the pending x_1 of the next step (not yet in the cache).
    # A step forwards [x_1, d_2..d_{k+1}] at positions L0 .. L0 + k (L0 = cache.length), so H[:, i]
    # is the hidden at the i-th token of that chunk, and logits(H[:, i]) is p for the token after
    # it: row i < k is the target for draft i, row k the bonus position. After accepting m drafts
    # the kept tokens are x_1, d_2..d_{m+1} plus the replacement/bonus (pending, not cached), so
    # the cache is cut back to L0 + 1 + m and h_last = H[:, m]: the hidden the verification
    # forward already computed, no recomputation. When an accepted draft is eos the output ends
    # at it, and the same invariant puts the cut at L0 + m with h_last = H[:, m - 1].
    while len(tokens) < max_new and (eos_id is None or tokens[-1] != eos_id):
        L0 = cache.length
        if L0 != P + len(tokens) - 1:  # the backbone broke the cache contract
            raise RuntimeError(f"KV cache holds {L0} tokens, expected {P + len(tokens) - 1}")
        x1 = tokens[-1]
        x1_arrival = stats.arrival[-1]
        remaining = max_new - len(tokens)
        k = min(n_draft, remaining - 1)  # never draft past max_new_tokens (or the block)

        # ----- draft
        t0 = time.perf_counter()
        drafts: list[int] = []
        q = None
        expert, extra = None, {}
        if k > 0 and strategy == "self-spec":
            drafts, q, expert, extra = _cp_drafts(draft, takes_k, h_last, x1, k, temperature,
                                                  gen, device, record, routing, heads)
        elif k > 0 and strategy == "lookup":
            drafts = lookup_drafts(prompt + tokens, lookup_ngram, k)
            q = _PointProposal(drafts, backbone.config.vocab_size)
        if eos_id is not None and eos_id in drafts:  # nothing after an eos can be kept
            drafts = drafts[: drafts.index(eos_id) + 1]  # (q's first rows stay valid)
        stats.draft_time += time.perf_counter() - t0
        if record and strategy == "self-spec" and k > 0:
            if getattr(heads, "rank", None) == 1:  # no gate (also heads that only draft)
                extra["gate_prior"] = [1.0]
            else:
                prior = model.heads(h_last)  # CPDist, batch (1,): the gate before seeing x_1
                extra["gate_prior"] = prior.weights[0].detach().to("cpu", torch.float64).tolist()

        # ----- one verification forward over [x_1, drafts]
        t0 = time.perf_counter()
        chunk = torch.tensor([[x1] + drafts], dtype=torch.long, device=device)  # (1, k + 1)
        H = backbone.forward(chunk, cache)  # (1, k + 1, d); cache.length == L0 + k + 1
        logits = backbone.logits(H)[0]  # (k + 1, V)
        stats.verify_time += time.perf_counter() - t0
        stats.forward_passes += 1

        m, final, kind, probs, decisions, p = _verify(logits, drafts, q, temperature, gen, eos_id,
                                                      keep_p=record)

        # ----- bookkeeping
        emitted = drafts[:m] + ([final] if final is not None else [])
        tokens.extend(emitted)
        stats.arrival.extend(["accepted"] * m + ([kind] if final is not None else []))
        stats.gained_per_forward.append(len(emitted))
        stats.drafted_per_step.append(len(drafts))
        stats.accepted_per_step.append(m)
        stats.experts.append(expert)
        for j, ok in enumerate(decisions):
            stats.attempted_by_position[j] += 1
            stats.accepted_by_position[j] += int(ok)

        # ----- roll the cache back to the invariant (see above)
        new_len = P + len(tokens) - 1
        if new_len < cache.length:
            cache.truncate(new_len)
        h_last = H[:, new_len - L0 - 1]  # (1, d): the hidden at the last cached token

        if record:
            q_rec = q.rows()[: len(drafts)] if q is not None else torch.zeros(0, V).double()
            steps.append(StepRecord(
                context_length=L0, x1=x1, drafts=list(drafts), expert=expert,
                gate_prior=extra.get("gate_prior"), gate_posterior=extra.get("gate_posterior"),
                gates=extra["gates"][: len(drafts)] if "gates" in extra else None,
                p=p, accept_prob=probs, accepted=decisions,
                q=q_rec,
                final_token=final, final_kind=kind, emitted=emitted, x1_arrival=x1_arrival,
            ))

    assert len(tokens) <= max_new
    return Generation(tokens=tokens, stats=stats, steps=steps, cache=cache, last_hidden=h_last)
