"""Static matplotlib figures for the notebooks and ``make figures``.

Every ``plot_*`` function returns a :class:`matplotlib.figure.Figure` (built without pyplot, so
nothing is shown twice in a notebook and no global figure state leaks). Pass ``ax=`` to draw
into an existing axes instead; the function then returns that axes' figure. Fonts are large
enough to read on a projector.

matplotlib is imported inside the functions, so ``import cptoy.plots`` is cheap and
:mod:`cptoy.widgets` can reuse the non-plotting helpers here (:func:`joint_slice`,
:func:`rank_sweep`) without pulling in matplotlib.

Shapes: a joint ``P`` is a float64 tensor ``(V,)*n`` (or a :class:`~cptoy.cp.CPDist`, which is
densified); a 2-token slice is ``(V, V)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cptoy._checks import as_tensor, check_joint, check_positive_int
from cptoy.cp import CPDist, CPFit, fit_cp

__all__ = [
    "STYLE",
    "METHOD_STYLE",
    "SweepPoint",
    "joint_slice",
    "score_fit",
    "rank_sweep",
    "plot_joint_slice",
    "plot_joint_comparison",
    "plot_rank_sweep",
    "plot_em_history",
    "plot_gate",
    "plot_experts",
    "heatmap",
    "stdlib_code",
]

# Every figure is at most MAX_WIDTH inches wide: at 100 dpi that is 960 px, the output area of
# JupyterLab at 1400 px with its file browser open, so a notebook shows it unscaled and a
# 10.1 pt font is 14 px on screen. Every font here is at least 11 pt (15 px).
MAX_WIDTH = 9.6  # inches
MIN_FONT_PT = 11

# matplotlib rc settings used by every figure here: big enough for a projector
STYLE = {
    "font.size": 14,
    "axes.titlesize": 15,
    "axes.labelsize": 14,
    "xtick.labelsize": 12,
    "ytick.labelsize": 12,
    "legend.fontsize": 12,
    "figure.dpi": 100,
    "savefig.dpi": 100,
    "axes.grid": False,
}

# one colour / marker per fitting method, shared with the widgets
METHOD_STYLE = {
    "em": {"color": "#1f77b4", "marker": "o", "label": "EM (KL)"},
    "hals": {"color": "#ff7f0e", "marker": "s", "label": "HALS (tensorly, nonneg.)"},
    "als": {"color": "#2ca02c", "marker": "^", "label": "ALS (tensorly, clipped)"},
    "rank1": {"color": "#7f7f7f", "marker": "D", "label": "product of marginals"},
}


# ====================================================================== non-plotting helpers
def dense_joint(P, name: str = "P") -> torch.Tensor:
    """A validated dense float64 joint (V,)*n from a tensor, an array or an unbatched CPDist."""
    if isinstance(P, CPDist):
        if len(P.batch_shape):
            raise ValueError(f"{name} must be an unbatched CPDist, got batch shape "
                             f"{tuple(P.batch_shape)}")
        P = P.to(torch.float64).to_tensor()
    return check_joint(P, name)


def joint_slice(P, positions: Sequence[int] = (0, 1), prefix: Sequence[int] | None = None):
    """A 2-token slice of a joint, shape (V, V).

    ``P`` (V,)*n (tensor or CPDist). With ``prefix`` (k token ids) P is first conditioned on its
    first k tokens, leaving a joint of n-k tokens; then every axis except the two
    ``positions`` (indices into the remaining axes) is summed out. Entry ``[i, j]`` is the
    probability that the token at ``positions[0]`` is i and the one at ``positions[1]`` is j.
    """
    P = dense_joint(P)
    if prefix is not None and len(prefix) > 0:
        from cptoy.joint import conditional

        if P.dim() - len(prefix) < 2:
            raise ValueError(f"prefix of {len(prefix)} tokens leaves {P.dim() - len(prefix)} of "
                             f"n={P.dim()} axes; a 2-token slice needs 2")
        P = conditional(P, list(prefix))
    m = P.dim()
    pos = [int(p) for p in positions]
    if len(pos) != 2 or pos[0] == pos[1] or any(not 0 <= p < m for p in pos):
        raise ValueError(f"positions must be two distinct axes in [0, {m}) of the "
                         f"{'conditioned ' if prefix else ''}joint, got {tuple(positions)}")
    rest = tuple(d for d in range(m) if d not in pos)
    S = P.sum(dim=rest) if rest else P  # (V, V), axes in increasing order
    return S if pos[0] < pos[1] else S.T


@dataclass
class SweepPoint:
    """One (method, rank) fit of a joint, scored."""

    method: str  # "em", "hals" or "als"
    rank: int  # CP rank r
    kl: float  # KL(P || Q) in nats (nan if every restart failed)
    tv: float  # total variation 0.5 * sum |P - Q|
    tokens_per_forward: float  # exact expected tokens per forward, in [1, n]
    seconds: float  # wall time of the fit
    n_negative: int  # ALS: negative factor entries clipped during simplex conversion
    failed: int  # restarts that returned NaN

    def asdict(self) -> dict:
        return asdict(self)


def score_fit(P, fit: CPFit, rank: int | None = None) -> SweepPoint:
    """Score a :class:`CPFit` against its joint ``P``: KL, TV and exact tokens per forward."""
    from cptoy.joint import kl, tv
    from cptoy.theory import expected_tokens_per_forward

    P = dense_joint(P)
    Q = fit.dist.to(torch.float64).to_tensor()
    Q = Q / Q.sum()  # float64 round-off only (sums to 1 within 1e-12)
    return SweepPoint(
        method=fit.method, rank=fit.dist.rank if rank is None else rank, kl=kl(P, Q), tv=tv(P, Q),
        tokens_per_forward=expected_tokens_per_forward(P, Q), seconds=fit.seconds,
        n_negative=fit.n_negative, failed=fit.failed,
    )


def rank_sweep(
    P,
    ranks: Sequence[int] = (1, 2, 4, 8),
    methods: Sequence[str] = ("em", "hals", "als"),
    n_iter: int = 300,
    restarts: int = 1,
    seed: int = 0,
    tol: float = 1e-9,
) -> list[SweepPoint]:
    """Fit every (method, rank) with :func:`cptoy.cp.fit_cp` and score it (see :class:`SweepPoint`).

    A fit whose restarts all fail (tensorly HALS can return NaN) gives a point with ``kl``,
    ``tv`` and ``tokens_per_forward`` NaN and ``failed == restarts``; it is reported, not dropped.
    """
    P = dense_joint(P)
    out = []
    for method in methods:
        for r in ranks:
            check_positive_int(r, "ranks[i]")
            try:
                fit = fit_cp(P, r, method=method, n_iter=n_iter, tol=tol, restarts=restarts,
                             seed=seed)
            except RuntimeError:
                nan = float("nan")
                out.append(SweepPoint(method, r, nan, nan, nan, 0.0, 0, restarts))
                continue
            out.append(score_fit(P, fit, rank=r))
    return out


def _labels(labels, V: int) -> list[str]:
    if labels is None:
        return [str(i) for i in range(V)]
    labels = [str(s) for s in labels]
    if len(labels) != V:
        raise ValueError(f"labels must have one entry per token (V={V}), got {len(labels)}")
    return labels


def _new_fig(ax, figsize):
    from matplotlib.figure import Figure

    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def heatmap(ax, M: torch.Tensor, labels: list[str], title: str, signed: bool = False,
             vmax: float | None = None, annotate: bool | None = None, xlabel: str = "",
             ylabel: str = "", colorbar: bool = True):
    """Draw a (V, V) matrix; rows = first token (y), columns = second token (x)."""
    import numpy as np

    A = M.detach().cpu().numpy().astype(np.float64)
    V = A.shape[0]
    if signed:
        lim = vmax if vmax is not None else max(float(np.abs(A).max()), 1e-12)
        im = ax.imshow(A, cmap="RdBu_r", vmin=-lim, vmax=lim)
    else:
        top = vmax if vmax is not None else max(float(A.max()), 1e-12)
        im = ax.imshow(A, cmap="Blues", vmin=0.0, vmax=top)
    step = max(1, math.ceil(V / 20))
    ticks = list(range(0, V, step))
    long = max(len(labels[i]) for i in ticks) > 2
    ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90 if long else 0)
    ax.set_yticks(ticks, [labels[i] for i in ticks])
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if annotate is None:
        annotate = V <= 8
    if annotate:
        hi = float(np.abs(A).max()) or 1.0
        for i in range(V):
            for j in range(V):
                if abs(A[i, j]) >= 0.005:
                    ax.text(j, i, f"{A[i, j]:.2f}", ha="center", va="center",
                            fontsize=MIN_FONT_PT,
                            color="white" if abs(A[i, j]) > 0.6 * hi else "black")
    if colorbar:
        ax.figure.colorbar(im, ax=ax, shrink=0.85)
    return im


def _slice_axis_names(positions, prefix, labels) -> tuple[str, str, str]:
    k = 0 if prefix is None else len(prefix)
    a, b = (k + int(p) + 1 for p in positions)
    cond = ""
    if k:
        cond = " | " + ", ".join(f"x{i + 1}={labels[t]!s}" for i, t in enumerate(prefix))
    return f"x{a}", f"x{b}", cond


# ====================================================================== plots
def plot_joint_slice(
    P,
    labels: Sequence[str] | None = None,
    ax=None,
    title: str | None = None,
    positions: Sequence[int] = (0, 1),
    prefix: Sequence[int] | None = None,
    vmax: float | None = None,
    annotate: bool | None = None,
):
    """Heatmap of a 2-token slice of ``P`` (V,)*n (see :func:`joint_slice`); returns the Figure.

    ``labels`` (V,) names the tokens; ``prefix`` conditions on the first tokens first.
    """
    S = joint_slice(P, positions, prefix)  # (V, V)
    labels = _labels(labels, S.shape[0])
    ya, xa, cond = _slice_axis_names(positions, prefix, labels)
    if title is None:
        title = f"P({ya}, {xa}{cond})"
    from matplotlib import rc_context

    with rc_context(STYLE):
        fig, ax = _new_fig(ax, (6.0, 5.0))
        heatmap(ax, S, labels, title, vmax=vmax, annotate=annotate, xlabel=xa, ylabel=ya)
    return fig


def plot_joint_comparison(
    P,
    Q,
    labels: Sequence[str] | None = None,
    positions: Sequence[int] = (0, 1),
    prefix: Sequence[int] | None = None,
    titles: Sequence[str] | None = None,
    annotate: bool | None = None,
):
    """Three heatmaps side by side: the slice of P, of Q (same colour scale) and of P - Q.

    ``P`` and ``Q`` (V,)*n (tensors or CPDists); returns the Figure.
    """
    Sp = joint_slice(P, positions, prefix)
    Sq = joint_slice(Q, positions, prefix)
    if Sp.shape != Sq.shape:
        raise ValueError(f"P and Q slices differ in shape: {tuple(Sp.shape)} vs {tuple(Sq.shape)}")
    labels = _labels(labels, Sp.shape[0])
    ya, xa, cond = _slice_axis_names(positions, prefix, labels)
    if titles is None:
        titles = ("true P", "model Q", "P - Q")
    if len(titles) != 3:
        raise ValueError(f"titles must hold 3 strings, got {len(titles)}")
    from matplotlib import rc_context
    from matplotlib.figure import Figure

    vmax = float(max(Sp.max(), Sq.max()))
    with rc_context(STYLE):
        fig = Figure(figsize=(MAX_WIDTH, 4.4), layout="constrained")
        axs = fig.subplots(1, 3)
        heatmap(axs[0], Sp, labels, titles[0], vmax=vmax, annotate=annotate, xlabel=xa, ylabel=ya,
                 colorbar=False)  # P and Q share the colour bar beside Q
        heatmap(axs[1], Sq, labels, titles[1], vmax=vmax, annotate=annotate, xlabel=xa)
        heatmap(axs[2], Sp - Sq, labels, titles[2], signed=True, annotate=annotate, xlabel=xa)
        fig.suptitle(f"2-token slice: {ya}, {xa}{cond}")
    return fig


def _as_points(results) -> list[SweepPoint]:
    pts = []
    for r in results:
        if isinstance(r, SweepPoint):
            pts.append(r)
        elif isinstance(r, Mapping):
            pts.append(SweepPoint(**{k: r[k] for k in SweepPoint.__dataclass_fields__}))
        else:
            raise TypeError(f"results must hold SweepPoint or dict entries, got {type(r).__name__}")
    if not pts:
        raise ValueError("results is empty")
    return pts


def plot_rank_sweep(results, n: int | None = None, title: str | None = None, log_kl: bool = True):
    """KL(P||Q) and expected tokens per forward versus rank, one line per method.

    ``results``: a list of :class:`SweepPoint` (or dicts with its fields), e.g. from
    :func:`rank_sweep`. ``n`` (tokens per step) draws the ceiling line on the right panel.
    Failed fits (NaN) are left out of the lines and counted in the legend.
    """
    pts = _as_points(results)
    from matplotlib import rc_context
    from matplotlib.figure import Figure

    methods = list(dict.fromkeys(p.method for p in pts))
    with rc_context(STYLE):
        fig = Figure(figsize=(MAX_WIDTH, 4.0), layout="constrained")
        ax_kl, ax_e = fig.subplots(1, 2)
        for m in methods:
            mp = sorted((p for p in pts if p.method == m), key=lambda p: p.rank)
            ok = [p for p in mp if math.isfinite(p.kl)]
            st = METHOD_STYLE.get(m, {"color": None, "marker": "o", "label": m})
            label = st["label"] + (f" ({len(mp) - len(ok)} failed)" if len(ok) < len(mp) else "")
            kls = [max(p.kl, 1e-6) if log_kl else p.kl for p in ok]
            ax_kl.plot([p.rank for p in ok], kls, marker=st["marker"], color=st["color"],
                       label=label, lw=2, ms=8)
            ax_e.plot([p.rank for p in ok], [p.tokens_per_forward for p in ok],
                      marker=st["marker"], color=st["color"], label=label, lw=2, ms=8)
        ranks = sorted({p.rank for p in pts})
        for ax in (ax_kl, ax_e):
            ax.set_xlabel("rank r")
            ax.set_xscale("log", base=2) if max(ranks) >= 8 else None
            ax.set_xticks(ranks, [str(r) for r in ranks])
            ax.grid(True, alpha=0.3)
        if log_kl:
            ax_kl.set_yscale("log")
            ax_kl.set_ylabel("KL(P || Q) [nats, floor 1e-6]")
        else:
            ax_kl.set_ylabel("KL(P || Q) [nats]")
        ax_kl.set_title("fit quality")
        ax_e.set_ylabel("expected tokens / forward")
        ax_e.set_title("self-speculative gain")
        if n is not None:
            ax_e.axhline(n, color="k", ls="--", lw=1.5, label=f"ceiling n = {n}")
        ax_kl.legend(loc="best")
        ax_e.legend(loc="lower right")
        if title:
            fig.suptitle(title)
    return fig


def plot_em_history(fit, ax=None, title: str | None = "KL(P || Q) during fitting"):
    """KL(P||Q) per iteration. ``fit``: a :class:`CPFit` or a mapping ``label -> CPFit``.

    EM fits (many history entries) are drawn as lines; tensorly fits (only a final KL) as
    horizontal dotted lines at their final KL, for comparison.
    """
    fits = {f"{fit.method} r={fit.dist.rank}": fit} if isinstance(fit, CPFit) else dict(fit)
    if not fits:
        raise ValueError("fit must be a CPFit or a non-empty mapping of CPFits")
    for k, f in fits.items():
        if not isinstance(f, CPFit):
            raise TypeError(f"fit[{k!r}] must be a CPFit, got {type(f).__name__}")
    from matplotlib import rc_context

    with rc_context(STYLE):
        fig, ax = _new_fig(ax, (8.0, 5.0))
        for k, (label, f) in enumerate(fits.items()):
            color = f"C{k % 10}"
            if len(f.history) > 1:
                ax.plot(range(len(f.history)), f.history, color=color, lw=2,
                        label=f"{label}: {f.kl:.3g}")
            else:
                ax.axhline(f.kl, color=color, ls=":", lw=2.5, label=f"{label} (final): {f.kl:.3g}")
        ax.set_xlabel("iteration")
        ax.set_ylabel("KL(P || Q) [nats]")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper right")
        if title:
            ax.set_title(title)
    return fig


def plot_gate(weights, labels: Sequence[str] | None = None, ax=None, title: str | None = "gate w"):
    """Bar chart of gate weights (r,). ``weights``: a tensor/array (r,), an unbatched CPDist, or
    a mapping ``name -> weights`` (grouped bars, e.g. prior vs posterior given x1)."""
    if isinstance(weights, Mapping):
        series = {str(k): _weights(v, f"weights[{k!r}]") for k, v in weights.items()}
    else:
        series = {"w": _weights(weights, "weights")}
    if not series:
        raise ValueError("weights is an empty mapping")
    r = next(iter(series.values())).shape[0]
    if any(w.shape[0] != r for w in series.values()):
        raise ValueError("all weight vectors in the mapping must have the same rank r")
    names = _labels(labels, r) if labels is not None else [f"expert {a}" for a in range(r)]
    from matplotlib import rc_context

    with rc_context(STYLE):
        fig, ax = _new_fig(ax, (max(5.0, 1.1 * r + 2), 4.5))
        width = 0.8 / len(series)
        for k, (name, w) in enumerate(series.items()):
            xs = [a - 0.4 + width * (k + 0.5) for a in range(r)]
            bars = ax.bar(xs, w.tolist(), width=width, color=f"C{k}", label=name)
            ax.bar_label(bars, fmt="%.2f", fontsize=MIN_FONT_PT)
        ax.set_xticks(range(r), names)
        ax.set_ylim(0, 1.12 * max(float(w.max()) for w in series.values()))
        ax.set_ylabel("weight")
        if len(series) > 1:
            ax.legend()
        if title:
            ax.set_title(title)
    return fig


def _weights(w, name: str) -> torch.Tensor:
    if isinstance(w, CPDist):
        if len(w.batch_shape):
            raise ValueError(f"{name} must be an unbatched CPDist")
        w = w.weights
    w = as_tensor(w, name)
    if w.dim() != 1:
        raise ValueError(f"{name} must have shape (r,), got {tuple(w.shape)}")
    from cptoy._checks import check_distribution

    check_distribution(w, name)
    return w


def plot_experts(dist: CPDist, labels: Sequence[str] | None = None, title: str | None = None):
    """The mixture-of-experts reading of a CP distribution: one heatmap per position s showing
    the factor rows q_{s,a} (r, V), experts labelled with their gate weight."""
    if not isinstance(dist, CPDist) or len(dist.batch_shape):
        raise TypeError("dist must be an unbatched CPDist")
    from matplotlib import rc_context
    from matplotlib.figure import Figure

    F = dist.factors.detach().to(torch.float64)  # (n, r, V)
    w = dist.weights.detach()
    n, r, V = F.shape
    labels = _labels(labels, V)
    step = max(1, math.ceil(V / 20))
    with rc_context(STYLE):
        fig = Figure(figsize=(min(3.4 * n, MAX_WIDTH), 1.0 + 0.45 * r + 1.5),
                     layout="constrained")
        axs = fig.subplots(1, n, squeeze=False)[0]
        for s in range(n):
            ax = axs[s]
            im = ax.imshow(F[s].numpy(), cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
            ax.set_xticks(range(0, V, step), [labels[i] for i in range(0, V, step)])
            ax.set_yticks(range(r), [f"{a}: w={float(w[a]):.2f}" for a in range(r)] if s == 0
                          else [str(a) for a in range(r)])
            ax.set_title(f"q(x{s + 1} | expert)")
        fig.colorbar(im, ax=list(axs), shrink=0.85)
        if title:
            fig.suptitle(title)
    return fig


# ====================================================================== make figures
# Well-known stdlib modules present (as single .py files) in Python 3.11 to 3.13: a fixed,
# deterministic code sample that does not depend on directory listing order.
STDLIB_MODULES = (
    "argparse", "ast", "base64", "bisect", "calendar", "cmd", "code", "codecs", "colorsys",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "difflib", "dis",
    "enum", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext",
    "glob", "gzip", "heapq", "hmac", "inspect", "ipaddress", "keyword", "linecache", "locale",
    "mimetypes", "netrc", "operator", "optparse", "pdb", "pickle",
)


def stdlib_code(modules: Sequence[str] = STDLIB_MODULES) -> str:
    """The source of the given stdlib modules, concatenated (read with errors="replace")."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for m in modules:
        path = root / f"{m}.py"
        if path.exists():
            parts.append(path.read_text(encoding="utf-8", errors="replace"))
    if not parts:
        raise FileNotFoundError(f"none of the stdlib modules were found under {root}")
    return "\n".join(parts)


