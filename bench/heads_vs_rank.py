"""Joint and first-token validation loss versus rank, CP heads on one frozen backbone (issue 3).

For each corpus (stdlib code, Shakespeare) the backbone pretrained by ``cptoy/recipes.py``
(``runs/<corpus>_backbone.pt``, or the backbone inside a shipped checkpoint, see
``--backbone``) is frozen, and CP heads of rank 1, 2, 4, 8 (n = 4) are trained on it from the
same seed with the same data order. Each rank is compared twice, in one training run:

* at equal steps: validation losses after ``--steps`` optimizer steps;
* at equal compute: validation losses once the run has used ``--cpu-seconds`` of CPU time for
  training steps (evaluation not counted). A higher rank costs more per step, so it gets fewer
  steps in the same budget.

A run goes on until both points are reached, at a constant learning rate after a short warm-up
(no cosine decay, so that both points are read from one trajectory and neither favours a
schedule length). Reported (nats per token, on evenly spread blocks of the validation split via
``cptoy.train.evaluate_loss``): ``joint_nll`` (-log Q of the next n tokens, divided by n) and
``first_token_nll`` (-log of the heads' marginal of the next token), next to the frozen
backbone's own next-token loss, which the heads do not change.

Timing: one torch thread (``torch.set_num_threads(1)``) and process CPU time
(``time.process_time``), so the budget means the same amount of compute when other jobs share the
machine's two cores. Usage::

    .venv/bin/python bench/heads_vs_rank.py            # about 5-8 minutes; updates bench/RESULTS.md
    .venv/bin/python bench/heads_vs_rank.py --quick    # smoke run, does not write

The section "## Validation loss versus rank" of bench/RESULTS.md is replaced (others kept).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from _results import write_section  # bench/ is on sys.path when run as a script

from cptoy.data import TokenDataset, encode_corpus, load_corpus, tokenizer_from_dict
from cptoy.heads import MTPModel
from cptoy.model import GPTConfig
from cptoy.train import evaluate_loss

SECTION = "## Validation loss versus rank"
ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


@dataclass
class Point:
    """Validation losses of one rank at one budget."""

    corpus: str  # "code" or "shakespeare"
    rank: int  # r
    budget: str  # "steps" or "cpu"
    steps: int  # optimizer steps done
    cpu_s: float  # CPU seconds of training steps so far
    joint: float  # joint_nll, nats per token
    first: float  # first_token_nll, nats per token
    next_token: float  # the frozen backbone's next_token_nll (the same for every rank)
    entropy: float  # expert_entropy of the mean gate usage on validation (log r = uniform)


def load_backbone(path: Path):
    """(config, backbone state dict, tokenizer, metrics) from a ``cptoy-backbone`` file or an
    MTP checkpoint (whose ``backbone.*`` weights are used)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "config" not in ckpt or "state_dict" not in ckpt:
        raise SystemExit(f"{path}: not a cptoy backbone or MTP checkpoint")
    state = ckpt["state_dict"]
    if ckpt.get("format") == "cptoy-mtp":
        state = {k.removeprefix("backbone."): v for k, v in state.items()
                 if k.startswith("backbone.")}
    tok = tokenizer_from_dict(ckpt["tokenizer"])
    return GPTConfig(**ckpt["config"]), state, tok, ckpt.get("metrics") or {}


def build(config, state, rank, n_future, expert_dim, head_positions, lb_coef, seed):
    """An MTPModel with the given backbone weights, frozen, and fresh heads from ``seed``."""
    torch.manual_seed(seed)
    model = MTPModel(config, n_future, rank, load_balance_coef=lb_coef, expert_dim=expert_dim,
                     head_positions=head_positions, seed=seed)
    model.backbone.load_state_dict({k: v.float() for k, v in state.items()})
    model.freeze_backbone()
    return model


