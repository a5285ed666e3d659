"""The canonical probability (CP) decomposition: one object for exact fits and trained heads.

A rank-r CP distribution over n tokens of a vocabulary of size V is

    Q(x_1..x_n) = sum_a w_a prod_s q_{s,a}(x_s)

with ``w`` on the simplex (the *gate*) and every ``q_{s,a}`` a distribution over V (expert a's
factor for position s). :class:`CPDist` keeps it in log space and batched over any leading
dimensions, so the same code serves ``fit_cp`` on an exact joint (no batch) and ``CPHeads`` on a
batch of hidden states (batch ``(B, T)``).

Shapes (``*B`` = batch shape, possibly empty):
    log_weights  (*B, r)
    log_factors  (*B, n, r, V)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from cptoy._checks import as_tensor, check_distribution, check_joint, check_positive_int

__all__ = ["CPDist", "CPFit", "fit_cp", "kl_to_cp"]


@dataclass
class CPDist:
    """A batched rank-r CP distribution over n tokens, stored as log weights and log factors."""

    log_weights: torch.Tensor  # (*B, r)   log gate weights, logsumexp over r is 0
    log_factors: torch.Tensor  # (*B, n, r, V)   log factor distributions, logsumexp over V is 0

    def __post_init__(self):
        lw, lf = self.log_weights, self.log_factors
        if lf.dim() < 3:
            raise ValueError(f"log_factors must have shape (*B, n, r, V), got {tuple(lf.shape)}")
        if lw.shape[-1] != lf.shape[-2] or lw.shape[:-1] != lf.shape[:-3]:
            raise ValueError(
                f"log_weights (*B, r) {tuple(lw.shape)} does not match log_factors (*B, n, r, V) "
                f"{tuple(lf.shape)}"
            )

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_probs(cls, weights, factors, atol: float = 1e-5) -> CPDist:
        """Build from probabilities: ``weights`` (*B, r) on the simplex, ``factors`` (*B, n, r, V)."""
        w = as_tensor(weights, "weights")
        f = as_tensor(factors, "factors")
        check_distribution(w, "weights", dims=1, atol=atol)
        check_distribution(f, "factors", dims=1, atol=atol)
        return cls(w.log(), f.log())

    @classmethod
    def from_logits(cls, gate_logits: torch.Tensor | None, factor_logits: torch.Tensor) -> CPDist:
        """Build from unnormalised logits; ``gate_logits`` None means rank 1 (weight 1)."""
        lf = torch.log_softmax(factor_logits, dim=-1)
        if gate_logits is None:
            lw = torch.zeros(
                *factor_logits.shape[:-3], factor_logits.shape[-2], dtype=lf.dtype, device=lf.device
            )
        else:
            lw = torch.log_softmax(gate_logits, dim=-1)
        return cls(lw, lf)

    # ------------------------------------------------------------------ shape facts
    @property
    def rank(self) -> int:
        return self.log_factors.shape[-2]

    @property
    def n(self) -> int:
        return self.log_factors.shape[-3]

    @property
    def vocab_size(self) -> int:
        return self.log_factors.shape[-1]

    @property
    def batch_shape(self) -> torch.Size:
        return self.log_weights.shape[:-1]

    @property
    def weights(self) -> torch.Tensor:
        """Gate weights ``w`` (*B, r)."""
        return self.log_weights.exp()

    @property
    def factors(self) -> torch.Tensor:
        """Factor distributions ``q_{s,a}`` (*B, n, r, V)."""
        return self.log_factors.exp()

    def __getitem__(self, idx) -> CPDist:
        """Index the batch dimensions, e.g. ``dist[0, -1]`` is one position of one sequence."""
        if not isinstance(idx, tuple):
            idx = (idx,)
        if len(self.batch_shape) == 0:
            raise IndexError("this CPDist has no batch dimensions to index")
        return CPDist(
            self.log_weights[idx + (slice(None),)], self.log_factors[idx + (slice(None),) * 3]
        )

    def to(self, *args, **kwargs) -> CPDist:
        return CPDist(self.log_weights.to(*args, **kwargs), self.log_factors.to(*args, **kwargs))

    def detach(self) -> CPDist:
        return CPDist(self.log_weights.detach(), self.log_factors.detach())

    # ------------------------------------------------------------------ densities
    def to_tensor(self) -> torch.Tensor:
        """The explicit joint, shape (*B, V, ..., V) with n axes of size V. Only for small V**n."""
        if self.vocab_size**self.n > 50_000_000:
            raise ValueError(
                f"to_tensor would build V**n = {self.vocab_size}**{self.n} entries; too large"
            )
        w = self.weights  # (*B, r)
        f = self.factors  # (*B, n, r, V)
        out = w  # (*B, r)
        for s in range(self.n):
            # out (*B, r, V..V[s]) x f[..., s, :, :] (*B, r, V)
            fs = f[..., s, :, :]
            fs = fs.reshape(fs.shape[:-1] + (1,) * s + fs.shape[-1:])
            out = out.unsqueeze(-1) * fs
        return out.sum(dim=len(self.batch_shape))

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log Q(x) for token tuples ``x`` of shape (*S, *B, n) -> (*S, *B).

        ``*S`` are optional extra sample dimensions in front of the batch shape.
        """
        x = _check_tokens(x, "x", self.n, self.vocab_size)
        lf = self.log_factors.expand(
            x.shape[:-1] + self.log_factors.shape[-3:]
        )  # (*S, *B, n, r, V)
        idx = x.unsqueeze(-1).unsqueeze(-1).expand(x.shape + (self.rank, 1))  # (*S, *B, n, r, 1)
        per_expert = lf.gather(-1, idx).squeeze(-1).sum(-2)  # (*S, *B, r)
        return torch.logsumexp(per_expert + self.log_weights, dim=-1)

    def log_marginal(self, position: int = 0) -> torch.Tensor:
        """log of the mixture marginal of one position, (*B, V)."""
        if not 0 <= position < self.n:
            raise ValueError(f"position must be in [0, {self.n}), got {position}")
        lf = self.log_factors[..., position, :, :]  # (*B, r, V)
        return torch.logsumexp(lf + self.log_weights.unsqueeze(-1), dim=-2)

    def marginal(self, positions) -> CPDist:
        """The CP distribution of the tokens at ``positions`` (a list of distinct indices)."""
        positions = list(positions)
        if (
            not positions
            or len(set(positions)) != len(positions)
            or any(not 0 <= p < self.n for p in positions)
        ):
            raise ValueError(
                f"positions must be distinct indices in [0, {self.n}), got {positions}"
            )
        return CPDist(self.log_weights, self.log_factors[..., positions, :, :])

    def posterior_log_weights(self, prefix: torch.Tensor) -> torch.Tensor:
        """Posterior gate after observing the first k tokens ``prefix`` (*B, k): (*B, r).

        ``w'_a ∝ w_a prod_{s<k} q_{s,a}(x_s)``.
        """
        prefix = _check_tokens(prefix, "prefix", None, self.vocab_size)
        k = prefix.shape[-1]
        if not 1 <= k <= self.n:
            raise ValueError(f"prefix must hold between 1 and n={self.n} tokens, got {k}")
        lf = self.log_factors[..., :k, :, :]  # (*B, k, r, V)
        idx = prefix.unsqueeze(-1).unsqueeze(-1).expand(prefix.shape + (self.rank, 1))
        ll = lf.gather(-1, idx).squeeze(-1).sum(-2)  # (*B, r)
        return torch.log_softmax(self.log_weights + ll, dim=-1)

    def condition(self, prefix: torch.Tensor) -> CPDist:
        """The CP conditional of positions k..n-1 given the first k tokens ``prefix`` (*B, k).

        The factors of the remaining positions are unchanged; only the gate moves to the
        posterior. Rank 1 cannot condition: its posterior is its prior.
        """
        prefix = torch.as_tensor(prefix)
        k = prefix.shape[-1] if prefix.dim() > 0 else 0
        if k >= self.n:
            raise ValueError(
                f"prefix must be shorter than n={self.n} to leave tokens to predict, got {k}"
            )
        post = self.posterior_log_weights(prefix)
        return CPDist(post, self.log_factors[..., k:, :, :])

    def tempered(self, temperature: float) -> CPDist:
        """Apply a sampling temperature to every factor (softmax(logits / T)); gate unchanged."""
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 for tempered(), got {temperature}")
        if temperature == 1.0:
            return self
        return CPDist(self.log_weights, torch.log_softmax(self.log_factors / temperature, dim=-1))

    # ------------------------------------------------------------------ sampling
    def sample(
        self, num: int = 1, generator: torch.Generator | None = None, return_experts: bool = False
    ):
        """Draw ``num`` token tuples: (num, *B, n) (and the expert used, (num, *B), if asked)."""
        check_positive_int(num, "num")
        w = self.weights.detach()  # (*B, r)
        flat_w = w.reshape(-1, self.rank)
        experts = torch.multinomial(
            flat_w, num, replacement=True, generator=generator
        )  # (prod B, num)
        experts = experts.T.reshape((num,) + tuple(self.batch_shape))  # (num, *B)
        f = self.factors.detach()  # (*B, n, r, V)
        fe = f.unsqueeze(0).expand((num,) + f.shape)  # (num, *B, n, r, V)
        idx = (
            experts.unsqueeze(-1)
            .unsqueeze(-1)
            .unsqueeze(-1)
            .expand(experts.shape + (self.n, 1, self.vocab_size))
        )
        chosen = fe.gather(-2, idx).squeeze(-2)  # (num, *B, n, V)
        flat = chosen.reshape(-1, self.vocab_size)
        tokens = torch.multinomial(flat, 1, generator=generator).reshape(
            chosen.shape[:-1]
        )  # (num, *B, n)
        return (tokens, experts) if return_experts else tokens

    def mode(self) -> torch.Tensor:
        """Greedy sequential mode (*B, n): argmax of each position's conditional given the previous.

        This is what temperature-0 drafting uses; it is not the global maximiser of Q.
        """
        if self.rank == 1:  # independent positions: each one's own argmax
            return self.log_factors[..., 0, :].argmax(-1)
        lw = self.log_weights
        out = []
        for s in range(self.n):
            lf = self.log_factors[..., s, :, :]  # (*B, r, V)
            lm = torch.logsumexp(lf + lw.unsqueeze(-1), dim=-2)  # (*B, V)
            tok = lm.argmax(-1)  # (*B,)
            out.append(tok)
            lw = torch.log_softmax(
                lw
                + lf.gather(-1, tok[..., None, None].expand(tok.shape + (self.rank, 1))).squeeze(
                    -1
                ),
                -1,
            )
        return torch.stack(out, dim=-1)

    def __repr__(self) -> str:
        return f"CPDist(rank={self.rank}, n={self.n}, V={self.vocab_size}, batch_shape={tuple(self.batch_shape)})"


