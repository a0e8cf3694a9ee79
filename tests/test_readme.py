"""Every ```python block of README.md and docs/*.md runs against the emulator.

A block immediately preceded by the HTML comment ``<!-- requires-real-spaps -->`` is skipped.
Each block runs in its own interpreter (a fresh namespace) with ``SPAPS_API_URL`` pointing at a
fresh ``MockServer`` and ``SPAPS_API_KEY`` set, from a scratch working directory.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import pytest
from conftest import API_KEY, ROOT

from spaps_mock import MockServer

SKIP_MARKER = "<!-- requires-real-spaps -->"
_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([^\s`]*)")


def extract_blocks(text: str) -> List[Tuple[int, str, bool]]:
    """``(line number, code, skipped)`` for each fenced python block of a Markdown text."""
    blocks: List[Tuple[int, str, bool]] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        indent, fence, language = opening.groups()
        start = index
        body: List[str] = []
        index += 1
        while index < len(lines):
            closing = _FENCE.match(lines[index])
            if closing and closing.group(2).startswith(fence) and not closing.group(3):
                break
            line = lines[index]
            body.append(line[len(indent):] if line.startswith(indent) else line)
            index += 1
        index += 1
        if language.lower() in ("python", "py", "python3"):
            previous = [line.strip() for line in lines[:start] if line.strip()]
            skipped = bool(previous) and previous[-1] == SKIP_MARKER
            blocks.append((start + 1, "\n".join(body) + "\n", skipped))
    return blocks


# Blocks that fail because of a known bug in spaps_client.py: (document, a line of the block,
# reason). Each becomes a strict xfail, so the fix shows up as XPASS and the entry goes.
KNOWN_BUGS: List[Tuple[str, str, str]] = []


def documents() -> List[Path]:
    paths = [Path(ROOT) / "README.md"]
    paths += sorted(Path(p) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
    return [path for path in paths if path.is_file()]


def collect() -> List[object]:
    params: List[object] = []
    for path in documents():
        relative = path.relative_to(ROOT).as_posix()
        for line, code, skipped in extract_blocks(path.read_text(encoding="utf-8")):
            marks = [pytest.mark.skip(reason=SKIP_MARKER)] if skipped else []
            marks += [
                pytest.mark.xfail(strict=True, reason=reason)
                for document, line_of_block, reason in KNOWN_BUGS
                if document == relative and line_of_block in code
            ]
            params.append(pytest.param(code, id=f"{relative}:{line}", marks=marks))
    return params


BLOCKS = collect()


@pytest.mark.parametrize("code", BLOCKS)
def test_documented_block_runs_against_the_emulator(
    code: str, server: MockServer, tmp_path: Path
) -> None:
    environment = {
        name: value for name, value in os.environ.items()
        if not name.startswith("SPAPS_") and not name.lower().endswith("_proxy")
    }
    environment.update({
        "SPAPS_API_URL": server.url,
        "SPAPS_API_KEY": API_KEY,
        "PYTHONPATH": os.pathsep.join(
            [ROOT, *filter(None, [environment.get("PYTHONPATH")])]
        ),
        "PYTHONIOENCODING": "utf-8",
    })
    script = tmp_path / "block.py"
    script.write_text(code, encoding="utf-8")

    run = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=environment, capture_output=True,
        text=True, timeout=60, stdin=subprocess.DEVNULL, check=False,
    )

    assert run.returncode == 0, f"block failed:\n{code}\n--- stderr ---\n{run.stderr}"


def test_readme_quickstart_is_collected() -> None:
    readme = (Path(ROOT) / "README.md").read_text(encoding="utf-8")
    blocks = extract_blocks(readme)
    assert blocks, "README.md has no python blocks"
    assert any("SpapsClient" in code and not skipped for _, code, skipped in blocks)


def test_extractor_honours_the_skip_marker_and_fences() -> None:
    text = "\n".join([
        "Intro", "", "```python", "print('one')", "```", "",
        SKIP_MARKER, "", "```python", "raise SystemExit('real SPAPS only')", "```",
        "<!-- requires-real-spaps -->", "Some prose in between.", "```py", "x = 1", "```",
        "```bash", "echo no", "```",
        "  ```python", "  if True:", "      print('indented')", "  ```",
    ])

    blocks = extract_blocks(text)

    assert [(code, skipped) for _, code, skipped in blocks] == [
        ("print('one')\n", False),
        ("raise SystemExit('real SPAPS only')\n", True),
        ("x = 1\n", False),
        ("if True:\n    print('indented')\n", False),
    ]
    assert [line for line, _, _ in blocks] == [3, 9, 14, 20]
