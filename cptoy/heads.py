"""CP heads: hidden states -> a batched rank-r CP distribution over the next n tokens.

``CPHeads`` turns a hidden state ``h`` (after the backbone's final LayerNorm) into

    Q(x_1..x_n | h) = sum_a w_a(h) prod_s q_{s,a}(x_s | h)

with a gate ``w = softmax(W_g h)`` (absent for rank 1, which is exactly n independent heads)
and factors ``q_{s,a} = softmax(z_{s,a}(h))`` over the vocabulary. The factor logits go through
the backbone's own (tied) unembedding ``U`` (V, d), which the heads share and do not own.

Two head structures (``expert_dim``):

* ``expert_dim=None`` ("full", the default): every (position s, expert a) has its own
  identity-initialised residual transform, Medusa style,

      z_{s,a}(h) = U (h + silu(W_{s,a} h + b_{s,a}))

  All n*r transforms are ONE matmul with a (d, n*r*d) weight and all n*r unembeddings ONE
  matmul with U. Cost per position: n*r*(d^2 + d*V) multiply-adds forward. This is the
  straightforward, paper-like structure; it is expensive when V is large (n*r unembeddings).

* ``expert_dim=e`` ("structured"): one transform per position feeding the full unembedding,
  plus an expert-specific low-rank correction through a small (V, e) output embedding B,

      z_{s,a}(h) = U (h + silu(W_s h + b_s)) + B silu(A_{s,a} h + c_{s,a})

  Cost per position: n*(d^2 + d*V) + n*r*(d*e + e*V). With e << d the expensive part (the n
  full unembeddings) no longer grows with the rank, and in the backward pass the gradient of
  the base logits is summed over experts before it meets U. Measured in
  ``bench/train_overhead.py``.

Cost in practice (``bench/train_overhead.py``, table in ``bench/RESULTS.md``, toy preset, n = 4):
besides the matmuls, both structures need a softmax over V for every (position, expert) pair,
and at V = 4096 even rank-1 heads on every position cost more than the backbone. The defaults
(full heads, head loss on every position) are the plain, exact computation; to meet issue 8's
training-cost targets use ``expert_dim=16`` and ``MTPModel(head_positions=...)`` (the head loss
on a seeded random subset of positions, e.g. 128 of the 2048 in a 16 x 128 batch).

Drafting cost (decoding, issue 8). One self-spec step needs the posterior gate after x_1 (position
1 of every expert) and the factors of positions 2..k+1: r (k + 1) transforms and unembeddings over
V. Two lossless cuts: a drafting shortlist (:meth:`CPHeads.set_draft_vocab`,
:func:`frequency_shortlist`: every drafted factor is a softmax over K frequent tokens, K/V of the
unembedding) and one-expert routing (``draft(..., experts=)``: one expert drawn from the posterior
drafts every position and is the q of the test). :meth:`CPHeads.draft_step` is the lean
one-sequence path ``cptoy.decoding.generate`` uses; at toy size a step is bound by per-operation
overhead and by reading weights the backbone's forward pushed out of the cache, so it reads
weights laid out per expert and runs few tensor operations. Measured in ``bench/speculative.py``.

Both are "identity-initialised": the transforms start at h plus a small random perturbation
(N(0, 0.02) weights), so at initialisation every factor is close to the backbone's own
next-token distribution; the perturbation breaks the symmetry between experts.

The training loss never materialises (B, T, n, r, V) probabilities: :class:`_FusedCPLogProb`
walks over chunks of positions, computes each chunk's logits, the target log-probabilities,
the log-normalisers and (when gradients are needed) the gradients right away, and keeps only
(N, n, r)-sized results. :meth:`CPHeads.joint_log_prob` is the general, per-position
differentiable version (chunked, with activation checkpointing); tests check that both agree.

``MTPModel`` = :class:`cptoy.model.GPT` backbone + ``CPHeads``, with the multi-token loss,
backbone freezing and checkpoints.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cptoy._checks import check_nonneg_number, check_positive_int
from cptoy.cp import CPDist
from cptoy.model import GPT, GPTConfig
from cptoy.persist import atomic_save, read_torch_file
from cptoy.speculative import FactorQ, MixtureQ, Proposal, sample_index

__all__ = ["CPHeads", "MTPModel", "HeadTerms", "DraftStep", "DraftingHeads", "frequency_shortlist",
           "read_torch_file", "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION"]

CHECKPOINT_FORMAT = "cptoy-mtp"  # the "format" entry of every checkpoint written by MTPModel.save
CHECKPOINT_VERSION = 1  # bump when the layout changes; load() refuses newer versions
_TINY = 1e-30  # below this a probability's log is taken in log space instead (float32 safety)
_CHUNK_BYTES = 4 * 2**20  # default budget for one chunk's (c, n, r, V) float32 logits (cache-sized)


# ============================================================================ fused loss


class _FusedCPLogProb(torch.autograd.Function):
    """sum_i log Q_i(x_i) over N positions, chunked, with gradients computed in the forward.

    Inputs (``m`` is r for the full structure, 1 for the structured one, where the base logits
    are shared by the experts of a position):
        X  (N, n, m, d)   transformed hidden states that meet the unembedding
        U  (V, d)         the unembedding
        C  (N, n, r, e)   expert codes (structured only, else None)
        B  (V, e)         expert output embedding (structured only, else None)
        lw (N, r)         log gate weights
        targets (N, n)    token ids
    Logits: z_{s,a} = X_{s,a} @ U.T (+ C_{s,a} @ B.T), shape (c, n, r, V) per chunk.

    Returns (total, log_q, log_first): total = sum_i log Q_i (the only differentiable output),
    log_q (N,) per-position log Q and log_first (N,) the log CP marginal of the first token
    (both detached).

    Gradients (for one position, g = posterior responsibilities softmax_a(lw_a + sum_s lq_{s,a})):
        d log Q / d z_{s,a,v} = g_a (1[v = x_s] - q_{s,a}(v)),   d log Q / d lw_a = g_a.
    The upstream gradient of ``total`` is a scalar, so the gradients are computed chunk by chunk
    in the forward (nothing of size V is kept) and only scaled in the backward.
    """

    @staticmethod
    def forward(ctx, X, U, C, B, lw, targets, chunk: int, needs: tuple[bool, ...]):
        need_X, need_U, need_C, need_B, need_lw = needs
        any_grad = any(needs)
        N, n, m, d = X.shape
        r = lw.shape[-1]
        V = U.shape[0]
        structured = C is not None
        dX = torch.empty_like(X) if need_X else None
        dU = torch.zeros(V, d, dtype=torch.float32, device=U.device) if need_U else None
        dC = torch.empty_like(C) if need_C else None
        dB = torch.zeros_like(B, dtype=torch.float32) if need_B else None
        dlw = torch.empty_like(lw) if need_lw else None
        log_q = torch.empty(N, dtype=torch.float32, device=X.device)
        log_first = torch.empty(N, dtype=torch.float32, device=X.device)
        Ut = U.t()
        for lo in range(0, N, chunk):
            hi = min(N, lo + chunk)
            c = hi - lo
            Xc = X[lo:hi]
            base = (Xc.reshape(c * n * m, d) @ Ut).view(c, n, m, V)
            if structured:
                e = C.shape[-1]
                Cc = C[lo:hi]
                z = (Cc.reshape(c * n * r, e) @ B.t()).view(c, n, r, V).float()
                z += base  # (c, n, r, V), base broadcast over experts
            else:
                z = base.float()  # (c, n, r, V)
            tgt = targets[lo:hi].view(c, n, 1, 1).expand(c, n, r, 1)
            P = torch.softmax(z, dim=-1)  # (c, n, r, V) q_{s,a}: one fused kernel
            pt = P.gather(-1, tgt).squeeze(-1)  # (c, n, r) q_{s,a}(x_s)
            if bool((pt < _TINY).any()):  # log would lose precision: exact log-space fallback
                lq = z.gather(-1, tgt).squeeze(-1) - torch.logsumexp(z, dim=-1)
            else:
                lq = pt.log()  # (c, n, r) log q_{s,a}(x_s)
            del z
            lwc = lw[lo:hi].float()  # (c, r)
            ell = lwc + lq.sum(1)  # (c, r) log w_a + sum_s log q_{s,a}(x_s)
            log_q[lo:hi] = torch.logsumexp(ell, dim=-1)
            log_first[lo:hi] = torch.logsumexp(lwc + lq[:, 0], dim=-1)
            if not any_grad:
                continue
            log_g = torch.log_softmax(ell, dim=-1)  # (c, r) log posterior responsibilities
            g = log_g.exp()
            if need_lw:
                dlw[lo:hi] = g.to(dlw.dtype)
            if not (need_X or need_U or need_C or need_B):
                continue
            # G = g_a (q_{s,a} - onehot(x_s)) = d(-log Q)/dz_{s,a}, built in place in P's storage
            G = P.mul_(g.view(c, 1, r, 1))  # (c, n, r, V) g_a q_{s,a}
            G.scatter_add_(-1, tgt, -g.view(c, 1, r, 1).expand(c, n, r, 1))
            # gradient of the base logits: summed over experts first when they share the base
            Gb = G.sum(2, keepdim=True) if (m == 1 and r > 1) else G  # (c, n, m, V)
            Gb2 = Gb.reshape(c * n * m, V)
            if need_X:
                dX[lo:hi] = (Gb2 @ U.to(Gb2.dtype)).view(c, n, m, d).to(dX.dtype)
            if need_U:
                dU += (Gb2.t() @ Xc.reshape(c * n * m, d).to(Gb2.dtype)).float()
            if structured and (need_C or need_B):
                G2 = G.reshape(c * n * r, V)
                if need_C:
                    dC[lo:hi] = (G2 @ B.to(G2.dtype)).view(c, n, r, -1).to(dC.dtype)
                if need_B:
                    dB += (G2.t() @ Cc.reshape(c * n * r, -1).to(G2.dtype)).float()
        ctx.grads = (dX, dU, dC, dB, dlw)
        ctx.dtypes = (U.dtype, None if B is None else B.dtype)
        ctx.mark_non_differentiable(log_q, log_first)
        return log_q.sum(), log_q, log_first

    @staticmethod
    def backward(ctx, g_total, _g_q, _g_first):
        dX, dU, dC, dB, dlw = ctx.grads
        del ctx.grads

        def scale(t, by, dtype=None):
            if t is None:
                return None
            t = t * by.to(t.dtype)
            return t if dtype is None else t.to(dtype)

        # dX, dU, dC, dB hold gradients of -sum log Q, dlw the gradient of +sum log Q
        neg = -g_total
        return (
            scale(dX, neg),
            scale(dU, neg, ctx.dtypes[0]),
            scale(dC, neg),
            scale(dB, neg, ctx.dtypes[1]),
            scale(dlw, g_total),
            None,
            None,
            None,
        )


@dataclass
class HeadTerms:
    """What the multi-token loss needs from the heads at N positions (see ``CPHeads.loss_terms``)."""

    log_q_sum: torch.Tensor  # () sum over positions of log Q(x_1..x_n); carries the gradient
    log_q: torch.Tensor  # (N,) per-position log Q(x_1..x_n), detached
    log_first: torch.Tensor  # (N,) per-position log of the CP marginal of x_1, detached


# ============================================================================ heads


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

    Subclasses set ``d_model``, ``vocab_size``, ``n_future`` and an ``unembedding`` (V, d)
    property, call ``super().__init__()`` and then :meth:`_init_shortlist`; they may cache
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


class CPHeads(DraftingHeads):
    """Rank-r CP heads over the next n tokens, sharing the backbone's unembedding.

    Args:
        d_model: width d of the hidden states.
        vocab_size: V.
        n_future: n, the number of future tokens (position 1 is the next token).
        rank: r, the number of experts (mixture components). Rank 1 has no gate.
        unembedding: the (V, d) output matrix. An ``nn.Parameter`` is *shared*: it is used by
            reference and not registered here (its owner, e.g. the backbone, registers, trains and
            saves it). A plain tensor is stored as a fixed, non-persistent buffer.
        expert_dim: None for the "full" structure (one transform per (position, expert)),
            or e for the "structured" one (one transform per position + rank-e expert
            corrections); see the module docstring for formulas and costs.
        chunk_size: positions per chunk in the loss (None: sized so that one chunk's
            (c, n, r, V) float32 logits take about 4 MiB, which measured fastest on CPU).
    """

    def __init__(
        self,
        d_model: int,
        vocab_size: int,
        n_future: int,
        rank: int,
        unembedding: nn.Parameter | torch.Tensor,
        expert_dim: int | None = None,
        chunk_size: int | None = None,
    ):
        super().__init__()
        self.d_model = check_positive_int(d_model, "d_model")
        self.vocab_size = check_positive_int(vocab_size, "vocab_size")
        self.n_future = check_positive_int(n_future, "n_future")
        self.rank = check_positive_int(rank, "rank")
        if expert_dim is not None:
            check_positive_int(expert_dim, "expert_dim")
        self.expert_dim = expert_dim
        if chunk_size is not None:
            check_positive_int(chunk_size, "chunk_size")
        self.chunk_size = chunk_size
        self._attach("unembedding", unembedding, (vocab_size, d_model))

        n, r, d = n_future, rank, d_model
        per_pos = n * r if expert_dim is None else n  # transforms that feed U
        # transforms T(h) = h + silu(W h + b): all of them in one (per_pos * d, d) weight
        self.transform_weight = nn.Parameter(torch.randn(per_pos * d, d) * 0.02)
        self.transform_bias = nn.Parameter(torch.zeros(per_pos * d))
        if expert_dim is not None:
            e = expert_dim
            # expert codes silu(A_{s,a} h + c_{s,a}) in one (n * r * e, d) weight, then B (V, e)
            self.expert_in_weight = nn.Parameter(torch.randn(n * r * e, d) / math.sqrt(d))
            self.expert_in_bias = nn.Parameter(torch.zeros(n * r * e))
            self.expert_out = nn.Parameter(torch.randn(vocab_size, e) * 0.02)
        # gate w = softmax(W_g h + b_g); zero init = uniform weights; absent for rank 1
        self.gate = nn.Linear(d, r) if r > 1 else None
        self._init_shortlist()
        if self.gate is not None:
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)

    # ------------------------------------------------------------------ basics
    @property
    def unembedding(self) -> torch.Tensor:
        """The shared (V, d) unembedding."""
        return self._attached("unembedding")

    @property
    def structure(self) -> str:
        """``"full"`` (expert_dim None) or ``"structured"``."""
        return "full" if self.expert_dim is None else "structured"

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, vocab_size={self.vocab_size}, n_future={self.n_future}, "
            f"rank={self.rank}, structure={self.structure}, expert_dim={self.expert_dim}"
        )

    def num_params(self) -> int:
        """Parameters owned by the heads (the shared unembedding not counted)."""
        return sum(p.numel() for p in self.parameters())

    def _chunk(self) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        per = self.n_future * self.rank * self.vocab_size * 4
        return max(1, _CHUNK_BYTES // per)

    # ------------------------------------------------------------------ building blocks
    def gate_log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """log gate weights (..., r) from hidden (..., d); zeros (..., 1) for rank 1."""
        if self.gate is None:
            return hidden.new_zeros(hidden.shape[:-1] + (1,))
        return torch.log_softmax(self.gate(hidden).float(), dim=-1)

    def gate_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """Gate weights w (..., r) from hidden (..., d) (what the load-balance loss sees)."""
        return self.gate_log_probs(self._check_hidden(hidden)).exp()

    def _features(self, h: torch.Tensor, n_pos: int | None = None, start: int = 0):
        """h (N, d) -> X (N, k, m, d) transformed states for U and C (N, k, r, e) or None.

        Only positions ``start .. n_pos - 1`` are computed (k = n_pos - start; one matmul each
        for the transforms and the expert codes, on contiguous views of the weights: no copies).
        """
        n, r, d = self.n_future, self.rank, self.d_model
        stop = n if n_pos is None else n_pos
        k = stop - start
        m = r if self.expert_dim is None else 1
        W = self.transform_weight[start * m * d : stop * m * d]
        b = self.transform_bias[start * m * d : stop * m * d]
        X = h.unsqueeze(-2).unsqueeze(-2) + F.silu(F.linear(h, W, b)).view(
            -1, k, m, d
        )  # (N, k, m, d)
        C = None
        if self.expert_dim is not None:
            e = self.expert_dim
            A = self.expert_in_weight[start * r * e : stop * r * e]
            c = self.expert_in_bias[start * r * e : stop * r * e]
            C = F.silu(F.linear(h, A, c)).view(-1, k, r, e)  # (N, k, r, e)
        return X, C

    def _logits(self, X: torch.Tensor, C: torch.Tensor | None, vocab=None) -> torch.Tensor:
        """Factor logits (N, k, r, V) from features (one matmul with U, one with B); with
        ``vocab`` (K,) token ids only those columns, (N, k, r, K)."""
        U = self.unembedding if vocab is None else self.unembedding[vocab]
        z = X @ U.t().to(X.dtype)  # (N, k, m, V)
        if C is not None:
            B = self.expert_out if vocab is None else self.expert_out[vocab]
            z = z + C @ B.t().to(C.dtype)  # (N, k, r, V)
        return z.float()

    def factor_logits(self, hidden: torch.Tensor, n_pos: int | None = None,
                      vocab: torch.Tensor | None = None) -> torch.Tensor:
        """Unnormalised factor logits (..., k, r, V) for the first ``n_pos`` (default n)
        positions; with ``vocab`` (K,) int64 token ids only those columns, (..., k, r, K)
        (training over a shortlist, see ``cptoy.headtrain``)."""
        hidden = self._check_hidden(hidden)
        lead = hidden.shape[:-1]
        X, C = self._features(hidden.reshape(-1, self.d_model), n_pos)
        z = self._logits(X, C, vocab)
        return z.view(lead + z.shape[1:])

    # ------------------------------------------------------------------ distributions
    def forward(self, hidden: torch.Tensor) -> CPDist:
        """The CP distribution at every hidden state: hidden (..., d) -> CPDist, batch shape (...).

        Materialises (..., n, r, V) log factors: for analysis, widgets and tests. Training uses
        :meth:`loss_terms`, decoding uses :meth:`draft`.
        """
        hidden = self._check_hidden(hidden)
        lw = self.gate_log_probs(hidden)  # (..., r)
        lf = torch.log_softmax(self.factor_logits(hidden), dim=-1)  # (..., n, r, V)
        return CPDist(lw, lf)

    def _chunk_log_probs(self, h: torch.Tensor, targets: torch.Tensor):
        """Plain autograd for one chunk: h (c, d), targets (c, n) -> log Q (c,), log first (c,)."""
        lw = self.gate_log_probs(h)  # (c, r)
        X, C = self._features(h)
        lf = torch.log_softmax(self._logits(X, C), dim=-1)  # (c, n, r, V)
        r = self.rank
        lq = lf.gather(-1, targets.unsqueeze(-1).unsqueeze(-1).expand(-1, -1, r, 1)).squeeze(-1)
        log_q = torch.logsumexp(lw + lq.sum(1), dim=-1)
        log_first = torch.logsumexp(lw + lq[:, 0], dim=-1)
        return log_q, log_first

    def _log_probs(self, hidden, targets, which: int) -> torch.Tensor:
        hidden = self._check_hidden(hidden)
        lead = hidden.shape[:-1]
        h = hidden.reshape(-1, self.d_model)
        tg = targets.reshape(-1, targets.shape[-1])
        out = []
        chunk = self._chunk()
        use_ckpt = torch.is_grad_enabled() and h.shape[0] > chunk
        for lo in range(0, h.shape[0], chunk):
            hc, tc = h[lo : lo + chunk], tg[lo : lo + chunk]
            if use_ckpt:
                res = torch.utils.checkpoint.checkpoint(
                    self._chunk_log_probs, hc, tc, use_reentrant=False
                )
            else:
                res = self._chunk_log_probs(hc, tc)
            out.append(res[which])
        return torch.cat(out).view(lead)

    def joint_log_prob(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log Q(targets) (...,) for hidden (..., d) and targets (..., n), differentiable per position.

        Computed in chunks of positions; under autograd each chunk is checkpointed, so memory
        stays at one chunk's (c, n, r, V) logits. Equals ``self(hidden).log_prob(targets)``.
        """
        hidden = self._check_hidden(hidden)
        targets = self._check_tokens(
            targets, "targets", tuple(hidden.shape[:-1]) + (self.n_future,)
        )
        return self._log_probs(hidden, targets, 0)

    def first_token_log_prob(
        self, hidden: torch.Tensor, first_tokens: torch.Tensor
    ) -> torch.Tensor:
        """log of the CP marginal of position 1, sum_a w_a q_{1,a}(x_1): hidden (..., d),
        first_tokens (...) -> (...)."""
        hidden = self._check_hidden(hidden)
        first = self._check_tokens(first_tokens, "first_tokens", tuple(hidden.shape[:-1]))
        lead = hidden.shape[:-1]
        h = hidden.reshape(-1, self.d_model)
        lw = self.gate_log_probs(h)  # (N, r)
        lf = torch.log_softmax(self._logits(*self._features(h, 1))[:, 0], dim=-1)  # (N, r, V)
        lq = lf.gather(-1, first.reshape(-1, 1, 1).expand(-1, self.rank, 1)).squeeze(-1)
        return torch.logsumexp(lw + lq, dim=-1).view(lead)

    def loss_terms(
        self, hidden: torch.Tensor, targets: torch.Tensor, log_gate: torch.Tensor | None = None
    ) -> HeadTerms:
        """The fused, chunked training computation at N positions.

        hidden (N, d), targets (N, n), optional precomputed ``log_gate`` (N, r). Returns
        :class:`HeadTerms`; only ``log_q_sum`` carries gradients (to hidden, the head parameters,
        the unembedding and the gate), computed chunk by chunk without keeping any (N, n, r, V)
        tensor.
        """
        hidden = self._check_hidden(hidden, dims=2)
        N = hidden.shape[0]
        targets = self._check_tokens(targets, "targets", (N, self.n_future))
        lw = self.gate_log_probs(hidden) if log_gate is None else log_gate  # (N, r)
        X, C = self._features(hidden)
        U = self.unembedding
        B = self.expert_out if self.expert_dim is not None else None
        grad = torch.is_grad_enabled()
        needs = (
            grad and X.requires_grad,
            grad and U.requires_grad,
            grad and C is not None and C.requires_grad,
            grad and B is not None and B.requires_grad,
            grad and lw.requires_grad,
        )
        total, log_q, log_first = _FusedCPLogProb.apply(
            X, U, C, B, lw, targets, self._chunk(), needs
        )
        return HeadTerms(total, log_q, log_first)

    # ------------------------------------------------------------------ drafting
    def _draft_logits(self, X: torch.Tensor, C: torch.Tensor | None) -> torch.Tensor:
        """Like :meth:`_logits` (without gradients), over the shortlist when one is set:
        (..., K or V)."""
        tb = self._step_tables()  # U's (shortlist) rows, transposed, cached: one copy for all
        z = X @ tb["UT"].to(X.dtype)
        if C is not None:
            z = z + C @ tb["BT"].to(C.dtype)
        return z.float()

    def draft_posterior(self, hidden: torch.Tensor, first_tokens: torch.Tensor,
                        temperature: float) -> torch.Tensor:
        """log of the posterior gate after x_1: (B, r), from hidden (B, d) and x_1 (B,).

        ``log w_a(h) + log q_{1,a}(x_1)`` normalised over experts, with the position-1 factors
        tempered like the drafts (see :meth:`draft`). Rank 1: zeros (B, 1). Only position 1 is
        computed (r unembeddings, over the shortlist when one is set).
        """
        hidden, first, T, _ = self._check_draft_args(hidden, first_tokens, temperature)
        return self._posterior(hidden, first, T if T > 0 else 1.0)

    def _posterior(self, h: torch.Tensor, first, t: float) -> torch.Tensor:
        """log posterior gate (B, r) after x_1 = ``first`` for h (B, d), tempered by t.

        ``first``: (B,) int64, or an int for every row (one decode step: fewer operations).

        ``log w_a(h) + z_{1,a}(x_1) / t - logsumexp(z_{1,a} / t)``, normalised over experts: the
        position-1 transform of every expert, the normaliser over the shortlist when one is set,
        and x_1's own logit as one dot product per expert (x_1 may lie outside the shortlist).
        """
        B, d = h.shape
        if self.rank == 1:
            return h.new_zeros(B, 1).float()
        tb = self._step_tables()
        w = tb.get("pos1")
        if w is None:  # position 1's weights and the gate, as views (cached: indexing is slow)
            r, e = self.rank, self.expert_dim
            m = r if e is None else 1
            w = (self.transform_weight.detach()[: m * d], self.transform_bias.detach()[: m * d],
                 self.gate.weight.detach(), self.gate.bias.detach())
            if e is not None:
                w += (self.expert_in_weight.detach()[: r * e],
                      self.expert_in_bias.detach()[: r * e], self.expert_out.detach())
            tb["pos1"] = w
        def at_first(X, table):  # X (B, m, c) times row x_1 of table (V, c): (B, m)
            if isinstance(first, int):
                return X @ table[first]
            return (X @ table[first][:, :, None]).squeeze(-1)

        X1 = h[:, None] + F.silu(F.linear(h, w[0], w[1])).view(B, -1, d)  # (B, r or 1, d)
        z1 = X1 @ tb["UT"]  # (B, r or 1, K)
        zx = at_first(X1, self.unembedding.detach())  # (B, r or 1)
        if self.expert_dim is not None:
            C1 = F.silu(F.linear(h, w[4], w[5])).view(B, self.rank, -1)  # (B, r, e)
            z1 = z1 + C1 @ tb["BT"]  # (B, r, K)
            zx = zx + at_first(C1, w[6])  # (B, r)
        if t != 1.0:
            z1, zx = z1 / t, zx / t
        lq1 = zx - torch.logsumexp(z1, dim=-1)  # (B, r)
        return torch.log_softmax(F.linear(h, w[2], w[3]) + lq1, dim=-1)

    def _expert_logits(self, h: torch.Tensor, experts, start: int, stop: int) -> torch.Tensor:
        """Logits (B, k, K) of ONE expert per row at positions start..stop-1, for h (B, d).

        ``experts``: an int (every row, e.g. one decode step: cached weight views, one matmul
        per weight) or a (B,) int64 tensor (a weight slice gathered per row). Over the
        shortlist when one is set; rank 1 drafts through here with expert 0.
        """
        tb = self._step_tables()
        d, e, k = self.d_model, self.expert_dim, stop - start
        B = h.shape[0]
        if isinstance(experts, int):
            w = tb.get((experts, start, stop))
            if w is None:  # the weight slices this step reads, as views (cached)
                if e is None:
                    w = (tb["W"][experts, start * d : stop * d],
                         tb["b"][experts, start * d : stop * d])
                else:
                    w = (self.transform_weight.detach()[start * d : stop * d],
                         self.transform_bias.detach()[start * d : stop * d],
                         tb["A"][experts, start * e : stop * e],
                         tb["c"][experts, start * e : stop * e])
                tb[(experts, start, stop)] = w
            X = F.silu(F.linear(h, w[0], w[1])).view(B, k, d) + h.unsqueeze(1)  # (B, k, d)
            C = None if e is None else F.silu(F.linear(h, w[2], w[3])).view(B, k, e)
        elif e is None:
            W, b = tb["W"][experts, start * d : stop * d], tb["b"][experts, start * d : stop * d]
            pre = (W @ h[:, :, None]).squeeze(-1) + b  # (B, k d)
            X, C = h[:, None] + F.silu(pre).view(B, k, d), None
        else:
            W = self.transform_weight.detach()[start * d : stop * d]
            X = h[:, None] + F.silu(F.linear(h, W, self.transform_bias.detach()[
                start * d : stop * d])).view(B, k, d)
            A, c = tb["A"][experts, start * e : stop * e], tb["c"][experts, start * e : stop * e]
            C = F.silu((A @ h[:, :, None]).squeeze(-1) + c).view(B, k, e)
        z = X @ tb["UT"]  # (B, k, K)
        return z if C is None else z + C @ tb["BT"]

    def draft(
        self,
        hidden: torch.Tensor,
        first_tokens: torch.Tensor,
        temperature: float,
        n_draft: int | None = None,
        experts: torch.Tensor | None = None,
        compact: bool = False,
    ) -> CPDist:
        """The draft distribution of one decode step: CP over positions 2..k+1 given x_1.

        hidden (B, d) at the last accepted position, first_tokens (B,) = x_1 chosen by the
        backbone, ``temperature`` >= 0 (> 0: every factor is softmax(logits / T); 0: untempered,
        for greedy drafting with ``.mode()``), ``n_draft`` = k drafts (default n - 1).

        ``experts=None`` (mixture routing): equals
        ``self(hidden).tempered(T).condition(first_tokens[:, None])`` (restricted to the first k
        drafted positions), computing only positions 1..k+1 of one hidden state per sequence,
        in one matmul for the transforms and one with U. Returns a CPDist with batch shape (B,),
        n = k, log_weights = the posterior gate (:meth:`draft_posterior`).

        ``experts`` (B,) int64 (one-expert routing): the factors of that one expert per sequence
        at positions 2..k+1, a rank-1 CPDist. Drafting from an expert drawn from the posterior
        gate samples the same CP, but the speculative test then uses that expert's factors as q
        (still lossless: any draft distribution is, when q is the one the drafts came from); it
        costs k transforms and k unembeddings instead of r (k + 1).

        With a shortlist (:meth:`set_draft_vocab`) every factor is over the shortlist only:
        by default still indexed by token id (V entries, -inf outside the shortlist); with
        ``compact=True`` over the K shortlisted tokens, entry i being token ``draft_vocab[i]``
        (what the decoder uses: every later step then costs K, not V).
        """
        hidden, first, T, k = self._check_draft_args(hidden, first_tokens, temperature, n_draft)
        Bsz = hidden.shape[0]
        t = T if T > 0 else 1.0
        if experts is not None or self.rank == 1:  # one factor per position: a rank-1 CP
            e = 0 if experts is None else self._check_experts(experts, Bsz)
            z = self._expert_logits(hidden, e, 1, k + 1).float().unsqueeze(2)  # (B, k, 1, K)
            post = torch.zeros(Bsz, 1, dtype=z.dtype, device=z.device)
        else:
            z = self._draft_logits(*self._features(hidden, k + 1, start=1))  # (B, k, r, K)
            post = self._posterior(hidden, first, t)  # (B, r)
        if t != 1.0:
            z = z / t
        return CPDist(post, self._to_vocab(torch.log_softmax(z, dim=-1), compact))

    def _step_tables(self) -> dict:
        """Weights laid out for :meth:`draft_step`, cached until a parameter changes.

        ``UT`` (d, K) = the shortlist's (or all) unembedding rows, transposed and contiguous;
        full heads: ``W``/``b`` = the transforms grouped by expert, (r, n*d, d) / (r, n*d), so
        that one expert's positions 2..k+1 are one contiguous slice; structured heads: ``BT``
        (e, K) and the expert codes grouped the same way, ``A``/``c`` (r, n*e, d) / (r, n*e).
        """
        params = [self.unembedding, self.transform_weight, self.transform_bias]
        if self.gate is not None:
            params += [self.gate.weight, self.gate.bias]
        if self.expert_dim is not None:
            params += [self.expert_in_weight, self.expert_in_bias, self.expert_out]
        S = self._draft_vocab
        key = tuple((t.data_ptr(), t._version) for t in params) + (
            None if S is None else (S.data_ptr(), S._version),)
        cached = getattr(self, "_tables", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        n, r, d = self.n_future, self.rank, self.d_model
        with torch.no_grad():
            U = self.unembedding.detach()
            t = dict(UT=(U if S is None else U.index_select(0, S)).t().contiguous())
            Wt, bt = self.transform_weight.detach(), self.transform_bias.detach()
            if self.expert_dim is None:
                t["W"] = Wt.view(n, r, d, d).transpose(0, 1).reshape(r, n * d, d).contiguous()
                t["b"] = bt.view(n, r, d).transpose(0, 1).reshape(r, n * d).contiguous()
            else:
                e = self.expert_dim
                B = self.expert_out.detach()
                t["BT"] = (B if S is None else B.index_select(0, S)).t().contiguous()
                A, c = self.expert_in_weight.detach(), self.expert_in_bias.detach()
                t["A"] = A.view(n, r, e, d).transpose(0, 1).reshape(r, n * e, d).contiguous()
                t["c"] = c.view(n, r, e).transpose(0, 1).reshape(r, n * e).contiguous()
        self._tables = (key, t)
        return t

    def draft_step(self, hidden: torch.Tensor, x1: int, k: int, temperature: float,
                   generator: torch.Generator | None = None,
                   routing: str = "mixture") -> DraftStep:
        """Everything one self-speculative decode step needs from the heads, for ONE sequence.

        hidden (1, d) at the last accepted position, x1 the backbone's token, k drafts,
        ``temperature`` (0: greedy drafts), ``generator`` for the draws, ``routing`` "mixture"
        or "expert" (see ``cptoy.decoding``). The same distribution as :meth:`draft` (the tests
        check it), computed with few tensor operations on weights laid out for it
        (:meth:`_step_tables`): at toy size a decode step is bound by per-operation overhead and
        by reading weights the backbone's forward pushed out of the cache, not by multiply-adds.

        Sampling (T > 0) is ancestral: an expert from the posterior gate, then each drafted
        position from that expert's tempered factor. Greedy (T = 0): the mixture's sequential
        mode (``CPDist.mode``), or with one-expert routing the argmax expert's argmaxes.
        Returns a :class:`DraftStep` in the drafting space (the shortlist, when one is set).
        """
        if torch.is_grad_enabled():  # (a decorator would cost ~10 us per decode step)
            with torch.no_grad():
                return self.draft_step(hidden, x1, k, temperature, generator, routing)
        t = temperature if temperature > 0 else 1.0
        log_post, expert = None, None
        if self.rank > 1:
            log_post = self._posterior(hidden, x1, t)[0].double()  # (r,)
            if routing == "expert" or temperature > 0:
                expert = (int(log_post.argmax()) if temperature == 0 else
                          sample_index(torch.softmax(log_post, -1)[None], generator)[1][0])
        if self.rank == 1 or routing == "expert":
            z = self._expert_logits(hidden, expert or 0, 1, k + 1)[0]  # (k, K)
            return self._factor_step(z, temperature, generator, expert, log_post)
        # mixture routing, rank > 1: every expert's factors at positions 2..k+1
        z = self._draft_logits(*self._features(hidden, k + 1, start=1))[0].double()  # (k,r,K)
        lf = torch.log_softmax(z / t if t != 1.0 else z, dim=-1)
        if temperature == 0:
            drafts = CPDist(log_post, lf).mode().tolist()
            expert = int(log_post.argmax())
        else:
            drafts = sample_index(lf[:, expert].exp(), generator)[1]
        return DraftStep(drafts, expert, self._draft_vocab, log_post,
                         mixture=CPDist(log_post, lf), vocab_list=self._draft_vocab_list)

    def _check_experts(self, experts, Bsz: int) -> torch.Tensor:
        if not isinstance(experts, torch.Tensor) or experts.is_floating_point() or \
                experts.dtype == torch.bool:
            raise TypeError("experts must be an int64 tensor (B,) of expert indices or None")
        if tuple(experts.shape) != (Bsz,):
            raise ValueError(f"experts must have shape ({Bsz},), got {tuple(experts.shape)}")
        if experts.numel() and (int(experts.min()) < 0 or int(experts.max()) >= self.rank):
            raise ValueError(f"experts must lie in [0, {self.rank})")
        return experts.long().to(self.transform_weight.device)


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


# ============================================================================ the model


def _check_head_positions(hp):
    if hp is None:
        return None
    if isinstance(hp, bool) or not isinstance(hp, (int, float)):
        raise TypeError(
            f"head_positions must be None, a float in (0, 1] or an int >= 1, got {type(hp).__name__}"
        )
    if isinstance(hp, float):
        if not 0.0 < hp <= 1.0:
            raise ValueError(f"head_positions as a fraction must be in (0, 1], got {hp}")
    elif hp < 1:
        raise ValueError(f"head_positions as a count must be >= 1, got {hp}")
    return hp


class MTPModel(nn.Module):
    """A GPT backbone plus rank-r CP heads over the next ``n_future`` tokens.

    Args:
        config: the backbone's :class:`GPTConfig` (a new, randomly initialised backbone), or a
            :class:`GPT` to build the heads on (e.g. ``cptoy.pretrained.load(...)[0]``; used as
            it is, not copied).
        n_future: n >= 1 future tokens modelled by the heads (position 1 = the next token).
        rank: r >= 1 experts.
        load_balance_coef: weight of the load-balancing loss in ``total``.
        joint_weight: weight of ``joint_nll`` in ``total``.
        expert_dim: head structure, see :class:`CPHeads` (None = full).
        freeze_backbone: train only the heads (see :meth:`freeze_backbone`).
        head_positions: positions per batch that the head loss uses *in training mode*: None =
            all, a float f in (0, 1] = a uniformly random fraction f of the B*T positions, an
            int k = k random positions. Drawn without replacement from a generator seeded with
            ``seed``, so the head loss is an unbiased estimate of the all-positions loss and runs
            are reproducible. Evaluation (``model.eval()``) always uses all positions.
        seed: seed of the head-position sampler.
        chunk_size: see :class:`CPHeads`.
    """

    def __init__(
        self,
        config: GPTConfig,
        n_future: int,
        rank: int,
        load_balance_coef: float = 0.01,
        joint_weight: float = 1.0,
        expert_dim: int | None = None,
        freeze_backbone: bool = False,
        head_positions: float | int | None = None,
        seed: int = 0,
        chunk_size: int | None = None,
    ):
        super().__init__()
        backbone = config if isinstance(config, GPT) else None
        if backbone is not None:
            config = backbone.config
        if not isinstance(config, GPTConfig):
            raise TypeError(
                f"config must be a GPTConfig or a GPT backbone, got {type(config).__name__}")
        check_positive_int(n_future, "n_future")
        check_positive_int(rank, "rank")
        check_nonneg_number(load_balance_coef, "load_balance_coef")
        check_nonneg_number(joint_weight, "joint_weight")
        self.head_positions = _check_head_positions(head_positions)
        self.n_future = n_future
        self.rank = rank
        self.load_balance_coef = float(load_balance_coef)
        self.joint_weight = float(joint_weight)
        self.expert_dim = expert_dim
        self.seed = seed
        self.backbone = GPT(config) if backbone is None else backbone
        self.heads = CPHeads(
            config.n_embd,
            config.vocab_size,
            n_future,
            rank,
            self.backbone.unembedding,
            expert_dim=expert_dim,
            chunk_size=chunk_size,
        )
        self._sampler = torch.Generator().manual_seed(seed)
        self._frozen = False
        if freeze_backbone:
            self.freeze_backbone()

    # ------------------------------------------------------------------ basics
    @property
    def config(self) -> GPTConfig:
        return self.backbone.config

    @property
    def backbone_frozen(self) -> bool:
        return self._frozen

    def head_kwargs(self) -> dict:
        """Everything besides config, n_future and rank needed to rebuild this model."""
        return dict(
            load_balance_coef=self.load_balance_coef,
            joint_weight=self.joint_weight,
            expert_dim=self.expert_dim,
            head_positions=self.head_positions,
            seed=self.seed,
            chunk_size=self.heads.chunk_size,
        )

    def freeze_backbone(self, frozen: bool = True) -> MTPModel:
        """Freeze (or unfreeze) the backbone: its parameters (the shared unembedding included) get
        ``requires_grad=False``, its forward runs under ``no_grad`` and in eval mode (no dropout),
        so an optimizer step changes only the heads."""
        self._frozen = bool(frozen)
        for p in self.backbone.parameters():
            p.requires_grad_(not self._frozen)
        self.backbone.train(self.training and not self._frozen)
        return self

    def train(self, mode: bool = True) -> MTPModel:
        super().train(mode)
        if self._frozen:
            self.backbone.eval()
        return self

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.heads.parameters())

    def forward(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """Same as :meth:`loss`."""
        return self.loss(idx)

    def hidden(self, idx: torch.Tensor, cache=None) -> torch.Tensor:
        """Backbone hidden states (B, T, d) (under no_grad when the backbone is frozen)."""
        if self._frozen:
            with torch.no_grad():
                return self.backbone(idx, cache)
        return self.backbone(idx, cache)

    def draft(
        self,
        hidden_last: torch.Tensor,
        first_tokens: torch.Tensor,
        temperature: float,
        n_draft: int | None = None,
    ) -> CPDist:
        """See :meth:`CPHeads.draft`."""
        return self.heads.draft(hidden_last, first_tokens, temperature, n_draft)

    # ------------------------------------------------------------------ loss
    def _check_idx(self, idx) -> int:
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2:
            shape = tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise ValueError(f"idx must be a (B, T + n_future) tensor of token ids, got {shape}")
        if idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"idx must hold integer token ids, got dtype {idx.dtype}")
        T = idx.shape[1] - self.n_future
        if T < 1:
            raise ValueError(
                f"idx must hold T + n_future tokens with T >= 1 (n_future={self.n_future}), got {idx.shape[1]}"
            )
        if T > self.config.block_size:
            raise ValueError(
                f"idx is too long: {idx.shape[1]} tokens = T {T} + n_future {self.n_future}, but T must be "
                f"<= block_size {self.config.block_size}; pass at most {self.config.block_size + self.n_future}"
            )
        return T

    def _sample_positions(self, N: int, device) -> torch.Tensor | None:
        hp = self.head_positions
        if hp is None or not self.training:
            return None
        K = max(1, round(hp * N)) if isinstance(hp, float) else min(hp, N)
        if K >= N:
            return None
        return torch.randperm(N, generator=self._sampler)[:K].to(device)

    def loss(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """Multi-token losses on a batch ``idx`` (B, T + n): the first T tokens are the context.

        Returns a dict of scalars (nats):
            next_token_nll  mean over B*T of -log p(x_{t+1}) from the backbone's own head.
            joint_nll       mean over positions of -log Q(x_{t+1..t+n}) / n: the CP joint's
                            negative log-likelihood *per predicted token* (divided by n so it sits
                            on the same scale as next_token_nll; multiply by n for nats per
                            n-token window). For rank 1 it is the mean of the n heads' NLLs.
            first_token_nll mean of -log sum_a w_a q_{1,a}(x_{t+1}), the CP marginal of x_{t+1}.
            load_balance    r * sum_a u_a^2 with u_a the gate weight of expert a averaged over all
                            B*T positions: 1 at uniform usage, r when one expert takes all.
            expert_entropy  -sum_a u_a log u_a (log r at uniform usage, 0 when collapsed).
            total           next_token_nll + joint_weight * joint_nll
                            + load_balance_coef * load_balance.
        In training mode with ``head_positions`` set, joint_nll and first_token_nll use a random
        subset of positions (unbiased); load_balance always uses all positions (the gate is cheap).
        """
        T = self._check_idx(idx)
        n, r = self.n_future, self.rank
        hidden = self.hidden(idx[:, :T])  # (B, T, d)
        B, _, d = hidden.shape
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self._frozen):
            logits = self.backbone.logits(hidden)  # (B, T, V)
            next_nll = F.cross_entropy(
                logits.reshape(B * T, -1).float(), idx[:, 1 : T + 1].reshape(-1)
            )
        targets = idx.unfold(1, n, 1)[:, 1 : T + 1].reshape(B * T, n)  # (B*T, n): x_{t+1..t+n}
        h = hidden.reshape(B * T, d)
        log_gate = self.heads.gate_log_probs(h)  # (B*T, r)
        sel = self._sample_positions(B * T, idx.device)
        if sel is not None:
            terms = self.heads.loss_terms(h[sel], targets[sel], log_gate[sel])
        else:
            terms = self.heads.loss_terms(h, targets, log_gate)
        K = terms.log_q.shape[0]
        joint_nll = -terms.log_q_sum / (K * n)
        first_nll = -terms.log_first.mean()
        usage = log_gate.exp().mean(0)  # (r,)
        load_balance = r * (usage**2).sum()
        entropy = -(usage * usage.clamp_min(1e-30).log()).sum()
        total = next_nll + self.joint_weight * joint_nll + self.load_balance_coef * load_balance
        return dict(
            next_token_nll=next_nll,
            joint_nll=joint_nll,
            first_token_nll=first_nll,
            load_balance=load_balance,
            expert_entropy=entropy,
            total=total,
        )

    # ------------------------------------------------------------------ checkpoints
    def save(
        self,
        path,
        tokenizer=None,
        metrics: dict | None = None,
        dtype: torch.dtype = torch.float32,
        extra: dict | None = None,
    ) -> None:
        """Write a checkpoint: config, n_future, rank, head kwargs, weights, tokenizer, metrics
        and the heads' drafting shortlist (``heads.draft_vocab``; restored by :meth:`load`).

        ``tokenizer``: an object with ``to_dict()`` or a dict (or None). ``dtype=torch.float16``
        stores floating weights in half precision (small shipped checkpoints); :meth:`load`
        converts them back to float32.
        """
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(
                f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype}"
            )
        if tokenizer is not None and not isinstance(tokenizer, dict):
            if not hasattr(tokenizer, "to_dict"):
                raise TypeError(
                    f"tokenizer must have to_dict() or be a dict, got {type(tokenizer).__name__}"
                )
            tokenizer = tokenizer.to_dict()
        state = {
            k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu())
            for k, v in self.state_dict().items()
        }
        ckpt = dict(
            format=CHECKPOINT_FORMAT,
            format_version=CHECKPOINT_VERSION,
            config=self.config.to_dict(),
            n_future=self.n_future,
            rank=self.rank,
            head_kwargs=self.head_kwargs(),
            dtype=str(dtype).removeprefix("torch."),
            state_dict=state,
            tokenizer=tokenizer,
            metrics=dict(metrics or {}),
            extra=dict(extra or {}),
            draft_vocab=None if self.heads.draft_vocab is None else self.heads.draft_vocab.tolist(),
        )
        atomic_save(ckpt, path)

    @staticmethod
    def read_checkpoint(path) -> dict:
        """Read and validate a checkpoint file into its dict (weights as stored). Raises
        ValueError naming the file when it is missing, corrupt or not a cptoy MTP checkpoint."""
        path = os.fspath(path)
        ckpt = read_torch_file(path)
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(
                f"checkpoint {path!r} is not a cptoy MTP checkpoint (no format={CHECKPOINT_FORMAT!r} entry)"
            )
        version = ckpt.get("format_version")
        if not isinstance(version, int) or version > CHECKPOINT_VERSION:
            raise ValueError(
                f"checkpoint {path!r} has format_version {version!r}; this cptoy reads <= {CHECKPOINT_VERSION}"
            )
        missing = [
            k for k in ("config", "n_future", "rank", "head_kwargs", "state_dict") if k not in ckpt
        ]
        if missing:
            raise ValueError(f"checkpoint {path!r} lacks the entries {missing}")
        return ckpt

    @classmethod
    def from_checkpoint_dict(cls, ckpt: dict, path: str = "<dict>") -> MTPModel:
        """Build the model recorded in a checkpoint dict and load its weights (as float32)."""
        try:
            config = GPTConfig(**ckpt["config"])
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"checkpoint {path!r} has an invalid config {ckpt['config']!r}: {exc}"
            ) from exc
        known = {
            "load_balance_coef",
            "joint_weight",
            "expert_dim",
            "head_positions",
            "seed",
            "chunk_size",
        }
        kwargs = {k: v for k, v in ckpt["head_kwargs"].items() if k in known}
        try:
            model = cls(config, ckpt["n_future"], ckpt["rank"], **kwargs)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"checkpoint {path!r} records invalid head settings: {exc}") from exc
        model.load_weights(ckpt["state_dict"], source=path)
        if ckpt.get("draft_vocab") is not None:
            try:
                model.heads.set_draft_vocab(ckpt["draft_vocab"])
            except (TypeError, ValueError) as exc:
                raise ValueError(f"checkpoint {path!r} has an invalid draft_vocab: {exc}") from exc
        return model

    def load_weights(self, state: dict, source: str = "<state dict>", prefix: str = "") -> None:
        """Load a (possibly half-precision) state dict, converting to this model's dtypes.

        ``prefix`` restricts loading to keys starting with it (e.g. ``"backbone."``). A missing or
        unexpected key or a shape mismatch raises ValueError naming ``source`` and the keys.
        """
        own = {k: v for k, v in self.state_dict().items() if k.startswith(prefix)}
        theirs = {k: v for k, v in state.items() if k.startswith(prefix)}
        missing = sorted(set(own) - set(theirs))
        unexpected = sorted(set(theirs) - set(own))
        shapes = {
            k: (tuple(theirs[k].shape), tuple(own[k].shape))
            for k in set(own) & set(theirs)
            if tuple(theirs[k].shape) != tuple(own[k].shape)
        }
        if missing or unexpected or shapes:
            parts = []
            if missing:
                parts.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
            if unexpected:
                parts.append(
                    f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
                )
            if shapes:
                parts.append(
                    "shape mismatches "
                    + ", ".join(
                        f"{k}: stored {a} vs model {b}" for k, (a, b) in sorted(shapes.items())[:8]
                    )
                )
            raise ValueError(
                f"{source}: weights do not match the model (n_future={self.n_future}, rank={self.rank}, "
                f"expert_dim={self.expert_dim}, config={self.config}): " + "; ".join(parts)
            )
        with torch.no_grad():
            for k, v in own.items():
                v.copy_(theirs[k].to(v.dtype))

    @classmethod
    def load(cls, path) -> MTPModel:
        """Load a checkpoint written by :meth:`save` (weights in float32, on the CPU).

        The checkpoint's tokenizer dict, metrics and extras are attached as ``model.tokenizer_dict``,
        ``model.metrics`` and ``model.extra`` (``cptoy.train.load_checkpoint`` also rebuilds the
        tokenizer)."""
        path = os.fspath(path)
        ckpt = cls.read_checkpoint(path)
        model = cls.from_checkpoint_dict(ckpt, path)
        model.tokenizer_dict = ckpt.get("tokenizer")
        model.metrics = ckpt.get("metrics") or {}
        model.extra = ckpt.get("extra") or {}
        return model
