"""cptoy.widgets.expert_weights: the CP heads as a mixture of experts on typed text."""

import json
import math

import numpy as np
import pytest
import torch

from cptoy.data import ByteTokenizer
from cptoy.heads import MTPModel
from cptoy.model import GPTConfig

TEXT = "def f(x):\n    return x + 1\n"


def _model(rank: int = 3, n_future: int = 3, seed: int = 0) -> MTPModel:
    torch.manual_seed(seed)
    m = MTPModel(GPTConfig.preset("tiny"), n_future=n_future, rank=rank)
    if m.heads.gate is not None:  # the gate starts uniform (zero init): make it say something
        torch.nn.init.normal_(m.heads.gate.weight, std=2.0)
        torch.nn.init.normal_(m.heads.gate.bias, std=1.0)
    with torch.no_grad():  # and the experts distinguishable
        m.heads.transform_weight.normal_(0.0, 0.5)
    return m.eval()


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture
def panel(model):
    from cptoy.widgets import expert_weights

    return expert_weights(model, ByteTokenizer(), text=TEXT, top_k=4)


def _reference(model, text):
    """Gate, posterior gate and factors computed directly from the heads' CPDist."""
    ids = torch.tensor([ByteTokenizer().encode(text)])
    with torch.no_grad():
        dist = model.heads(model.backbone(ids)[0])  # batch (T,)
    T = ids.shape[1]
    post = dist[: T - 1].posterior_log_weights(ids[0, 1:, None]).exp()  # (T-1, r)
    return ids[0].tolist(), dist.weights.double(), post.double(), dist.factors.double()


def test_builds_and_shows_the_gate_and_posterior_of_every_position(panel, model):
    ids, w, post, _ = _reference(model, TEXT)
    T, r = len(ids), model.rank
    assert panel.ids == ids
    z_prior = np.array(panel.figures["gate"].data[0].z, dtype=float)  # (r, T)
    z_post = np.array(panel.figures["gate"].data[1].z, dtype=float)
    assert z_prior.shape == (r, T) and z_post.shape == (r, T)
    np.testing.assert_allclose(z_prior, w.T.numpy(), atol=1e-6)
    np.testing.assert_allclose(z_post[:, :-1], post.T.numpy(), atol=1e-6)
    assert np.isnan(z_post[:, -1]).all()  # the last position has no next token
    # ... drawn as a gap: None, since NaN is not valid JSON for the front end
    for fw in panel.figures.values():
        json.dumps(fw.to_plotly_json(), allow_nan=False, default=list)
    # the posterior really moved: conditioning on the next token changes the gate
    assert np.abs(z_post[:, :-1] - z_prior[:, :-1]).max() > 0.05
    # token strings on the position axis (whitespace made visible)
    ticks = list(panel.figures["gate"].layout.xaxis.ticktext)
    assert ticks[:3] == ["d", "e", "f"] and "⏎" in ticks
    assert panel.position_slider.max == T - 1 and panel.position_slider.value == T - 2
    assert "top expert" in panel.status and not panel.status.startswith("⚠")


def test_position_slider_updates_bars_table_and_highlight(panel, model):
    ids, w, post, F = _reference(model, TEXT)
    bars = panel.figures["position"]
    before = (list(bars.data[0].y), panel.experts_view.value, panel.text_view.value)
    for t in (2, 9):
        panel.position_slider.value = t
        np.testing.assert_allclose(bars.data[0].y, w[t].numpy(), atol=1e-6)
        np.testing.assert_allclose(bars.data[1].y, post[t].numpy(), atol=1e-6)
        for outline in panel.figures["gate"].data[2:]:  # the selected column, both heatmaps
            assert min(outline.x) == t - 0.5 and max(outline.x) == t + 0.5
            assert (min(outline.y), max(outline.y)) == (-0.5, model.rank - 0.5)
        # the table lists each expert's top-k tokens of every factor q_{s,a} at t
        top = F[t].topk(4, dim=-1)  # (n, r, 4)
        assert torch.equal(panel.top["ids"], top.indices)
        torch.testing.assert_close(panel.top["probs"], top.values)
        assert panel.experts_view.value.count("<tr") == 1 + model.rank
        assert f"t = {t}" in panel.status
    after = (list(bars.data[0].y), panel.experts_view.value, panel.text_view.value)
    assert all(a != b for a, b in zip(before, after, strict=True))


