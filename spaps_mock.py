"""A stateful, zero-dependency emulator of the SPAPS auth & payments API (think stripe-mock).

The emulator answers like the real server, ``spaps-server-quickstart`` 0.6.6, as measured on the
wire (``tests/test_fidelity.py`` compares the two call by call): the same paths, body fields,
status codes, envelopes and error codes, backed by real in-memory state (users, sessions,
rotating refresh tokens, entitlements and usage, invoices, whitelist, memberships, secure
messages).  On top of that it records every request, counts TCP connections and lets tests
inject transport faults, so client retry, keep-alive and token-refresh logic can be exercised
against real sockets.

What it reproduces of the real server:

* Envelopes: ``{"success": true, "data": ..., "request_id", "timestamp"}`` and
  ``{"success": false, "error": {"code", "message", "details"}, "request_id", "timestamp"}``;
  an ``X-Request-ID`` header equal to ``request_id`` (an inbound one is echoed).
  ``/health/ready`` and ``/api/metrics/json`` carry ``metadata.timestamp`` and no
  ``request_id``; ``/api/metrics`` is Prometheus text.
* Statuses: 201 for register, whitelist add, secure message, crypto invoice, usage record,
  membership and entitlement grants; 204 without a body for ``DELETE /api/sessions/{id}`` and
  ``DELETE /api/v1/whitelist/{email}``; 307 from ``GET /api/sessions`` to ``/api/sessions/``;
  400 ``VALIDATION_ERROR`` with ``details.fields`` (never 422), malformed JSON included; 501
  ``NOT_IMPLEMENTED`` for the eight 0.1.2 ``/api/payments/*`` routes (crypto excepted).
* Tokens: every login, register, magic-link verify and refresh opens a new session.  A refresh
  consumes its token; the same client (peer IP and User-Agent) re-sending it within 60 s gets
  the identical successor pair, anyone else gets 401 ``REFRESH_TOKEN_REPLAY`` and every refresh
  token of that user is revoked.  Old access tokens stay valid after a refresh.  Logout revokes
  the access token, and the refresh token only when the body names it.
* Refresh binding (``refresh_binding=True``, the default, like the real server's
  ``REFRESH_ANOMALY_ENFORCEMENT_ENABLED``): each refresh token is bound to the peer IP and
  User-Agent that obtained it (a refresh's successor to the refresher's).  Refreshing a
  not-yet-consumed token from another IP or User-Agent gets 401 ``REFRESH_TOKEN_ANOMALOUS``
  "Network context anomaly detected (IP or user agent changed)" and spends the token without a
  grace answer, so any later refresh with it is a replay (401 ``REFRESH_TOKEN_REPLAY``, every
  refresh token of the user revoked).  Access tokens and sessions stay valid.  Not checked when
  either User-Agent is empty or absent; consumed, revoked and deleted tokens answer as above
  whatever the context.  ``X-Forwarded-For`` is not read (the real harness trusts it from
  loopback).  ``refresh_binding=False`` (``--no-refresh-binding``) is a server configured for
  fleets whose hosts share one refresh token.
  ``POST /api/sessions/touch`` spends the session's refresh token.
  ``DELETE /api/sessions/{id}`` revokes that session's tokens.
* Usage works as authorize -> record after an admin granted an entitlement
  (``POST /api/entitlements/manual``); secure messages need both participants to be
  application members (``POST /api/users/memberships``, admin).

Where it knowingly differs: ``POST /api/auth/wallet-sign-in`` signs in (the real 0.6.6 answers
every valid signature with a 500) and accepts an unused nonce message as the proof, as
signatures cannot be checked with the stdlib; Stripe checkout works for prices seeded with
:meth:`MockServer.add_price` (the real server would need a Stripe account); rate limits are off
unless ``rate_limit=True``.  See "How close the emulator is to the real server" in
``docs/testing.md``.

Command line (serves until SIGINT/SIGTERM)::

    python -m spaps_mock [--host 127.0.0.1] [--port 3300] [--access-token-ttl 3600]
                         [--api-key KEY] [--no-seed] [--rate-limit] [--no-refresh-binding]
                         [--verbose]

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

Seeded state (``seed=True``):

* user ``demo@example.com`` / ``demo-password`` (username ``demo``, tier ``basic``, roles
  ``["user"]``);
* admin ``admin@example.com`` / ``Admin-Password-1`` (:data:`ADMIN_EMAIL`,
  :data:`ADMIN_PASSWORD`, id :data:`ADMIN_USER_ID`), roles ``["admin", "super_admin"]``,
  ``isAdmin: true``, like the real server's seeded super-admin;
* one application, :data:`APPLICATION_ID`; no entitlements, memberships, prices or whitelist
  entries.

Out-of-process control (no API key needed, never recorded in ``requests``): ``POST
/__mock__/inject`` ``{method, path, actions}``, ``POST /__mock__/clear-faults``, ``GET
/__mock__/stats``, ``POST /__mock__/reset-stats``, ``POST /__mock__/expire-tokens``, ``POST
/__mock__/close-idle``, ``POST /__mock__/users``, ``GET /__mock__/magic-link?email=``, ``GET
/__mock__/password-reset?email=``, ``POST /__mock__/config`` ``{access_token_ttl, api_key,
rate_limit, refresh_binding}``, ``POST /__mock__/invoices/<id>`` ``{status}``, ``POST
/__mock__/prices`` ``{price_id, unit_amount, currency, product_name, recurring_interval}``.

Fault actions for :meth:`MockServer.inject` (all keys optional, one action per matching request):

``status``        answer with this status and the error envelope instead of processing
``code``          error code for ``status`` (default ``SERVER_ERROR``, ``RATE_LIMIT_EXCEEDED``
                  for 429)
``message``       error message for ``status``
``retry_after``   value of a ``Retry-After`` response header (also ``details.retry_after`` of
                  an injected 429)
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
import base64
import contextlib
import hashlib
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
from datetime import datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from email.utils import formatdate
from types import FrameType
from typing import Any, Callable, Deque, Dict, Mapping, Sequence, Tuple, cast
from urllib.parse import parse_qs, quote, unquote, urlsplit

__all__ = [
    "ADMIN_EMAIL",
    "ADMIN_PASSWORD",
    "ADMIN_USER_ID",
    "APPLICATION_ID",
    "MockServer",
    "RecordedRequest",
    "main",
    "totp_code",
]

# Needed at class-definition time (a default argument); the real server's JWT_EXPIRES_IN=1h.
_DEFAULT_ACCESS_TTL = 3600.0


# =================================================================================================
# Public API
# =================================================================================================


def totp_code(secret: str, at: float | None = None) -> str:
    """The 6-digit RFC 6238 code (HMAC-SHA1, 30 s steps) of base32 ``secret`` at time ``at``.

    ``at`` defaults to ``time.time()``; pass the emulator's clock (``MockServer(clock=...)``)
    to get the code the emulator expects.  The emulator accepts the codes of the previous,
    current and next step, but each step's code only once per account, and never a step at
    or before the last one used (activation included): after ``activate_totp`` with the
    code of ``t``, sign in with ``totp_code(secret, t + 30)``.
    """
    now = time.time() if at is None else at
    return _hotp(secret, int(now // _TOTP_STEP))


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
    ``api_key=None`` accepts any non-empty key; a string must match exactly (else 401
    ``INVALID_APPLICATION`` "Invalid API key").  ``access_token_ttl`` (seconds, may be
    fractional; 3600 like the real server) applies to access tokens issued after it is set and
    can be changed at runtime.  ``seed=False`` starts without the demo and admin users.
    ``clock`` (a ``time.time``-like callable) drives every lifetime: tokens, sessions, the 60 s
    refresh grace, nonces, usage windows, so tests can move time instead of sleeping.
    ``rate_limit=True`` switches on the real server's per-application limits (off by default,
    as the real harness exempts loopback).  ``refresh_binding`` (on by default, like the real
    server) refuses a refresh from another IP or User-Agent than the one that obtained the token
    with 401 ``REFRESH_TOKEN_ANOMALOUS``; ``False`` serves a fleet sharing one refresh token.
    Both can be changed at runtime.  All state lives behind one lock, so the server is safe to
    drive from many client threads.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        access_token_ttl: float = _DEFAULT_ACCESS_TTL,
        api_key: str | None = None,
        seed: bool = True,
        verbose: bool = False,
        clock: Callable[[], float] = time.time,
        rate_limit: bool = False,
        refresh_binding: bool = True,
    ) -> None:
        self.host = host
        self.port = port
        self.api_key = api_key
        self.verbose = verbose
        self.rate_limit = rate_limit
        self.refresh_binding = refresh_binding
        self._lock = threading.RLock()
        self._store = _Store(_check_ttl(access_token_ttl), clock)
        if seed:
            self._store.create_user(
                email=_DEMO_EMAIL, password=_DEMO_PASSWORD, username="demo", tier="basic"
            )
            # Like the real server's seeded super-admin: whitelist writes, memberships and
            # entitlement grants need one.
            self._store.create_user(
                email=ADMIN_EMAIL,
                password=ADMIN_PASSWORD,
                username="admin",
                user_id=ADMIN_USER_ID,
                is_admin=True,
            )
        self._api = _Api(self)
        self._faults: dict[tuple[str, str], Deque[_Fault]] = {}
        self._requests: list[RecordedRequest] = []
        self._connections_opened = 0
        self._conns: set[_Conn] = set()
        self._metrics: dict[tuple[str, str, int], int] = {}
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
        ``metadata``, ``is_admin`` and ``wallets`` (addresses or ``{wallet_address,
        chain_type, verified}``).  No password rules apply here, unlike ``register``.
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
            invoice.set_status(status, self._store.now())

    def add_price(
        self,
        price_id: str,
        *,
        unit_amount: int = 1000,
        currency: str = "usd",
        product_name: str = "Mock product",
        recurring_interval: str | None = None,
    ) -> dict[str, Any]:
        """Seed a server-managed Stripe price so ``POST /api/stripe/checkout-sessions`` with
        ``line_items=[{"price_id": price_id, "quantity": n}]`` succeeds (the real server needs
        a Stripe account for that; unknown prices are 404 ``PRICE_NOT_FOUND`` on both)."""
        if not isinstance(price_id, str) or not price_id:
            raise ValueError("price_id must be a non-empty string")
        if isinstance(unit_amount, bool) or not isinstance(unit_amount, int) or unit_amount < 0:
            raise ValueError("unit_amount must be an int >= 0 (minor currency units)")
        with self._lock:
            price = _Price(
                id=price_id,
                product_id="prod_" + price_id,
                product_name=product_name,
                unit_amount=unit_amount,
                currency=currency.lower(),
                recurring_interval=recurring_interval,
            )
            self._store.prices[price_id] = price
            return {
                "price_id": price.id,
                "product_id": price.product_id,
                "unit_amount": price.unit_amount,
                "currency": price.currency,
            }

    def totp_code(self, secret: str, steps: int = 0) -> str:
        """:func:`totp_code` at the emulator's clock, ``steps`` 30 s steps later (or earlier)."""
        with self._lock:
            now = self._store.now()
        return totp_code(secret, now + steps * _TOTP_STEP)

    def add_subscription(
        self,
        user_id: str,
        price_id: str,
        *,
        status: str = "active",
        subscription_id: str | None = None,
        period_days: int = 30,
    ) -> dict[str, Any]:
        """Give ``user_id`` a Stripe subscription to seeded price ``price_id`` (see
        :meth:`add_price`), so the ``/api/stripe/subscription(s)`` routes have one to show,
        cancel and update (the real server reads them from Stripe webhooks).  The user also
        becomes a Stripe customer, so ``POST /api/stripe/portal-session`` works for them."""
        with self._lock:
            store = self._store
            if user_id not in store.users:
                raise KeyError(user_id)
            if price_id not in store.prices:
                raise KeyError(price_id)
            now = store.now()
            sub = _Subscription(
                id=subscription_id or "sub_test_" + secrets.token_hex(12),
                user_id=user_id,
                price_id=price_id,
                status=status,
                current_period_start=int(now),
                current_period_end=int(now) + period_days * 86400,
                created_at=now,
            )
            if sub.id in store.subscriptions:
                raise ValueError(f"subscription {sub.id} exists")
            store.subscriptions[sub.id] = sub
            store.customers.add(user_id)
            return sub.list_view()

    def add_payment(
        self,
        user_id: str,
        amount: int,
        *,
        currency: str = "usd",
        status: str = "succeeded",
        description: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Record a payment of ``amount`` minor units in ``user_id``'s Stripe history
        (``GET /api/stripe/history``); the user also becomes a Stripe customer."""
        if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
            raise ValueError("amount must be an int >= 0 (minor currency units)")
        with self._lock:
            store = self._store
            if user_id not in store.users:
                raise KeyError(user_id)
            payment: _Json = {
                "id": _uuid(),
                "amount": amount,
                "currency": currency.lower(),
                "status": status,
                "description": description,
                "created_at": _iso(store.now()),
                "stripe_payment_intent_id": "pi_test_" + secrets.token_hex(12),
                "metadata": dict(metadata or {}),
            }
            store.payments.append((user_id, payment))
            store.customers.add(user_id)
            return dict(payment)

    def expire_access_tokens(self) -> None:
        """Make every access token issued so far expired (later ones are unaffected)."""
        with self._lock:
            now = self._store.now()
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
            self._store.requests_total += 1
            self._store.errors_total += status >= 400

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
        "--access-token-ttl",
        type=float,
        default=_DEFAULT_ACCESS_TTL,
        help="access token lifetime in seconds (3600)",
    )
    parser.add_argument("--api-key", default=None, help="required X-API-Key (default: any)")
    parser.add_argument(
        "--no-seed", action="store_true", help="start without the demo and admin users"
    )
    parser.add_argument(
        "--rate-limit", action="store_true", help="enforce the real server's rate limits"
    )
    parser.add_argument(
        "--no-refresh-binding",
        action="store_true",
        help="accept a refresh from any IP/User-Agent (a server configured for fleets)",
    )
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
            rate_limit=args.rate_limit,
            refresh_binding=not args.no_refresh_binding,
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
ADMIN_EMAIL = "admin@example.com"
ADMIN_PASSWORD = "Admin-Password-1"  # noqa: S105 - the documented seeded admin login
ADMIN_USER_ID = "5bdb0db2-0000-4000-8000-00000000ad01"
APPLICATION_ID = "00000000-0000-4000-8000-00000000a001"
_CONTROL_PREFIX = "/__mock__/"
_VERSION = "1.0.0"
_REFRESH_LIFETIME = 365 * 86400.0
_SESSION_LIFETIME = 365 * 86400.0
_REFRESH_GRACE = 60.0
_NONCE_TTL = 300.0
_MAGIC_LINK_TTL = 3600.0
_RESET_TTL = 3600.0
_AUTHORIZATION_TTL = 300.0
_CHECKOUT_TTL = 86400.0
_TOTP_STEP = 30
_MFA_CHALLENGE_TTL = 300.0
_RECOVERY_CODES = 10
_APPLICATION_NAME = "SPAPS emulator (local)"
# GET /api/auth/methods of the real harness's application, as recorded.
_AUTH_METHODS: tuple[tuple[str, bool, tuple[tuple[str, Any], ...]], ...] = (
    ("password", True, ()),
    ("magic_link", True, ()),
    ("wallet:solana", True, (("chain_type", "solana"),)),
    ("wallet:ethereum", True, (("chain_type", "ethereum"),)),
    ("wallet:base", True, (("chain_type", "base"),)),
    ("wallet:bitcoin", True, (("chain_type", "bitcoin"),)),
    ("oidc:google", False, (("hashed_nonce_supported", False),)),
    ("oidc:apple", False, (("hashed_nonce_supported", False),)),
    ("oidc:github", False, (("hashed_nonce_supported", False),)),
    ("webauthn", False, ()),
    ("sms", True, (("provider", "console"),)),
)
_MAX_BODY = 10 * 1024 * 1024
_USER_PERMISSIONS = ("approval_request.read", "approval_request.review", "view_products")
_ADMIN_PERMISSIONS = (
    "access_admin",
    "access_super_admin",
    "approval_request.read",
    "approval_request.review",
    "manage_users",
    "view_products",
    "view_users",
)
_CRYPTO_ASSETS = frozenset({"USDC", "USDT", "ETH", "SOL", "BTC"})
_CRYPTO_NETWORKS = frozenset({"base", "ethereum", "solana", "polygon", "arbitrum", "optimism"})
_PAID_INVOICE_STATES = frozenset({"confirmed", "settled", "overpaid", "underpaid", "paid"})
# The eight 0.1.2 PaymentsClient routes: the real 0.6.6 server answers all of them with 501.
_PAYMENT_STUBS = (
    ("POST", "/api/payments/create-checkout-session"),
    ("GET", "/api/payments/balance"),
    ("POST", "/api/payments/create-payment-intent"),
    ("POST", "/api/payments/update-payment-method"),
    ("POST", "/api/payments/wallet-deposit"),
    ("GET", "/api/payments/wallet-transaction/{transaction_id}"),
    ("GET", "/api/payments/subscription/{subscription_id}"),
    ("POST", "/api/payments/cancel-subscription"),
)
# route template -> (requests, window seconds), shared by the whole application like the
# real server's per-application buckets.
_RATE_LIMITS: Dict[str, Tuple[int, float]] = {
    "/api/auth/login": (10, 60.0),
    "/api/auth/refresh": (10, 60.0),
    "/api/auth/nonce": (10, 60.0),
    "/api/auth/wallet-sign-in": (10, 60.0),
    "/api/auth/magic-link": (5, 60.0),
    "/api/auth/register": (15, 60.0),
}
_SECURITY_HEADERS = {
    "x-spaps-mode": "standard",
    "x-spaps-environment": "development",
    "vary": "Origin",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
}
_INVALID_REFRESH = "Your session has expired. Please sign in again."
_REPLAY = "Refresh token already consumed (possible replay)"
_ANOMALOUS = "Network context anomaly detected (IP or user agent changed)"
_MAGIC_LINK_INVALID = "This magic link has expired or already been used. Request a new one."
_ENTITLEMENT_REQUIRED = (
    "Access to this feature requires an active subscription. Upgrade your account or contact "
    "support."
)
_UUID = re.compile(r"^[0-9a-fA-F]{8}-?([0-9a-fA-F]{4}-?){3}[0-9a-fA-F]{12}$")
_EST = timezone(timedelta(hours=-5))

_Json = Dict[str, Any]
_Clock = Callable[[], float]


def _check_ttl(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError("access_token_ttl must be a number >= 0")
    return float(value)


def _uuid() -> str:
    return str(uuid.uuid4())


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="microseconds")


def _iso_z(ts: float) -> str:
    # Usage and membership rows are rendered by another serializer on the real server.
    return _iso(ts).replace("+00:00", "Z")


def _month_window(ts: float) -> tuple[str, float, float]:
    dt = datetime.fromtimestamp(ts, tz=timezone.utc)
    start = datetime(dt.year, dt.month, 1, tzinfo=timezone.utc)
    end = datetime(dt.year + (dt.month == 12), dt.month % 12 + 1, 1, tzinfo=timezone.utc)
    return f"{dt.year:04d}-{dt.month:02d}", start.timestamp(), end.timestamp()


def _latest_token(tokens: Mapping[str, _OneTimeToken], email: str) -> str | None:
    wanted = email.lower()
    for token in reversed(list(tokens.values())):
        if token.email.lower() == wanted:
            return token.token
    return None


def _is_uuid(value: object) -> bool:
    return isinstance(value, str) and _UUID.match(value) is not None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _hotp(secret: str, counter: int) -> str:
    """RFC 4226 HOTP, 6 digits, HMAC-SHA1, of a base32 secret (padding and case optional)."""
    cleaned = secret.strip().replace(" ", "").upper()
    key = base64.b32decode(cleaned + "=" * (-len(cleaned) % 8))
    digest = hmac.new(key, struct.pack(">Q", counter), hashlib.sha1).digest()
    offset = digest[-1] & 0x0F
    value = struct.unpack(">I", digest[offset : offset + 4])[0] & 0x7FFFFFFF
    return f"{value % 1_000_000:06d}"


def _parse_iso(value: Any) -> float | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


def _drop_none(values: _Json) -> _Json:
    return {k: v for k, v in values.items() if v is not None}


# =================================================================================================
# Errors, responses and request validation
# =================================================================================================


class _ApiError(Exception):
    """An error answered with the SPAPS error envelope."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
        details: _Json | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.details = details or {}


@dataclass
class _Response:
    status: int
    body: bytes = b""
    content_type: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    route: str = "unmatched"


def _now_iso() -> str:
    return _iso(time.time())


def _json_response(status: int, payload: Any, headers: dict[str, str] | None = None) -> _Response:
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return _Response(status, body, "application/json", dict(headers or {}))


def _error_response(
    request_id: str,
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    details: _Json | None = None,
) -> _Response:
    payload = {
        "success": False,
        "error": {"code": code, "message": message, "details": dict(details or {})},
        "request_id": request_id,
        "timestamp": _now_iso(),
    }
    return _json_response(status, payload, headers)


def _validation(message: str = "Request validation failed", **fields: str) -> _ApiError:
    details: _Json = {"fields": fields} if fields else {}
    return _ApiError(400, "VALIDATION_ERROR", message, details=details)


def _fields_error(fields: Mapping[str, str]) -> _ApiError:
    return _ApiError(
        400, "VALIDATION_ERROR", "Request validation failed", details={"fields": dict(fields)}
    )


# Field kinds understood by _Schema, each with the pydantic message the real server reports.
_KIND_MESSAGES = {
    "str": "Input should be a valid string",
    "email": "value is not a valid email address: An email address must have an @-sign.",
    "bool": "Input should be a valid boolean",
    "dict": "Input should be a valid dictionary",
    "list": "Input should be a valid list",
    "int": "Input should be a valid integer",
    "uuid": "Input should be a valid UUID",
}


def _kind_ok(kind: str, value: Any) -> bool:
    if kind in ("str", "email"):
        return isinstance(value, str) and (kind == "str" or "@" in value.strip()[1:-1])
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "dict":
        return isinstance(value, dict)
    if kind == "list":
        return isinstance(value, list)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "uuid":
        return _is_uuid(value)
    raise AssertionError(kind)


def _check_fields(body: _Json, spec: Sequence[tuple[str, str, bool]]) -> None:
    """Validate like pydantic does on the real server: report every bad field at once."""
    errors: dict[str, str] = {}
    for name, kind, required in spec:
        value = body.get(name)
        if value is None:
            if required:
                errors[name] = "Field required"
        elif not _kind_ok(kind, value):
            errors[name] = _KIND_MESSAGES[kind]
    if errors:
        raise _fields_error(errors)


_PASSWORD_RULES: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("at least 8 characters", lambda p: len(p) >= 8),
    ("at least 1 uppercase letter", lambda p: any(c.isupper() for c in p)),
    ("at least 1 digit", lambda p: any(c.isdigit() for c in p)),
)


