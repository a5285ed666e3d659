"""First-token heads: drafts that read x_1, lossless decoding, training, checkpoints."""

from __future__ import annotations

import pytest
import torch
from test_decoding import _attach_exact, _gof_pvalue

from cptoy import checkpoints
from cptoy.decoding import generate
from cptoy.evaluate import teacher_forced_acceptance
from cptoy.firsttoken import FirstTokenHeads, FirstTokenModel, is_first_token_checkpoint
from cptoy.heads import MTPModel
from cptoy.model import GPTConfig
from cptoy.recipes import DRAFT_VOCAB, check_slice_ids, check_slice_metrics
from cptoy.train import TrainConfig, train


def _model(V=16, n=4, seed=0, perturb=0.3) -> FirstTokenModel:
    """A tiny frozen GPT with first-token heads whose x_1 half is not zero."""
    torch.manual_seed(seed)
    mtp = MTPModel(GPTConfig.preset("tiny", vocab_size=V, block_size=32), n, 1)
    with torch.no_grad():
        mtp.backbone.wte.weight.mul_(2.0)  # p spread over V, not uniform
    model = FirstTokenModel.from_mtp(mtp)
    with torch.no_grad():
        for p in model.heads.parameters():
            p.add_(perturb * torch.randn_like(p))
    return model.eval()


def test_starts_as_the_rank1_cp_heads_it_comes_from():
    torch.manual_seed(1)
    mtp = MTPModel(GPTConfig.preset("tiny", vocab_size=32, block_size=32), 4, 1)
    with torch.no_grad():
        for p in mtp.heads.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ft = FirstTokenModel.from_mtp(mtp)
    h, x1 = torch.randn(5, mtp.config.n_embd), torch.randint(0, 32, (5,))
    for T in (0.0, 0.7, 1.0):
        a, b = mtp.heads.draft(h, x1, T), ft.heads.draft(h, x1, T)
        assert torch.allclose(a.log_factors, b.log_factors, atol=1e-5)
    assert ft.heads.weight[:, mtp.config.n_embd:].abs().sum() == 0  # x_1 half zero


def test_drafts_depend_on_x1_and_are_the_tempered_softmax():
    model = _model()
    heads = model.heads
    h = torch.randn(2, model.config.n_embd)
    a = heads.draft(h, torch.tensor([1, 1]), 0.7)
    b = heads.draft(h, torch.tensor([1, 2]), 0.7)
    assert torch.allclose(a.log_factors[0], b.log_factors[0])
    assert not torch.allclose(a.log_factors[1], b.log_factors[1])  # x_1 changes the factors
    z = heads.logits(h, torch.tensor([1, 2]))  # (2, 3, V)
    assert torch.allclose(b.log_factors[:, :, 0], torch.log_softmax(z / 0.7, -1), atol=1e-5)
    assert a.rank == 1 and a.n == 3 and heads.draft(h, torch.tensor([1, 2]), 1.0, 2).n == 2


@pytest.mark.parametrize("shortlist", [None, [0, 3, 5, 8, 13]])
@pytest.mark.parametrize("T", [0.0, 0.8, 1.0])
def test_draft_step_equals_draft(shortlist, T):
    model = _model()
    heads = model.heads.set_draft_vocab(shortlist)
    h = torch.randn(1, model.config.n_embd)
    step = heads.draft_step(h, 4, 3, T, torch.Generator().manual_seed(0))
    ref = heads.draft(h, torch.tensor([4]), T, compact=True)[0]  # (3, 1, K)
    if T == 0:
        assert step.index == ref.log_factors[:, 0].argmax(-1).tolist()
    else:
        assert torch.allclose(step.factor_probs().float(), ref.log_factors[:, 0].exp(), atol=1e-6)
        assert step.q_at == pytest.approx(
            [float(step.factor_probs()[j, i]) for j, i in enumerate(step.index)])
    if shortlist is not None:
        assert set(step.tokens) <= set(shortlist)


