"""Real-browser tests: every notebook in JupyterLab, the Voilà lecture dashboard, bad input.

Headless Debian ``chromium`` driven by Python ``playwright`` (never ``playwright install``):

* each ``notebooks/*.ipynb`` (a temporary copy) is opened in ``jupyter-lab`` and run with
  "Run All Cells"; no cell may fail, no traceback may reach the kernel's stderr, and every
  widget output must render: each plotly ``FigureWidget`` of the panel is drawn with the data the
  kernel holds, each slider and dropdown is there. Then every slider is moved with the keyboard
  and every dropdown changed, and the rendered figures must change and match the kernel again.
* the lecture dashboard is served with Voilà exactly as ``make present`` does: code hidden,
  widgets rendered, a slider moves the figure.
* bad input typed into a widget (rank above the maximum, not a number) and an invalid joint
  fed to a live panel show a clear state or a ⚠ message in the page, never a traceback.

Screenshots of every widget go to ``artifacts/browser/``. Servers and kernels are stopped by
process id (process group, then every descendant) at the end, also on failure. The tests skip,
with the reason, only when chromium or playwright is missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts" / "browser"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
BIN = Path(sys.executable).parent  # the environment's scripts (jupyter-lab)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-dev-shm-usage"]
VIEWPORT = {"width": 1400, "height": 900}  # a laptop / projector screen
MAX_PANEL_HEIGHT = 1000  # px: a panel fits one projector screen (1080 lines, less the browser)
MIN_FONT_PX = 14  # no text in a panel is smaller

SERVER_START_S = 90  # jupyter-lab / voila answering HTTP
KERNEL_READY_S = 120  # notebook open and its kernel idle
RUN_ALL_S = 420  # every cell of one notebook executed (the slowest notebook takes ~30 s here)
RENDER_S = 90  # widgets drawn after the run
CHANGE_S = 120  # a control's effect reaching the figure (may refit: first HALS sweep etc.)

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - depends on the environment
    sync_playwright = None


def needs_browser(test):
    """Mark ``test`` as a browser test, skipped (with the reason) without chromium/playwright."""
    for mark in (
        pytest.mark.browser,
        pytest.mark.skipif(sync_playwright is None,
                           reason="playwright is not installed (pip install -e '.[dev]')"),
        pytest.mark.skipif(CHROMIUM is None,
                           reason="chromium is not installed (Debian: apt-get install chromium)"),
    ):
        test = mark(test)
    return test


# ====================================================================== processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children() -> dict[int, list[int]]:
    """ppid -> pids of every process visible in /proc."""
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(d.name))
    return kids


def _descendants(pid: int) -> list[int]:
    kids, out, todo = _children(), [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, killed and waiting to be reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Server:
    """A server process in its own session (started with ``start_new_session``), with a log.

    ``stop`` records the server's descendants (kernels run in sessions of their own), sends
    SIGTERM to the server's process group so it can shut its kernels down, then SIGKILLs, by
    process id, whatever of the group and the recorded descendants is still alive.
    """

    def __init__(self, cmd: list[str], cwd: Path, env: dict, log: Path, url: str):
        self.cmd, self.url, self.log = cmd, url, log
        self._log_file = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, path: str, timeout: float) -> bool:
        """True once ``url + path`` answers HTTP (any status); False if the process died."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                urllib.request.urlopen(self.url + path, timeout=5).close()
                return True
            except urllib.error.HTTPError:
                return True
            except OSError:
                time.sleep(0.25)
        raise TimeoutError(f"{self.cmd[0]} did not answer within {timeout} s; log:\n"
                           + self.log_text()[-3000:])

    def log_text(self) -> str:
        if not self._log_file.closed:
            self._log_file.flush()
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        pid = self.proc.pid
        family = _descendants(pid)
        if self.proc.poll() is None:
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 5
        while any(_alive(p) for p in family) and time.monotonic() < deadline:
            time.sleep(0.2)
        for p in [pid, *family]:
            for kill in (os.killpg, os.kill):  # a kernel leads its own process group
                try:
                    if kill is os.killpg and os.getpgid(p) != p:
                        continue
                    kill(p, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)
        self._log_file.close()


def _start(make_cmd, cwd: Path, env: dict, log: Path, ready_path: str) -> Server:
    """Start a server on a free loopback port, trying another port if that one was taken."""
    for _ in range(3):
        port = _free_port()
        server = Server(make_cmd(port), cwd, env, log, f"http://127.0.0.1:{port}")
        if server.wait_ready(ready_path, SERVER_START_S):
            return server
        server.stop()
    raise RuntimeError(f"server did not start; log:\n{log.read_text(errors='replace')[-3000:]}")


def _isolated_env(tmp: Path) -> dict:
    """Environment that keeps Jupyter's config, settings, workspaces and runtime files in tmp."""
    env = dict(os.environ)
    for var, sub in [("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_DATA_DIR", "data"),
                     ("JUPYTER_RUNTIME_DIR", "runtime"), ("JUPYTERLAB_WORKSPACES_DIR", "ws"),
                     ("JUPYTERLAB_SETTINGS_DIR", "settings"), ("IPYTHONDIR", "ipython")]:
        (tmp / sub).mkdir(parents=True, exist_ok=True)
        env[var] = str(tmp / sub)
    env["OMP_NUM_THREADS"] = "1"  # the kernels share 2 cores with the other pytest worker
    env.pop("MPLBACKEND", None)
    settings = {  # no news/update pop-ups; every cell stays in the DOM (no windowing)
        "@jupyterlab/apputils-extension/notification":
            {"fetchNews": "false", "checkForUpdates": False},
        "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
        "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
    }
    for name, value in settings.items():
        path = tmp / "settings" / f"{name}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))
    return env


# ====================================================================== fixtures
@pytest.fixture(scope="module")
def browser():
    pw = sync_playwright().start()
    try:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
    except Exception:
        pw.stop()
        raise
    yield b
    b.close()
    pw.stop()


