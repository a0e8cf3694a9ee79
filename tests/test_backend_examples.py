"""examples/backend/: the Flask, Django and FastAPI apps of docs/backend.md, run in process with
each framework's test client against a fresh ``MockServer``.

Each framework's tests skip, with a message, when that framework is not installed (they are in
the ``dev`` extra). The cache tests move an injected clock instead of sleeping.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest
from conftest import API_KEY, DEMO_EMAIL, DEMO_PASSWORD, ROOT

from spaps_client import AuthError, SpapsClient, UserProfile
from spaps_mock import ADMIN_EMAIL, ADMIN_PASSWORD, MockServer

EXAMPLES = os.path.join(ROOT, "examples", "backend")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)

import spaps_auth  # noqa: E402
from spaps_auth import AuthProblem, TokenCache, bearer_token, client_settings  # noqa: E402

TTL = 30.0
# No back-off between the client's attempts, so "SPAPS is down" answers at once.
FAST = {"retry_config": {"backoff_factor": 0}}
USER_PATH = "/api/auth/user"
CHECK_PATH = "/api/entitlements/check"
FRAMEWORKS = {"flask": ("flask",), "django": ("django",), "fastapi": ("fastapi", "httpx")}


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


Reply = Tuple[int, Dict[str, Any], Dict[str, str]]


class Api:
    """One example app behind its framework's test client."""

    def __init__(self, name: str, get: Callable[[str, Dict[str, str]], Reply],
                 clock: Clock) -> None:
        self.name, self._get, self.clock = name, get, clock

    def get(self, path: str, token: Optional[str] = None,
            authorization: Optional[str] = None) -> Reply:
        headers = {}
        if token is not None:
            headers["Authorization"] = "Bearer " + token
        if authorization is not None:
            headers["Authorization"] = authorization
        return self._get(path, headers)


def lower(headers: Any) -> Dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def require(framework: str) -> None:
    for module in FRAMEWORKS[framework]:
        try:
            importlib.import_module(module)
        except ImportError:
            pytest.skip(f"{module} is not installed: the {framework} example needs it "
                        "(pip install -e '.[dev]')")


@contextlib.contextmanager
def running(framework: str, clock: Clock, **options: Any) -> Iterator[Api]:
    """The ``framework`` example app, its cache on ``clock``, the SPAPS client built from the
    environment (``SPAPS_API_URL`` / ``SPAPS_API_KEY``) plus ``options``."""
    require(framework)
    cache = TokenCache(ttl=TTL, clock=clock)
    if framework == "flask":
        flask_app = importlib.import_module("flask_app")
        app = flask_app.create_app(cache=cache, **options)
        http = app.test_client()

        def get(path: str, headers: Dict[str, str]) -> Reply:
            answer = http.get(path, headers=headers)
            return answer.status_code, answer.get_json(), lower(answer.headers)

        try:
            yield Api(framework, get, clock)
        finally:
            app.extensions["spaps"].client.close()
    elif framework == "django":
        django_app = importlib.import_module("django_app")
        from django.test import Client

        django_app.start_spaps(cache=cache, **options)
        http = Client()

        def get(path: str, headers: Dict[str, str]) -> Reply:
            extra = {"HTTP_" + name.upper().replace("-", "_"): value
                     for name, value in headers.items()}
            answer = http.get(path, **extra)
            return answer.status_code, answer.json(), lower(answer.headers)

        try:
            yield Api(framework, get, clock)
        finally:
            django_app.stop_spaps()
    else:
        fastapi_app = importlib.import_module("fastapi_app")
        from fastapi.testclient import TestClient

        with TestClient(fastapi_app.create_app(cache=cache, **options)) as http:
            def get(path: str, headers: Dict[str, str]) -> Reply:
                answer = http.get(path, headers=headers)
                return answer.status_code, answer.json(), lower(answer.headers)

            yield Api(framework, get, clock)


@pytest.fixture
def spaps_env(server: MockServer, monkeypatch: pytest.MonkeyPatch) -> MockServer:
    """The backend's environment points at ``server``, as in production at SPAPS."""
    monkeypatch.setenv("SPAPS_API_URL", server.url)
    monkeypatch.setenv("SPAPS_API_KEY", API_KEY)
    return server


