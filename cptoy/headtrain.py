"""Drafting heads on a frozen pretrained backbone, trained from cached features.

The backbone (e.g. SmolLM2-135M from ``cptoy.pretrained``) runs once over the training text
(``cptoy.features``); the heads then train on its cached hidden states h_t, tokens x_t and
top-k next-token distributions p_t, never calling the backbone again.

Objectives (``objective=``), per context t, drafted position j = 2..n (CP heads also j = 1):

- ``"ce"``   cross-entropy on the corpus tokens x_{t+j} (the data, as ``MTPModel.loss``);
- ``"top1"`` cross-entropy on the backbone's own greedy token argmax p_{t+j-1} (hard
  self-distillation: what greedy verification accepts along the text);
- ``"kl"``   cross-entropy to the backbone's top-k distribution p_{t+j-1}, renormalised over
  the shortlist: KL(p || q) up to a constant (soft self-distillation: what sampling accepts).

For CP heads q_j is the CP *conditional* of position j given the true tokens before it,
``q_j(v) = sum_a w_a(x_{<j}) q_{j,a}(v)`` with the posterior gate ``w_a(x_{<j}) ∝ w_a
prod_{i<j} q_{i,a}(x_i)`` (what self-speculative decoding drafts from); for first-token heads
q_j reads h_t and x_{t+1}. Every factor is a softmax over a shortlist S of K frequent tokens
(training costs K instead of V = 49152 columns); tokens outside S are never targets. The
shipped heads keep S as their drafting shortlist (``heads.set_draft_vocab``).

Distributed: under ``torchrun`` (``torch.distributed`` initialised; gloo on CPU, NCCL on
GPUs), each process samples batches from its own shard of the cache and DistributedDataParallel
averages the gradients, which equals one process training on the union of the batches.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from cptoy._checks import check_positive_int
from cptoy.features import FeatureCache
from cptoy.persist import atomic_save, read_torch_file
from cptoy.theory import conditional_rates

__all__ = ["HeadTrainConfig", "Batch", "OBJECTIVES", "shortlist_from_cache", "shortlist_from_counts",
           "token_counts", "sample_batch",
           "batch_schedule", "head_loss", "HeadObjective", "train_heads", "cached_acceptance", "build_heads_model", "KINDS",
           "save_heads", "load_heads", "is_heads_checkpoint", "concat_caches"]

OBJECTIVES = ("ce", "top1", "kl")


@dataclass
class HeadTrainConfig:
    """How to train drafting heads on cached features."""

    objective: str = "kl"  # "ce" (corpus tokens), "top1" or "kl" (the backbone's own p)
    steps: int | None = None  # optimizer steps (None: until `minutes`)
    minutes: float | None = None  # wall-clock budget (None: until `steps`)
    batch_size: int = 128  # contexts per step (per process under torchrun)
    lr: float = 1e-3  # peak AdamW learning rate (linear warmup, cosine decay to lr / 10)
    warmup: int = 50  # warmup steps
    weight_decay: float = 0.0  # AdamW weight decay
    load_balance_coef: float = 0.01  # CP heads of rank > 1: coef * r * sum_a mean(w_a)^2
    seed: int = 0  # batch sampling (and nothing else: heads are initialised by their owner)
    grad_clip: float = 1.0  # max gradient norm

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.steps is None and self.minutes is None:
            raise ValueError("give steps or minutes (or both)")
        if self.steps is not None:
            check_positive_int(self.steps, "steps")
        if self.minutes is not None and not self.minutes > 0:
            raise ValueError(f"minutes must be > 0, got {self.minutes}")
        check_positive_int(self.batch_size, "batch_size")


@dataclass
class Batch:
    """One batch of cached contexts: h (B, d), targets y (B, n) = x_{t+1..t+n}, teacher top-k
    ids / log-probs (B, n, k) of p_{t..t+n-1} (the backbone's distribution for each y_j)."""

    h: torch.Tensor
    y: torch.Tensor
    top_ids: torch.Tensor
    top_logp: torch.Tensor


def token_counts(cache: FeatureCache, vocab_size: int) -> np.ndarray:
    """How often each token is a corpus token or the backbone's greedy token in the cache, (V,)."""
    return (np.bincount(cache.ids, minlength=vocab_size)
            + np.bincount(cache.top_ids[:, 0], minlength=vocab_size)).astype(np.int64)


def shortlist_from_counts(counts: np.ndarray, size: int) -> torch.Tensor:
    """The ``size`` most frequent tokens of ``counts`` (V,), sorted (K,) int64 (ties: lower id)."""
    check_positive_int(size, "size")
    top = np.argsort(-np.asarray(counts), kind="stable")[: min(size, len(counts))]
    return torch.from_numpy(np.sort(top)).long()


def shortlist_from_cache(cache: FeatureCache, size: int) -> torch.Tensor:
    """The ``size`` most frequent tokens among the corpus tokens and the backbone's greedy
    tokens of the cache, sorted (K,) int64: the tokens that drafts and targets need most."""
    V = int(max(cache.ids.max(), cache.top_ids[:, 0].max())) + 1
    return shortlist_from_counts(token_counts(cache, V), size)


def sample_batch(cache: FeatureCache, t: np.ndarray, n_future: int,
                 device="cpu") -> Batch:
    """The batch of contexts at cache indices ``t`` (B,) (see :meth:`FeatureCache.positions`)."""
    t = np.asarray(t, dtype=np.int64)
    j = t[:, None] + np.arange(n_future)  # (B, n): p_{t+j-1} predicts y_j = x_{t+j}
    return Batch(
        h=torch.from_numpy(np.asarray(cache.hidden[t], dtype=np.float32)).to(device),
        y=torch.from_numpy(np.asarray(cache.ids[j + 1], dtype=np.int64)).to(device),
        top_ids=torch.from_numpy(np.asarray(cache.top_ids[j], dtype=np.int64)).to(device),
        top_logp=torch.from_numpy(np.asarray(cache.top_logp[j], dtype=np.float32)).to(device),
    )


def batch_schedule(cache: FeatureCache, n_future: int, cfg: HeadTrainConfig):
    """The cache indices of every step's batch, as :func:`train_heads` draws them: an endless
    generator of sorted (B,) int64 arrays, B = ``cfg.batch_size`` (fewer when the cache has
    fewer positions). Positions (:meth:`FeatureCache.positions`) are visited in a random order
    from ``np.random.default_rng(cfg.seed)``, a new permutation whenever the rest of the current
    one cannot fill a batch. Under torchrun every process runs this on its own shard."""
    positions = cache.positions(n_future)
    if len(positions) == 0:
        raise ValueError(f"the cache has no position with {n_future} future tokens inside its "
                         f"window (windows of {cache.window} tokens or fewer)")
    gen = np.random.default_rng(cfg.seed)

    def schedule():
        order, cursor = gen.permutation(positions), 0
        while True:
            if cursor + cfg.batch_size > len(order):
                order, cursor = gen.permutation(positions), 0
            yield np.sort(order[cursor : cursor + cfg.batch_size])
            cursor += cfg.batch_size

    return schedule()


def _columns(shortlist: torch.Tensor, y: torch.Tensor):
    """Columns to compute: the shortlist, then the batch's targets outside it (their logits
    are needed for the posterior gate, not as targets). Returns (cols (K + E,), y's column
    (B, n), in_shortlist (B, n) bool)."""
    K = shortlist.numel()
    pos = torch.searchsorted(shortlist, y)  # (B, n)
    inside = (pos < K) & (shortlist[pos.clamp(max=K - 1)] == y)
    extra = torch.unique(y[~inside])
    cols = torch.cat([shortlist, extra])
    col = torch.where(inside, pos, K + torch.searchsorted(extra, y))
    return cols, col, inside


def _soft_targets(batch: Batch, shortlist: torch.Tensor, objective: str, inside, col):
    """Target distributions over the shortlist (B, n, K) and a (B, n) mask of usable terms."""
    B, n = batch.y.shape
    K = shortlist.numel()
    if objective == "ce":
        tgt = torch.zeros(B, n, K, device=batch.y.device)
        tgt.scatter_(-1, col.clamp(max=K - 1)[..., None], 1.0)
        return tgt, inside
    ids = (batch.top_ids[..., :1] if objective == "top1" else batch.top_ids).contiguous()
    pos = torch.searchsorted(shortlist, ids)
    ok = (pos < K) & (shortlist[pos.clamp(max=K - 1)] == ids)
    w = batch.top_logp[..., : ids.shape[-1]].exp() * ok  # (B, n, k)
    mass = w.sum(-1)  # (B, n)
    tgt = torch.zeros(B, n, K, device=w.device).scatter_add_(-1, pos.clamp(max=K - 1), w)
    return tgt / mass.clamp(min=1e-12)[..., None], mass > 0


def cp_conditionals(heads, batch: Batch, shortlist: torch.Tensor):
    """log q_j(v | h, y_{<j}) over the shortlist (B, n, K) for CP heads, the gate (B, r) and
    (cols, col, inside) of :func:`_columns`."""
    K = shortlist.numel()
    cols, col, inside = _columns(shortlist, batch.y)
    z = heads.factor_logits(batch.h, vocab=cols)  # (B, n, r, K + E)
    lf = torch.log_softmax(z[..., :K], dim=-1)  # (B, n, r, K): normalised over the shortlist
    lse = z[..., 0] - lf[..., 0]  # (B, n, r): the shortlist's log normaliser
    r = z.shape[2]
    lq_y = z.gather(-1, col[:, :, None, None].expand(-1, -1, r, 1)).squeeze(-1) - lse  # (B, n, r)
    lw = heads.gate_log_probs(batch.h)  # (B, r)
    prefix = torch.cumsum(lq_y, dim=1) - lq_y  # (B, n, r): sum over i < j
    post = torch.log_softmax(lw[:, None, :] + prefix, dim=-1)  # (B, n, r) posterior gate
    if r == 1:
        return lf[:, :, 0], lw, (cols, col, inside)
    # the mixture sum_a w'_a q_a(v) as one batched matmul (a logsumexp over r is 5x slower)
    q = torch.einsum("bnr,bnrk->bnk", post.exp(), lf.exp())  # (B, n, K)
    return q.clamp_min(1e-30).log(), lw, (cols, col, inside)


def first_token_conditionals(heads, batch: Batch, shortlist: torch.Tensor):
    """log q_j(v | h, x_1 ..) over the shortlist (B, n - 1, K) for first-token heads (which
    read x_1) and draft blocks (which read x_1 .. x_{j-1}, the true tokens, and chain on their
    own features: ``cptoy.draftblock``)."""
    if hasattr(heads, "chain_logits"):
        z = heads.chain_logits(batch.h, batch.y[:, :-1], vocab=shortlist)  # (B, n - 1, K)
    else:
        z = heads.logits(batch.h, batch.y[:, 0], vocab=shortlist)  # (B, n - 1, K)
    return torch.log_softmax(z.float(), dim=-1)


def head_loss(heads, batch: Batch, shortlist: torch.Tensor, objective: str = "kl",
              load_balance_coef: float = 0.01) -> dict[str, torch.Tensor]:
    """The training loss of ``heads`` (CP or first-token heads) on one batch.

    Returns ``total`` (the objective, plus the load balance for CP rank > 1), ``loss`` (the
    objective alone, nats per drafted position), ``loss_j`` per position and ``load_balance``."""
    if not hasattr(heads, "gate_log_probs"):  # first-token heads
        logq = first_token_conditionals(heads, batch, shortlist)  # positions 2..n
        _, col, inside = _columns(shortlist, batch.y)
        sl = slice(1, None)
        lw = None
    else:
        logq, lw, (_, col, inside) = cp_conditionals(heads, batch, shortlist)
        sl = slice(0, None)
    sub = Batch(batch.h, batch.y[:, sl], batch.top_ids[:, sl], batch.top_logp[:, sl])
    tgt, mask = _soft_targets(sub, shortlist, objective, inside[:, sl], col[:, sl])
    ce = -(tgt * logq).sum(-1)  # (B, m)
    per = (ce * mask).sum(0) / mask.sum(0).clamp(min=1)  # (m,)
    loss = (ce * mask).sum() / mask.sum().clamp(min=1)
    out = {"loss": loss, "total": loss}
    first = sl.start + 1
    out.update({f"loss_{j + first}": per[j].detach() for j in range(per.numel())})
    if lw is not None and lw.shape[-1] > 1:
        u = lw.exp().mean(0)  # (r,) mean gate
        lb = lw.shape[-1] * (u * u).sum()
        out["load_balance"] = lb.detach()
        out["total"] = loss + load_balance_coef * lb
    return out


class HeadObjective(torch.nn.Module):
    """``head_loss`` as a module over ``heads`` (what DistributedDataParallel wraps)."""

    def __init__(self, heads, shortlist: torch.Tensor, objective: str, load_balance_coef: float):
        super().__init__()
        self.heads = heads
        self.register_buffer("shortlist", shortlist, persistent=False)
        self.objective, self.load_balance_coef = objective, load_balance_coef

    def forward(self, h, y, top_ids, top_logp) -> dict[str, torch.Tensor]:
        return head_loss(self.heads, Batch(h, y, top_ids, top_logp), self.shortlist,
                         self.objective, self.load_balance_coef)


def _lr(cfg: HeadTrainConfig, step: int, progress: float) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    return cfg.lr / 10 + 0.9 * cfg.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train_heads(model, cache: FeatureCache, cfg: HeadTrainConfig,
                shortlist: torch.Tensor | None = None, progress: bool = True) -> dict:
    """Train ``model.heads`` (the backbone is never run) on ``cache``; returns a history dict.

    ``shortlist`` defaults to the heads' drafting shortlist, which must then be set. Under an
    initialised ``torch.distributed`` process group the heads are wrapped in
    DistributedDataParallel and ``cache`` is this process's shard."""
    from tqdm.auto import tqdm

    if not isinstance(cfg, HeadTrainConfig):
        raise TypeError(f"cfg must be a HeadTrainConfig, got {type(cfg).__name__}")
    if shortlist is None:
        shortlist = model.heads.draft_vocab
        if shortlist is None:
            raise ValueError("give a shortlist or set model.heads.set_draft_vocab(...) first")
    heads = model.heads
    device = next(heads.parameters()).device
    shortlist = shortlist.detach().to(device, torch.long)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    objective = HeadObjective(heads, shortlist, cfg.objective, cfg.load_balance_coef)
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        objective = DistributedDataParallel(objective)
    params = [p for p in heads.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    batches = batch_schedule(cache, model.n_future, cfg)
    hist = {"step": [], "loss": [], "seconds": 0.0, "positions_seen": 0, "config": asdict(cfg)}
    total_steps = cfg.steps or 1 << 30
    bar = tqdm(total=cfg.steps, unit="step", desc=f"heads ({cfg.objective})",
               disable=not progress or rank != 0)
    t0, step = time.perf_counter(), 0
    heads.train()
    while step < total_steps:
        elapsed = time.perf_counter() - t0
        if distributed and cfg.minutes is not None:  # every process: process 0's clock, so
            clock = torch.tensor([elapsed], dtype=torch.float64, device=device)  # that all
            torch.distributed.broadcast(clock, 0)  # stop at the same step with the same lr
            elapsed = float(clock)
        if cfg.minutes is not None and elapsed > 60 * cfg.minutes:
            break
        frac = step / total_steps if cfg.steps else elapsed / (60 * cfg.minutes)
        t = next(batches)
        batch = sample_batch(cache, t, model.n_future, device)
        for g in opt.param_groups:
            g["lr"] = _lr(cfg, step, frac)
        out = objective(batch.h, batch.y, batch.top_ids, batch.top_logp)
        opt.zero_grad(set_to_none=True)
        out["total"].backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        step += 1
        hist["step"].append(step)
        loss = out["loss"].item()
        hist["loss"].append(loss)
        hist["positions_seen"] += len(t)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}",
                        ctx_per_s=f"{hist['positions_seen'] / (time.perf_counter() - t0):.0f}")
    bar.close()
    heads.eval()
    hist["seconds"] = time.perf_counter() - t0
    hist["steps"] = step
    return hist


