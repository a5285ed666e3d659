"""Backbone-as-Architect MTP heads, the Collocation-Length Predictor (CLP) and a gate network.

Xie & Zhou (arXiv 2606.10935, ``background.md`` section 4) make two claims that this module
turns into code that can be checked on a toy model:

1. **Backbone as architect.** MTP heads that also predict the *first* token compete with the
   backbone's own LM head. So the backbone alone emits the first token ``x_{t+1}`` and the MTP
   heads only the later ones, ``x_{t+2..t+k}``: :class:`ArchitectHeads` has no head for the
   first token at all. (:func:`verifier_free_generate` with ``first="head"`` runs the other
   choice on heads that do have one, for the comparison.)
2. **A Collocation-Length Predictor** replaces verification: one linear layer reads the state
   of a decode step and predicts how many of the k - 1 drafts to accept *without checking
   them* (:class:`CollocationLengthPredictor`). The baseline it replaces is a gate network, an
   MLP of about a million parameters with one accept/reject gate per draft
   (:class:`GateNetwork`).

Heads. ``ArchitectHeads`` read the backbone's hidden state ``h_t`` (after its final LayerNorm)
and give, for s = 2..k, ``logits_s = U (h_t + silu(W_s h_t + b_s))`` with the backbone's tied
unembedding U (shared, not owned): Medusa-style residual heads, identity-initialised. They are
*not* conditioned on the backbone's first token; :meth:`ArchitectHeads.draft` returns a rank-1
``CPDist``, so the same heads also run under cptoy's lossless self-speculative decoding
(``cptoy.decoding.generate(model, ..., strategy="self-spec")``): verification is the third
acceptance rule beside CLP and gates.

Controller features. Both controllers read the same vector of a decode step,
``[h_t, log max p_1, log max q_2, ..., log max q_k]`` (d + k numbers: the hidden state, the
backbone's top-1 log-probability and each draft's top-1 log-probability), built by
:func:`controller_features`.

Labels (:func:`clp_labels`). For a step at position t, the backbone's *greedy continuation*
``g_1..g_k`` is what greedy autoregressive decoding would emit next; the drafts are
``d_2..d_k``. The CLP label is the length of the longest run of drafts, starting at d_2, that
match it: the largest L with ``d_j = g_j`` for all ``j = 2..L+1`` (0..k-1). Accepting exactly
L drafts reproduces greedy decoding; accepting more is an error. The gate network's labels are
the per-draft matches ``1[d_j = g_j]``. :func:`controller_dataset` makes both from greedy
rollouts of the backbone (:func:`greedy_rollouts`): on a greedy rollout the continuation of
every generated position is simply the tokens that follow it.

Decision rules. CLP outputs a distribution over lengths 0..k-1 and accepts
``L = max{l : P(length >= l) >= threshold}`` (threshold 0.5: the median; lower is bolder). The
gate network accepts drafts left to right while ``sigmoid(gate_j) > threshold``.

Verifier-free decoding (:func:`verifier_free_generate`) is *lossy*: nothing checks the accepted
drafts, so the output can differ from greedy decoding. Each step is one forward of the backbone
over the tokens emitted by the previous step (KV cache), so tokens per forward is the mean of
1 + L. :func:`compare_decoders` (``cptoy.benchmark``, re-exported here) measures any set of decoders on the same prompts: tokens per
forward, wall-clock speed-up, agreement with greedy autoregressive output, task accuracy and
the repetition ratio of ``cptoy.evaluate.repetition`` (the fraction of 4-grams that already
occurred earlier in the same output; the paper's own definition is not public).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from cptoy._checks import check_positive_int, check_prompt_ids
from cptoy.benchmark import (  # noqa: F401 (the comparison protocol, re-exported)
    DECODER_COLUMNS,
    LABELS,
    Decoder,
    DecoderRow,
    compare_decoders,
    prefix_agreement,
)
from cptoy.cp import CPDist
from cptoy.model import GPT
from cptoy.speculative import Proposal, propose_from_cp
from cptoy.verifierfree import decode_unverified

__all__ = [
    "ArchitectHeads",
    "CollocationLengthPredictor",
    "GateNetwork",
    "CLPModel",
    "ControllerData",
    "clp_labels",
    "gate_labels",
    "controller_features",
    "greedy_rollouts",
    "controller_dataset",
    "fit_controller",
    "verifier_free_generate",
    "prefix_agreement",
    "Decoder",
    "DecoderRow",
    "compare_decoders",
    "CONTROLLERS",
    "LABELS",
    "DECODER_COLUMNS",
]

CONTROLLERS = ("clp", "gate", "all", "none")


def _check_threshold(threshold, name: str = "threshold") -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(threshold).__name__}")
    t = float(threshold)
    if not (math.isfinite(t) and 0.0 <= t <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {threshold}")
    return t


# ====================================================================== heads
class ArchitectHeads(nn.Module):
    """MTP heads for positions 2..k only: the backbone's own head emits position 1.

    Args:
        d_model: width d of the hidden states.
        vocab_size: V.
        k: tokens per forward at most (the backbone's first token plus k - 1 drafts); k >= 2.
        unembedding: the backbone's (V, d) output matrix, shared (an ``nn.Parameter`` is used by
            reference and not registered; a plain tensor is stored as a fixed buffer).

    Parameters owned: ``(k - 1) * (d * d + d)`` (the transforms).
    """

    def __init__(self, d_model: int, vocab_size: int, k: int,
                 unembedding: nn.Parameter | torch.Tensor):
        super().__init__()
        self.d_model = check_positive_int(d_model, "d_model")
        self.vocab_size = check_positive_int(vocab_size, "vocab_size")
        self.k = check_positive_int(k, "k", minimum=2)
        if not isinstance(unembedding, torch.Tensor):
            raise TypeError(f"unembedding must be a (V, d) tensor, got {type(unembedding).__name__}")
        if tuple(unembedding.shape) != (vocab_size, d_model):
            raise ValueError(f"unembedding must have shape ({vocab_size}, {d_model}), "
                             f"got {tuple(unembedding.shape)}")
        if isinstance(unembedding, nn.Parameter):
            self.__dict__["_shared_unembedding"] = unembedding
        else:
            self.register_buffer("_fixed_unembedding", unembedding.detach().clone(),
                                 persistent=False)
        m, d = k - 1, d_model
        # head s = 2..k: h + silu(W_s h + b_s), all k - 1 transforms in one (m * d, d) weight
        self.transform_weight = nn.Parameter(torch.randn(m * d, d) * 0.02)
        self.transform_bias = nn.Parameter(torch.zeros(m * d))

    @property
    def unembedding(self) -> torch.Tensor:
        u = self.__dict__.get("_shared_unembedding")
        return u if u is not None else self._fixed_unembedding

    @property
    def n_future(self) -> int:
        return self.k

    def num_params(self) -> int:
        """Parameters owned by the heads (the shared unembedding not counted)."""
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, vocab_size={self.vocab_size}, k={self.k}"

    def logits(self, hidden: torch.Tensor, n_draft: int | None = None) -> torch.Tensor:
        """Draft logits (..., m, V) for positions 2..m+1 (m = ``n_draft``, default k - 1)."""
        if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point():
            raise TypeError("hidden must be a floating-point tensor (..., d_model)")
        if hidden.dim() < 1 or hidden.shape[-1] != self.d_model:
            raise ValueError(f"hidden must have last dimension {self.d_model}, "
                             f"got shape {tuple(hidden.shape)}")
        m = self.k - 1 if n_draft is None else n_draft
        if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= self.k - 1:
            raise ValueError(f"n_draft must be an int in [1, {self.k - 1}], got {n_draft}")
        d = self.d_model
        lead = hidden.shape[:-1]
        h = hidden.reshape(-1, d)
        W, b = self.transform_weight[: m * d], self.transform_bias[: m * d]
        X = h.unsqueeze(1) + F.silu(F.linear(h, W, b)).view(-1, m, d)  # (N, m, d)
        z = X @ self.unembedding.t().to(X.dtype)  # (N, m, V)
        return z.view(lead + (m, self.vocab_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`logits` with all k - 1 positions."""
        return self.logits(hidden)

    def draft(self, hidden: torch.Tensor, first_tokens: torch.Tensor, temperature: float,
              n_draft: int | None = None) -> CPDist:
        """The drafts of one decode step as a rank-1 CPDist over positions 2..m+1.

        hidden (B, d); ``first_tokens`` (B,) is accepted for interface compatibility with
        ``CPHeads.draft`` and ignored (these heads are not conditioned on x_1); temperature
        > 0 tempers the logits, 0 leaves them untempered (greedy drafting uses ``.mode()``).
        Returns a CPDist with batch (B,), n = m, rank 1.
        """
        if hidden.dim() != 2:
            raise ValueError(f"hidden must be (B, d), got shape {tuple(hidden.shape)}")
        if not isinstance(first_tokens, torch.Tensor) or first_tokens.shape != hidden.shape[:1]:
            raise ValueError(f"first_tokens must be a ({hidden.shape[0]},) tensor")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
                math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
        z = self.logits(hidden, n_draft).float()  # (B, m, V)
        if temperature > 0 and temperature != 1.0:
            z = z / temperature
        lf = torch.log_softmax(z, dim=-1).unsqueeze(-2)  # (B, m, 1, V)
        return CPDist(lf.new_zeros(hidden.shape[0], 1), lf)

    routings = ("mixture",)  # one factor per position: nothing to route

    @torch.no_grad()
    def propose(self, hidden: torch.Tensor, x1: int, k: int, temperature: float,
                generator: torch.Generator | None = None, routing: str = "mixture") -> Proposal:
        """The drafting protocol of ``cptoy.speculative`` (self-speculative decoding): k drafts
        from the (tempered) factors of positions 2..k+1, which ignore x1; q is those factors."""
        first = torch.tensor([x1], dtype=torch.long, device=hidden.device)
        dist = self.draft(hidden, first, temperature if temperature > 0 else 1.0, n_draft=k)
        return propose_from_cp(dist[0], k, temperature, generator)

    @classmethod
    def from_cp_heads(cls, cp_heads) -> ArchitectHeads:
        """Copy positions 2..n of rank-1 "full" ``CPHeads`` (same structure, head 1 dropped).

        The unembedding is shared with ``cp_heads``' (its backbone's). Only rank 1 with
        ``expert_dim=None`` has this structure; anything else raises ValueError."""
        if getattr(cp_heads, "rank", None) != 1 or getattr(cp_heads, "expert_dim", 0) is not None:
            raise ValueError("from_cp_heads needs rank-1 CPHeads with expert_dim=None")
        n, d = cp_heads.n_future, cp_heads.d_model
        if n < 2:
            raise ValueError("cp_heads must have n_future >= 2")
        new = cls(d, cp_heads.vocab_size, n, cp_heads.unembedding)
        with torch.no_grad():
            new.transform_weight.copy_(cp_heads.transform_weight[d:])
            new.transform_bias.copy_(cp_heads.transform_bias[d:])
        return new


