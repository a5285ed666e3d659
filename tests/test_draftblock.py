"""The draft block (EAGLE-style chain drafter): one chain, greedy equality, training (its
chi-square losslessness test is in tests/test_lossless.py with every other drafter)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cptoy.decoding import generate
from cptoy.draftblock import DraftBlockHeads, DraftBlockModel
from cptoy.features import FeatureCache
from cptoy.headtrain import (
    HeadTrainConfig,
    build_heads_model,
    cached_acceptance,
    first_token_conditionals,
    sample_batch,
    train_heads,
)
from cptoy.model import GPT, GPTConfig


def _model(V=16, n=4, seed=0, scale=1.0) -> DraftBlockModel:
    """A tiny LLaMA-family backbone (rotary, GQA, SwiGLU) with a random draft block."""
    torch.manual_seed(seed)
    bb = GPT(GPTConfig.preset("tiny-llama", vocab_size=V, block_size=32))
    with torch.no_grad():
        bb.wte.weight.mul_(20.0)  # p spread over V, not uniform
    model = DraftBlockModel(bb, n, mlp_hidden=48)
    with torch.no_grad():
        for p in model.heads.parameters():
            p.add_(scale * 0.3 * torch.randn_like(p))
    return model.eval()


def test_training_chain_equals_drafting_chain():
    """The differentiable training path (chain_logits on tokens) and the drafting path give the
    same logits along the greedy chain; drafts depend on every earlier draft, not only x_1."""
    model = _model(V=16)
    h = model.backbone(torch.tensor([[1, 2, 3, 4]]))[:, -1].expand(5, -1)  # (5, d)
    x1 = torch.arange(5)
    d = model.heads.draft(h, x1, 1.0)  # greedy chain, untempered
    drafts = d.mode()  # (5, 3)
    z = model.heads.chain_logits(h, torch.cat([x1[:, None], drafts[:, :-1]], 1))  # (5, 3, V)
    assert torch.allclose(torch.log_softmax(z, -1), d.log_factors[:, :, 0], atol=1e-5)
    # change draft 2 by hand: position 3's logits change (a CP / first-token head's would not)
    other = torch.cat([x1[:, None], (drafts[:, :1] + 1) % 16, drafts[:, 1:2]], 1)
    z2 = model.heads.chain_logits(h, other)
    assert torch.allclose(z2[:, 0], z[:, 0]) and not torch.allclose(z2[:, 1], z[:, 1])


@pytest.mark.parametrize("shortlist", [None, list(range(0, 16, 2))])
def test_greedy_self_spec_equals_ar(shortlist):
    model = _model(V=16)
    model.heads.set_draft_vocab(shortlist)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        prompt = torch.randint(0, 16, (4,), generator=gen).tolist()
        ref = generate(model.backbone, prompt, 20, temperature=0, strategy="ar").tokens
        g = generate(model, prompt, 20, temperature=0, strategy="self-spec", record_steps=True)
        assert g.tokens == ref
        if shortlist:
            assert all(d % 2 == 0 for r in g.steps for d in r.drafts)


def _fake_cache(tmp_path, V=16, N=2048, window=64, seed=0) -> FeatureCache:
    """Text of runs x, x+1, x+2, ... (mod V); the 'backbone' is almost certain of the next
    token, and h is noise: a drafter must read x_1 and its chain to draft 3 deep."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, V, N // 8)
    ids = ((starts[:, None] + np.arange(8)) % V).reshape(-1).astype(np.int32)  # (N,)
    nxt = np.roll(ids, -1)
    hidden = rng.normal(size=(N, 32)).astype(np.float16)
    top_ids = np.stack([nxt, (nxt + 1) % V], 1).astype(np.int32)  # (N, 2)
    top_logp = np.log(np.array([[0.99, 0.01]] * N)).astype(np.float16)
    ends = np.arange(window, N + 1, window)
    return FeatureCache(tmp_path, hidden, ids, top_ids, top_logp, window, ends, {})


def test_training_learns_to_chain(tmp_path):
    """On runs, positions 2..4 follow from x_1 and the earlier drafts; the block learns that
    (teacher-forced greedy acceptance from < 1 to > 2 of 3 drafts, cut short only where a run
    ends), the backbone does not change."""
    V = 16
    torch.manual_seed(0)
    bb = GPT(GPTConfig.preset("tiny-llama", vocab_size=V, block_size=32))
    with torch.no_grad():
        bb.wte.weight.mul_(25.0)  # embeddings of a trained model's size, not 0.02
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    model = build_heads_model(bb, "block", 4, mlp_hidden=48)
    cache = _fake_cache(tmp_path, V)
    shortlist = torch.arange(V)
    acc0 = cached_acceptance(model, cache, shortlist)["tokens_per_forward"]
    hist = train_heads(model, cache, HeadTrainConfig(steps=150, batch_size=64, lr=1e-2,
                                                     warmup=10), shortlist, progress=False)
    acc1 = cached_acceptance(model, cache, shortlist)
    assert hist["loss"][-1] < 0.3 * hist["loss"][0]
    assert acc0 < 2.0 < 3.0 < acc1["tokens_per_forward"], (acc0, acc1)
    assert all(torch.equal(v, before[k]) for k, v in bb.state_dict().items())
    b = sample_batch(cache, cache.positions(4)[:8], 4)
    assert first_token_conditionals(model.heads, b, shortlist).shape == (8, 3, V)


def test_bad_input_is_rejected():
    model = _model(V=16)
    h = torch.zeros(2, model.heads.d_model)
    with pytest.raises(ValueError, match="tokens must be"):
        model.heads.chain_logits(h, torch.zeros(2, 4, dtype=torch.long))  # 4 > n - 1
    with pytest.raises(ValueError, match="n_draft"):
        model.heads.draft(h, torch.zeros(2, dtype=torch.long), 1.0, n_draft=4)
    with pytest.raises(ValueError, match="n_future"):
        DraftBlockHeads(model.config, 1, model.backbone.wte.weight, model.backbone.unembedding)
    with pytest.raises(TypeError, match="backbone"):
        DraftBlockModel("smollm2", 4)