@torch.no_grad()
def cached_acceptance(model, cache: FeatureCache, shortlist: torch.Tensor | None = None,
                      max_positions: int = 4096, batch_size: int = 256) -> dict:
    """Teacher-forced greedy acceptance from cached held-out features: at each context t the
    drafts of positions j = 2..n are the argmax of q_j given the true x_{t+1..t+j-1} (over the
    shortlist), accepted when equal to the backbone's greedy token argmax p_{t+j-1}. Returns
    ``tokens_per_forward`` (1 + sum_j Pr(drafts 2..j all accepted)), ``prefix`` (per j) and
    ``acceptance`` (conditional, per j), ``positions``."""
    if shortlist is None:
        shortlist = model.heads.draft_vocab
        if shortlist is None:  # no drafting shortlist: the whole vocabulary
            shortlist = torch.arange(model.heads.vocab_size)
    device = next(model.heads.parameters()).device
    shortlist = torch.as_tensor(shortlist).detach().to(device, torch.long)
    n = model.n_future
    t_all = cache.positions(n)
    if len(t_all) == 0:
        raise ValueError(f"the cache has no position with {n} future tokens inside its window")
    if len(t_all) > max_positions:
        t_all = t_all[np.linspace(0, len(t_all) - 1, max_positions).astype(np.int64)]
    hits = []
    for lo in range(0, len(t_all), batch_size):
        b = sample_batch(cache, t_all[lo : lo + batch_size], n, device)
        if hasattr(model.heads, "gate_log_probs"):
            logq = cp_conditionals(model.heads, b, shortlist)[0][:, 1:]  # (B, n - 1, K)
        else:
            logq = first_token_conditionals(model.heads, b, shortlist)
        draft = shortlist[logq.argmax(-1)]  # (B, n - 1)
        hits.append((draft == b.top_ids[:, 1:, 0]).long().cumprod(1).cpu())
    H = torch.cat(hits).double()
    prefix = H.mean(0).tolist()
    return dict(tokens_per_forward=1 + sum(prefix), prefix=prefix,
                acceptance=conditional_rates(prefix),
                positions=len(t_all))