@pytest.fixture(params=sorted(FRAMEWORKS))
def api(request: pytest.FixtureRequest, spaps_env: MockServer) -> Iterator[Api]:
    with running(request.param, Clock(), **FAST) as app:
        yield app


def caller_token(server: MockServer, email: str = DEMO_EMAIL,
                 password: str = DEMO_PASSWORD) -> Tuple[str, str]:
    """(access token, user id) of a user signed in elsewhere, e.g. in your front end."""
    with SpapsClient(base_url=server.url, api_key=API_KEY) as front_end:
        pair = front_end.auth.sign_in_with_password(email=email, password=password)
        return pair.access_token, pair.user.user_id


def grant_pro(server: MockServer, user_id: str) -> None:
    with SpapsClient(base_url=server.url, api_key=API_KEY) as admin:
        admin.auth.sign_in_with_password(email=ADMIN_EMAIL, password=ADMIN_PASSWORD)
        admin.entitlements.grant_manual(entitlement_key="pro", beneficiary_user_id=user_id,
                                        reason="backend example tests")


# --------------------------------------------------------------------------------------------
# the three apps
# --------------------------------------------------------------------------------------------


def test_no_token_is_401(api: Api, spaps_env: MockServer) -> None:
    for path in ("/api/me", "/api/reports"):
        status, body, headers = api.get(path)
        assert (status, body) == (401, {"error": "Missing bearer token"})
        assert headers["www-authenticate"].startswith("Bearer")
    for header in ("Basic ZGVtbzpkZW1v", "Bearer", "Bearer   ", "bearer a b"):
        assert api.get("/api/me", authorization=header)[0] == 401, header
    assert spaps_env.request_count("GET", USER_PATH) == 0  # refused without asking SPAPS


def test_bad_token_is_401_with_our_message(api: Api, spaps_env: MockServer) -> None:
    status, body, headers = api.get("/api/me", token="not-a-real-token")
    assert (status, body) == (401, {"error": "Invalid or expired token"})
    assert "www-authenticate" in headers
    assert api.get("/api/reports", token="x.y.z")[0] == 401
    assert spaps_env.request_count("GET", CHECK_PATH) == 0


def test_valid_token_is_200_with_the_user(api: Api, spaps_env: MockServer) -> None:
    token, user_id = caller_token(spaps_env)
    status, body, _ = api.get("/api/me", token=token)
    assert (status, body) == (200, {"id": user_id, "email": DEMO_EMAIL})
    # The backend sent the caller's token and its own secret key.
    sent = [r for r in spaps_env.requests if r.path == USER_PATH][-1]
    headers = {name.lower(): value for name, value in sent.headers.items()}
    assert headers["authorization"] == "Bearer " + token
    assert headers["x-api-key"] == API_KEY


def test_entitlement_gates_the_endpoint(api: Api, spaps_env: MockServer) -> None:
    token, user_id = caller_token(spaps_env)
    status, body, _ = api.get("/api/reports", token=token)
    assert (status, body) == (403, {"error": "This endpoint needs the 'pro' entitlement"})

    grant_pro(spaps_env, user_id)
    status, body, _ = api.get("/api/reports", token=token)
    assert status == 200
    assert body["user"] == user_id and body["reports"]
    # Entitlements are asked every time (a grant or revoke shows at once); the token is not.
    assert spaps_env.request_count("GET", CHECK_PATH) == 2
    assert spaps_env.request_count("GET", USER_PATH) == 1


def test_spaps_down_is_503_and_cached_callers_carry_on(api: Api, spaps_env: MockServer) -> None:
    token, _ = caller_token(spaps_env)
    other, _ = caller_token(spaps_env, ADMIN_EMAIL, ADMIN_PASSWORD)
    assert api.get("/api/me", token=token)[0] == 200

    spaps_env.stop()  # the port closes: connections are refused

    status, body, _ = api.get("/api/me", token=other)
    assert (status, body) == (503, {"error": "Authentication service unavailable, try again "
                                             "later"})
    assert api.get("/api/me", token=token)[0] == 200  # validated 1 s ago: from the cache
    assert api.get("/api/reports", token=token)[0] == 503  # entitlements need SPAPS
    api.clock.advance(TTL + 1)
    assert api.get("/api/me", token=token)[0] == 503


