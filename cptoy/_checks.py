"""Input validation shared by every module: clear errors that name the argument."""

from __future__ import annotations

import math

import torch

PROB_ATOL = 1e-5  # a distribution must sum to 1 within this (relative to its size, see below)


def as_tensor(x, name: str, dtype=torch.float64) -> torch.Tensor:
    """Convert ``x`` to a floating tensor or raise ``TypeError`` naming ``name``."""
    if isinstance(x, torch.Tensor):
        t = x
    else:
        try:
            import numpy as np

            if isinstance(x, np.ndarray):
                t = torch.from_numpy(x)
            else:
                t = torch.as_tensor(x)
        except Exception as exc:  # pragma: no cover - message is the point
            raise TypeError(
                f"{name} must be a torch tensor or array-like, got {type(x).__name__}"
            ) from exc
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{name} must hold real numbers, got dtype {t.dtype}")
    return t.to(dtype) if dtype is not None else t


def check_finite(t: torch.Tensor, name: str) -> None:
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or inf")


def check_distribution(
    t: torch.Tensor, name: str, dims: int | None = None, atol: float = PROB_ATOL
) -> None:
    """``t`` must be finite, nonnegative and sum to 1 over its last ``dims`` dims (all if None)."""
    check_finite(t, name)
    if (t < 0).any():
        raise ValueError(
            f"{name} has negative entries (min {t.min().item():.3g}); expected probabilities"
        )
    dims = t.dim() if dims is None else dims
    s = t.sum(dim=tuple(range(t.dim() - dims, t.dim()))) if dims > 0 else t
    if not torch.allclose(s, torch.ones_like(s), atol=atol, rtol=0):
        worst = (s - 1).abs().max().item()
        raise ValueError(f"{name} must sum to 1 (tolerance {atol:g}); it is off by {worst:.3g}")


def check_cubical(t: torch.Tensor, name: str) -> tuple[int, int]:
    """A joint over n tokens has shape (V,)*n. Returns (n, V)."""
    if t.dim() < 1:
        raise ValueError(f"{name} must have at least one axis, got a scalar")
    V = t.shape[0]
    if any(s != V for s in t.shape):
        raise ValueError(f"{name} must have shape (V,)*n with equal axes, got {tuple(t.shape)}")
    return t.dim(), V


def check_joint(P, name: str = "P") -> torch.Tensor:
    """Validate an exact joint (V,)*n: float64, nonnegative, finite, sums to 1."""
    P = as_tensor(P, name)
    check_cubical(P, name)
    check_distribution(P, name)
    return P


def check_positive_int(x, name: str, minimum: int = 1) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if x < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {x}")
    return x


def check_same_shape(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def check_nonneg_number(x, name: str) -> float:
    """A finite real number >= 0 (bools rejected); ``ValueError`` naming ``name`` otherwise."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {x!r}")
    return float(x)
