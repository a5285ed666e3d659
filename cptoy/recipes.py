"""Recipes for the shipped demo checkpoints: pretrain a backbone, then heads on it frozen.

Step 1 (this module, :func:`pretrain_backbone`): a GPT trained with the plain next-token loss on
a real corpus for a time budget. Step 2 (``python -m cptoy train --freeze-backbone --init ...``):
CP heads of several ranks trained on the same frozen backbone, so acceptance differences come
from the heads alone.

    python -m cptoy.recipes --corpus code --preset toy --minutes 40 --out runs/code_backbone.pt
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cptoy.data import TokenDataset, encode_corpus, get_tokenizer, load_corpus
from cptoy.model import GPT, GPTConfig
from cptoy.train import next_token_step

BACKBONE_FORMAT = "cptoy-backbone"  # the "format" entry of a backbone-only checkpoint


@torch.no_grad()
def val_loss(model: GPT, val: TokenDataset, block_size: int, max_blocks: int = 64) -> float:
    """Mean next-token loss (nats/token) over the first ``max_blocks`` validation blocks."""
    model.eval()
    losses = []
    for i, blk in enumerate(val.iter_blocks(block_size + 1, batch_size=16)):
        if i * 16 >= max_blocks:
            break
        h = model(blk[:, :-1])
        logits = model.logits(h)
        losses.append(F.cross_entropy(logits.flatten(0, 1), blk[:, 1:].flatten()).item())
    model.train()
    return sum(losses) / len(losses)


def pretrain_backbone(
    corpus: str = "code",
    preset: str = "toy",
    tokenizer: str = "bpe",
    vocab_size: int = 4096,
    minutes: float = 40.0,
    batch_size: int = 32,
    lr: float = 3e-3,
    warmup: int = 200,
    seed: int = 0,
    out: str = "runs/backbone.pt",
    eval_every_s: float = 120.0,
    n_layer: int | None = None,
) -> dict:
    """Train a GPT backbone with next-token loss for ``minutes``; save it with its tokenizer.

    The learning rate follows a warmup then a cosine over the *time* budget. Returns metrics:
    held-out loss in nats per token and nats per byte.
    """
    torch.manual_seed(seed)
    c = load_corpus(corpus)
    tok = get_tokenizer(tokenizer, c, vocab_size=vocab_size)
    c = encode_corpus(c, tok)
    overrides = {"n_layer": n_layer} if n_layer else {}
    cfg = GPTConfig.preset(preset, vocab_size=tok.vocab_size, **overrides)
    model = GPT(cfg)
    train, val = TokenDataset(c.train_ids), TokenDataset(c.val_ids)
    bytes_per_token = len(c.val.encode("utf-8")) / len(c.val_ids)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(seed)
    budget = minutes * 60.0
    t0 = last_eval = time.perf_counter()
    step, tokens = 0, 0
    metrics: dict = {}
    bar = tqdm(desc=f"pretrain {corpus}", unit="step")
    while (elapsed := time.perf_counter() - t0) < budget:
        frac = min(1.0, elapsed / budget)
        cur_lr = lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = cur_lr
        blk = train.batch(batch_size, cfg.block_size + 1, g)
        loss = next_token_step(model, opt, blk)
        step += 1
        tokens += blk[:, 1:].numel()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{cur_lr:.1e}")
        if time.perf_counter() - last_eval > eval_every_s:
            last_eval = time.perf_counter()
            vl = val_loss(model, val, cfg.block_size)
            metrics = {"val_nats_per_token": vl, "val_nats_per_byte": vl / bytes_per_token}
            bar.write(f"step {step} tokens {tokens} val {vl:.3f} nats/token {vl / bytes_per_token:.3f} nats/byte")
            save_backbone(model, tok, metrics | {"steps": step, "tokens": tokens}, out)
    bar.close()
    vl = val_loss(model, val, cfg.block_size, max_blocks=256)
    metrics = {
        "val_nats_per_token": vl,
        "val_nats_per_byte": vl / bytes_per_token,
        "bytes_per_token": bytes_per_token,
        "steps": step,
        "tokens": tokens,
        "minutes": minutes,
        "corpus": corpus,
    }
    save_backbone(model, tok, metrics, out)
    return metrics


def save_backbone(model: GPT, tokenizer, metrics: dict, path: str) -> None:
    import os

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save(
        {
            "format": BACKBONE_FORMAT,
            "config": model.config.to_dict(),
            "state_dict": model.state_dict(),
            "tokenizer": tokenizer.to_dict(),
            "metrics": metrics,
        },
        path + ".tmp",
    )
    os.replace(path + ".tmp", path)


def backbone_to_mtp(backbone_path: str, out: str, n_future: int = 4, rank: int = 1) -> str:
    """Wrap a backbone-only checkpoint as an MTP checkpoint (fresh heads) usable by ``--init``."""
    from cptoy.data import tokenizer_from_dict
    from cptoy.heads import MTPModel

    ckpt = torch.load(backbone_path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != BACKBONE_FORMAT:
        raise ValueError(f"{backbone_path!r} is not a {BACKBONE_FORMAT!r} checkpoint")
    model = MTPModel(GPTConfig(**ckpt["config"]), n_future=n_future, rank=rank)
    model.backbone.load_state_dict(ckpt["state_dict"])
    model.save(out, tokenizer=tokenizer_from_dict(ckpt["tokenizer"]), metrics=ckpt["metrics"])
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m cptoy.recipes", description=__doc__)
    p.add_argument("--corpus", default="code", choices=["code", "shakespeare"])
    p.add_argument("--preset", default="toy")
    p.add_argument("--tokenizer", default="bpe", choices=["bpe", "byte"])
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--minutes", type=float, default=40.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-layer", type=int, default=None, help="override the preset's depth")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", required=True)
    p.add_argument("--as-mtp", default=None, help="also write the backbone as an MTP checkpoint here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    m = pretrain_backbone(
        a.corpus, a.preset, a.tokenizer, a.vocab_size, a.minutes, a.batch_size, a.lr,
        seed=a.seed, out=a.out, n_layer=a.n_layer,
    )
    print(m)
    if a.as_mtp:
        print("MTP checkpoint for --init:", backbone_to_mtp(a.out, a.as_mtp))


if __name__ == "__main__":
    main()


# ---------------------------------------------------------------------- shipped-checkpoint checks
CHECK_SLICE_BYTES = 16_000  # held-out text (start of the validation split) used by the load test


def check_slice_ids(corpus: str, tokenizer, n_bytes: int = CHECK_SLICE_BYTES) -> torch.Tensor:
    """Token ids of the first ``n_bytes`` characters of ``corpus``'s validation split."""
    text = load_corpus(corpus).val[:n_bytes]
    return torch.tensor(tokenizer.encode(text), dtype=torch.long)