def _check_tokens(x, name: str, n: int | None, V: int) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"{name} must be an integer tensor of token ids, got dtype {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have a last axis of tokens, got a scalar")
    if n is not None and x.shape[-1] != n:
        raise ValueError(f"{name} must have last dimension n={n}, got {x.shape[-1]}")
    if x.numel() and (x.min() < 0 or x.max() >= V):
        raise ValueError(f"{name} holds token ids outside [0, {V})")
    return x.long()


# ====================================================================== fitting
@dataclass
class CPFit:
    """Result of :func:`fit_cp`."""

    dist: CPDist  # the fitted CP distribution (no batch dims)
    history: list[float] = field(
        default_factory=list
    )  # KL(P||Q) after each iteration (best restart)
    kl: float = float("nan")  # final KL(P||Q) in nats
    method: str = "em"  # "em", "hals" or "als"
    seconds: float = 0.0  # wall time of the fit, all restarts
    n_negative: int = 0  # ALS only: negative entries clipped to zero during conversion
    failed: int = 0  # restarts that returned NaN (tensorly HALS sometimes does)


def kl_to_cp(P: torch.Tensor, dist: CPDist) -> float:
    """KL(P || Q) in nats for an exact joint P and a CPDist Q (entries with P = 0 contribute 0)."""
    Q = dist.to_tensor().to(P.dtype)
    m = P > 0
    if (Q[m] <= 0).any():
        return float("inf")
    return float((P[m] * (P[m].log() - Q[m].log())).sum())


