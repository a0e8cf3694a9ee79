"""Shared fixtures: every test talks real HTTP over loopback to a fresh ``spaps_mock``."""

from __future__ import annotations

import os
import sys
from typing import Iterator

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from spaps_client import SpapsClient  # noqa: E402
from spaps_mock import MockServer  # noqa: E402

DEMO_EMAIL = "demo@example.com"
DEMO_PASSWORD = "demo-password"
API_KEY = "test_key_for_tests"


@pytest.fixture
def server() -> Iterator[MockServer]:
    """A fresh emulator on a free loopback port."""
    with MockServer() as mock:
        yield mock


@pytest.fixture
def client(server: MockServer) -> Iterator[SpapsClient]:
    """A client pointed at ``server`` with no tokens yet."""
    with SpapsClient(base_url=server.url, api_key=API_KEY) as spaps:
        yield spaps


@pytest.fixture
def signed_in(client: SpapsClient) -> SpapsClient:
    """``client`` after signing in as the emulator's demo user."""
    client.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
    return client


@pytest.fixture(autouse=True)
def _no_spaps_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests must not depend on the developer's SPAPS_* variables or proxies."""
    for name in list(os.environ):
        if name.startswith("SPAPS_") or name.lower().endswith("_proxy"):
            monkeypatch.delenv(name, raising=False)
