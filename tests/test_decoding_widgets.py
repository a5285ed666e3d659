"""cptoy.widgets.acceptance_explorer and speculative_stepper: driven from Python, the figures
follow the controls, and errors show up in the panel instead of as tracebacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cptoy.data import ByteTokenizer
from cptoy.widgets import acceptance_explorer, speculative_stepper
from cptoy.widgets.base import tok_label


def _model(rank, n=4, seed=0):
    from cptoy.heads import MTPModel
    from cptoy.model import GPTConfig

    torch.manual_seed(seed)
    m = MTPModel(GPTConfig.preset("tiny"), n, rank).eval()  # V = 256 bytes, block 64
    with torch.no_grad():
        if m.heads.gate is not None:
            torch.nn.init.normal_(m.heads.gate.weight, std=1.0)
    return m


@pytest.fixture(scope="module")
def models():
    return {"rank 1": _model(1), "rank 3": _model(3, n=3, seed=1)}


@pytest.fixture(scope="module")
def tok():
    return ByteTokenizer()


@pytest.fixture(scope="module")
def prompts(tok):
    return [tok.encode("def f(x):\n    return"), tok.encode("ROMEO. My lord")]


@pytest.fixture(scope="module")
def heldout(tok):
    return torch.tensor(tok.encode("import os\nimport sys\n" * 8))


def _y(trace):
    return np.array([np.nan if v is None else v for v in trace.y], dtype=float)


def _x(trace):  # the p/q bars are horizontal: probabilities on x, tokens on y
    return np.array([np.nan if v is None else v for v in trace.x], dtype=float)


# ============================================================================ acceptance_explorer
def test_explorer_draws_text_histogram_and_acceptance(models, tok, prompts, heldout):
    ex = acceptance_explorer(models, tok, prompts, heldout_ids=heldout, max_new_tokens=24,
                             temperature=1.0, tf_positions=40)
    g = ex.generation
    assert len(g.tokens) == 24 and ex.n_slider.max == 3 and ex.n_slider.value == 3
    # the text shows every generated token, coloured by arrival
    assert ex.text.value.count("<span") >= 1 + 24
    hist = ex.figures["tokens"].data[0]
    assert list(hist.x) == [1, 2, 3, 4]
    steps = g.stats.gained_per_forward[1:]
    assert np.allclose(_y(hist), [steps.count(x) / len(steps) for x in (1, 2, 3, 4)])
    tf = ex.tf_cache[("rank 1", 1.0, 3, "mixture")]
    pred = _y(ex.figures["tokens"].data[1])
    assert pred.sum() == pytest.approx(1.0) and pred[0] == pytest.approx(1 - tf.spec_prefix[0])
    acc = ex.figures["acceptance"]
    assert np.allclose(_y(acc.data[1]), tf.spec_acceptance, equal_nan=True)
    measured = np.array(g.stats.acceptance_by_position, dtype=float)
    assert np.allclose(_y(acc.data[0]), measured, equal_nan=True)
    assert "teacher-forced" in ex.status and f"{tf.spec_tokens_per_forward:.2f}" in ex.status


def test_explorer_follows_the_controls(models, tok, prompts, heldout):
    ex = acceptance_explorer(models, tok, prompts, heldout_ids=heldout, max_new_tokens=24,
                             temperature=1.0, tf_positions=40)
    text0 = ex.text.value
    ex.prompt_dropdown.value = 1
    assert ex.text.value != text0 and "ROMEO" in ex.text.value
    ex.n_slider.value = 1
    assert list(ex.figures["tokens"].data[0].x) == [1, 2]
    assert list(ex.figures["acceptance"].data[0].x) == [2]
    ex.n_slider.value = 3
    ex.model_dropdown.value = "rank 3"  # n_future 3: k is clamped to 2
    assert ex.n_slider.max == 2 and ex.n_slider.value == 2
    assert list(ex.figures["acceptance"].data[0].x) == [2, 3]
    assert ("rank 3", 1.0, 2, "mixture") in ex.tf_cache
    ex.temperature_slider.value = 0.0
    g = ex.generation
    from cptoy.decoding import generate

    ref = generate(models["rank 3"], prompts[1], 24, temperature=0, strategy="ar").tokens
    assert g.tokens == ref  # greedy self-spec in the panel is lossless
    ex.temperature_slider.value = 1.0
    ex.strategy_dropdown.value = "self-spec, one expert"  # q = one expert from the posterior
    g = ex.generation
    assert g.stats.strategy == "self-spec" and "one expert" in ex.status
    drawn = zip(g.stats.experts, g.stats.drafted_per_step, strict=True)
    assert all(e is not None for e, d in drawn if d)  # every step with drafts drew an expert
    tf = ex.tf_cache[("rank 3", 1.0, 2, "expert")]
    assert np.allclose(_y(ex.figures["acceptance"].data[1]), tf.spec_acceptance, equal_nan=True)
    mix = ex.teacher_forced("rank 3", 1.0, 2)  # by convexity one expert is accepted less
    assert tf.spec_prefix[0] <= mix.spec_prefix[0] + 1e-9
    ex.strategy_dropdown.value = "lookup"
    assert ex.generation.stats.strategy == "lookup"
    assert list(ex.figures["acceptance"].data[1].y) == []  # no teacher forcing for lookup


def test_explorer_shows_errors_in_the_panel(models, tok, prompts, monkeypatch):
    ex = acceptance_explorer(models, tok, prompts, max_new_tokens=16)
    assert "no held-out ids" in ex.status
    import cptoy.decoding

    def boom(*a, **k):
        raise RuntimeError("decoder exploded")

    monkeypatch.setattr(cptoy.decoding, "generate", boom)
    ex.temperature_slider.value = 0.5  # callback raises inside: shown, not raised
    assert ex.status.startswith("⚠") and "decoder exploded" in ex.status
    assert "decoder exploded" in ex.message.value


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(models={}), ValueError, "models"),
    (dict(models={"x": "not a model"}), TypeError, "MTPModel"),
    (dict(prompts=[]), ValueError, "prompts"),
    (dict(prompts=[[1, 2, 999]]), ValueError, "outside"),
    (dict(n_draft=7), ValueError, "n_draft"),
    (dict(temperature=-0.1), ValueError, "temperature"),
    (dict(tokenizer=object()), TypeError, "tokenizer"),
    (dict(heldout_ids=torch.zeros(3, 3, dtype=torch.long)), ValueError, "heldout_ids"),
])
def test_explorer_rejects_bad_arguments(models, tok, prompts, kwargs, err, match):
    args = dict(models=models, tokenizer=tok, prompts=prompts) | kwargs
    with pytest.raises(err, match=match):
        acceptance_explorer(**args)


# ============================================================================ speculative_stepper
def test_stepper_steps_through_the_recorded_decode(models, tok, prompts):
    sp = speculative_stepper(models["rank 3"], tok, prompts[0], temperature=1.0, seed=0,
                             max_new_tokens=20)
    steps = sp.generation.steps
    assert len(steps) == sp.generation.stats.n_steps >= 2
    assert sp.step_slider.max == len(steps) - 1 and sp.step_slider.value == 0
    st = steps[0]
    gate = sp.figures["gate"]
    assert np.allclose(_y(gate.data[0]), st.gate_prior)
    assert np.allclose(_y(gate.data[1]), st.gate_posterior)
    pq = sp.figures["pq"]
    d = st.drafts[0]
    labels = list(pq.layout.yaxis.ticktext)
    assert len(labels) == 8  # top 8 tokens, the draft among them
    i = list(pq.data[0].marker.line.width).index(3)  # the outlined bar is the draft
    assert labels[i] == tok_label(tok, d)
    assert _x(pq.data[0])[i] == pytest.approx(float(st.p[0, d]))
    assert _x(pq.data[1])[i] == pytest.approx(float(st.q[0, d]))
    assert f"{st.accept_prob[0]:.2f}" in pq.layout.annotations[0].text
    assert "step 1 of" in sp.status
    y0 = _x(pq.data[0]).copy()
    sp.next()
    assert sp.step_slider.value == 1 and "step 2 of" in sp.status
    assert not np.array_equal(_x(pq.data[0]), y0) or steps[1].drafts != st.drafts
    sp.previous()
    assert sp.step_slider.value == 0
    assert np.allclose(_x(pq.data[0]), y0)
    sp.previous()  # at the first step: stays
    assert sp.step_slider.value == 0


def test_stepper_shows_the_residual_at_a_rejection(models, tok, prompts):
    """At a rejected draft (T > 0) the stepper draws norm(max(0, p - q)) over the shown tokens,
    the law the replacement came from; elsewhere that trace is empty. Checked at every step,
    walking forward and back and drawing one step twice, so that a step's bars are whole after
    any other step's (each bar has its x and its y: within one batch_update plotly keeps a
    change when a later one restores the value from before the batch)."""
    from cptoy.speculative import residual

    sp = speculative_stepper(models["rank 3"], tok, prompts[0], temperature=1.0, seed=0,
                             max_new_tokens=20)
    k = sp.settings["n_draft"]
    pq = sp.figures["pq"]
    for seed in range(20):  # this tiny model accepts most drafts: find a run with rejections
        sp.seed_box.value = seed
        if sum(False in st.accepted for st in sp.generation.steps) >= 2:
            break
    steps = sp.generation.steps
    shown = 0

    def check(i):
        nonlocal shown
        st = steps[i]
        for t, tr in enumerate(pq.data):
            assert len(_x(tr)) == len(tr.y or ()), f"step {i}, trace {t}: x and y differ"
        for j in range(k):
            tr = pq.data[2 * k + j]
            rejected = j < len(st.accepted) and not st.accepted[j]
            if not rejected:
                assert len(_x(tr)) == 0
                continue
            score = torch.maximum(st.p[j], st.q[j])
            score[st.drafts[j]] = float("inf")
            ids = score.topk(8).indices  # the rows shown: the draft and the top of p and q
            res = residual(st.p[j], st.q[j])
            assert list(_x(tr)) == pytest.approx(res[ids].tolist())
            assert list(tr.y) == list(pq.data[2 * j].y)  # on the rows of p and q
            assert float(res[st.final_token]) > 0  # the replacement came from it
            assert "residual" in pq.layout.annotations[j].text
            shown += 1

    for i in list(range(len(steps))) + list(range(len(steps) - 1, -1, -1)):
        sp.step_slider.value = i
        check(i)
    rejected_step = next(i for i, st in enumerate(steps) if False in st.accepted)
    sp.step_slider.value = rejected_step
    sp.show()  # the same step drawn again (as after re-decoding to an equal first step)
    check(rejected_step)
    assert shown >= 5  # two rejections, each seen walking forward and back, one again


def test_stepper_redecodes_on_temperature_and_seed(models, tok, prompts):
    sp = speculative_stepper(models["rank 3"], tok, prompts[0], temperature=1.0, seed=0,
                             max_new_tokens=20)
    toks = sp.generation.tokens
    sp.seed_box.value = 5
    assert sp.generation.tokens != toks
    sp.temperature_slider.value = 0.0
    from cptoy.decoding import generate

    ref = generate(models["rank 3"], prompts[0], 20, temperature=0, strategy="ar").tokens
    assert sp.generation.tokens == ref
    assert "argmax p" in sp.figures["pq"].layout.annotations[0].text
    # rank 1: the gate has one expert and cannot move
    sp1 = speculative_stepper(models["rank 1"], tok, prompts[1], max_new_tokens=12)
    assert list(sp1.figures["gate"].data[1].y) == [1.0]
    assert "rank 1" in sp1.figures["gate"].layout.title.text


def test_stepper_errors(models, tok, prompts, monkeypatch):
    with pytest.raises(TypeError, match="MTPModel"):
        speculative_stepper(models["rank 3"].backbone, tok, prompts[0])
    with pytest.raises(ValueError, match="n_draft"):
        speculative_stepper(models["rank 3"], tok, prompts[0], n_draft=3)
    with pytest.raises(ValueError, match="prompts"):
        speculative_stepper(models["rank 3"], tok, [])
    sp = speculative_stepper(models["rank 3"], tok, prompts[0], max_new_tokens=10)
    sp.settings["max_new_tokens"] = 500  # longer than the block: the error shows in the panel
    sp.seed_box.value = 3
    assert sp.status.startswith("⚠") and "block_size" in sp.status
    sp.settings["max_new_tokens"] = 1  # no room to draft: a message, not a crash
    sp.seed_box.value = 4
    assert "no verification steps" in sp.status


def test_stepper_routing_dropdown_switches_q_to_one_expert(models, tok, prompts):
    sp = speculative_stepper(models["rank 3"], tok, prompts[0], temperature=1.0, seed=0,
                             max_new_tokens=20)
    assert not sp.routing_dropdown.disabled and sp.routing_dropdown.value == "mixture"
    mixed = [st.gates for st in sp.steps if st.drafts]
    assert any(max(g[0]) < 1.0 for g in mixed)  # the mixture's gate weighs several experts
    sp.routing_dropdown.value = "expert"
    for st in (st for st in sp.steps if st.drafts):  # q = the drawn expert's factor: one-hot
        assert all(g[st.expert] == 1.0 and sum(g) == 1.0 for g in st.gates)
    assert "q = expert" in sp.figures["gate"].layout.title.text
    from cptoy.decoding import generate

    ref = generate(models["rank 3"], prompts[0], 20, temperature=1.0, strategy="self-spec",
                   seed=0, routing="expert", record_steps=True)
    assert sp.generation.tokens == ref.tokens
    assert speculative_stepper(models["rank 1"], tok, prompts[1],
                               max_new_tokens=12).routing_dropdown.disabled
    with pytest.raises(ValueError, match="routing"):
        speculative_stepper(models["rank 3"], tok, prompts[0], routing="top-2")
