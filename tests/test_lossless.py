"""Every drafter is lossless at T > 0: self-speculative decoding with it samples exactly the
backbone's autoregressive law.

One tiny GPT (V = 4, float64) for all of them; the first four new tokens of 1500 seeded runs are
compared by a chi-square test with the exact law of those four tokens, enumerated over all 256
continuations (``tests/stats.py``). Each drafter is perturbed so that both the accept path and
the residual path run (checked). The drafters: CP heads with mixture and with one-expert routing,
first-token heads, the draft block (EAGLE-style chain), Backbone-as-Architect heads, a self-distilled student's mask outputs and
prompt lookup; the negative control reports a
q the drafts were not drawn from, and the same test rejects it.
"""

from __future__ import annotations

import pytest
import torch
from fakes import FakeMTP
from stats import exact_ar, generate_pvalue

from cptoy.clp import ArchitectHeads
from cptoy.decoding import generate
from cptoy.draftblock import DraftBlockModel
from cptoy.firsttoken import FirstTokenModel
from cptoy.heads import MTPModel
from cptoy.model import GPT, GPTConfig
from cptoy.selfdistill import SelfDistilledMTP, SelfSpecModel
from cptoy.speculative import FactorQ, Proposal

V, N_FUTURE, T, M, RUNS = 4, 4, 0.9, 4, 1500
PROMPT = [0, 3, 1]
LOOKUP_PROMPT = [0, 1, 2, 3, 0, 1, 2]  # repeats, so that lookup finds drafts


@pytest.fixture(scope="module")
def gpt() -> GPT:
    torch.manual_seed(3)
    g = GPT(GPTConfig.preset("tiny", vocab_size=V, block_size=32)).double().eval()
    with torch.no_grad():
        g.wte.weight.mul_(2.0)  # p spread over V (max about 0.6), not uniform
    return g


def _perturb(module, scale: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _drafter_model(kind: str, gpt: GPT):
    """(model, generate keywords, prompt) for one drafter on the shared backbone."""
    if kind in ("cp-mixture", "cp-expert"):
        model = MTPModel(gpt, N_FUTURE, 3).double()
        _perturb(model.heads, 0.2, 1)
        return model, dict(routing=kind.removeprefix("cp-")), PROMPT
    if kind == "first-token":
        model = FirstTokenModel(gpt, N_FUTURE).double()
        _perturb(model.heads, 0.3, 2)
        return model, {}, PROMPT
    if kind == "draft-block":
        model = DraftBlockModel(gpt, N_FUTURE, mlp_hidden=16).double()
        _perturb(model.heads, 0.3, 5)
        return model, {}, PROMPT
    if kind == "architect":
        heads = ArchitectHeads(gpt.config.n_embd, V, N_FUTURE, gpt.unembedding).double()
        _perturb(heads, 0.5, 3)
        return FakeMTP(gpt, heads, N_FUTURE), {}, PROMPT
    if kind == "self-distilled":  # the student's mask outputs draft, the base model verifies
        student = SelfDistilledMTP(gpt, k=N_FUTURE - 1, seed=4).double()
        _perturb(student.model, 0.05, 4)
        return SelfSpecModel(student, gpt), {}, PROMPT
    if kind == "lookup":
        return gpt, dict(strategy="lookup", n_draft=3), LOOKUP_PROMPT
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["cp-mixture", "cp-expert", "first-token", "draft-block",
                                  "architect",
                                  "self-distilled", "lookup"])
def test_self_spec_is_exact_for_every_drafter(kind, gpt):
    model, kw, prompt = _drafter_model(kind, gpt)
    kw = dict(dict(strategy="self-spec"), **kw)
    acc = att = 0
    for s in range(100):  # both paths of the rule run: some drafts accepted, some rejected
        st = generate(model, prompt, M, temperature=T, seed=s, **kw).stats
        acc, att = acc + sum(st.accepted_per_step), att + sum(st.drafted_per_step)
    assert att > 100 and 0.05 < acc / att < 0.95, (acc, att)
    exact = exact_ar(gpt, prompt, M, T)
    p = generate_pvalue(model, prompt, M, T, RUNS, exact, **kw)
    assert p > 1e-3, p


def test_the_test_rejects_a_wrong_q(gpt):
    """Negative control: architect drafts reported with a uniform q instead of their own."""
    model, kw, prompt = _drafter_model("architect", gpt)
    real = model.heads.propose

    def lying(hidden, x1, k, temperature, generator=None, routing="mixture") -> Proposal:
        prop = real(hidden, x1, k, temperature, generator, routing)
        return Proposal(prop.tokens, FactorQ(prop.tokens, probs=torch.full(
            (k, V), 1.0 / V, dtype=torch.float64)))

    model.heads.propose = lying
    p = generate_pvalue(model, prompt, M, T, RUNS, exact_ar(gpt, prompt, M, T),
                        strategy="self-spec")
    assert p < 1e-6, p
