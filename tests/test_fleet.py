"""A fleet sharing one SPAPS identity through ``RedisTokenStorage`` (docs/fleet.md).

Every test runs against a private ``redis-server`` started for it (``--save "" --appendonly no``
on a free loopback port, in a temporary directory). The fleet tests spawn real processes
(``tests/fleet_worker.py``), each its own Python with its own ``app_info``, so the server sees
eight different hosts (User-Agents), which is exactly when a second refresh would be answered
with ``REFRESH_TOKEN_REPLAY`` and sign the whole fleet out. They run against the emulator and,
with the ``realserver`` marker, against the real server when one is configured
(``tests/realserver.py``).

The emulator backends are ``MockServer(refresh_binding=False)``: a server configured for fleets
(REFRESH_ANOMALY_ENFORCEMENT_ENABLED off, like CI's second real instance), since with the 0.6.6
default every refresh from a host other than the one that obtained the token is refused with
``REFRESH_TOKEN_ANOMALOUS``; one emulator test below keeps the default binding and checks that
the client surfaces that refusal.

How the refreshes are counted: the emulator records every request
(``request_count("POST", "/api/auth/refresh")``); on the real server every worker reports the
refresh requests it sent (``LoggingHooks.on_request``), and the test checks afterwards that the
stored refresh token still works, which it would not after a replay.
"""

from __future__ import annotations

import contextlib
import json
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
from conftest import API_KEY, DEMO_EMAIL, DEMO_PASSWORD, ROOT
from realserver import require_real_server

from spaps_client import (
    AuthError,
    LoggingHooks,
    RedisTokenStorage,
    SpapsClient,
    SpapsError,
    StoredTokens,
    TokenStorageError,
)
from spaps_mock import MockServer

try:
    import redis
except ImportError:  # CI installs it (the dev extra); a bare checkout skips these tests
    redis = None  # type: ignore[assignment]

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX processes and SIGKILL")

WORKER = Path(__file__).resolve().parent / "fleet_worker.py"
REFRESH = ("POST", "/api/auth/refresh")
FLEET = 8
BOUND = 60.0  # every wait in this module gives up after this many seconds at most


# =================================================================================================
# A private redis-server
# =================================================================================================


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """One ``redis-server`` process on loopback, without persistence, in its own directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = 0
        self.process: Optional[subprocess.Popen[bytes]] = None

    def start(self) -> RedisServer:
        for _attempt in range(5):  # another process may grab the free port before we do
            self.port = _free_port()
            log = self.directory / f"redis-{self.port}.log"
            self.process = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--dir", str(self.directory),
                 "--logfile", str(log), "--daemonize", "no"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            if self._answers_ping():
                return self
            self.stop()
        raise RuntimeError(f"redis-server did not answer PING; see the logs in {self.directory}")

    def _answers_ping(self, within: float = 10.0) -> bool:
        assert self.process is not None
        give_up = time.monotonic() + within
        probe = self.client(socket_timeout=1, socket_connect_timeout=1)
        try:
            while time.monotonic() < give_up:
                if self.process.poll() is not None:
                    return False  # exited: port taken, or a bad option
                try:
                    if probe.ping():
                        return True
                except redis.RedisError:
                    time.sleep(0.02)
            return False
        finally:
            probe.close()

    def client(self, **options: Any) -> Any:
        options.setdefault("socket_timeout", 5)
        options.setdefault("socket_connect_timeout", 5)
        return redis.Redis(host="127.0.0.1", port=self.port, **options)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server for this test, stopped at teardown."""
    if redis is None:
        pytest.skip("redis-py is not installed (pip install redis, or the [dev] extra); "
                    "the fleet tests need it")
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH (apt-get install redis-server); "
                    "the fleet tests start a private one")
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(directory).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def rds(redis_server: RedisServer) -> Iterator[Any]:
    """A redis-py client of ``redis_server`` (bytes replies, as redis-py does by default)."""
    connection = redis_server.client()
    try:
        yield connection
    finally:
        connection.close()


