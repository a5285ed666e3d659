"""Exact acceptance theory for draft-and-verify decoding on a known joint.

Setting (background.md §3, cptoy's self-speculative step): P (V,)*n is the true joint of the
next n tokens, Q (V,)*n (dense, or a :class:`~cptoy.cp.CPDist`) is the drafter's joint. One
step: x_1 ~ P exactly (the backbone decides the first token); drafts d_2..d_n are drawn from
Q's conditional given x_1 and the previous drafts; d_j is accepted with probability
``min(1, P(d_j | x_<j) / Q(d_j | x_<j))``, left to right, stopping at the first rejection.
Tokens gained per forward = 1 + number of accepted drafts (the replacement / bonus token is
the next step's x_1). Then

    E = 1 + sum_{k=1..n-1} Pr(d_2..d_{k+1} all accepted),
    Pr(d_2..d_{k+1} all accepted) = sum_{x_1..x_{k+1}} P(x_1) prod_{j=2..k+1}
                                    min(P(x_j | x_<j), Q(x_j | x_<j)).

Zero-probability prefixes: where P(x_<j) = 0 the path already has weight 0, and conditionals
there are taken as 0 (no NaN). Q must be able to condition on every first token P can emit:
if P(x_1) > 0 but Q(x_1) = 0, Q's drafts given x_1 are undefined and a ValueError is raised.
"""

from __future__ import annotations

import torch

from cptoy._checks import as_tensor, check_distribution, check_joint, check_same_shape
from cptoy.cp import CPDist

__all__ = [
    "acceptance_rate",
    "expected_tokens_per_forward",
    "simulate_tokens_per_forward",
    "leviathan_expected_tokens",
    "greedy_tokens_per_forward",
]


def acceptance_rate(p, q) -> float:
    """Probability that one draft from ``q`` is accepted against target ``p``:
    ``sum min(p, q) = 1 - TV(p, q)``. Both distributions of the same shape (e.g. (V,))."""
    p = as_tensor(p, "p")
    q = as_tensor(q, "q")
    check_distribution(p, "p")
    check_distribution(q, "q")
    check_same_shape(p, q, "p", "q")
    return float(torch.minimum(p, q).sum())


def _dense_pair(P, Q) -> tuple[torch.Tensor, torch.Tensor]:
    P = check_joint(P, "P")
    if isinstance(Q, CPDist):
        if len(Q.batch_shape):
            raise ValueError("Q must be an unbatched CPDist, got batch shape "
                             f"{tuple(Q.batch_shape)}")
        Q = Q.detach().to(torch.float64).to_tensor()
    Q = check_joint(Q, "Q")
    check_same_shape(P, Q, "P", "Q")
    if P.dim() < 1:
        raise ValueError("P must have at least one axis")
    return P, Q


def _prefix_marginals(P: torch.Tensor) -> list[torch.Tensor]:
    """[P_1 (V,), P_2 (V, V), ..., P_n (V,)*n]: the joints of the first j tokens."""
    n = P.dim()
    out = [P]
    for _ in range(n - 1):
        out.append(out[-1].sum(-1))
    return out[::-1]


def _conditionals(P: torch.Tensor) -> list[torch.Tensor]:
    """[P(x_1) (V,), P(x_2|x_1) (V, V), ..., P(x_n|x_<n) (V,)*n]; 0 where P(x_<j) = 0."""
    m = _prefix_marginals(P)
    out = [m[0]]
    for j in range(1, len(m)):
        den = m[j - 1].unsqueeze(-1)
        out.append(torch.where(den > 0, m[j] / den.clamp_min(1e-300), torch.zeros_like(m[j])))
    return out


def _check_first_token(P1: torch.Tensor, Q1: torch.Tensor) -> None:
    bad = (P1 > 0) & (Q1 <= 0)
    if bad.any():
        v = int(bad.nonzero()[0, 0])
        raise ValueError(f"Q gives probability 0 to first token {v}, which P can emit "
                         f"(P = {float(P1[v]):.3g}); Q's drafts given x_1 = {v} are undefined")