def test_greedy_self_spec_equals_ar():
    model = _model(V=16)
    model.heads.set_draft_vocab(list(range(0, 16, 2)))
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        prompt = torch.randint(0, 16, (4,), generator=gen).tolist()
        ref = generate(model.backbone, prompt, 20, temperature=0, strategy="ar").tokens
        g = generate(model, prompt, 20, temperature=0, strategy="self-spec")
        assert g.tokens == ref
        g = generate(model, prompt, 20, temperature=0.8, strategy="self-spec", seed=1,
                     record_steps=True)
        for r in g.steps:
            assert all(d % 2 == 0 for d in r.drafts)
            if r.drafts:
                assert r.gate_prior == [1.0] and r.gate_posterior == [1.0]
                assert torch.allclose(r.q.sum(-1), torch.ones(len(r.drafts), dtype=torch.float64))


def test_self_spec_sampling_is_exact():
    """Chi-square of self-spec with first-token heads against exact enumeration of AR."""
    model = _model(V=4, seed=3).double()
    prompt, m, T = [0, 3, 1], 4, 0.9
    _attach_exact(model, prompt, m, T)
    acc = att = 0
    for s in range(60):
        g = generate(model, prompt, m, temperature=T, strategy="self-spec", seed=s)
        acc, att = acc + sum(g.stats.accepted_per_step), att + sum(g.stats.drafted_per_step)
    assert 0.1 < acc / att < 0.95  # both the accept and the residual paths run
    assert _gof_pvalue(model, prompt, m, T, 2000, strategy="self-spec") > 1e-3


def test_training_lowers_the_draft_loss_and_uses_x1():
    """On text where x_{t+2} = x_{t+1} + 1 (mod V) inside runs, heads that read x_1 learn the
    rule: for one fixed h, the argmax of position 2 follows x_1 (a head blind to x_1 would give
    one answer for all 16). The backbone does not change."""
    torch.manual_seed(0)
    V = 16
    mtp = MTPModel(GPTConfig.preset("tiny", vocab_size=V, block_size=16), 3, 1)
    with torch.no_grad():
        mtp.backbone.wte.weight.mul_(25.0)  # embeddings of a trained model's size, not 0.02
    model = FirstTokenModel.from_mtp(mtp, positions=8)
    start = torch.randint(0, V, (400,))
    ids = ((start[:, None] + torch.arange(6)) % V).flatten()  # runs of consecutive tokens
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    batch = ids[: 2 * 19].view(2, 19)
    model.eval()
    with torch.no_grad():
        loss0 = float(model.loss(batch)["draft_nll_2"])
    train(model, ids, None, TrainConfig(steps=150, batch_size=8, block_size=16, lr=1e-2,
                                        warmup=5, seed=0, device="cpu"), progress=False)
    model.eval()
    with torch.no_grad():
        loss1 = float(model.loss(batch)["draft_nll_2"])
        h = model.backbone(batch[:, :16])[0, 5:6].expand(V, -1)  # one context, every x_1
        follows = model.heads.logits(h, torch.arange(V))[:, 0].argmax(-1)  # (V,)
    assert loss1 < 0.2 * loss0, (loss0, loss1)
    assert float((follows == (torch.arange(V) + 1) % V).double().mean()) >= 0.75
    assert all(torch.equal(v, before[k]) for k, v in model.backbone.state_dict().items())


def test_checkpoint_round_trip(tmp_path, monkeypatch):
    mtp, _, _ = checkpoints.load("code_r1")
    model = FirstTokenModel.from_mtp(mtp)
    with torch.no_grad():
        model.heads.weight.add_(0.01)
    path = tmp_path / "x1.pt"
    model.save(path, "code_r1", metrics={"note": 1})
    assert is_first_token_checkpoint(path) and not is_first_token_checkpoint(
        checkpoints.path("code_r1"))
    back = FirstTokenModel.load(path)
    assert back.metrics == {"note": 1} and back.backbone_checkpoint == "code_r1"
    assert torch.allclose(back.heads.weight, model.heads.weight.half().float())
    assert torch.equal(back.heads.draft_vocab, mtp.heads.draft_vocab)
    model.save(path, "shakespeare_r1")  # names a backbone it was not trained on
    with pytest.raises(ValueError, match="another backbone"):
        FirstTokenModel.load(path)
    with pytest.raises(ValueError, match="not a first-token"):
        FirstTokenModel.load(checkpoints.path("code_r1"))