def test_spaps_errors_are_503_without_their_text(api: Api, spaps_env: MockServer) -> None:
    token, _ = caller_token(spaps_env)
    outage = {"status": 503, "message": "db pool exhausted"}
    spaps_env.inject("GET", USER_PATH, outage, outage, {**outage, "retry_after": 2})
    status, body, headers = api.get("/api/me", token=token)
    assert (status, body) == (503, {"error": "Authentication service unavailable, try again "
                                             "later"})
    assert headers["retry-after"] == "2"


def test_unexpected_spaps_answers_are_502_and_leak_nothing(
    api: Api, spaps_env: MockServer, caplog: pytest.LogCaptureFixture
) -> None:
    token, _ = caller_token(spaps_env)
    spaps_env.inject("GET", USER_PATH, {"status": 400, "code": "WEIRD",
                                        "message": f"cannot parse token {token}"})
    with caplog.at_level(logging.WARNING, logger="spaps_auth"):
        status, body, _ = api.get("/api/me", token=token)
    assert (status, body) == (502, {"error": "Authentication service error"})
    assert "WEIRD" in caplog.text  # your log knows what happened...
    assert token not in caplog.text  # ...and the client scrubbed the token out of it


def test_second_request_within_ttl_is_served_from_the_cache(
    api: Api, spaps_env: MockServer
) -> None:
    token, _ = caller_token(spaps_env)
    for _ in range(3):
        assert api.get("/api/me", token=token)[0] == 200
        api.clock.advance(TTL / 4)
    assert spaps_env.request_count("GET", USER_PATH) == 1

    api.clock.advance(TTL)
    assert api.get("/api/me", token=token)[0] == 200
    assert spaps_env.request_count("GET", USER_PATH) == 2


def test_revoked_token_is_401_once_the_cache_entry_expires(
    api: Api, spaps_env: MockServer
) -> None:
    with SpapsClient(base_url=spaps_env.url, api_key=API_KEY) as front_end:
        token = front_end.auth.sign_in_with_password(email=DEMO_EMAIL,
                                                     password=DEMO_PASSWORD).access_token
        assert api.get("/api/me", token=token)[0] == 200
        front_end.auth.logout(access_token=token)

    # The trade-off of the cache: for at most TTL seconds the revoked token still works here.
    api.clock.advance(TTL - 1)
    assert api.get("/api/me", token=token)[0] == 200
    api.clock.advance(2)
    assert api.get("/api/me", token=token)[0] == 401
    assert api.get("/api/me", token=token)[0] == 401  # and is not cached as valid again


