"""Fault-injection tests of automatic token refresh (docs/reliability.md, "Sessions that
survive expiry").

Real HTTP over loopback against ``spaps_mock``: the server decides when tokens expire
(``access_token_ttl``, ``expire_access_tokens()``, an injected ``clock``) and rotates refresh
tokens as SPAPS 0.6.6 does: a spent refresh token sent again by the same client within 60 s gets
the identical successor pair, later (or from another client) it is a 401 REFRESH_TOKEN_REPLAY.
Single-flight is therefore proven by counting refresh requests, not by waiting for a failure.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from conftest import grant_usage, user_id_of
from loopback import client_factory

from spaps_client import (
    AsyncSpapsClient,
    AuthError,
    FileTokenStorage,
    RetryConfig,
    SpapsClient,
    SpapsError,
    SpapsTransportError,
    StoredTokens,
)
from spaps_mock import MockServer

API_KEY = "test_key_for_tests"
DEMO_EMAIL = "demo@example.com"
DEMO_PASSWORD = "demo-password"
ROOT = Path(__file__).resolve().parent.parent

# An authenticated GET that SPAPS 0.6.6 implements (the 0.1.2 balance route is a 501 stub).
CURRENT = "/api/sessions/current"
CHECKOUT = "/api/stripe/checkout-sessions"
USAGE = "/api/usage/record"
REFRESH = "/api/auth/refresh"
PRICE = "price_basic"


def bearer_tokens(server: MockServer, method: str, path: str) -> list[str]:
    """The access tokens the server received on ``method path``, in order."""
    return [
        r.headers.get("authorization", "").removeprefix("Bearer ")
        for r in server.requests if r.method == method and r.path == path
    ]


def snapshot(tokens: StoredTokens | None) -> tuple[Any, ...]:
    assert tokens is not None
    return (tokens.access_token, tokens.refresh_token, tokens.expires_at, tokens.token_type)


def expire_in(client: SpapsClient, *, seconds: float) -> StoredTokens:
    """Store the client's tokens again with expires_at ``seconds`` from now; return them."""
    tokens = client.get_tokens()
    assert tokens is not None and tokens.refresh_token
    client.set_tokens(access_token=tokens.access_token, refresh_token=tokens.refresh_token,
                      expires_at=datetime.now(timezone.utc) + timedelta(seconds=seconds))
    return tokens


@pytest.fixture
def make_client(server: MockServer) -> Iterator[Callable[..., SpapsClient]]:
    server.add_price(PRICE, unit_amount=500)
    with client_factory(server.url, API_KEY) as make:
        def make_fast(**kwargs: Any) -> SpapsClient:
            kwargs.setdefault("retry_config",
                              RetryConfig(backoff_factor=0.01, max_backoff=0.05))
            return make(**kwargs)

        yield make_fast


# --- proactive and reactive refresh -----------------------------------------------------------


def test_token_about_to_expire_is_refreshed_before_the_call(
    server: MockServer, make_client: Callable[..., SpapsClient]
) -> None:
    """A token with seconds left is refreshed first; the server never sees it rejected."""
    client = make_client()  # a 900 s token: the client refreshes it 30 s before it expires
    signed_in = client.get_tokens()
    assert signed_in is not None
    # Time passes: the token, still valid at the server, is now inside the expiry margin.
    client.set_tokens(access_token=signed_in.access_token,
                      refresh_token=signed_in.refresh_token,
                      expires_at=datetime.now(timezone.utc) + timedelta(seconds=5))
    old = snapshot(client.get_tokens())
    server.reset_stats()

    session = client.sessions.get_current_session()

    assert session.user_id == user_id_of(client)
    assert server.request_count("POST", REFRESH) == 1
    assert server.request_count("GET", CURRENT) == 1  # no 401 round trip
    new = snapshot(client.get_tokens())
    assert new[0] != old[0] and new[1] != old[1]
    assert bearer_tokens(server, "GET", CURRENT) == [new[0]]


def test_refresh_before_expiry_uses_the_stored_expiry(
    server: MockServer, make_client: Callable[..., SpapsClient]
) -> None:
    """Tokens stored with a near expires_at (e.g. restored from disk) are refreshed first."""
    client = make_client()
    tokens = expire_in(client, seconds=3)
    server.reset_stats()

    client.sessions.get_current_session()

    assert server.request_count("POST", REFRESH) == 1
    assert server.request_count("GET", "/api/sessions/current") == 1
    refreshed = client.get_tokens()
    assert refreshed is not None and refreshed.access_token != tokens.access_token


