"""Exact joints of the next n tokens: a hidden-Markov toy language and corpus n-gram counts.

Every joint here is a float64 tensor ``P`` of shape ``(V,)*n``, nonnegative, summing to 1:
``P[x_1, ..., x_n]`` is the probability that the next n tokens are ``x_1..x_n``. Two sources:

* :class:`HMM` -- a "toy language" whose states emit tokens and stick to themselves with
  probability ``stickiness``. Its joints are exact (forward algorithm), its samples are a corpus,
  and for n <= 3 its joint is *exactly* a rank-S CP distribution (:meth:`HMM.joint_cp`).
* :func:`corpus_joint` / :func:`text_joint` -- the empirical joint of the n tokens that follow
  every occurrence of a context in a token sequence (e.g. the bytes of Python source).
* :func:`lm_joint` -- a language model's own joint of its next n tokens after a context, exact
  over an alphabet of its likely tokens plus an OTHER bucket (chain rule, batched forwards).

Plus the small toolkit the notebooks lean on: :func:`marginals`, :func:`product_of_marginals`
(the best rank-1 fit in KL(P||Q)), :func:`conditional`, :func:`entropy`, :func:`kl`, :func:`tv`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from cptoy._checks import (
    as_tensor,
    check_distribution,
    check_joint,
    check_positive_int,
    check_same_shape,
)
from cptoy.cp import CPDist

__all__ = [
    "HMM",
    "OTHER",
    "CorpusJoint",
    "corpus_joint",
    "text_joint",
    "byte_label",
    "LMJoint",
    "lm_joint",
    "marginals",
    "product_of_marginals",
    "conditional",
    "entropy",
    "kl",
    "tv",
]

OTHER = -1  # the token id :func:`corpus_joint` uses for the "every other token" bucket


# ====================================================================== the HMM toy language
class HMM:
    """A hidden-Markov toy language with S states over a vocabulary of V tokens.

    ``transition[i, j] = Pr(z_{t+1} = j | z_t = i)`` has ``stickiness`` on the diagonal and the
    rest of each row spread over the other states by a seeded Dirichlet(1) draw. Each state emits
    from its own seeded Dirichlet(``emission_concentration``) distribution over V: a small
    concentration makes emissions peaky (a state "owns" a few tokens), so high stickiness binds
    consecutive tokens together. ``initial`` is the stationary distribution of ``transition``.

    Shapes: ``transition (S, S)``, ``emission (S, V)``, ``initial (S,)``, all float64.
    """

    def __init__(
        self,
        n_states: int,
        vocab_size: int,
        stickiness: float = 0.9,
        emission_concentration: float = 0.3,
        seed: int = 0,
    ):
        import numpy as np  # numpy's Dirichlet takes a seed; torch's does not take a generator

        check_positive_int(n_states, "n_states")
        check_positive_int(vocab_size, "vocab_size")
        if not 0.0 <= float(stickiness) <= 1.0:
            raise ValueError(f"stickiness must be in [0, 1], got {stickiness}")
        if not float(emission_concentration) > 0:
            raise ValueError(f"emission_concentration must be > 0, got {emission_concentration}")
        rng = np.random.default_rng(seed)
        S, V = n_states, vocab_size
        T = np.eye(S) * stickiness
        if S > 1:
            off = rng.dirichlet(np.ones(S - 1), size=S)  # (S, S-1)
            for i in range(S):
                T[i, [j for j in range(S) if j != i]] = (1.0 - stickiness) * off[i]
        else:
            T[0, 0] = 1.0
        E = rng.dirichlet(np.full(V, float(emission_concentration)), size=S)  # (S, V)
        self._set(torch.tensor(T), torch.tensor(E), None)
        self.stickiness = float(stickiness)
        self.seed = seed

    @classmethod
    def from_params(cls, transition, emission, initial=None) -> HMM:
        """An HMM with given ``transition (S, S)``, ``emission (S, V)`` and ``initial (S,)``
        (stationary distribution when None). Rows must be distributions."""
        hmm = cls.__new__(cls)
        hmm._set(transition, emission, initial)
        hmm.stickiness = float(hmm.transition.diagonal().mean())  # mean self-transition
        hmm.seed = None
        return hmm

    def _set(self, transition, emission, initial) -> None:
        T = as_tensor(transition, "transition")
        E = as_tensor(emission, "emission")
        if T.dim() != 2 or T.shape[0] != T.shape[1]:
            raise ValueError(f"transition must have shape (S, S), got {tuple(T.shape)}")
        if E.dim() != 2 or E.shape[0] != T.shape[0]:
            raise ValueError(f"emission must have shape (S={T.shape[0]}, V), got {tuple(E.shape)}")
        check_distribution(T, "transition", dims=1)
        check_distribution(E, "emission", dims=1)
        self.transition = T  # (S, S)
        self.emission = E  # (S, V)
        if initial is None:
            initial = _stationary(T)
        init = as_tensor(initial, "initial")
        if init.shape != (T.shape[0],):
            raise ValueError(f"initial must have shape (S={T.shape[0]},), got {tuple(init.shape)}")
        check_distribution(init, "initial")
        self.initial = init  # (S,)

    @property
    def n_states(self) -> int:
        return self.transition.shape[0]

    @property
    def vocab_size(self) -> int:
        return self.emission.shape[1]

    def __repr__(self) -> str:
        return (f"HMM(n_states={self.n_states}, vocab_size={self.vocab_size}, "
                f"stickiness={self.stickiness:g}, seed={self.seed})")

    # ------------------------------------------------------------------ inference
    def state_posterior(self, context=None) -> torch.Tensor:
        """Distribution (S,) of the hidden state that emits the *next* token after ``context``.

        Forward algorithm: filter ``Pr(z_t | x_1..x_t)`` over the context (normalised each step),
        then take one transition step. ``context`` None or empty gives ``initial``.
        """
        ctx = self._check_context(context)
        b = self.initial
        for i, x in enumerate(ctx):
            if i > 0:
                b = b @ self.transition
            a = b * self.emission[:, x]  # (S,)
            z = a.sum()
            if z <= 0:
                raise ValueError(f"context has probability 0 under this HMM (at position {i})")
            b = a / z
        if ctx:
            b = b @ self.transition
        return b

    def joint(self, n: int, context=None) -> torch.Tensor:
        """Exact joint of the next ``n`` tokens after ``context``: float64 (V,)*n, sums to 1."""
        check_positive_int(n, "n")
        if self.vocab_size ** n * self.n_states > 50_000_000:
            raise ValueError(f"joint would build S*V**n = {self.n_states}*{self.vocab_size}**{n} "
                             "entries; too large")
        b = self.state_posterior(context)  # (S,)
        S, V = self.n_states, self.vocab_size
        J = b[:, None] * self.emission  # (S, V): Pr(z_1, x_1)
        for _ in range(1, n):
            # J (S, V^k) -> (S', V^k * V): sum_z J[z, x_<=k] T[z, z'] E[z', x_{k+1}]
            J = ((self.transition.T @ J)[:, :, None] * self.emission[:, None, :]).reshape(S, -1)
        return J.sum(0).reshape((V,) * n)  # (V,)*n

    def next_token_probs(self, context=None) -> torch.Tensor:
        """Distribution (V,) of the next token after ``context``."""
        return self.joint(1, context)

    def joint_cp(self, n: int, context=None) -> CPDist:
        """The joint of the next ``n`` tokens as an *exact* rank-S :class:`CPDist` (float64).

        Exact where the HMM's conditional independences make it so:

        * n = 1: a mixture of emissions, gate = state of x_1.
        * n = 2: gate = state z_1; factors ``E[a]`` and ``(T E)[a]``.
        * n = 3: gate = the *middle* state z_2. Given z_2, x_1 (through z_1), x_2 and x_3
          (through z_3) are independent, so P is exactly rank S.
        * any n when ``transition`` is the identity (stickiness 1): one state emits every token.

        For n >= 4 with a non-identity transition, tokens on the same side of any single state
        stay dependent, so P is not rank S in general: raises ValueError (use ``fit_cp``).
        Experts with zero gate weight get their state's emission as (irrelevant) factors.
        """
        check_positive_int(n, "n")
        b = self.state_posterior(context)  # (S,) state of x_1
        T, E = self.transition, self.emission
        S = self.n_states
        if torch.equal(T, torch.eye(S, dtype=T.dtype)):
            return CPDist(b.log(), E.log().expand(n, S, self.vocab_size).clone())
        if n == 1:
            return CPDist(b.log(), E.log()[None])
        if n == 2:
            return CPDist(b.log(), torch.stack([E, T @ E]).log())
        if n == 3:
            w = b @ T  # (S,) Pr(z_2 = a)
            # Pr(z_1 = i | z_2 = a) = b_i T[i, a] / w_a  -> (a, i)
            back = (b[:, None] * T).T / w.clamp_min(1e-300)[:, None]  # (S, S)
            f1 = back @ E  # (S, V)
            f1 = torch.where(w[:, None] > 0, f1, E)
            return CPDist(w.log(), torch.stack([f1, E, T @ E]).log())
        raise ValueError(f"the joint of n={n} >= 4 tokens of an HMM is not exactly rank S unless "
                         "the transition is the identity; fit it with cptoy.cp.fit_cp instead")

    # ------------------------------------------------------------------ sampling
    def sample(
        self,
        length: int,
        num: int = 1,
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ) -> torch.Tensor:
        """Draw ``num`` token sequences of ``length`` tokens from the stationary start:
        LongTensor (num, length). Uses ``generator`` if given, else one seeded with ``seed``
        (0 when None), so calls are deterministic."""
        check_positive_int(length, "length")
        check_positive_int(num, "num")
        if generator is None:
            generator = torch.Generator().manual_seed(0 if seed is None else seed)
        z = torch.multinomial(self.initial.expand(num, -1), 1, generator=generator)[:, 0]  # (num,)
        out = torch.empty(num, length, dtype=torch.long)
        for t in range(length):
            if t > 0:
                z = torch.multinomial(self.transition[z], 1, generator=generator)[:, 0]
            out[:, t] = torch.multinomial(self.emission[z], 1, generator=generator)[:, 0]
        return out

    def _check_context(self, context) -> list[int]:
        if context is None:
            return []
        ctx = [int(c) for c in torch.as_tensor(context).reshape(-1).tolist()]
        bad = [c for c in ctx if not 0 <= c < self.vocab_size]
        if bad:
            raise ValueError(f"context holds token ids outside [0, {self.vocab_size}): {bad[:5]}")
        return ctx


def _stationary(T: torch.Tensor) -> torch.Tensor:
    """Stationary distribution of a row-stochastic T (S, S): least-squares solution of
    pi (T - I) = 0, sum(pi) = 1 (the minimum-norm one, uniform for the identity)."""
    S = T.shape[0]
    A = torch.cat([(T - torch.eye(S, dtype=T.dtype)).T, torch.ones(1, S, dtype=T.dtype)])
    rhs = torch.zeros(S + 1, 1, dtype=T.dtype)
    rhs[-1] = 1.0
    pi = torch.linalg.pinv(A) @ rhs
    pi = pi[:, 0].clamp_min(0.0)  # removes -1e-17 round-off only
    return pi / pi.sum()


# ====================================================================== corpus joints
@dataclass
class CorpusJoint:
    """The empirical joint of the n tokens that follow a context in a token sequence."""

    P: torch.Tensor  # (V',)*n float64, sums to 1
    counts: torch.Tensor  # (V',)*n int64 occurrence counts; P = counts / count
    vocab: list[int]  # V' token ids for the axes of P; OTHER (-1) is the "any other" bucket
    count: int  # number of occurrences of the context followed by n tokens
    context: list[int]  # the context that was matched
    n: int  # number of future tokens
    decode: Callable[[int], str] | None = field(default=None, repr=False)  # id -> label

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def labels(self, decode: Callable[[int], str] | None = None) -> list[str]:
        """Display labels of the V' axis entries: ``decode(id)`` (or ``str(id)``), and
        ``"<other>"`` for the OTHER bucket."""
        decode = decode or self.decode or str
        return ["<other>" if v == OTHER else decode(v) for v in self.vocab]


def _as_int_array(x, name: str):
    import numpy as np

    if isinstance(x, (bytes, bytearray)):
        return np.frombuffer(bytes(x), dtype=np.uint8).astype(np.int64)
    if isinstance(x, str):
        raise TypeError(f"{name} must be a sequence of ints; use text_joint for strings")
    arr = np.asarray(x.tolist() if isinstance(x, torch.Tensor) else x)
    if arr.size == 0:
        return arr.astype(np.int64).reshape(0)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be a 1-D sequence of ints, got shape {arr.shape}, "
                        f"dtype {arr.dtype}")
    if arr.min() < 0:
        raise ValueError(f"{name} must hold token ids >= 0, got {int(arr.min())}")
    return arr.astype(np.int64)


def corpus_joint(tokens: Sequence[int], context: Sequence[int], n: int,
                 top_k: int | None = None) -> CorpusJoint:
    """Empirical joint of the ``n`` tokens that follow every occurrence of ``context``.

    ``tokens`` is a 1-D sequence of ints (e.g. ``list(text.encode())``), ``context`` the ints
    that must occur immediately before (may be empty: then every position counts). Occurrences
    too close to the end to have n following tokens are skipped.

    Vocabulary: without ``top_k`` every token that occurs among the continuations, sorted by
    frequency (pooled over the n positions, ties by id). With ``top_k``, the ``top_k`` most
    frequent plus one ``OTHER`` bucket (id -1, last) that collects the rest, so P still sums
    to 1; the bucket is only added if some token falls in it. Returns a :class:`CorpusJoint`.
    Raises ValueError if the context never occurs (with n tokens after it).
    """
    import numpy as np

    arr = _as_int_array(tokens, "tokens")
    ctx = _as_int_array(context, "context")
    check_positive_int(n, "n")
    if top_k is not None:
        check_positive_int(top_k, "top_k")
    c = len(ctx)
    # positions i where ctx ends just before i and i + n <= len(arr)
    starts = np.arange(0, max(len(arr) - c - n + 1, 0))  # candidate context starts
    for j in range(c):
        starts = starts[arr[starts + j] == ctx[j]]
    if len(starts) == 0:
        raise ValueError(f"context {ctx.tolist()[:20]} never occurs with {n} tokens after it")
    cont = np.stack([arr[starts + c + j] for j in range(n)], axis=1)  # (count, n)
    ids, freq = np.unique(cont, return_counts=True)
    order = np.lexsort((ids, -freq))  # by frequency desc, then id
    ids = ids[order]
    vocab = [int(v) for v in ids]
    if top_k is not None and len(vocab) > top_k:
        vocab = vocab[:top_k] + [OTHER]
    V = len(vocab)
    lut = np.full(int(ids.max()) + 1, V - 1, dtype=np.int64)  # unknown ids -> OTHER (last)
    kept = [v for v in vocab if v != OTHER]
    lut[kept] = np.arange(len(kept))
    idx = lut[cont]  # (count, n) axis indices
    flat = np.ravel_multi_index(tuple(idx.T), (V,) * n)
    counts = np.bincount(flat, minlength=V**n).reshape((V,) * n)
    counts_t = torch.tensor(counts, dtype=torch.int64)
    P = counts_t.to(torch.float64) / len(starts)
    return CorpusJoint(P=P, counts=counts_t, vocab=vocab, count=int(len(starts)),
                       context=ctx.tolist(), n=n)


def byte_label(b: int) -> str:
    """A readable label for one byte: printable ASCII as itself, space as "␣", newline "\\n",
    tab "\\t", anything else as ``\\xNN``."""
    special = {32: "␣", 10: "\\n", 9: "\\t", 13: "\\r"}
    if b in special:
        return special[b]
    if 33 <= b < 127:
        return chr(b)
    return f"\\x{b:02x}"


def text_joint(text: str, context_str: str, n: int, top_k: int | None = None) -> CorpusJoint:
    """:func:`corpus_joint` over the UTF-8 bytes of ``text`` after the bytes of ``context_str``;
    ``labels()`` shows bytes as characters (see :func:`byte_label`)."""
    if not isinstance(text, str) or not isinstance(context_str, str):
        raise TypeError("text and context_str must be str")
    cj = corpus_joint(text.encode("utf-8"), context_str.encode("utf-8"), n, top_k)
    cj.decode = byte_label
    return cj


# ====================================================================== joint toolkit
def marginals(P) -> list[torch.Tensor]:
    """The n single-position marginals of a joint P (V,)*n: a list of n tensors (V,)."""
    P = check_joint(P, "P")
    n = P.dim()
    return [P.sum(dim=tuple(d for d in range(n) if d != s)) for s in range(n)]


def product_of_marginals(P, as_cp: bool = False):
    """The product of P's marginals, (V,)*n: the best rank-1 (independent heads) fit in
    KL(P||Q). With ``as_cp`` a rank-1 :class:`CPDist` instead of the dense tensor."""
    ms = marginals(P)
    if as_cp:
        F = torch.stack(ms)[:, None, :]  # (n, 1, V)
        return CPDist(torch.zeros(1, dtype=F.dtype), F.log())
    Q = ms[0]
    for m in ms[1:]:
        Q = Q[..., None] * m
    return Q


def conditional(P, prefix: Sequence[int]) -> torch.Tensor:
    """Joint of the remaining n-k tokens given the first k tokens ``prefix``: (V,)*(n-k).

    Raises ValueError if ``prefix`` has probability 0 under P or has no tokens left to predict.
    """
    P = check_joint(P, "P")
    n, V = P.dim(), P.shape[0]
    pre = [int(t) for t in torch.as_tensor(prefix).reshape(-1).tolist()]
    if not 1 <= len(pre) < n:
        raise ValueError(f"prefix must hold between 1 and n-1={n - 1} tokens, got {len(pre)}")
    if any(not 0 <= t < V for t in pre):
        raise ValueError(f"prefix holds token ids outside [0, {V}): {pre}")
    sub = P[tuple(pre)]
    z = sub.sum()
    if z <= 0:
        raise ValueError(f"prefix {pre} has probability 0 under P; its conditional is undefined")
    return sub / z


def entropy(P) -> float:
    """Shannon entropy of the joint P in nats (0 log 0 = 0)."""
    P = check_joint(P, "P")
    m = P > 0
    return float(-(P[m] * P[m].log()).sum())


def _pair(P, Q) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(Q, CPDist):
        Q = Q.detach().to(torch.float64).to_tensor()
    P = check_joint(P, "P")
    Q = check_joint(Q, "Q")
    check_same_shape(P, Q, "P", "Q")
    return P, Q


def kl(P, Q) -> float:
    """KL(P || Q) in nats; ``inf`` if Q = 0 somewhere P > 0. Q may be a CPDist."""
    P, Q = _pair(P, Q)
    m = P > 0
    if (Q[m] <= 0).any():
        return float("inf")
    return float((P[m] * (P[m].log() - Q[m].log())).sum())


def tv(P, Q) -> float:
    """Total variation distance 0.5 * sum |P - Q|. Q may be a CPDist."""
    P, Q = _pair(P, Q)
    return float(0.5 * (P - Q).abs().sum())


# ====================================================================== a language model's joint
_LM_JOINT_MAX_ENTRIES = 20_000_000  # (|A| + 1) ** n entries of P at most
_LM_JOINT_CHUNK = 64  # sequences per forward when enumerating prefixes


@dataclass
class LMJoint:
    """The joint of a language model's next n tokens over an alphabet plus OTHER (:func:`lm_joint`).

    ``P[i_1, ..., i_n]`` is the probability of the axis entries ``vocab[i_1], ..., vocab[i_n]``;
    the last entry of ``vocab`` is ``OTHER`` (-1) unless the alphabet is the whole vocabulary.
    """

    P: torch.Tensor  # (V',)*n float64, sums to 1
    vocab: list[int]  # V' axis entries: the alphabet's token ids, then OTHER (-1) if present
    context: list[int]  # the context the joint is conditioned on
    n: int  # number of future tokens
    temperature: float  # softmax temperature of every next-token distribution
    # axis-index prefix (x_1..x_j, length 0..n-2) -> the token that stands for OTHER at x_{j+1}
    other_tokens: dict[tuple[int, ...], int] = field(default_factory=dict, repr=False)
    decode: Callable[[int], str] | None = field(default=None, repr=False)  # id -> label

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def alphabet(self) -> list[int]:
        """The alphabet's token ids (``vocab`` without OTHER)."""
        return [v for v in self.vocab if v != OTHER]

    @property
    def coverage(self) -> float:
        """Probability that all n tokens are alphabet tokens (the part of P that is exact for the
        model with no stand-in for OTHER): the sum of P over sequences without OTHER."""
        K = len(self.alphabet)
        return float(self.P[(slice(0, K),) * self.n].sum())

    def labels(self, decode: Callable[[int], str] | None = None) -> list[str]:
        """Display labels of the V' axis entries: ``decode(id)`` (or ``str(id)``), and
        ``"<other>"`` for the OTHER bucket."""
        decode = decode or self.decode or str
        return ["<other>" if v == OTHER else decode(v) for v in self.vocab]


