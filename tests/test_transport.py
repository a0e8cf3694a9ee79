"""Transport: keep-alive, threads, settings, URLs, failures, timeouts, TLS, proxies, plain HTTP.

Everything runs over real loopback sockets: the emulator, or small purpose-built servers
defined here (a forwarding proxy, a TLS server with a self-signed certificate, a server that
never answers).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import json
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple
from urllib.parse import urlsplit

import pytest
from conftest import API_KEY, DEMO_EMAIL, DEMO_PASSWORD
from loopback import QuietHandler, QuietServer, closed_port, self_signed_certificate, serving

import spaps_client
from spaps_client import (
    DEFAULT_API_KEY,
    DEFAULT_BASE_URL,
    DEFAULT_TIMEOUT,
    AsyncSpapsClient,
    AuthError,
    LoggingHooks,
    MetricsError,
    RetryConfig,
    SessionError,
    Settings,
    SpapsClient,
    SpapsConfigurationError,
    SpapsError,
    SpapsTimeoutError,
    SpapsTransportError,
)
from spaps_mock import MockServer

NO_RETRY = RetryConfig(max_attempts=1)


# =============================================================================================
# Purpose-built servers
# =============================================================================================

Record = Tuple[str, str, Dict[str, str]]  # method, request target, lower-cased headers


class _ProxyHandler(QuietHandler):
    """A forward proxy (absolute-form and CONNECT) or a path-prefix reverse proxy."""

    server: ProxyServer

    def _reply(self, status: int, body: bytes, headers: List[Tuple[str, str]]) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _relay(self) -> None:
        proxy = self.server
        body = self.read_body() or None
        proxy.records.append((self.command, self.path, self.lower_headers()))
        if proxy.upstream is None:  # forward proxy: the target is in the request line
            parts = urlsplit(self.path)
            host, port, target = parts.hostname or "", parts.port or 80, self.path
        else:
            host, port = proxy.upstream
            if not self.path.startswith(proxy.prefix + "/"):
                self._reply(404, b'{"error":{"code":"NO_PREFIX"}}', [])
                return
            target = self.path[len(proxy.prefix):]
        forwarded = {name: value for name, value in self.headers.items()
                     if name.lower() not in ("connection", "proxy-connection", "keep-alive",
                                             "proxy-authorization", "content-length")}
        upstream = http.client.HTTPConnection(host, port, timeout=10)
        try:
            upstream.request(self.command, target, body=body, headers=forwarded)
            response = upstream.getresponse()
            data = response.read()
        except OSError:
            self._reply(502, b'{"success":false,"error":{"code":"BAD_GATEWAY",'
                             b'"message":"upstream unreachable"}}',
                        [("Content-Type", "application/json")])
            return
        finally:
            upstream.close()
        headers = []
        for name, value in response.getheaders():
            lower = name.lower()
            if lower in ("connection", "keep-alive", "transfer-encoding", "content-length",
                         "date", "server"):
                continue
            if lower == "location" and proxy.upstream is not None and value.startswith("/"):
                value = proxy.prefix + value  # what a reverse proxy's redirect rewriting does
            headers.append((name, value))
        self._reply(response.status, data, headers)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _relay

    def do_CONNECT(self) -> None:
        self.server.records.append(("CONNECT", self.path, self.lower_headers()))
        host, _, port = self.path.rpartition(":")
        try:
            upstream = socket.create_connection((host, int(port)), timeout=10)
        except OSError:
            self._reply(502, b"", [])
            return
        self.send_response(200, "Connection established")
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        client = self.connection

        def pump(source: socket.socket, sink: socket.socket) -> None:
            try:
                while True:
                    chunk = source.recv(65536)
                    if not chunk:
                        break
                    sink.sendall(chunk)
            except OSError:
                pass
            finally:
                with contextlib.suppress(OSError):
                    sink.shutdown(socket.SHUT_WR)

        back = threading.Thread(target=pump, args=(upstream, client), daemon=True)
        back.start()
        pump(client, upstream)
        back.join(timeout=5)
        upstream.close()


class ProxyServer(QuietServer):
    def __init__(self, upstream: Optional[Tuple[str, int]] = None, prefix: str = "") -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream = upstream
        self.prefix = prefix
        self.records: List[Record] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class _TLSHandler(QuietHandler):
    server: TLSServer

    def _answer(self) -> None:
        self.read_body()
        self.server.records.append((self.command, self.path, self.lower_headers()))
        if self.path == "/health":
            payload: Dict[str, Any] = {"status": "healthy"}
        else:
            payload = {"success": True, "data": {"valid": True, "session_id": "sess_tls"}}
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer


class TLSServer(QuietServer):
    """HTTPS on 127.0.0.1 with the given certificate; the handshake runs per connection."""

    def __init__(self, cert: Path, key: Path) -> None:
        super().__init__(("127.0.0.1", 0), _TLSHandler)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(cert), str(key))
        self.records: List[Record] = []

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except OSError:  # the client refused our certificate
            return
        try:
            self.RequestHandlerClass(tls, client_address, self)
        finally:
            tls.close()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1 made with the openssl CLI."""
    return self_signed_certificate(
        tmp_path_factory.mktemp("tls"), "/CN=localhost",
        "subjectAltName=DNS:localhost,IP:127.0.0.1",
        "keyUsage=critical,digitalSignature,keyCertSign",
    )


