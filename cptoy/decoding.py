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
``torch.Generator`` seeded by ``seed``. The rule itself (accept, residual, bonus) and the
drafting protocol (``drafter.propose(h, x1, k, temperature, generator) -> Proposal``) live in
:mod:`cptoy.speculative`; a model's ``heads`` are its drafter, :class:`PromptLookup` is the
drafter of ``"lookup"``; a drafter with ``bind(prompt, tokens)`` (one that reads the text, like
``cptoy.selfdistill.MaskDrafter``) is bound to the call's lists first.

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

import time
from dataclasses import dataclass, field

import torch

from cptoy._checks import check_positive_int, check_prompt_ids, check_temperature
from cptoy.speculative import ROUTINGS, PointQ, Proposal, probs, sample_rows, verify

__all__ = ["Generation", "GenerationStats", "StepRecord", "generate", "lookup_drafts",
           "PromptLookup", "check_routing", "check_n_draft", "backbone_of", "device_of",
           "sample_rows", "STRATEGIES",
           "ARRIVALS"]

STRATEGIES = ("ar", "self-spec", "lookup")
# how a token arrived (GenerationStats.arrival): the backbone's own token, an accepted draft,
# the replacement after a rejection, the bonus after all drafts, or a draft kept unverified
ARRIVALS = ("first", "accepted", "replacement", "bonus", "draft")
DEFAULT_LOOKUP_DRAFTS = 4  # drafts per step for "lookup" when the model has no MTP heads


# ====================================================================== results
@dataclass
class GenerationStats:
    """What one :func:`generate` call did. Lists indexed by forward pass or by step.

    A *step* is one forward after the prefill; ``forward_passes == 1 + n_steps``. Verifier-free
    decoders (``cptoy.verifierfree``) fill the same fields, with "draft" arrivals.
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
    arrival: list[str] = field(default_factory=list)  # per token: one of ARRIVALS
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


class PromptLookup:
    """The drafter of ``strategy="lookup"``: :func:`lookup_drafts` on the decoder's output so
    far, q a point mass on each draft. Like every drafter that reads the text, it is bound to a
    ``generate`` call's lists first (``bind(prompt, tokens)``; they only grow)."""

    def __init__(self, ngram: int, vocab_size: int, prompt=(), tokens=()):
        self.ngram, self.vocab_size, self.prompt, self.tokens = ngram, vocab_size, prompt, tokens

    def bind(self, prompt: list[int], tokens: list[int]) -> PromptLookup:
        return PromptLookup(self.ngram, self.vocab_size, prompt, tokens)

    def propose(self, hidden, x1: int, k: int, temperature: float, generator=None,
                routing: str = "mixture") -> Proposal:
        drafts = lookup_drafts(list(self.prompt) + list(self.tokens), self.ngram, k)
        return Proposal(drafts, PointQ(drafts, self.vocab_size))


def check_routing(routing, model=None) -> str:
    """Validate ``routing``; with a model, check its heads can route to one expert."""
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    if routing == "expert" and model is not None:
        if "expert" not in getattr(getattr(model, "heads", None), "routings", ()):
            raise TypeError("routing='expert' needs heads that can draft from one expert "
                            "(cptoy.heads.CPHeads, cptoy.firsttoken.FirstTokenHeads)")
    return routing


def check_n_draft(model, n_draft) -> int:
    """Drafts per step for a model whose heads draft (``model.heads.draft``, ``n_future``):
    ``n_draft`` in [1, n_future - 1], default n_future - 1."""
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


def backbone_of(model):
    """An MTPModel's backbone, or the model itself when it is a bare backbone."""
    bb = getattr(model, "backbone", None)
    return bb if bb is not None else model


def device_of(module) -> torch.device:
    """The device of a module's first parameter (or buffer); the CPU when it has neither."""
    try:
        return next(module.parameters()).device
    except (AttributeError, StopIteration):
        try:
            return next(module.buffers()).device
        except (AttributeError, StopIteration):
            return torch.device("cpu")


