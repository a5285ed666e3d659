"""Multi-token prediction via self-distillation (Kirchenbauer et al., arXiv 2602.06019).

No heads at all. The model stays the same GPT; only its vocabulary grows by k - 1 trainable
``<MTP>`` ids (:class:`SelfDistilledMTP`). To predict k tokens in one pass, append the k - 1
mask ids to the context:

    input   x_1 .. x_t  m_1  m_2 .. m_{k-1}
    output  at x_t: y_1,  at m_1: y_2,  ..,  at m_{k-1}: y_k

Everything else (layers, widths, positions, attention, the tied unembedding) is the original
architecture, and at ordinary positions the causal mask hides the appended ids, so the student's
outputs there are computed exactly like the original model's. The mask ids are never emitted:
logits are read over the original V ids only.

Training (:func:`distill`): online distillation from a *frozen copy* of the starting model, the
teacher T. At a random cut t of a training window, with k' drawn from 2..k ("randomized k"):

* the student S proposes ``y' = argmax`` of its k' outputs (one forward with k' - 1 masks);
* the teacher scores the proposal by the chain rule, ``P_T(y'|x) = prod_j P_T(y'_j | x, y'_<j)``
  (one forward over ``[x, y'_1..y'_{k'-1}]``);
* loss ``-P_T(y'|x) * log P_S(y'|x)`` with ``log P_S(y'|x) = sum_j log P_S(y'_j | x, masks)``
  and the teacher's score as a constant weight: proposals the teacher believes get reinforced.

``anchor_weight`` adds ``KL(P_T || P_S)`` of the ordinary next-token distributions at every
context position, so that fine-tuning all weights does not move the first token away from the
teacher's (0 turns it off; with ``trainable="masks"`` it is 0 by construction). The cut t and
k' are the same for a whole batch (one forward per model per step).

Decoding (:func:`confadapt_generate`, ConfAdapt): one forward over the new tokens and the k - 1
masks (KV cache) gives k greedy tokens with their top-1 probabilities; emit the longest prefix
whose top-1 probabilities all *exceed* ``threshold`` (:func:`confadapt_length`), and always at
least the first token (the ordinary next-token prediction). No verifier: it is lossy, and
``threshold >= 1`` gives exactly one token per forward (the student's own greedy decoding).

Lossless decoding (:class:`SelfSpecModel`): the student drafts k tokens per pass
(:class:`MaskDrafter`, one factor per position) and a backbone verifies them with
``cptoy.decoding.generate(..., strategy="self-spec")``: the output has exactly that backbone's
law.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from cptoy._checks import check_positive_int, check_prompt_ids
from cptoy.data import TokenDataset
from cptoy.model import GPT
from cptoy.speculative import FactorQ, Proposal, sample_index
from cptoy.verifierfree import decode_unverified

__all__ = [
    "SelfDistilledMTP",
    "DistillConfig",
    "distill_loss",
    "distill",
    "confadapt_length",
    "confadapt_generate",
    "mtp_agreement",
    "MaskDrafter",
    "SelfSpecModel",
]


# ====================================================================== the model
class SelfDistilledMTP(nn.Module):
    """A copy of a GPT whose vocabulary has k - 1 extra ``<MTP>`` ids (trainable embeddings).

    Args:
        base: the pretrained ``GPT`` (left untouched: the student is a copy).
        k: tokens per forward at most (k - 1 mask ids).
        seed: seeds the small noise that makes the mask embeddings distinct at initialisation
            (each starts at the mean token embedding plus N(0, 0.02) noise).

    ``model`` is a plain ``cptoy.model.GPT`` with ``vocab_size = V + k - 1``; the only new
    parameters are the k - 1 rows of its (tied) token embedding.
    """

    def __init__(self, base: GPT, k: int = 4, seed: int = 0):
        super().__init__()
        if not isinstance(base, GPT):
            raise TypeError(f"base must be a cptoy.model.GPT, got {type(base).__name__}")
        self.k = check_positive_int(k, "k", minimum=2)
        V = base.config.vocab_size
        self.vocab_size = V  # ids the model emits; the masks are V .. V + k - 2
        self.model = GPT(replace(base.config, vocab_size=V + k - 1))
        state = base.state_dict()
        own = self.model.state_dict()
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, v in own.items():
                if name == "wte.weight":
                    base_w = state[name]  # (V, d)
                    v[:V] = base_w
                    noise = torch.randn(k - 1, base_w.shape[1], generator=g) * 0.02
                    v[V:] = base_w.mean(0, keepdim=True) + noise.to(base_w.dtype)
                else:
                    v.copy_(state[name])
        self.model.train(base.training)

    @property
    def mask_ids(self) -> list[int]:
        return list(range(self.vocab_size, self.vocab_size + self.k - 1))

    @property
    def config(self):
        return self.model.config

    @property
    def backbone(self) -> GPT:
        return self.model

    def num_new_params(self) -> int:
        """Parameters the base model did not have: (k - 1) * n_embd."""
        return (self.k - 1) * self.model.config.n_embd

    def mtp_logits(self, idx: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """Logits of the k tokens after ``idx`` (B, T) from one pass: (B, k, V).

        Input ``[idx, m_1..m_{k-1}]``; row 0 is the ordinary next-token logits at the last
        context token, row j the output at mask j (the prediction of y_{j+1}). Only the first V
        logits (real tokens) are returned.
        """
        k = self.k if k is None else k
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.k:
            raise ValueError(f"k must be an int in [1, {self.k}], got {k}")
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2:
            raise ValueError("idx must be a (B, T) tensor of token ids")
        B, T = idx.shape
        masks = torch.tensor(self.mask_ids[: k - 1], dtype=idx.dtype, device=idx.device)
        inp = torch.cat([idx, masks.expand(B, k - 1)], dim=1)  # (B, T + k - 1)
        H = self.model(inp)  # (B, T + k - 1, d)
        return self.model.logits(H[:, T - 1:])[..., : self.vocab_size]  # (B, k, V)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.mtp_logits(idx)


# ====================================================================== training
@dataclass
class DistillConfig:
    """Settings of :func:`distill`."""

    steps: int = 300  # optimizer steps
    batch_size: int = 32  # windows per step (one cut t per step, shared by the batch)
    lr: float = 1e-3  # peak learning rate (linear warm-up, then cosine to lr / 10)
    warmup: int = 20  # warm-up steps
    weight_decay: float = 0.0  # AdamW weight decay
    min_context: int = 8  # the cut t is drawn uniformly from min_context .. block - (k - 1)
    anchor_weight: float = 1.0  # weight of KL(P_T || P_S) on ordinary next-token outputs
    random_k: bool = True  # draw k' uniformly from 2..k per step (False: always k)
    objective: str = "student"  # "student": -P_T(y'|x) log P_S(y'|x) (the paper's);
    # "teacher": -log P_S(y*|x) with y* the teacher's greedy continuation (an ablation)
    trainable: str = "all"  # "all" weights, or only the "masks" embeddings
    grad_clip: float = 1.0  # clip the global gradient norm
    seed: int = 0  # seeds the batches, the cuts and k'

    def __post_init__(self):
        for name in ("steps", "batch_size", "min_context"):
            check_positive_int(getattr(self, name), name)
        check_positive_int(self.warmup, "warmup", minimum=0)
        if self.objective not in ("student", "teacher"):
            raise ValueError(f"objective must be 'student' or 'teacher', got {self.objective!r}")
        if self.trainable not in ("all", "masks"):
            raise ValueError(f"trainable must be 'all' or 'masks', got {self.trainable!r}")
        for name in ("lr", "weight_decay", "anchor_weight", "grad_clip"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.lr <= 0:
            raise ValueError("lr must be > 0")


@torch.no_grad()
def _teacher_greedy(teacher: GPT, x: torch.Tensor, k: int) -> torch.Tensor:
    """The teacher's greedy k tokens after each row of x (B, t): (B, k)."""
    cache = teacher.new_cache(x.shape[0])
    nxt = teacher.logits(teacher(x, cache)[:, -1]).argmax(-1, keepdim=True)
    out = [nxt]
    for _ in range(k - 1):
        nxt = teacher.logits(teacher(nxt, cache)[:, -1]).argmax(-1, keepdim=True)
        out.append(nxt)
    return torch.cat(out, dim=1)