# ----------------------------------------------------------------------------- checkpoints
FORMAT = "cptoy-pretrained-heads"
FORMAT_VERSION = 1


KINDS = ("cp", "first_token", "block")


def build_heads_model(backbone, kind: str, n_future: int, rank: int = 1,
                      expert_dim: int | None = None, seed: int = 0,
                      mlp_hidden: int | None = None):
    """Drafting heads on a frozen ``backbone`` (used as it is, not copied): ``kind="cp"`` an
    ``MTPModel`` with rank-r CP heads, ``kind="first_token"`` a ``FirstTokenModel``,
    ``kind="block"`` a ``DraftBlockModel`` (one decoder block of MLP width ``mlp_hidden``)."""
    from cptoy.draftblock import DraftBlockModel
    from cptoy.firsttoken import FirstTokenModel
    from cptoy.heads import MTPModel

    for p in backbone.parameters():
        p.requires_grad_(False)
    torch.manual_seed(seed)
    if kind == "cp":
        model = MTPModel(backbone, n_future, rank, expert_dim=expert_dim, freeze_backbone=True)
    elif kind == "first_token":
        model = FirstTokenModel(backbone, n_future)
    elif kind == "block":
        model = DraftBlockModel(backbone, n_future, mlp_hidden)
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return model.eval()