@pytest.fixture(scope="module")
def artifacts():
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*.png"):  # only this run's screenshots
        old.unlink()
    return ARTIFACTS


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """jupyter-lab on a free loopback port, serving a temporary copy of notebooks/."""
    tmp = tmp_path_factory.mktemp("lab")
    nbdir = tmp / "notebooks"
    shutil.copytree(ROOT / "notebooks", nbdir, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    env = _isolated_env(tmp)
    root_flag = ["--allow-root"] if os.geteuid() == 0 else []

    def cmd(port):
        return [str(BIN / "jupyter-lab"), "--no-browser", f"--port={port}",
                "--ServerApp.port_retries=0", "--ServerApp.token=", "--ServerApp.password=",
                "--ServerApp.ip=127.0.0.1", f"--notebook-dir={nbdir}", "--expose-app-in-browser",
                "--LabApp.news_url=None",
                "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", *root_flag]

    server = _start(cmd, tmp, env, tmp / "lab.log", "/api/status")
    server.nbdir = nbdir
    try:
        yield server
    finally:
        server.stop()


_JS_ERRORS: list[str] = []  # uncaught errors of the current page, for timeout messages


class PageLog:
    """What a page did wrong: uncaught JS errors, and requests that left the machine."""

    def __init__(self, page):
        self.page_errors: list[str] = []
        self.console_errors: list[str] = []  # for failure messages only (offline fonts etc.)
        self.external: list[str] = []
        _JS_ERRORS.clear()
        self.page_errors = _JS_ERRORS
        page.on("pageerror", lambda e: self.page_errors.append(f"{e}\n{e.stack}"))
        page.on("console", lambda m: self.console_errors.append(m.text)
                if m.type == "error" else None)

        def route(r):
            host = re.match(r"^[a-z]+://([^/:]+)", r.request.url)
            if host and host.group(1) not in ("127.0.0.1", "localhost"):
                self.external.append(r.request.url)
                r.abort()  # nothing may be downloaded; the page must work without it
            else:
                r.continue_()

        page.route("**/*", route)


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1)
    pg = context.new_page()
    pg.set_default_timeout(60_000)
    pg.cptoy_log = PageLog(pg)
    yield pg
    try:  # stop this notebook's kernel now (the server stops any left at the end)
        pg.evaluate("() => window.__nb ? window.__nb.sessionContext.shutdown() : null")
    except Exception:  # noqa: BLE001 - a page that never opened a notebook, or already gone
        pass
    context.close()


# ====================================================================== JupyterLab helpers
_JS_FLAT = """
function flat(x, out) {
  if (x === null || x === undefined || typeof x === 'string') return out;
  if (typeof x === 'number') { if (isFinite(x)) out.push(x); return out; }
  if (Array.isArray(x) || ArrayBuffer.isView(x)) { for (const e of x) flat(e, out); }
  return out;
}
function fingerprint(node) {
  return Array.from(node.querySelectorAll('.js-plotly-plot')).map(gd => (gd.data || []).map(
    t => ['x', 'y', 'z'].map(a => { const v = flat(t[a], []);
      return [v.length, v.reduce((s, e) => s + Math.abs(e), 0)]; })));
}
"""

JS_OPEN = """async (path) => {
  const app = window.jupyterapp;
  await app.started; await app.restored;
  const panel = await app.commands.execute('docmanager:open', {path, factory: 'Notebook'});
  await panel.context.ready; await panel.sessionContext.ready;
  app.shell.activateById(panel.id);
  // JupyterLab's default layout, as a new user sees it: the file browser open on the left
  app.shell.activateById('filebrowser'); app.shell.expandLeft(); app.shell.collapseRight();
  window.__nb = panel;
  window.__kernelErrors = [];
  panel.sessionContext.session.kernel.iopubMessage.connect((_, msg) => {
    const t = msg.header.msg_type, c = msg.content;
    if (t === 'error') window.__kernelErrors.push(c.ename + ': ' + c.evalue);
    if (t === 'stream' && c.name === 'stderr' && /Traceback/.test(c.text))
      window.__kernelErrors.push(c.text);
  });
  return true;
}"""

JS_KERNEL_IDLE = """() => { const s = window.__nb && window.__nb.sessionContext.session;
  return !!(s && s.kernel && s.kernel.status === 'idle'); }"""

JS_RUN_DONE = """() => {
  const nb = window.__nb, k = nb.sessionContext.session.kernel;
  const cells = nb.content.widgets.filter(
    c => c.model.type === 'code' && c.model.sharedModel.getSource().trim());
  const err = cells.some(c => c.model.outputs.toJSON().some(o => o.output_type === 'error'));
  return k.status === 'idle' && (err || cells.every(c => c.model.executionCount !== null));
}"""

JS_OUTPUTS = """() => {
  // every code cell's outputs; widget-view outputs get data-cptoy-widget="k" on their node
  const res = []; let k = 0;
  window.__nb.content.widgets.forEach((c, i) => {
    if (c.model.type !== 'code') return;
    const outs = c.model.outputs.toJSON();
    outs.forEach((o, j) => {
      const item = {cell: i, type: o.output_type, name: o.name || '',
                    text: (o.text || '') + (o.traceback ? o.traceback.join('\\n') : ''),
                    ename: o.ename || '', evalue: o.evalue || ''};
      const view = o.data && o.data['application/vnd.jupyter.widget-view+json'];
      if (view) {
        item.model_id = view.model_id; item.widget = k;
        const child = c.outputArea.widgets[j];
        if (child) child.node.setAttribute('data-cptoy-widget', String(k));
        k += 1;
      }
      res.push(item);
    });
  });
  return res;
}"""

JS_EXECUTE = """async (code) => {
  // run code in the notebook's kernel without touching the notebook; returns its stdout
  const k = window.__nb.sessionContext.session.kernel;
  let out = '';
  const f = k.requestExecute({code, silent: false, store_history: false});
  f.onIOPub = msg => {
    if (msg.header.msg_type === 'stream') out += msg.content.text;
    if (msg.header.msg_type === 'error') out += 'KERNEL ERROR ' + msg.content.ename + ': '
                                                + msg.content.evalue;
  };
  await f.done;
  return out;
}"""

