"""Tests of cptoy.selfdistill: the mask-token student keeps the architecture, the distillation
loss is the stated one, and ConfAdapt emits exactly the prefix above the threshold."""

from __future__ import annotations

import pytest
import torch

from cptoy.decoding import generate
from cptoy.model import GPT, GPTConfig
from cptoy.selfdistill import (
    DistillConfig,
    SelfDistilledMTP,
    SelfSpecModel,
    confadapt_generate,
    confadapt_length,
    distill,
    distill_loss,
    mtp_agreement,
)

V, K = 7, 4


def _gpt(seed=0, scale=20.0) -> GPT:
    torch.manual_seed(seed)
    g = GPT(GPTConfig(vocab_size=V, block_size=40, n_layer=2, n_head=2, n_embd=16))
    with torch.no_grad():
        g.wte.weight.mul_(scale)  # peaky distributions: top-1 probabilities spread over (0, 1)
    return g.eval()


# ---------------------------------------------------------------- architecture
def test_mask_tokens_keep_the_architecture():
    base = _gpt()
    st = SelfDistilledMTP(base, k=K)
    m = st.model
    assert type(m) is GPT
    cfg_b, cfg_s = base.config.to_dict(), m.config.to_dict()
    assert cfg_s.pop("vocab_size") == V + K - 1 and cfg_b.pop("vocab_size") == V
    assert cfg_s == cfg_b
    # the same modules and parameters; only the token embedding has k - 1 more rows
    assert [n for n, _ in m.named_modules()] == [n for n, _ in base.named_modules()]
    sb, ss = base.state_dict(), m.state_dict()
    assert list(sb) == list(ss)
    for name in sb:
        if name == "wte.weight":
            assert ss[name].shape == (V + K - 1, 16)
            assert torch.equal(ss[name][:V], sb[name])
        else:
            assert torch.equal(ss[name], sb[name]), name
    assert m.num_params() - base.num_params() == st.num_new_params() == (K - 1) * 16
    assert st.mask_ids == [V, V + 1, V + 2]
    assert sum(p.numel() for p in st.parameters()) == m.num_params()  # no heads anywhere


def test_ordinary_positions_are_the_base_model_and_masks_give_k_outputs():
    base = _gpt()
    st = SelfDistilledMTP(base, k=K)
    x = torch.randint(0, V, (3, 9), generator=torch.Generator().manual_seed(0))
    z = st.mtp_logits(x)
    assert z.shape == (3, K, V)  # the mask ids are never among the outputs
    ref = base.logits(base(x))  # (3, 9, V)
    assert torch.allclose(z[:, 0], ref[:, -1], atol=1e-5)  # row 0 = ordinary next token
    # causal attention: appending masks does not change any earlier position
    inp = torch.cat([x, torch.tensor(st.mask_ids).expand(3, K - 1)], 1)
    full = st.model.logits(st.model(inp))[..., :V]
    assert torch.allclose(full[:, :9], ref, atol=1e-5)
    assert st.mtp_logits(x, k=2).shape == (3, 2, V)
    with pytest.raises(ValueError, match="k must be"):
        st.mtp_logits(x, k=K + 1)


def test_base_is_left_untouched():
    base = _gpt()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    st = SelfDistilledMTP(base, k=K)
    with torch.no_grad():
        st.model.wte.weight.add_(1.0)
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k])


# ---------------------------------------------------------------- ConfAdapt rule
def test_confadapt_length_is_the_prefix_above_threshold():
    assert confadapt_length([0.95, 0.92, 0.50, 0.99], 0.9) == 2  # stops at 0.50, 0.99 ignored
    assert confadapt_length([0.95, 0.92, 0.91, 0.99], 0.9) == 4
    assert confadapt_length([0.30, 0.99, 0.99], 0.9) == 1  # the first token is always emitted
    assert confadapt_length([0.95, 0.90, 0.99], 0.9) == 1  # "exceed" is strict
    assert confadapt_length([0.95, 0.90, 0.99], 1.0) == 1
    assert confadapt_length([0.95, 0.90, 0.99], 0.0) == 3
    batch = torch.tensor([[0.95, 0.92, 0.5], [0.1, 0.95, 0.95], [1.0, 1.0, 1.0]])
    assert confadapt_length(batch, 0.9).tolist() == [2, 1, 3]
    with pytest.raises(TypeError, match="threshold"):
        confadapt_length([0.5], float("nan"))