def fit_cp(
    P,
    rank: int,
    method: str = "em",
    n_iter: int = 200,
    tol: float = 1e-9,
    restarts: int = 1,
    seed: int = 0,
    eps: float = 1e-12,
) -> CPFit:
    """Fit a rank-``rank`` CP distribution to an exact joint ``P`` of shape (V,)*n.

    method:
        ``"em"``   minimises KL(P||Q) by expectation-maximisation; KL never increases.
        ``"hals"`` tensorly's ``non_negative_parafac_hals`` (Frobenius error, nonnegative factors).
        ``"als"``  tensorly's ``parafac`` (Frobenius error, unconstrained factors).

    Conversion to simplex form (HALS and ALS): each factor column is scaled to sum to 1, the
    scales move into the weights, and the weights are renormalised. For ALS, factors can be
    *negative*: those entries are clipped to zero first (``CPFit.n_negative`` counts them), so the
    converted distribution is a different, usually worse tensor than the ALS least-squares fit.
    ``eps`` is added to every factor entry before renormalising so that Q > 0 where P > 0 and the
    KL stays finite; this is stated, not hidden: it shifts at most ``eps * V`` mass per factor.

    Returns a :class:`CPFit` with the best of ``restarts`` runs (lowest KL).
    """
    P = check_joint(P, "P")
    check_positive_int(rank, "rank")
    check_positive_int(n_iter, "n_iter")
    check_positive_int(restarts, "restarts")
    if method not in ("em", "hals", "als"):
        raise ValueError(f'method must be "em", "hals" or "als", got {method!r}')
    t0 = time.perf_counter()
    best: CPFit | None = None
    failed = 0
    for k in range(restarts):
        if method == "em":
            fit = _fit_em(P, rank, n_iter, tol, seed + k)
        else:
            fit = _fit_tensorly(P, rank, method, n_iter, tol, seed + k, eps)
        if fit is None or not math.isfinite(fit.kl):
            failed += 1
            continue
        if best is None or fit.kl < best.kl:
            best = fit
    if best is None:
        raise RuntimeError(
            f"all {restarts} restarts of fit_cp(method={method!r}) failed (NaN factors)"
        )
    best.seconds = time.perf_counter() - t0
    best.failed = failed
    return best


