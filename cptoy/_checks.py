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


def check_prompt_ids(prompt_ids, vocab_size: int) -> list[int]:
    if isinstance(prompt_ids, torch.Tensor):
        t = prompt_ids
        if t.dim() == 2:
            if t.shape[0] != 1:
                raise ValueError(
                    f"prompt_ids must be one sequence (batch size 1), got shape {tuple(t.shape)}"
                )
            t = t[0]
        if t.dim() != 1:
            raise ValueError(f"prompt_ids must have shape (T,) or (1, T), got {tuple(t.shape)}")
        if t.is_floating_point() or t.dtype == torch.bool:
            raise TypeError(f"prompt_ids must hold integer token ids, got dtype {t.dtype}")
        ids = [int(v) for v in t.tolist()]
    elif isinstance(prompt_ids, (list, tuple)):
        ids = []
        for v in prompt_ids:
            if isinstance(v, bool) or not isinstance(v, int) and not hasattr(v, "__index__"):
                raise TypeError(f"prompt_ids must hold ints, got {type(v).__name__}")
            ids.append(int(v))
    else:
        raise TypeError(
            f"prompt_ids must be a list of ints or a 1-D tensor, got {type(prompt_ids).__name__}"
        )
    if not ids:
        raise ValueError("prompt_ids is empty; give at least one token")
    bad = [v for v in ids if not 0 <= v < vocab_size]
    if bad:
        raise ValueError(f"prompt_ids holds ids outside [0, {vocab_size}), e.g. {bad[0]}")
    return ids


def check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    t = float(temperature)
    if not math.isfinite(t) or t < 0:
        raise ValueError(
            f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}"
        )
    return t


def check_token_ids(ids, vocab_size: int, name: str = "ids") -> torch.Tensor:
    """A 1-D int64 CPU tensor of token ids in [0, vocab_size)."""
    if isinstance(ids, (list, tuple)):
        if any(isinstance(v, bool) or not isinstance(v, int) for v in ids):
            raise TypeError(f"{name} must hold ints")
        ids = torch.tensor(ids, dtype=torch.long)
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a 1-D LongTensor (or a list of ints), "
                        f"got {type(ids).__name__}")
    if ids.dim() != 1:
        raise ValueError(f"{name} must be 1-D (T,), got shape {tuple(ids.shape)}")
    if ids.is_floating_point() or ids.dtype == torch.bool or ids.is_complex():
        raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    ids = ids.to("cpu", torch.long)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"{name} holds ids outside [0, {vocab_size})")
    return ids