def _manual_confadapt(st, prompt, max_new, threshold):
    """Reference ConfAdapt without a KV cache: recompute mtp_logits on the whole context."""
    toks = []
    lengths = []
    while len(toks) < max_new:
        kk = min(st.k, max_new - len(toks))
        z = st.mtp_logits(torch.tensor([prompt + toks]), k=kk)[0]  # (kk, V)
        top, y = torch.softmax(z, -1).max(-1)
        n = confadapt_length(top, threshold)
        toks += y[:n].tolist()
        lengths.append(n)
    return toks, lengths


@pytest.mark.parametrize("threshold", [0.3, 0.6, 0.9])
def test_confadapt_generate_emits_exactly_the_confident_prefix(threshold):
    st = SelfDistilledMTP(_gpt(seed=1), k=K)
    with torch.no_grad():  # masks with their own (random) embeddings: varied confidences
        st.model.wte.weight[V:].normal_(0, 8.0, generator=torch.Generator().manual_seed(2))
    for prompt in ([1, 2, 3], [6, 0, 6, 0, 5]):
        g = confadapt_generate(st, prompt, 20, threshold)
        toks, lengths = _manual_confadapt(st, prompt, 20, threshold)
        assert g.tokens == toks
        assert g.stats.gained_per_forward == lengths
        assert sum(g.stats.gained_per_forward) == 20 and len(g.tokens) == 20
        assert all(1 <= n <= K for n in lengths)


def test_confadapt_threshold_one_is_greedy_decoding():
    base = _gpt(seed=3)
    st = SelfDistilledMTP(base, k=K)
    ar = generate(base, [1, 2], 15, temperature=0).tokens
    g = confadapt_generate(st, [1, 2], 15, threshold=1.0)
    assert g.tokens == ar and g.stats.forward_passes == 15
    assert confadapt_generate(st, [1, 2], 15, threshold=0.5, k=1).tokens == ar
    with pytest.raises(ValueError, match="block_size"):
        confadapt_generate(st, [1] * 30, 10, 0.9)


def test_student_drafts_for_lossless_verification():
    """The student's mask outputs as drafts, the base model as verifier: greedy output equals
    the base model's; each step drafts k tokens from one student pass over the new tokens
    (its own cache); the drafts are the student's one-pass argmaxes (checked uncached)."""
    base = _gpt(seed=3)
    st = SelfDistilledMTP(base, k=K)
    with torch.no_grad():  # masks that carry some signal: drafts are sometimes right
        st.model.wte.weight[V:] += 0.5 * torch.randn(K - 1, 16,
                                                     generator=torch.Generator().manual_seed(1))
    model = SelfSpecModel(st, base)
    assert model.n_future == K + 1
    for prompt in ([1, 2], [3, 3, 0, 6]):
        ar = generate(base, prompt, 20, temperature=0).tokens
        g = generate(model, prompt, 20, temperature=0, strategy="self-spec", record_steps=True)
        assert g.tokens == ar
        assert max(g.stats.drafted_per_step) == K
        for r in g.steps:
            if r.drafts:
                ctx = torch.tensor([prompt + ar[: r.context_length - len(prompt) + 1]])
                assert r.drafts == st.mtp_logits(ctx)[0, : len(r.drafts)].argmax(-1).tolist()
                assert r.gate_prior == [1.0] and r.gates == [[1.0]] * len(r.drafts)
    with pytest.raises(ValueError, match="vocab"):
        SelfSpecModel(st, _gpt_v(V + 1))


def _gpt_v(vocab: int) -> GPT:
    return GPT(GPTConfig(vocab_size=vocab, block_size=40, n_layer=2, n_head=2, n_embd=16))


