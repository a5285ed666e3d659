"""One benchmark protocol for decoders: bench/, the notebooks and the widgets all measure with it.

:func:`benchmark_methods` decodes every prompt with every :class:`Method`, interleaved prompt
by prompt (so load from other processes hits every method alike), and gives one
:class:`BenchRow` per method: tokens per forward, wall-clock tokens per second, speed-up over
the reference method *of the same run*, the share of time spent drafting, acceptance by draft
position, agreement with the reference's output, task accuracy (with a scorer), and beside
every speed figure the repetition of the output (:func:`repetition`) and, with a ``decode``,
its share of whitespace (:func:`whitespace_share`), so a model stuck in a whitespace loop cannot
pass for a fast one. Each method carries a label: lossless (its output has exactly the
backbone's law), or lossy / verifier-free.

A method is a model and a strategy of ``cptoy.decoding.generate`` (or "heads-only"), or any
decoder ``fn(prompt_ids, max_new_tokens) -> Generation`` with a kind. :func:`decode_benchmark`
runs the strategies of one model; :func:`compare_decoders` (with :func:`Decoder`) is the same
protocol for a list of decoders, greedy, with the first as reference. :func:`format_table`
prints any rows as markdown.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass

import torch

from cptoy._checks import check_positive_int, check_temperature
from cptoy.decoding import check_n_draft, check_routing, generate
from cptoy.verifierfree import heads_only_generate

__all__ = ["Method", "BenchRow", "benchmark_methods", "decode_benchmark", "Decoder",
           "DecoderRow", "compare_decoders", "prefix_agreement", "repetition",
           "whitespace_share", "format_table", "METHOD_LABELS", "LABELS", "BENCH_COLUMNS",
           "DECODER_COLUMNS"]

# What each decoding method guarantees about its output (background.md section 3).
METHOD_LABELS = {
    "ar": "lossless (reference)",
    "self-spec": "lossless",
    "lookup": "lossless",
    "heads-only": "lossy, verifier-free",
}
# The same for a decoder given as a function, by its kind.
LABELS = {
    "reference": "lossless (reference)",
    "lossless": "lossless",
    "verifier-free": "lossy, verifier-free",
}


def _nanmean(xs) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


# ====================================================================== output quality
def repetition(tokens, n: int = 4) -> float:
    """Fraction of repeated n-grams in a token sequence.

    Among the ``len(tokens) - n + 1`` n-grams of ``tokens`` (windows at every start, overlapping),
    the fraction whose exact n tokens already occurred as an n-gram starting at an earlier
    position. 0.0 for text without repeats; close to 1 for a loop. NaN when ``tokens`` holds fewer
    than ``n`` tokens (there is no n-gram to count).

    >>> repetition([1, 2, 3, 4, 1, 2, 3, 4], n=4)   # 5 4-grams, the last one repeats the first
    0.2
    """
    check_positive_int(n, "n")
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
        tokens = tokens.tolist()
    elif isinstance(tokens, str):
        raise TypeError("tokens must be a sequence of token ids, not a str")
    tokens = list(tokens)
    m = len(tokens) - n + 1
    if m <= 0:
        return float("nan")
    seen: set[tuple] = set()
    rep = 0
    for i in range(m):
        g = tuple(tokens[i:i + n])
        rep += g in seen
        seen.add(g)
    return rep / m


def whitespace_share(text: str) -> float:
    """Fraction of the characters of ``text`` that are whitespace (``str.isspace``: spaces,
    tabs, newlines); NaN for the empty string."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not text:
        return float("nan")
    return sum(ch.isspace() for ch in text) / len(text)


