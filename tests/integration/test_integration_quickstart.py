"""The README quickstart and examples/quickstart.py run unchanged against a real SPAPS.

Each runs in its own interpreter with nothing but the variables the README names
(``SPAPS_API_URL``, ``SPAPS_API_KEY``, ``SPAPS_EMAIL``, ``SPAPS_PASSWORD``), for a freshly
registered account: no price, no entitlement, so checkout and usage show their typed errors.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import Dict

import pytest
from _realsupport import NewUser
from conftest import ROOT
from realserver import RealServer

pytestmark = pytest.mark.realserver

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def readme_env(real: RealServer, user: NewUser) -> Dict[str, str]:
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("SPAPS_") and not name.lower().endswith("_proxy")}
    env.update(SPAPS_API_URL=real.url, SPAPS_API_KEY=real.api_key, SPAPS_EMAIL=user.email,
               SPAPS_PASSWORD=user.password, PYTHONPATH=ROOT)
    return env


def readme_quickstart() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        text = handle.read()
    section = text.split("## Quickstart", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "README has no Quickstart code block"
    return match.group(1)


def test_readme_quickstart_runs_unchanged(real: RealServer, user: NewUser) -> None:
    done = subprocess.run([sys.executable, "-c", readme_quickstart()], cwd=ROOT,
                          env=readme_env(real, user), capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert re.search(rf"^session: {UUID} expires \d{{4}}-", out, re.M), out
    assert re.search(r"^sessions: \d+$", out, re.M), out
    assert "health: ok" in out
    assert re.search(rf"^invoice: {UUID} pending$", out, re.M), out
    # A fresh account on a server without Stripe prices or entitlements: typed errors.
    assert re.search(r"^no checkout: (PRICE_NOT_FOUND|VALIDATION_ERROR) ", out, re.M), out
    assert re.search(r"^not metered: USAGE_ENTITLEMENT_REQUIRED ", out, re.M), out
    assert user.password not in out + done.stderr


def test_example_quickstart_runs_against_the_real_server(real: RealServer,
                                                         user: NewUser) -> None:
    env = readme_env(real, user)
    env["SPAPS_QUICKSTART_WRITE"] = "1"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "quickstart.py")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for flavour in ("sync", "async"):
        assert re.search(rf"^\[{flavour}\] signed in; session id: {UUID}$", out, re.M), out
        assert f"[{flavour}] health: ok" in out
    assert re.search(rf"^\[sync\] crypto invoice: {UUID} \(pending\)$", out, re.M), out
    assert "[sync] no checkout: " in out and "[sync] usage not recorded: " in out