def _check_password(password: str) -> None:
    failing = [rule for rule, ok in _PASSWORD_RULES if not ok(password)]
    if failing:
        raise _ApiError(400, "WEAK_PASSWORD", "Password must contain: " + "; ".join(failing))


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
    token: str | None = None
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

    @property
    def user_agent(self) -> str:
        return self.headers.get("user-agent", "")

    def json_body(self, *, required: bool = True) -> _Json:
        """The body as an object; the error details mirror FastAPI's on the real server."""
        if not self.body.strip():
            if required:
                raise _fields_error({"_root_": "Field required"})
            return {}
        try:
            value = json.loads(self.body)
        except ValueError:
            raise _fields_error({"1": "JSON decode error"}) from None
        if not isinstance(value, dict):
            raise _fields_error(
                {"_root_": "Input should be a valid dictionary or object to extract fields from"}
            )
        return value

    def query_str(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None

    def query_int(self, name: str, default: int, *, minimum: int = 0) -> int:
        raw = self.query_str(name)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            raise _fields_error({f"query.{name}": _KIND_MESSAGES["int"]}) from None
        if value < minimum:
            raise _fields_error(
                {f"query.{name}": f"Input should be greater than or equal to {minimum}"}
            )
        return value


def _success(ctx: _Ctx, data: Any, *, status: int = 200) -> _Response:
    payload: _Json = {
        "success": True,
        "data": data,
        "request_id": ctx.request_id,
        "timestamp": _now_iso(),
    }
    return _json_response(status, payload)


def _self_enveloped(data: Any) -> _Response:
    # /health/ready and /api/metrics/json build their own envelope on the real server: no
    # request_id in the body, a metadata.timestamp instead of a top-level one.
    return _json_response(
        200, {"success": True, "data": data, "metadata": {"timestamp": _now_iso()}}
    )


# =================================================================================================
# Domain state
# =================================================================================================


@dataclass
class _User:
    id: str
    email: str | None
    password: str | None
    username: str | None
    phone_number: str | None
    tier: str
    email_confirmed: bool
    metadata: _Json | None
    wallets: list[_Json]
    created_at: float
    is_admin: bool = False
    # TOTP: a pending secret (enrolled, not activated), the active one, the last step whose
    # code was accepted (codes of that step or earlier are refused), unused recovery codes.
    totp_pending: str | None = None
    totp_secret: str | None = None
    totp_last_step: int = -1
    recovery_codes: list[str] = field(default_factory=list)

    @property
    def roles(self) -> list[str]:
        return ["admin", "super_admin"] if self.is_admin else ["user"]

    @property
    def permissions(self) -> list[str]:
        return list(_ADMIN_PERMISSIONS if self.is_admin else _USER_PERMISSIONS)

    def wallet_addresses(self) -> list[str]:
        return [str(w["wallet_address"]) for w in self.wallets]


@dataclass
class _Session:
    id: str
    user_id: str
    created_at: float
    expires_at: float
    last_activity: float
    user_agent: str
    ip_address: str
    revoked: bool = False


@dataclass
class _AccessToken:
    session_id: str
    expires_at: float
    revoked: bool = False


@dataclass
class _Grace:
    """What a consumed refresh token answered, replayed to the same client for a minute."""

    ip: str
    user_agent: str
    until: float
    data: _Json


@dataclass
class _RefreshToken:
    token: str
    session_id: str
    user_id: str
    expires_at: float
    # The peer IP and User-Agent that obtained it (the refresh binding).
    ip: str = ""
    user_agent: str = ""
    # active -> consumed (rotated, spent by touch, or refused as anomalous) | revoked (logout
    # body, replay) | deleted (its session was revoked with DELETE /api/sessions/{id})
    state: str = "active"
    grace: _Grace | None = None


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
    asset: str
    network: str
    amount: str
    expires_at: float | None
    beneficiary: _Json | None
    metadata: _Json
    created_at: float
    status: str = "pending"
    updated_at: float = 0.0
    settled_at: float | None = None

    def set_status(self, status: str, now: float) -> None:
        self.status = status
        self.updated_at = now
        if status in _PAID_INVOICE_STATES and self.settled_at is None:
            self.settled_at = now

    def public(self) -> _Json:
        return {
            "id": self.id,
            "application_id": APPLICATION_ID,
            "asset": self.asset,
            "network": self.network,
            "amount": self.amount,
            "status": self.status,
            "underpaid": True if self.status == "underpaid" else None,
            "overpaid": True if self.status == "overpaid" else None,
            "beneficiary": self.beneficiary,
            "metadata": self.metadata,
            "destination": None,
            "settlement": None,
            "expires_at": None if self.expires_at is None else _iso(self.expires_at),
            "settled_at": None if self.settled_at is None else _iso(self.settled_at),
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at or self.created_at),
        }

    def status_view(self) -> _Json:
        view = self.public()
        return {k: view[k] for k in ("id", "status", "amount", "settled_at", "expires_at")}


