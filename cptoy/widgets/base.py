"""What every panel shares: the message line, guarded callbacks, display, layout and figures.

A panel is a dataclass that mixes in :class:`Panel` and holds ``widget`` (the ipywidgets box to
display), ``message`` (an ``ipywidgets.HTML`` status line), ``figures`` (name -> plotly
``FigureWidget``) and ``status`` (the status line as plain text). :func:`panel_box` builds the
box: it takes the width of the output area it is shown in (nothing wider; tables scroll), and
its fonts are at least :data:`MIN_FONT` px, readable on a projector.

ipywidgets and plotly are imported inside the functions: ``import cptoy.widgets`` stays cheap.
"""

from __future__ import annotations

import functools
import html
import math
import re

import torch

FONT_SIZE = 16  # base font size of every figure and control (px)
MIN_FONT = 14  # no text in a panel is smaller (px)

# background colour of a generated token, by how it arrived (stats.arrival)
ARRIVAL_COLORS = {
    "prompt": "#ffffff",  # the prompt (grey text, no background)
    "first": "#d9d9d9",  # the backbone's own token, no draft involved (the prefill / no drafts)
    "accepted": "#a5d6a7",  # a draft token accepted by the verifier
    "replacement": "#ffcc80",  # drawn from the residual after a rejected draft
    "bonus": "#90caf9",  # drawn from p after every draft was accepted
    "draft": "#e1bee7",  # kept without verification (verifier-free decoding)
}
P_COLOR, Q_COLOR = "#1f77b4", "#ff7f0e"  # backbone p, drafter q
REJECTED_BG = "#ef9a9a"  # a rejected draft

# One style sheet for every panel (each panel's box has the class "cptoy-panel"): ipywidgets'
# controls default to 13 px text and fixed widths; here they are 16 px and never wider than
# the output area, rows of controls wrap, and figures and HTML views take the width they get.
PANEL_CSS = f"""<style>
.cptoy-panel {{ --jp-widgets-font-size: {FONT_SIZE}px; --jp-widgets-inline-height: 34px;
  --jp-widgets-inline-label-width: 110px; max-width: 100%; box-sizing: border-box;
  font-size: {FONT_SIZE}px; }}
.cptoy-panel .widget-label, .cptoy-panel .widget-readout, .cptoy-panel .widget-label-basic,
.cptoy-panel select, .cptoy-panel button, .cptoy-panel textarea, .cptoy-panel input,
.cptoy-panel .widget-html-content, .cptoy-panel .widget-toggle-button {{
  font-size: {FONT_SIZE}px; }}
.cptoy-panel .widget-inline-hbox, .cptoy-panel .widget-inline-vbox,
.cptoy-panel .jupyter-widgets {{ max-width: 100%; }}
.cptoy-panel .widget-html, .cptoy-panel .widget-html-content {{ max-width: 100%;
  min-width: 0; }}
.cptoy-panel .widget-html-content {{ overflow-x: auto; }}
.cptoy-panel .widget-box {{ min-width: 0; }}
</style>"""


# ====================================================================== the panel base
def message_html(text: str, kind: str = "info") -> str:
    """HTML for a panel's status line; ``kind`` is "info" or "error"."""
    color = {"info": "#333", "error": "#b00020"}[kind]
    prefix = "⚠ " if kind == "error" else ""
    return (f'<div style="font-size:{FONT_SIZE + 2}px; color:{color}; padding:2px 0; line-height:1.35; '
            f'white-space:normal">{prefix}{html.escape(text)}</div>')


def guarded(method):
    """Run a panel callback; on any exception show it with ``self.say`` instead of raising."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the message in the widget is the point
            self.say(f"{type(exc).__name__}: {exc}", "error")
            return None

    return wrapper


class Panel:
    """Mixin of every panel: the status line and display (fields come from the dataclass)."""

    def say(self, text: str, kind: str = "info") -> None:
        """Show ``text`` in the status line (``kind`` "info" or "error")."""
        self.status = ("⚠ " if kind == "error" else "") + text
        self.message.value = message_html(text, kind)

    def _repr_mimebundle_(self, **kwargs):
        sync_figures(self.figures.values())
        return self.widget._repr_mimebundle_(**kwargs)


def panel_box(children):
    """The panel's outer box: a column as wide as the output area, with the panel style."""
    import ipywidgets as w

    box = w.VBox([w.HTML(PANEL_CSS), *children],
                 layout=w.Layout(width="100%", max_width="100%", overflow="hidden"))
    box.add_class("cptoy-panel")
    return box


def row(children, **layout):
    """A row of controls or figures that wraps onto the next line when the area is narrow."""
    import ipywidgets as w

    return w.HBox(list(children), layout=w.Layout(flex_flow="row wrap", width="100%",
                                                  align_items="center", **layout))


