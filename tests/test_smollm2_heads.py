"""The shipped drafting heads on the real SmolLM2-135M backbone (cptoy/checkpoints/smollm2_*.pt).

One backbone is loaded and shared by every head checkpoint (as ``checkpoints.load(...,
backbone=...)`` allows). Each checkpoint must reproduce the held-out metric recorded when it was
trained (teacher-forced acceptance on a small slice of held-out code, recomputed here from a
fresh feature cache), and self-speculative decoding with it must equal greedy decoding.
"""

from __future__ import annotations

import os

import pytest
import torch

from cptoy import checkpoints, pretrained
from cptoy.decoding import generate
from cptoy.features import build_feature_cache, corpus_windows
from cptoy.headtrain import cached_acceptance

NAMES = [n for n in checkpoints.available() if n.startswith("smollm2_")]


@pytest.fixture(scope="module")
def backbone():
    torch.set_num_threads(1)
    return pretrained.load("smollm2-135m")


@pytest.fixture(scope="module")
def check_cache(backbone, tmp_path_factory):
    model, tok = backbone
    windows = corpus_windows(tok, "code", 4, 512, "val")
    return build_feature_cache(model, windows, "check", progress=False,
                               path=tmp_path_factory.mktemp("features"))


def test_heads_are_shipped():
    assert {"smollm2_r1", "smollm2_r8", "smollm2_x1", "smollm2_block"} <= set(NAMES)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_shipped_heads_reproduce_their_metrics_and_decode_losslessly(name, backbone, check_cache):
    model, tok = backbone
    assert os.path.getsize(checkpoints.path(name)) <= 8 * 2**20
    heads_model, tok2, metrics = checkpoints.load(name, backbone=model)
    assert heads_model.backbone is model and tok2.encode("def f(x):") == tok.encode("def f(x):")
    assert heads_model.heads.draft_vocab is not None  # trained and drafting over a shortlist
    got = cached_acceptance(heads_model, check_cache)
    want = metrics["check_code"]
    assert got["positions"] == want["positions"]
    assert got["tokens_per_forward"] == pytest.approx(want["tokens_per_forward"], abs=0.02)
    assert got["tokens_per_forward"] > 1.3  # untrained heads: about 1.0
    prompt = tok.encode("def parse_args(argv):\n    parser = argparse.ArgumentParser(")
    ar = generate(model, prompt, 24, temperature=0)
    spec = generate(heads_model, prompt, 24, temperature=0, strategy="self-spec")
    assert spec.tokens == ar.tokens
    assert spec.stats.tokens_per_forward > 1.0


def test_heads_refuse_another_backbone(tmp_path):
    from cptoy.model import GPT, GPTConfig

    with torch.device("meta"):
        other = GPT(GPTConfig.preset("smollm2-135m"))
    fake = tmp_path / "other.gguf"
    fake.write_bytes(b"GGUF not the same file")
    other.source = str(fake)
    with pytest.raises(ValueError, match="fingerprint"):
        checkpoints.load("smollm2_r1", backbone=other)
