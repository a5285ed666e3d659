"""bench/smollm2_heads.py --quick: every shipped SmolLM2 drafter, the packed verifier and the
2-draft rows, one short smoke run (about 1-2 min on 2 cores), without int8 and without writing.

What it checks is behaviour, not speed: every lossless method's greedy output equals AR's on
the smoke prompts (the packed 4-token verify included), and the report has the rows and tables
the full run writes to bench/RESULTS.md.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cptoy import pretrained

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                    reason="needs the [hf] extra (transformers' prompt lookup is a row)")
def test_bench_smollm2_heads_quick_is_lossless_and_reports_every_drafter():
    p = subprocess.run([sys.executable, "bench/smollm2_heads.py", "--quick", "--no-write",
                        "--no-int8"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout
    assert out.startswith("## Drafting heads on SmolLM2-135M")
    for heading in ("### Targets", "### Decoding", "### Drafting and verification cost",
                    "### Teacher-forced acceptance"):
        assert heading in out
    lossless = next(ln for ln in out.splitlines() if ln.startswith("- Lossless check"))
    counts = re.findall(r"([\w ,=-]+?) (\d+)/(\d+)", lossless.split(": ", 1)[1])
    labels = {label.strip("; ") for label, _, _ in counts}
    for family in ("CP rank 1", "CP rank 8", "first-token heads", "draft block"):
        assert f"self-spec, {family}, K=8192" in labels
    assert {"self-spec, first-token heads, 2 drafts, K=8192",
            "self-spec, draft block, 2 drafts, K=8192", "transformers prompt lookup"} <= labels
    for label, equal, total in counts:
        assert equal == total and int(total) > 0, f"{label}: {equal}/{total} equal to AR"
    packed = "| packed for 4 tokens |" in out
    assert packed == pretrained.can_pack()
