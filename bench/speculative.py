"""Self-speculative decoding with the shipped CP-head checkpoints: acceptance and wall-clock.

Everything is measured with ``cptoy.evaluate`` (the one protocol the notebooks and widgets use):

1. Verification cost on this CPU: time of a k-token cached forward relative to a 1-token
   forward, the drafting time of each rank, and the wall-clock ceiling they imply.
2. Teacher-forced acceptance on held-out text, per corpus, rank and temperature: expected
   tokens per forward for n = 2..6 (n = drafts + 1), greedy match and speculative (min(1, p/q)).
3. Wall-clock decoding on held-out prompts, one interleaved run per table (corpus x
   temperature): autoregressive, self-spec for every rank and n, prompt lookup and the
   verifier-free heads-only decoder, all on the same backbone with the KV cache; tokens per
   forward, tokens/s, speed-up over AR of the same run, drafting share, repeated 4-grams and
   whitespace share beside every figure.
4. The issue targets, met or missed by how much, and what holds them back.

Usage::

    .venv/bin/python bench/speculative.py            # full run (< 10 min), updates RESULTS.md
    .venv/bin/python bench/speculative.py --quick    # smoke run (~1 min); does not write
    .venv/bin/python bench/speculative.py --dev-dir /tmp/devckpt   # other checkpoints

The section "## Self-speculative decoding" of bench/RESULTS.md is replaced (others kept).
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from _results import write_section  # bench/ is on sys.path when run as a script

from cptoy.evaluate import (
    Method,
    benchmark_methods,
    format_table,
    heldout_ids,
    heldout_prompts,
    predicted_speedup,
    teacher_forced_acceptance,
    verify_cost,
)

SECTION = "## Self-speculative decoding"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
NAME = re.compile(r"^(code|shakespeare)_r(\d+)$")


@dataclass
class BenchConfig:
    temperatures: tuple[float, ...] = (0.0, 0.8, 1.0)  # decoding / teacher-forcing temperatures
    n_values: tuple[int, ...] = (2, 3, 4, 5, 6)  # tokens per forward at most (drafts + 1)
    headline_n: int = 4  # n of the headline figures and of lookup / heads-only
    prompts: int = 6  # held-out prompts per table
    prompt_tokens: int = 32  # tokens per prompt
    max_new_tokens: int = 96  # new tokens per prompt (prompt + new <= block_size)
    tf_positions: int = 1024  # held-out positions for teacher forcing
    heldout_chars: int = 200_000  # characters of the validation split to draw from
    verify_repeats: int = 40  # timing rounds of verify_cost
    seed: int = 0


QUICK = BenchConfig(temperatures=(0.8,), n_values=(4,), prompts=2, max_new_tokens=24,
                    tf_positions=128, heldout_chars=50_000, verify_repeats=5)


def load_models(dev_dir: str | None) -> dict[str, dict[int, tuple]]:
    """corpus -> rank -> (model, tokenizer): the shipped checkpoints (or those in dev_dir)."""
    from cptoy import checkpoints

    if dev_dir is None:
        names = checkpoints.available()

        def load(name):
            model, tok, _ = checkpoints.load(name)
            return model, tok
    else:
        from cptoy.data import tokenizer_from_dict
        from cptoy.heads import MTPModel

        names = sorted(p.stem for p in Path(dev_dir).glob("*.pt"))

        def load(name):
            model = MTPModel.load(Path(dev_dir) / f"{name}.pt").eval()
            return model, tokenizer_from_dict(model.tokenizer_dict)

    out: dict[str, dict[int, tuple]] = {}
    for name in names:
        m = NAME.match(name)
        if m:
            out.setdefault(m.group(1), {})[int(m.group(2))] = load(name)
    if not out:
        raise SystemExit(f"no checkpoints named <code|shakespeare>_r<rank> found "
                         f"({'cptoy/checkpoints' if dev_dir is None else dev_dir}): {names}")
    return out


def tf_table(corpus, models, ids, cfg) -> tuple[str, dict]:
    """Teacher-forced tokens per forward for every rank, temperature and n. One TF evaluation
    with the most drafts gives every smaller n: drafts 2..j+1 do not depend on later ones."""
    rows, best = [], {}
    for rank, (model, _) in sorted(models.items()):
        ns = [n for n in cfg.n_values if n <= model.n_future]
        for T in cfg.temperatures:
            res = teacher_forced_acceptance(model, ids, n_draft=max(ns) - 1, temperature=T,
                                            max_positions=cfg.tf_positions, seed=cfg.seed)
            row = {"corpus": corpus, "rank": rank, "T": T, "positions": res.n_positions}
            for n in cfg.n_values:
                if n in ns:
                    row[f"n={n}"] = 1 + sum(res.spec_prefix[:n - 1])
                    best[(rank, T, n)] = row[f"n={n}"]
                else:
                    row[f"n={n}"] = float("nan")
            hn = cfg.headline_n
            row[f"greedy match n={hn}"] = (1 + sum(res.greedy_prefix[:hn - 1])
                                           if hn in ns else float("nan"))
            row["acceptance by position"] = res.spec_acceptance
            row["s"] = res.seconds
            rows.append(row)
    cols = (["corpus", "rank", "T", "positions"] + [f"n={n}" for n in cfg.n_values]
            + [f"greedy match n={cfg.headline_n}", "acceptance by position", "s"])
    return format_table(rows, columns=cols), best


def cost_table(corpus, models, cfg) -> tuple[str, dict]:
    rows, costs = [], {}
    kmax = max(cfg.n_values)
    for rank, (model, _) in sorted(models.items()):
        ks = list(range(1, kmax + 1))  # drafting is timed where the heads reach (k <= n_future)
        c = verify_cost(model, ks, context_length=64, repeats=cfg.verify_repeats,
                        seed=cfg.seed)
        costs[rank] = c
        for r in c:
            rows.append({"corpus": corpus, "rank": rank, "k": r.k, "t(k) ms": r.ms,
                         "t(k)/t(1)": r.ratio, "ceiling k t(1)/t(k)": r.ceiling,
                         "draft k-1 ms": r.draft_ms, "draft / t(1)": r.draft_ratio,
                         "ceiling with drafting": r.ceiling_with_draft})
    return format_table(rows), costs


def wall_table(corpus, models, prompts, tok, T, cfg) -> tuple[str, list]:
    ranks = sorted(models)
    base = models[ranks[0]][0]
    hn = cfg.headline_n
    methods = [Method("backbone", base, "ar")]
    for rank in ranks:
        model = models[rank][0]
        for n in cfg.n_values:
            if n <= model.n_future:
                methods.append(Method(f"rank {rank}, n={n}", model, "self-spec", n - 1))
    methods.append(Method(f"lookup, n={hn}", base, "lookup", hn - 1))
    top = models[ranks[-1]][0]
    if hn <= top.n_future:
        methods.append(Method(f"rank {ranks[-1]}, n={hn}", top, "heads-only", hn - 1))
    rows = benchmark_methods(methods, prompts, temperature=T,
                             max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                             decode=tok.decode)
    for r in rows:
        r.model = f"{corpus}: {r.model}"
    cols = [("method", "model"), ("strategy", "strategy"), ("kind", "label"),
            ("tokens/forward", "tokens_per_forward"), ("tokens/s", "tokens_per_second"),
            ("speed-up vs AR", "speedup"), ("draft share", "draft_share"),
            ("forward share", "forward_share"), ("repeated 4-grams", "repetition"), ("whitespace", "whitespace"),
            ("= AR (T=0)", "equal_to_ar"), ("acceptance by position", "acceptance")]
    return format_table(rows, columns=cols), rows


def targets(tf_best: dict, walls: dict, costs: dict, cfg) -> list[str]:
    """Issue targets (issue 4 / 8) with how far each is from being met."""
    out = []
    hn = cfg.headline_n
    for corpus in tf_best:
        best = tf_best[corpus]
        ranks = sorted({r for r, _, _ in best})
        for T in cfg.temperatures:
            vals = {r: best.get((r, T, hn), float("nan")) for r in ranks}
            r_best = max(vals, key=lambda r: vals[r])
            line = (f"- {corpus}, teacher-forced tokens/forward at n={hn}, T={T:g}: best rank "
                    f"{r_best} {vals[r_best]:.2f} (target >= 3.0: "
                    + ("met" if vals[r_best] >= 3.0 else f"missed by {3.0 - vals[r_best]:.2f}")
                    + ")")
            if len(ranks) > 1:
                ratio = vals[ranks[-1]] / vals[ranks[0]]
                line += (f"; rank {ranks[-1]} / rank {ranks[0]} = {ratio:.2f} (target >= 1.2: "
                         + ("met" if ratio >= 1.2 else f"missed by {1.2 - ratio:.2f}") + ")")
            out.append(line)
    for (corpus, T), rows in walls.items():
        spec = [r for r in rows if r.strategy == "self-spec"]
        if not spec:
            continue
        at_n = [r for r in spec if r.n_draft + 1 == hn]
        if at_n:
            t = max(at_n, key=lambda r: r.tokens_per_forward)
            out.append(
                f"- {corpus}, decoding at T={T:g}, n={hn}: best tokens/forward "
                f"{t.tokens_per_forward:.2f} ({t.model.split(': ')[1]}; target >= 3.0: "
                + ("met" if t.tokens_per_forward >= 3.0
                   else f"missed by {3.0 - t.tokens_per_forward:.2f}")
                + f"), repeated 4-grams {t.repetition:.2f}")
        b = max(spec, key=lambda r: r.speedup)
        k = b.n_draft + 1
        rank = int(re.search(r"rank (\d+)", b.model).group(1))
        pred = predicted_speedup(b.tokens_per_forward, costs[corpus][rank], k)
        by = {c.k: c for c in costs[corpus][rank]}
        out.append(
            f"- {corpus}, wall-clock at T={T:g}: best self-spec is {b.model.split(': ')[1]} "
            f"with {b.speedup:.2f}x over AR (target >= 2.0: "
            + ("met" if b.speedup >= 2.0 else f"missed by {2.0 - b.speedup:.2f}")
            + f") at {b.tokens_per_forward:.2f} tokens/forward, repeated 4-grams "
            f"{b.repetition:.2f}. A {k}-token verify costs {by[k].ratio:.2f}x a 1-token "
            f"forward and drafting {by[k].draft_ratio:.2f}x, so these tokens/forward allow at "
            f"most {pred:.2f}x. Of the wall time, drafting takes {b.draft_share:.0%}, backbone "
            f"forwards {b.forward_share:.0%} and the per-step accept/sample bookkeeping the "
            f"remaining {1 - b.draft_share - b.forward_share:.0%}.")
    return out



def _metrics_brief(metrics: dict) -> str:
    """The recorded held-out losses of a checkpoint in nats per byte, one short phrase."""
    val = metrics.get("val", {})
    keys = ("next_token_nats_per_byte", "joint_nats_per_byte", "first_token_nats_per_byte")
    if not all(k in val for k in keys):
        return "none recorded"
    return "next-token {:.3f}, joint {:.3f}, first-token {:.3f} nats/byte".format(*(val[k] for k in keys))


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run; does not write RESULTS.md")
    ap.add_argument("--write", action="store_true", help="write RESULTS.md even with --quick")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--dev-dir", default=None,
                    help="load <corpus>_r<rank>.pt from this folder instead of the shipped ones")
    args = ap.parse_args(argv)
    cfg = QUICK if args.quick else BenchConfig()
    torch.set_num_threads(args.threads)
    torch.manual_seed(cfg.seed)
    t_start = time.perf_counter()
    groups = load_models(args.dev_dir)

    tf_text, cost_text, wall_text = [], [], []
    tf_best, costs, walls, info = {}, {}, {}, []
    for corpus, models in groups.items():
        tok = next(iter(models.values()))[1]
        m0 = next(iter(models.values()))[0]
        info.append(f"{corpus}: ranks {sorted(models)}, n_future "
                    f"{sorted({m.n_future for m, _ in models.values()})}, backbone "
                    f"{m0.config.n_layer} layers x {m0.config.n_embd}, V={m0.config.vocab_size}, "
                    f"block {m0.config.block_size}; held-out metrics "
                    + "; ".join(f"r{r}: {_metrics_brief(getattr(m, 'metrics', {}))}"
                                for r, (m, _) in sorted(models.items())))
        print(f"[{time.perf_counter() - t_start:5.0f}s] {corpus}: verification cost",
              file=sys.stderr)
        t, costs[corpus] = cost_table(corpus, models, cfg)
        cost_text.append(t)
        ids = heldout_ids(corpus, tok, cfg.heldout_chars)
        print(f"[{time.perf_counter() - t_start:5.0f}s] {corpus}: teacher forcing",
              file=sys.stderr)
        t, tf_best[corpus] = tf_table(corpus, models, ids, cfg)
        tf_text.append(t)
        prompts = heldout_prompts(corpus, tok, num=cfg.prompts, prompt_tokens=cfg.prompt_tokens,
                                  seed=cfg.seed, max_chars=cfg.heldout_chars)
        for T in cfg.temperatures:
            print(f"[{time.perf_counter() - t_start:5.0f}s] {corpus}: decoding at T={T:g}",
                  file=sys.stderr)
            t, walls[(corpus, T)] = wall_table(corpus, models, prompts, tok, T, cfg)
            wall_text.append(f"**{corpus}, T = {T:g}** ({cfg.prompts} held-out prompts of "
                             f"{cfg.prompt_tokens} tokens, {cfg.max_new_tokens} new tokens "
                             f"each)\n\n{t}")
    total = time.perf_counter() - t_start

    text = "\n".join([
        SECTION,
        "",
        "Generated by `bench/speculative.py` (protocol: `cptoy.evaluate`); do not edit by hand.",
        f"Machine: {platform.machine()}, 2 cores (shared), torch threads {args.threads}, torch "
        f"{torch.__version__}, Python {platform.python_version()}. Whole run "
        f"{total:.0f} s{' (QUICK smoke run)' if args.quick else ''}.",
        "Models: " + " | ".join(info),
        "",
        "### Targets",
        "",
        *targets(tf_best, walls, costs, cfg),
        "",
        "### Verification cost on this CPU",
        "",
        "t(k) = time of a k-token cached forward plus its logits after 64 cached tokens, and",
        "drafting = the heads' `draft` for k - 1 tokens (lower quartile of the rounds: other",
        "processes preempt a share of the calls on this shared CPU). Ceilings: k t(1) / t(k) if",
        "every draft were accepted and free; with drafting k t(1) / (t(k) + draft).",
        "",
        *[t + "\n" for t in cost_text],
        "### Teacher-forced acceptance on held-out text",
        "",
        "Expected tokens per forward of the speculative rule min(1, p/q) at each n (= drafts + 1)",
        "with the true text as prefix (x_1 = the true next token), and the greedy-match figure",
        "(CP mode drafts equal to the true text). Acceptance by position: Pr(draft j accepted |",
        "earlier drafts accepted), j = 2, 3, ...",
        "",
        *[t + "\n" for t in tf_text],
        "### Wall-clock decoding",
        "",
        "One interleaved run per table; all methods use the same backbone with the KV cache.",
        "lossless = output distributed exactly as the backbone's (T = 0: identical tokens, column",
        "`= AR`); heads-only keeps unverified drafts (lossy, verifier-free) and is shown for its",
        "speed and its repetition, not as a usable decoder.",
        "",
        *[t + "\n" for t in wall_text],
    ])
    print(text)
    print(f"total {total:.0f} s", file=sys.stderr)
    if (not args.quick or args.write) and not args.no_write:
        write_section(RESULTS, SECTION, text)
        print(f"wrote {RESULTS}", file=sys.stderr)
    return text


if __name__ == "__main__":
    main()
