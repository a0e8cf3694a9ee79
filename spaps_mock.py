"""A stateful, zero-dependency emulator of the SPAPS auth & payments API (think stripe-mock).

The emulator speaks the wire contract in ``spaps-api.md``: the same paths, body field names,
response envelopes and error codes, backed by real in-memory state (users, sessions, rotating
refresh tokens, balances, usage, invoices, whitelist, secure messages).  On top of that it records
every request, counts TCP connections and lets tests inject transport faults, so client retry,
keep-alive and token-refresh logic can be exercised against real sockets.

Command line (serves until SIGINT/SIGTERM)::

    python -m spaps_mock [--host 127.0.0.1] [--port 3300] [--access-token-ttl 900]
                         [--api-key KEY] [--no-seed] [--verbose]

It prints exactly one line, ``spaps_mock listening on http://HOST:PORT``, once it accepts
connections (use ``--port 0`` to pick a free port and parse the URL from that line).

In-process use::

    from spaps_mock import MockServer

    with MockServer(access_token_ttl=60) as server:
        print(server.url)                      # http://127.0.0.1:<free port>
        server.inject("POST", "/api/auth/login", {"status": 503, "retry_after": 1})
        ...                                    # drive a client against server.url
        assert server.request_count("POST", "/api/auth/login") == 2

Example pytest fixture::

    import pytest
    from spaps_mock import MockServer

    @pytest.fixture
    def spaps_server():
        with MockServer() as server:
            yield server

    def test_login(spaps_server):
        client = SpapsClient(base_url=spaps_server.url, api_key="test")
        client.auth.sign_in_with_password(email="demo@example.com", password="demo-password")
        assert spaps_server.request_count("POST", "/api/auth/login") == 1

Seeded state (``seed=True``): user ``demo@example.com`` / ``demo-password`` (username ``demo``,
tier ``basic``).  Every user gets the usage features ``api_calls`` (limit 1000) and
``storage_gb`` (limit 10), a USD balance starting at 0.0 and an active subscription ``sub_demo``.

Out-of-process control (no API key needed, never recorded in ``requests``): ``POST
/__mock__/inject`` ``{method, path, actions}``, ``POST /__mock__/clear-faults``, ``GET
/__mock__/stats``, ``POST /__mock__/reset-stats``, ``POST /__mock__/expire-tokens``, ``POST
/__mock__/close-idle``, ``POST /__mock__/users``, ``GET /__mock__/magic-link?email=``, ``GET
/__mock__/password-reset?email=``, ``POST /__mock__/config`` ``{access_token_ttl, api_key}``,
``POST /__mock__/invoices/<id>`` ``{status}``.

Fault actions for :meth:`MockServer.inject` (all keys optional, one action per matching request):

``status``        answer with this status and the error envelope instead of processing
``code``          error code for ``status`` (default ``SERVER_ERROR``, ``RATE_LIMITED`` for 429)
``message``       error message for ``status``
``retry_after``   value of a ``Retry-After`` response header
``delay``         seconds to sleep before handling
``drop``          ``"before_read"`` (reset the connection after the request head, body unread),
                  ``"after_read"`` (read everything, close without processing or answering),
                  ``"after_process"`` (process, side effects included, then close silently)
``truncate``      process, send the full ``Content-Length`` but only half the body, then close
``raw_body``      answer with this exact body (status ``status`` or 200) without processing
``content_type``  content type for ``raw_body`` (default ``text/html; charset=utf-8``)
``headers``       extra response headers
``passthrough``   process normally; only ``delay``/``headers``/``retry_after`` apply
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import http.server
import json
import math
import re
import secrets
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation
from email.utils import formatdate
from types import FrameType
from typing import Any, Callable, Deque, Dict, Mapping, Sequence, Tuple, cast
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["MockServer", "RecordedRequest", "main"]


# =================================================================================================
# Public API
# =================================================================================================


@dataclass(frozen=True)
class RecordedRequest:
    """One API request exactly as the emulator received it (control routes are not recorded).

    ``path`` is the raw request path without the query string, as sent on the wire (not
    percent-decoded); ``headers`` has lower-cased names; ``query`` is ``parse_qs`` output with
    blank values kept.  For ``drop="before_read"`` faults the body is never read, so ``body`` is
    ``b""``.
    """

    method: str
    path: str
    query: dict[str, list[str]]
    raw_query: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        """The body parsed as JSON, or ``None`` when it is empty or not valid JSON."""
        if not self.body:
            return None
        try:
            return json.loads(self.body)
        except ValueError:
            return None


class MockServer:
    """A stateful SPAPS emulator serving real HTTP/1.1 (keep-alive) on a background thread.

    ``port=0`` picks a free port; :attr:`url` is known once :meth:`start` returned.
    ``api_key=None`` accepts any non-empty ``X-API-Key``; a string must match exactly.
    ``access_token_ttl`` (seconds, may be fractional) applies to access tokens issued after it
    is set and can be changed at runtime.  ``seed=False`` starts without the demo user.
    All state lives behind one lock, so the server is safe to drive from many client threads.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        access_token_ttl: float = 900.0,
        api_key: str | None = None,
        seed: bool = True,
        verbose: bool = False,
    ) -> None:
        self.host = host
        self.port = port
        self.api_key = api_key
        self.verbose = verbose
        self._lock = threading.RLock()
        self._store = _Store(_check_ttl(access_token_ttl))
        if seed:
            self._store.create_user(
                email=_DEMO_EMAIL, password=_DEMO_PASSWORD, username="demo", tier="basic"
            )
        self._api = _Api(self)
        self._faults: dict[tuple[str, str], Deque[_Fault]] = {}
        self._requests: list[RecordedRequest] = []
        self._connections_opened = 0
        self._conns: set[_Conn] = set()
        self._metrics: dict[tuple[str, str, int], int] = {}
        self._started_at = time.time()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL such as ``http://127.0.0.1:54321`` (only once the server is started)."""
        if self._httpd is None:
            raise RuntimeError("MockServer is not running; call start() first")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> MockServer:
        """Bind the socket and serve on a daemon thread; returns ``self`` for chaining."""
        with self._lock:
            if self._httpd is not None:
                raise RuntimeError("MockServer is already running")
            httpd = _HTTPServer((self.host, self.port), self)
            self.port = httpd.server_port
            self._started_at = time.time()
            self._httpd = httpd
        thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"spaps_mock:{self.port}",
            daemon=True,
        )
        self._thread = thread
        thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, close every open connection and release the port (idempotent)."""
        with self._lock:
            httpd, thread = self._httpd, self._thread
            self._httpd, self._thread = None, None
            conns = list(self._conns)
        if httpd is None:
            return
        httpd.shutdown()
        # Handler threads block in readline() on keep-alive sockets; closing them is the only
        # way to let those threads finish instead of leaking one per pooled client connection.
        for conn in conns:
            conn.shutdown()
        httpd.server_close()
        if thread is not None:
            thread.join(timeout=5)
        for conn in conns:
            conn.done.wait(timeout=1)

    def __enter__(self) -> MockServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- instrumentation ---------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """Snapshot of every recorded API request, oldest first (faulted ones included)."""
        with self._lock:
            return list(self._requests)

    @property
    def connections_opened(self) -> int:
        """TCP connections accepted since start or the last :meth:`reset_stats`.

        A connection is counted when it carries its first API request (or closes without any
        request); connections used only for ``/__mock__/`` control calls are not counted, so
        polling stats out of process does not disturb the numbers being asserted.
        """
        with self._lock:
            return self._connections_opened

    def request_count(self, method: str, path: str) -> int:
        """Number of recorded requests with this method and exact raw path (no query)."""
        method = method.upper()
        with self._lock:
            return sum(1 for r in self._requests if r.method == method and r.path == path)

    def reset_stats(self) -> None:
        """Forget recorded requests and reset :attr:`connections_opened` to zero."""
        with self._lock:
            self._requests.clear()
            self._connections_opened = 0

    @property
    def access_token_ttl(self) -> float:
        """Lifetime in seconds of access tokens issued from now on."""
        with self._lock:
            return self._store.access_token_ttl

    @access_token_ttl.setter
    def access_token_ttl(self, value: float) -> None:
        with self._lock:
            self._store.access_token_ttl = _check_ttl(value)

    # -- state helpers -----------------------------------------------------------------------

    def add_user(self, email: str, password: str, **fields: Any) -> dict[str, Any]:
        """Create a user and return its public representation (including ``id``).

        Accepted fields: ``id``, ``username``, ``phone_number``, ``tier``, ``email_confirmed``,
        ``metadata`` and ``wallets`` (addresses or ``{wallet_address, chain_type, verified}``).
        Raises ``ValueError`` for a duplicate email/id or an unknown field.
        """
        with self._lock:
            try:
                user = self._store.create_user_from_fields(email, password, fields)
            except _ApiError as exc:
                raise ValueError(exc.message) from None
            return _admin_user(user)

    def magic_link_token(self, email: str) -> str | None:
        """The most recently issued magic-link token for ``email``, or ``None``."""
        with self._lock:
            return _latest_token(self._store.magic_links, email)

    def password_reset_token(self, email: str) -> str | None:
        """The most recently issued password-reset token for ``email``, or ``None``."""
        with self._lock:
            return _latest_token(self._store.reset_tokens, email)

    def set_invoice_status(self, invoice_id: str, status: str) -> None:
        """Move a crypto invoice to ``status`` (e.g. ``confirmed``); ``KeyError`` if unknown."""
        if not isinstance(status, str) or not status:
            raise ValueError("status must be a non-empty string")
        with self._lock:
            invoice = self._store.invoices.get(invoice_id)
            if invoice is None:
                raise KeyError(invoice_id)
            invoice.set_status(status)

    def expire_access_tokens(self) -> None:
        """Make every access token issued so far expired (later ones are unaffected)."""
        with self._lock:
            now = time.time()
            for token in self._store.access_tokens.values():
                token.expires_at = min(token.expires_at, now - 0.001)

    def close_idle_connections(self) -> int:
        """Close every keep-alive connection waiting for its next request; returns the count.

        Waits (briefly) until those sockets are fully closed, so the very next request a client
        sends on such a pooled connection deterministically hits a dead socket.
        """
        with self._lock:
            conns = list(self._conns)
        closed = [conn for conn in conns if conn.shutdown_if_idle()]
        for conn in closed:
            conn.done.wait(timeout=1)
        return len(closed)

    # -- fault injection ---------------------------------------------------------------------

    def inject(self, method: str, path: str, *actions: Mapping[str, Any]) -> None:
        """Queue fault ``actions`` for requests matching ``method`` and exact raw ``path``.

        Each matching request consumes the next action; with the queue empty the route behaves
        normally.  See the module docstring for the action keys.  Invalid actions raise
        ``ValueError`` here rather than misbehaving later.
        """
        if not isinstance(method, str) or not method:
            raise ValueError("method must be a non-empty string")
        if not isinstance(path, str) or not path.startswith("/") or "?" in path:
            raise ValueError("path must be an absolute path without a query string")
        if not actions:
            raise ValueError("inject() needs at least one action")
        parsed = [_parse_fault(action) for action in actions]
        with self._lock:
            self._faults.setdefault((method.upper(), path), deque()).extend(parsed)

    def clear_faults(self) -> None:
        """Drop every queued fault action."""
        with self._lock:
            self._faults.clear()

    # -- used by the HTTP plumbing -------------------------------------------------------------

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        with self._lock:
            queue = self._faults.get((method, path))
            if not queue:
                return None
            action = queue.popleft()
            if not queue:
                del self._faults[(method, path)]
            return action

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def _count_metric(self, method: str, route: str, status: int) -> None:
        with self._lock:
            key = (method, route, status)
            self._metrics[key] = self._metrics.get(key, 0) + 1

    def _register_conn(self, conn: _Conn) -> None:
        with self._lock:
            self._conns.add(conn)

    def _note_api_request(self, conn: _Conn) -> None:
        with self._lock:
            if not conn.counted:
                conn.counted = True
                self._connections_opened += 1

    def _unregister_conn(self, conn: _Conn) -> None:
        with self._lock:
            self._conns.discard(conn)
            if not conn.any_request and not conn.counted:
                conn.counted = True
                self._connections_opened += 1
        conn.done.set()


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: serve the emulator until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m spaps_mock", description="Stateful SPAPS API emulator."
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=3300, help="port, 0 picks a free one (3300)")
    parser.add_argument(
        "--access-token-ttl", type=float, default=900.0, help="access token lifetime in seconds"
    )
    parser.add_argument("--api-key", default=None, help="required X-API-Key (default: any)")
    parser.add_argument("--no-seed", action="store_true", help="start without the demo user")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)

    try:
        server = MockServer(
            host=args.host,
            port=args.port,
            access_token_ttl=args.access_token_ttl,
            api_key=args.api_key,
            seed=not args.no_seed,
            verbose=args.verbose,
        )
        server.start()
    except (OSError, ValueError) as exc:
        print(f"spaps_mock: cannot start on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1

    stopping = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    print(f"spaps_mock listening on {server.url}", flush=True)
    try:
        # A timed wait keeps the main thread responsive to signals on every platform.
        while not stopping.wait(0.2):
            pass
    finally:
        server.stop()
    return 0


# =================================================================================================
# Constants and small helpers
# =================================================================================================

_DEMO_EMAIL = "demo@example.com"
_DEMO_PASSWORD = "demo-password"  # noqa: S105 - the documented seeded demo login
_APP_ID = "app_mock"
_CONTROL_PREFIX = "/__mock__/"
_MIN_PASSWORD = 8
_SESSION_LIFETIME = 30 * 86400.0
_NONCE_TTL = 300.0
_MAGIC_LINK_TTL = 900.0
_RESET_TTL = 3600.0
_INVOICE_TTL = 900
_MAX_BODY = 10 * 1024 * 1024
_DEPOSIT_CONFIRMATIONS = 12
_FINAL_INVOICE_STATES = frozenset({"confirmed", "settled", "overpaid", "underpaid"})
_PAID_INVOICE_STATES = frozenset({"confirmed", "settled", "overpaid"})
_CHECKOUT_MODES = ("payment", "subscription", "setup")

# name -> (limit, description, unit price in USD used for history costs)
_FEATURES: Dict[str, Tuple[float, str, float]] = {
    "api_calls": (1000, "API calls per billing period", 0.001),
    "storage_gb": (10, "Storage in gigabytes", 0.10),
}

_ISO_TIMESTAMP = re.compile(
    r"^(\d{4}-\d{2}-\d{2})([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?)?$"
)
_DECIMAL_AMOUNT = re.compile(r"^\d+(\.\d+)?$")

_Json = Dict[str, Any]


def _check_ttl(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError("access_token_ttl must be a number >= 0")
    return float(value)


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def _new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


def _iso(ts: float) -> str:
    dt = datetime.fromtimestamp(ts, tz=timezone.utc)
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _date_of(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d")


def _month_bounds(ts: float) -> tuple[float, float]:
    dt = datetime.fromtimestamp(ts, tz=timezone.utc)
    start = datetime(dt.year, dt.month, 1, tzinfo=timezone.utc)
    end = datetime(dt.year + (dt.month == 12), dt.month % 12 + 1, 1, tzinfo=timezone.utc)
    return start.timestamp(), end.timestamp()


def _number(value: float) -> float:
    # Whole numbers are rendered as ints so that quantities like 5 do not come back as 5.0.
    return int(value) if float(value).is_integer() and abs(value) < 2**53 else value


def _latest_token(tokens: Mapping[str, _OneTimeToken], email: str) -> str | None:
    wanted = email.lower()
    for token in reversed(list(tokens.values())):
        if token.email.lower() == wanted:
            return token.token
    return None


# =================================================================================================
# Errors, responses and request validation
# =================================================================================================


class _ApiError(Exception):
    """An error answered with the SPAPS error envelope."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


