"""Scaffolding shared by the tests that run purpose-built loopback servers.

``QuietHandler``/``QuietServer``/``serving`` are the base of every small HTTP server the tests
define next to their cases (scripted replies, proxies, TLS); the other helpers are the bits those
tests kept writing again: a closed port, a self-signed certificate, a factory of signed-in
clients that are closed at teardown, and ``FakeTime``/``Wire``, which let a test drive a client's
deadlines, back-off and ``Retry-After`` waits without waiting on the wall clock.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar
from urllib.parse import urlsplit

import pytest
from conftest import DEMO_EMAIL, DEMO_PASSWORD

from spaps_client import HttpRequest, HttpResponse, HttpTransport, RetryClient, SpapsClient

ServerT = TypeVar("ServerT", bound=ThreadingHTTPServer)


class QuietHandler(BaseHTTPRequestHandler):
    """HTTP/1.1, no access log, and no Nagle stall between separately written head and body."""

    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        # Head and body go out in separate writes: without this, Nagle + delayed ACK stall.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def read_body(self) -> bytes:
        """The request body as announced by Content-Length (``b""`` when there is none)."""
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def lower_headers(self) -> Dict[str, str]:
        return {name.lower(): value for name, value in self.headers.items()}


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    @property
    def port(self) -> int:
        return int(self.server_address[1])


@contextlib.contextmanager
def serving(httpd: ServerT) -> Iterator[ServerT]:
    """Run ``httpd`` on a daemon thread; shut it down and close it on exit."""
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def closed_port() -> int:
    """A loopback port nobody listens on (connections to it are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def self_signed_certificate(directory: Path, subject: str,
                            *extensions: str) -> Tuple[Path, Path]:
    """(cert, key) made with the openssl command line; skips the test when that cannot be."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is not installed")
    cert, key = directory / "cert.pem", directory / "key.pem"
    command = [
        openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", subject,
    ]
    for extension in extensions:
        command += ["-addext", extension]
    done = subprocess.run(command, capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"openssl could not make a certificate: {done.stderr.decode()[:200]}")
    return cert, key


class FakeTime:
    """A clock and a sleep for ``RetryClient(clock=..., sleep=...)``.

    The clock stands still until the client sleeps (a sleep returns at once, moves the clock on
    by its length and is recorded in ``sleeps``) or the test calls ``advance``. Socket reads
    still use the real clock for their own timeouts: each is given ``deadline - clock()``.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self.start = self.now = start
        self.sleeps: List[float] = []
        self._lock = threading.Lock()

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.sleeps.append(seconds)
            self.now += seconds

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds

    @property
    def elapsed(self) -> float:
        """Seconds the clock moved since it was made."""
        return self.now - self.start

    def http_client(self, base_url: str, *, timeout: float = 10.0,
                    **kwargs: Any) -> RetryClient:
        """A ``RetryClient`` on this clock and sleep, with jitter fixed at its middle."""
        kwargs.setdefault("random", lambda: 0.5)
        return RetryClient(base_url=base_url, timeout=timeout, clock=self.clock,
                           sleep=self.sleep, **kwargs)


class Wire:
    """The real ``HttpTransport``, recording each exchange as (method, path, the seconds of
    budget it was given).

    With a ``FakeTime``, exchange *i* counted from the last ``expect`` takes ``costs[i]``
    seconds of that clock (later ones none): the exchange itself is real and immediate, the
    test decides how long it took.
    """

    def __init__(self, fake: Optional[FakeTime] = None) -> None:
        self.inner = HttpTransport()
        self.fake = fake
        self.costs: List[float] = []
        self.sent: List[Tuple[str, str, float]] = []
        self._lock = threading.Lock()

    def expect(self, costs: Sequence[float] = ()) -> None:
        """Forget the exchanges so far; the next ones take ``costs`` seconds each."""
        with self._lock:
            self.sent.clear()
            self.costs = list(costs)

    def send(self, request: HttpRequest, *, timeout: float) -> HttpResponse:
        with self._lock:
            cost = self.costs[len(self.sent)] if len(self.sent) < len(self.costs) else 0.0
            self.sent.append((request.method, urlsplit(request.url).path, timeout))
        try:
            return self.inner.send(request, timeout=timeout)
        finally:
            if self.fake is not None:
                self.fake.advance(cost)

    def close(self) -> None:
        self.inner.close()

    def timeouts(self) -> List[float]:
        return [timeout for _, _, timeout in self.sent]


@contextlib.contextmanager
def client_factory(default_url: str, api_key: str) -> Iterator[Callable[..., SpapsClient]]:
    """``make(*, sign_in=True, base_url=None, **kwargs)``: clients closed on exit."""
    made: List[SpapsClient] = []

    def make(*, sign_in: bool = True, base_url: Optional[str] = None,
             **kwargs: Any) -> SpapsClient:
        client = SpapsClient(base_url=base_url or default_url, api_key=api_key, **kwargs)
        made.append(client)
        if sign_in:
            client.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
        return client

    try:
        yield make
    finally:
        for client in made:
            client.close()
            client.http_client.close()  # also one the test passed in (closing twice is fine)
