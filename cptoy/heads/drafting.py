"""What every drafting head of cptoy shares: argument checks, the drafting shortlist, attaching
the backbone's matrices, one decode step's result (:class:`DraftStep`) and the drafting protocol
of ``cptoy.speculative`` (:meth:`DraftingHeads.propose`).

Subclasses: ``cptoy.heads.CPHeads``, ``cptoy.firsttoken.FirstTokenHeads``. They implement
``draft(hidden (B, d), first_tokens (B,), temperature, n_draft) -> CPDist`` (the law of the
drafts, batched, for analysis) and ``draft_step(hidden (1, d), x1, k, temperature, generator,
routing) -> DraftStep`` (one decode step); ``propose`` reads a ``DraftStep`` as a
``Proposal``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from cptoy._checks import check_positive_int
from cptoy.cp import CPDist
from cptoy.speculative import FactorQ, MixtureQ, Proposal, sample_index

__all__ = ["DraftStep", "DraftingHeads", "frequency_shortlist"]


@dataclass
class DraftStep:
    """What :meth:`CPHeads.draft_step` returns: one decode step's drafts and their law.

    Indices are in the drafting space: the vocabulary, or the shortlist (token = vocab[i])."""

    index: list[int]  # (k,) drafted indices d_2..d_{k+1}
    expert: int | None  # the expert drawn (T > 0) or the posterior's argmax (T = 0); None: rank 1
    vocab: torch.Tensor | None  # (K,) shortlist token ids, or None
    log_posterior: torch.Tensor | None  # (r,) float64 gate after x_1 (None for rank 1)
    mixture: CPDist | None = None  # q with mixture routing at rank > 1: float64, batch (), n = k
    probs: torch.Tensor | None = None  # (k, K) float64 q when it is one factor (rank 1 / expert)
    logits: torch.Tensor | None = None  # (k, K) its logits instead, when probs were not needed
    q_at: list[float] | None = None  # q(d_j) of each draft when q is one factor (T > 0)
    vocab_list: list[int] | None = None  # the shortlist as a Python list (fast lookups)

    def factor_probs(self) -> torch.Tensor:
        """(k, K) float64: q when it is one factor (computed from the logits if need be)."""
        if self.probs is None:
            self.probs = torch.softmax(self.logits, dim=-1, dtype=torch.float64)
        return self.probs

    @property
    def dist(self) -> CPDist:
        """The drafts' q over positions 2..k+1 as a CPDist (float64, batch (), over K or V)."""
        if self.mixture is not None:
            return self.mixture
        lf = self.factor_probs().log().unsqueeze(1)  # (k, 1, K)
        return CPDist(lf.new_zeros(1), lf)

    @property
    def tokens(self) -> list[int]:
        """The drafted token ids."""
        if self.vocab is None:
            return list(self.index)
        ids = self.vocab_list if self.vocab_list is not None else self.vocab.tolist()
        return [ids[i] for i in self.index]