def no_retries() -> Any:
    """redis-py's own retries (about 3.5 s of back-off per command by default) switched off:
    these tests are about what the SPAPS client does once Redis gives up."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return Retry(NoBackoff(), 0)


def unique_key() -> str:
    return f"spaps:test:{uuid.uuid4().hex[:12]}"


# =================================================================================================
# Where the identity lives: the emulator or the real server
# =================================================================================================


SHARED_AGENT = "fleet-host-shared"


def _raw_post(url: str, api_key: str, path: str, body: Dict[str, Any],
              user_agent: str) -> Tuple[int, Dict[str, Any]]:
    request = urllib.request.Request(
        url + path, data=json.dumps(body).encode(), method="POST",
        headers={"X-API-Key": api_key, "Content-Type": "application/json",
                 "User-Agent": user_agent})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


_BINDING: Dict[str, Optional[str]] = {}


def refresh_binding(url: str, api_key: str) -> Optional[str]:
    """The error code with which this server refuses a refresh from another User-Agent, if any.

    SPAPS 0.6.6 binds each refresh token to the IP and User-Agent that obtained it
    (``refresh_anomaly_enforcement_enabled``, on by default): a refresh from anywhere else gets
    401 ``REFRESH_TOKEN_ANOMALOUS`` and the token is revoked. Probed once per server with a
    throw-away user, outside the client under test.
    """
    if url not in _BINDING:
        status, body = _raw_post(url, api_key, "/api/auth/register", {
            "email": f"fleet-probe-{uuid.uuid4().hex[:12]}@example.com",
            "password": f"Fleet-{uuid.uuid4().hex[:10]}-Pass9"}, "fleet-probe-a/1")
        assert status == 201, body
        refresh_token = body["data"]["tokens"]["refresh_token"]
        code: Optional[str] = None
        for _ in range(50):  # the registration commits after its reply (see sign_in)
            status, body = _raw_post(url, api_key, "/api/auth/refresh",
                                     {"refresh_token": refresh_token}, "fleet-probe-b/1")
            code = None if status == 200 else str((body.get("error") or {}).get("code"))
            if code != "INVALID_REFRESH_TOKEN":
                break
            time.sleep(0.1)
        _BINDING[url] = code
    return _BINDING[url]


@dataclass
class Backend:
    """A SPAPS server plus how to sign in and how to make the access token expire there."""

    name: str
    url: str
    api_key: str
    mock: Optional[MockServer] = None
    expiry: str = "server"  # "server": the server rejects it; "client": expires_at in the past
    agents: str = "distinct"  # "distinct": fleet-host-<i>; "shared": one User-Agent for all
    seen: List[str] = field(default_factory=list)  # refreshes the test's own clients sent

    def agent(self, host: Optional[int]) -> str:
        """The ``app_info`` of fleet host ``host`` (``None``: the test's own driver client)."""
        if self.agents == "shared":
            return SHARED_AGENT
        return "fleet-test-driver" if host is None else f"fleet-host-{host}"

    def require_distinct_hosts_work(self) -> None:
        """Distinct User-Agents on a server that binds refresh tokens to one cannot work."""
        if self.mock is None and self.agents == "distinct":
            code = refresh_binding(self.url, self.api_key)
            if code is not None:
                pytest.xfail(
                    f"this SPAPS refuses a refresh from any IP/User-Agent other than the one "
                    f"that obtained the token (401 {code}; 0.6.6 setting "
                    f"REFRESH_ANOMALY_ENFORCEMENT_ENABLED, on by default): hosts that look "
                    f"different cannot share one refresh token there (docs/fleet.md)")

    def client(self, storage: RedisTokenStorage) -> SpapsClient:
        def on_request(request: Any) -> None:
            if (request.method, request.url.split("?")[0]) == ("POST", self.url + REFRESH[1]):
                self.seen.append(request.url)

        return SpapsClient(base_url=self.url, api_key=self.api_key, token_storage=storage,
                           app_info=self.agent(None),
                           logging_hooks=LoggingHooks(on_request=on_request))

    def sign_in(self, spaps: SpapsClient) -> None:
        if self.mock is not None:
            spaps.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
            return
        # A fresh user per test: the real server's database outlives the run.
        spaps.auth.register(email=f"fleet-{uuid.uuid4().hex[:12]}@example.com",
                            password=f"Fleet-{uuid.uuid4().hex[:10]}-Pass9")
        assert spaps.get_tokens() is not None, "registration stored no tokens"
        # SPAPS 0.6.6 commits a request's work after replying: wait (bounded) until the new
        # session is visible before the fleet uses it.
        for _ in range(50):
            try:
                spaps.sessions.get_current_session()
                return
            except SpapsError:
                time.sleep(0.1)
        raise AssertionError("the newly registered user's session never became visible")

    def expire(self, spaps: SpapsClient) -> StoredTokens:
        """Make the shared access token expired; returns the stale tokens."""
        tokens = spaps.get_tokens()
        assert tokens is not None and tokens.refresh_token
        if self.expiry == "server":
            assert self.mock is not None
            self.mock.expire_access_tokens()  # the client still believes it valid: 401 path
        else:
            # The server still accepts it; every host believes it expired and refreshes first.
            spaps.set_tokens(access_token=tokens.access_token,
                             refresh_token=tokens.refresh_token,
                             expires_at=datetime.now(timezone.utc) - timedelta(minutes=5))
        self.seen.clear()
        if self.mock is not None:
            self.mock.reset_stats()
        return tokens

    def server_refreshes(self) -> Optional[int]:
        """Refresh requests the server received since ``expire``, when it can tell."""
        return None if self.mock is None else self.mock.request_count(*REFRESH)


@contextlib.contextmanager
def make_backend(kind: str, expiry: str, agents: str = "distinct") -> Iterator[Backend]:
    if kind == "realserver":
        real = require_real_server(fleet=True)
        yield Backend("realserver", real.url, real.api_key, expiry=expiry, agents=agents)
        return
    # A server configured for fleets: hosts with different User-Agents share one refresh token.
    with MockServer(api_key=API_KEY, refresh_binding=False) as mock:
        yield Backend("emulator", mock.url, API_KEY, mock=mock, expiry=expiry, agents=agents)


REAL = pytest.mark.realserver


@pytest.fixture(params=[
    pytest.param(("emulator", "server", "distinct"), id="emulator"),
    pytest.param(("emulator", "client", "distinct"), id="emulator-client-expiry"),
    pytest.param(("realserver", "client", "distinct"), id="realserver", marks=REAL),
    pytest.param(("realserver", "client", "shared"), id="realserver-one-agent", marks=REAL),
])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    with make_backend(*request.param) as made:
        yield made


# =================================================================================================
# Worker processes
# =================================================================================================


class Worker:
    """One ``fleet_worker.py`` process; its stdout lines are read by a thread into a queue."""

    def __init__(self, config: Dict[str, Any], stderr_path: Path) -> None:
        self.config = config
        self.stderr_path = stderr_path
        self._stderr = open(stderr_path, "wb")  # noqa: SIM115 - closed in finish()/kill()
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER), json.dumps(config)], cwd=ROOT,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
        )
        self.lines: queue.Queue[Optional[str]] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.seen: List[str] = []

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")[-3000:]

    def expect(self, wanted: str, timeout: float = BOUND) -> None:
        """Wait (bounded) until the worker printed ``wanted``."""
        give_up = time.monotonic() + timeout
        while wanted not in self.seen:
            remaining = give_up - time.monotonic()
            try:
                line = self.lines.get(timeout=max(remaining, 0.001))
            except queue.Empty:
                raise AssertionError(
                    f"host {self.config['host']} did not print {wanted!r} within {timeout:g} s; "
                    f"printed {self.seen}; stderr:\n{self.stderr()}") from None
            if line is None:
                raise AssertionError(
                    f"host {self.config['host']} exited before printing {wanted!r}; printed "
                    f"{self.seen}; stderr:\n{self.stderr()}")
            self.seen.append(line)

    def report(self, timeout: float = BOUND) -> Dict[str, Any]:
        """Wait (bounded) for the process to end and return its JSON report."""
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"host {self.config['host']} did not finish within "
                                 f"{timeout:g} s; stderr:\n{self.stderr()}") from None
        self._reader.join(timeout=10)
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.seen.append(line)
        self._stderr.close()
        assert self.process.returncode == 0, (
            f"host {self.config['host']} exited with {self.process.returncode}; printed "
            f"{self.seen}; stderr:\n{self.stderr()}")
        assert self.seen and self.seen[-1].startswith("{"), self.seen
        report: Dict[str, Any] = json.loads(self.seen[-1])
        return report

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        self._stderr.close()


