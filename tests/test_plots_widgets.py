"""cptoy.plots (matplotlib figures), cptoy.figures (make_figures) and cptoy.widgets (cp_explorer)."""

import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from cptoy.cp import CPDist, fit_cp
from cptoy.figures import FIGURES, make_figures
from cptoy.joint import HMM, product_of_marginals
from cptoy.plots import (
    SweepPoint,
    joint_slice,
    plot_em_history,
    plot_experts,
    plot_gate,
    plot_joint_comparison,
    plot_joint_slice,
    plot_rank_sweep,
    rank_sweep,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def P():
    return HMM(3, 5, stickiness=0.9, seed=1).joint(3)  # (5, 5, 5)


def _images(fig):
    return [im for ax in fig.axes for im in ax.get_images()]


# ---------------------------------------------------------------------- joint_slice
def test_joint_slice_marginal_conditional_and_order(P):
    S = joint_slice(P)
    assert S.shape == (5, 5)
    torch.testing.assert_close(S, P.sum(2))
    torch.testing.assert_close(joint_slice(P, (2, 0)), P.sum(1).T)
    C = joint_slice(P, (0, 1), prefix=[2])
    torch.testing.assert_close(C, P[2] / P[2].sum())
    dist = fit_cp(P, 2, n_iter=20).dist  # a CPDist is densified
    torch.testing.assert_close(joint_slice(dist), dist.to_tensor().sum(2))


@pytest.mark.parametrize("positions", [(0, 0), (0, 3), (0,), (1, 2, 0)])
def test_joint_slice_rejects_bad_positions(P, positions):
    with pytest.raises(ValueError, match="positions"):
        joint_slice(P, positions)


def test_joint_slice_rejects_invalid_joint(P):
    with pytest.raises(ValueError, match="sum to 1"):
        joint_slice(P * 2)
    with pytest.raises(ValueError, match="prefix"):
        joint_slice(P, (0, 1), prefix=[1, 2])  # leaves one axis: no 2-token slice


# ---------------------------------------------------------------------- plot functions
def test_plot_joint_slice_draws_the_slice_with_labels(P):
    from matplotlib.figure import Figure

    labels = list("abcde")
    fig = plot_joint_slice(P, labels=labels, prefix=[0])
    assert isinstance(fig, Figure)
    (im,) = _images(fig)
    np.testing.assert_allclose(im.get_array(), joint_slice(P, prefix=[0]).numpy())
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == labels
    assert "x1=a" in ax.get_title()
    # drawing into a given axes returns that axes' figure
    fig2 = Figure()
    ax2 = fig2.add_subplot()
    assert plot_joint_slice(P, ax=ax2, title="t") is fig2 and ax2.get_title() == "t"
    with pytest.raises(ValueError, match="labels"):
        plot_joint_slice(P, labels=["a"])


def test_plot_joint_comparison_has_P_Q_and_difference(P):
    Q = product_of_marginals(P)
    fig = plot_joint_comparison(P, Q)
    ims = _images(fig)
    assert len(ims) == 3
    np.testing.assert_allclose(ims[0].get_array(), P.sum(2).numpy())
    np.testing.assert_allclose(ims[1].get_array(), Q.sum(2).numpy())
    np.testing.assert_allclose(ims[2].get_array(), (P - Q).sum(2).numpy())
    assert ims[2].get_cmap().name == "RdBu_r"
    assert ims[2].get_clim()[0] == -ims[2].get_clim()[1]  # symmetric around 0


def test_rank_sweep_and_its_plot(P):
    pts = rank_sweep(P, ranks=(1, 3), methods=("em", "hals"), n_iter=100)
    assert [(p.method, p.rank) for p in pts] == [("em", 1), ("em", 3), ("hals", 1), ("hals", 3)]
    em1, em3 = pts[0], pts[1]
    assert em3.kl < em1.kl and em3.kl < 1e-3  # the HMM joint (3 states, n=3) is exactly rank 3
    assert 1.0 <= em1.tokens_per_forward < em3.tokens_per_forward <= 3.0 + 1e-9
    failed = SweepPoint("als", 2, float("nan"), float("nan"), float("nan"), 0.0, 0, 1)
    fig = plot_rank_sweep(pts + [failed.asdict()], n=3)
    ax_kl, ax_e = fig.axes[:2]
    lines = {ln.get_label(): ln for ln in ax_e.get_lines()}
    em = [ln for k, ln in lines.items() if k.startswith("EM")][0]
    np.testing.assert_allclose(em.get_ydata(), [em1.tokens_per_forward, em3.tokens_per_forward])
    assert any("failed" in k for k in lines)  # the NaN fit is reported, not dropped silently
    assert any(np.allclose(ln.get_ydata(), 3) for ln in ax_e.get_lines())  # ceiling line
    assert ax_kl.get_yscale() == "log"
    with pytest.raises(ValueError, match="empty"):
        plot_rank_sweep([])


def test_plot_em_history_lines_and_final_levels(P):
    em = fit_cp(P, 2, n_iter=30)
    hals = fit_cp(P, 2, method="hals", n_iter=30)
    fig = plot_em_history({"em": em, "hals": hals})
    ax = fig.axes[0]
    ln_em, ln_hals = ax.get_lines()
    np.testing.assert_allclose(ln_em.get_ydata(), em.history)
    np.testing.assert_allclose(ln_hals.get_ydata(), [hals.kl, hals.kl])  # horizontal level
    assert len(plot_em_history(em).axes[0].get_lines()) == 1
    with pytest.raises(TypeError, match="CPFit"):
        plot_em_history({"x": 1.0})


def test_plot_gate_bars_and_validation():
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    fig = plot_gate({"prior": w, "posterior": torch.tensor([0.1, 0.1, 0.8])})
    bars = fig.axes[0].patches
    assert len(bars) == 6
    assert [round(b.get_height(), 6) for b in bars[:3]] == [0.5, 0.3, 0.2]
    dist = CPDist.from_probs(w, torch.full((2, 3, 4), 0.25, dtype=torch.float64))
    assert len(plot_gate(dist).axes[0].patches) == 3
    with pytest.raises(ValueError, match="sum to 1"):
        plot_gate(torch.tensor([0.5, 0.6]))
    with pytest.raises(ValueError, match="same rank"):
        plot_gate({"a": w, "b": torch.tensor([0.5, 0.5])})


def test_plot_experts_one_panel_per_position(P):
    dist = fit_cp(P, 3, n_iter=20).dist
    fig = plot_experts(dist, labels=list("abcde"))
    ims = _images(fig)
    assert len(ims) == 3
    np.testing.assert_allclose(ims[1].get_array(), dist.factors[1].numpy())


def _small_texts(fig) -> list[str]:
    """Visible texts of ``fig`` smaller than 14 px on screen (fig.dpi px per inch)."""
    from matplotlib.text import Text

    fig.draw_without_rendering()
    return [f"{t.get_text()!r} {t.get_fontsize()} pt" for t in fig.findobj(Text)
            if t.get_visible() and t.get_text().strip()
            and t.get_fontsize() * fig.dpi / 72 < 14]


def test_figures_fit_a_notebook_and_read_on_a_projector(P):
    """At most MAX_WIDTH wide (960 px: shown unscaled in JupyterLab beside its file browser)
    and no text under 14 px, annotated heatmaps and bar labels included."""
    from cptoy.plots import MAX_WIDTH, plot_gate_heatmap, plot_joint_slices

    Q = product_of_marginals(P)
    dist = fit_cp(P, 3, n_iter=20).dist
    w = torch.tensor([[0.5, 0.3, 0.2]] * 70, dtype=torch.float64)
    figs = {
        "comparison": plot_joint_comparison(P, Q, annotate=True),
        "sweep": plot_rank_sweep(rank_sweep(P, ranks=(1, 2), methods=("em",), n_iter=20), n=3),
        "experts": plot_experts(dist, labels=list("abcde")),
        "gate": plot_gate({"prior": w[0], "posterior": torch.tensor([0.1, 0.1, 0.8])}),
        "slices": plot_joint_slices({"P": P, "Q": Q, "P again": P}, labels=list("abcde"),
                                    annotate=True),
        "gate heatmap": plot_gate_heatmap(w, [f"t{i}" for i in range(70)]),
    }
    for name, fig in figs.items():
        assert fig.get_figwidth() <= MAX_WIDTH + 1e-9, (name, fig.get_figwidth())
        assert not _small_texts(fig), (name, _small_texts(fig)[:5])


# ---------------------------------------------------------------------- make_figures
def test_make_figures_writes_every_png_deterministically(tmp_path):
    a = make_figures(tmp_path / "a")
    assert [p.name for p in a] == [f"{k}.png" for k in FIGURES] and len(a) >= 5
    for p in a:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
        width = int.from_bytes(p.read_bytes()[16:20], "big")  # the PNG header's IHDR width
        assert width <= 960, (p.name, width)  # shown unscaled in a notebook's output area
    # a second run (fresh inputs, fits and figures) gives the same bytes; a cheap subset keeps
    # the test fast, and the code figure covers the corpus joint and EM fits
    subset = ["hmm_rank1_vs_true", "code_joint_fits"]
    b = make_figures(tmp_path / "b", names=subset)
    for pb in b:
        sha = hashlib.sha256(pb.read_bytes()).hexdigest()
        assert sha == hashlib.sha256((tmp_path / "a" / pb.name).read_bytes()).hexdigest(), pb.name
    with pytest.raises(ValueError, match="names"):
        make_figures(tmp_path / "c", names=["nope"])


# ---------------------------------------------------------------------- cp_explorer
@pytest.fixture(scope="module")
def explorer(P):
    from cptoy.widgets import cp_explorer

    return cp_explorer(P, labels=list("abcde"), max_rank=3, methods=("em", "hals"), n_iter=60)


def _z(ex, k):
    return np.array(ex.figures["slices"].data[k].z, dtype=float)


def test_cp_explorer_slider_updates_figures(explorer, P):
    ex = explorer
    ex.method_dropdown.value = "em"
    ex.slice_dropdown.value = None
    ex.rank_slider.value = 1
    np.testing.assert_allclose(_z(ex, 0), P.sum(2).numpy())
    np.testing.assert_allclose(_z(ex, 1), product_of_marginals(P).sum(2).numpy(), atol=1e-6)
    z1 = _z(ex, 1)
    ex.rank_slider.value = 3
    z3 = _z(ex, 1)
    assert np.abs(z3 - z1).max() > 1e-3  # the Q heatmap changed
    np.testing.assert_allclose(z3, P.sum(2).numpy(), atol=1e-3)  # rank 3 is exact here
    np.testing.assert_allclose(_z(ex, 2), _z(ex, 0) - z3)
    assert "rank 3" in ex.message.value and "KL" in ex.message.value
    cur = ex.figures["curves"].data[-1]  # the current point on the E panel
    assert list(cur.x) == [3]
    assert cur.y[0] == pytest.approx(ex.cache[("em", 3)].point.tokens_per_forward)


def test_cp_explorer_method_and_slice_update(explorer, P):
    ex = explorer
    ex.rank_slider.value = 2
    ex.method_dropdown.value = "em"
    z_em = _z(ex, 1)
    curves = ex.figures["curves"]
    assert len(curves.data[3].x) == 0  # hals (traces 3..5) not fitted yet: lazy
    ex.method_dropdown.value = "hals"
    assert np.abs(_z(ex, 1) - z_em).max() > 0
    assert "hals rank 2" in ex.message.value
    assert list(curves.data[3].x) == [1, 2, 3]  # hals curves now filled
    assert ("hals", 3) in ex.cache
    ex.slice_dropdown.value = 0  # condition on x1 = "a"
    np.testing.assert_allclose(_z(ex, 0), (P[0] / P[0].sum()).numpy())
    assert "x1=a" in ex.figures["slices"].layout.annotations[0].text
    ex.slice_dropdown.value = None


def test_cp_explorer_shows_callback_errors_in_the_panel(P, monkeypatch):
    import cptoy.widgets as widgets
    import cptoy.widgets.joint_fits

    ex = widgets.cp_explorer(P, max_rank=2, methods=("em",), n_iter=20)

    def boom(*args, **kwargs):
        raise KeyError("slice exploded")

    monkeypatch.setattr(cptoy.widgets.joint_fits, "joint_slice", boom)
    ex.rank_slider.value = 2  # must not raise
    assert "slice exploded" in ex.message.value and "⚠" in ex.message.value
    assert ex.status.startswith("⚠ KeyError")
    monkeypatch.undo()

    def failing_fit(*args, **kwargs):
        raise RuntimeError("all restarts failed (NaN factors)")

    import cptoy.cp

    ex2 = widgets.cp_explorer(P, max_rank=2, methods=("em", "als"), n_iter=20)
    monkeypatch.setattr(cptoy.cp, "fit_cp", failing_fit)
    ex2.method_dropdown.value = "als"
    assert "failed" in ex2.message.value and "NaN" in ex2.message.value
    assert np.isnan(_z(ex2, 1)).all()  # Q is blank, not stale


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rank=5, max_rank=4), "rank"),
        (dict(max_rank=0), "max_rank"),
        (dict(methods=("em", "svd")), "methods"),
        (dict(methods=("em", "em")), "methods"),
        (dict(labels=["a", "b"]), "labels"),
    ],
)
def test_cp_explorer_rejects_bad_arguments(P, kwargs, match):
    from cptoy.widgets import cp_explorer

    with pytest.raises(ValueError, match=match):
        cp_explorer(P, **kwargs)


def test_cp_explorer_rejects_bad_joints(P):
    from cptoy.widgets import cp_explorer

    with pytest.raises(ValueError, match="sum to 1"):
        cp_explorer(P * 1.5)
    with pytest.raises(ValueError, match="negative"):
        cp_explorer(P - P.max())
    with pytest.raises(ValueError, match="NaN"):
        cp_explorer(torch.full((3, 3), float("nan")))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        cp_explorer(torch.full((4,), 0.25))
    with pytest.raises(ValueError, match="entries"):
        cp_explorer(torch.full((70, 70, 70), 70.0**-3, dtype=torch.float64))


def test_display_hook_returns_a_widget_bundle(explorer):
    bundle = explorer._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle


# ---------------------------------------------------------------------- import weight
def test_import_cptoy_plots_and_widgets_stay_light():
    code = (
        "import sys, cptoy, cptoy.plots, cptoy.widgets;"
        "heavy = [m for m in ('plotly', 'ipywidgets', 'tensorly', 'matplotlib')"
        " if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
