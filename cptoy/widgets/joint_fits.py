"""cp_explorer: rank-r CP fits of a joint, interactively (slices of P, Q, P - Q; KL, TV and
expected tokens per forward versus rank)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from cptoy._checks import check_positive_int
from cptoy.plots import METHOD_STYLE, SweepPoint, dense_joint, joint_slice, score_fit
from cptoy.widgets.base import (
    Panel,
    base_layout,
    check_labels,
    control_layout,
    figure_widget,
    guarded,
    legend_below,
    message_html,
    panel_box,
    row,
    token_axis,
)

__all__ = ["MAX_ENTRIES", "CPExplorer", "cp_explorer"]

MAX_ENTRIES = 300_000  # largest V**n that cp_explorer fits interactively (dense EM per rank)
_METHODS = ("em", "hals", "als")



# ====================================================================== cp_explorer
KL_FLOOR = 1e-6  # KL is drawn on a log axis; exact fits (KL ~ 0) are drawn at this floor


def _shown(value: float, attr: str):
    """A metric as drawn: None (a gap) for a failed fit, KL floored for the log axis."""
    if not math.isfinite(value):
        return None
    return max(value, KL_FLOOR) if attr == "kl" else value


@dataclass
class _FitRecord:
    """Cached result of one (method, rank) fit."""

    point: SweepPoint  # KL, TV, tokens per forward, seconds
    Q: torch.Tensor | None  # (V,)*n dense fitted joint; None when the fit failed
    error: str = ""  # why the fit failed, if it did


@dataclass
class CPExplorer(Panel):
    """The panel returned by :func:`cp_explorer`; display it by ending a cell with it."""

    widget: object  # ipywidgets.VBox: the whole panel
    rank_slider: object  # ipywidgets.IntSlider, 1..max_rank
    method_dropdown: object  # ipywidgets.Dropdown over the fitting methods
    slice_dropdown: object  # ipywidgets.Dropdown: which 2-token slice the heatmaps show
    message: object  # ipywidgets.HTML: status line (numbers, or the error of a callback)
    figures: dict  # "slices": FigureWidget (P, Q, P-Q); "curves": FigureWidget (KL, TV, E vs rank)
    P: torch.Tensor = field(repr=False)  # (V,)*n the joint being explored
    labels: list = field(repr=False)  # (V,) token labels
    fit_kwargs: dict = field(default_factory=dict)  # n_iter, restarts, seed, tol for fit_cp
    cache: dict = field(default_factory=dict, repr=False)  # (method, rank) -> _FitRecord
    status: str = ""  # the status line as plain text (what ``message`` shows)

    # ------------------------------------------------------------------ fitting (cached)
    @property
    def max_rank(self) -> int:
        return self.rank_slider.max

    def record(self, method: str, rank: int) -> _FitRecord:
        """The fit for (method, rank), computed on first use and cached."""
        from cptoy.cp import fit_cp

        key = (method, rank)
        if key not in self.cache:
            try:
                fit = fit_cp(self.P, rank, method=method, **self.fit_kwargs)
                Q = fit.dist.to(torch.float64).to_tensor()
                Q = Q / Q.sum()  # float64 round-off of the CP product only (|sum - 1| ~ 1e-15)
                self.cache[key] = _FitRecord(score_fit(self.P, fit, rank=rank), Q)
            except (RuntimeError, ValueError) as exc:
                nan = float("nan")
                pt = SweepPoint(method, rank, nan, nan, nan, 0.0, 0, self.fit_kwargs["restarts"])
                self.cache[key] = _FitRecord(pt, None, f"{type(exc).__name__}: {exc}")
        return self.cache[key]

    def sweep(self, method: str) -> list[_FitRecord]:
        """All ranks 1..max_rank for one method (what the curves need)."""
        return [self.record(method, r) for r in range(1, self.max_rank + 1)]

    # ------------------------------------------------------------------ callbacks
    def _prefix(self):
        v = self.slice_dropdown.value
        return None if v is None else [v]

    @guarded
    def update(self, change=None):
        """Redraw everything for the current rank, method and slice (the widgets' callback)."""
        method, rank = self.method_dropdown.value, self.rank_slider.value
        if any((method, r) not in self.cache for r in range(1, self.max_rank + 1)):
            self.say(f"fitting {method} for ranks 1..{self.max_rank}…")  # shown while it runs
        rec = self.record(method, rank)
        self._update_curves(method)
        prefix = self._prefix()
        Sp = joint_slice(self.P, (0, 1), prefix).numpy()  # (V, V)
        fw = self.figures["slices"]
        import numpy as np

        if rec.Q is None:
            Sq = np.full_like(Sp, np.nan)
        else:
            Sq = joint_slice(rec.Q, (0, 1), prefix).numpy()
        zmax = float(max(Sp.max(), np.nanmax(Sq) if rec.Q is not None else 0.0)) or 1.0
        D = Sp - Sq
        lim = float(np.nanmax(np.abs(D))) if rec.Q is not None else 1.0
        with fw.batch_update():
            fw.data[0].z, fw.data[0].zmax = Sp, zmax
            fw.data[1].z, fw.data[1].zmax = Sq, zmax
            fw.data[2].z, fw.data[2].zmin, fw.data[2].zmax = D, -max(lim, 1e-12), max(lim, 1e-12)
            a, b = ("x2", "x3") if prefix else ("x1", "x2")
            cond = f" | x1={self.labels[prefix[0]]}" if prefix else ""
            fw.layout.annotations[0].text = f"P({a}, {b}{cond})"
            fw.layout.annotations[1].text = f"Q({a}, {b}{cond})<br>{method}, rank {rank}"
            fw.layout.annotations[2].text = "P − Q"
            for k in (1, 2, 3):
                fw.layout[f"xaxis{'' if k == 1 else k}"].title.text = b
            fw.layout["yaxis"].title.text = a
        if rec.Q is None:
            self.say(f"{method} rank {rank} failed: {rec.error}", "error")
            return
        p = rec.point
        n = self.P.dim()
        neg = f", {p.n_negative} negative ALS entries clipped" if p.n_negative else ""
        self.say(
            f"{method} rank {rank}: KL(P‖Q) = {p.kl:.4f} nats, TV = {p.tv:.3f}, expected tokens "
            f"per forward = {p.tokens_per_forward:.3f} (max {n}), fit {p.seconds:.2f} s{neg}")

    def _update_curves(self, current: str) -> None:
        fw = self.figures["curves"]
        methods = list(self.method_dropdown.options)
        ranks = list(range(1, self.max_rank + 1))
        with fw.batch_update():
            for k, m in enumerate(methods):
                computed = all((m, r) in self.cache for r in ranks)
                if m == current and not computed:
                    self.sweep(m)
                    computed = True
                pts = [self.cache[(m, r)].point for r in ranks] if computed else []
                for j, attr in enumerate(("kl", "tv", "tokens_per_forward")):
                    tr = fw.data[3 * k + j]
                    tr.x = ranks if computed else []
                    tr.y = [_shown(getattr(p, attr), attr) for p in pts]
                    tr.line.width = 4 if m == current else 1.5
                    tr.opacity = 1.0 if m == current else 0.45
            cur = self.cache[(current, self.rank_slider.value)].point
            base = 3 * len(methods)
            for j, attr in enumerate(("kl", "tv", "tokens_per_forward")):
                fw.data[base + j].x = [cur.rank]
                fw.data[base + j].y = [_shown(getattr(cur, attr), attr)]


def cp_explorer(
    P,
    labels: Sequence[str] | None = None,
    max_rank: int = 8,
    methods: Sequence[str] = _METHODS,
    n_iter: int = 300,
    seed: int = 0,
    rank: int = 1,
    restarts: int = 1,
    tol: float = 1e-9,
) -> CPExplorer:
    """An interactive panel to explore rank-r CP fits of a joint ``P`` (V,)*n, n >= 2.

    Controls: a rank slider (1..``max_rank``), a method dropdown (``methods``, a subset of
    "em", "hals", "als") and a slice dropdown (tokens 1, 2; or, for n >= 3, tokens 2, 3 given
    each possible first token, which shows that only rank > 1 can condition). Figures: the
    2-token slice of P, of the fit Q and of P - Q (heatmaps), and KL, TV and exact expected
    tokens per forward versus rank for every method computed so far (current method bold).

    Fits are computed lazily and cached: the first time a method is shown, all its ranks are
    fitted (``fit_cp(P, r, method, n_iter, tol, restarts, seed)``), after which moving the
    slider only redraws. ``rank`` is the initial slider value.

    Raises ``ValueError`` (or ``TypeError``) at construction for an invalid joint, labels of the
    wrong length, rank outside 1..max_rank, unknown or repeated methods, n < 2 or a joint too
    large to fit interactively (V**n > MAX_ENTRIES).
    """
    P = dense_joint(P, "P")
    n, V = P.dim(), P.shape[0]
    if n < 2:
        raise ValueError(f"P must be a joint of at least 2 tokens to show a 2-token slice, "
                         f"got n={n}")
    if P.numel() > MAX_ENTRIES:
        raise ValueError(f"P has V**n = {V}**{n} = {P.numel()} entries; cp_explorer fits "
                         f"interactively up to {MAX_ENTRIES} (restrict the vocabulary, e.g. top_k)")
    labels = check_labels(labels, V)
    check_positive_int(max_rank, "max_rank")
    check_positive_int(rank, "rank")
    if rank > max_rank:
        raise ValueError(f"rank must be in [1, max_rank={max_rank}], got {rank}")
    check_positive_int(n_iter, "n_iter")
    check_positive_int(restarts, "restarts")
    if isinstance(methods, str):
        methods = (methods,)
    methods = tuple(methods)
    if not methods or any(m not in _METHODS for m in methods) or len(set(methods)) != len(methods):
        raise ValueError(f"methods must be distinct entries of {_METHODS}, got {methods}")

    import ipywidgets as w
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    # --- controls
    rank_slider = w.IntSlider(value=rank, min=1, max=max_rank, step=1, description="rank r",
                              continuous_update=True, layout=control_layout("360px"),
                              style={"description_width": "70px"})
    method_dropdown = w.Dropdown(options=list(methods), value=methods[0], description="method",
                                 layout=control_layout("220px"),
                                 style={"description_width": "70px"})
    slice_options = [("tokens 1, 2", None)]
    if n >= 3:
        P1 = P.sum(dim=tuple(range(1, n)))  # (V,) first-token marginal
        order = sorted((v for v in range(V) if P1[v] > 0), key=lambda v: (-float(P1[v]), v))
        slice_options += [(f"tokens 2, 3 | x1 = {labels[v]}  ({float(P1[v]):.2f})", v)
                          for v in order]
    # index=0, not value=None: ipywidgets reads value None as "nothing selected" (blank menu)
    slice_dropdown = w.Dropdown(options=slice_options, index=0, description="slice",
                                layout=control_layout("400px"),
                                style={"description_width": "50px"})
    message = w.HTML(message_html("fitting…"))

    # --- heatmaps: P, Q, P - Q
    hover = [[f"{labels[i]} {labels[j]}" for j in range(V)] for i in range(V)]
    fig = make_subplots(rows=1, cols=3, subplot_titles=("P", "Q", "P − Q"),
                        horizontal_spacing=0.12)
    for k in range(3):
        fig.add_trace(go.Heatmap(
            z=[[0.0] * V] * V, text=hover, hovertemplate="%{text}: %{z:.4f}<extra></extra>",
            colorscale="RdBu_r" if k == 2 else "Blues", zmin=-1 if k == 2 else 0, zmax=1,
            showscale=k > 0,
            colorbar=dict(x=fig.layout[f"xaxis{k + 1}"].domain[1] + 0.005, len=0.9, thickness=14),
        ), row=1, col=k + 1)
        fig.update_xaxes(token_axis(labels), row=1, col=k + 1)
        fig.update_yaxes(token_axis(labels), autorange="reversed", row=1, col=k + 1)
    fig.update_layout(**base_layout(400))
    fig.update_layout(margin=dict(l=60, r=50, t=80, b=50))
    slices = figure_widget(fig)

    # --- curves: KL, TV, E vs rank; one trace per (method, metric), then the current point
    ranks = list(range(1, max_rank + 1))
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.08, subplot_titles=(
        "KL(P‖Q), nats (log)", "TV(P, Q)", f"tokens / forward (max {n})"))
    for m in methods:
        st = METHOD_STYLE[m]
        for j in range(3):
            fig.add_trace(go.Scatter(x=[], y=[], mode="lines+markers", name=st["label"],
                                     legendgroup=m, showlegend=j == 0,
                                     line=dict(color=st["color"]), marker=dict(size=9)),
                          row=1, col=j + 1)
    for j in range(3):
        fig.add_trace(go.Scatter(x=[], y=[], mode="markers", name="current", showlegend=j == 0,
                                 marker=dict(size=18, color="rgba(0,0,0,0)",
                                             line=dict(width=3, color="black"))),
                      row=1, col=j + 1)
        fig.update_xaxes(title_text="rank r", tickvals=ranks, row=1, col=j + 1)
    fig.add_hline(y=n, line_dash="dash", line_color="black", row=1, col=3)
    fig.update_yaxes(type="log", dtick=1, exponentformat="power", row=1, col=1)  # per decade
    fig.update_yaxes(range=[0, 1.02], row=1, col=2)
    fig.update_yaxes(range=[0.95, n + 0.1], row=1, col=3)
    fig.update_layout(**base_layout(360))
    fig.update_layout(margin=dict(l=60, r=30, t=50, b=120), legend=legend_below(360, 50, 120))
    curves = figure_widget(fig)

    panel = panel_box([row([rank_slider, method_dropdown, slice_dropdown]), message, slices,
                       curves])
    ex = CPExplorer(
        widget=panel, rank_slider=rank_slider, method_dropdown=method_dropdown,
        slice_dropdown=slice_dropdown, message=message,
        figures={"slices": slices, "curves": curves}, P=P, labels=labels,
        fit_kwargs=dict(n_iter=n_iter, restarts=restarts, seed=seed, tol=tol),
    )
    for control in (rank_slider, method_dropdown, slice_dropdown):
        control.observe(ex.update, names="value")
    ex.update()
    return ex
