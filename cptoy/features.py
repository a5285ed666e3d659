"""A frozen backbone's features on disk, so that drafting heads train without re-running it.

Training heads on a frozen 30-layer backbone spends almost all of its time in the backbone.
The heads need only three things per position t of the training text, so we compute them once:

- ``hidden[t]``    the backbone's final hidden state h_t (d floats, stored as float16);
- ``ids[t]``       the token x_t itself (targets x_{t+1..t+n} are ``ids[t+1 : t+n+1]``);
- ``top_ids[t]``, ``top_logp[t]``  the backbone's own top-k next-token distribution
  p(. | x_<=t) (k ids and log-probabilities): the soft targets of self-distillation.

The text is cut into windows of ``window`` tokens; each window is one forward from an empty
cache, so position t of a window sees only the window's earlier tokens. A position t can train
heads over n future tokens when ``t + n`` is still inside its window (:meth:`positions`).

Windows are spread evenly over a corpus's *training* split (``cptoy.data.load_corpus``), so
held-out files and plays are never cached. With ``shard=(rank, world)`` a process caches
windows rank, rank + world, ... only: the cache of a distributed run is sharded by rank.

Where it lives: ``<cptoy cache dir>/features/<key>/`` (``$CPTOY_CACHE`` or ``~/.cache/cptoy``),
the key hashing the backbone's source file, the corpus, window, k, the number of windows and the
shard. Size: N * (2 d + 6 k + 4) bytes (d = 576, k = 32: about 1.35 kB per token).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cptoy._checks import check_positive_int

__all__ = ["FeatureCache", "build_feature_cache", "corpus_windows", "feature_cache_dir"]


@dataclass
class FeatureCache:
    """Cached backbone features of N positions (memory-mapped arrays, see the module docstring)."""

    path: Path
    hidden: np.ndarray  # (N, d) float16
    ids: np.ndarray  # (N,) int32
    top_ids: np.ndarray  # (N, k) int32
    top_logp: np.ndarray  # (N, k) float16
    window: int  # tokens per window (the last window may be shorter: see window_ends)
    window_ends: np.ndarray  # (W,) int64: end index (exclusive) of each window
    meta: dict

    @property
    def num_tokens(self) -> int:
        return int(self.ids.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.hidden, self.ids, self.top_ids, self.top_logp))

    def positions(self, n_future: int) -> np.ndarray:
        """Indices t whose targets t+1 .. t+n_future lie in t's window, (M,) int64."""
        check_positive_int(n_future, "n_future")
        starts = np.concatenate([[0], self.window_ends[:-1]])
        parts = [np.arange(s, e - n_future) for s, e in zip(starts, self.window_ends, strict=True)
                 if e - n_future > s]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    @classmethod
    def open(cls, path) -> FeatureCache:
        path = Path(path)
        meta_file = path / "meta.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"no feature cache at {str(path)!r} (meta.json missing)")
        meta = json.loads(meta_file.read_text())
        N, d, k = meta["num_tokens"], meta["d_model"], meta["topk"]

        def mm(name, dtype, shape):
            return np.memmap(path / name, dtype=dtype, mode="r", shape=shape)

        return cls(path, mm("hidden.f16", np.float16, (N, d)), mm("ids.i32", np.int32, (N,)),
                   mm("top_ids.i32", np.int32, (N, k)), mm("top_logp.f16", np.float16, (N, k)),
                   meta["window"], np.asarray(meta["window_ends"], dtype=np.int64), meta)

    def __repr__(self) -> str:
        return (f"FeatureCache({self.num_tokens:,} tokens in {len(self.window_ends)} windows, "
                f"d={self.hidden.shape[1]}, k={self.top_ids.shape[1]}, "
                f"{self.nbytes / 2**20:.0f} MiB at {str(self.path)!r})")


def feature_cache_dir() -> Path:
    from cptoy.data import cache_dir

    d = cache_dir() / "features"
    d.mkdir(parents=True, exist_ok=True)
    return d


