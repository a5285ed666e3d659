"""Statistics shared by the tests."""

import torch
from scipy.stats import chisquare


def pooled_chisquare(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0):
    """Chi-square goodness of fit with cells of expected count < min_expected pooled into one."""
    counts, probs = counts.reshape(-1).double(), probs.reshape(-1).double()
    expected = probs * counts.sum()
    small = expected < min_expected
    obs = torch.cat([counts[~small], counts[small].sum().view(1)])
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    if exp[-1] == 0:  # nothing pooled
        obs, exp = obs[:-1], exp[:-1]
    exp = exp * obs.sum() / exp.sum()  # exact equality of totals for scipy
    return chisquare(obs.numpy(), exp.numpy())