# what the kernel holds for the displayed widgets (walked through .children, depth first =
# the order of the DOM): per plotly figure the (count, sum |v|) of every trace's x, y, z
PROBE = r"""
def _cptoy_probe(ids):
    import json
    import math
    import sys

    import numpy as np
    from ipywidgets import Widget
    from ipywidgets.widgets.widget import _instances

    def walk(w):
        yield w
        for c in getattr(w, "children", None) or ():
            if isinstance(c, Widget):
                yield from walk(c)

    def numbers(x):
        if x is None or isinstance(x, str):
            return []
        try:
            a = np.asarray(x, dtype=float).ravel()
        except (TypeError, ValueError):
            return [v for e in x for v in numbers(e)]
        return [float(v) for v in a if math.isfinite(v)]

    res = []
    for mid in ids:
        w = _instances.get(mid)
        info = dict(found=w is not None, figures=[], sliders=[], dropdowns=[], kinds=[])
        for c in walk(w) if w is not None else ():
            name = type(c).__name__
            info["kinds"].append(name)
            basewidget = sys.modules.get("plotly.basewidget")  # imported by any FigureWidget
            if basewidget is not None and isinstance(c, basewidget.BaseFigureWidget):
                info["figures"].append([[[len(v), sum(abs(e) for e in v)]
                                         for v in (numbers(getattr(t, a, None))
                                                   for a in ("x", "y", "z"))]
                                        for t in c.data])
            elif name.endswith("Slider"):
                info["sliders"].append(dict(name=name, value=c.value, min=c.min, max=c.max,
                                            disabled=c.disabled, range="Range" in name
                                            or "Selection" in name))
            elif name == "Dropdown":
                info["dropdowns"].append(dict(n=len(c.options), index=c.index,
                                              disabled=c.disabled))
        res.append(info)
    print(json.dumps(res))


_cptoy_probe(IDS)
del _cptoy_probe
"""


def kernel_exec(page, code: str) -> str:
    return page.evaluate(JS_EXECUTE, code)


def probe(page, model_ids: list[str]) -> list[dict]:
    out = kernel_exec(page, PROBE.replace("IDS", json.dumps(model_ids)))
    assert "KERNEL ERROR" not in out, out
    return json.loads(out.strip().splitlines()[-1])


def fingerprint(locator) -> list:
    """(count, sum |v|) of x, y, z of every trace of every plotly figure under ``locator``."""
    return locator.evaluate(f"node => {{ {_JS_FLAT} return fingerprint(node); }}")


JS_UNDRAWN = """node => {
  // traces that hold data (x or y; z for a heatmap) but that plotly does not draw (visible
  // false after its defaults: e.g. a bar with x but no y), unless the trace asks to be hidden
  const n = v => (v && v.length) || 0;
  const out = [];
  node.querySelectorAll('.js-plotly-plot').forEach((gd, f) => (gd.data || []).forEach((t, i) => {
    const full = (gd._fullData || [])[i];
    if (t.visible === false || t.visible === 'legendonly' || !full) return;
    const holds = t.z !== undefined ? n(t.z) > 0 : n(t.x) > 0 || n(t.y) > 0;  // z: a heatmap
    if (holds && full.visible !== true)
      out.push(`figure ${f} trace ${i} (${t.name || t.type}): x ${n(t.x)}, y ${n(t.y)}, `
               + `z ${n(t.z)} not drawn`);
  }));
  return out;
}"""


def assert_drawn(node, where: str) -> None:
    """Every trace that holds data is drawn (none left half-updated, e.g. x without y)."""
    undrawn = node.evaluate(JS_UNDRAWN)
    assert not undrawn, f"{where}: " + "; ".join(undrawn)


def html_texts(locator) -> list[str]:
    """The text of the HTML/label widgets under ``locator`` (status lines, token text)."""
    return locator.evaluate("node => Array.from(node.querySelectorAll("
                            "'.widget-html-content, .widget-label-basic')).map(e => e.innerText)")


def same_figures(a: list, b: list, rel: float = 1e-6) -> bool:
    """Fingerprints equal: same shapes and counts, sums equal to ``rel``."""
    if len(a) != len(b):
        return False
    for fa, fb in zip(a, b, strict=True):
        if len(fa) != len(fb):
            return False
        for ta, tb in zip(fa, fb, strict=True):
            for (na, sa), (nb, sb) in zip(ta, tb, strict=True):
                if na != nb or abs(sa - sb) > rel * max(1.0, abs(sa), abs(sb)):
                    return False
    return True


