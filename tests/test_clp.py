"""Tests of cptoy.clp: Backbone-as-Architect heads, CLP labels and predictions, the gate
network, the controller data and verifier-free decoding."""

from __future__ import annotations

import math

import pytest
import torch

from cptoy.clp import (
    ArchitectHeads,
    CLPModel,
    CollocationLengthPredictor,
    Decoder,
    GateNetwork,
    clp_labels,
    compare_decoders,
    controller_dataset,
    controller_features,
    fit_controller,
    gate_labels,
    greedy_rollouts,
    prefix_agreement,
    verifier_free_generate,
)
from cptoy.decoding import generate
from cptoy.heads import MTPModel
from cptoy.model import GPT, GPTConfig

V, K = 11, 4


def _gpt(seed=0, scale=4.0) -> GPT:
    """A tiny GPT with peaky (scaled-up) weights, so greedy choices are not near-ties."""
    torch.manual_seed(seed)
    g = GPT(GPTConfig(vocab_size=V, block_size=48, n_layer=2, n_head=2, n_embd=16))
    with torch.no_grad():
        g.wte.weight.mul_(scale / 0.02 * 0.1)
    return g.eval()


def _clp_model(seed=0) -> CLPModel:
    m = CLPModel(_gpt(seed), k=K, gate_hidden=32)
    with torch.no_grad():  # heads that differ from the identity
        m.heads.transform_weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))
    return m.eval()


# ---------------------------------------------------------------- labels
def test_clp_labels_hand_made_case():
    drafts = torch.tensor([[5, 6, 7], [5, 9, 7], [1, 2, 3], [0, 0, 0]])
    greedy = torch.tensor([[5, 6, 7], [5, 6, 7], [4, 2, 3], [0, 0, 1]])
    # all match; a miss at draft 3 stops the run at 1; a later run of 2 does not count (it is
    # not a prefix); the first two match
    assert clp_labels(drafts, greedy).tolist() == [3, 1, 0, 2]
    assert gate_labels(drafts, greedy).tolist() == [[1, 1, 1], [1, 0, 1], [0, 1, 1], [1, 1, 0]]
    with pytest.raises(ValueError, match="must match"):
        clp_labels(drafts, greedy[:, :2])
    with pytest.raises(ValueError, match="integer"):
        clp_labels(drafts.float(), greedy)


# ---------------------------------------------------------------- controllers
def test_clp_is_one_linear_layer_and_predicts_lengths_in_range():
    d = 16
    clp = CollocationLengthPredictor(d + K, K)
    linears = [m for m in clp.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 1 and clp.num_params() == (d + K) * K + K
    x = torch.randn(500, d + K, generator=torch.Generator().manual_seed(0)) * 3
    prev = None
    for t in (0.0, 0.2, 0.5, 0.8, 1.0):
        L = clp.predict(x, t)
        assert L.dtype == torch.long and L.shape == (500,)
        assert int(L.min()) >= 0 and int(L.max()) <= K - 1
        if prev is not None:
            assert bool((L <= prev).all())  # a stricter threshold never accepts more
        prev = L
    assert bool((clp.predict(x, 0.0) == K - 1).all())


def test_clp_decision_rule_on_known_probabilities():
    clp = CollocationLengthPredictor(3, 4)
    with torch.no_grad():
        clp.linear.weight.zero_()
        clp.linear.bias.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]).log())
    x = torch.zeros(1, 3)  # P(len >= l) = 1, 0.9, 0.7, 0.4
    assert [int(clp.predict(x, t)) for t in (0.95, 0.9, 0.8, 0.7, 0.5, 0.4, 0.3)] == \
        [0, 1, 1, 2, 2, 3, 3]
    with pytest.raises(ValueError, match="threshold"):
        clp.predict(x, 1.5)


def test_fold_normaliser_keeps_outputs():
    clp = CollocationLengthPredictor(5, 3)
    x = torch.randn(20, 5)
    clp.set_normaliser(torch.randn(5), torch.rand(5) + 0.5)
    before = clp(x)
    clp.fold_normaliser()
    assert torch.allclose(clp(x), before, atol=1e-5)
    assert torch.all(clp.feature_std == 1) and torch.all(clp.feature_mean == 0)


def test_gate_network_size_and_rule():
    g = GateNetwork(128 + 4, 4)
    assert abs(g.num_params() - 1_000_000) < 20_000
    small = GateNetwork(3, 4, hidden=8)
    with torch.no_grad():
        small.net[-1].weight.zero_()
        small.net[-1].bias.copy_(torch.tensor([2.0, -2.0, 2.0]))  # sigmoid .88, .12, .88
    assert int(small.predict(torch.zeros(1, 3), 0.5)) == 1  # stops at the first rejection
    assert int(small.predict(torch.zeros(1, 3), 0.05)) == 3
    assert int(small.predict(torch.zeros(1, 3), 0.9)) == 0


