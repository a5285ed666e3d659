"""What every checkpoint format of cptoy shares: reading a file, writing it atomically, naming
the shipped ones, and fingerprinting a backbone.

The formats themselves belong to their models (``MTPModel.save`` / ``.load`` in
``cptoy.heads``, ``FirstTokenModel.save`` / ``.load`` in ``cptoy.firsttoken``,
``save_heads`` / ``load_heads`` in ``cptoy.headtrain``); ``cptoy.checkpoints.load(name | path)``
loads any of them. This module sits below all of them and imports only torch.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

__all__ = ["SHIPPED", "read_torch_file", "atomic_save", "shipped_path", "resolve",
           "module_fingerprint"]

SHIPPED = Path(__file__).resolve().parent / "checkpoints"  # the checkpoints in the package


def read_torch_file(path) -> object:
    """``torch.load`` of a checkpoint file (CPU, weights only); ValueError naming the file when
    it is missing or not a torch file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"checkpoint {path!r} is corrupt or not a torch file: {type(exc).__name__}: {exc}"
        ) from exc


def atomic_save(obj, path) -> None:
    """``torch.save`` to ``path`` through a temporary file, so a reader never sees half a file;
    creates the folder if needed."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def shipped_names() -> list[str]:
    """Names of the checkpoints shipped in the package, e.g. ``["code_r1", "code_r8"]``."""
    return sorted(p.stem for p in SHIPPED.glob("*.pt"))


def shipped_path(name: str) -> Path:
    """The file of shipped checkpoint ``name``; ValueError listing what exists if unknown."""
    p = SHIPPED / f"{name}.pt"
    if not p.is_file():
        raise ValueError(f"unknown checkpoint {name!r}; available: {shipped_names()}")
    return p


def resolve(name_or_path) -> Path:
    """A checkpoint file: ``name_or_path`` itself when it is an existing file (str or Path),
    else the shipped checkpoint of that name."""
    if isinstance(name_or_path, Path) or (
            isinstance(name_or_path, str) and os.path.isfile(name_or_path)):
        p = Path(name_or_path)
        if not p.is_file():
            raise ValueError(f"checkpoint {os.fspath(p)!r} does not exist")
        return p
    if not isinstance(name_or_path, str):
        raise TypeError(f"name_or_path must be a str or Path, got {type(name_or_path).__name__}")
    return shipped_path(name_or_path)


def module_fingerprint(module: torch.nn.Module) -> str:
    """sha256 of a module's state dict rounded to half precision (identifies a backbone)."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().to("cpu", torch.float16).numpy().tobytes())
    return h.hexdigest()
