"""Where the integration and fidelity suites find a real SPAPS, if one is configured.

A real SPAPS is described by environment variables, read once at import (the autouse fixture in
``conftest.py`` hides every ``SPAPS_*`` variable from the tests themselves):

``SPAPS_TEST_URL``, ``SPAPS_TEST_API_KEY``
    the server and a secret application key (required);
``SPAPS_TEST_ADMIN_EMAIL``, ``SPAPS_TEST_ADMIN_PASSWORD``
    an admin account (whitelist writes, memberships, entitlement grants need one);
``SPAPS_TEST_DATABASE_URL``
    optional: a ``psql`` URL of the server's database, to read what the server "e-mails"
    (magic-link and reset tokens) on a deployment that sends no real e-mail.

``SPAPS_TEST_ENV_FILE`` may instead name the ``KEY=VALUE`` file that
``../shared/realserver/start.sh`` writes (``SPAPS_API_URL``, ``SPAPS_API_KEY``,
``SPAPS_ADMIN_EMAIL``, ``SPAPS_ADMIN_PASSWORD``, ``SPAPS_RS_DB``); explicit variables win.

The fleet tests (several hosts sharing one identity) need a server that does not bind refresh
tokens to the client that obtained them (SPAPS 0.6.6 does by default; started with
``REFRESH_ANOMALY_ENFORCEMENT_ENABLED=false`` it does not). ``SPAPS_TEST_FLEET_URL`` and the
rest of the ``SPAPS_TEST_FLEET_*`` variables, or ``SPAPS_TEST_FLEET_ENV_FILE``, name one; without
them the fleet tests use the server above.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from typing import Dict, Optional

import pytest

SKIP_REASON = (
    "no real SPAPS configured: set SPAPS_TEST_URL and SPAPS_TEST_API_KEY (or SPAPS_TEST_ENV_FILE "
    "to the .env file ../shared/realserver/start.sh writes); see docs/testing.md"
)


@dataclass(frozen=True)
class RealServer:
    """A real SPAPS the suites may talk to."""

    url: str
    api_key: str
    admin_email: Optional[str]
    admin_password: Optional[str]
    database_url: Optional[str]


def _env_file(path: str) -> Dict[str, str]:
    values: Dict[str, str] = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            name, sep, value = line.strip().partition("=")
            if sep and not name.startswith("#"):
                parts = shlex.split(value)
                values[name] = parts[0] if parts else ""
    return values


def _configured(prefix: str) -> Optional[RealServer]:
    env = os.environ
    from_file: Dict[str, str] = {}
    if env.get(prefix + "ENV_FILE"):
        from_file = _env_file(env[prefix + "ENV_FILE"])

    def pick(own: str, in_file: str) -> Optional[str]:
        return env.get(prefix + own) or from_file.get(in_file) or None

    url = pick("URL", "SPAPS_API_URL")
    api_key = pick("API_KEY", "SPAPS_API_KEY")
    if not url or not api_key:
        return None
    return RealServer(
        url=url.rstrip("/"),
        api_key=api_key,
        admin_email=pick("ADMIN_EMAIL", "SPAPS_ADMIN_EMAIL"),
        admin_password=pick("ADMIN_PASSWORD", "SPAPS_ADMIN_PASSWORD"),
        database_url=pick("DATABASE_URL", "SPAPS_RS_DB"),
    )


CONFIGURED: Optional[RealServer] = _configured("SPAPS_TEST_")
FLEET_CONFIGURED: Optional[RealServer] = _configured("SPAPS_TEST_FLEET_") or CONFIGURED


def require_real_server(*, fleet: bool = False) -> RealServer:
    """The configured real SPAPS (``fleet``: the one for the fleet tests); skips the calling
    test with a clear message when none is."""
    server = FLEET_CONFIGURED if fleet else CONFIGURED
    if server is None:
        pytest.skip(SKIP_REASON)
    return server
