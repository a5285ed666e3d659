"""The GPT backbone: configs, KV cache equivalences, block limits, GPT-2 import."""

import pytest
import torch

from cptoy.model import GPT, PRESETS, GPTConfig, KVCache


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.preset("tiny", **kw)).eval()


def ids(B, T, V=256, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- config


def test_presets_build_and_override():
    for name in PRESETS:
        c = GPTConfig.preset(name)
        assert c.n_embd % c.n_head == 0
    c = GPTConfig.preset("tiny", vocab_size=17, dropout=0.1)
    assert (c.vocab_size, c.dropout, c.n_layer) == (17, 0.1, 2)
    assert GPTConfig.preset("gpt2").vocab_size == 50257


def test_unknown_preset_lists_names():
    with pytest.raises(ValueError, match="tiny.*toy|gpt2"):
        GPTConfig.preset("huge")
    with pytest.raises(ValueError, match="n_layers"):
        GPTConfig.preset("tiny", n_layers=3)


@pytest.mark.parametrize(
    "kw, exc, field",
    [
        (dict(n_embd=30, n_head=4), ValueError, "n_embd"),
        (dict(n_layer=0), ValueError, "n_layer"),
        (dict(block_size=-1), ValueError, "block_size"),
        (dict(vocab_size=2.5), TypeError, "vocab_size"),
        (dict(n_head=True), TypeError, "n_head"),
        (dict(dropout=1.0), ValueError, "dropout"),
        (dict(bias="yes"), TypeError, "bias"),
    ],
)
def test_bad_config_raises(kw, exc, field):
    with pytest.raises(exc, match=field):
        GPTConfig.preset("tiny", **kw)


def test_param_counts():
    # closed form for a GPT with biases: embeddings + per layer 12 C^2 + 13 C + final LN 2C
    for name in ("tiny", "toy", "small"):
        c = GPTConfig.preset(name)
        m = GPT(c)
        C = c.n_embd
        per_layer = 12 * C * C + 13 * C
        emb = c.vocab_size * C + c.block_size * C
        assert m.num_params() == emb + c.n_layer * per_layer + 2 * C
        assert m.num_params(non_embedding=True) == c.n_layer * per_layer + 2 * C
        assert c.n_layer == GPTConfig.preset(name).n_layer


def test_gpt2_preset_is_124M_and_runs_cached():
    torch.manual_seed(0)
    m = GPT(GPTConfig.preset("gpt2")).eval()
    assert m.num_params() == 124_439_808  # the GPT-2 small figure (tied embeddings)
    assert m.unembedding.shape == (50257, 768)
    x = ids(1, 4, V=50257)
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache()
        a = m(x[:, :3], cache)
        b = m(x[:, 3:], cache)
    torch.testing.assert_close(torch.cat([a, b], 1), full, atol=1e-4, rtol=1e-4)
    assert cache.length == 4


def test_init_is_nanogpt_like():
    torch.manual_seed(0)
    m = GPT(GPTConfig.preset("small"))
    assert abs(m.wte.weight.std().item() - 0.02) < 1e-3
    proj = m.h[0].attn.c_proj.weight
    assert abs(proj.std().item() - 0.02 / (2 * 6) ** 0.5) < 1e-3
    assert m.h[0].mlp.c_fc.bias.abs().max().item() == 0


# ----------------------------------------------------------------------------- forward + cache


def test_shapes_and_tied_logits():
    m = tiny()
    x = ids(3, 10)
    h = m(x)
    assert h.shape == (3, 10, 32)
    lg = m.logits(h)
    assert lg.shape == (3, 10, 256)
    torch.testing.assert_close(lg, h @ m.wte.weight.T)
    assert m.unembedding is m.wte.weight


def test_causality_future_tokens_do_not_leak():
    m = tiny()
    x = ids(1, 12)
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % 256
    torch.testing.assert_close(m(x)[:, :8], m(y)[:, :8])
    assert not torch.allclose(m(x)[:, 8:], m(y)[:, 8:])


def test_cache_prefill_token_by_token_and_chunked_agree():
    m = tiny()
    x = ids(2, 40, seed=1)
    with torch.no_grad():
        full = m(x)  # (2, 40, C)
        # token by token
        c1 = m.new_cache(2)
        steps = torch.cat([m(x[:, t : t + 1], c1) for t in range(40)], 1)
        # chunks of uneven sizes, T > 1 on top of a non-empty cache
        c2 = m.new_cache(2)
        cuts = [0, 5, 6, 13, 17, 30, 40]
        chunks = torch.cat([m(x[:, a:b], c2) for a, b in zip(cuts[:-1], cuts[1:], strict=True)], 1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(chunks, full, atol=1e-5, rtol=0)
    assert c1.length == c2.length == 40


def test_cache_grows_past_initial_capacity():
    m = tiny(block_size=200)
    x = ids(1, 150, seed=2)
    with torch.no_grad():
        full = m(x)
        c = m.new_cache()
        parts = [m(x[:, a : a + 30], c) for a in range(0, 150, 30)]
    assert c.capacity >= 150 and c.capacity <= 200
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)


def test_truncate_then_reforward_reproduces():
    m = tiny()
    x = ids(1, 30, seed=3)
    draft = ids(1, 5, seed=4)
    with torch.no_grad():
        c = m.new_cache()
        m(x[:, :20], c)
        m(draft, c)  # a rejected draft: 5 tokens appended
        assert c.length == 25
        c.truncate(20)  # roll back
        after = m(x[:, 20:], c)
        full = m(x)
    torch.testing.assert_close(after, full[:, 20:], atol=1e-5, rtol=0)
    c.truncate(0)
    with torch.no_grad():
        torch.testing.assert_close(m(x, c), full, atol=1e-5, rtol=0)


def test_truncate_rejects_bad_lengths():
    m = tiny()
    c = m.new_cache()
    with torch.no_grad():
        m(ids(1, 4), c)
    with pytest.raises(ValueError, match="length"):
        c.truncate(5)
    with pytest.raises(ValueError, match="length"):
        c.truncate(-1)
    with pytest.raises(TypeError, match="length"):
        c.truncate(2.0)
    c.truncate(4)
    assert c.length == 4


def test_block_overflow_raises():
    m = tiny()
    with pytest.raises(ValueError, match="prompt longer than the block"):
        m(ids(1, 65))
    c = m.new_cache()
    with torch.no_grad():
        m(ids(1, 60), c)
        with pytest.raises(ValueError, match="block_size 64"):
            m(ids(1, 5), c)
        assert c.length == 60  # nothing was written
        m(ids(1, 4), c)
    assert c.length == 64


def test_bad_inputs_raise():
    m = tiny()
    with pytest.raises(ValueError, match="idx"):
        m(torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="idx"):
        m(torch.zeros(1, 5))
    with pytest.raises(ValueError, match="ids in"):
        m(torch.full((1, 3), 256))
    with pytest.raises(ValueError, match="batch_size"):
        m(ids(2, 3), m.new_cache(1))
    other = GPT(GPTConfig.preset("tiny", n_layer=3))
    with pytest.raises(ValueError, match="different model"):
        m(ids(1, 3), other.new_cache(1))


def test_batched_cache_matches_rows():
    m = tiny()
    x = ids(3, 12, seed=5)
    with torch.no_grad():
        c = m.new_cache(3)
        m(x[:, :7], c)
        out = m(x[:, 7:], c)
        for b in range(3):
            torch.testing.assert_close(out[b], m(x[b : b + 1])[0, 7:], atol=1e-5, rtol=0)
    assert isinstance(c, KVCache) and c.batch_size == 3


def test_greedy_cached_equals_uncached():
    m = tiny()
    x = ids(2, 6, seed=6)
    a = m.generate_greedy(x, 20)
    b = m.generate_greedy(x, 20, use_cache=False)
    assert a.shape == (2, 26)
    assert torch.equal(a, b)
    assert torch.equal(a[:, :6], x)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    m = GPT(GPTConfig.preset("tiny", dropout=0.5))
    x = ids(1, 8)
    m.train()
    assert not torch.allclose(m(x), m(x))
    m.eval()
    torch.testing.assert_close(m(x), m(x))


def test_backward_reaches_every_parameter():
    m = tiny()
    m.train()
    x = ids(2, 9)
    lg = m.logits(m(x[:, :-1]))
    loss = torch.nn.functional.cross_entropy(lg.reshape(-1, 256), x[:, 1:].reshape(-1))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


# ----------------------------------------------------------------------------- GPT-2 import


def test_from_hf_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hc = transformers.GPT2Config(
        vocab_size=97,
        n_positions=48,
        n_embd=32,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    hf = transformers.GPT2LMHeadModel(hc).eval()
    hf.save_pretrained(tmp_path)
    x = ids(2, 20, V=97, seed=7)
    with torch.no_grad():
        ref = hf(x).logits
    for src in (tmp_path, hf):
        m = GPT.from_hf(src).eval()
        assert m.config.block_size == 48 and m.config.vocab_size == 97
        with torch.no_grad():
            torch.testing.assert_close(m.logits(m(x)), ref, atol=1e-5, rtol=0)
            c = m.new_cache(2)
            cached = torch.cat([m(x[:, :11], c), m(x[:, 11:], c)], 1)
            torch.testing.assert_close(m.logits(cached), ref, atol=1e-5, rtol=0)
