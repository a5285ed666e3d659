"""Heads trained on cached features (cptoy.headtrain): the loss against independent references,
batches, learning, checkpoints, the recipe CLI, and DistributedDataParallel under torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_features import tiny_llama

from cptoy import headtrain, pretrained
from cptoy.data import ByteTokenizer
from cptoy.features import build_feature_cache
from cptoy.heads import read_torch_file
from cptoy.headtrain import (
    Batch,
    HeadObjective,
    HeadTrainConfig,
    batch_schedule,
    build_heads_model,
    cached_acceptance,
    concat_caches,
    cp_conditionals,
    head_loss,
    is_heads_checkpoint,
    load_heads,
    sample_batch,
    save_heads,
    shortlist_from_cache,
    train_heads,
)

TESTS = Path(__file__).resolve().parent


def perturbed(model, scale=0.3, seed=0):
    """``model`` with its heads' parameters moved away from their init (gates not uniform)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.heads.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def heads_model(kind="cp", n=3, rank=3, expert_dim=None, V=256, seed=0, scale=0.3):
    backbone = tiny_llama(seed, vocab_size=V) if V != 256 else tiny_llama(seed)
    if kind == "first_token":
        with torch.no_grad():  # embeddings as large as hidden states: x_1 weighs on the drafts
            backbone.wte.weight.mul_(30.0)
    return perturbed(build_heads_model(backbone, kind, n, rank, expert_dim), scale, seed)


def random_batch(B, n, V, d=32, k=4, seed=0) -> Batch:
    """Hidden states, targets, and a teacher's top-k (ids, log-probs) as the cache stores them."""
    g = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(2 * torch.randn(B, n, V, generator=g), dim=-1)
    top = logp.topk(k, dim=-1)
    return Batch(torch.randn(B, d, generator=g), torch.randint(0, V, (B, n), generator=g),
                 top.indices, top.values.half().float())


def teacher(batch: Batch, k=None) -> torch.Tensor:
    """The teacher's top-k renormalised as a dense (B, n, V) distribution (V from the ids)."""
    ids, lp = batch.top_ids[..., :k], batch.top_logp[..., :k]
    V = int(batch.top_ids.max()) + 1
    return torch.zeros(*ids.shape[:2], V).scatter_(-1, ids, torch.softmax(lp, -1))


# ----------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("rank,expert_dim", [(1, None), (3, None), (3, 4)])
def test_cp_conditionals_are_the_cp_distribution_conditioned_on_the_true_prefix(rank, expert_dim):
    model = heads_model(rank=rank, expert_dim=expert_dim, n=4)
    heads, V = model.heads, 256
    batch = random_batch(6, 4, V)
    logq, lw, _ = cp_conditionals(heads, batch, torch.arange(V))
    with torch.no_grad():
        dist = heads(batch.h)  # the full CP distribution over the whole vocabulary
    assert logq.shape == (6, 4, V)
    torch.testing.assert_close(lw, dist.log_weights)
    torch.testing.assert_close(logq[:, 0], dist.log_marginal(0), atol=1e-5, rtol=1e-5)
    for j in range(1, 4):
        ref = dist.condition(batch.y[:, :j]).log_marginal(0)
        torch.testing.assert_close(logq[:, j], ref, atol=1e-5, rtol=1e-5)
    if rank > 1:  # the prefix matters: another prefix moves the gate, so q_j
        other = Batch(batch.h, (batch.y + 1) % V, batch.top_ids, batch.top_logp)
        assert not torch.allclose(cp_conditionals(heads, other, torch.arange(V))[0][:, 1:],
                                  logq[:, 1:], atol=1e-3)
    # "kl": cross-entropy to the teacher's top-k renormalised, mean over contexts and positions
    p = teacher(batch)
    ref_j = -(p * logq.detach()[..., : p.shape[-1]]).sum(-1).mean(0)  # (n,)
    out = head_loss(heads, batch, torch.arange(V), "kl", load_balance_coef=0.0)
    torch.testing.assert_close(out["loss"].detach(), ref_j.mean())
    for j in range(4):
        torch.testing.assert_close(out[f"loss_{j + 1}"], ref_j[j])