# ====================================================================== methods and rows
@dataclass
class Method:
    """One decoding method in a benchmark run: a model, a strategy and its drafts per step, or
    any decoder ``fn(prompt_ids, max_new_tokens) -> Generation`` of a ``kind`` (see LABELS)."""

    name: str  # shown in the "model" column
    model: object = None  # MTPModel (a bare backbone for "ar" / "lookup"); None with fn
    strategy: str | None = None  # "ar", "self-spec", "lookup" or "heads-only"; None with fn
    n_draft: int | None = None  # drafts per step (None: the model's n_future - 1)
    routing: str = "mixture"  # self-spec drafter: "mixture" or "expert" (cptoy.decoding)
    fn: Callable | None = None  # a decoder of its own (then kind, not model / strategy)
    kind: str | None = None  # with fn: "reference", "lossless" or "verifier-free"

    def __post_init__(self):
        if self.fn is None:
            return
        if self.kind not in LABELS:
            raise ValueError(f"kind must be one of {sorted(LABELS)}, got {self.kind!r}")
        if not callable(self.fn):
            raise TypeError("fn must be callable(prompt_ids, max_new_tokens) -> Generation")

    @property
    def label(self) -> str:
        return LABELS[self.kind] if self.fn is not None else METHOD_LABELS[self.strategy]

    @property
    def is_reference(self) -> bool:
        return self.strategy == "ar" or self.kind == "reference"


def Decoder(name: str, kind: str, fn: Callable) -> Method:  # noqa: N802 (the notebooks' name)
    """A :class:`Method` from a decoder function: ``fn(prompt_ids, max_new_tokens) ->
    Generation`` of ``kind`` "reference", "lossless" or "verifier-free"."""
    if kind not in LABELS:
        raise ValueError(f"kind must be one of {sorted(LABELS)}, got {kind!r}")
    return Method(name, fn=fn, kind=kind)


@dataclass
class BenchRow:
    """One method's row of :func:`benchmark_methods`: sums over prompts."""

    model: str  # the method's name in the table
    strategy: str  # "ar", "self-spec", "lookup", "heads-only", or the kind of a decoder fn
    label: str  # lossless / lossy, verifier-free (METHOD_LABELS, LABELS)
    temperature: float  # 0 = greedy
    n_draft: int | None  # drafts per step (0 for "ar"; None for a decoder fn)
    prompts: int  # number of prompts decoded
    tokens: int  # new tokens over all prompts
    forwards: int  # backbone forwards over all prompts (prefills included)
    tokens_per_forward: float  # tokens / forwards
    tokens_per_second: float  # tokens / wall seconds (all prompts; the fastest round)
    speedup: float  # tokens_per_second / the reference's in the same run (nan without one)
    draft_share: float  # drafting time / wall time
    forward_share: float  # backbone forwards (prefill + verification) time / wall time
    repetition: float  # mean over prompts of repetition(tokens, 4)
    whitespace: float  # mean over prompts of whitespace_share(decoded) (nan without decode)
    acceptance: list[float]  # accepted / attempted by draft position 2, 3, ...
    equal_to_ar: float  # fraction of prompts whose tokens equal the reference's (T = 0; else nan)
    seconds: float  # wall seconds over all prompts (the fastest round)
    agreement: float = float("nan")  # mean common-prefix fraction with the reference's output
    exact: float = float("nan")  # fraction of prompts whose output equals the reference's
    accuracy: float = float("nan")  # task: fraction of prompted answers right (with a scorer)
    record_accuracy: float = float("nan")  # task: fraction of all complete records right
    texts: list[str] = field(default_factory=list, repr=False)  # decoded outputs (with decode)
    generations: list = field(default_factory=list, repr=False)  # the Generation objects

    @property
    def method(self) -> str:
        """The method's name (the ``model`` column)."""
        return self.model


DecoderRow = BenchRow  # the rows of compare_decoders


def _check_method(m: Method) -> Method:
    if not isinstance(m, Method):
        raise TypeError(f"methods must hold Method objects, got {type(m).__name__}")
    if m.fn is not None:
        return m
    if m.strategy not in METHOD_LABELS:
        raise ValueError(f"strategy must be one of {tuple(METHOD_LABELS)}, got {m.strategy!r}")
    if m.strategy in ("self-spec", "heads-only"):
        k = check_n_draft(m.model, m.n_draft)
    elif m.strategy == "lookup":
        nf = getattr(m.model, "n_future", None)
        k = m.n_draft if m.n_draft is not None else (nf - 1 if nf and nf >= 2 else 4)
        check_positive_int(k, "n_draft")
    else:
        k = 0
    check_routing(m.routing, m.model if m.strategy == "self-spec" else None)
    return Method(m.name, m.model, m.strategy, k, m.routing)


