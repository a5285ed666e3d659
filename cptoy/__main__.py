"""Command line: ``python -m cptoy train | sample | figures | present``.

Examples::

    python -m cptoy train --corpus code --tokenizer bpe --rank 4 --n-future 4 --preset toy \\
        --minutes 1 --out runs/code_r4.pt
    python -m cptoy train --corpus code --tokenizer bpe --rank 1 --n-future 4 \\
        --freeze-backbone --init runs/code_r4.pt --steps 300 --out runs/code_r1_heads.pt
    python -m cptoy sample --ckpt cptoy/checkpoints/code_r8.pt --prompt "def " --strategy self-spec
    python -m cptoy sample --pretrained smollm2-135m --prompt "def fibonacci(n):" --temperature 0
    python -m cptoy figures --out figures

``python -m cptoy SUBCOMMAND --help`` lists each subcommand's options with their defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

# ``sample`` generates at most this many tokens unless told otherwise (and never more than fit)
DEFAULT_MAX_NEW_TOKENS = 200

EXAMPLES = {
    "train": "python -m cptoy train --corpus code --rank 4 --n-future 4 --preset toy "
    "--minutes 1 --out runs/demo.pt",
    "sample": "python -m cptoy sample --ckpt cptoy/checkpoints/code_r8.pt --prompt \"def \" "
    "--strategy self-spec",
    "sample-pretrained": "python -m cptoy sample --pretrained smollm2-135m "
    "--prompt \"def fibonacci(n):\" --temperature 0 --max-new-tokens 32",
    "figures": "python -m cptoy figures --out figures",
    "present": "python -m cptoy present --port 8866 --browser",
}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's line breaks; appends "(default: ...)" to every option that has one."""

    def _get_help_string(self, action):
        help = action.help or ""
        if (
            "%(default)" in help
            or "default:" in help
            or not action.option_strings
            or action.required
            or action.default is None
            or action.default is False
            or action.default is argparse.SUPPRESS
        ):
            return help
        return help + " (default: %(default)s)"


def _epilog(*names: str) -> str:
    lines = [f"  {EXAMPLES[n]}" for n in names]
    return ("example:\n" if len(lines) == 1 else "examples:\n") + "\n".join(lines)


def _positive_float(s: str) -> float:
    v = float(s)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return v


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {s}")
    return v


def _head_positions(s: str):
    if s.lower() in ("none", "all"):
        return None
    v = float(s)
    if "." in s or "e" in s.lower():
        return v
    return int(v)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cptoy",
        description="cptoy's command line: train CP heads, sample from a checkpoint or a "
        "pretrained backbone (autoregressive, self-speculative, prompt lookup), regenerate the "
        "figures, serve the lecture dashboard.",
        formatter_class=_HelpFormatter,
        epilog=_epilog("train", "sample", "sample-pretrained", "figures", "present")
        + "\n\n`python -m cptoy SUBCOMMAND --help` lists a subcommand's options and defaults.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{train,sample,figures,present}")

    def add(name, help, examples):
        return sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                              formatter_class=_HelpFormatter, epilog=_epilog(*examples))

    t = add("train", "train a GPT + CP heads (or only heads on a frozen backbone)", ["train"])
    t.add_argument("--corpus", choices=["code", "shakespeare", "hmm"], required=True,
                   help="training corpus (required)")
    t.add_argument(
        "--tokenizer",
        choices=["byte", "bpe"],
        default="byte",
        help="tokenizer; ignored for hmm (already token ids)",
    )
    t.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size")
    t.add_argument("--max-bytes", type=int, default=None,
                   help="cap on the corpus size (default: the whole corpus)")
    t.add_argument("--rank", type=int, required=True, help="CP rank of the heads (required)")
    t.add_argument("--n-future", type=int, required=True,
                   help="future tokens modelled by the heads (required)")
    t.add_argument("--preset", default="toy", help="GPTConfig preset: tiny, toy, small, gpt2")
    t.add_argument("--block-size", type=int, default=None,
                   help="override the preset's block size (default: the preset's)")
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
        help="positions per batch for the head loss: a fraction (0.25) or a count (64) "
        "(default: all)",
    )
    t.add_argument("--load-balance-coef", type=float, default=0.01,
                   help="weight of the load-balancing loss")
    t.add_argument("--joint-weight", type=float, default=1.0, help="weight of the joint loss")
    t.add_argument("--minutes", type=_positive_float, default=None,
                   help="training time budget (give --minutes, --steps or both)")
    t.add_argument("--steps", type=int, default=None,
                   help="optimizer steps (give --minutes, --steps or both)")
    t.add_argument("--batch-size", type=int, default=16, help="sequences per batch")
    t.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    t.add_argument("--warmup", type=int, default=50, help="learning-rate warm-up steps")
    t.add_argument("--eval-every", type=int, default=200, help="steps between evaluations")
    t.add_argument("--eval-batches", type=int, default=8, help="batches per evaluation")
    t.add_argument("--seed", type=int, default=0, help="random seed")
    t.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
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
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--out", required=True, help="checkpoint path to write (required)")

    s = add("sample", "generate text from a checkpoint or a pretrained backbone",
            ["sample", "sample-pretrained"])
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="a cptoy checkpoint (.pt); give this or --pretrained")
    src.add_argument(
        "--pretrained", metavar="NAME_OR_GGUF",
        help="a pretrained backbone (e.g. smollm2-135m, or a .gguf path) loaded by "
        "cptoy.pretrained; no draft heads, so --strategy ar or lookup; give this or --ckpt",
    )
    s.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    s.add_argument(
        "--max-new-tokens", type=_positive_int, default=None,
        help=f"tokens to generate (default: as many as fit the model's context after the "
        f"prompt, at most {DEFAULT_MAX_NEW_TOKENS}); a larger value is shortened to what fits, "
        "with a note on stderr",
    )
    s.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    s.add_argument("--strategy", choices=["ar", "self-spec", "lookup"], default="ar",
                   help="autoregressive, self-speculative with the CP heads, or prompt lookup")
    s.add_argument("--routing", choices=["mixture", "expert"], default="mixture",
                   help="self-spec: q = the CP mixture, or one expert drawn from the posterior")
    s.add_argument("--seed", type=int, default=0, help="random seed")

    f = add("figures", "regenerate the static figures", ["figures"])
    f.add_argument("--out", default="figures", help="folder to write the PNG files to")
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