def save_heads(model, path, backbone_name: str, metrics: dict | None = None,
               recipe: dict | None = None) -> None:
    """Write the heads only (half precision), their shortlist and metrics; the backbone is named
    (``backbone_name``, loaded with ``cptoy.pretrained.load``) and fingerprinted (its file's
    hash, checked on load), never copied."""

    from cptoy.pretrained import fingerprint

    source = getattr(model.backbone, "source", None)
    if source is None:
        raise ValueError("the backbone has no .source file (load it with cptoy.pretrained.load)")
    heads = model.heads
    kind = ("cp" if hasattr(heads, "gate_log_probs") else
            "block" if hasattr(heads, "chain_logits") else "first_token")
    ckpt = dict(
        format=FORMAT, format_version=FORMAT_VERSION, kind=kind, n_future=model.n_future,
        rank=getattr(heads, "rank", 1), expert_dim=getattr(heads, "expert_dim", None),
        mlp_hidden=getattr(heads, "mlp_hidden", None),
        state_dict={k: v.detach().to("cpu", torch.float16) for k, v in heads.state_dict().items()},
        draft_vocab=None if heads.draft_vocab is None else heads.draft_vocab.tolist(),
        backbone=dict(name=backbone_name, fingerprint=fingerprint(source)),
        metrics=dict(metrics or {}), recipe=dict(recipe or {}),
    )
    atomic_save(ckpt, path)