def _run(m: Method, prompt, max_new, T, seed, lookup_ngram, eos_id):
    if m.fn is not None:
        return m.fn(list(prompt), max_new)
    if m.strategy == "heads-only":
        return heads_only_generate(m.model, prompt, max_new, T, seed=seed, n_draft=m.n_draft)
    return generate(m.model, prompt, max_new, temperature=T, strategy=m.strategy, seed=seed,
                    eos_id=eos_id, n_draft=None if m.strategy == "ar" else m.n_draft,
                    lookup_ngram=lookup_ngram,
                    routing=m.routing if m.strategy == "self-spec" else "mixture")


def prefix_agreement(tokens, reference) -> float:
    """Length of the common prefix of ``tokens`` and ``reference``, divided by
    ``len(reference)`` (1.0: identical up to the reference's length; NaN for an empty
    reference)."""
    tokens, reference = list(tokens), list(reference)
    if not reference:
        return float("nan")
    n = 0
    for a, b in zip(tokens, reference, strict=False):
        if a != b:
            break
        n += 1
    return n / len(reference)


# ====================================================================== the protocol
def benchmark_methods(
    methods,
    prompts,
    temperature: float = 0.8,
    max_new_tokens: int = 64,
    seed: int = 0,
    decode=None,
    lookup_ngram: int = 3,
    eos_id: int | None = None,
    warmup: bool = True,
    reference: str | None = None,
    scorer: Callable | None = None,
    rounds: int = 1,
) -> list[BenchRow]:
    """Decode every prompt with every :class:`Method`, interleaved, and measure each.

    Prompt i is decoded by every method in turn (with seed ``seed + i``) before prompt i + 1,
    so load from other processes hits all methods alike. ``reference`` names the method that
    speed-up and agreement are relative to (default: the first "ar" or "reference" method).
    ``warmup`` decodes the first prompt once per method, untimed. ``scorer``: ``scorer(list of
    token lists) -> TaskScore`` (``answer_accuracy``, ``record_accuracy``) for task accuracy.
    ``rounds`` > 1 repeats the run and keeps each method's fastest round (outputs must be
    deterministic), which damps the noise of a shared CPU. Returns one :class:`BenchRow` per
    method, in order.
    """
    methods = [_check_method(m) for m in methods]
    if not methods:
        raise ValueError("methods must not be empty")
    names = [m.name for m in methods]
    if reference is not None and reference not in names:
        raise ValueError(f"reference {reference!r} is not among the methods {names}")
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    T = check_temperature(temperature)
    check_positive_int(max_new_tokens, "max_new_tokens")
    check_positive_int(rounds, "rounds")
    if decode is not None and not callable(decode):
        raise TypeError("decode must be a callable (tokenizer.decode) or None")

    if warmup:
        for m in methods:
            _run(m, prompts[0], min(8, max_new_tokens), T, seed, lookup_ngram, eos_id)
    gens: list[list] = [[None] * len(prompts) for _ in methods]
    best = [math.inf] * len(methods)
    for _ in range(rounds):
        secs = [0.0] * len(methods)
        for i, prompt in enumerate(prompts):
            for j, m in enumerate(methods):
                g = _run(m, prompt, max_new_tokens, T, seed + i, lookup_ngram, eos_id)
                gens[j][i] = g
                secs[j] += g.stats.wall_time
        best = [min(b, s) for b, s in zip(best, secs, strict=True)]

    if reference is not None:
        ref = names.index(reference)
    else:
        ref = next((j for j, m in enumerate(methods) if m.is_reference), None)
    rows = [_row(m, gs, T, wall, None if ref is None else gens[ref], decode, scorer)
            for m, gs, wall in zip(methods, gens, best, strict=True)]
    if ref is not None:
        for r in rows:
            r.speedup = r.tokens_per_second / rows[ref].tokens_per_second
    return rows