def _check_seed_eos(seed, eos_id, V: int) -> None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if eos_id is not None:
        if isinstance(eos_id, bool) or not isinstance(eos_id, int):
            raise TypeError(f"eos_id must be an int or None, got {type(eos_id).__name__}")
        if not 0 <= eos_id < V:
            raise ValueError(f"eos_id must be in [0, {V}), got {eos_id}")


def _check_n_draft(model, strategy: str, n_draft) -> int:
    """Drafts per step for ``strategy`` (0 for "ar"), validated against the model."""
    n_future = getattr(model, "n_future", None)
    if strategy == "self-spec":
        heads = getattr(model, "heads", None)
        if not (hasattr(heads, "propose") or hasattr(heads, "bind")):
            raise TypeError("strategy 'self-spec' needs a model whose heads draft "
                            "(model.heads.propose, see cptoy.speculative)")
        if n_future is None or n_future < 2:
            raise ValueError(f"strategy 'self-spec' needs model.n_future >= 2, got {n_future}")
        n_draft = n_future - 1 if n_draft is None else n_draft
        check_positive_int(n_draft, "n_draft")
        if n_draft > n_future - 1:
            raise ValueError(f"n_draft must be <= n_future - 1 = {n_future - 1} for "
                             f"'self-spec', got {n_draft}")
        return n_draft
    if strategy == "lookup":
        if n_draft is None:
            has_heads = n_future is not None and n_future >= 2
            n_draft = n_future - 1 if has_heads else DEFAULT_LOOKUP_DRAFTS
        return check_positive_int(n_draft, "n_draft")
    return 0


