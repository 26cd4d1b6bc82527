"""Every ```python block of README.md and docs/*.md runs as written.

Each block is executed on its own, in a fresh namespace, with the working directory set to a
temporary folder (blocks may write files), as if a user had copied it into a file and run it.
"""
from __future__ import annotations

import signal
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TIMEOUT_S = 60  # per block: a safety net, each block runs in a few seconds


def python_blocks(path: Path) -> list:
    """(line of the opening fence (1-based), code) of each ```python block."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = lines[i].strip()
        if fence.startswith("```"):
            language = fence[3:].strip()
            end = i + 1
            while end < len(lines) and lines[end].strip() != "```":
                end += 1
            if end == len(lines):
                raise ValueError(f"{path.name}:{i + 1}: unclosed code fence")
            if language == "python":
                blocks.append((i + 1, "\n".join(lines[i + 1:end]) + "\n"))
            i = end + 1
        else:
            i += 1
    return blocks


CASES = [pytest.param(path, line, code, id=f"{path.relative_to(ROOT).as_posix()}:{line}")
         for path in DOCUMENTS for line, code in python_blocks(path)]


def test_blocks_found():
    assert len(CASES) >= 5, "the documentation should have runnable examples"


@pytest.mark.parametrize("path, line, code", CASES)
def test_python_block(path, line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = f"{path.relative_to(ROOT).as_posix()}:{line}"
    # Padded so that tracebacks give the line numbers of the Markdown file itself.
    compiled = compile("\n" * line + code, str(path), "exec")
    use_alarm = threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGALRM")
    if use_alarm:
        def _timeout(signum, frame):
            raise TimeoutError(f"{name} ran longer than {TIMEOUT_S} s")
        previous = signal.signal(signal.SIGALRM, _timeout)
        signal.alarm(TIMEOUT_S)
    try:
        exec(compiled, {"__name__": "__main__"})
    finally:
        if use_alarm:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
