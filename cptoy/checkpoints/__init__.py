"""Demo checkpoints shipped inside the package (each file at most 8 MB, half precision).

Rank-1 and rank-r CP heads share one frozen backbone per corpus, so acceptance differences come
from the heads alone; ``<corpus>_x1`` holds only first-token heads (``cptoy.firsttoken``) trained
on that same backbone, which it loads from ``<corpus>_r1``. Reproduce them with ``make checkpoints`` (see ``cptoy/recipes.py``).

    from cptoy import checkpoints
    model, tokenizer, metrics = checkpoints.load("code_r8")
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def available() -> list[str]:
    """Names of the checkpoints present in the package folder, e.g. ``["code_r1", "code_r8"]``."""
    return sorted(p.stem for p in HERE.glob("*.pt"))


def path(name: str) -> Path:
    """The file of checkpoint ``name``; ``ValueError`` listing what exists if it is unknown."""
    p = HERE / f"{name}.pt"
    if not p.is_file():
        raise ValueError(f"unknown checkpoint {name!r}; available: {available()}")
    return p


def load(name: str, device: str | None = None, backbone=None):
    """Load a shipped checkpoint: returns ``(model, tokenizer, metrics)`` with the model in eval mode.

    ``<corpus>_r<rank>``: an ``MTPModel`` (backbone + CP heads); ``<corpus>_x1``: a
    ``cptoy.firsttoken.FirstTokenModel`` (heads that read x_1, on the rank-1 file's backbone).
    ``smollm2_*``: heads only (``cptoy.headtrain``) on the real SmolLM2-135M backbone, loaded
    with ``cptoy.pretrained.load`` unless ``backbone`` (a model from it) is given, so that
    several heads can share one loaded backbone; its file's fingerprint is checked.
    """
    from cptoy.data import tokenizer_from_dict
    from cptoy.firsttoken import FirstTokenModel, is_first_token_checkpoint
    from cptoy.heads import MTPModel
    from cptoy.headtrain import is_heads_checkpoint, load_heads

    file = path(name)
    if is_heads_checkpoint(file):
        from cptoy import pretrained

        tok = None
        if backbone is None:
            from cptoy.heads import read_torch_file

            backbone, tok = pretrained.load(read_torch_file(file)["backbone"]["name"])
        model = load_heads(file, backbone)  # checks the backbone's fingerprint first
        if tok is None:
            tok = pretrained.tokenizer_from_gguf(pretrained.read_gguf(backbone.source))
        if device is not None:
            model = model.to(device)
        return model.eval(), tok, model.metrics
    model = (FirstTokenModel if is_first_token_checkpoint(file) else MTPModel).load(file)
    if device is not None:
        model = model.to(device)
    tok = tokenizer_from_dict(model.tokenizer_dict) if model.tokenizer_dict else None
    model.eval()
    return model, tok, model.metrics
