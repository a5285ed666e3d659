"""Speculative sampling: the rule that makes drafting lossless, and the protocol of a drafter.

A *drafter* proposes k tokens after x_1 and says which law q they were drawn from::

    proposal = drafter.propose(h (1, d), x1, k, temperature, generator)   # -> Proposal

``proposal.tokens`` are d_2 .. d_{k+1}; ``proposal.q`` evaluates q(. | x_1, d_<j) at every
drafted position (:class:`MixtureQ` for a CP mixture, :class:`FactorQ` for one factor per
position, :class:`PointQ` for a deterministic drafter). One forward of the backbone over
``[x_1, d_2 .. d_{k+1}]`` gives p at every position, and :func:`verify` applies the rule of
Leviathan et al. / Chen et al. left to right:

* accept d_j with probability ``min(1, p(d_j) / q(d_j))`` (:func:`accept`);
* at the first rejection, replace d_j by a draw from ``norm(max(0, p - q))`` (:func:`residual`);
* when every draft is accepted, draw a bonus token from p after the last one.

The output then has exactly the law of sampling from p token by token, whatever q is, as long
as q is the law the drafts were drawn from. At temperature 0 acceptance is ``d_j == argmax p``
and q is never read, so a drafter may leave it unevaluated (every q here is lazy).

Drafters in cptoy: ``cptoy.heads.CPHeads`` and ``cptoy.firsttoken.FirstTokenHeads`` (through
``DraftingHeads.propose``), ``cptoy.clp.ArchitectHeads``, ``cptoy.selfdistill.MaskDrafter``,
``cptoy.decoding.PromptLookup``; a drafter that reads the text so far has ``bind(prompt,
tokens)``, which ``generate`` calls once per call; any CP over the drafted positions becomes a proposal with
:func:`propose_from_cp`. ``cptoy.decoding.generate`` runs the loop.

All arithmetic of the rule is float64 on the CPU; all randomness comes from the caller's
``torch.Generator``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from cptoy.cp import CPDist

__all__ = ["Proposal", "MixtureQ", "FactorQ", "PointQ", "accept", "residual", "probs",
           "sample_rows", "sample_index", "verify", "Verdict", "propose_from_cp", "ROUTINGS"]

ROUTINGS = ("mixture", "expert")  # how CP heads draft: the mixture, or one expert drawn from it


# ====================================================================== the rule
def accept(p_d: float, q_d: float, u: float) -> bool:
    """Accept a draft d ~ q with probability min(1, p(d) / q(d)); ``u`` ~ U[0, 1).

    ``u * q < p`` avoids the division and is exactly that event."""
    return u * q_d < p_d


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The replacement law after a rejection, norm(max(0, p - q)), float64 (V,).

    Its mass equals TV(p, q) > 0 after a rejection in exact arithmetic; if rounding leaves
    none at all (p and q agree to ~1e-16), p itself is returned."""
    r = (p - q).clamp_min(0.0)
    s = r.sum()
    return r / s if s > 0 else p


def probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / T) in float64 on the CPU; at T = 0 the untempered softmax (display)."""
    x = logits.detach().to("cpu", torch.float64)
    return torch.softmax(x / temperature if temperature > 0 else x, dim=-1)


def sample_rows(p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One draw from each row of ``p`` (..., V) (nonnegative, not necessarily normalised).

    Inverse CDF: the first index whose cumulative mass exceeds u * total, u ~ U[0, 1); an
    entry of zero mass is never chosen. Exact in law like ``torch.multinomial``, with far
    fewer checks (it runs inside every decode step)."""
    cdf = p.cumsum(-1)  # (..., V)
    u = torch.rand(cdf.shape[:-1] + (1,), dtype=cdf.dtype, generator=gen) * cdf[..., -1:]
    idx = torch.searchsorted(cdf, u, right=True).squeeze(-1)  # (...)
    if bool((idx >= p.shape[-1]).any()):  # u * total rounded up to total (rare)
        last = (p > 0).cumsum(-1).argmax(-1)  # (...): index of the last positive entry
        idx = torch.minimum(idx, last)
    return idx


def sample_index(p: torch.Tensor, gen: torch.Generator | None):
    """One draw per row of ``p`` (m, K) (float64 rows that sum to 1, on any device): indices
    (m, 1) and the same as a list of m ints.

    Inverse CDF with ``right=True``: an index of zero mass is never returned; a uniform at or
    above a row's float sum (short of 1 by ~1e-16) goes to the row's last index with mass. The
    uniforms come from ``gen`` on the CPU, also when ``p`` lives on a GPU."""
    c = p.cumsum(-1)  # (m, K)
    u = torch.rand(p.shape[0], 1, dtype=p.dtype, generator=gen)
    if u.device != c.device:
        u = u.to(c.device)
    idx = torch.searchsorted(c, u, right=True)  # (m, 1)
    as_list = idx.view(-1).tolist()
    if max(as_list) >= p.shape[-1]:  # probability ~1e-16
        last = (p > 0).cumsum(-1).argmax(-1, keepdim=True)  # last index with mass
        idx = torch.minimum(idx, last)
        as_list = idx.view(-1).tolist()
    return idx, as_list


