"""The fused, chunked training computation of CP heads: sum_i log Q_i(x_i) and its gradients.

The loss never materialises (B, T, n, r, V) probabilities: :class:`FusedCPLogProb` walks over
chunks of positions, computes each chunk's logits, the target log-probabilities, the
log-normalisers and (when gradients are needed) the gradients right away, and keeps only
(N, n, r)-sized results. ``CPHeads.joint_log_prob`` is the plain, per-position differentiable
version (chunked, with activation checkpointing); tests check that both agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["FusedCPLogProb", "HeadTerms"]

TINY = 1e-30  # below this a probability's log is taken in log space instead (float32 safety)


class FusedCPLogProb(torch.autograd.Function):
    """sum_i log Q_i(x_i) over N positions, chunked, with gradients computed in the forward.

    Inputs (``m`` is r for the full structure, 1 for the structured one, where the base logits
    are shared by the experts of a position):
        X  (N, n, m, d)   transformed hidden states that meet the unembedding
        U  (V, d)         the unembedding
        C  (N, n, r, e)   expert codes (structured only, else None)
        B  (V, e)         expert output embedding (structured only, else None)
        lw (N, r)         log gate weights
        targets (N, n)    token ids
    Logits: z_{s,a} = X_{s,a} @ U.T (+ C_{s,a} @ B.T), shape (c, n, r, V) per chunk.

    Returns (total, log_q, log_first): total = sum_i log Q_i (the only differentiable output),
    log_q (N,) per-position log Q and log_first (N,) the log CP marginal of the first token
    (both detached).

    Gradients (for one position, g = posterior responsibilities softmax_a(lw_a + sum_s lq_{s,a})):
        d log Q / d z_{s,a,v} = g_a (1[v = x_s] - q_{s,a}(v)),   d log Q / d lw_a = g_a.
    The upstream gradient of ``total`` is a scalar, so the gradients are computed chunk by chunk
    in the forward (nothing of size V is kept) and only scaled in the backward.
    """

    @staticmethod
    def forward(ctx, X, U, C, B, lw, targets, chunk: int, needs: tuple[bool, ...]):
        need_X, need_U, need_C, need_B, need_lw = needs
        any_grad = any(needs)
        N, n, m, d = X.shape
        r = lw.shape[-1]
        V = U.shape[0]
        structured = C is not None
        dX = torch.empty_like(X) if need_X else None
        dU = torch.zeros(V, d, dtype=torch.float32, device=U.device) if need_U else None
        dC = torch.empty_like(C) if need_C else None
        dB = torch.zeros_like(B, dtype=torch.float32) if need_B else None
        dlw = torch.empty_like(lw) if need_lw else None
        log_q = torch.empty(N, dtype=torch.float32, device=X.device)
        log_first = torch.empty(N, dtype=torch.float32, device=X.device)
        Ut = U.t()
        for lo in range(0, N, chunk):
            hi = min(N, lo + chunk)
            c = hi - lo
            Xc = X[lo:hi]
            base = (Xc.reshape(c * n * m, d) @ Ut).view(c, n, m, V)
            if structured:
                e = C.shape[-1]
                Cc = C[lo:hi]
                z = (Cc.reshape(c * n * r, e) @ B.t()).view(c, n, r, V).float()
                z += base  # (c, n, r, V), base broadcast over experts
            else:
                z = base.float()  # (c, n, r, V)
            tgt = targets[lo:hi].view(c, n, 1, 1).expand(c, n, r, 1)
            P = torch.softmax(z, dim=-1)  # (c, n, r, V) q_{s,a}: one fused kernel
            pt = P.gather(-1, tgt).squeeze(-1)  # (c, n, r) q_{s,a}(x_s)
            if bool((pt < TINY).any()):  # log would lose precision: exact log-space fallback
                lq = z.gather(-1, tgt).squeeze(-1) - torch.logsumexp(z, dim=-1)
            else:
                lq = pt.log()  # (c, n, r) log q_{s,a}(x_s)
            del z
            lwc = lw[lo:hi].float()  # (c, r)
            ell = lwc + lq.sum(1)  # (c, r) log w_a + sum_s log q_{s,a}(x_s)
            log_q[lo:hi] = torch.logsumexp(ell, dim=-1)
            log_first[lo:hi] = torch.logsumexp(lwc + lq[:, 0], dim=-1)
            if not any_grad:
                continue
            log_g = torch.log_softmax(ell, dim=-1)  # (c, r) log posterior responsibilities
            g = log_g.exp()
            if need_lw:
                dlw[lo:hi] = g.to(dlw.dtype)
            if not (need_X or need_U or need_C or need_B):
                continue
            # G = g_a (q_{s,a} - onehot(x_s)) = d(-log Q)/dz_{s,a}, built in place in P's storage
            G = P.mul_(g.view(c, 1, r, 1))  # (c, n, r, V) g_a q_{s,a}
            G.scatter_add_(-1, tgt, -g.view(c, 1, r, 1).expand(c, n, r, 1))
            # gradient of the base logits: summed over experts first when they share the base
            Gb = G.sum(2, keepdim=True) if (m == 1 and r > 1) else G  # (c, n, m, V)
            Gb2 = Gb.reshape(c * n * m, V)
            if need_X:
                dX[lo:hi] = (Gb2 @ U.to(Gb2.dtype)).view(c, n, m, d).to(dX.dtype)
            if need_U:
                dU += (Gb2.t() @ Xc.reshape(c * n * m, d).to(Gb2.dtype)).float()
            if structured and (need_C or need_B):
                G2 = G.reshape(c * n * r, V)
                if need_C:
                    dC[lo:hi] = (G2 @ B.to(G2.dtype)).view(c, n, r, -1).to(dC.dtype)
                if need_B:
                    dB += (G2.t() @ Cc.reshape(c * n * r, -1).to(G2.dtype)).float()
        ctx.grads = (dX, dU, dC, dB, dlw)
        ctx.dtypes = (U.dtype, None if B is None else B.dtype)
        ctx.mark_non_differentiable(log_q, log_first)
        return log_q.sum(), log_q, log_first

    @staticmethod
    def backward(ctx, g_total, _g_q, _g_first):
        dX, dU, dC, dB, dlw = ctx.grads
        del ctx.grads

        def scale(t, by, dtype=None):
            if t is None:
                return None
            t = t * by.to(t.dtype)
            return t if dtype is None else t.to(dtype)

        # dX, dU, dC, dB hold gradients of -sum log Q, dlw the gradient of +sum log Q
        neg = -g_total
        return (
            scale(dX, neg),
            scale(dU, neg, ctx.dtypes[0]),
            scale(dC, neg),
            scale(dB, neg, ctx.dtypes[1]),
            scale(dlw, g_total),
            None,
            None,
            None,
        )


@dataclass
class HeadTerms:
    """What the multi-token loss needs from the heads at N positions (see ``CPHeads.loss_terms``)."""

    log_q_sum: torch.Tensor  # () sum over positions of log Q(x_1..x_n); carries the gradient
    log_q: torch.Tensor  # (N,) per-position log Q(x_1..x_n), detached
    log_first: torch.Tensor  # (N,) per-position log of the CP marginal of x_1, detached