def _row(m: Method, gs: list, T: float, wall: float, refs, decode, scorer) -> BenchRow:
    """The row of one method from its generations (one per prompt)."""
    tokens = sum(len(g.tokens) for g in gs)
    forwards = sum(g.stats.forward_passes for g in gs)
    draft_t = sum(g.stats.draft_time for g in gs)
    fwd_t = sum(g.stats.prefill_time + g.stats.verify_time for g in gs)
    att = [sum(x) for x in zip(*[g.stats.attempted_by_position for g in gs], strict=True)]
    acc = [sum(x) for x in zip(*[g.stats.accepted_by_position for g in gs], strict=True)]
    texts = [decode(g.tokens) for g in gs] if decode is not None else []
    agreement = exact = equal = float("nan")
    if refs is not None:
        pairs = list(zip(gs, refs, strict=True))
        agreement = sum(prefix_agreement(g.tokens, r.tokens) for g, r in pairs) / len(gs)
        exact = sum(g.tokens == r.tokens for g, r in pairs) / len(gs)
        equal = exact if T == 0 else float("nan")
    task = scorer([g.tokens for g in gs]) if scorer is not None else None
    return BenchRow(
        model=m.name, strategy=m.strategy if m.fn is None else m.kind, label=m.label,
        temperature=T, n_draft=m.n_draft, prompts=len(gs), tokens=tokens, forwards=forwards,
        tokens_per_forward=tokens / max(forwards, 1),
        tokens_per_second=tokens / wall if wall > 0 else float("nan"), speedup=float("nan"),
        draft_share=draft_t / wall if wall > 0 else float("nan"),
        forward_share=fwd_t / wall if wall > 0 else float("nan"),
        repetition=_nanmean(repetition(g.tokens) for g in gs),
        whitespace=_nanmean(whitespace_share(t) for t in texts),
        acceptance=[a / t if t else float("nan") for a, t in zip(acc, att, strict=True)],
        equal_to_ar=equal, seconds=wall, agreement=agreement, exact=exact,
        accuracy=task.answer_accuracy if task is not None else float("nan"),
        record_accuracy=task.record_accuracy if task is not None else float("nan"),
        texts=texts, generations=gs,
    )


def decode_benchmark(
    model,
    prompts,
    strategies=("ar", "self-spec", "lookup"),
    temperature: float = 0.8,
    max_new_tokens: int = 64,
    seed: int = 0,
    decode=None,
    n_draft: int | None = None,
    lookup_ngram: int = 3,
    eos_id: int | None = None,
    name: str = "model",
    warmup: bool = True,
) -> list[BenchRow]:
    """Decode every prompt with every strategy of one model and measure speed and quality.

    model: an ``MTPModel`` (a bare backbone for "ar" / "lookup" only).
    prompts: a list of prompts, each a list of token ids (or a 1-D tensor).
    strategies: a subset of ("ar", "self-spec", "lookup", "heads-only"); speed-up is relative
        to "ar", which should be among them.
    temperature: >= 0 (0 greedy). seed: prompt i is decoded with seed ``seed + i`` by every
        strategy. n_draft: drafts per step (default: the model's n_future - 1; lookup on a bare
        backbone: 4). decode: ``tokenizer.decode`` for the whitespace share and the texts.
    warmup: decode the first prompt once per strategy, untimed, before measuring.

    One interleaved run (:func:`benchmark_methods`). Returns one :class:`BenchRow` per strategy.
    """
    if isinstance(strategies, str):
        strategies = (strategies,)
    strategies = tuple(strategies)
    if not strategies or any(s not in METHOD_LABELS for s in strategies):
        raise ValueError(f"strategies must be a non-empty subset of {tuple(METHOD_LABELS)}, "
                         f"got {strategies}")
    if len(set(strategies)) != len(strategies):
        raise ValueError(f"strategies must be distinct, got {strategies}")
    methods = [Method(name, model, s, None if s == "ar" else n_draft) for s in strategies]
    return benchmark_methods(methods, prompts, temperature=temperature,
                             max_new_tokens=max_new_tokens, seed=seed, decode=decode,
                             lookup_ngram=lookup_ngram, eos_id=eos_id, warmup=warmup)