def test_cp_conditionals_by_enumerating_the_joint():
    V, n = 8, 3
    model = heads_model(rank=4, n=n, V=V, scale=0.5)
    batch = random_batch(5, n, V, seed=1)
    logq = cp_conditionals(model.heads, batch, torch.arange(V))[0].double()
    with torch.no_grad():
        Q = model.heads(batch.h).to(torch.float64).to_tensor()  # (B, V, V, V)
    for b in range(5):
        y1, y2 = batch.y[b, :2].tolist()
        q1 = Q[b].sum((1, 2))
        q2 = Q[b, y1].sum(1) / Q[b, y1].sum()
        q3 = Q[b, y1, y2] / Q[b, y1, y2].sum()
        for j, q in enumerate((q1, q2, q3)):
            torch.testing.assert_close(logq[b, j].exp(), q, atol=1e-6, rtol=1e-5)


def reference_loss_on_shortlist(model, batch: Batch, S: torch.Tensor, objective: str):
    """The loss over shortlist S by hand (float64 loops): every factor renormalised over S
    (the posterior gate uses exp(z(x_i)) / sum_S exp(z) also for a true token x_i outside S);
    targets outside S dropped, the teacher renormalised over its top-k tokens inside S."""
    with torch.no_grad():
        dist = model.heads(batch.h).to(torch.float64)
    lf, lw = dist.log_factors, dist.log_weights  # (B, n, r, V), (B, r)
    B, n, r, _ = lf.shape
    inS = set(S.tolist())
    col = {int(v): i for i, v in enumerate(S)}
    per = [[] for _ in range(n)]
    for b in range(B):
        norm = torch.logsumexp(lf[b][..., S], dim=-1)  # (n, r)
        for j in range(n):
            post = lw[b].clone()
            for i in range(j):
                post += lf[b, i, :, batch.y[b, i]] - norm[i]
            post = torch.softmax(post, -1)  # (r,)
            q = (post[:, None] * (lf[b, j][:, S] - norm[j][:, None]).exp()).sum(0)  # (K,)
            if objective == "ce":
                tgt = {int(batch.y[b, j]): 1.0}
            else:
                kk = 1 if objective == "top1" else batch.top_ids.shape[-1]
                tgt = {int(v): float(lp.exp()) for v, lp in
                       zip(batch.top_ids[b, j, :kk], batch.top_logp[b, j, :kk], strict=True)}
            tgt = {v: w for v, w in tgt.items() if v in inS}
            if tgt:
                mass = sum(tgt.values())
                per[j].append(-sum(w / mass * q[col[v]].log() for v, w in tgt.items()))
    means = [torch.stack(p).mean() for p in per]
    return torch.stack([x for p in per for x in p]).mean(), means, [len(p) for p in per]