def test_changing_the_text_recomputes_everything(panel, model):
    panel.position_slider.value = 5
    z0 = np.array(panel.figures["gate"].data[0].z, dtype=float)
    new = "import os\nprint(os.getcwd())\n"
    panel.set_text(new)
    ids, w, post, _ = _reference(model, new)
    z1 = np.array(panel.figures["gate"].data[0].z, dtype=float)
    assert z1.shape == (model.rank, len(ids)) != z0.shape
    np.testing.assert_allclose(z1, w.T.numpy(), atol=1e-6)
    assert panel.position_slider.max == len(ids) - 1
    assert panel.position_slider.value == 5  # kept: it still exists
    np.testing.assert_allclose(panel.figures["position"].data[1].y, post[5].numpy(), atol=1e-6)
    panel.set_text("ab")  # shorter than the old position: the slider follows
    assert panel.position_slider.value == 1 and panel.ids == [97, 98]
    assert list(panel.figures["position"].data[1].y) == []  # no next token after the last


@pytest.mark.parametrize(
    "text, words",
    [("", "empty"), ("x" * 65, "65 tokens long"), ("y" * 200, "at most 64")],
)
def test_bad_text_shows_a_message_not_a_traceback(panel, text, words):
    panel.set_text(text)  # must not raise
    assert panel.status.startswith("⚠") and words in panel.status
    assert "⚠" in panel.message.value
    assert list(panel.figures["gate"].data[0].z) == []
    assert panel.experts_view.value == ""
    panel.set_text("back to normal")  # and it recovers
    assert not panel.status.startswith("⚠")
    assert np.array(panel.figures["gate"].data[0].z, dtype=float).shape[1] == 14


def test_emptied_text_leaves_no_stale_token_labels(panel):
    panel.set_text("abc")
    assert list(panel.figures["gate"].layout.xaxis2.ticktext)[:3] == ["a", "b", "c"]
    panel.set_text("")
    assert panel.figures["position"].layout.title.text == "gate at t"  # no stale token
    for ax in ("xaxis", "xaxis2"):
        assert list(panel.figures["gate"].layout[ax].ticktext or []) == []
        assert list(panel.figures["gate"].layout[ax].tickvals or []) == []


def test_table_lists_the_experts_the_gate_weighs_most():
    """Rank 8: 4 rows (a projector screen), heaviest posterior weight first."""
    import re

    from cptoy.widgets import expert_weights
    from cptoy.widgets.experts import MAX_ROWS

    m = _model(rank=8, n_future=2)
    ex = expert_weights(m, ByteTokenizer(), text=TEXT, top_k=3, position=5)
    html = ex.experts_view.value
    assert html.count("<tr") == 1 + MAX_ROWS and "4 of 8 experts" in html
    shown = [int(a) for a in re.findall(r'<tr style="[^"]*"><td style="[^"]*">(\d+)</td>', html)]
    order = ex.posterior[5].argsort(descending=True)[:MAX_ROWS].tolist()
    assert shown == order


def test_bad_text_at_construction_is_a_message_too(model):
    from cptoy.widgets import expert_weights

    ex = expert_weights(model, ByteTokenizer(), text="")
    assert "empty" in ex.status
    ex.set_text("hello")
    assert ex.ids == list(b"hello")


def test_errors_inside_callbacks_appear_in_the_panel(model):
    from cptoy.widgets import expert_weights

    class Picky(ByteTokenizer):
        def encode(self, text):
            if "!" in text:
                raise ValueError("no exclamation marks, please")
            return super().encode(text)

    ex = expert_weights(model, Picky(), text="calm")
    ex.set_text("loud!")
    assert ex.status.startswith("⚠") and "no exclamation marks" in ex.status


def test_rank_one_has_a_single_expert_and_says_so():
    from cptoy.widgets import expert_weights

    m = _model(rank=1, n_future=2)
    ex = expert_weights(m, ByteTokenizer(), text="abc", top_k=2)
    z = np.array(ex.figures["gate"].data[1].z, dtype=float)
    assert z.shape == (1, 3) and np.allclose(z[:, :-1], 1.0)
    assert "rank 1" in ex.status
    assert ex.top["ids"].shape == (2, 1, 2)