@dataclass
class _Entitlement:
    id: str
    user_id: str | None
    email: str | None
    key: str
    features: list[str]
    limits: dict[str, float]
    granted_by: str
    reason: str | None
    metadata: _Json
    created_at: float
    starts_at: float
    ends_at: float | None = None
    resource_type: str = "user"
    resource_id: str | None = None
    grant_id: str = field(default_factory=_uuid)
    updated_at: float = 0.0
    revoked_at: float | None = None
    revoked_by: str | None = None
    revoked_reason: str | None = None

    def active(self, now: float) -> bool:
        return (
            self.revoked_at is None
            and self.starts_at <= now
            and (self.ends_at is None or self.ends_at > now)
        )

    def public(self) -> _Json:
        view: _Json = {
            "id": self.id,
            "application_id": APPLICATION_ID,
            "beneficiary_user_id": self.user_id,
            "beneficiary_email": self.email,
            "entitlement_type": "access",
            "entitlement_key": self.key,
            "source": "manual",
            "resource_type": self.resource_type,
            "resource_id": self.resource_id,
            "starts_at": _iso(self.starts_at),
            "ends_at": None if self.ends_at is None else _iso(self.ends_at),
            "revoked_at": None if self.revoked_at is None else _iso(self.revoked_at),
            "suspended_at": None,
            "suspension_reason": None,
            "suspension_reference": None,
            "last_stripe_dispute_event_created_at": None,
            "crypto_invoice_id": None,
            "stripe_product_id": None,
            "stripe_price_id": None,
            "stripe_subscription_id": None,
            "stripe_session_id": None,
            "stripe_invoice_id": None,
            "manual_grant_id": self.grant_id,
            "manual_grant_reason": self.reason,
            "granted_by_user_id": self.granted_by,
            "revoked_by_user_id": self.revoked_by,
            "revoked_reason": self.revoked_reason,
            "metadata": self.metadata,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at or self.created_at),
        }
        return view


@dataclass
class _MfaChallenge:
    id: str
    challenge: str
    user_id: str
    expires_at: float
    used: bool = False


@dataclass
class _Subscription:
    id: str
    user_id: str
    price_id: str
    status: str
    current_period_start: int
    current_period_end: int
    created_at: float
    cancel_at_period_end: bool = False
    canceled_at: int | None = None

    def list_view(self) -> _Json:
        # SubscriptionListItemOut (local database rows): ISO strings.
        return {
            "id": self.id,
            "status": self.status,
            "price_id": self.price_id,
            "current_period_start": _iso(self.current_period_start),
            "current_period_end": _iso(self.current_period_end),
            "cancel_at_period_end": self.cancel_at_period_end,
            "canceled_at": None if self.canceled_at is None else _iso(self.canceled_at),
        }

    def detail_view(self, price: _Json) -> _Json:
        # SubscriptionOut (live from Stripe): epoch seconds and expanded items.
        return {
            "id": self.id,
            "status": self.status,
            "current_period_start": self.current_period_start,
            "current_period_end": self.current_period_end,
            "cancel_at_period_end": self.cancel_at_period_end,
            "canceled_at": self.canceled_at,
            "items": [{"id": "si_" + self.id.split("_")[-1], "price": price}],
        }


@dataclass
class _Authorization:
    ref: str
    feature_key: str
    subject_user_id: str
    expires_at: float


@dataclass
class _Price:
    id: str
    product_id: str
    product_name: str
    unit_amount: int
    currency: str
    recurring_interval: str | None