@pytest.fixture
def tls_server(certificate: Tuple[Path, Path]) -> Iterator[TLSServer]:
    with serving(TLSServer(*certificate)) as httpd:
        assert isinstance(httpd, TLSServer)
        yield httpd


# =============================================================================================
# Keep-alive and threads
# =============================================================================================


def test_fifty_sequential_calls_open_one_connection(server: MockServer,
                                                    signed_in: SpapsClient) -> None:
    for index in range(50):
        kind = index % 7
        if kind == 0:
            signed_in.sessions.get_current_session()
        elif kind == 1:
            signed_in.sessions.validate_session()
        elif kind == 2:
            signed_in.sessions.list_sessions(limit=5)  # a 307 and its follow-up
        elif kind == 3:
            signed_in.metrics.health()
        elif kind == 4:
            signed_in.auth.get_current_user()
        elif kind == 5:
            signed_in.sessions.touch_session()
        else:
            with pytest.raises(SessionError):  # error answers keep the connection too
                signed_in.sessions.revoke_session("sess_unknown")
    assert len(server.requests) >= 51
    assert server.connections_opened == 1


def test_async_sequential_calls_open_one_connection(server: MockServer) -> None:
    async def scenario() -> None:
        async with AsyncSpapsClient(base_url=server.url, api_key=API_KEY) as spaps:
            await spaps.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
            for _ in range(25):
                await spaps.sessions.get_current_session()
                await spaps.metrics.health()

    asyncio.run(scenario())
    assert len(server.requests) == 51
    assert server.connections_opened == 1


def test_one_client_shared_by_eight_threads(server: MockServer, signed_in: SpapsClient) -> None:
    expected = signed_in.sessions.get_current_session().session_id
    barrier = threading.Barrier(8)
    results: List[str] = []
    errors: List[BaseException] = []
    lock = threading.Lock()

    def work() -> None:
        try:
            barrier.wait(timeout=10)
            for _ in range(10):
                session_id = signed_in.sessions.get_current_session().session_id
                with lock:
                    results.append(session_id)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert results == [expected] * 80
    assert server.request_count("GET", "/api/sessions/current") == 81
    assert 1 <= server.connections_opened <= 8


def test_async_concurrent_calls_share_the_pool(server: MockServer) -> None:
    async def scenario() -> List[Dict[str, Any]]:
        async with AsyncSpapsClient(base_url=server.url, api_key=API_KEY) as spaps:
            return list(await asyncio.gather(*(spaps.metrics.health() for _ in range(8))))

    answers = asyncio.run(scenario())
    assert len(answers) == 8
    assert all(answer["success"] is True and answer["data"]["status"] == "ok"
               for answer in answers)
    assert 1 <= server.connections_opened <= 8


