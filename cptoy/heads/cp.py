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
  matmul with U. Cost per position: n*r*(d^2 + d*V) multiply-adds forward: the
  straightforward, paper-like structure, expensive when V is large (n*r unembeddings).

* ``expert_dim=e`` ("structured"): one transform per position feeding the full unembedding,
  plus an expert-specific low-rank correction through a small (V, e) output embedding B,

      z_{s,a}(h) = U (h + silu(W_s h + b_s)) + B silu(A_{s,a} h + c_{s,a})

  Cost per position: n*(d^2 + d*V) + n*r*(d*e + e*V). With e << d the expensive part (the n
  full unembeddings) no longer grows with the rank, and in the backward pass the gradient of
  the base logits is summed over experts before it meets U.

Besides the matmuls, both structures need a softmax over V for every (position, expert) pair;
``expert_dim=16`` and ``MTPModel(head_positions=...)`` (the head loss on a seeded random subset
of positions) cut the training cost (``bench/train_overhead.py``).

Both are "identity-initialised": the transforms start at h plus a small random perturbation
(N(0, 0.02) weights), so at initialisation every factor is close to the backbone's own
next-token distribution; the perturbation breaks the symmetry between experts.

Training uses the fused loss of ``cptoy.heads.fused``; decoding drafts through the weight
tables of ``cptoy.heads.fast`` (a mixin of :class:`CPHeads`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from cptoy._checks import check_positive_int
from cptoy.cp import CPDist
from cptoy.heads.drafting import DraftingHeads
from cptoy.heads.fast import CPDraftTables
from cptoy.heads.fused import FusedCPLogProb, HeadTerms

__all__ = ["CPHeads"]

CHUNK_BYTES = 4 * 2**20  # default budget for one chunk's (c, n, r, V) float32 logits (cache-sized)


class CPHeads(CPDraftTables, DraftingHeads):
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
            (c, n, r, V) float32 logits take about 4 MiB: cache-sized).
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
        return max(1, CHUNK_BYTES // per)

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
        total, log_q, log_first = FusedCPLogProb.apply(
            X, U, C, B, lw, targets, self._chunk(), needs
        )
        return HeadTerms(total, log_q, log_first)

    # ------------------------------------------------------------------ drafting
    def draft_posterior(self, hidden: torch.Tensor, first_tokens: torch.Tensor,
                        temperature: float) -> torch.Tensor:
        """log of the posterior gate after x_1: (B, r), from hidden (B, d) and x_1 (B,).

        ``log w_a(h) + log q_{1,a}(x_1)`` normalised over experts, with the position-1 factors
        tempered like the drafts (see :meth:`draft`). Rank 1: zeros (B, 1). Only position 1 is
        computed (r unembeddings, over the shortlist when one is set).
        """
        hidden, first, T, _ = self._check_draft_args(hidden, first_tokens, temperature)
        return self._posterior(hidden, first, T if T > 0 else 1.0)

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

    def _check_experts(self, experts, Bsz: int) -> torch.Tensor:
        if not isinstance(experts, torch.Tensor) or experts.is_floating_point() or \
                experts.dtype == torch.bool:
            raise TypeError("experts must be an int64 tensor (B,) of expert indices or None")
        if tuple(experts.shape) != (Bsz,):
            raise ValueError(f"experts must have shape ({Bsz},), got {tuple(experts.shape)}")
        if experts.numel() and (int(experts.min()) < 0 or int(experts.max()) >= self.rank):
            raise ValueError(f"experts must lie in [0, {self.rank})")
        return experts.long().to(self.transform_weight.device)