class DraftingHeads(nn.Module):
    """What every cptoy drafting head shares: argument checks and the drafting shortlist.

    Subclasses call ``super().__init__()``, set ``d_model``, ``vocab_size`` and ``n_future``,
    attach the backbone's (V, d) unembedding (``self._attach("unembedding", U, (V, d))``, read
    back by :attr:`unembedding`) and then call :meth:`_init_shortlist`; they may cache
    drafting tables in ``self._tables`` (dropped when the shortlist changes).
    """

    def _init_shortlist(self) -> None:
        # drafting shortlist (K,) or None, see set_draft_vocab; moves with .to(), not saved in
        # the state dict (checkpoints store it beside the weights)
        self.register_buffer("_draft_vocab", None, persistent=False)
        self._draft_vocab_list: list[int] | None = None
        self._tables = None

    def _attach(self, name: str, tensor, shape: tuple[int, int]) -> None:
        """Attach a (V, d) matrix of the backbone. An ``nn.Parameter`` is *shared*: used by
        reference and not registered here (its owner trains and saves it); a plain tensor is
        copied into a fixed, non-persistent buffer."""
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"{name} must be a (V, d) tensor or nn.Parameter, got {type(tensor).__name__}"
            )
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(
                f"{name} must have shape (vocab_size, d_model) = {tuple(shape)}, "
                f"got {tuple(tensor.shape)}"
            )
        if isinstance(tensor, nn.Parameter):
            self.__dict__[f"_shared_{name}"] = tensor  # shared, not registered
        else:
            self.register_buffer(f"_fixed_{name}", tensor.detach().clone(), persistent=False)

    def _attached(self, name: str) -> torch.Tensor:
        t = self.__dict__.get(f"_shared_{name}")
        return t if t is not None else getattr(self, f"_fixed_{name}")

    @property
    def unembedding(self) -> torch.Tensor:
        """The backbone's shared (V, d) unembedding U."""
        return self._attached("unembedding")

    def _check_hidden(self, hidden, name: str = "hidden", dims: int | None = None) -> torch.Tensor:
        if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor (..., d_model)")
        if hidden.dim() < 1 or hidden.shape[-1] != self.d_model:
            raise ValueError(
                f"{name} must have last dimension d_model={self.d_model}, got shape {tuple(hidden.shape)}"
            )
        if dims is not None and hidden.dim() != dims:
            raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(hidden.shape)}")
        return hidden

    def _check_tokens(self, x, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must be an integer (int64) tensor of token ids")
        if tuple(x.shape) != tuple(shape):
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
        if (
            x.numel()
            and x.device.type == "cpu"
            and (int(x.min()) < 0 or int(x.max()) >= self.vocab_size)
        ):
            raise ValueError(f"{name} holds token ids outside [0, {self.vocab_size})")
        return x.long()

    # ------------------------------------------------------------------ drafting shortlist
    @property
    def draft_vocab(self) -> torch.Tensor | None:
        """The drafting shortlist: (K,) int64 token ids, sorted, or None (the whole vocabulary)."""
        return self._draft_vocab

    def set_draft_vocab(self, token_ids) -> DraftingHeads:
        """Restrict drafting to a shortlist of K token ids (None: the whole vocabulary again).

        With a shortlist, drafting (``draft``, ``draft_step``, and for CP heads
        ``draft_posterior``) multiplies by the K rows of the unembedding (and of B) instead of
        all V, and every drafted factor is a softmax over the shortlist (zero elsewhere).
        Drafts are still verified by the backbone, so decoding stays lossless; only tokens
        outside the shortlist can no longer be drafted. Training and :meth:`forward` are
        unaffected. See :func:`frequency_shortlist`.
        """
        self._tables = None  # drafting tables are rebuilt for the new shortlist
        if token_ids is None:
            self._draft_vocab = None
            self._draft_vocab_list = None
            return self
        if isinstance(token_ids, (list, tuple)):
            if any(isinstance(t, bool) or not isinstance(t, int) for t in token_ids):
                raise TypeError("token_ids must hold ints")
            token_ids = torch.tensor(token_ids, dtype=torch.long)
        if not isinstance(token_ids, torch.Tensor) or token_ids.is_floating_point():
            raise TypeError("token_ids must be a 1-D integer tensor or list of ints, or None")
        ids = token_ids.detach().to("cpu", torch.long).flatten()
        if ids.numel() == 0:
            raise ValueError("token_ids must not be empty (None drafts from the whole vocabulary)")
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            raise ValueError(f"token_ids must lie in [0, {self.vocab_size})")
        ids = torch.unique(ids)  # sorted
        self._draft_vocab = ids.to(self.unembedding.device)
        self._draft_vocab_list = ids.tolist()
        return self

    def load_saved(self, state: dict, draft_vocab, source: str) -> DraftingHeads:
        """Load a heads-only state dict (any float dtype) and its shortlist (None: the whole
        vocabulary), as checkpoints store them; ValueError naming ``source`` if they do not fit.
        Returns self."""
        try:
            self.load_state_dict({k: v.float() for k, v in state.items()})
        except RuntimeError as exc:
            raise ValueError(f"checkpoint {source!r}: heads do not match: {exc}") from exc
        return self.set_draft_vocab(draft_vocab)

    # ------------------------------------------------------------------ the drafting protocol
    routings = ("mixture", "expert")  # both: heads with one factor per position route alike

    def propose(self, hidden: torch.Tensor, x1: int, k: int, temperature: float,
                generator: torch.Generator | None = None,
                routing: str = "mixture") -> Proposal:
        """The drafting protocol of ``cptoy.speculative``: k drafts after x1 and their law q.

        hidden (1, d) at the last accepted position, x1 the backbone's token (an int),
        ``temperature`` (0: greedy drafts, q is left unevaluated), ``generator`` for the draws,
        ``routing`` "mixture" or "expert". One :meth:`draft_step`, read as token ids and a
        lazy q over the vocabulary (zero outside a drafting shortlist)."""
        step = self.draft_step(hidden, x1, k, temperature, generator, routing)
        vocab = step.vocab.cpu() if step.vocab is not None else None
        if step.mixture is None:  # q is one factor per position: its probabilities at hand
            q = FactorQ(step.index, probs=step.probs, logits=step.logits, at=step.q_at,
                        vocab=vocab, V=self.vocab_size, expert=step.expert,
                        rank=getattr(self, "rank", 1))
        else:
            q = MixtureQ(step.mixture.to("cpu"), step.index, vocab, self.vocab_size)
        post = [1.0] if step.log_posterior is None else step.log_posterior.exp().tolist()
        return Proposal(step.tokens, q, step.expert, post)

    def _factor_step(self, z: torch.Tensor, temperature: float, generator, expert=None,
                     log_posterior=None) -> DraftStep:
        """The :class:`DraftStep` of drafts from ONE factor per position, logits z (k, K): each
        position's argmax at T = 0 (q, the untempered factor, is only built if asked for),
        else a draw from softmax(z / T), which is also q."""
        if temperature == 0:
            return DraftStep(z.argmax(-1).tolist(), expert, self._draft_vocab, log_posterior,
                             logits=z, vocab_list=self._draft_vocab_list)
        probs = torch.softmax(z / temperature if temperature != 1.0 else z, dim=-1,
                              dtype=torch.float64)  # (k, K)
        idx, drafts = sample_index(probs, generator)  # (k, 1), k ints
        return DraftStep(drafts, expert, self._draft_vocab, log_posterior, probs=probs,
                         q_at=probs.gather(1, idx).view(-1).tolist(),
                         vocab_list=self._draft_vocab_list)

    def _to_vocab(self, lf: torch.Tensor, compact: bool = False) -> torch.Tensor:
        """Shortlist log-probabilities (..., K) -> (..., V) with -inf outside the shortlist."""
        if self._draft_vocab is None or compact:
            return lf
        out = lf.new_full(lf.shape[:-1] + (self.vocab_size,), -math.inf)
        out[..., self._draft_vocab] = lf
        return out

    def _check_draft_args(self, hidden, first_tokens, temperature, n_draft=None):
        hidden = self._check_hidden(hidden, dims=2)
        Bsz = hidden.shape[0]
        first = self._check_tokens(first_tokens, "first_tokens", (Bsz,))
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
        if not (temperature >= 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a finite float >= 0, got {temperature}")
        if self.n_future < 2:
            raise ValueError("draft needs n_future >= 2 (there is nothing to draft after x_1)")
        k = self.n_future - 1 if n_draft is None else n_draft
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.n_future - 1:
            raise ValueError(f"n_draft must be an int in [1, {self.n_future - 1}], got {n_draft}")
        return hidden, first, float(temperature), k

def frequency_shortlist(ids, vocab_size: int, size: int) -> torch.Tensor:
    """The ``size`` most frequent token ids of ``ids`` (a 1-D tensor or list of training ids),
    sorted: a drafting shortlist for :meth:`CPHeads.set_draft_vocab` (FR-Spec's idea: rare
    tokens are rarely accepted, so drafting over the frequent ones loses little and costs
    size / V of the unembedding). Ties are broken by the smaller id."""
    check_positive_int(vocab_size, "vocab_size")
    check_positive_int(size, "size")
    if size > vocab_size:
        raise ValueError(f"size must be <= vocab_size={vocab_size}, got {size}")
    if isinstance(ids, (list, tuple)):
        ids = torch.tensor(ids, dtype=torch.long)
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.dim() != 1:
        raise TypeError("ids must be a 1-D integer tensor (or list) of token ids")
    if ids.numel() == 0:
        raise ValueError("ids must not be empty")
    ids = ids.to("cpu", torch.long)
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise ValueError(f"ids hold token ids outside [0, {vocab_size})")
    counts = torch.bincount(ids, minlength=vocab_size)
    order = torch.argsort(-counts, stable=True)  # by count descending, then id ascending
    return torch.sort(order[:size]).values