def test_token_far_from_expiry_is_not_refreshed(
    server: MockServer, make_client: Callable[..., SpapsClient]
) -> None:
    client = make_client()
    server.reset_stats()

    for _ in range(3):
        client.sessions.get_current_session()

    assert server.request_count("POST", REFRESH) == 0


@pytest.mark.parametrize("method, path, call", [
    ("GET", CURRENT, lambda client: client.sessions.get_current_session()),
    ("POST", CHECKOUT, lambda client: client.payments.create_checkout_session(
        price_id=PRICE, mode="payment", success_url="https://a.example/ok",
        cancel_url="https://a.example/no")),
], ids=["GET", "POST"])
def test_401_triggers_one_refresh_and_one_retry(
    server: MockServer, make_client: Callable[..., SpapsClient],
    method: str, path: str, call: Callable[[SpapsClient], Any],
) -> None:
    client = make_client()
    old = snapshot(client.get_tokens())
    server.expire_access_tokens()
    server.reset_stats()

    call(client)

    assert server.request_count("POST", REFRESH) == 1
    assert server.request_count(method, path) == 2
    new = snapshot(client.get_tokens())
    assert bearer_tokens(server, method, path) == [old[0], new[0]]


def test_replay_after_401_keeps_the_idempotency_key(
    server: MockServer, make_client: Callable[..., SpapsClient]
) -> None:
    """The record itself meets the expired token (it was authorized before), is refreshed and
    replayed with the same key and body, and counted once."""
    client = make_client()
    grant_usage(server, user_id_of(client))
    authorization = client.usage.authorize_usage(feature_key="api_calls",
                                                 dimensions={"requests": 2})
    server.expire_access_tokens()
    server.reset_stats()

    result = client.usage.record_usage(
        feature="api_calls", dimensions={"requests": 2}, idempotency_key="after-401",
        authorization_ref=authorization.authorization_ref)

    sent = [r for r in server.requests if r.path == USAGE]
    assert [r.headers.get("x-idempotency-key") for r in sent] == ["after-401", "after-401"]
    assert sent[0].body == sent[1].body
    assert sent[0].json["idempotency_key"] == "after-401"
    assert server.request_count("POST", REFRESH) == 1
    assert result.replayed is False
    events = client.usage.get_history(feature="api_calls").events
    assert [event.dimensions for event in events] == [{"requests": 2.0}]


def test_401_after_refresh_is_not_retried_again(
    server: MockServer, make_client: Callable[..., SpapsClient]
) -> None:
    """A second 401 (e.g. the session was revoked) is reported, not looped on."""
    client = make_client()
    server.expire_access_tokens()
    server.inject("GET", CURRENT, {"status": 401, "code": "INVALID_TOKEN"},
                  {"status": 401, "code": "INVALID_TOKEN"})
    server.reset_stats()

    with pytest.raises(SpapsError) as caught:
        client.sessions.get_current_session()

    assert caught.value.status_code == 401
    assert server.request_count("POST", REFRESH) == 1
    assert server.request_count("GET", CURRENT) == 2


def test_failed_refresh_raises_auth_error_and_keeps_the_tokens(
    server: MockServer, make_client: Callable[..., SpapsClient]
) -> None:
    client = make_client()
    before = snapshot(client.get_tokens())
    server.expire_access_tokens()
    server.inject("POST", REFRESH, {"status": 401, "code": "INVALID_REFRESH_TOKEN",
                                    "message": "Refresh token is invalid"})
    server.reset_stats()

    with pytest.raises(AuthError) as caught:
        client.sessions.get_current_session()

    assert caught.value.error_code == "INVALID_REFRESH_TOKEN"
    assert caught.value.status_code == 401
    assert snapshot(client.get_tokens()) == before
    assert server.request_count("POST", REFRESH) == 1
    assert server.request_count("GET", CURRENT) == 1


def test_failed_refresh_of_an_expired_token_raises_and_keeps_the_tokens(
    server: MockServer, make_client: Callable[..., SpapsClient]
) -> None:
    """The proactive path: the stored token is already past expires_at and refresh fails."""
    client = make_client()
    expire_in(client, seconds=-5)
    before = snapshot(client.get_tokens())
    server.inject("POST", REFRESH, {"status": 401, "code": "INVALID_REFRESH_TOKEN"})

    with pytest.raises(AuthError) as caught:
        client.sessions.get_current_session()

    assert caught.value.error_code == "INVALID_REFRESH_TOKEN"
    assert snapshot(client.get_tokens()) == before


