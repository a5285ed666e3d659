"""The static figures of the README (``make figures`` / ``python -m cptoy figures``).

Each recipe in :data:`FIGURES` draws one PNG from library code (``cptoy.plots``, ``cptoy.cp``,
``cptoy.joint``, ``cptoy.theory``) with fixed seeds, so the same inputs give the same bytes.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from cptoy.cp import CPFit, fit_cp
from cptoy.plots import (
    MAX_WIDTH,
    STYLE,
    heatmap,
    joint_slice,
    plot_em_history,
    plot_gate,
    plot_joint_comparison,
    plot_rank_sweep,
    rank_sweep,
    stdlib_code,
)

__all__ = ["FIGURES", "make_figures"]


def _save(fig, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # render with Agg whatever the session's backend is
    fig.savefig(path, format="png", metadata={"Software": None})
    return path


class _FigureInputs:
    """The joints and fits the figures share, computed once on first use (deterministic)."""

    def __init__(self, seed: int):
        self.seed = seed
        self.ctx = "raise "  # a code context whose next bytes branch (ValueError, TypeError, ...)

    @functools.cached_property
    def hmm_P(self) -> torch.Tensor:
        from cptoy.joint import HMM

        return HMM(n_states=4, vocab_size=10, stickiness=0.9, seed=self.seed).joint(3)  # (10,)*3

    @functools.cached_property
    def code(self):
        from cptoy.joint import text_joint

        return text_joint(stdlib_code(), self.ctx, 3, top_k=12)  # P (13,)*3 with <other>

    @functools.cached_property
    def code_fits(self) -> dict[int, CPFit]:
        return {r: fit_cp(self.code.P, r, method="em", n_iter=400, restarts=3, seed=self.seed)
                for r in (1, 2, 4, 8)}

    @functools.cached_property
    def first(self) -> int:
        """Axis index of the likeliest first byte that is not the <other> bucket."""
        from cptoy.joint import OTHER

        P1 = joint_slice(self.code.P).sum(1)  # (V,)
        return max((v for v in range(len(P1)) if self.code.vocab[v] != OTHER),
                   key=lambda v: float(P1[v]))


def _fig_hmm_rank1_vs_true(d: _FigureInputs):
    from cptoy.joint import product_of_marginals
    from cptoy.theory import expected_tokens_per_forward

    P = d.hmm_P
    R1 = product_of_marginals(P)
    fig = plot_joint_comparison(
        P, R1, titles=("true joint P", "rank 1\n(independent heads)", "P - rank 1"))
    fig.suptitle(f"HMM toy language (4 states, V=10): tokens 1, 2\nE[tokens/forward] of "
                 f"rank 1 = {expected_tokens_per_forward(P, R1):.2f} of 3", fontsize=16)
    return fig


def _fig_hmm_rank_sweep(d: _FigureInputs):
    pts = rank_sweep(d.hmm_P, ranks=(1, 2, 3, 4, 6, 8), n_iter=150, seed=d.seed)
    return plot_rank_sweep(pts, n=3, title="HMM toy language (4 states, V=10, n=3)")


def _fig_code_joint_fits(d: _FigureInputs):
    from matplotlib import rc_context
    from matplotlib.figure import Figure

    from cptoy.theory import expected_tokens_per_forward

    cj, fits = d.code, d.code_fits
    labels = cj.labels()
    with rc_context(STYLE):
        fig = Figure(figsize=(MAX_WIDTH, 4.6), layout="constrained")
        axs = fig.subplots(1, 3)
        S = joint_slice(cj.P)
        vmax = float(S.max())
        heatmap(axs[0], S, labels, f"true P\n({cj.count} occurrences)", vmax=vmax,
                 xlabel="x2", ylabel="x1", colorbar=False)
        for ax, r in zip(axs[1:], (1, 4), strict=True):
            E = expected_tokens_per_forward(cj.P, fits[r].dist)
            im = heatmap(ax, joint_slice(fits[r].dist), labels,
                          f"rank {r}\nKL {fits[r].kl:.2f}, E {E:.2f}", vmax=vmax, xlabel="x2",
                          colorbar=False)
        fig.colorbar(im, ax=list(axs), shrink=0.8)  # one scale for all three
        fig.suptitle(f'stdlib code after "{d.ctx}": first two bytes (top 12 + <other>)')
    return fig


def _fig_code_conditioned(d: _FigureInputs):
    from matplotlib import rc_context
    from matplotlib.figure import Figure

    cj, fits, first = d.code, d.code_fits, d.first
    labels = cj.labels()
    with rc_context(STYLE):
        fig = Figure(figsize=(MAX_WIDTH, 4.6), layout="constrained")
        axs = fig.subplots(1, 3)
        Sp = joint_slice(cj.P, (0, 1), prefix=[first])
        vmax = float(Sp.max())
        heatmap(axs[0], Sp, labels, "true\nP(x2, x3 | x1)", vmax=vmax, xlabel="x3", ylabel="x2",
                 colorbar=False)
        for ax, r in zip(axs[1:], (1, 4), strict=True):
            im = heatmap(ax, joint_slice(fits[r].dist, (0, 1), prefix=[first]), labels,
                          f"rank {r}\nQ(x2, x3 | x1)", vmax=vmax, xlabel="x3", colorbar=False)
        fig.colorbar(im, ax=list(axs), shrink=0.8)  # one scale for all three
        fig.suptitle(f'after "{d.ctx}" and x1 = {labels[first]!r}: only rank > 1 can condition')
    return fig


def _fig_code_em_history(d: _FigureInputs):
    hist = {f"EM r={r}": f for r, f in d.code_fits.items()}
    for m in ("hals", "als"):
        hist[f"{m.upper()} r=4"] = fit_cp(d.code.P, 4, method=m, n_iter=300, seed=d.seed)
    return plot_em_history(hist, title=f'EM vs tensorly on code after "{d.ctx}" (n=3)')


def _fig_code_gate(d: _FigureInputs):
    d4, first = d.code_fits[4].dist, d.first
    post = d4.posterior_log_weights(torch.tensor([first])).exp()
    label = d.code.labels()[first]
    return plot_gate({"prior w": d4.weights, f"posterior | x1={label!r}": post},
                     title="rank-4 gate: conditioning on x1 moves the weights")


# name -> recipe; make_figures writes ``<name>.png`` for each
FIGURES = {
    "hmm_rank1_vs_true": _fig_hmm_rank1_vs_true,
    "hmm_rank_sweep": _fig_hmm_rank_sweep,
    "code_joint_fits": _fig_code_joint_fits,
    "code_conditioned": _fig_code_conditioned,
    "code_em_history": _fig_code_em_history,
    "code_gate": _fig_code_gate,
}


def make_figures(out_dir: str | os.PathLike = "figures", names: Sequence[str] | None = None,
                 seed: int = 0) -> list[Path]:
    """Regenerate the static PNGs in ``out_dir`` deterministically (seconds, not minutes).

    * ``hmm_rank1_vs_true``: an HMM's 3-token joint, its product of marginals, the difference.
    * ``hmm_rank_sweep``: EM vs HALS vs ALS, KL and tokens per forward vs rank.
    * ``code_joint_fits``: stdlib code after ``"raise "`` and its rank-1 / rank-4 fits.
    * ``code_conditioned``: the same, conditioned on the first byte (rank 4 can, rank 1 not).
    * ``code_em_history``: EM's KL per iteration for several ranks; HALS/ALS final KL.
    * ``code_gate``: the rank-4 gate, prior and posterior given the first byte.

    ``names`` picks a subset of :data:`FIGURES` (all by default). PNGs carry no software or
    date metadata, so the same inputs give the same bytes. Returns the written paths.
    """
    names = list(FIGURES) if names is None else list(names)
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        raise ValueError(f"names must be among {list(FIGURES)}, got unknown {unknown}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    inputs = _FigureInputs(seed)
    return [_save(FIGURES[name](inputs), out / f"{name}.png") for name in names]
