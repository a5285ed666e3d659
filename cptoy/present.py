"""Lecture mode: serve the dashboard of the main widgets with Voilà, code hidden.

    make present                      # = python -m cptoy present
    python -m cptoy present --port 8866 --browser

The dashboard is the notebook ``cptoy/dashboards/lecture.ipynb`` (package data). Voilà runs it
in a fresh kernel per visitor and shows only the outputs: markdown titles, widgets, figures.
Voilà is part of the ``dev`` extra (``pip install -e ".[dev]"``).

Its panels start on the small shipped models, which answer at once; the real language model
(SmolLM2-135M with its shipped heads, :func:`demo_models` ``("smollm2")``) is loaded when the
audience asks for it, with the button of :func:`real_model_loader`.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DASHBOARD", "REAL_MODEL", "DemoModels", "RealModelLoader", "demo_available",
           "demo_models", "main", "present", "real_model_loader", "voila_command"]

DASHBOARD = Path(__file__).resolve().parent / "dashboards" / "lecture.ipynb"  # the notebook served
REAL_MODEL = "smollm2"  # checkpoints smollm2_r<rank> / smollm2_x1: heads on SmolLM2-135M
TEXT_CORPUS = {REAL_MODEL: "code"}  # where the prompts of a model's panels come from
REAL_HELDOUT_TOKENS = 160  # teacher-forced reference on the real model: one short forward


# ---------------------------------------------------------------------- the dashboard's models
@dataclass
class DemoModels:
    """Shipped checkpoints of one corpus, ready for the decoding panels of the dashboard."""

    corpus: str  # "code", "shakespeare" or "smollm2" (heads on the real model; code prompts)
    models: dict = field(repr=False)  # name -> model (eval mode): "rank r" lowest rank first,
    # then "first-token" where first-token heads ship
    tokenizer: object  # the checkpoints' tokenizer (shared by their backbone)
    prompts: list = field(repr=False)  # held-out prompts: lists of 32 token ids
    heldout: object = field(repr=False)  # (T,) int64 held-out ids (teacher-forced reference)


def _demo_ranks(corpus: str) -> list[int]:
    from cptoy import checkpoints

    name = re.compile(rf"^{re.escape(corpus)}_r(\d+)$")
    return sorted(int(m.group(1)) for n in checkpoints.available() if (m := name.match(n)))


def demo_available(corpus: str = "code") -> bool:
    """Whether a demo checkpoint ``<corpus>_r<rank>.pt`` ships in ``cptoy/checkpoints/``."""
    return bool(_demo_ranks(corpus))


def demo_models(corpus: str = "code", num_prompts: int = 4,
                max_chars: int = 100_000) -> DemoModels | None:
    """The lowest- and highest-rank CP heads of ``corpus`` and its first-token heads
    (``<corpus>_x1``) where they ship, or None if no CP heads ship.

    ``corpus="smollm2"`` loads SmolLM2-135M once (``cptoy.pretrained``) and puts every head on
    it; its prompts come from the code corpus. Prompts (``num_prompts`` of 32 tokens) and
    held-out ids come from the first ``max_chars`` characters of the validation split
    (``cptoy.evaluate``).
    """
    from cptoy import checkpoints
    from cptoy.evaluate import heldout_ids, heldout_prompts

    ranks = _demo_ranks(corpus)
    if not ranks:
        return None
    names = [(f"rank {r}", f"{corpus}_r{r}") for r in sorted({ranks[0], ranks[-1]})]
    if f"{corpus}_x1" in checkpoints.available():
        names.append(("first-token", f"{corpus}_x1"))
    models, tokenizer, backbone = {}, None, None
    for label, name in names:  # heads on the real model share its one loaded backbone
        model, tok, _ = checkpoints.load(name, backbone=backbone)
        models[label] = model
        tokenizer = tokenizer or tok
        if corpus == REAL_MODEL:
            backbone = model.backbone
    if tokenizer is None:
        raise ValueError(f"the {corpus} checkpoints carry no tokenizer")
    text = TEXT_CORPUS.get(corpus, corpus)
    prompts = heldout_prompts(text, tokenizer, num=num_prompts, prompt_tokens=32, seed=0,
                              max_chars=max_chars)
    return DemoModels(corpus, models, tokenizer, prompts,
                      heldout_ids(text, tokenizer, max_chars=max_chars))


@dataclass
class RealModelLoader:
    """A button that loads the real model and shows its decoding panels below it.

    Loading SmolLM2-135M and its heads takes seconds; the dashboard's first render should not
    wait for it, so it happens on a click (or :meth:`load` from Python).
    """

    widget: object  # ipywidgets.VBox: the button, a status line, then the panels
    button: object  # ipywidgets.Button
    message: object  # ipywidgets.HTML status line
    output: object  # ipywidgets.VBox that receives the panels
    corpus: str = REAL_MODEL
    panel_kwargs: dict = field(default_factory=dict)  # for acceptance_explorer
    demo: DemoModels | None = field(default=None, repr=False)
    panels: list = field(default_factory=list, repr=False)

    def load(self, _button=None) -> None:
        """Load the models (once) and show an acceptance explorer and a stepper on them."""
        from cptoy.widgets import acceptance_explorer, speculative_stepper
        from cptoy.widgets.base import message_html, sync_figures

        if self.demo is not None:
            return
        self.button.disabled = True
        self.message.value = message_html("loading SmolLM2-135M and its heads…")
        try:
            demo = demo_models(self.corpus, max_chars=20_000)
            if demo is None:
                raise ValueError(f"no {self.corpus} heads ship in cptoy/checkpoints")
            cp = [m for name, m in demo.models.items() if name.startswith("rank ")]
            self.panels = [
                acceptance_explorer(demo.models, demo.tokenizer, demo.prompts,
                                    heldout_ids=demo.heldout[:REAL_HELDOUT_TOKENS],
                                    tf_positions=64, **self.panel_kwargs),
                speculative_stepper(cp[-1], demo.tokenizer, demo.prompts[0], max_new_tokens=16),
            ]
        except Exception as exc:  # noqa: BLE001 - shown in the dashboard, not a traceback
            self.message.value = message_html(f"{type(exc).__name__}: {exc}", "error")
            self.button.disabled = False
            return
        self.demo = demo
        for panel in self.panels:
            sync_figures(panel.figures.values())
        self.output.children = [p.widget for p in self.panels]
        self.message.value = message_html(f"{len(demo.models)} drafters on SmolLM2-135M: "
                                          + ", ".join(demo.models))

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


def real_model_loader(**panel_kwargs) -> RealModelLoader:
    """The dashboard's "load the real model" button (see :class:`RealModelLoader`);
    ``panel_kwargs`` go to ``acceptance_explorer`` (e.g. ``max_new_tokens``)."""
    import ipywidgets as w

    from cptoy.widgets.base import message_html, panel_box

    button = w.Button(description="load SmolLM2-135M (takes a while)", button_style="primary",
                      layout=w.Layout(width="360px", max_width="100%"))
    message = w.HTML(message_html("the real model's panels appear here once it is loaded"))
    output = w.VBox(layout=w.Layout(width="100%"))
    loader = RealModelLoader(panel_box([button, message, output]), button, message, output,
                             panel_kwargs=panel_kwargs)
    button.on_click(loader.load)
    return loader


# ---------------------------------------------------------------------- serving
def voila_command(port: int | None = None, open_browser: bool = False,
                  notebook: str | Path = DASHBOARD, ip: str = "127.0.0.1") -> list[str]:
    """The ``voila`` command line that serves ``notebook`` (what :func:`present` runs).

    ``port=None`` lets Voilà pick (8866, or the next free port). Sources are stripped (Voilà's
    default, made explicit); tracebacks are hidden from the audience.
    """
    if port is not None and (isinstance(port, bool) or not isinstance(port, int)
                             or not 0 < port < 65536):
        raise ValueError(f"port must be an int in 1..65535 or None, got {port!r}")
    notebook = Path(notebook)
    if notebook.suffix != ".ipynb" or not notebook.is_file():
        raise ValueError(f"notebook must be an existing .ipynb file, got {str(notebook)!r}")
    cmd = [sys.executable, "-m", "voila", str(notebook), "--strip_sources=True",
           "--show_tracebacks=False", "--theme=light", f"--Voila.ip={ip}"]
    if port is not None:
        cmd.append(f"--port={port}")
    if not open_browser:
        cmd.append("--no-browser")
    return cmd


def present(port: int | None = None, open_browser: bool = False) -> int:
    """Serve the lecture dashboard with Voilà until interrupted (Ctrl-C); returns its exit code.

    Raises ``RuntimeError`` when Voilà is not installed.
    """
    if importlib.util.find_spec("voila") is None:
        raise RuntimeError('Voilà is not installed: pip install -e ".[dev]" (or pip install voila)')
    cmd = voila_command(port=port, open_browser=open_browser)
    print("serving the lecture dashboard:", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, cwd=DASHBOARD.parent)
    try:
        return proc.wait()
    except KeyboardInterrupt:  # Ctrl-C reaches Voilà too; give it time to stop its kernels
        try:
            return proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.terminate()
            return proc.wait()


def main(argv: list[str] | None = None) -> int:
    """``python -m cptoy present [--port PORT] [--browser] [--dry-run]``."""
    parser = argparse.ArgumentParser(
        prog="python -m cptoy present",
        description="Serve the lecture dashboard (cptoy/dashboards/lecture.ipynb) with Voilà.")
    parser.add_argument("--port", type=int, default=None,
                        help="port to serve on (default: Voilà's 8866 or the next free one)")
    parser.add_argument("--browser", action="store_true", help="open a web browser")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the voila command instead of running it")
    args = parser.parse_args(argv)
    if args.dry_run:
        print(" ".join(voila_command(port=args.port, open_browser=args.browser)))
        return 0
    return present(port=args.port, open_browser=args.browser)


if __name__ == "__main__":
    sys.exit(main())