# ====================================================================== CP heads (notebook 03)
__all__ += ["plot_joint_slices", "plot_gate_heatmap", "plot_entropy_curves"]


def plot_joint_slices(
    joints: Mapping,
    labels: Sequence[str] | None = None,
    positions: Sequence[int] = (0, 1),
    prefix: Sequence[int] | None = None,
    annotate: bool | None = None,
):
    """The same 2-token slice of several joints side by side, on one colour scale.

    ``joints``: name -> joint (V,)*n (tensor or unbatched CPDist), e.g. the exact joint, its EM
    fit and what trained heads learned. Slices as in :func:`joint_slice` (``prefix`` conditions
    on the first tokens). Returns the Figure.
    """
    if not isinstance(joints, Mapping) or not joints:
        raise ValueError("joints must be a non-empty mapping name -> joint")
    slices = {str(k): joint_slice(P, positions, prefix) for k, P in joints.items()}  # (V, V)
    shapes = {tuple(S.shape) for S in slices.values()}
    if len(shapes) != 1:
        raise ValueError(f"all joints must have the same vocabulary, got slices {sorted(shapes)}")
    V = next(iter(slices.values())).shape[0]
    labels = _labels(labels, V)
    ya, xa, cond = _slice_axis_names(positions, prefix, labels)
    vmax = max(float(S.max()) for S in slices.values())
    from matplotlib import rc_context
    from matplotlib.figure import Figure

    k = len(slices)
    with rc_context(STYLE):
        fig = Figure(figsize=(min(3.2 * k + 1.0, MAX_WIDTH), 4.4), layout="constrained")
        axs = fig.subplots(1, k, squeeze=False)[0]
        for i, (name, S) in enumerate(slices.items()):
            im = heatmap(axs[i], S, labels, name, vmax=vmax, annotate=annotate, xlabel=xa,
                          ylabel=ya if i == 0 else "", colorbar=False)
        fig.colorbar(im, ax=list(axs), shrink=0.85)
        fig.suptitle(f"2-token slice: P({ya}, {xa}{cond})")
    return fig


