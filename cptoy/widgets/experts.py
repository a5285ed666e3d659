"""expert_weights: the CP heads as a mixture of experts, on text you type.

The gate at every position, the posterior gate after the actual next token, and what each
expert predicts at a chosen position.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field

import torch

from cptoy._checks import check_positive_int
from cptoy.widgets.base import (
    FONT_SIZE,
    Q_COLOR,
    Panel,
    base_layout,
    cell,
    figure_widget,
    guarded,
    legend_below,
    message_html,
    panel_box,
    row,
    span,
    text_box,
    tok_label,
    tok_text,
    visible,
)

__all__ = ["ExpertWeights", "expert_weights"]

_GATE_SCALE = "Blues"  # colour scale of the gate heatmaps (weights in [0, 1])
_TRUE_BG = "#a5d6a7"  # background of the actual next tokens (in the text and the tables)
_MAX_TICKS = 32  # at most this many token labels on the heatmaps' position axis
MAX_ROWS = 4  # the experts table lists this many experts, those the gate weighs most
TABLE_HEIGHT = 280  # px; the table scrolls beyond it (long tokens, large top_k)


def _sub(k: int) -> str:
    """``k`` in subscript digits (an HTML <sub> would be under 14 px)."""
    return "".join("₀₁₂₃₄₅₆₇₈₉"[int(c)] for c in str(k))


@dataclass
class ExpertWeights(Panel):
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
            for ax in ("xaxis", "xaxis2"):  # no token labels of the old text
                fg.layout[ax].update(tickvals=[], ticktext=[])
        with fp.batch_update():
            for tr in fp.data:
                tr.x, tr.y = [], []
            fp.layout.title.text = "gate at t"
            fp.layout.xaxis.tickvals = []
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
    @guarded
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
        return [tok_label(self.tokenizer, i) for i in self.ids]

    def _draw_gate(self) -> None:
        T, r = self.gate.shape
        labels = self._labels()
        step = max(1, math.ceil(T / _MAX_TICKS))
        ticks = dict(tickmode="array", tickvals=list(range(0, T, step)),
                     ticktext=[visible(tok_text(self.tokenizer, self.ids[i]), 8)
                               for i in range(0, T, step)], tickangle=-90)
        nxt = [tok_label(self.tokenizer, i) for i in self.ids[1:]] + ["(end of text)"]
        fg = self.figures["gate"]
        with fg.batch_update():
            for k, W in enumerate((self.gate, self.posterior)):
                tr = fg.data[k]
                # (r, T); None, not NaN (not valid JSON for the front end), draws a gap: the
                # posterior at the last position, which has no next token
                tr.z = [[None if math.isnan(v) else v for v in vals] for vals in W.T.tolist()]
                tr.x = list(range(T))
                tr.y = list(range(r))
                tr.text = [[f"t={t} after '{labels[t]}', next '{nxt[t]}', expert {a}"
                            for t in range(T)] for a in range(r)]
            for ax in ("xaxis", "xaxis2"):
                fg.layout[ax].update(ticks, range=[-0.5, T - 0.5])
            fg.layout.xaxis.showticklabels = False  # shared: the labels sit under the second
            ystep = max(1, math.ceil(r / 4))  # at most 4 expert labels: no overlap
            for ax in ("yaxis", "yaxis2"):
                fg.layout[ax].update(tickvals=list(range(0, r, ystep)), range=[r - 0.5, -0.5])

    @guarded
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
            after = f" | xₜ₊₁ = '{tok_label(tok, true_next[0])}'" if has_next else ""
            fp.layout.title.text = f"gate at t = {t}{after}"

        # --- the text: prefix, t boxed, the actual next n tokens in green
        spans = [span(tok_text(tok, i), None, "color:#555;") for i in self.ids[:t]]
        spans.append(span(tok_text(tok, self.ids[t]), "#fff59d",
                           "outline:2px solid #333; font-weight:bold;"))
        spans += [span(tok_text(tok, i), _TRUE_BG) for i in true_next]
        spans += [span(tok_text(tok, i), None, "color:#aaa;") for i in self.ids[t + 1 + n:]]
        self.text_view.value = (
            f'<div style="font-size:{FONT_SIZE}px">position t = {t} (boxed): the heads at t '
            f'predict the next {n} tokens; the actual ones are '
            + span(" green ", _TRUE_BG) + "</div>" + text_box(spans, max_height=76))

        # --- each expert's top-k tokens per future position
        self.experts_view.value = self._experts_table(t, true_next)

        # --- numbers
        usage = self.gate.mean(0)  # (r,) mean gate over the text's positions
        H = float(-(usage * usage.clamp_min(1e-300).log()).sum())
        msg = (f"t = {t} of {T - 1}, after '{tok_label(tok, self.ids[t])}': top expert "
               f"{int(w.argmax())} (w = {float(w.max()):.2f})")
        if has_next:
            msg += (f"; after the actual next token '{tok_label(tok, true_next[0])}' top expert "
                    f"{int(wp.argmax())} (w′ = {float(wp.max()):.2f})")
        if len(true_next) >= 2:
            q2 = self.top["factors"][1, :, true_next[1]]  # (r,) q_{2,a}(x_{t+2})
            msg += (f"; Q(xₜ₊₂ = '{tok_label(tok, true_next[1])}') "
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
        weight = wp if has_next else w  # (r,) the rows: the experts it weighs most
        shown = sorted(range(r), key=lambda a: (-float(weight[a]), a))[:MAX_ROWS]
        best = shown[0]
        cell = "padding:1px 5px; border:1px solid #ccc; vertical-align:top;"
        head = (f'<th style="{cell}">expert a</th><th style="{cell}">w</th>'
                + (f'<th style="{cell}">w′ | xₜ₊₁</th>' if has_next else ""))
        for s in range(n):
            true = (f"<br><span style='background:{_TRUE_BG}'>"
                    f"{html.escape(tok_label(tok, true_next[s]))}</span>"
                    if s < len(true_next) else "")
            head += f'<th style="{cell}">q(xₜ₊{_sub(s + 1)} | a){true}</th>'
        rows = []
        for a in shown:
            style = "font-weight:bold; background:#fffde7;" if a == best and r > 1 else ""
            tds = (f'<td style="{cell}">{a}</td><td style="{cell}">{float(w[a]):.2f}</td>'
                   + (f'<td style="{cell}">{float(wp[a]):.2f}</td>' if has_next else ""))
            for s in range(n):
                items = []
                for j in range(k):
                    v = int(ids[s, a, j])
                    hit = s < len(true_next) and v == true_next[s]
                    bg = f"background:{_TRUE_BG};" if hit else ""
                    items.append(f'<span style="white-space:nowrap"><span style="{bg}">'
                                 f"{html.escape(tok_label(tok, v))}</span>&nbsp;"
                                 f"<span style='color:#555'>{float(probs[s, a, j]):.2f}"
                                 "</span></span>")
                tds += f'<td style="{cell} font-family:monospace">' + " ".join(items) + "</td>"
            rows.append(f'<tr style="{style}">{tds}</tr>')
        which = "all experts" if len(shown) == r else f"the {len(shown)} of {r} experts weighed most"
        caption = f"top {k} tokens of {which} at t = {t} (green: the actual token)"
        return (f'<div style="font-size:{FONT_SIZE}px; line-height:1.35; max-width:100%">'
                f'<div style="padding:2px 0">{html.escape(caption)}</div>'
                f'<div style="overflow:auto; max-height:{TABLE_HEIGHT}px">'
                '<table style="border-collapse:collapse; width:100%">'
                f'<tr>{head}</tr>{"".join(rows)}</table></div></div>')


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
      marked, and a table of the ``top_k`` most likely tokens of every future position
      ``q_{s,a}`` for the MAX_ROWS experts the gate weighs most (posterior where there is a next
      token), the actual token highlighted where an expert has it in its top k.

    The panel fits one projector screen: heatmaps as wide as the output area, the text and the
    table scroll when long.

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

    box = w.Textarea(value=text, continuous_update=False, rows=2,
                     description="text", placeholder="type code or text here",
                     layout=w.Layout(width="auto"), style={"description_width": "60px"})
    slider = w.IntSlider(value=0, min=0, max=1, step=1, description="position t",
                         continuous_update=True, layout=w.Layout(width="auto"),
                         style={"description_width": "90px"})
    message = w.HTML(message_html("reading the text…"))
    text_view, experts_view = w.HTML(), w.HTML()

    # --- heatmaps: prior gate and posterior gate, experts x positions; token labels below
    band = max(48, 11 * r)  # px per heatmap
    height = 170 + 2 * band
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True,
                        vertical_spacing=40 / (height - 150),
                        subplot_titles=("gate w_t (before the next token)",
                                        "posterior w′_t (after the actual next token)"))
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
    fig.update_layout(**base_layout(height))
    fig.update_layout(margin=dict(l=70, r=20, t=36, b=100))
    gate_fig = figure_widget(fig)

    # --- bars at the selected position
    fig = go.Figure()
    fig.add_trace(go.Bar(x=[], y=[], name="w (before)", marker_color="#bbbbbb"))
    fig.add_trace(go.Bar(x=[], y=[], name="w′ (after xₜ₊₁)", marker_color=Q_COLOR))
    fig.update_layout(**base_layout(height))
    fig.update_layout(barmode="group", title="gate at t", xaxis_title="expert a",
                      yaxis_title="weight", yaxis_range=[0, 1.05],
                      margin=dict(l=70, r=20, t=50, b=130),
                      legend=legend_below(height, 50, 130, gap=60))
    pos_fig = figure_widget(fig)

    panel = panel_box([box, slider, message, text_view,
                       row([cell(gate_fig, "520px", 3), cell(pos_fig, "260px")]),
                       experts_view])
    ex = ExpertWeights(
        widget=panel, text_box=box, position_slider=slider, message=message,
        text_view=text_view, experts_view=experts_view,
        figures={"gate": gate_fig, "position": pos_fig}, model=model, tokenizer=tokenizer,
        settings=dict(top_k=top_k) | ({} if position is None else {"position": position}),
    )
    box.observe(ex.update_text, names="value")
    slider.observe(ex.show_position, names="value")
    if position is not None:  # a position beyond the text is an argument error, not a message
        ids = tokenizer.encode(text) if text else []
        if 0 < len(ids) <= model.backbone.config.block_size and position >= len(ids):
            raise ValueError(f"position must be in [0, {len(ids) - 1}] for this text of "
                             f"{len(ids)} tokens, got {position}")
    ex.update_text()
    return ex