def test_failed_early_refresh_falls_back_to_the_still_valid_token(
    server: MockServer, make_client: Callable[..., SpapsClient]
) -> None:
    """Refreshing early is an optimisation: if it fails, a token that still works is used."""
    client = make_client()
    expire_in(client, seconds=5)  # inside the margin, still valid at the server for an hour
    before = snapshot(client.get_tokens())
    server.inject("POST", REFRESH, {"status": 500})
    server.reset_stats()

    assert client.sessions.get_current_session().user_id == user_id_of(client)
    assert snapshot(client.get_tokens()) == before
    assert server.request_count("POST", REFRESH) == 1  # the early refresh was tried
    assert bearer_tokens(server, "GET", CURRENT) == [before[0]]


# --- the server's rotation rules --------------------------------------------------------------


class FakeClock:
    """A ``time.time`` for the emulator that moves only when told to."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clocked() -> Iterator[tuple[MockServer, FakeClock]]:
    clock = FakeClock()
    with MockServer(clock=clock) as mock:
        yield mock, clock


def test_refresh_whose_answer_was_lost_is_recovered_by_the_same_client(
    clocked: tuple[MockServer, FakeClock]
) -> None:
    """The server spent the refresh token but the answer never arrived; within 60 s the same
    client sending it again gets the identical successor pair, so the session survives."""
    server, clock = clocked
    with client_factory(server.url, API_KEY) as make:
        client = make(retry_config=RetryConfig(backoff_factor=0.01, max_backoff=0.05))
        before = snapshot(client.get_tokens())
        server.expire_access_tokens()
        server.inject("POST", REFRESH, {"drop": "after_process"})

        with pytest.raises(SpapsTransportError):
            client.sessions.get_current_session()
        assert snapshot(client.get_tokens()) == before  # nothing arrived, nothing stored

        clock.advance(30)
        session = client.sessions.get_current_session()

    assert session.user_id == user_id_of(client)
    sent = [r.json["refresh_token"] for r in server.requests if r.path == REFRESH]
    assert sent == [before[1], before[1]]
    after = snapshot(client.get_tokens())
    assert after[0] != before[0] and after[1] != before[1]
    assert bearer_tokens(server, "GET", CURRENT)[-1] == after[0]


def test_refresh_token_reused_after_the_grace_is_a_replay(
    clocked: tuple[MockServer, FakeClock]
) -> None:
    """After 60 s the spent refresh token is a replay: AuthError REFRESH_TOKEN_REPLAY, the
    stored tokens are kept (not overwritten by a failure) and no refresh loop follows."""
    server, clock = clocked
    with client_factory(server.url, API_KEY) as make:
        client = make(retry_config=RetryConfig(backoff_factor=0.01, max_backoff=0.05))
        before = snapshot(client.get_tokens())
        server.expire_access_tokens()
        server.inject("POST", REFRESH, {"drop": "after_process"})
        with pytest.raises(SpapsTransportError):
            client.sessions.get_current_session()

        clock.advance(61)
        server.reset_stats()
        with pytest.raises(AuthError) as caught:
            client.sessions.get_current_session()

    assert caught.value.status_code == 401
    assert caught.value.error_code == "REFRESH_TOKEN_REPLAY"
    assert snapshot(client.get_tokens()) == before
    assert server.request_count("POST", REFRESH) == 1
    assert server.request_count("GET", CURRENT) == 1


def test_refresh_reply_without_user_is_stored(
    server: MockServer, make_client: Callable[..., SpapsClient]
) -> None:
    """SPAPS answers a refresh without ``user``; the rotated pair is stored all the same."""
    client = make_client()
    before = snapshot(client.get_tokens())

    pair = client.auth.refresh_tokens(refresh_token=before[1])

    assert pair.user is None
    assert server.request_count("POST", REFRESH) == 1
    after = snapshot(client.get_tokens())
    assert (after[0], after[1]) == (pair.access_token, pair.refresh_token)
    assert after[1] != before[1]


# --- single-flight ----------------------------------------------------------------------------


def run_in_threads(count: int, call: Callable[[], Any]) -> list[BaseException]:
    barrier = threading.Barrier(count)
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait()
        try:
            call()
        except BaseException as exc:  # collected and asserted on below
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return errors


def test_fifty_threads_hitting_an_expired_token_refresh_once(
    server: MockServer, make_client: Callable[..., SpapsClient]
) -> None:
    client = make_client()
    for round_number in range(1, 3):
        server.expire_access_tokens()

        errors = run_in_threads(50, client.sessions.get_current_session)

        assert errors == []
        assert server.request_count("POST", REFRESH) == round_number


def test_fifty_threads_near_expiry_refresh_once(
    server: MockServer, make_client: Callable[..., SpapsClient]
) -> None:
    """The proactive path is single-flight too (every thread sees 'expires soon')."""
    client = make_client()
    expire_in(client, seconds=5)

    errors = run_in_threads(50, client.sessions.get_current_session)

    assert errors == []
    assert server.request_count("POST", REFRESH) == 1


def test_fifty_async_tasks_hitting_an_expired_token_refresh_once(server: MockServer) -> None:
    async def scenario() -> list[Any]:
        async with AsyncSpapsClient(
            base_url=server.url, api_key=API_KEY,
            retry_config=RetryConfig(backoff_factor=0.01, max_backoff=0.05),
        ) as client:
            await client.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
            server.expire_access_tokens()
            return list(await asyncio.gather(
                *(client.sessions.get_current_session() for _ in range(50)), return_exceptions=True
            ))

    results = asyncio.run(scenario())

    assert [r for r in results if isinstance(r, BaseException)] == []
    assert server.request_count("POST", REFRESH) == 1


def test_clients_sharing_a_token_file_do_not_refresh_short_lived_tokens_in_turn(
    server: MockServer, tmp_path: Path
) -> None:
    """Two clients with their own FileTokenStorage on one file (as two processes would)."""
    server.access_token_ttl = 10  # shorter than the client's expiry margin
    token_file = tmp_path / "tokens.json"
    clients = [SpapsClient(base_url=server.url, api_key=API_KEY,
                           token_storage=FileTokenStorage(path=token_file)) for _ in range(2)]
    try:
        clients[0].auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
        server.reset_stats()
        for turn in range(6):
            clients[turn % 2].sessions.get_current_session()
    finally:
        for client in clients:
            client.close()
    # The sign-in token is refreshed early once; its successor lives 10 s, far beyond the test.
    assert server.request_count("POST", REFRESH) <= 1


# --- across processes -------------------------------------------------------------------------

WORKER = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from spaps_client import FileTokenStorage, RetryConfig, SpapsClient, SpapsError

url, path, calls = sys.argv[2], sys.argv[3], int(sys.argv[4])
failures = []
client = SpapsClient(base_url=url, api_key="test_key_for_tests",
                     token_storage=FileTokenStorage(path=path),
                     retry_config=RetryConfig(backoff_factor=0.01, max_backoff=0.05))
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() != "go":
        break
    for _ in range(calls):
        try:
            client.sessions.get_current_session()
        except SpapsError as exc:
            failures.append(f"{type(exc).__name__} {exc.status_code} {exc.error_code}: {exc}")
    print("done", flush=True)
client.close()
print(json.dumps({"failures": failures}), flush=True)
sys.exit(1 if failures else 0)
"""


