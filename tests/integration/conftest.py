"""Fixtures of the integration suite: every test talks to a REAL SPAPS server.

Where the server is comes from ``tests/realserver.py`` (read once at import, because the autouse
fixture of ``tests/conftest.py`` hides ``SPAPS_*`` variables from the tests themselves). Without a
configured server every test here is skipped with ``realserver.SKIP_REASON``.

Each flow is written once, as ``async def flow(c)``, and run twice by the ``flavor`` fixture:

* ``sync``: ``c.client()`` builds a ``SpapsClient``; ``await c(value)`` just hands the value back,
  and the coroutine is driven to its end with one ``send(None)``: no event loop is involved, the
  sync client is exercised exactly as a sync program would call it;
* ``async``: ``c.client()`` builds an ``AsyncSpapsClient``; ``await c(coro)`` awaits the coroutine,
  and the flow runs under ``asyncio.run``.

So ``await c(spaps.auth.sign_in_with_password(...))`` means "call it the way this flavour calls it".

Set-up the client has no method for (admin memberships, entitlement grants, reading the
"e-mailed" magic link, revoking only an access token) goes through ``raw``: plain stdlib HTTP
(``urllib``) and ``psql``, never through the client under test and never by patching anything.

SPAPS 0.6.6 commits a request's database work only after it has sent the reply, so a request
sent at once may not see it yet (under load: a login right after a registration fails with 401
INVALID_CREDENTIALS). Set-up steps therefore wait, in bounded loops, until their effect shows
(``RawApi.wait_*``, ``Flavor.sign_in``) before the flow under test goes on.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Optional

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
ROOT = os.path.dirname(TESTS)
for _path in (ROOT, TESTS, HERE):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from _realsupport import Flavor, NewUser, RawApi, Recorded, secret_fragments  # noqa: E402
from realserver import RealServer, require_real_server  # noqa: E402


@pytest.fixture(scope="session")
def real() -> RealServer:
    """The configured real server (the test is skipped when there is none)."""
    return require_real_server()


@pytest.fixture(scope="session")
def raw(real: RealServer) -> RawApi:
    return RawApi(real)


@pytest.fixture(params=["sync", "async"])
def flavor(request: pytest.FixtureRequest, real: RealServer) -> Flavor:
    return Flavor(request.param, real)


@pytest.fixture
def user(raw: RawApi) -> NewUser:
    """A freshly registered user (not signed in on any client)."""
    return raw.register_user()


@pytest.fixture
def assert_no_secrets() -> Callable[..., None]:
    def check(exc: BaseException, *secrets: Optional[str]) -> None:
        shown = str(exc) + "\n" + repr(exc)
        for fragment in secret_fragments(*secrets):
            assert fragment not in shown, f"a secret leaked into the error: {shown[:300]!r}"
    return check


@pytest.fixture
def recorded() -> Recorded:
    return Recorded()