# ---------------------------------------------------------------- heads
def test_architect_heads_have_no_first_position_and_draft_rank1():
    gpt = _gpt()
    heads = ArchitectHeads(16, V, K, gpt.unembedding)
    assert heads.num_params() == (K - 1) * (16 * 16 + 16)
    assert "unembedding" not in dict(heads.named_parameters())  # shared, not owned
    h = torch.randn(5, 16)
    assert heads.logits(h).shape == (5, K - 1, V)
    assert heads.logits(h, 2).shape == (5, 2, V)
    d1 = heads.draft(h, torch.zeros(5, dtype=torch.long), 1.0, n_draft=2)
    d2 = heads.draft(h, torch.full((5,), 3), 1.0, n_draft=2)
    assert d1.rank == 1 and d1.n == 2 and d1.batch_shape == (5,)
    assert torch.allclose(d1.log_factors.exp().sum(-1), torch.ones(5, 2, 1))
    assert torch.equal(d1.log_factors, d2.log_factors)  # x_1 is ignored
    assert torch.equal(d1.mode(), heads.logits(h, 2).argmax(-1))
    with pytest.raises(ValueError, match="n_draft"):
        heads.logits(h, K)


def test_from_cp_heads_copies_positions_2_to_n():
    mtp = MTPModel(GPTConfig(vocab_size=V, block_size=32, n_layer=1, n_head=2, n_embd=16),
                   n_future=K, rank=1)
    with torch.no_grad():
        mtp.heads.transform_weight.normal_(0, 0.3)
    arch = ArchitectHeads.from_cp_heads(mtp.heads)
    h = torch.randn(7, 16)
    ref = mtp.heads.factor_logits(h)[:, 1:, 0]  # (7, K - 1, V) positions 2..n
    assert torch.allclose(arch.logits(h), ref, atol=1e-5)
    with pytest.raises(ValueError, match="rank-1"):
        ArchitectHeads.from_cp_heads(MTPModel(mtp.config, K, rank=2).heads)


def test_clp_model_loss_trains_heads_only():
    m = CLPModel(_gpt(), k=K, gate_hidden=8)
    idx = torch.randint(0, V, (3, 10 + K), generator=torch.Generator().manual_seed(1))
    out = m.loss(idx)
    # by hand: head s at position t predicts idx[t + s]
    H = m.backbone(idx[:, :10])
    z = m.heads(H)  # (3, 10, K - 1, V)
    for s in range(2, K + 1):
        ref = torch.nn.functional.cross_entropy(z[:, :, s - 2].reshape(-1, V),
                                                idx[:, s:s + 10].reshape(-1))
        assert out[f"nll_{s}"].item() == pytest.approx(ref.item(), rel=1e-5)
    before = {k: v.clone() for k, v in m.backbone.state_dict().items()}
    out["total"].backward()
    assert all(p.grad is None for p in m.backbone.parameters())
    assert m.heads.transform_weight.grad is not None
    for k, v in m.backbone.state_dict().items():
        assert torch.equal(v, before[k])


# ---------------------------------------------------------------- controller data
def test_rollouts_are_greedy_and_dataset_labels_consistent():
    m = _clp_model()
    prompts = torch.randint(0, V, (4, 6), generator=torch.Generator().manual_seed(2))
    roll = greedy_rollouts(m.backbone, prompts, 20)
    assert roll.shape == (4, 26) and torch.equal(roll[:, :6], prompts)
    for i in range(4):
        ar = generate(m.backbone, prompts[i].tolist(), 20, temperature=0).tokens
        assert roll[i, 6:].tolist() == ar
    data = controller_dataset(m, roll, prompt_len=6)
    n_pos = 26 - K - 5  # t = 5 .. 26 - K - 1
    assert len(data) == 4 * n_pos and data.features.shape == (4 * n_pos, 16 + K)
    assert torch.equal(data.labels, clp_labels(data.drafts, data.continuation))
    assert int(data.labels.max()) <= K - 1
    # the continuation is the rollout itself: row 0 is position t = 5 of sequence 0
    assert data.continuation[0].tolist() == roll[0, 7:7 + K - 1].tolist()
    H = m.backbone(roll)
    assert data.drafts[0].tolist() == m.heads.logits(H[0, 5]).argmax(-1).tolist()
    tr, va = data.split(0.75)
    assert len(tr) + len(va) == len(data)


def test_fit_controller_learns_a_learnable_rule():
    # label = 2 when feature 0 > 0 else 0 : a linear rule the CLP must find
    g = torch.Generator().manual_seed(0)
    X = torch.randn(600, 5, generator=g) * 2 + 1
    y = torch.where(X[:, 0] > 1, 2, 0)
    tok = torch.stack([(y > 0).float(), (y > 1).float(), torch.zeros(600)], 1)
    from cptoy.clp import ControllerData

    data = ControllerData(X, y, tok, tok.long(), tok.long())
    clp = CollocationLengthPredictor(5, 4)
    hist = fit_controller(clp, data, steps=200, lr=3e-2)
    assert hist[-1] < hist[0]
    assert (clp.predict(X) == y).float().mean() > 0.95
    gate = GateNetwork(5, 4, hidden=16)
    fit_controller(gate, data, steps=200, lr=1e-2)
    assert (gate.predict(X) == y).float().mean() > 0.95


