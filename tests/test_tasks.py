"""Tests of cptoy.tasks: the addition task, its tokenizer and its exact scoring."""

from __future__ import annotations

import re

import pytest
import torch

from cptoy.tasks import (
    ArithmeticTask,
    CharTokenizer,
    TaskPrompt,
    score,
    task_accuracy,
    task_config,
    train_backbone,
)


def test_tokenizer_round_trip_and_errors():
    tok = CharTokenizer()
    assert tok.vocab_size == 13
    text = "12+35=47;0+0=0;"
    assert tok.decode(tok.encode(text)) == text
    assert CharTokenizer.from_dict(tok.to_dict()).alphabet == tok.alphabet
    with pytest.raises(ValueError, match="outside the alphabet"):
        tok.encode("1 + 2")
    with pytest.raises(ValueError, match=r"\[0, 13\)"):
        tok.decode([13])
    with pytest.raises(ValueError, match="repeated"):
        CharTokenizer("aa")


def test_text_is_seeded_and_every_record_is_right():
    task = ArithmeticTask(max_operand=99)
    a, b = task.text(200, seed=3), task.text(200, seed=3)
    assert a == b and a != task.text(200, seed=4)
    recs = a.split(";")[:-1]
    assert len(recs) == 200
    for r in recs:
        x, y, z = map(int, re.fullmatch(r"(\d+)\+(\d+)=(\d+)", r).groups())
        assert x + y == z and 0 <= x <= 99 and 0 <= y <= 99
    ids = task.ids(50, seed=1)
    assert ids.dtype == torch.long and task.tokenizer.decode(ids.tolist()) == task.text(50, 1)


def test_prompts_end_with_a_query_and_know_its_answer():
    task = ArithmeticTask()
    ps = task.prompts(20, shots=3, seed=0)
    assert len(ps) == 20
    for p in ps:
        assert p.text.endswith(f"{p.a}+{p.b}=") and p.text.count(";") == 3
        assert p.answer == str(p.a + p.b) and 0 <= p.a <= 9
        assert task.tokenizer.decode(p.ids) == p.text
    assert [p.text for p in task.prompts(20, 3, 0)] == [p.text for p in ps]


def _prompt(a, b):
    text = f"1+2=3;{a}+{b}="
    return TaskPrompt(text, CharTokenizer().encode(text), a, b, str(a + b))


def test_score_counts_answers_and_records_exactly():
    p = _prompt(4, 4)
    s = score([p], ["8;1+1=2;2+2=5;3+"])  # answer right, records: 8, 1+1=2 (ok), 2+2=5 (wrong)
    assert (s.answers_correct, s.records, s.records_correct) == (1, 3, 2)
    assert s.answer_accuracy == 1.0 and s.record_accuracy == pytest.approx(2 / 3)
    s = score([p], ["9;1+1=2;"])  # wrong answer, one good record
    assert (s.answers_correct, s.records, s.records_correct) == (0, 2, 1)
    s = score([p], ["8"])  # no ';': the answer is unfinished, hence wrong, no complete record
    assert (s.answers_correct, s.records, s.records_correct) == (0, 0, 0)
    assert s.record_accuracy != s.record_accuracy  # nan
    s = score([p], ["08;1+=2;01+1=2;"])  # leading zero answer, malformed, leading zero operand
    assert (s.answers_correct, s.records, s.records_correct) == (0, 3, 0)
    s = score([p, _prompt(0, 0)], ["8;", "0;"])
    assert s.per_prompt == [True, True] and s.answer_accuracy == 1.0
    with pytest.raises(ValueError, match="prompts"):
        score([p], ["8;", "8;"])


def test_task_score_accepts_token_lists_and_generations():
    task = ArithmeticTask()
    p = _prompt(2, 3)

    class G:
        tokens = task.tokenizer.encode("5;9+9=18;")

    s = task_accuracy(task, [p, p], [G(), task.tokenizer.encode("6;")])
    assert s.per_prompt == [True, False] and s.records_correct == 2


def test_train_backbone_is_deterministic_and_learns():
    task = ArithmeticTask()
    ids = task.ids(2000, seed=0)
    cfg = task_config(task, n_layer=1, n_embd=32, n_head=2, block_size=32)
    m1, h1 = train_backbone(ids, cfg, steps=30, batch_size=8, lr=1e-2, warmup=5, log_every=10)
    m2, _ = train_backbone(ids, cfg, steps=30, batch_size=8, lr=1e-2, warmup=5, log_every=10)
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    first, last = h1["loss"][0][1], h1["loss"][-1][1]
    assert last < first - 0.3  # from ~log(13) = 2.56 towards the digit entropy
    assert not m1.training