@pytest.mark.parametrize("objective", ["ce", "top1", "kl"])
def test_loss_over_a_shortlist_equals_a_reference_by_hand(objective):
    V, n = 256, 3
    model = heads_model(rank=3, n=n, expert_dim=4)
    S = torch.from_numpy(np.sort(np.random.default_rng(0).choice(V, 120, replace=False)))
    batch = random_batch(24, n, V, k=3, seed=2)
    ref, ref_j, counts = reference_loss_on_shortlist(model, batch, S, objective)
    assert all(0 < c < 24 for c in counts)  # some terms dropped, some kept: both paths run
    out = head_loss(model.heads, batch, S, objective, load_balance_coef=0.0)
    torch.testing.assert_close(out["loss"].double(), ref, atol=1e-5, rtol=1e-5)
    for j in range(n):
        torch.testing.assert_close(out[f"loss_{j + 1}"].double(), ref_j[j], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rank", [1, 4])
def test_ce_on_the_whole_vocabulary_is_the_joint_nll_over_n(rank):
    n = 4
    model = heads_model(rank=rank, n=n)
    batch = random_batch(16, n, 256, seed=3)
    out = head_loss(model.heads, batch, torch.arange(256), "ce", load_balance_coef=0.0)
    with torch.no_grad():
        nll = -model.heads(batch.h).log_prob(batch.y).mean()
        nll_heads = -model.heads.joint_log_prob(batch.h, batch.y).mean()
    torch.testing.assert_close(out["loss"].detach() * n, nll, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(nll_heads, nll, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shortlist", [None, "subset"])
@pytest.mark.parametrize("objective", ["ce", "top1"])
def test_first_token_loss_is_cross_entropy_of_its_logits(objective, shortlist):
    V, n = 256, 4
    model = heads_model("first_token", n=n)
    batch = random_batch(20, n, V, seed=4)
    S = torch.arange(V) if shortlist is None else torch.arange(0, V, 2)
    out = head_loss(model.heads, batch, S, objective)
    assert sorted(k for k in out if k.startswith("loss_")) == ["loss_2", "loss_3", "loss_4"]
    assert "load_balance" not in out and out["total"] is out["loss"]
    with torch.no_grad():
        z = model.heads.logits(batch.h, batch.y[:, 0])[..., S]  # (B, n - 1, K): reads x_1
    y = (batch.y if objective == "ce" else batch.top_ids[..., 0])[:, 1:]
    keep = torch.isin(y, S)
    assert keep.any() and (shortlist is None) == bool(keep.all())
    ce = F.cross_entropy(z[keep], torch.searchsorted(S, y[keep]))
    torch.testing.assert_close(out["loss"].detach(), ce, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the drafts read the true x_1: another x_1 gives another loss
        z_other = model.heads.logits(batch.h, (batch.y[:, 0] + 1) % V)[..., S]
    other = F.cross_entropy(z_other[keep], torch.searchsorted(S, y[keep]))
    assert abs(float(other) - float(ce)) > 0.01


def test_load_balance_only_for_rank_above_one():
    batch = random_batch(12, 3, 256, seed=5)
    S = torch.arange(256)
    out = head_loss(heads_model(rank=1).heads, batch, S, "kl", load_balance_coef=5.0)
    assert "load_balance" not in out and out["total"] is out["loss"]
    model = heads_model(rank=3)
    for coef in (0.0, 0.5):
        out = head_loss(model.heads, batch, S, "kl", load_balance_coef=coef)
        u = model.heads.gate_probs(batch.h).mean(0)  # (r,) mean gate
        lb = 3 * (u * u).sum()
        assert float(lb.detach()) > 1.01  # perturbed gate: not uniform (uniform gives exactly 1)
        torch.testing.assert_close(out["load_balance"], lb.detach())
        torch.testing.assert_close(out["total"], out["loss"] + coef * lb)
    fresh = build_heads_model(tiny_llama(), "cp", 3, 3)  # zero-initialised gate: uniform
    out = head_loss(fresh.heads, batch, S, "kl")
    torch.testing.assert_close(out["load_balance"], torch.tensor(1.0))


def test_head_objective_is_head_loss_as_a_module():
    model = heads_model(rank=2)
    batch = random_batch(8, 3, 256, seed=6)
    S = torch.arange(0, 256, 3)
    obj = HeadObjective(model.heads, S, "kl", 0.1)
    got = obj(batch.h, batch.y, batch.top_ids, batch.top_logp)
    want = head_loss(model.heads, batch, S, "kl", 0.1)
    assert got.keys() == want.keys()
    for k in got:
        torch.testing.assert_close(got[k], want[k])
    assert all(k.startswith("heads.") for k in obj.state_dict())  # the shortlist is not saved
    assert {id(p) for p in obj.parameters()} == {id(p) for p in model.heads.parameters()}


def test_config_rejects_bad_values():
    for bad in (dict(objective="mse", steps=1), dict(), dict(steps=0), dict(minutes=0),
                dict(steps=1, batch_size=0)):
        with pytest.raises(ValueError):
            HeadTrainConfig(**bad)


# ----------------------------------------------------------------------------- batches


def cycle_windows(num, length, seed, alphabet=24):
    """A small synthetic language: walks along one fixed cycle of ``alphabet`` tokens, each
    window starting at a random place (the future is a function of the current token)."""
    tokens = np.random.default_rng(0).choice(256, alphabet, replace=False)
    starts = np.random.default_rng(seed).integers(0, alphabet, num)
    return [[int(tokens[(s + i) % alphabet]) for i in range(length)] for s in starts]


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """Train and held-out caches of the cycle language on a tiny LLaMA with an untied output
    (its greedy tokens are neither the current nor the next token: the heads must learn them)."""
    root = tmp_path_factory.mktemp("caches")
    backbone = tiny_llama(tie_embeddings=False)
    kw = dict(topk=8, progress=False)
    train = build_feature_cache(backbone, cycle_windows(32, 48, 1), "train", path=root / "tr", **kw)
    val = build_feature_cache(backbone, cycle_windows(8, 48, 2), "val", path=root / "va", **kw)
    return backbone, train, val


def test_sample_batch_reads_the_cache_rows(caches):
    _, cache, _ = caches
    t = np.array([0, 5, 47 - 4, 48])
    b = sample_batch(cache, t, 4)
    np.testing.assert_array_equal(b.h.numpy(), cache.hidden[t].astype(np.float32))
    for j in range(4):  # y_j = x_{t+j}; the teacher of y_j is p_{t+j-1}
        np.testing.assert_array_equal(b.y[:, j].numpy(), cache.ids[t + j + 1])
        np.testing.assert_array_equal(b.top_ids[:, j].numpy(), cache.top_ids[t + j])
        np.testing.assert_array_equal(b.top_logp[:, j].numpy(), cache.top_logp[t + j])
    assert b.h.dtype == b.top_logp.dtype == torch.float32 and b.y.dtype == torch.int64


def test_batch_schedule_walks_permutations_of_the_positions(caches):
    _, cache, _ = caches
    cfg = HeadTrainConfig(steps=1, batch_size=100, seed=3)
    pos = cache.positions(4)
    per_epoch = len(pos) // 100
    sched = batch_schedule(cache, 4, cfg)
    batches = [next(sched) for _ in range(2 * per_epoch + 1)]
    for b in batches:
        assert len(b) == 100 and (np.diff(b) > 0).all() and np.isin(b, pos).all()
    epoch = np.concatenate(batches[:per_epoch])
    assert len(np.unique(epoch)) == len(epoch)  # no position twice within a permutation
    again = batch_schedule(cache, 4, cfg)
    assert all(np.array_equal(next(again), b) for b in batches)  # seeded
    other = next(batch_schedule(cache, 4, HeadTrainConfig(steps=1, batch_size=100, seed=4)))
    assert not np.array_equal(other, batches[0])
    small = batch_schedule(cache, 4, HeadTrainConfig(steps=1, batch_size=10 * len(pos)))
    assert np.array_equal(next(small), pos)  # a batch larger than the cache: all of it


def test_train_heads_draws_the_batch_schedule(caches, monkeypatch):
    backbone, cache, _ = caches
    model = build_heads_model(backbone, "cp", 3, 2)
    cfg = HeadTrainConfig(steps=6, batch_size=50, seed=7)
    seen = []

    def spy(cache_, t, n_future, device="cpu"):
        seen.append(np.array(t))
        return sample_batch(cache_, t, n_future, device)

    monkeypatch.setattr(headtrain, "sample_batch", spy)
    hist = train_heads(model, cache, cfg, torch.arange(256), progress=False)
    sched = batch_schedule(cache, 3, cfg)
    assert len(seen) == hist["steps"] == 6 and hist["positions_seen"] == 300
    assert all(np.array_equal(t, next(sched)) for t in seen)


def test_nothing_to_train_on_is_an_error(tmp_path):
    backbone = tiny_llama()
    cache = build_feature_cache(backbone, [[1, 2, 3], [4, 5, 6, 7]], "short", topk=4,
                                path=tmp_path / "c", progress=False)
    model = build_heads_model(backbone, "cp", 4)
    with pytest.raises(ValueError, match="no position"):
        train_heads(model, cache, HeadTrainConfig(steps=2), torch.arange(256), progress=False)
    with pytest.raises(ValueError, match="no position"):
        cached_acceptance(model, cache, torch.arange(256))
    with pytest.raises(ValueError, match="shortlist"):
        train_heads(model, cache, HeadTrainConfig(steps=2), progress=False)
    with pytest.raises(TypeError, match="HeadTrainConfig"):
        train_heads(model, cache, dict(steps=2), torch.arange(256), progress=False)


def test_shortlist_from_cache_takes_the_most_frequent_tokens(caches):
    _, cache, _ = caches
    counts = np.bincount(cache.ids, minlength=256) + np.bincount(cache.top_ids[:, 0],
                                                                 minlength=256)
    S = shortlist_from_cache(cache, 10)
    assert S.dtype == torch.int64 and (S.diff() > 0).all() and len(S) == 10
    assert counts[S.numpy()].min() >= np.delete(counts, S.numpy()).max()
    assert len(shortlist_from_cache(cache, 10_000)) <= 256


def test_concat_caches_keeps_windows_apart(caches):
    _, train, val = caches
    both = concat_caches([train, val])
    assert both.num_tokens == train.num_tokens + val.num_tokens
    assert len(both.window_ends) == len(train.window_ends) + len(val.window_ends)
    assert len(both.positions(4)) == len(train.positions(4)) + len(val.positions(4))
    np.testing.assert_array_equal(both.hidden[train.num_tokens:], val.hidden)
    assert concat_caches([train]) is train


# ----------------------------------------------------------------------------- learning


def held_out_loss(model, cache, S, objective):
    batch = sample_batch(cache, cache.positions(model.n_future), model.n_future)
    with torch.no_grad():
        return float(head_loss(model.heads, batch, S, objective)["loss"])


@pytest.mark.parametrize("kind,rank,expert_dim,objective", [
    ("cp", 1, None, "top1"), ("cp", 4, 8, "kl"), ("first_token", 1, None, "top1")])
def test_training_learns_the_backbones_continuation(caches, kind, rank, expert_dim, objective):
    backbone, train, val = caches
    before_backbone = {k: v.clone() for k, v in backbone.state_dict().items()}
    model = build_heads_model(backbone, kind, 4, rank, expert_dim)
    S = shortlist_from_cache(train, 64)
    acc0 = cached_acceptance(model, val, S)
    loss0 = held_out_loss(model, val, S, objective)
    cfg = HeadTrainConfig(objective=objective, steps=150, batch_size=64, lr=1e-2, warmup=10)
    hist = train_heads(model, train, cfg, S, progress=False)
    acc1 = cached_acceptance(model, val, S)
    loss1 = held_out_loss(model, val, S, objective)
    assert hist["steps"] == 150 and np.mean(hist["loss"][-10:]) < np.mean(hist["loss"][:10]) - 0.5
    assert loss1 < loss0 - 0.5, (loss0, loss1)
    assert acc1["tokens_per_forward"] > acc0["tokens_per_forward"] + 0.75, (acc0, acc1)
    assert acc1["positions"] == len(val.positions(4)) and len(acc1["prefix"]) == 3
    assert all(a >= b for a, b in zip(acc1["prefix"], acc1["prefix"][1:], strict=False))
    assert not model.heads.training
    for k, v in backbone.state_dict().items():  # the frozen backbone never moved
        assert torch.equal(v, before_backbone[k]), k


# ----------------------------------------------------------------------------- checkpoints


def sourced_backbone(path: Path, content: bytes, seed=0):
    """A tiny backbone that says it comes from ``path`` (the fingerprint hashes that file)."""
    path.write_bytes(content)
    backbone = tiny_llama(seed)
    backbone.source = str(path)
    return backbone


def half_rounded(model):
    """Heads whose weights are exactly representable in half precision (checkpoints store half)."""
    with torch.no_grad():
        for p in model.heads.parameters():
            p.copy_(p.half().float())
    return model


@pytest.mark.parametrize("kind,rank,expert_dim", [("cp", 1, None), ("cp", 3, 4),
                                                  ("first_token", 1, None)])
def test_save_and_load_heads_round_trip(tmp_path, monkeypatch, kind, rank, expert_dim):
    backbone = sourced_backbone(tmp_path / "tiny.gguf", b"tiny weights " * 100)
    model = half_rounded(perturbed(build_heads_model(backbone, kind, 4, rank, expert_dim)))
    S = torch.arange(3, 200, 3)
    model.heads.set_draft_vocab(S)
    path = tmp_path / "ck" / "heads.pt"
    save_heads(model, path, "tiny", metrics=dict(tokens_per_forward=2.5), recipe=dict(a=1))
    assert is_heads_checkpoint(path)
    ckpt = read_torch_file(path)
    assert all(v.dtype == torch.float16 for v in ckpt["state_dict"].values())
    assert set(ckpt["state_dict"]) == set(model.heads.state_dict())  # heads only, no backbone
    loaded = load_heads(path, backbone)
    assert type(loaded) is type(model) and loaded.backbone is backbone
    assert (loaded.n_future, loaded.heads.rank) == (4, rank)
    assert getattr(loaded.heads, "expert_dim", None) == expert_dim
    assert torch.equal(loaded.heads.draft_vocab, S)
    assert loaded.metrics == dict(tokens_per_forward=2.5) and loaded.recipe == dict(a=1)
    for k, v in model.heads.state_dict().items():
        assert torch.equal(loaded.heads.state_dict()[k], v), k
    h, x1 = torch.randn(5, 32), torch.randint(0, 256, (5,))
    for T in (0.0, 1.0):
        a, b = model.heads.draft(h, x1, T), loaded.heads.draft(h, x1, T)
        torch.testing.assert_close(b.log_factors, a.log_factors, rtol=0, atol=0)
        torch.testing.assert_close(b.log_weights, a.log_weights, rtol=0, atol=0)
    if kind == "first_token":
        assert torch.equal(loaded.heads.logits(h, x1), model.heads.logits(h, x1))
    # without a backbone, the named one is loaded (cptoy.pretrained.load)
    calls = []

    def fake_load(name):
        calls.append(name)
        return backbone, None

    monkeypatch.setattr(pretrained, "load", fake_load)
    again = load_heads(path)
    assert calls == ["tiny"] and torch.equal(again.heads.draft_vocab, S)


def test_heads_checkpoint_refuses_another_backbone_and_other_files(tmp_path):
    backbone = sourced_backbone(tmp_path / "a.gguf", b"backbone A" * 50)
    model = build_heads_model(backbone, "cp", 3, 2)
    path = tmp_path / "heads.pt"
    save_heads(model, path, "tiny-a")
    fp = pretrained.fingerprint(tmp_path / "a.gguf")
    other = sourced_backbone(tmp_path / "b.gguf", b"backbone B" * 50)  # same weights, other file
    with pytest.raises(ValueError, match=fp[:12]):
        load_heads(path, other)
    no_source = tiny_llama()
    with pytest.raises(ValueError, match="fingerprint"):
        load_heads(path, no_source)
    with pytest.raises(ValueError, match="source"):
        save_heads(build_heads_model(no_source, "cp", 3), tmp_path / "x.pt", "tiny")
    # files that are not heads checkpoints
    torch.save({"state_dict": model.heads.state_dict()}, tmp_path / "plain.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    for name, match in (("plain.pt", "not a heads checkpoint"), ("garbage.pt", "corrupt"),
                        ("missing.pt", "does not exist")):
        assert not is_heads_checkpoint(tmp_path / name)
        with pytest.raises(ValueError, match=match):
            load_heads(tmp_path / name, backbone)
    ckpt = read_torch_file(path)
    torch.save(dict(ckpt, format_version=99), tmp_path / "future.pt")
    with pytest.raises(ValueError, match="format_version"):
        load_heads(tmp_path / "future.pt", backbone)
    torch.save(dict(ckpt, rank=3), tmp_path / "mismatch.pt")
    with pytest.raises(ValueError, match="do not match"):
        load_heads(tmp_path / "mismatch.pt", backbone)
    with pytest.raises(ValueError, match="kind"):
        build_heads_model(backbone, "medusa", 3)


def test_recipe_cli_caches_trains_and_saves(tmp_path, monkeypatch, capsys):
    """``python -m cptoy.headtrain`` end to end on a tiny backbone (the GGUF loader and the
    corpus replaced by fakes: 512-token windows do not fit the tiny context)."""
    gguf = tmp_path / "tiny.gguf"
    backbone = sourced_backbone(gguf, b"tiny gguf" * 64)
    loads, asked = [], []

    def fake_load(name, device="cpu"):
        loads.append(name)
        return backbone, ByteTokenizer()

    def fake_windows(tokenizer, corpus, num_windows, window=512, split="train"):
        asked.append((corpus, num_windows, split))
        return cycle_windows(num_windows, 40, seed=len(asked))

    monkeypatch.setattr(pretrained, "load", fake_load)
    monkeypatch.setattr("cptoy.features.corpus_windows", fake_windows)
    monkeypatch.setenv("CPTOY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "heads.pt"
    headtrain.main(["--pretrained", str(gguf), "--kind", "cp", "--rank", "2", "--n-future", "3",
                    "--corpus", "code", "shakespeare", "--windows", "6", "4",
                    "--val-windows", "3", "--shortlist", "40", "--steps", "5",
                    "--batch-size", "16", "--no-progress", "--out", str(out)])
    assert asked == [("code", 6, "train"), ("shakespeare", 4, "train"), ("code", 3, "val"),
                     ("code", 4, "val")]  # the held-out metric, then the check slice
    assert len(list((tmp_path / "cache" / "features").iterdir())) == 4
    model = load_heads(out)  # reloads the backbone by the path it was given
    assert loads == [str(gguf), os.path.abspath(gguf)]
    assert model.heads.rank == 2 and model.n_future == 3 and len(model.heads.draft_vocab) == 40
    assert model.metrics["steps"] == 5 and model.metrics["train_tokens"] == 10 * 40
    assert 1 <= model.metrics["val_code"]["tokens_per_forward"] <= 3
    assert "--steps 5" in model.recipe["command"]
    assert '"tokens_per_forward"' in capsys.readouterr().out


# ----------------------------------------------------------------------------- distributed

DDP_STEPS = 6


def _state(path) -> dict:
    return torch.load(path, weights_only=True)


@pytest.mark.slow
def test_torchrun_ddp_equals_one_process_on_the_union_of_batches(tmp_path, monkeypatch):
    """Two gloo processes, each on its own shard, give the heads that one process gets from
    the same steps on both ranks' batches together (DDP averages the gradients)."""
    backbone = tiny_llama(tie_embeddings=False)
    windows = cycle_windows(12, 40, seed=3)
    shards = [build_feature_cache(backbone, windows, "ddp", topk=8, shard=(r, 2),
                                  path=tmp_path / f"shard{r}", progress=False) for r in range(2)]
    init = build_heads_model(backbone, "cp", 3, 1)  # rank 1: the loss is a plain mean
    S = torch.arange(256)  # the whole vocabulary: every term counts, equal batches
    cfg = dict(objective="kl", steps=DDP_STEPS, batch_size=32, lr=1e-2, warmup=2, seed=5)
    setup = dict(backbone_config=backbone.config.to_dict(), backbone=backbone.state_dict(),
                 kind="cp", n_future=3, rank=1, expert_dim=None, heads=init.heads.state_dict(),
                 shortlist=S, config=cfg, caches=[str(s.path) for s in shards])
    torch.save(setup, tmp_path / "setup.pt")
    out = tmp_path / "ddp_heads.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS.parent),
                                                        os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(TESTS / "ddp_worker.py"), str(tmp_path / "setup.pt"), str(out)]
    run = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ddp = [_state(out), _state(f"{out}.rank1")]
    assert ddp[0]["world"] == 2 and len(ddp[0]["loss"]) == DDP_STEPS
    for k, v in ddp[0]["heads"].items():  # DDP keeps the replicas equal
        torch.testing.assert_close(ddp[1]["heads"][k], v, rtol=0, atol=0)

    def replay(schedule_of):
        """One process, the same train_heads loop, batches from ``schedule_of``."""
        model = build_heads_model(backbone, "cp", 3, 1)
        model.heads.load_state_dict(init.heads.state_dict())
        with monkeypatch.context() as mp:
            mp.setattr(headtrain, "batch_schedule", schedule_of)
            cache = concat_caches(shards)
            hist = train_heads(model, cache, HeadTrainConfig(**cfg), S, progress=False)
        return model.heads.state_dict(), hist

    offset = shards[0].num_tokens

    def union(cache, n_future, c):  # step s: rank 0's batch and rank 1's, in one batch
        s0, s1 = (batch_schedule(sh, n_future, c) for sh in shards)
        while True:
            yield np.concatenate([next(s0), next(s1) + offset])

    def rank0_alone(cache, n_future, c):
        return batch_schedule(shards[0], n_future, c)

    single, hist = replay(union)
    assert hist["positions_seen"] == 2 * 32 * DDP_STEPS
    for k, v in single.items():
        torch.testing.assert_close(ddp[0]["heads"][k], v, rtol=1e-5, atol=1e-5)
    # ... and not what rank 0 gets alone on its shard: the gradients really were averaged
    alone, hist0 = replay(rank0_alone)
    assert max(float((alone[k] - single[k]).abs().max()) for k in single) > 1e-3
    np.testing.assert_allclose(ddp[0]["loss"][0], hist0["loss"][0], rtol=1e-6)  # rank 0's batch