def test_user_agent_names_the_sdk_and_version(server: MockServer,
                                              signed_in: SpapsClient) -> None:
    signed_in.metrics.health()
    signed_in.sessions.get_current_session()
    agents = {request.headers.get("user-agent", "") for request in server.requests}
    assert len(agents) == 1
    agent = agents.pop()
    assert "spaps" in agent.lower()
    assert spaps_client.__version__ in agent
    assert "urllib" not in agent.lower()


# =============================================================================================
# Settings and URLs
# =============================================================================================


def test_settings_defaults() -> None:
    settings = Settings()
    assert settings.base_url == DEFAULT_BASE_URL == "http://localhost:3300"
    assert settings.api_key == DEFAULT_API_KEY == "test_key_local_dev_only"
    assert settings.request_timeout == DEFAULT_TIMEOUT == 10.0


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPAPS_API_URL", "https://spaps.example.com/base")
    monkeypatch.setenv("SPAPS_API_KEY", "env-key")
    monkeypatch.setenv("SPAPS_REQUEST_TIMEOUT", "2.5")
    settings = Settings()
    assert settings.base_url == "https://spaps.example.com/base"
    assert settings.api_key == "env-key"
    assert settings.request_timeout == 2.5 and isinstance(settings.request_timeout, float)


def test_settings_are_read_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().api_key == DEFAULT_API_KEY
    monkeypatch.setenv("SPAPS_API_KEY", "later-key")
    assert Settings().api_key == "later-key"


def test_explicit_arguments_win_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPAPS_API_URL", "https://env.example.com")
    monkeypatch.setenv("SPAPS_API_KEY", "env-key")
    monkeypatch.setenv("SPAPS_REQUEST_TIMEOUT", "2.5")
    settings = Settings(base_url="https://arg.example.com", api_key="arg-key",
                        request_timeout=7)
    assert (settings.base_url, settings.api_key, settings.request_timeout) == (
        "https://arg.example.com", "arg-key", 7.0)
    # Anything that is not None wins, even an empty string.
    assert Settings(api_key="").api_key == ""
    assert Settings(base_url="").base_url == ""


def test_empty_environment_values_fall_back_to_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SPAPS_API_URL", "SPAPS_API_KEY", "SPAPS_REQUEST_TIMEOUT"):
        monkeypatch.setenv(name, "")
    settings = Settings()
    assert (settings.base_url, settings.api_key, settings.request_timeout) == (
        DEFAULT_BASE_URL, DEFAULT_API_KEY, DEFAULT_TIMEOUT)


@pytest.mark.parametrize("value", ["ten", "1s", "0x"])
def test_invalid_timeout_in_environment_is_value_error(monkeypatch: pytest.MonkeyPatch,
                                                       value: str) -> None:
    monkeypatch.setenv("SPAPS_REQUEST_TIMEOUT", value)
    with pytest.raises(ValueError):
        Settings()
    with pytest.raises(ValueError):
        SpapsClient()


def test_client_uses_environment(monkeypatch: pytest.MonkeyPatch, server: MockServer) -> None:
    monkeypatch.setenv("SPAPS_API_URL", server.url)
    monkeypatch.setenv("SPAPS_API_KEY", "key-from-env")
    monkeypatch.setenv("SPAPS_REQUEST_TIMEOUT", "3")
    with SpapsClient() as spaps:
        assert spaps.settings.request_timeout == 3.0
        assert spaps.http_client.timeout == 3.0
        spaps.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
    assert server.requests[-1].headers["x-api-key"] == "key-from-env"