@dataclass
class _Response:
    status: int
    body: bytes = b""
    content_type: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    route: str = "unmatched"


def _metadata(request_id: str) -> _Json:
    return {"request_id": request_id, "timestamp": _iso(time.time())}


def _json_response(status: int, payload: Any, headers: dict[str, str] | None = None) -> _Response:
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return _Response(status, body, "application/json", dict(headers or {}))


def _error_response(
    request_id: str, status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> _Response:
    payload = {
        "success": False,
        "error": {"code": code, "message": message},
        "metadata": _metadata(request_id),
    }
    return _json_response(status, payload, headers)


def _validation(message: str) -> _ApiError:
    return _ApiError(400, "VALIDATION_ERROR", message)


def _missing(name: str) -> _ApiError:
    return _validation(f"Field '{name}' is required")


def _req_str(body: _Json, name: str) -> str:
    value = body.get(name)
    if value is None:
        raise _missing(name)
    if not isinstance(value, str) or not value.strip():
        raise _validation(f"Field '{name}' must be a non-empty string")
    return value


def _opt_str(body: _Json, name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise _validation(f"Field '{name}' must be a string")
    return value


def _opt_bool(body: _Json, name: str) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise _validation(f"Field '{name}' must be a boolean")
    return value


def _opt_dict(body: _Json, name: str) -> _Json | None:
    value = body.get(name)
    if value is not None and not isinstance(value, dict):
        raise _validation(f"Field '{name}' must be an object")
    return value


def _req_positive(body: _Json, name: str, *, integer: bool = False) -> float:
    value = body.get(name)
    if value is None:
        raise _missing(name)
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (integer and not isinstance(value, int))
    ):
        raise _validation(f"Field '{name}' must be {'an integer' if integer else 'a number'}")
    if not math.isfinite(value) or value <= 0:
        raise _validation(f"Field '{name}' must be greater than 0")
    return value


def _req_email(body: _Json, name: str = "email") -> str:
    value = _req_str(body, name).strip()
    if "@" not in value:
        raise _validation(f"Field '{name}' must be an email address")
    return value


def _check_password(password: str) -> None:
    if len(password) < _MIN_PASSWORD:
        raise _ApiError(
            400, "WEAK_PASSWORD", f"Password must be at least {_MIN_PASSWORD} characters long"
        )


def _timestamp_date(value: str, name: str) -> str:
    match = _ISO_TIMESTAMP.match(value.strip())
    if match is None:
        raise _validation(f"Field '{name}' must be an ISO-8601 date or timestamp")
    try:
        datetime.strptime(match.group(1), "%Y-%m-%d")
    except ValueError:
        raise _validation(f"Field '{name}' is not a valid calendar date") from None
    return match.group(1)


@dataclass
class _Ctx:
    """Everything a route handler needs about the request being served."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    request_id: str
    client_ip: str
    raw_query: str = ""
    params: dict[str, str] = field(default_factory=dict)
    user_: _User | None = None
    session_: _Session | None = None
    previous_activity: float = 0.0

    @property
    def user(self) -> _User:
        if self.user_ is None:
            raise RuntimeError("route requires authentication")
        return self.user_

    @property
    def session(self) -> _Session:
        if self.session_ is None:
            raise RuntimeError("route requires authentication")
        return self.session_

    def json_body(self) -> _Json:
        if not self.body.strip():
            return {}
        try:
            value = json.loads(self.body)
        except ValueError as exc:
            raise _validation(f"Request body is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise _validation("Request body must be a JSON object")
        return value

    def query_str(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None

    def query_int(self, name: str, default: int | None) -> int | None:
        raw = self.query_str(name)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            raise _validation(f"Query parameter '{name}' must be an integer") from None
        if value < 0:
            raise _validation(f"Query parameter '{name}' must be >= 0")
        return value


def _success(ctx: _Ctx, data: Any = None, *, status: int = 200, **top: Any) -> _Response:
    payload: _Json = {"success": True}
    if data is not None:
        payload["data"] = data
    payload.update(top)
    payload["metadata"] = _metadata(ctx.request_id)
    return _json_response(status, payload)


# =================================================================================================
# Domain state
# =================================================================================================


@dataclass
class _Subscription:
    id: str
    price_id: str
    interval: str
    status: str
    current_period_start: float
    current_period_end: float
    cancel_at_period_end: bool = False

    def detail(self) -> _Json:
        return {
            "subscription_id": self.id,
            "status": self.status,
            "plan": {"price_id": self.price_id, "interval": self.interval},
            "current_period_start": _iso(self.current_period_start),
            "current_period_end": _iso(self.current_period_end),
            "cancel_at_period_end": self.cancel_at_period_end,
        }


@dataclass
class _User:
    id: str
    email: str | None
    password: str | None
    username: str | None
    phone_number: str | None
    tier: str
    email_confirmed: bool
    metadata: _Json
    wallets: list[_Json]
    created_at: float
    balance_available: float = 0.0
    balance_pending: float = 0.0
    usage: dict[str, float] = field(default_factory=lambda: {name: 0 for name in _FEATURES})
    subscriptions: dict[str, _Subscription] = field(default_factory=dict)
    deposits: dict[str, _Json] = field(default_factory=dict)
    default_payment_method: str | None = None

    def wallet_addresses(self) -> list[str]:
        return [str(w["wallet_address"]) for w in self.wallets]


@dataclass
class _Session:
    id: str
    user_id: str
    created_at: float
    expires_at: float
    last_activity: float
    user_agent: str | None
    ip_address: str | None
    refresh_token: str | None = None
    revoked: bool = False


@dataclass
class _AccessToken:
    session_id: str
    expires_at: float


@dataclass
class _Nonce:
    nonce: str
    wallet_address: str
    chain: str | None
    message: str
    expires_at: float
    used: bool = False


@dataclass
class _OneTimeToken:
    token: str
    email: str
    expires_at: float
    used: bool = False


@dataclass
class _Invoice:
    id: str
    user_id: str
    asset: str
    network: str
    amount: str
    expires_at: float
    beneficiary: _Json | None
    metadata: _Json
    status: str = "pending"
    finalized_at: float | None = None
    settlement_ids: list[str] = field(default_factory=list)

    def set_status(self, status: str) -> None:
        self.status = status
        if status in _FINAL_INVOICE_STATES and self.finalized_at is None:
            self.finalized_at = time.time()
        if status in _PAID_INVOICE_STATES and not self.settlement_ids:
            self.settlement_ids.append(_new_id("ledg_"))

    def public(self) -> _Json:
        return {
            "id": self.id,
            "asset": self.asset,
            "network": self.network,
            "amount": self.amount,
            "status": self.status,
            "expires_at": _iso(self.expires_at),
            "beneficiary": self.beneficiary,
            "metadata": self.metadata,
        }

    def status_view(self) -> _Json:
        try:
            normalized = format(Decimal(self.amount).normalize(), "f")
        except InvalidOperation:
            normalized = self.amount
        return {
            "invoice_id": self.id,
            "status": self.status,
            "finalized_at": _iso(self.finalized_at) if self.finalized_at is not None else None,
            "normalized_amount": normalized,
            "settlement_ids": list(self.settlement_ids),
            "underpaid": self.status == "underpaid",
            "overpaid": self.status == "overpaid",
        }


@dataclass
class _UsageRecord:
    user_id: str
    feature: str
    quantity: float
    date: str


class _Store:
    """All emulator state; callers must hold the server lock."""

    def __init__(self, access_token_ttl: float) -> None:
        self.access_token_ttl = access_token_ttl
        self.users: dict[str, _User] = {}
        self.user_ids_by_email: dict[str, str] = {}
        self.sessions: dict[str, _Session] = {}
        self.access_tokens: dict[str, _AccessToken] = {}
        self.refresh_tokens: dict[str, str] = {}
        self.nonces: dict[str, _Nonce] = {}
        self.magic_links: dict[str, _OneTimeToken] = {}
        self.reset_tokens: dict[str, _OneTimeToken] = {}
        self.transaction_owners: dict[str, str] = {}
        self.checkout_sessions: dict[str, _Json] = {}
        self.payment_intents: dict[str, _Json] = {}
        self.invoices: dict[str, _Invoice] = {}
        self.recon_jobs: list[_Json] = []
        self.usage_records: list[_UsageRecord] = []
        self.idempotent_usage: dict[tuple[str, str], _Json] = {}
        self.whitelist: dict[str, _Json] = {}
        self.messages: list[tuple[str, _Json]] = []

    # -- users -------------------------------------------------------------------------------

    def user_by_email(self, email: str) -> _User | None:
        user_id = self.user_ids_by_email.get(email.strip().lower())
        return self.users.get(user_id) if user_id else None

    def user_by_wallet(self, address: str) -> _User | None:
        for user in self.users.values():
            if address in user.wallet_addresses():
                return user
        return None

    def create_user(
        self,
        *,
        email: str | None,
        password: str | None,
        username: str | None = None,
        phone_number: str | None = None,
        tier: str = "basic",
        email_confirmed: bool = True,
        metadata: _Json | None = None,
        wallets: list[_Json] | None = None,
        user_id: str | None = None,
    ) -> _User:
        if email is not None and self.user_by_email(email) is not None:
            raise _ApiError(409, "EMAIL_ALREADY_EXISTS", f"A user with email {email} exists")
        user_id = user_id or _new_id("user_")
        if user_id in self.users:
            raise _ApiError(409, "USER_ALREADY_EXISTS", f"A user with id {user_id} exists")
        now = time.time()
        user = _User(
            id=user_id,
            email=email,
            password=password,
            username=username,
            phone_number=phone_number,
            tier=tier,
            email_confirmed=email_confirmed,
            metadata=dict(metadata or {}),
            wallets=list(wallets or []),
            created_at=now,
        )
        user.subscriptions["sub_demo"] = _Subscription(
            id="sub_demo",
            price_id="price_basic_monthly",
            interval="month",
            status="active",
            current_period_start=now,
            current_period_end=now + 30 * 86400,
        )
        self.users[user.id] = user
        if email is not None:
            self.user_ids_by_email[email.strip().lower()] = user.id
        return user

    def create_user_from_fields(
        self, email: Any, password: Any, fields: Mapping[str, Any]
    ) -> _User:
        """Validate loosely-typed admin input (Python kwargs or control-route JSON)."""
        allowed = {
            "id",
            "username",
            "phone_number",
            "tier",
            "email_confirmed",
            "metadata",
            "wallets",
        }
        unknown = sorted(set(fields) - allowed)
        if unknown:
            raise _validation(f"Unknown user field(s): {', '.join(unknown)}")
        body: _Json = dict(fields)
        body["email"], body["password"] = email, password
        email_value = _req_email(body)
        password_value = _req_str(body, "password")
        wallets: list[_Json] = []
        raw_wallets = body.get("wallets") or []
        if not isinstance(raw_wallets, list):
            raise _validation("Field 'wallets' must be a list")
        for item in raw_wallets:
            if isinstance(item, str):
                wallets.append({"wallet_address": item, "chain_type": "ethereum", "verified": True})
            elif isinstance(item, dict) and isinstance(item.get("wallet_address"), str):
                wallets.append({"chain_type": "ethereum", "verified": True, **item})
            else:
                raise _validation("Each wallet must be an address or {wallet_address, ...}")
        confirmed = _opt_bool(body, "email_confirmed")
        return self.create_user(
            email=email_value,
            password=password_value,
            username=_opt_str(body, "username"),
            phone_number=_opt_str(body, "phone_number"),
            tier=_opt_str(body, "tier") or "basic",
            email_confirmed=True if confirmed is None else confirmed,
            metadata=_opt_dict(body, "metadata"),
            wallets=wallets,
            user_id=_opt_str(body, "id"),
        )

    # -- sessions and tokens -----------------------------------------------------------------

    def start_session(self, user: _User, ctx: _Ctx) -> tuple[_Session, str, str]:
        now = time.time()
        session = _Session(
            id=_new_id("sess_"),
            user_id=user.id,
            created_at=now,
            expires_at=now + _SESSION_LIFETIME,
            last_activity=now,
            user_agent=ctx.headers.get("user-agent"),
            ip_address=ctx.client_ip or None,
        )
        self.sessions[session.id] = session
        return session, self.issue_access_token(session), self.issue_refresh_token(session)

    def issue_access_token(self, session: _Session) -> str:
        token = "at_" + secrets.token_urlsafe(32)
        self.access_tokens[token] = _AccessToken(session.id, time.time() + self.access_token_ttl)
        return token

    def issue_refresh_token(self, session: _Session) -> str:
        if session.refresh_token is not None:
            self.refresh_tokens.pop(session.refresh_token, None)
        token = "rt_" + secrets.token_urlsafe(32)
        session.refresh_token = token
        self.refresh_tokens[token] = session.id
        return token

    def expires_in(self) -> int:
        # Token models need an int; rounding up keeps a sub-second TTL from advertising 0.
        return math.ceil(self.access_token_ttl)

    def end_session(self, session: _Session, *, forget_tokens: bool) -> None:
        """Revoke a session; ``forget_tokens`` makes its access tokens unknown, not revoked."""
        session.revoked = True
        if session.refresh_token is not None:
            self.refresh_tokens.pop(session.refresh_token, None)
            session.refresh_token = None
        if forget_tokens:
            for token in [t for t, a in self.access_tokens.items() if a.session_id == session.id]:
                del self.access_tokens[token]

    def authenticate(self, token: str) -> tuple[_User, _Session]:
        record = self.access_tokens.get(token)
        if record is None:
            raise _ApiError(401, "INVALID_TOKEN", "Access token is invalid or has been revoked")
        session = self.sessions[record.session_id]
        if session.revoked:
            raise _ApiError(401, "SESSION_REVOKED", "The session for this token has been revoked")
        now = time.time()
        if now >= record.expires_at:
            raise _ApiError(401, "TOKEN_EXPIRED", "Access token has expired")
        if now >= session.expires_at:
            raise _ApiError(401, "INVALID_SESSION", "Session has expired")
        return self.users[session.user_id], session

    def user_sessions(self, user: _User) -> list[_Session]:
        now = time.time()
        return [
            s
            for s in self.sessions.values()
            if s.user_id == user.id and not s.revoked and s.expires_at > now
        ]


# =================================================================================================
# Response shapes
# =================================================================================================


def _token_user(user: _User) -> _Json:
    """The user inside a token pair: the registration shape plus the primary wallet."""
    first = user.wallets[0] if user.wallets else None
    return {
        **_registration_user(user),
        "wallet_address": first["wallet_address"] if first else None,
        "chain": first.get("chain_type") if first else None,
    }


def _registration_user(user: _User) -> _Json:
    return {
        "id": user.id,
        "email": user.email,
        "username": user.username,
        "phone_number": user.phone_number,
        "tier": user.tier,
        "email_confirmed": user.email_confirmed,
        "wallets": user.wallet_addresses(),
    }


def _profile(user: _User) -> _Json:
    return {
        "id": user.id,
        "username": user.username,
        "email": user.email,
        "phone_number": user.phone_number,
        "wallets": [
            {
                "wallet_address": w["wallet_address"],
                "chain_type": w.get("chain_type"),
                "verified": w.get("verified", True),
            }
            for w in user.wallets
        ],
        "tier": user.tier,
        "metadata": dict(user.metadata),
    }


def _admin_user(user: _User) -> _Json:
    view = _profile(user)
    view["email_confirmed"] = user.email_confirmed
    view["created_at"] = _iso(user.created_at)
    return view


def _token_pair(store: _Store, user: _User, access: str, refresh: str) -> _Json:
    return {
        "access_token": access,
        "refresh_token": refresh,
        "expires_in": store.expires_in(),
        "token_type": "Bearer",
        "user": _token_user(user),
    }


def _registration_tokens(store: _Store, access: str, refresh: str) -> _Json:
    return {"access_token": access, "refresh_token": refresh, "expires_in": store.expires_in()}


# =================================================================================================
# Routing and endpoint handlers
# =================================================================================================

_NO_AUTH = "none"
_API_KEY = "key"
_BEARER = "bearer"

_Handler = Callable[["_Ctx"], "_Response"]


@dataclass(frozen=True)
class _Route:
    method: str
    template: str
    pattern: re.Pattern[str]
    auth: str
    handler: _Handler


class _Api:
    """Maps requests to endpoint handlers and implements the SPAPS behaviour."""

    def __init__(self, mock: MockServer) -> None:
        self.mock = mock
        self.store = mock._store
        self.routes: list[_Route] = []
        add = self._add
        # Auth
        add("POST", "/api/auth/register", _API_KEY, self.register)
        add("POST", "/api/auth/login", _API_KEY, self.login)
        add("POST", "/api/auth/refresh", _API_KEY, self.refresh)
        add("POST", "/api/auth/logout", _BEARER, self.logout)
        add("POST", "/api/auth/nonce", _API_KEY, self.nonce)
        add("POST", "/api/auth/wallet-sign-in", _API_KEY, self.wallet_sign_in)
        add("POST", "/api/auth/magic-link", _API_KEY, self.magic_link)
        add("POST", "/api/auth/verify-magic-link", _API_KEY, self.verify_magic_link)
        add("GET", "/api/auth/user", _BEARER, self.current_user)
        add("POST", "/api/auth/password-reset", _API_KEY, self.password_reset)
        add("POST", "/api/auth/reset-password-confirm", _API_KEY, self.password_reset_confirm)
        add("POST", "/api/auth/set-password", _BEARER, self.set_password)
        # Sessions
        add("GET", "/api/sessions/current", _BEARER, self.session_current)
        add("POST", "/api/sessions/validate", _BEARER, self.session_validate)
        add("GET", "/api/sessions", _NO_AUTH, self.sessions_redirect)
        add("GET", "/api/sessions/", _BEARER, self.sessions_list)
        add("POST", "/api/sessions/touch", _BEARER, self.session_touch)
        add("DELETE", "/api/sessions/{session_id}", _BEARER, self.session_revoke)
        # Payments
        add("POST", "/api/payments/create-checkout-session", _BEARER, self.checkout_session)
        add("GET", "/api/payments/balance", _BEARER, self.balance)
        add("POST", "/api/payments/create-payment-intent", _BEARER, self.payment_intent)
        add("POST", "/api/payments/update-payment-method", _BEARER, self.update_payment_method)
        add("POST", "/api/payments/wallet-deposit", _BEARER, self.wallet_deposit)
        add(
            "GET",
            "/api/payments/wallet-transaction/{transaction_id}",
            _BEARER,
            self.wallet_transaction,
        )
        add("GET", "/api/payments/subscription/{subscription_id}", _BEARER, self.subscription)
        add("POST", "/api/payments/cancel-subscription", _BEARER, self.cancel_subscription)
        # Crypto payments
        add("POST", "/api/payments/crypto/invoices", _BEARER, self.invoice_create)
        add("GET", "/api/payments/crypto/invoices/{invoice_id}", _BEARER, self.invoice_get)
        add(
            "GET", "/api/payments/crypto/invoices/{invoice_id}/status", _BEARER, self.invoice_status
        )
        add("POST", "/api/payments/crypto/reconcile", _BEARER, self.reconcile)
        # Usage
        add("GET", "/api/usage/features", _BEARER, self.usage_features)
        add("POST", "/api/usage/record", _BEARER, self.usage_record)
        add("GET", "/api/usage/history", _BEARER, self.usage_history)
        # Whitelist
        add("GET", "/api/v1/whitelist/check", _API_KEY, self.whitelist_check)
        add("GET", "/api/v1/whitelist", _BEARER, self.whitelist_list)
        add("POST", "/api/v1/whitelist", _BEARER, self.whitelist_add)
        add("PUT", "/api/v1/whitelist/{email}", _BEARER, self.whitelist_update)
        add("DELETE", "/api/v1/whitelist/{email}", _BEARER, self.whitelist_remove)
        # Secure messages
        add("POST", "/api/secure-messages", _BEARER, self.message_create)
        add("GET", "/api/secure-messages", _BEARER, self.message_list)
        # Metrics and health
        add("GET", "/api/metrics", _NO_AUTH, self.metrics_text)
        add("GET", "/api/metrics/json", _NO_AUTH, self.metrics_json)
        add("GET", "/health", _NO_AUTH, self.health)
        add("GET", "/health/ready", _NO_AUTH, self.ready)

    def _add(self, method: str, template: str, auth: str, handler: _Handler) -> None:
        regex = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template))
        self.routes.append(_Route(method, template, re.compile(regex), auth, handler))

    # -- dispatch ----------------------------------------------------------------------------

    def resolve(self, method: str, path: str) -> tuple[_Route, dict[str, str]]:
        lookup = "GET" if method == "HEAD" else method
        allowed: list[str] = []
        for route in self.routes:
            match = route.pattern.fullmatch(path)
            if match is None:
                continue
            if route.method == lookup:
                return route, {k: unquote(v) for k, v in match.groupdict().items()}
            allowed.append(route.method)
        if allowed:
            raise _ApiError(
                405,
                "METHOD_NOT_ALLOWED",
                f"Method {method} is not allowed for {path}; use {', '.join(sorted(allowed))}",
                {"Allow": ", ".join(sorted(set(allowed)))},
            )
        raise _ApiError(404, "NOT_FOUND", f"No route for {method} {path}")

    def route_label(self, method: str, path: str) -> str:
        try:
            return self.resolve(method, path)[0].template
        except _ApiError:
            return "unmatched"

    def handle(self, ctx: _Ctx) -> _Response:
        route_label = "unmatched"
        try:
            route, ctx.params = self.resolve(ctx.method, ctx.path)
            route_label = route.template
            with self.mock._lock:
                self._authorize(route.auth, ctx)
                response = route.handler(ctx)
        except _ApiError as exc:
            response = _error_response(
                ctx.request_id, exc.status, exc.code, exc.message, exc.headers
            )
        except Exception as exc:  # a bug in the emulator must still answer like a server
            traceback.print_exc()
            response = _error_response(
                ctx.request_id, 500, "INTERNAL_ERROR", f"Mock server error: {exc!r}"
            )
        response.route = route_label
        return response

    def _authorize(self, auth: str, ctx: _Ctx) -> None:
        if auth == _NO_AUTH:
            return
        provided = ctx.headers.get("x-api-key", "")
        expected = self.mock.api_key
        if not provided:
            raise _ApiError(401, "INVALID_API_KEY", "Missing X-API-Key header")
        if expected is not None and not hmac.compare_digest(
            provided.encode("utf-8"), expected.encode("utf-8")
        ):
            raise _ApiError(401, "INVALID_API_KEY", "Invalid API key")
        if auth != _BEARER:
            return
        scheme, _, token = ctx.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _ApiError(401, "UNAUTHORIZED", "Missing or malformed Bearer token")
        user, session = self.store.authenticate(token)
        ctx.user_, ctx.session_ = user, session
        ctx.previous_activity = session.last_activity
        session.last_activity = time.time()

    # -- auth --------------------------------------------------------------------------------

    def register(self, ctx: _Ctx) -> _Response:
        body = ctx.json_body()
        email = _req_email(body)
        password = _req_str(body, "password")
        username = _opt_str(body, "username")
        phone_number = _opt_str(body, "phone_number")
        _check_password(password)
        if self.store.user_by_email(email) is not None:
            raise _ApiError(409, "EMAIL_ALREADY_EXISTS", f"A user with email {email} exists")
        user = self.store.create_user(
            email=email, password=password, username=username, phone_number=phone_number
        )
        _, access, refresh = self.store.start_session(user, ctx)
        return _success(
            ctx,
            status=201,
            message="Registration successful",
            tokens=_registration_tokens(self.store, access, refresh),
            user=_registration_user(user),
        )

    def login(self, ctx: _Ctx) -> _Response:
        body = ctx.json_body()
        email = _req_str(body, "email")
        password = _req_str(body, "password")
        user = self.store.user_by_email(email)
        if (
            user is None
            or user.password is None
            or not hmac.compare_digest(user.password.encode(), password.encode())
        ):
            raise _ApiError(401, "INVALID_CREDENTIALS", "Invalid email or password")
        _, access, refresh = self.store.start_session(user, ctx)
        return _success(ctx, _token_pair(self.store, user, access, refresh))

    def refresh(self, ctx: _Ctx) -> _Response:
        token = _req_str(ctx.json_body(), "refresh_token")
        session_id = self.store.refresh_tokens.get(token)
        session = self.store.sessions.get(session_id) if session_id else None
        if session is None or session.revoked or session.expires_at <= time.time():
            raise _ApiError(
                401, "INVALID_REFRESH", "Refresh token is invalid, expired or already used"
            )
        user = self.store.users[session.user_id]
        refresh = self.store.issue_refresh_token(session)
        access = self.store.issue_access_token(session)
        return _success(ctx, _token_pair(self.store, user, access, refresh))

    def logout(self, ctx: _Ctx) -> _Response:
        self.store.end_session(ctx.session, forget_tokens=True)
        return _success(ctx, {"message": "Logged out successfully"})

    def nonce(self, ctx: _Ctx) -> _Response:
        body = ctx.json_body()
        address = _req_str(body, "wallet_address")
        chain = _opt_str(body, "chain")
        value = secrets.token_hex(16)
        record = _Nonce(
            nonce=value,
            wallet_address=address,
            chain=chain,
            message=f"Sign in to SPAPS: {value}",
            expires_at=time.time() + _NONCE_TTL,
        )
        self.store.nonces[record.message] = record
        return _success(
            ctx,
            {
                "nonce": record.nonce,
                "message": record.message,
                "wallet_address": address,
                "expires_at": _iso(record.expires_at),
            },
        )

    def wallet_sign_in(self, ctx: _Ctx) -> _Response:
        body = ctx.json_body()
        address = _req_str(body, "wallet_address")
        _req_str(body, "signature")
        message = _req_str(body, "message")
        chain_type = _opt_str(body, "chain_type")
        record = self.store.nonces.get(message)
        # Real chain signatures cannot be checked with the stdlib; possession of an unused,
        # unexpired nonce message issued for this exact address stands in for that proof.
        if record is None or record.used or record.wallet_address != address:
            raise _ApiError(
                401, "INVALID_SIGNATURE", "Message does not match an unused nonce for this wallet"
            )
        if record.expires_at <= time.time():
            raise _ApiError(401, "INVALID_SIGNATURE", "The nonce for this message has expired")
        record.used = True
        user = self.store.user_by_wallet(address)
        if user is None:
            wallet = {
                "wallet_address": address,
                "chain_type": chain_type or record.chain or "ethereum",
                "verified": True,
            }
            user = self.store.create_user(
                email=None, password=None, email_confirmed=False, wallets=[wallet]
            )
        _, access, refresh = self.store.start_session(user, ctx)
        return _success(ctx, _token_pair(self.store, user, access, refresh))

    def magic_link(self, ctx: _Ctx) -> _Response:
        email = _req_email(ctx.json_body())
        now = time.time()
        token = "ml_" + secrets.token_urlsafe(24)
        self.store.magic_links[token] = _OneTimeToken(token, email, now + _MAGIC_LINK_TTL)
        return _success(
            ctx, {"email": email, "sent_at": _iso(now)}, message="Magic link sent to " + email
        )

    def verify_magic_link(self, ctx: _Ctx) -> _Response:
        body = ctx.json_body()
        token = _req_str(body, "token")
        _opt_str(body, "type")
        record = self.store.magic_links.get(token)
        if record is None or record.used or record.expires_at <= time.time():
            raise _ApiError(401, "INVALID_TOKEN", "Magic link token is invalid or expired")
        record.used = True
        user = self.store.user_by_email(record.email)
        if user is None:
            # Magic links double as passwordless sign-up, as on the real service.
            user = self.store.create_user(email=record.email, password=None)
        user.email_confirmed = True
        _, access, refresh = self.store.start_session(user, ctx)
        return _success(
            ctx,
            message="Magic link verified",
            tokens=_registration_tokens(self.store, access, refresh),
            user=_registration_user(user),
        )

    def current_user(self, ctx: _Ctx) -> _Response:
        return _success(ctx, {"user": _profile(ctx.user)})

    def password_reset(self, ctx: _Ctx) -> _Response:
        body = ctx.json_body()
        email = _req_email(body)
        _opt_str(body, "redirect_url")
        now = time.time()
        # The answer is identical whether or not the account exists, to avoid user enumeration.
        if self.store.user_by_email(email) is not None:
            token = "pr_" + secrets.token_urlsafe(24)
            self.store.reset_tokens[token] = _OneTimeToken(token, email, now + _RESET_TTL)
        return _success(
            ctx,
            {"email": email, "sent_at": _iso(now)},
            message="If an account exists for this email, a password reset link has been sent",
        )

    def password_reset_confirm(self, ctx: _Ctx) -> _Response:
        body = ctx.json_body()
        token = _req_str(body, "token")
        new_password = _req_str(body, "new_password")
        record = self.store.reset_tokens.get(token)
        user = self.store.user_by_email(record.email) if record is not None else None
        if record is None or record.used or record.expires_at <= time.time() or user is None:
            raise _ApiError(400, "INVALID_TOKEN", "Password reset token is invalid or expired")
        _check_password(new_password)
        record.used = True
        user.password = new_password
        return _success(ctx, message="Password has been reset successfully")

    def set_password(self, ctx: _Ctx) -> _Response:
        body = ctx.json_body()
        new_password = _req_str(body, "new_password")
        current = _opt_str(body, "current_password")
        user = ctx.user
        if user.password is not None:
            if current is None:
                raise _missing("current_password")
            if not hmac.compare_digest(user.password.encode(), current.encode()):
                raise _ApiError(401, "INVALID_CREDENTIALS", "Current password is incorrect")
        _check_password(new_password)
        user.password = new_password
        return _success(ctx, message="Password updated successfully")

    # -- sessions ----------------------------------------------------------------------------

    def session_current(self, ctx: _Ctx) -> _Response:
        session, user, now = ctx.session, ctx.user, time.time()
        return _success(
            ctx,
            {
                "session": {
                    "id": session.id,
                    "user_id": user.id,
                    "application_id": _APP_ID,
                    "tier": user.tier,
                    "created_at": _iso(session.created_at),
                    "expires_at": _iso(session.expires_at),
                    "last_activity": _iso(session.last_activity),
                    "wallets_count": len(user.wallets),
                    "duration_minutes": int((now - session.created_at) // 60),
                    "idle_minutes": int(max(0.0, now - ctx.previous_activity) // 60),
                }
            },
        )

    def session_validate(self, ctx: _Ctx) -> _Response:
        ctx.json_body()
        return _success(
            ctx,
            {
                "valid": True,
                "session_id": ctx.session.id,
                "expires_at": _iso(ctx.session.expires_at),
                "renewed": False,
            },
        )

    def sessions_redirect(self, ctx: _Ctx) -> _Response:
        location = "/api/sessions/" + (f"?{ctx.raw_query}" if ctx.raw_query else "")
        return _Response(307, headers={"Location": location})

    def sessions_list(self, ctx: _Ctx) -> _Response:
        limit = ctx.query_int("limit", None)
        starting_after = ctx.query_str("starting_after")
        sessions = self.store.user_sessions(ctx.user)
        total = len(sessions)
        if starting_after:
            ids = [s.id for s in sessions]
            if starting_after not in ids:
                raise _validation(f"starting_after: no session {starting_after!r} for this user")
            sessions = sessions[ids.index(starting_after) + 1 :]
        page = sessions if limit is None else sessions[:limit]
        return _success(
            ctx,
            {
                "sessions": [
                    {
                        "id": s.id,
                        "user_id": s.user_id,
                        "application_id": _APP_ID,
                        "created_at": _iso(s.created_at),
                        "expires_at": _iso(s.expires_at),
                        "last_used": _iso(s.last_activity),
                        "user_agent": s.user_agent,
                        "ip_address": s.ip_address,
                        "is_current": s.id == ctx.session.id,
                    }
                    for s in page
                ],
                "total": total,
                "has_more": len(page) < len(sessions),
            },
        )

    def session_touch(self, ctx: _Ctx) -> _Response:
        ctx.json_body()
        return _success(
            ctx,
            {
                "message": "Session activity updated",
                "session_id": ctx.session.id,
                "last_activity": _iso(ctx.session.last_activity),
            },
        )

    def session_revoke(self, ctx: _Ctx) -> _Response:
        session_id = ctx.params["session_id"]
        session = self.store.sessions.get(session_id)
        if session is None or session.user_id != ctx.user.id or session.revoked:
            raise _ApiError(404, "SESSION_NOT_FOUND", f"Session {session_id} not found")
        self.store.end_session(session, forget_tokens=False)
        return _success(ctx, {"message": "Session revoked", "session_id": session.id})

    # -- payments ----------------------------------------------------------------------------

    def checkout_session(self, ctx: _Ctx) -> _Response:
        body = ctx.json_body()
        price_id = _req_str(body, "price_id")
        mode = _req_str(body, "mode")
        success_url = _req_str(body, "success_url")
        cancel_url = _req_str(body, "cancel_url")
        metadata = _opt_dict(body, "metadata")
        consent = _opt_bool(body, "require_legal_consent")
        _opt_str(body, "legal_consent_text")
        if not price_id.startswith("price_"):
            raise _ApiError(400, "INVALID_PRICE", f"No such price: '{price_id}'")
        if mode not in _CHECKOUT_MODES:
            raise _validation(f"Field 'mode' must be one of {', '.join(_CHECKOUT_MODES)}")
        session_id = _new_id("cs_test_")
        expires_at = time.time() + 86400
        self.store.checkout_sessions[session_id] = {
            "user_id": ctx.user.id,
            "price_id": price_id,
            "mode": mode,
            "success_url": success_url,
            "cancel_url": cancel_url,
            "metadata": metadata or {},
            "require_legal_consent": bool(consent),
        }
        return _success(
            ctx,
            {
                "session_id": session_id,
                "checkout_url": f"https://checkout.stripe.com/c/pay/{session_id}",
                "expires_at": _iso(expires_at),
            },
        )

    def balance(self, ctx: _Ctx) -> _Response:
        user = ctx.user
        start, end = _month_bounds(time.time())
        used = user.usage["api_calls"]
        limit = _FEATURES["api_calls"][0]
        return _success(
            ctx,
            {
                "balance": {
                    "available": float(user.balance_available),
                    "pending": float(user.balance_pending),
                    "currency": "USD",
                },
                "tier": user.tier,
                "tier_expires_at": None,
                "usage": {
                    "current_period_start": _iso(start),
                    "current_period_end": _iso(end),
                    "credits_used": int(used),
                    "credits_remaining": int(max(0.0, limit - used)),
                },
            },
        )

    def payment_intent(self, ctx: _Ctx) -> _Response:
        body = ctx.json_body()
        amount = int(_req_positive(body, "amount", integer=True))
        currency = _req_str(body, "currency")
        methods = body.get("payment_method_types")
        if methods is not None and (
            not isinstance(methods, list) or not all(isinstance(m, str) for m in methods)
        ):
            raise _validation("Field 'payment_method_types' must be a list of strings")
        metadata = _opt_dict(body, "metadata")
        intent_id = _new_id("pi_")
        intent = {
            "payment_intent_id": intent_id,
            "client_secret": f"{intent_id}_secret_{secrets.token_hex(8)}",
            "status": "requires_payment_method",
            "amount": amount,
            "currency": currency.lower(),
        }
        self.store.payment_intents[intent_id] = dict(intent, metadata=metadata or {})
        return _success(ctx, intent)

    def update_payment_method(self, ctx: _Ctx) -> _Response:
        body = ctx.json_body()
        method_id = _req_str(body, "payment_method_id")
        set_default = _opt_bool(body, "set_default")
        if not method_id.startswith("pm_"):
            raise _ApiError(
                404, "PAYMENT_METHOD_NOT_FOUND", f"No such payment method: '{method_id}'"
            )
        is_default = set_default is not False
        if is_default:
            ctx.user.default_payment_method = method_id
        return _success(
            ctx,
            {
                "message": "Payment method updated",
                "payment_method_id": method_id,
                "customer_id": "cus_" + ctx.user.id.split("_", 1)[-1],
                "is_default": is_default,
            },
        )

    def wallet_deposit(self, ctx: _Ctx) -> _Response:
        body = ctx.json_body()
        address = _req_str(body, "wallet_address")
        chain_type = _req_str(body, "chain_type")
        transaction_id = _req_str(body, "transaction_id")
        amount = float(_req_positive(body, "amount"))
        currency = _req_str(body, "currency")
        tier = _opt_str(body, "tier")
        if transaction_id in self.store.transaction_owners:
            raise _ApiError(
                409, "DUPLICATE_TRANSACTION", f"Transaction {transaction_id} was already credited"
            )
        user = ctx.user
        now = time.time()
        deposit = {
            "deposit_id": _new_id("dep_"),
            "transaction_id": transaction_id,
            "wallet_address": address,
            "chain_type": chain_type,
            "currency": currency,
            "amount": amount,
            "status": "completed",
            "confirmations": _DEPOSIT_CONFIRMATIONS,
            "completed_at": _iso(now),
        }
        self.store.transaction_owners[transaction_id] = user.id
        user.deposits[transaction_id] = deposit
        user.balance_available += amount
        if tier:
            user.tier = tier
        return _success(
            ctx,
            {
                "deposit_id": deposit["deposit_id"],
                "transaction_id": transaction_id,
                "status": "completed",
                "amount": amount,
                "currency": currency,
                "confirmation_required": _DEPOSIT_CONFIRMATIONS,
                "confirmation_current": _DEPOSIT_CONFIRMATIONS,
            },
        )

    def wallet_transaction(self, ctx: _Ctx) -> _Response:
        transaction_id = ctx.params["transaction_id"]
        deposit = ctx.user.deposits.get(transaction_id)
        if deposit is None:
            raise _ApiError(404, "TRANSACTION_NOT_FOUND", f"Transaction {transaction_id} not found")
        return _success(
            ctx,
            {
                "transaction_id": transaction_id,
                "status": deposit["status"],
                "chain_type": deposit["chain_type"],
                "currency": deposit["currency"],
                "confirmations": deposit["confirmations"],
                "amount": deposit["amount"],
                "balance_added": deposit["amount"],
                "completed_at": deposit["completed_at"],
            },
        )

    def subscription(self, ctx: _Ctx) -> _Response:
        subscription_id = ctx.params["subscription_id"]
        sub = ctx.user.subscriptions.get(subscription_id)
        if sub is None:
            raise _ApiError(
                404, "SUBSCRIPTION_NOT_FOUND", f"Subscription {subscription_id} not found"
            )
        return _success(ctx, sub.detail())

    def cancel_subscription(self, ctx: _Ctx) -> _Response:
        body = ctx.json_body()
        subscription_id = _req_str(body, "subscription_id")
        at_period_end = _opt_bool(body, "cancel_at_period_end")
        sub = ctx.user.subscriptions.get(subscription_id)
        if sub is None:
            raise _ApiError(
                404, "SUBSCRIPTION_NOT_FOUND", f"Subscription {subscription_id} not found"
            )
        # Cancelling an already cancelled subscription is answered idempotently, so a retried
        # request reports the same final state instead of an error.
        if sub.status != "canceled":
            if at_period_end is None or at_period_end:
                sub.cancel_at_period_end = True
            else:
                sub.status = "canceled"
                sub.cancel_at_period_end = False
        return _success(
            ctx,
            {
                "subscription_id": sub.id,
                "status": sub.status,
                "cancel_at_period_end": sub.cancel_at_period_end,
            },
        )

    # -- crypto payments ---------------------------------------------------------------------

    def invoice_create(self, ctx: _Ctx) -> _Response:
        body = ctx.json_body()
        asset = _req_str(body, "asset")
        network = _req_str(body, "network")
        amount = body.get("amount")
        if amount is None:
            raise _missing("amount")
        if not isinstance(amount, str) or not _DECIMAL_AMOUNT.match(amount.strip()):
            raise _validation("Field 'amount' must be a decimal string such as \"42.75\"")
        if Decimal(amount) <= 0:
            raise _validation("Field 'amount' must be greater than 0")
        ttl = body.get("expires_in_seconds")
        if ttl is None:
            ttl = _INVOICE_TTL
        elif isinstance(ttl, bool) or not isinstance(ttl, int) or ttl <= 0:
            raise _validation("Field 'expires_in_seconds' must be a positive integer")
        invoice = _Invoice(
            id=_new_id("inv_"),
            user_id=ctx.user.id,
            asset=asset,
            network=network,
            amount=amount.strip(),
            expires_at=time.time() + ttl,
            beneficiary=_opt_dict(body, "beneficiary"),
            metadata=_opt_dict(body, "metadata") or {},
        )
        self.store.invoices[invoice.id] = invoice
        return _success(ctx, {"invoice": invoice.public()}, status=201)

    def _own_invoice(self, ctx: _Ctx) -> _Invoice:
        invoice_id = ctx.params["invoice_id"]
        invoice = self.store.invoices.get(invoice_id)
        if invoice is None or invoice.user_id != ctx.user.id:
            raise _ApiError(404, "INVOICE_NOT_FOUND", f"Invoice {invoice_id} not found")
        return invoice

    def invoice_get(self, ctx: _Ctx) -> _Response:
        return _success(ctx, {"invoice": self._own_invoice(ctx).public()})

    def invoice_status(self, ctx: _Ctx) -> _Response:
        return _success(ctx, self._own_invoice(ctx).status_view())

    def reconcile(self, ctx: _Ctx) -> _Response:
        body = ctx.json_body()
        cursor = body.get("cursor")
        own = [i for i in self.store.invoices.values() if i.user_id == ctx.user.id]
        job = {
            "job_id": _new_id("job_"),
            "scheduled_at": _iso(time.time()),
            "cursor": {"last_invoice_id": own[-1].id} if own else None,
        }
        self.store.recon_jobs.append(
            dict(job, requested_cursor=cursor, recon_token=ctx.headers.get("x-recon-token"))
        )
        return _success(ctx, job)

    # -- usage -------------------------------------------------------------------------------

    def usage_features(self, ctx: _Ctx) -> _Response:
        user = ctx.user
        start, end = _month_bounds(time.time())
        features = []
        overage: _Json = {}
        for name, (limit, description, price) in _FEATURES.items():
            used = user.usage[name]
            features.append(
                {
                    "name": name,
                    "description": description,
                    "used": _number(used),
                    "limit": _number(limit),
                    "percentage": round(used / limit * 100, 2),
                    "reset_at": _iso(end),
                }
            )
            if used > limit:
                overage[name] = {"quantity": _number(used - limit), "cost": (used - limit) * price}
        return _success(
            ctx,
            {
                "user_id": user.id,
                "tier": user.tier,
                "period": {"start": _iso(start), "end": _iso(end)},
                "features": features,
                "overage": overage,
            },
        )

    def usage_record(self, ctx: _Ctx) -> _Response:
        user = ctx.user
        key = ctx.headers.get("x-idempotency-key", "")
        if key and (user.id, key) in self.store.idempotent_usage:
            return _success(ctx, self.store.idempotent_usage[(user.id, key)])
        body = ctx.json_body()
        feature = _req_str(body, "feature")
        quantity = _req_positive(body, "quantity")
        _opt_dict(body, "metadata")
        timestamp = _opt_str(body, "timestamp")
        if feature not in _FEATURES:
            raise _ApiError(404, "FEATURE_NOT_FOUND", f"Unknown usage feature '{feature}'")
        now = time.time()
        date = _timestamp_date(timestamp, "timestamp") if timestamp else _date_of(now)
        user.usage[feature] += quantity
        used = user.usage[feature]
        limit = _FEATURES[feature][0]
        percentage = used / limit * 100
        record = {
            "record_id": _new_id("usage_"),
            "feature": feature,
            "quantity": _number(quantity),
            "recorded_at": _iso(now),
            "current_usage": {
                "used": _number(used),
                "limit": _number(limit),
                "remaining": _number(max(0, limit - used)),
            },
            "warning": (
                f"{feature} usage is at {percentage:.0f}% of the limit" if percentage > 80 else None
            ),
        }
        self.store.usage_records.append(_UsageRecord(user.id, feature, quantity, date))
        if key:
            self.store.idempotent_usage[(user.id, key)] = record
        return _success(ctx, record)

    def usage_history(self, ctx: _Ctx) -> _Response:
        period = ctx.query_str("period") or None
        start = ctx.query_str("start_date") or None
        end = ctx.query_str("end_date") or None
        feature = ctx.query_str("feature") or None
        start_key = _timestamp_date(start, "start_date") if start else None
        end_key = _timestamp_date(end, "end_date") if end else None
        by_date: dict[str, dict[str, float]] = {}
        totals: dict[str, float] = {}
        count = 0
        for rec in self.store.usage_records:
            if rec.user_id != ctx.user.id or (feature and rec.feature != feature):
                continue
            if (start_key and rec.date < start_key) or (end_key and rec.date > end_key):
                continue
            count += 1
            day = by_date.setdefault(rec.date, {})
            day[rec.feature] = day.get(rec.feature, 0) + rec.quantity
            totals[rec.feature] = totals.get(rec.feature, 0) + rec.quantity
        history: list[_Json] = [
            {
                "date": date,
                "features": {name: _number(qty) for name, qty in day.items()},
                "total_cost": round(sum(q * _FEATURES[n][2] for n, q in day.items()), 6),
            }
            for date, day in sorted(by_date.items())
        ]
        dates = sorted(by_date)
        return _success(
            ctx,
            {
                "period": period,
                "start_date": start or (dates[0] if dates else None),
                "end_date": end or (dates[-1] if dates else None),
                "history": history,
                "summary": {
                    "total_records": count,
                    "total_quantity": _number(sum(totals.values())),
                    "total_cost": round(sum(h["total_cost"] for h in history), 6),
                    "features": {name: _number(qty) for name, qty in totals.items()},
                },
            },
        )

    # -- whitelist ---------------------------------------------------------------------------

    def whitelist_check(self, ctx: _Ctx) -> _Response:
        email = ctx.query_str("email")
        if not email:
            raise _validation("Query parameter 'email' is required")
        entry = self.store.whitelist.get(email.strip().lower())
        if entry is None:
            return _success(ctx, {"message": "Email is not whitelisted"})
        return _success(ctx, {"message": "Email is whitelisted", "entry": dict(entry)})

    def whitelist_list(self, ctx: _Ctx) -> _Response:
        limit = ctx.query_int("limit", 10)
        offset = ctx.query_int("offset", 0) or 0
        tier = ctx.query_str("tier") or None
        entries = [e for e in self.store.whitelist.values() if tier is None or e["tier"] == tier]
        page = entries[offset:] if limit is None else entries[offset : offset + limit]
        return _success(ctx, {"entries": [dict(e) for e in page], "total": len(entries)})

    def whitelist_add(self, ctx: _Ctx) -> _Response:
        body = ctx.json_body()
        email = _req_email(body)
        tier = _opt_str(body, "tier") or "premium"
        bypass = _opt_bool(body, "bypass_payment")
        metadata = _opt_dict(body, "metadata")
        key = email.lower()
        now = _iso(time.time())
        existing = self.store.whitelist.get(key)
        # Adding an already whitelisted email updates it, so retried adds are harmless.
        entry = {
            "email": email,
            "application_id": _APP_ID,
            "tier": tier,
            "bypass_payment": True if bypass is None else bypass,
            "metadata": metadata if metadata is not None else {},
            "created_at": existing["created_at"] if existing else now,
            "updated_at": now,
        }
        self.store.whitelist[key] = entry
        message = "Whitelist entry updated" if existing else "Email added to whitelist"
        status = 200 if existing else 201
        return _success(ctx, {"message": message, "entry": dict(entry)}, status=status)

    def _whitelist_entry(self, ctx: _Ctx) -> tuple[str, _Json]:
        email = ctx.params["email"]
        entry = self.store.whitelist.get(email.strip().lower())
        if entry is None:
            raise _ApiError(404, "NOT_FOUND", f"{email} is not whitelisted")
        return email.strip().lower(), entry

    def whitelist_update(self, ctx: _Ctx) -> _Response:
        body = ctx.json_body()
        tier = _opt_str(body, "tier")
        bypass = _opt_bool(body, "bypass_payment")
        metadata = _opt_dict(body, "metadata")
        _, entry = self._whitelist_entry(ctx)
        if tier is not None:
            entry["tier"] = tier
        if bypass is not None:
            entry["bypass_payment"] = bypass
        if metadata is not None:
            entry["metadata"] = metadata
        entry["updated_at"] = _iso(time.time())
        return _success(ctx, {"message": "Whitelist entry updated", "entry": dict(entry)})

    def whitelist_remove(self, ctx: _Ctx) -> _Response:
        key, _ = self._whitelist_entry(ctx)
        del self.store.whitelist[key]
        return _success(ctx, {"message": "Email removed from whitelist"})

    # -- secure messages ---------------------------------------------------------------------

    def message_create(self, ctx: _Ctx) -> _Response:
        body = ctx.json_body()
        values: dict[str, str] = {}
        for camel, snake in (
            ("patientId", "patient_id"),
            ("practitionerId", "practitioner_id"),
            ("content", "content"),
        ):
            if body.get(camel) is None and body.get(snake) is not None:
                raise _validation(
                    f"Field '{camel}' is required (request keys are camelCase, got '{snake}')"
                )
            values[snake] = _req_str(body, camel)
        message = {
            "id": f"msg-{uuid.uuid4()}",
            "application_id": _APP_ID,
            **values,
            "metadata": _opt_dict(body, "metadata") or {},
            "created_at": _iso(time.time()),
        }
        self.store.messages.append((ctx.user.id, message))
        return _success(ctx, dict(message), status=201)

    def message_list(self, ctx: _Ctx) -> _Response:
        mine = [dict(m) for owner, m in self.store.messages if owner == ctx.user.id]
        return _success(ctx, {"messages": mine})

    # -- metrics and health ------------------------------------------------------------------

    def _metric_snapshot(self) -> list[tuple[tuple[str, str, int], int]]:
        return sorted(self.mock._metrics.items())

    def metrics_text(self, ctx: _Ctx) -> _Response:
        lines = [
            "# HELP spaps_mock_http_requests_total HTTP requests answered by the mock.",
            "# TYPE spaps_mock_http_requests_total counter",
        ]
        for (method, route, status), count in self._metric_snapshot():
            route_label = route.replace("\\", "\\\\").replace('"', '\\"')
            lines.append(
                f'spaps_mock_http_requests_total{{method="{method}",route="{route_label}",'
                f'status="{status}"}} {count}'
            )
        lines += [
            "# HELP spaps_mock_uptime_seconds Seconds since the mock started.",
            "# TYPE spaps_mock_uptime_seconds gauge",
            f"spaps_mock_uptime_seconds {time.time() - self.mock._started_at:.3f}",
            "# HELP spaps_mock_users Users known to the mock.",
            "# TYPE spaps_mock_users gauge",
            f"spaps_mock_users {len(self.store.users)}",
            "# HELP spaps_mock_active_sessions Sessions that are neither revoked nor expired.",
            "# TYPE spaps_mock_active_sessions gauge",
            f"spaps_mock_active_sessions {self._active_sessions()}",
        ]
        body = ("\n".join(lines) + "\n").encode("utf-8")
        return _Response(200, body, "text/plain; version=0.0.4; charset=utf-8")

    def _active_sessions(self) -> int:
        now = time.time()
        return sum(1 for s in self.store.sessions.values() if not s.revoked and s.expires_at > now)

    def metrics_json(self, ctx: _Ctx) -> _Response:
        by_route: dict[str, int] = {}
        for (method, route, _), count in self._metric_snapshot():
            key = f"{method} {route}"
            by_route[key] = by_route.get(key, 0) + count
        return _json_response(
            200,
            {
                "uptime_seconds": round(time.time() - self.mock._started_at, 3),
                "requests_total": sum(by_route.values()),
                "requests_by_route": by_route,
                "users": len(self.store.users),
                "active_sessions": self._active_sessions(),
            },
        )

    def health(self, ctx: _Ctx) -> _Response:
        return _json_response(200, {"status": "healthy"})

    def ready(self, ctx: _Ctx) -> _Response:
        return _json_response(200, {"ready": True})

    # -- control routes (/__mock__/...) ------------------------------------------------------

    def control(self, method: str, path: str, raw_query: str, body: bytes, rid: str) -> _Response:
        query = parse_qs(raw_query, keep_blank_values=True)
        ctx = _Ctx(method, path, query, {}, body, rid, "", raw_query)
        mock = self.mock
        name = path[len(_CONTROL_PREFIX) :]
        try:
            if name.startswith("invoices/") and method == "POST":
                invoice_id = unquote(name[len("invoices/") :])
                status = _req_str(ctx.json_body(), "status")
                try:
                    mock.set_invoice_status(invoice_id, status)
                except KeyError:
                    raise _ApiError(404, "NOT_FOUND", f"Invoice {invoice_id} not found") from None
                return _json_response(200, {"invoice_id": invoice_id, "status": status})
            handler = {
                ("POST", "inject"): self._control_inject,
                ("POST", "clear-faults"): self._control_clear_faults,
                ("GET", "stats"): self._control_stats,
                ("POST", "reset-stats"): self._control_reset_stats,
                ("POST", "expire-tokens"): self._control_expire_tokens,
                ("POST", "close-idle"): self._control_close_idle,
                ("POST", "users"): self._control_users,
                ("GET", "magic-link"): self._control_magic_link,
                ("GET", "password-reset"): self._control_password_reset,
                ("POST", "config"): self._control_config,
                ("GET", "config"): self._control_config,
            }.get((method, name))
            if handler is None:
                raise _ApiError(404, "NOT_FOUND", f"No control route {method} {path}")
            return handler(ctx)
        except _ApiError as exc:
            return _error_response(rid, exc.status, exc.code, exc.message)

    def _control_inject(self, ctx: _Ctx) -> _Response:
        body = ctx.json_body()
        method = _req_str(body, "method")
        path = _req_str(body, "path")
        actions = body.get("actions")
        if not isinstance(actions, list) or not all(isinstance(a, dict) for a in actions):
            raise _validation("Field 'actions' must be a list of objects")
        try:
            self.mock.inject(method, path, *actions)
        except ValueError as exc:
            raise _validation(str(exc)) from None
        return _json_response(200, {"ok": True, "queued": len(actions)})

    def _control_clear_faults(self, ctx: _Ctx) -> _Response:
        self.mock.clear_faults()
        return _json_response(200, {"ok": True})

    def _control_stats(self, ctx: _Ctx) -> _Response:
        requests = self.mock.requests
        counts: dict[str, int] = {}
        for r in requests:
            counts[f"{r.method} {r.path}"] = counts.get(f"{r.method} {r.path}", 0) + 1
        return _json_response(
            200,
            {
                "connections_opened": self.mock.connections_opened,
                "requests": [
                    {
                        "method": r.method,
                        "path": r.path,
                        "query": r.raw_query,
                        "headers": r.headers,
                        "body": r.body.decode("utf-8", "replace"),
                    }
                    for r in requests
                ],
                "counts": counts,
            },
        )

    def _control_reset_stats(self, ctx: _Ctx) -> _Response:
        self.mock.reset_stats()
        return _json_response(200, {"ok": True})

    def _control_expire_tokens(self, ctx: _Ctx) -> _Response:
        self.mock.expire_access_tokens()
        return _json_response(200, {"ok": True})

    def _control_close_idle(self, ctx: _Ctx) -> _Response:
        return _json_response(200, {"closed": self.mock.close_idle_connections()})

    def _control_users(self, ctx: _Ctx) -> _Response:
        body = ctx.json_body()
        fields = {k: v for k, v in body.items() if k not in ("email", "password")}
        with self.mock._lock:
            user = self.store.create_user_from_fields(
                body.get("email"), body.get("password"), fields
            )
            return _json_response(201, _admin_user(user))

    def _control_token(self, ctx: _Ctx, tokens: Mapping[str, _OneTimeToken]) -> _Response:
        email = ctx.query_str("email")
        if not email:
            raise _validation("Query parameter 'email' is required")
        with self.mock._lock:
            return _json_response(200, {"email": email, "token": _latest_token(tokens, email)})

    def _control_magic_link(self, ctx: _Ctx) -> _Response:
        return self._control_token(ctx, self.store.magic_links)

    def _control_password_reset(self, ctx: _Ctx) -> _Response:
        return self._control_token(ctx, self.store.reset_tokens)

    def _control_config(self, ctx: _Ctx) -> _Response:
        body = ctx.json_body() if ctx.method == "POST" else {}
        if "access_token_ttl" in body:
            try:
                self.mock.access_token_ttl = body["access_token_ttl"]
            except ValueError as exc:
                raise _validation(str(exc)) from None
        if "api_key" in body:
            self.mock.api_key = _opt_str(body, "api_key")
        return _json_response(
            200, {"access_token_ttl": self.mock.access_token_ttl, "api_key": self.mock.api_key}
        )


# =================================================================================================
# Fault injection
# =================================================================================================

_FAULT_KEYS = frozenset(
    {
        "status",
        "code",
        "message",
        "retry_after",
        "delay",
        "drop",
        "truncate",
        "raw_body",
        "content_type",
        "headers",
        "passthrough",
    }
)
_DROP_MODES = ("before_read", "after_read", "after_process")


@dataclass(frozen=True)
class _Fault:
    status: int | None = None
    code: str | None = None
    message: str | None = None
    retry_after: str | None = None
    delay: float = 0.0
    drop: str | None = None
    truncate: bool = False
    raw_body: str | None = None
    content_type: str = "text/html; charset=utf-8"
    headers: Tuple[Tuple[str, str], ...] = ()
    passthrough: bool = False

    def response_headers(self) -> dict[str, str]:
        headers = dict(self.headers)
        if self.retry_after is not None:
            headers["Retry-After"] = self.retry_after
        return headers

    def replacement(self, request_id: str) -> _Response | None:
        """The response that replaces normal processing, or None to process the request."""
        if self.passthrough:
            return None
        if self.raw_body is not None:
            return _Response(self.status or 200, self.raw_body.encode("utf-8"), self.content_type)
        if self.status is not None:
            default = "RATE_LIMITED" if self.status == 429 else "SERVER_ERROR"
            message = self.message or f"Injected fault: HTTP {self.status}"
            return _error_response(request_id, self.status, self.code or default, message)
        return None


def _parse_fault(action: Mapping[str, Any]) -> _Fault:
    if not isinstance(action, Mapping):
        raise ValueError("each fault action must be a dict")
    unknown = sorted(set(action) - _FAULT_KEYS)
    if unknown:
        raise ValueError(f"unknown fault action key(s): {', '.join(unknown)}")
    status = action.get("status")
    if status is not None and (
        isinstance(status, bool) or not isinstance(status, int) or not 200 <= status <= 599
    ):
        raise ValueError("'status' must be an int between 200 and 599")
    for key in ("code", "message", "raw_body", "content_type"):
        if action.get(key) is not None and not isinstance(action[key], str):
            raise ValueError(f"'{key}' must be a string")
    retry_after = action.get("retry_after")
    if retry_after is not None and (
        isinstance(retry_after, bool) or not isinstance(retry_after, (str, int, float))
    ):
        raise ValueError("'retry_after' must be a string or a number")
    delay = action.get("delay") or 0.0
    if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not delay >= 0:
        raise ValueError("'delay' must be a number of seconds >= 0")
    drop = action.get("drop")
    if drop is not None and drop not in _DROP_MODES:
        raise ValueError(f"'drop' must be one of {', '.join(_DROP_MODES)}")
    headers = action.get("headers") or {}
    if not isinstance(headers, Mapping) or not all(isinstance(k, str) for k in headers):
        raise ValueError("'headers' must be a dict of header name -> value")
    for key in ("truncate", "passthrough"):
        if not isinstance(action.get(key, False), bool):
            raise ValueError(f"'{key}' must be a boolean")
    return _Fault(
        status=status,
        code=action.get("code"),
        message=action.get("message"),
        retry_after=None if retry_after is None else str(retry_after),
        delay=float(delay),
        drop=drop,
        truncate=bool(action.get("truncate", False)),
        raw_body=action.get("raw_body"),
        content_type=action.get("content_type") or "text/html; charset=utf-8",
        headers=tuple((k, str(v)) for k, v in headers.items()),
        passthrough=bool(action.get("passthrough", False)),
    )


# =================================================================================================
# HTTP plumbing
# =================================================================================================


class _BodyError(Exception):
    """The request body could not be read; ``respond`` says whether a 400 can still be sent."""

    def __init__(self, message: str, *, respond: bool) -> None:
        super().__init__(message)
        self.respond = respond


class _Conn:
    """Book-keeping for one accepted TCP connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        # ``idle`` flips to True in the same critical section that writes a response, so a
        # client that has read its response can rely on close_idle_connections() seeing it idle,
        # and that call can never cut a response short.
        self.lock = threading.Lock()
        self.idle = True
        self.counted = False
        self.any_request = False
        self.done = threading.Event()

    def mark_busy(self) -> None:
        with self.lock:
            self.idle = False

    def shutdown(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def shutdown_if_idle(self) -> bool:
        with self.lock:
            if self.idle:
                self.shutdown()
            return self.idle


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # Concurrency tests open many connections at once; a tiny backlog would stall them in SYN
    # retransmits (about a second each).
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], mock: MockServer) -> None:
        self.mock = mock
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _RequestHandler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind() resolves the host with getfqdn(), which can stall for
        # seconds on hosts without working reverse DNS; the name is never needed here.
        socketserver.TCPServer.server_bind(self)
        address = cast(Tuple[Any, ...], self.server_address)
        self.server_name = str(address[0])
        self.server_port = int(address[1])