@dataclass
class Fleet:
    """Spawns workers sharing one Redis key, and the barrier that releases them together."""

    backend: Backend
    redis_server: RedisServer
    tmp_path: Path
    key: str = field(default_factory=unique_key)
    workers: List[Worker] = field(default_factory=list)

    @property
    def barrier(self) -> str:
        return self.key + ":barrier"

    def storage(self, **options: Any) -> RedisTokenStorage:
        return RedisTokenStorage(self.redis_server.client(), key=self.key, **options)

    def spawn(self, host: int, *, mode: str = "call", lock_timeout: float = 10.0,
              lock_wait: float = 30.0) -> Worker:
        config = {
            "url": self.backend.url, "api_key": self.backend.api_key,
            "redis_port": self.redis_server.port, "key": self.key, "host": host, "mode": mode,
            "barrier": self.barrier, "barrier_timeout": BOUND,
            "lock_timeout": lock_timeout, "lock_wait": lock_wait, "request_timeout": 30.0,
            "app_info": self.backend.agent(host),
        }
        worker = Worker(config, self.tmp_path / f"host-{host}.stderr")
        self.workers.append(worker)
        return worker

    def release(self, workers: List[Worker]) -> None:
        """Wait until each worker is at the barrier, then let them all go at once."""
        for worker in workers:
            worker.expect("ready")
        self.redis_server.client().rpush(self.barrier, *(["go"] * len(workers)))

    def kill_all(self) -> None:
        for worker in self.workers:
            with contextlib.suppress(Exception):
                worker.kill()


