"""The GPT backbone: a pre-norm decoder with a KV cache, in the style of nanoGPT's model.py.

One readable file, one model class for two families. GPT-2 and the toys use LayerNorm,
learned positions, a GELU MLP and one key/value head per query head; the LLaMA family
(SmolLM2, ``cptoy.pretrained``) uses RMSNorm, rotary positions, a SwiGLU MLP and grouped-query
attention (fewer key/value heads than query heads). Each choice is a :class:`GPTConfig` field.

The model returns *hidden states* (after the final norm); ``logits`` turns them into
next-token logits through the unembedding (tied to the token embedding unless
``tie_embeddings=False``), and the CP heads of ``cptoy.heads`` read the same hidden states and
share ``unembedding``.

Shapes: B batch, T new tokens, L tokens already in the cache, C = n_embd, h = n_head,
g = n_kv_head (key/value heads), D = head_dim = C // h, V = vocab_size.

The KV cache is what self-speculative decoding needs: one forward over several drafted tokens
(T > 1) on top of a cache, and a rollback (``KVCache.truncate``) to the accepted prefix.

The model assumes no device or dtype: move it with ``.to(...)`` and wrap calls in
``torch.autocast`` as you like. GELU is the tanh approximation that GPT-2 itself uses, so that
GPT-2 weights imported with :meth:`GPT.from_hf` reproduce ``transformers``' logits.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from cptoy._checks import check_positive_int

__all__ = ["GPTConfig", "KVCache", "GPT", "PRESETS"]


# ----------------------------------------------------------------------------- config

PRESETS: dict[str, dict] = {
    # for tests: builds and runs in milliseconds
    "tiny": dict(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=32),
    # trains for about a minute on 2 CPU cores and learns something
    "toy": dict(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_embd=128),
    # nanoGPT's "baby GPT" on Shakespeare characters (about 10.7M parameters at V = 256)
    "small": dict(vocab_size=256, block_size=256, n_layer=6, n_head=6, n_embd=384),
    # GPT-2 small (124M): the shape of the OpenAI checkpoint, see GPT.from_hf
    "gpt2": dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
    # SmolLM2-135M (LLaMA architecture; weights from its GGUF file, see cptoy.pretrained)
    "smollm2-135m": dict(
        vocab_size=49152, block_size=8192, n_layer=30, n_head=9, n_embd=576, n_kv_head=3,
        bias=False, norm="rmsnorm", norm_eps=1e-5, positions="rotary", rope_base=100000.0,
        mlp="swiglu", mlp_hidden=1536,
    ),
    # the LLaMA shape at test size: builds and runs in milliseconds
    "tiny-llama": dict(
        vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=32, n_kv_head=2, bias=False,
        norm="rmsnorm", positions="rotary", mlp="swiglu", mlp_hidden=64,
    ),
}

NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rotary")
MLPS = ("gelu", "swiglu")


@dataclass
class GPTConfig:
    """Shape of a GPT backbone. Use :meth:`preset` for the named sizes."""

    vocab_size: int  # number of token ids V (256 for bytes, 50257 for GPT-2)
    block_size: int  # maximum context length: positions 0 .. block_size - 1
    n_layer: int  # number of transformer blocks
    n_head: int  # attention heads per block; must divide n_embd
    n_embd: int  # width C of the residual stream (head_dim = n_embd // n_head)
    dropout: float = 0.0  # dropout on embeddings, attention weights and residual branches
    bias: bool = True  # biases in Linear layers and LayerNorms (GPT-2 has them, LLaMA not)
    n_kv_head: int | None = None  # key/value heads (grouped-query attention); None = n_head
    norm: str = "layernorm"  # "layernorm" (GPT-2) or "rmsnorm" (LLaMA)
    norm_eps: float = 1e-5  # epsilon of every norm
    positions: str = "learned"  # "learned" (a position embedding) or "rotary" (RoPE on q, k)
    rope_base: float = 10000.0  # rotary base (theta); used only with positions="rotary"
    mlp: str = "gelu"  # "gelu" (GPT-2, tanh approximation) or "swiglu" (LLaMA)
    mlp_hidden: int | None = None  # MLP width; None = 4 * n_embd
    tie_embeddings: bool = True  # unembedding = token embedding (else a separate lm_head)

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            check_positive_int(getattr(self, name), f"GPTConfig.{name}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if self.n_kv_head is not None:
            check_positive_int(self.n_kv_head, "GPTConfig.n_kv_head")
            if self.n_head % self.n_kv_head != 0:
                raise ValueError(
                    f"GPTConfig.n_head ({self.n_head}) must be divisible by n_kv_head "
                    f"({self.n_kv_head})"
                )
        if self.mlp_hidden is not None:
            check_positive_int(self.mlp_hidden, "GPTConfig.mlp_hidden")
        for name, allowed in (("norm", NORMS), ("positions", POSITIONS), ("mlp", MLPS)):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"GPTConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}"
                )
        for name in ("norm_eps", "rope_base"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"GPTConfig.{name} must be a number > 0, got {v!r}")
        if self.positions == "rotary" and self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head_dim, got {self.head_dim}")
        if not isinstance(self.tie_embeddings, bool):
            raise TypeError(
                f"GPTConfig.tie_embeddings must be a bool, got {type(self.tie_embeddings).__name__}"
            )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise TypeError(f"GPTConfig.dropout must be a float, got {type(self.dropout).__name__}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        if not isinstance(self.bias, bool):
            raise TypeError(f"GPTConfig.bias must be a bool, got {type(self.bias).__name__}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """Key/value heads g (= n_head unless grouped-query attention)."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def hidden_dim(self) -> int:
        """Width of the MLP's hidden layer."""
        return 4 * self.n_embd if self.mlp_hidden is None else self.mlp_hidden

    @classmethod
    def preset(cls, name: str, **overrides) -> GPTConfig:
        """A named size (``"tiny"``, ``"toy"``, ``"small"``, ``"gpt2"``, ``"smollm2-135m"``,
        ``"tiny-llama"``) with fields overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(
                f"unknown GPTConfig field(s) {unknown}; expected some of {sorted(known)}"
            )
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- KV cache


class KVCache:
    """Keys and values of every layer for the tokens seen so far, shape (B, g, L, D) each
    (g = key/value heads; rotary keys are stored already rotated).

    Storage is allocated on the first write (device and dtype of the first keys) and grows by
    doubling up to ``max_length`` (the model's block size). ``length`` is the number of valid
    positions; :meth:`truncate` rolls back by just lowering it, the stale entries are
    overwritten by the next forward.
    """

    def __init__(self, n_layer: int, batch_size: int, n_head: int, head_dim: int, max_length: int):
        self.n_layer = check_positive_int(n_layer, "n_layer")
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.n_head = check_positive_int(n_head, "n_head")
        self.head_dim = check_positive_int(head_dim, "head_dim")
        self.max_length = check_positive_int(max_length, "max_length")
        self.length = 0  # number of valid positions, the same in every layer
        self._k: list[torch.Tensor | None] = [None] * n_layer  # (B, h, capacity, D)
        self._v: list[torch.Tensor | None] = [None] * n_layer

    @property
    def capacity(self) -> int:
        """Positions allocated so far (0 before the first forward)."""
        return 0 if self._k[0] is None else self._k[0].shape[2]

    def truncate(self, length: int) -> None:
        """Roll back to the first ``length`` positions (0 <= length <= self.length)."""
        if isinstance(length, bool) or not isinstance(length, int):
            raise TypeError(f"length must be an int, got {type(length).__name__}")
        if not 0 <= length <= self.length:
            raise ValueError(
                f"length must be in [0, {self.length}] (the cached length), got {length}"
            )
        self.length = length

    def expand(self, batch_size: int, extra: int = 0) -> KVCache:
        """A new cache of ``batch_size`` rows, each a copy of this one-row cache's ``length``
        positions, with room for ``extra`` more (e.g. to score many continuations of one
        context in one batched forward)."""
        check_positive_int(batch_size, "batch_size")
        if self.batch_size != 1:
            raise ValueError(f"expand needs a one-row cache, this one has {self.batch_size}")
        new = KVCache(self.n_layer, batch_size, self.n_head, self.head_dim, self.max_length)
        L = self.length
        for store, out in ((self._k, new._k), (self._v, new._v)):
            for i, s in enumerate(store):  # s (1, g, capacity, D)
                if s is None:
                    continue
                t = s.new_zeros(batch_size, s.shape[1], min(L + extra, self.max_length),
                                s.shape[3])
                t[:, :, :L] = s[:, :, :L]
                out[i] = t
        new.length = L
        return new

    def _ensure(self, layer: int, needed: int, like: torch.Tensor) -> None:
        k = self._k[layer]
        if k is not None and k.shape[2] >= needed:
            return
        cap = max(needed, 64) if k is None else max(needed, 2 * k.shape[2])
        cap = min(cap, self.max_length)
        shape = (self.batch_size, self.n_head, cap, self.head_dim)
        new_k = torch.zeros(shape, dtype=like.dtype, device=like.device)
        new_v = torch.zeros(shape, dtype=like.dtype, device=like.device)
        if k is not None:
            new_k[:, :, : self.length] = k[:, :, : self.length]
            new_v[:, :, : self.length] = self._v[layer][:, :, : self.length]
        self._k[layer], self._v[layer] = new_k, new_v

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys/values (B, g, T, D) of ``layer`` at positions length .. length+T-1
        and return all of them, (B, g, length + T, D). ``length`` itself moves on in
        :meth:`advance` once every layer has written."""
        T = k.shape[2]
        end = self.length + T
        if end > self.max_length:
            raise ValueError(
                f"cache holds {self.length} tokens; {T} more exceed max_length {self.max_length}"
            )
        self._ensure(layer, end, k)
        ck, cv = self._k[layer], self._v[layer]
        ck[:, :, self.length : end] = k
        cv[:, :, self.length : end] = v
        return ck[:, :, :end].to(k.dtype), cv[:, :, :end].to(v.dtype)

    def advance(self, T: int) -> None:
        self.length += T

    def __repr__(self) -> str:
        return (
            f"KVCache(length={self.length}, batch_size={self.batch_size}, n_layer={self.n_layer}, "
            f"capacity={self.capacity}, max_length={self.max_length})"
        )


# ----------------------------------------------------------------------------- blocks

# scaled_dot_product_attention takes grouped-query key/values as they are from torch 2.5 on
_SDPA_GQA = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 5)


