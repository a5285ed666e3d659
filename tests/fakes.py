"""Small fake models with the decoding interface, whose distributions are known exactly.

``TrigramBackbone`` is a language model whose next-token logits depend on the last two tokens
through a table: the hidden state at a position is the one-hot code of the state
(previous token, current token), so ``logits(hidden) = hidden @ table``. Its ``FakeCache`` keeps
the token ids that were forwarded (the "keys and values"), so a test can check what the cache
holds after a rollback. Everything is float64, so the decoder's p equals the table's softmax
exactly.

Heads implement the drafting protocol of ``cptoy.speculative`` (``propose``, through
:class:`CPDrafter`: ancestral draws from the CP that ``draft`` returns, q its mixture
conditionals; the path ``cptoy.clp.ArchitectHeads`` takes too) and the batched ``draft`` that
``cptoy.evaluate`` reads:
- ``RandomCPHeads``: a random rank-r CP per state ("bad" heads, low acceptance).
- ``ChainHeads``: the exact joint of the next tokens under the trigram chain, written as a CP
  (one expert per path of intermediate tokens) - "good" heads, everything accepted at T = 1.
- ``GreedyChainHeads``: point masses on the greedy continuation (all accepted at T = 0).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn as nn

from cptoy.cp import CPDist
from cptoy.speculative import Proposal, propose_from_cp


@dataclass
class FakeConfig:
    vocab_size: int  # V
    block_size: int  # maximum positions; the fake raises past it
    n_embd: int  # hidden width = (V + 1) * V states


class FakeCache:
    """Stores the forwarded token ids (B, L); ``length`` and ``truncate`` like KVCache."""

    def __init__(self, batch_size: int = 1):
        self.tokens = torch.zeros(batch_size, 0, dtype=torch.long)  # (B, L)

    @property
    def length(self) -> int:
        return self.tokens.shape[1]

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"length must be in [0, {self.length}], got {length}")
        self.tokens = self.tokens[:, :length]


class TrigramBackbone(nn.Module):
    """next-token logits = table[prev, cur]; prev = V (BOS) at the first position."""

    def __init__(self, vocab_size: int = 3, block_size: int = 64, seed: int = 0,
                 scale: float = 1.5, table: torch.Tensor | None = None):
        super().__init__()
        V = vocab_size
        if table is None:
            g = torch.Generator().manual_seed(seed)
            table = scale * torch.randn(V + 1, V, V, generator=g, dtype=torch.float64)
        self.register_buffer("table", table.to(torch.float64))  # (V + 1, V, V): prev, cur, next
        self.config = FakeConfig(V, block_size, (V + 1) * V)
        self.calls = 0  # forward calls
        self.chunk_sizes: list[int] = []  # tokens per forward call

    def new_cache(self, batch_size: int = 1) -> FakeCache:
        return FakeCache(batch_size)

    def states(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) tokens -> (B, L) state ids prev * V + cur (prev = V before the first token)."""
        V = self.config.vocab_size
        prev = torch.cat([torch.full_like(tokens[:, :1], V), tokens[:, :-1]], dim=1)
        return prev * V + tokens

    def forward(self, idx: torch.Tensor, cache: FakeCache | None = None) -> torch.Tensor:
        B, T = idx.shape
        if T == 0:
            raise ValueError("idx must hold at least one token")
        if idx.min() < 0 or idx.max() >= self.config.vocab_size:
            raise ValueError("idx holds ids outside the vocabulary")
        past = cache.tokens if cache is not None else idx[:, :0]
        full = torch.cat([past, idx], dim=1)  # (B, L + T)
        if full.shape[1] > self.config.block_size:
            raise ValueError(
                f"{full.shape[1]} positions exceed block_size {self.config.block_size}")
        if cache is not None:
            cache.tokens = full
        self.calls += 1
        self.chunk_sizes.append(T)
        s = self.states(full)[:, -T:]  # (B, T)
        return nn.functional.one_hot(s, self.config.n_embd).to(torch.float64)  # (B, T, d)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        V = self.config.vocab_size
        return hidden @ self.table.reshape(-1, V)  # (..., V)

    # ------------------------------------------------------------ exact quantities for tests
    def next_probs(self, context: list[int], temperature: float = 1.0) -> torch.Tensor:
        """softmax(table[state] / T) (V,) float64 for a context (list of ints)."""
        V = self.config.vocab_size
        prev = context[-2] if len(context) >= 2 else V
        return torch.softmax(self.table[prev, context[-1]] / temperature, dim=-1)

    def exact_distribution(self, prompt: list[int], m: int, temperature: float) -> dict:
        """Exact probability of every length-m continuation under AR sampling."""
        V = self.config.vocab_size
        out = {}
        for seq in itertools.product(range(V), repeat=m):
            pr, ctx = 1.0, list(prompt)
            for t in seq:
                pr *= float(self.next_probs(ctx, temperature)[t])
                ctx.append(t)
            out[seq] = pr
        return out

    def greedy(self, prompt: list[int], m: int) -> list[int]:
        """Uncached reference greedy decoding."""
        ctx = list(prompt)
        for _ in range(m):
            ctx.append(int(self.next_probs(ctx).argmax()))
        return ctx[len(prompt):]