def plot_gate_heatmap(weights, token_labels: Sequence[str], ax=None,
                      title: str | None = "gate weights at each position"):
    """Gate weights of CP heads along a text: experts (rows) x positions (columns).

    ``weights`` (T, r), each row on the simplex (e.g. ``model.heads.gate_probs(hidden)``);
    ``token_labels`` (T,) the token at each position (the heads there predict what follows it).
    A row may be all NaN (e.g. a posterior gate where there is no next token): drawn blank.
    Returns the Figure.
    """
    W = as_tensor(weights, "weights")
    if W.dim() != 2:
        raise ValueError(f"weights must have shape (T, r), got {tuple(W.shape)}")
    T, r = W.shape
    if isinstance(token_labels, str) or len(token_labels) != T:
        raise ValueError(f"token_labels must be a sequence of T={T} strings")
    ok = ~torch.isnan(W).any(-1)
    from cptoy._checks import check_distribution

    if ok.any():
        check_distribution(W[ok], "weights", dims=1)
    from matplotlib import rc_context

    with rc_context(STYLE):
        fig, ax = _new_fig(ax, (min(0.32 * T + 3.0, MAX_WIDTH), 0.45 * r + 2.6))
        im = ax.imshow(W.T.double().numpy(), cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto",
                       interpolation="nearest")
        step = max(1, math.ceil(T / 48))  # rotated labels at least 18 px apart
        ax.set_xticks(range(0, T, step), [str(token_labels[i]) for i in range(0, T, step)],
                      rotation=90, fontsize=MIN_FONT_PT, family="monospace")
        ax.set_yticks(range(r), [str(a) for a in range(r)])
        ax.set_ylabel("expert")
        ax.set_xlabel("position (token read there)")
        ax.set_xlim(-0.5, T - 0.5)
        ax.figure.colorbar(im, ax=ax, shrink=0.85, pad=0.01)
        if title:
            ax.set_title(title)
    return fig