def corpus_windows(tokenizer, corpus: str, num_windows: int, window: int = 512,
                   split: str = "train") -> list[list[int]]:
    """``num_windows`` token windows of ``window`` tokens taken at evenly spaced places of a
    corpus's split (``"train"`` or ``"val"``), each starting at the beginning of a line."""
    from cptoy.data import load_corpus

    check_positive_int(num_windows, "num_windows")
    check_positive_int(window, "window", minimum=2)
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    text = getattr(load_corpus(corpus), split)
    span = 8 * window  # characters: comfortably more than `window` tokens of code or prose
    step = max(1, (len(text) - span) // num_windows)
    out = []
    for i in range(num_windows):
        start = text.find("\n", i * step) + 1
        ids = tokenizer.encode(text[start : start + span])[:window]
        if len(ids) == window:
            out.append(ids)
    return out


@torch.no_grad()
def build_feature_cache(model, windows: list[list[int]], name: str, topk: int = 32,
                        shard: tuple[int, int] = (0, 1), progress: bool = True,
                        path=None) -> FeatureCache:
    """Run ``model`` (a frozen :class:`cptoy.model.GPT`) over ``windows`` and cache the features,
    or open the cache if it exists. ``name`` says what the windows are (part of the folder
    name); the key also hashes the model's source (``model.source`` if set) and the windows."""
    import hashlib

    from tqdm.auto import tqdm

    check_positive_int(topk, "topk")
    rank, world = shard
    if not (isinstance(rank, int) and isinstance(world, int) and 0 <= rank < world):
        raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard}")
    mine = windows[rank::world]
    if not mine:
        raise ValueError(f"no windows for shard {shard} ({len(windows)} windows in all)")
    h = hashlib.blake2b(digest_size=8)
    source = getattr(model, "source", None)
    h.update(str(model.config if source is None else source).encode())
    if source is None:  # no file names the weights: hash the weights themselves
        for p in model.parameters():
            h.update(p.detach().float().cpu().numpy().tobytes())
    for w in mine:
        h.update(np.asarray(w, dtype=np.int32).tobytes())
    key = f"k{topk}-{rank}of{world}-{h.hexdigest()}"
    path = Path(path) if path is not None else feature_cache_dir() / f"{name}-{key}"
    if (path / "meta.json").is_file():
        cache = FeatureCache.open(path)
        if cache.meta.get("key", key) != key:
            raise ValueError(f"{str(path)!r} holds another feature cache (key "
                             f"{cache.meta['key']}, not {key}: other windows, backbone, topk "
                             f"or shard); give another path or delete it")
        return cache
    path.mkdir(parents=True, exist_ok=True)
    d, N = model.config.n_embd, sum(len(w) for w in mine)
    files = dict(hidden=("hidden.f16", np.float16, (N, d)), ids=("ids.i32", np.int32, (N,)),
                 top_ids=("top_ids.i32", np.int32, (N, topk)),
                 top_logp=("top_logp.f16", np.float16, (N, topk)))
    arrs = {k: np.memmap(path / f, dtype=t, mode="w+", shape=s) for k, (f, t, s) in files.items()}
    device = next(model.parameters()).device
    ends, pos, t0 = [], 0, time.perf_counter()
    bar = tqdm(total=N, unit="tok", desc=f"caching {name}", disable=not progress)
    for w in mine:
        x = torch.tensor([w], device=device)
        hid = model(x)[0]  # (T, d)
        logp = torch.log_softmax(model.logits(hid).float(), dim=-1)  # (T, V)
        top = logp.topk(topk, dim=-1)
        T = len(w)
        arrs["hidden"][pos : pos + T] = hid.float().cpu().numpy().astype(np.float16)
        arrs["ids"][pos : pos + T] = np.asarray(w, dtype=np.int32)
        arrs["top_ids"][pos : pos + T] = top.indices.cpu().numpy().astype(np.int32)
        arrs["top_logp"][pos : pos + T] = top.values.cpu().numpy().astype(np.float16)
        pos += T
        ends.append(pos)
        bar.update(T)
    bar.close()
    for a in arrs.values():
        a.flush()
    seconds = time.perf_counter() - t0
    meta = dict(num_tokens=N, d_model=d, topk=topk, window=max(len(w) for w in mine),
                window_ends=ends, name=name, key=key, shard=[rank, world], seconds=seconds,
                tokens_per_s=N / max(seconds, 1e-9), source=str(getattr(model, "source", "")),
                created=time.time())
    tmp = path / "meta.json.tmp"
    tmp.write_text(json.dumps(meta))
    tmp.replace(path / "meta.json")  # the cache counts as complete only once meta.json exists
    return FeatureCache.open(path)

