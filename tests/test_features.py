"""Cached backbone features (cptoy.features): what the cache holds, reopening, windows, shards."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cptoy.data import ByteTokenizer, load_corpus
from cptoy.features import FeatureCache, build_feature_cache, corpus_windows, feature_cache_dir
from cptoy.model import GPT, GPTConfig

LENGTHS = (20, 13, 31, 7, 26)  # windows of unequal lengths (block_size of tiny-llama: 64)


def tiny_llama(seed=0, **overrides) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig.preset("tiny-llama", **overrides)).eval()
    with torch.no_grad():  # norms start at 1: perturb so that every weight matters
        for name, p in model.named_parameters():
            if "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def random_windows(lengths=LENGTHS, seed=0, vocab=256) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=L).tolist() for L in lengths]


def split_windows(cache: FeatureCache) -> list[list[int]]:
    """The token windows a cache holds, from its window ends."""
    starts = np.concatenate([[0], cache.window_ends[:-1]])
    return [cache.ids[s:e].tolist() for s, e in zip(starts, cache.window_ends, strict=True)]


def window_of(cache: FeatureCache, t: np.ndarray) -> np.ndarray:
    return np.searchsorted(cache.window_ends, t, side="right")


def build(model, windows, path, topk=8, **kw) -> FeatureCache:
    return build_feature_cache(model, windows, "test", topk=topk, path=path, progress=False, **kw)


# ----------------------------------------------------------------------------- contents


def test_cache_equals_a_direct_forward(tmp_path):
    model, windows, k = tiny_llama(), random_windows(), 8
    cache = build(model, windows, tmp_path / "c", topk=k)
    N, d = sum(LENGTHS), model.config.n_embd
    assert cache.num_tokens == N and cache.hidden.shape == (N, d)
    assert cache.top_ids.shape == cache.top_logp.shape == (N, k)
    assert (cache.hidden.dtype, cache.top_logp.dtype) == (np.float16, np.float16)
    assert cache.nbytes == N * (2 * d + 6 * k + 4)  # the size the module docstring gives
    assert cache.window_ends.tolist() == np.cumsum(LENGTHS).tolist()
    assert cache.window == max(LENGTHS) and cache.meta["shard"] == [0, 1]
    assert split_windows(cache) == windows
    start = 0
    for w in windows:
        sl = slice(start, start + len(w))
        with torch.no_grad():  # each window is one forward from an empty cache
            hid = model(torch.tensor([w]))[0]
            logp = torch.log_softmax(model.logits(hid), dim=-1)
        top = logp.topk(k, dim=-1)
        torch.testing.assert_close(torch.from_numpy(cache.hidden[sl].astype(np.float32)), hid,
                                   rtol=1e-3, atol=1e-3)  # float16: 11 significant bits
        assert torch.equal(torch.from_numpy(cache.top_ids[sl].astype(np.int64)), top.indices)
        torch.testing.assert_close(torch.from_numpy(cache.top_logp[sl].astype(np.float32)),
                                   top.values, rtol=1e-3, atol=2e-3)
        start += len(w)
    assert (np.diff(cache.top_logp.astype(np.float32), axis=1) <= 0).all()
    assert f"{N} tokens in 5 windows" in repr(cache)


def test_position_t_sees_only_its_windows_earlier_tokens(tmp_path):
    model = tiny_llama()
    a = random_windows((12, 12), seed=1)
    b = [list(a[0]), list(a[1])]
    b[0][7] = (b[0][7] + 1) % 256  # change one token of the first window
    ca, cb = build(model, a, tmp_path / "a"), build(model, b, tmp_path / "b")
    same = np.r_[0:7, 12:24]  # before the change, and the whole second window
    np.testing.assert_allclose(ca.hidden[same], cb.hidden[same], atol=1e-3)
    assert (np.abs(ca.hidden[7:12].astype(np.float32) - cb.hidden[7:12]) > 1e-2).any(1).all()


# ----------------------------------------------------------------------------- reopening


def test_reopening_returns_the_cache_without_running_the_model(tmp_path, monkeypatch):
    model, windows = tiny_llama(), random_windows()
    first = build(model, windows, tmp_path / "c")

    def boom(*args, **kwargs):
        raise AssertionError("the backbone ran again")

    monkeypatch.setattr(model, "forward", boom)
    again = build(model, windows, tmp_path / "c")
    opened = FeatureCache.open(tmp_path / "c")
    for c in (again, opened):
        assert c.path == first.path and c.meta == first.meta
        for name in ("hidden", "ids", "top_ids", "top_logp", "window_ends"):
            np.testing.assert_array_equal(getattr(c, name), getattr(first, name))
    # an interrupted build (no meta.json) does not count: it is computed again
    (tmp_path / "c" / "meta.json").unlink()
    with pytest.raises(AssertionError, match="ran again"):
        build(model, windows, tmp_path / "c")
    monkeypatch.undo()
    rebuilt = build(model, windows, tmp_path / "c")
    np.testing.assert_array_equal(rebuilt.hidden, first.hidden)


def test_a_path_holding_another_cache_is_refused(tmp_path):
    model, windows = tiny_llama(), random_windows()
    build(model, windows, tmp_path / "c", topk=8)
    for m, w, k in ((model, random_windows(seed=5), 8), (model, windows, 4),
                    (tiny_llama(seed=1), windows, 8)):
        with pytest.raises(ValueError, match="another feature cache"):
            build(m, w, tmp_path / "c", topk=k)


def test_default_location_is_keyed_by_backbone_windows_and_shard(tmp_path, monkeypatch):
    monkeypatch.setenv("CPTOY_CACHE", str(tmp_path))
    windows = random_windows()
    kw = dict(topk=4, progress=False)
    a = build_feature_cache(tiny_llama(), windows, "toy", **kw)
    assert a.path.parent == feature_cache_dir() == tmp_path / "features"
    assert a.path.name.startswith("toy-k4-0of1-")
    assert build_feature_cache(tiny_llama(), windows, "toy", **kw).path == a.path  # reopened
    # another backbone of the same shape (no source file): its own cache, its own features
    b = build_feature_cache(tiny_llama(seed=1), windows, "toy", **kw)
    assert b.path != a.path and not np.array_equal(b.hidden, a.hidden)
    src = tiny_llama()
    src.source = str(tmp_path / "weights.gguf")  # named by its file
    assert build_feature_cache(src, windows, "toy", **kw).path not in (a.path, b.path)
    others = [build_feature_cache(tiny_llama(), random_windows(seed=2), "toy", **kw),
              build_feature_cache(tiny_llama(), windows, "toy", topk=5, progress=False),
              build_feature_cache(tiny_llama(), windows, "toy", shard=(1, 2), **kw)]
    assert len({c.path for c in others} | {a.path}) == 4


# ----------------------------------------------------------------------------- windows


def test_positions_never_cross_a_window_end(tmp_path):
    cache = build(tiny_llama(), random_windows(), tmp_path / "c")
    for n in range(1, max(LENGTHS) + 2):
        t = cache.positions(n)
        assert t.dtype == np.int64 and (np.diff(t) > 0).all()
        assert len(t) == sum(max(0, L - n) for L in LENGTHS)
        if len(t):
            assert (window_of(cache, t) == window_of(cache, t + n)).all()
        brute = [s for s in range(cache.num_tokens - n)
                 if window_of(cache, np.array(s)) == window_of(cache, np.array(s + n))]
        assert t.tolist() == brute  # every usable position, none missing
    assert cache.positions(max(LENGTHS)).shape == (0,)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="n_future"):
            cache.positions(bad)


def test_shards_together_hold_exactly_the_windows(tmp_path):
    model, windows = tiny_llama(), random_windows()
    whole = build(model, windows, tmp_path / "whole")
    for world in (2, 3):
        shards = [build(model, windows, tmp_path / f"{r}of{world}", shard=(r, world))
                  for r in range(world)]
        got = [split_windows(s) for s in shards]
        for r, g in enumerate(got):
            assert g == windows[r::world]  # windows rank, rank + world, ...
            assert shards[r].meta["shard"] == [r, world]
        assert sorted(w for g in got for w in g) == sorted(windows)
        assert sum(s.num_tokens for s in shards) == whole.num_tokens
        # a shard's features are the unsharded cache's rows of the same windows
        starts = np.concatenate([[0], whole.window_ends[:-1]])
        for r, s in enumerate(shards):
            rows = np.concatenate([np.arange(starts[i], whole.window_ends[i])
                                   for i in range(r, len(windows), world)])
            np.testing.assert_array_equal(s.hidden, whole.hidden[rows])
            np.testing.assert_array_equal(s.top_ids, whole.top_ids[rows])


def test_bad_input_gives_clear_errors(tmp_path):
    model, windows = tiny_llama(), random_windows()
    for shard in ((2, 2), (-1, 2), (0, 0), (1.0, 2), ("0", 2)):
        with pytest.raises(ValueError, match="shard must be"):
            build(model, windows, tmp_path / "s", shard=shard)
    with pytest.raises(ValueError, match="no windows for shard"):
        build(model, windows[:1], tmp_path / "s", shard=(1, 2))
    with pytest.raises(ValueError, match="topk"):
        build(model, windows, tmp_path / "s", topk=0)
    with pytest.raises(FileNotFoundError, match="meta.json"):
        FeatureCache.open(tmp_path / "missing")
    with pytest.raises(ValueError, match="block_size"):  # longer than the backbone's context
        build(model, [list(range(65))], tmp_path / "long")
    assert not (tmp_path / "long" / "meta.json").exists()  # a failed build is not a cache
    with pytest.raises(ValueError, match="ids"):  # a token id outside the vocabulary
        build(model, [[1, 2, 256]], tmp_path / "vocab")


def test_corpus_windows_start_at_lines_of_the_training_split():
    tok = ByteTokenizer()
    windows = corpus_windows(tok, "code", 6, window=40)
    corpus = load_corpus("code")
    train, val = corpus.train.encode(), corpus.val.encode()
    assert 4 <= len(windows) <= 6 and all(len(w) == 40 for w in windows)
    starts = [train.find(bytes(w)) for w in windows]
    assert all(s >= 0 for s in starts)
    assert all(s == 0 or train[s - 1 : s] == b"\n" for s in starts)
    assert starts == sorted(starts) and len(set(starts)) == len(starts)  # spread, in order
    held_out = corpus_windows(tok, "code", 3, window=40, split="val")
    assert held_out and all(bytes(w) in val for w in held_out)
    with pytest.raises(ValueError, match="split"):
        corpus_windows(tok, "code", 3, split="test")
    with pytest.raises(ValueError, match="window"):
        corpus_windows(tok, "code", 3, window=1)


def test_meta_json_is_plain_json(tmp_path):
    cache = build(tiny_llama(), random_windows(), tmp_path / "c", topk=3)
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert meta["num_tokens"] == cache.num_tokens and meta["topk"] == 3
    assert meta["window_ends"] == cache.window_ends.tolist()
    assert not list((tmp_path / "c").glob("*.tmp"))