# ====================================================================== draft laws q
class _Q:
    """q over the drafting space (the vocabulary, or the K ids of a shortlist ``vocab``);
    ``row`` / ``rows`` spread it over the V ids of the vocabulary."""

    vocab: torch.Tensor | None = None
    V: int | None = None

    def _full(self, q: torch.Tensor) -> torch.Tensor:
        if self.vocab is None:
            return q
        out = q.new_zeros(q.shape[:-1] + (self.V,))
        out[..., self.vocab] = q
        return out


class MixtureQ(_Q):
    """q of drafts drawn ancestrally from a CP: q(d_j | x_1, d_<j), the expert marginalised.

    ``dist``: the CP over the drafted positions (batch (), n >= k, float64; its weights the
    gate after x_1); ``index``: the k drafted indices in the drafting space. ``at[j]`` =
    q(d_j | x_1, d_<j) needs (k, r) numbers; ``row(j)`` the whole conditional (V,), needed for
    a residual (at most once per step) and for step records. Equals
    ``dist.condition(d_<j).log_marginal(0)`` (tested)."""

    def __init__(self, dist: CPDist, index: list[int], vocab=None, V: int | None = None):
        self.dist, self.index, self.vocab, self.V = dist, index, vocab, V

    @cached_property
    def lf(self) -> torch.Tensor:  # (k, r, K) log factors of the drafted positions
        return self.dist.log_factors[: len(self.index)]

    @cached_property
    def _ll(self) -> torch.Tensor:  # (k, r) log q_{j,a}(d_j)
        k, r = len(self.index), self.dist.rank
        d = torch.tensor(self.index, dtype=torch.long)
        return self.lf.gather(-1, d.view(k, 1, 1).expand(k, r, 1)).squeeze(-1)

    @cached_property
    def log_gates(self) -> torch.Tensor:  # (k, r) the gate after x_1 and d_<j
        ll = self._ll
        before = torch.cat([torch.zeros_like(ll[:1]), ll[:-1].cumsum(0)])  # sum_{i<j} ll_i
        return torch.log_softmax(self.dist.log_weights + before, dim=-1)

    @cached_property
    def at(self) -> list[float]:  # k floats: q(d_j | x_1, d_<j)
        return torch.logsumexp(self.log_gates + self._ll, dim=-1).exp().tolist()

    def row(self, j: int) -> torch.Tensor:
        return self._full(torch.logsumexp(self.log_gates[j].unsqueeze(-1) + self.lf[j], dim=0).exp())

    def rows(self) -> torch.Tensor:
        return self._full(torch.logsumexp(self.log_gates.unsqueeze(-1) + self.lf, dim=1).exp())

    @property
    def gates(self) -> list[list[float]]:
        """(k, r): the gate q used at each drafted position (after x_1 and d_<j)."""
        return self.log_gates.exp().tolist()


class FactorQ(_Q):
    """q when every position has ONE factor (rank 1, or the one expert that drafted).

    ``probs`` (k, K) float64, or ``logits`` (k, K) whose float64 softmax is taken on first use
    (greedy steps never need it); ``at`` the q(d_j) already known (else read from probs).
    ``expert`` / ``rank``: which of ``rank`` experts drafted (records only)."""

    def __init__(self, index: list[int], probs=None, logits=None, at=None, vocab=None,
                 V: int | None = None, expert: int | None = None, rank: int = 1):
        self.index, self._probs, self._logits, self._at = index, probs, logits, at
        self.vocab, self.V, self.expert, self.rank = vocab, V, expert, rank

    @cached_property
    def probs(self) -> torch.Tensor:  # (k, K) float64, CPU
        p = self._probs
        if p is None:
            p = torch.softmax(self._logits, dim=-1, dtype=torch.float64)
        return p.cpu()

    @cached_property
    def at(self) -> list[float]:
        if self._at is not None:
            return self._at
        k = len(self.index)
        return self.probs[torch.arange(k), self.index].tolist()

    def row(self, j: int) -> torch.Tensor:
        return self._full(self.probs[j])

    def rows(self) -> torch.Tensor:
        return self._full(self.probs[: len(self.index)])

    @property
    def gates(self) -> list[list[float]]:
        if self.rank > 1 and self.expert is not None:
            return [[float(a == self.expert) for a in range(self.rank)]] * len(self.index)
        return [[1.0]] * len(self.index)


