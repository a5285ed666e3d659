"""CP heads and MTPModel: exact densities, fused loss = autograd, drafting, freezing, checkpoints."""

import itertools
import math

import pytest
import torch
import torch.nn as nn

from cptoy.cp import CPDist
from cptoy.heads import CPHeads, MTPModel, frequency_shortlist
from cptoy.model import GPTConfig

STRUCTURES = [None, 4]  # full heads, structured heads with expert_dim 4
TOL = dict(atol=1e-5, rtol=1e-5)  # float32 computations compared in float64


def make_heads(V=7, d=8, n=3, r=3, expert_dim=None, chunk_size=2, seed=0):
    torch.manual_seed(seed)
    U = nn.Parameter(torch.randn(V, d))
    heads = CPHeads(d, V, n, r, U, expert_dim=expert_dim, chunk_size=chunk_size)
    if heads.gate is not None:  # a non-uniform gate, so that the gate matters in every check
        nn.init.normal_(heads.gate.weight, std=0.5)
    return heads, U


def tiny_model(**kw) -> MTPModel:
    torch.manual_seed(0)
    kw.setdefault("n_future", 3)
    kw.setdefault("rank", 3)
    return MTPModel(GPTConfig.preset("tiny", vocab_size=kw.pop("V", 32)), **kw)


def ids(B, L, V=32, seed=0):
    return torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- densities


@pytest.mark.parametrize("expert_dim", STRUCTURES)
def test_rank1_is_the_product_of_its_factors(expert_dim):
    heads, _ = make_heads(r=1, expert_dim=expert_dim)
    assert heads.gate is None
    h = torch.randn(4, 8)
    dist = heads(h)
    P = dist.to_tensor()  # (4, V, V, V)
    f = dist.factors[:, :, 0, :]  # (4, n, V)
    outer = torch.einsum("bi,bj,bk->bijk", f[:, 0], f[:, 1], f[:, 2])
    torch.testing.assert_close(P, outer, rtol=1e-5, atol=1e-7)
    assert torch.allclose(dist.weights, torch.ones(4, 1))


