"""cptoy.joint.lm_joint: a language model's exact joint of its next n tokens (alphabet + OTHER).

The reference is brute force on a tiny model: every conditional is the full-vocabulary softmax
of a forward of the whole context + prefix without a cache, and the joint is built by the chain
rule exactly as the docstring defines it (OTHER's continuation: that of the most probable token
outside the alphabet). One test runs the real SmolLM2-135M.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from cptoy.joint import OTHER, LMJoint, lm_joint
from cptoy.model import GPT, GPTConfig

CTX = [5, 17, 3, 99, 42, 7]


def peaky(preset: str = "tiny-llama", seed: int = 0, std: float = 0.6,
          dtype=torch.float64) -> GPT:
    """A tiny random model whose next-token distributions are far from uniform."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig.preset(preset)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)
    return model.to(dtype)


def full_probs(model, tokens, temperature=1.0) -> torch.Tensor:
    """p(. | tokens) over the whole vocabulary, from one uncached forward: (V,) float64."""
    with torch.no_grad():
        h = model(torch.tensor([tokens], dtype=torch.long))
        return torch.softmax(model.logits(h)[0, -1].to(torch.float64) / temperature, -1)


def brute_joint(model, ctx, alphabet, n, temperature=1.0, other=True):
    """The documented joint by brute force: dict axis-tuple -> probability, and the stand-ins."""
    K = len(alphabet)
    Vp = K + int(other)
    V = model.config.vocab_size
    outside = torch.ones(V, dtype=torch.bool)
    outside[torch.tensor(alphabet)] = False
    P, stand = {}, {}

    def rec(axes, tokens, mass):
        if len(axes) == n:
            P[axes] = mass
            return
        p = full_probs(model, ctx + tokens, temperature)
        if other:
            stand[axes] = int(p.masked_fill(~outside, 0).argmax())
        for e in range(Vp):
            if e < K:
                rec(axes + (e,), tokens + [alphabet[e]], mass * float(p[alphabet[e]]))
            else:
                rec(axes + (e,), tokens + [stand[axes]], mass * float(p[outside].sum()))

    rec((), [], 1.0)
    return P, stand


@pytest.fixture(scope="module")
def model():
    return peaky()


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("alphabet", ["greedy", "first"])
def test_every_entry_equals_brute_force_chain_rule(model, alphabet):
    J = lm_joint(model, CTX, n=3, top_k=6, alphabet=alphabet)
    assert isinstance(J, LMJoint)
    assert J.P.shape == (7, 7, 7) and J.P.dtype == torch.float64
    assert J.vocab[-1] == OTHER and len(J.alphabet) == 6 and OTHER not in J.alphabet
    assert J.context == CTX and J.n == 3 and J.temperature == 1.0
    assert abs(float(J.P.sum()) - 1.0) < 1e-12 and bool((J.P >= 0).all())
    ref, stand = brute_joint(model, CTX, J.alphabet, 3)
    for axes, p in ref.items():
        assert float(J.P[axes]) == pytest.approx(p, rel=1e-9, abs=1e-15), axes
    # the stand-ins for OTHER are the ones the definition names, for every prefix of length < n
    assert {k: v for k, v in stand.items() if len(k) < 2} == J.other_tokens
    assert all(t not in J.alphabet for t in J.other_tokens.values())


def test_alphabet_sequences_are_the_models_probabilities(model):
    """Entries of alphabet tokens only: the plain chain rule over the full vocabulary."""
    J = lm_joint(model, CTX, n=3, top_k=5)
    A = J.alphabet
    for i, j, k in itertools.product(range(5), repeat=3):
        a, b, c = A[i], A[j], A[k]
        want = (full_probs(model, CTX)[a] * full_probs(model, CTX + [a])[b]
                * full_probs(model, CTX + [a, b])[c])
        assert float(J.P[i, j, k]) == pytest.approx(float(want), rel=1e-9)
    cov = sum(float(J.P[i, j, k]) for i, j, k in itertools.product(range(5), repeat=3))
    assert J.coverage == pytest.approx(cov, rel=1e-12)


def test_first_marginal_is_the_restricted_softmax(model):
    J = lm_joint(model, CTX, n=3, top_k=8)
    p = full_probs(model, CTX)
    m1 = J.P.sum(dim=(1, 2))
    A = torch.tensor(J.alphabet)
    torch.testing.assert_close(m1[:-1], p[A], rtol=1e-10, atol=1e-14)
    outside = torch.ones_like(p, dtype=torch.bool)
    outside[A] = False
    assert float(m1[-1]) == pytest.approx(float(p[outside].sum()), rel=1e-10)


def test_other_prefix_continues_like_its_most_probable_member(model):
    """P(x_2 | x_1 = OTHER) is the model's distribution after the most probable token outside
    A, mapped onto A + OTHER; and x_3 after an OTHER at x_2 likewise."""
    J = lm_joint(model, CTX, n=3, top_k=4)
    A = J.alphabet
    p1 = full_probs(model, CTX)
    r = int(p1.masked_fill(torch.isin(torch.arange(len(p1)), torch.tensor(A)), 0).argmax())
    assert J.other_tokens[()] == r
    p2 = full_probs(model, CTX + [r])
    cond = J.P[-1].sum(-1) / J.P[-1].sum()
    torch.testing.assert_close(cond[:-1], p2[torch.tensor(A)], rtol=1e-9, atol=1e-14)
    # x_1 = A[0], x_2 = OTHER: x_3 follows the stand-in recorded for axis prefix (0,)
    s = J.other_tokens[(0,)]
    assert s not in A
    p3 = full_probs(model, CTX + [A[0], s])
    cond3 = J.P[0, -1] / J.P[0, -1].sum()
    torch.testing.assert_close(cond3[:-1], p3[torch.tensor(A)], rtol=1e-9, atol=1e-14)