@pytest.fixture
def fleet(backend: Backend, redis_server: RedisServer, tmp_path: Path) -> Iterator[Fleet]:
    crew = Fleet(backend, redis_server, tmp_path)
    try:
        yield crew
    finally:
        crew.kill_all()


def assert_family_alive(backend: Backend, storage: RedisTokenStorage) -> None:
    """The stored refresh token still works: no replay revoked the identity's tokens."""
    stored = storage.load()
    assert stored is not None and stored.refresh_token
    with backend.client(storage) as spaps:
        pair = spaps.auth.refresh_tokens(refresh_token=stored.refresh_token)
        assert pair.access_token and pair.access_token != stored.access_token


def check_one_refresh(backend: Backend, reports: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Every call succeeded, none saw a replay, and exactly one refresh reached the server."""
    failed = [r for r in reports if not r["ok"]]
    assert not failed, f"calls failed: {failed}"
    assert not [r for r in reports if r["error_code"] == "REFRESH_TOKEN_REPLAY"]
    refreshers = [r for r in reports if r["refreshes"]]
    counts = [(r["host"], r["refreshes"]) for r in reports]
    assert sum(r["refreshes"] for r in reports) == 1, f"expected one refresh in all: {counts}"
    assert refreshers[0]["refresh_statuses"] == [200]
    agent = backend.agent(refreshers[0]["host"])
    assert refreshers[0]["refresh_user_agents"][0].endswith(agent)
    server_count = backend.server_refreshes()
    if server_count is not None:
        assert server_count == 1
        assert backend.mock is not None
        [sent] = [r for r in backend.mock.requests if (r.method, r.path) == REFRESH]
        assert sent.headers["user-agent"].endswith(agent)
    return refreshers[0]


# =================================================================================================
# The fleet: eight hosts, one identity, one refresh
# =================================================================================================


def test_eight_hosts_share_one_identity_with_one_refresh(fleet: Fleet) -> None:
    backend = fleet.backend
    backend.require_distinct_hosts_work()
    storage = fleet.storage()
    with backend.client(storage) as driver:
        backend.sign_in(driver)
    stale = backend.expire(backend.client(storage))  # the driver signed in once, for everyone

    if backend.mock is not None:
        # A slow refresh keeps the first holder inside the lease while the others arrive.
        backend.mock.inject(*REFRESH, {"passthrough": True, "delay": 0.5})

    workers = [fleet.spawn(host) for host in range(FLEET)]
    fleet.release(workers)
    reports = [worker.report() for worker in workers]

    check_one_refresh(backend, reports)
    assert len({r["host"] for r in reports}) == FLEET
    # How many hosts queued for the lease depends on timing (reported, not asserted): a host
    # that read the tokens after the refresh never needed it.
    print("hosts that took the lease:", sum(1 for r in reports if r["lock_entries"]))
    fresh = storage.load()
    assert fresh is not None
    assert fresh.access_token != stale.access_token
    assert fresh.refresh_token != stale.refresh_token
    assert not fresh.expires_within(60)
    assert not fleet.redis_server.client().exists(fleet.key + ":lock"), "a lease was left behind"
    assert backend.seen == []  # the driver sent no refresh of its own
    assert_family_alive(backend, storage)


@pytest.fixture(params=[
    pytest.param(("emulator", "server", "distinct"), id="emulator"),
    pytest.param(("realserver", "client", "distinct"), id="realserver", marks=REAL),
    pytest.param(("realserver", "client", "shared"), id="realserver-one-agent", marks=REAL),
])
def crash_backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    with make_backend(*request.param) as made:
        yield made


def test_fleet_recovers_after_the_lease_of_a_holder_killed_mid_refresh(
    crash_backend: Backend, redis_server: RedisServer, tmp_path: Path
) -> None:
    backend = crash_backend
    backend.require_distinct_hosts_work()
    fleet = Fleet(backend, redis_server, tmp_path)
    try:
        storage = fleet.storage()
        with backend.client(storage) as driver:
            backend.sign_in(driver)
        stale = backend.expire(backend.client(storage))
        rds = redis_server.client()
        lock_key = fleet.key + ":lock"

        others = [fleet.spawn(host) for host in range(1, FLEET)]
        for worker in others:
            worker.expect("ready")
        # Host 0 takes the lease (3 s) and hangs before its refresh is sent.
        holder = fleet.spawn(0, mode="stall", lock_timeout=3.0)
        holder.expect("holding")
        fleet.release(others)
        for worker in others:
            worker.expect("lock-wait")  # all seven are now queuing for the holder's lease
        assert rds.pttl(lock_key) > 0, "the holder's lease should still be held"
        if backend.mock is not None:
            assert backend.mock.request_count(*REFRESH) == 0

        holder.kill()
        assert holder.process.returncode == -signal.SIGKILL
        # The lease outlives its dead holder: nobody refreshed yet ...
        if backend.mock is not None:
            assert backend.mock.request_count(*REFRESH) == 0
        # ... and once it lapses, one of the seven refreshes and the rest reuse its tokens.
        reports = [worker.report() for worker in others]
        check_one_refresh(backend, reports)
        assert 0 not in {r["host"] for r in reports}
        fresh = storage.load()
        assert fresh is not None and fresh.access_token != stale.access_token
        assert not rds.exists(lock_key)
        assert_family_alive(backend, storage)
    finally:
        fleet.kill_all()


def test_a_binding_server_refuses_a_refresh_from_another_host(
    redis_server: RedisServer,
) -> None:
    """With the 0.6.6 default (refresh binding on), a host other than the one that signed in
    cannot refresh the shared token: the client raises the server's refusal, once, no loop."""
    with MockServer(api_key=API_KEY) as mock:
        assert mock.refresh_binding  # on by default, like the real server
        backend = Backend("emulator", mock.url, API_KEY, mock=mock)
        storage = RedisTokenStorage(redis_server.client(), key=unique_key())
        with backend.client(storage) as driver:
            backend.sign_in(driver)
            stale = backend.expire(driver)  # server-side expiry: the host meets a 401 first
        host_agent = backend.agent(1)
        host = SpapsClient(base_url=mock.url, api_key=API_KEY, token_storage=storage,
                           app_info=host_agent)
        with host, pytest.raises(AuthError) as caught:
            host.sessions.get_current_session()

        assert caught.value.status_code == 401
        assert caught.value.error_code == "REFRESH_TOKEN_ANOMALOUS"
        assert caught.value.retryable is False
        assert mock.request_count(*REFRESH) == 1, "the refusal must surface, not be retried"
        assert mock.request_count("GET", "/api/sessions/current") == 1
        [sent] = [r for r in mock.requests if (r.method, r.path) == REFRESH]
        assert sent.headers["user-agent"].endswith(host_agent)
        shown = str(caught.value) + repr(caught.value)
        assert stale.access_token not in shown and str(stale.refresh_token) not in shown

        # The refused token is spent: even the host that obtained it now meets a replay.
        with backend.client(storage) as driver, pytest.raises(AuthError) as again:
            driver.auth.refresh_tokens(refresh_token=str(stale.refresh_token))
        assert again.value.error_code == "REFRESH_TOKEN_REPLAY"
        assert mock.request_count(*REFRESH) == 2


# =================================================================================================
# Redis down: an error, never a refresh without the lock
# =================================================================================================


def test_redis_down_is_a_storage_error_and_no_refresh(
    backend: Backend, redis_server: RedisServer
) -> None:
    storage = RedisTokenStorage(redis_server.client(retry=no_retries()), key=unique_key(),
                                lock_timeout=5.0)
    with backend.client(storage) as spaps:
        backend.sign_in(spaps)
        stale = backend.expire(spaps)
        redis_server.stop()

        with pytest.raises(SpapsError) as caught:
            spaps.sessions.get_current_session()

    assert isinstance(caught.value, TokenStorageError)
    assert caught.value.error_code == "TOKEN_STORAGE_FAILED"
    assert caught.value.retryable is False
    shown = str(caught.value) + repr(caught.value)
    assert stale.access_token not in shown and str(stale.refresh_token) not in shown
    assert backend.seen == []  # the client sent no refresh
    if backend.mock is not None:
        assert backend.mock.request_count(*REFRESH) == 0
        assert backend.mock.request_count("GET", "/api/sessions/current") == 0


# =================================================================================================
# RedisTokenStorage against a real redis-server
# =================================================================================================

TOKENS = StoredTokens(access_token="at-1", refresh_token="rt-1",
                      expires_at=datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc),
                      token_type="Bearer")