def wait_for(check, timeout: float, what: str, interval: float = 0.25):
    """Poll ``check()`` until it returns a truthy value; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}"
                        + (f"; JS errors: {_JS_ERRORS}" if _JS_ERRORS else ""))
        time.sleep(interval)


def open_and_run(page, lab, name: str) -> list[dict]:
    """Open notebook ``name`` in JupyterLab, Run All Cells, wait; returns its outputs."""
    page.goto(lab.url + "/lab", wait_until="domcontentloaded")
    page.wait_for_function("() => window.jupyterapp !== undefined", timeout=KERNEL_READY_S * 1000)
    page.evaluate(JS_OPEN, name)
    page.wait_for_function(JS_KERNEL_IDLE, timeout=KERNEL_READY_S * 1000, polling=250)
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    page.wait_for_function(JS_RUN_DONE, timeout=RUN_ALL_S * 1000, polling=500)
    return page.evaluate(JS_OUTPUTS)


def screenshot(node, path: Path) -> None:
    """Screenshot of one widget output, scrolled to the top of the notebook's view first (the
    window made taller for it, as wide as before, so that a tall output is shot whole)."""
    page = node.page
    size = page.viewport_size
    height = node.evaluate("n => n.getBoundingClientRect().height")
    if height + 150 > size["height"]:
        page.set_viewport_size({"width": size["width"], "height": int(height) + 200})
    try:
        node.evaluate("n => n.scrollIntoView({block: 'start'})")
        time.sleep(0.3)  # let plotly finish a resize triggered by the scroll
        node.screenshot(path=str(path))
    finally:
        page.set_viewport_size(size)


# jupyter_server's own race, not our code: GET /api/kernels while a kernel is still starting
# fails because the kernel's last_activity is not set yet (a KeyError inside traitlets, then a
# TraitError), the server logs it, and the client retries.
BENIGN_SERVER_ERRORS = (
    "The 'last_activity' trait of a ServerKernelManager instance",
    "KeyError: 'last_activity'",
)


def server_tracebacks(log: str) -> list[str]:
    """Each log entry of the server that holds a traceback (chained tracebacks stay together).

    An entry starts at a line like ``[E 2026-... ServerApp]`` or ``[IPKernelApp]`` and runs up
    to the next such line.
    """
    entries: list[list[str]] = [[]]
    for line in log.splitlines():
        if re.match(r"^\[[A-Z]", line):
            entries.append([])
        entries[-1].append(line)
    return ["\n".join(e) for e in entries if any("Traceback" in ln for ln in e)]


def assert_no_errors(page, outputs: list[dict], server: Server, log_start: int, where: str):
    """No error output, no traceback on stderr, in the kernel's messages or in the server log."""
    errors = [f"cell {o['cell']}: {o['ename']}: {o['evalue']}" for o in outputs
              if o["type"] == "error"]
    errors += [f"cell {o['cell']} stderr: {o['text'][-800:]}" for o in outputs
               if o["type"] == "stream" and o["name"] == "stderr" and "Traceback" in o["text"]]
    assert not errors, f"{where}: error outputs:\n" + "\n".join(errors)
    dom = page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')
    tracebacks = [t for t in dom.all_inner_texts() if "Traceback" in t]
    assert not tracebacks, f"{where}: traceback shown in the page:\n{tracebacks[0][-800:]}"
    kernel_errors = page.evaluate("() => window.__kernelErrors")
    assert not kernel_errors, f"{where}: the kernel reported errors:\n" + "\n".join(kernel_errors)
    log = server.log_text()[log_start:]  # callbacks' tracebacks end up in the kernel's stderr
    bad = [t for t in server_tracebacks(log) if not any(b in t for b in BENIGN_SERVER_ERRORS)]
    assert not bad, f"{where}: traceback in the server log:\n{bad[0][-3000:]}"
    assert not page.cptoy_log.page_errors, f"{where}: JS errors: {page.cptoy_log.page_errors}"


def assert_rendered(page, node, info: dict, where: str) -> None:
    """The widget output ``node`` shows every control and figure the kernel holds for it."""
    assert info["found"], f"{where}: the kernel does not know the displayed widget"
    wait_for(lambda: node.locator(".jupyter-widgets").count() > 0, RENDER_S,
             f"{where}: widget view to render")
    text = node.inner_text()
    assert "Error displaying widget" not in text and "Traceback" not in text, f"{where}: {text}"
    n_fig = len(info["figures"])
    wait_for(lambda: node.locator(".js-plotly-plot .main-svg").count() >= n_fig, RENDER_S,
             f"{where}: {n_fig} plotly figures to draw")
    assert node.locator(".js-plotly-plot").count() == n_fig, where
    assert node.locator(".widget-slider").count() == len(info["sliders"]), where
    assert node.locator(".widget-dropdown").count() == len(info["dropdowns"]), where
    for k in range(n_fig):
        box = node.locator(".js-plotly-plot").nth(k).bounding_box()
        assert box and box["width"] > 100 and box["height"] > 100, f"{where}: figure {k} {box}"
    # the figures show what the kernel holds (not the data they were built with)
    wait_for(lambda: same_figures(fingerprint(node), info["figures"]), RENDER_S,
             f"{where}: rendered figures to match the kernel's {info['kinds']}")
    assert_drawn(node, where)


JS_FITS = """node => {
  // each cptoy panel under node: its size, elements wider than the output area (unless a
  // scrolling box inside the panel holds them) and text under MIN px
  const tag = el => el.tagName.toLowerCase() + (typeof el.className === 'string' && el.className
    ? '.' + el.className.trim().split(/\\s+/).slice(0, 2).join('.') : '');
  return Array.from(node.querySelectorAll('.cptoy-panel')).map(panel => {
    const area = (panel.closest('.jp-OutputArea-output') || node).getBoundingClientRect();
    const p = panel.getBoundingClientRect();
    const res = {width: p.width, area: area.width, height: p.height, wide: [], small: []};
    const scrolls = el => {
      for (let a = el.parentElement; a && a !== panel; a = a.parentElement) {
        const o = getComputedStyle(a).overflowX;
        if (o === 'auto' || o === 'scroll') return true;
      }
      return false;
    };
    for (const el of [panel, ...panel.querySelectorAll('*')]) {
      const r = el.getBoundingClientRect(), cs = getComputedStyle(el);
      if (!r.width || !r.height || cs.display === 'none' || cs.visibility === 'hidden') continue;
      if ((r.right > area.right + 1 || r.left < area.left - 1) && !scrolls(el))
        res.wide.push(`${tag(el)} ${Math.round(r.left)}..${Math.round(r.right)} outside `
                      + `${Math.round(area.left)}..${Math.round(area.right)}`);
      const text = Array.from(el.childNodes).filter(n => n.nodeType === 3)
        .map(n => n.textContent).join('').trim();
      if (text && parseFloat(cs.fontSize) < MIN - 0.01)
        res.small.push(`${tag(el)} ${cs.fontSize} ${JSON.stringify(text.slice(0, 30))}`);
    }
    return res;
  });
}""".replace("MIN", str(MIN_FONT_PX))


def assert_fits(node, where: str) -> list[dict]:
    """Every cptoy panel under ``node`` fits its output area (nothing wider, tables scroll),
    fits one projector screen and has no text under MIN_FONT_PX; returns the measurements."""
    time.sleep(0.5)  # let plotly finish a resize to the area's width
    fits = node.evaluate(JS_FITS)
    for k, f in enumerate(fits):
        what = f"{where}: panel {k} ({f['width']:.0f} x {f['height']:.0f} px in {f['area']:.0f})"
        assert not f["wide"], f"{what}: wider than the output area:\n" + "\n".join(f["wide"][:8])
        assert not f["small"], f"{what}: text under {MIN_FONT_PX} px:\n" + "\n".join(f["small"][:8])
        assert f["height"] <= MAX_PANEL_HEIGHT, f"{what}: taller than {MAX_PANEL_HEIGHT} px"
    return fits


