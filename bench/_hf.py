"""Shared by the SmolLM2 bench scripts: transformers on the same GGUF file, as the peer."""

from __future__ import annotations

import contextlib
import io
import time
import warnings
from pathlib import Path

import torch


def load_hf(path: Path):
    """transformers' LlamaForCausalLM from the same GGUF file, float32, eval, no eos stop."""
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):  # tqdm bar
        warnings.simplefilter("ignore")
        hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                  dtype=torch.float32)
    hf.eval()
    for p in hf.parameters():
        p.requires_grad_(False)
    hf.generation_config.eos_token_id = None  # decode exactly max_new_tokens, as cptoy does
    return hf


class ForwardTimer:
    """Forward hooks on the transformers model: the number of forward calls and their times."""

    def __init__(self, module):
        self.times: list[float] = []
        self._t0 = 0.0
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _pre(self, module, args):
        self._t0 = time.perf_counter()

    def _post(self, module, args, out):
        self.times.append(time.perf_counter() - self._t0)

    def reset(self) -> None:
        self.times = []