def is_heads_checkpoint(path) -> bool:

    try:
        ckpt = read_torch_file(path)
    except (OSError, ValueError):
        return False
    return isinstance(ckpt, dict) and ckpt.get("format") == FORMAT


def load_heads(path, backbone=None):
    """Load heads written by :func:`save_heads` onto ``backbone`` (default: load the named one
    with ``cptoy.pretrained.load``); the backbone's file must have the stored fingerprint.
    Returns the model (``MTPModel`` or ``FirstTokenModel``, eval mode) with ``.metrics``."""
    import os

    from cptoy import pretrained

    path = os.fspath(path)
    ckpt = read_torch_file(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not a heads checkpoint (format {FORMAT!r})")
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path!r} has format_version {ckpt['format_version']}; this cptoy "
                         f"reads up to {FORMAT_VERSION}")
    want = ckpt["backbone"]
    if backbone is None:
        backbone, _ = pretrained.load(want["name"])
    source = getattr(backbone, "source", None)
    if source is None or pretrained.fingerprint(source) != want["fingerprint"]:
        raise ValueError(f"{path!r} was trained on {want['name']!r} (fingerprint "
                         f"{want['fingerprint'][:12]}...); the backbone given comes from "
                         f"{source!r}, another file")
    model = build_heads_model(backbone, ckpt["kind"], ckpt["n_future"], ckpt["rank"],
                              ckpt["expert_dim"], mlp_hidden=ckpt.get("mlp_hidden"))
    model.heads.load_saved(ckpt["state_dict"], ckpt.get("draft_vocab"), path)
    model.metrics = ckpt.get("metrics") or {}
    model.recipe = ckpt.get("recipe") or {}
    return model.eval()


