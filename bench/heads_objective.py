"""Which objective should drafting heads on the frozen SmolLM2 learn? (the ablation)

Same heads, same cached features, same steps; only the target changes: the corpus tokens
("ce"), the backbone's own greedy tokens ("top1") or its top-k distribution ("kl"). Scored by
teacher-forced acceptance on held-out code (``cptoy.headtrain.cached_acceptance``: drafts given
the true earlier tokens, accepted when equal to the backbone's greedy token) and, for "kl" vs
"ce", also by the expected acceptance of *sampling* at T = 1 over the backbone's top-k mass.

    .venv/bin/python bench/heads_objective.py [--steps 300] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _results import write_section  # noqa: E402

from cptoy import pretrained  # noqa: E402
from cptoy.features import build_feature_cache, corpus_windows  # noqa: E402
from cptoy.headtrain import (  # noqa: E402
    OBJECTIVES,
    HeadTrainConfig,
    build_heads_model,
    cached_acceptance,
    concat_caches,
    shortlist_from_cache,
    train_heads,
)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--windows", type=int, nargs=2, default=[240, 60])
    p.add_argument("--val-windows", type=int, default=24)
    p.add_argument("--shortlist", type=int, default=8192)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="a smoke run (tiny sizes, no RESULTS)")
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.windows, a.val_windows = 5, [2, 1], 2
    torch.set_num_threads(a.threads)
    backbone, tok = pretrained.load("smollm2-135m")
    caches = [build_feature_cache(backbone, corpus_windows(tok, c, n), f"smollm2-135m-{c}-train-w512")
              for c, n in zip(("code", "shakespeare"), a.windows, strict=True)]
    cache = concat_caches(caches)
    val = build_feature_cache(backbone, corpus_windows(tok, "code", a.val_windows, 512, "val"),
                              "smollm2-135m-code-val-w512")
    S = shortlist_from_cache(cache, a.shortlist)
    rows = []
    for kind, rank in (("cp", 1), ("first_token", 1)):
        for objective in OBJECTIVES:
            model = build_heads_model(backbone, kind, 4, rank, seed=0)
            model.heads.set_draft_vocab(S)
            t0 = time.perf_counter()
            hist = train_heads(model, cache, HeadTrainConfig(
                objective=objective, steps=a.steps, batch_size=a.batch_size), progress=False)
            acc = cached_acceptance(model, val)
            rows.append((kind, objective, hist["steps"], time.perf_counter() - t0, acc))
            print(kind, objective, f"{acc['tokens_per_forward']:.3f}",
                  [round(x, 3) for x in acc["acceptance"]], flush=True)
    if a.quick:
        return
    lines = [
        "## Head objective on the frozen SmolLM2 (bench/heads_objective.py)",
        "",
        f"{time.strftime('%Y-%m-%d')}, `.venv/bin/python bench/heads_objective.py --steps "
        f"{a.steps}`, {a.threads} thread(s). Training: {cache.num_tokens:,} cached tokens "
        f"(code + Shakespeare train splits), shortlist K = {a.shortlist}, n = 4, batch "
        f"{a.batch_size}, {a.steps} steps each, same seed. Scored on {val.num_tokens:,} tokens "
        "of held-out code: drafts given the true earlier tokens, accepted when equal to the "
        "backbone's own greedy token (teacher-forced, T = 0).",
        "",
        "| heads | objective | steps | train s | tokens/forward | acceptance d2 / d3 / d4 |",
        "|---|---|---|---|---|---|",
    ]
    for kind, objective, steps, sec, acc in rows:
        lines.append(f"| {kind} | {objective} | {steps} | {sec:.0f} | "
                     f"{acc['tokens_per_forward']:.3f} | "
                     + " / ".join(f"{x:.3f}" for x in acc["acceptance"]) + " |")
    best = max(rows, key=lambda r: r[4]["tokens_per_forward"])
    lines += ["", f"Best: {best[0]} heads with objective {best[1]!r}."]
    write_section(ROOT / "bench" / "RESULTS.md", lines[0], "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