def test_greedy_alphabet_scores_every_position_of_the_greedy_path(model):
    J = lm_joint(model, CTX, n=3, top_k=7, alphabet="greedy")
    g, scores = [], torch.zeros(model.config.vocab_size, dtype=torch.float64)
    for _ in range(3):
        p = full_probs(model, CTX + g)
        scores += p
        g.append(int(p.argmax()))
    want = sorted(range(len(scores)), key=lambda v: (-float(scores[v]), v))[:7]
    assert J.alphabet == want
    assert set(g) <= set(J.alphabet)
    first = lm_joint(model, CTX, n=3, top_k=7, alphabet="first")
    p = full_probs(model, CTX)
    assert first.alphabet == sorted(range(len(p)), key=lambda v: (-float(p[v]), v))[:7]


def test_explicit_alphabet_and_temperature(model):
    A = [11, 200, 3]
    J = lm_joint(model, CTX, n=2, top_k=1, temperature=0.5, alphabet=A)
    assert J.vocab == A + [OTHER] and J.temperature == 0.5
    ref, _ = brute_joint(model, CTX, A, 2, temperature=0.5)
    for axes, p in ref.items():
        assert float(J.P[axes]) == pytest.approx(p, rel=1e-9, abs=1e-15)
    hot = lm_joint(model, CTX, n=2, top_k=1, temperature=2.0, alphabet=A)
    assert not torch.allclose(hot.P, J.P)


def test_n1_full_vocabulary_and_learned_positions():
    m = peaky("tiny", seed=1)  # learned positions, LayerNorm, GELU
    J = lm_joint(m, CTX, n=1, top_k=8)
    assert J.P.shape == (9,) and J.other_tokens == {}
    p = full_probs(m, CTX)
    torch.testing.assert_close(J.P[:-1], p[torch.tensor(J.alphabet)], rtol=1e-10, atol=1e-14)
    # top_k >= vocabulary: A is everything, no OTHER axis, P is the model's full joint
    V = m.config.vocab_size
    full = lm_joint(m, CTX[:2], n=2, top_k=V + 10)
    assert OTHER not in full.vocab and full.P.shape == (V, V) and full.coverage == pytest.approx(1)
    a, b = full.vocab[0], full.vocab[3]
    want = full_probs(m, CTX[:2])[a] * full_probs(m, CTX[:2] + [a])[b]
    assert float(full.P[0, 3]) == pytest.approx(float(want), rel=1e-9)
    assert abs(float(full.P.sum()) - 1.0) < 1e-12


def test_float32_model_and_tensor_context():
    m = peaky(dtype=torch.float32)
    J = lm_joint(m, torch.tensor(CTX), n=3, top_k=4)
    assert J.P.dtype == torch.float64 and abs(float(J.P.sum()) - 1.0) < 1e-12
    ref, _ = brute_joint(m, CTX, J.alphabet, 3)
    for axes, p in ref.items():
        assert float(J.P[axes]) == pytest.approx(p, rel=1e-4, abs=1e-9)
    assert m.training is False


def test_labels(model):
    J = lm_joint(model, CTX, n=2, top_k=3)
    assert J.labels() == [str(v) for v in J.alphabet] + ["<other>"]
    assert J.labels(lambda i: f"t{i}")[0] == f"t{J.alphabet[0]}"


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs, name", [
    (dict(n=0), "n"),
    (dict(n=-2), "n"),
    (dict(top_k=0), "top_k"),
    (dict(context_ids=[]), "context_ids"),
    (dict(context_ids=[1, 256]), "context_ids"),
    (dict(context_ids=list(range(63)), n=3), "context_ids"),
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=-1.0), "temperature"),
    (dict(alphabet="best"), "alphabet"),
    (dict(alphabet=[1, 1]), "alphabet"),
    (dict(alphabet=[300]), "alphabet"),
    (dict(alphabet=[]), "alphabet"),
    (dict(n=8, top_k=9), "top_k"),
])
def test_bad_input_names_the_argument(model, kwargs, name):
    args = dict(context_ids=CTX, n=3, top_k=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        lm_joint(model, **args)


# ----------------------------------------------------------------------------- SmolLM2
@pytest.fixture(scope="module")
def smollm2():
    from cptoy import pretrained

    torch.set_num_threads(1)
    return pretrained.load("smollm2-135m")


def test_smollm2_after_for_i_in_range(smollm2):
    model, tok = smollm2
    J = lm_joint(model, tok.encode("for i in range("), n=3, top_k=8)
    assert J.P.shape == (9, 9, 9)
    assert abs(float(J.P.sum()) - 1.0) < 1e-9
    labels = J.labels(lambda i: tok.decode([i]))

    def starts_right(axes) -> bool:
        first = labels[int(axes[0])].strip()
        return first[:1].isdigit() or first.startswith("len")

    # the most likely sequence of alphabet tokens only (an exact model probability) ...
    K = len(J.alphabet)
    sub = J.P[:K, :K, :K]
    best = torch.unravel_index(sub.argmax(), sub.shape)
    assert starts_right(best), [labels[int(a)] for a in best]
    # ... and the most likely entry whose first token is a token (not the OTHER bucket)
    head = J.P[:K]
    best = torch.unravel_index(head.argmax(), head.shape)
    assert starts_right(best), [labels[int(a)] for a in best]