def lm_joint(model, context_ids, n: int = 3, top_k: int = 8, temperature: float = 1.0,
             alphabet="greedy") -> LMJoint:
    """Exact joint of ``model``'s next ``n`` tokens after ``context_ids``, over an alphabet A of
    ``top_k`` tokens plus one OTHER bucket (id -1, the last axis entry).

    ``model`` is a :class:`cptoy.model.GPT` (``model(idx, cache) -> hidden``, ``model.logits``,
    ``model.new_cache``), e.g. SmolLM2 from :func:`cptoy.pretrained.load`. Every next-token
    distribution is ``softmax(logits / temperature)``, computed in float64.

    **Alphabet A** (``alphabet``):

    * ``"greedy"`` (default): score every token v by ``sum_{j=1..n} p(x_j = v | context,
      g_1..g_{j-1})`` along the model's greedy continuation g (argmax tokens), and keep the
      ``top_k`` best (ties: lower id first). So A holds the likely tokens of *every* position,
      not only of the first (after ``range(`` the second token is often ``(`` or ``)``, rarely
      a likely *first* token).
    * ``"first"``: the ``top_k`` most likely first tokens under ``p(x_1 | context)``.
    * a sequence of distinct token ids: exactly these (``top_k`` is then ignored).

    ``vocab`` lists A in that order (by score, or as given), then OTHER. If A is the whole
    vocabulary there is no OTHER entry and P is the model's full joint.

    **Definition of P** (a proper joint: nonnegative, sums to 1). By the chain rule,
    ``P[x_1..x_n] = prod_j P(x_j | x_<j)`` with, for an axis prefix x_<j:

    * the actual token prefix t_<j: alphabet entries are their tokens; an OTHER entry at
      position i is replaced by its *stand-in*, the most probable token outside A under
      ``P(x_i | x_<i)`` (``LMJoint.other_tokens`` records every stand-in by axis prefix);
    * ``P(x_j = a | x_<j) = p_model(a | context, t_<j)`` for a in A, and
      ``P(x_j = OTHER | x_<j) = 1 - sum_{a in A} p_model(a | context, t_<j)``.

    Hence every entry whose n tokens are all in A is *exactly* the model's probability of that
    sequence, the marginal of x_1 over A is exactly the model's (restricted) softmax, and an
    entry with OTHER at position j is exact in its mass up to j (the model's probability that
    x_j falls outside A); what comes after an OTHER is approximated by the continuation of its
    most probable member. ``LMJoint.coverage`` is the mass of the all-alphabet sequences.

    Cost: one forward of the context (cached), n-1 one-token forwards for the greedy alphabet,
    then for j = 2..n one batched forward of the (|A|+1)^(j-1) prefixes on copies of the
    context's cache (chunks of 64): for n = 3, top_k = 8 that is 9 + 81 short sequences.

    Raises ValueError (naming the argument) for n < 1, top_k < 1, an empty ``context_ids``,
    temperature <= 0, a bad ``alphabet``, token ids outside the model's vocabulary, a context
    that leaves no room for n - 1 more tokens in the model's block, or a P above 20M entries.
    """
    check_positive_int(n, "n")
    check_positive_int(top_k, "top_k")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            float(temperature) > 0 and float(temperature) < float("inf")):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    temperature = float(temperature)
    ctx = [int(t) for t in torch.as_tensor(context_ids).reshape(-1).tolist()]
    if not ctx:
        raise ValueError("context_ids must hold at least one token id, got an empty context")
    Vm = int(model.config.vocab_size)
    bad = [t for t in ctx if not 0 <= t < Vm]
    if bad:
        raise ValueError(f"context_ids holds token ids outside [0, {Vm}): {bad[:5]}")
    block = int(model.config.block_size)
    if len(ctx) + n - 1 > block:
        raise ValueError(f"context_ids has {len(ctx)} tokens; with n - 1 = {n - 1} more that "
                         f"exceeds the model's block_size {block}")
    explicit = None
    if isinstance(alphabet, str):
        if alphabet not in ("greedy", "first"):
            raise ValueError(f'alphabet must be "greedy", "first" or a sequence of token ids, '
                             f"got {alphabet!r}")
    else:
        explicit = [int(t) for t in torch.as_tensor(alphabet).reshape(-1).tolist()]
        if not explicit:
            raise ValueError("alphabet must hold at least one token id")
        if len(set(explicit)) != len(explicit):
            raise ValueError(f"alphabet holds repeated token ids: {explicit}")
        if any(not 0 <= t < Vm for t in explicit):
            raise ValueError(f"alphabet holds token ids outside [0, {Vm}): {explicit}")
    K = len(explicit) if explicit is not None else min(top_k, Vm)
    has_other = K < Vm
    Vp = K + int(has_other)
    if Vp ** n > _LM_JOINT_MAX_ENTRIES:
        raise ValueError(f"the joint would have (top_k + 1) ** n = {Vp}**{n} entries (over "
                         f"{_LM_JOINT_MAX_ENTRIES:,}); lower top_k or n")

    device = model.wte.weight.device

    def probs(hidden_last: torch.Tensor) -> torch.Tensor:  # (B, C) -> (B, Vm) float64
        return torch.softmax(model.logits(hidden_last).to(torch.float64) / temperature, dim=-1)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            cache = model.new_cache(1)
            h = model(torch.tensor([ctx], dtype=torch.long, device=device), cache)
            p1 = probs(h[:, -1]).cpu()  # (1, Vm)
            L = cache.length
            if explicit is not None:
                A = explicit
            else:
                scores = p1[0].clone()
                if alphabet == "greedy":
                    tok = int(p1[0].argmax())
                    for _ in range(1, n):
                        h = model(torch.tensor([[tok]], dtype=torch.long, device=device), cache)
                        pj = probs(h[:, -1]).cpu()[0]
                        scores += pj
                        tok = int(pj.argmax())
                    cache.truncate(L)
                A = torch.argsort(-scores, stable=True)[:K].tolist()  # ties: lower id first
            A_t = torch.tensor(A, dtype=torch.long)
            outside = torch.ones(Vm, dtype=torch.bool)
            outside[A_t] = False

            def to_axes(p: torch.Tensor):
                """(B, Vm) next-token probabilities -> (B, Vp) over A + OTHER, stand-ins (B,)."""
                pa = p[:, A_t]
                if not has_other:
                    return pa, torch.zeros(len(p), dtype=torch.long)
                po = p.masked_fill(~outside, 0.0)
                return torch.cat([pa, po.sum(-1, keepdim=True)], dim=-1), po.argmax(-1)

            cond, stand = to_axes(p1)  # (1, Vp), (1,)
            P = cond[0]  # (Vp,)
            other_tokens: dict[tuple[int, ...], int] = {}
            prefixes = torch.zeros(1, 0, dtype=torch.long)  # (Vp^(j-1), j-1) actual tokens
            for j in range(1, n):
                for b, axes in enumerate(_axis_prefixes(Vp, j - 1)):
                    other_tokens[axes] = int(stand[b])
                # children: every prefix extended by every axis entry (OTHER -> its stand-in)
                ext = A_t[None, :].expand(len(prefixes), K)
                if has_other:
                    ext = torch.cat([ext, stand[:, None]], dim=1)  # (B, Vp)
                prefixes = torch.cat([prefixes.repeat_interleave(Vp, dim=0),
                                      ext.reshape(-1, 1)], dim=1)  # (B * Vp, j)
                rows = []
                for s in range(0, len(prefixes), _LM_JOINT_CHUNK):
                    chunk = prefixes[s:s + _LM_JOINT_CHUNK]
                    c = cache.expand(len(chunk), j)
                    h = model(chunk.to(device), c)
                    rows.append(probs(h[:, -1]).cpu())
                cond, stand = to_axes(torch.cat(rows))  # (Vp^j, Vp), (Vp^j,)
                P = P[..., None] * cond.reshape((Vp,) * j + (Vp,))
    finally:
        model.train(was_training)
    vocab = list(A) + ([OTHER] if has_other else [])
    return LMJoint(P=P, vocab=vocab, context=ctx, n=n, temperature=temperature,
                   other_tokens=other_tokens)


def _axis_prefixes(Vp: int, length: int) -> list[tuple[int, ...]]:
    """All axis-index tuples of ``length`` entries in [0, Vp), in row-major (C) order."""
    import itertools

    return list(itertools.product(range(Vp), repeat=length))