def distill_loss(student: SelfDistilledMTP, teacher: GPT, x: torch.Tensor, k: int,
                 anchor_weight: float = 1.0, objective: str = "student") -> dict:
    """The self-distillation loss on contexts x (B, t) with k' = ``k`` tokens per pass.

    Returns a dict of scalars: ``total``, ``mtp`` (the distillation term), ``anchor``
    (KL(P_T || P_S) of the next-token distributions at the t context positions, nats),
    ``teacher_prob`` (mean P_T(y'|x) of the student's proposals) and ``first_agree`` (how often
    the student's y'_1 equals the teacher's argmax).
    """
    if objective not in ("student", "teacher"):
        raise ValueError(f"objective must be 'student' or 'teacher', got {objective!r}")
    B, t = x.shape
    V = student.vocab_size
    masks = torch.tensor(student.mask_ids[: k - 1], dtype=x.dtype, device=x.device)
    inp = torch.cat([x, masks.expand(B, k - 1)], dim=1)  # (B, t + k - 1)
    zs = student.model.logits(student.model(inp))[..., :V].float()  # (B, t + k - 1, V)
    lps = torch.log_softmax(zs[:, t - 1:], dim=-1)  # (B, k, V): student's y_1..y_k
    y = lps.argmax(-1).detach()  # (B, k) the student's proposal y'
    with torch.no_grad():
        zt = teacher.logits(teacher(torch.cat([x, y[:, :-1]], dim=1))).float()  # (B, t+k-1, V)
        lpt = torch.log_softmax(zt[:, t - 1:], dim=-1)  # (B, k, V): P_T(. | x, y'_<j)
        log_pt = lpt.gather(-1, y[..., None]).squeeze(-1).sum(1)  # (B,) log P_T(y'|x)
        teacher_prob = log_pt.exp()  # (B,)
    if objective == "student":
        log_ps = lps.gather(-1, y[..., None]).squeeze(-1).sum(1)  # (B,) log P_S(y'|x)
        mtp = -(teacher_prob * log_ps).mean()
    else:
        ystar = _teacher_greedy(teacher, x, k)  # (B, k)
        mtp = -lps.gather(-1, ystar[..., None]).squeeze(-1).sum(1).mean()
    # anchor: the ordinary next-token outputs at the t context positions (teacher's are the
    # first t rows of its forward: the causal mask hides what follows)
    lt = torch.log_softmax(zt[:, :t], dim=-1)
    ls = torch.log_softmax(zs[:, :t], dim=-1)
    anchor = (lt.exp() * (lt - ls)).sum(-1).mean()
    total = mtp + anchor_weight * anchor if anchor_weight > 0 else mtp
    return dict(
        total=total, mtp=mtp.detach(), anchor=anchor.detach(),
        teacher_prob=teacher_prob.mean(),
        first_agree=(y[:, 0] == lpt[:, 0].argmax(-1)).float().mean(),
    )


