"""The training loop, its schedule, evaluation, checkpoints with tokenizers, and the CLI."""

import math

import pytest
import torch

from cptoy.data import ByteTokenizer
from cptoy.heads import MTPModel
from cptoy.model import GPTConfig
from cptoy.train import (
    TrainConfig,
    evaluate_loss,
    init_backbone,
    load_checkpoint,
    lr_at,
    resolve_device,
    save_checkpoint,
    train,
)


def tiny_model(**kw) -> MTPModel:
    torch.manual_seed(0)
    return MTPModel(
        GPTConfig.preset("tiny", vocab_size=16, block_size=32),
        n_future=3,
        rank=kw.pop("rank", 2),
        **kw,
    )


def periodic_ids(n=2000, seed=0):
    """A learnable stream: a fixed random pattern of period 11, repeated."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 16, (11,), generator=g).repeat(n // 11 + 1)[:n]


def quick_cfg(**kw) -> TrainConfig:
    base = dict(
        steps=40,
        batch_size=4,
        block_size=16,
        lr=1e-2,
        min_lr=1e-3,
        warmup=5,
        eval_every=20,
        eval_batches=2,
        log_every=5,
        device="cpu",
    )
    base.update(kw)
    return TrainConfig(**base)


# ----------------------------------------------------------------------------- config, schedule


def test_train_config_validation():
    with pytest.raises(ValueError, match="budget"):
        TrainConfig(steps=None, minutes=None)
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="minutes"):
        TrainConfig(minutes=-1.0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=0.0)
    with pytest.raises(ValueError, match="min_lr"):
        TrainConfig(lr=1e-3, min_lr=1e-2)
    with pytest.raises(ValueError, match="grad_clip"):
        TrainConfig(grad_clip=0.0)
    with pytest.raises(TypeError, match="batch_size"):
        TrainConfig(batch_size=2.5)
    assert TrainConfig(steps=None, minutes=0.5).minutes == 0.5
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device"):
        resolve_device("not-a-device")


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=100, lr=1.0, min_lr=0.1, warmup=10)
    assert lr_at(cfg, 0, 0.0) == pytest.approx(0.1)
    assert lr_at(cfg, 9, 0.09) == pytest.approx(1.0)
    assert lr_at(cfg, 10, 0.0) == pytest.approx(1.0)
    assert lr_at(cfg, 50, 0.5) == pytest.approx(0.55)
    assert lr_at(cfg, 100, 1.0) == pytest.approx(0.1)
    flat = TrainConfig(steps=100, lr=1.0, min_lr=0.1, warmup=0, cosine=False)
    assert lr_at(flat, 70, 0.7) == 1.0


# ----------------------------------------------------------------------------- training


def test_loss_decreases_on_a_tiny_overfit_problem_and_runs_are_reproducible():
    ids = periodic_ids()
    runs = []
    for _ in range(2):
        model = tiny_model(head_positions=0.5)
        hist = train(model, ids, ids[:400], quick_cfg(), progress=False)
        runs.append(hist)
    h = runs[0]
    assert h["steps"] == 40 and h["tokens"] == 40 * 4 * 16
    first, last = h["train"][0], h["train"][-1]
    assert last["next_token_nll"] < 0.5 * first["next_token_nll"]
    assert last["joint_nll"] < 0.5 * first["joint_nll"]
    assert [v["step"] for v in h["val"]] == [20, 40]
    assert h["val"][-1]["joint_nll"] < h["val"][0]["joint_nll"]
    assert [r["total"] for r in runs[0]["train"]] == [r["total"] for r in runs[1]["train"]]
    assert h["tokens_per_s"] > 0


def test_time_budget_stops_the_loop():
    model = tiny_model()
    hist = train(model, periodic_ids(), None, quick_cfg(steps=None, minutes=0.01), progress=False)
    assert hist["steps"] >= 1 and hist["seconds"] < 5.0 and hist["val"] == []


def test_head_only_training_on_a_frozen_backbone():
    model = tiny_model(freeze_backbone=True, expert_dim=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hist = train(model, periodic_ids(), None, quick_cfg(steps=10), progress=False)
    assert hist["train"][-1]["joint_nll"] < hist["train"][0]["joint_nll"]
    for k, v in model.state_dict().items():
        assert torch.equal(before[k], v) != k.startswith("heads."), k


def test_loss_fn_hook_replaces_the_objective():
    calls = []

    def only_heads(model, batch):
        out = model.loss(batch)
        calls.append(1)
        return dict(total=out["joint_nll"], joint_nll=out["joint_nll"])

    model = tiny_model()
    train(model, periodic_ids(), None, quick_cfg(steps=3), progress=False, loss_fn=only_heads)
    assert len(calls) == 3


def test_train_rejects_bad_data():
    model = tiny_model()
    with pytest.raises(ValueError, match="vocabulary"):
        train(model, torch.full((500,), 99), None, quick_cfg(steps=1), progress=False)
    with pytest.raises(ValueError, match="block"):
        train(model, torch.zeros(10, dtype=torch.long), None, quick_cfg(steps=1), progress=False)
    with pytest.raises(ValueError, match="block_size"):
        train(model, periodic_ids(), None, quick_cfg(block_size=64), progress=False)


def test_evaluate_loss_reports_nats_per_byte_and_restores_mode():
    model = tiny_model().train()
    res = evaluate_loss(
        model, periodic_ids(600), batch_size=4, block_size=16, max_batches=2, bytes_per_token=2.0
    )
    assert not math.isnan(res["joint_nll"]) and model.training
    assert res["next_token_nats_per_byte"] == pytest.approx(res["next_token_nll"] / 2.0)
    assert res["joint_nats_per_byte"] == pytest.approx(res["joint_nll"] / 2.0)
    again = evaluate_loss(model, periodic_ids(600), batch_size=4, block_size=16, max_batches=2)
    assert again["total"] == res["total"]
    with pytest.raises(ValueError, match="block"):
        evaluate_loss(model, periodic_ids(10), block_size=16)


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_carries_tokenizer_and_metrics(tmp_path):
    model = tiny_model(rank=3)
    tok = ByteTokenizer()
    path = tmp_path / "ck.pt"
    save_checkpoint(
        model, path, tokenizer=tok, metrics={"val": {"joint_nll": 2.0}}, extra={"cmd": "x"}
    )
    ck = load_checkpoint(path)
    assert isinstance(ck.tokenizer, ByteTokenizer) and ck.tokenizer.encode("hi") == tok.encode("hi")
    assert ck.metrics == {"val": {"joint_nll": 2.0}} and ck.extra == {"cmd": "x"}
    assert not ck.model.training
    for k, v in model.state_dict().items():
        assert torch.equal(ck.model.state_dict()[k], v)


def test_init_backbone_copies_only_the_backbone(tmp_path):
    src = tiny_model(rank=3)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.5)
    path = tmp_path / "src.pt"
    src.save(path)
    dst = tiny_model(rank=1)  # different heads are fine
    heads_before = {k: v.clone() for k, v in dst.heads.state_dict().items()}
    init_backbone(dst, path)
    for k, v in src.backbone.state_dict().items():
        assert torch.equal(dst.backbone.state_dict()[k], v)
    for k, v in heads_before.items():
        assert torch.equal(dst.heads.state_dict()[k], v)
    other = MTPModel(GPTConfig.preset("tiny", vocab_size=16, block_size=16), n_future=3, rank=1)
    with pytest.raises(ValueError, match="src.pt.*block_size"):
        init_backbone(other, path)


# ----------------------------------------------------------------------------- CLI


def test_cli_train_then_sample(tmp_path, capsys, monkeypatch):
    from cptoy.__main__ import main

    monkeypatch.setenv("CPTOY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "hmm.pt"
    rc = main(
        [
            "train",
            "--corpus",
            "hmm",
            "--max-bytes",
            "4000",
            "--rank",
            "2",
            "--n-future",
            "3",
            "--preset",
            "tiny",
            "--steps",
            "4",
            "--batch-size",
            "2",
            "--eval-batches",
            "1",
            "--no-progress",
            "--half",
            "--draft-vocab",
            "5",
            "--out",
            str(out),
        ]
    )
    assert rc == 0 and out.exists()
    ck = load_checkpoint(out)
    assert ck.model.rank == 2 and ck.metrics["steps"] == 4 and "joint_nll" in ck.metrics["val"]
    assert ck.model.heads.draft_vocab.numel() == 5  # the 5 most frequent training tokens
    assert ck.extra["command"].startswith("python -m cptoy train --corpus hmm --max-bytes 4000")
    rc = main(
        [
            "sample",
            "--ckpt",
            str(out),
            "--prompt",
            "1 2 3",
            "--max-new-tokens",
            "5",
            "--strategy",
            "self-spec",
            "--routing",
            "expert",
            "--temperature",
            "0",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert printed[:3] == ["1", "2", "3"] and len(printed) == 8
    # heads only, on the saved backbone
    out2 = tmp_path / "heads.pt"
    rc = main(
        [
            "train",
            "--corpus",
            "hmm",
            "--max-bytes",
            "4000",
            "--rank",
            "1",
            "--n-future",
            "3",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--eval-batches",
            "1",
            "--no-progress",
            "--freeze-backbone",
            "--init",
            str(out),
            "--out",
            str(out2),
        ]
    )
    assert rc == 0
    a, b = load_checkpoint(out).model, load_checkpoint(out2).model
    for k, v in a.backbone.state_dict().items():
        assert torch.equal(b.backbone.state_dict()[k], v)
