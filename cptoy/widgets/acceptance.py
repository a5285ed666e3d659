"""acceptance_explorer: watch self-speculative decoding accept and reject drafts.

Built on ``cptoy.decoding.generate`` and ``cptoy.evaluate``, so what it shows is what the
notebooks and bench/ measure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from cptoy._checks import check_positive_int
from cptoy.widgets.base import (
    ARRIVAL_COLORS,
    FONT_SIZE,
    P_COLOR,
    Q_COLOR,
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
    tok_text,
)

__all__ = ["EXPLORER_DRAFTERS", "AcceptanceExplorer", "acceptance_explorer"]


@dataclass
class AcceptanceExplorer(Panel):
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

    @guarded
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
        spans = [span(self.tokenizer.decode(prompt), None, "color:#888;")]
        spans += [span(tok_text(self.tokenizer, t), ARRIVAL_COLORS.get(a))
                  for t, a in zip(g.tokens, s.arrival, strict=True)]
        self.text.value = (
            f'<div style="font-size:{FONT_SIZE}px">'
            + legend(("first", "accepted", "replacement", "bonus")) + "</div>"
            + text_box(spans, max_height=150))

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
            if tf is not None:
                pre = [1.0] + list(tf.spec_prefix) + [0.0]
                fw.data[1].x, fw.data[1].y = xs, [pre[i] - pre[i + 1] for i in range(k + 1)]
            else:
                fw.data[1].x, fw.data[1].y = [], []
            # the step counts sit under the axis, not on the bars (where the diamonds are)
            fw.layout.xaxis.update(tickvals=xs,
                                   ticktext=[f"{x}<br>({steps.count(x)})" for x in xs])
            fw.layout.title.text = f"tokens per step ({len(steps)} steps, prefill excluded)"

        # --- acceptance by position
        pos = list(range(2, k + 2))
        fa = self.figures["acceptance"]
        with fa.batch_update():
            fa.data[0].x = pos
            fa.data[0].y = [None if math.isnan(a) else a for a in s.acceptance_by_position]
            if tf is not None:
                fa.data[1].x = pos
                fa.data[1].y = [None if math.isnan(a) else a for a in tf.spec_acceptance]
                fa.data[2].x = pos
                fa.data[2].y = [None if math.isnan(a) else a for a in tf.greedy_acceptance]
            else:
                for tr in fa.data[1:]:
                    tr.x, tr.y = [], []
            fa.layout.xaxis.update(tickvals=pos, ticktext=[
                f"{j}<br>({a}/{t})" for j, a, t in zip(pos, s.accepted_by_position,
                                                       s.attempted_by_position, strict=True)])

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
    tokenizer = check_tokenizer(tokenizer)
    prompts = check_prompt_list(prompts, V)
    check_positive_int(max_new_tokens, "max_new_tokens")
    check_positive_int(tf_positions, "tf_positions")
    check_slider_temperature(temperature)
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

    sty = {"description_width": "125px"}  # "temperature" at the dashboard's 18 px
    model_dd = w.Dropdown(options=list(models), value=next(iter(models)), description="model",
                          style=sty, layout=control_layout("330px"))
    strat_dd = w.Dropdown(options=list(EXPLORER_DRAFTERS), value="self-spec",
                          description="drafter", style=sty, layout=control_layout("320px"))
    temp = w.FloatSlider(value=float(temperature), min=0.0, max=2.0, step=0.05,
                         description="temperature", continuous_update=False, style=sty,
                         layout=control_layout("360px"))
    n_sl = w.IntSlider(value=k0, min=1, max=kmax, step=1, description="drafts k",
                       continuous_update=False, style=sty, layout=control_layout("320px"))
    prompt_dd = w.Dropdown(options=[(lab, i) for i, lab in enumerate(prompt_labels)], value=0,
                           description="prompt", style=sty, layout=control_layout("660px"))
    message = w.HTML(message_html("decoding…"))
    text = w.HTML()

    height, top, bottom = 360, 50, 140  # px: the legend sits under the axis title
    fig = go.Figure()
    fig.add_trace(go.Bar(x=[], y=[], name="measured", marker_color=P_COLOR))
    fig.add_trace(go.Scatter(x=[], y=[], name="teacher-forced", mode="markers",
                             marker=dict(size=16, symbol="diamond", color=Q_COLOR,
                                         line=dict(width=1, color="black"))))
    fig.update_layout(**base_layout(height))
    fig.update_layout(title="tokens per step", xaxis_title="tokens gained in one forward (steps)",
                      yaxis_title="fraction of steps", yaxis_range=[0, 1.05],
                      margin=dict(l=70, r=20, t=top, b=bottom),
                      legend=legend_below(height, top, bottom))
    tokens_fig = figure_widget(fig)

    fig = go.Figure()
    fig.add_trace(go.Bar(x=[], y=[], name="measured", marker_color=P_COLOR))
    fig.add_trace(go.Scatter(x=[], y=[], name="teacher-forced", mode="lines+markers",
                             marker=dict(size=12), line=dict(color=Q_COLOR, width=3)))
    fig.add_trace(go.Scatter(x=[], y=[], name="greedy match", mode="lines+markers",
                             marker=dict(size=10), line=dict(color="#555", width=2, dash="dash")))
    fig.update_layout(**base_layout(height))
    fig.update_layout(title="acceptance by draft position",
                      xaxis_title="draft position j (accepted/tried)",
                      yaxis_title="Pr(accept | earlier)", yaxis_range=[0, 1.05],
                      margin=dict(l=70, r=20, t=top, b=bottom),
                      legend=legend_below(height, top, bottom))
    acc_fig = figure_widget(fig)

    panel = panel_box([
        row([model_dd, strat_dd]), row([temp, n_sl]), prompt_dd, message, text,
        row([cell(tokens_fig, "380px"), cell(acc_fig, "380px")]),
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