def distill(student: SelfDistilledMTP, teacher: GPT, ids, cfg: DistillConfig,
            log_every: int = 10) -> dict:
    """Online self-distillation of ``student`` from the frozen ``teacher`` on token ``ids``.

    ids: (N,) int64 training text (random windows are cut from it). The teacher is frozen
    (``requires_grad=False``, eval mode) and must be the starting model (the same config but
    V). Returns a history ``{"train": [records], "steps", "seconds"}``.
    """
    if not isinstance(student, SelfDistilledMTP):
        raise TypeError(f"student must be a SelfDistilledMTP, got {type(student).__name__}")
    if not isinstance(teacher, GPT):
        raise TypeError(f"teacher must be a GPT, got {type(teacher).__name__}")
    if not isinstance(cfg, DistillConfig):
        raise TypeError(f"cfg must be a DistillConfig, got {type(cfg).__name__}")
    if teacher.config.vocab_size != student.vocab_size:
        raise ValueError(f"teacher vocab {teacher.config.vocab_size} != student's "
                         f"{student.vocab_size}")
    ids = torch.as_tensor(ids).long()
    if ids.dim() != 1:
        raise ValueError("ids must be 1-D token ids")
    k = student.k
    block = student.config.block_size
    t_max = block - (k - 1)
    if cfg.min_context > t_max:
        raise ValueError(f"min_context {cfg.min_context} > block_size - (k - 1) = {t_max}")
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.eval()
    model = student.model
    anchor = cfg.anchor_weight
    if cfg.trainable == "masks":
        for p in model.parameters():
            p.requires_grad_(False)
        model.wte.weight.requires_grad_(True)
        V = student.vocab_size
        keep = torch.zeros_like(model.wte.weight)
        keep[V:] = 1.0
        hook = model.wte.weight.register_hook(lambda g: g * keep)
        anchor = 0.0  # ordinary positions cannot change
    else:
        for p in model.parameters():
            p.requires_grad_(True)
        hook = None
    params = [p for p in model.parameters() if p.requires_grad]
    wd = 0.0 if cfg.trainable == "masks" else cfg.weight_decay
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=wd)
    data = TokenDataset(ids)
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    hist: dict = {"train": [], "steps": 0, "seconds": 0.0}
    model.train()
    t0 = time.perf_counter()
    try:
        for step in range(cfg.steps):
            if step < cfg.warmup:
                lr = cfg.lr * (step + 1) / cfg.warmup
            else:
                p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
                lr = cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))
            for grp in opt.param_groups:
                grp["lr"] = lr
            t = int(torch.randint(cfg.min_context, t_max + 1, (), generator=g))
            kk = int(torch.randint(2, k + 1, (), generator=g)) if cfg.random_k else k
            x = data.batch(cfg.batch_size, t, g)  # (B, t)
            out = distill_loss(student, teacher, x, kk, anchor, cfg.objective)
            opt.zero_grad(set_to_none=True)
            out["total"].backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            if (step + 1) % log_every == 0 or step == 0:
                rec = {"step": step + 1, "k": kk, "t": t, "lr": lr,
                       "seconds": time.perf_counter() - t0}
                rec.update({key: v.item() for key, v in out.items()})
                hist["train"].append(rec)
    finally:
        if hook is not None:
            hook.remove()
        for p in model.parameters():
            p.requires_grad_(True)
        model.eval()
    hist["steps"] = cfg.steps
    hist["seconds"] = time.perf_counter() - t0
    return hist