@pytest.mark.parametrize("expert_dim", STRUCTURES)
def test_joint_log_prob_equals_the_explicit_tensor(expert_dim):
    V, n = 7, 3
    heads, _ = make_heads(V=V, n=n, r=3, expert_dim=expert_dim)
    h = torch.randn(2, 5, 8)  # (B, T, d)
    targets = torch.randint(0, V, (2, 5, n), generator=torch.Generator().manual_seed(1))
    dist = heads(h)
    P = dist.to_tensor()  # (2, 5, V, V, V)
    assert torch.allclose(P.sum((-1, -2, -3)), torch.ones(2, 5), atol=1e-5)
    explicit = P[
        torch.arange(2)[:, None],
        torch.arange(5)[None],
        targets[..., 0],
        targets[..., 1],
        targets[..., 2],
    ].log()
    jl = heads.joint_log_prob(h, targets)
    torch.testing.assert_close(jl, explicit, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dist.log_prob(targets), explicit, rtol=1e-5, atol=1e-5)
    # the fused training path agrees
    terms = heads.loss_terms(h.reshape(10, 8), targets.reshape(10, n))
    torch.testing.assert_close(terms.log_q, explicit.reshape(10), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(terms.log_q_sum, explicit.sum(), rtol=1e-5, atol=1e-4)
    # first-token marginal = the explicit tensor summed over positions 2..n
    first = P.sum((-1, -2)).gather(-1, targets[..., :1]).squeeze(-1).log()
    torch.testing.assert_close(
        heads.first_token_log_prob(h, targets[..., 0]), first, rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(terms.log_first, first.reshape(10), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("expert_dim", STRUCTURES)
@pytest.mark.parametrize("frozen_unembedding", [False, True])
def test_fused_gradients_equal_autograd(expert_dim, frozen_unembedding):
    heads, U = make_heads(V=11, d=8, n=3, r=4, expert_dim=expert_dim, chunk_size=3)
    U.requires_grad_(not frozen_unembedding)
    h = torch.randn(10, 8, requires_grad=True)
    t = torch.randint(0, 11, (10, 3), generator=torch.Generator().manual_seed(2))
    params = [h] + ([U] if not frozen_unembedding else []) + list(heads.parameters())
    ref = torch.autograd.grad(heads.joint_log_prob(h, t).sum() * 0.7, params)
    fused = torch.autograd.grad(heads.loss_terms(h, t).log_q_sum * 0.7, params)
    for a, b in zip(ref, fused, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        assert a.abs().sum() > 0


def test_loss_terms_without_grad_and_huge_logit_gaps():
    heads, U = make_heads(V=5, d=4, n=2, r=2)
    with torch.no_grad():
        U.mul_(60.0)  # logit gaps of hundreds of nats: probabilities underflow float32
    h = torch.randn(6, 4)
    t = torch.randint(0, 5, (6, 2), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        terms = heads.loss_terms(h, t)
        ref = heads(h).log_prob(t)
    assert torch.isfinite(terms.log_q).all()
    torch.testing.assert_close(terms.log_q, ref, rtol=1e-4, atol=1e-3)


def test_gate_probs_and_rank1_gate():
    heads, _ = make_heads(r=3)
    h = torch.randn(2, 3, 8)
    w = heads.gate_probs(h)
    assert w.shape == (2, 3, 3) and torch.allclose(w.sum(-1), torch.ones(2, 3))
    h1, _ = make_heads(r=1)
    assert torch.equal(h1.gate_probs(h), torch.ones(2, 3, 1))


# ----------------------------------------------------------------------------- drafting


@pytest.mark.parametrize("expert_dim", STRUCTURES)
@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0, 1.6])
def test_draft_equals_tempered_conditional(expert_dim, temperature):
    heads, _ = make_heads(V=9, n=4, r=3, expert_dim=expert_dim)
    h = torch.randn(5, 8)
    first = torch.randint(0, 9, (5,), generator=torch.Generator().manual_seed(3))
    full = heads(h)
    ref = (full.tempered(temperature) if temperature > 0 else full).condition(first[:, None])
    got = heads.draft(h, first, temperature)
    assert got.n == 3 and got.batch_shape == (5,)
    torch.testing.assert_close(got.log_weights, ref.log_weights, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.log_factors, ref.log_factors, rtol=1e-5, atol=1e-5)
    # fewer drafted positions: the same posterior, the leading factors
    k1 = heads.draft(h, first, temperature, n_draft=1)
    assert k1.n == 1
    torch.testing.assert_close(k1.log_weights, ref.log_weights, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k1.log_factors, ref.log_factors[:, :1], rtol=1e-5, atol=1e-5)


def test_draft_rejects_bad_input():
    heads, _ = make_heads(n=3)
    h = torch.randn(2, 8)
    with pytest.raises(ValueError, match="temperature"):
        heads.draft(h, torch.tensor([0, 1]), -0.5)
    with pytest.raises(ValueError, match="first_tokens"):
        heads.draft(h, torch.tensor([0]), 1.0)
    with pytest.raises(ValueError, match="first_tokens"):
        heads.draft(h, torch.tensor([0, 99]), 1.0)
    with pytest.raises(ValueError, match="n_draft"):
        heads.draft(h, torch.tensor([0, 1]), 1.0, n_draft=3)
    with pytest.raises(ValueError, match="d_model"):
        heads.draft(torch.randn(2, 5), torch.tensor([0, 1]), 1.0)
    one, _ = make_heads(n=1)
    with pytest.raises(ValueError, match="n_future"):
        one.draft(h, torch.tensor([0, 1]), 1.0)


# ----------------------------------------------------------------------------- the model


@pytest.mark.parametrize("expert_dim", STRUCTURES)
def test_gradients_flow_to_every_parameter(expert_dim):
    model = tiny_model(expert_dim=expert_dim)
    out = model.loss(ids(2, 20))
    assert set(out) == {
        "next_token_nll",
        "joint_nll",
        "first_token_nll",
        "load_balance",
        "expert_entropy",
        "total",
    }
    out["total"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name
    assert model.heads.unembedding is model.backbone.unembedding  # shared, counted once
    assert not any("unembedding" in k for k in model.state_dict())


def test_loss_values_and_load_balance_formula():
    model = tiny_model(rank=4)
    batch = ids(2, 19)
    out = model.loss(batch)
    # zero-initialised gate: uniform usage, load balance 1, entropy log r
    assert out["load_balance"].item() == pytest.approx(1.0, abs=1e-6)
    assert out["expert_entropy"].item() == pytest.approx(math.log(4), abs=1e-6)
    # joint_nll is -log Q per predicted token, averaged over positions
    T = 16
    with torch.no_grad():
        h = model.backbone(batch[:, :T])
        tg = batch.unfold(1, 3, 1)[:, 1 : T + 1]
        ref = -model.heads.joint_log_prob(h, tg).mean() / 3
    assert out["joint_nll"].item() == pytest.approx(ref.item(), rel=1e-5)
    expected = out["next_token_nll"] + out["joint_nll"] + 0.01 * out["load_balance"]
    assert out["total"].item() == pytest.approx(expected.item(), rel=1e-6)
    # one expert takes everything: load balance r, entropy 0
    with torch.no_grad():
        model.heads.gate.bias.copy_(torch.tensor([40.0, 0, 0, 0]))
    out = model.loss(batch)
    assert out["load_balance"].item() == pytest.approx(4.0, rel=1e-4)
    assert out["expert_entropy"].item() == pytest.approx(0.0, abs=1e-4)


def test_head_positions_subsample_is_seeded_and_unbiased():
    batch = ids(2, 35)  # T = 32, 64 positions
    full = tiny_model(head_positions=None)
    ref = full.loss(batch)["joint_nll"].item()
    a = tiny_model(head_positions=8, seed=5)
    b = tiny_model(head_positions=8, seed=5)
    with torch.no_grad():
        va = [a.loss(batch)["joint_nll"].item() for _ in range(300)]
        vb = [b.loss(batch)["joint_nll"].item() for _ in range(3)]
    assert va[:3] == vb  # same seed, same subsets
    assert len(set(va)) > 50  # different subsets per batch
    mean = sum(va) / len(va)
    sd = (sum((v - mean) ** 2 for v in va) / (len(va) - 1)) ** 0.5
    assert abs(mean - ref) < 4 * sd / len(va) ** 0.5 + 1e-6
    a.eval()  # evaluation uses every position
    assert a.loss(batch)["joint_nll"].item() == pytest.approx(ref, rel=1e-6)
    frac = tiny_model(head_positions=0.25)
    assert frac._sample_positions(64, "cpu").numel() == 16


def test_frozen_backbone_changes_only_heads():
    model = tiny_model(expert_dim=4, freeze_backbone=True)
    model.train()
    assert model.backbone_frozen and not model.backbone.training
    assert all(not p.requires_grad for p in model.backbone.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.loss(ids(2, 20))["total"].backward()
    opt.step()
    after = model.state_dict()
    for k in before:
        changed = not torch.equal(before[k], after[k])
        assert changed == k.startswith("heads."), k
    model.freeze_backbone(False)
    assert all(p.requires_grad for p in model.backbone.parameters()) and model.backbone.training


def test_bad_configs_are_rejected():
    cfg = GPTConfig.preset("tiny")
    with pytest.raises(ValueError, match="rank"):
        MTPModel(cfg, n_future=3, rank=0)
    with pytest.raises(ValueError, match="n_future"):
        MTPModel(cfg, n_future=0, rank=2)
    with pytest.raises(TypeError, match="rank"):
        MTPModel(cfg, n_future=3, rank=2.0)
    with pytest.raises(ValueError, match="expert_dim"):
        MTPModel(cfg, n_future=3, rank=2, expert_dim=0)
    with pytest.raises(ValueError, match="head_positions"):
        MTPModel(cfg, n_future=3, rank=2, head_positions=1.5)
    with pytest.raises(ValueError, match="load_balance_coef"):
        MTPModel(cfg, n_future=3, rank=2, load_balance_coef=-1.0)
    with pytest.raises(TypeError, match="config"):
        MTPModel(dict(cfg.to_dict()), n_future=3, rank=2)
    with pytest.raises(ValueError, match="unembedding"):
        CPHeads(8, 7, 3, 2, nn.Parameter(torch.randn(8, 7)))
    model = tiny_model()
    block = model.config.block_size
    with pytest.raises(ValueError, match="block_size"):
        model.loss(ids(1, block + 3 + 1))
    model.loss(ids(1, block + 3))  # exactly fits
    with pytest.raises(ValueError, match="n_future"):
        model.loss(ids(1, 3))
    with pytest.raises(ValueError, match="targets"):
        model.heads.joint_log_prob(
            torch.randn(2, model.config.n_embd), torch.zeros(2, 2, dtype=torch.long)
        )


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("expert_dim", STRUCTURES)
def test_save_load_round_trip_exact(tmp_path, expert_dim):
    model = tiny_model(expert_dim=expert_dim, head_positions=0.5, load_balance_coef=0.05)
    model.loss(ids(2, 20))["total"].backward()  # nothing about grads is saved, but no harm
    path = tmp_path / "m.pt"
    model.save(path, tokenizer={"kind": "byte", "eot": False}, metrics={"val": 1.5})
    loaded = MTPModel.load(path)
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert loaded.heads.unembedding is loaded.backbone.unembedding
    assert (loaded.rank, loaded.n_future, loaded.expert_dim) == (3, 3, expert_dim)
    assert loaded.head_positions == 0.5 and loaded.load_balance_coef == 0.05
    assert loaded.metrics == {"val": 1.5} and loaded.tokenizer_dict == {
        "kind": "byte",
        "eot": False,
    }
    model.eval(), loaded.eval()
    batch = ids(2, 20, seed=4)
    with torch.no_grad():
        assert torch.equal(model.loss(batch)["total"], loaded.loss(batch)["total"])
    assert loaded.heads.draft_vocab is None
    # the drafting shortlist travels with the checkpoint
    model.heads.set_draft_vocab([3, 1, 30])
    model.save(path)
    assert MTPModel.load(path).heads.draft_vocab.tolist() == [1, 3, 30]
    ckpt = torch.load(path, weights_only=True)
    ckpt["draft_vocab"] = [1, 99]
    torch.save(ckpt, tmp_path / "bad_vocab.pt")
    with pytest.raises(ValueError, match="bad_vocab.pt.*draft_vocab"):
        MTPModel.load(tmp_path / "bad_vocab.pt")


def test_half_precision_round_trip(tmp_path):
    model = tiny_model(expert_dim=4).eval()
    full, half = tmp_path / "f.pt", tmp_path / "h.pt"
    model.save(full)
    model.save(half, dtype=torch.float16)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    loaded = MTPModel.load(half).eval()
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=1e-3, atol=1e-3)
    batch = ids(2, 20, seed=4)
    with torch.no_grad():
        a, b = model.loss(batch)["total"].item(), loaded.loss(batch)["total"].item()
    assert abs(a - b) < 1e-2


def test_corrupt_and_mismatched_checkpoints_fail_clearly(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt.*corrupt"):
        MTPModel.load(bad)
    with pytest.raises(ValueError, match="does not exist"):
        MTPModel.load(tmp_path / "missing.pt")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(ValueError, match="not a cptoy MTP checkpoint"):
        MTPModel.load(other)
    good = tmp_path / "good.pt"
    tiny_model(rank=3).save(good)
    ckpt = torch.load(good, weights_only=True)
    ckpt["rank"] = 2  # the weights were made for rank 3
    torch.save(ckpt, tmp_path / "mismatch.pt")
    with pytest.raises(ValueError, match="mismatch.pt.*rank=2.*shape mismatches"):
        MTPModel.load(tmp_path / "mismatch.pt")
    ckpt["rank"] = 3
    del ckpt["state_dict"]["heads.transform_bias"]
    torch.save(ckpt, tmp_path / "missing_key.pt")
    with pytest.raises(ValueError, match="missing keys.*heads.transform_bias"):
        MTPModel.load(tmp_path / "missing_key.pt")
    ckpt = torch.load(good, weights_only=True)
    ckpt["format_version"] = 99
    torch.save(ckpt, tmp_path / "future.pt")
    with pytest.raises(ValueError, match="format_version"):
        MTPModel.load(tmp_path / "future.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated.pt"):
        MTPModel.load(truncated)


def test_forward_returns_a_cpdist_with_batch_shape():
    heads, _ = make_heads()
    d = heads(torch.randn(2, 3, 8))
    assert (
        isinstance(d, CPDist)
        and d.batch_shape == (2, 3)
        and (d.n, d.rank, d.vocab_size) == (3, 3, 7)
    )
    # every factor sums to one, and the explicit joint of one position sums to one
    assert torch.allclose(d.factors.sum(-1), torch.ones(2, 3, 3, 3), atol=1e-5)
    x = torch.tensor(list(itertools.product(range(7), repeat=3)))  # (343, 3)
    lp = d[0, 0].log_prob(x)
    assert lp.logsumexp(0).item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_loss_under_cuda_bf16_autocast():
    heads, U = make_heads(V=300, d=64, n=4, r=4, expert_dim=None, chunk_size=None)
    heads.cuda()
    U.data = U.data.cuda()
    h = torch.randn(64, 64, device="cuda", requires_grad=True)
    t = torch.randint(0, 300, (64, 4), device="cuda")
    ref = heads.loss_terms(h, t).log_q_sum
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = heads.loss_terms(h, t)
    assert abs(got.log_q_sum.item() - ref.item()) < 0.02 * abs(ref.item())
    got.log_q_sum.backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()


# ----------------------------------------------------------------------------- cheap drafting
def _perturbed(V=9, n=4, r=3, expert_dim=None, seed=0):
    heads, U = make_heads(V=V, n=n, r=r, expert_dim=expert_dim, seed=seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return heads


@pytest.mark.parametrize("expert_dim", STRUCTURES)
@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
def test_one_expert_draft_and_posterior_match_the_mixture(expert_dim, temperature):
    heads = _perturbed(expert_dim=expert_dim)
    h = torch.randn(5, 8)
    first = torch.tensor([0, 3, 5, 7, 8])
    mix = heads.draft(h, first, temperature)
    torch.testing.assert_close(heads.draft_posterior(h, first, temperature), mix.log_weights)
    experts = torch.tensor([0, 2, 1, 1, 0])
    one = heads.draft(h, first, temperature, experts=experts)
    assert one.rank == 1 and one.n == 3
    torch.testing.assert_close(one.log_factors[:, :, 0],
                               mix.log_factors[torch.arange(5), :, experts])
    with pytest.raises(ValueError, match="experts"):
        heads.draft(h, first, temperature, experts=torch.tensor([0, 1, 2, 3, 0]))
    with pytest.raises(TypeError, match="experts"):
        heads.draft(h, first, temperature, experts=torch.zeros(5))


@pytest.mark.parametrize("expert_dim", STRUCTURES)
def test_shortlist_drafts_only_shortlisted_tokens(expert_dim):
    heads = _perturbed(expert_dim=expert_dim)
    h, first, T = torch.randn(4, 8), torch.tensor([1, 2, 4, 6]), 0.8
    full = heads(h)  # the full CP (training and analysis never use the shortlist)
    S = [0, 2, 3, 5, 8]
    heads.set_draft_vocab(torch.tensor([8, 0, 3, 2, 5, 5]))  # any order, duplicates dropped
    assert heads.draft_vocab.tolist() == S
    torch.testing.assert_close(heads(h).log_factors, full.log_factors)  # unaffected
    d = heads.draft(h, first, T)
    out = [v for v in range(9) if v not in S]
    assert torch.isinf(d.log_factors[..., out]).all()
    # on the shortlist: each factor is the tempered softmax restricted to it
    z = heads.factor_logits(h)[:, 1:] / T  # (4, 3, r, V)
    torch.testing.assert_close(d.log_factors[..., S], torch.log_softmax(z[..., S], -1))
    # the posterior uses x_1's own logit (x_1 = 1, 4, 6 lie outside) over the shortlist's normaliser
    z1 = heads.factor_logits(h, 1)[:, 0] / T  # (4, r, V)
    lq1 = z1.gather(-1, first.view(4, 1, 1).expand(4, 3, 1)).squeeze(-1) - torch.logsumexp(
        z1[..., S], -1)
    torch.testing.assert_close(d.log_weights,
                               torch.log_softmax(heads.gate_log_probs(h) + lq1, -1))
    compact = heads.draft(h, first, T, compact=True)
    torch.testing.assert_close(compact.log_factors, d.log_factors[..., S])
    heads.set_draft_vocab(None)
    torch.testing.assert_close(heads.draft(h, first, T).log_factors,
                               full.tempered(T).condition(first[:, None]).log_factors)


def test_set_draft_vocab_rejects_bad_input():
    heads = _perturbed()
    with pytest.raises(ValueError, match="token_ids"):
        heads.set_draft_vocab([0, 9])
    with pytest.raises(ValueError, match="token_ids"):
        heads.set_draft_vocab([])
    with pytest.raises(TypeError, match="token_ids"):
        heads.set_draft_vocab(torch.tensor([0.5, 1.0]))
    with pytest.raises(TypeError, match="token_ids"):
        heads.set_draft_vocab("abc")


def test_frequency_shortlist():
    ids = torch.tensor([4, 4, 4, 1, 1, 7, 7, 2, 0, 0])
    assert frequency_shortlist(ids, 8, 3).tolist() == [0, 1, 4]  # 4 x3; 0, 1, 7 x2: smaller ids
    assert frequency_shortlist([3, 3], 5, 5).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="size"):
        frequency_shortlist(ids, 8, 9)
    with pytest.raises(ValueError, match="ids"):
        frequency_shortlist(ids, 4, 2)
    with pytest.raises(TypeError, match="ids"):
        frequency_shortlist(ids.float(), 8, 2)


@pytest.mark.parametrize("expert_dim", STRUCTURES)
@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("shortlist", [None, [0, 1, 3, 5, 8]])
def test_draft_step_is_the_draft_distribution(expert_dim, rank, shortlist):
    """The lean one-sequence decode path computes the same distributions as draft()."""
    heads = _perturbed(r=rank, expert_dim=expert_dim)
    heads.set_draft_vocab(shortlist)
    h = torch.randn(1, 8)
    for T in (0.0, 0.7, 1.0):
        for x1 in (0, 2, 7):
            for routing in ("mixture", "expert"):
                g = torch.Generator().manual_seed(x1)
                st = heads.draft_step(h, x1, 2, T, g, routing)
                ref = heads.draft(h, torch.tensor([x1]), T if T > 0 else 1.0, n_draft=2,
                                  compact=True)[0]
                assert len(st.index) == 2 and st.dist.n == 2
                K = 9 if shortlist is None else len(shortlist)
                assert all(0 <= i < K for i in st.index)
                if rank > 1:
                    torch.testing.assert_close(st.log_posterior, ref.log_weights.double(), **TOL)
                if st.dist.rank == 1 and rank > 1:  # one-expert routing: that expert's factors
                    torch.testing.assert_close(st.dist.log_factors[:, 0],
                                               ref.log_factors[:, st.expert].double(), **TOL)
                else:
                    torch.testing.assert_close(st.dist.log_factors, ref.log_factors.double(), **TOL)
                vocab = list(range(9)) if shortlist is None else shortlist
                assert st.tokens == [vocab[i] for i in st.index]
                if T == 0 and st.dist.rank == 1:
                    assert st.index == st.dist.log_factors[:, 0].argmax(-1).tolist()
                if T == 0 and st.dist.rank > 1:
                    assert st.index == st.dist.mode().tolist()
                if T > 0 and st.q_at is not None:
                    expect = st.dist.log_factors[torch.arange(2), 0, st.index].exp().tolist()
                    assert st.q_at == pytest.approx(expect)


def test_draft_step_samples_from_the_factor():
    """Chi-square: draft_step's T > 0 draws follow the expert's factor (rank 1, shortlist)."""
    from scipy.stats import chisquare

    heads = _perturbed(r=1)
    heads.set_draft_vocab([1, 2, 4, 6])
    h = torch.randn(1, 8)
    g = torch.Generator().manual_seed(0)
    st = heads.draft_step(h, 3, 1, 0.9, g)
    probs = st.dist.log_factors[0, 0].exp()
    counts = torch.zeros(4)
    for _ in range(4000):
        counts[heads.draft_step(h, 3, 1, 0.9, g).index[0]] += 1
    assert chisquare(counts.numpy(), (4000 * probs).numpy()).pvalue > 1e-3


def test_draft_step_follows_parameter_and_shortlist_changes():
    """draft_step's cached weight layout is rebuilt when a parameter or the shortlist changes."""
    heads = _perturbed(r=3)
    heads.set_draft_vocab([0, 1, 3, 5, 8])
    h = torch.randn(1, 8)

    def check():
        st = heads.draft_step(h, 2, 2, 0.0, None, "expert")
        ref = heads.draft(h, torch.tensor([2]), 1.0, n_draft=2, compact=True)[0]
        torch.testing.assert_close(st.dist.log_factors[:, 0],
                                   ref.log_factors[:, st.expert].double(), **TOL)
        return st

    before = check()
    with torch.no_grad():  # an optimizer step would do this in place
        heads.transform_weight.add_(0.5 * torch.randn_like(heads.transform_weight))
        heads.unembedding.mul_(1.5)
    after = check()
    assert not torch.allclose(before.dist.log_factors, after.dist.log_factors)
    heads.set_draft_vocab([4, 6])
    st = check()
    assert set(st.tokens) <= {4, 6} and st.dist.log_factors.shape[-1] == 2