# ---------------------------------------------------------------- decoding
def test_verifier_free_none_is_greedy_ar_and_all_keeps_every_draft():
    m = _clp_model()
    prompt = [1, 2, 3, 4]
    ar = generate(m.backbone, prompt, 17, temperature=0).tokens
    g0 = verifier_free_generate(m, prompt, 17, controller="none")
    assert g0.tokens == ar and g0.stats.forward_passes == 17
    g = verifier_free_generate(m, prompt, 17, controller="all")
    assert len(g.tokens) == 17
    assert g.stats.gained_per_forward == [4, 4, 4, 4, 1]
    # the first step by hand: backbone argmax, then the heads' argmax drafts at the same position
    H = m.backbone(torch.tensor([prompt]))[:, -1]
    x1 = int(m.backbone.logits(H).argmax())
    assert g.tokens[:K] == [x1] + m.heads.logits(H)[0].argmax(-1).tolist()
    assert g.tokens[0] == ar[0]


def test_verifier_free_clp_extremes_and_lengths_in_range():
    m = _clp_model()
    prompt = [3, 1, 4, 1, 5]
    with torch.no_grad():
        m.clp.linear.weight.zero_()
        m.clp.linear.bias.copy_(torch.tensor([10.0, 0, 0, 0]))  # always 0 drafts
    assert verifier_free_generate(m, prompt, 15, "clp").tokens == \
        verifier_free_generate(m, prompt, 15, "none").tokens
    with torch.no_grad():
        m.clp.linear.bias.copy_(torch.tensor([0, 0, 0, 10.0]))  # always k - 1
    assert verifier_free_generate(m, prompt, 15, "clp").tokens == \
        verifier_free_generate(m, prompt, 15, "all").tokens
    with torch.no_grad():
        m.clp.linear.weight.normal_(0, 1.0)
    g = verifier_free_generate(m, prompt, 30, "clp", threshold=0.3)
    assert all(1 <= x <= K for x in g.stats.gained_per_forward) and len(g.tokens) == 30
    assert sum(g.stats.gained_per_forward) == 30
    assert verifier_free_generate(m, prompt, 30, "gate").stats.forward_passes >= 30 // K


def test_head_first_needs_a_first_head_and_uses_it():
    m = _clp_model()
    with pytest.raises(ValueError, match="first token"):
        verifier_free_generate(m, [1, 2], 5, "all", first="head")
    mtp = MTPModel(m.backbone.config, n_future=K, rank=1).eval()
    mtp.backbone.load_state_dict(m.backbone.state_dict())
    with torch.no_grad():
        mtp.heads.transform_weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(5))
    g = verifier_free_generate(mtp, [1, 2, 3], 8, "all", first="head")
    h = mtp.backbone(torch.tensor([[1, 2, 3]]))[:, -1]
    assert g.tokens[0] == int(mtp.heads(h).log_marginal(0).argmax())
    with pytest.raises(TypeError, match="CLPModel"):
        verifier_free_generate(mtp, [1, 2], 5, "clp")


def test_prefix_agreement_and_compare_decoders():
    assert prefix_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 0.5
    assert prefix_agreement([1, 2], [1, 2, 3, 4]) == 0.5
    assert math.isnan(prefix_agreement([1], []))
    m = _clp_model()
    prompts = [[1, 2, 3], [4, 5, 6]]
    decs = [
        Decoder("AR", "reference", lambda p, n: generate(m.backbone, p, n, temperature=0)),
        Decoder("none", "verifier-free", lambda p, n: verifier_free_generate(m, p, n, "none")),
        Decoder("all", "verifier-free", lambda p, n: verifier_free_generate(m, p, n, "all")),
    ]
    rows = compare_decoders(decs, prompts, 12, warmup=False)
    r = {x.method: x for x in rows}
    assert r["none"].exact == 1.0 and r["none"].tokens_per_forward == 1.0
    assert r["none"].agreement == 1.0 and r["all"].agreement < 1.0  # "all" keeps wrong drafts
    assert r["all"].tokens_per_forward == 24 / 6
    assert r["all"].label == "lossy, verifier-free" and r["AR"].label == "lossless (reference)"
    with pytest.raises(ValueError, match="kind"):
        Decoder("x", "fast", lambda p, n: None)


def test_controller_features_shape():
    f = controller_features(torch.randn(3, 8), torch.randn(3, V), torch.randn(3, K - 1, V))
    assert f.shape == (3, 8 + K) and bool((f[:, 8:] <= 0).all())