def control_layout(width: str):
    """Layout of a control: ``width`` when there is room, never wider than the area."""
    import ipywidgets as w

    return w.Layout(width=width, max_width="calc(100% - 4px)")  # ipywidgets' 2 px margins


def cell(widget, basis: str = "420px", grow: int = 1):
    """``widget`` in a box that takes a share of a :func:`row` (at least ``basis`` when it can,
    the whole row when it cannot): how figures sit side by side and stack when narrow."""
    import ipywidgets as w

    return w.VBox([widget], layout=w.Layout(flex=f"{grow} 1 {basis}", min_width="0",
                                            max_width="100%"))


# ====================================================================== plotly figures
# plotly's FigureWidget sends its whole front-end bundle (about 5 MB of JavaScript) as the
# anywidget ESM of *every* figure, and the browser compiled it once per figure. The figures made
# here send a small loader as the ESM and the bundle as a separate synced string; the loader
# compiles the bundle once per page and shares it.
#
# anywidget gives a model 2 s from its creation to finish ``initialize``; a model that misses it
# drops every later message from the kernel (in the console: "[anywidget] Failed to initialize
# model"), so its figure never shows the kernel's data. Compiling the bundle takes longer than
# that on a busy machine, so ``initialize`` only starts it and returns; ``render`` waits for it.
# Changes the kernel sends before plotly's own model listens are not lost: the loader notes them
# (unless the whole figure arrived after them) and asks the kernel to send the whole figure
# again ("cptoy_resync") before it draws.
#
# plotly draws at the width the output area has when the figure appears; a ResizeObserver
# redraws it at the new width when the area changes (sidebar opened, window resized).
_SHARED_BUNDLE_ESM = """
const KEY = "__cptoy_plotly_widget_@VERSION@";
const DELTAS = ["addTraces", "deleteTraces", "moveTraces", "restyle", "relayout", "update",
                "animate", "removeLayoutProps", "removeTraceProps"];
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
function resynced(model, ms) {
  return new Promise((resolve) => {
    const done = (msg) => {
      if (msg && msg.event !== "cptoy_resynced") return;
      clearTimeout(timer); model.off("msg:custom", done); resolve();
    };
    const timer = setTimeout(done, ms);
    model.on("msg:custom", done);
    model.send({event: "cptoy_resync"});
  });
}
export default async () => {
  let inner = null;  // plotly's own widget object for this model
  let ready = null;  // resolves once plotly's model listens to the kernel
  return {
    initialize(ctx) {
      let missed = false;
      const note = () => { if (!inner) missed = true; };
      const full = () => { if (!inner) missed = false; };  // the whole figure arrived
      for (const d of DELTAS) ctx.model.on("change:_py2js_" + d, note);
      ctx.model.on("change:_widget_data", full);
      ready = bundle(ctx.model).then(async (mod) => {
        const w = mod.default();
        await w.initialize(ctx);
        inner = w;
        for (const d of DELTAS) ctx.model.off("change:_py2js_" + d, note);
        ctx.model.off("change:_widget_data", full);
        if (missed) await resynced(ctx.model, 20000);
      });
      ready.catch((e) => console.error("[cptoy] plotly widget failed to load", e));
    },
    async render(ctx) {
      await ready;
      const cleanup = inner.render(ctx);
      let frame = 0, width = ctx.el.clientWidth;
      const ro = new ResizeObserver(() => {
        if (Math.abs(ctx.el.clientWidth - width) < 2) return;
        width = ctx.el.clientWidth;
        cancelAnimationFrame(frame);
        frame = requestAnimationFrame(() => window.dispatchEvent(new Event("resize")));
      });
      ro.observe(ctx.el);
      return () => { ro.disconnect(); if (typeof cleanup === "function") cleanup(); };
    },
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

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._config = {**self._config, "responsive": True, "displaylogo": False}
            self.on_msg(self._on_front_end_msg)

        def _on_front_end_msg(self, _widget, content, _buffers) -> None:
            if isinstance(content, dict) and content.get("event") == "cptoy_resync":
                sync_figures([self])
                self.send_state(["_widget_layout", "_widget_data"])
                self.send({"event": "cptoy_resynced"})

    return SharedBundleFigureWidget


def figure_widget(fig):
    """A plotly ``FigureWidget`` of ``fig`` that loads fast, survives a busy machine and takes
    the width of its container (``fig`` should set a height, not a width)."""
    fig.update_layout(autosize=True, width=None)
    return _figure_widget_class()(fig)


def sync_figures(figures) -> None:
    """Push each ``FigureWidget``'s current data and layout into its synced state.

    plotly does this only in the figure's own ``_repr_mimebundle_``; a figure displayed inside a
    box would otherwise render the data it was built with, not the updates made since.
    """
    for fw in figures:
        fw._repr_mimebundle_()


def base_layout(height: int) -> dict:
    """Layout shared by the figures: ``height`` px, projector fonts, no fixed width."""
    return dict(height=height, autosize=True, font=dict(size=FONT_SIZE),
                hoverlabel=dict(font_size=FONT_SIZE), margin=dict(l=70, r=30, t=70, b=60),
                template="plotly_white")


def legend_below(height: int, top: int, bottom: int, gap: int = 64) -> dict:
    """A horizontal legend ``gap`` px under the plot area of a figure ``height`` px tall with
    margins ``top`` and ``bottom`` (under the tick labels and the x-axis title)."""
    return dict(orientation="h", x=0, xanchor="left", yanchor="top",
                y=-gap / max(height - top - bottom, 1))


def token_axis(labels: list[str], max_ticks: int = 20) -> dict:
    """A categorical-looking axis over integer positions (labels may repeat or be odd)."""
    V = len(labels)
    step = max(1, math.ceil(V / max_ticks))
    idx = list(range(0, V, step))
    return dict(tickmode="array", tickvals=idx, ticktext=[labels[i] for i in idx])


def check_labels(labels, V: int) -> list[str]:
    """``labels`` as V strings (default "0".."V-1"); TypeError/ValueError otherwise."""
    if labels is None:
        return [str(i) for i in range(V)]
    if isinstance(labels, str):
        raise TypeError("labels must be a sequence of V strings, not one string")
    labels = [str(s) for s in labels]
    if len(labels) != V:
        raise ValueError(f"labels must have one entry per token (V={V}), got {len(labels)}")
    return labels


# ====================================================================== tokens as text
def visible(s: str, max_len: int = 12) -> str:
    """A short token label with whitespace made visible: "␣" space, "⏎" newline, "⇥" tab,
    runs of 4 or more spaces as "␣×n", cut to ``max_len`` characters with "…"."""
    runs = [r if r[0] != " " else ("␣" * len(r) if len(r) < 4 else f"␣×{len(r)}")
            for r in re.findall(r" +|[^ ]+", s)]
    s = "".join(runs).replace("\n", "⏎").replace("\t", "⇥") or "∅"
    return s if len(s) <= max_len else s[: max_len - 1] + "…"


def tok_text(tokenizer, i: int) -> str:
    """The text of token ``i`` ("<i>" when the tokenizer cannot decode it)."""
    try:
        return tokenizer.decode([int(i)])
    except Exception:  # noqa: BLE001 - display only
        return f"<{int(i)}>"


def tok_label(tokenizer, i: int) -> str:
    """Token ``i`` as a short label with its whitespace visible."""
    return visible(tok_text(tokenizer, i))


def span(text: str, bg: str | None = None, style: str = "") -> str:
    """``text`` (escaped) in a span with background ``bg`` and extra CSS ``style``."""
    css = (f"background:{bg};" if bg else "") + style
    return f'<span style="{css}">{html.escape(text)}</span>'


def text_box(spans: list[str], max_height: int = 200) -> str:
    """A bordered monospace box of token spans, scrolling beyond ``max_height`` px."""
    return ('<div style="font-family:monospace; white-space:pre-wrap; overflow-wrap:anywhere; '
            f'font-size:{FONT_SIZE}px; line-height:1.35; border:1px solid #ccc; padding:4px 6px; '
            f'max-height:{max_height}px; overflow-y:auto">' + "".join(spans) + "</div>")


def legend(kinds) -> str:
    """Coloured chips naming the arrival kinds ``kinds`` (keys of ARRIVAL_COLORS)."""
    return " ".join(span(f" {k} ", ARRIVAL_COLORS[k], "padding:2px 4px; border-radius:3px;")
                    for k in kinds)


def check_tokenizer(tokenizer):
    """``tokenizer`` if it has ``decode``; TypeError otherwise."""
    if not callable(getattr(tokenizer, "decode", None)):
        raise TypeError("tokenizer must have decode(list[int]) -> str")
    return tokenizer


def check_prompt_list(prompts, V: int) -> list[list[int]]:
    """One prompt or a list of prompts (token-id lists or tensors) as lists of ids in [0, V)."""
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


def check_slider_temperature(temperature) -> float:
    """A temperature in [0, 2] (the panels' slider range) as a float; ValueError otherwise."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not 0 <= temperature <= 2:
        raise ValueError(f"temperature must be a number in [0, 2], got {temperature!r}")
    return float(temperature)
