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
from cptoy.plots import METHOD_STYLE, SweepPoint, _dense, joint_slice, score_fit

__all__ = ["FONT_SIZE", "CPExplorer", "cp_explorer"]

FONT_SIZE = 16  # base font size of every plotly figure here (readable on a projector)
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
    P = _dense(P, "P")
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
                        horizontal_spacing=0.09)
    for k in range(3):
        fig.add_trace(go.Heatmap(
            z=[[0.0] * V] * V, text=hover, hovertemplate="%{text}: %{z:.4f}<extra></extra>",
            colorscale="RdBu_r" if k == 2 else "Blues", zmin=-1 if k == 2 else 0, zmax=1,
            showscale=k > 0,
            colorbar=dict(x=fig.layout[f"xaxis{k + 1}"].domain[1] + 0.005, len=0.9, thickness=14),
        ), row=1, col=k + 1)
        fig.update_xaxes(_token_axis(labels), row=1, col=k + 1)
        fig.update_yaxes(_token_axis(labels), autorange="reversed", row=1, col=k + 1)
    fig.update_layout(**_base_layout(460))
    fig.update_annotations(font_size=FONT_SIZE + 2)
    slices = go.FigureWidget(fig)

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
    fig.update_layout(**_base_layout(400), legend=dict(orientation="h", y=-0.3))
    fig.update_annotations(font_size=FONT_SIZE + 2)
    curves = go.FigureWidget(fig)

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
    strategy_dropdown: object  # ipywidgets.Dropdown: "self-spec" or "lookup"
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
    tf_cache: dict = field(default_factory=dict, repr=False)  # (name, T, k) -> TFResult
    generation: object = field(default=None, repr=False)  # the last Generation
    status: str = ""
    _busy: bool = field(default=False, repr=False)

    def say(self, text: str, kind: str = "info") -> None:
        self.status = ("⚠ " if kind == "error" else "") + text
        self.message.value = _message_html(text, kind)

    def teacher_forced(self, name: str, temperature: float, k: int):
        """Teacher-forced acceptance (cptoy.evaluate) for this model, T and k, cached."""
        from cptoy.evaluate import teacher_forced_acceptance

        key = (name, float(temperature), int(k))
        if key not in self.tf_cache:
            self.tf_cache[key] = teacher_forced_acceptance(
                self.models[name], self.heldout_ids, n_draft=k, temperature=temperature,
                max_positions=self.settings["tf_positions"], seed=0)
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
        strategy = self.strategy_dropdown.value
        T = float(self.temperature_slider.value)
        k = int(self.n_slider.value)
        prompt = self.prompts[self.prompt_dropdown.value]
        if strategy == "self-spec" and getattr(model, "n_future", 1) < 2:
            raise ValueError(f"model {name!r} has no draft heads (n_future < 2)")
        g = generate(model, prompt, self.settings["max_new_tokens"], temperature=T,
                     strategy=strategy, seed=self.settings["seed"], n_draft=k)
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
            tf = self.teacher_forced(name, T, k)

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
        msg = (f"{name}, {strategy}, T={T:g}, k={k}: measured {s.tokens_per_step:.2f} tokens per "
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
        return self.widget._repr_mimebundle_(**kwargs)


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
    Controls: model, drafter (self-spec or prompt lookup), temperature (0 = greedy), drafts per
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
        from cptoy.evaluate import _ids_tensor

        heldout_ids = _ids_tensor(heldout_ids, V, "heldout_ids")
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
    strat_dd = w.Dropdown(options=["self-spec", "lookup"], value="self-spec",
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
    tokens_fig = go.FigureWidget(fig)

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
    acc_fig = go.FigureWidget(fig)

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
                     seed=int(seed), n_draft=self.settings["n_draft"], record_steps=True)
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
            fg.layout.title.text = (f"gate over {r} experts: before / after x₁ = "
                                    f"'{_tok_label(tok, st.x1)}'"
                                    + (" (rank 1: nothing to condition)" if r == 1 else ""))

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
) -> SpeculativeStepper:
    """Step through self-speculative decoding one verification forward at a time.

    Decodes ``prompt`` (token ids) with ``generate(..., strategy="self-spec",
    record_steps=True)`` and shows, for the chosen step: the text with x_1, the drafts
    (accepted / rejected / not reached) and the replacement or bonus token; the heads' gate
    weights before and after conditioning on x_1 (the posterior gate; the sampled expert is
    marked); and, at every drafted position, the backbone's p and the drafter's q over the
    ``top`` most likely tokens (the draft outlined) with the acceptance probability
    ``min(1, p/q)`` and the decision. Buttons and a slider move between steps; temperature and
    seed re-decode. At temperature 0, p and q are shown untempered and acceptance is
    ``d == argmax p``.
    """
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
    gate_fig = go.FigureWidget(fig)

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
    pq_fig = go.FigureWidget(fig)

    panel = w.VBox([w.HBox([prev_b, next_b, step_sl]), w.HBox([temp, seed_box]), message, text,
                    gate_fig, pq_fig])
    sp = SpeculativeStepper(
        widget=panel, prev_button=prev_b, next_button=next_b, step_slider=step_sl,
        temperature_slider=temp, seed_box=seed_box, message=message, text=text,
        figures={"gate": gate_fig, "pq": pq_fig}, model=model, tokenizer=tokenizer,
        prompt=prompt, settings=dict(max_new_tokens=max_new_tokens, n_draft=k, top=top),
    )
    prev_b.on_click(sp.previous)
    next_b.on_click(sp.next)
    step_sl.observe(sp.show, names="value")
    temp.observe(sp.regenerate, names="value")
    seed_box.observe(sp.regenerate, names="value")
    sp.regenerate()
    return sp
