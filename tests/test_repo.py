"""Repository hygiene: packaging files agree, notebooks are stored without outputs, layout holds."""

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_requirements() -> set[str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = list(data["project"]["dependencies"]) + list(data["project"]["optional-dependencies"]["dev"])
    return {d.replace(" ", "") for d in deps}


def _environment_pip_requirements() -> set[str]:
    lines = (ROOT / "environment.yml").read_text().splitlines()
    reqs = set()
    in_pip = False
    for line in lines:
        if re.match(r"^\s*- pip:\s*$", line):
            in_pip = True
            continue
        if in_pip:
            m = re.match(r"^\s+- (.+?)\s*$", line)
            if m and not m.group(1).startswith("-e"):
                reqs.add(m.group(1).replace(" ", ""))
    return reqs


def test_environment_yml_matches_pyproject():
    assert _environment_pip_requirements() == _pyproject_requirements()


def test_torch_pin_is_bounded():
    # an unbounded torch would pull a multi-GB CUDA build on this machine
    torch_req = [r for r in _pyproject_requirements() if r.startswith("torch")]
    assert torch_req == ["torch>=2.3,<2.14"]


def test_notebooks_are_stored_without_outputs():
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert notebooks, "no notebooks found"
    for nb_path in notebooks:
        nb = json.loads(nb_path.read_text())
        for i, cell in enumerate(nb["cells"]):
            if cell["cell_type"] == "code":
                assert cell.get("outputs", []) == [], f"{nb_path.name} cell {i} has outputs"
                assert cell.get("execution_count") is None, f"{nb_path.name} cell {i} has a count"


def test_notebooks_are_numbered_and_start_with_goals():
    for nb_path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        assert re.match(r"^\d\d_[a-z0-9_]+\.ipynb$", nb_path.name), nb_path.name
        nb = json.loads(nb_path.read_text())
        head = "".join(nb["cells"][0]["source"]) + "".join(nb["cells"][1]["source"])
        assert "goal" in head.lower(), f"{nb_path.name} does not open with learning goals"


def test_import_cptoy_stays_light():
    code = (
        "import sys, cptoy, cptoy.cp, cptoy.joint, cptoy.theory;"
        "heavy = [m for m in ('plotly', 'ipywidgets', 'tensorly', 'matplotlib') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_readme_quick_start_names_the_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make lab" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()