def _kl_dense(P: torch.Tensor, Q: torch.Tensor) -> float:
    m = P > 0
    return float((P[m] * (P[m].log() - Q[m].clamp_min(1e-300).log())).sum())


def _fit_em(P: torch.Tensor, rank: int, n_iter: int, tol: float, seed: int) -> CPFit:
    """Dense EM for KL(P||Q). P (V,)*n float64."""
    n, V = P.dim(), P.shape[0]
    g = torch.Generator().manual_seed(seed)
    # init: factors near P's marginals, perturbed so experts differ
    marg = [P.sum(dim=tuple(d for d in range(n) if d != s)) for s in range(n)]
    F = torch.stack(
        [
            torch.stack(
                [
                    marg[s] * torch.empty(V, dtype=P.dtype).uniform_(0.5, 1.5, generator=g)
                    + 1e-3 / V
                    for _ in range(rank)
                ]
            )
            for s in range(n)
        ]
    )  # (n, r, V)
    F = F / F.sum(-1, keepdim=True)
    w = torch.full((rank,), 1.0 / rank, dtype=P.dtype)
    history: list[float] = []
    letters = "abcdefghijklmnopq"[:n]
    factor_terms = ",".join(f"z{c}" for c in letters)  # "za,zb,zc"

    def joint(w, F):  # Q (V,..,V) = sum_z w_z prod_s F[s, z, x_s], never building (r, V^n)
        return torch.einsum(f"z,{factor_terms}->{letters}", w, *F.unbind(0))

    Q = joint(w, F)
    history.append(_kl_dense(P, Q))
    for _ in range(n_iter):
        ratio = P / Q.clamp_min(1e-300)  # (V,..,V)
        # M-step numerators: sum_x P(x) g_a(x) [x_s = v] = w_a F[s,a,v] sum_{x_-s} ratio prod_{t!=s} F[t,a,x_t]
        F_new = torch.stack(
            [
                torch.einsum(
                    f"{letters},"
                    + ",".join(f"z{c}" for t, c in enumerate(letters) if t != s)
                    + f"->z{letters[s]}",
                    ratio,
                    *[F[t] for t in range(n) if t != s],
                )
                * F[s]
                * w[:, None]
                for s in range(n)
            ]
        )  # (n, r, V)
        w_new = F_new[0].sum(-1)  # (r,)
        F_new = F_new / w_new.clamp_min(1e-300).view(1, rank, 1)
        # an expert with zero weight keeps its old factors (they do not matter)
        dead = w_new <= 1e-300
        if dead.any():
            F_new[:, dead] = F[:, dead]
        w, F = w_new / w_new.sum(), F_new / F_new.sum(-1, keepdim=True)
        Q = joint(w, F)
        history.append(_kl_dense(P, Q))
        if history[-2] - history[-1] < tol:
            break
    dist = CPDist(w.clamp_min(1e-300).log(), F.clamp_min(1e-300).log())
    return CPFit(dist=dist, history=history, kl=history[-1], method="em")


