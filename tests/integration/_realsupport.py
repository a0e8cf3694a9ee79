"""Helpers of the integration suite (see conftest.py): raw set-up HTTP, the sync/async runner."""

from __future__ import annotations

import asyncio
import inspect
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Dict, List, Optional, Tuple

import pytest
from realserver import RealServer

import spaps_client

# -----------------------------------------------------------------------------
# raw stdlib HTTP, for set-up only
# -----------------------------------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        return None  # show 3xx as they are


_OPENER = urllib.request.build_opener(_NoRedirect)


@dataclass
class NewUser:
    """A user registered through raw HTTP for a test's set-up."""

    email: str
    password: str
    id: str
    access_token: str
    refresh_token: str


def wait_until(condition: Callable[[], bool], what: str, *, attempts: int = 50,
               delay: float = 0.1) -> None:
    """Poll ``condition`` a bounded number of times; fail naming ``what`` if it never holds."""
    for _ in range(attempts):
        if condition():
            return
        time.sleep(delay)
    raise AssertionError(f"gave up waiting for {what}")


def unique_email(prefix: str) -> str:
    """An address no earlier run used (the server's database persists)."""
    return f"it-{prefix}-{uuid.uuid4().hex[:12]}@example.com"


def strong_password() -> str:
    """Meets the server's policy: 8+ characters, an upper-case letter, a digit."""
    return f"It-{uuid.uuid4().hex[:12]}-Pass9"


class RawApi:
    """Stdlib HTTP to the real server, outside the client under test."""

    def __init__(self, real: RealServer) -> None:
        self.real = real
        self._admin_token: Optional[str] = None

    def request(self, method: str, path: str, *, body: Any = None, token: Optional[str] = None,
                api_key: bool = True) -> Tuple[int, Any]:
        headers: Dict[str, str] = {}
        if api_key:
            headers["X-API-Key"] = self.real.api_key
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.real.url + path, data=data, method=method,
                                     headers=headers)
        try:
            with _OPENER.open(req, timeout=30) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw.decode("utf-8", "replace")
        return status, parsed

    def data(self, method: str, path: str, *, expect: Tuple[int, ...] = (200, 201),
             **kwargs: Any) -> Dict[str, Any]:
        status, body = self.request(method, path, **kwargs)
        assert status in expect, f"set-up {method} {path} -> {status}: {body!r}"
        assert isinstance(body, dict) and isinstance(body.get("data"), dict), body
        return body["data"]

    # -- users -----------------------------------------------------------------
    def register_user(self, prefix: str = "user") -> NewUser:
        email, password = unique_email(prefix), strong_password()
        data = self.data("POST", "/api/auth/register", body={"email": email, "password": password})
        tokens = data["tokens"]
        made = NewUser(email, password, data["user"]["id"], tokens["access_token"],
                       tokens["refresh_token"])
        self.wait_user_visible(made.access_token)
        return made

    def login(self, email: str, password: str) -> Dict[str, Any]:
        return self.data("POST", "/api/auth/login", body={"email": email, "password": password})

    def logout_access_only(self, access_token: str) -> int:
        """Body-less logout: on this server it blacklists the access token only."""
        status, _ = self.request("POST", "/api/auth/logout", token=access_token)
        return status

    def user_status(self, access_token: str) -> int:
        status, _ = self.request("GET", "/api/auth/user", token=access_token)
        return status

    # SPAPS 0.6.6 commits a request's database work after it has sent the response (FastAPI
    # runs the session dependency's exit code after the reply). A request sent at once may
    # not see that work yet (seen under load: a login right after registering gets 401
    # INVALID_CREDENTIALS). These barriers wait, a bounded number of times, until it shows.
    def wait_user_visible(self, access_token: str) -> None:
        wait_until(lambda: self.user_status(access_token) == 200, "the new user to be visible")

    def wait_session_visible(self, access_token: str) -> None:
        wait_until(lambda: self.request("GET", "/api/sessions/current",
                                        token=access_token)[0] == 200,
                   "the new session to be visible")

    def wait_token_rejected(self, access_token: str) -> None:
        wait_until(lambda: self.user_status(access_token) == 401,
                   "the access token to be rejected")

    def auth_session_ids(self, access_token: str) -> List[str]:
        """Ids of the user's live sessions, as ``GET /api/auth/sessions`` lists them."""
        data = self.data("GET", "/api/auth/sessions", token=access_token)
        return [str(entry.get("session_id")) for entry in data.get("sessions") or []]

    # -- admin -----------------------------------------------------------------
    def admin_credentials(self) -> Tuple[str, str]:
        if not self.real.admin_email or not self.real.admin_password:
            pytest.skip("no admin account configured (SPAPS_TEST_ADMIN_EMAIL / _PASSWORD)")
        return self.real.admin_email, self.real.admin_password

    def admin_token(self) -> str:
        if self._admin_token is None or self.user_status(self._admin_token) != 200:
            email, password = self.admin_credentials()
            self._admin_token = self.login(email, password)["access_token"]
        return self._admin_token

    def add_member(self, user_id: str) -> None:
        self.data("POST", "/api/users/memberships", body={"user_id": user_id},
                  token=self.admin_token())
        wait_until(lambda: self._is_member(user_id), "the membership to be visible")

    def _is_member(self, user_id: str) -> bool:
        offset, limit = 0, 500
        for _ in range(100):  # the list is oldest first and has no total
            data = self.data("GET", f"/api/users/memberships?limit={limit}&offset={offset}",
                             token=self.admin_token())
            page = data.get("memberships") or []
            if any(entry.get("user_id") == user_id for entry in page):
                return True
            if len(page) < limit:
                return False
            offset += limit
        return False

    def grant_usage(self, user_id: str, feature: str = "api_calls",
                    dimension: str = "requests", limit: int = 1000) -> None:
        self.data("POST", "/api/entitlements/manual", token=self.admin_token(), body={
            "beneficiary_user_id": user_id,
            "entitlement_key": feature,
            "reason": "integration test",
            "metadata": {"usage_features": [feature], "usage_limits": {dimension: limit}},
        })
        query = urllib.parse.urlencode({"user_id": user_id, "entitlement_key": feature})
        wait_until(lambda: self.data("GET", f"/api/entitlements/check?{query}",
                                     token=self.admin_token()).get("has_entitlement") is True,
                   "the entitlement grant to be visible")

    # -- the "mailbox" -----------------------------------------------------------
    def require_mailbox(self) -> str:
        """``psql``'s path; skips the test when the "mailbox" (``email_log``) cannot be read.

        Call it before a flow starts: a skip raised inside ``asyncio.run`` is not a clean skip.
        """
        if not self.real.database_url:
            pytest.skip("no database URL configured (SPAPS_TEST_DATABASE_URL): "
                        "cannot read the magic link")
        psql = shutil.which("psql")
        if psql is None:
            pytest.skip("psql is not installed: cannot read the magic link")
        return psql

    def magic_link_token(self, email: str, *, attempts: int = 40) -> str:
        """The token of the newest magic link "e-mailed" to ``email`` (``email_log`` via psql)."""
        psql = self.require_mailbox()
        # The address goes in as a psql variable (:'email' quotes it), not pasted into the SQL.
        sql = ("SELECT primary_action_url FROM email_log WHERE to_email = :'email' "
               "AND template_key = 'auth_magic_link' ORDER BY created_at DESC LIMIT 1;\n")
        command = [psql, "-X", "-At", "-v", "ON_ERROR_STOP=1", "-v", f"email={email}",
                   self.real.database_url or ""]
        for _ in range(attempts):
            out = subprocess.run(command, input=sql, capture_output=True, text=True, timeout=30)
            assert out.returncode == 0, out.stderr
            url = out.stdout.strip()
            if url:
                token = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query).get("token")
                assert token, f"no token in the magic link {url!r}"
                return token[0]
            time.sleep(0.25)
        raise AssertionError(f"no magic link for {email} in email_log")