@pytest.mark.parametrize("framework", sorted(FRAMEWORKS))
def test_a_wrong_api_key_of_the_backend_is_502_not_the_callers_fault(
    framework: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with MockServer(api_key="the-right-key") as strict:
        with SpapsClient(base_url=strict.url, api_key="the-right-key") as front_end:
            token = front_end.auth.sign_in_with_password(email=DEMO_EMAIL,
                                                         password=DEMO_PASSWORD).access_token
        monkeypatch.setenv("SPAPS_API_URL", strict.url)
        monkeypatch.setenv("SPAPS_API_KEY", "a-wrong-key")  # SPAPS: 401 INVALID_APPLICATION
        with running(framework, Clock(), **FAST) as app:
            assert app.get("/api/me", token=token)[0] == 502


def test_the_apps_need_the_api_key_from_the_environment(
    server: MockServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPAPS_API_URL", server.url)
    with pytest.raises(RuntimeError, match="SPAPS_API_KEY"):
        client_settings()
    monkeypatch.setenv("SPAPS_API_KEY", API_KEY)
    assert client_settings()["api_key"] == API_KEY
    assert client_settings(api_key="explicit")["api_key"] == "explicit"


# --------------------------------------------------------------------------------------------
# spaps_auth on its own (no framework needed)
# --------------------------------------------------------------------------------------------


def user(user_id: str = "u1") -> UserProfile:
    return UserProfile(id=user_id, email=f"{user_id}@example.com")


def test_cache_expires_entries_after_the_ttl() -> None:
    clock = Clock()
    cache = TokenCache(ttl=10, clock=clock)
    cache.put("token-a", user())
    clock.advance(9.9)
    assert cache.get("token-a") is not None
    clock.advance(0.1)
    assert cache.get("token-a") is None
    assert len(cache) == 0


def test_cache_is_bounded_and_evicts_the_oldest() -> None:
    cache = TokenCache(ttl=10, max_entries=3, clock=Clock())
    for name in "abcd":
        cache.put("token-" + name, user(name))
    assert len(cache) == 3
    assert cache.get("token-a") is None
    assert [cache.get("token-" + name).id for name in "bcd"] == ["b", "c", "d"]


def test_cache_keys_are_digests_never_tokens() -> None:
    cache = TokenCache(clock=Clock())
    cache.put("secret-token-value", user())
    keys = list(cache._entries)
    assert keys == [spaps_auth.fingerprint("secret-token-value")]
    assert re.fullmatch(r"[0-9a-f]{64}", keys[0])
    cache.invalidate("secret-token-value")
    assert cache.get("secret-token-value") is None


def test_cache_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError):
        TokenCache(ttl=0)
    with pytest.raises(ValueError):
        TokenCache(max_entries=0)


def test_a_401_about_the_callers_token_drops_its_cache_entry(server: MockServer) -> None:
    with SpapsClient(base_url=server.url, api_key=API_KEY) as client:
        guard = spaps_auth.SpapsGuard(client, TokenCache(clock=Clock()))
        token, _ = caller_token(server)
        assert guard.authenticate("Bearer " + token).email == DEMO_EMAIL
        assert len(guard.cache) == 1
        # Your own SPAPS call on the caller's behalf is refused: forget the validation.
        server.inject("GET", USER_PATH, {"status": 401, "code": "INVALID_TOKEN"})
        with pytest.raises(AuthError) as refused:
            client.auth.get_current_user(access_token=token)
        problem = spaps_auth.problem_from(refused.value, caller_token=token, cache=guard.cache)
        assert problem.status == 401
        assert len(guard.cache) == 0


@pytest.mark.parametrize("header, token", [
    ("Bearer abc.def.ghi", "abc.def.ghi"), ("bearer  abc ", "abc"), ("BEARER abc", "abc"),
])
def test_bearer_token_parsing(header: str, token: str) -> None:
    assert bearer_token(header) == token


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", "Token abc", "Bearer a b",
                                    "Bearer " + "x" * 9000])
def test_bearer_token_refusals(header: Optional[str]) -> None:
    with pytest.raises(AuthProblem) as caught:
        bearer_token(header)
    assert caught.value.status == 401


# --------------------------------------------------------------------------------------------
# docs/backend.md shows excerpts of these files: they must not drift apart
# --------------------------------------------------------------------------------------------

_EXCERPT = re.compile(r"^# (examples/backend/\w+\.py)\n")


def doc_excerpts() -> List[Tuple[str, str]]:
    from test_readme import extract_blocks

    text = (Path(ROOT) / "docs" / "backend.md").read_text(encoding="utf-8")
    found = []
    for _, code, _ in extract_blocks(text):
        named = _EXCERPT.match(code)
        if named:
            found.append((named.group(1), code[named.end():]))
    return found


def test_docs_backend_excerpts_match_the_example_files() -> None:
    excerpts = doc_excerpts()
    assert {name for name, _ in excerpts} >= {
        "examples/backend/spaps_auth.py", "examples/backend/flask_app.py",
        "examples/backend/django_app.py", "examples/backend/fastapi_app.py"}
    for name, code in excerpts:
        source = (Path(ROOT) / name).read_text(encoding="utf-8")
        for part in code.split("\n# ...\n"):
            assert part.strip("\n") in source, f"docs/backend.md's {name} drifted:\n{part}"
