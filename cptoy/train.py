"""Training: a plain loop (AdamW, warm-up + cosine, clipping, validation, budgets) and checkpoints.

The loop is deliberately nanoGPT-plain: sample a batch of random windows, ``model.loss``,
backward, clip, step. The same :func:`train` trains everything from scratch or, when the model's
backbone is frozen (``MTPModel(..., freeze_backbone=True)``), only the heads.

Determinism: ``TrainConfig.seed`` seeds torch (parameter-free randomness such as dropout) and
the batch generator, and the model's head-position sampler has its own seed, so a run with a
*step* budget is reproducible on the same machine. With a *time* budget the schedule follows the
elapsed time (the cosine reaches its end when the budget is spent), so the number of steps and
the learning rates depend on the machine's speed.

Hook for later objectives: ``train(..., loss_fn=f)`` replaces ``model.loss`` by
``f(model, batch) -> dict`` with a ``"total"`` entry (e.g. distilling the heads towards the
backbone's next-token distributions on a frozen backbone).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from cptoy._checks import check_nonneg_number, check_positive_int
from cptoy.data import TokenDataset, tokenizer_from_dict
from cptoy.heads import MTPModel

__all__ = [
    "TrainConfig",
    "train",
    "evaluate_loss",
    "lr_at",
    "resolve_device",
    "save_checkpoint",
    "load_checkpoint",
    "init_backbone",
    "Checkpoint",
    "LOSS_KEYS",
]

LOSS_KEYS = (
    "total",
    "next_token_nll",
    "joint_nll",
    "first_token_nll",
    "load_balance",
    "expert_entropy",
)


@dataclass
class TrainConfig:
    """Settings of one training run. At least one of ``steps`` and ``minutes`` must be set."""

    steps: int | None = 1000  # optimizer steps (None: run until the time budget is spent)
    minutes: float | None = None  # wall-clock budget in minutes (None: only the step budget)
    batch_size: int = 16  # sequences per batch
    block_size: int | None = None  # context length T per sequence (None: the model's block_size)
    lr: float = 2e-3  # peak learning rate (after warm-up)
    min_lr: float = 2e-4  # learning rate at the end of the cosine
    weight_decay: float = 0.1  # AdamW decoupled weight decay on matrices (not biases, norms, gains)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    warmup: int = 50  # linear warm-up steps from lr / warmup to lr
    cosine: bool = True  # cosine decay from lr to min_lr over the budget (False: constant lr)
    grad_clip: float | None = 1.0  # clip the global gradient norm to this (None: no clipping)
    eval_every: int = 200  # validate every this many steps (and once at the end)
    eval_batches: int = 8  # validation batches per evaluation (blocks spread over the val ids)
    log_every: int = 10  # record training losses in the history every this many steps
    seed: int = 0  # seeds torch and the batch sampler
    device: str = "auto"  # "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:1", ...
    bytes_per_token: float | None = None  # UTF-8 bytes per token of the data, for nats per byte

    def __post_init__(self):
        if self.steps is None and self.minutes is None:
            raise ValueError("TrainConfig needs a budget: set steps, minutes or both")
        if self.steps is not None:
            check_positive_int(self.steps, "steps")
        if self.minutes is not None and not (
            isinstance(self.minutes, (int, float))
            and not isinstance(self.minutes, bool)
            and math.isfinite(self.minutes)
            and self.minutes > 0
        ):
            raise ValueError(f"minutes must be a positive number, got {self.minutes!r}")
        for name in ("batch_size", "eval_every", "eval_batches", "log_every"):
            check_positive_int(getattr(self, name), name)
        check_positive_int(self.warmup, "warmup", minimum=0)
        if self.block_size is not None:
            check_positive_int(self.block_size, "block_size")
        for name in ("lr", "min_lr", "weight_decay"):
            check_nonneg_number(getattr(self, name), name)
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip}")
        if self.bytes_per_token is not None and not self.bytes_per_token > 0:
            raise ValueError(f"bytes_per_token must be > 0 or None, got {self.bytes_per_token}")


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> cuda if available else cpu; anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:i]', got {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available")
    return dev


def next_token_step(model, opt, blk: torch.Tensor, grad_clip: float = 1.0) -> torch.Tensor:
    """One optimiser step of a plain GPT on next-token loss. blk (B, T + 1) -> the loss."""
    logits = model.logits(model(blk[:, :-1]))  # (B, T, V)
    loss = F.cross_entropy(logits.flatten(0, 1), blk[:, 1:].flatten())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return loss.detach()


def lr_at(cfg: TrainConfig, step: int, progress: float) -> float:
    """Learning rate at ``step`` (0-based) with ``progress`` in [0, 1] of the budget spent.

    Linear warm-up over ``cfg.warmup`` steps, then cosine from ``lr`` to ``min_lr`` as progress
    goes from the end of warm-up to 1 (or constant ``lr`` when ``cosine`` is False).
    """
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if not cfg.cosine:
        return cfg.lr
    p = min(max(progress, 0.0), 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * p))


def _as_ids(ids, name: str) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        try:
            ids = torch.as_tensor(ids)
        except Exception as exc:
            raise TypeError(f"{name} must be a 1-D tensor of token ids") from exc
    if ids.dim() != 1 or ids.is_floating_point():
        raise ValueError(
            f"{name} must be a 1-D integer tensor of token ids, got shape {tuple(ids.shape)} {ids.dtype}"
        )
    return ids.long()


def _block(model: MTPModel, block_size: int | None) -> int:
    T = model.config.block_size if block_size is None else block_size
    if T > model.config.block_size:
        raise ValueError(f"block_size {T} exceeds the model's block_size {model.config.block_size}")
    return T


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def evaluate_loss(
    model: MTPModel,
    ids,
    batch_size: int = 16,
    block_size: int | None = None,
    max_batches: int | None = 8,
    bytes_per_token: float | None = None,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Mean losses of ``model.loss`` on validation blocks of ``ids`` (1-D token ids).

    Blocks are non-overlapping windows of T + n tokens (T = ``block_size``, default the model's),
    ``max_batches * batch_size`` of them spread evenly over ``ids`` (all when None), so the
    numbers are deterministic and do not all come from the first document. The model runs in
    eval mode (all positions, no dropout) and its mode is restored. Returns the mean of every
    loss term; with ``bytes_per_token`` also ``next_token_nats_per_byte``,
    ``joint_nats_per_byte`` and ``first_token_nats_per_byte`` (nats per token / bytes per token).
    """
    ids = _as_ids(ids, "ids")
    T = _block(model, block_size)
    L = T + model.n_future
    n_blocks = ids.numel() // L
    if n_blocks == 0:
        raise ValueError(f"ids hold {ids.numel()} tokens, fewer than one block of T + n = {L}")
    check_positive_int(batch_size, "batch_size")
    blocks = ids[: n_blocks * L].view(n_blocks, L)
    if max_batches is not None:
        check_positive_int(max_batches, "max_batches")
        k = min(n_blocks, max_batches * batch_size)
        pick = torch.linspace(0, n_blocks - 1, k).round().long().unique()
        blocks = blocks[pick]
    dev = next(model.parameters()).device if device is None else torch.device(device)
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    count = 0
    try:
        for lo in range(0, blocks.shape[0], batch_size):
            batch = blocks[lo : lo + batch_size].to(dev)
            with _autocast(dev):
                out = model.loss(batch)
            w = batch.shape[0]
            for key, v in out.items():
                sums[key] = sums.get(key, 0.0) + float(v) * w
            count += w
    finally:
        model.train(was_training)
    res = {k: v / count for k, v in sums.items()}
    if bytes_per_token:
        res["next_token_nats_per_byte"] = res["next_token_nll"] / bytes_per_token
        res["joint_nats_per_byte"] = res["joint_nll"] / bytes_per_token
        res["first_token_nats_per_byte"] = res["first_token_nll"] / bytes_per_token
    return res


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def train(
    model: MTPModel,
    train_ids,
    val_ids,
    cfg: TrainConfig,
    progress: bool = True,
    loss_fn: Callable[[MTPModel, torch.Tensor], dict] | None = None,
    callback: Callable[[int, dict], None] | None = None,
) -> dict:
    """Train ``model`` on random windows of ``train_ids``; validate on ``val_ids`` (or None).

    Each step: B = ``cfg.batch_size`` random windows of T + n tokens (T = ``cfg.block_size``,
    n = ``model.n_future``), loss = ``loss_fn(model, batch)["total"]`` (default ``model.loss``),
    backward, gradient clipping, AdamW step with the scheduled learning rate. A frozen backbone
    stays frozen: only parameters with ``requires_grad`` are optimised. On CUDA the forward runs
    under bf16 autocast. ``callback(step, record)`` is called at every logged step.

    Returns the history: ``{"train": [records], "val": [records], "steps", "seconds", "tokens",
    "tokens_per_s", "device", "config"}``; a record holds ``step``, ``tokens``, ``seconds``, ``lr``
    and the losses (validation records: the output of :func:`evaluate_loss`).
    """
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "n_future"):
        raise TypeError(f"model must be an MTPModel, got {type(model).__name__}")
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    train_ids = _as_ids(train_ids, "train_ids")
    val_ids = None if val_ids is None else _as_ids(val_ids, "val_ids")
    T = _block(model, cfg.block_size)
    L = T + model.n_future
    if train_ids.numel() < L:
        raise ValueError(
            f"train_ids hold {train_ids.numel()} tokens, fewer than one block of T + n = {L}"
        )
    V = model.config.vocab_size
    if int(train_ids.max()) >= V or int(train_ids.min()) < 0:
        raise ValueError(f"train_ids hold ids outside the model's vocabulary [0, {V})")

    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model.to(device)
    model.train()
    data = TokenDataset(train_ids)
    gen = torch.Generator().manual_seed(cfg.seed)
    groups = _param_groups(model, cfg.weight_decay)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
    params = [p for g in groups for p in g["params"]]
    loss_fn = loss_fn or (lambda m, b: m.loss(b))
    budget_s = None if cfg.minutes is None else 60.0 * cfg.minutes

    history: dict = dict(
        train=[],
        val=[],
        steps=0,
        seconds=0.0,
        tokens=0,
        tokens_per_s=float("nan"),
        device=str(device),
        config=asdict(cfg),
    )
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=cfg.steps,
            unit="step",
            dynamic_ncols=True,
            desc=f"train r={getattr(model, 'rank', '?')} n={model.n_future}",
        )

    def run_eval(step: int, elapsed: float) -> dict:
        rec = evaluate_loss(
            model, val_ids, cfg.batch_size, T, cfg.eval_batches, cfg.bytes_per_token, device
        )
        rec = dict(step=step, tokens=step * cfg.batch_size * T, seconds=elapsed, **rec)
        history["val"].append(rec)
        return rec

    t0 = time.perf_counter()
    step = 0
    train_seconds = 0.0
    last_val = None
    try:
        while True:
            elapsed = time.perf_counter() - t0
            if cfg.steps is not None and step >= cfg.steps:
                break
            if budget_s is not None and elapsed >= budget_s:
                break
            frac = 0.0
            if cfg.steps is not None:
                frac = step / cfg.steps
            if budget_s is not None:
                frac = max(frac, elapsed / budget_s)
            lr = lr_at(cfg, step, frac)
            for g in opt.param_groups:
                g["lr"] = lr
            ts = time.perf_counter()
            batch = data.batch(cfg.batch_size, L, gen).to(device)  # (B, T + n)
            with _autocast(device):
                out = loss_fn(model, batch)
            loss = out["total"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the training loss is {float(loss)} at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            train_seconds += time.perf_counter() - ts
            step += 1
            if step % cfg.log_every == 0 or step == 1:
                rec = dict(
                    step=step,
                    tokens=step * cfg.batch_size * T,
                    seconds=time.perf_counter() - t0,
                    lr=lr,
                    **{k: float(v.detach()) for k, v in out.items()},
                )
                history["train"].append(rec)
                if callback is not None:
                    callback(step, rec)
                if bar is not None:
                    post = {"loss": f"{rec['total']:.3f}"}
                    for k, short in (("next_token_nll", "next"), ("joint_nll", "joint")):
                        if k in rec:
                            post[short] = f"{rec[k]:.3f}"
                    if last_val is not None:
                        post["val_joint"] = f"{last_val['joint_nll']:.3f}"
                    bar.set_postfix(post, refresh=False)
            if bar is not None:
                bar.update(1)
            if val_ids is not None and step % cfg.eval_every == 0:
                last_val = run_eval(step, time.perf_counter() - t0)
        if val_ids is not None and (not history["val"] or history["val"][-1]["step"] != step):
            last_val = run_eval(step, time.perf_counter() - t0)
    finally:
        if bar is not None:
            bar.close()
    history["steps"] = step
    history["seconds"] = time.perf_counter() - t0
    history["train_seconds"] = train_seconds
    history["tokens"] = step * cfg.batch_size * T
    history["tokens_per_s"] = (
        history["tokens"] / train_seconds if train_seconds > 0 else float("nan")
    )
    return history


# ============================================================================ checkpoints


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns."""

    model: MTPModel  # the model, float32, on the CPU, in eval mode
    tokenizer: object | None  # rebuilt with cptoy.data.tokenizer_from_dict (None if not stored)
    metrics: dict = field(default_factory=dict)  # whatever was recorded at save time
    extra: dict = field(default_factory=dict)  # free-form extras (e.g. the training command)
    path: str = ""  # the file it came from


def save_checkpoint(
    model: MTPModel,
    path,
    tokenizer=None,
    metrics: dict | None = None,
    dtype: torch.dtype = torch.float32,
    extra: dict | None = None,
) -> None:
    """Write ``model`` with its tokenizer and metrics (see :meth:`MTPModel.save`)."""
    if not isinstance(model, MTPModel):
        raise TypeError(f"model must be an MTPModel, got {type(model).__name__}")
    model.save(path, tokenizer=tokenizer, metrics=metrics, dtype=dtype, extra=extra)


def load_checkpoint(path) -> Checkpoint:
    """Read a checkpoint: the model (float32, CPU, eval mode), its tokenizer, metrics and extras.

    A missing, corrupt or mismatched file raises ValueError naming the file and the problem.
    """
    path = os.fspath(path)
    ckpt = MTPModel.read_checkpoint(path)
    model = MTPModel.from_checkpoint_dict(ckpt, path)
    model.eval()
    tok = None
    if ckpt.get("tokenizer") is not None:
        try:
            tok = tokenizer_from_dict(ckpt["tokenizer"])
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"checkpoint {path!r} holds an unreadable tokenizer: {exc}") from exc
    model.tokenizer_dict = ckpt.get("tokenizer")
    model.metrics = ckpt.get("metrics") or {}
    model.extra = ckpt.get("extra") or {}
    return Checkpoint(model, tok, model.metrics, model.extra, path)


def init_backbone(model: MTPModel, path) -> dict:
    """Copy the backbone weights of the checkpoint at ``path`` into ``model`` (heads untouched).

    For head-only training of new heads on a trained backbone. The checkpoint's backbone config
    must equal the model's. Returns the checkpoint dict (for its tokenizer and metrics).
    """
    path = os.fspath(path)
    ckpt = MTPModel.read_checkpoint(path)
    theirs = ckpt["config"]
    ours = model.config.to_dict()
    if theirs != ours:
        diff = {
            k: (theirs.get(k), ours.get(k))
            for k in set(theirs) | set(ours)
            if theirs.get(k) != ours.get(k)
        }
        raise ValueError(
            f"checkpoint {path!r} has a different backbone config (stored, model): {diff}"
        )
    model.load_weights(ckpt["state_dict"], source=path, prefix="backbone.")
    return ckpt
