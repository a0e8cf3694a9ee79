"""Shared fixtures: every test talks real HTTP over loopback to a fresh ``spaps_mock``."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import sys
import threading
import urllib.request
import uuid
from typing import Dict, Iterator, List, Optional

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from spaps_client import SpapsClient  # noqa: E402
from spaps_mock import ADMIN_EMAIL, ADMIN_PASSWORD, MockServer, RecordedRequest  # noqa: E402

DEMO_EMAIL = "demo@example.com"
DEMO_PASSWORD = "demo-password"
API_KEY = "test_key_for_tests"


_STOPPERS: List[threading.Thread] = []


@contextlib.contextmanager
def quick_server() -> Iterator[MockServer]:
    """A fresh emulator whose shutdown (about 50 ms of polling) runs while later tests do.

    Each test still gets its own server on its own port; a bounded number of finished servers
    may be winding down in the background at any time.
    """
    _STOPPERS[:] = [stopper for stopper in _STOPPERS if stopper.is_alive()]
    while len(_STOPPERS) >= 16:
        _STOPPERS.pop(0).join(timeout=5)
    mock = MockServer().start()
    try:
        yield mock
    finally:
        stopper = threading.Thread(target=mock.stop, name="spaps_mock-stop", daemon=True)
        stopper.start()
        _STOPPERS.append(stopper)


@pytest.fixture
def server() -> Iterator[MockServer]:
    """A fresh emulator on a free loopback port; its shutdown overlaps the next test."""
    with quick_server() as mock:
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


@pytest.fixture
def admin(server: MockServer) -> Iterator[SpapsClient]:
    """A client signed in as the emulator's seeded admin (whitelist writes, grants)."""
    with SpapsClient(base_url=server.url, api_key=API_KEY) as spaps:
        spaps.auth.sign_in_with_password(email=ADMIN_EMAIL, password=ADMIN_PASSWORD)
        yield spaps


def grant_usage(server: MockServer, user_id: str, feature: str = "api_calls",
                limits: Optional[Dict[str, float]] = None) -> None:
    """Entitle ``user_id`` to ``feature`` as an admin does (SPAPS meters only entitled users)."""
    with SpapsClient(base_url=server.url, api_key=API_KEY) as spaps:
        spaps.auth.sign_in_with_password(email=ADMIN_EMAIL, password=ADMIN_PASSWORD)
        tokens = spaps.get_tokens()
        assert tokens is not None
        body = json.dumps({
            "beneficiary_user_id": user_id, "entitlement_key": feature, "reason": "tests",
            "metadata": {"usage_features": [feature],
                         "usage_limits": limits or {"requests": 1000}},
        }).encode()
        request = urllib.request.Request(
            server.url + "/api/entitlements/manual", data=body, method="POST",
            headers={"X-API-Key": API_KEY, "Authorization": "Bearer " + tokens.access_token,
                     "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status in (200, 201)


def is_uuid(value: object) -> bool:
    """Whether ``value`` reads as a UUID (the ids SPAPS hands out)."""
    try:
        uuid.UUID(str(value))
    except ValueError:
        return False
    return True


def only(server: MockServer, method: str, path: str) -> RecordedRequest:
    """The single recorded request for ``method path`` (fails if there are none or several)."""
    matches = [r for r in server.requests if r.method == method and r.path == path]
    assert len(matches) == 1, f"expected one {method} {path}, got {len(matches)}"
    return matches[0]


def subject_of(access_token: str) -> str:
    """The user id (``sub``) an access token was issued to, read without a request."""
    payload = access_token.split(".")[1]
    return str(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["sub"])


def user_id_of(client: SpapsClient) -> str:
    """The signed-in user's id, read from the access token without a request."""
    tokens = client.get_tokens()
    assert tokens is not None
    return subject_of(tokens.access_token)


@pytest.fixture
def entitled(server: MockServer, signed_in: SpapsClient) -> SpapsClient:
    """``signed_in`` after an admin entitled the demo user to ``api_calls`` (1000 requests)."""
    grant_usage(server, user_id_of(signed_in))
    return signed_in


@pytest.fixture(autouse=True)
def _no_spaps_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests must not depend on the developer's SPAPS_* variables or proxies."""
    for name in list(os.environ):
        if name.startswith("SPAPS_") or name.lower().endswith("_proxy"):
            monkeypatch.delenv(name, raising=False)