@pytest.mark.parametrize("decode_responses", [False, True], ids=["bytes", "text"])
def test_save_load_clear_round_trip(redis_server: RedisServer, decode_responses: bool) -> None:
    connection = redis_server.client(decode_responses=decode_responses)
    key = unique_key()
    storage = RedisTokenStorage(connection, key=key)
    assert storage.load() is None

    storage.save(TOKENS)
    loaded = storage.load()

    assert loaded == TOKENS and loaded is not TOKENS
    assert json.loads(connection.get(key)) == {  # one JSON value under the key
        "access_token": "at-1", "refresh_token": "rt-1",
        "expires_at": "2030-01-02T03:04:05+00:00", "token_type": "Bearer",
    }
    assert RedisTokenStorage(connection, key=key).load() == TOKENS  # another host sees it
    assert RedisTokenStorage(connection, key=key + ":other").load() is None
    storage.save(StoredTokens(access_token="at-2"))
    assert storage.load() == StoredTokens(access_token="at-2")
    storage.clear()
    assert storage.load() is None and not connection.exists(key)
    storage.clear()  # clearing nothing is fine


def test_unreadable_value_loads_as_signed_out(rds: Any) -> None:
    key = unique_key()
    rds.set(key, b"not json")
    assert RedisTokenStorage(rds, key=key).load() is None
    rds.set(key, json.dumps({"refresh_token": "rt"}))
    assert RedisTokenStorage(rds, key=key).load() is None