# -----------------------------------------------------------------------------
# sync / async flavours
# -----------------------------------------------------------------------------


class Recorded:
    """(method, path) of every request a client sent, from its ``on_request`` hook."""

    def __init__(self) -> None:
        self.calls: List[Tuple[str, str]] = []

    def hook(self, request: Any) -> None:
        self.calls.append((request.method, urllib.parse.urlsplit(request.url).path))

    def paths(self) -> List[str]:
        return [path for _, path in self.calls]

    def clear(self) -> None:
        del self.calls[:]


class Flavor:
    """Runs one flow with the sync or with the async client (see the module docstring)."""

    def __init__(self, name: str, real: RealServer) -> None:
        self.name = name
        self.real = real
        self.is_async = name == "async"
        self._clients: List[Any] = []

    def client(self, *, recorded: Optional[Recorded] = None, **options: Any) -> Any:
        """A new ``SpapsClient`` / ``AsyncSpapsClient`` for the real server, closed at the end."""
        options.setdefault("base_url", self.real.url)
        options.setdefault("api_key", self.real.api_key)
        options.setdefault("request_timeout", 30.0)
        if recorded is not None:
            options["logging_hooks"] = spaps_client.LoggingHooks(on_request=recorded.hook)
        kind = spaps_client.AsyncSpapsClient if self.is_async else spaps_client.SpapsClient
        made = kind(**options)
        self._clients.append(made)
        return made

    async def sign_in(self, spaps: Any, email: str, password: str) -> Any:
        """Sign ``spaps`` in (set-up for a test of something else), then wait until the server
        has committed the new session (see ``RawApi.wait_user_visible``)."""
        pair = await self(spaps.auth.sign_in_with_password(email=email, password=password))
        RawApi(self.real).wait_session_visible(pair.access_token)
        return pair

    def __call__(self, value: Any) -> Awaitable[Any]:
        """``await c(x)``: x's result as this flavour gets it."""
        return self._resolve(value)

    async def _resolve(self, value: Any) -> Any:
        if self.is_async:
            assert inspect.isawaitable(value), f"async client returned {type(value).__name__}"
            return await value
        assert not inspect.isawaitable(value), "sync client returned an awaitable"
        return value

    def run(self, flow: Callable[[Flavor], Awaitable[Any]]) -> Any:
        if self.is_async:
            return asyncio.run(self._run_async(flow))
        coro = flow(self)
        try:
            try:
                coro.send(None)  # type: ignore[attr-defined]
            except StopIteration as stop:
                return stop.value
            coro.close()  # type: ignore[attr-defined]
            raise AssertionError("a sync flow waited on something: it must not")
        finally:
            for made in self._clients:
                made.close()

    async def _run_async(self, flow: Callable[[Flavor], Awaitable[Any]]) -> Any:
        try:
            return await flow(self)
        finally:
            for made in self._clients:
                await made.aclose()


def secret_fragments(*secrets: Optional[str]) -> List[str]:
    """Pieces of each secret that must never show: the whole value and, for a JWT, its payload
    (error messages are cut at 500 characters, so the tail of a long token may be cut off)."""
    out: List[str] = []
    for secret in secrets:
        if not secret:
            continue
        out.append(secret)
        parts = secret.split(".")
        if len(parts) == 3 and len(parts[1]) >= 24:
            out.append(parts[1][:24])
    return out
