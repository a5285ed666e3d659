"""Head-only distillation: CP heads on a frozen backbone learn the backbone's own distribution.

On a frozen backbone the heads have one job: draft what the *backbone* would say, because the
backbone verifies every draft. So besides the data's cross-entropy we pull each head position
towards the backbone's own next-token distributions along the teacher-forced continuation.

For a window ``x_1 .. x_{T+n}`` let ``h_t`` be the backbone's hidden state after ``x_{<=t}`` and
``p_{t+s-1} = softmax(logits(h_{t+s-1}))`` its next-token distribution for ``x_{t+s}`` given the
*true* prefix ``x_{<=t+s-1}`` (teacher forcing). The heads at ``h_t`` give a CP joint whose
marginal at position s is ``Q_s(v | h_t) = sum_a w_a(h_t) q_{s,a}(v | h_t)``. The distillation
term is the **forward** KL, teacher first, averaged over positions s = 1..n and over contexts t::

    kl = mean_{t, s} KL(p_{t+s-1} || Q_s(. | h_t))
       = mean_{t, s} sum_v p_{t+s-1}(v) [log p_{t+s-1}(v) - log Q_s(v | h_t)]

(nats per head position; mass-covering, so a draft marginal never puts ~0 on a token the
backbone likes). Its minimiser over Q_s given h_t is ``E[p_{t+s-1} | h_t]``, the backbone's own
marginal of ``x_{t+s}`` (the continuation averaged over the data), i.e. what the verifier will
accept on average. The KL only sees marginals: the correlations between positions that a rank r
> 1 can express are taught by the cross-entropy term on the data,

    joint_nll = mean_t -log Q(x_{t+1}, .., x_{t+n} | h_t) / n   (as in ``MTPModel.loss``),

and the objective is

    total = alpha * kl + (1 - alpha) * joint_nll + load_balance_coef * load_balance.

Only contexts t with t + n - 1 inside the window's first T tokens are used (the backbone runs once
on those T tokens, the teacher logits come from the same forward), a seeded random subset of
``positions`` of them per batch; the (K, n, r, V) head logits are computed in chunks under
activation checkpointing so memory stays bounded at GPT-2 vocabulary sizes.

Usage::

    model = MTPModel(cfg, n_future=4, rank=8, freeze_backbone=True)
    train(model, train_ids, val_ids, TrainConfig(...), loss_fn=distill_loss_fn(alpha=0.5))
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from cptoy._checks import check_positive_int

__all__ = ["distill_loss", "distill_loss_fn", "marginal_kl"]


def _check_alpha(alpha) -> float:
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float))
        or not math.isfinite(alpha)
        or not 0.0 <= alpha <= 1.0
    ):
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    return float(alpha)


def marginal_kl(
    teacher_logits: torch.Tensor, log_gate: torch.Tensor, factor_logits: torch.Tensor
) -> torch.Tensor:
    """KL(p || Q_s) per (position, head position): the formula of this module.

    teacher_logits (K, n, V): backbone logits whose softmax p[k, s] is the target of head
        position s; log_gate (K, r): log w; factor_logits (K, n, r, V): unnormalised z_{s,a}.
    Returns (K, n) nats, computed in float32 log space (exactly 0 when Q_s = p).
    """
    log_p = torch.log_softmax(teacher_logits.float(), dim=-1)  # (K, n, V)
    log_f = torch.log_softmax(factor_logits.float(), dim=-1)  # (K, n, r, V)
    log_m = torch.logsumexp(log_gate.float()[:, None, :, None] + log_f, dim=2)  # (K, n, V)
    return (log_p.exp() * (log_p - log_m)).sum(-1)  # (K, n)


def _chunk_terms(heads, h, teacher, targets):
    """h (c, d), teacher (c, n, V), targets (c, n) -> (kl sum, log Q sum, log Q_1(x_1) sum)."""
    lw = heads.gate_log_probs(h)  # (c, r)
    z = heads.factor_logits(h)  # (c, n, r, V)
    kl = marginal_kl(teacher, lw, z)  # (c, n)
    lf = torch.log_softmax(z.float(), dim=-1)  # (c, n, r, V)
    r = lf.shape[2]
    lq = lf.gather(-1, targets[:, :, None, None].expand(-1, -1, r, 1)).squeeze(-1)  # (c, n, r)
    log_q = torch.logsumexp(lw.float() + lq.sum(1), dim=-1)  # (c,)
    log_first = torch.logsumexp(lw.float() + lq[:, 0], dim=-1)  # (c,)
    return kl.sum(), log_q.sum(), log_first.sum()


def distill_loss(
    model,
    idx: torch.Tensor,
    alpha: float = 0.5,
    load_balance_coef: float | None = None,
    positions: int | None = 64,
    chunk: int = 16,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """The distillation objective on one batch ``idx`` (B, T + n) for an MTPModel with a frozen
    backbone (``MTPModel(..., freeze_backbone=True)``); see the module docstring.

    alpha: weight of the KL in [0, 1]; the data cross-entropy gets 1 - alpha.
    load_balance_coef: weight of the load-balance term (None: the model's ``load_balance_coef``).
    positions: contexts per batch used by the head terms (a seeded random subset of the
        B * (T - n + 1) valid ones; None: all of them).
    chunk: contexts per checkpointed chunk of (chunk, n, r, V) head logits.
    generator: draws the positions (None: a generator seeded from the model's ``seed``, stored
        on the model, so runs are reproducible).

    Returns scalars: ``total, kl, joint_nll, first_token_nll, next_token_nll`` (the frozen
    backbone's own data NLL, for reference), ``load_balance, expert_entropy``.
    """
    alpha = _check_alpha(alpha)
    if not hasattr(model, "heads") or not hasattr(model, "backbone_frozen"):
        raise TypeError(f"model must be an MTPModel, got {type(model).__name__}")
    if not model.backbone_frozen:
        raise ValueError(
            "distill_loss trains the heads of a frozen backbone: build the model with "
            "freeze_backbone=True (or call model.freeze_backbone())"
        )
    lb = model.load_balance_coef if load_balance_coef is None else load_balance_coef
    if isinstance(lb, bool) or not isinstance(lb, (int, float)) or not math.isfinite(lb) or lb < 0:
        raise ValueError(f"load_balance_coef must be a finite number >= 0, got {lb!r}")
    if positions is not None:
        check_positive_int(positions, "positions")
    check_positive_int(chunk, "chunk")
    T = model._check_idx(idx)
    n, r = model.n_future, model.rank
    if T < n:
        raise ValueError(f"idx must hold T >= n_future = {n} context tokens, got T = {T}")

    with torch.no_grad():
        hidden = model.backbone(idx[:, :T])  # (B, T, d)
        logits = model.backbone.logits(hidden)  # (B, T, V)
        next_nll = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), idx[:, 1 : T + 1].reshape(-1)
        )
    B, _, d = hidden.shape
    Tv = T - n + 1  # contexts t = 0 .. T - n have teacher logits for all n head positions
    log_gate_all = model.heads.gate_log_probs(hidden.reshape(B * T, d))  # (B*T, r)
    N = B * Tv
    if positions is not None and positions < N:
        if generator is None:
            generator = getattr(model, "_distill_gen", None)
            if generator is None:
                generator = torch.Generator().manual_seed(int(getattr(model, "seed", 0)))
                model._distill_gen = generator
        flat = torch.randperm(N, generator=generator)[:positions]
    else:
        flat = torch.arange(N)
    flat = flat.to(idx.device)
    b, t = flat // Tv, flat % Tv  # (K,) sequence and context of each selected position
    ts = t[:, None] + torch.arange(n, device=idx.device)  # (K, n): positions t .. t + n - 1
    h = hidden[b, t]  # (K, d)
    # teacher[k, s] = logits at position t + s: p(x_{t+s+1} | x_{<=t+s}) (0-based s)
    teacher = logits[b[:, None], ts]  # (K, n, V), gathered: no (B, Tv, n, V) copy
    targets = idx[b[:, None], ts + 1]  # (K, n): x_{t+1..t+n}
    K = h.shape[0]

    kl_sum = log_q_sum = first_sum = 0.0
    use_ckpt = torch.is_grad_enabled()
    for lo in range(0, K, chunk):
        args = (model.heads, h[lo : lo + chunk], teacher[lo : lo + chunk], targets[lo : lo + chunk])
        if use_ckpt:
            k, q, f = checkpoint(_chunk_terms, *args, use_reentrant=False)
        else:
            k, q, f = _chunk_terms(*args)
        kl_sum, log_q_sum, first_sum = kl_sum + k, log_q_sum + q, first_sum + f

    kl = kl_sum / (K * n)
    joint_nll = -log_q_sum / (K * n)
    first_nll = -first_sum / K
    usage = log_gate_all.float().exp().mean(0)  # (r,)
    load_balance = r * (usage**2).sum()
    entropy = -(usage * usage.clamp_min(1e-30).log()).sum()
    total = alpha * kl + (1.0 - alpha) * joint_nll + lb * load_balance
    return dict(
        total=total,
        kl=kl,
        joint_nll=joint_nll,
        first_token_nll=first_nll,
        next_token_nll=next_nll,
        load_balance=load_balance,
        expert_entropy=entropy,
    )


def distill_loss_fn(
    alpha: float = 0.5,
    load_balance_coef: float | None = None,
    positions: int | None = 64,
    chunk: int = 16,
):
    """``loss_fn`` for :func:`cptoy.train.train`: ``f(model, batch) -> distill_loss(...)``.

    Arguments are checked now (a bad ``alpha`` fails before training starts)."""
    alpha = _check_alpha(alpha)
    if positions is not None:
        check_positive_int(positions, "positions")
    check_positive_int(chunk, "chunk")

    def loss_fn(model, batch):
        return distill_loss(model, batch, alpha, load_balance_coef, positions, chunk)

    loss_fn.alpha = alpha
    return loss_fn