class _RequestHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "spaps_mock"
    sys_version = ""

    _mock: MockServer
    _conn: _Conn

    def setup(self) -> None:
        super().setup()
        self._mock = cast(_HTTPServer, self.server).mock
        self._conn = _Conn(self.connection)
        with contextlib.suppress(OSError):
            # Small request/response exchanges otherwise hit Nagle + delayed-ACK stalls.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._mock._register_conn(self._conn)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self._mock._unregister_conn(self._conn)

    def log_message(self, format: str, *args: Any) -> None:
        if self._mock.verbose:
            super().log_message(format, *args)

    def handle_one_request(self) -> None:
        # Re-implemented (rather than inherited) to flag the connection busy as soon as a
        # request line arrives; _send() flags it idle again, see _Conn.
        try:
            line = self.rfile.readline(65537)
        except (OSError, ValueError):
            line = b""
        self._conn.mark_busy()
        if not line:
            self.close_connection = True
            return
        self.raw_requestline = line
        if len(line) > 65536:
            self.requestline, self.request_version, self.command = "", "", ""
            self.send_error(414)
            return
        if not self.parse_request():
            return
        try:
            self._dispatch()
            self.wfile.flush()
        except (OSError, ValueError):
            self.close_connection = True

    # -- request processing ------------------------------------------------------------------

    def _dispatch(self) -> None:
        mock = self._mock
        method = self.command.upper()
        raw_path, raw_query = _split_target(self.path)
        headers = {name.lower(): value for name, value in self.headers.items()}
        request_id = _new_request_id()
        self._conn.any_request = True

        if raw_path.startswith(_CONTROL_PREFIX):
            try:
                body = self._read_body()
            except _BodyError as exc:
                self._fail_body(exc, request_id, method)
                return
            response = mock._api.control(method, raw_path, raw_query, body, request_id)
            self._send(response, request_id, method)
            return

        mock._note_api_request(self._conn)
        fault = mock._take_fault(method, raw_path)
        query = parse_qs(raw_query, keep_blank_values=True)

        def record(body: bytes) -> None:
            mock._record(RecordedRequest(method, raw_path, query, raw_query, headers, body))

        if fault is not None and fault.drop == "before_read":
            record(b"")
            time.sleep(fault.delay)
            self._reset_connection()
            return
        try:
            body = self._read_body()
        except _BodyError as exc:
            record(b"")
            self._fail_body(exc, request_id, method)
            return
        record(body)
        if fault is not None:
            time.sleep(fault.delay)
            if fault.drop == "after_read":
                self.close_connection = True
                return

        replacement = fault.replacement(request_id) if fault is not None else None
        if replacement is None:
            client_ip = str(self.client_address[0])
            ctx = _Ctx(method, raw_path, query, headers, body, request_id, client_ip, raw_query)
            response = mock._api.handle(ctx)
        else:
            response = replacement
            response.route = mock._api.route_label(method, raw_path)
        if fault is not None:
            response.headers.update(fault.response_headers())
        mock._count_metric(method, response.route, response.status)

        if fault is not None and fault.drop == "after_process":
            self.close_connection = True
            return
        self._send(response, request_id, method, truncate=fault is not None and fault.truncate)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        raw_length = self.headers.get("Content-Length")
        if raw_length is None:
            return b""
        try:
            length = int(raw_length)
        except ValueError:
            raise _BodyError("Invalid Content-Length header", respond=True) from None
        if length < 0 or length > _MAX_BODY:
            raise _BodyError("Unsupported Content-Length", respond=True)
        body = self.rfile.read(length)
        if len(body) != length:
            raise _BodyError("Connection closed before the body was complete", respond=False)
        return body

    def _read_chunked(self) -> bytes:
        chunks: list[bytes] = []
        total = 0
        while True:
            size_line = self.rfile.readline(1024)
            if not size_line:
                raise _BodyError("Connection closed inside a chunked body", respond=False)
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _BodyError("Malformed chunk size", respond=True) from None
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailer fields are irrelevant to the emulator
                return b"".join(chunks)
            total += size
            if total > _MAX_BODY:
                raise _BodyError("Request body too large", respond=True)
            chunks.append(self.rfile.read(size))
            self.rfile.readline(3)

    def _fail_body(self, exc: _BodyError, request_id: str, method: str) -> None:
        # The stream position is unknown after a bad body, so the connection cannot be reused.
        self.close_connection = True
        if exc.respond:
            response = _error_response(request_id, 400, "VALIDATION_ERROR", str(exc))
            self._send(response, request_id, method)

    def _reset_connection(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            # Linger 0 turns close() into an RST instead of an orderly FIN.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # The socket only really closes once the buffered reader's reference is gone as well.
        self.connection.close()
        self.rfile.close()

    def _send(
        self, response: _Response, request_id: str, method: str, *, truncate: bool = False
    ) -> None:
        body = response.body
        if response.status in (204, 304):
            body = b""
        headers: dict[str, tuple[str, str]] = {}

        def put(name: str, value: str) -> None:
            headers[name.lower()] = (name, value)

        put("Date", formatdate(usegmt=True))
        put("Server", self.server_version)
        if response.content_type:
            put("Content-Type", response.content_type)
        put("Content-Length", str(len(body)))
        put("x-request-id", request_id)
        for name, value in response.headers.items():
            put(name, value)
        if truncate:
            self.close_connection = True
        if self.close_connection:
            put("Connection", "close")
        reason = self.responses.get(response.status, ("Unknown", ""))[0]
        head = f"{self.protocol_version} {response.status} {reason}\r\n"
        head += "".join(f"{name}: {value}\r\n" for name, value in headers.values()) + "\r\n"
        payload = head.encode("latin-1", "replace")
        if method != "HEAD":
            payload += body[: len(body) // 2] if truncate else body
        with self._conn.lock:
            try:
                # One write per response: headers and body in separate segments invite delays.
                self.wfile.write(payload)
                self.wfile.flush()
            except OSError:
                self.close_connection = True
            self._conn.idle = not self.close_connection
        self.log_request(response.status, len(body))


def _split_target(target: str) -> tuple[str, str]:
    if not target.startswith("/"):
        parts = urlsplit(target)
        return parts.path or "/", parts.query
    path, _, query = target.partition("?")
    return path.partition("#")[0], query.partition("#")[0]


if __name__ == "__main__":
    sys.exit(main())
