"""Lecture mode: serve the dashboard of the main widgets with Voilà, code hidden.

    make present                      # = python -m cptoy present
    python -m cptoy present --port 8866 --browser

The dashboard is the notebook ``cptoy/dashboards/lecture.ipynb`` (package data). Voilà runs it
in a fresh kernel per visitor and shows only the outputs: markdown titles, widgets, figures.
Voilà is part of the ``dev`` extra (``pip install -e ".[dev]"``).
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DASHBOARD", "DemoModels", "demo_available", "demo_models", "main", "present",
           "voila_command"]

DASHBOARD = Path(__file__).resolve().parent / "dashboards" / "lecture.ipynb"  # the notebook served


# ---------------------------------------------------------------------- the dashboard's models
@dataclass
class DemoModels:
    """The shipped checkpoints of one corpus, ready for the decoding panels of the dashboard."""

    corpus: str  # "code" or "shakespeare"
    models: dict = field(repr=False)  # "rank r" -> MTPModel (eval mode), lowest rank first
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
    """The lowest- and highest-rank shipped checkpoints of ``corpus``, or None if none ship.

    Prompts (``num_prompts`` of 32 tokens) and held-out ids come from the first ``max_chars``
    characters of the corpus's validation split (``cptoy.evaluate``).
    """
    from cptoy import checkpoints
    from cptoy.evaluate import heldout_ids, heldout_prompts

    ranks = _demo_ranks(corpus)
    if not ranks:
        return None
    models, tokenizer = {}, None
    for r in sorted({ranks[0], ranks[-1]}):
        model, tok, _ = checkpoints.load(f"{corpus}_r{r}")
        models[f"rank {r}"] = model
        tokenizer = tokenizer or tok
    if tokenizer is None:
        raise ValueError(f"the {corpus} checkpoints carry no tokenizer")
    prompts = heldout_prompts(corpus, tokenizer, num=num_prompts, prompt_tokens=32, seed=0,
                              max_chars=max_chars)
    return DemoModels(corpus, models, tokenizer, prompts,
                      heldout_ids(corpus, tokenizer, max_chars=max_chars))


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
