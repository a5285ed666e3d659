"""The command line (``python -m cptoy``): help text, ``sample``'s length defaults, ``--pretrained``.

``tests/test_train.py`` and ``tests/test_firsttoken.py`` cover ``train`` and ``sample`` on
checkpoints end to end; ``tests/test_readme_commands.py`` runs the README's commands.
"""

from __future__ import annotations

import argparse
import re
import sys
import types

import pytest
import torch

from cptoy import checkpoints
from cptoy.__main__ import DEFAULT_MAX_NEW_TOKENS, build_parser, main, new_tokens_that_fit

SUBCOMMANDS = ("train", "sample", "figures")


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    p = build_parser()
    (sub,) = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    return capsys.readouterr().out


# ----------------------------------------------------------------------------- help


def test_top_level_help_lists_subcommands_and_examples(capsys):
    out = _help(["--help"], capsys)
    for name in (*SUBCOMMANDS, "present"):
        assert name in out
        assert f"python -m cptoy {name} " in out  # one example each
    assert "examples:" in out


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_subcommand_help_shows_defaults_and_an_example(name, capsys):
    out = _help([name, "--help"], capsys)
    assert "example:" in out or "examples:" in out
    assert f"python -m cptoy {name} " in out.split("example")[-1]
    parser = _subparsers()[name]
    flat = " ".join(out.split())  # argparse wraps lines
    with_default = 0
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help, f"{name} {action.option_strings[0]} has no help text"
        assert action.option_strings[0] in out
        if not (action.required or action.default is None or action.default is False):
            with_default += 1
    # every option with a value default says it (the formatter appends "(default: ...)")
    assert flat.count("default:") >= with_default > 0
    assert "(default: 0.8)" in flat or name != "sample"
    assert "(default: 16)" in flat or name != "train"
    assert "(default: figures)" in flat or name != "figures"


def test_sample_help_names_both_sources_and_the_length_default(capsys):
    out = " ".join(_help(["sample", "--help"], capsys).split())
    assert "--ckpt CKPT | --pretrained NAME_OR_GGUF" in out
    assert f"at most {DEFAULT_MAX_NEW_TOKENS}" in out
    assert "--pretrained smollm2-135m" in out  # the example


def test_present_help_is_presents_own_plus_an_example(capsys):
    assert main(["present", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--dry-run" in out and "--port" in out
    assert "example:" in out and "python -m cptoy present " in out


# ----------------------------------------------------------------------------- lengths


def test_new_tokens_default_is_what_fits(capsys):
    assert new_tokens_that_fit(2, 128, None) == 126
    assert new_tokens_that_fit(2, 8192, None) == DEFAULT_MAX_NEW_TOKENS
    assert new_tokens_that_fit(127, 128, None) == 1
    assert new_tokens_that_fit(10, 128, 50) == 50
    assert new_tokens_that_fit(10, 128, 118) == 118
    assert capsys.readouterr().err == ""  # nothing shortened, nothing said


def test_new_tokens_too_many_is_shortened_with_one_note(capsys):
    assert new_tokens_that_fit(2, 128, 200) == 126
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "exceeds the block size 128" in err and "generating 126 tokens" in err


def test_new_tokens_prompt_that_fills_the_block_stops():
    with pytest.raises(SystemExit, match="leaves no room in the block size 128"):
        new_tokens_that_fit(128, 128, None)


def test_sample_on_a_shipped_checkpoint_uses_what_fits(capsys):
    # the README's first command, as written: the default length fits the 128-token context
    _, tok, _ = checkpoints.load("code_r8")
    room = 128 - len(tok.encode("def "))
    assert main(["sample", "--ckpt", str(checkpoints.path("code_r8")), "--prompt", "def ",
                 "--strategy", "self-spec"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("def ")
    assert f"[self-spec, T=0.8: {room} tokens," in out.err and "note:" not in out.err


def test_sample_asking_for_too_many_tokens_generates_what_fits(capsys):
    assert main(["sample", "--ckpt", str(checkpoints.path("code_r1")), "--prompt", "def ",
                 "--max-new-tokens", "1000", "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    (note,) = [line for line in err.splitlines() if line.startswith("note:")]
    room = int(re.search(r"generating (\d+) tokens", note).group(1))
    assert "--max-new-tokens (1000) exceeds the block size 128" in note
    assert f"[ar, T=0.0: {room} tokens," in err


def test_sample_rejects_a_missing_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match="no such file"):
        main(["sample", "--ckpt", str(tmp_path / "missing.pt")])


# ----------------------------------------------------------------------------- --pretrained


@pytest.fixture
def fake_pretrained(monkeypatch):
    """``cptoy.pretrained`` replaced by a tiny random GPT and a byte tokenizer."""
    from cptoy.data import ByteTokenizer
    from cptoy.model import GPT, GPTConfig

    calls = []

    def load(name_or_path, dtype=torch.float32, device="cpu"):
        calls.append((name_or_path, dtype, device))
        if str(name_or_path).endswith("missing.gguf"):
            raise FileNotFoundError(f"no GGUF file at {str(name_or_path)!r}")
        torch.manual_seed(0)
        return GPT(GPTConfig.preset("tiny")), ByteTokenizer()

    mod = types.ModuleType("cptoy.pretrained")
    mod.load = load
    monkeypatch.setitem(sys.modules, "cptoy.pretrained", mod)
    return calls


def test_sample_pretrained_ar_and_lookup(fake_pretrained, capsys):
    outs = []
    for strategy in ("ar", "lookup"):
        assert main(["sample", "--pretrained", "fake-model", "--prompt", "abcabc",
                     "--strategy", strategy, "--temperature", "0"]) == 0
        outs.append(capsys.readouterr())
    assert fake_pretrained == [("fake-model", torch.float32, "cpu")] * 2
    assert outs[0].out == outs[1].out and outs[0].out.startswith("abcabc")  # greedy: lossless
    # tiny preset: block 64, a 6-byte prompt, so 58 new tokens by default
    assert "[ar, T=0.0: 58 tokens," in outs[0].err
    assert "[lookup, T=0.0: 58 tokens," in outs[1].err


def test_sample_pretrained_refuses_self_spec(fake_pretrained):
    with pytest.raises(SystemExit, match="self-spec needs draft heads"):
        main(["sample", "--pretrained", "fake-model", "--strategy", "self-spec"])
    assert fake_pretrained == []  # refused before loading anything


def test_sample_pretrained_missing_file_is_a_clean_error(fake_pretrained):
    with pytest.raises(SystemExit, match="missing.gguf"):
        main(["sample", "--pretrained", "missing.gguf"])


@pytest.mark.parametrize(
    "argv",
    [["sample"], ["sample", "--ckpt", "a.pt", "--pretrained", "smollm2-135m"]],
    ids=["neither", "both"],
)
def test_sample_needs_exactly_one_of_ckpt_and_pretrained(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--ckpt" in err and "--pretrained" in err