class Worker:
    """A worker process driven line by line over stdin/stdout."""

    def __init__(self, script: Path, url: str, token_file: Path, calls: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(ROOT), url, str(token_file), str(calls)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={k: v for k, v in os.environ.items() if not k.startswith("SPAPS_")},
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put("<eof>")

    def expect(self, wanted: str, timeout: float = 20.0) -> str:
        line = self.lines.get(timeout=timeout)
        if wanted and line != wanted:
            stderr = self.proc.stderr.read() if self.proc.stderr and line == "<eof>" else ""
            raise AssertionError(f"worker said {line!r}, expected {wanted!r}\n{stderr}")
        return line

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()


@pytest.mark.slow
def test_processes_sharing_a_token_file_refresh_once_per_expiry(
    server: MockServer, tmp_path: Path
) -> None:
    token_file = tmp_path / "spaps" / "tokens.json"
    with SpapsClient(base_url=server.url, api_key=API_KEY,
                     token_storage=FileTokenStorage(path=token_file)) as seeder:
        seeder.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    workers = [Worker(script, server.url, token_file, calls=5) for _ in range(4)]
    try:
        for worker in workers:
            worker.expect("ready")
        server.reset_stats()
        for expiry in range(1, 4):
            server.expire_access_tokens()
            for worker in workers:
                worker.send("go")
            for worker in workers:
                worker.expect("done")
            assert server.request_count("POST", REFRESH) == expiry
        for worker in workers:
            worker.send("quit")
        reports = [json.loads(worker.expect("")) for worker in workers]
        codes = [worker.proc.wait(timeout=20) for worker in workers]
    finally:
        for worker in workers:
            if worker.proc.poll() is None:
                worker.proc.kill()
                worker.proc.wait()
    assert [report["failures"] for report in reports] == [[]] * 4
    assert codes == [0] * 4
    assert server.request_count("GET", CURRENT) >= 4 * 5 * 3
    # The file ends up holding the latest pair, which still works without another refresh.
    with SpapsClient(base_url=server.url, api_key=API_KEY,
                     token_storage=FileTokenStorage(path=token_file)) as after:
        after.sessions.get_current_session()
    assert server.request_count("POST", REFRESH) == 3