def settle(page, node, model_id: str, where: str) -> dict:
    """Wait for the kernel to go idle and the figures to match it again; the kernel's state."""
    page.wait_for_function(JS_KERNEL_IDLE, timeout=CHANGE_S * 1000, polling=250)
    info = probe(page, [model_id])[0]
    wait_for(lambda: same_figures(fingerprint(node), info["figures"]), RENDER_S,
             f"{where}: figures to match the kernel after the change")
    assert_drawn(node, where)
    return info


def press_slider(page, slider, key: str, where: str) -> None:
    """Focus the slider's handle and press ``key``; again if the readout did not move (the
    keyboard focus can be taken by a widget rendering at that moment)."""
    readout = slider.locator(".widget-readout")
    before = readout.inner_text()
    for _ in range(3):
        slider.locator(".noUi-handle").focus()
        page.keyboard.press(key)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if readout.inner_text() != before:
                return
            time.sleep(0.1)
    pytest.fail(f"{where}: {key} on the slider's handle did not move it (readout {before!r})")


def exercise_controls(page, node, model_id: str, info: dict, where: str) -> list[str]:
    """Move every slider (keyboard) and change every dropdown; each must change the page.

    Returns descriptions of the controls whose change reached a figure."""
    moved_figure = []
    controls = [("slider", i, s) for i, s in enumerate(info["sliders"])
                if not s["disabled"] and not s["range"] and s["max"] > s["min"]]
    controls += [("dropdown", i, d) for i, d in enumerate(info["dropdowns"])
                 if not d["disabled"] and d["n"] > 1]
    for kind, i, c in controls:
        label = f"{where}: {kind} {i}"
        figs, texts = fingerprint(node), html_texts(node)
        if kind == "slider":
            press_slider(page, node.locator(".widget-slider").nth(i),
                         "ArrowRight" if c["value"] < c["max"] else "ArrowLeft", label)
        else:
            new = ((c["index"] or 0) + 1) % c["n"]
            node.locator(".widget-dropdown").nth(i).locator("select").select_option(index=new)
        wait_for(lambda f=figs, t=texts: (not same_figures(fingerprint(node), f)
                                          or html_texts(node) != t),
                 CHANGE_S, f"{label} to change the rendered panel")
        after = settle(page, node, model_id, label)
        if kind == "slider":
            assert after["sliders"][i]["value"] != c["value"], f"{label}: kernel value unchanged"
        else:
            assert after["dropdowns"][i]["index"] != c["index"], f"{label}: kernel index unchanged"
        if not same_figures(fingerprint(node), figs):
            moved_figure.append(label)
        info = after
    if info["figures"] and controls:
        assert moved_figure, f"{where}: no control changed a figure"
    return moved_figure


# ====================================================================== tests
def test_notebooks_are_found():
    assert NOTEBOOKS, "no notebooks/*.ipynb"


@needs_browser
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_and_its_widgets_render_and_respond(page, lab, artifacts, notebook):
    where = notebook.name
    log_start = len(lab.log_text())
    outputs = open_and_run(page, lab, notebook.name)
    assert_no_errors(page, outputs, lab, log_start, where)
    code_cells = {o["cell"] for o in outputs}
    assert code_cells, f"{where}: no outputs at all"

    widgets = [o for o in outputs if "model_id" in o]
    infos = probe(page, [o["model_id"] for o in widgets]) if widgets else []
    for o, info in zip(widgets, infos, strict=True):
        w = f"{where} widget {o['widget']} (cell {o['cell']})"
        node = page.locator(f'[data-cptoy-widget="{o["widget"]}"]')
        assert_rendered(page, node, info, w)
        screenshot(node, artifacts / f"{notebook.stem}_widget{o['widget']}.png")
        assert_fits(node, w)
        exercise_controls(page, node, o["model_id"], info, w)
        assert_fits(node, w + " (after moves)")
        screenshot(node, artifacts / f"{notebook.stem}_widget{o['widget']}_moved.png")
    # the interactions left no error behind either
    assert_no_errors(page, page.evaluate(JS_OUTPUTS), lab, log_start, where + " (after moves)")
    assert not page.cptoy_log.external, f"{where}: requests left the machine"


# ---------------------------------------------------------------------- bad input
def _code_cell(source: str) -> dict:
    return {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
            "source": source}


ROBUSTNESS_NOTEBOOK = {  # written into the server's temporary folder only
    "cells": [
        _code_cell("import torch\n"
                   "from cptoy.data import ByteTokenizer\n"
                   "from cptoy.heads import MTPModel\n"
                   "from cptoy.joint import HMM\n"
                   "from cptoy.model import GPTConfig\n"
                   "from cptoy.widgets import cp_explorer, expert_weights\n"
                   "torch.manual_seed(0)"),
        _code_cell("ex = cp_explorer(HMM(3, 5, stickiness=0.9, seed=1).joint(3), max_rank=3,"
                   " n_iter=50, seed=0)\nex"),
        _code_cell("tiny = MTPModel(GPTConfig.preset('tiny', vocab_size=256, block_size=16),"
                   " n_future=3, rank=2).eval()\n"
                   "ew = expert_weights(tiny, ByteTokenizer(), text='def f(x):')\new"),
    ],
    "metadata": {"kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python",
                                "name": "python3"}},
    "nbformat": 4, "nbformat_minor": 4,
}


def _type_into(page, locator, text: str) -> None:
    """Select what the box holds, type ``text``, press Enter."""
    locator.click()
    page.keyboard.press("Control+A")
    page.keyboard.type(text)
    page.keyboard.press("Enter")


