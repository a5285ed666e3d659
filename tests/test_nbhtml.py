"""tests/nbhtml.py: `make test` saves each notebook nbmake executes as HTML, from that one run."""

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_executed_notebooks_are_saved_as_html_without_touching_the_source(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    # the marker is computed, so it appears in the page only if the cell really ran
    nb.cells = [nbformat.v4.new_code_cell("print('ran-' + str(6 * 7))")]
    src = tmp_path / "nbs" / "tiny.ipynb"
    src.parent.mkdir()
    nbformat.write(nb, src)
    before = src.read_bytes()
    out = tmp_path / "html"
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "-p", "tests.nbhtml", "--notebook-html", str(out), "--nbmake", str(src)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    page = (out / "tiny.html").read_text()
    assert "ran-42" in page and page.lstrip().lower().startswith("<!doctype html")
    assert src.read_bytes() == before  # the notebook itself keeps no outputs