class _Store:
    """All emulator state; callers must hold the server lock."""

    def __init__(self, access_token_ttl: float, clock: _Clock) -> None:
        self.access_token_ttl = access_token_ttl
        self.now = clock
        self.started_at = clock()
        self.jwt_secret = secrets.token_bytes(32)
        self.users: dict[str, _User] = {}
        self.user_ids_by_email: dict[str, str] = {}
        self.sessions: dict[str, _Session] = {}
        self.access_tokens: dict[str, _AccessToken] = {}
        self.refresh_tokens: dict[str, _RefreshToken] = {}
        self.nonces: dict[str, _Nonce] = {}
        self.magic_links: dict[str, _OneTimeToken] = {}
        self.reset_tokens: dict[str, _OneTimeToken] = {}
        self.members: dict[str, _Json] = {}
        self.entitlements: list[_Entitlement] = []
        self.authorizations: dict[str, _Authorization] = {}
        self.usage_events: list[_Json] = []
        self.usage_by_key: dict[str, _Json] = {}
        self.invoices: dict[str, _Invoice] = {}
        self.whitelist: dict[str, _Json] = {}
        self.messages: list[_Json] = []
        self.prices: dict[str, _Price] = {}
        self.checkout_sessions: list[tuple[str, _Json]] = []
        self.mfa_challenges: dict[str, _MfaChallenge] = {}
        self.subscriptions: dict[str, _Subscription] = {}
        self.payments: list[tuple[str, _Json]] = []
        self.customers: set[str] = set()
        self.checkout_by_key: dict[tuple[str, str], tuple[str, _Json]] = {}
        self.rate_buckets: dict[str, list[float]] = {}
        self.requests_total = 0
        self.errors_total = 0

    # -- users -------------------------------------------------------------------------------

    def user_by_email(self, email: str) -> _User | None:
        user_id = self.user_ids_by_email.get(email.strip().lower())
        return self.users.get(user_id) if user_id else None

    def user_by_wallet(self, address: str) -> _User | None:
        for user in self.users.values():
            if address.lower() in (a.lower() for a in user.wallet_addresses()):
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
        is_admin: bool = False,
    ) -> _User:
        if email is not None and self.user_by_email(email) is not None:
            raise _ApiError(400, "EMAIL_ALREADY_EXISTS", "Email already registered")
        user_id = user_id or _uuid()
        if user_id in self.users:
            raise _ApiError(409, "USER_ALREADY_EXISTS", f"A user with id {user_id} exists")
        user = _User(
            id=user_id,
            email=email,
            password=password,
            username=username,
            phone_number=phone_number,
            tier=tier,
            email_confirmed=email_confirmed,
            metadata=dict(metadata) if metadata else None,
            wallets=list(wallets or []),
            created_at=self.now(),
            is_admin=is_admin,
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
            "is_admin",
        }
        unknown = sorted(set(fields) - allowed)
        if unknown:
            raise _validation(f"Unknown user field(s): {', '.join(unknown)}")
        body: _Json = dict(fields)
        body["email"], body["password"] = email, password
        _check_fields(
            body,
            [
                ("email", "email", True),
                ("password", "str", True),
                ("id", "str", False),
                ("username", "str", False),
                ("phone_number", "str", False),
                ("tier", "str", False),
                ("email_confirmed", "bool", False),
                ("is_admin", "bool", False),
                ("metadata", "dict", False),
                ("wallets", "list", False),
            ],
        )
        wallets: list[_Json] = []
        for item in body.get("wallets") or []:
            if isinstance(item, str):
                wallets.append({"wallet_address": item, "chain_type": "ethereum", "verified": True})
            elif isinstance(item, dict) and isinstance(item.get("wallet_address"), str):
                wallets.append({"chain_type": "ethereum", "verified": True, **item})
            else:
                raise _validation("Each wallet must be an address or {wallet_address, ...}")
        confirmed = body.get("email_confirmed")
        return self.create_user(
            email=str(body["email"]).strip(),
            password=str(body["password"]),
            username=body.get("username"),
            phone_number=body.get("phone_number"),
            tier=body.get("tier") or "basic",
            email_confirmed=True if confirmed is None else bool(confirmed),
            metadata=body.get("metadata"),
            wallets=wallets,
            user_id=body.get("id"),
            is_admin=bool(body.get("is_admin")),
        )

    # -- sessions and tokens -----------------------------------------------------------------

    def _jwt(self, claims: _Json) -> str:
        header = _b64(b'{"alg":"HS256","typ":"JWT"}')
        payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
        signature = hmac.new(self.jwt_secret, f"{header}.{payload}".encode(), hashlib.sha256)
        return f"{header}.{payload}.{_b64(signature.digest())}"

    def start_session(self, user: _User, ctx: _Ctx) -> tuple[_Session, str, str]:
        """Every sign-in and every refresh opens a new session, as on the real server."""
        now = self.now()
        session = _Session(
            id=_uuid(),
            user_id=user.id,
            created_at=now,
            expires_at=now + _SESSION_LIFETIME,
            last_activity=now,
            user_agent=ctx.user_agent,
            ip_address=ctx.client_ip,
        )
        self.sessions[session.id] = session
        base: _Json = {"sub": user.id, "app_id": APPLICATION_ID, "email": user.email}
        access_exp = now + self.access_token_ttl
        access = self._jwt(
            {
                **base,
                "roles": user.roles,
                "isAdmin": user.is_admin,
                "jti": _uuid(),
                "iat": int(now),
                "exp": math.ceil(access_exp),
            }
        )
        self.access_tokens[access] = _AccessToken(session.id, access_exp)
        refresh = self._jwt(
            {**base, "token_family": _uuid(), "jti": _uuid(), "iat": int(now), "exp": int(now)}
        )
        self.refresh_tokens[refresh] = _RefreshToken(
            token=refresh,
            session_id=session.id,
            user_id=user.id,
            expires_at=now + _REFRESH_LIFETIME,
            ip=ctx.client_ip,
            user_agent=ctx.user_agent,
        )
        return session, access, refresh

    def expires_in(self) -> int:
        # Token models need an int; rounding up keeps a sub-second TTL from advertising 0.
        return math.ceil(self.access_token_ttl)

    def session_refresh_token(self, session: _Session) -> _RefreshToken | None:
        for record in self.refresh_tokens.values():
            if record.session_id == session.id and record.state == "active":
                return record
        return None

    def revoke_refresh_tokens(self, user_id: str) -> None:
        # Measured: a replay revokes every refresh token of the user, other sessions' included.
        for record in self.refresh_tokens.values():
            if record.user_id == user_id and record.state == "active":
                record.state = "revoked"

    def delete_session(self, session: _Session) -> None:
        session.revoked = True
        for access in self.access_tokens.values():
            if access.session_id == session.id:
                access.revoked = True
        for record in self.refresh_tokens.values():
            if record.session_id == session.id:
                record.state = "deleted"

    def authenticate(self, token: str) -> tuple[_User, _Session]:
        record = self.access_tokens.get(token)
        if record is None or self.now() >= record.expires_at:
            raise _ApiError(401, "INVALID_TOKEN", "Invalid or expired access token")
        session = self.sessions[record.session_id]
        if record.revoked or session.revoked:
            raise _ApiError(401, "INVALID_TOKEN", "Token has been revoked")
        return self.users[session.user_id], session

    def user_sessions(self, user: _User) -> list[_Session]:
        now = self.now()
        return [
            s
            for s in self.sessions.values()
            if s.user_id == user.id and not s.revoked and s.expires_at > now
        ]

    # -- entitlements and usage --------------------------------------------------------------

    def user_entitlements(self, user_id: str) -> list[_Entitlement]:
        """The user's active entitlements, newest first."""
        now = self.now()
        return [e for e in reversed(self.entitlements) if e.user_id == user_id and e.active(now)]

    def check_totp(self, user: _User, secret: str, code: str) -> bool:
        """RFC 6238 with one step of drift either way; a step's code works once."""
        if not (len(code) == 6 and code.isdigit()):
            return False
        current = int(self.now() // _TOTP_STEP)
        for step in (current - 1, current, current + 1):
            if step > user.totp_last_step and hmac.compare_digest(_hotp(secret, step), code):
                user.totp_last_step = step
                return True
        return False

    def use_recovery_code(self, user: _User, code: str) -> bool:
        wanted = code.strip().lower()
        for stored in user.recovery_codes:
            if hmac.compare_digest(stored.encode(), wanted.encode()):
                user.recovery_codes.remove(stored)
                return True
        return False

    def feature_policy(self, user_id: str, feature_key: str) -> tuple[list[str], dict[str, float]]:
        """Entitlement keys naming ``feature_key`` and the limits they grant (largest wins)."""
        keys: list[str] = []
        limits: dict[str, float] = {}
        for ent in self.user_entitlements(user_id):
            if feature_key in ent.features:
                keys.append(ent.key)
                for dim, value in ent.limits.items():
                    limits[dim] = max(limits.get(dim, 0.0), value)
        return sorted(set(keys)), limits

    def window_totals(self, user_id: str, feature_key: str) -> dict[str, float]:
        window_key, _, _ = _month_window(self.now())
        totals: dict[str, float] = {}
        for event in self.usage_events:
            if (
                event["subject_user_id"] == user_id
                and event["feature_key"] == feature_key
                and event["_window"] == window_key
            ):
                for dim, value in event["dimensions"].items():
                    totals[dim] = totals.get(dim, 0.0) + float(value)
        return totals

    # -- rate limiting -----------------------------------------------------------------------

    def rate_limit(self, route: str) -> tuple[dict[str, str], bool]:
        """Headers for this request and whether it is over the limit."""
        limit, window = _RATE_LIMITS[route]
        now = self.now()
        bucket = [t for t in self.rate_buckets.get(route, []) if t > now - window]
        over = len(bucket) >= limit
        if not over:
            bucket.append(now)
        self.rate_buckets[route] = bucket
        reset = (bucket[0] if bucket else now) + window
        headers = {
            "x-ratelimit-limit": str(limit),
            "x-ratelimit-remaining": str(max(0, limit - len(bucket))),
            "x-ratelimit-reset": str(int(reset)),
            "retry-after": str(int(window)),
        }
        return headers, over


# =================================================================================================
# Response shapes
# =================================================================================================


def _full_user(user: _User) -> _Json:
    """The user of register, GET /api/auth/user: every key, nulls kept, ``wallets`` null."""
    return {
        "id": user.id,
        "username": user.username,
        "email": user.email,
        "phone_number": user.phone_number,
        "wallets": None,
        "tier": user.tier,
        "roles": user.roles,
        "permissions": user.permissions,
        "isAdmin": user.is_admin,
        "metadata": dict(user.metadata) if user.metadata else None,
    }


def _compact_user(user: _User) -> _Json:
    # Login, verify and wallet responses use response_model_exclude_none on the real server.
    return _drop_none(_full_user(user))


def _admin_user(user: _User) -> _Json:
    view = _full_user(user)
    view["wallets"] = [dict(w) for w in user.wallets]
    view["email_confirmed"] = user.email_confirmed
    view["created_at"] = _iso(user.created_at)
    return view


def _token_pair(store: _Store, access: str, refresh: str) -> _Json:
    return {
        "access_token": access,
        "refresh_token": refresh,
        "expires_in": store.expires_in(),
        "token_type": "Bearer",
    }


def _nested_tokens(store: _Store, access: str, refresh: str) -> _Json:
    return {
        "tokens": {
            "access_token": access,
            "refresh_token": refresh,
            "expires_in": store.expires_in(),
        },
        "token_type": "Bearer",
    }


def _session_view(session: _Session, user: _User | None, now: float, previous: float) -> _Json:
    return {
        "id": session.id,
        "user_id": session.user_id,
        "application_id": APPLICATION_ID,
        "tier": user.tier if user is not None else None,
        "created_at": _iso(session.created_at),
        "expires_at": _iso(session.expires_at),
        "last_activity": _iso(session.last_activity),
        "last_used": _iso(session.last_activity),
        "user_agent": session.user_agent,
        "ip_address": session.ip_address,
        "is_current": None,
        "wallets_count": len(user.wallets) if user is not None else 0,
        "duration_minutes": int((now - session.created_at) // 60),
        "idle_minutes": int(max(0.0, now - previous) // 60),
    }


def _display_name(feature_key: str) -> str:
    return " ".join(part.capitalize() for part in feature_key.split("_"))


# =================================================================================================
# Routing and endpoint handlers
# =================================================================================================

_NO_AUTH = "none"
_API_KEY = "key"
_BEARER = "bearer"
_ADMIN = "admin"

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
        add("POST", "/api/auth/{chain}/sign-in", _NO_AUTH, self.deprecated_sign_in)
        add("POST", "/api/auth/magic-link", _API_KEY, self.magic_link)
        add("POST", "/api/auth/verify-magic-link", _API_KEY, self.verify_magic_link)
        add("GET", "/api/auth/user", _BEARER, self.current_user)
        add("POST", "/api/auth/password-reset", _API_KEY, self.password_reset)
        add("POST", "/api/auth/reset-password-confirm", _API_KEY, self.password_reset_confirm)
        add("POST", "/api/auth/set-password", _BEARER, self.set_password)
        add("GET", "/api/auth/methods", _API_KEY, self.auth_methods)
        add("GET", "/api/auth/session-context", _BEARER, self.session_context)
        # TOTP MFA
        add("POST", "/api/auth/mfa/verify", _API_KEY, self.mfa_verify)
        add("POST", "/api/auth/mfa/totp/enroll", _BEARER, self.totp_enroll)
        add("POST", "/api/auth/mfa/totp/activate", _BEARER, self.totp_activate)
        add("POST", "/api/auth/mfa/totp/disable", _BEARER, self.totp_disable)
        # Sessions
        add("GET", "/api/sessions/current", _BEARER, self.session_current)
        add("POST", "/api/sessions/validate", _BEARER, self.session_validate)
        add("GET", "/api/sessions", _NO_AUTH, self.sessions_redirect)
        add("GET", "/api/sessions/", _BEARER, self.sessions_list)
        add("POST", "/api/sessions/touch", _BEARER, self.session_touch)
        add("DELETE", "/api/sessions/{session_id}", _BEARER, self.session_revoke)
        # Admin set-up the real server requires before messages and usage work
        add("POST", "/api/users/memberships", _ADMIN, self.membership_add)
        add("POST", "/api/entitlements/manual", _ADMIN, self.entitlement_grant)
        # Entitlements: lookups need only the API key
        add("GET", "/api/entitlements/check", _API_KEY, self.entitlement_check)
        add("GET", "/api/entitlements", _API_KEY, self.entitlement_list)
        add("POST", "/api/entitlements/claim", _BEARER, self.entitlement_claim)
        add("DELETE", "/api/entitlements/{entitlement_id}", _ADMIN, self.entitlement_revoke)
        # 0.1.2 payments: stubs on the real server
        for method, template in _PAYMENT_STUBS:
            add(method, template, _NO_AUTH, self.not_implemented)
        # Crypto payments: the API key is enough, a Bearer token is ignored
        add("POST", "/api/payments/crypto/invoices", _API_KEY, self.invoice_create)
        add("GET", "/api/payments/crypto/invoices/{invoice_id}", _API_KEY, self.invoice_get)
        add(
            "GET",
            "/api/payments/crypto/invoices/{invoice_id}/status",
            _API_KEY,
            self.invoice_status,
        )
        add("POST", "/api/payments/crypto/reconcile", _API_KEY, self.reconcile)
        # Stripe
        add("GET", "/api/stripe/products", _BEARER, self.stripe_products)
        add("GET", "/api/stripe/products/{product_id}", _BEARER, self.stripe_product)
        add("POST", "/api/stripe/checkout-sessions", _BEARER, self.stripe_checkout)
        add("GET", "/api/stripe/checkout-sessions", _BEARER, self.stripe_checkout_list)
        add("GET", "/api/stripe/checkout-sessions/{session_id}", _BEARER, self.stripe_checkout_get)
        add(
            "POST",
            "/api/stripe/checkout-sessions/{session_id}/expire",
            _BEARER,
            self.stripe_checkout_expire,
        )
        add("GET", "/api/stripe/subscriptions", _BEARER, self.stripe_subscriptions)
        add("GET", "/api/stripe/subscription/{subscription_id}", _BEARER, self.stripe_subscription)
        add(
            "POST",
            "/api/stripe/subscription/{subscription_id}/cancel",
            _BEARER,
            self.stripe_subscription_cancel,
        )
        add(
            "POST",
            "/api/stripe/subscription/{subscription_id}/update",
            _BEARER,
            self.stripe_subscription_update,
        )
        add("POST", "/api/stripe/portal-session", _BEARER, self.stripe_portal)
        add("GET", "/api/stripe/history", _BEARER, self.stripe_history)
        # Usage
        add("GET", "/api/usage/features", _BEARER, self.usage_features)
        add("POST", "/api/usage/authorize", _BEARER, self.usage_authorize)
        # Measured: the API key is enough (no Bearer token needed).
        add("GET", "/api/usage/status", _API_KEY, self.usage_status)
        add("POST", "/api/usage/record", _BEARER, self.usage_record)
        add("GET", "/api/usage/history", _BEARER, self.usage_history)
        # Whitelist
        add("GET", "/api/v1/whitelist/check", _API_KEY, self.whitelist_check)
        add("GET", "/api/v1/whitelist/stats", _ADMIN, self.whitelist_stats)
        add("GET", "/api/v1/whitelist", _ADMIN, self.whitelist_list)
        add("POST", "/api/v1/whitelist", _ADMIN, self.whitelist_add)
        add("PUT", "/api/v1/whitelist/{email}", _ADMIN, self.whitelist_update)
        add("DELETE", "/api/v1/whitelist/{email}", _ADMIN, self.whitelist_remove)
        # Secure messages
        add("POST", "/api/secure-messages", _BEARER, self.message_create)
        add("GET", "/api/secure-messages", _BEARER, self.message_list)
        # Metrics and health
        add("GET", "/api/metrics", _NO_AUTH, self.metrics_text)
        add("GET", "/api/metrics/json", _NO_AUTH, self.metrics_json)
        add("GET", "/internal/metrics", _NO_AUTH, self.internal_metrics)
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
                "Method Not Allowed",
                {"Allow": ", ".join(sorted(set(allowed)))},
            )
        raise _ApiError(404, "NOT_FOUND", "Not Found")

    def route_label(self, method: str, path: str) -> str:
        try:
            return self.resolve(method, path)[0].template
        except _ApiError:
            return "unmatched"

    def handle(self, ctx: _Ctx) -> _Response:
        route_label = "unmatched"
        limit_headers: dict[str, str] = {}
        if ctx.method == "OPTIONS":
            # CORS preflight answers before routing on the real server.
            return _Response(200, b"OK", "text/plain; charset=utf-8")
        try:
            route, ctx.params = self.resolve(ctx.method, ctx.path)
            route_label = route.template
            with self.mock._lock:
                if self.mock.rate_limit and route.template in _RATE_LIMITS:
                    limit_headers, over = self.store.rate_limit(route.template)
                    if over:
                        raise _ApiError(
                            429,
                            "RATE_LIMIT_EXCEEDED",
                            "You have made too many requests. Please wait a moment and try again.",
                            details={"retry_after": int(limit_headers["retry-after"])},
                        )
                self._authorize(route, ctx)
                response = route.handler(ctx)
        except _ApiError as exc:
            response = _error_response(
                ctx.request_id, exc.status, exc.code, exc.message, exc.headers, exc.details
            )
        except Exception as exc:  # a bug in the emulator must still answer like a server
            traceback.print_exc()
            response = _error_response(
                ctx.request_id, 500, "INTERNAL_ERROR", f"Mock server error: {exc!r}"
            )
        response.headers.update(limit_headers)
        response.route = route_label
        return response

    def _check_api_key(self, route: _Route, ctx: _Ctx, bearer: str) -> None:
        provided = ctx.headers.get("x-api-key", "")
        if not provided:
            if route.template == "/api/auth/refresh":
                message = "Missing API key or client_id"
            elif bearer and route.template.startswith("/api/auth/"):
                message = "Public client bearer access not enabled for this application"
            else:
                message = "Missing API key"
            raise _ApiError(401, "INVALID_APPLICATION", message)
        expected = self.mock.api_key
        if expected is not None and not hmac.compare_digest(
            provided.encode("utf-8"), expected.encode("utf-8")
        ):
            raise _ApiError(401, "INVALID_APPLICATION", "Invalid API key")

    def _authorize(self, route: _Route, ctx: _Ctx) -> None:
        if route.auth == _NO_AUTH:
            return
        scheme, _, token = ctx.headers.get("authorization", "").partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        if token and not ctx.headers.get("x-api-key") and token.count(".") != 2:
            # The real server reads a non-JWT bearer value as the API key.
            ctx.headers["x-api-key"], token = token, ""
        self._check_api_key(route, ctx, token)
        if route.auth == _API_KEY:
            return
        if not token:
            raise _ApiError(401, "UNAUTHORIZED", "Authentication required")
        user, session = self.store.authenticate(token)
        ctx.user_, ctx.session_, ctx.token = user, session, token
        ctx.previous_activity = session.last_activity
        session.last_activity = self.store.now()
        if route.auth == _ADMIN and not user.is_admin:
            raise _ApiError(403, "FORBIDDEN", "Admin access required")

    # -- auth --------------------------------------------------------------------------------

    def register(self, ctx: _Ctx) -> _Response:
        body = ctx.json_body()
        _check_fields(
            body,
            [
                ("email", "email", True),
                ("password", "str", True),
                ("username", "str", False),
                ("phone_number", "str", False),
            ],
        )
        _check_password(body["password"])
        user = self.store.create_user(
            email=body["email"].strip(),
            password=body["password"],
            username=body.get("username"),
            phone_number=body.get("phone_number"),
        )
        _, access, refresh = self.store.start_session(user, ctx)
        data = _nested_tokens(self.store, access, refresh)
        data["user"] = _full_user(user)
        data["email_confirmed"] = True
        return _success(ctx, data, status=201)

    def login(self, ctx: _Ctx) -> _Response:
        body = ctx.json_body()
        _check_fields(body, [("email", "str", True), ("password", "str", True)])
        user = self.store.user_by_email(body["email"])
        password = str(body["password"])
        if (
            user is None
            or user.password is None
            or not hmac.compare_digest(user.password.encode(), password.encode())
        ):
            raise _ApiError(
                401,
                "INVALID_CREDENTIALS",
                "Invalid email or password. Check your credentials, or use Forgot password to "
                "reset.",
            )
        if user.totp_secret is not None:
            # A second factor is due: a challenge instead of tokens (POST /api/auth/mfa/verify).
            now = self.store.now()
            challenge = _MfaChallenge(
                _uuid(), secrets.token_urlsafe(32), user.id, now + _MFA_CHALLENGE_TTL
            )
            self.store.mfa_challenges[challenge.id] = challenge
            return _success(
                ctx,
                {
                    "mfa_required": True,
                    "challenge_id": challenge.id,
                    "challenge": challenge.challenge,
                    "expires_at": _iso(challenge.expires_at),
                    "methods": ["totp", "recovery_code"],
                },
            )
        _, access, refresh = self.store.start_session(user, ctx)
        return _success(
            ctx, {**_token_pair(self.store, access, refresh), "user": _compact_user(user)}
        )

    # -- MFA ---------------------------------------------------------------------------------

    @staticmethod
    def _mfa_code_fields(body: _Json, names: Sequence[str], required: bool) -> None:
        errors: dict[str, str] = {}
        for name in names:
            value = body.get(name)
            if value is None:
                if required:
                    errors[name] = "Field required"
            elif not isinstance(value, str):
                errors[name] = _KIND_MESSAGES["str"]
            elif len(value) < 6:
                errors[name] = "String should have at least 6 characters"
        if errors:
            raise _fields_error(errors)

    def mfa_verify(self, ctx: _Ctx) -> _Response:
        body = ctx.json_body()
        _check_fields(body, [("challenge_id", "str", True), ("challenge", "str", True)])
        self._mfa_code_fields(body, ("code", "recovery_code"), False)
        if (body.get("code") is None) == (body.get("recovery_code") is None):
            raise _fields_error(
                {"_root_": "Value error, Provide exactly one of code or recovery_code"}
            )
        store = self.store
        record = store.mfa_challenges.get(body["challenge_id"])
        if record is None:
            raise _validation("Challenge not found")
        if record.used:
            raise _validation("Challenge replayed")
        if not hmac.compare_digest(record.challenge.encode(), str(body["challenge"]).encode()):
            raise _validation("Challenge mismatch")
        if record.expires_at <= store.now():
            raise _validation("Challenge expired")
        user = store.users[record.user_id]
        extra: _Json = {}
        if body.get("code") is not None:
            secret = user.totp_secret
            if secret is None or not store.check_totp(user, secret, body["code"]):
                # A wrong code leaves the challenge usable.
                raise _ApiError(401, "INVALID_CREDENTIALS", "Invalid authenticator code")
            extra["mfa_method"] = "totp"
        else:
            if not store.use_recovery_code(user, body["recovery_code"]):
                raise _ApiError(401, "INVALID_CREDENTIALS", "Invalid recovery code")
            extra["mfa_method"] = "recovery_code"
            extra["recovery_codes_remaining"] = len(user.recovery_codes)
        record.used = True
        _, access, refresh = store.start_session(user, ctx)
        return _success(
            ctx,
            {**_token_pair(store, access, refresh), "user": _compact_user(user), **extra},
        )

    def totp_enroll(self, ctx: _Ctx) -> _Response:
        ctx.json_body(required=False)
        user = ctx.user
        if user.totp_secret is not None:
            raise _validation(
                "TOTP MFA is already enabled for this account. Disable it before re-enrolling."
            )
        # Every enrolment starts over with a new secret (160 bits, base32 as authenticators
        # expect it).
        secret = base64.b32encode(secrets.token_bytes(20)).decode("ascii")
        user.totp_pending = secret
        account = user.email or user.id
        label = quote(_APPLICATION_NAME) + ":" + quote(account, safe="")
        uri = f"otpauth://totp/{label}?secret={secret}&issuer={quote(_APPLICATION_NAME)}"
        return _success(
            ctx,
            {
                "secret": secret,
                "provisioning_uri": uri,
                "issuer": _APPLICATION_NAME,
                "account_name": account,
            },
        )

    def totp_activate(self, ctx: _Ctx) -> _Response:
        body = ctx.json_body()
        self._mfa_code_fields(body, ("code",), True)
        user = ctx.user
        if user.totp_secret is not None:
            raise _validation("TOTP MFA is already enabled for this account")
        pending = user.totp_pending
        if pending is None:
            raise _validation("No TOTP enrollment to activate. Start enrollment first.")
        user.totp_last_step = -1
        if not self.store.check_totp(user, pending, body["code"]):
            raise _ApiError(401, "INVALID_CREDENTIALS", "Invalid authenticator code")
        user.totp_secret, user.totp_pending = pending, None
        user.recovery_codes = [
            "-".join(secrets.token_hex(2) for _ in range(4)) for _ in range(_RECOVERY_CODES)
        ]
        return _success(
            ctx,
            {"recovery_codes": list(user.recovery_codes), "activated_at": _iso(self.store.now())},
        )

    def totp_disable(self, ctx: _Ctx) -> _Response:
        body = ctx.json_body()
        self._mfa_code_fields(body, ("code",), True)
        user = ctx.user
        secret = user.totp_secret
        if secret is None:
            raise _validation("TOTP MFA is not enabled for this account")
        code: str = body["code"]
        store = self.store
        if not (store.check_totp(user, secret, code) or store.use_recovery_code(user, code)):
            raise _ApiError(401, "INVALID_CREDENTIALS", "Invalid authenticator or recovery code")
        user.totp_secret, user.totp_pending, user.recovery_codes = None, None, []
        user.totp_last_step = -1
        return _success(ctx, {"message": "TOTP MFA has been disabled"})

    def auth_methods(self, ctx: _Ctx) -> _Response:
        methods = [
            {"method": name, "enabled": enabled, "config": dict(config)}
            for name, enabled, config in _AUTH_METHODS
        ]
        return _success(ctx, {"methods": methods})

    def session_context(self, ctx: _Ctx) -> _Response:
        user = ctx.user
        entitlements = [e.public() for e in self.store.user_entitlements(user.id)]
        return _success(
            ctx,
            {
                "user": _full_user(user),
                "entitlements": entitlements,
                "entitlements_count": len(entitlements),
                "wallets": [dict(w) for w in user.wallets],
                "tier": user.tier,
                "mfa_enrolled": user.totp_secret is not None,
                "methods_hint": "/api/auth/methods",
            },
        )

    def refresh(self, ctx: _Ctx) -> _Response:
        body = ctx.json_body(required=False)
        token = body.get("refresh_token")
        if not token:
            raise _ApiError(401, "INVALID_REFRESH_TOKEN", "Refresh token required")
        store = self.store
        now = store.now()
        record = store.refresh_tokens.get(token) if isinstance(token, str) else None
        if record is None:
            raise _ApiError(401, "INVALID_REFRESH_TOKEN", _INVALID_REFRESH)
        grace = record.grace
        if (
            grace is not None
            and now < grace.until
            and (grace.ip, grace.user_agent) == (ctx.client_ip, ctx.user_agent)
        ):
            # A client that lost the first answer (timeout, crash) gets the same pair again.
            return _success(ctx, dict(grace.data))
        if record.state == "deleted":
            raise _ApiError(401, "INVALID_REFRESH_TOKEN", "Refresh token not found or already used")
        if record.state == "consumed":
            # Someone else holds this token: sign the identity out everywhere.
            store.revoke_refresh_tokens(record.user_id)
            raise _ApiError(401, "REFRESH_TOKEN_REPLAY", _REPLAY)
        if record.state == "revoked":
            raise _ApiError(401, "REFRESH_TOKEN_REPLAY", _REPLAY)
        if now >= record.expires_at:
            raise _ApiError(401, "INVALID_REFRESH_TOKEN", _INVALID_REFRESH)
        if (
            self.mock.refresh_binding
            and record.user_agent
            and ctx.user_agent
            and (record.ip, record.user_agent) != (ctx.client_ip, ctx.user_agent)
        ):
            # Measured: the token is spent (no grace answer), so its next use is a replay;
            # access tokens, sessions and the user's other refresh tokens are left alone.
            record.state = "consumed"
            raise _ApiError(401, "REFRESH_TOKEN_ANOMALOUS", _ANOMALOUS)
        user = store.users[record.user_id]
        _, access, refresh = store.start_session(user, ctx)
        data = _token_pair(store, access, refresh)
        record.state = "consumed"
        record.grace = _Grace(ctx.client_ip, ctx.user_agent, now + _REFRESH_GRACE, dict(data))
        return _success(ctx, data)

    def logout(self, ctx: _Ctx) -> _Response:
        body = ctx.json_body(required=False)
        token = ctx.token
        if token is not None:
            self.store.access_tokens[token].revoked = True
        refresh = body.get("refresh_token")
        record = self.store.refresh_tokens.get(refresh) if isinstance(refresh, str) else None
        if record is not None and record.state == "active":
            record.state = "revoked"
        return _success(ctx, {"message": "Successfully logged out"})

    def nonce(self, ctx: _Ctx) -> _Response:
        body = ctx.json_body()
        _check_fields(body, [("wallet_address", "str", True), ("chain", "str", False)])
        address: str = body["wallet_address"]
        if address.startswith("0x"):
            address = address.lower()
        now = self.store.now()
        value = secrets.token_hex(32)
        message = (
            f"SPAPS wants you to sign in with your wallet:\n{address}\n\nNonce: {value}\n"
            f"Timestamp: {_iso(now)}\nDomain: sweetpotato.dev\n\n"
            "This request will not trigger a blockchain transaction or cost any gas fees."
        )
        record = _Nonce(value, address, body.get("chain"), message, now + _NONCE_TTL)
        self.store.nonces[message] = record
        return _success(
            ctx,
            {
                "nonce": value,
                "message": message,
                "wallet_address": address,
                "expires_at": _iso(record.expires_at),
            },
        )

    def wallet_sign_in(self, ctx: _Ctx) -> _Response:
        body = ctx.json_body()
        _check_fields(
            body,
            [
                ("wallet_address", "str", True),
                ("signature", "str", True),
                ("message", "str", True),
                ("chain_type", "str", False),
            ],
        )
        address: str = body["wallet_address"]
        record = self.store.nonces.get(body["message"])
        # Chain signatures cannot be checked with the stdlib; an unused, unexpired nonce message
        # issued for this address stands in for that proof.  (The real 0.6.6 answers a valid
        # signature with a 500; the emulator answers what the route is meant to.)
        if (
            record is None
            or record.used
            or record.wallet_address.lower() != address.lower()
            or record.expires_at <= self.store.now()
        ):
            raise _ApiError(
                401,
                "INVALID_SIGNATURE",
                "We could not verify your wallet signature. Please sign the message with the "
                "correct wallet and try again.",
            )
        record.used = True
        user = self.store.user_by_wallet(address)
        if user is None:
            wallet = {
                "wallet_address": record.wallet_address,
                "chain_type": body.get("chain_type") or record.chain or "ethereum",
                "verified": True,
            }
            user = self.store.create_user(
                email=None, password=None, email_confirmed=False, wallets=[wallet]
            )
        _, access, refresh = self.store.start_session(user, ctx)
        return _success(
            ctx, {**_token_pair(self.store, access, refresh), "user": _compact_user(user)}
        )

    def deprecated_sign_in(self, ctx: _Ctx) -> _Response:
        if ctx.params["chain"] not in ("ethereum", "solana"):
            raise _ApiError(404, "NOT_FOUND", "Not Found")
        _check_fields(
            ctx.json_body(),
            [("wallet_address", "str", True), ("signature", "str", True), ("message", "str", True)],
        )
        message = "This route is deprecated. Use /api/auth/wallet-sign-in."
        raise _ApiError(
            410,
            "HTTP_ERROR",
            message,
            details={
                "error": "route_deprecated",
                "message": message,
                "replacement": "/api/auth/wallet-sign-in",
            },
        )

    def magic_link(self, ctx: _Ctx) -> _Response:
        body = ctx.json_body()
        _check_fields(body, [("email", "email", True)])
        email = body["email"].strip()
        now = self.store.now()
        token = secrets.token_urlsafe(32)
        self.store.magic_links[token] = _OneTimeToken(token, email, now + _MAGIC_LINK_TTL)
        return _success(
            ctx,
            {
                "message": "Magic link sent successfully",
                "email": email,
                "sent_at": _iso(now),
                "delivery_status": "sent",
                "delivery_error_code": None,
                "state": None,
            },
        )

    def verify_magic_link(self, ctx: _Ctx) -> _Response:
        body = ctx.json_body()
        _check_fields(body, [("token", "str", True), ("type", "str", True)])
        record = self.store.magic_links.get(body["token"])
        if record is None or record.used or record.expires_at <= self.store.now():
            raise _ApiError(401, "INVALID_TOKEN", _MAGIC_LINK_INVALID)
        record.used = True
        user = self.store.user_by_email(record.email)
        if user is None:
            # Magic links double as passwordless sign-up, as on the real service.
            user = self.store.create_user(email=record.email, password=None)
        user.email_confirmed = True
        _, access, refresh = self.store.start_session(user, ctx)
        data = _nested_tokens(self.store, access, refresh)
        data["user"] = _compact_user(user)
        return _success(ctx, data)

    def current_user(self, ctx: _Ctx) -> _Response:
        return _success(ctx, {"user": _full_user(ctx.user)})

    def password_reset(self, ctx: _Ctx) -> _Response:
        body = ctx.json_body()
        _check_fields(body, [("email", "email", True), ("redirect_url", "str", False)])
        email = body["email"].strip()
        now = self.store.now()
        # The answer is identical whether or not the account exists, to avoid user enumeration.
        if self.store.user_by_email(email) is not None:
            token = secrets.token_urlsafe(32)
            self.store.reset_tokens[token] = _OneTimeToken(token, email, now + _RESET_TTL)
        return _success(ctx, {"email": email, "sent_at": _iso(now)})

    def password_reset_confirm(self, ctx: _Ctx) -> _Response:
        body = ctx.json_body()
        _check_fields(body, [("token", "str", True), ("new_password", "str", True)])
        record = self.store.reset_tokens.get(body["token"])
        user = self.store.user_by_email(record.email) if record is not None else None
        if record is None or record.used or record.expires_at <= self.store.now() or user is None:
            raise _ApiError(400, "INVALID_TOKEN", "Password reset token is invalid or expired")
        _check_password(body["new_password"])
        record.used = True
        user.password = body["new_password"]
        return _success(ctx, {"message": "Password has been reset successfully"})

    def set_password(self, ctx: _Ctx) -> _Response:
        body = ctx.json_body()
        _check_fields(body, [("new_password", "str", True), ("current_password", "str", False)])
        user = ctx.user
        current = body.get("current_password")
        if user.password is not None:
            if current is None:
                raise _fields_error({"current_password": "Field required"})
            if not hmac.compare_digest(user.password.encode(), str(current).encode()):
                raise _ApiError(401, "INVALID_CREDENTIALS", "Current password is incorrect")
        _check_password(body["new_password"])
        user.password = body["new_password"]
        return _success(ctx, {"message": "Password updated successfully"})

    # -- sessions ----------------------------------------------------------------------------

    def session_current(self, ctx: _Ctx) -> _Response:
        view = _session_view(ctx.session, ctx.user, self.store.now(), ctx.previous_activity)
        view["is_current"] = True
        return _success(ctx, {"session": view})

    def session_validate(self, ctx: _Ctx) -> _Response:
        ctx.json_body(required=False)
        view = _session_view(ctx.session, ctx.user, self.store.now(), ctx.previous_activity)
        return _success(ctx, {"valid": True, "reason": None, "session": view})

    def sessions_redirect(self, ctx: _Ctx) -> _Response:
        # FastAPI's redirect_slashes answers before authentication, with an absolute URL.
        host = ctx.headers.get("host") or f"{self.mock.host}:{self.mock.port}"
        location = f"http://{host}/api/sessions/" + (f"?{ctx.raw_query}" if ctx.raw_query else "")
        return _Response(307, headers={"Location": location})

    def sessions_list(self, ctx: _Ctx) -> _Response:
        limit = ctx.query_int("limit", 50, minimum=1)
        offset = ctx.query_int("offset", 0)
        sessions = self.store.user_sessions(ctx.user)
        now = self.store.now()
        page = sessions[offset : offset + limit]
        return _success(
            ctx,
            {
                "sessions": [_session_view(s, None, now, s.last_activity) for s in page],
                "total": len(sessions),
            },
        )

    def session_touch(self, ctx: _Ctx) -> _Response:
        ctx.json_body(required=False)
        # Measured on the real server: touching spends the session's refresh token, so a later
        # refresh with it is treated as a replay.
        record = self.store.session_refresh_token(ctx.session)
        if record is not None:
            record.state = "consumed"
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
            raise _ApiError(404, "NOT_FOUND", f"Session {session_id} not found")
        self.store.delete_session(session)
        return _Response(204)

    # -- memberships and entitlements (admin) ------------------------------------------------

    def membership_add(self, ctx: _Ctx) -> _Response:
        body = ctx.json_body()
        _check_fields(body, [("user_id", "str", False), ("email", "str", False)])
        if not body.get("user_id") and not body.get("email"):
            raise _fields_error({"_root_": "Value error, Either user_id or email is required"})
        if body.get("user_id"):
            user = self.store.users.get(body["user_id"])
            missing = body["user_id"]
        else:
            user = self.store.user_by_email(body["email"])
            missing = body["email"]
        if user is None:
            raise _ApiError(404, "NOT_FOUND", f"User {missing} not found")
        existing = self.store.members.get(user.id)
        if existing is not None:
            return _success(
                ctx,
                {"result": "noop", "membership": dict(existing), "invitation": None},
                status=201,
            )
        now = _iso_z(self.store.now())
        membership: _Json = {
            "id": _uuid(),
            "user_id": user.id,
            "email": user.email,
            "application_id": APPLICATION_ID,
            "status": "active",
            "permissions": None,
            "capabilities": {},
            "metadata": None,
            "created_at": now,
            "updated_at": now,
            "removed_at": None,
        }
        self.store.members[user.id] = membership
        return _success(
            ctx,
            {"result": "created", "membership": dict(membership), "invitation": None},
            status=201,
        )

    def entitlement_grant(self, ctx: _Ctx) -> _Response:
        body = ctx.json_body()
        _check_fields(
            body,
            [
                ("entitlement_key", "str", True),
                ("beneficiary_user_id", "str", False),
                ("beneficiary_email", "str", False),
                ("reason", "str", False),
                ("metadata", "dict", False),
                ("starts_at", "str", False),
                ("ends_at", "str", False),
                ("resource_type", "str", False),
                ("resource_id", "str", False),
            ],
        )
        user_id = body.get("beneficiary_user_id") or None
        email = body.get("beneficiary_email") or None
        if user_id is None and email is None:
            raise _ApiError(
                400,
                "NO_BENEFICIARY",
                "Either beneficiary_user_id or beneficiary_email is required",
            )
        # Measured: the real server does not check that the beneficiary exists (an e-mail
        # grant waits for POST /api/entitlements/claim).
        metadata: _Json = dict(body.get("metadata") or {})
        features = metadata.get("usage_features")
        if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
            features = [body["entitlement_key"]]
        raw_limits = metadata.get("usage_limits")
        limits: dict[str, float] = {}
        if isinstance(raw_limits, dict):
            for dim, value in raw_limits.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    limits[str(dim)] = float(value)
        now = self.store.now()
        entitlement = _Entitlement(
            id=_uuid(),
            user_id=user_id,
            email=email,
            key=body["entitlement_key"],
            features=list(features),
            limits=limits,
            granted_by=ctx.user.id,
            reason=body.get("reason") or None,
            metadata=metadata,
            created_at=now,
            starts_at=_parse_iso(body.get("starts_at")) or now,
            ends_at=_parse_iso(body.get("ends_at")),
            resource_type=body.get("resource_type") or "user",
            resource_id=body.get("resource_id"),
        )
        self.store.entitlements.append(entitlement)
        return _success(ctx, {"entitlement": entitlement.public()}, status=201)

    def _entitlement_query(
        self, ctx: _Ctx, missing: str, *, include_revoked: bool, include_expired: bool
    ) -> list[_Entitlement]:
        user_id = ctx.query_str("user_id") or None
        email = ctx.query_str("email") or None
        if user_id is None and email is None:
            raise _validation(missing)
        key = ctx.query_str("entitlement_key") or ctx.query_str("key") or None
        resource_type = ctx.query_str("resource_type") or None
        resource_id = ctx.query_str("resource_id") or None
        if resource_type in ("company", "org", "project") and not resource_id:
            raise _ApiError(
                400,
                "VALIDATION_FAILED",
                "resource_id is required when resource_type is 'company', 'org', or 'project'",
            )
        now = self.store.now()
        found = []
        for ent in reversed(self.store.entitlements):
            # Measured: an e-mail lookup finds only grants made to that e-mail.
            if user_id is not None:
                if ent.user_id != user_id:
                    continue
            elif (ent.email or "").lower() != str(email).lower():
                continue
            if key is not None and ent.key != key:
                continue
            if resource_type is not None and ent.resource_type != resource_type:
                continue
            if resource_id is not None and ent.resource_id != resource_id:
                continue
            if ent.revoked_at is not None and not include_revoked:
                continue
            expired = ent.ends_at is not None and ent.ends_at <= now
            if expired and not include_expired:
                continue
            found.append(ent)
        return found

    def entitlement_check(self, ctx: _Ctx) -> _Response:
        found = self._entitlement_query(
            ctx,
            "Either user_id or email is required",
            include_revoked=False,
            include_expired=False,
        )
        now = self.store.now()
        active = [e for e in found if e.active(now)]
        return _success(
            ctx,
            {"has_entitlement": bool(active), "entitlements": [e.public() for e in active]},
        )

    def entitlement_list(self, ctx: _Ctx) -> _Response:
        limit = ctx.query_int("limit", 50, minimum=1)
        offset = ctx.query_int("offset", 0)
        found = self._entitlement_query(
            ctx,
            "Either user_id or email query parameter is required",
            include_revoked=ctx.query_str("include_revoked") in ("true", "1"),
            include_expired=ctx.query_str("include_expired") in ("true", "1"),
        )
        page = [e.public() for e in found[offset : offset + limit]]
        # Measured: count is the size of this page, not of the whole result.
        return _success(ctx, {"entitlements": page, "count": len(page)})

    def entitlement_revoke(self, ctx: _Ctx) -> _Response:
        wanted = ctx.params["entitlement_id"]
        entitlement = next((e for e in self.store.entitlements if e.id == wanted), None)
        if entitlement is None:
            raise _ApiError(404, "NOT_FOUND", "Entitlement not found")
        if entitlement.revoked_at is not None:
            raise _ApiError(400, "ALREADY_REVOKED", "Entitlement is already revoked")
        now = self.store.now()
        entitlement.revoked_at = entitlement.updated_at = now
        entitlement.revoked_by = ctx.user.id
        entitlement.revoked_reason = ctx.query_str("reason") or None
        return _Response(204)

    def entitlement_claim(self, ctx: _Ctx) -> _Response:
        body = ctx.json_body(required=False)
        _check_fields(body, [("email", "str", False), ("user_id", "str", False)])
        user = ctx.user
        now = self.store.now()
        claimed = []
        for ent in self.store.entitlements:
            if (
                ent.user_id is None
                and user.email is not None
                and (ent.email or "").lower() == user.email.lower()
                and ent.revoked_at is None
            ):
                ent.user_id, ent.updated_at = user.id, now
                claimed.append(ent.public())
        return _success(ctx, {"claimed": claimed, "count": len(claimed)})

    # -- payments ----------------------------------------------------------------------------

    def not_implemented(self, ctx: _Ctx) -> _Response:
        raise _ApiError(501, "NOT_IMPLEMENTED", "Feature not yet available")

    # -- crypto payments ---------------------------------------------------------------------

    def invoice_create(self, ctx: _Ctx) -> _Response:
        body = ctx.json_body()
        _check_fields(
            body,
            [
                ("asset", "str", True),
                ("network", "str", True),
                ("amount", "str", True),
                ("expires_in_seconds", "int", False),
                ("beneficiary", "dict", False),
                ("metadata", "dict", False),
            ],
        )
        asset = body["asset"].strip().upper()
        network = body["network"].strip().lower()
        if asset not in _CRYPTO_ASSETS:
            raise _ApiError(400, "UNSUPPORTED_ASSET", f"Unsupported asset: {body['asset']}")
        if network not in _CRYPTO_NETWORKS:
            raise _ApiError(400, "UNSUPPORTED_NETWORK", f"Unsupported network: {body['network']}")
        raw_amount = body["amount"].strip()
        try:
            amount = Decimal(raw_amount)
        except InvalidOperation:
            raise _validation(f"Invalid amount: {raw_amount}") from None
        if not amount.is_finite() or amount <= 0:
            raise _validation("Amount must be a positive, finite decimal")
        now = self.store.now()
        ttl = body.get("expires_in_seconds")
        invoice = _Invoice(
            id=_uuid(),
            asset=asset,
            network=network,
            amount=raw_amount,
            expires_at=None if ttl is None else now + ttl,
            beneficiary=body.get("beneficiary"),
            metadata=dict(body.get("metadata") or {}),
            created_at=now,
        )
        self.store.invoices[invoice.id] = invoice
        return _success(ctx, {"invoice": invoice.public()}, status=201)

    def _invoice(self, ctx: _Ctx) -> _Invoice:
        invoice_id = ctx.params["invoice_id"]
        if not _is_uuid(invoice_id):
            raise _validation("invoice_id must be a valid UUID")
        invoice = self.store.invoices.get(invoice_id)
        if invoice is None:
            raise _ApiError(404, "INVOICE_NOT_FOUND", f"Invoice {invoice_id} not found")
        return invoice

    def invoice_get(self, ctx: _Ctx) -> _Response:
        return _success(ctx, {"invoice": self._invoice(ctx).public()})

    def invoice_status(self, ctx: _Ctx) -> _Response:
        return _success(ctx, self._invoice(ctx).status_view())

    def reconcile(self, ctx: _Ctx) -> _Response:
        ctx.json_body(required=False)
        return _success(ctx, {"reconciled": True, "message": "Payment reconciliation completed"})

    # -- stripe ------------------------------------------------------------------------------

    def _price_view(self, price: _Price) -> _Json:
        # PriceOut in openapi-0.6.6.json
        return {
            "id": price.id,
            "currency": price.currency,
            "type": "recurring" if price.recurring_interval else "one_time",
            "unit_amount": price.unit_amount,
            "recurring": (
                {"interval": price.recurring_interval, "interval_count": 1}
                if price.recurring_interval
                else None
            ),
            "nickname": None,
            "product_id": price.product_id,
            "active": True,
        }

    def _products(self) -> dict[str, _Json]:
        # ProductOut in openapi-0.6.6.json; the first seeded price is the default.
        products: dict[str, _Json] = {}
        for price in self.store.prices.values():
            view = self._price_view(price)
            product = products.setdefault(
                price.product_id,
                {
                    "id": price.product_id,
                    "name": price.product_name,
                    "description": None,
                    "active": True,
                    "application_id": APPLICATION_ID,
                    "default_price": view,
                    "prices": [],
                    "images": [],
                    "metadata": {},
                    "created_at": int(self.store.started_at),
                },
            )
            product["prices"].append(view)
        return products

    def stripe_products(self, ctx: _Ctx) -> _Response:
        limit = ctx.query_int("limit", 50, minimum=1)
        offset = ctx.query_int("offset", 0)
        products = list(self._products().values())
        if ctx.query_str("active") == "false":
            products = []
        return _success(
            ctx, {"products": products[offset : offset + limit], "total": len(products)}
        )

    def stripe_product(self, ctx: _Ctx) -> _Response:
        product = self._products().get(ctx.params["product_id"])
        if product is None:
            raise _ApiError(404, "PRODUCT_NOT_FOUND", "Product not found")
        return _success(ctx, product)

    def _checkout_session(self, ctx: _Ctx) -> _Json:
        wanted = ctx.params["session_id"]
        for owner, session in self.store.checkout_sessions:
            if owner == ctx.user.id and session["id"] == wanted:
                return session
        raise _ApiError(404, "SESSION_NOT_FOUND", "Checkout session not found")

    def stripe_checkout_get(self, ctx: _Ctx) -> _Response:
        return _success(ctx, dict(self._checkout_session(ctx)))

    def stripe_checkout_expire(self, ctx: _Ctx) -> _Response:
        ctx.json_body(required=False)
        session = self._checkout_session(ctx)
        if session["status"] == "open":
            session["status"] = "expired"
            session["expires_at"] = _iso(self.store.now())
        return _success(ctx, dict(session))

    def _subscription(self, ctx: _Ctx) -> _Subscription:
        sub = self.store.subscriptions.get(ctx.params["subscription_id"])
        if sub is None or sub.user_id != ctx.user.id:
            raise _ApiError(
                404, "SUBSCRIPTION_NOT_FOUND", "Subscription not found in local database"
            )
        return sub

    def _subscription_detail(self, sub: _Subscription) -> _Json:
        price = self.store.prices.get(sub.price_id)
        view = (
            self._price_view(price)
            if price is not None
            else {"id": sub.price_id, "currency": "usd", "type": "recurring"}
        )
        return sub.detail_view(view)

    def stripe_subscription(self, ctx: _Ctx) -> _Response:
        return _success(ctx, self._subscription_detail(self._subscription(ctx)))

    def stripe_subscription_cancel(self, ctx: _Ctx) -> _Response:
        body = ctx.json_body(required=False)
        _check_fields(body, [("immediately", "bool", False)])
        sub = self._subscription(ctx)
        if body.get("immediately"):
            sub.status, sub.canceled_at = "canceled", int(self.store.now())
            sub.cancel_at_period_end = False
        else:
            sub.cancel_at_period_end = True
        return _success(ctx, self._subscription_detail(sub))

    def stripe_subscription_update(self, ctx: _Ctx) -> _Response:
        body = ctx.json_body()
        _check_fields(body, [("price_id", "str", True)])
        sub = self._subscription(ctx)
        if body["price_id"] not in self.store.prices:
            raise _ApiError(404, "PRICE_NOT_FOUND", "Price not found")
        sub.price_id = body["price_id"]
        return _success(ctx, self._subscription_detail(sub))

    def stripe_portal(self, ctx: _Ctx) -> _Response:
        body = ctx.json_body()
        value = body.get("return_url")
        if isinstance(value, str) and not value.startswith(("http://", "https://")):
            raise _validation("return_url must use http:// or https://")
        _check_fields(body, [("return_url", "str", True)])
        if ctx.user.id not in self.store.customers:
            raise _ApiError(404, "SESSION_NOT_FOUND", "No Stripe customer found for this user")
        session_id = "bps_test_" + secrets.token_hex(12)
        return _success(
            ctx,
            {
                "id": session_id,
                "url": f"https://billing.stripe.com/p/session/{session_id}",
                "return_url": body["return_url"],
            },
        )

    def stripe_checkout(self, ctx: _Ctx) -> _Response:
        body = ctx.json_body()
        for name in ("success_url", "cancel_url"):
            # The real server checks URL schemes before it validates the rest of the body.
            value = body.get(name)
            if isinstance(value, str) and not value.startswith(("http://", "https://")):
                raise _validation(f"{name} must use http:// or https://")
        _check_fields(
            body,
            [
                ("mode", "str", True),
                ("line_items", "list", True),
                ("success_url", "str", True),
                ("cancel_url", "str", True),
                ("customer_email", "str", False),
                ("client_reference_id", "str", False),
                ("metadata", "dict", False),
                ("allow_promotion_codes", "bool", False),
                ("trial_period_days", "int", False),
            ],
        )
        errors: dict[str, str] = {}
        if body["mode"] not in ("payment", "subscription"):
            errors["mode"] = "Input should be 'payment' or 'subscription'"
        items: list[Any] = body["line_items"]
        if not items:
            errors["line_items"] = "List should have at least 1 item after validation, not 0"
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                errors[f"line_items.{index}"] = _KIND_MESSAGES["dict"]
                continue
            for extra in sorted(set(item) - {"price_id", "quantity"}):
                errors[f"line_items.{index}.{extra}"] = "Extra inputs are not permitted"
            if not isinstance(item.get("price_id"), str):
                errors[f"line_items.{index}.price_id"] = (
                    "Field required" if item.get("price_id") is None else _KIND_MESSAGES["str"]
                )
            quantity = item.get("quantity")
            if quantity is None:
                errors[f"line_items.{index}.quantity"] = "Field required"
            elif not _kind_ok("int", quantity):
                errors[f"line_items.{index}.quantity"] = _KIND_MESSAGES["int"]
            elif quantity < 1:
                errors[f"line_items.{index}.quantity"] = (
                    "Input should be greater than or equal to 1"
                )
        if errors:
            raise _fields_error(errors)
        idempotency_key = ctx.headers.get("idempotency-key")
        if idempotency_key:
            previous = self.store.checkout_by_key.get((ctx.user.id, idempotency_key))
            if previous is not None:
                if previous[0] != ctx.body.decode("utf-8", "replace"):
                    raise _ApiError(
                        409,
                        "IDEMPOTENCY_KEY_REUSED",
                        "Idempotency-Key was reused with a different payload",
                    )
                return _success(ctx, dict(previous[1]), status=201)
        prices = []
        for item in items:
            price = self.store.prices.get(item["price_id"])
            if price is None:
                raise _ApiError(404, "PRICE_NOT_FOUND", "Price not found")
            prices.append((price, int(item["quantity"])))
        now = self.store.now()
        session_id = "cs_test_" + secrets.token_hex(16)
        session = {
            "id": session_id,
            "status": "open",
            "url": f"https://checkout.stripe.com/c/pay/{session_id}",
            "amount_total": sum(p.unit_amount * q for p, q in prices),
            "currency": prices[0][0].currency,
            "customer_email": body.get("customer_email") or ctx.user.email,
            "client_reference_id": body.get("client_reference_id"),
            "success_url": body["success_url"],
            "cancel_url": body["cancel_url"],
            "payment_status": "unpaid",
            "payment_intent": None,
            "subscription": None,
            "metadata": dict(body.get("metadata") or {}),
            "expires_at": _iso(now + _CHECKOUT_TTL),
            "created_at": _iso(now),
        }
        self.store.checkout_sessions.append((ctx.user.id, session))
        self.store.customers.add(ctx.user.id)
        if idempotency_key:
            self.store.checkout_by_key[(ctx.user.id, idempotency_key)] = (
                ctx.body.decode("utf-8", "replace"),
                session,
            )
        return _success(ctx, dict(session), status=201)

    def stripe_checkout_list(self, ctx: _Ctx) -> _Response:
        limit = ctx.query_int("limit", 50, minimum=1)
        offset = ctx.query_int("offset", 0)
        mine = [dict(s) for owner, s in self.store.checkout_sessions if owner == ctx.user.id]
        page = mine[offset : offset + limit]
        return _success(ctx, {"sessions": page, "has_more": offset + len(page) < len(mine)})

    def stripe_subscriptions(self, ctx: _Ctx) -> _Response:
        limit = ctx.query_int("limit", 50, minimum=1)
        offset = ctx.query_int("offset", 0)
        status = ctx.query_str("status") or None
        mine = [
            sub.list_view()
            for sub in reversed(list(self.store.subscriptions.values()))
            if sub.user_id == ctx.user.id and (status is None or sub.status == status)
        ]
        page = mine[offset : offset + limit]
        return _success(ctx, {"subscriptions": page, "has_more": offset + len(page) < len(mine)})

    def stripe_history(self, ctx: _Ctx) -> _Response:
        limit = ctx.query_int("limit", 50, minimum=1)
        offset = ctx.query_int("offset", 0)
        status = ctx.query_str("status") or None
        mine = [
            dict(payment)
            for owner, payment in reversed(self.store.payments)
            if owner == ctx.user.id and (status is None or payment["status"] == status)
        ]
        page = mine[offset : offset + limit]
        return _success(
            ctx,
            {
                "payments": page,
                "has_more": offset + len(page) < len(mine),
                "total_count": len(mine),
            },
        )

    # -- usage -------------------------------------------------------------------------------

    def usage_features(self, ctx: _Ctx) -> _Response:
        # Measured: the catalogue is application-wide (a user without any grant sees it too);
        # the latest grant naming a feature sets its advertised limits.
        features: dict[str, _Json] = {}
        now = self.store.now()
        for ent in self.store.entitlements:
            if not ent.active(now):
                continue
            for key in ent.features:
                previous = features.get(key)
                keys = set(previous["active_entitlements"]) if previous else set()
                features[key] = {
                    "feature_key": key,
                    "display_name": _display_name(key),
                    "dimensions": sorted(ent.limits) or ["requests"],
                    "active": True,
                    "policy_key": f"{key}_default",
                    # Measured: null for a grant without metadata.usage_limits.
                    "limits": dict(ent.limits) if ent.limits else None,
                    "active_entitlements": sorted(keys | {ent.key}),
                }
        # Measured: the real catalogue is ordered by feature_key.
        return _success(ctx, {"features": [features[k] for k in sorted(features)]})

    def _decision(
        self, body: Mapping[str, Any], requested: Mapping[str, Any], *, from_body: bool
    ) -> _Json:
        """The policy answer shared by authorize and status (403 without an entitlement)."""
        if body["resource_type"] == "user" and not (
            body.get("subject_user_id") or body.get("resource_id")
        ):
            message = "resource_id or subject_user_id is required for user usage"
            if from_body:  # a model validator on the real server, a handler check for status
                raise _fields_error({"_root_": "Value error, " + message})
            raise _validation(message)
        subject = body.get("subject_user_id") or body.get("resource_id")
        feature_key = body["feature_key"]
        keys, limits = self.store.feature_policy(str(subject), feature_key)
        if not keys:
            raise _ApiError(403, "USAGE_ENTITLEMENT_REQUIRED", _ENTITLEMENT_REQUIRED)
        totals = self.store.window_totals(str(subject), feature_key)
        remaining: dict[str, float] = {}
        blocked = False
        for dim, limit in limits.items():
            wanted = float(requested.get(dim, 0) or 0)
            left = limit - totals.get(dim, 0.0) - wanted
            blocked = blocked or left < 0
            remaining[dim] = max(0.0, left)
        window_key, start, end = _month_window(self.store.now())
        reason = (
            {"code": "USAGE_LIMIT_EXCEEDED", "message": "Usage limit exceeded.", "details": None}
            if blocked
            else {
                "code": "ENTITLEMENT_ALLOWED",
                "message": "Active entitlement allows this feature.",
                "details": None,
            }
        )
        return {
            "decision": "blocked" if blocked else "allowed",
            "feature_key": feature_key,
            "resource_type": body["resource_type"],
            "resource_id": body.get("resource_id"),
            "subject_user_id": body.get("subject_user_id"),
            "active_entitlements": keys,
            "policy_key": f"{feature_key}_default",
            "window": {
                "window_key": window_key,
                "starts_at": _iso_z(start).replace(".000000", ""),
                "ends_at": _iso_z(end).replace(".000000", ""),
            },
            "window_totals": totals,
            "remaining": remaining,
            "reasons": [reason],
            "warnings": [],
        }

    def usage_authorize(self, ctx: _Ctx) -> _Response:
        body = ctx.json_body()
        _check_fields(
            body,
            [
                ("feature_key", "str", True),
                ("resource_type", "str", True),
                ("resource_id", "str", False),
                ("subject_user_id", "str", False),
                ("dimensions", "dict", False),
            ],
        )
        decision = self._decision(body, body.get("dimensions") or {}, from_body=True)
        now = self.store.now()
        ref = _uuid()
        subject = str(body.get("subject_user_id") or body.get("resource_id"))
        self.store.authorizations[ref] = _Authorization(
            ref, body["feature_key"], subject, now + _AUTHORIZATION_TTL
        )
        data = {"decision": decision.pop("decision"), "authorization_ref": ref, **decision}
        data["expires_at"] = _iso_z(now + _AUTHORIZATION_TTL)
        return _success(ctx, data)

    def usage_status(self, ctx: _Ctx) -> _Response:
        query = {name: ctx.query_str(name) for name in ("feature_key", "resource_type")}
        missing = {f"query.{k}": "Field required" for k, v in query.items() if not v}
        if missing:
            raise _fields_error(missing)
        body = {
            **query,
            "subject_user_id": ctx.query_str("subject_user_id"),
            "resource_id": ctx.query_str("resource_id"),
        }
        return _success(ctx, self._decision(body, {}, from_body=False))

    def usage_record(self, ctx: _Ctx) -> _Response:
        body = ctx.json_body()
        _check_fields(
            body,
            [
                ("authorization_ref", "uuid", True),
                ("idempotency_key", "str", True),
                ("feature_key", "str", True),
                ("resource_type", "str", True),
                ("dimensions", "dict", True),
                ("resource_id", "str", False),
                ("subject_user_id", "str", False),
                ("metadata", "dict", False),
            ],
        )
        previous = self.store.usage_by_key.get(body["idempotency_key"])
        if previous is not None:
            return _success(ctx, {**previous, "status": "replayed", "replayed": True}, status=201)
        now = self.store.now()
        auth = self.store.authorizations.get(body["authorization_ref"])
        if auth is None or auth.expires_at <= now or auth.feature_key != body["feature_key"]:
            raise _ApiError(
                409,
                "USAGE_AUTHORIZATION_EXPIRED",
                "Usage authorization is missing, expired, or mismatched",
            )
        keys, _ = self.store.feature_policy(auth.subject_user_id, auth.feature_key)
        window_key, _, _ = _month_window(now)
        dimensions = {
            str(k): float(v)
            for k, v in body["dimensions"].items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        event = {
            "event_id": _uuid(),
            "feature_key": auth.feature_key,
            "resource_type": body["resource_type"],
            "resource_id": body.get("resource_id"),
            "subject_user_id": auth.subject_user_id,
            "active_entitlements": keys,
            "policy_key": f"{auth.feature_key}_default",
            "authorization_ref": auth.ref,
            "idempotency_key": body["idempotency_key"],
            "dimensions": dimensions,
            "metadata": dict(body.get("metadata") or {}),
            "occurred_at": _iso_z(now),
            "recorded_at": _iso_z(now),
            "_window": window_key,
        }
        self.store.usage_events.append(event)
        result = {
            "event_id": event["event_id"],
            "status": "recorded",
            "replayed": False,
            "idempotency_key": body["idempotency_key"],
            "authorization_ref": auth.ref,
            "recorded_at": event["recorded_at"],
            "window_totals": self.store.window_totals(auth.subject_user_id, auth.feature_key),
        }
        self.store.usage_by_key[body["idempotency_key"]] = result
        return _success(ctx, dict(result), status=201)

    def usage_history(self, ctx: _Ctx) -> _Response:
        limit = ctx.query_int("limit", 50, minimum=1)
        offset = ctx.query_int("offset", 0)
        feature = ctx.query_str("feature_key") or ctx.query_str("feature")
        events = [
            {k: v for k, v in e.items() if not k.startswith("_")}
            for e in reversed(self.store.usage_events)
            if e["subject_user_id"] == ctx.user.id and (not feature or e["feature_key"] == feature)
        ]
        page = events[offset : offset + limit]
        # Like the real server: a full page always claims there may be more.
        has_more = len(page) == limit
        return _success(
            ctx,
            {
                "events": page,
                "has_more": has_more,
                "next_offset": offset + len(page) if has_more else None,
            },
        )

    # -- whitelist ---------------------------------------------------------------------------

    def whitelist_check(self, ctx: _Ctx) -> _Response:
        email = ctx.query_str("email")
        if email is None:
            raise _fields_error({"query.email": "Field required"})
        if not _kind_ok("email", email):
            raise _validation("Invalid email format")
        entry = self.store.whitelist.get(email.strip().lower())
        state = "is" if entry is not None else "is not"
        return _success(
            ctx,
            {
                "entry": dict(entry) if entry is not None else None,
                "message": f"Email {email} {state} whitelisted",
            },
        )

    def whitelist_list(self, ctx: _Ctx) -> _Response:
        limit = ctx.query_int("limit", 50, minimum=1)
        offset = ctx.query_int("offset", 0)
        tier = ctx.query_str("tier") or None
        entries = [e for e in self.store.whitelist.values() if tier is None or e["tier"] == tier]
        page = entries[offset : offset + limit]
        return _success(ctx, {"entries": [dict(e) for e in page], "total": len(entries)})

    def whitelist_stats(self, ctx: _Ctx) -> _Response:
        counts: dict[str, int] = {}
        for entry in self.store.whitelist.values():
            counts[entry["tier"]] = counts.get(entry["tier"], 0) + 1
        return _success(
            ctx,
            {
                "stats": {
                    "enabled": True,
                    "total": len(self.store.whitelist),
                    "tierBreakdown": [{"tier": t, "count": n} for t, n in sorted(counts.items())],
                }
            },
        )

    def whitelist_add(self, ctx: _Ctx) -> _Response:
        body = ctx.json_body()
        _check_fields(
            body,
            [
                ("email", "email", True),
                ("tier", "str", False),
                ("bypass_payment", "bool", False),
                ("metadata", "dict", False),
            ],
        )
        email = body["email"].strip()
        key = email.lower()
        if key in self.store.whitelist:
            raise _ApiError(409, "DUPLICATE_ENTRY", f"Email {email} is already whitelisted")
        now = _iso(self.store.now())
        entry = {
            "id": _uuid(),
            "application_id": APPLICATION_ID,
            "email": email,
            "tier": body.get("tier") or "premium",
            "bypass_payment": bool(body.get("bypass_payment", True)),
            "metadata": dict(body.get("metadata") or {}),
            "created_by": ctx.user.id,
            "created_at": now,
            "updated_at": now,
        }
        self.store.whitelist[key] = entry
        return _success(
            ctx,
            {"entry": dict(entry), "message": f"Email {email} successfully added to whitelist"},
            status=201,
        )

    def _whitelist_entry(self, ctx: _Ctx) -> tuple[str, _Json]:
        email = ctx.params["email"]
        entry = self.store.whitelist.get(email.strip().lower())
        if entry is None:
            raise _ApiError(404, "NOT_FOUND", f"Whitelist entry for {email} not found")
        return email.strip().lower(), entry

    def whitelist_update(self, ctx: _Ctx) -> _Response:
        body = ctx.json_body(required=False)
        _check_fields(
            body,
            [
                ("tier", "str", False),
                ("bypass_payment", "bool", False),
                ("metadata", "dict", False),
            ],
        )
        _, entry = self._whitelist_entry(ctx)
        for name in ("tier", "bypass_payment", "metadata"):
            if body.get(name) is not None:
                entry[name] = body[name]
        entry["updated_at"] = _iso(self.store.now())
        return _success(
            ctx,
            {
                "entry": dict(entry),
                "message": f"Whitelist entry for {ctx.params['email']} updated successfully",
            },
        )

    def whitelist_remove(self, ctx: _Ctx) -> _Response:
        key, _ = self._whitelist_entry(ctx)
        del self.store.whitelist[key]
        return _Response(204)

    # -- secure messages ---------------------------------------------------------------------

    def message_create(self, ctx: _Ctx) -> _Response:
        body = ctx.json_body()
        _check_fields(
            body,
            [
                ("patientId", "str", True),
                ("practitionerId", "str", True),
                ("content", "str", True),
                ("metadata", "dict", False),
            ],
        )
        patient, practitioner = body["patientId"], body["practitionerId"]
        for name, value in (("patient_id", patient), ("practitioner_id", practitioner)):
            if not _is_uuid(value):
                raise _validation(f"{name} must be a valid UUID")
        if patient not in self.store.members or practitioner not in self.store.members:
            raise _ApiError(
                403,
                "SECURE_MESSAGES_FORBIDDEN_PARTICIPANT",
                "Access denied: participant is not a member of this application",
            )
        if ctx.user.id not in (patient, practitioner) and not ctx.user.is_admin:
            raise _ApiError(
                403,
                "SECURE_MESSAGES_FORBIDDEN_PARTICIPANT",
                "Access denied: user is not a participant in this message",
            )
        message = {
            "id": _uuid(),
            "application_id": APPLICATION_ID,
            "patient_id": patient,
            "practitioner_id": practitioner,
            "content": body["content"],
            "metadata": dict(body.get("metadata") or {}),
            "created_at": _iso(self.store.now()),
        }
        self.store.messages.append(message)
        return _success(ctx, dict(message), status=201)

    def message_list(self, ctx: _Ctx) -> _Response:
        me = ctx.user
        mine = [
            dict(m)
            for m in self.store.messages
            if me.is_admin or me.id in (m["patient_id"], m["practitioner_id"])
        ]
        return _success(ctx, {"messages": mine})

    # -- metrics and health ------------------------------------------------------------------

    def _metric_snapshot(self) -> list[tuple[tuple[str, str, int], int]]:
        return sorted(self.mock._metrics.items())

    def metrics_text(self, ctx: _Ctx) -> _Response:
        store = self.store
        lines = [
            "# HELP spaps_uptime_seconds Time since service start",
            "# TYPE spaps_uptime_seconds gauge",
            f"spaps_uptime_seconds {round(store.now() - store.started_at, 1)}",
            "",
            "# HELP spaps_requests_total Total requests served",
            "# TYPE spaps_requests_total counter",
            f"spaps_requests_total {store.requests_total}",
            "",
            "# HELP spaps_errors_total Total error responses",
            "# TYPE spaps_errors_total counter",
            f"spaps_errors_total {store.errors_total}",
            "",
            "# HELP spaps_info Service information",
            "# TYPE spaps_info gauge",
            f'spaps_info{{version="{_VERSION}"}} 1',
            "",
            # Not on the real server: per-route counts so tests can see what the emulator served.
            "# HELP spaps_mock_http_requests_total HTTP requests answered by the mock.",
            "# TYPE spaps_mock_http_requests_total counter",
        ]
        for (method, route, status), count in self._metric_snapshot():
            route_label = route.replace("\\", "\\\\").replace('"', '\\"')
            lines.append(
                f'spaps_mock_http_requests_total{{method="{method}",route="{route_label}",'
                f'status="{status}"}} {count}'
            )
        body = ("\n".join(lines) + "\n").encode("utf-8")
        return _Response(200, body, "text/plain; version=0.0.4; charset=utf-8")

    def metrics_json(self, ctx: _Ctx) -> _Response:
        store = self.store
        return _self_enveloped(
            {
                "uptime_seconds": float(round(store.now() - store.started_at, 1)),
                "requests_total": store.requests_total,
                "errors_total": store.errors_total,
                "version": _VERSION,
            }
        )

    def internal_metrics(self, ctx: _Ctx) -> _Response:
        raise _ApiError(403, "FORBIDDEN", "Invalid service credentials")

    def health(self, ctx: _Ctx) -> _Response:
        started = self.store.started_at
        est = datetime.fromtimestamp(started, tz=_EST)
        return _success(
            ctx,
            {
                "status": "ok",
                "version": _VERSION,
                "started_at": _iso(started),
                "started_at_est": est.strftime("%Y-%m-%d %I:%M:%S %p EST"),
            },
        )

    def ready(self, ctx: _Ctx) -> _Response:
        connected = {"status": "connected"}
        return _self_enveloped(
            {
                "status": "ready",
                "mode": "standard",
                "environment": "development",
                "spaps_local_mode": False,
                "checks": {
                    "database": dict(connected),
                    "redis": dict(connected),
                    "pii_encryption": dict(connected),
                },
            }
        )

    # -- control routes (/__mock__/...) ------------------------------------------------------

    def control(self, method: str, path: str, raw_query: str, body: bytes, rid: str) -> _Response:
        query = parse_qs(raw_query, keep_blank_values=True)
        ctx = _Ctx(method, path, query, {}, body, rid, "", raw_query)
        mock = self.mock
        name = path[len(_CONTROL_PREFIX) :]
        try:
            if name.startswith("invoices/") and method == "POST":
                invoice_id = unquote(name[len("invoices/") :])
                payload = ctx.json_body()
                _check_fields(payload, [("status", "str", True)])
                status = payload["status"]
                try:
                    mock.set_invoice_status(invoice_id, status)
                except KeyError:
                    raise _ApiError(404, "NOT_FOUND", f"Invoice {invoice_id} not found") from None
                return _json_response(200, {"invoice_id": invoice_id, "status": status})
            handler = {
                ("POST", "prices"): self._control_prices,
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
            return _error_response(rid, exc.status, exc.code, exc.message, details=exc.details)

    def _control_inject(self, ctx: _Ctx) -> _Response:
        body = ctx.json_body()
        _check_fields(body, [("method", "str", True), ("path", "str", True)])
        method, path = body["method"], body["path"]
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
            raise _fields_error({"query.email": "Field required"})
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
        _check_fields(
            body,
            [
                ("api_key", "str", False),
                ("rate_limit", "bool", False),
                ("refresh_binding", "bool", False),
            ],
        )
        if "api_key" in body:
            self.mock.api_key = body["api_key"]
        if "rate_limit" in body:
            self.mock.rate_limit = bool(body["rate_limit"])
        if "refresh_binding" in body:
            self.mock.refresh_binding = bool(body["refresh_binding"])
        return _json_response(
            200,
            {
                "access_token_ttl": self.mock.access_token_ttl,
                "api_key": self.mock.api_key,
                "rate_limit": self.mock.rate_limit,
                "refresh_binding": self.mock.refresh_binding,
            },
        )

    def _control_prices(self, ctx: _Ctx) -> _Response:
        body = ctx.json_body()
        _check_fields(
            body,
            [
                ("price_id", "str", True),
                ("unit_amount", "int", False),
                ("currency", "str", False),
                ("product_name", "str", False),
                ("recurring_interval", "str", False),
            ],
        )
        price = self.mock.add_price(
            body["price_id"],
            unit_amount=body.get("unit_amount", 1000),
            currency=body.get("currency") or "usd",
            product_name=body.get("product_name") or "Mock product",
            recurring_interval=body.get("recurring_interval"),
        )
        return _json_response(201, price)


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
            default = "RATE_LIMIT_EXCEEDED" if self.status == 429 else "SERVER_ERROR"
            message = self.message or f"Injected fault: HTTP {self.status}"
            details: _Json = {}
            if self.status == 429 and self.retry_after is not None:
                with contextlib.suppress(ValueError):
                    details["retry_after"] = int(float(self.retry_after))
            return _error_response(
                request_id, self.status, self.code or default, message, details=details
            )
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
        # The real server echoes an inbound X-Request-ID in the header and the body.
        request_id = headers.get("x-request-id") or str(uuid.uuid4())
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
        # Injected faults get the server's headers too, so only the injected parts differ.
        if replacement is None:
            client_ip = str(self.client_address[0])
            ctx = _Ctx(method, raw_path, query, headers, body, request_id, client_ip, raw_query)
            response = mock._api.handle(ctx)
        else:
            response = replacement
            response.route = mock._api.route_label(method, raw_path)
        response.headers = {**_SECURITY_HEADERS, **response.headers}
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
            response.headers.update(_SECURITY_HEADERS)
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