def _state_of(hidden: torch.Tensor) -> torch.Tensor:
    return hidden.argmax(-1)  # one-hot -> state id


class CPDrafter(nn.Module):
    """``propose`` for heads whose ``draft(h (B, d), x1 (B,), T, n_draft) -> CPDist`` gives the
    CP of the drafted positions: :func:`cptoy.speculative.propose_from_cp` of it."""

    routings = ("mixture",)

    def propose(self, hidden, x1: int, k: int, temperature: float, generator=None,
                routing: str = "mixture") -> Proposal:
        first = torch.tensor([x1], dtype=torch.long, device=hidden.device)
        dist = self.draft(hidden, first, temperature if temperature > 0 else 1.0, n_draft=k)
        return propose_from_cp(dist[0], k, temperature, generator)


class RandomCPHeads(CPDrafter):
    """A random rank-r CP over n tokens per state; draft = temper, then condition on x1."""

    def __init__(self, backbone: TrigramBackbone, n_future: int, rank: int, seed: int = 1,
                 scale: float = 1.5):
        super().__init__()
        V, d = backbone.config.vocab_size, backbone.config.n_embd
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("gate", scale * torch.randn(d, rank, generator=g, dtype=torch.float64))
        self.register_buffer(
            "factor", scale * torch.randn(d, n_future, rank, V, generator=g, dtype=torch.float64))
        self.n_future, self.rank = n_future, rank
        self.draft_calls = 0

    def forward(self, hidden: torch.Tensor) -> CPDist:
        s = _state_of(hidden)  # (...)
        return CPDist.from_logits(self.gate[s], self.factor[s])  # batch (...)

    def draft(self, hidden_last: torch.Tensor, first_tokens: torch.Tensor,
              temperature: float, n_draft: int | None = None) -> CPDist:
        self.draft_calls += 1
        return self(hidden_last).tempered(temperature).condition(first_tokens[:, None])


class ChainHeads(CPDrafter):
    """The exact trigram joint of the next n tokens as a CP: one expert per path x_1..x_{n-1}
    (point masses), the last position the true conditional. ``draft`` uses the chain of
    softmax(table / T), so q equals p at every position and every draft is accepted."""

    def __init__(self, backbone: TrigramBackbone, n_future: int):
        super().__init__()
        self.backbone, self.n_future = backbone, n_future
        V = backbone.config.vocab_size
        self.rank = V ** (n_future - 1)

    def _chain(self, state: int, n: int, temperature: float, first: int | None) -> CPDist:
        """CP over n tokens after the given state (optionally after a fixed first token)."""
        V = self.backbone.config.vocab_size
        prev0, cur0 = divmod(state, V)
        if first is not None:
            prev0, cur0 = cur0, first
        paths = list(itertools.product(range(V), repeat=n - 1))
        logw = torch.empty(len(paths), dtype=torch.float64)
        lf = torch.full((n, len(paths), V), -1e30, dtype=torch.float64)  # log 0
        for a, path in enumerate(paths):
            prev, cur, lp = prev0, cur0, 0.0
            for s, t in enumerate(path):
                lp += float(torch.log_softmax(self.backbone.table[prev, cur] / temperature, -1)[t])
                lf[s, a, t] = 0.0
                prev, cur = cur, t
            lf[n - 1, a] = torch.log_softmax(self.backbone.table[prev, cur] / temperature, -1)
            logw[a] = lp
        return CPDist(torch.log_softmax(logw, -1), lf)

    def forward(self, hidden: torch.Tensor) -> CPDist:
        flat = _state_of(hidden).reshape(-1)
        ds = [self._chain(int(s), self.n_future, 1.0, None) for s in flat]
        lw = torch.stack([d.log_weights for d in ds]).reshape(hidden.shape[:-1] + (-1,))
        lf = torch.stack([d.log_factors for d in ds])
        return CPDist(lw, lf.reshape(hidden.shape[:-1] + lf.shape[1:]))

    def draft(self, hidden_last, first_tokens, temperature, n_draft=None):
        ds = [self._chain(int(s), self.n_future - 1, temperature, int(f))
              for s, f in zip(_state_of(hidden_last), first_tokens, strict=True)]
        return CPDist(torch.stack([d.log_weights for d in ds]),
                      torch.stack([d.log_factors for d in ds]))


