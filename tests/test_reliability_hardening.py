"""Hardening under hostile or broken servers (docs/reliability.md, "Hardening").

Malformed bodies come from ``spaps_mock``'s ``raw_body``/``truncate`` faults or, where the mock
cannot produce them (invalid UTF-8, 17 MiB, byte-by-byte trickles, redirects to other origins,
TLS), from a purpose-built server in this file.  Everything is real HTTP(S) over 127.0.0.1.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import pytest
from conftest import grant_usage, user_id_of
from loopback import QuietHandler, QuietServer, Wire, self_signed_certificate

from spaps_client import (
    AuthError,
    CryptoPaymentsError,
    LoggingHooks,
    MetricsError,
    PaymentsError,
    RetryClient,
    RetryConfig,
    SecureMessagesError,
    SessionError,
    Settings,
    SpapsClient,
    SpapsConfigurationError,
    SpapsError,
    SpapsTimeoutError,
    SpapsTransportError,
    UsageError,
    WebhookVerificationError,
    WhitelistError,
    default_logging_hooks,
    generate_test_signature,
    verify_crypto_webhook_signature,
    verify_spaps_webhook,
)
from spaps_mock import MockServer

API_KEY = "test_key_for_tests"
DEMO_EMAIL = "demo@example.com"
DEMO_PASSWORD = "demo-password"
REQUEST_ID = "req_hardening_0001"
ONE_ATTEMPT = RetryConfig(max_attempts=1)


# =============================================================================================
# A scripted loopback HTTP(S) server
# =============================================================================================


class Seen(NamedTuple):
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


Responder = Callable[["_Handler", Seen], None]


class _Handler(QuietHandler):
    server: _Server

    def _any(self) -> None:
        seen = Seen(self.command, self.path, self.lower_headers(), self.read_body())
        self.server.owner.requests.append(seen)
        try:
            self.server.owner.respond(self, seen)
        except OSError:
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _any

    def send(self, status: int, body: bytes, *, content_type: str = "application/json",
             headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-request-id", REQUEST_ID)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


class _Server(QuietServer):
    owner: RawServer


class RawServer:
    """Answers every request through ``respond(handler, seen)``; records what it received."""

    def __init__(self, respond: Responder, *, tls: ssl.SSLContext | None = None) -> None:
        self.respond = respond
        self.requests: list[Seen] = []
        self.stopping = threading.Event()
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        if tls is not None:
            self._httpd.socket = tls.wrap_socket(self._httpd.socket, server_side=True)
        self.port = self._httpd.port
        self.scheme = "https" if tls is not None else "http"
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def __enter__(self) -> RawServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()


def json_reply(payload: Any, status: int = 200) -> Responder:
    def respond(handler: _Handler, seen: Seen) -> None:
        handler.send(status, json.dumps(payload).encode())
    return respond


def raw_client(url: str, **kwargs: Any) -> SpapsClient:
    """A client with stored (fake) tokens, for servers that are not the emulator."""
    kwargs.setdefault("retry_config", ONE_ATTEMPT)
    client = SpapsClient(base_url=url, api_key=API_KEY, **kwargs)
    client.set_tokens(access_token="at_raw_token", refresh_token="rt_raw_token",
                      expires_in=3600)
    return client


@pytest.fixture(scope="module")
def shared_server() -> Iterator[MockServer]:
    """One emulator for the many body-shape cases (each consumes the fault it injects).

    ``price_1`` is seeded so that checkout works unfaulted (SPAPS only sells prices it manages).
    """
    with MockServer() as mock:
        mock.add_price("price_1")
        yield mock


@pytest.fixture(scope="module")
def shared_client(shared_server: MockServer) -> Iterator[SpapsClient]:
    """The demo user, entitled to ``api_calls``: a usage record is authorized first
    (``POST /api/usage/authorize``, left unfaulted) and only then recorded."""
    with SpapsClient(base_url=shared_server.url, api_key=API_KEY,
                     retry_config=ONE_ATTEMPT) as client:
        client.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
        grant_usage(shared_server, user_id_of(client))
        yield client


@pytest.fixture
def mock(shared_server: MockServer, shared_client: SpapsClient) -> Iterator[MockServer]:
    shared_server.clear_faults()
    yield shared_server
    shared_server.clear_faults()


@pytest.fixture
def make_client(server: MockServer) -> Iterator[Callable[..., SpapsClient]]:
    made: list[SpapsClient] = []

    def make(**kwargs: Any) -> SpapsClient:
        kwargs.setdefault("retry_config", ONE_ATTEMPT)
        client = SpapsClient(base_url=server.url, api_key=API_KEY, **kwargs)
        made.append(client)
        client.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
        return client

    yield make
    for client in made:
        client.close()


# =============================================================================================
# Malformed bodies
# =============================================================================================

# (id, method, raw path, error class, call)
ENDPOINTS: list[tuple[str, str, str, type[SpapsError], Callable[[SpapsClient], Any]]] = [
    ("login", "POST", "/api/auth/login", AuthError,
     lambda c: c.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)),
    ("current-session", "GET", "/api/sessions/current", SessionError,
     lambda c: c.sessions.get_current_session()),
    ("checkout", "POST", "/api/stripe/checkout-sessions", PaymentsError,
     lambda c: c.payments.create_checkout_session(
         price_id="price_1", mode="payment", success_url="https://a.example/ok",
         cancel_url="https://a.example/no")),
    ("invoice", "GET", "/api/payments/crypto/invoices/inv_1", CryptoPaymentsError,
     lambda c: c.payments.crypto.get_invoice("inv_1")),
    ("usage-record", "POST", "/api/usage/record", UsageError,
     lambda c: c.usage.record_usage(feature="api_calls", quantity=1)),
    ("whitelist-check", "GET", "/api/v1/whitelist/check", WhitelistError,
     lambda c: c.whitelist.check(email="someone@example.com")),
    ("secure-message", "POST", "/api/secure-messages", SecureMessagesError,
     lambda c: c.secure_messages.create_message(patient_id="p1", practitioner_id="d1",
                                                content="hello")),
]

HTML_PAGE = "<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body>" \
            "<center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>"

# (id, status, raw body, content type)
MALFORMED: list[tuple[str, int, str, str]] = [
    ("html-502", 502, HTML_PAGE, "text/html"),
    ("html-200", 200, HTML_PAGE, "text/html"),
    ("empty-200", 200, "", "application/json"),
    ("empty-500", 500, "", "application/json"),
    ("json-array-200", 200, '[{"session_id": "cs_1"}]', "application/json"),
    ("json-string-200", 200, '"ok"', "application/json"),
    ("json-number-200", 200, "42", "application/json"),
    ("json-null-200", 200, "null", "application/json"),
    ("json-array-400", 400, '["bad request"]', "application/json"),
    ("json-string-500", 500, '"Internal Server Error"', "application/json"),
    ("data-null-200", 200, '{"success": true, "data": null}', "application/json"),
    ("data-list-200", 200, '{"success": true, "data": [1, 2]}', "application/json"),
    ("data-string-200", 200, '{"success": true, "data": "done"}', "application/json"),
    ("data-empty-200", 200, '{"data": {}}', "application/json"),
    ("fields-wrong-type-200", 200,
     '{"data": {"session_id": [], "checkout_url": {}, "user": 5, "access_token": [],'
     ' "message": [], "record_id": {}, "id": [], "invoice_id": {}, "entry": 3}}',
     "application/json"),
    ("error-text-400", 400, '{"success": false, "error": "card declined"}', "application/json"),
    ("error-null-400", 400, '{"success": false, "error": null}', "application/json"),
    ("error-number-402", 402, '{"success": false, "error": 17}', "application/json"),
    ("metadata-null-400", 400,
     '{"success": false, "error": {"code": "BAD_THING", "message": "nope"}, "metadata": null}',
     "application/json"),
    ("metadata-string-422", 422,
     '{"success": false, "error": {"code": 5, "message": ["x"]}, "metadata": "m"}',
     "application/json"),
    ("not-json-400", 400, "Bad Request", "text/plain"),
]


@pytest.mark.parametrize("case, status, body, content_type", MALFORMED,
                         ids=[m[0] for m in MALFORMED])
@pytest.mark.parametrize("name, method, path, error, call", ENDPOINTS,
                         ids=[e[0] for e in ENDPOINTS])
def test_malformed_body_raises_the_service_error(
    mock: MockServer, shared_client: SpapsClient,
    name: str, method: str, path: str, error: type[SpapsError], call: Callable[..., Any],
    case: str, status: int, body: str, content_type: str,
) -> None:
    client = shared_client
    mock.inject(method, path, {"status": status, "raw_body": body,
                                 "content_type": content_type,
                                 "headers": {"x-request-id": REQUEST_ID}})

    with pytest.raises(SpapsError) as caught:
        call(client)

    exc = caught.value
    assert type(exc) is error, f"{type(exc).__name__}: {exc}"
    assert exc.status_code == status
    assert exc.request_id == REQUEST_ID
    assert 0 < len(str(exc)) <= 600
    if status < 300:
        assert exc.error_code == "INVALID_RESPONSE"
    if case == "error-text-400":
        assert str(exc) == "card declined"
    if case == "metadata-null-400":
        assert (exc.error_code, str(exc)) == ("BAD_THING", "nope")


def test_error_body_request_id_falls_back_to_metadata(
    server: MockServer, make_client: Callable[..., SpapsClient]
) -> None:
    client = make_client()
    server.inject("GET", "/api/payments/balance", {
        "status": 404, "content_type": "application/json", "headers": {"x-request-id": ""},
        "raw_body": '{"error": {"code": "NOPE", "message": "gone"}, '
                    '"metadata": {"request_id": "req_from_body"}}',
    })

    with pytest.raises(PaymentsError) as caught:
        client.payments.get_balance()

    assert caught.value.request_id == "req_from_body"
    assert caught.value.error_code == "NOPE"


@pytest.mark.parametrize("name, method, path, error, call", ENDPOINTS,
                         ids=[e[0] for e in ENDPOINTS])
def test_truncated_body_raises_a_spaps_error(
    mock: MockServer, shared_client: SpapsClient,
    name: str, method: str, path: str, error: type[SpapsError], call: Callable[..., Any],
) -> None:
    client = shared_client
    mock.inject(method, path, {"truncate": True, "headers": {"x-request-id": REQUEST_ID}})

    with pytest.raises(SpapsError) as caught:
        call(client)

    assert isinstance(caught.value, (error, SpapsTransportError))
    # The status line and headers did arrive: they are kept for support tickets.
    assert isinstance(caught.value.status_code, int)
    assert caught.value.request_id == REQUEST_ID


@pytest.mark.parametrize("status, body", [
    (200, b'{"success": true, "data": {"session_id": "\xff\xfe", "checkout_url": "x"}}'),
    (200, b"\xc3\x28\xa0\xa1"),
    (400, b'{"success": false, "error": {"code": "BAD", "message": "\xff caf\xe9"}}'),
    (502, b"\x80\x81\x82 gateway"),
], ids=["200-json", "200-garbage", "400-json", "502-garbage"])
def test_invalid_utf8_raises_the_service_error(status: int, body: bytes) -> None:
    def respond(handler: _Handler, seen: Seen) -> None:
        handler.send(status, body)

    with RawServer(respond) as raw, raw_client(raw.url) as client, \
            pytest.raises(SpapsError) as caught:
        client.payments.create_checkout_session(
            price_id="price_1", mode="payment", success_url="https://a.example/ok",
            cancel_url="https://a.example/no")

    assert type(caught.value) is PaymentsError
    assert caught.value.status_code == status
    assert caught.value.request_id == REQUEST_ID


def stream_huge(chunked: bool) -> Responder:
    size = 17 * 1024 * 1024
    block = b"x" * 65536

    def respond(handler: _Handler, seen: Seen) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("x-request-id", REQUEST_ID)
        if chunked:
            handler.send_header("Transfer-Encoding", "chunked")
        else:
            handler.send_header("Content-Length", str(size + 2))
        handler.end_headers()

        def write(data: bytes) -> None:
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)

        write(b'["')
        sent = 0
        while sent < size and not handler.server.owner.stopping.is_set():
            write(block)
            sent += len(block)
        if chunked:
            handler.wfile.write(b"0\r\n\r\n")
        handler.close_connection = True

    return respond


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_over_16_mib_is_refused_with_a_spaps_error(chunked: bool) -> None:
    with RawServer(stream_huge(chunked)) as raw, raw_client(raw.url) as client, \
            pytest.raises(SpapsError) as caught:
        client.payments.get_balance()
    assert isinstance(caught.value, (PaymentsError, SpapsTransportError))
    assert any(word in str(caught.value) for word in ("16777216", "large", "exceed"))


def test_body_over_16_mib_error_carries_status_and_request_id() -> None:
    with RawServer(stream_huge(False)) as raw, raw_client(raw.url) as client, \
            pytest.raises(SpapsError) as caught:
        client.payments.get_balance()
    assert caught.value.status_code == 200
    assert caught.value.request_id == REQUEST_ID


def trickle(what: str) -> Responder:
    """Send the header block or the body one byte every 50 ms (about 1.5 s in all)."""
    balance = json.dumps({"success": True, "data": {
        "balance": {"available": 1.0, "pending": 0.0, "currency": "USD"}}}).encode()

    def respond(handler: _Handler, seen: Seen) -> None:
        handler.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"x-request-id: " + REQUEST_ID.encode() + b"\r\n"
                b"Content-Length: " + str(len(balance)).encode() + b"\r\n\r\n")
        payload = head + balance
        slow_from = 0 if what == "headers" else len(head)
        handler.wfile.write(payload[:slow_from])
        handler.wfile.flush()
        position = slow_from
        while position < slow_from + 30 and not handler.server.owner.stopping.is_set():
            handler.wfile.write(payload[position:position + 1])
            handler.wfile.flush()
            position += 1
            time.sleep(0.05)
        handler.wfile.write(payload[position:])
        handler.close_connection = True

    return respond


@pytest.mark.parametrize("what", ["headers", "body"])
def test_trickling_server_cannot_stretch_the_call_deadline(what: str) -> None:
    """Every byte comes within 50 ms, the whole answer in about 1.5 s: only a deadline for
    the whole response, not a timeout per read, ends a call with a 0.5 s budget."""
    with RawServer(trickle(what)) as raw, raw_client(raw.url, request_timeout=0.5) as client, \
            pytest.raises(SpapsTimeoutError):
        client.payments.get_balance()


def test_success_false_on_2xx_is_not_taken_for_success(
    server: MockServer, make_client: Callable[..., SpapsClient]
) -> None:
    client = make_client()
    server.inject("POST", "/api/stripe/checkout-sessions", {
        "status": 200, "content_type": "application/json",
        "raw_body": '{"success": false, "error": {"code": "CARD_DECLINED", "message": "no"}}',
    })

    with pytest.raises(PaymentsError) as caught:
        client.payments.create_checkout_session(
            price_id="price_1", mode="payment", success_url="https://a.example/ok",
            cancel_url="https://a.example/no")

    assert caught.value.status_code == 200
    assert caught.value.error_code == "CARD_DECLINED"
    assert str(caught.value) == "no"


@pytest.mark.parametrize("status, body", [
    (503, HTML_PAGE), (200, "[]"), (200, ""), (500, '{"error": "down"}'),
], ids=["html-503", "array-200", "empty-200", "error-text-500"])
def test_metrics_endpoints_raise_metrics_errors(
    server: MockServer, status: int, body: str
) -> None:
    server.inject("GET", "/health", {"status": status, "raw_body": body,
                                     "headers": {"x-request-id": REQUEST_ID}})
    with SpapsClient(base_url=server.url, api_key=API_KEY, retry_config=ONE_ATTEMPT) as client, \
            pytest.raises(MetricsError) as caught:
        client.metrics.health()
    assert caught.value.status_code == status
    assert caught.value.request_id == REQUEST_ID


# =============================================================================================
# Broken HTTP framing (the client speaks HTTP/1.1 on the socket itself)
# =============================================================================================

GOOD = json.dumps({"success": True, "data": {
    "balance": {"available": 42.0, "pending": 0.0, "currency": "USD"}}}).encode()
GOOD_RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nx-request-id: "
                 + REQUEST_ID.encode() + b"\r\nContent-Length: " + str(len(GOOD)).encode()
                 + b"\r\n\r\n" + GOOD)


class SocketServer:
    """Answers the first request on the wire with raw bytes, then every later one properly.

    After the raw answer the connection stays open, so a client that misreads the framing and
    keeps the connection would read the leftovers as its next response.
    """

    def __init__(self, first: bytes, *, close_after_first: bool = False) -> None:
        self.first = first
        self.close_after_first = close_after_first
        self.count = 0
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.stopping = threading.Event()

    def __enter__(self) -> SocketServer:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stopping.set()
        self.listener.close()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.settimeout(5)
        buffer = b""
        with conn:
            while not self.stopping.is_set():
                while b"\r\n\r\n" not in buffer:
                    try:
                        data = conn.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buffer) < length:
                    buffer += conn.recv(65536)
                buffer = buffer[length:]
                with self.lock:
                    self.count += 1
                    first = self.count == 1
                try:
                    conn.sendall(self.first if first else GOOD_RESPONSE)
                except OSError:
                    return
                if first and self.close_after_first:
                    return


# A well-formed answer with the wrong number: reading it as the next response is a desync.
POISON = GOOD_RESPONSE.replace(b"42.0", b"13.0")
BIG_HEADER = b"X-Filler: " + b"a" * 70_000 + b"\r\n"
FRAMING: list[tuple[str, bytes]] = [
    ("extra-bytes-after-body", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}" + POISON),
    ("body-on-204", b"HTTP/1.1 204 No Content\r\n\r\n" + POISON),
    ("body-on-304", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 0\r\n\r\n" + POISON),
    ("short-length", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n" + GOOD + POISON),
    ("conflicting-lengths", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: "
     + str(len(GOOD) + 2).encode() + b"\r\n\r\n{}" + POISON),
    ("chunked-then-extra", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"2\r\n{}\r\n0\r\n\r\n" + POISON),
    ("bad-protocol", b"HTPT/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
    ("bad-status", b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n"),
    ("no-status", b"\r\n\r\n"),
    ("header-without-colon", b"HTTP/1.1 200 OK\r\nthis is not a header\r\n\r\n"),
    ("huge-headers", b"HTTP/1.1 200 OK\r\n" + BIG_HEADER + b"Content-Length: 0\r\n\r\n"),
    ("negative-length", b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\nabc"),
    ("text-length", b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n0123456789"),
    ("chunk-size-not-hex", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"zz\r\n{}\r\n0\r\n\r\n"),
    ("chunk-too-short", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"10\r\n{}\r\n0\r\n\r\n"),
    ("chunk-huge-size", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"FFFFFFFFFFFFFFFF\r\n{}\r\n"),
    ("chunk-negative", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"-2\r\n{}\r\n0\r\n\r\n"),
    ("interim-then-garbage", b"HTTP/1.1 100 Continue\r\n\r\nnot http at all\r\n\r\n"),
    ("chunked-and-length", b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"),
    ("nul-bytes", b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n\x00\x00\x00\x00"),
]


@pytest.mark.parametrize("first", [f[1] for f in FRAMING], ids=[f[0] for f in FRAMING])
def test_broken_framing_fails_one_call_and_never_poisons_the_next(first: bytes) -> None:
    """Whatever the wire says, the call returns or raises a SpapsError within its budget, and
    the following call on the same client reads a clean response (no leftovers reused)."""
    with SocketServer(first) as raw, \
            raw_client(raw.url, request_timeout=1.0) as client:
        try:
            client.payments.get_balance()
        except SpapsError as exc:  # a wait for bytes that never come ends as SpapsTimeoutError
            assert len(str(exc)) <= 600
        after = client.payments.get_balance()
    assert after.balance.available == 42.0


def test_interim_100_continue_responses_are_skipped() -> None:
    first = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
             + GOOD_RESPONSE)
    with SocketServer(first) as raw, raw_client(raw.url) as client:
        assert client.payments.get_balance().balance.available == 42.0


def test_body_delimited_by_connection_close_is_read_whole() -> None:
    first = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + GOOD
    with SocketServer(first, close_after_first=True) as raw, raw_client(raw.url) as client:
        assert client.payments.get_balance().balance.available == 42.0
        assert client.payments.get_balance().balance.available == 42.0  # on a new connection


def test_server_closing_without_an_answer_is_a_transport_error() -> None:
    with SocketServer(b"", close_after_first=True) as raw, raw_client(raw.url) as client:
        with pytest.raises(SpapsTransportError) as caught:
            client.payments.create_checkout_session(
                price_id="price_1", mode="payment", success_url="https://a.example/ok",
                cancel_url="https://a.example/no")
        assert caught.value.status_code is None
        assert raw.count == 1  # a POST that may have been processed is not sent again


# =============================================================================================
# Redirects
# =============================================================================================


def test_same_origin_307_is_followed_with_both_credentials(
    server: MockServer, make_client: Callable[..., SpapsClient]
) -> None:
    """SPAPS answers /api/sessions with an absolute 307 to /api/sessions/ (the emulator does
    too). ``list_sessions`` asks for /api/sessions/ directly; a redirect that does come (here
    a relative 307 to /api/sessions, which the emulator itself redirects back) is followed
    hop by hop with the query and both credentials."""
    client = make_client()
    tokens = client.get_tokens()
    assert tokens is not None
    server.reset_stats()

    client.sessions.list_sessions(limit=5)
    (direct,) = server.requests
    assert (direct.path, direct.raw_query) == ("/api/sessions/", "limit=5")

    server.reset_stats()
    server.inject("GET", "/api/sessions/", {
        "status": 307, "raw_body": "", "content_type": "text/plain",
        "headers": {"Location": "/api/sessions?limit=5"}})

    listing = client.sessions.list_sessions(limit=5)

    assert listing.total >= 1
    first, second, third = server.requests
    assert (first.path, second.path, third.path) == (
        "/api/sessions/", "/api/sessions", "/api/sessions/")
    assert second.raw_query == third.raw_query == "limit=5"
    for seen in (second, third):
        assert seen.headers["x-api-key"] == API_KEY
        assert seen.headers["authorization"] == f"Bearer {tokens.access_token}"


@pytest.mark.parametrize("status", [307, 308])
@pytest.mark.parametrize("absolute", [False, True], ids=["relative", "absolute"])
def test_same_origin_307_308_keep_method_body_and_credentials(
    status: int, absolute: bool
) -> None:
    checkout = {"success": True, "data": {"id": "cs_1", "url": "https://pay.example/cs_1"}}

    def respond(handler: _Handler, seen: Seen) -> None:
        if seen.path == "/api/stripe/checkout-sessions":
            target = "/v2/checkout"
            if absolute:
                target = f"http://127.0.0.1:{handler.server.server_address[1]}{target}"
            handler.send(status, b"", headers={"Location": target})
        else:
            handler.send(200, json.dumps(checkout).encode())

    with RawServer(respond) as raw, raw_client(raw.url) as client:
        session = client.payments.create_checkout_session(
            price_id="price_1", mode="payment", success_url="https://a.example/ok",
            cancel_url="https://a.example/no")

    assert session.session_id == "cs_1"
    assert session.checkout_url == "https://pay.example/cs_1"
    first, second = raw.requests
    assert second.method == "POST" and second.path == "/v2/checkout"
    assert second.body == first.body
    assert json.loads(second.body)["line_items"] == [{"price_id": "price_1", "quantity": 1}]
    assert second.headers["x-api-key"] == API_KEY
    assert second.headers["authorization"] == "Bearer at_raw_token"


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect_to_another_origin_is_not_followed(status: int) -> None:
    with RawServer(json_reply({"success": True, "data": {}})) as other:
        def respond(handler: _Handler, seen: Seen) -> None:
            handler.send(status, b"", headers={"Location": f"{other.url}/api/sessions/"})

        with RawServer(respond) as origin, raw_client(origin.url) as client, \
                pytest.raises(SessionError) as caught:
            client.sessions.list_sessions()

    assert caught.value.status_code == status
    assert len(origin.requests) == 1
    assert other.requests == []  # neither X-API-Key nor Authorization ever reached it


def test_redirect_to_same_port_under_another_host_name_is_not_followed() -> None:
    def respond(handler: _Handler, seen: Seen) -> None:
        port = handler.server.server_address[1]
        handler.send(307, b"", headers={"Location": f"http://localhost:{port}/elsewhere"})

    with RawServer(respond) as raw, raw_client(raw.url) as client, \
            pytest.raises(SessionError):
        client.sessions.get_current_session()
    assert [seen.path for seen in raw.requests] == ["/api/sessions/current"]


def test_redirect_loop_ends_with_an_error() -> None:
    def respond(handler: _Handler, seen: Seen) -> None:
        handler.send(307, b"", headers={"Location": seen.path + "x"})

    with RawServer(respond) as raw, raw_client(raw.url) as client, \
            pytest.raises(SessionError) as caught:
        client.sessions.get_current_session()
    assert caught.value.status_code == 307
    assert 2 <= len(raw.requests) <= 10


def test_redirect_chain_cannot_stretch_the_call_deadline() -> None:
    """Five same-origin hops of 0.3 s each must not turn a 0.5 s budget into 1.5 s."""
    balance = json.dumps({"success": True, "data": {
        "balance": {"available": 1.0, "pending": 0.0, "currency": "USD"}}}).encode()

    def respond(handler: _Handler, seen: Seen) -> None:
        time.sleep(0.3)
        if seen.path.count("x") < 4:
            handler.send(307, b"", headers={"Location": seen.path + "x"})
        else:
            handler.send(200, balance)

    with RawServer(respond) as raw, raw_client(raw.url, request_timeout=0.5) as client, \
            pytest.raises(SpapsTimeoutError):
        client.payments.get_balance()
    # Each hop alone fits in 0.5 s: only the deadline shared by all of them ends the call,
    # on the second hop (0.2 s left); the hops after it are never sent.
    assert len(raw.requests) <= 2


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (made with the openssl command line)."""
    return self_signed_certificate(tmp_path_factory.mktemp("tls"), "/CN=127.0.0.1",
                                   "subjectAltName=IP:127.0.0.1")