def _fit_tensorly(P, rank, method, n_iter, tol, seed, eps) -> CPFit | None:
    import numpy as np
    import tensorly as tl
    from tensorly.decomposition import non_negative_parafac_hals, parafac

    T = tl.tensor(P.numpy())
    history: list[float] = []
    if method == "hals":
        cp = non_negative_parafac_hals(
            T, rank=rank, n_iter_max=n_iter, tol=tol, random_state=seed, init="random"
        )
    else:
        cp = parafac(T, rank=rank, n_iter_max=n_iter, tol=tol, random_state=seed, init="random")
    weights, factors = cp
    weights = np.asarray(weights, dtype=np.float64)
    mats = [np.asarray(f, dtype=np.float64) for f in factors]  # n x (V, r)
    if not (np.isfinite(weights).all() and all(np.isfinite(m).all() for m in mats)):
        return None
    # tensorly's weights multiply every column; signs of ALS columns may be negative in pairs:
    # fold each column's sign into the first factor so a product-of-signs stays the same.
    w = weights.copy()
    n_neg = 0
    simplex = []
    for s, m in enumerate(mats):
        if s == 0:
            m = m * w[None, :]
        neg_cols = m.sum(0) < 0
        m = np.where(neg_cols[None, :], -m, m) if s > 0 else m
        if s > 0:
            mats[0][:, neg_cols] *= -1  # keep the product the same sign
        simplex.append(m)
    # recompute first factor after sign folding
    simplex[0] = mats[0] * w[None, :]
    scales = np.ones(rank)
    out = []
    for m in simplex:
        n_neg += int((m < 0).sum())
        m = np.clip(m, 0.0, None)
        col = m.sum(0)
        scales *= col
        out.append((m + eps) / (col[None, :] + eps * m.shape[0]))
    wts = scales / scales.sum() if scales.sum() > 0 else np.full(rank, 1.0 / rank)
    wts = np.clip(wts, 1e-300, None)
    F = torch.tensor(np.stack([o.T for o in out]))  # (n, r, V)
    dist = CPDist(torch.tensor(wts / wts.sum()).log(), F.log())
    kl = kl_to_cp(P, dist)
    history.append(kl)
    return CPFit(dist=dist, history=history, kl=kl, method=method, n_negative=n_neg)