def _draw(logits: torch.Tensor, temperature: float, gen: torch.Generator) -> int:
    """One token from logits (V,): argmax at T = 0, else a draw from softmax(logits / T)."""
    if temperature == 0:
        return int(logits.argmax())
    return int(sample_rows(probs(logits, temperature), gen))


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
        ``logits(hidden) -> (..., V)``, ``new_cache(1)``, ``config.block_size``; for
        "self-spec" ``.heads.propose`` (the drafting protocol of ``cptoy.speculative``) and
        ``.n_future``), or a bare backbone for "ar" and "lookup".
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
    backbone = backbone_of(model)
    V, block = backbone.config.vocab_size, backbone.config.block_size
    prompt = check_prompt_ids(prompt_ids, V)
    check_positive_int(max_new_tokens, "max_new_tokens")
    if len(prompt) + max_new_tokens > block:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} plus the prompt's {len(prompt)} tokens exceeds the "
            f"block_size {block}; shorten prompt_ids or lower max_new_tokens"
        )
    temperature = check_temperature(temperature)
    _check_seed_eos(seed, eos_id, V)
    check_positive_int(lookup_ngram, "lookup_ngram")
    check_routing(routing, model if strategy == "self-spec" else None)
    n_draft = _check_n_draft(model, strategy, n_draft)

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
            lookup_ngram, record, routing) -> Generation:
    """The decode loop: a prefill, then draft -> one forward over [x_1, drafts] -> verify."""
    device = device_of(backbone)
    P, V = len(prompt), backbone.config.vocab_size
    stats = GenerationStats(strategy=strategy, temperature=temperature,
                            attempted_by_position=[0] * n_draft,
                            accepted_by_position=[0] * n_draft)
    steps: list[StepRecord] | None = [] if record else None
    tokens: list[int] = []
    drafter = (model.heads if strategy == "self-spec" else
               PromptLookup(lookup_ngram, V) if strategy == "lookup" else None)
    if hasattr(drafter, "bind"):  # a drafter that reads the text: bound to this call's lists
        drafter = drafter.bind(prompt, tokens)

    # ---------------------------------------------------------------- prefill
    t0 = time.perf_counter()
    cache = backbone.new_cache(1)
    H = backbone.forward(torch.tensor([prompt], dtype=torch.long, device=device), cache)  # (1,P,d)
    h_last = H[:, -1]  # (1, d)
    logits_last = backbone.logits(h_last)[0]  # (V,)
    stats.prefill_time = time.perf_counter() - t0
    tokens.append(_draw(logits_last, temperature, gen))
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
        x1, x1_arrival = tokens[-1], stats.arrival[-1]
        k = min(n_draft, max_new - len(tokens) - 1)  # never draft past max_new_tokens

        # ----- draft
        t0 = time.perf_counter()
        prop = Proposal([], None)
        if k > 0 and drafter is not None:
            prop = drafter.propose(h_last, x1, k, temperature, gen, routing)
        drafts = prop.tokens
        if eos_id is not None and eos_id in drafts:  # nothing after an eos can be kept
            drafts = drafts[: drafts.index(eos_id) + 1]  # (q's first rows stay valid)
        stats.draft_time += time.perf_counter() - t0

        # ----- one verification forward over [x_1, drafts]
        t0 = time.perf_counter()
        chunk = torch.tensor([[x1] + drafts], dtype=torch.long, device=device)  # (1, k + 1)
        H = backbone.forward(chunk, cache)  # (1, k + 1, d); cache.length == L0 + k + 1
        logits = backbone.logits(H)[0]  # (k + 1, V)
        stats.verify_time += time.perf_counter() - t0
        stats.forward_passes += 1
        v = verify(logits, drafts, prop.q, temperature, gen, eos_id, keep_p=record)

        # ----- bookkeeping
        m = v.accepted
        emitted = drafts[:m] + ([v.final] if v.final is not None else [])
        tokens.extend(emitted)
        stats.arrival.extend(["accepted"] * m + ([v.kind] if v.final is not None else []))
        stats.gained_per_forward.append(len(emitted))
        stats.drafted_per_step.append(len(drafts))
        stats.accepted_per_step.append(m)
        stats.experts.append(prop.expert)
        for j, ok in enumerate(v.decisions):
            stats.attempted_by_position[j] += 1
            stats.accepted_by_position[j] += int(ok)

        # ----- roll the cache back to the invariant (see above)
        new_len = P + len(tokens) - 1
        if new_len < cache.length:
            cache.truncate(new_len)
        h_prev, h_last = h_last, H[:, new_len - L0 - 1]  # (1, d): hidden at the last cached token
        if record:
            steps.append(_record(model, strategy, h_prev, L0, x1, x1_arrival, drafts, prop, v,
                                 emitted, V))

    assert len(tokens) <= max_new
    return Generation(tokens=tokens, stats=stats, steps=steps, cache=cache, last_hidden=h_last)


def _record(model, strategy, h, L0, x1, x1_arrival, drafts, prop, v, emitted, V) -> StepRecord:
    """The :class:`StepRecord` of one step (``record_steps=True``)."""
    k = len(drafts)
    cp = strategy == "self-spec" and bool(prop.tokens)
    gate_prior = None
    if cp:
        if getattr(model.heads, "rank", None) == 1:  # no gate (also heads that only draft)
            gate_prior = [1.0]
        else:
            prior = model.heads(h)  # CPDist, batch (1,): the gate before seeing x_1
            gate_prior = prior.weights[0].detach().to("cpu", torch.float64).tolist()
    gates = prop.q.gates if cp and prop.q is not None else None
    return StepRecord(
        context_length=L0, x1=x1, drafts=list(drafts), expert=prop.expert,
        gate_prior=gate_prior, gate_posterior=prop.gate_posterior if cp else None,
        gates=gates[:k] if gates is not None else None,
        p=v.p, q=prop.q.rows()[:k] if prop.q is not None else torch.zeros(0, V).double(),
        accept_prob=v.accept_prob, accepted=v.decisions, final_token=v.final,
        final_kind=v.kind, emitted=emitted, x1_arrival=x1_arrival,
    )