@torch.no_grad()
def mtp_agreement(student: SelfDistilledMTP, teacher: GPT, ids, num: int = 256,
                  context: int | None = None, seed: int = 0) -> dict:
    """How often the student's one-pass outputs equal the teacher's greedy continuation.

    At ``num`` random cuts of ``ids`` (contexts of ``context`` tokens, default block - k),
    compare the student's k argmax tokens (one pass with k - 1 masks) with the teacher's k
    greedy tokens. Returns ``{"by_position": [k floats], "leading": mean length of the leading
    run of matches (0..k)}``: position 0 is the ordinary next token.
    """
    check_positive_int(num, "num")
    k = student.k
    t = student.config.block_size - k if context is None else context
    check_positive_int(t, "context")
    x = TokenDataset(torch.as_tensor(ids).long()).batch(num, t, seed)  # (num, t)
    was = student.training
    student.eval()
    try:
        ys = student.mtp_logits(x).argmax(-1)  # (num, k)
    finally:
        student.train(was)
    yt = _teacher_greedy(teacher, x, k)  # (num, k)
    match = (ys == yt).float()
    return {"by_position": match.mean(0).tolist(),
            "leading": float(match.cumprod(1).sum(1).mean())}


# ====================================================================== drafting for verification
class MaskDrafter(nn.Module):
    """The student as a drafter for lossless self-speculative decoding (``cptoy.speculative``).

    One student pass over the text so far, then x_1 and k - 1 mask ids, gives k drafts: the
    output at x_1 drafts d_2, the output at mask j drafts d_{j+2}. The drafts are drawn
    independently from softmax(logits / T) per position (argmax at T = 0), so q is one factor
    per position (:class:`cptoy.speculative.FactorQ`). The student keeps its own KV cache of the
    decoder's output (:meth:`bind`), fed with the tokens added since its last pass.
    """

    routings = ("mixture",)
    rank = 1

    def __init__(self, student: SelfDistilledMTP):
        super().__init__()
        if not isinstance(student, SelfDistilledMTP):
            raise TypeError(f"student must be a SelfDistilledMTP, got {type(student).__name__}")
        self.student = student
        self.vocab_size = student.vocab_size

    def bind(self, prompt: list[int], tokens: list[int]) -> _BoundMaskDrafter:
        """A drafter for one ``generate`` call: it reads ``prompt + tokens`` (the decoder's
        lists, which only grow) at every proposal."""
        return _BoundMaskDrafter(self.student, prompt, tokens)


