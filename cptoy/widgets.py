"""Interactive panels (ipywidgets + plotly ``FigureWidget``) for the notebooks.

Each panel is one independent function returning a small object with ``.widget`` (the
ipywidgets container to display), handles to its controls and ``.figures`` (name ->
``FigureWidget``), so tests and notebooks can drive it from Python. A notebook cell that ends
with the object displays the panel.

Shared conventions (helpers below): big fonts for a projector (:data:`FONT_SIZE`), bad
arguments raise ``ValueError``/``TypeError`` at construction, and errors inside callbacks are
shown as a message in the panel (:func:`_guarded`) instead of a traceback.

ipywidgets and plotly are imported inside the functions: ``import cptoy.widgets`` is cheap.
plotly 6+ ``FigureWidget`` needs the ``anywidget`` package.
"""

from __future__ import annotations

import functools
import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from cptoy._checks import check_positive_int
from cptoy.plots import METHOD_STYLE, SweepPoint, dense_joint, joint_slice, score_fit

__all__ = ["FONT_SIZE", "CPExplorer", "cp_explorer"]

FONT_SIZE = 16  # base font size of every plotly figure here (readable on a projector)
CP_EXPLORER_WIDTH = 1150  # px: plotly's default 700 clips titles and overlaps the colour bars
MAX_ENTRIES = 300_000  # largest V**n that cp_explorer fits interactively (dense EM per rank)
_METHODS = ("em", "hals", "als")


# ====================================================================== shared small helpers
def _message_html(text: str, kind: str = "info") -> str:
    """HTML for a panel's status line; ``kind`` is "info" or "error"."""
    color = {"info": "#333", "error": "#b00020"}[kind]
    prefix = "⚠ " if kind == "error" else ""
    return (f'<div style="font-size:{FONT_SIZE + 2}px; color:{color}; padding:4px 0">'
            f"{prefix}{html.escape(text)}</div>")