# ====================================================================== controllers
class _Controller(nn.Module):
    """Shared by the CLP and the gate baseline: ``k`` and the feature standardisation buffers."""

    def __init__(self, in_features: int, k: int):
        super().__init__()
        self.in_features = check_positive_int(in_features, "in_features")
        self.k = check_positive_int(k, "k", minimum=2)
        # feature standardisation while training (the CLP folds it away: fold_normaliser)
        self.register_buffer("feature_mean", torch.zeros(in_features))
        self.register_buffer("feature_std", torch.ones(in_features))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def set_normaliser(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std)

    def standardise(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.feature_mean) / self.feature_std


class CollocationLengthPredictor(_Controller):
    """ONE linear layer: controller features (..., F) -> logits (..., k) over lengths 0..k-1.

    Parameters: ``F * k + k`` (F = d + k with :func:`controller_features`; for d = 128, k = 4:
    132 * 4 + 4 = 532). The paper's are 4.6K-7.7K on Qwen2.5 models.
    """

    def __init__(self, in_features: int, k: int):
        super().__init__(in_features, k)
        self.linear = nn.Linear(in_features, k)  # classes: accept 0, 1, .., k - 1 drafts

    @torch.no_grad()
    def fold_normaliser(self) -> None:
        """Fold the standardisation into the linear layer: W' = W / std, b' = b - W' mean.
        Afterwards the CLP is exactly one ``nn.Linear`` on raw features."""
        w = self.linear.weight / self.feature_std  # (k, F)
        self.linear.bias.sub_(w @ self.feature_mean)
        self.linear.weight.copy_(w)
        self.feature_mean.zero_()
        self.feature_std.fill_(1.0)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.standardise(features))

    def loss(self, features: torch.Tensor, labels: torch.Tensor, token_labels=None):
        """Cross-entropy against the run lengths (N,) in 0..k-1."""
        return F.cross_entropy(self(features), labels)

    @torch.no_grad()
    def predict(self, features: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
        """Drafts to accept (...,) int64 in [0, k - 1]: the largest L with
        ``P(length >= L) >= threshold`` (L = 0 always qualifies)."""
        t = _check_threshold(threshold)
        p = torch.softmax(self(features).float(), dim=-1)  # (..., k)
        tail = p.flip(-1).cumsum(-1).flip(-1)  # (..., k): P(length >= l)
        ok = tail >= t - 1e-12
        ok[..., 0] = True
        return (ok.long() * torch.arange(self.k, device=p.device)).amax(-1)


class GateNetwork(_Controller):
    """The gate-network baseline: an MLP with one accept/reject gate per draft.

    ``in -> hidden -> hidden -> k - 1`` with GELU. ``hidden=None`` picks the width that gives
    about ``target_params`` parameters (default one million, the size the CLP paper compares
    against). Drafts are accepted left to right while ``sigmoid(gate_j) > threshold``.
    """

    def __init__(self, in_features: int, k: int, hidden: int | None = None,
                 target_params: int = 1_000_000):
        super().__init__(in_features, k)
        if hidden is None:
            check_positive_int(target_params, "target_params")
            # params = w^2 + (in + k + 1) w + (k - 1)  ->  solve for w
            b = in_features + k + 1
            hidden = max(1, round((-b + math.sqrt(b * b + 4 * target_params)) / 2))
        self.hidden = check_positive_int(hidden, "hidden")
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden), nn.GELU(),
            nn.Linear(hidden, hidden), nn.GELU(),
            nn.Linear(hidden, k - 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(self.standardise(features))  # (..., k - 1) gate logits

    def loss(self, features: torch.Tensor, labels=None, token_labels: torch.Tensor = None):
        """Binary cross-entropy against the per-draft matches ``token_labels`` (N, k - 1)."""
        if token_labels is None:
            raise ValueError("the gate network trains on token_labels (N, k - 1), got None")
        return F.binary_cross_entropy_with_logits(self(features), token_labels.float())

    @torch.no_grad()
    def predict(self, features: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
        """Drafts to accept (...,) int64 in [0, k - 1]: leading gates with sigmoid > threshold."""
        t = _check_threshold(threshold)
        ok = torch.sigmoid(self(features).float()) > t  # (..., k - 1)
        return ok.long().cumprod(-1).sum(-1)


# ====================================================================== labels and features
def _check_token_pair(a, b, name_a: str, name_b: str) -> tuple[torch.Tensor, torch.Tensor]:
    for t, name in ((a, name_a), (b, name_b)):
        if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.dim() != 2:
            raise ValueError(f"{name} must be a (N, m) integer tensor")
    if a.shape != b.shape:
        raise ValueError(f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must match")
    return a, b


def clp_labels(drafts: torch.Tensor, continuation: torch.Tensor) -> torch.Tensor:
    """CLP labels: the length of the leading run of drafts equal to the greedy continuation.

    drafts (N, m) = d_2..d_{m+1}; continuation (N, m) = the backbone's greedy g_2..g_{m+1}.
    Returns (N,) int64 in [0, m]: the largest L with d_j = g_j for the first L drafts.

    >>> clp_labels(torch.tensor([[5, 6, 7], [5, 9, 7], [1, 2, 3]]),
    ...            torch.tensor([[5, 6, 7], [5, 6, 7], [4, 2, 3]])).tolist()
    [3, 1, 0]
    """
    drafts, continuation = _check_token_pair(drafts, continuation, "drafts", "continuation")
    return (drafts == continuation).long().cumprod(1).sum(1)


def gate_labels(drafts: torch.Tensor, continuation: torch.Tensor) -> torch.Tensor:
    """Per-draft labels of the gate network: (N, m) float, 1 where d_j = g_j."""
    drafts, continuation = _check_token_pair(drafts, continuation, "drafts", "continuation")
    return (drafts == continuation).float()


def controller_features(hidden: torch.Tensor, first_logits: torch.Tensor,
                        draft_logits: torch.Tensor) -> torch.Tensor:
    """Features of a decode step: ``[h, log max p_1, log max q_2, .., log max q_k]``.

    hidden (N, d), first_logits (N, V) (the backbone's), draft_logits (N, m, V) (the heads').
    Returns (N, d + 1 + m) float32.
    """
    if hidden.dim() != 2 or first_logits.dim() != 2 or draft_logits.dim() != 3:
        raise ValueError("expected hidden (N, d), first_logits (N, V), draft_logits (N, m, V)")
    lp1 = torch.log_softmax(first_logits.float(), -1).amax(-1, keepdim=True)  # (N, 1)
    lpd = torch.log_softmax(draft_logits.float(), -1).amax(-1)  # (N, m)
    return torch.cat([hidden.float(), lp1, lpd], dim=-1)


# ====================================================================== the model
class CLPModel(nn.Module):
    """A frozen GPT backbone + :class:`ArchitectHeads` + a CLP + a gate network.

    ``n_future = k``, ``.backbone`` and ``.heads.draft`` make it usable by
    ``cptoy.decoding.generate`` (``"ar"``, ``"lookup"`` and lossless ``"self-spec"`` with these
    heads) and by ``cptoy.train.train`` (its :meth:`loss` trains the heads only).

    Args:
        backbone: a trained ``GPT``; it is frozen here (``requires_grad=False``, eval mode).
        k: tokens per forward at most (the backbone's token plus k - 1 drafts).
        gate_hidden: width of the gate network (None: about 1M parameters).
        head_positions: train the heads on this many random positions per batch (None: all).
        seed: seeds the head-position sampler.
    """

    def __init__(self, backbone: GPT, k: int = 4, gate_hidden: int | None = None,
                 head_positions: int | None = None, seed: int = 0):
        super().__init__()
        if not isinstance(backbone, GPT):
            raise TypeError(f"backbone must be a cptoy.model.GPT, got {type(backbone).__name__}")
        check_positive_int(k, "k", minimum=2)
        if head_positions is not None:
            check_positive_int(head_positions, "head_positions")
        self.backbone = backbone
        for p in backbone.parameters():
            p.requires_grad_(False)
        c = backbone.config
        self.n_future = k
        self.head_positions = head_positions
        self.heads = ArchitectHeads(c.n_embd, c.vocab_size, k, backbone.unembedding)
        nf = c.n_embd + k
        self.clp = CollocationLengthPredictor(nf, k)
        self.gate = GateNetwork(nf, k, hidden=gate_hidden)
        self._sampler = torch.Generator().manual_seed(seed)
        self.backbone.eval()

    @property
    def config(self):
        return self.backbone.config

    @property
    def k(self) -> int:
        return self.n_future

    def train(self, mode: bool = True) -> CLPModel:
        super().train(mode)
        self.backbone.eval()  # frozen: never dropout
        return self

    def controller(self, name: str) -> nn.Module:
        if name == "clp":
            return self.clp
        if name == "gate":
            return self.gate
        raise ValueError(f"controller must be 'clp' or 'gate', got {name!r}")

    def loss(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cross-entropy of the heads on a batch idx (B, T + k): head s (= 2..k) at position t
        predicts ``idx[:, t + s]``. Returns ``total`` (mean over heads) and ``nll_s`` per head.
        The backbone runs under no_grad."""
        k = self.k
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.shape[1] <= k:
            raise ValueError(f"idx must be a (B, T + k) tensor with T >= 1 (k={k})")
        T = idx.shape[1] - k
        if T > self.config.block_size:
            raise ValueError(f"idx holds T = {T} context tokens > block_size "
                             f"{self.config.block_size}")
        with torch.no_grad():
            H = self.backbone(idx[:, :T])  # (B, T, d)
        B, _, d = H.shape
        tgt = idx.unfold(1, k, 1)[:, 1:T + 1, 1:]  # (B, T, k - 1): x_{t+2..t+k}
        h, tgt = H.reshape(B * T, d), tgt.reshape(B * T, k - 1)
        if self.training and self.head_positions is not None and self.head_positions < B * T:
            sel = torch.randperm(B * T, generator=self._sampler)[: self.head_positions]
            h, tgt = h[sel], tgt[sel]
        z = self.heads(h).float()  # (N, k - 1, V)
        nll = F.cross_entropy(z.reshape(-1, z.shape[-1]), tgt.reshape(-1),
                              reduction="none").view(-1, k - 1).mean(0)  # (k - 1,)
        out = {"total": nll.mean()}
        for s in range(k - 1):
            out[f"nll_{s + 2}"] = nll[s].detach()
        return out

    def forward(self, idx):
        return self.loss(idx)


# ====================================================================== controller data
@torch.no_grad()
def greedy_rollouts(backbone: GPT, prompts: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy autoregressive continuations of a batch of prompts (batched, KV cache).

    prompts (B, P) int64; returns (B, P + steps) = prompts followed by the greedy tokens.
    """
    if not isinstance(prompts, torch.Tensor) or prompts.dim() != 2 or prompts.is_floating_point():
        raise ValueError("prompts must be a (B, P) integer tensor")
    check_positive_int(steps, "steps")
    B, P = prompts.shape
    if P + steps > backbone.config.block_size:
        raise ValueError(f"P + steps = {P + steps} exceeds block_size {backbone.config.block_size}")
    was = backbone.training
    backbone.eval()
    try:
        cache = backbone.new_cache(B)
        H = backbone(prompts, cache)
        out = [prompts]
        nxt = backbone.logits(H[:, -1]).argmax(-1, keepdim=True)  # (B, 1)
        for i in range(steps):
            out.append(nxt)
            if i + 1 < steps:
                nxt = backbone.logits(backbone(nxt, cache)[:, -1]).argmax(-1, keepdim=True)
    finally:
        backbone.train(was)
    return torch.cat(out, dim=1)


@dataclass
class ControllerData:
    """Training data of the controllers, one row per decode position."""

    features: torch.Tensor  # (N, d + k) controller_features
    labels: torch.Tensor  # (N,) CLP labels: leading run length in 0..k-1
    token_labels: torch.Tensor  # (N, k - 1) gate labels: per-draft match with greedy
    drafts: torch.Tensor = field(repr=False)  # (N, k - 1) the drafts
    continuation: torch.Tensor = field(repr=False)  # (N, k - 1) greedy g_2..g_k

    def __len__(self) -> int:
        return self.labels.numel()

    def split(self, frac: float = 0.8) -> tuple[ControllerData, ControllerData]:
        """The first ``frac`` of rows and the rest (rows are in rollout order)."""
        n = max(1, min(len(self) - 1, round(frac * len(self))))
        a = ControllerData(*(t[:n] for t in self._tensors()))
        b = ControllerData(*(t[n:] for t in self._tensors()))
        return a, b

    def _tensors(self):
        return (self.features, self.labels, self.token_labels, self.drafts, self.continuation)


def _drafts_and_logits(model, H: torch.Tensor, first: torch.Tensor, k: int):
    """Greedy drafts (N, k-1) and their logits (N, k-1, V) from the heads at hidden H (N, d)."""
    heads = model.heads
    if isinstance(heads, ArchitectHeads):
        z = heads.logits(H, k - 1)  # (N, k - 1, V)
        return z.argmax(-1), z
    dist = heads.draft(H, first, 1.0, n_draft=k - 1)  # CPDist (N,), positions 2..k
    drafts = dist.mode()  # (N, k - 1)
    z = torch.stack([dist.log_marginal(j) for j in range(k - 1)], dim=1)  # (N, k - 1, V)
    return drafts, z


@torch.no_grad()
def controller_dataset(model, rollouts: torch.Tensor, prompt_len: int,
                       chunk: int = 1024) -> ControllerData:
    """Features and labels at every generated position of greedy ``rollouts`` (B, L).

    Position t (0-based) is used when ``t + 1 >= prompt_len`` (its next token is generated)
    and ``t + k < L`` (the whole greedy continuation g_1..g_k is in the rollout). The
    continuation is read from the rollout itself: g_j = rollouts[:, t + j].
    """
    k = model.n_future
    bb = model.backbone
    if not isinstance(rollouts, torch.Tensor) or rollouts.dim() != 2:
        raise ValueError("rollouts must be a (B, L) integer tensor")
    B, L = rollouts.shape
    check_positive_int(prompt_len, "prompt_len")
    ts = torch.arange(max(prompt_len - 1, 0), L - k)  # (m,)
    if ts.numel() == 0:
        raise ValueError(f"rollouts of length {L} have no position with a full continuation "
                         f"after prompt_len {prompt_len} (k = {k})")
    bb.eval()
    H = bb(rollouts)  # (B, L, d)
    h = H[:, ts].reshape(-1, H.shape[-1])  # (N, d)
    first = rollouts[:, ts + 1].reshape(-1)  # (N,) g_1
    cont = rollouts[:, ts[:, None] + torch.arange(2, k + 1)].reshape(-1, k - 1)  # (N, k - 1)
    feats, drafts = [], []
    for lo in range(0, h.shape[0], chunk):
        hc = h[lo:lo + chunk]
        d, z = _drafts_and_logits(model, hc, first[lo:lo + chunk], k)
        feats.append(controller_features(hc, bb.logits(hc), z))
        drafts.append(d)
    drafts = torch.cat(drafts)
    return ControllerData(torch.cat(feats), clp_labels(drafts, cont), gate_labels(drafts, cont),
                          drafts, cont)


def fit_controller(controller: nn.Module, data: ControllerData, steps: int = 300,
                   batch_size: int = 256, lr: float = 3e-3, weight_decay: float = 0.0,
                   seed: int = 0) -> list[float]:
    """Train a CLP or gate network on ``data`` with AdamW (full-batch when smaller than
    ``batch_size``). Features are standardised by statistics stored in the controller
    (``feature_mean``/``feature_std`` buffers) so that the raw features can be passed at
    inference (the CLP folds them into its linear layer afterwards). Returns the loss history."""
    check_positive_int(steps, "steps")
    check_positive_int(batch_size, "batch_size")
    if len(data) == 0:
        raise ValueError("data is empty")
    X = data.features
    controller.set_normaliser(X.mean(0), X.std(0).clamp_min(1e-4))
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(controller.parameters(), lr=lr, weight_decay=weight_decay)
    hist = []
    controller.train()
    for _ in range(steps):
        idx = torch.randint(0, len(data), (min(batch_size, len(data)),), generator=g)
        loss = controller.loss(X[idx], data.labels[idx], data.token_labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        hist.append(loss.item())
    controller.eval()
    if hasattr(controller, "fold_normaliser"):
        controller.fold_normaliser()
    return hist


# ====================================================================== decoding
class _ControllerRule:
    """The rule of :func:`verifier_free_generate` for ``cptoy.verifierfree.decode_unverified``:
    x_1 and the greedy drafts after it, of which the controller keeps L."""

    def __init__(self, model, controller: str, first: str, threshold: float, m: int):
        self.model, self.bb, self.first, self.threshold, self.m = (
            model, model.backbone, first, threshold, m)
        self.controller = controller
        self.ctrl = model.controller(controller) if controller in ("clp", "gate") else None

    def forward(self, chunk: list[int], cache, room: int):
        h = self.bb(torch.tensor([chunk], dtype=torch.long), cache)[:, -1]  # (1, d)
        return h, self.bb.logits(h)  # (1, V)

    def choose(self, state, room: int) -> tuple[list[int], int]:
        h, lg = state
        if self.first == "backbone":
            x1 = int(lg[0].argmax())
        else:
            x1 = int(self.model.heads(h).log_marginal(0)[0].argmax())
        if room < 2 or self.controller == "none":
            return [x1], 0
        d, z = _drafts_and_logits(self.model, h, torch.tensor([x1]), self.m + 1)
        drafts = d[0].tolist()
        if self.ctrl is not None:
            L = int(self.ctrl.predict(controller_features(h, lg, z), self.threshold)[0])
        else:
            L = self.m
        return [x1] + drafts[: min(L, room - 1)], len(drafts)


@torch.no_grad()
def verifier_free_generate(model, prompt_ids, max_new_tokens: int, controller: str = "clp",
                           first: str = "backbone", threshold: float = 0.5,
                           n_draft: int | None = None, eos_id: int | None = None):
    """Greedy verifier-free multi-token decoding (lossy): no draft is ever checked.

    Each step runs one backbone forward over the tokens the previous step emitted (the prompt
    at first; KV cache) and, at its last position, takes

    * x_1: the backbone's argmax (``first="backbone"``, Backbone-as-Architect) or the argmax of
      the heads' own first-token marginal (``first="head"``; needs heads with a first position,
      e.g. ``CPHeads``; drafts then follow the head's x_1);
    * drafts d_2..d_{m+1} (m = ``n_draft``, default k - 1): the heads' greedy drafts after x_1;
    * L drafts accepted: ``controller`` = "clp" (:class:`CollocationLengthPredictor`), "gate"
      (:class:`GateNetwork`), "all" (L = m) or "none" (L = 0: plain greedy decoding).

    and emits ``[x_1, d_2..d_{L+1}]`` (cut at ``max_new_tokens`` and after ``eos_id``).
    model: a :class:`CLPModel` (any controller) or an ``MTPModel`` ("all"/"none").
    Returns a ``cptoy.decoding.Generation`` from ``cptoy.verifierfree.decode_unverified``:
    stats count forwards, tokens gained per forward, drafts offered (``drafted_per_step``) and
    kept, and time in forwards (``prefill_time``/``verify_time``) and in heads + controller
    (``draft_time``).
    """
    if controller not in CONTROLLERS:
        raise ValueError(f"controller must be one of {CONTROLLERS}, got {controller!r}")
    if first not in ("backbone", "head"):
        raise ValueError(f"first must be 'backbone' or 'head', got {first!r}")
    threshold = _check_threshold(threshold)
    bb = model.backbone
    k = getattr(model, "n_future", None)
    if k is None or k < 2 or getattr(model, "heads", None) is None:
        raise TypeError("model must have MTP heads (model.heads) and n_future >= 2")
    m = k - 1 if n_draft is None else n_draft
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= k - 1:
        raise ValueError(f"n_draft must be an int in [1, {k - 1}], got {n_draft}")
    if controller in ("clp", "gate") and m != k - 1:
        raise ValueError("the CLP and gate controllers were trained with n_draft = k - 1")
    if controller in ("clp", "gate") and not hasattr(model, "controller"):
        raise TypeError(f"controller {controller!r} needs a CLPModel (model.controller)")
    if first == "head" and isinstance(model.heads, ArchitectHeads):
        raise ValueError("ArchitectHeads have no head for the first token; first='head' needs "
                         "heads with a first position (CPHeads)")
    check_positive_int(max_new_tokens, "max_new_tokens")
    prompt = check_prompt_ids(prompt_ids, bb.config.vocab_size)
    if len(prompt) + max_new_tokens > bb.config.block_size:
        raise ValueError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"block_size {bb.config.block_size}")
    rule = _ControllerRule(model, controller, first, threshold, m)
    return decode_unverified(model, bb, prompt, max_new_tokens, rule,
                             f"verifier-free/{controller}/{first}", 0.0, m, eos_id)