def test_lease_has_a_px_expiry_and_a_fresh_owner_each_time(rds: Any) -> None:
    key = unique_key()
    storage = RedisTokenStorage(rds, key=key, lock_timeout=7.5)
    owners = []
    for _ in range(2):
        with storage.lock():
            ttl = rds.pttl(key + ":lock")
            assert 0 < ttl <= 7500  # milliseconds, set with the SET (no separate EXPIRE)
            owners.append(rds.get(key + ":lock"))
        assert not rds.exists(key + ":lock")  # released by its owner
    assert all(owners) and owners[0] != owners[1]
    assert not rds.exists(key)  # the lease never touches the tokens


def test_lease_is_released_only_by_its_owner(rds: Any) -> None:
    key = unique_key()
    lock_key = key + ":lock"
    slow = RedisTokenStorage(rds, key=key, lock_timeout=0.2)  # host A, slower than its lease
    other = RedisTokenStorage(rds, key=key, lock_timeout=30.0, lock_wait=5.0)  # host B

    with slow.lock():
        give_up = time.monotonic() + 10
        while rds.exists(lock_key):  # A's lease lapses while A is still inside
            assert time.monotonic() < give_up, "the 0.2 s lease never expired"
            time.sleep(0.02)
        taken = other.lock()
        taken.__enter__()  # B takes the lapsed lease
        owner_b = rds.get(lock_key)
        assert owner_b
    # A leaving must not delete B's lease.
    assert rds.get(lock_key) == owner_b
    assert 0 < rds.pttl(lock_key) <= 30000
    taken.__exit__(None, None, None)
    assert not rds.exists(lock_key)


