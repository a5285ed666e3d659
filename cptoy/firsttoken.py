"""Draft heads that see the first token: positions 2..n read x_1's embedding.

CP heads see x_1 (the backbone's token, which every draft continues) only through the posterior
gate: rank 1 not at all, rank r through an r-way choice of expert. Drafting never needs the
first factor, only ``P(x_2..x_n | h, x_1)``, so these heads condition on x_1 directly
(the idea of Hydra and EAGLE), one factor per position:

    q_j(. | h, x_1) = softmax(U (h + silu(W_j [h; E x_1] + b_j))),   j = 2..n

with E the backbone's token embedding and U its unembedding (both shared and frozen). Read as a
CP over positions 1..n they are rank V: one expert per value of x_1, whose position-1 factor is a
point mass, so the posterior after x_1 is exact instead of an r-way guess.

Decoding with them is lossless like any drafter (q is the factor the drafts came from):
``cptoy.decoding.generate`` drafts with ``propose`` (over :meth:`FirstTokenHeads.draft_step`),
``cptoy.evaluate`` measures them with the same protocol as the CP heads. Initialised from rank-1 CP heads
(:meth:`FirstTokenModel.from_mtp`, x_1 half zero) they start exactly as those heads and learn
how much x_1 matters. Shipped checkpoints ``code_x1`` / ``shakespeare_x1`` hold the heads only
and name the shipped checkpoint whose frozen backbone they were trained on.

    python -m cptoy.firsttoken --corpus code --minutes 10 --out cptoy/checkpoints/code_x1.pt
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from cptoy._checks import check_positive_int
from cptoy.cp import CPDist
from cptoy.data import encode_corpus, load_corpus, tokenizer_from_dict
from cptoy.heads import DraftingHeads, DraftStep, MTPModel, check_backbone_config
from cptoy.model import GPT, GPTConfig
from cptoy.persist import atomic_save, module_fingerprint, read_torch_file, shipped_path
from cptoy.recipes import check_slice_ids, check_slice_metrics
from cptoy.train import TrainConfig, evaluate_loss, train

FORMAT = "cptoy-first-token-heads"  # the "format" entry of a first-token-heads checkpoint
FORMAT_VERSION = 1


class FirstTokenHeads(DraftingHeads):
    """Rank-1 draft heads for positions 2..n of h (B, d) and x_1 (B,).

    Args:
        d_model: width d of the hidden states.
        vocab_size: V.
        n_future: n >= 2; the heads draft positions 2..n.
        embedding: the backbone's (V, d) token embedding E (shared when an ``nn.Parameter``).
        unembedding: the backbone's (V, d) output matrix U (shared likewise).
    """

    rank = 1  # one factor per position: q is that factor (no gate, no posterior)

    def __init__(self, d_model: int, vocab_size: int, n_future: int,
                 embedding: torch.Tensor, unembedding: torch.Tensor):
        super().__init__()
        self.d_model = check_positive_int(d_model, "d_model")
        self.vocab_size = check_positive_int(vocab_size, "vocab_size")
        self.n_future = check_positive_int(n_future, "n_future")
        if n_future < 2:
            raise ValueError(f"n_future must be >= 2 (the heads draft positions 2..n), got {n_future}")
        self._attach("embedding", embedding, (vocab_size, d_model))
        self._attach("unembedding", unembedding, (vocab_size, d_model))
        d, m = d_model, n_future - 1
        # position j+2's transform reads [h; E x_1]: rows j*d:(j+1)*d of one (m*d, 2d) weight
        w = torch.zeros(m * d, 2 * d)
        w[:, :d] = torch.randn(m * d, d) * 0.02  # the x_1 half starts at zero
        self.weight = nn.Parameter(w)
        self.bias = nn.Parameter(torch.zeros(m * d))
        self._init_shortlist()

    @property
    def embedding(self) -> torch.Tensor:
        """The shared (V, d) token embedding E."""
        return self._attached("embedding")

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, vocab_size={self.vocab_size}, n_future={self.n_future}"

    def num_params(self) -> int:
        """Parameters owned by the heads (the shared E and U not counted)."""
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def init_from_cp(self, heads) -> FirstTokenHeads:
        """Copy positions 2..n of full rank-1 CP heads into the h half; zero the x_1 half, so the
        drafts equal those heads' until training changes them. Returns self."""
        if getattr(heads, "rank", None) != 1 or getattr(heads, "expert_dim", 0) is not None:
            raise ValueError("heads must be full rank-1 CPHeads (rank=1, expert_dim=None)")
        if (heads.n_future, heads.d_model, heads.vocab_size) != (
                self.n_future, self.d_model, self.vocab_size):
            raise ValueError(
                f"heads have (n_future, d_model, vocab_size) = "
                f"{(heads.n_future, heads.d_model, heads.vocab_size)}, expected "
                f"{(self.n_future, self.d_model, self.vocab_size)}")
        d = self.d_model
        self.weight.zero_()
        self.weight[:, :d] = heads.transform_weight[d:]  # positions 2..n of the CP heads
        self.bias.copy_(heads.transform_bias[d:])
        return self

    # ------------------------------------------------------------------ logits
    def _features(self, h: torch.Tensor, first, k: int, w=None) -> torch.Tensor:
        """X (N, k, d) = h + silu(W_j [h; E x_1] + b_j) for positions 2..k+1; ``first`` (N,)
        or one int; ``w`` = (W, b) rows of these positions (default: sliced, differentiable)."""
        d = self.d_model
        W, b = w if w is not None else (self.weight[: k * d], self.bias[: k * d])
        e = self.embedding[first]  # (N, d), or (d,) for one int x_1
        inp = torch.cat([h, e.expand(h.shape[0], -1)], dim=-1)  # (N, 2d)
        return h.unsqueeze(1) + F.silu(F.linear(inp, W, b)).view(h.shape[0], k, d)

    def logits(self, hidden: torch.Tensor, first_tokens: torch.Tensor,
               n_draft: int | None = None, vocab: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (N, k, V) of positions 2..k+1 for hidden (N, d) and x_1 (N,) (differentiable;
        k = ``n_draft``, default n - 1); with ``vocab`` (K,) token ids only those columns."""
        hidden, first, _, k = self._check_draft_args(hidden, first_tokens, 1.0, n_draft)
        U = self.unembedding if vocab is None else self.unembedding[vocab]
        return self._features(hidden, first, k) @ U.t()  # (N, k, V or K)

    def _step_tables(self) -> dict:
        """U's (shortlist) rows transposed (d, K), cached until a weight or the shortlist
        changes (and the weight rows of each k, as views)."""
        U, S = self.unembedding, self._draft_vocab
        key = tuple((t.data_ptr(), t._version) for t in (U, self.weight, self.bias)) + (
            () if S is None else (S.data_ptr(), S._version))
        if self._tables is not None and self._tables[0] == key:
            return self._tables[1]
        with torch.no_grad():
            UT = (U.detach() if S is None else U.detach().index_select(0, S)).t().contiguous()
        self._tables = (key, dict(UT=UT))
        return self._tables[1]

    def _draft_logits(self, h: torch.Tensor, first, k: int) -> torch.Tensor:
        """(N, k, K or V) logits over the drafting space (call without gradients)."""
        tb = self._step_tables()
        w = tb.get(k)
        if w is None:  # this k's weight rows, as views (slicing every step costs time)
            w = tb[k] = (self.weight.detach()[: k * self.d_model],
                         self.bias.detach()[: k * self.d_model])
        return self._features(h, first, k, w) @ tb["UT"]

    # ------------------------------------------------------------------ drafting
    def draft(self, hidden: torch.Tensor, first_tokens: torch.Tensor, temperature: float,
              n_draft: int | None = None, compact: bool = False) -> CPDist:
        """The draft distribution of one decode step, as :meth:`cptoy.heads.CPHeads.draft`:
        a rank-1 CPDist with batch shape (B,) over positions 2..k+1 given x_1, every factor
        softmax(logits / T) (T = 0: untempered, for greedy drafting). Over the shortlist when
        one is set (V entries, -inf outside it; ``compact=True``: K entries)."""
        hidden, first, T, k = self._check_draft_args(hidden, first_tokens, temperature, n_draft)
        with torch.no_grad():
            z = self._draft_logits(hidden, first, k).float()  # (B, k, K)
        if T > 0 and T != 1.0:
            z = z / T
        lf = self._to_vocab(torch.log_softmax(z, dim=-1), compact).unsqueeze(2)  # (B, k, 1, K)
        return CPDist(lf.new_zeros(lf.shape[0], 1), lf)

    def draft_step(self, hidden: torch.Tensor, x1: int, k: int, temperature: float,
                   generator: torch.Generator | None = None,
                   routing: str = "mixture") -> DraftStep:
        """One decode step for ONE sequence, as :meth:`cptoy.heads.CPHeads.draft_step` (both
        routings are the same here: there is one factor per position). hidden (1, d), x1 an
        int, k drafts; T > 0 samples each position from its tempered factor, T = 0 takes argmaxes."""
        if torch.is_grad_enabled():
            with torch.no_grad():
                return self.draft_step(hidden, x1, k, temperature, generator, routing)
        return self._factor_step(self._draft_logits(hidden, x1, k)[0], temperature, generator)


class FirstTokenModel(nn.Module):
    """A frozen GPT backbone plus :class:`FirstTokenHeads`; what ``generate``, ``cptoy.evaluate``
    and ``cptoy.train.train`` need of a model.

    Args:
        config: the backbone's :class:`GPTConfig` (a new backbone), or a :class:`GPT` to build
            the heads on (used as it is, e.g. ``cptoy.pretrained.load(...)[0]``).
        n_future: n >= 2 (x_1 from the backbone, drafts for positions 2..n).
        positions: contexts per sequence that the loss uses in training mode (drawn at random
            from a generator seeded with ``seed``); None or evaluation: every position.
        seed: seed of that sampler.
    """

    rank = 1

    def __init__(self, config: GPTConfig, n_future: int, positions: int | None = 32,
                 seed: int = 0):
        super().__init__()
        check_backbone_config(config)
        if positions is not None:
            check_positive_int(positions, "positions")
        self.n_future, self.positions, self.seed = n_future, positions, seed
        self.backbone = config if isinstance(config, GPT) else GPT(config)
        config = self.backbone.config
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.heads = FirstTokenHeads(config.n_embd, config.vocab_size, n_future,
                                     self.backbone.wte.weight, self.backbone.unembedding)
        self._sampler = torch.Generator().manual_seed(seed)
        self.metrics: dict = {}
        self.tokenizer_dict = None
        self.backbone_checkpoint: str | None = None

    @classmethod
    def from_mtp(cls, model: MTPModel, positions: int | None = 32, seed: int = 0):
        """A copy of ``model``'s backbone (frozen) with first-token heads; initialised from its
        heads when they are full rank-1 CP heads (otherwise the default init). The drafting
        shortlist and tokenizer carry over."""
        if not isinstance(model, MTPModel):
            raise TypeError(f"model must be an MTPModel, got {type(model).__name__}")
        out = cls(model.config, model.n_future, positions, seed)
        out.backbone.load_state_dict(model.backbone.state_dict())
        if model.rank == 1 and model.expert_dim is None:
            out.heads.init_from_cp(model.heads)
        out.heads.set_draft_vocab(model.heads.draft_vocab)
        out.tokenizer_dict = getattr(model, "tokenizer_dict", None)
        return out

    @property
    def config(self) -> GPTConfig:
        return self.backbone.config

    def train(self, mode: bool = True) -> FirstTokenModel:
        super().train(mode)
        self.backbone.eval()  # frozen: no dropout
        return self

    def hidden(self, idx: torch.Tensor, cache=None) -> torch.Tensor:
        with torch.no_grad():
            return self.backbone(idx, cache)

    def draft(self, hidden_last, first_tokens, temperature, n_draft=None) -> CPDist:
        """See :meth:`FirstTokenHeads.draft`."""
        return self.heads.draft(hidden_last, first_tokens, temperature, n_draft)

    def loss(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cross-entropy of x_{t+2..t+n} given h_t and the true x_{t+1}, idx (B, T + n).

        Returns ``draft_nll`` (mean over the drafted positions, nats per token), ``total`` (the
        same) and ``draft_nll_j`` for each position j = 2..n."""
        n = self.n_future
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.shape[1] <= n:
            raise ValueError(f"idx must be a (B, T + n_future) tensor of token ids with T >= 1 "
                             f"(n_future={n})")
        T = idx.shape[1] - n
        H = self.hidden(idx[:, :T])  # (B, T, d)
        if self.training and self.positions is not None and self.positions < T:
            pos = torch.stack([torch.randperm(T, generator=self._sampler)[: self.positions]
                               for _ in range(idx.shape[0])]).to(idx.device)  # (B, P)
        else:
            pos = torch.arange(T, device=idx.device).expand(idx.shape[0], T)
        h = H.gather(1, pos[..., None].expand(-1, -1, H.shape[-1])).reshape(-1, H.shape[-1])
        y = torch.stack([idx.gather(1, pos + j) for j in range(1, n + 1)], -1).reshape(-1, n)
        lg = self.heads.logits(h, y[:, 0])  # (N, n - 1, V)
        nll = F.cross_entropy(lg.reshape(-1, lg.shape[-1]).float(), y[:, 1:].reshape(-1),
                              reduction="none")  # (N (n - 1),): rows contiguous
        per = nll.view(-1, n - 1).mean(0)  # (n - 1,)
        out = {"total": per.mean(), "draft_nll": per.mean()}
        out.update({f"draft_nll_{j + 2}": per[j] for j in range(n - 1)})
        return out

    def forward(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """Same as :meth:`loss`."""
        return self.loss(idx)

    # ------------------------------------------------------------------ checkpoints
    def backbone_fingerprint(self) -> str:
        """sha256 of the backbone's weights rounded to half precision (identifies it)."""
        return module_fingerprint(self.backbone)

    def save(self, path, backbone_checkpoint: str | None = None,
             metrics: dict | None = None) -> None:
        """Write the heads (half precision), shortlist and metrics, and the backbone's
        fingerprint (checked on load). ``backbone_checkpoint``: the name of the MTP checkpoint
        the backbone comes from (a file beside ``path``, or a shipped one), so that
        :meth:`load` can find it; None when the backbone will be passed to :meth:`load`."""
        if backbone_checkpoint is not None and not isinstance(backbone_checkpoint, str):
            raise TypeError("backbone_checkpoint must be a checkpoint name (str) or None")
        ckpt = dict(
            format=FORMAT, format_version=FORMAT_VERSION, n_future=self.n_future,
            positions=self.positions, seed=self.seed,
            state_dict={k: v.detach().to("cpu", torch.float16)
                        for k, v in self.heads.state_dict().items()},
            draft_vocab=None if self.heads.draft_vocab is None else self.heads.draft_vocab.tolist(),
            backbone=dict(checkpoint=backbone_checkpoint, fingerprint=self.backbone_fingerprint()),
            metrics=dict(metrics or {}),
        )
        atomic_save(ckpt, path)

    @classmethod
    def load(cls, path, backbone: GPT | None = None) -> FirstTokenModel:
        """Load a checkpoint written by :meth:`save` onto ``backbone`` (a ``GPT``, used as it
        is), or, when None, onto the backbone of the MTP checkpoint it names (a file beside
        ``path``, else a shipped one). The backbone's fingerprint must match the stored one."""
        path = os.fspath(path)
        ckpt = read_checkpoint(path)
        base, tokenizer_dict = ckpt["backbone"].get("checkpoint"), None
        if backbone is None:
            if base is None:
                raise ValueError(f"checkpoint {path!r} names no backbone checkpoint; pass the "
                                 "backbone it was trained on (backbone=)")
            beside = os.path.join(os.path.dirname(os.path.abspath(path)), f"{base}.pt")
            mtp = MTPModel.load(beside if os.path.isfile(beside) else shipped_path(base))
            backbone, tokenizer_dict = mtp.backbone, mtp.tokenizer_dict
        elif not isinstance(backbone, GPT):
            raise TypeError(f"backbone must be a cptoy.model.GPT, got {type(backbone).__name__}")
        model = cls(backbone, ckpt["n_future"], ckpt.get("positions"), ckpt.get("seed", 0))
        if model.backbone_fingerprint() != ckpt["backbone"]["fingerprint"]:
            where = f"the one in {base!r} now" if tokenizer_dict is not None else "the one given"
            raise ValueError(f"checkpoint {path!r} was trained on another backbone than {where}")
        model.heads.load_saved(ckpt["state_dict"], ckpt.get("draft_vocab"), path)
        model.metrics = ckpt.get("metrics") or {}
        model.tokenizer_dict = tokenizer_dict
        model.backbone_checkpoint = base
        return model


def read_checkpoint(path) -> dict:
    """The dict of a first-token-heads checkpoint; ValueError naming the file otherwise."""
    path = os.fspath(path)
    ckpt = read_torch_file(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path!r} is not a first-token-heads checkpoint")
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"checkpoint {path!r} has format_version {ckpt.get('format_version')}; "
                         f"this cptoy reads <= {FORMAT_VERSION}")
    return ckpt


def is_first_token_checkpoint(path) -> bool:
    """Whether ``path`` holds first-token heads (and not an ``MTPModel``)."""
    try:
        read_checkpoint(path)
    except ValueError:
        return False
    return True


def main(argv=None) -> None:
    """Train first-token heads on a shipped rank-1 checkpoint's frozen backbone (the recipe of
    the shipped ``<corpus>_x1`` checkpoints)."""
    p = argparse.ArgumentParser(prog="python -m cptoy.firsttoken", description=main.__doc__)
    p.add_argument("--corpus", default="code", choices=["code", "shakespeare"])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    base = f"{a.corpus}_r1"
    mtp = MTPModel.load(shipped_path(base))
    tok = tokenizer_from_dict(mtp.tokenizer_dict)
    model = FirstTokenModel.from_mtp(mtp, positions=32)
    data = encode_corpus(load_corpus(a.corpus), tok)
    hist = train(model, torch.as_tensor(data.train_ids).long(), None, TrainConfig(
        steps=None, minutes=a.minutes, batch_size=16, block_size=128, lr=2e-3, min_lr=2e-4,
        weight_decay=0.0, warmup=50, seed=0, device="cpu"))
    model.eval()
    val = evaluate_loss(model, torch.as_tensor(data.val_ids).long(), batch_size=16, max_batches=8)
    metrics = dict(corpus=a.corpus, steps=hist["steps"], seconds=hist["seconds"],
                   val={k: float(v) for k, v in val.items()},
                   check_slice=check_slice_metrics(model, check_slice_ids(a.corpus, tok)))
    model.save(a.out, base, metrics)
    print(metrics)


if __name__ == "__main__":
    main()