# ---------------------------------------------------------------- distillation
def test_student_forced_loss_is_the_stated_formula():
    base = _gpt(seed=4)
    st = SelfDistilledMTP(base, k=K)
    with torch.no_grad():
        st.model.wte.weight[V:].normal_(0, 4.0, generator=torch.Generator().manual_seed(0))
    x = torch.randint(0, V, (5, 8), generator=torch.Generator().manual_seed(1))
    out = distill_loss(st, base, x, 3, anchor_weight=0.0)
    lps = torch.log_softmax(st.mtp_logits(x, k=3), -1)  # (5, 3, V)
    y = lps.argmax(-1)
    log_ps = lps.gather(-1, y[..., None]).squeeze(-1).sum(1)
    # the teacher's chain rule, one token at a time
    log_pt = torch.zeros(5)
    for j in range(3):
        ctx = torch.cat([x, y[:, :j]], 1)
        lt = torch.log_softmax(base.logits(base(ctx))[:, -1], -1)
        log_pt += lt.gather(-1, y[:, j:j + 1]).squeeze(-1)
    want = -(log_pt.exp() * log_ps).mean()
    assert out["total"].item() == pytest.approx(want.item(), rel=1e-4)
    assert out["teacher_prob"].item() == pytest.approx(log_pt.exp().mean().item(), rel=1e-4)
    # with an anchor the total grows by anchor_weight * KL (>= 0)
    out2 = distill_loss(st, base, x, 3, anchor_weight=2.0)
    assert out2["total"].item() == pytest.approx(out2["mtp"].item() + 2 * out2["anchor"].item(),
                                                 rel=1e-4)
    assert out2["anchor"].item() >= -1e-6


def test_teacher_objective_targets_the_teacher_greedy_continuation():
    base = _gpt(seed=5)
    st = SelfDistilledMTP(base, k=K)
    x = torch.randint(0, V, (4, 6), generator=torch.Generator().manual_seed(3))
    out = distill_loss(st, base, x, K, anchor_weight=0.0, objective="teacher")
    lps = torch.log_softmax(st.mtp_logits(x), -1)
    targets = torch.stack([torch.tensor(generate(base, r.tolist(), K, 0).tokens) for r in x])
    want = -lps.gather(-1, targets[..., None]).squeeze(-1).sum(1).mean()
    assert out["total"].item() == pytest.approx(want.item(), rel=1e-4)
    with pytest.raises(ValueError, match="objective"):
        distill_loss(st, base, x, K, objective="magic")


def test_distill_keeps_the_teacher_frozen_and_masks_mode_trains_masks_only():
    base = _gpt(seed=6)
    teacher_before = {k: v.clone() for k, v in base.state_dict().items()}
    ids = torch.randint(0, V, (400,), generator=torch.Generator().manual_seed(0))
    st = SelfDistilledMTP(base, k=K)
    before = {k: v.clone() for k, v in st.model.state_dict().items()}
    hist = distill(st, base, ids, DistillConfig(steps=4, batch_size=4, lr=1e-2, warmup=1,
                                                trainable="masks", min_context=4))
    assert hist["steps"] == 4 and len(hist["train"]) >= 1
    after = st.model.state_dict()
    for k, v in before.items():
        if k == "wte.weight":
            assert torch.equal(after[k][:V], v[:V])  # real tokens untouched
            assert not torch.equal(after[k][V:], v[V:])  # the masks moved
        else:
            assert torch.equal(after[k], v), k
    for k, v in base.state_dict().items():
        assert torch.equal(v, teacher_before[k])
    # masks-only training leaves the ordinary next token exactly the teacher's
    assert mtp_agreement(st, base, ids, num=32)["by_position"][0] == 1.0
    st2 = SelfDistilledMTP(base, k=K)
    distill(st2, base, ids, DistillConfig(steps=3, batch_size=4, lr=1e-2, warmup=1,
                                          min_context=4))
    assert not torch.equal(st2.model.h[0].attn.c_attn.weight, base.h[0].attn.c_attn.weight)
    assert all(p.requires_grad for p in st2.parameters())


def test_config_validation():
    with pytest.raises(ValueError, match="objective"):
        DistillConfig(objective="x")
    with pytest.raises(ValueError, match="trainable"):
        DistillConfig(trainable="heads")
    with pytest.raises(ValueError, match="lr"):
        DistillConfig(lr=0.0)
    with pytest.raises(TypeError):
        SelfDistilledMTP(torch.nn.Linear(2, 2), k=2)
    with pytest.raises(ValueError, match="k must be"):
        SelfDistilledMTP(_gpt(), k=1)