def test_lock_wait_timeout_is_a_storage_error(rds: Any) -> None:
    key = unique_key()
    rds.set(key + ":lock", "someone-else", px=30000)
    storage = RedisTokenStorage(rds, key=key, lock_timeout=30.0, lock_wait=0.3)

    with pytest.raises(TokenStorageError) as caught, storage.lock():
        pytest.fail("took a lease another owner holds")

    assert isinstance(caught.value, SpapsError)
    assert "timed out" in str(caught.value)
    assert rds.get(key + ":lock") == b"someone-else"  # untouched


def test_threads_of_one_process_queue_locally_before_polling_redis(rds: Any) -> None:
    key = unique_key()
    storage = RedisTokenStorage(rds, key=key, lock_timeout=30.0, lock_wait=0.3)
    inside = threading.Event()
    leave = threading.Event()
    errors: List[BaseException] = []

    def holder() -> None:
        with storage.lock():
            inside.set()
            leave.wait(BOUND)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert inside.wait(BOUND)
        try:
            with storage.lock():
                pass
        except TokenStorageError as exc:
            errors.append(exc)
    finally:
        leave.set()
        thread.join(BOUND)
    assert len(errors) == 1 and "another thread" in str(errors[0])
    with storage.lock():  # free again once the holder left
        pass


def test_every_redis_failure_is_a_storage_error(redis_server: RedisServer) -> None:
    storage = RedisTokenStorage(redis_server.client(retry=no_retries()), key=unique_key(),
                                lock_wait=1.0)
    redis_server.stop()
    for action in (storage.load, lambda: storage.save(TOKENS), storage.clear):
        with pytest.raises(TokenStorageError):
            action()
    with pytest.raises(TokenStorageError), storage.lock():
        pytest.fail("took a lease without Redis")



def test_an_acl_user_limited_to_the_prefix_and_four_commands_suffices(
    redis_server: RedisServer, rds: Any
) -> None:
    # What docs/fleet.md recommends: keys ~spaps:* and only GET, SET, DEL and EVAL.
    rds.execute_command("ACL", "SETUSER", "spaps-fleet", "on", ">fleet-test-password",
                        "resetkeys", "~spaps:*", "resetchannels", "-@all",
                        "+get", "+set", "+del", "+eval")
    limited = redis_server.client(username="spaps-fleet", password="fleet-test-password")
    try:
        key = unique_key()
        storage = RedisTokenStorage(limited, key=key, lock_wait=1.0)
        storage.save(TOKENS)
        assert storage.load() == TOKENS
        with storage.lock():
            assert rds.exists(key + ":lock")
        assert not rds.exists(key + ":lock")
        storage.clear()
        with pytest.raises(TokenStorageError, match="NoPermission"):
            RedisTokenStorage(limited, key="elsewhere:tokens").load()
    finally:
        limited.close()
