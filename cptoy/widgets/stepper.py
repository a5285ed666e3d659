"""speculative_stepper: self-speculative decoding one verification forward at a time."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cptoy._checks import check_positive_int
from cptoy.speculative import residual
from cptoy.widgets.base import (
    ARRIVAL_COLORS,
    FONT_SIZE,
    P_COLOR,
    Q_COLOR,
    REJECTED_BG,
    Panel,
    base_layout,
    cell,
    check_prompt_list,
    check_slider_temperature,
    check_tokenizer,
    control_layout,
    figure_widget,
    guarded,
    legend,
    legend_below,
    message_html,
    panel_box,
    row,
    span,
    text_box,
    tok_label,
    tok_text,
)

__all__ = ["SpeculativeStepper", "speculative_stepper"]


@dataclass
class SpeculativeStepper(Panel):
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

    @property
    def steps(self) -> list:
        return self.generation.steps if self.generation is not None else []

    @guarded
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

    @guarded
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
        spans = [span(tok.decode(self.prompt), None, "color:#888;")]
        spans += [span(tok_text(tok, t), None, "color:#444;") for t in done]
        box = "outline:2px solid #333; padding:0 1px;"
        spans.append(span(tok_text(tok, st.x1), ARRIVAL_COLORS[st.x1_arrival],
                           box + "font-weight:bold;"))
        for j, d in enumerate(st.drafts[: len(st.accepted)]):
            if st.accepted[j]:
                spans.append(span(tok_text(tok, d), ARRIVAL_COLORS["accepted"], box))
            else:  # whitespace made visible, so that the strike-through shows
                spans.append(span(tok_label(tok, d), REJECTED_BG,
                                  box + "text-decoration:line-through;"))
        if st.final_token is not None:
            spans.append(span(tok_text(tok, st.final_token), ARRIVAL_COLORS[st.final_kind],
                               box + "font-weight:bold;"))
        unseen = st.drafts[len(st.accepted):]
        if unseen:
            spans.append(span("   ⟨drafts not reached: "
                               + " ".join(tok_label(tok, d) for d in unseen) + "⟩", None,
                              f"color:#777; font-style:italic; font-size:{FONT_SIZE - 2}px;"))
        self.text.value = (
            f'<div style="font-size:{FONT_SIZE}px">x₁ (bold) · '
            + legend(("accepted",)) + " "
            + span(" rejected ", REJECTED_BG, "text-decoration:line-through;") + " "
            + legend(("replacement", "bonus")) + "</div>"
            + text_box(spans, max_height=190))

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
            fg.layout.title.text = (f"gate, before / after x₁ = '{tok_label(tok, st.x1)}'"
                                    + ("<br>rank 1: nothing to condition" if r == 1 else "")
                                    + (f"<br>q = expert {st.expert}'s factors" if one else ""))

        # --- p vs q at each drafted position: horizontal bars, tokens on the y axis
        fq = self.figures["pq"]
        top = self.settings["top"]
        with fq.batch_update():
            for j in range(kmax):
                tp, tq = fq.data[2 * j], fq.data[2 * j + 1]
                ax = fq.layout[f"yaxis{'' if j == 0 else j + 1}"]
                ann = fq.layout.annotations[j]
                tr = fq.data[2 * kmax + j]  # the residual's bars
                # each property is set once per batch: plotly drops a change back to the value
                # it had before the batch, keeping the first one (e.g. y = [] then y = old y)
                res_x, res_y = [], []
                if j >= len(st.drafts):
                    tp.x = tp.y = tq.x = tq.y = tr.x = tr.y = []
                    ann.text = f"d{j + 2}<br>not drafted"
                    continue
                p, q = st.p[j], st.q[j]  # (V,) float64
                d = st.drafts[j]
                score = torch.maximum(p, q)
                score[d] = float("inf")  # the draft is always shown
                ids = score.topk(min(top, score.numel())).indices.tolist()
                labels = [tok_label(tok, t) for t in ids]
                ys = list(range(len(ids)))
                tp.y, tp.x = ys, p[ids].tolist()
                tq.y, tq.x = ys, q[ids].tolist()
                widths = [3 if t == d else 0 for t in ids]
                tp.marker.line.width = tq.marker.line.width = tr.marker.line.width = widths
                ax.tickvals, ax.ticktext = ys, labels
                if j < len(st.accepted):
                    ok = st.accepted[j]
                    rule = "argmax p" if T == 0 else "min(1, p/q)"
                    verdict = "✓ accepted" if ok else (
                        f"✗ → '{tok_label(tok, st.final_token)}'"
                        + ("" if T == 0 else " from the residual"))
                    if not ok and T > 0:  # the replacement is drawn from norm(max(0, p - q))
                        res = residual(p, q)  # (V,)
                        res_x, res_y = res[ids].tolist(), ys
                    ann.text = (f"d{j + 2} = '{tok_label(tok, d)}'<br>{rule} = "
                                f"{st.accept_prob[j]:.2f}<br>{verdict}")
                else:
                    ann.text = f"d{j + 2} = '{tok_label(tok, d)}'<br>not reached"
                tr.x, tr.y = res_x, res_y

        n_acc = sum(st.accepted)
        drafter = _drafter_name(self.model, self.routing_dropdown.value)
        final = ("" if st.final_token is None else
                 f", {st.final_kind} '{tok_label(tok, st.final_token)}'")
        self.say(f"step {i + 1} of {len(steps)}: x₁ = '{tok_label(tok, st.x1)}' "
                 f"({st.x1_arrival}), {len(st.drafts)} drafts, {n_acc} accepted{final} → "
                 f"{len(st.emitted)} tokens from this forward. Whole run (self-spec, "
                 f"q = {drafter}, {kmax} drafts per step, T={T:g}): "
                 f"{g.stats.tokens_per_step:.2f} tokens per step")


def _drafter_name(model, routing: str) -> str:
    """What drafts in ``model`` with ``routing``, in words (for the status line)."""
    if "FirstToken" in type(getattr(model, "heads", None)).__name__:
        return "first-token heads"
    rank = getattr(model, "rank", 1)
    if rank == 1:
        return "CP rank 1"
    return f"one expert of CP rank {rank}" if routing == "expert" else f"CP rank {rank} mixture"


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
    ``min(1, p/q)`` and the decision; at a rejected draft (T > 0) also the residual
    norm(max(0, p - q)) the replacement was drawn from. Buttons and a slider move between
    steps; temperature, seed and the drafter's q re-decode: ``routing`` "mixture" (q = the
    CP's mixture conditional) or "expert" (one expert drawn from the posterior drafts and is
    q; see ``cptoy.decoding``); the dropdown is disabled for rank 1, where both are the same.
    At temperature 0, p and q are shown untempered and acceptance is ``d == argmax p``.
    """
    from cptoy.decoding import check_routing

    if not hasattr(model, "backbone") or getattr(model, "n_future", 1) < 2:
        raise TypeError("model must be an MTPModel with n_future >= 2")
    tokenizer = check_tokenizer(tokenizer)
    V = model.backbone.config.vocab_size
    prompt = check_prompt_list([prompt], V)[0]
    check_positive_int(max_new_tokens, "max_new_tokens")
    check_positive_int(top, "top")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    check_slider_temperature(temperature)
    kmax = model.n_future - 1
    k = kmax if n_draft is None else check_positive_int(n_draft, "n_draft")
    if k > kmax:
        raise ValueError(f"n_draft must be in [1, {kmax}], got {n_draft}")
    check_routing(routing, model)

    import ipywidgets as w
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    sty = {"description_width": "100px"}
    prev_b = w.Button(description="◀ previous", layout=control_layout("130px"))
    next_b = w.Button(description="next ▶", button_style="primary",
                      layout=control_layout("130px"))
    step_sl = w.IntSlider(value=0, min=0, max=0, description="step", style=sty,
                          layout=control_layout("420px"))
    temp = w.FloatSlider(value=float(temperature), min=0.0, max=2.0, step=0.05,
                         description="temperature", continuous_update=False,
                         style={"description_width": "125px"}, layout=control_layout("380px"))
    seed_box = w.IntText(value=seed, description="seed", style=sty,
                         layout=control_layout("200px"))
    routing_dd = w.Dropdown(options=[("CP mixture", "mixture"), ("one expert", "expert")],
                            value=routing, description="drafter q", style=sty,
                            disabled=getattr(model, "rank", 1) == 1,
                            layout=control_layout("300px"))
    message = w.HTML(message_html("decoding…"))
    text = w.HTML()

    fig = go.Figure()
    fig.add_trace(go.Bar(x=[], y=[], name="before x₁", marker_color="#bbbbbb"))
    fig.add_trace(go.Bar(x=[], y=[], name="after x₁", marker_color=Q_COLOR))
    fig.add_trace(go.Scatter(x=[], y=[], mode="markers", name="sampled",
                             marker=dict(symbol="triangle-down", size=18, color="black")))
    fig.update_layout(**base_layout(280))
    fig.update_layout(barmode="group", title="gate", xaxis_title="expert a",
                      yaxis_title="weight", yaxis_range=[0, 1.15],
                      margin=dict(l=70, r=20, t=70, b=110), legend=legend_below(280, 70, 110))
    gate_fig = figure_widget(fig)

    height, tmargin, bmargin = 150 + 34 * top, 100, 100  # px; 34 px per token row
    fig = make_subplots(rows=1, cols=k, subplot_titles=[f"d{j + 2}" for j in range(k)],
                        horizontal_spacing=0.12 if k > 1 else 0.0)
    for j in range(k):
        fig.add_trace(go.Bar(x=[], y=[], orientation="h", name="p (backbone)",
                             marker_color=P_COLOR, marker_line_color="black",
                             showlegend=j == 0, legendgroup="p"), row=1, col=j + 1)
        fig.add_trace(go.Bar(x=[], y=[], orientation="h", name="q (drafter)",
                             marker_color=Q_COLOR, marker_line_color="black",
                             showlegend=j == 0, legendgroup="q"), row=1, col=j + 1)
        fig.update_xaxes(range=[0, 1.05], nticks=3, row=1, col=j + 1)
    for j in range(k):  # after all p/q bars, so that p and q of position j stay traces 2j, 2j+1
        fig.add_trace(go.Bar(x=[], y=[], orientation="h", name="residual norm(max(0, p − q))",
                             marker_color=ARRIVAL_COLORS["replacement"], marker_line_color="black",
                             showlegend=j == 0, legendgroup="r"), row=1, col=j + 1)
        fig.update_yaxes(autorange="reversed", tickangle=0, automargin=True,
                         row=1, col=j + 1)  # the most likely on top, labels level
    fig.update_layout(**base_layout(height))
    fig.update_layout(barmode="group", margin=dict(l=90, r=20, t=tmargin, b=bmargin),
                      legend=legend_below(height, tmargin, bmargin, gap=40))
    fig.update_annotations(yshift=10)  # three-line titles clear of the plot
    pq_fig = figure_widget(fig)

    panel = panel_box([row([prev_b, next_b, step_sl]), row([temp, seed_box, routing_dd]),
                       message, row([cell(text, "420px", 3), cell(gate_fig, "300px", 2)]),
                       pq_fig])
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
