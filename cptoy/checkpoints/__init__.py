"""Demo checkpoints shipped inside the package (each file at most 8 MB, half precision).

Rank-1 and rank-r CP heads share one frozen backbone per corpus, so acceptance differences come
from the heads alone; ``<corpus>_x1`` holds only first-token heads (``cptoy.firsttoken``) trained
on that same backbone, which it loads from ``<corpus>_r1``. Reproduce them with ``make checkpoints`` (see ``cptoy/recipes.py``).

    from cptoy import checkpoints
    model, tokenizer, metrics = checkpoints.load("code_r8")   # or a path to any such file
"""

from __future__ import annotations

from pathlib import Path

from cptoy.persist import SHIPPED, read_torch_file, resolve, shipped_names, shipped_path

HERE = SHIPPED


def available() -> list[str]:
    """Names of the checkpoints present in the package folder, e.g. ``["code_r1", "code_r8"]``."""
    return shipped_names()


def path(name: str) -> Path:
    """The file of checkpoint ``name``; ``ValueError`` listing what exists if it is unknown."""
    return shipped_path(name)


def load(name, device: str | None = None, backbone=None):
    """Load a checkpoint, shipped (by name) or any file (a path): returns ``(model, tokenizer,
    metrics)`` with the model in eval mode.

    ``<corpus>_r<rank>`` (any ``MTPModel.save`` file): an ``MTPModel`` (backbone + CP heads);
    ``<corpus>_x1`` (any ``FirstTokenModel.save`` file): a ``cptoy.firsttoken.FirstTokenModel``
    on ``backbone`` when given, else on the backbone of the MTP checkpoint it names.
    ``smollm2_*`` (``cptoy.headtrain.save_heads`` files): heads only on the real SmolLM2-135M
    backbone, loaded with ``cptoy.pretrained.load`` unless ``backbone`` (a model from it) is
    given, so that several heads can share one loaded backbone; its file's fingerprint is
    checked.
    """
    from cptoy.data import tokenizer_from_dict
    from cptoy.firsttoken import FirstTokenModel, is_first_token_checkpoint
    from cptoy.heads import MTPModel
    from cptoy.headtrain import is_heads_checkpoint, load_heads

    file = resolve(name)
    if is_heads_checkpoint(file):
        from cptoy import pretrained

        tok = None
        if backbone is None:
            backbone, tok = pretrained.load(read_torch_file(file)["backbone"]["name"])
        model = load_heads(file, backbone)  # checks the backbone's fingerprint first
        if tok is None:
            tok = pretrained.tokenizer_from_gguf(pretrained.read_gguf(backbone.source))
        if device is not None:
            model = model.to(device)
        return model.eval(), tok, model.metrics
    if is_first_token_checkpoint(file):
        model = FirstTokenModel.load(file, backbone)
    else:
        model = MTPModel.load(file)
    if device is not None:
        model = model.to(device)
    tok = tokenizer_from_dict(model.tokenizer_dict) if model.tokenizer_dict else None
    model.eval()
    return model, tok, model.metrics