def test_heads_on_a_backbone_of_ones_own(tmp_path):
    """Heads trained on any backbone save against it and load onto it (passed in, or named as
    an MTP checkpoint beside the file); another backbone is refused."""
    model = _model()
    with torch.no_grad():
        model.heads.weight.add_(0.01)
    path = tmp_path / "mine_x1.pt"
    model.save(path, metrics={"note": 2})  # no checkpoint name: the backbone is passed in
    with pytest.raises(ValueError, match="names no backbone"):
        FirstTokenModel.load(path)
    back = FirstTokenModel.load(path, backbone=model.backbone)
    assert back.backbone is model.backbone and back.metrics == {"note": 2}
    assert torch.allclose(back.heads.weight, model.heads.weight.half().float())
    via, _, metrics = checkpoints.load(str(path), backbone=model.backbone)
    assert torch.equal(via.heads.weight, back.heads.weight) and metrics == {"note": 2}
    other = _model(seed=1)
    with pytest.raises(ValueError, match="another backbone"):
        FirstTokenModel.load(path, backbone=other.backbone)
    mtp = MTPModel(model.backbone, model.n_future, 1)  # its backbone as an MTP checkpoint
    mtp.save(tmp_path / "mine.pt")
    model.save(path, "mine")
    assert torch.equal(FirstTokenModel.load(path).heads.weight, back.heads.weight)


def test_bad_input_is_rejected():
    model = _model()
    h = torch.randn(2, model.config.n_embd)
    with pytest.raises(ValueError, match="n_draft"):
        model.heads.draft(h, torch.tensor([1, 2]), 0.8, n_draft=4)
    with pytest.raises(TypeError, match="first_tokens"):
        model.heads.draft(h, torch.tensor([1.0, 2.0]), 0.8)
    with pytest.raises(ValueError, match="temperature"):
        model.heads.draft(h, torch.tensor([1, 2]), -1.0)
    with pytest.raises(ValueError, match="n_future"):
        FirstTokenHeads(8, 16, 1, torch.zeros(16, 8), torch.zeros(16, 8))
    with pytest.raises(ValueError, match="embedding"):
        FirstTokenHeads(8, 16, 3, torch.zeros(15, 8), torch.zeros(16, 8))
    with pytest.raises(TypeError, match="MTPModel"):
        FirstTokenModel.from_mtp(model)
    with pytest.raises(ValueError, match="rank-1"):
        model.heads.init_from_cp(MTPModel(model.config, 4, 2).heads)


@pytest.mark.parametrize("corpus", ["code", "shakespeare"])
def test_shipped_checkpoint_reproduces_and_beats_cp_rank1(corpus):
    name = f"{corpus}_x1"
    assert checkpoints.path(name).stat().st_size <= 5 * 2**20
    torch.manual_seed(0)
    model, tok, metrics = checkpoints.load(name)
    assert isinstance(model, FirstTokenModel) and not model.training
    held = check_slice_ids(corpus, tok)
    measured = check_slice_metrics(model, held)
    for key, value in metrics["check_slice"].items():
        assert measured[key] == pytest.approx(value, abs=2e-3), key
    assert model.heads.draft_vocab.numel() == DRAFT_VOCAB
    # same backbone and shortlist as the rank-1 CP checkpoint; accepted more often
    cp, _, _ = checkpoints.load(f"{corpus}_r1")
    assert model.backbone_checkpoint == f"{corpus}_r1"
    assert torch.equal(model.heads.draft_vocab, cp.heads.draft_vocab)
    ids = held[:2000]
    a = teacher_forced_acceptance(cp, ids, temperature=0.8, max_positions=300, seed=0)
    b = teacher_forced_acceptance(model, ids, temperature=0.8, max_positions=300, seed=0)
    assert b.spec_tokens_per_forward > a.spec_tokens_per_forward + 0.05


def test_cli_samples_with_first_token_heads(capsys):
    from cptoy.__main__ import main

    outs = []
    for strategy in ("ar", "self-spec"):
        rc = main(["sample", "--ckpt", str(checkpoints.path("code_x1")), "--prompt", "def ",
                   "--max-new-tokens", "12", "--strategy", strategy, "--temperature", "0"])
        assert rc == 0
        outs.append(capsys.readouterr())
    assert outs[0].out == outs[1].out and outs[0].out.startswith("def ")  # greedy: identical
    assert "self-spec" in outs[1].err and "tokens/forward" in outs[1].err
