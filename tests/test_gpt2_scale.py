"""GPT-2 scale: the gpt2 preset on CPU, the head-only distillation objective, the GPU path."""

import math

import pytest
import torch

from cptoy.decoding import generate
from cptoy.distill import distill_loss, distill_loss_fn, marginal_kl
from cptoy.heads import MTPModel
from cptoy.model import GPT, GPTConfig
from cptoy.train import TrainConfig, train


def ids(B, T, V=256, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- gpt2 preset


def test_gpt2_preset_size_and_cached_forward_on_cpu():
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("gpt2")).eval()
    n = model.num_params()
    assert 123e6 < n < 126e6, n  # GPT-2 small: 124M (tied unembedding counted once)
    x = ids(1, 6, V=50257)
    with torch.no_grad():
        full = model.logits(model(x))  # (1, 6, V)
        cache = model.new_cache(1)
        first = model.logits(model(x[:, :4], cache))  # prefill of 4 tokens
        rest = [model.logits(model(x[:, t : t + 1], cache)) for t in (4, 5)]  # one at a time
    assert cache.length == 6
    cached = torch.cat([first] + rest, dim=1)
    assert cached.shape == (1, 6, 50257)
    assert torch.allclose(cached, full, atol=1e-4, rtol=1e-4)
    assert (cached.argmax(-1) == full.argmax(-1)).all()


# ----------------------------------------------------------------------------- distillation


def tiny_mtp(n=3, r=2, frozen=True, seed=0):
    torch.manual_seed(seed)
    return MTPModel(GPTConfig.preset("tiny"), n, r, freeze_backbone=frozen, seed=seed)


def test_kl_is_zero_when_the_heads_equal_the_backbone():
    # n = 1, rank 1, zero transform: z = U (h + silu(0)) = U h, exactly the backbone's logits
    m = tiny_mtp(n=1, r=1)
    with torch.no_grad():
        m.heads.transform_weight.zero_()
        m.heads.transform_bias.zero_()
    out = distill_loss(m, ids(2, 17), alpha=1.0, positions=None)
    assert abs(out["kl"].item()) < 1e-5
    # and the data term is then the backbone's own next-token NLL on the same positions
    assert out["joint_nll"].item() == pytest.approx(out["next_token_nll"].item(), rel=1e-4)


def test_marginal_kl_matches_the_cp_marginal_and_a_direct_kl():
    m = tiny_mtp(n=3, r=4)
    with torch.no_grad():
        torch.nn.init.normal_(m.heads.gate.weight, std=1.0)
        h = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
        teacher = torch.randn(5, 3, 256, generator=torch.Generator().manual_seed(2))
        got = marginal_kl(teacher, m.heads.gate_log_probs(h), m.heads.factor_logits(h))  # (5, 3)
        dist = m.heads(h)  # CPDist, batch (5,)
        p = teacher.softmax(-1)
        for s in range(3):
            log_q = dist.log_marginal(s)  # (5, V)
            ref = (p[:, s] * (p[:, s].log() - log_q)).sum(-1)
            assert torch.allclose(got[:, s], ref, atol=1e-5)
    assert (got > 0).all()


def test_distillation_decreases_and_changes_only_the_heads():
    m = tiny_mtp(n=3, r=2)
    with torch.no_grad():
        m.backbone.wte.weight.mul_(8.0)  # a peaked backbone ...
        m.heads.transform_weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(4))
    before = {k: v.clone() for k, v in m.state_dict().items()}  # ... and heads that disagree
    data = torch.randint(0, 256, (3000,), generator=torch.Generator().manual_seed(3))
    cfg = TrainConfig(steps=30, batch_size=2, block_size=16, lr=3e-2, warmup=1, log_every=1,
                      device="cpu")
    loss_fn = distill_loss_fn(alpha=1.0, positions=16)
    probe = ids(4, 19, seed=9)  # a fixed batch, all positions

    def probe_kl():
        with torch.no_grad():
            return distill_loss(m, probe, alpha=1.0, positions=None)["kl"].item()

    kl0 = probe_kl()
    train(m, data, None, cfg, progress=False, loss_fn=loss_fn)
    kl1 = probe_kl()
    assert kl1 < 0.85 * kl0, (kl0, kl1)  # measured 1.58 -> 1.17
    changed = {k for k, v in m.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("heads.") for k in changed), changed
    assert "backbone.wte.weight" not in changed


def test_distillation_is_deterministic_and_mixes_as_documented():
    a = distill_loss(tiny_mtp(), ids(2, 20), alpha=0.3, generator=torch.Generator().manual_seed(0),
                     positions=8)
    b = distill_loss(tiny_mtp(), ids(2, 20), alpha=0.3, generator=torch.Generator().manual_seed(0),
                     positions=8)
    assert a["total"].item() == b["total"].item()
    lb = tiny_mtp().load_balance_coef
    want = 0.3 * a["kl"] + 0.7 * a["joint_nll"] + lb * a["load_balance"]
    assert a["total"].item() == pytest.approx(want.item(), rel=1e-6)


def test_distillation_rejects_bad_input():
    with pytest.raises(ValueError, match="alpha"):
        distill_loss_fn(alpha=1.5)
    with pytest.raises(ValueError, match="alpha"):
        distill_loss_fn(alpha=math.nan)
    with pytest.raises(ValueError, match="positions"):
        distill_loss_fn(positions=0)
    with pytest.raises(ValueError, match="freeze_backbone"):
        distill_loss(tiny_mtp(frozen=False), ids(2, 20))
    with pytest.raises(ValueError, match="T >= n_future"):
        distill_loss(tiny_mtp(n=3), ids(2, 5))  # T = 2 < n = 3
    with pytest.raises(TypeError, match="MTPModel"):
        distill_loss(GPT(GPTConfig.preset("tiny")), ids(2, 20))


# ----------------------------------------------------------------------------- GPU path


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_training_step_and_greedy_equality():
    m = tiny_mtp(n=4, r=4)
    data = torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(steps=3, batch_size=4, block_size=32, warmup=1, device="cuda")
    hist = train(m, data, None, cfg, progress=False, loss_fn=distill_loss_fn(alpha=0.5))
    assert hist["device"].startswith("cuda") and math.isfinite(hist["train"][-1]["total"])
    m.eval()
    for s in range(3):
        prompt = torch.randint(0, 256, (8,), generator=torch.Generator().manual_seed(s)).tolist()
        ar = generate(m, prompt, 24, temperature=0, strategy="ar").tokens
        spec = generate(m, prompt, 24, temperature=0, strategy="self-spec").tokens
        assert spec == ar