def test_conditioning_number_in_the_status_line(panel, model):
    ids, w, post, F = _reference(model, TEXT)
    t = 4
    panel.position_slider.value = t
    q2 = F[t, 1, :, ids[t + 2]]  # (r,) q_{2,a}(x_{t+2})
    prior, after = float((w[t] * q2).sum()), float((post[t] * q2).sum())
    assert f"{prior:.3f} before → {after:.3f} after" in panel.status
    H = -(w.mean(0) * w.mean(0).log()).sum()
    assert f"entropy {float(H):.2f} of max log r = {math.log(model.rank):.2f}" in panel.status


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(top_k=0), ValueError, "top_k"),
        (dict(top_k=257), ValueError, "top_k"),
        (dict(top_k=2.0), TypeError, "top_k"),
        (dict(text=b"bytes"), TypeError, "text"),
        (dict(text="abc", position=3), ValueError, "position"),
        (dict(position=-1), ValueError, "position"),
    ],
)
def test_bad_arguments_raise(model, kwargs, err, match):
    from cptoy.widgets import expert_weights

    with pytest.raises(err, match=match):
        expert_weights(model, ByteTokenizer(), **kwargs)


def test_bad_model_or_tokenizer_raise(model):
    from cptoy.widgets import expert_weights

    with pytest.raises(TypeError, match="model"):
        expert_weights(model.backbone, ByteTokenizer())
    with pytest.raises(TypeError, match="tokenizer"):
        expert_weights(model, object())


def test_display_bundle_and_model_mode_restored(model):
    from cptoy.widgets import expert_weights

    model.train()
    try:
        ex = expert_weights(model, ByteTokenizer(), text=TEXT, position=3)
        assert model.training  # eval only while computing
        assert ex.position_slider.value == 3
        bundle = ex._repr_mimebundle_()
        assert "application/vnd.jupyter.widget-view+json" in bundle
    finally:
        model.eval()


# ---------------------------------------------------------------------- plot helpers (notebook 03)
def test_plot_joint_slices_one_panel_per_joint_on_one_scale():
    from cptoy.joint import HMM
    from cptoy.plots import joint_slice, plot_joint_slices

    hmm = HMM(3, 5, seed=0)
    P, Q = hmm.joint(3), hmm.joint_cp(3)
    fig = plot_joint_slices({"P": P, "Q": Q, "uniform": torch.full((5, 5, 5), 1 / 125.0)},
                            prefix=[1])
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in axes] == ["P", "Q", "uniform"]
    img = axes[0].images[0]
    np.testing.assert_allclose(img.get_array(), joint_slice(P, (0, 1), [1]).numpy())
    assert {ax.images[0].get_clim() for ax in axes} == {img.get_clim()}  # one colour scale
    with pytest.raises(ValueError, match="same vocabulary"):
        plot_joint_slices({"P": P, "small": HMM(3, 4, seed=0).joint(3)})
    with pytest.raises(ValueError, match="non-empty"):
        plot_joint_slices({})


def test_plot_gate_heatmap_draws_experts_by_positions():
    from cptoy.plots import plot_gate_heatmap

    W = torch.softmax(torch.randn(7, 3, generator=torch.Generator().manual_seed(0)), -1)
    W = torch.cat([W, torch.full((1, 3), float("nan"))])  # a blank last column is allowed
    fig = plot_gate_heatmap(W, list("abcdefgh"))
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.images[0].get_array().filled(np.nan), W.T.numpy())
    assert [t.get_text() for t in ax.get_xticklabels()] == list("abcdefgh")
    with pytest.raises(ValueError, match="token_labels"):
        plot_gate_heatmap(W, ["a"])
    with pytest.raises(ValueError):
        plot_gate_heatmap(torch.ones(4, 3), list("abcd"))  # rows do not sum to 1


def test_plot_entropy_curves_lines_and_uniform_level():
    from cptoy.plots import plot_entropy_curves

    fig = plot_entropy_curves({"a": [1.3, 1.2, 1.0, 0.9], "b": [1.38] * 4}, rank=4, smooth=2)
    ax = fig.axes[0]
    assert len(ax.lines) == 3  # two runs + log r
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [1.25, 1.1, 0.95])
    assert ax.lines[2].get_ydata()[0] == pytest.approx(math.log(4))
    with pytest.raises(ValueError, match="rank"):
        plot_entropy_curves({"a": [1.0]}, rank=0)
    with pytest.raises(ValueError, match="non-empty"):
        plot_entropy_curves({"a": []}, rank=2)
