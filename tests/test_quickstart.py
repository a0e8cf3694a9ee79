"""``python examples/quickstart.py`` works on a machine with nothing but Python."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "examples", "quickstart.py")


@pytest.mark.slow
def test_quickstart_runs_against_the_embedded_emulator() -> None:
    env = {
        name: value for name, value in os.environ.items()
        if not name.startswith("SPAPS_") and not name.lower().endswith("_proxy")
        and name not in ("PYTHONPATH", "PYTHONHOME")
    }
    done = subprocess.run([sys.executable, QUICKSTART], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "Traceback" not in done.stderr
    for flavour in ("sync", "async"):
        match = re.search(rf"^\[{flavour}\] signed in; session id: ([\w-]+)$", out, re.M)
        assert match, out
        assert re.search(rf"^\[{flavour}\] health: ok$", out, re.M), out
        assert re.search(rf"^\[{flavour}\] sessions: \d+$", out, re.M), out
    ids = re.findall(r"session id: ([\w-]+)", out)
    assert len(ids) == 2 and ids[0] != ids[1]  # two sign-ins, two sessions


@pytest.mark.slow
def test_quickstart_runs_from_another_directory(tmp_path: object) -> None:
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("SPAPS_") and not name.lower().endswith("_proxy")}
    done = subprocess.run([sys.executable, "-I", QUICKSTART], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "[async] health: ok" in done.stdout