def make_norm(config: GPTConfig) -> nn.Module:
    """The config's norm over the channel dimension: LayerNorm (GPT-2) or RMSNorm (LLaMA)."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


class Rotary(nn.Module):
    """Rotary position embedding (RoFormer; LLaMA's half-split layout): channel i of a head is
    rotated together with channel i + D/2 by the angle pos * base^(-2i/D)."""

    def __init__(self, head_dim: int, base: float, max_length: int):
        super().__init__()
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(max_length, dtype=torch.float64), inv_freq)  # (P, D/2)
        self.register_buffer("cos", angles.cos().float(), persistent=False)  # (P, D/2)
        self.register_buffer("sin", angles.sin().float(), persistent=False)  # (P, D/2)

    def forward(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Rotate x (B, heads, T, D) whose tokens sit at positions start .. start + T - 1."""
        T, half = x.shape[2], x.shape[3] // 2
        cos = self.cos[start : start + T].to(x.dtype)  # (T, D/2)
        sin = self.sin[start : start + T].to(x.dtype)  # (T, D/2)
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.kv_heads
        self.head_dim = config.head_dim
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        kv_width = self.n_kv_head * self.head_dim
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + 2 * kv_width, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, rotary=None
    ) -> torch.Tensor:
        B, T, C = x.shape
        h, g, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.c_attn(x).split([C, g * D, g * D], dim=2)
        q = q.view(B, T, h, D).transpose(1, 2)  # (B, h, T, D)
        k = k.view(B, T, g, D).transpose(1, 2)  # (B, g, T, D)
        v = v.view(B, T, g, D).transpose(1, 2)  # (B, g, T, D)
        L = 0 if cache is None else cache.length
        if rotary is not None:
            q, k = rotary(q, L), rotary(k, L)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, g, L + T, D)
        gqa = {}
        if g != h:  # grouped-query attention: each key/value head serves h / g query heads
            if _SDPA_GQA:
                gqa = {"enable_gqa": True}  # no copy of the cache (as fast as h == g)
            else:  # torch < 2.5
                k = k.repeat_interleave(h // g, dim=1)  # (B, h, L + T, D)
                v = v.repeat_interleave(h // g, dim=1)
        dropout_p = self.dropout if self.training else 0.0
        if L == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True,
                                               **gqa)
        elif T == 1:
            # one new token sees the whole cache and itself: no mask
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, **gqa)
        else:
            # new token i sits at position L + i and sees keys 0 .. L + i.
            # (is_causal=True would align the mask to the top left, which is wrong here.)
            mask = torch.ones(T, L + T, dtype=torch.bool, device=x.device).tril(diagonal=L)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                               **gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """GELU: c_proj(gelu(c_fc x)). SwiGLU: c_fc computes [gate; up] in one matmul, then
    c_proj(silu(gate) * up)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        hidden = config.hidden_dim
        self.c_fc = nn.Linear(config.n_embd, (2 if self.swiglu else 1) * hidden, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            gate, up = self.c_fc(x).chunk(2, dim=-1)  # (B, T, hidden) each
            return self.dropout(self.c_proj(F.silu(gate) * up))
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, rotary=None
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer, rotary)
        x = x + self.mlp(self.ln_2(x))
        return x


# ----------------------------------------------------------------------------- the model


class GPT(nn.Module):
    """Pre-norm decoder-only transformer. ``forward`` returns hidden states, not logits."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embedding
        if config.positions == "learned":
            self.wpe = nn.Embedding(config.block_size, config.n_embd)  # learned positions
        else:
            self.rotary = Rotary(config.head_dim, config.rope_base, config.block_size)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = make_norm(config)
        if not config.tie_embeddings:
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.packed_logits = None  # (..., C) -> (..., V) replacing F.linear (pretrained.pack_for_verify)

        # nanoGPT init: N(0, 0.02) everywhere, zero biases, and the projections that write into
        # the residual stream scaled down by sqrt(2 * n_layer) (GPT-2 paper).
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # ------------------------------------------------------------------ basics
    @property
    def unembedding(self) -> nn.Parameter:
        """The (V, C) output matrix (the token embedding when tied), shared with the CP heads."""
        return self.wte.weight if self.config.tie_embeddings else self.lm_head.weight

    def num_params(self, non_embedding: bool = False) -> int:
        """Number of parameters (the tied embedding counted once).

        ``non_embedding=True`` leaves out the token and the position embeddings (the Kaplan et
        al. convention; nanoGPT leaves out only the positions)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel()
            if self.config.positions == "learned":
                n -= self.wpe.weight.numel()
        return n

    def new_cache(self, batch_size: int = 1) -> KVCache:
        """An empty KV cache for this model (allocated lazily on the first forward)."""
        c = self.config
        return KVCache(c.n_layer, batch_size, c.kv_heads, c.head_dim, c.block_size)

    # ------------------------------------------------------------------ forward
    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Hidden states after the final norm.

        idx: (B, T) token ids. With ``cache`` (holding L tokens) the new tokens take positions
        L .. L+T-1, attend to the cache and causally to each other, and their keys/values are
        appended (``cache.length`` becomes L + T). Returns (B, T, n_embd).
        """
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2:
            shape = tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise ValueError(f"idx must be a (B, T) tensor of token ids, got {shape}")
        if idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"idx must hold integer token ids (int64), got dtype {idx.dtype}")
        B, T = idx.shape
        if T == 0:
            raise ValueError("idx must hold at least one token (T >= 1)")
        if idx.device.type == "cpu":  # a cheap check here; on an accelerator it would sync
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(
                    f"idx holds ids in [{lo}, {hi}]; expected [0, {self.config.vocab_size})"
                )
        L = 0
        if cache is not None:
            if not isinstance(cache, KVCache):
                raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
            if cache.batch_size != B:
                raise ValueError(f"cache has batch_size {cache.batch_size} but idx has B = {B}")
            c = self.config
            if (cache.n_layer, cache.n_head, cache.head_dim) != (c.n_layer, c.kv_heads, c.head_dim):
                raise ValueError("cache was made for a different model (use model.new_cache())")
            L = cache.length
        if L + T > self.config.block_size:
            what = "prompt longer than the block" if L == 0 else "sequence would outgrow the block"
            raise ValueError(
                f"{what}: {L} cached + {T} new tokens > block_size {self.config.block_size}"
            )
        x = self.wte(idx)  # (B, T, C)
        rotary = None
        if self.config.positions == "learned":
            x = x + self.wpe(torch.arange(L, L + T, dtype=torch.long, device=idx.device))
        else:
            rotary = self.rotary
        x = self.drop(x)
        for i, block in enumerate(self.h):
            x = block(x, cache, i, rotary)
        if cache is not None:
            cache.advance(T)
        return self.ln_f(x)  # (B, T, C)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits (..., V) from hidden states (..., C), through the unembedding."""
        if self.packed_logits is not None:  # the same matrix in a faster layout
            return self.packed_logits(hidden)
        return F.linear(hidden, self.unembedding)

    @torch.no_grad()
    def generate_greedy(
        self, idx: torch.Tensor, max_new_tokens: int, use_cache: bool = True
    ) -> torch.Tensor:
        """Reference greedy decoding: (B, T) -> (B, T + max_new_tokens).

        ``use_cache=False`` recomputes the whole sequence every step (the slow, obvious way)."""
        check_positive_int(max_new_tokens, "max_new_tokens", minimum=0)
        out = idx
        if max_new_tokens == 0:
            return out
        if not use_cache:
            for _ in range(max_new_tokens):
                nxt = self.logits(self(out)[:, -1]).argmax(-1, keepdim=True)  # (B, 1)
                out = torch.cat([out, nxt], dim=1)
            return out
        cache = self.new_cache(idx.shape[0])
        h = self(idx, cache)[:, -1]  # (B, C)
        for i in range(max_new_tokens):
            nxt = self.logits(h).argmax(-1, keepdim=True)  # (B, 1)
            out = torch.cat([out, nxt], dim=1)
            if i + 1 < max_new_tokens:
                h = self(nxt, cache)[:, -1]
        return out

    # ------------------------------------------------------------------ GPT-2 import
    @classmethod
    def from_hf(cls, model_or_path) -> GPT:
        """Import GPT-2 weights from a ``transformers`` GPT2LMHeadModel (or GPT2Model), or from a
        directory saved with ``save_pretrained``. Needs the optional ``transformers`` package;
        nothing is downloaded (``local_files_only``)."""
        try:
            import transformers
        except ImportError as exc:
            raise ImportError(
                "GPT.from_hf needs the optional 'transformers' package: pip install 'cptoy[hf]'"
            ) from exc
        if isinstance(model_or_path, (str, os.PathLike)):
            hf = transformers.GPT2LMHeadModel.from_pretrained(
                os.fspath(model_or_path), local_files_only=True
            )
        elif isinstance(model_or_path, nn.Module) and hasattr(model_or_path, "config"):
            hf = model_or_path
        else:
            raise TypeError(
                "model_or_path must be a transformers GPT2 model or a path to a saved one, "
                f"got {type(model_or_path).__name__}"
            )
        hc = hf.config
        if getattr(hc, "model_type", None) != "gpt2":
            raise ValueError(
                f"expected a GPT-2 model, got model_type {getattr(hc, 'model_type', None)!r}"
            )
        if hc.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(
                f"only tanh-GELU GPT-2 models are supported, got {hc.activation_function!r}"
            )
        if getattr(hc, "n_inner", None) not in (None, 4 * hc.n_embd):
            raise ValueError(f"only n_inner = 4 * n_embd is supported, got {hc.n_inner}")
        if getattr(hc, "scale_attn_by_inverse_layer_idx", False) or not getattr(
            hc, "scale_attn_weights", True
        ):
            raise ValueError(
                "only standard GPT-2 attention scaling (1/sqrt(head_dim)) is supported"
            )
        if abs(hc.layer_norm_epsilon - 1e-5) > 1e-12:
            raise ValueError(
                f"only layer_norm_epsilon = 1e-5 is supported, got {hc.layer_norm_epsilon}"
            )
        n_pos = getattr(hc, "n_positions", None) or hc.n_ctx
        config = GPTConfig(
            vocab_size=hc.vocab_size,
            block_size=n_pos,
            n_layer=hc.n_layer,
            n_head=hc.n_head,
            n_embd=hc.n_embd,
            dropout=0.0,
            bias=True,
        )
        model = cls(config)

        sd_hf = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()}
        sd = model.state_dict()
        # HF's Conv1D stores weights as (in, out); nn.Linear wants (out, in).
        transposed = (
            "attn.c_attn.weight",
            "attn.c_proj.weight",
            "mlp.c_fc.weight",
            "mlp.c_proj.weight",
        )
        with torch.no_grad():
            for k, target in sd.items():
                if k not in sd_hf:
                    raise ValueError(f"the GPT-2 state dict has no {k!r}")
                src = sd_hf[k]
                if k.endswith(transposed):
                    src = src.t()
                if tuple(src.shape) != tuple(target.shape):
                    raise ValueError(
                        f"{k}: GPT-2 shape {tuple(src.shape)} != ours {tuple(target.shape)}"
                    )
                target.copy_(src)
        if "lm_head.weight" in sd_hf and not torch.equal(
            sd_hf["lm_head.weight"], sd_hf["wte.weight"]
        ):
            raise ValueError(
                "the GPT-2 model's lm_head is not tied to wte; cptoy needs tied weights"
            )
        return model
