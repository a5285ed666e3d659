"""`make student` and the notebooks' teaching conventions.

`make student` writes copies of the notebooks without the cells tagged ``solution``. They must
still run to the end, so every exercise follows one pattern:

    stub cell      (untagged)        answer = None             the student replaces it
    solution cell  (tag "solution")  answer = ...              removed in the student copy
    check cell     (tag "check")     if answer is None: print("... not answered yet")
                                     else: assert ... (raises only on a wrong answer)

and an exercise's answer is read by its check cell only. The tests below check that pattern
statically in every converted notebook, strip the notebooks with the Makefile's own command and
execute one stripped notebook to the end.
"""

from __future__ import annotations

import ast
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# the notebooks that follow the exercise and header conventions (all of them once 04-06 do)
CONVERTED = NOTEBOOKS
TAGS = {"solution", "check"}
NOT_ANSWERED = "not answered yet"


def _read(path: Path):
    return nbformat.read(path, as_version=4)


def _tags(cell) -> set[str]:
    return set(cell.get("metadata", {}).get("tags", []))


def _tree(cell) -> ast.Module:
    """The cell's code, IPython magics and shell lines dropped."""
    src = "\n".join(line for line in cell.source.splitlines()
                    if not line.lstrip().startswith(("%", "!")))
    return ast.parse(src)


def _store_names(target) -> set[str]:
    return {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}


def _bound_in(body) -> set[str]:
    """Names bound at module level by statements ``body`` (not inside functions or
    comprehensions): assignments, for targets, defs, imports, and the same inside if/for/while/
    with/try blocks."""
    out: set[str] = set()
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            out |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                out |= _store_names(t)
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            out |= _store_names(node.target)
        elif isinstance(node, (ast.For, ast.AsyncFor)):
            out |= _store_names(node.target) | _bound_in(node.body) | _bound_in(node.orelse)
        elif isinstance(node, (ast.If, ast.While)):
            out |= _bound_in(node.body) | _bound_in(node.orelse)
        elif isinstance(node, (ast.With, ast.AsyncWith)):
            out |= {n for item in node.items if item.optional_vars is not None
                    for n in _store_names(item.optional_vars)} | _bound_in(node.body)
        elif isinstance(node, ast.Try):
            out |= _bound_in(node.body) | _bound_in(node.orelse) | _bound_in(node.finalbody)
    return out


def _bound(cell) -> set[str]:
    """Names a code cell binds at top level."""
    return _bound_in(_tree(cell).body)


def _loaded(cell) -> set[str]:
    return {n.id for n in ast.walk(_tree(cell)) if isinstance(n, ast.Name)
            and isinstance(n.ctx, ast.Load)}


def _none_stubs(cell) -> set[str]:
    """Names a stub cell sets to None (``a = None``, ``a = b = None``)."""
    out: set[str] = set()
    for node in _tree(cell).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) \
                and node.value.value is None:
            out |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return out


def _code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


# ----------------------------------------------------------------------------- make student