class GreedyChainHeads(RandomCPHeads):
    """Rank-1 point masses on the greedy continuation after x1 (all accepted at T = 0)."""

    def __init__(self, backbone: TrigramBackbone, n_future: int):
        super().__init__(backbone, n_future, rank=1)
        self.backbone = backbone

    def draft(self, hidden_last, first_tokens, temperature, n_draft=None):
        V = self.backbone.config.vocab_size
        lfs = []
        for s, f in zip(_state_of(hidden_last), first_tokens, strict=True):
            prev, cur = divmod(int(s), V)
            ctx = ([] if prev == V else [prev]) + [cur, int(f)]
            cont = self.backbone.greedy(ctx, self.n_future - 1)
            lf = torch.full((self.n_future - 1, 1, V), -1e30, dtype=torch.float64)
            for j, t in enumerate(cont):
                lf[j, 0, t] = 0.0
            lfs.append(lf)
        return CPDist(torch.zeros(len(lfs), 1, dtype=torch.float64), torch.stack(lfs))


class FakeMTP(nn.Module):
    """backbone + heads + n_future: the interface cptoy.decoding expects of an MTPModel."""

    def __init__(self, backbone: TrigramBackbone, heads: nn.Module, n_future: int):
        super().__init__()
        self.backbone, self.heads, self.n_future = backbone, heads, n_future


def make_fake(kind: str = "random", V: int = 3, n: int = 3, rank: int = 2, seed: int = 0,
              block_size: int = 64, scale: float = 1.5) -> FakeMTP:
    bb = TrigramBackbone(V, block_size, seed=seed, scale=scale)
    if kind == "random":
        heads = RandomCPHeads(bb, n, rank, seed=seed + 1000, scale=scale)
    elif kind == "chain":
        heads = ChainHeads(bb, n)
    elif kind == "greedy":
        heads = GreedyChainHeads(bb, n)
    else:
        raise ValueError(kind)
    return FakeMTP(bb, heads, n)


# ---------------------------------------------------------------------------- for a real GPT
class LinearCPHeads(CPDrafter):
    """Random linear CP heads on any backbone's hidden states (a stand-in for cptoy.heads)."""

    def __init__(self, d_model: int, vocab_size: int, n_future: int, rank: int, seed: int = 0,
                 scale: float = 1.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.n_future, self.rank, self.vocab_size = n_future, rank, vocab_size
        self.register_buffer("w_gate", scale * torch.randn(d_model, rank, generator=g))
        self.register_buffer(
            "w_factor", scale * torch.randn(d_model, n_future * rank * vocab_size, generator=g))

    def forward(self, hidden: torch.Tensor) -> CPDist:
        lead = hidden.shape[:-1]
        fl = (hidden @ self.w_factor).reshape(lead + (self.n_future, self.rank, self.vocab_size))
        return CPDist.from_logits(hidden @ self.w_gate, fl)

    def draft(self, hidden_last, first_tokens, temperature, n_draft=None):
        return self(hidden_last).tempered(temperature).condition(first_tokens[:, None])


class OracleGreedyHeads(LinearCPHeads):
    """Drafts the known greedy continuation ``reference`` (prompt + greedy tokens): finds the
    position whose uncached hidden state equals ``hidden_last`` and copies what follows x1.
    Perfect drafts at temperature 0, so every draft is accepted."""

    def __init__(self, backbone, reference: list[int], n_future: int):
        V = backbone.config.vocab_size
        super().__init__(backbone.config.n_embd, V, n_future, rank=1)
        self.reference = list(reference)
        with torch.no_grad():
            self.ref_hidden = backbone(torch.tensor([self.reference]))[0]  # (L, d)

    def draft(self, hidden_last, first_tokens, temperature, n_draft=None):
        V = self.vocab_size
        i = int((self.ref_hidden - hidden_last[0]).norm(dim=-1).argmin())
        assert int(first_tokens[0]) == self.reference[i + 1], "x1 is not the greedy token"
        lf = torch.full((1, self.n_future - 1, 1, V), -1e30)
        for j in range(self.n_future - 1):
            pos = min(i + 2 + j, len(self.reference) - 1)  # past the end: any token will do
            lf[0, j, 0, self.reference[pos]] = 0.0
        return CPDist(torch.zeros(1, 1), lf)