def server_tls(files: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(files[0]), str(files[1]))
    return context


def test_https_to_http_redirect_is_never_followed(tls_files: tuple[Path, Path]) -> None:
    with RawServer(json_reply({"success": True, "data": {}})) as plain:
        def respond(handler: _Handler, seen: Seen) -> None:
            handler.send(307, b"", headers={"Location": f"{plain.url}/api/sessions/current"})

        trust = ssl.create_default_context(cafile=str(tls_files[0]))
        with RawServer(respond, tls=server_tls(tls_files)) as secure, \
                raw_client(secure.url, ssl_context=trust) as client, \
                pytest.raises(SessionError) as caught:
            client.sessions.get_current_session()

    assert caught.value.status_code == 307
    assert [seen.path for seen in secure.requests] == ["/api/sessions/current"]
    assert plain.requests == []


def test_self_signed_certificate_fails_clearly_unless_its_ca_is_given(
    tls_files: tuple[Path, Path],
) -> None:
    reply = json_reply({"success": True, "data": {
        "balance": {"available": 1, "pending": 0, "currency": "USD"}}})
    with RawServer(reply, tls=server_tls(tls_files)) as secure:
        with raw_client(secure.url, retry_config=RetryConfig(backoff_factor=0.01)) as client, \
                pytest.raises(SpapsTransportError) as caught:
            client.payments.get_balance()
        assert caught.value.retryable is False
        assert "certificate" in str(caught.value).lower()
        assert secure.requests == []

        trust = ssl.create_default_context(cafile=str(tls_files[0]))
        with raw_client(secure.url, ssl_context=trust) as client:
            assert client.payments.get_balance().balance.currency == "USD"

        # A trusted certificate for another name (it names only 127.0.0.1) is still refused.
        with raw_client(f"https://localhost:{secure.port}", ssl_context=trust) as client, \
                pytest.raises(SpapsTransportError) as mismatch:
            client.payments.get_balance()
        assert mismatch.value.retryable is False
        assert len(secure.requests) == 1


