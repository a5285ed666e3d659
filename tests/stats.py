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


def exact_ar(backbone, prompt: list[int], m: int, temperature: float) -> dict:
    """The exact law of the first m tokens of autoregressive sampling from ``backbone`` (a GPT
    with ``forward`` and ``logits``) after ``prompt``: {continuation tuple: probability}, by
    enumerating all V^m continuations in one batched forward."""
    import itertools
    import math

    V = backbone.config.vocab_size
    seqs = list(itertools.product(range(V), repeat=m))
    with torch.no_grad():
        x = torch.tensor([list(prompt) + list(s) for s in seqs])
        lp = torch.log_softmax(backbone.logits(backbone(x)).double() / temperature, -1)
    P = len(prompt)
    return {s: math.exp(sum(float(lp[i, P - 1 + j, t]) for j, t in enumerate(s)))
            for i, s in enumerate(seqs)}


def sequences_pvalue(counts: dict, exact: dict, min_expected: float = 5.0) -> float:
    """Chi-square p-value of observed continuation counts {tuple: count} against their exact
    law {tuple: probability}; a continuation of probability 0 that occurs fails outright."""
    assert set(counts) <= {k for k, v in exact.items() if v > 0}, "an impossible continuation"
    cells = sorted(exact, key=exact.get, reverse=True)
    obs = torch.tensor([float(counts.get(c, 0)) for c in cells])
    probs = torch.tensor([exact[c] for c in cells], dtype=torch.float64)
    assert abs(float(probs.sum()) - 1) < 1e-9
    return float(pooled_chisquare(obs, probs, min_expected).pvalue)


def generate_pvalue(model, prompt: list[int], m: int, temperature: float, runs: int,
                    exact: dict, **kw) -> float:
    """p-value of ``cptoy.decoding.generate`` (seeds 0 .. runs - 1, m new tokens) against the
    exact law ``exact`` of m tokens of autoregressive sampling."""
    from collections import Counter

    from cptoy.decoding import generate

    counts = Counter(tuple(generate(model, prompt, m, temperature=temperature, seed=s,
                                    **kw).tokens) for s in range(runs))
    return sequences_pvalue(counts, exact)