def compare_decoders(decoders, prompts, max_new_tokens: int, reference: str | None = None,
                     scorer: Callable | None = None, warmup: bool = True,
                     rounds: int = 1) -> list[BenchRow]:
    """:func:`benchmark_methods` for greedy decoders (:func:`Decoder`), the first one the
    reference unless ``reference`` names another. prompts: list of token-id lists."""
    if not decoders:
        raise ValueError("decoders must not be empty")
    names = [d.name for d in decoders]
    if len(set(names)) != len(names):
        raise ValueError(f"decoder names must be distinct, got {names}")
    if not prompts:
        raise ValueError("prompts must be a non-empty list")
    return benchmark_methods(list(decoders), [list(p) for p in prompts], temperature=0.0,
                             max_new_tokens=max_new_tokens, warmup=warmup,
                             reference=names[0] if reference is None else reference,
                             scorer=scorer, rounds=rounds)


# ====================================================================== markdown tables
def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        a = abs(v)
        return f"{v:.0f}" if a >= 100 else f"{v:.1f}" if a >= 10 else f"{v:.2f}"
    if isinstance(v, (list, tuple)):
        return " / ".join(_fmt(x) for x in v) if v else "–"
    return str(v).replace("|", "\\|").replace("\n", " ")


# columns of a compare_decoders table
DECODER_COLUMNS = [
    ("method", "model"), ("kind", "label"), ("tokens/forward", "tokens_per_forward"),
    ("speed-up (wall)", "speedup"), ("agreement with AR", "agreement"),
    ("= AR", "exact"), ("task accuracy", "accuracy"), ("record accuracy", "record_accuracy"),
    ("repeated 4-grams", "repetition"),
]

BENCH_COLUMNS = [
    ("model", "model"), ("method", "strategy"), ("kind", "label"), ("T", "temperature"),
    ("drafts", "n_draft"), ("tokens/forward", "tokens_per_forward"),
    ("tokens/s", "tokens_per_second"), ("speed-up vs AR", "speedup"),
    ("draft share", "draft_share"), ("repeated 4-grams", "repetition"),
    ("whitespace", "whitespace"), ("acceptance by position", "acceptance"),
]


def format_table(rows, columns=None) -> str:
    """A markdown table of ``rows`` (dataclasses or dicts).

    columns: list of field names or (header, field name | callable(row)) pairs; default: every
    field whose values are scalars (for :class:`BenchRow`: :data:`BENCH_COLUMNS`). Floats print
    with 2 decimals (1 from 10, none from 100), NaN and None as "–", lists joined by " / ".
    """
    rows = list(rows)
    if not rows:
        raise ValueError("rows is empty")
    dicts = []
    for r in rows:
        if is_dataclass(r) and not isinstance(r, type):
            dicts.append({f.name: getattr(r, f.name) for f in fields(r)})
        elif isinstance(r, dict):
            dicts.append(r)
        else:
            raise TypeError(f"rows must be dataclasses or dicts, got {type(r).__name__}")
    if columns is None:
        if all(isinstance(r, BenchRow) for r in rows):
            columns = BENCH_COLUMNS
        else:
            columns = [k for k, v in dicts[0].items()
                       if isinstance(v, (int, float, str, bool)) or v is None]
    cols = [(c, c) if isinstance(c, str) else tuple(c) for c in columns]
    for _h, key in cols:
        if isinstance(key, str) and any(key not in d for d in dicts):
            raise ValueError(f"column {key!r} is not a field of every row")
    lines = ["| " + " | ".join(h for h, _ in cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    for r, d in zip(rows, dicts, strict=True):
        cells = [_fmt(key(r) if callable(key) else d[key]) for _, key in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
