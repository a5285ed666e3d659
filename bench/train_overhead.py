"""Training cost of CP heads: backbone alone versus backbone + CP heads (issue 8 targets).

At toy scale (``GPTConfig.preset("toy")``: 4 layers, 4 heads, width 128, block 128) it times
full training steps (forward, backward, AdamW step) on real stdlib code, batch 16 x 128 context
tokens, n = 4 future tokens, for

* the backbone alone (its next-token loss only),
* backbone + CP heads of rank 1, 4, 8 for each head structure ("full": one transform per
  (position, expert); "structured": one transform per position + rank-e expert corrections),
  each with the head loss on all positions and on a random subset (``head_positions``),

for two vocabularies: bytes (V = 256) and a byte-level BPE with V = 4096 trained on (the first
MB of) the code corpus. Reported: milliseconds per step, training tokens/s (context tokens per
second), the slowdown in tokens/s against the backbone alone, and the step-time ratio of rank r
to rank 1 at the same structure and positions.

Targets (issue 8): a rank-4, n = 4 step <= 1.25x the rank-1 step, and tokens/s with heads at
most 25% below the backbone alone.

Timing: one torch thread by default (``--threads``). The machine has 2 cores shared with other
jobs; with 2 threads a step stalls whenever a neighbour takes a core (up to 10x), and a first run
with 2 threads under load average ~5 gave contention-dominated numbers (the backbone alone slower
than backbone + heads). So the bench runs one thread and times each step in *process CPU time*
(``time.process_time``), which does not count the time a neighbour holds the core; the ratios
reported are compute-bound and this measures them stably. Every configuration is built once and the steps are
interleaved round-robin (so a busy neighbour slows all of them alike); after one warm-up step
per configuration each gets ``--reps`` timed steps and the table reports the minimum (the
least-disturbed step). Usage::

    .venv/bin/python bench/train_overhead.py            # ~2-4 minutes; updates bench/RESULTS.md
    .venv/bin/python bench/train_overhead.py --quick    # bytes only, 3 reps, does not write

The section "## Training cost of CP heads" of bench/RESULTS.md is replaced (others kept).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _results import write_section  # bench/ is on sys.path when run as a script

from cptoy.data import encode_corpus, get_tokenizer, load_corpus
from cptoy.heads import MTPModel
from cptoy.model import GPT, GPTConfig

SECTION = "## Training cost of CP heads"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
B, T, N_FUTURE = 16, 128, 4
RANKS = (1, 4, 8)
EXPERT_DIM = 16  # e of the structured heads (d = 128)
HEAD_POSITIONS = (None, 0.0625)  # all 2048 positions per batch, or a random 128 of them


def data_ids(kind: str, max_bytes: int) -> torch.Tensor:
    corpus = load_corpus("code", max_bytes=max_bytes)
    tok = get_tokenizer(kind, corpus, vocab_size=4096)
    return encode_corpus(corpus, tok).train_ids, tok.vocab_size


def build_cases(V: int):
    """name -> (step function, optimizer). Every model starts from the same seed."""
    cfg = GPTConfig.preset("toy", vocab_size=V)
    cases = {}
    torch.manual_seed(0)
    gpt = GPT(cfg)

    def backbone_loss(batch, gpt=gpt):
        h = gpt(batch[:, :T])  # (B, T, d)
        return F.cross_entropy(gpt.logits(h).reshape(B * T, V), batch[:, 1 : T + 1].reshape(-1))

    cases[("backbone", None, 0)] = (backbone_loss, gpt)
    for structure, e in (("full", None), ("structured", EXPERT_DIM)):
        for hp in HEAD_POSITIONS:
            for r in RANKS:
                torch.manual_seed(0)
                m = MTPModel(cfg, N_FUTURE, r, expert_dim=e, head_positions=hp)
                cases[(structure, hp, r)] = ((lambda batch, m=m: m.loss(batch)["total"]), m)
    out = {}
    for key, (fn, model) in cases.items():
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        out[key] = (fn, model, opt)
    return out


def time_cases(cases, ids: torch.Tensor, reps: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    batches = [
        ids[s : s + T + N_FUTURE]
        for s in torch.randint(
            0, ids.numel() - T - N_FUTURE, (B * (reps + 1),), generator=gen
        ).tolist()
    ]
    batches = torch.stack(batches).view(reps + 1, B, T + N_FUTURE)
    times = {k: [] for k in cases}
    for rep in range(reps + 1):
        for key, (fn, _model, opt) in cases.items():
            t0 = time.process_time()
            opt.zero_grad(set_to_none=True)
            fn(batches[rep]).backward()
            opt.step()
            dt = time.process_time() - t0
            if rep > 0:  # the first step of each configuration is a warm-up
                times[key].append(dt)
    return {k: min(v) for k, v in times.items()}


def hp_label(hp) -> str:
    if hp is None:
        return f"all {B * T}"
    return f"{hp:g} ({round(hp * B * T)})"


def table(vocab_label: str, V: int, best: dict) -> tuple[list[str], dict]:
    bb = best[("backbone", None, 0)]
    tok_bb = B * T / bb
    rows = [
        f"| {vocab_label} | backbone alone | - | - | {1e3 * bb:.0f} | {tok_bb:,.0f} | - | - |",
    ]
    summary = {}
    for structure in ("full", "structured"):
        for hp in HEAD_POSITIONS:
            r1 = best[(structure, hp, 1)]
            for r in RANKS:
                t = best[(structure, hp, r)]
                tps = B * T / t
                change = 100.0 * (tps / tok_bb - 1.0)  # negative = slower than the backbone
                ratio = t / r1
                summary[(structure, hp, r)] = (change, ratio)
                name = "full" if structure == "full" else f"structured e={EXPERT_DIM}"
                rows.append(
                    f"| {vocab_label} | {name} | {hp_label(hp)} | {r} | {1e3 * t:.0f} | {tps:,.0f} | "
                    f"{change:+.0f}% | {ratio:.2f} |"
                )
    return rows, summary


def verdicts(vocab_label: str, summary: dict) -> list[str]:
    lines = []
    for structure in ("full", "structured"):
        for hp in HEAD_POSITIONS:
            change, ratio = summary[(structure, hp, 4)]
            ok_ratio = "meets" if ratio <= 1.25 else f"misses by {ratio - 1.25:.2f}"
            ok_slow = "meets" if change >= -25 else f"misses by {-25 - change:.0f} points"
            name = "full" if structure == "full" else f"structured e={EXPERT_DIM}"
            lines.append(
                f"- {vocab_label}, {name}, head positions {hp_label(hp)}: rank-4 step / rank-1 step "
                f"{ratio:.2f} ({ok_ratio} <= 1.25); tokens/s {change:+.0f}% vs backbone "
                f"({ok_slow} >= -25%)"
            )
    return lines



def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=4, help="timed steps per configuration")
    ap.add_argument("--max-bytes", type=int, default=1_000_000, help="code corpus bytes to use")
    ap.add_argument("--quick", action="store_true", help="bytes only, 3 reps, do not write")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (2 cores, shared: 1 gives stable timings)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    reps = 3 if args.quick else args.reps
    t_start = time.perf_counter()
    vocabs = [("byte", "bytes V=256")] + ([] if args.quick else [("bpe", "BPE V=4096")])
    all_rows, all_verdicts = [], []
    for kind, label in vocabs:
        ids, V = data_ids(kind, args.max_bytes)
        t0 = time.perf_counter()
        best = time_cases(build_cases(V), ids, reps)
        rows, summary = table(label, V, best)
        for r in rows:
            print(r)
        print(f"({label}: {time.perf_counter() - t0:.0f} s)")
        all_rows += rows
        all_verdicts += verdicts(label, summary)
    total = time.perf_counter() - t_start
    text = "\n".join(
        [
            SECTION,
            "",
            "Generated by `bench/train_overhead.py`; do not edit by hand.",
            f"Machine: {platform.machine()}, 2 cores (shared with other jobs; load average {load:.1f} "
            f"at the start), torch threads {args.threads}, torch {torch.__version__}, "
            f"Python {platform.python_version()}.",
            f"Setting: preset `toy` (4 layers, width 128, block 128), batch {B} x {T} context tokens, "
            f"n = {N_FUTURE}, real stdlib code (first {args.max_bytes / 1e6:g} MB; BPE trained on it). "
            "One step = forward + backward + AdamW, timed in process CPU time (one thread). Minimum over "
            f"{reps} interleaved steps per row after a warm-up step. tokens/s counts context tokens "
            f"({B * T} per step) per CPU-second of one core. 'vs backbone' = change in tokens/s against the backbone alone "
            "(negative = slower). 'r / r1' = step time over the rank-1 step of the same structure "
            "and head positions. Head positions: the head loss on all positions or on a seeded "
            "random subset (`head_positions`, an unbiased estimate; evaluation always uses all).",
            "",
            "| vocab | heads | head positions | rank | CPU ms / step | tokens/s | vs backbone | r / r1 |",
            "|---|---|---|---|---|---|---|---|",
            *all_rows,
            "",
            "Why (forward multiply-adds per head position, d = 128, e = 16, n = 4): full heads cost "
            "n*r*(d^2 + d*V), structured heads n*(d^2 + d*V) + n*r*(d*e + e*V); both also need a "
            "softmax over V for each of the n*r (position, expert) pairs, and that elementwise work "
            "grows with r whatever the structure. The backbone costs about 12*L*d^2 + d*V = 0.79M + "
            "128*V per token, so at V = 4096 even rank-1 heads on every position (4 unembeddings) "
            "cost more than the backbone. The fused, chunked loss (`cptoy.heads`) keeps the memory "
            "at one chunk; what brings the heads within the targets is computing the head loss on a "
            "random subset of positions (`head_positions`).",
            "",
            "Against the issue-8 targets (rank 4, n = 4):",
            "",
            *all_verdicts,
            "",
            f"Whole run {total:.0f} s.",
        ]
    )
    print("\n".join(all_verdicts))
    print(f"whole run {total:.0f} s")
    if not args.quick:
        write_section(RESULTS, SECTION, text)
        print(f"updated {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
