"""The reference self-speculative step written out in notebook 04 (no cache) agrees with
``cptoy.decoding.generate``: token for token at temperature 0, in law at temperature 1.

The notebook runs these checks too (nbmake); this test runs the same cell's code in seconds, so
a change to ``generate`` or to the heads that breaks the notebook's algorithm is caught by the
ordinary test suite.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import chi2_contingency

from cptoy.decoding import generate
from cptoy.heads import MTPModel
from cptoy.model import GPTConfig

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "04_speculative_decoding.ipynb"


@pytest.fixture(scope="module")
def ref():
    """The notebook cell that defines reference_step / reference_decode, executed."""
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    src = [
        "".join(c["source"])
        for c in cells
        if c["cell_type"] == "code" and "def reference_step(" in "".join(c["source"])
    ]
    assert len(src) == 1, "notebook 04 must define reference_step in exactly one cell"
    namespace = {"torch": torch}
    exec(compile(src[0], str(NOTEBOOK), "exec"), namespace)  # noqa: S102 - our own notebook
    return namespace


def tiny_model(seed: int, rank: int = 2) -> MTPModel:
    """A tiny model whose heads disagree with the backbone: many rejections and residuals."""
    torch.manual_seed(seed)
    m = MTPModel(GPTConfig.preset("tiny", vocab_size=3, block_size=16), n_future=3, rank=rank)
    with torch.no_grad():
        m.backbone.wte.weight.mul_(8.0)
        m.heads.transform_weight.normal_(0, 0.5)
    return m.eval()


@pytest.mark.parametrize("rank", [1, 2])
def test_greedy_reference_equals_generate_and_ar(ref, rank):
    model = tiny_model(0, rank)
    for s in range(4):
        prompt = torch.randint(0, 3, (3,), generator=torch.Generator().manual_seed(s)).tolist()
        ar = generate(model.backbone, prompt, 10, temperature=0).tokens
        lib = generate(model, prompt, 10, temperature=0, strategy="self-spec").tokens
        mine, steps = ref["reference_decode"](model, prompt, 10, T=0, seed=0)
        assert mine == lib == ar
        assert 1 <= steps <= 9


def test_reference_and_generate_agree_in_law(ref):
    """Same output law and same tokens gained per step (1000 runs each, two-sample tests)."""
    model, prompt, runs = tiny_model(1), [0, 1], 1000
    mine = [ref["reference_decode"](model, prompt, 4, T=1.0, seed=s) for s in range(runs)]
    lib = [generate(model, prompt, 4, temperature=1.0, strategy="self-spec", seed=s)
           for s in range(runs)]
    code = lambda toks: int(np.ravel_multi_index(toks, (3,) * 4))  # noqa: E731
    out = np.stack([np.bincount([code(t) for t, _ in mine], minlength=81),
                    np.bincount([code(g.tokens) for g in lib], minlength=81)])
    out = out[:, out.sum(0) >= 10]  # drop bins too rare for the test
    steps = np.stack([np.bincount([s for _, s in mine], minlength=4)[1:4],
                      np.bincount([g.stats.n_steps for g in lib], minlength=4)[1:4]])
    steps = steps[:, steps.sum(0) > 0]
    assert chi2_contingency(out).pvalue > 1e-3
    assert chi2_contingency(steps).pvalue > 1e-3
    assert sum(g.stats.arrival.count("replacement") for g in lib) > 50  # residuals exercised


def test_the_law_test_can_fail(ref):
    """The same two-sample test tells the reference apart from generate at another
    temperature (a different target law), so passing above means something."""
    model, prompt, runs = tiny_model(1), [0, 1], 1000
    mine = [ref["reference_decode"](model, prompt, 4, T=1.0, seed=s)[0] for s in range(runs)]
    other = [generate(model, prompt, 4, temperature=0.6, strategy="self-spec", seed=s).tokens
             for s in range(runs)]
    code = lambda toks: int(np.ravel_multi_index(toks, (3,) * 4))  # noqa: E731
    out = np.stack([np.bincount([code(t) for t in mine], minlength=81),
                    np.bincount([code(t) for t in other], minlength=81)])
    out = out[:, out.sum(0) >= 10]
    assert chi2_contingency(out).pvalue < 1e-3