def test_trailing_slashes_are_stripped(server: MockServer) -> None:
    with SpapsClient(base_url=server.url + "///", api_key=API_KEY) as spaps:
        assert spaps.settings.base_url == server.url + "///"  # kept as given
        spaps.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
        spaps.sessions.list_sessions()
        spaps.metrics.health()
    paths = [request.path for request in server.requests]
    assert paths == ["/api/auth/login", "/api/sessions/", "/health"]


@pytest.mark.parametrize("prefix", ["/spaps", "/gateway/spaps/v0"])
def test_base_url_path_prefix_is_preserved(server: MockServer, prefix: str) -> None:
    upstream = ("127.0.0.1", int(urlsplit(server.url).port or 0))
    with serving(ProxyServer(upstream=upstream, prefix=prefix)) as gateway:
        assert isinstance(gateway, ProxyServer)
        with SpapsClient(base_url=gateway.url + prefix + "/", api_key=API_KEY) as spaps:
            spaps.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
            session = spaps.sessions.get_current_session()
            listing = spaps.sessions.list_sessions(limit=3)
            health = spaps.metrics.health()
    assert listing.sessions[0].session_id == session.session_id
    assert health["data"]["status"] == "ok"
    assert [(method, target) for method, target, _ in gateway.records] == [
        ("POST", prefix + "/api/auth/login"),
        ("GET", prefix + "/api/sessions/current"),
        ("GET", prefix + "/api/sessions/?limit=3"),
        ("GET", prefix + "/health"),
    ]
    assert [request.path for request in server.requests] == [
        "/api/auth/login", "/api/sessions/current", "/api/sessions/", "/health"]


# =============================================================================================
# Failures and timeouts
# =============================================================================================


def test_connection_refused_is_a_transport_error() -> None:
    port = closed_port()
    with SpapsClient(base_url=f"http://127.0.0.1:{port}", api_key=API_KEY,
                     retry_config=NO_RETRY) as spaps:
        with pytest.raises(SpapsTransportError) as caught:
            spaps.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
        with pytest.raises(SpapsTransportError):
            spaps.metrics.health()
    error = caught.value
    assert isinstance(error, SpapsError)
    assert not isinstance(error, OSError)
    assert not isinstance(error, SpapsTimeoutError)
    assert error.status_code is None
    assert str(port) in str(error)


def test_connection_refused_async_is_a_transport_error() -> None:
    port = closed_port()

    async def scenario() -> None:
        async with AsyncSpapsClient(base_url=f"http://127.0.0.1:{port}", api_key=API_KEY,
                                    retry_config=NO_RETRY) as spaps:
            await spaps.metrics.health()

    with pytest.raises(SpapsTransportError):
        asyncio.run(scenario())


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A socket that accepts connections (kernel backlog) and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


def test_server_that_never_answers_times_out(silent_server: str) -> None:
    events: List[Tuple[str, str, int]] = []
    hooks = LoggingHooks(
        on_error=lambda request, exc, attempt: events.append(
            (request.method, type(exc).__name__, attempt)),
        on_give_up=lambda request, reason, attempt: events.append(
            (request.method, reason, attempt)))
    with SpapsClient(base_url=silent_server, api_key=API_KEY, request_timeout=0.3,
                     logging_hooks=hooks) as spaps:
        with pytest.raises(SpapsTimeoutError) as caught:
            spaps.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
        with pytest.raises(SpapsTimeoutError):  # a GET, with retries, stays within the budget
            spaps.metrics.health()
    assert events == [
        ("POST", "SpapsTimeoutError", 1), ("POST", "not safe to send again", 1),
        # the one wait used the whole budget: no time is left for a retry
        ("GET", "SpapsTimeoutError", 1), ("GET", "deadline reached", 1),
    ]
    error = caught.value
    assert isinstance(error, SpapsTransportError) and isinstance(error, SpapsError)
    assert not isinstance(error, OSError)
    assert error.status_code is None