@torch.no_grad()
def check_slice_metrics(model, ids: torch.Tensor) -> dict:
    """Mean losses of ``model`` on non-overlapping blocks of ``ids`` (deterministic, eval mode)."""
    model.eval()
    n = model.n_future
    T = model.config.block_size
    span = T + n
    blocks = [ids[i : i + span] for i in range(0, len(ids) - span + 1, span)]
    out: dict[str, float] = {}
    for blk in blocks:
        for k, v in model.loss(blk[None]).items():
            out[k] = out.get(k, 0.0) + float(v) / len(blocks)
    keys = ("next_token_nll", "joint_nll", "first_token_nll", "draft_nll")  # MTP / first-token
    return {k: out[k] for k in keys if k in out}


def record_check_metrics(path: str, corpus: str) -> dict:
    """Add ``metrics["check_slice"]`` (losses on the check slice) to a shipped checkpoint."""
    from cptoy.data import tokenizer_from_dict
    from cptoy.heads import MTPModel

    model = MTPModel.load(path)
    tok = tokenizer_from_dict(model.tokenizer_dict)
    ckpt = MTPModel.read_checkpoint(path)
    half = any(v.dtype == torch.float16 for v in ckpt["state_dict"].values())
    metrics = dict(model.metrics)
    metrics["check_slice"] = check_slice_metrics(model, check_slice_ids(corpus, tok))
    metrics["corpus"] = corpus
    model.save(path, tokenizer=tok, metrics=metrics, dtype=torch.float16 if half else torch.float32,
               extra=model.extra)
    return metrics


DRAFT_VOCAB = 512  # shortlist size of the shipped checkpoints (bench/speculative.py measures it)