# =============================================================================================
# Secrets
# =============================================================================================

SECRET_KEY = "sk_live_SECRETKEY_0123456789"
SECRET_PASSWORD = "Pw-SECRET-correct-horse"
WRONG_PASSWORD = "Pw-SECRET-wrong-battery"


class Haystack:
    """Everything a user could see: hook arguments, exceptions, log records."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def add(self, *values: Any) -> None:
        for value in values:
            self.parts.append(repr(value))
            self.parts.append(str(value))
            for attribute in ("url", "headers", "method", "request_id", "response",
                              "__cause__", "__context__", "args"):
                inner = getattr(value, attribute, None)
                if inner is not None:
                    self.parts.append(repr(inner))
            if isinstance(value, BaseException):
                self.parts.extend(traceback.format_exception_only(type(value), value))

    def hooks(self) -> LoggingHooks:
        default = default_logging_hooks()

        def both(name: str) -> Callable[..., None]:
            def hook(*args: Any) -> None:
                self.add(*args)
                getattr(default, name)(*args)
            return hook

        return LoggingHooks(**{name: both(name) for name in (
            "on_request", "on_response", "on_error", "on_retry", "on_backoff", "on_give_up")})

    def text(self) -> str:
        return "\n".join(self.parts)


def test_secrets_never_reach_hooks_exceptions_or_logs(
    server: MockServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server.api_key = SECRET_KEY
    server.add_user("secret@example.com", SECRET_PASSWORD)
    server.add_price("price_1")
    seen = Haystack()
    secrets = [SECRET_KEY, SECRET_PASSWORD, WRONG_PASSWORD]

    def expect_error(call: Callable[[], Any]) -> None:
        try:
            call()
        except SpapsError as exc:
            seen.add(exc)
        else:
            raise AssertionError("the call was expected to fail")

    with SpapsClient(base_url=server.url, api_key=SECRET_KEY, logging_hooks=seen.hooks(),
                     retry_config=RetryConfig(backoff_factor=0.01)) as client:
        seen.add(client, client.http_client, client.settings, client.auth, client.token_storage)
        expect_error(lambda: client.auth.sign_in_with_password(
            email="secret@example.com", password=WRONG_PASSWORD))
        pair = client.auth.sign_in_with_password(email="secret@example.com",
                                                 password=SECRET_PASSWORD)
        first_access, first_refresh = pair.access_token, pair.refresh_token
        secrets += [first_access, first_refresh]
        seen.add(pair, pair.user, client.get_tokens())
        server.expire_access_tokens()
        seen.add(client.sessions.get_current_session())  # refresh + retry
        tokens = client.get_tokens()
        assert tokens is not None and tokens.refresh_token
        secrets += [tokens.access_token, tokens.refresh_token]
        seen.add(tokens)
        # SPAPS 0.6.6 serves payment intents as a 501 stub; a server that implements them
        # hands out a client secret, which must stay hidden like the tokens.
        server.inject("POST", "/api/payments/create-payment-intent", {
            "status": 200, "content_type": "application/json",
            "raw_body": json.dumps({"success": True, "data": {
                "payment_intent_id": "pi_1", "client_secret": "pi_1_secret_SECRET_abc",
                "status": "requires_payment_method"}})})
        intent = client.payments.create_payment_intent(amount=100, currency="usd")
        assert intent.client_secret == "pi_1_secret_SECRET_abc"
        secrets.append(intent.client_secret)
        seen.add(intent)
        expect_error(lambda: client.payments.create_payment_intent(amount=100, currency="usd"))
        seen.add(client.payments.create_checkout_session(
            price_id="price_1", mode="payment", success_url="https://a.example/ok",
            cancel_url="https://a.example/no"))
        server.inject("POST", "/api/stripe/checkout-sessions", {"status": 500})
        expect_error(lambda: client.payments.create_checkout_session(
            price_id="price_1", mode="payment", success_url="https://a.example/ok",
            cancel_url="https://a.example/no"))
        server.inject("GET", "/api/sessions/current", *([{"drop": "after_read"}] * 3))
        expect_error(client.sessions.get_current_session)
        server.expire_access_tokens()
        server.inject("POST", "/api/auth/refresh",
                      {"status": 401, "code": "INVALID_REFRESH_TOKEN"})
        expect_error(client.sessions.get_current_session)
        bogus = "rt_SECRET_bogus_refresh_token"
        secrets.append(bogus)
        expect_error(lambda: client.auth.refresh_tokens(refresh_token=bogus))
        # The answer itself names the e-mail (SPAPS: "Email ... is not whitelisted"): that is
        # the caller's own data, handed back to the caller. Hooks and logs, which saw the
        # request URL, must not show it.
        check = client.whitelist.check(email="private.person@example.com")
        assert check.entry is None and "private.person" in check.message
        secrets.append("private.person")  # personal data in a query string is redacted too
        recon = "recon_SECRET_token_42"
        secrets.append(recon)
        seen.add(client.payments.crypto.reconcile(recon_token=recon))

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    with SpapsClient(base_url=dead, api_key=SECRET_KEY, logging_hooks=seen.hooks(),
                     retry_config=RetryConfig(max_attempts=2, backoff_factor=0.01)) as client:
        client.set_tokens(access_token=first_access, refresh_token=first_refresh,
                          expires_in=3600)
        expect_error(client.payments.get_balance)

    for record in caplog.records:
        seen.parts.append(record.getMessage())
        seen.parts.append(repr(record.__dict__))
    assert len(caplog.records) >= 10
    haystack = seen.text()
    leaked = [secret[:12] + "..." for secret in secrets if secret in haystack]
    assert leaked == []


def test_settings_and_token_reprs_hide_secrets() -> None:
    settings = Settings(base_url="https://spaps.example", api_key=SECRET_KEY)
    assert SECRET_KEY not in repr(settings)
    with SpapsClient(base_url="https://spaps.example", api_key=SECRET_KEY) as client:
        client.set_tokens(access_token="at_SECRET_1", refresh_token="rt_SECRET_2")
        shown = repr(client) + repr(client.get_tokens()) + repr(client.auth) + repr(
            client.payments) + str(client.get_tokens())
    assert "SECRET" not in shown


def test_webhook_errors_never_show_the_secret() -> None:
    secret = "whsec_SECRET_0123456789abcdef"
    payload = {"id": "evt_1", "type": "payment.succeeded", "data": {}}
    signature = generate_test_signature(payload, secret)
    failures: list[BaseException] = []
    for attempt in (
        lambda: verify_spaps_webhook(json.dumps(payload), signature, secret + "x"),
        lambda: verify_spaps_webhook(json.dumps(payload) + " ", signature, secret),
        lambda: verify_spaps_webhook(json.dumps(payload), "t=1,v1=" + "0" * 64, secret),
        lambda: verify_crypto_webhook_signature(body=b"{}", signature="t=1,v1=00",
                                                secret=secret),
        lambda: verify_crypto_webhook_signature(body=b"{}", signature="garbage",
                                                secret=secret),
    ):
        with pytest.raises(WebhookVerificationError) as caught:
            attempt()
        failures.append(caught.value)
    shown = "".join(repr(exc) + str(exc) + repr(exc.args) for exc in failures)
    assert "SECRET" not in shown


@pytest.mark.parametrize("body, content_type", [
    (json.dumps({"success": False, "error": {"code": "X", "message": "A" * 200_000}}),
     "application/json"),
    (json.dumps({"success": False, "error": "B" * 200_000}), "application/json"),
    (json.dumps({"success": False, "message": "C" * 200_000}), "application/json"),
    ("<html>" + "D" * 500_000 + "</html>", "text/html"),
], ids=["error-message", "error-text", "top-level-message", "html"])
def test_long_server_error_messages_are_truncated(
    mock: MockServer, shared_client: SpapsClient, body: str, content_type: str
) -> None:
    client = shared_client
    mock.inject("POST", "/api/stripe/checkout-sessions",
                  {"status": 400, "raw_body": body, "content_type": content_type})

    with pytest.raises(PaymentsError) as caught:
        client.payments.create_checkout_session(
            price_id="price_1", mode="payment", success_url="https://a.example/ok",
            cancel_url="https://a.example/no")

    assert len(str(caught.value)) <= 600
    assert len(repr(caught.value)) <= 800
    assert caught.value.status_code == 400


# =============================================================================================
# Plain HTTP to non-loopback hosts
# =============================================================================================


@pytest.mark.parametrize("host", ["spaps.invalid", "192.0.2.1", "0.0.0.0"])
def test_credentials_over_plain_http_to_non_loopback_are_refused(
    server: MockServer, host: str
) -> None:
    url = f"http://{host}:{server.port}"
    wire = Wire()  # the real transport, recording whatever reaches it
    with RetryClient(base_url=url, timeout=1.0, transport=wire) as http, \
            SpapsClient(base_url=url, api_key=API_KEY, http_client=http) as client:
        with pytest.raises(SpapsConfigurationError) as caught:
            client.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
        client.set_tokens(access_token="at_x", refresh_token="rt_x", expires_in=3600)
        with pytest.raises(SpapsConfigurationError):
            client.payments.get_balance()
    assert wire.sent == []  # refused up front: no DNS, no connect
    assert "allow_insecure_http" in str(caught.value)
    assert server.connections_opened == 0 and server.requests == []


def test_insecure_http_is_allowed_after_explicit_opt_in(server: MockServer) -> None:
    # 0.0.0.0 is not a loopback name to the client, yet connecting to it reaches this host,
    # so the opt-in can be proven without leaving 127.0.0.1.
    url = f"http://0.0.0.0:{server.port}"
    with SpapsClient(base_url=url, api_key=API_KEY, allow_insecure_http=True) as client:
        pair = client.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
    assert pair.access_token
    assert server.request_count("POST", "/api/auth/login") == 1


def test_plain_http_without_credentials_is_not_refused(server: MockServer) -> None:
    with SpapsClient(base_url=f"http://0.0.0.0:{server.port}", api_key=API_KEY) as client:
        health = client.metrics.health()
    assert health["success"] is True and health["data"]["status"] == "ok"


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_plain_http_to_loopback_needs_no_opt_in(server: MockServer, host: str) -> None:
    with SpapsClient(base_url=f"http://{host}:{server.port}", api_key=API_KEY) as client:
        assert client.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
