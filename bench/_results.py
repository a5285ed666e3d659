"""Shared by the bench scripts: replace one section of bench/RESULTS.md, keep the others."""

from __future__ import annotations

from pathlib import Path


def write_section(path: Path, heading: str, text: str) -> None:
    """Replace the section that starts at the line ``heading`` (up to the next ``## `` heading)
    with ``text``, or append ``text`` when the section is not there yet."""
    old = path.read_text() if path.exists() else "# cptoy benchmark results\n"
    lines = old.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.strip() == heading), None)
    if start is None:
        new = old.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n"
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
                   len(lines))
        before = "\n".join(lines[:start]).rstrip("\n")
        after = "\n".join(lines[end:])
        new = (before + "\n\n" if before else "") + text.rstrip("\n") + ("\n\n" + after if after else "")
    path.write_text(new.rstrip("\n") + "\n")