def run_rank(model, train: TokenDataset, val_ids, args, corpus: str) -> list[Point]:
    """Train the heads until both the step and the CPU budget are reached; evaluate at each."""
    T = model.config.block_size if args.block is None else args.block
    L = T + model.n_future
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)  # the same batches for every rank
    points: list[Point] = []
    done = {"steps": False, "cpu": False}
    step, cpu = 0, 0.0

    def evaluate(budget: str) -> None:
        res = evaluate_loss(model, val_ids, batch_size=args.eval_batch, block_size=T,
                            max_batches=args.eval_batches)
        points.append(Point(corpus, model.rank, budget, step, cpu, res["joint_nll"],
                            res["first_token_nll"], res["next_token_nll"],
                            res["expert_entropy"]))
        done[budget] = True

    model.train()
    while not (done["steps"] and done["cpu"]):
        t0 = time.process_time()
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = train.batch(args.batch_size, L, gen)  # (B, T + n)
        loss = model.loss(batch)["total"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        cpu += time.process_time() - t0
        step += 1
        if not done["steps"] and step >= args.steps:
            evaluate("steps")
        if not done["cpu"] and cpu >= args.cpu_seconds:
            evaluate("cpu")
    return points


def table(points: list[Point]) -> list[str]:
    lines = ["| corpus | rank | budget | steps | CPU s | joint nll | first-token nll | "
             "backbone next-token nll | expert entropy (max) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in sorted(points, key=lambda p: (p.corpus, p.budget != "steps", p.rank)):
        budget = "equal steps" if p.budget == "steps" else "equal CPU time"
        ent = f"{p.entropy:.2f} ({math.log(p.rank):.2f})"
        lines.append(f"| {p.corpus} | {p.rank} | {budget} | {p.steps} | {p.cpu_s:.1f} | "
                     f"{p.joint:.3f} | {p.first:.3f} | {p.next_token:.3f} | {ent} |")
    return lines


def summary(points: list[Point], ranks) -> list[str]:
    out = []
    for corpus in sorted({p.corpus for p in points}):
        for budget, name in (("steps", "equal steps"), ("cpu", "equal CPU time")):
            ps = {p.rank: p for p in points if p.corpus == corpus and p.budget == budget}
            if len(ps) < 2:
                continue
            lo, hi = min(ps), max(ps)
            out.append(
                f"- {corpus}, {name}: joint nll {ps[lo].joint:.3f} (rank {lo}) -> "
                f"{ps[hi].joint:.3f} (rank {hi}), change {ps[hi].joint - ps[lo].joint:+.3f}; "
                f"first-token nll {ps[lo].first:.3f} -> {ps[hi].first:.3f}, change "
                f"{ps[hi].first - ps[lo].first:+.3f}")
    return out



def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpora", nargs="+", default=["code", "shakespeare"])
    ap.add_argument("--ranks", nargs="+", type=int, default=[1, 2, 4, 8])
    ap.add_argument("--backbone", default="runs/{corpus}_backbone.pt",
                    help="backbone file per corpus ({corpus} is filled in); a cptoy-backbone "
                         "file or an MTP checkpoint such as cptoy/checkpoints/code_r1.pt")
    ap.add_argument("--n-future", type=int, default=4)
    ap.add_argument("--steps", type=int, default=80, help="the equal-steps budget")
    ap.add_argument("--cpu-seconds", type=float, default=15.0,
                    help="the equal-compute budget: CPU seconds of training steps per rank")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--block", type=int, default=None, help="context length (default: block)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--expert-dim", type=int, default=None, help="structured heads (default full)")
    ap.add_argument("--head-positions", type=int, default=128,
                    help="positions per batch that the head loss uses in training")
    ap.add_argument("--load-balance", type=float, default=0.01, help="load_balance_coef")
    ap.add_argument("--eval-batches", type=int, default=3)
    ap.add_argument("--eval-batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="tiny budgets; does not write")
    ap.add_argument("--write", action="store_true", help="write RESULTS.md even with --quick")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.cpu_seconds, args.eval_batches = 4, 2.0, 1
        args.ranks = [r for r in args.ranks if r in (1, 8)] or args.ranks[:1]
    torch.set_num_threads(args.threads)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    load0 = os.getloadavg()[0]
    points: list[Point] = []
    sources = []
    for corpus in args.corpora:
        path = ROOT / args.backbone.format(corpus=corpus)
        config, state, tok, metrics = load_backbone(path)
        c = encode_corpus(load_corpus(corpus), tok)
        train, val_ids = TokenDataset(c.train_ids), c.val_ids
        bpt = len(c.val.encode("utf-8")) / len(c.val_ids)
        sources.append(f"{corpus}: `{path.relative_to(ROOT)}` ({config.n_layer} layers, width "
                       f"{config.n_embd}, V = {config.vocab_size}; recorded held-out "
                       f"{metrics.get('val_nats_per_byte', float('nan')):.3f} nats/byte; "
                       f"{bpt:.2f} bytes/token on val)")
        for rank in args.ranks:
            model = build(config, state, rank, args.n_future, args.expert_dim,
                          args.head_positions, args.load_balance, args.seed)
            t = time.perf_counter()
            pts = run_rank(model, train, val_ids, args, corpus)
            points += pts
            for p in pts:
                print(f"{corpus} r={rank} {p.budget:5s}: step {p.steps:4d} cpu {p.cpu_s:5.1f}s "
                      f"joint {p.joint:.3f} first {p.first:.3f} next {p.next_token:.3f} "
                      f"entropy {p.entropy:.2f}", file=sys.stderr)
            print(f"  ({time.perf_counter() - t:.0f} s wall)", file=sys.stderr)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0

    heads = ("full (one transform per position and expert)" if args.expert_dim is None
             else f"structured, expert_dim = {args.expert_dim}")
    text = "\n".join([
        SECTION,
        "",
        "Generated by `bench/heads_vs_rank.py`; do not edit by hand.",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores shared with other jobs (load "
        f"average {load0:.1f} at the start), torch threads {args.threads}, torch "
        f"{torch.__version__}, Python {platform.python_version()}.",
        "Backbones (frozen; every rank is trained on the same one): " + "; ".join(sources) + ".",
        f"Setting: n = {args.n_future}, heads {heads}, load_balance_coef {args.load_balance}, "
        f"AdamW lr {args.lr} (warm-up {args.warmup} steps, then constant), batch "
        f"{args.batch_size} x {args.block or 'block'} context tokens, head loss on "
        f"{args.head_positions} random positions per batch, seed {args.seed} (same batches "
        f"for every rank). Equal steps = after {args.steps} steps; equal CPU time = after "
        f"{args.cpu_seconds:g} s of process CPU time (`time.process_time`, one thread, "
        "evaluation not counted), so a costlier rank gets fewer steps. Losses in nats per "
        f"token on {args.eval_batches * args.eval_batch} blocks spread over the validation "
        "split (`cptoy.train.evaluate_loss`, all positions): joint nll = -log Q(next n "
        "tokens) / n; first-token nll = -log of the heads' marginal of the next token; the "
        "backbone's own next-token nll for reference. Short runs: the heads are far from "
        "converged, so these numbers compare ranks at a fixed small budget, not final "
        "quality (the shipped checkpoints train longer).",
        "",
        *table(points),
        "",
        *summary(points, args.ranks),
        "",
        f"Whole run {wall:.0f} s wall, {cpu:.0f} s CPU.",
    ])
    print(text)
    if not args.quick or args.write:
        write_section(RESULTS, SECTION, text)
        print(f"wrote {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
