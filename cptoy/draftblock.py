"""A draft block: one transformer block that drafts by chaining on its own features (EAGLE-style).

CP heads and first-token heads draft every position j = 2..n from h_t (and x_1) alone: position
4 never sees what was drafted at 2 and 3. EAGLE (Li et al., 2024) drafts autoregressively one
level down, on the backbone's *features*: a single decoder block reads the pair (feature,
next token) and predicts the next feature, which the backbone's own unembedding turns into a
distribution over the next token:

    z_0 = W [h_t ; E x_{t+1}]            f_1 = block(z_0)         q_2 = softmax(U f_1)
    z_1 = W [f_1 ; E d_2]                f_2 = block(z_0, z_1)    q_3 = softmax(U f_2)
    ...

with E and U the backbone's token embedding and unembedding (shared, frozen), W a (d, 2d)
fusion layer and ``block`` one pre-norm decoder block (attention over the chain z_0..z_j,
rotary positions 0..j, SwiGLU MLP) with a final norm. Each q_{j+1} conditions on h_t, x_1 and
the drafts before it, so drafts are correlated the way the backbone's tokens are.

Here the chain starts at h_t: the block attends over the drafted chain only, not over the
context's earlier features (EAGLE keeps a cache of those), so it drafts through the same
interface as the other heads (h_t, x_1 -> k drafts and their q) and costs k block steps on
1..k positions plus k unembeddings over the drafting shortlist.

Training (``cptoy.headtrain``, ``kind="block"``) unrolls the chain on its own features (the
"training-time test" of EAGLE-3): only h_t is the backbone's; the tokens fed in are the true
x_{t+1..}; the loss is the same self-distillation KL as for the other heads, at every drafted
position. Drafting is lossless like any drafter: q_j is the conditional the draft came from.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from cptoy._checks import check_positive_int
from cptoy.cp import CPDist
from cptoy.heads import DraftingHeads, DraftStep
from cptoy.model import GPT, MLP, GPTConfig, Rotary, make_norm

__all__ = ["DraftBlockHeads", "DraftBlockModel"]


class DraftBlockHeads(DraftingHeads):
    """One decoder block drafting positions 2..n from h (B, d), x_1 and its own features.

    Args:
        config: the backbone's :class:`GPTConfig` (width, heads, norm, MLP kind, rotary base).
        n_future: n >= 2; the block drafts positions 2..n (chains of up to n - 1 steps).
        embedding: the backbone's (V, d) token embedding E (shared when an ``nn.Parameter``).
        unembedding: the backbone's (V, d) output matrix U (shared likewise).
        mlp_hidden: the block's MLP width (default: the backbone's).
    """

    rank = 1  # q_j is one distribution per position (given the chain): no gate

    def __init__(self, config: GPTConfig, n_future: int, embedding: torch.Tensor,
                 unembedding: torch.Tensor, mlp_hidden: int | None = None):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        self.n_future = check_positive_int(n_future, "n_future")
        if n_future < 2:
            raise ValueError(f"n_future must be >= 2 (the block drafts positions 2..n), "
                             f"got {n_future}")
        if mlp_hidden is not None:
            check_positive_int(mlp_hidden, "mlp_hidden")
        self.d_model, self.vocab_size = config.n_embd, config.vocab_size
        self.mlp_hidden = mlp_hidden or config.hidden_dim
        cfg = GPTConfig(**{**config.to_dict(), "n_layer": 1, "dropout": 0.0,
                           "mlp_hidden": self.mlp_hidden, "block_size": n_future})
        self.config = cfg
        d, g, D = cfg.n_embd, cfg.kv_heads, cfg.head_dim
        self._attach("embedding", embedding, (cfg.vocab_size, d))
        self._attach("unembedding", unembedding, (cfg.vocab_size, d))
        self.fuse = nn.Linear(2 * d, d, bias=False)  # W: [feature; E token] -> d
        self.ln_1 = make_norm(cfg)
        self.c_attn = nn.Linear(d, d + 2 * g * D, bias=cfg.bias)
        self.c_proj = nn.Linear(d, d, bias=cfg.bias)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.ln_f = make_norm(cfg)
        self.rotary = Rotary(D, cfg.rope_base, n_future) if cfg.positions == "rotary" else None
        self._init_weights()
        self._init_shortlist()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """Small random block; the fusion starts as 'the feature itself' (identity on h)."""
        d = self.d_model
        for m in (self.c_attn, self.c_proj, self.mlp.c_fc, self.mlp.c_proj):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        self.fuse.weight.zero_()
        self.fuse.weight[:, :d] = torch.eye(d)
        self.fuse.weight[:, d:].normal_(std=0.02)

    @property
    def embedding(self) -> torch.Tensor:
        """The shared (V, d) token embedding E."""
        return self._attached("embedding")

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, vocab_size={self.vocab_size}, "
                f"n_future={self.n_future}, mlp_hidden={self.mlp_hidden}")

    def num_params(self) -> int:
        """Parameters owned by the block (the shared E and U not counted)."""
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ one chain step
    def step(self, feature: torch.Tensor, token: torch.Tensor, past: tuple | None):
        """Append (feature (N, d), token (N,)) at chain position j = len(past); returns the
        next feature f_{j+1} (N, d) and the chain's keys/values (N, g, j + 1, D) each."""
        N, d = feature.shape
        h, g, D = self.config.n_head, self.config.kv_heads, self.config.head_dim
        j = 0 if past is None else past[0].shape[2]
        z = self.fuse(torch.cat([feature, self.embedding[token]], dim=-1))[:, None]  # (N, 1, d)
        q, k, v = self.c_attn(self.ln_1(z)).split([d, g * D, g * D], dim=-1)
        q = q.view(N, 1, h, D).transpose(1, 2)  # (N, h, 1, D)
        k = k.view(N, 1, g, D).transpose(1, 2)  # (N, g, 1, D)
        v = v.view(N, 1, g, D).transpose(1, 2)
        if self.rotary is not None:
            q, k = self.rotary(q, j), self.rotary(k, j)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        kk, vv = k, v
        if g != h:  # grouped-query attention (a chain of <= n keys: the copy is tiny)
            kk, vv = k.repeat_interleave(h // g, dim=1), v.repeat_interleave(h // g, dim=1)
        y = F.scaled_dot_product_attention(q, kk, vv)  # (N, h, 1, D): the new step sees all
        z = z + self.c_proj(y.transpose(1, 2).reshape(N, 1, d))
        z = z + self.mlp(self.ln_2(z))
        return self.ln_f(z)[:, 0], (k, v)  # (N, d)

    def chain_logits(self, hidden: torch.Tensor, tokens: torch.Tensor,
                     vocab: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (N, m, V or K) of positions 2..m+1 given h (N, d) and the chain's tokens
        x_1..x_m (N, m) (teacher forcing on tokens, own features; differentiable)."""
        hidden = self._check_hidden(hidden, dims=2)
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or \
                tokens.shape[0] != hidden.shape[0] or not 1 <= tokens.shape[1] <= self.n_future - 1:
            raise ValueError(f"tokens must be (N, m) token ids with N = {hidden.shape[0]} and "
                             f"1 <= m <= {self.n_future - 1}")
        U = self.unembedding if vocab is None else self.unembedding[vocab]
        f, past, out = hidden, None, []
        for j in range(tokens.shape[1]):
            f, past = self.step(f, tokens[:, j], past)
            out.append(f)
        return torch.stack(out, dim=1) @ U.t()  # (N, m, V or K)

    # ------------------------------------------------------------------ drafting
    def _draft_table(self) -> torch.Tensor:
        """U's shortlist rows transposed (d, K), cached until U or the shortlist changes."""
        U, S = self.unembedding, self._draft_vocab
        key = (U.data_ptr(), U._version) + (() if S is None else (S.data_ptr(), S._version))
        if self._tables is None or self._tables[0] != key:
            with torch.no_grad():
                UT = (U.detach() if S is None else U.detach().index_select(0, S)).t()
            self._tables = (key, UT.contiguous())
        return self._tables[1]

    @torch.no_grad()
    def _chain(self, hidden: torch.Tensor, x1, k: int, pick):
        """Run k chain steps from h (N, d), x_1; ``pick(j, logits (N, K)) -> indices (N,)``
        chooses each draft. Returns drafted indices (N, k) and logits (N, k, K)."""
        UT = self._draft_table()
        S = self._draft_vocab
        f, past = hidden, None
        tok = torch.as_tensor(x1, device=hidden.device).reshape(-1).expand(hidden.shape[0])
        idx, logits = [], []
        for j in range(k):
            f, past = self.step(f, tok, past)
            z = f @ UT  # (N, K)
            i = pick(j, z)
            idx.append(i)
            logits.append(z)
            tok = i if S is None else S[i]
        return torch.stack(idx, 1), torch.stack(logits, 1)

    def draft_step(self, hidden: torch.Tensor, x1: int, k: int, temperature: float,
                   generator: torch.Generator | None = None,
                   routing: str = "mixture") -> DraftStep:
        """One decode step for ONE sequence: hidden (1, d), x1 an int, k drafts, each drawn
        from softmax(logits / T) given the drafts before it (T = 0: argmax). q of position j
        is that conditional (both routings are the same: one distribution per position)."""
        hidden, _, T, k = self._check_draft_args(hidden, torch.tensor([x1]), temperature, k)
        if T == 0:
            idx, z = self._chain(hidden, x1, k, lambda j, z: z.argmax(-1))
            return DraftStep(idx[0].tolist(), None, self._draft_vocab, None, logits=z[0],
                             vocab_list=self._draft_vocab_list)
        probs = []

        def sample(j, z):
            p = torch.softmax(z.double() / T, dim=-1)  # (1, K) float64: q_j given the chain
            probs.append(p[0])
            return torch.multinomial(p, 1, generator=generator)[:, 0]

        idx, _ = self._chain(hidden, x1, k, sample)
        P = torch.stack(probs)  # (k, K)
        drafts = idx[0].tolist()
        return DraftStep(drafts, None, self._draft_vocab, None, probs=P,
                         q_at=[float(P[j, i]) for j, i in enumerate(drafts)],
                         vocab_list=self._draft_vocab_list)

    def draft(self, hidden: torch.Tensor, first_tokens: torch.Tensor, temperature: float,
              n_draft: int | None = None, compact: bool = False) -> CPDist:
        """Rank-1 CPDist (batch (B,), positions 2..k+1) of the GREEDY chain: factor j is
        softmax(logits_j / T) given x_1 and the argmax drafts before j (T = 0: untempered).
        Its mode is exactly the greedy drafts; at T > 0 a factor conditions on the greedy
        prefix, which equals the sampled one only when those drafts agree."""
        hidden, first, T, k = self._check_draft_args(hidden, first_tokens, temperature, n_draft)
        _, z = self._chain(hidden, first, k, lambda j, z: z.argmax(-1))  # (B, k, K)
        if T > 0 and T != 1.0:
            z = z / T
        lf = self._to_vocab(torch.log_softmax(z.float(), dim=-1), compact).unsqueeze(2)
        return CPDist(lf.new_zeros(lf.shape[0], 1), lf)


class DraftBlockModel(nn.Module):
    """A frozen GPT backbone plus :class:`DraftBlockHeads` (what ``generate``, ``cptoy.evaluate``
    and ``cptoy.headtrain`` need of a model: ``backbone``, ``heads``, ``n_future``, ``hidden``,
    ``draft``)."""

    rank = 1

    def __init__(self, backbone: GPT, n_future: int, mlp_hidden: int | None = None):
        super().__init__()
        if not isinstance(backbone, GPT):
            raise TypeError(f"backbone must be a cptoy.model.GPT, got {type(backbone).__name__}")
        self.backbone = backbone
        for p in backbone.parameters():
            p.requires_grad_(False)
        self.n_future = n_future
        self.heads = DraftBlockHeads(backbone.config, n_future, backbone.wte.weight,
                                     backbone.unembedding, mlp_hidden)
        dev = next(backbone.parameters()).device
        if dev.type != "meta":
            self.heads.to(dev)
        self.metrics: dict = {}

    @property
    def config(self) -> GPTConfig:
        return self.backbone.config

    def train(self, mode: bool = True) -> DraftBlockModel:
        super().train(mode)
        self.backbone.eval()
        return self

    def hidden(self, idx: torch.Tensor, cache=None) -> torch.Tensor:
        with torch.no_grad():
            return self.backbone(idx, cache)

    def draft(self, hidden_last, first_tokens, temperature, n_draft=None) -> CPDist:
        """See :meth:`DraftBlockHeads.draft`."""
        return self.heads.draft(hidden_last, first_tokens, temperature, n_draft)