@needs_browser
def test_bad_input_shows_a_clear_state_or_message_never_a_traceback(page, lab, artifacts):
    name = "_robustness.ipynb"
    (lab.nbdir / name).write_text(json.dumps(ROBUSTNESS_NOTEBOOK))
    log_start = len(lab.log_text())
    outputs = open_and_run(page, lab, name)
    assert_no_errors(page, outputs, lab, log_start, name)
    o_cp, o_ew = [o for o in outputs if "model_id" in o]
    infos = probe(page, [o_cp["model_id"], o_ew["model_id"]])
    nodes = [page.locator(f'[data-cptoy-widget="{o["widget"]}"]') for o in (o_cp, o_ew)]
    for node, info in zip(nodes, infos, strict=True):
        assert_rendered(page, node, info, name)

    # ---- cp_explorer (max_rank 3)
    node = nodes[0]
    readout = node.locator(".widget-slider .widget-readout")

    def status() -> str:
        return "\n".join(html_texts(node))

    # 1. a rank above the fitted maximum typed into the slider's box: shown at the maximum
    figs = fingerprint(node)
    _type_into(page, readout, "99")
    wait_for(lambda: not same_figures(fingerprint(node), figs), CHANGE_S, "rank 99 to apply")
    info = settle(page, node, o_cp["model_id"], "rank 99")
    assert info["sliders"][0]["value"] == 3
    assert readout.inner_text().strip() == "3"
    assert "rank 3" in status() and "⚠" not in status(), status()

    # 2. not a number: the box goes back to the current rank, nothing else happens
    _type_into(page, readout, "abc")
    wait_for(lambda: readout.inner_text().strip() == "3", RENDER_S, "the readout to revert")
    time.sleep(1.0)
    assert probe(page, [o_cp["model_id"]])[0]["sliders"][0]["value"] == 3
    assert "⚠" not in status(), status()

    # 3. an invalid joint fed to the live panel (no longer sums to 1), then the slider moved
    assert "KERNEL ERROR" not in kernel_exec(page, "ex.P = ex.P * 2")
    press_slider(page, node.locator(".widget-slider").first, "ArrowLeft", name)
    wait_for(lambda: "⚠" in status(), CHANGE_S, "a ⚠ message for the invalid joint")
    assert "sum to 1" in status(), status()
    screenshot(node, artifacts / "robustness_cp_explorer_invalid_joint.png")

    # ---- expert_weights (block size 16): empty text, text longer than the block, then good text
    node = nodes[1]
    box = node.locator(".widget-textarea textarea")
    for text, expect in [("", "empty"), ("x = 1 + 2 + 3 + 4 + 5", "block size")]:
        box.fill(text)
        box.blur()  # the box updates when it loses focus
        wait_for(lambda e=expect: "⚠" in status() and e in status(), CHANGE_S,
                 f"a ⚠ message about {expect!r}")
        settle(page, node, o_ew["model_id"], f"text {text!r}")
        screenshot(node, artifacts / f"robustness_expert_weights_{expect.replace(' ', '_')}.png")
    box.fill("x = 1")
    box.blur()
    wait_for(lambda: "⚠" not in status(), CHANGE_S, "the message to clear on good text")
    info = settle(page, node, o_ew["model_id"], "good text")
    assert all(any(s > 0 for t in f for _, s in t) for f in info["figures"]), info["figures"]
    assert_no_errors(page, page.evaluate(JS_OUTPUTS), lab, log_start, name + " (after input)")


# ---------------------------------------------------------------------- layout and load
SNIPPET = ("def mean(xs):\n    if not xs:\n        raise ValueError('empty')\n"
           "    total = 0\n    for x in xs:\n        total += x\n    return total / len(xs)\n")

PANELS_NOTEBOOK = {  # every panel on the shipped small models, as the dashboard shows them
    "cells": [
        _code_cell("import torch\n"
                   "from cptoy.joint import text_joint\n"
                   "from cptoy.plots import stdlib_code\n"
                   "from cptoy.present import demo_models\n"
                   "from cptoy.widgets import (acceptance_explorer, cp_explorer, expert_weights,"
                   " speculative_stepper)\n"
                   "torch.manual_seed(0)\n"
                   "demo = demo_models('code', num_prompts=2, max_chars=20_000)\n"
                   "best = demo.models['rank 8']"),
        _code_cell("raise_ = text_joint(stdlib_code(), 'raise ', n=3, top_k=12)\n"
                   "cp_explorer(raise_.P, labels=raise_.labels(), max_rank=4, n_iter=60, seed=0)"),
        _code_cell(f"expert_weights(best, demo.tokenizer, text={SNIPPET!r})"),
        _code_cell("acceptance_explorer(demo.models, demo.tokenizer, demo.prompts,"
                   " heldout_ids=demo.heldout, max_new_tokens=32, tf_positions=64)"),
        _code_cell("speculative_stepper(best, demo.tokenizer, demo.prompts[0], max_new_tokens=24)"),
    ],
    "metadata": ROBUSTNESS_NOTEBOOK["metadata"],
    "nbformat": 4, "nbformat_minor": 4,
}


@needs_browser
def test_panels_fit_jupyterlab_default_layout_render_and_respond(page, lab, artifacts):
    """At 1400 x 900 with the file browser open: every panel is drawn with the kernel's data,
    no element is wider than its output area, the panel fits one screen, no text under 14 px;
    every slider and dropdown changes the panel, and it still fits afterwards."""
    name = "_panels.ipynb"
    (lab.nbdir / name).write_text(json.dumps(PANELS_NOTEBOOK))
    log_start = len(lab.log_text())
    outputs = open_and_run(page, lab, name)
    assert_no_errors(page, outputs, lab, log_start, name)
    widgets = [o for o in outputs if "model_id" in o]
    assert len(widgets) == 4, outputs
    area = page.locator(".jp-NotebookPanel .jp-OutputArea-output").first.bounding_box()
    assert area["width"] < 1100, f"the sidebar is not open: output area {area}"
    for o, info in zip(widgets, probe(page, [o["model_id"] for o in widgets]), strict=True):
        where = f"{name} panel {o['widget']}"
        node = page.locator(f'[data-cptoy-widget="{o["widget"]}"]')
        assert_rendered(page, node, info, where)
        screenshot(node, artifacts / f"layout_panel{o['widget']}.png")
        assert_fits(node, where)
        exercise_controls(page, node, o["model_id"], info, where)
        assert_fits(node, where + " (after moves)")
    assert_no_errors(page, page.evaluate(JS_OUTPUTS), lab, log_start, name + " (after moves)")


SLOW_BUNDLE_MS = 3000  # how late plotly's bundle becomes ready on the busy page