def test_per_client_timeout_from_environment_applies(monkeypatch: pytest.MonkeyPatch,
                                                      silent_server: str) -> None:
    monkeypatch.setenv("SPAPS_API_URL", silent_server)
    monkeypatch.setenv("SPAPS_REQUEST_TIMEOUT", "0.3")
    with SpapsClient() as spaps, pytest.raises(SpapsTimeoutError):
        spaps.metrics.readiness()


def test_async_timeout(silent_server: str) -> None:
    async def scenario() -> None:
        async with AsyncSpapsClient(base_url=silent_server, api_key=API_KEY,
                                    request_timeout=0.3) as spaps:
            await spaps.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)

    with pytest.raises(SpapsTimeoutError):
        asyncio.run(scenario())


# =============================================================================================
# TLS
# =============================================================================================


def test_self_signed_certificate_is_refused_by_default(tls_server: TLSServer) -> None:
    spaps = SpapsClient(base_url=f"https://localhost:{tls_server.port}", api_key=API_KEY)
    with spaps, pytest.raises(SpapsTransportError) as caught:
        spaps.metrics.health()
    assert not isinstance(caught.value, OSError)
    assert "certificate" in str(caught.value).lower()
    assert tls_server.records == []


def test_custom_ca_via_ssl_context(tls_server: TLSServer,
                                   certificate: Tuple[Path, Path]) -> None:
    context = ssl.create_default_context(cafile=str(certificate[0]))
    with SpapsClient(base_url=f"https://localhost:{tls_server.port}", api_key=API_KEY,
                     ssl_context=context) as spaps:
        assert spaps.metrics.health() == {"status": "healthy"}
        spaps.set_tokens(access_token="tls-token")
        assert spaps.sessions.validate_session().session_id == "sess_tls"
    assert [(m, p) for m, p, _ in tls_server.records] == [("GET", "/health"),
                                                          ("POST", "/api/sessions/validate")]
    headers = tls_server.records[1][2]
    assert headers["x-api-key"] == API_KEY
    assert headers["authorization"] == "Bearer tls-token"


def test_ip_address_host_is_verified_too(tls_server: TLSServer,
                                         certificate: Tuple[Path, Path]) -> None:
    context = ssl.create_default_context(cafile=str(certificate[0]))
    with SpapsClient(base_url=f"https://127.0.0.1:{tls_server.port}", api_key=API_KEY,
                     ssl_context=context) as spaps:
        assert spaps.metrics.health() == {"status": "healthy"}


@pytest.mark.skipif(sys.platform in ("win32", "darwin"),
                    reason="SSL_CERT_FILE is read by OpenSSL's default verify paths")
def test_ssl_cert_file_is_honoured(monkeypatch: pytest.MonkeyPatch, tls_server: TLSServer,
                                   certificate: Tuple[Path, Path]) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))
    with SpapsClient(base_url=f"https://localhost:{tls_server.port}", api_key=API_KEY) as spaps:
        assert spaps.metrics.health() == {"status": "healthy"}


# =============================================================================================
# Proxies
# =============================================================================================


@pytest.fixture
def proxy() -> Iterator[ProxyServer]:
    with serving(ProxyServer()) as httpd:
        assert isinstance(httpd, ProxyServer)
        yield httpd


def test_http_proxy_receives_absolute_form_requests(monkeypatch: pytest.MonkeyPatch,
                                                    proxy: ProxyServer,
                                                    server: MockServer) -> None:
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    with SpapsClient(base_url=server.url, api_key=API_KEY) as spaps:
        spaps.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
        assert spaps.metrics.health()["data"]["status"] == "ok"
    assert [(method, target) for method, target, _ in proxy.records] == [
        ("POST", server.url + "/api/auth/login"),
        ("GET", server.url + "/health"),
    ]
    assert proxy.records[0][2]["host"] == urlsplit(server.url).netloc
    assert [request.path for request in server.requests] == ["/api/auth/login", "/health"]


