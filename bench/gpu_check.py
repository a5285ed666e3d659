"""GPU check: GPT-2 scale self-speculative decoding, end to end, in one short run.

    PYTHONPATH=. python3 bench/gpu_check.py [--minutes M] [--rank R]      (make gpu-check)

Detects the device. On CUDA: the full ``gpt2`` preset (124M parameters, V = 50257) on the code
corpus (Python standard library) with a byte-level BPE of GPT-2's vocabulary size; the backbone
trains with next-token loss under bf16 autocast for ~60% of the budget, then CP heads of rank 1
and rank R on it, frozen, with the distillation objective (``cptoy.distill``), ~20% each. Then
greedy decoding (float32, batch 1) autoregressive versus self-speculative for both ranks, on the
same prompts, each rank drafting over the whole vocabulary and over a frequency shortlist of the
training tokens (``CPHeads.set_draft_vocab``), rank R also with one-expert routing (the cheap
drafters of issue 8); the script checks that every self-spec output equals autoregressive
output token for token, and prints a markdown table. Default budget 4 minutes of training: the whole run fits in
8 minutes on one H100 including start-up.

On a CPU it runs a scaled-down preset (``toy``: 4 layers, 128 wide, BPE vocabulary 4096, 2 MB of
the corpus) for ~0.7 minutes of training and says so: a smoke test of the same code path, not a
GPT-2 measurement.

Needs only torch, numpy, tqdm and tokenizers (no tensorly, plotly or ipywidgets). Exit status 1
when any self-spec output differs from the autoregressive one.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

T_START = time.perf_counter()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cptoy.data import BPETokenizer, encode_corpus, load_corpus  # noqa: E402
from cptoy.decoding import generate  # noqa: E402
from cptoy.distill import distill_loss_fn  # noqa: E402
from cptoy.heads import MTPModel, frequency_shortlist  # noqa: E402
from cptoy.model import GPTConfig  # noqa: E402
from cptoy.train import TrainConfig, train  # noqa: E402

# settings per device kind: preset and overrides, corpus bytes, BPE vocabulary, training shapes
SETTINGS = {
    "cuda": dict(
        preset="gpt2", overrides={}, max_bytes=None, bpe_vocab=50257, bpe_bytes=4_000_000,
        minutes=4.0, backbone_batch=32, backbone_block=256, backbone_lr=1e-3,
        head_batch=16, head_block=256, head_positions=256, head_lr=1e-3,
        prompts=8, prompt_tokens=32, new_tokens=128, shortlist=4096,
    ),
    "cpu": dict(
        preset="toy", overrides={}, max_bytes=2_000_000, bpe_vocab=4096, bpe_bytes=2_000_000,
        minutes=0.7, backbone_batch=16, backbone_block=64, backbone_lr=3e-3,
        head_batch=8, head_block=64, head_positions=64, head_lr=3e-3,
        prompts=3, prompt_tokens=24, new_tokens=32, shortlist=512,
    ),
}


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T_START:6.1f}s] {msg}", flush=True)


def next_token_loss(model: MTPModel, batch: torch.Tensor) -> dict:
    """Backbone-only next-token loss on a (B, T + n) batch (the heads get no gradient)."""
    T = batch.shape[1] - model.n_future
    logits = model.backbone.logits(model.backbone(batch[:, :T]))  # (B, T, V)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                           batch[:, 1 : T + 1].reshape(-1))
    return dict(total=loss, next_token_nll=loss)


def prompts_from(ids: torch.Tensor, num: int, length: int, seed: int) -> list[list[int]]:
    """``num`` prompts of ``length`` tokens from held-out ids at seeded offsets."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - length, (num,), generator=g).sort().values
    return [ids[s : s + length].tolist() for s in starts.tolist()]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def decode_all(model, prompts, strategy: str, new_tokens: int, device,
               routing: str = "mixture") -> dict:
    """Greedy decoding of every prompt (one untimed warm-up first); totals over prompts."""
    kw = dict(routing=routing) if strategy == "self-spec" else {}
    generate(model, prompts[0], min(8, new_tokens), temperature=0.0, strategy=strategy, seed=0,
             **kw)
    outs, tokens, forwards, secs = [], 0, 0, 0.0
    for i, p in enumerate(prompts):
        sync(device)
        t = time.perf_counter()
        g = generate(model, p, new_tokens, temperature=0.0, strategy=strategy, seed=i, **kw)
        sync(device)
        secs += time.perf_counter() - t
        outs.append(g.tokens)
        tokens += len(g.tokens)
        forwards += g.stats.forward_passes
    return dict(outs=outs, tokens=tokens, tok_s=tokens / secs, tpf=tokens / forwards, secs=secs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=None,
                    help="training budget in minutes, backbone 60%% + heads 2 x 20%% "
                         "(default 4 on CUDA, 0.7 on CPU)")
    ap.add_argument("--rank", type=int, default=8, help="the rank r compared with rank 1")
    ap.add_argument("--n-future", type=int, default=4, help="tokens modelled by the heads")
    ap.add_argument("--alpha", type=float, default=0.5, help="weight of the distillation KL")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens decoded per prompt")
    ap.add_argument("--prompts", type=int, default=None, help="number of prompts")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    args = ap.parse_args(argv)
    if args.minutes is not None and not (math.isfinite(args.minutes) and args.minutes > 0):
        raise ValueError(f"--minutes must be a positive number, got {args.minutes}")
    if args.rank < 1 or args.n_future < 2:
        raise ValueError("--rank must be >= 1 and --n-future >= 2")

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda asked for, but CUDA is not available")
    S = dict(SETTINGS[device.type])
    minutes = args.minutes if args.minutes is not None else S["minutes"]
    new_tokens = args.new_tokens or S["new_tokens"]
    n_prompts = args.prompts or S["prompts"]
    torch.manual_seed(0)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 decoding stays float32
        log(f"device: {name} (CUDA): full '{S['preset']}' preset")
    else:
        name = "CPU"
        torch.set_num_threads(1)  # small models: one thread is fastest on a shared CPU
        log(f"device: CPU, no CUDA: running a SCALED-DOWN '{S['preset']}' preset, not GPT-2 "
            f"size (a smoke test of the code path; run on a CUDA machine for the real check)")

    # ---- data: code corpus, byte-level BPE
    corpus = load_corpus("code", max_bytes=S["max_bytes"])
    tok = BPETokenizer.train(corpus.train[: S["bpe_bytes"]], vocab_size=S["bpe_vocab"],
                             name="code-gpucheck")
    corpus = encode_corpus(corpus, tok)
    train_ids, val_ids = corpus.train_ids, corpus.val_ids
    log(f"data: {train_ids.numel():,} train / {val_ids.numel():,} val tokens, "
        f"BPE vocabulary {tok.vocab_size}")

    # ---- backbone
    preset_v = GPTConfig.preset(S["preset"]).vocab_size
    vocab = preset_v if S["preset"] == "gpt2" else tok.vocab_size
    cfg = GPTConfig.preset(S["preset"], vocab_size=max(vocab, tok.vocab_size), **S["overrides"])
    n = args.n_future
    base = MTPModel(cfg, n, 1)
    n_params = base.backbone.num_params()
    mem_gib = n_params * 16 / 2**30  # fp32 weights + grads + AdamW's two moments
    log(f"model: {S['preset']} {n_params / 1e6:.1f}M parameters, ~{mem_gib:.1f} GiB for "
        f"training state (weights, grads, AdamW)")
    bb = train(base, train_ids, None,
               TrainConfig(steps=None, minutes=0.6 * minutes, batch_size=S["backbone_batch"],
                           block_size=S["backbone_block"], lr=S["backbone_lr"],
                           min_lr=S["backbone_lr"] / 10, warmup=50, device=str(device), seed=0),
               progress=False, loss_fn=next_token_loss)
    last = bb["train"][-1]["next_token_nll"] if bb["train"] else float("nan")
    log(f"backbone: {bb['steps']} steps, {bb['tokens']:,} tokens in {bb['seconds']:.0f}s, "
        f"train next-token loss {last:.3f} nats/token")
    backbone_state = {k: v for k, v in base.state_dict().items() if k.startswith("backbone.")}
    del base, bb

    # ---- heads of rank 1 and r on the frozen backbone, distillation objective
    models = {}
    for r in sorted({1, args.rank}):
        m = MTPModel(cfg, n, r, freeze_backbone=True, seed=r)
        m.load_weights(backbone_state, source="trained backbone", prefix="backbone.")
        h = train(m, train_ids, None,
                  TrainConfig(steps=None, minutes=0.2 * minutes, batch_size=S["head_batch"],
                              block_size=S["head_block"], lr=S["head_lr"],
                              min_lr=S["head_lr"] / 10, warmup=20, device=str(device), seed=r),
                  progress=False,
                  loss_fn=distill_loss_fn(alpha=args.alpha, positions=S["head_positions"]))
        rec = h["train"][-1]
        log(f"heads r={r}: {h['steps']} steps in {h['seconds']:.0f}s, kl {rec['kl']:.3f}, "
            f"joint nll {rec['joint_nll']:.3f} nats/token")
        models[r] = m.to(device).eval()

    # ---- decoding: AR vs self-spec, greedy, float32, batch 1
    prompts = prompts_from(val_ids, n_prompts, S["prompt_tokens"], seed=0)
    ar = decode_all(models[1], prompts, "ar", new_tokens, device)
    rows = [("autoregressive", ar, None)]
    ok = True
    K = min(S["shortlist"], cfg.vocab_size)
    shortlist = frequency_shortlist(train_ids, cfg.vocab_size, K)
    drafters = []
    for r in models:
        drafters += [(r, None, "mixture", ""), (r, shortlist, "mixture", f", shortlist {K}")]
        if r > 1:
            drafters.append((r, shortlist, "expert", f", shortlist {K}, one expert"))
    for r, vocab, routing, label in drafters:
        models[r].heads.set_draft_vocab(vocab)
        res = decode_all(models[r], prompts, "self-spec", new_tokens, device, routing)
        eq = sum(a == b for a, b in zip(ar["outs"], res["outs"], strict=True))
        ok = ok and eq == len(prompts)
        rows.append((f"self-spec rank {r}{label}", res, eq))
    log("decoding done")

    scale = "full gpt2 preset" if S["preset"] == "gpt2" else f"SCALED-DOWN '{S['preset']}' preset"
    print()
    print(f"GPU check on **{name}** ({scale}, {n_params / 1e6:.1f}M parameters, V = "
          f"{cfg.vocab_size}, n = {n}, training budget {minutes:g} min, greedy float32 decoding, "
          f"batch 1, {len(prompts)} prompts x {new_tokens} tokens)")
    print()
    print("| device | model | method | tokens/s | tokens per forward | speed-up vs AR "
          "| output == AR |")
    print("|---|---|---|---|---|---|---|")
    for label, res, eq in rows:
        same = "-" if eq is None else f"{eq}/{len(prompts)}"
        print(f"| {name} | {n_params / 1e6:.1f}M | {label} | {res['tok_s']:.1f} | "
              f"{res['tpf']:.2f} | {res['tok_s'] / ar['tok_s']:.2f}x | {same} |")
    print()
    total = time.perf_counter() - T_START
    print(f"total wall time {total:.0f}s; greedy equality {'PASSED' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