def plot_entropy_curves(curves: Mapping, rank: int, ax=None, smooth: int = 1,
                        title: str | None = "expert usage during training"):
    """Entropy of the mean gate usage against training step, one line per run.

    ``curves``: name -> sequence of entropies in nats (one per step, e.g. the ``expert_entropy``
    of ``MTPModel.loss``); ``rank``: r, so log r (uniform usage) is drawn dashed and 0 (one
    expert takes everything) is the floor. ``smooth`` > 1 draws a running mean over that many
    steps. Returns the Figure.
    """
    check_positive_int(rank, "rank")
    check_positive_int(smooth, "smooth")
    if not isinstance(curves, Mapping) or not curves:
        raise ValueError("curves must be a non-empty mapping name -> entropies")
    import numpy as np
    from matplotlib import rc_context

    with rc_context(STYLE):
        fig, ax = _new_fig(ax, (8.0, 4.6))
        for i, (name, ys) in enumerate(curves.items()):
            y = np.asarray(list(ys), dtype=float)
            if y.ndim != 1 or y.size == 0:
                raise ValueError(f"curves[{name!r}] must be a non-empty sequence of numbers")
            if smooth > 1 and y.size >= smooth:
                y = np.convolve(y, np.ones(smooth) / smooth, mode="valid")
            x = np.arange(y.size) + (smooth if smooth > 1 and len(list(ys)) >= smooth else 1)
            ax.plot(x, y, lw=2.5, color=f"C{i}", label=str(name))
        ax.axhline(math.log(rank), ls="--", color="black", lw=1.5,
                   label=f"log r = {math.log(rank):.2f} (uniform)")
        ax.set_ylim(-0.05, math.log(rank) * 1.12 + 0.05)
        ax.set_xlabel("training step")
        ax.set_ylabel("entropy of mean usage [nats]")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower left")
        if title:
            ax.set_title(title)
    return fig