# ----------------------------------------------------------------------------- recipe
def main(argv=None) -> None:
    """``python -m cptoy.headtrain``: cache the backbone's features (once), train heads, save."""
    import argparse
    import json
    import os
    import shlex
    import sys

    from cptoy import pretrained
    from cptoy.features import build_feature_cache, corpus_windows

    p = argparse.ArgumentParser(
        prog="python -m cptoy.headtrain", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train drafting heads on a frozen pretrained backbone from cached features.",
        epilog="example: python -m cptoy.headtrain --kind cp --rank 8 --expert-dim 32 "
               "--minutes 10 --out cptoy/checkpoints/smollm2_r8.pt")
    p.add_argument("--pretrained", default="smollm2-135m", help="backbone name or GGUF path")
    p.add_argument("--kind", choices=KINDS, default="cp",
                   help="CP heads, first-token heads or a draft block (cptoy.draftblock)")
    p.add_argument("--mlp-hidden", type=int, default=None,
                   help="MLP width of the draft block (kind block; default: the backbone's)")
    p.add_argument("--rank", type=int, default=1, help="CP rank r (kind cp)")
    p.add_argument("--expert-dim", type=int, default=None,
                   help="structured CP heads with rank-e expert corrections (kind cp)")
    p.add_argument("--n-future", type=int, default=4)
    p.add_argument("--objective", choices=OBJECTIVES, default="kl")
    p.add_argument("--corpus", nargs="+", default=["code", "shakespeare"],
                   help="training corpora (their train splits)")
    p.add_argument("--windows", type=int, nargs="+", default=[240, 60],
                   help="512-token windows cached per corpus")
    p.add_argument("--val-windows", type=int, default=24, help="held-out code windows for metrics")
    p.add_argument("--shortlist", type=int, default=8192, help="K: drafting/training shortlist")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--minutes", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", default=None,
                   help="start from the heads of this checkpoint (same kind; training goes on)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun
    if world > 1:
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    rank = torch.distributed.get_rank() if world > 1 else 0
    progress = not a.no_progress and rank == 0
    backbone, tok = pretrained.load(a.pretrained, device=device)
    name = a.pretrained if a.pretrained in pretrained.KNOWN else "gguf"
    caches = []  # this process's shard of every corpus's windows
    for corpus, nw in zip(a.corpus, a.windows, strict=True):
        wins = corpus_windows(tok, corpus, nw, 512)
        caches.append(build_feature_cache(backbone, wins, f"{name}-{corpus}-train-w512",
                                          shard=(rank, world), progress=progress))
    cache = concat_caches(caches)
    counts = token_counts(cache, backbone.config.vocab_size)
    if world > 1:  # one shortlist for all processes: count over every shard
        t = torch.from_numpy(counts).to(device)
        torch.distributed.all_reduce(t)
        counts = t.cpu().numpy()
    model = build_heads_model(backbone, a.kind, a.n_future, a.rank, a.expert_dim, a.seed,
                              a.mlp_hidden)
    model.heads.set_draft_vocab(shortlist_from_counts(counts, a.shortlist))
    if a.init:
        init = load_heads(a.init, backbone)
        if type(init.heads) is not type(model.heads):
            raise ValueError(f"--init {a.init!r} holds {type(init.heads).__name__}, "
                             f"not {type(model.heads).__name__} (--kind {a.kind})")
        model.heads.load_state_dict(init.heads.state_dict())
    cfg = HeadTrainConfig(objective=a.objective, steps=a.steps, minutes=a.minutes,
                          batch_size=a.batch_size, lr=a.lr, seed=a.seed)
    if rank == 0:
        print(f"{cache!r} (process 0 of {world})\n{model.heads!r}: "
              f"{model.heads.num_params():,} params")
    hist = train_heads(model, cache, cfg, progress=progress)
    if rank == 0:
        val = build_feature_cache(backbone, corpus_windows(tok, "code", a.val_windows, 512,
                                                           "val"),
                                  f"{name}-code-val-w512", progress=progress)
        check = build_feature_cache(backbone, corpus_windows(tok, "code", 4, 512, "val"),
                                    f"{name}-code-check-w512", progress=False)
        metrics = dict(val_code=cached_acceptance(model, val),
                       check_code=cached_acceptance(model, check),  # test_smollm2_heads.py
                       steps=hist["steps"], seconds=hist["seconds"], processes=world,
                       train_loss_last100=float(np.mean(hist["loss"][-100:])),
                       objective=a.objective, train_tokens=cache.num_tokens * world,
                       val_windows=a.val_windows)
        # the name load_heads reloads the backbone by: the known name, or the GGUF file's path
        backbone_name = name if name != "gguf" else os.path.abspath(a.pretrained)
        save_heads(model.to("cpu"), a.out, backbone_name, metrics,
                   recipe=dict(command="python -m cptoy.headtrain " + shlex.join(
                       sys.argv[1:] if argv is None else argv), config=asdict(cfg)))
        print(json.dumps(metrics, indent=1, default=float))
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def concat_caches(caches: list[FeatureCache]) -> FeatureCache:
    """Several caches as one (in memory; windows stay separate)."""
    if len(caches) == 1:
        return caches[0]
    offsets = np.cumsum([0] + [c.num_tokens for c in caches[:-1]])
    ends = np.concatenate([c.window_ends + o for c, o in zip(caches, offsets, strict=True)])
    meta = dict(caches[0].meta, name="+".join(c.meta.get("name", "?") for c in caches))
    return FeatureCache(caches[0].path, np.concatenate([c.hidden for c in caches]),
                        np.concatenate([c.ids for c in caches]),
                        np.concatenate([c.top_ids for c in caches]),
                        np.concatenate([c.top_logp for c in caches]),
                        max(c.window for c in caches), ends, meta)


if __name__ == "__main__":
    main()
