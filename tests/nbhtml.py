"""pytest plugin: save every notebook that nbmake executes, with its outputs, as HTML.

    python -m pytest -p tests.nbhtml --notebook-html artifacts/notebooks --nbmake notebooks

Each notebook runs once (nbmake's run); the HTML is written from that run's result, also when
the notebook fails (the error is in the page). Without ``--notebook-html`` nothing changes.
"""

from __future__ import annotations

from pathlib import Path


def pytest_addoption(parser):
    parser.addoption("--notebook-html", default=None, metavar="DIR",
                     help="write each notebook nbmake executes, with its outputs, as DIR/<name>.html")


def pytest_configure(config):
    out = config.getoption("--notebook-html")
    if not out:
        return
    from nbmake import nb_run

    run_cls = getattr(nb_run, "NotebookRun", None)
    if run_cls is None or not callable(getattr(run_cls, "execute", None)):
        raise RuntimeError("--notebook-html: this nbmake version has no NotebookRun.execute to hook")
    if getattr(run_cls.execute, "_writes_html", False):
        return
    out_dir = Path(out)
    original = run_cls.execute

    def execute(self):
        res = original(self)
        write_html(res.nb, out_dir / (Path(self.filename).stem + ".html"))
        return res

    execute._writes_html = True
    run_cls.execute = execute


def write_html(nb, path: Path) -> None:
    """Render an executed notebook node to a standalone HTML page at ``path``."""
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nb)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body, encoding="utf-8")