def expected_tokens_per_forward(P, Q, return_by_position: bool = False):
    """Exact expected tokens per forward of the self-speculative step (see module docstring).

    ``P`` (V,)*n the true joint; ``Q`` (V,)*n dense or an unbatched :class:`CPDist` with the
    same n and V. Returns E in [1, n] (a float); with ``return_by_position`` also a float64
    tensor (n-1,) whose entry k-1 is Pr(the first k drafts are all accepted), k = 1..n-1.
    """
    P, Q = _dense_pair(P, Q)
    n = P.dim()
    Pc, Qc = _conditionals(P), _conditionals(Q)
    _check_first_token(Pc[0], Qc[0])
    A = Pc[0]  # (V,)*j: Pr(x_1..x_j and drafts 2..j accepted), as a sub-probability
    by_pos = []
    for j in range(1, n):
        A = A.unsqueeze(-1) * torch.minimum(Pc[j], Qc[j])
        by_pos.append(A.sum())
    by_pos_t = torch.stack(by_pos) if by_pos else torch.zeros(0, dtype=P.dtype)
    E = 1.0 + float(by_pos_t.sum())
    return (E, by_pos_t) if return_by_position else E


def simulate_tokens_per_forward(P, Q, num_steps: int = 10_000, seed: int = 0,
                                return_stderr: bool = False):
    """Monte-Carlo of the actual accept/reject rule: mean tokens per forward over
    ``num_steps`` independent steps (x_1 ~ P, drafts from Q's conditionals, accept with
    ``min(1, p/q)``, stop at the first rejection). With ``return_stderr`` returns
    (mean, standard error of the mean)."""
    from cptoy._checks import check_positive_int

    P, Q = _dense_pair(P, Q)
    check_positive_int(num_steps, "num_steps")
    n, V = P.dim(), P.shape[0]
    g = torch.Generator().manual_seed(seed)
    Pc, Qc = _conditionals(P), _conditionals(Q)
    _check_first_token(Pc[0], Qc[0])
    x = torch.multinomial(Pc[0], num_steps, replacement=True, generator=g)  # (N,) first tokens
    prefix = x.clone()  # (N,) flat index of x_<j in V**(j-1)
    tokens = torch.ones(num_steps, dtype=torch.float64)
    alive = torch.ones(num_steps, dtype=torch.bool)
    for j in range(1, n):
        idx = alive.nonzero()[:, 0]
        if len(idx) == 0:
            break
        q_rows = Qc[j].reshape(-1, V)[prefix[idx]]  # (N_alive, V)
        p_rows = Pc[j].reshape(-1, V)[prefix[idx]]  # (N_alive, V)
        d = torch.multinomial(q_rows, 1, generator=g)[:, 0]  # (N_alive,)
        pd = p_rows.gather(1, d[:, None])[:, 0]
        qd = q_rows.gather(1, d[:, None])[:, 0]  # > 0: d was drawn from q
        u = torch.rand(len(idx), generator=g, dtype=torch.float64)
        ok = u < torch.clamp(pd / qd, max=1.0)
        tokens[idx[ok]] += 1
        alive[idx[~ok]] = False
        prefix[idx] = prefix[idx] * V + d
    mean = float(tokens.mean())
    if return_stderr:
        return mean, float(tokens.std() / num_steps**0.5) if num_steps > 1 else float("inf")
    return mean


def leviathan_expected_tokens(alpha: float, k: int) -> float:
    """Expected tokens per target call with k drafts each accepted independently with
    probability ``alpha`` (Leviathan et al. 2023): ``(1 - alpha^(k+1)) / (1 - alpha)``,
    ``k + 1`` at alpha = 1."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be an int >= 0, got {k!r}")
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha == 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def greedy_tokens_per_forward(P, Q) -> int:
    """Temperature-0 version (exact, deterministic): x_1 = argmax P(x_1); the drafts are Q's
    greedy sequential mode given x_1; d_j is accepted iff it equals argmax P(. | x_<j) (greedy
    verification), left to right. Returns 1 + number of accepted drafts. Ties go to the lowest
    token id in both models."""
    P, Q = _dense_pair(P, Q)
    n = P.dim()
    Pc, Qc = _conditionals(P), _conditionals(Q)
    _check_first_token(Pc[0], Qc[0])
    path = [int(Pc[0].argmax())]
    for j in range(1, n):
        q_row = Qc[j][tuple(path)]
        p_row = Pc[j][tuple(path)]
        d = int(q_row.argmax())
        if d != int(p_row.argmax()):
            break
        path.append(d)
    return len(path)


def conditional_rates(prefix) -> list[float]:
    """Per-position acceptance Pr(draft j accepted | drafts before j accepted) from the
    prefix probabilities Pr(drafts 1..j all accepted), j = 1..k (nan after a zero)."""
    out, prev = [], 1.0
    for p in prefix:
        out.append(p / prev if prev > 0 else float("nan"))
        prev = p
    return out
