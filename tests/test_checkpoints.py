"""The shipped demo checkpoints load, stay small, and reproduce their recorded held-out metrics."""

import pytest
import torch

from cptoy import checkpoints
from cptoy.recipes import DRAFT_VOCAB, check_slice_ids, check_slice_metrics

EXPECTED = ["code_r1", "code_r8", "shakespeare_r1", "shakespeare_r8"]


def test_all_demo_checkpoints_are_shipped():
    assert set(EXPECTED) <= set(checkpoints.available())


@pytest.mark.parametrize("name", EXPECTED)
def test_checkpoint_is_small_and_reproduces_its_metrics(name):
    assert checkpoints.path(name).stat().st_size <= 5 * 2**20
    torch.manual_seed(0)
    model, tok, metrics = checkpoints.load(name)
    recorded = metrics["check_slice"]
    measured = check_slice_metrics(model, check_slice_ids(metrics["corpus"], tok))
    for key, value in recorded.items():
        assert measured[key] == pytest.approx(value, abs=2e-3), key
    # demo-grade: the backbone is far from a unigram model (about 1.1-1.5 nats per byte)
    assert metrics["check_slice"]["next_token_nll"] < 5.0
    # a frequency shortlist for cheap drafting: 512 tokens covering most held-out text
    vocab = model.heads.draft_vocab
    assert vocab is not None and vocab.numel() == DRAFT_VOCAB
    held = check_slice_ids(metrics["corpus"], tok)
    assert torch.isin(held, vocab).double().mean() > 0.6


def test_rank_pairs_share_one_frozen_backbone():
    for corpus in ("code", "shakespeare"):
        m1, _, _ = checkpoints.load(f"{corpus}_r1")
        m8, _, _ = checkpoints.load(f"{corpus}_r8")
        s1, s8 = m1.backbone.state_dict(), m8.backbone.state_dict()
        assert s1.keys() == s8.keys()
        assert all(torch.equal(s1[k], s8[k]) for k in s1)
        assert (m1.rank, m8.rank) == (1, 8)


def test_unknown_checkpoint_name_is_rejected_clearly():
    with pytest.raises(ValueError, match="available"):
        checkpoints.load("no_such_model")