class _BoundMaskDrafter:
    def __init__(self, student: SelfDistilledMTP, prompt: list[int], tokens: list[int]):
        self.student, self.prompt, self.tokens = student, prompt, tokens
        self.cache = student.model.new_cache(1)
        self.fed = 0  # tokens of prompt + tokens in the student's cache

    def propose(self, hidden, x1: int, k: int, temperature: float, generator=None,
                routing: str = "mixture") -> Proposal:
        st, V = self.student, self.student.vocab_size
        if k > st.k:
            raise ValueError(f"the student drafts at most k = {st.k} tokens, {k} asked")
        text = self.prompt + self.tokens  # ends with x1
        new = text[self.fed:]
        dev = next(st.model.parameters()).device
        inp = torch.tensor([new + st.mask_ids[: k - 1]], dtype=torch.long, device=dev)
        H = st.model(inp, self.cache)  # (1, len(new) + k - 1, d)
        z = st.model.logits(H[0, len(new) - 1:])[:, :V].double()  # (k, V): at x_1 and masks
        self.cache.truncate(self.cache.length - (k - 1))  # forget the masks
        self.fed = len(text)
        if temperature == 0:
            drafts = z.argmax(-1).tolist()
            return Proposal(drafts, FactorQ(drafts, logits=z), gate_posterior=[1.0])
        p = torch.softmax(z / temperature, dim=-1)  # (k, V) float64
        _, drafts = sample_index(p, generator)
        return Proposal(drafts, FactorQ(drafts, probs=p), gate_posterior=[1.0])


class SelfSpecModel(nn.Module):
    """What ``cptoy.decoding.generate(strategy="self-spec")`` needs to verify a student's drafts
    with a backbone: ``backbone`` (the verifier, a GPT over the same V ids, e.g. the model the
    student was distilled from), ``heads`` (a :class:`MaskDrafter`) and ``n_future = k + 1``."""

    def __init__(self, student: SelfDistilledMTP, verifier: GPT):
        super().__init__()
        if not isinstance(verifier, GPT):
            raise TypeError(f"verifier must be a cptoy.model.GPT, got {type(verifier).__name__}")
        if verifier.config.vocab_size != student.vocab_size:
            raise ValueError(f"verifier vocab {verifier.config.vocab_size} != the student's "
                             f"{student.vocab_size}")
        self.backbone, self.heads, self.n_future = verifier, MaskDrafter(student), student.k + 1