def test_http_proxy_credentials_are_sent(monkeypatch: pytest.MonkeyPatch, proxy: ProxyServer,
                                         server: MockServer) -> None:
    monkeypatch.setenv("HTTP_PROXY", f"http://alice:s3cret@127.0.0.1:{proxy.port}")
    with SpapsClient(base_url=server.url, api_key=API_KEY) as spaps:
        spaps.metrics.health()
    expected = "Basic " + base64.b64encode(b"alice:s3cret").decode()
    assert proxy.records[0][2].get("proxy-authorization") == expected


@pytest.mark.parametrize("no_proxy", ["127.0.0.1", "localhost,127.0.0.1", "*"])
def test_no_proxy_bypasses_the_proxy(monkeypatch: pytest.MonkeyPatch, proxy: ProxyServer,
                                     server: MockServer, no_proxy: str) -> None:
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", no_proxy)
    with SpapsClient(base_url=server.url, api_key=API_KEY) as spaps:
        spaps.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
        spaps.metrics.health()
    assert proxy.records == []
    assert [request.path for request in server.requests] == ["/api/auth/login", "/health"]


def test_https_proxy_tunnels_with_connect(monkeypatch: pytest.MonkeyPatch, proxy: ProxyServer,
                                          tls_server: TLSServer,
                                          certificate: Tuple[Path, Path]) -> None:
    monkeypatch.setenv("HTTPS_PROXY", f"http://bob:pa55@127.0.0.1:{proxy.port}")
    context = ssl.create_default_context(cafile=str(certificate[0]))
    with SpapsClient(base_url=f"https://localhost:{tls_server.port}", api_key=API_KEY,
                     ssl_context=context) as spaps:
        spaps.set_tokens(access_token="tunnelled-token")
        assert spaps.sessions.validate_session().session_id == "sess_tls"
        assert spaps.metrics.health() == {"status": "healthy"}
    assert [(method, target) for method, target, _ in proxy.records] == [
        ("CONNECT", f"localhost:{tls_server.port}")]
    connect_headers = proxy.records[0][2]
    assert "x-api-key" not in connect_headers and "authorization" not in connect_headers
    assert connect_headers["proxy-authorization"] == (
        "Basic " + base64.b64encode(b"bob:pa55").decode())
    # Inside the tunnel the server got the credentials, over TLS.
    assert tls_server.records[0][2]["authorization"] == "Bearer tunnelled-token"
    assert tls_server.records[0][2]["x-api-key"] == API_KEY


def test_http_proxy_is_not_used_for_https(monkeypatch: pytest.MonkeyPatch, proxy: ProxyServer,
                                          tls_server: TLSServer,
                                          certificate: Tuple[Path, Path]) -> None:
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    context = ssl.create_default_context(cafile=str(certificate[0]))
    with SpapsClient(base_url=f"https://localhost:{tls_server.port}", api_key=API_KEY,
                     ssl_context=context) as spaps:
        assert spaps.metrics.health() == {"status": "healthy"}
    assert proxy.records == []
    assert len(tls_server.records) == 1


def test_no_proxy_applies_to_https_too(monkeypatch: pytest.MonkeyPatch, proxy: ProxyServer,
                                       tls_server: TLSServer,
                                       certificate: Tuple[Path, Path]) -> None:
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", "localhost")
    context = ssl.create_default_context(cafile=str(certificate[0]))
    with SpapsClient(base_url=f"https://localhost:{tls_server.port}", api_key=API_KEY,
                     ssl_context=context) as spaps:
        assert spaps.metrics.health() == {"status": "healthy"}
    assert proxy.records == []


# =============================================================================================
# Credentials over plain HTTP
# =============================================================================================

REMOTE = "http://spaps.example.invalid"