def _load_for_sampling(args):
    """``(model, tokenizer, name)`` for ``sample``: a checkpoint, or a pretrained backbone."""
    if args.pretrained is not None:
        if args.strategy == "self-spec":
            raise SystemExit(
                "--strategy self-spec needs draft heads; a --pretrained backbone has none "
                "(use --strategy ar or lookup, or --ckpt with a CP-heads checkpoint)"
            )
        import importlib

        import torch

        try:
            pretrained = importlib.import_module("cptoy.pretrained")
            model, tok = pretrained.load(args.pretrained, dtype=torch.float32, device="cpu")
        except (ImportError, FileNotFoundError) as e:  # a missing package or file: say which
            raise SystemExit(f"--pretrained {args.pretrained}: {e}") from None
        return model.eval(), tok, args.pretrained

    from cptoy.data import tokenizer_from_dict
    from cptoy.firsttoken import FirstTokenModel, is_first_token_checkpoint
    from cptoy.train import load_checkpoint

    if not os.path.isfile(args.ckpt):
        raise SystemExit(f"--ckpt {args.ckpt}: no such file")
    if is_first_token_checkpoint(args.ckpt):  # heads only; the backbone of a shipped checkpoint
        model = FirstTokenModel.load(args.ckpt).eval()
        tok = tokenizer_from_dict(model.tokenizer_dict) if model.tokenizer_dict else None
    else:
        ck = load_checkpoint(args.ckpt)
        model, tok = ck.model, ck.tokenizer
    if tok is None:
        raise SystemExit(f"{args.ckpt} carries no tokenizer; cannot encode a prompt")
    return model, tok, args.ckpt


def new_tokens_that_fit(prompt_len: int, block_size: int, requested: int | None) -> int:
    """How many tokens ``sample`` generates: ``requested`` (default: at most
    ``DEFAULT_MAX_NEW_TOKENS``), shortened to what fits in ``block_size`` after the prompt.

    Raises SystemExit when the prompt alone fills the block.
    """
    room = block_size - prompt_len
    if room < 1:
        raise SystemExit(
            f"the prompt ({prompt_len} tokens) leaves no room in the block size {block_size}; "
            "shorten the prompt"
        )
    if requested is None:
        return min(DEFAULT_MAX_NEW_TOKENS, room)
    if requested > room:
        print(
            f"note: prompt ({prompt_len} tokens) + --max-new-tokens ({requested}) exceeds the "
            f"block size {block_size}; generating {room} tokens",
            file=sys.stderr,
        )
        return room
    return requested


def cmd_sample(args) -> int:
    from cptoy.decoding import generate

    model, tok, _ = _load_for_sampling(args)
    ids = tok.encode(args.prompt)
    if not ids:
        raise SystemExit("the prompt encodes to no tokens")
    n = new_tokens_that_fit(len(ids), model.config.block_size, args.max_new_tokens)
    # generate() has no streaming callback: the text is printed once it is complete
    g = generate(model, ids, n, temperature=args.temperature, strategy=args.strategy,
                 seed=args.seed, routing=args.routing)
    new = list(g.tokens)
    st = g.stats
    print(tok.decode(ids + new))
    print(
        f"[{args.strategy}, T={args.temperature}: {len(new)} tokens, "
        f"{st.tokens_per_forward:.2f} tokens/forward, {st.tokens_per_second:.1f} tokens/s]",
        file=sys.stderr,
    )
    return 0


def cmd_figures(args) -> int:
    from cptoy.figures import make_figures

    make_figures(args.out)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["present"]:  # Voila lecture mode has its own options
        from cptoy.present import main as present_main

        if any(a in ("-h", "--help") for a in argv[1:]):  # present's own help, then an example
            try:
                present_main(["--help"])
            except SystemExit:
                pass
            print("\n" + _epilog("present"))
            return 0
        return present_main(argv[1:])
    args = build_parser().parse_args(argv)
    args.argv = argv
    return {"train": cmd_train, "sample": cmd_sample, "figures": cmd_figures}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
