"""``MTPModel`` = a :class:`cptoy.model.GPT` backbone + :class:`cptoy.heads.CPHeads`: the
multi-token loss, backbone freezing, and its checkpoint format (``save`` / ``load``)."""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from cptoy._checks import check_nonneg_number, check_positive_int
from cptoy.cp import CPDist
from cptoy.heads.cp import CPHeads
from cptoy.model import GPT, GPTConfig
from cptoy.persist import atomic_save, read_torch_file

__all__ = ["MTPModel", "check_backbone_config", "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION"]

CHECKPOINT_FORMAT = "cptoy-mtp"  # the "format" entry of every checkpoint written by MTPModel.save
CHECKPOINT_VERSION = 1  # bump when the layout changes; load() refuses newer versions


def check_backbone_config(config) -> None:
    """``config`` must be a :class:`GPTConfig` (a new backbone) or a :class:`GPT` (used as it
    is); TypeError otherwise."""
    if not isinstance(config, (GPT, GPTConfig)):
        raise TypeError(
            f"config must be a GPTConfig or a GPT backbone, got {type(config).__name__}")


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
        check_backbone_config(config)
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
        self.backbone = config if isinstance(config, GPT) else GPT(config)
        config = self.backbone.config
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