# What a busy machine does to the page, made certain: plotly's front-end bundle becomes ready
# SLOW_BUNDLE_MS after it loaded, later than anywidget's 2 s deadline for a model to initialise
# (cptoy.widgets.base compiles it once per page and keeps the promise under this key).
JS_SLOW_BUNDLE = """(() => {
  const key = "__cptoy_plotly_widget_VERSION";
  let slow;
  Object.defineProperty(globalThis, key, {configurable: true,
    get() { return slow; },
    set(p) { slow = p && p.then(m => new Promise(ok => setTimeout(() => ok(m), MS))); }});
})();""".replace("MS", str(SLOW_BUNDLE_MS))


class CPUHog:
    """Processes spinning on every core (a busy lecture laptop), stopped by process id."""

    def __init__(self, n: int = 2):
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                      for _ in range(n)]

    def stop(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait(timeout=10)


@needs_browser
def test_panels_initialise_and_respond_beside_a_cpu_hog(page, lab, artifacts):
    """Two processes spinning on both cores while the notebook runs, and plotly's bundle ready
    only after anywidget's deadline: every figure still initialises (no "[anywidget] Failed to
    initialize model"), shows the kernel's data and follows a slider."""
    name = "_busy.ipynb"
    (lab.nbdir / name).write_text(json.dumps(ROBUSTNESS_NOTEBOOK))
    import plotly

    page.add_init_script(JS_SLOW_BUNDLE.replace("VERSION", plotly.__version__))
    hog = CPUHog(2)
    try:
        log_start = len(lab.log_text())
        outputs = open_and_run(page, lab, name)
        assert_no_errors(page, outputs, lab, log_start, name)
        widgets = [o for o in outputs if "model_id" in o]
        for o, info in zip(widgets, probe(page, [o["model_id"] for o in widgets]), strict=True):
            where = f"{name} panel {o['widget']} (busy machine)"
            node = page.locator(f'[data-cptoy-widget="{o["widget"]}"]')
            assert_rendered(page, node, info, where)
            figs = fingerprint(node)
            sl = info["sliders"][0]
            press_slider(page, node.locator(".widget-slider").first,
                         "ArrowRight" if sl["value"] < sl["max"] else "ArrowLeft", where)
            wait_for(lambda n=node, f=figs: not same_figures(fingerprint(n), f), CHANGE_S,
                     f"{where}: the slider to change the figure")
            settle(page, node, o["model_id"], where)
            screenshot(node, artifacts / f"busy_panel{o['widget']}.png")
    finally:
        hog.stop()
    failed = [m for m in page.cptoy_log.console_errors if "Failed to initialize" in m]
    assert not failed, failed


# ---------------------------------------------------------------------- lecture dashboard code
def test_present_command_line_and_dashboard_file(capsys, tmp_path):
    from cptoy.present import DASHBOARD, main, voila_command

    assert main(["--dry-run", "--port", "8899"]) == 0
    out = capsys.readouterr().out
    for part in (str(DASHBOARD), "-m voila", "--port=8899", "--no-browser",
                 "--strip_sources=True", "--Voila.ip=127.0.0.1"):
        assert part in out, (part, out)
    assert "--no-browser" not in voila_command(open_browser=True)
    assert not any(a.startswith("--port") for a in voila_command())
    for port in (0, 70_000, "8866", True):
        with pytest.raises(ValueError, match="port"):
            voila_command(port=port)
    with pytest.raises(ValueError, match="notebook"):
        voila_command(notebook=tmp_path / "missing.ipynb")
    # the dashboard ships like the notebooks: no outputs, no execution counts
    nb = json.loads(DASHBOARD.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None



def _run_cell(source: str, ns: dict):
    """Execute a cell's source in ``ns``; the value of its last line if that is an expression."""
    import ast

    tree = ast.parse(source)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    exec(compile(tree, "<dashboard>", "exec"), ns)
    if last is not None:
        return eval(compile(ast.Expression(last.value), "<dashboard>", "eval"), ns)
    return None


def test_dashboard_builds_its_panels_on_the_small_models_and_waits_to_load_the_real_one(
        monkeypatch):
    """The dashboard's code, run here: one panel per "panel" cell, no ⚠ anywhere; the decoding
    panels offer CP heads of two ranks and first-token heads; the real model is not loaded
    until its button is pressed."""
    import IPython.display

    import cptoy.present
    from cptoy.present import DASHBOARD, RealModelLoader

    loaded: list = []
    real = cptoy.present.demo_models

    def spy(corpus="code", **kw):
        loaded.append(corpus)
        return real(corpus, **kw)

    monkeypatch.setattr(cptoy.present, "demo_models", spy)
    shown: list = []
    monkeypatch.setattr(IPython.display, "display", lambda *objs, **kw: shown.extend(objs))
    ns: dict = {}
    loaders = []
    for cell in json.loads(DASHBOARD.read_text())["cells"]:
        if cell["cell_type"] != "code":
            continue
        tags = cell["metadata"].get("tags", [])
        before = len(shown)
        value = _run_cell("".join(cell["source"]), ns)
        new = shown[before:] + ([value] if value is not None else [])
        panels = [x for x in new if hasattr(x, "widget") and hasattr(x, "figures")]
        if "panel" in tags:
            assert len(panels) == 1, (tags, new)
            assert "⚠" not in panels[0].status, panels[0].status
        else:
            assert panels == [], (tags, new)
        loaders += [x for x in new if isinstance(x, RealModelLoader)]
        if "loader" in tags:
            assert len(loaders) == 1, (tags, new)
    assert "smollm2" not in loaded and loaders[0].demo is None  # nothing heavy at start-up
    assert list(ns["demo"].models) == ["rank 1", "rank 8", "first-token"]


def test_real_model_loader_shows_its_panels_on_click_and_errors_in_place(monkeypatch):
    """The button's callback (the real model faked by the small one: same code path)."""
    import cptoy.present
    from cptoy.present import real_model_loader

    small = cptoy.present.demo_models("code", num_prompts=2, max_chars=20_000)
    calls: list = []

    def fake(corpus, **kw):
        calls.append(corpus)
        if len(calls) == 1:
            raise RuntimeError("no GGUF file")
        return small

    monkeypatch.setattr(cptoy.present, "demo_models", fake)
    loader = real_model_loader(max_new_tokens=12)
    loader.button.click()  # fails: a message in place, the button can be pressed again
    assert "⚠" in loader.message.value and "no GGUF file" in loader.message.value
    assert not loader.button.disabled and loader.output.children == ()
    loader.button.click()
    assert calls == ["smollm2", "smollm2"]
    assert loader.button.disabled and len(loader.output.children) == 2
    explorer, stepper = loader.panels
    assert list(explorer.model_dropdown.options) == list(small.models)
    assert len(explorer.generation.tokens) == 12 and "⚠" not in explorer.status
    assert stepper.model is small.models["rank 8"] and "⚠" not in stepper.status
    assert "rank 1, rank 8, first-token" in loader.message.value
    loader.load()  # loaded once
    assert len(calls) == 2


# ---------------------------------------------------------------------- Voilà lecture mode
def _panel_cells(notebook: Path) -> int:
    """Code cells of the dashboard tagged "panel" (each displays one widget panel) or "loader"
    (the button that loads the real model)."""
    tags = [c.get("metadata", {}).get("tags", []) for c in json.loads(notebook.read_text())["cells"]]
    return sum("panel" in t or "loader" in t for t in tags)


@pytest.fixture(scope="module")
def voila(tmp_path_factory):
    """Voilà serving the lecture dashboard with the command ``make present`` runs."""
    from cptoy.present import DASHBOARD, voila_command

    tmp = tmp_path_factory.mktemp("voila")
    env = _isolated_env(tmp)
    server = _start(lambda port: voila_command(port=port), DASHBOARD.parent, env,
                    tmp / "voila.log", "/voila/static/")  # a 404 there: up, no kernel started
    server.dashboard = DASHBOARD
    try:
        yield server
    finally:
        server.stop()


@needs_browser
def test_voila_lecture_dashboard_hides_code_renders_and_responds(page, voila, artifacts):
    expected = _panel_cells(voila.dashboard)
    assert expected >= 2, "the dashboard should tag its widget cells with 'panel'"
    page.goto(voila.url + "/", wait_until="commit", timeout=SERVER_START_S * 1000)
    panels = page.locator(".jp-OutputArea-output:not(.jupyter-widgets .jp-OutputArea-output)"
                          ).filter(has=page.locator(".jupyter-widgets"))
    wait_for(lambda: panels.count() >= expected, RUN_ALL_S, f"{expected} panels in Voilà")
    page.wait_for_load_state("load", timeout=RUN_ALL_S * 1000)
    assert panels.count() == expected

    body = page.inner_text("body")
    for bad in ("Traceback", "There was an error", "Error displaying widget"):
        assert bad not in body, f"{bad!r} on the dashboard:\n{body[:2000]}"
    source = "".join("".join(c["source"]) for c in json.loads(voila.dashboard.read_text())["cells"]
                     if c["cell_type"] == "code")
    for line in (s.strip() for s in source.splitlines()):
        if len(line) > 12 and not line.startswith("#") and "<" not in line:
            assert line not in body, f"code is visible in Voilà: {line!r}"
    assert page.locator(".jp-InputArea-editor").count() == 0, "input cells are shown"

    for k in range(expected):
        node = panels.nth(k)
        where = f"voila panel {k}"
        n_fig = node.locator(".js-plotly-plot").count()
        wait_for(lambda n=node, m=n_fig: n.locator(".js-plotly-plot .main-svg").count() >= m,
                 RENDER_S, f"{where}: figures to draw")
        # every figure shows data (not the zeros it was created with)
        wait_for(lambda n=node: all(any(s > 0 for t in f for _, s in t) for f in fingerprint(n)),
                 RENDER_S, f"{where}: figures to show their data")
        node.scroll_into_view_if_needed()
        node.screenshot(path=str(artifacts / f"voila_panel{k}.png"))
        if node.locator(".widget-slider").count():
            figs = fingerprint(node)
            press_slider(page, node.locator(".widget-slider").first, "ArrowRight", where)
            wait_for(lambda n=node, f=figs: not same_figures(fingerprint(n), f), CHANGE_S,
                     f"{where}: the slider to change the figure")
            time.sleep(0.5)
            node.screenshot(path=str(artifacts / f"voila_panel{k}_moved.png"))
    page.locator("h1").first.evaluate("n => n.scrollIntoView({block: 'start'})")
    page.screenshot(path=str(artifacts / "voila_dashboard_top.png"))
    log = page.cptoy_log
    assert not log.page_errors, f"{log.page_errors}\nconsole errors: {log.console_errors}"
    bad = [t for t in server_tracebacks(voila.log_text())
           if not any(b in t for b in BENIGN_SERVER_ERRORS)]
    assert not bad, bad[0][-3000:]


@needs_browser
@pytest.mark.skipif(os.environ.get("CPTOY_TEST_REAL_MODEL") != "1",
                    reason="loads SmolLM2-135M in the browser (slow): set CPTOY_TEST_REAL_MODEL=1")
def test_voila_real_model_button_loads_its_panels(page, voila, artifacts):
    """The dashboard's button loads SmolLM2-135M and shows its two decoding panels."""
    page.goto(voila.url + "/", wait_until="commit", timeout=SERVER_START_S * 1000)
    button = page.get_by_role("button", name=re.compile("SmolLM2"))
    button.wait_for(timeout=RUN_ALL_S * 1000)
    page.wait_for_load_state("load", timeout=RUN_ALL_S * 1000)
    button.click()
    loader = page.locator(".cptoy-panel").filter(has=button)
    wait_for(lambda: loader.locator(".cptoy-panel").count() == 2, RUN_ALL_S,
             "the real model's two panels")
    wait_for(lambda: loader.locator(".js-plotly-plot .main-svg").count() >= 4, RENDER_S,
             "their four figures")
    wait_for(lambda: all(any(s > 0 for t in f for _, s in t) for f in fingerprint(loader)),
             RENDER_S, "the figures to show data")
    assert "drafters on SmolLM2-135M" in loader.inner_text()
    assert "⚠" not in loader.inner_text()
    screenshot(loader, artifacts / "voila_real_model.png")