def student_command(out_dir: Path) -> list[str]:
    """`make student`'s nbconvert call, as the Makefile writes it, with its output in out_dir."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    p = subprocess.run(["make", "-n", "-B", f"STUDENT_DIR={out_dir}", "student"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stdout.replace("\\\n", " ").splitlines() if " nbconvert " in ln]
    assert len(lines) == 1, p.stdout
    argv = shlex.split(lines[0])
    argv = [sys.executable, "-m", "nbconvert", *argv[argv.index("nbconvert") + 1:]]
    i = argv.index("notebooks/*.ipynb")  # the shell's glob, expanded here
    return argv[:i] + [str(p) for p in NOTEBOOKS] + argv[i + 1:]


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("student")
    p = subprocess.run(student_command(out), cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def test_make_student_removes_exactly_the_solution_cells(student_dir):
    for path in NOTEBOOKS:
        full, stripped = _read(path), _read(student_dir / path.name)
        kept = [c for c in full.cells if "solution" not in _tags(c)]
        assert [c.source for c in stripped.cells] == [c.source for c in kept], path.name
        assert not any("solution" in _tags(c) for c in stripped.cells), path.name
        nbformat.validate(stripped)


@pytest.mark.slow
def test_a_student_notebook_runs_to_the_end_and_says_what_is_unanswered(student_dir):
    from nbclient import NotebookClient

    path = student_dir / "01_independent_heads.ipynb"
    nb = _read(path)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(student_dir)}}).execute()
    checks = [c for c in _code_cells(nb) if "check" in _tags(c)]
    assert checks
    for c in checks:
        text = "".join(o.get("text", "") for o in c.outputs if o.get("output_type") == "stream")
        assert NOT_ANSWERED in text, c.source[:200]


# ----------------------------------------------------------------------------- conventions


@pytest.mark.parametrize("path", CONVERTED, ids=lambda p: p.name)
def test_notebook_opens_with_prerequisites_goals_and_time(path):
    head = _read(path).cells[0].source
    for word in ("Prerequisites", "Learning goals", "Your time"):
        assert f"**{word}" in head, f"{path.name}: the first cell does not state {word!r}"
    assert re.search(r"\*\*Your time\.\*\* About \d+ minutes", head), path.name


@pytest.mark.parametrize("path", CONVERTED, ids=lambda p: p.name)
def test_exercises_have_stub_solution_and_check(path):
    nb = _read(path)
    cells = _code_cells(nb)
    assert all(_tags(c) <= TAGS for c in nb.cells), f"{path.name}: tags other than {TAGS}"
    solutions = [i for i, c in enumerate(cells) if "solution" in _tags(c)]
    assert len(solutions) >= 3, f"{path.name}: fewer than 3 exercises"
    bound_outside = set().union(*(_bound(c) for c in cells if "solution" not in _tags(c)))
    answers: set[str] = set()
    for i in solutions:
        sol, stub = cells[i], cells[i - 1]
        where = f"{path.name}: solution cell {sol.source[:60]!r}"
        assert not _tags(stub), f"{where}: no untagged stub cell before it"
        after = [c for c in cells[i + 1:] if _tags(c)]  # the next tagged cell is its check
        assert after and _tags(after[0]) == {"check"}, f"{where}: no check cell after it"
        check = after[0]
        assert NOT_ANSWERED in check.source, f"{where}: its check does not handle a missing answer"
        needed = (_loaded(check) - _bound(check)) & _bound(sol)  # what it reads from the solution
        assert needed, f"{where}: its check reads nothing the solution defines"
        missing = needed - _none_stubs(stub)
        assert not missing, f"{where}: the stub does not set {sorted(missing)} to None"
        answers |= needed
        # a name only the solution defines must not be read outside its check
        only_here = _bound(sol) - bound_outside
        for later in cells[i + 2:]:
            if "check" not in _tags(later):
                assert not (_loaded(later) & only_here), f"{where}: {later.source[:60]!r} " \
                    f"reads {sorted(_loaded(later) & only_here)}, gone in the student copy"
    # an answer (None in the student copy) is read by check cells only
    for c in cells:
        if not _tags(c) and not _none_stubs(c) & answers:
            leaked = _loaded(c) & answers
            assert not leaked, f"{path.name}: {c.source[:60]!r} reads the answers {sorted(leaked)}"


@pytest.mark.parametrize("path", CONVERTED, ids=lambda p: p.name)
def test_notebook_has_a_predict_then_run_exercise(path):
    nb = _read(path)
    predicts = [c for c in nb.cells if c.cell_type == "markdown"
                and re.search(r"\bpredict\b", c.source, flags=re.I)
                and re.search(r"predict,? then (run|compute|measure)", c.source, flags=re.I)]
    assert predicts, f"{path.name}: no 'predict, then run' exercise"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_cites_nothing_outside_the_repository(path):
    text = "\n".join(c.source for c in _read(path).cells)
    for pat in (r"background\.md", r"background\s*§", r"/work/", r"shared/"):
        assert not re.search(pat, text), f"{path.name} cites {pat!r}"