# ====================================================================== ConfAdapt decoding
def confadapt_length(top_probs, threshold: float):
    """Tokens ConfAdapt emits: the longest prefix whose top-1 probabilities all exceed
    ``threshold`` (strictly), and at least 1.

    top_probs: (k,) or (..., k) tensor (or a list) of the k outputs' top-1 probabilities.
    Returns an int (1-D input) or an int64 tensor (...,).

    >>> confadapt_length([0.95, 0.92, 0.50, 0.99], 0.9)
    2
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or \
            not math.isfinite(threshold):
        raise TypeError(f"threshold must be a finite number, got {threshold!r}")
    p = torch.as_tensor(top_probs, dtype=torch.float64)
    if p.dim() == 0 or p.shape[-1] == 0:
        raise ValueError("top_probs must have a last dimension of size k >= 1")
    run = (p > threshold).long().cumprod(-1).sum(-1).clamp_min(1)
    return int(run) if p.dim() == 1 else run


class _ConfAdaptRule:
    """The rule of :func:`confadapt_generate` for ``cptoy.verifierfree.decode_unverified``: one
    forward over the new tokens and kk - 1 masks, keep the confident prefix of kk outputs."""

    def __init__(self, student: SelfDistilledMTP, k: int, threshold: float):
        self.student, self.k, self.threshold = student, k, threshold

    def forward(self, chunk: list[int], cache, room: int):
        model, V = self.student.model, self.student.vocab_size
        kk = min(self.k, room)
        inp = torch.tensor([chunk + self.student.mask_ids[: kk - 1]], dtype=torch.long)
        H = model(inp, cache)  # (1, len(chunk) + kk - 1, d)
        z = model.logits(H[0, len(chunk) - 1:])[:, :V].float()  # (kk, V)
        cache.truncate(cache.length - (kk - 1))  # forget the masks
        return torch.softmax(z, dim=-1).max(-1)  # top-1 probabilities (kk,), tokens (kk,)

    def choose(self, state, room: int) -> tuple[list[int], int]:
        top, y = state
        return y[: confadapt_length(top, self.threshold)].tolist(), len(y) - 1


@torch.no_grad()
def confadapt_generate(student: SelfDistilledMTP, prompt_ids, max_new_tokens: int,
                       threshold: float = 0.9, k: int | None = None,
                       eos_id: int | None = None):
    """Greedy ConfAdapt decoding (lossy, verifier-free) with the KV cache.

    Each step forwards the tokens emitted by the previous step (the prompt at first) plus k - 1
    mask ids, reads k greedy tokens and their top-1 probabilities at the last real position and
    the masks, emits :func:`confadapt_length` of them (capped at ``max_new_tokens``; cut after
    ``eos_id``), then rolls the cache back over the masks. ``k`` (default the student's) may be
    smaller; k = 1 is the student's plain greedy decoding. Needs ``len(prompt) +
    max_new_tokens + k - 1 <= block_size``. Returns a ``cptoy.decoding.Generation`` from
    ``cptoy.verifierfree.decode_unverified``.
    """
    if not isinstance(student, SelfDistilledMTP):
        raise TypeError(f"student must be a SelfDistilledMTP, got {type(student).__name__}")
    k = student.k if k is None else k
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= student.k:
        raise ValueError(f"k must be an int in [1, {student.k}], got {k}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or \
            not math.isfinite(threshold):
        raise TypeError(f"threshold must be a finite number, got {threshold!r}")
    check_positive_int(max_new_tokens, "max_new_tokens")
    model = student.model
    prompt = check_prompt_ids(prompt_ids, student.vocab_size)
    if len(prompt) + max_new_tokens + k - 1 > model.config.block_size:
        raise ValueError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) + k - 1 "
                         f"({k - 1}) exceeds block_size {model.config.block_size}")
    return decode_unverified(student, model, prompt, max_new_tokens,
                             _ConfAdaptRule(student, k, threshold), "confadapt", 0.0, k - 1,
                             eos_id)
