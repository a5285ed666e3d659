"""Command line: ``python -m cptoy train | sample | figures | present``.

Examples::

    python -m cptoy train --corpus code --tokenizer bpe --rank 4 --n-future 4 --preset toy \\
        --minutes 1 --out runs/code_r4.pt
    python -m cptoy train --corpus code --tokenizer bpe --rank 1 --n-future 4 \\
        --freeze-backbone --init runs/code_r4.pt --steps 300 --out runs/code_r1_heads.pt
    python -m cptoy sample --ckpt runs/code_r4.pt --prompt "def " --strategy self-spec
    python -m cptoy figures --out figures
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time


def _positive_float(s: str) -> float:
    v = float(s)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return v


def _head_positions(s: str):
    if s.lower() in ("none", "all"):
        return None
    v = float(s)
    if "." in s or "e" in s.lower():
        return v
    return int(v)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cptoy", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a GPT + CP heads (or only heads on a frozen backbone)")
    t.add_argument("--corpus", choices=["code", "shakespeare", "hmm"], required=True)
    t.add_argument(
        "--tokenizer",
        choices=["byte", "bpe"],
        default="byte",
        help="ignored for hmm (already token ids)",
    )
    t.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size")
    t.add_argument("--max-bytes", type=int, default=None, help="cap on the corpus size")
    t.add_argument("--rank", type=int, required=True)
    t.add_argument("--n-future", type=int, required=True)
    t.add_argument("--preset", default="toy", help="GPTConfig preset: tiny, toy, small, gpt2")
    t.add_argument("--block-size", type=int, default=None, help="override the preset's block size")
    t.add_argument(
        "--expert-dim",
        type=int,
        default=None,
        help="structured heads with rank-e expert corrections (default: full heads)",
    )
    t.add_argument(
        "--head-positions",
        type=_head_positions,
        default=None,
        help="positions per batch for the head loss: a fraction (0.25) or a count (64)",
    )
    t.add_argument("--load-balance-coef", type=float, default=0.01)
    t.add_argument("--joint-weight", type=float, default=1.0)
    t.add_argument("--minutes", type=_positive_float, default=None)
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--warmup", type=int, default=50)
    t.add_argument("--eval-every", type=int, default=200)
    t.add_argument("--eval-batches", type=int, default=8)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto")
    t.add_argument("--freeze-backbone", action="store_true", help="train only the heads")
    t.add_argument(
        "--init",
        default=None,
        metavar="CKPT",
        help="start the backbone from this checkpoint (its tokenizer and config are used)",
    )
    t.add_argument("--half", action="store_true", help="save weights in float16")
    t.add_argument(
        "--draft-vocab", type=int, default=None, metavar="K",
        help="store a drafting shortlist: the K most frequent training tokens "
        "(cheaper drafting; decoding stays lossless)",
    )
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--out", required=True, help="checkpoint path to write")

    s = sub.add_parser("sample", help="generate text from a checkpoint")
    s.add_argument("--ckpt", required=True)
    s.add_argument("--prompt", default="\n")
    s.add_argument("--max-new-tokens", type=int, default=200)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--strategy", choices=["ar", "self-spec", "lookup"], default="ar")
    s.add_argument("--routing", choices=["mixture", "expert"], default="mixture",
                   help="self-spec: q = the CP mixture, or one expert drawn from the posterior")
    s.add_argument("--seed", type=int, default=0)

    f = sub.add_parser("figures", help="regenerate the static figures")
    f.add_argument("--out", default="figures")
    sub.add_parser("present", help="serve the lecture dashboard with Voila (see cptoy/present.py)",
                   add_help=False)
    return p


def cmd_train(args) -> int:
    import torch

    from cptoy.data import encode_corpus, get_tokenizer, load_corpus, tokenizer_from_dict
    from cptoy.heads import MTPModel
    from cptoy.model import GPTConfig
    from cptoy.train import TrainConfig, evaluate_loss, init_backbone, save_checkpoint, train

    if args.steps is None and args.minutes is None:
        raise SystemExit("train: give --minutes or --steps (or both)")
    corpus = load_corpus(args.corpus, max_bytes=args.max_bytes)
    init_ckpt = None
    if args.init is not None:
        init_ckpt = MTPModel.read_checkpoint(args.init)
        if init_ckpt.get("tokenizer") is None:
            raise SystemExit(f"--init {args.init}: the checkpoint carries no tokenizer")
        tok = tokenizer_from_dict(init_ckpt["tokenizer"])
        config = GPTConfig(**init_ckpt["config"])
        print(f"backbone, config and tokenizer from {args.init} ({tok!r})")
    else:
        kind = "identity" if args.corpus == "hmm" else args.tokenizer
        tok = get_tokenizer(kind, corpus, vocab_size=args.vocab_size)
        overrides = dict(vocab_size=tok.vocab_size)
        if args.block_size is not None:
            overrides["block_size"] = args.block_size
        config = GPTConfig.preset(args.preset, **overrides)
    corpus = encode_corpus(corpus, tok)
    bpt = None
    if corpus.is_text:
        bpt = len(corpus.val.encode("utf-8")) / max(1, corpus.val_ids.numel())

    model = MTPModel(
        config,
        args.n_future,
        args.rank,
        load_balance_coef=args.load_balance_coef,
        joint_weight=args.joint_weight,
        expert_dim=args.expert_dim,
        head_positions=args.head_positions,
        seed=args.seed,
    )
    if args.init is not None:
        init_backbone(model, args.init)
    if args.freeze_backbone:
        model.freeze_backbone()
    cfg = TrainConfig(
        steps=args.steps,
        minutes=args.minutes,
        batch_size=args.batch_size,
        block_size=args.block_size,
        lr=args.lr,
        min_lr=args.lr / 10,
        warmup=args.warmup,
        eval_every=args.eval_every,
        eval_batches=args.eval_batches,
        seed=args.seed,
        device=args.device,
        bytes_per_token=bpt,
    )
    print(
        f"{corpus!r}; {config}; heads: n={args.n_future} r={args.rank} "
        f"{model.heads.structure} ({model.heads.num_params():,} head params); "
        f"{'frozen backbone' if args.freeze_backbone else 'training everything'}"
    )
    hist = train(model, corpus.train_ids, corpus.val_ids, cfg, progress=not args.no_progress)
    model.to("cpu")
    final = evaluate_loss(model, corpus.val_ids, cfg.batch_size, cfg.block_size, 32, bpt)
    metrics = dict(
        val=final,
        steps=hist["steps"],
        seconds=hist["seconds"],
        tokens_per_s=hist["tokens_per_s"],
        device=hist["device"],
        corpus=args.corpus,
        bytes_per_token=bpt,
        eval_batches=32,
        eval_batch_size=cfg.batch_size,
    )
    extra = dict(command="python -m cptoy " + shlex.join(args.argv), time=time.time())
    if args.draft_vocab is not None:
        from cptoy.heads import frequency_shortlist

        model.heads.set_draft_vocab(
            frequency_shortlist(corpus.train_ids, model.config.vocab_size, args.draft_vocab))
    save_checkpoint(
        model,
        args.out,
        tokenizer=tok,
        metrics=metrics,
        dtype=torch.float16 if args.half else torch.float32,
        extra=extra,
    )
    print(json.dumps({k: round(v, 4) for k, v in final.items()}, indent=1))
    print(
        f"saved {args.out} ({hist['steps']} steps, {hist['seconds']:.0f} s, "
        f"{hist['tokens_per_s']:.0f} tokens/s)"
    )
    return 0


def cmd_sample(args) -> int:
    import importlib.util

    import torch

    from cptoy.data import tokenizer_from_dict
    from cptoy.firsttoken import FirstTokenModel, is_first_token_checkpoint
    from cptoy.train import load_checkpoint

    if is_first_token_checkpoint(args.ckpt):  # heads only; the backbone of a shipped checkpoint
        model = FirstTokenModel.load(args.ckpt).eval()
        tok = tokenizer_from_dict(model.tokenizer_dict) if model.tokenizer_dict else None
    else:
        ck = load_checkpoint(args.ckpt)
        model, tok = ck.model, ck.tokenizer
    if tok is None:
        raise SystemExit(f"{args.ckpt} carries no tokenizer; cannot encode a prompt")
    ids = tok.encode(args.prompt)
    if not ids:
        raise SystemExit("the prompt encodes to no tokens")
    block = model.config.block_size
    if len(ids) + args.max_new_tokens > block:
        raise SystemExit(
            f"prompt ({len(ids)} tokens) + --max-new-tokens ({args.max_new_tokens}) "
            f"exceeds the block size {block}"
        )
    if importlib.util.find_spec("cptoy.decoding") is not None:
        from cptoy.decoding import generate

        g = generate(
            model,
            ids,
            args.max_new_tokens,
            temperature=args.temperature,
            strategy=args.strategy,
            seed=args.seed,
            routing=args.routing,
        )
        new = list(g.tokens)
        st = g.stats
        info = (
            f"[{args.strategy}, T={args.temperature}: {len(new)} tokens, "
            f"{st.tokens_per_forward:.2f} tokens/forward, {st.tokens_per_second:.1f} tokens/s]"
        )
    else:  # plain autoregressive loop
        gen = torch.Generator().manual_seed(args.seed)
        bb = model.backbone
        cache = bb.new_cache(1)
        with torch.no_grad():
            h = bb(torch.tensor([ids]), cache)[:, -1]
            new = []
            for _ in range(args.max_new_tokens):
                logits = bb.logits(h)[0]
                if args.temperature > 0:
                    nxt = int(
                        torch.multinomial(
                            torch.softmax(logits / args.temperature, -1), 1, generator=gen
                        )
                    )
                else:
                    nxt = int(logits.argmax())
                new.append(nxt)
                h = bb(torch.tensor([[nxt]]), cache)[:, -1]
        info = f"[ar loop, T={args.temperature}: {len(new)} tokens]"
    print(tok.decode(ids + new))
    print(info, file=sys.stderr)
    return 0


def cmd_figures(args) -> int:
    from cptoy.plots import make_figures

    make_figures(args.out)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["present"]:  # Voila lecture mode has its own options
        from cptoy.present import main as present_main

        return present_main(argv[1:])
    args = build_parser().parse_args(argv)
    args.argv = argv
    return {"train": cmd_train, "sample": cmd_sample, "figures": cmd_figures}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