def origin_and_path(absolute_form: str) -> Tuple[Optional[str], int, str]:
    """Host, port and path of an absolute-form target (``:80`` may or may not be spelled)."""
    parts = urlsplit(absolute_form)
    assert parts.scheme == "http"
    return parts.hostname, parts.port or 80, parts.path


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD),
        lambda c: c.sessions.get_current_session(),
        lambda c: c.auth.logout(),
        lambda c: c.whitelist.check(email="someone@example.com"),
    ],
)
def test_credentials_over_plain_http_to_a_remote_host_are_refused(
    monkeypatch: pytest.MonkeyPatch, proxy: ProxyServer, call: Any
) -> None:
    # With a proxy configured, "nothing was sent" is observable: the proxy sees no request.
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    with SpapsClient(base_url=REMOTE, api_key=API_KEY) as spaps:
        spaps.set_tokens(access_token="plain-http-token")
        with pytest.raises(SpapsConfigurationError) as caught:
            call(spaps)
    assert isinstance(caught.value, SpapsError)
    assert "spaps.example.invalid" in str(caught.value)
    assert API_KEY not in str(caught.value)
    assert proxy.records == []


def test_refusal_happens_before_any_connection() -> None:
    # The host does not even resolve: a refusal, not a DNS or connect error.
    spaps = SpapsClient(base_url="http://spaps.example.invalid:8080", api_key=API_KEY)
    with spaps, pytest.raises(SpapsConfigurationError):
        spaps.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)


def test_allow_insecure_http_sends_credentials(monkeypatch: pytest.MonkeyPatch,
                                               proxy: ProxyServer) -> None:
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    spaps = SpapsClient(base_url=REMOTE, api_key=API_KEY, allow_insecure_http=True,
                        retry_config=NO_RETRY)
    with spaps, pytest.raises(AuthError) as caught:  # the proxy cannot reach the made-up host
        spaps.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
    assert caught.value.status_code == 502
    assert [(method, origin_and_path(target)) for method, target, _ in proxy.records] == [
        ("POST", ("spaps.example.invalid", 80, "/api/auth/login"))]
    assert proxy.records[0][2]["x-api-key"] == API_KEY


def test_plain_http_without_credentials_is_allowed(monkeypatch: pytest.MonkeyPatch,
                                                   proxy: ProxyServer) -> None:
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    spaps = SpapsClient(base_url=REMOTE, api_key=API_KEY, retry_config=NO_RETRY)
    with spaps, pytest.raises(MetricsError) as caught:
        spaps.metrics.health()
    assert caught.value.status_code == 502
    assert [(method, origin_and_path(target)) for method, target, _ in proxy.records] == [
        ("GET", ("spaps.example.invalid", 80, "/health"))]


def test_localhost_is_trusted_over_plain_http(server: MockServer) -> None:
    port = urlsplit(server.url).port
    with SpapsClient(base_url=f"http://localhost:{port}", api_key=API_KEY) as spaps:
        spaps.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
    assert server.request_count("POST", "/api/auth/login") == 1



@pytest.mark.skipif(sys.platform == "win32", reason="OpenSSL reads SSL_CERT_DIR by hash on POSIX")
def test_a_hashed_ca_directory_is_enough_to_verify(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path, tls_server: TLSServer,
                                                   certificate: Tuple[Path, Path]) -> None:
    """With the system store as a hashed directory (Debian, Ubuntu, Alpine), the client
    trusts what is in it without loading a whole bundle first (docs/performance.md)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is not installed")
    subject_hash = subprocess.run(
        [openssl, "x509", "-hash", "-noout", "-in", str(certificate[0])],
        capture_output=True, text=True, check=True).stdout.strip()
    shutil.copy(certificate[0], tmp_path / f"{subject_hash}.0")
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path))
    with SpapsClient(base_url=f"https://localhost:{tls_server.port}", api_key=API_KEY) as spaps:
        assert spaps.metrics.health() == {"status": "healthy"}
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path / "elsewhere"))  # the CA is gone again
    with SpapsClient(base_url=f"https://localhost:{tls_server.port}", api_key=API_KEY) as spaps, \
            pytest.raises(SpapsTransportError, match="certificate"):
        spaps.metrics.health()