class PointQ(_Q):
    """q of a deterministic drafter (prompt lookup): a point mass on each draft."""

    def __init__(self, tokens: list[int], vocab_size: int):
        self.tokens, self.V = tokens, vocab_size
        self.at = [1.0] * len(tokens)

    def row(self, j: int) -> torch.Tensor:
        r = torch.zeros(self.V, dtype=torch.float64)
        r[self.tokens[j]] = 1.0
        return r

    def rows(self) -> torch.Tensor:
        r = torch.zeros(len(self.tokens), self.V, dtype=torch.float64)
        if self.tokens:
            r[torch.arange(len(self.tokens)), torch.tensor(self.tokens)] = 1.0
        return r

    gates = None


@dataclass
class Proposal:
    """What a drafter returns for one decode step."""

    tokens: list[int]  # d_2 .. d_{k+1}: token ids
    q: MixtureQ | FactorQ | PointQ | None  # their law (None only for greedy-only drafters)
    expert: int | None = None  # the CP expert that drafted (T = 0: the posterior's argmax)
    gate_posterior: list[float] | None = None  # (r,) CP gate after x_1 (records)


def propose_from_cp(dist: CPDist, k: int, temperature: float,
                    gen: torch.Generator) -> Proposal:
    """The proposal of a CP over the drafted positions (batch (), n >= k, already conditioned on
    x_1 and tempered by T when T > 0): at T > 0 one expert from its weights, then every position
    from that expert's factor, with q the mixture conditional (:class:`MixtureQ`); at T = 0 the
    CP's greedy mode (``CPDist.mode``)."""
    dist = dist.detach()
    if dist.n < k:
        raise RuntimeError(f"heads drafted {dist.n} positions, {k} needed")
    if temperature == 0:
        tokens = [int(t) for t in dist.mode()[:k]]
        expert = int(dist.log_weights.argmax())
    dist = dist.to("cpu", torch.float64)  # the exact q, in float64
    if temperature > 0:
        expert = int(sample_rows(dist.weights, gen)) if dist.rank > 1 else 0
        tokens = sample_rows(dist.log_factors[:k, expert].exp(), gen).tolist()  # (k,)
    if dist.rank == 1:
        q = FactorQ(tokens, probs=dist.log_factors[:k, 0].exp())
    else:
        q = MixtureQ(dist, tokens)
    return Proposal(tokens, q, expert, dist.weights.tolist())


# ====================================================================== verification
@dataclass
class Verdict:
    """What :func:`verify` decided for one step."""

    accepted: int  # drafts accepted, left to right
    final: int | None  # the replacement / bonus token (None after an accepted eos draft)
    kind: str | None  # "replacement", "bonus", "first" (no drafts) or None
    accept_prob: list[float]  # min(1, p(d_j) / q(d_j)) of every tested draft (T = 0: 1 or 0)
    decisions: list[bool]  # one per tested draft
    p: torch.Tensor | None  # (k + 1, V) float64 when asked for (records)


def verify(logits: torch.Tensor, tokens: list[int], q, temperature: float,
           gen: torch.Generator, eos_id: int | None = None, keep_p: bool = False) -> Verdict:
    """Verify drafts ``tokens`` (k) against the backbone's logits (k + 1, V).

    Row i of ``logits`` is the law of the token after x_1, d_2, .., d_{i+1}: the target p of
    draft i (rows 0..k-1) and of the bonus (row k). ``q`` is the drafts' law (unused at T = 0,
    where acceptance is ``d == argmax p``). Stops right after an accepted ``eos_id`` draft."""
    greedy = temperature == 0
    p = probs(logits, temperature) if keep_p else None  # (k + 1, V) float64, for records
    accept_prob, decisions = [], []
    for i, d in enumerate(tokens):
        if greedy:
            target = int(logits[i].argmax())
            ok = d == target
            accept_prob.append(1.0 if ok else 0.0)
        else:
            p_i = p[i] if p is not None else probs(logits[i], temperature)
            p_d, q_d = float(p_i[d]), q.at[i]
            accept_prob.append(min(1.0, p_d / q_d) if q_d > 0 else 1.0)
            u = float(torch.rand((), dtype=torch.float64, generator=gen))
            ok = accept(p_d, q_d, u)
        decisions.append(ok)
        if not ok:
            final = target if greedy else int(sample_rows(residual(p_i, q.row(i)), gen))
            return Verdict(i, final, "replacement", accept_prob, decisions, p)
        if eos_id is not None and d == eos_id:
            return Verdict(i + 1, None, None, accept_prob, decisions, p)
    k = len(tokens)
    if greedy:
        final = int(logits[k].argmax())
    else:
        final = int(sample_rows(p[k] if p is not None else probs(logits[k], temperature), gen))
    return Verdict(k, final, "bonus" if k else "first", accept_prob, decisions, p)