def _guarded(method):
    """Run a panel callback; on any exception show it with ``self.say`` instead of raising."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the message in the widget is the point
            self.say(f"{type(exc).__name__}: {exc}", "error")
            return None

    return wrapper


# plotly's FigureWidget sends its whole front-end bundle (about 5 MB of JavaScript) as the
# anywidget ESM of *every* figure, and the browser compiles it once per figure (about 0.9 s each
# on two busy cores). anywidget gives each model 2 s to initialise; a figure that misses it still
# draws but ignores every later update. With three or more figures on a page the later ones froze
# (found by tests/test_browser.py). The figures made here send a small loader as the ESM and the
# bundle as a separate synced string; the loader compiles the bundle once per page and shares it.
_SHARED_BUNDLE_ESM = """
const KEY = "__cptoy_plotly_widget_@VERSION@";
function bundle(model) {
  if (!globalThis[KEY]) {
    const url = URL.createObjectURL(new Blob([model.get("_plotly_esm")],
                                             {type: "text/javascript"}));
    globalThis[KEY] = import(url)
      .finally(() => URL.revokeObjectURL(url))
      .catch((e) => { delete globalThis[KEY]; throw e; });
  }
  return globalThis[KEY];
}
export default async () => {
  let inner = null;  // plotly's own widget object for this model
  return {
    async initialize(ctx) {
      inner = (await bundle(ctx.model)).default();
      return inner.initialize(ctx);
    },
    render(ctx) { return inner.render(ctx); },
  };
};
"""


@functools.cache
def _figure_widget_class():
    """``go.FigureWidget`` whose JavaScript bundle is compiled once per page (see above)."""
    import plotly
    import plotly.graph_objects as go
    import traitlets
    from plotly.basewidget import BaseFigureWidget

    class SharedBundleFigureWidget(go.FigureWidget):
        _esm = _SHARED_BUNDLE_ESM.replace("@VERSION@", plotly.__version__)
        _plotly_esm = traitlets.Unicode(str(BaseFigureWidget._esm)).tag(sync=True)

    return SharedBundleFigureWidget


def _figure_widget(fig):
    """A plotly ``FigureWidget`` of ``fig`` that stays responsive with many figures on a page."""
    return _figure_widget_class()(fig)


def _sync_figures(figures) -> None:
    """Push each ``FigureWidget``'s current data and layout into its synced state.

    plotly does this only in the figure's own ``_repr_mimebundle_``; a figure displayed inside a
    VBox would otherwise render the data it was built with, not the updates made since (found by
    tests/test_browser.py: blank heatmaps until the first slider move). Call before displaying.
    """
    for fw in figures:
        fw._repr_mimebundle_()


def _check_labels(labels, V: int) -> list[str]:
    if labels is None:
        return [str(i) for i in range(V)]
    if isinstance(labels, str):
        raise TypeError("labels must be a sequence of V strings, not one string")
    labels = [str(s) for s in labels]
    if len(labels) != V:
        raise ValueError(f"labels must have one entry per token (V={V}), got {len(labels)}")
    return labels


def _base_layout(height: int) -> dict:
    return dict(height=height, font=dict(size=FONT_SIZE), margin=dict(l=70, r=30, t=70, b=60),
                template="plotly_white")


def _token_axis(labels: list[str]) -> dict:
    """A categorical-looking axis over integer positions (labels may repeat or be odd)."""
    V = len(labels)
    step = max(1, math.ceil(V / 20))
    idx = list(range(0, V, step))
    return dict(tickmode="array", tickvals=idx, ticktext=[labels[i] for i in idx])


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
class CPExplorer:
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

    def say(self, text: str, kind: str = "info") -> None:
        """Show ``text`` in the status line (``kind`` "info" or "error")."""
        self.status = ("⚠ " if kind == "error" else "") + text
        self.message.value = _message_html(text, kind)

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

    @_guarded
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
            fw.layout.annotations[1].text = f"Q({a}, {b}{cond}): {method}, rank {rank}"
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

    # ------------------------------------------------------------------ display
    def _repr_mimebundle_(self, **kwargs):
        _sync_figures(self.figures.values())
        return self.widget._repr_mimebundle_(**kwargs)


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
    labels = _check_labels(labels, V)
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
                              continuous_update=True, layout=w.Layout(width="380px"),
                              style={"description_width": "70px"})
    method_dropdown = w.Dropdown(options=list(methods), value=methods[0], description="method",
                                 layout=w.Layout(width="220px"),
                                 style={"description_width": "70px"})
    slice_options = [("tokens 1, 2", None)]
    if n >= 3:
        P1 = P.sum(dim=tuple(range(1, n)))  # (V,) first-token marginal
        order = sorted((v for v in range(V) if P1[v] > 0), key=lambda v: (-float(P1[v]), v))
        slice_options += [(f"tokens 2, 3 | x1 = {labels[v]}  ({float(P1[v]):.2f})", v)
                          for v in order]
    # index=0, not value=None: ipywidgets reads value None as "nothing selected" (blank menu)
    slice_dropdown = w.Dropdown(options=slice_options, index=0, description="slice",
                                layout=w.Layout(width="360px"), style={"description_width": "50px"})
    message = w.HTML(_message_html("fitting…"))

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
        fig.update_xaxes(_token_axis(labels), row=1, col=k + 1)
        fig.update_yaxes(_token_axis(labels), autorange="reversed", row=1, col=k + 1)
    fig.update_layout(**_base_layout(460), width=CP_EXPLORER_WIDTH)  # wide enough for 3 colour bars
    fig.update_annotations(font_size=FONT_SIZE + 2)
    slices = _figure_widget(fig)

    # --- curves: KL, TV, E vs rank; one trace per (method, metric), then the current point
    ranks = list(range(1, max_rank + 1))
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.08, subplot_titles=(
        "KL(P‖Q) [nats, log scale]", "TV(P, Q)", f"expected tokens / forward (max {n})"))
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
    fig.update_layout(**_base_layout(400), width=CP_EXPLORER_WIDTH, legend=dict(orientation="h", y=-0.3))
    fig.update_annotations(font_size=FONT_SIZE + 2)
    curves = _figure_widget(fig)

    panel = w.VBox([
        w.HBox([rank_slider, method_dropdown, slice_dropdown]),
        message,
        slices,
        curves,
    ])
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


# ====================================================================== expert_weights
# The CP heads as a mixture of experts, on text you type: the gate at every position, the
# posterior gate after the actual next token, and what each expert predicts. (Token labels and
# the text box reuse the small helpers of the decoding panels below: _tok_label, _span, ...)
__all__ += ["ExpertWeights", "expert_weights"]

_GATE_SCALE = "Blues"  # colour scale of the gate heatmaps (weights in [0, 1])
_TRUE_BG = "#a5d6a7"  # background of the actual next tokens (in the text and the tables)
_MAX_TICKS = 48  # at most this many token labels on the heatmaps' position axis


@dataclass
class ExpertWeights:
    """The panel returned by :func:`expert_weights`; display it by ending a cell with it.

    After each update, ``ids`` (T,), ``gate`` (T, r), ``posterior`` (T, r) (row t: the gate
    after conditioning on the actual token x_{t+1}; NaN at the last position, which has no next
    token) and ``top`` (the selected position's top-k tokens per expert and future position)
    hold the numbers on screen.
    """

    widget: object  # ipywidgets.VBox: the whole panel
    text_box: object  # ipywidgets.Textarea: the text (updates when it loses focus / on Python set)
    position_slider: object  # ipywidgets.IntSlider: position t, the heads predict x_{t+1..t+n}
    message: object  # ipywidgets.HTML status line (numbers, or what is wrong with the input)
    text_view: object  # ipywidgets.HTML: the tokens, t boxed, its actual next n tokens in green
    experts_view: object  # ipywidgets.HTML: table of each expert's top-k tokens per position
    figures: dict  # "gate": heatmaps w and w' (experts x positions); "position": bars at t
    model: object = field(repr=False)  # MTPModel (backbone + heads)
    tokenizer: object = field(repr=False)  # encode(str) -> ids, decode(ids) -> str
    settings: dict = field(default_factory=dict)  # top_k
    ids: list = field(default_factory=list)  # (T,) token ids of the current text
    gate: torch.Tensor | None = field(default=None, repr=False)  # (T, r) prior gate w_t
    posterior: torch.Tensor | None = field(default=None, repr=False)  # (T, r) w'_t | x_{t+1}
    top: dict = field(default_factory=dict, repr=False)  # at t: "ids", "probs" (n, r, k) top-k
    # of every factor, "factors" (n, r, V) all of them
    hidden: torch.Tensor | None = field(default=None, repr=False)  # (T, d) backbone states
    status: str = ""  # the status line as plain text
    _busy: bool = field(default=False, repr=False)

    def say(self, text: str, kind: str = "info") -> None:
        """Show ``text`` in the status line (``kind`` "info" or "error")."""
        self.status = ("⚠ " if kind == "error" else "") + text
        self.message.value = _message_html(text, kind)

    @property
    def rank(self) -> int:
        return self.model.heads.rank

    @property
    def n_future(self) -> int:
        return self.model.heads.n_future

    def set_text(self, text: str) -> None:
        """Replace the text (as typing would) and redraw."""
        self.text_box.value = text

    # ------------------------------------------------------------------ computation
    def _clear(self, why: str) -> None:
        """Empty every figure and view and show ``why`` (bad input) as an error."""
        self.ids, self.gate, self.posterior, self.hidden, self.top = [], None, None, None, {}
        fg, fp = self.figures["gate"], self.figures["position"]
        with fg.batch_update():
            for tr in fg.data[:2]:  # the heatmaps
                tr.z, tr.x, tr.text = [], [], []
            for tr in fg.data[2:]:  # the outlines of the selected position
                tr.x, tr.y = [], []
        with fp.batch_update():
            for tr in fp.data:
                tr.x, tr.y = [], []
        self.text_view.value = ""
        self.experts_view.value = ""
        self.say(why, "error")

    @torch.no_grad()
    def _compute(self, ids: list[int]) -> None:
        """Backbone states, gate and posterior gate at every position of ``ids``."""
        m = self.model
        dev = next(m.parameters()).device
        was_training = m.training
        m.eval()
        try:
            hidden = m.backbone(torch.tensor([ids], device=dev))[0]  # (T, d)
            gate = m.heads.gate_log_probs(hidden)  # (T, r) log w
            T, r = gate.shape
            post = torch.full((T, r), float("nan"), dtype=torch.float64)
            if T > 1:
                z1 = m.heads.factor_logits(hidden[:-1], n_pos=1)[:, 0]  # (T-1, r, V) position 1
                nxt = torch.tensor(ids[1:], device=dev).view(T - 1, 1, 1).expand(T - 1, r, 1)
                lq1 = (z1.gather(-1, nxt).squeeze(-1)
                       - torch.logsumexp(z1, dim=-1))  # (T-1, r) log q_{1,a}(x_{t+1})
                post[:-1] = torch.log_softmax(gate[:-1] + lq1, dim=-1).double().exp().cpu()
        finally:
            m.train(was_training)
        self.ids = list(ids)
        self.hidden = hidden
        self.gate = gate.double().exp().cpu()
        self.posterior = post

    @torch.no_grad()
    def _top_at(self, t: int) -> None:
        """Top-k tokens of every factor q_{s,a} at position t: (n, r, k) ids and probs."""
        z = self.model.heads.factor_logits(self.hidden[t])  # (n, r, V)
        probs = torch.softmax(z.double(), dim=-1)
        k = min(self.settings["top_k"], probs.shape[-1])
        vals, idx = probs.topk(k, dim=-1)  # (n, r, k)
        self.top = {"ids": idx.cpu(), "probs": vals.cpu(), "factors": probs.cpu()}

    # ------------------------------------------------------------------ callbacks
    @_guarded
    def update_text(self, change=None):
        """Re-read the text box: tokenize, run the model once, redraw (the text's callback)."""
        text = self.text_box.value
        block = self.model.backbone.config.block_size
        if not isinstance(text, str) or not text:
            self._clear("the text is empty: type (or paste) some text into the box")
            return
        ids = list(self.tokenizer.encode(text))
        if not ids:
            self._clear("the text gives no tokens: type some text into the box")
            return
        if len(ids) > block:
            self._clear(f"the text is {len(ids)} tokens long, but the model reads at most "
                        f"{block} (its block size): shorten it by {len(ids) - block} tokens")
            return
        self._compute(ids)
        T = len(ids)
        self._draw_gate()
        if change is None:  # first draw: the requested position, else the one before the last
            t = self.settings.get("position", max(T - 2, 0))
            if t > T - 1:
                raise ValueError(f"position must be in [0, {T - 1}] for this text of {T} "
                                 f"tokens, got {t}")
        else:  # new text: keep the position where it still exists
            t = min(self.position_slider.value, T - 1)
        self._busy = True  # one redraw below, not one per slider attribute change
        try:
            self.position_slider.max = max(T - 1, 0)
            self.position_slider.value = t
        finally:
            self._busy = False
        self.show_position()

    def _labels(self) -> list[str]:
        return [_tok_label(self.tokenizer, i) for i in self.ids]

    def _draw_gate(self) -> None:
        T, r = self.gate.shape
        labels = self._labels()
        step = max(1, math.ceil(T / _MAX_TICKS))
        ticks = dict(tickmode="array", tickvals=list(range(0, T, step)),
                     ticktext=[labels[i] for i in range(0, T, step)], tickangle=-60)
        nxt = [_tok_label(self.tokenizer, i) for i in self.ids[1:]] + ["(end of text)"]
        fg = self.figures["gate"]
        with fg.batch_update():
            for k, W in enumerate((self.gate, self.posterior)):
                tr = fg.data[k]
                # (r, T); None, not NaN (not valid JSON for the front end), draws a gap: the
                # posterior at the last position, which has no next token
                tr.z = [[None if math.isnan(v) else v for v in row] for row in W.T.tolist()]
                tr.x = list(range(T))
                tr.y = list(range(r))
                tr.text = [[f"t={t} after '{labels[t]}', next '{nxt[t]}', expert {a}"
                            for t in range(T)] for a in range(r)]
            for ax in ("xaxis", "xaxis2"):
                fg.layout[ax].update(ticks, range=[-0.5, T - 0.5])
            for ax in ("yaxis", "yaxis2"):
                fg.layout[ax].update(tickvals=list(range(r)), range=[r - 0.5, -0.5])
            fg.layout.width = min(1150, max(650, 160 + 22 * T))  # about 22 px per token

    @_guarded
    def show_position(self, change=None):
        """Redraw the panels of the selected position (the slider's callback)."""
        if self._busy or self.gate is None:
            return
        tok = self.tokenizer
        T, r = self.gate.shape
        n = self.n_future
        t = int(self.position_slider.value)
        self._top_at(t)
        true_next = self.ids[t + 1: t + 1 + n]  # the actual x_{t+1..}, up to n of them
        w, wp = self.gate[t], self.posterior[t]  # (r,), (r,) (NaN at the last position)
        has_next = bool(true_next)

        # --- the selected column on the heatmaps, and the bars at t
        fg = self.figures["gate"]
        with fg.batch_update():
            for tr in fg.data[2:]:  # a rectangle around column t, in both heatmaps
                tr.x = [t - 0.5, t + 0.5, t + 0.5, t - 0.5, t - 0.5]
                tr.y = [-0.5, -0.5, r - 0.5, r - 0.5, -0.5]
        fp = self.figures["position"]
        experts = list(range(r))
        with fp.batch_update():
            fp.data[0].x, fp.data[0].y = experts, w.tolist()
            fp.data[1].x = experts if has_next else []
            fp.data[1].y = wp.tolist() if has_next else []
            fp.layout.xaxis.tickvals = experts
            after = f" | xₜ₊₁ = '{_tok_label(tok, true_next[0])}'" if has_next else ""
            fp.layout.title.text = f"gate at t = {t}{after}"

        # --- the text: prefix, t boxed, the actual next n tokens in green
        spans = [_span(_tok_text(tok, i), None, "color:#555;") for i in self.ids[:t]]
        spans.append(_span(_tok_text(tok, self.ids[t]), "#fff59d",
                           "outline:2px solid #333; font-weight:bold;"))
        spans += [_span(_tok_text(tok, i), _TRUE_BG) for i in true_next]
        spans += [_span(_tok_text(tok, i), None, "color:#aaa;") for i in self.ids[t + 1 + n:]]
        self.text_view.value = (
            f'<div style="font-size:{FONT_SIZE}px">position t = {t} (boxed): the heads at t '
            f'predict the next {n} tokens; the actual ones are '
            + _span(" green ", _TRUE_BG) + "</div>" + _text_box(spans))

        # --- each expert's top-k tokens per future position
        self.experts_view.value = self._experts_table(t, true_next)

        # --- numbers
        usage = self.gate.mean(0)  # (r,) mean gate over the text's positions
        H = float(-(usage * usage.clamp_min(1e-300).log()).sum())
        msg = (f"t = {t} of {T - 1}, after '{_tok_label(tok, self.ids[t])}': top expert "
               f"{int(w.argmax())} (w = {float(w.max()):.2f})")
        if has_next:
            msg += (f"; after the actual next token '{_tok_label(tok, true_next[0])}' top expert "
                    f"{int(wp.argmax())} (w′ = {float(wp.max()):.2f})")
        if len(true_next) >= 2:
            q2 = self.top["factors"][1, :, true_next[1]]  # (r,) q_{2,a}(x_{t+2})
            msg += (f"; Q(xₜ₊₂ = '{_tok_label(tok, true_next[1])}') "
                    f"{float((w * q2).sum()):.3f} before → {float((wp * q2).sum()):.3f} "
                    f"after conditioning on xₜ₊₁")
        if r == 1:
            msg += " · rank 1: a single expert, nothing to gate or condition"
        else:
            msg += (f" · expert usage over the text: entropy {H:.2f} of max log r = "
                    f"{math.log(r):.2f} nats")
        self.say(msg)

    def _experts_table(self, t: int, true_next: list[int]) -> str:
        tok = self.tokenizer
        ids, probs = self.top["ids"], self.top["probs"]  # (n, r, k)
        n, r, k = ids.shape
        w, wp = self.gate[t], self.posterior[t]
        has_next = bool(true_next)
        best = int(wp.argmax()) if has_next else int(w.argmax())
        cell = "padding:3px 8px; border:1px solid #ccc; vertical-align:top;"
        head = (f'<th style="{cell}">expert a</th><th style="{cell}">w</th>'
                + (f'<th style="{cell}">w′ | x<sub>t+1</sub></th>' if has_next else ""))
        for s in range(n):
            true = (f"<br><span style='background:{_TRUE_BG}'>"
                    f"{html.escape(_tok_label(tok, true_next[s]))}</span>"
                    if s < len(true_next) else "")
            head += f'<th style="{cell}">q(x<sub>t+{s + 1}</sub> | a){true}</th>'
        rows = []
        for a in range(r):
            style = "font-weight:bold; background:#fffde7;" if a == best and r > 1 else ""
            tds = (f'<td style="{cell}">{a}</td><td style="{cell}">{float(w[a]):.2f}</td>'
                   + (f'<td style="{cell}">{float(wp[a]):.2f}</td>' if has_next else ""))
            for s in range(n):
                items = []
                for j in range(k):
                    v = int(ids[s, a, j])
                    hit = s < len(true_next) and v == true_next[s]
                    bg = f"background:{_TRUE_BG};" if hit else ""
                    items.append(f'<span style="{bg}">{html.escape(_tok_label(tok, v))}'
                                 f"</span>&nbsp;<span style='color:#777'>"
                                 f"{float(probs[s, a, j]):.2f}</span>")
                tds += f'<td style="{cell} font-family:monospace">' + "<br>".join(items) + "</td>"
            rows.append(f'<tr style="{style}">{tds}</tr>')
        caption = (f"each expert's top {k} tokens per future position at t = {t} "
                   "(bold: the expert the posterior gate favours; green: the actual token)")
        return (f'<div style="font-size:{FONT_SIZE}px; overflow-x:auto">'
                f'<div style="padding:4px 0">{html.escape(caption)}</div>'
                f'<table style="border-collapse:collapse"><tr>{head}</tr>{"".join(rows)}'
                "</table></div>")

    # ------------------------------------------------------------------ display
    def _repr_mimebundle_(self, **kwargs):
        _sync_figures(self.figures.values())
        return self.widget._repr_mimebundle_(**kwargs)


def expert_weights(
    model,
    tokenizer,
    text: str = "for i in range(10):\n    print(i)\n",
    top_k: int = 5,
    position: int | None = None,
) -> ExpertWeights:
    """Watch CP heads work as a mixture of experts on text you type.

    ``model``: an MTPModel (``.backbone`` and ``.heads``); ``tokenizer``: its tokenizer
    (``encode``/``decode``). The panel tokenizes ``text`` (a text box you can edit), runs the
    backbone once and shows

    * the gate ``w_t = softmax(W_g h_t)`` at every position t as a heatmap (experts x positions,
      token strings on the axis), and below it the posterior gate after conditioning on the
      actual next token, ``w'_{t,a} ∝ w_{t,a} q_{1,a}(x_{t+1})`` (the last position has no next
      token: a gap);
    * at the position chosen with the slider (initially ``position``, default the one before
      the last): the prior and posterior gate as bars, the text with the actual next n tokens
      marked, and a table of each expert's ``top_k`` most likely tokens for every future
      position ``q_{s,a}``, the actual token highlighted where an expert has it in its top k.

    Bad text (empty, or longer than the model's block) shows a message in the panel instead of
    a traceback; bad arguments raise ``TypeError``/``ValueError`` here.
    """
    if not (hasattr(model, "backbone") and hasattr(model, "heads")
            and hasattr(model.heads, "gate_log_probs")):
        raise TypeError(f"model must be an MTPModel (with .backbone and CP .heads), "
                        f"got {type(model).__name__}")
    if not (callable(getattr(tokenizer, "encode", None))
            and callable(getattr(tokenizer, "decode", None))):
        raise TypeError("tokenizer must have encode(str) -> list[int] and decode(list[int]) -> str")
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    V = model.backbone.config.vocab_size
    check_positive_int(top_k, "top_k")
    if top_k > V:
        raise ValueError(f"top_k must be at most the vocabulary size {V}, got {top_k}")
    if position is not None:
        check_positive_int(position, "position", minimum=0)
    r = model.heads.rank

    import ipywidgets as w
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    text_box = w.Textarea(value=text, continuous_update=False, rows=4,
                          description="text", placeholder="type code or text here",
                          layout=w.Layout(width="95%"),
                          style={"description_width": "60px", "font_size": f"{FONT_SIZE}px"})
    slider = w.IntSlider(value=0, min=0, max=1, step=1, description="position t",
                         continuous_update=True, layout=w.Layout(width="95%"),
                         style={"description_width": "90px"})
    message = w.HTML(_message_html("reading the text…"))
    text_view, experts_view = w.HTML(), w.HTML()

    # --- heatmaps: prior gate and posterior gate, experts x positions
    fig = make_subplots(rows=2, cols=1, shared_xaxes=False, vertical_spacing=0.22,
                        subplot_titles=("gate w_t (before the next token)",
                                        "posterior gate w′_t (after the actual next token)"))
    for k in range(2):
        fig.add_trace(go.Heatmap(
            z=[], colorscale=_GATE_SCALE, zmin=0.0, zmax=1.0, showscale=k == 0,
            colorbar=dict(len=1.0, thickness=14, title="weight"),
            hovertemplate="%{text}<br>weight %{z:.3f}<extra></extra>", xgap=1, ygap=1,
        ), row=k + 1, col=1)
        fig.update_yaxes(title_text="expert", row=k + 1, col=1)
    for k in range(2):  # outline of the selected position (a trace, so it moves with the data)
        fig.add_trace(go.Scatter(x=[], y=[], mode="lines", line=dict(color="#d62728", width=3),
                                 hoverinfo="skip", showlegend=False), row=k + 1, col=1)
    fig.update_layout(**_base_layout(260 + 2 * max(110, 28 * r)))
    fig.update_layout(margin=dict(l=70, r=30, t=60, b=90))
    fig.update_annotations(font_size=FONT_SIZE + 1)
    gate_fig = _figure_widget(fig)

    # --- bars at the selected position
    fig = go.Figure()
    fig.add_trace(go.Bar(x=[], y=[], name="w (before)", marker_color="#bbbbbb"))
    fig.add_trace(go.Bar(x=[], y=[], name="w′ (after the actual next token)",
                         marker_color=_Q_COLOR))
    fig.update_layout(**_base_layout(380), width=520, barmode="group", title="gate at t",
                      xaxis_title="expert a", yaxis_title="weight", yaxis_range=[0, 1.05],
                      legend=dict(orientation="h", y=-0.3))
    pos_fig = _figure_widget(fig)

    experts_view.layout = w.Layout(flex="1 1 auto", overflow="auto")
    panel = w.VBox([text_box, slider, message, text_view, gate_fig,
                    w.HBox([pos_fig, experts_view])])
    ex = ExpertWeights(
        widget=panel, text_box=text_box, position_slider=slider, message=message,
        text_view=text_view, experts_view=experts_view,
        figures={"gate": gate_fig, "position": pos_fig}, model=model, tokenizer=tokenizer,
        settings=dict(top_k=top_k) | ({} if position is None else {"position": position}),
    )
    text_box.observe(ex.update_text, names="value")
    slider.observe(ex.show_position, names="value")
    if position is not None:  # a position beyond the text is an argument error, not a message
        ids = tokenizer.encode(text) if text else []
        if 0 < len(ids) <= model.backbone.config.block_size and position >= len(ids):
            raise ValueError(f"position must be in [0, {len(ids) - 1}] for this text of "
                             f"{len(ids)} tokens, got {position}")
    ex.update_text()
    return ex


# ====================================================================== decoding panels
# acceptance_explorer and speculative_stepper: self-speculative decoding, live. Both are built
# on cptoy.decoding.generate and cptoy.evaluate, so what they show is what the notebooks and
# bench/ measure.
__all__ += ["AcceptanceExplorer", "acceptance_explorer", "SpeculativeStepper",
            "speculative_stepper", "ARRIVAL_COLORS"]

# background colour of a generated token, by how it arrived (stats.arrival)
ARRIVAL_COLORS = {
    "prompt": "#ffffff",  # the prompt (grey text, no background)
    "first": "#d9d9d9",  # the backbone's own token, no draft involved (the prefill / no drafts)
    "accepted": "#a5d6a7",  # a draft token accepted by the verifier
    "replacement": "#ffcc80",  # drawn from the residual after a rejected draft
    "bonus": "#90caf9",  # drawn from p after every draft was accepted
    "draft": "#e1bee7",  # kept without verification (verifier-free decoding)
}
_P_COLOR, _Q_COLOR = "#1f77b4", "#ff7f0e"  # backbone p, drafter q


def _visible(s: str, max_len: int = 12) -> str:
    """A short token label with whitespace made visible: "␣" space, "⏎" newline, "⇥" tab,
    runs of 4 or more spaces as "␣×n", cut to ``max_len`` characters with "…"."""
    import re

    runs = [r if r[0] != " " else ("␣" * len(r) if len(r) < 4 else f"␣×{len(r)}")
            for r in re.findall(r" +|[^ ]+", s)]
    s = "".join(runs).replace("\n", "⏎").replace("\t", "⇥") or "∅"
    return s if len(s) <= max_len else s[: max_len - 1] + "…"


def _tok_text(tokenizer, i: int) -> str:
    try:
        return tokenizer.decode([int(i)])
    except Exception:  # noqa: BLE001 - display only
        return f"<{int(i)}>"


def _tok_label(tokenizer, i: int) -> str:
    return _visible(_tok_text(tokenizer, i))


def _span(text: str, bg: str | None = None, style: str = "") -> str:
    css = (f"background:{bg};" if bg else "") + style
    return f'<span style="{css}">{html.escape(text)}</span>'


def _text_box(spans: list[str]) -> str:
    return ('<div style="font-family:monospace; white-space:pre-wrap; font-size:'
            f'{FONT_SIZE}px; line-height:1.5; border:1px solid #ccc; padding:8px; '
            'max-height:360px; overflow-y:auto">' + "".join(spans) + "</div>")


def _legend(kinds) -> str:
    return " ".join(_span(f" {k} ", ARRIVAL_COLORS[k], "padding:2px 4px; border-radius:3px;")
                    for k in kinds)


def _check_tokenizer(tokenizer):
    if not callable(getattr(tokenizer, "decode", None)):
        raise TypeError("tokenizer must have decode(list[int]) -> str")
    return tokenizer


def _check_prompt_list(prompts, V: int) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor) or (isinstance(prompts, list) and prompts
                                             and isinstance(prompts[0], int)):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of prompts (lists of token ids)")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, torch.Tensor):
            p = p.tolist()
        if (not isinstance(p, (list, tuple)) or not p
                or any(isinstance(t, bool) or not isinstance(t, int) for t in p)):
            raise ValueError(f"prompts[{i}] must be a non-empty list of token ids")
        if any(not 0 <= t < V for t in p):
            raise ValueError(f"prompts[{i}] holds ids outside [0, {V})")
        out.append(list(p))
    return out


# ---------------------------------------------------------------------- acceptance_explorer
@dataclass
class AcceptanceExplorer:
    """The panel returned by :func:`acceptance_explorer`."""

    widget: object  # ipywidgets.VBox: the whole panel
    model_dropdown: object  # ipywidgets.Dropdown over the models' names
    strategy_dropdown: object  # ipywidgets.Dropdown: a key of EXPLORER_DRAFTERS
    temperature_slider: object  # ipywidgets.FloatSlider, 0 = greedy
    n_slider: object  # ipywidgets.IntSlider: drafts per step k (tokens per forward <= k + 1)
    prompt_dropdown: object  # ipywidgets.Dropdown over the prompts (value = index)
    message: object  # ipywidgets.HTML status line
    text: object  # ipywidgets.HTML: the generated text coloured by arrival
    figures: dict  # "tokens": tokens per step histogram; "acceptance": acceptance by position
    models: dict = field(repr=False)  # name -> MTPModel
    tokenizer: object = field(repr=False)
    prompts: list = field(repr=False)  # list of token-id lists
    heldout_ids: torch.Tensor | None = field(default=None, repr=False)  # for teacher forcing
    settings: dict = field(default_factory=dict)  # max_new_tokens, seed, tf_positions
    tf_cache: dict = field(default_factory=dict, repr=False)  # (name, T, k, routing) -> TFResult
    generation: object = field(default=None, repr=False)  # the last Generation
    status: str = ""
    _busy: bool = field(default=False, repr=False)

    def say(self, text: str, kind: str = "info") -> None:
        self.status = ("⚠ " if kind == "error" else "") + text
        self.message.value = _message_html(text, kind)

    def teacher_forced(self, name: str, temperature: float, k: int, routing: str = "mixture"):
        """Teacher-forced acceptance (cptoy.evaluate) for this model, T, k and routing, cached."""
        from cptoy.evaluate import teacher_forced_acceptance

        key = (name, float(temperature), int(k), routing)
        if key not in self.tf_cache:
            self.tf_cache[key] = teacher_forced_acceptance(
                self.models[name], self.heldout_ids, n_draft=k, temperature=temperature,
                max_positions=self.settings["tf_positions"], seed=0, routing=routing)
        return self.tf_cache[key]

    def _sync_n_slider(self) -> None:
        m = self.models[self.model_dropdown.value]
        kmax = max(1, getattr(m, "n_future", 2) - 1)
        self._busy = True
        try:
            if self.n_slider.value > kmax:
                self.n_slider.value = kmax
            self.n_slider.max = kmax
        finally:
            self._busy = False

    @_guarded
    def update(self, change=None):
        """Decode with the current settings and redraw (the controls' callback)."""
        if self._busy:
            return
        from cptoy.decoding import generate
        from cptoy.evaluate import repetition

        if change is not None and getattr(change, "owner", None) is self.model_dropdown:
            self._sync_n_slider()
        elif isinstance(change, dict) and change.get("owner") is self.model_dropdown:
            self._sync_n_slider()
        name = self.model_dropdown.value
        model = self.models[name]
        drafter = self.strategy_dropdown.value
        strategy, routing = EXPLORER_DRAFTERS[drafter]
        T = float(self.temperature_slider.value)
        k = int(self.n_slider.value)
        prompt = self.prompts[self.prompt_dropdown.value]
        if strategy == "self-spec" and getattr(model, "n_future", 1) < 2:
            raise ValueError(f"model {name!r} has no draft heads (n_future < 2)")
        g = generate(model, prompt, self.settings["max_new_tokens"], temperature=T,
                     strategy=strategy, seed=self.settings["seed"], n_draft=k, routing=routing)
        self.generation = g
        s = g.stats

        # --- coloured text
        spans = [_span(self.tokenizer.decode(prompt), None, "color:#888;")]
        spans += [_span(_tok_text(self.tokenizer, t), ARRIVAL_COLORS.get(a))
                  for t, a in zip(g.tokens, s.arrival, strict=True)]
        self.text.value = (
            f'<div style="font-size:{FONT_SIZE}px">'
            + _legend(("first", "accepted", "replacement", "bonus")) + "</div>"
            + _text_box(spans))

        # --- teacher-forced reference (self-spec with held-out ids only)
        tf = None
        if strategy == "self-spec" and self.heldout_ids is not None:
            tf = self.teacher_forced(name, T, k, routing)

        # --- histogram of tokens per step (prefill excluded)
        steps = s.gained_per_forward[1:]
        xs = list(range(1, k + 2))
        frac = [steps.count(x) / len(steps) if steps else 0.0 for x in xs]
        fw = self.figures["tokens"]
        with fw.batch_update():
            fw.data[0].x, fw.data[0].y = xs, frac
            fw.data[0].text = [str(steps.count(x)) for x in xs]
            if tf is not None:
                pre = [1.0] + list(tf.spec_prefix) + [0.0]
                fw.data[1].x, fw.data[1].y = xs, [pre[i] - pre[i + 1] for i in range(k + 1)]
            else:
                fw.data[1].x, fw.data[1].y = [], []
            fw.layout.xaxis.tickvals = xs
            fw.layout.title.text = f"tokens per step ({len(steps)} steps, prefill excluded)"

        # --- acceptance by position
        pos = list(range(2, k + 2))
        fa = self.figures["acceptance"]
        with fa.batch_update():
            fa.data[0].x = pos
            fa.data[0].y = [None if math.isnan(a) else a for a in s.acceptance_by_position]
            fa.data[0].text = [f"{a}/{t}" for a, t in zip(s.accepted_by_position,
                                                          s.attempted_by_position, strict=True)]
            if tf is not None:
                fa.data[1].x = pos
                fa.data[1].y = [None if math.isnan(a) else a for a in tf.spec_acceptance]
                fa.data[2].x = pos
                fa.data[2].y = [None if math.isnan(a) else a for a in tf.greedy_acceptance]
            else:
                for tr in fa.data[1:]:
                    tr.x, tr.y = [], []
            fa.layout.xaxis.tickvals = pos

        rep = repetition(g.tokens)
        msg = (f"{name}, {drafter}, T={T:g}, k={k}: measured {s.tokens_per_step:.2f} tokens per "
               f"step ({s.tokens_per_forward:.2f} per forward with the prefill, {s.n_steps} "
               f"steps); repeated 4-grams {rep:.2f}")
        if tf is not None:
            msg += (f" | teacher-forced on {tf.n_positions} held-out positions: "
                    f"{tf.spec_tokens_per_forward:.2f} (speculative, T={T:g}), "
                    f"{tf.greedy_tokens_per_forward:.2f} (greedy match)")
        elif strategy == "self-spec":
            msg += " | no held-out ids given: no teacher-forced reference"
        self.say(msg)

    def _repr_mimebundle_(self, **kwargs):
        _sync_figures(self.figures.values())
        return self.widget._repr_mimebundle_(**kwargs)


EXPLORER_DRAFTERS = {  # the explorer's drafter menu -> (strategy, routing) of generate()
    "self-spec": ("self-spec", "mixture"),
    "self-spec, one expert": ("self-spec", "expert"),
    "lookup": ("lookup", "mixture"),
}


def acceptance_explorer(
    models: dict,
    tokenizer,
    prompts,
    heldout_ids=None,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    n_draft: int | None = None,
    seed: int = 0,
    tf_positions: int = 256,
    prompt_labels: Sequence[str] | None = None,
) -> AcceptanceExplorer:
    """A panel to watch self-speculative decoding accept and reject drafts.

    models: name -> MTPModel (e.g. ``{"rank 1": m1, "rank 8": m8}``), sharing ``tokenizer``.
    prompts: list of token-id lists (held-out prompts, e.g. ``cptoy.evaluate.heldout_prompts``).
    heldout_ids: (T,) held-out ids for the teacher-forced reference (None: none shown), computed
        with ``cptoy.evaluate.teacher_forced_acceptance`` on ``tf_positions`` positions.
    Controls: model, drafter (self-spec with the CP mixture as q, self-spec with one expert
    drawn from the posterior gate, or prompt lookup), temperature (0 = greedy), drafts per
    step k, prompt. Shows the generated text coloured by how each token arrived (first token,
    accepted draft, replacement, bonus), the histogram of tokens per step next to the
    teacher-forced prediction, acceptance by draft position measured and teacher-forced, and the
    rates in the status line. Errors while decoding appear in the panel, not as tracebacks.
    """
    if not isinstance(models, dict) or not models:
        raise ValueError("models must be a non-empty dict name -> MTPModel")
    for nm, m in models.items():
        if not hasattr(m, "backbone"):
            raise TypeError(f"models[{nm!r}] must be an MTPModel (with .backbone), "
                            f"got {type(m).__name__}")
    first = next(iter(models.values()))
    V = first.backbone.config.vocab_size
    if any(m.backbone.config.vocab_size != V for m in models.values()):
        raise ValueError("all models must share one vocabulary (one tokenizer)")
    tokenizer = _check_tokenizer(tokenizer)
    prompts = _check_prompt_list(prompts, V)
    check_positive_int(max_new_tokens, "max_new_tokens")
    check_positive_int(tf_positions, "tf_positions")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not 0 <= temperature <= 2:
        raise ValueError(f"temperature must be a number in [0, 2], got {temperature!r}")
    kmax = max(1, getattr(first, "n_future", 2) - 1)
    k0 = kmax if n_draft is None else check_positive_int(n_draft, "n_draft")
    if k0 > kmax:
        raise ValueError(f"n_draft must be in [1, {kmax}] for the first model, got {n_draft}")
    if heldout_ids is not None:
        from cptoy._checks import check_token_ids

        heldout_ids = check_token_ids(heldout_ids, V, "heldout_ids")
    if prompt_labels is None:
        prompt_labels = [repr(tokenizer.decode(p)[-40:]) for p in prompts]
    elif len(prompt_labels) != len(prompts):
        raise ValueError(f"prompt_labels must have one entry per prompt ({len(prompts)}), "
                         f"got {len(prompt_labels)}")

    import ipywidgets as w
    import plotly.graph_objects as go

    sty = {"description_width": "110px"}
    model_dd = w.Dropdown(options=list(models), value=next(iter(models)), description="model",
                          style=sty, layout=w.Layout(width="300px"))
    strat_dd = w.Dropdown(options=list(EXPLORER_DRAFTERS), value="self-spec",
                          description="drafter", style=sty, layout=w.Layout(width="300px"))
    temp = w.FloatSlider(value=float(temperature), min=0.0, max=2.0, step=0.05,
                         description="temperature", continuous_update=False, style=sty,
                         layout=w.Layout(width="380px"))
    n_sl = w.IntSlider(value=k0, min=1, max=kmax, step=1, description="drafts k",
                       continuous_update=False, style=sty, layout=w.Layout(width="380px"))
    prompt_dd = w.Dropdown(options=[(lab, i) for i, lab in enumerate(prompt_labels)], value=0,
                           description="prompt", style=sty, layout=w.Layout(width="680px"))
    message = w.HTML(_message_html("decoding…"))
    text = w.HTML()

    fig = go.Figure()
    fig.add_trace(go.Bar(x=[], y=[], name="measured", marker_color=_P_COLOR,
                         textposition="outside"))
    fig.add_trace(go.Scatter(x=[], y=[], name="teacher-forced", mode="markers",
                             marker=dict(size=16, symbol="diamond", color=_Q_COLOR)))
    fig.update_layout(**_base_layout(380), width=600, title="tokens per step",
                      xaxis_title="tokens gained in one forward", yaxis_title="fraction of steps",
                      yaxis_range=[0, 1.1], legend=dict(orientation="h", y=-0.25))
    tokens_fig = _figure_widget(fig)

    fig = go.Figure()
    fig.add_trace(go.Bar(x=[], y=[], name="measured (accepted / tried)", marker_color=_P_COLOR,
                         textposition="outside"))
    fig.add_trace(go.Scatter(x=[], y=[], name="teacher-forced, speculative", mode="lines+markers",
                             marker=dict(size=12), line=dict(color=_Q_COLOR, width=3)))
    fig.add_trace(go.Scatter(x=[], y=[], name="teacher-forced, greedy match",
                             mode="lines+markers", marker=dict(size=10),
                             line=dict(color="#555", width=2, dash="dash")))
    fig.update_layout(**_base_layout(380), width=600, title="acceptance by draft position",
                      xaxis_title="draft position j", yaxis_title="Pr(accept | earlier accepted)",
                      yaxis_range=[0, 1.1], legend=dict(orientation="h", y=-0.25))
    acc_fig = _figure_widget(fig)

    panel = w.VBox([
        w.HBox([model_dd, strat_dd]), w.HBox([temp, n_sl]), prompt_dd, message, text,
        w.HBox([tokens_fig, acc_fig]),
    ])
    ex = AcceptanceExplorer(
        widget=panel, model_dropdown=model_dd, strategy_dropdown=strat_dd,
        temperature_slider=temp, n_slider=n_sl, prompt_dropdown=prompt_dd, message=message,
        text=text, figures={"tokens": tokens_fig, "acceptance": acc_fig}, models=dict(models),
        tokenizer=tokenizer, prompts=prompts, heldout_ids=heldout_ids,
        settings=dict(max_new_tokens=max_new_tokens, seed=seed, tf_positions=tf_positions),
    )
    for c in (model_dd, strat_dd, temp, n_sl, prompt_dd):
        c.observe(ex.update, names="value")
    ex.update()
    return ex


# ---------------------------------------------------------------------- speculative_stepper
@dataclass
class SpeculativeStepper:
    """The panel returned by :func:`speculative_stepper`."""

    widget: object  # ipywidgets.VBox
    prev_button: object  # ipywidgets.Button "◀ previous"
    next_button: object  # ipywidgets.Button "next ▶"
    step_slider: object  # ipywidgets.IntSlider over the steps
    temperature_slider: object  # ipywidgets.FloatSlider; a change re-decodes
    seed_box: object  # ipywidgets.IntText; a change re-decodes
    routing_dropdown: object  # ipywidgets.Dropdown: q = CP mixture or one expert (rank > 1)
    message: object  # ipywidgets.HTML status line
    text: object  # ipywidgets.HTML: context and this step's tokens
    figures: dict  # "gate": prior vs posterior gate; "pq": p and q at each drafted position
    model: object = field(repr=False)
    tokenizer: object = field(repr=False)
    prompt: list = field(repr=False)
    settings: dict = field(default_factory=dict)  # max_new_tokens, n_draft, top
    generation: object = field(default=None, repr=False)  # Generation with .steps
    status: str = ""
    _busy: bool = field(default=False, repr=False)

    def say(self, text: str, kind: str = "info") -> None:
        self.status = ("⚠ " if kind == "error" else "") + text
        self.message.value = _message_html(text, kind)

    @property
    def steps(self) -> list:
        return self.generation.steps if self.generation is not None else []

    @_guarded
    def regenerate(self, change=None):
        """Decode again with the current temperature and seed (record_steps=True)."""
        if self._busy:
            return
        from cptoy.decoding import generate

        seed = self.seed_box.value
        g = generate(self.model, self.prompt, self.settings["max_new_tokens"],
                     temperature=float(self.temperature_slider.value), strategy="self-spec",
                     seed=int(seed), n_draft=self.settings["n_draft"], record_steps=True,
                     routing=self.routing_dropdown.value)
        self.generation = g
        self._busy = True
        try:
            self.step_slider.max = max(0, len(g.steps) - 1)
            self.step_slider.value = 0
        finally:
            self._busy = False
        self.show()

    def next(self, _button=None) -> None:
        if self.step_slider.value < self.step_slider.max:
            self.step_slider.value += 1  # triggers show

    def previous(self, _button=None) -> None:
        if self.step_slider.value > 0:
            self.step_slider.value -= 1

    @_guarded
    def show(self, change=None):
        """Draw step ``step_slider.value``."""
        if self._busy:
            return
        steps = self.steps
        if not steps:
            self.say("no verification steps: max_new_tokens leaves no room to draft", "error")
            return
        i = int(self.step_slider.value)
        st = steps[i]
        tok = self.tokenizer
        g = self.generation
        T = float(self.temperature_slider.value)
        kmax = self.settings["n_draft"]

        # --- text: prompt, earlier tokens, then this step
        before = st.context_length - len(self.prompt)  # new tokens cached before x_1
        done = g.tokens[:before]
        spans = [_span(tok.decode(self.prompt), None, "color:#888;")]
        spans += [_span(_tok_text(tok, t), None, "color:#444;") for t in done]
        box = "outline:2px solid #333; padding:0 1px;"
        spans.append(_span(_tok_text(tok, st.x1), ARRIVAL_COLORS[st.x1_arrival],
                           box + "font-weight:bold;"))
        for j, d in enumerate(st.drafts[: len(st.accepted)]):
            if st.accepted[j]:
                spans.append(_span(_tok_text(tok, d), ARRIVAL_COLORS["accepted"], box))
            else:
                spans.append(_span(_tok_text(tok, d), "#ef9a9a",
                                   box + "text-decoration:line-through;"))
        if st.final_token is not None:
            spans.append(_span(_tok_text(tok, st.final_token), ARRIVAL_COLORS[st.final_kind],
                               box + "font-weight:bold;"))
        unseen = st.drafts[len(st.accepted):]
        if unseen:
            spans.append(_span("   ⟨drafts not reached: "
                               + " ".join(_tok_label(tok, d) for d in unseen) + "⟩", None,
                               f"color:#999; font-style:italic; font-size:{FONT_SIZE - 2}px;"))
        self.text.value = (
            f'<div style="font-size:{FONT_SIZE}px">x₁ (bold) · '
            + _legend(("accepted",)) + " " + _span(" rejected ", "#ef9a9a") + " "
            + _legend(("replacement", "bonus")) + "</div>"
            + _text_box(spans))

        # --- gate before / after conditioning on x_1
        fg = self.figures["gate"]
        prior = st.gate_prior or []
        post = st.gate_posterior or []
        r = len(prior)
        experts = list(range(r))
        with fg.batch_update():
            fg.data[0].x, fg.data[0].y = experts, prior
            fg.data[1].x, fg.data[1].y = experts, post
            fg.data[2].x = [st.expert] if st.expert is not None and r else []
            fg.data[2].y = [post[st.expert] + 0.06] if st.expert is not None and r else []
            fg.layout.xaxis.tickvals = experts
            one = self.routing_dropdown.value == "expert" and r > 1
            fg.layout.title.text = (f"gate over {r} experts: before / after x₁ = "
                                    f"'{_tok_label(tok, st.x1)}'"
                                    + (" (rank 1: nothing to condition)" if r == 1 else "")
                                    + (f"; q = expert {st.expert}'s factors" if one else ""))

        # --- p vs q at each drafted position
        fq = self.figures["pq"]
        top = self.settings["top"]
        with fq.batch_update():
            for j in range(kmax):
                tp, tq = fq.data[2 * j], fq.data[2 * j + 1]
                ax = fq.layout[f"xaxis{'' if j == 0 else j + 1}"]
                ann = fq.layout.annotations[j]
                if j >= len(st.drafts):
                    tp.x = tp.y = tq.x = tq.y = []
                    ann.text = f"d{j + 2}: not drafted"
                    continue
                p, q = st.p[j], st.q[j]  # (V,) float64
                d = st.drafts[j]
                score = torch.maximum(p, q)
                score[d] = float("inf")  # the draft is always shown
                ids = score.topk(min(top, score.numel())).indices.tolist()
                labels = [_tok_label(tok, t) for t in ids]
                xs = list(range(len(ids)))
                tp.x, tp.y = xs, p[ids].tolist()
                tq.x, tq.y = xs, q[ids].tolist()
                widths = [3 if t == d else 0 for t in ids]
                tp.marker.line.width = widths
                tq.marker.line.width = widths
                ax.tickvals, ax.ticktext = xs, labels
                if j < len(st.accepted):
                    ok = st.accepted[j]
                    rule = "argmax p" if T == 0 else "min(1, p/q)"
                    verdict = "✓ accepted" if ok else (
                        f"✗ rejected → '{_tok_label(tok, st.final_token)}'")
                    ann.text = (f"d{j + 2} = '{_tok_label(tok, d)}'<br>{rule} = "
                                f"{st.accept_prob[j]:.2f} {verdict}")
                else:
                    ann.text = f"d{j + 2} = '{_tok_label(tok, d)}': not reached"

        n_acc = sum(st.accepted)
        final = ("" if st.final_token is None else
                 f", {st.final_kind} '{_tok_label(tok, st.final_token)}'")
        self.say(f"step {i + 1} of {len(steps)}: x₁ = '{_tok_label(tok, st.x1)}' "
                 f"({st.x1_arrival}), {len(st.drafts)} drafts, {n_acc} accepted{final} → "
                 f"{len(st.emitted)} tokens from this forward. Whole run: "
                 f"{g.stats.tokens_per_step:.2f} tokens per step, T={T:g}")

    def _repr_mimebundle_(self, **kwargs):
        _sync_figures(self.figures.values())
        return self.widget._repr_mimebundle_(**kwargs)


def speculative_stepper(
    model,
    tokenizer,
    prompt,
    temperature: float = 0.8,
    seed: int = 0,
    max_new_tokens: int = 32,
    n_draft: int | None = None,
    top: int = 8,
    routing: str = "mixture",
) -> SpeculativeStepper:
    """Step through self-speculative decoding one verification forward at a time.

    Decodes ``prompt`` (token ids) with ``generate(..., strategy="self-spec",
    record_steps=True)`` and shows, for the chosen step: the text with x_1, the drafts
    (accepted / rejected / not reached) and the replacement or bonus token; the heads' gate
    weights before and after conditioning on x_1 (the posterior gate; the sampled expert is
    marked); and, at every drafted position, the backbone's p and the drafter's q over the
    ``top`` most likely tokens (the draft outlined) with the acceptance probability
    ``min(1, p/q)`` and the decision. Buttons and a slider move between steps; temperature,
    seed and the drafter's q re-decode: ``routing`` "mixture" (q = the CP's mixture conditional)
    or "expert" (one expert drawn from the posterior drafts and is q; see
    ``cptoy.decoding``); the dropdown is disabled for rank 1, where both are the same. At
    temperature 0, p and q are shown untempered and acceptance is ``d == argmax p``.
    """
    from cptoy.decoding import check_routing

    if not hasattr(model, "backbone") or getattr(model, "n_future", 1) < 2:
        raise TypeError("model must be an MTPModel with n_future >= 2")
    tokenizer = _check_tokenizer(tokenizer)
    V = model.backbone.config.vocab_size
    prompt = _check_prompt_list([prompt], V)[0]
    check_positive_int(max_new_tokens, "max_new_tokens")
    check_positive_int(top, "top")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not 0 <= temperature <= 2:
        raise ValueError(f"temperature must be a number in [0, 2], got {temperature!r}")
    kmax = model.n_future - 1
    k = kmax if n_draft is None else check_positive_int(n_draft, "n_draft")
    if k > kmax:
        raise ValueError(f"n_draft must be in [1, {kmax}], got {n_draft}")
    check_routing(routing, model)

    import ipywidgets as w
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    sty = {"description_width": "100px"}
    prev_b = w.Button(description="◀ previous", layout=w.Layout(width="130px"))
    next_b = w.Button(description="next ▶", button_style="primary",
                      layout=w.Layout(width="130px"))
    step_sl = w.IntSlider(value=0, min=0, max=0, description="step", style=sty,
                          layout=w.Layout(width="420px"))
    temp = w.FloatSlider(value=float(temperature), min=0.0, max=2.0, step=0.05,
                         description="temperature", continuous_update=False, style=sty,
                         layout=w.Layout(width="380px"))
    seed_box = w.IntText(value=seed, description="seed", style=sty,
                         layout=w.Layout(width="200px"))
    routing_dd = w.Dropdown(options=[("CP mixture", "mixture"), ("one expert", "expert")],
                            value=routing, description="drafter q", style=sty,
                            disabled=getattr(model, "rank", 1) == 1,
                            layout=w.Layout(width="300px"))
    message = w.HTML(_message_html("decoding…"))
    text = w.HTML()

    fig = go.Figure()
    fig.add_trace(go.Bar(x=[], y=[], name="prior w (before x₁)", marker_color="#bbbbbb"))
    fig.add_trace(go.Bar(x=[], y=[], name="posterior w′ (after x₁)", marker_color=_Q_COLOR))
    fig.add_trace(go.Scatter(x=[], y=[], mode="markers", name="sampled expert",
                             marker=dict(symbol="triangle-down", size=18, color="black")))
    fig.update_layout(**_base_layout(340), barmode="group", title="gate",
                      xaxis_title="expert a", yaxis_title="weight", yaxis_range=[0, 1.15],
                      legend=dict(orientation="h", y=-0.3))
    gate_fig = _figure_widget(fig)

    fig = make_subplots(rows=1, cols=k, subplot_titles=[f"d{j + 2}" for j in range(k)],
                        horizontal_spacing=0.06)
    for j in range(k):
        fig.add_trace(go.Bar(x=[], y=[], name="p (backbone)", marker_color=_P_COLOR,
                             marker_line_color="black", showlegend=j == 0, legendgroup="p"),
                      row=1, col=j + 1)
        fig.add_trace(go.Bar(x=[], y=[], name="q (CP heads)", marker_color=_Q_COLOR,
                             marker_line_color="black", showlegend=j == 0, legendgroup="q"),
                      row=1, col=j + 1)
        fig.update_yaxes(range=[0, 1.05], row=1, col=j + 1)
        fig.update_xaxes(tickangle=-45, row=1, col=j + 1)
    fig.update_layout(**_base_layout(440), barmode="group",
                      legend=dict(orientation="h", y=-0.4))
    fig.update_layout(margin=dict(t=100))
    fig.update_annotations(font_size=FONT_SIZE - 1)
    pq_fig = _figure_widget(fig)

    panel = w.VBox([w.HBox([prev_b, next_b, step_sl]), w.HBox([temp, seed_box, routing_dd]),
                    message, text, gate_fig, pq_fig])
    sp = SpeculativeStepper(
        widget=panel, prev_button=prev_b, next_button=next_b, step_slider=step_sl,
        temperature_slider=temp, seed_box=seed_box, routing_dropdown=routing_dd,
        message=message, text=text,
        figures={"gate": gate_fig, "pq": pq_fig}, model=model, tokenizer=tokenizer,
        prompt=prompt, settings=dict(max_new_tokens=max_new_tokens, n_draft=k, top=top),
    )
    prev_b.on_click(sp.previous)
    next_b.on_click(sp.next)
    step_sl.observe(sp.show, names="value")
    temp.observe(sp.regenerate, names="value")
    seed_box.observe(sp.regenerate, names="value")
    routing_dd.observe(sp.regenerate, names="value")
    sp.regenerate()
    return sp
