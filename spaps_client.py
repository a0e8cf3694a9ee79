"""spaps_client: a zero-dependency Python client for SPAPS.

SPAPS is the Sweet Potato Authentication & Payment Service. This single module
is the whole client: password, magic-link, wallet and MFA sign-in, sessions,
Stripe checkouts, crypto invoices, usage metering, entitlements, secure
messages, whitelist and health checks, with a sync surface (``SpapsClient``)
and an async one (``AsyncSpapsClient``). It imports only the Python
standard library (3.9+), so it can be vendored as one file, installed with
``pip install spaps-stdlib`` or shipped in an AWS Lambda layer.

Version: 0.5.0.   Licence: MIT (the notice is in the LICENSE file of the
``spaps-stdlib`` distribution; keep it next to a vendored copy).   Documentation:
https://pypi.org/project/spaps-stdlib/ and the ``docs/`` directory of the
``spaps-stdlib`` source distribution (docs/api.md is the reference).

Quick start::

    from spaps_client import SpapsClient

    with SpapsClient(base_url="https://spaps.example.com", api_key="...") as spaps:
        spaps.auth.sign_in_with_password(email="a@example.com", password="...")
        print(spaps.sessions.get_current_session().session_id)

Sections, each building on the ones above it: configuration, errors, wire
(HTTP/1.1 framing), transport (connections, proxies, TLS), retries, models,
token storage, services, async, webhooks, clients, command line.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import re
import select
import socket
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from datetime import datetime, timedelta, timezone
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    ClassVar,
    ContextManager,
    Coroutine,
    Dict,
    Generic,
    List,
    Optional,
    Protocol,
    Tuple,
    Type,
    TypeVar,
    Union,
    get_type_hints,
    overload,
)
from urllib.parse import quote, unquote, urlencode, urljoin

if TYPE_CHECKING:
    import ssl
    from concurrent.futures import ThreadPoolExecutor

    # ParamSpec is 3.10+ and typing_extensions is not the standard library: a checker that
    # targets 3.9 sees async results typed and async parameters unchecked (docs/async.md).
    if sys.version_info >= (3, 10):
        from typing import Concatenate, ParamSpec

        _P = ParamSpec("_P")

_T = TypeVar("_T")
_M = TypeVar("_M", bound="_Model")
_S = TypeVar("_S", bound="_Service")

__version__ = "0.5.0"

__all__ = [
    "__version__",
    # configuration
    "Settings", "RetryConfig", "LoggingHooks", "default_logging_hooks",
    "DEFAULT_BASE_URL", "DEFAULT_API_KEY", "DEFAULT_TIMEOUT",
    # errors
    "SpapsError", "SpapsTransportError", "SpapsConnectError", "SpapsTimeoutError",
    "SpapsConnectTimeoutError", "SpapsConfigurationError", "AuthError", "SessionError",
    "PaymentsError", "CryptoPaymentsError", "UsageError", "WhitelistError", "SecureMessagesError",
    "MetricsError", "WebhookVerificationError", "MfaRequiredError", "EntitlementsError",
    "TokenStorageError",
    # transport and retries
    "HttpRequest", "HttpResponse", "Transport", "HttpTransport", "RetryClient",
    "RetryAsyncClient",
    "create_http_client",
    # models
    "NonceResponse", "TokenPair", "TokenUser", "RegistrationTokens", "RegistrationUser",
    "RegistrationResponse", "MagicLinkSendResponse", "MagicLinkAuthResponse", "MessageResponse",
    "UserWallet", "UserProfile", "PasswordResetRequestResponse", "TotpEnrollment",
    "TotpActivation", "AuthMethod", "AuthMethods", "SessionContext",
    "SessionSummary", "SessionValidationResult", "SessionListResult", "SessionRecord",
    "SessionTouchResult", "SessionRevokeResult",
    "CheckoutSession", "PaymentIntent", "WalletDeposit", "WalletTransaction", "SubscriptionPlan",
    "SubscriptionDetail", "SubscriptionCancellation", "BalanceOverview", "BalanceAmounts",
    "UsageSummary", "PaymentMethodUpdateResult", "SubscriptionList", "Price", "Product",
    "ProductList", "CheckoutSessionList", "PortalSession", "PaymentRecord", "PaymentHistory",
    "Entitlement", "EntitlementClaimResult", "ManualGrantParams",
    "CryptoInvoice", "CryptoInvoiceStatus", "CryptoReconcileJob",
    "UsagePeriod", "UsageFeature", "UsageFeaturesResponse", "UsageRecordUsage",
    "UsageRecordResult", "UsageHistoryEntry", "UsageHistoryResponse", "UsageAuthorization",
    "UsageReason", "UsageWindow", "UsageEvent",
    "WhitelistEntry", "WhitelistCheckResult", "WhitelistListResult", "WhitelistMessage",
    "SecureMessage", "SpapsWebhookPayload",
    # token storage
    "StoredTokens", "TokenStorage", "InMemoryTokenStorage", "FileTokenStorage",
    "RedisTokenStorage",
    # services
    "AuthClient", "SessionsClient", "PaymentsClient", "CryptoPaymentsClient", "UsageClient",
    "WhitelistClient", "SecureMessagesClient", "MetricsClient", "EntitlementsClient",
    "AsyncAuthClient", "AsyncSessionsClient", "AsyncPaymentsClient", "AsyncCryptoPaymentsClient",
    "AsyncUsageClient", "AsyncWhitelistClient", "AsyncSecureMessagesClient",
    "AsyncMetricsClient", "AsyncEntitlementsClient",
    # webhooks
    "verify_crypto_webhook_signature", "verify_spaps_webhook", "generate_test_signature",
    # clients
    "SpapsClient", "AsyncSpapsClient",
    # command line
    "main", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_UNREACHABLE", "EXIT_NOT_SIGNED_IN",
]

_REDACTED = "[redacted]"
_USER_AGENT = (
    f"spaps-python/{__version__} (stdlib; Python {sys.version_info[0]}.{sys.version_info[1]})"
)


def _logger(name: str = "spaps_client") -> Any:
    """The named stdlib logger; ``logging`` is imported only once something is reported."""
    import logging

    return logging.getLogger(name)


# =============================================================================
# Configuration
# =============================================================================

DEFAULT_BASE_URL = "http://localhost:3300"
"""Where a client points when neither ``base_url`` nor ``SPAPS_API_URL`` is given."""

DEFAULT_API_KEY = "test_key_local_dev_only"
"""The development API key used when neither ``api_key`` nor ``SPAPS_API_KEY`` is given."""

DEFAULT_TIMEOUT = 10.0
"""Seconds allowed for one call, retries included, unless configured otherwise."""


@dataclass(init=False)
class Settings:
    """Connection settings, read from arguments first and ``SPAPS_*`` variables second.

    An explicit argument (anything but ``None``) wins over the environment; an
    unset or empty variable falls back to the defaults. The API key never
    appears in ``repr()``.
    """

    base_url: str
    api_key: str = field(repr=False)
    request_timeout: float

    def __init__(self, *, base_url: Optional[str] = None, api_key: Optional[str] = None,
                 request_timeout: Optional[float] = None) -> None:
        env = os.environ
        self.base_url = base_url if base_url is not None else (
            env.get("SPAPS_API_URL") or DEFAULT_BASE_URL)
        self.api_key = api_key if api_key is not None else (
            env.get("SPAPS_API_KEY") or DEFAULT_API_KEY)
        if request_timeout is None:
            raw = env.get("SPAPS_REQUEST_TIMEOUT")
            try:
                request_timeout = float(raw) if raw else DEFAULT_TIMEOUT
            except ValueError:
                raise SpapsConfigurationError(
                    f"SPAPS_REQUEST_TIMEOUT must be a number of seconds, got {raw!r}") from None
        self.request_timeout = float(request_timeout)


@dataclass
class RetryConfig:
    """When and how often a failed call is sent again; retries are on by default.

    A request is sent again only when that cannot duplicate its effect: its
    method is in ``methods`` (idempotent by HTTP), it carries an idempotency
    key, the connection could not be established, or the server answered 429
    (it did not act). A ``Retry-After`` up to ``max_retry_after`` seconds is
    waited out; a longer one ends the call at once with the error's
    ``retry_after`` set. ``retry_quota`` bounds retries across all calls of one
    client, a token bucket as in botocore's standard mode, so a dead server is
    not hammered by every caller.
    """

    max_attempts: int = 3
    backoff_factor: float = 0.5
    jitter: bool = True
    status_codes: Tuple[int, ...] = (429, 500, 502, 503, 504)
    methods: Tuple[str, ...] = ("GET", "HEAD", "OPTIONS", "DELETE", "PUT")
    max_backoff: float = 8.0
    max_retry_after: float = 30.0
    retry_quota: int = 500

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("RetryConfig.max_attempts must be at least 1")
        if self.backoff_factor < 0 or self.max_backoff < 0 or self.max_retry_after < 0:
            raise ValueError("RetryConfig delays must not be negative")
        self.status_codes = tuple(int(code) for code in self.status_codes)
        self.methods = tuple(method.upper() for method in self.methods)

    def is_retryable(self, request: HttpRequest, response: Optional[HttpResponse]) -> bool:
        """Whether ``request`` may be sent again after ``response`` (``None``: it raised)."""
        if request.method.upper() not in self.methods and not request.idempotency_key:
            # A 429 means the server did not act on the request, so even a POST may go again.
            return (response is not None and response.status_code == 429
                    and 429 in self.status_codes)
        return response is None or response.status_code in self.status_codes

    def get_backoff(self, attempt: int, random: Callable[[], float] = random.random) -> float:
        """Seconds to wait before attempt number ``attempt`` (1-based); ``random`` gives
        the jitter (a number in [0, 1))."""
        if attempt <= 1:
            return 0.0
        delay = min(self.max_backoff, self.backoff_factor * (2.0 ** (attempt - 2)))
        if self.jitter and delay > 0:
            delay = delay / 2 + delay / 2 * random()  # equal jitter: spread, never zero
        return delay


@dataclass
class LoggingHooks:
    """Callbacks observing every HTTP exchange; each is optional.

    ``on_request(request)`` once per call; ``on_response(request, response,
    elapsed, attempt)`` for every attempt answered; ``on_error(request, exc,
    attempt)`` for every attempt that raised; ``on_retry(request, attempt)``
    before attempt ``attempt`` (>= 2); ``on_backoff(request, delay, attempt)``
    before sleeping ``delay`` seconds; ``on_give_up(request, reason, attempt)``
    when a retryable failure is not retried. Requests and responses handed to
    hooks are redacted: no credentials, no body. A hook that raises is reported
    on the ``spaps_client.http`` logger and otherwise ignored.
    """

    on_request: Optional[Callable[[HttpRequest], None]] = None
    on_response: Optional[Callable[[HttpRequest, HttpResponse, float, int], None]] = None
    on_error: Optional[Callable[[HttpRequest, Exception, int], None]] = None
    on_retry: Optional[Callable[[HttpRequest, int], None]] = None
    on_backoff: Optional[Callable[[HttpRequest, float, int], None]] = None
    on_give_up: Optional[Callable[[HttpRequest, str, int], None]] = None


def default_logging_hooks() -> LoggingHooks:
    """Hooks that log to the ``spaps_client.http`` logger with structured ``extra`` fields."""
    logger = _logger("spaps_client.http")
    debug, info, warning = 10, 20, 30  # the logging levels

    def log(level: int, message: str, request: HttpRequest, **extra: Any) -> None:
        logger.log(level, message, extra={"method": request.method, "url": request.url, **extra})

    return LoggingHooks(
        on_request=lambda request: log(debug, "HTTP request", request),
        on_response=lambda request, response, elapsed, attempt: log(
            info, "HTTP response", request, status=response.status_code, elapsed=elapsed,
            attempt=attempt, request_id=response.request_id),
        on_error=lambda request, exc, attempt: log(
            warning, "HTTP error", request, error=repr(exc), attempt=attempt),
        on_retry=lambda request, attempt: log(debug, "HTTP retry", request, attempt=attempt),
        on_backoff=lambda request, delay, attempt: log(
            debug, "HTTP backoff", request, delay=delay, attempt=attempt),
        on_give_up=lambda request, reason, attempt: log(
            warning, "HTTP give up", request, reason=reason, attempt=attempt),
    )


def _coerce_config(value: Any, kind: Type[_T]) -> Optional[_T]:
    """Accept a config dataclass or a plain dict of its fields."""
    if value is None or isinstance(value, kind):
        return value
    if isinstance(value, Mapping):
        return kind(**value)
    raise TypeError(f"expected {kind.__name__} or dict, got {type(value).__name__}")


# =============================================================================
# Errors
# =============================================================================


class SpapsError(Exception):
    """Base class of every error this client raises on a failed call.

    Attributes: ``message``; ``status_code`` (HTTP status, ``None`` when no
    response arrived); ``error_code`` (the server's code such as
    ``INVALID_CREDENTIALS``); ``request_id`` (for support tickets); ``response``
    (the redacted ``HttpResponse``: no body, or ``None``); ``retry_after``
    (seconds the server asked to wait); ``retryable`` (whether sending the same
    request again later is safe and may succeed); ``details`` (the server's
    ``error.details``, e.g. ``{"fields": {"email": "..."}}``; empty when it sent
    none). ``str(error)`` is the message.
    """

    _MAX_MESSAGE = 500

    def __init__(self, message: str, *, status_code: Optional[int] = None,
                 error_code: Optional[str] = None, response: Optional[HttpResponse] = None,
                 request_id: Optional[str] = None, retry_after: Optional[float] = None,
                 retryable: Optional[bool] = None,
                 details: Optional[Dict[str, Any]] = None) -> None:
        message = str(message)
        if len(message) > self._MAX_MESSAGE:
            message = message[: self._MAX_MESSAGE] + "... (truncated)"
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.error_code = error_code
        self.response = response
        self.request_id = request_id
        self.retry_after = retry_after
        self.retryable = status_code in (429, 502, 503, 504) if retryable is None else retryable
        self.details: Dict[str, Any] = details or {}

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.message!r}, status_code={self.status_code!r}, "
                f"error_code={self.error_code!r}, request_id={self.request_id!r})")


class SpapsTransportError(SpapsError):
    """The exchange failed: DNS, connect, TLS, reset, or a response that breaks HTTP/1.1."""

    def __init__(self, message: str, *, retryable: bool = True, **kwargs: Any) -> None:
        super().__init__(message, retryable=retryable, **kwargs)


class SpapsConnectError(SpapsTransportError):
    """No connection could be made: the request provably never reached the server."""


class SpapsTimeoutError(SpapsTransportError):
    """The call did not complete within its time budget."""


class SpapsConnectTimeoutError(SpapsConnectError, SpapsTimeoutError):
    """The time budget ran out while connecting (so the request never left)."""


class SpapsConfigurationError(SpapsError, ValueError):
    """The client is configured in a way that is unsafe or cannot work (a bad base URL,
    credentials over plain HTTP to a remote host, a closed client). Also a ``ValueError``."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


class AuthError(SpapsError):
    """A call of the Auth service failed (also raised when a token refresh fails)."""


class MfaRequiredError(AuthError):
    """The password was right and the account asks for a second factor.

    Finish with ``auth.verify_mfa(challenge_id=error.challenge_id,
    challenge=error.challenge, code=...)``; ``methods`` lists the factors the
    server accepts (e.g. ``["totp"]``), ``expires_at`` when the challenge lapses.
    The challenge is never part of ``str()`` or ``repr()``.
    """

    def __init__(self, message: str, *, challenge_id: str, challenge: str,
                 methods: Optional[List[str]] = None, expires_at: Optional[str] = None,
                 **kwargs: Any) -> None:
        super().__init__(message, error_code="MFA_REQUIRED", retryable=False, **kwargs)
        self.challenge_id = challenge_id
        self.challenge = challenge
        self.methods: List[str] = list(methods or [])
        self.expires_at = expires_at


class SessionError(SpapsError):
    """A call of the Sessions service failed."""


class PaymentsError(SpapsError):
    """A call of the Payments service failed (crypto invoices raise ``CryptoPaymentsError``)."""


class CryptoPaymentsError(SpapsError):
    """A call of the crypto invoices service (``payments.crypto``) failed."""


class UsageError(SpapsError):
    """A call of the Usage service failed."""


class WhitelistError(SpapsError):
    """A call of the Whitelist service failed."""


class SecureMessagesError(SpapsError):
    """A call of the Secure messages service failed."""


class EntitlementsError(SpapsError):
    """A call of the Entitlements service failed."""


class MetricsError(SpapsError):
    """A metrics or health endpoint answered with an error status."""


class TokenStorageError(SpapsError):
    """The token storage could not be read or written (Redis down, a lock lost, ...)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code="TOKEN_STORAGE_FAILED", retryable=False)


class WebhookVerificationError(SpapsError, ValueError):
    """A webhook's signature, timestamp or payload is not acceptable; see ``code``.

    Also a ``ValueError``, which is what the reference helper raised.
    """

    def __init__(self, message: str, code: Optional[str] = None) -> None:
        super().__init__(message, error_code=code, retryable=False)
        self.code = code


# =============================================================================
# Wire: HTTP/1.1 framing (RFC 9112)
# =============================================================================
#
# Strict by default, as h11 is: a response that breaks the grammar fails the
# exchange and its connection is closed, because bytes framed wrongly would be
# read as the next response on that connection.

_MAX_HEAD = 65536
_POOL_MAXSIZE = 256  # connections kept per origin, and worker threads of an async client
_MAX_BODY = 16 * 1024 * 1024
_TOKEN = re.compile(r"[-!#$%&'*+.^_`|~0-9A-Za-z]+")  # RFC 9110 section 5.6.2
_STATUS_LINE = re.compile(rb"HTTP/1\.([0-9]) ([0-9]{3})(?: [\t \x21-\x7e\x80-\xff]*)?")
# field-name ":" OWS field-value OWS; a value is visible characters with inner spaces.
_FIELD_LINE = re.compile(
    rb"([-!#$%&'*+.^_`|~0-9A-Za-z]+):[ \t]*"
    rb"((?:[\x21-\x7e\x80-\xff]+(?:[ \t]+[\x21-\x7e\x80-\xff]+)*)?)[ \t]*")
_LINE_BREAK = re.compile(rb"\r?\n")
_BLANK_LINE = re.compile(rb"\n\r?\n")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,20})[ \t]*(?:;[^\r\n]*)?")
_FRAMING_HEADERS = frozenset({"host", "content-length", "transfer-encoding"})


class _ProtocolError(Exception):
    """The peer broke HTTP/1.1; the connection must not be used again.

    ``status`` is the response's status when its status line was readable.
    """

    status = 0


class _BodyTooLarge(_ProtocolError):
    """A body beyond ``_MAX_BODY``: sending the request again would not make it smaller."""

    def __init__(self) -> None:
        super().__init__(f"the response body exceeds {_MAX_BODY} bytes")


def _encode_request(method: str, target: str, host: str, headers: Mapping[str, str],
                    body: Optional[bytes]) -> bytes:
    """The request head (and body) as bytes; refuses anything that could split it."""
    if not _TOKEN.fullmatch(method):
        raise SpapsConfigurationError(f"not an HTTP method: {method!r}")
    if not target.isascii() or not target.isprintable() or " " in target:
        raise SpapsConfigurationError("the URL contains a space, a line break or a non-ASCII "
                                      "character; refusing to send a request that could split")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Accept-Encoding: identity"]
    for name, value in headers.items():
        if name.lower() in _FRAMING_HEADERS:
            raise SpapsConfigurationError(f"the {name} header is set by the client itself")
        if not _TOKEN.fullmatch(name) or not value.replace("\t", " ").isprintable():
            raise SpapsConfigurationError(
                f"header {name!r} has a line break or control character; refusing to send a "
                "request that could be split")
        lines.append(f"{name}: {value}")
    if body is not None or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body or b'')}")
    try:
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    except UnicodeEncodeError:
        raise SpapsConfigurationError("a header value is not Latin-1 text") from None
    return head + body if body else head


class _Reader:
    """Buffered reads from a socket under one deadline for the whole response.

    A socket timeout alone bounds each ``recv``: a server trickling a byte at a
    time could hold a call forever. Each read here gets only the time left.
    """

    __slots__ = ("buffer", "deadline", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self.deadline = 0.0

    def fill(self) -> bool:
        """Read more into the buffer; ``False`` at end of stream."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the response did not arrive within the call's time budget")
        self.sock.settimeout(remaining)
        chunk = self.sock.recv(65536)
        self.buffer += chunk
        return bool(chunk)

    def take(self, size: int) -> bytes:
        data = bytes(self.buffer[:size])
        del self.buffer[:size]  # cheap: a bytearray drops its head without copying the rest
        return data

    def line(self, *, crlf: bool = False) -> bytes:
        """One line without its ending: CRLF, or with ``crlf=False`` a bare LF too."""
        start = 0
        while True:
            end = self.buffer.find(b"\n", start)
            if end >= 0:
                line = self.take(end + 1)[:-1]
                if line.endswith(b"\r"):
                    return line[:-1]
                if crlf:
                    raise _ProtocolError("a chunk size line does not end with CRLF")
                return line
            if len(self.buffer) > _MAX_HEAD:
                raise _ProtocolError("a line of the response is too long")
            start = len(self.buffer)
            if not self.fill():
                raise _ProtocolError("the response was cut short")

    def head(self) -> List[bytes]:
        """The lines of one header block, up to the blank line that ends it."""
        start = 0
        while True:
            found = _BLANK_LINE.search(self.buffer, start)
            if found:
                head = self.take(found.end())[:found.start()]
                return _LINE_BREAK.split(head[:-1] if head.endswith(b"\r") else head)
            if len(self.buffer) > _MAX_HEAD:
                raise _ProtocolError("the response headers are too long")
            start = max(0, len(self.buffer) - 2)
            if not self.fill():
                raise _ProtocolError("the server closed the connection without answering"
                                     if not self.buffer else "the response headers are cut short")


def _parse_fields(lines: List[bytes]) -> Dict[str, str]:
    """Header (or trailer) field lines as a dict; repeats joined with ", "."""
    fields_: Dict[str, str] = {}
    name = ""
    for line in lines:
        if line[:1] in (b" ", b"\t"):  # obs-fold: a continuation of the previous value
            if not name:
                raise _ProtocolError("the first header line starts with whitespace")
            match = _FIELD_LINE.fullmatch(b"x:" + line)
            if match is None:
                raise _ProtocolError("bad header continuation line")
            value = fields_[name] + " " + match.group(2).decode("latin-1")
            fields_[name] = value.strip()
            continue
        match = _FIELD_LINE.fullmatch(line)
        if match is None:
            # Named, not quoted: the value may be a cookie or a token.
            raise _ProtocolError(f"bad header line {line.split(b':')[0][:40]!r}")
        name = match.group(1).decode("ascii").lower()
        value = match.group(2).decode("latin-1")
        fields_[name] = f"{fields_[name]}, {value}" if name in fields_ else value
    return fields_


def _read_head(reader: _Reader) -> Tuple[int, int, Dict[str, str]]:
    """The final response's HTTP minor version, status and headers (1xx skipped)."""
    while True:
        lines = reader.head()
        status_line = _STATUS_LINE.fullmatch(lines[0])
        if status_line is None:
            raise _ProtocolError(f"bad status line {lines[0][:80]!r}")
        minor, status = int(status_line.group(1)), int(status_line.group(2))
        try:
            headers = _parse_fields(lines[1:])
        except _ProtocolError as exc:
            exc.status = status
            raise
        if status == 101 or status < 100:
            raise _ProtocolError(f"unexpected status {status} (no protocol switch was asked)")
        if status >= 200:
            return minor, status, headers


def _read_body(reader: _Reader, method: str, minor: int, status: int,
               headers: Dict[str, str]) -> Tuple[bytes, bool]:
    """The body and whether the connection may carry another exchange.

    Framing follows RFC 9112 section 6.3: no body for HEAD, 204 and 304; then
    ``Transfer-Encoding: chunked``; then one agreed ``Content-Length``; else
    the body runs until the server closes.
    """
    tokens = {token.strip().lower() for token in headers.get("connection", "").split(",")}
    reusable = minor >= 1 and "close" not in tokens
    coding = headers.get("transfer-encoding")
    length = headers.get("content-length")
    if method == "HEAD" or status in (204, 304):
        return b"", reusable
    size = None
    if length is not None:
        values = {value.strip() for value in length.split(",")}
        single = values.pop() if len(values) == 1 else ""
        if not single.isascii() or not single.isdigit():
            raise _ProtocolError(f"bad or conflicting Content-Length {length[:40]!r}")
        size = int(single)
    if coding is not None:
        if minor == 0:  # RFC 9112 section 6.1: HTTP/1.0 has no transfer codings
            raise _ProtocolError("Transfer-Encoding in an HTTP/1.0 response")
        if coding.lower() != "chunked":
            raise _ProtocolError(f"unsupported Transfer-Encoding {coding[:40]!r}")
        # With Content-Length too, chunked wins; the connection is closed (section 6.3).
        return _read_chunked(reader), reusable and size is None
    if size is None:
        return _read_until_close(reader), False
    if size > _MAX_BODY:
        raise _BodyTooLarge()
    while len(reader.buffer) < size:
        if not reader.fill():
            raise _ProtocolError(
                f"the body was cut short ({len(reader.buffer)} of {size} bytes)")
    return reader.take(size), reusable


def _read_chunked(reader: _Reader) -> bytes:
    body = bytearray()
    while True:
        line = reader.line(crlf=True)  # RFC 9112 section 2.2 allows bare LF in fields only
        size_line = _CHUNK_SIZE.fullmatch(line)
        if size_line is None:
            raise _ProtocolError(f"bad chunk size line {line[:40]!r}")
        size = int(size_line.group(1), 16)
        if size == 0:
            trailers: List[bytes] = []
            while True:
                line = reader.line()
                if not line:
                    _parse_fields(trailers)  # validated, not used
                    return bytes(body)
                trailers.append(line)
        if len(body) + size > _MAX_BODY:
            raise _BodyTooLarge()
        while len(reader.buffer) < size + 2:
            if not reader.fill():
                raise _ProtocolError("a chunk of the body was cut short")
        if reader.buffer[size:size + 2] != b"\r\n":
            raise _ProtocolError("a chunk does not end with CRLF")
        body += reader.take(size + 2)[:-2]


def _read_until_close(reader: _Reader) -> bytes:
    while reader.fill():
        if len(reader.buffer) > _MAX_BODY:
            raise _BodyTooLarge()
    return reader.take(len(reader.buffer))


# =============================================================================
# Transport: connections, proxies, TLS
# =============================================================================


class HttpRequest:
    """One HTTP request: ``method``, absolute ``url``, ``headers``, ``body`` (bytes or
    ``None``) and the ``idempotency_key`` it carries, if any.

    What hooks receive is ``redacted()``: credentials and personal data in the
    query hidden, no body.
    """

    __slots__ = ("body", "headers", "idempotency_key", "method", "url")

    def __init__(self, method: str, url: str, headers: Optional[Mapping[str, str]] = None,
                 body: Optional[bytes] = None, idempotency_key: Optional[str] = None) -> None:
        self.method = method
        self.url = url
        self.headers: Dict[str, str] = dict(headers or {})
        self.body = body
        self.idempotency_key = idempotency_key

    def redacted(self) -> HttpRequest:
        """A copy safe to log: credentials and personal query values hidden, no body."""
        return HttpRequest(self.method, _redact_url(self.url), _redact_headers(self.headers),
                           None, self.idempotency_key)

    def __repr__(self) -> str:
        return f"<HttpRequest {self.method} {_redact_url(self.url)}>"


class HttpResponse:
    """One HTTP response: ``status_code``, ``headers`` (lower-case names), ``content``
    (the body), ``elapsed`` seconds and the ``request`` it answers.

    Errors and hooks carry ``redacted()`` copies: cookies hidden and no body.
    """

    __slots__ = ("content", "elapsed", "headers", "request", "status_code")

    def __init__(self, status_code: int, headers: Mapping[str, str], content: bytes = b"",
                 *, request: HttpRequest, elapsed: float = 0.0) -> None:
        self.status_code = status_code
        self.headers: Dict[str, str] = dict(headers)
        self.content = content
        self.request = request
        self.elapsed = elapsed

    @property
    def method(self) -> str:
        """The method of the request this answers."""
        return self.request.method

    @property
    def url(self) -> str:
        """The URL of the request this answers."""
        return self.request.url

    @property
    def request_id(self) -> Optional[str]:
        """The server's ``x-request-id`` header, if any."""
        return self.headers.get("x-request-id") or None

    def redacted(self) -> HttpResponse:
        """A copy safe to log and to attach to errors: cookies hidden, no body."""
        return HttpResponse(self.status_code, _redact_headers(self.headers), b"",
                            request=self.request.redacted(), elapsed=self.elapsed)

    def __repr__(self) -> str:
        return f"<HttpResponse {self.status_code} {self.method} {_redact_url(self.url)}>"


_SECRET_HEADERS = frozenset({"authorization", "x-api-key", "x-recon-token",
                             "proxy-authorization", "cookie", "set-cookie"})
# Query parameters whose values are identifiers, not personal data, and help debugging.
_PLAIN_QUERY_KEYS = frozenset(
    {"limit", "offset", "starting_after", "period", "format", "feature", "feature_key", "tier",
     "start_date", "end_date", "cursor", "status", "active", "category", "entitlement_key",
     "resource_type", "include_expired", "include_revoked"})


def _redact_headers(headers: Mapping[str, str]) -> Dict[str, str]:
    return {name: (_REDACTED if name.lower() in _SECRET_HEADERS else value)
            for name, value in headers.items()}


def _redact_url(url: str) -> str:
    """Strip user info and hide query values that may be personal data (emails)."""
    base, sep, query = url.partition("?")
    scheme, slashes, rest = base.partition("://")
    if slashes and "@" in rest.split("/", 1)[0]:
        base = scheme + "://" + rest.split("@", 1)[1]
    if not sep:
        return base
    parts = []
    for pair in query.split("&"):
        key, eq, _value = pair.partition("=")
        parts.append(pair if (not eq or key in _PLAIN_QUERY_KEYS) else f"{key}={_REDACTED}")
    return base + "?" + "&".join(parts)


def _is_loopback(host: str) -> bool:
    host = host.lower().rstrip(".")
    if host in ("localhost", "::1") or host.endswith(".localhost"):
        return True
    octets = host.split(".")
    return len(octets) == 4 and octets[0] == "127" and all(o.isdigit() for o in octets)


class _Origin:
    """Scheme, host and port of a URL; the key connections are pooled under."""

    __slots__ = ("authority", "host", "hostport", "key", "plain_remote", "port", "scheme")

    def __init__(self, scheme: str, host: str, port: int) -> None:
        self.scheme = scheme
        self.host = host
        self.port = port
        self.key = (scheme, host, port)
        name = f"[{host}]" if ":" in host else host
        self.hostport = f"{name}:{port}"
        self.authority = name if port == (443 if scheme == "https" else 80) else self.hostport
        self.plain_remote = scheme == "http" and not _is_loopback(host)

    @classmethod
    def parse(cls, url: str) -> Tuple[_Origin, str]:
        """Split an absolute URL into its origin and request target (path + query)."""
        scheme, sep, rest = url.partition("://")
        scheme = scheme.lower()
        if not sep or scheme not in ("http", "https"):
            raise SpapsConfigurationError(f"not an http(s) URL: {_redact_url(url)!r}")
        authority, slash, target = rest.partition("/")
        authority = authority.rsplit("@", 1)[-1]
        host, port_text = authority, ""
        if authority.startswith("["):
            end = authority.find("]")
            host, port_text = authority[1:end], authority[end + 2:]
        elif ":" in authority:
            host, port_text = authority.rsplit(":", 1)
        if not host:
            raise SpapsConfigurationError(f"URL has no host: {_redact_url(url)!r}")
        if port_text and not (port_text.isascii() and port_text.isdigit()):
            raise SpapsConfigurationError(f"URL has a bad port: {_redact_url(url)!r}")
        port = int(port_text) if port_text else (443 if scheme == "https" else 80)
        return cls(scheme, host, port), "/" + target if slash else "/"


_ORIGINS: Dict[str, _Origin] = {}


def _split_url(url: str) -> Tuple[_Origin, str]:
    """``_Origin.parse``, with each ``scheme://authority`` parsed once per process."""
    end = url.find("/", url.find("://") + 3)
    prefix, target = (url, "/") if end < 0 else (url[:end], url[end:])
    origin = _ORIGINS.get(prefix)
    if origin is None:
        origin = _Origin.parse(prefix)[0]
        if len(_ORIGINS) < 512:  # a bound, for programs that call many hosts
            _ORIGINS[prefix] = origin
    return origin, target


def _proxy_for(origin: _Origin) -> Optional[str]:
    """The proxy URL for ``origin``, read as ``urllib.request`` reads it, or ``None``."""
    if sys.platform not in ("darwin", "win32") and not any(
            name.lower().endswith("_proxy") for name in os.environ):
        return None  # spares importing urllib.request (and email) on the common path
    import urllib.request

    proxy = urllib.request.getproxies().get(origin.scheme)
    if not proxy or urllib.request.proxy_bypass(f"{origin.host}:{origin.port}"):
        return None
    return proxy if "://" in proxy else "http://" + proxy


def _proxy_auth(proxy: str) -> Dict[str, str]:
    userinfo = proxy.partition("://")[2].split("/", 1)[0]
    if "@" not in userinfo:
        return {}
    raw = unquote(userinfo.rsplit("@", 1)[0]).encode()
    return {"Proxy-Authorization": "Basic " + base64.b64encode(raw).decode()}


class _Route:
    """How requests to one origin travel: directly, through a CONNECT tunnel (https via
    a proxy) or in absolute form with the proxy's credentials (http via a proxy)."""

    __slots__ = ("origin", "proxy", "proxy_headers")

    def __init__(self, origin: _Origin) -> None:
        self.origin = origin
        proxy = _proxy_for(origin)
        self.proxy = _Origin.parse(proxy)[0] if proxy else None
        self.proxy_headers = _proxy_auth(proxy) if proxy else {}


class _Connection:
    """One HTTP/1.1 connection: a socket and a buffered reader over it."""

    __slots__ = ("reader", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = _Reader(sock)

    def still_open(self) -> bool:
        """Whether an idle keep-alive connection is still usable.

        A server may close a connection while it sits in the pool; it then reads
        as end-of-file. Finding that here sends the request on a fresh connection,
        so it provably never reached the closed one.
        """
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return False
        if not readable:
            return True
        # Readable while idle: EOF, stray bytes, or TLS housekeeping (session tickets).
        self.sock.setblocking(False)
        try:
            self.sock.recv(1)
        except BlockingIOError:
            return True
        except OSError as exc:
            return type(exc).__name__ == "SSLWantReadError"
        finally:
            self.sock.setblocking(True)
        return False  # end of file, or bytes nobody asked for: unusable either way


class Transport(Protocol):
    """What ``RetryClient(transport=...)`` needs: one exchange per ``send``, and ``close``.

    ``send`` returns the response with its body read, or raises ``SpapsTransportError``
    (``SpapsConnectError`` when the request provably never left, which lets the retry
    policy send any method again). ``HttpTransport`` is the built-in one.
    """

    def send(self, request: HttpRequest, *, timeout: float) -> HttpResponse:
        """One exchange within ``timeout`` seconds."""

    def close(self) -> None:
        """Release connections; later sends may fail."""


class HttpTransport:
    """Sends one request at a time per connection over pooled keep-alive HTTP/1.1
    connections, through the environment's proxy and over TLS for https.

    This is the seam below the retry policy: ``send(request, timeout=)`` does one
    exchange or raises ``SpapsTransportError`` (``SpapsConnectError`` when the
    request never left), and ``close()`` closes the pool. A replacement only
    needs those two methods. Safe to share between threads.
    """

    def __init__(self, *, ssl_context: Optional[ssl.SSLContext] = None,
                 pool_maxsize: int = _POOL_MAXSIZE) -> None:
        if pool_maxsize < 1:
            raise ValueError("pool_maxsize must be at least 1")
        self.pool_maxsize = pool_maxsize
        self._ssl_context = ssl_context
        self._full_store = False  # whether the system store must be loaded whole
        self._idle: Dict[Tuple[str, str, int], List[_Connection]] = {}
        self._routes: Dict[Tuple[str, str, int], _Route] = {}
        self._lock = threading.Lock()
        self._closed = False

    def send(self, request: HttpRequest, *, timeout: float) -> HttpResponse:
        """One exchange, all of it within ``timeout`` seconds; the body is read in full."""
        started = time.monotonic()
        origin, target = _split_url(request.url)
        route = self._route(origin)
        headers = request.headers
        if route.proxy is not None and origin.scheme == "http":  # absolute form, no userinfo
            target = f"http://{origin.authority}{target}"
            headers = {**headers, **route.proxy_headers}
        data = _encode_request(request.method, target, origin.authority, headers, request.body)
        conn = self._acquire(route, started + timeout, request)
        remaining = started + timeout - time.monotonic()
        if remaining <= 0:  # nothing written yet: the request provably never left
            self._release(origin, conn)
            raise SpapsConnectTimeoutError(f"{request.method} {_redact_url(request.url)}: "
                                           "the call's time budget ran out before sending")
        conn.sock.settimeout(remaining)  # sendall too, on a reused connection
        conn.reader.deadline = started + timeout
        status = 0  # filled in as the response arrives
        response_headers: Dict[str, str] = {}
        try:
            conn.sock.sendall(data)
            minor, status, response_headers = _read_head(conn.reader)
            body, reusable = _read_body(conn.reader, request.method, minor, status,
                                        response_headers)
        except (OSError, _ProtocolError) as exc:
            conn.sock.close()
            error = _transport_error(exc, request, sent=True)
            error.status_code = status or getattr(exc, "status", 0) or None  # if one arrived
            error.request_id = response_headers.get("x-request-id")
            raise error from exc
        except BaseException:
            conn.sock.close()
            raise
        if reusable and not conn.reader.buffer:
            self._release(origin, conn)
        else:
            conn.sock.close()
        return HttpResponse(status, response_headers, body, request=request,
                            elapsed=time.monotonic() - started)

    def close(self) -> None:
        """Close every pooled connection; later sends fail."""
        with self._lock:
            self._closed = True
            pools, self._idle = list(self._idle.values()), {}
        for idle in pools:
            for conn in idle:
                conn.sock.close()

    def _route(self, origin: _Origin) -> _Route:
        route = self._routes.get(origin.key)
        if route is None:  # the environment's proxy settings are read once per origin
            route = self._routes[origin.key] = _Route(origin)
        return route

    def _acquire(self, route: _Route, deadline: float, request: HttpRequest) -> _Connection:
        """An idle connection that is still open, else a new one."""
        with self._lock:
            if self._closed:
                raise SpapsConfigurationError("the client is closed")
            idle = self._idle.get(route.origin.key)
            while idle:
                conn = idle.pop()
                if conn.still_open():
                    return conn
                conn.sock.close()
        return self._connect(route, deadline, request)

    def _release(self, origin: _Origin, conn: _Connection) -> None:
        with self._lock:
            idle = self._idle.setdefault(origin.key, [])
            if not self._closed and len(idle) < self.pool_maxsize:
                idle.append(conn)
                return
        conn.sock.close()

    def _connect(self, route: _Route, deadline: float, request: HttpRequest) -> _Connection:
        """Open a connection (through a proxy if configured); failures are connect errors."""
        origin = route.origin
        peer = route.proxy or origin
        sock = None
        try:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                raise TimeoutError("no time left to connect")
            sock = socket.create_connection((peer.host, peer.port), timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if origin.scheme == "https":
                if route.proxy is not None:
                    _open_tunnel(sock, route, deadline)
                context = self._ssl_context or _system_tls_context(full=self._full_store)
                sock = context.wrap_socket(sock, server_hostname=origin.host)
        except (OSError, _ProtocolError) as exc:
            if sock is not None:
                sock.close()
            if (type(exc).__name__ == "SSLCertVerificationError" and self._ssl_context is None
                    and not self._full_store and _hashed_ca_directory() is not None):
                self._full_store = True  # the CA may be in the bundle file only: load it all
                return self._connect(route, deadline, request)
            raise _transport_error(exc, request, sent=False) from exc
        return _Connection(sock)


_system_tls_lock = threading.Lock()
_system_tls: Dict[Tuple[bool, Optional[str], Optional[str]], ssl.SSLContext] = {}


def _system_tls_context(*, full: bool) -> ssl.SSLContext:
    """A context trusting the system's CA store, built once per process and shared.

    Loading the whole CA bundle takes tens of milliseconds, on the first call of every
    process. Where the store is also a hashed directory (Debian, Ubuntu, Alpine),
    OpenSSL reads from it only the certificates a handshake needs; ``full=True`` loads
    everything, the fallback when a certificate fails to verify against the directory.
    ``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` are honoured.
    """
    import ssl  # only https needs it

    key = (full, os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
    with _system_tls_lock:
        context = _system_tls.get(key)
        if context is None:
            directory = None if full else _hashed_ca_directory()
            context = (ssl.create_default_context(capath=directory) if directory
                       else ssl.create_default_context())
            _system_tls[key] = context
        return context


def _hashed_ca_directory() -> Optional[str]:
    """The system's CA directory if OpenSSL can look certificates up in it by hash."""
    import ssl

    directory = ssl.get_default_verify_paths().capath
    if sys.platform == "win32" or "SSL_CERT_FILE" in os.environ or not directory:
        return None
    try:
        names = os.listdir(directory)
    except OSError:
        return None
    return directory if any(_HASHED_NAME.fullmatch(name) for name in names) else None


_HASHED_NAME = re.compile(r"[0-9a-f]{8}\.[0-9]+")


class _TunnelRefused(_ProtocolError):
    """The proxy answered CONNECT with something other than 200."""


def _open_tunnel(sock: socket.socket, route: _Route, deadline: float) -> None:
    """Ask an HTTP proxy for a CONNECT tunnel to ``route.origin``."""
    authority = route.origin.hostport
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    lines += [f"{name}: {value}" for name, value in route.proxy_headers.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    reader = _Reader(sock)
    reader.deadline = deadline
    status = _read_head(reader)[1]  # a 200 to CONNECT has no body; any other ends here
    if status != 200 or reader.buffer:  # TLS must start right after the answer
        raise _TunnelRefused(f"proxy refused the tunnel to {authority} (HTTP {status})")


def _transport_error(exc: BaseException, request: HttpRequest, *, sent: bool
                     ) -> SpapsTransportError:
    """Wrap a socket, TLS or protocol failure; say whether the request may have arrived."""
    what = f"{request.method} {_redact_url(request.url)}"
    kind: Type[SpapsTransportError] = SpapsTransportError if sent else SpapsConnectError
    retryable = True
    if isinstance(exc, (TimeoutError, socket.timeout)):
        kind = SpapsTimeoutError if sent else SpapsConnectTimeoutError
        message = f"{what}: timed out " + ("waiting for the response" if sent else "connecting")
    elif type(exc).__name__ == "SSLCertVerificationError":
        message = (f"{what}: TLS certificate verification failed ({exc}); pass ssl_context= "
                   "with your CA, or set SSL_CERT_FILE")
        retryable = False
    elif isinstance(exc, _TunnelRefused):
        message, retryable = f"{what}: {exc}", False
    elif isinstance(exc, _ProtocolError):
        message = f"{what}: the response broke HTTP/1.1: {exc}"
        retryable = not isinstance(exc, _BodyTooLarge)
    else:
        state = "connection failed" if sent else "could not connect"
        message = f"{what}: {state}: {type(exc).__name__}: {exc}"
    return kind(message, retryable=retryable)


# =============================================================================
# Retries: the policy above the transport
# =============================================================================


class _RetryQuota:
    """A token bucket that bounds retries across all calls of one client."""

    RETRY_COST = 5
    TIMEOUT_COST = 10

    def __init__(self, capacity: int) -> None:
        self.capacity = self.level = capacity
        self.lock = threading.Lock()

    def take(self, cost: int) -> bool:
        with self.lock:
            if self.level < cost:
                return False
            self.level -= cost
            return True

    def give_back(self, amount: int) -> None:
        with self.lock:
            self.level = min(self.capacity, self.level + amount)


class RetryClient:
    """The HTTP client every service uses: a transport and the retry policy above it.

    One instance may be shared by many threads. ``timeout`` is the budget of
    one call, retries, back-off and redirects included. ``transport`` replaces
    the built-in ``HttpTransport`` (anything with ``send``/``close``);
    ``clock``, ``sleep`` and ``random`` replace ``time.monotonic``,
    ``time.sleep`` and ``random.random``, so tests can drive deadlines, back-off
    and ``Retry-After`` without waiting. ``app_info`` (e.g.
    ``"billing-worker/1.4"``) is appended to the User-Agent.
    """

    def __init__(
        self, *, base_url: str = "", timeout: float = DEFAULT_TIMEOUT,
        retry_config: Optional[Union[RetryConfig, Mapping[str, Any]]] = None,
        logging_hooks: Optional[Union[LoggingHooks, Mapping[str, Any]]] = None,
        ssl_context: Optional[ssl.SSLContext] = None, allow_insecure_http: bool = False,
        pool_maxsize: Optional[int] = None, app_info: Optional[str] = None,
        transport: Optional[Transport] = None, clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep, random: Callable[[], float] = random.random,
    ) -> None:
        if not timeout or timeout <= 0:
            raise ValueError("timeout must be a positive number of seconds")
        if app_info is not None and (not app_info.strip() or not app_info.isprintable()):
            raise ValueError("app_info must be printable text such as 'billing-worker/1.4'")
        if transport is not None and (ssl_context is not None or pool_maxsize is not None):
            raise ValueError("ssl_context and pool_maxsize belong to the transport you pass; "
                             "set them there")
        self.user_agent = f"{_USER_AGENT} {app_info.strip()}" if app_info else _USER_AGENT
        self.base_url = base_url.rstrip("/")
        if self.base_url:
            _Origin.parse(self.base_url)  # a bad URL fails here, not on the first call
        self.timeout = float(timeout)
        self.retry_config = _coerce_config(retry_config, RetryConfig) or RetryConfig()
        self.logging_hooks = _coerce_config(logging_hooks, LoggingHooks) or LoggingHooks()
        self.allow_insecure_http = allow_insecure_http
        self.transport: Transport = transport or HttpTransport(
            ssl_context=ssl_context, pool_maxsize=pool_maxsize or _POOL_MAXSIZE)
        self.clock, self.sleep, self.random = clock, sleep, random
        self._quota = _RetryQuota(self.retry_config.retry_quota)

    @property
    def pool_maxsize(self) -> int:
        """How many connections per origin the transport keeps (what async calls run on)."""
        return int(getattr(self.transport, "pool_maxsize", _POOL_MAXSIZE))

    def close(self) -> None:
        """Close the transport's connections; later calls fail."""
        self.transport.close()

    def __enter__(self) -> RetryClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def request(self, method: str, url: str, *, headers: Optional[Mapping[str, str]] = None,
                body: Optional[bytes] = None, timeout: Optional[float] = None,
                idempotency_key: Optional[str] = None,
                deadline: Optional[float] = None) -> HttpResponse:
        """Send one call with its retries and return the final response, body read.

        ``timeout`` overrides the client's budget for this call; ``deadline`` (a time
        of ``clock``) caps it, so that steps of one larger call share one budget.
        """
        url = self.base_url + url if url.startswith("/") else url
        all_headers = {"User-Agent": self.user_agent, **(headers or {})}
        if idempotency_key:
            all_headers["X-Idempotency-Key"] = idempotency_key
        if body is not None:
            all_headers.setdefault("Content-Type", "application/json")
        request = HttpRequest(method, url, all_headers, body, idempotency_key)
        self._refuse_plain_credentials(url, all_headers)
        hooks, config = self.logging_hooks, self.retry_config
        observed = (hooks.on_request or hooks.on_response or hooks.on_error or hooks.on_retry
                    or hooks.on_backoff or hooks.on_give_up)
        shown = request.redacted() if observed else request  # what hooks may see
        _fire(hooks.on_request, shown)
        budget = float(timeout) if timeout else self.timeout
        deadline = min(self.clock() + budget, deadline if deadline is not None else float("inf"))
        attempt = 1
        while True:
            started = self.clock()
            try:
                if started >= deadline:
                    raise SpapsTimeoutError(
                        f"{method} {_redact_url(url)} timed out after {budget:g}s")
                response = self._send_following_redirects(request, deadline)
            except SpapsConnectError as exc:  # never sent: any method may go again
                error: SpapsTransportError = exc
                replayable = exc.retryable
            except SpapsTransportError as exc:  # it may have reached the server
                error = exc
                replayable = error.retryable = exc.retryable and config.is_retryable(
                    request, None)
            except SpapsError as exc:  # a closed client, a header refused before sending
                _fire(hooks.on_error, shown, exc, attempt)
                raise
            else:
                if hooks.on_response is not None:
                    _fire(hooks.on_response, shown, response.redacted(), self.clock() - started,
                          attempt)
                if not config.is_retryable(request, response):
                    self._quota.give_back(1 if attempt == 1 else _RetryQuota.RETRY_COST)
                    return response
                retry_after = _parse_retry_after(response.headers.get("retry-after"))
                if retry_after is not None and retry_after > config.max_retry_after:
                    _fire(hooks.on_give_up, shown, "retry-after too long", attempt)
                    return response
                delay = (config.get_backoff(attempt + 1, self.random) if retry_after is None
                         else retry_after)
                if not self._may_retry(shown, attempt, delay, deadline, _RetryQuota.RETRY_COST):
                    return response
                attempt += 1
                continue
            _fire(hooks.on_error, shown, error, attempt)
            if not replayable:
                _fire(hooks.on_give_up, shown, "not safe to send again", attempt)
                raise error
            cost = (_RetryQuota.TIMEOUT_COST if isinstance(error, SpapsTimeoutError)
                    else _RetryQuota.RETRY_COST)
            if not self._may_retry(shown, attempt, config.get_backoff(attempt + 1, self.random),
                                   deadline, cost):
                raise error
            attempt += 1

    def _may_retry(self, shown: HttpRequest, attempt: int, delay: float, deadline: float,
                   cost: int) -> bool:
        """Decide on one more attempt, sleep the back-off, and report through hooks."""
        hooks = self.logging_hooks
        if attempt >= self.retry_config.max_attempts:
            reason = "attempts exhausted"
        elif self.clock() + delay >= deadline:
            reason = "deadline reached"
        elif not self._quota.take(cost):
            reason = "retry quota exhausted"
        else:
            if delay > 0:
                _fire(hooks.on_backoff, shown, delay, attempt + 1)
                self.sleep(delay)
            _fire(hooks.on_retry, shown, attempt + 1)
            return True
        _fire(hooks.on_give_up, shown, reason, attempt)
        return False

    def _refuse_plain_credentials(self, url: str, headers: Mapping[str, str]) -> None:
        """Credentials never cross plain HTTP to a remote host unless allowed."""
        origin = _split_url(url)[0]
        if origin.plain_remote and not self.allow_insecure_http and any(
                name.lower() in ("authorization", "x-api-key") for name in headers):
            raise SpapsConfigurationError(
                f"refusing to send credentials over plain HTTP to {origin.host}; use https:// "
                "or pass allow_insecure_http=True if this network is trusted")

    def _send_following_redirects(self, request: HttpRequest, deadline: float
                                  ) -> HttpResponse:
        """Send once, following same-origin 307/308 redirects with method and body kept.

        Every hop shares the one deadline; credentials never follow to another origin.
        """
        origin = _split_url(request.url)[0]
        for _ in range(5):
            response = self.transport.send(request, timeout=deadline - self.clock())
            location = response.headers.get("location")
            if response.status_code not in (307, 308) or not location:
                return response
            next_url = urljoin(request.url, location)
            if _split_url(next_url)[0].key != origin.key:
                return response
            request = HttpRequest(request.method, next_url, request.headers, request.body,
                                  request.idempotency_key)
        return response


class RetryAsyncClient(RetryClient):
    """``RetryClient`` for async clients, which run each call in a worker thread."""

    async def aclose(self) -> None:
        """Close the transport's connections."""
        self.close()


def create_http_client(
    *, settings: Settings, retry_config: Optional[Union[RetryConfig, Mapping[str, Any]]] = None,
    logging_hooks: Optional[Union[LoggingHooks, Mapping[str, Any]]] = None, **kwargs: Any,
) -> RetryClient:
    """A ``RetryClient`` for ``settings`` (``timeout=`` and the other ``RetryClient``
    keywords may be passed to override)."""
    kwargs.setdefault("timeout", settings.request_timeout)
    return RetryClient(base_url=settings.base_url, retry_config=retry_config,
                       logging_hooks=logging_hooks, **kwargs)


def _fire(hook: Optional[Callable[..., None]], *args: Any) -> None:
    if hook is None:
        return
    try:
        hook(*args)
    except Exception:  # a broken hook must not break the call it observes
        _logger("spaps_client.http").exception("logging hook %r failed", hook)


_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def _parse_retry_after(value: Optional[str]) -> Optional[float]:
    """Seconds from a ``Retry-After`` value: a number of seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if _SECONDS.fullmatch(value):
        return float(value)
    from email.utils import parsedate_to_datetime  # dates are rare; seconds are the rule

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


# =============================================================================
# Models
# =============================================================================


class _Model:
    """Base of every response model: a dataclass read leniently from JSON.

    ``model_validate(dict)`` reads a reply the way a server's reply should be
    read: a field that is absent or ``null`` takes its default (an empty list for
    lists), a field may arrive under any of its accepted names (``id`` or
    ``invoice_id``: ``field(metadata={"alias": ...})``), an optional field whose
    value has an unexpected type takes its default, and every key the model does
    not declare is kept in ``model_extra`` and readable as an attribute. Only a
    required field that is missing or unusable raises ``ValueError`` naming it.
    ``model_dump()`` turns the model back into a dict, extra keys included.

    Models are declared ``@dataclass(repr=False, eq=False)``: ``repr`` (without the
    fields marked ``repr=False``) and ``==`` come from here, once, rather than being
    generated for each of sixty classes at import time.
    """

    def __repr__(self) -> str:
        shown = ", ".join(f"{info.name}={getattr(self, info.name)!r}"
                          for info in fields(self) if info.repr)  # type: ignore[arg-type]
        return f"{type(self).__qualname__}({shown})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, info.name) == getattr(other, info.name)
                   for info in fields(self))  # type: ignore[arg-type]

    __hash__ = None  # type: ignore[assignment]  # equal by value and mutable, as dataclasses are

    @classmethod
    def model_validate(cls: Type[_M], obj: Any) -> _M:
        """Build an instance from a mapping (or return ``obj`` if it already is one)."""
        if isinstance(obj, cls):
            return obj
        if not isinstance(obj, Mapping):
            raise ValueError(f"{cls.__name__}: expected a JSON object, got {_kind(obj)}")
        obj = cls._prepare(obj)
        specs, known = cls.__dict__.get("_spaps_specs") or cls._specs()
        model = cls.__new__(cls)  # filled in directly: this runs for every reply
        values = model.__dict__
        extra = {key: value for key, value in obj.items() if key not in known}
        for name, keys, convert, default in specs:
            raw = None
            for key in keys:
                raw = obj.get(key)
                if raw is not None:
                    break
            if raw is None:
                if default is None:
                    raise ValueError(f"{cls.__name__}.{name}: missing required field")
                values[name] = default()
                continue
            try:
                values[name] = convert(raw)
            except (ValueError, OverflowError) as exc:  # float(10**400) overflows
                if default is None:
                    raise ValueError(f"{cls.__name__}.{name}: {exc}") from None
                # An optional field the server shaped differently never fails the call:
                # the attribute keeps its default and the value stays reachable.
                values[name] = default()
                extra[key] = raw
        values["_spaps_extra"] = extra
        return model

    @property
    def model_extra(self) -> Dict[str, Any]:
        """What the server sent beyond the declared fields (or in an unexpected shape)."""
        return self.__dict__.setdefault("_spaps_extra", {})  # type: ignore[no-any-return]

    if not TYPE_CHECKING:  # so that type checkers still flag misspelt attributes

        def __getattr__(self, name):
            extra = self.__dict__.get("_spaps_extra")
            if extra is not None and name in extra:
                return extra[name]
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def model_dump(self, *, by_alias: bool = False, exclude_none: bool = False) -> Dict[str, Any]:
        """The model as a dict keyed by attribute names (or JSON names with ``by_alias``)."""
        out: Dict[str, Any] = {}
        for info in fields(self):  # type: ignore[arg-type]
            value = _dump(getattr(self, info.name), by_alias, exclude_none)
            if not (value is None and exclude_none):
                out[_aliases(info)[0] if by_alias else info.name] = value
        for key, value in self.model_extra.items():
            if key not in out and not (value is None and exclude_none):
                out[key] = _dump(value, by_alias, exclude_none)
        return out

    @classmethod
    def _prepare(cls, obj: Mapping[str, Any]) -> Mapping[str, Any]:
        """Hook for models whose JSON needs reshaping before it is read."""
        return obj

    @classmethod
    def _specs(cls) -> Tuple[List[Tuple[str, Tuple[str, ...], Callable[[Any], Any],
                                         Optional[Callable[[], Any]]]], frozenset[str]]:
        """How each field is read: (name, JSON keys, converter, default maker or None)."""
        hints = get_type_hints(cls)
        specs = []
        for info in fields(cls):  # type: ignore[arg-type]
            default: Optional[Callable[[], Any]] = None
            if info.default_factory is not MISSING:
                default = info.default_factory
            elif info.default is not MISSING:
                default = (lambda value: lambda: value)(info.default)
            specs.append((info.name, _aliases(info), _converter(hints[info.name]), default))
        known = frozenset(key for spec in specs for key in spec[1])
        type.__setattr__(cls, "_spaps_specs", (specs, known))
        return specs, known


def _aliases(info: Any) -> Tuple[str, ...]:
    """The JSON names of a field, preferred first, its own name last."""
    alias = info.metadata.get("alias", ())
    names = (alias,) if isinstance(alias, str) else tuple(alias)
    return (*names, info.name) if info.name not in names else names


def _counted(obj: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """``obj``, its ``total`` defaulting to the length of the list under ``key``."""
    items = obj.get(key)
    if obj.get("total") is not None or not isinstance(items, list):
        return obj
    return {**obj, "total": len(items)}


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _dump(value: Any, by_alias: bool, exclude_none: bool) -> Any:
    if isinstance(value, _Model):
        return value.model_dump(by_alias=by_alias, exclude_none=exclude_none)
    if isinstance(value, list):
        return [_dump(item, by_alias, exclude_none) for item in value]
    if isinstance(value, dict):
        return {key: _dump(item, by_alias, exclude_none) for key, item in value.items()}
    return value


def _converter(hint: Any) -> Callable[[Any], Any]:
    """A function that turns a JSON value into the annotated type or raises ValueError."""
    origin, args = getattr(hint, "__origin__", None), getattr(hint, "__args__", (Any,))
    if origin is Union:  # Optional[X]
        convert = _converter(next(arg for arg in args if arg is not type(None)))
        return lambda value: None if value is None else convert(value)
    if origin is list:
        item = _converter(args[0])
        return lambda value: [item(v) for v in _expect(value, list, "a list")]
    if origin is dict or hint is dict:
        return lambda value: dict(_expect(value, dict, "an object"))
    if hint in _SCALARS:
        return _SCALARS[hint]
    if isinstance(hint, type) and issubclass(hint, _Model):
        return hint.model_validate
    raise TypeError(f"no converter for annotation {hint!r}")


def _expect(value: Any, kind: type, label: str) -> Any:
    if not isinstance(value, kind):
        raise ValueError(f"expected {label}, got {_kind(value)}")
    return value


def _to_str(value: Any) -> str:
    if type(value) is str:  # the common case first: this runs for most fields of a reply
        return value
    # Numbers are accepted for text fields: an id sent as 42 is still the id "42".
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"expected a string, got {_kind(value)}")


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected an integer, got bool")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
        try:
            number = float(value)
        except ValueError:
            number = 0.5
        if number.is_integer():
            return int(number)
    raise ValueError(f"expected an integer, got {value!r}")


def _to_float(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ValueError(f"expected a number, got {_kind(value)}")


_TRUE = frozenset({"true", "1", "yes", "y", "on", "t"})
_FALSE = frozenset({"false", "0", "no", "n", "off", "f"})


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
    raise ValueError(f"expected a boolean, got {value!r}")


_ISO_DATETIME = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d+))?)?"
    r"\s*(Z|z|[+-]\d{2}(?::?\d{2})?)?)?")


def _to_datetime(value: Any) -> datetime:
    """Parse ISO-8601 (``Z``, offsets, date-only, space separator) or Unix epoch numbers."""
    if isinstance(value, datetime):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _from_epoch(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a date-time, got {_kind(value)}")
    text = value.strip()
    if len(text) >= 10 and text[4] == "-":
        try:  # the C parser reads the common shapes; the pattern below the rest
            if text[-1] in "Zz" and sys.version_info < (3, 11):
                return datetime.fromisoformat(text[:-1] + "+00:00")
            return datetime.fromisoformat(text)
        except ValueError:
            pass
    else:
        try:
            return _from_epoch(float(text))
        except ValueError:
            pass
    match = _ISO_DATETIME.fullmatch(text)
    if match is None:
        raise ValueError(f"expected an ISO-8601 date-time, got {value!r}")
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    tzinfo: Optional[timezone] = None
    if zone in ("Z", "z"):
        tzinfo = timezone.utc
    elif zone:
        digits = zone[1:].replace(":", "")
        offset = timedelta(hours=int(digits[:2]), minutes=int(digits[2:4] or 0))
        tzinfo = timezone(-offset if zone[0] == "-" else offset)
    try:
        return datetime(int(year), int(month), int(day), int(hour or 0), int(minute or 0),
                        int(second or 0), int((fraction or "0")[:6].ljust(6, "0")),
                        tzinfo=tzinfo)
    except ValueError as exc:
        raise ValueError(f"invalid date-time {value!r}: {exc}") from None


def _from_epoch(seconds: float) -> datetime:
    try:
        return datetime.fromtimestamp(seconds, tz=timezone.utc)
    except (OverflowError, OSError, ValueError):
        raise ValueError(f"epoch timestamp out of range: {seconds!r}") from None


_SCALARS: Dict[Any, Callable[[Any], Any]] = {
    str: _to_str, int: _to_int, float: _to_float, bool: _to_bool, datetime: _to_datetime,
    Any: lambda value: value,
}

# Fields read from JSON key "id" (the attribute's own name is accepted as well).
_ID_ALIAS = {"alias": "id"}
_IS_ADMIN_ALIAS = {"alias": "isAdmin"}


# --- Auth models ---


@dataclass(repr=False, eq=False)
class TokenUser(_Model):
    """The user a token pair was issued to."""

    user_id: str = field(metadata=_ID_ALIAS)
    wallet_address: Optional[str] = None
    chain: Optional[str] = None
    email: Optional[str] = None
    username: Optional[str] = None
    tier: Optional[str] = None
    phone_number: Optional[str] = None
    wallets: Optional[List[str]] = None
    email_confirmed: Optional[bool] = None
    roles: List[str] = field(default_factory=list)
    permissions: List[str] = field(default_factory=list)
    is_admin: Optional[bool] = field(default=None, metadata=_IS_ADMIN_ALIAS)


@dataclass(repr=False, eq=False)
class TokenPair(_Model):
    """Access and refresh tokens from a sign-in or refresh; tokens hidden from ``repr``.

    ``user`` is ``None`` after a refresh: SPAPS names the user in sign-in replies only.
    """

    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    expires_in: int
    user: Optional[TokenUser] = None
    token_type: str = "Bearer"  # noqa: S105 - a token type, not a secret
    mfa_method: Optional[str] = None
    recovery_codes_remaining: Optional[int] = None


@dataclass(repr=False, eq=False)
class TotpEnrollment(_Model):
    """A TOTP secret to put in an authenticator app (or show as a QR code of
    ``provisioning_uri``); the secret and the URI are hidden from ``repr``."""

    secret: str = field(repr=False)
    provisioning_uri: str = field(repr=False)
    issuer: Optional[str] = None
    account_name: Optional[str] = None


@dataclass(repr=False, eq=False)
class TotpActivation(_Model):
    """TOTP switched on: keep the one-time ``recovery_codes`` (hidden from ``repr``)."""

    recovery_codes: List[str] = field(default_factory=list, repr=False)
    activated_at: Optional[datetime] = None


@dataclass(repr=False, eq=False)
class AuthMethod(_Model):
    """A sign-in method of the application (``password``, ``magic_link``,
    ``wallet:ethereum``, ...) and whether it is enabled."""

    method: str
    enabled: bool = False
    config: Dict[str, Any] = field(default_factory=dict)


@dataclass(repr=False, eq=False)
class AuthMethods(_Model):
    """The application's sign-in methods."""

    methods: List[AuthMethod] = field(default_factory=list)


@dataclass(repr=False, eq=False)
class NonceResponse(_Model):
    """A wallet sign-in challenge: sign ``message`` with the wallet."""

    nonce: str
    message: str
    wallet_address: str
    expires_at: datetime


@dataclass(repr=False, eq=False)
class RegistrationTokens(_Model):
    """Tokens issued on registration or magic-link sign-in; hidden from ``repr``."""

    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    expires_in: int


@dataclass(repr=False, eq=False)
class RegistrationUser(_Model):
    """The user created by ``register`` or signed in by magic link."""

    id: str
    email: Optional[str] = None
    username: Optional[str] = None
    phone_number: Optional[str] = None
    tier: Optional[str] = None
    email_confirmed: Optional[bool] = None
    wallets: Optional[List[str]] = None
    roles: List[str] = field(default_factory=list)
    is_admin: Optional[bool] = field(default=None, metadata=_IS_ADMIN_ALIAS)


@dataclass(repr=False, eq=False)
class RegistrationResponse(_Model):
    """Result of ``register``: the user and, when the server signs in at once, tokens."""

    user: RegistrationUser
    message: Optional[str] = None
    tokens: Optional[RegistrationTokens] = None


@dataclass(repr=False, eq=False)
class MagicLinkSendResponse(_Model):
    """Confirmation that a magic link was sent."""

    message: str
    email: Optional[str] = None
    sent_at: Optional[datetime] = None


class MagicLinkAuthResponse(RegistrationResponse):
    """Result of ``verify_magic_link``: the user, a message and the tokens."""

@dataclass(repr=False, eq=False)
class MessageResponse(_Model):
    """A plain confirmation message."""

    message: str


@dataclass(repr=False, eq=False)
class UserWallet(_Model):
    """A wallet linked to a user."""

    wallet_address: str
    chain_type: Optional[str] = None
    verified: Optional[bool] = None


@dataclass(repr=False, eq=False)
class UserProfile(_Model):
    """The signed-in user (``auth.get_current_user``)."""

    id: str
    username: Optional[str] = None
    email: Optional[str] = None
    phone_number: Optional[str] = None
    wallets: List[UserWallet] = field(default_factory=list)
    tier: Optional[str] = None
    metadata: Optional[Dict[str, Any]] = None
    roles: List[str] = field(default_factory=list)
    permissions: List[str] = field(default_factory=list)
    is_admin: Optional[bool] = field(default=None, metadata=_IS_ADMIN_ALIAS)


@dataclass(repr=False, eq=False)
class SessionContext(_Model):
    """Who is signed in and what they may do: user, entitlements, wallets, MFA."""

    user: UserProfile
    entitlements: List[Dict[str, Any]] = field(default_factory=list)
    entitlements_count: int = 0
    wallets: List[Dict[str, Any]] = field(default_factory=list)
    tier: Optional[str] = None
    mfa_enrolled: bool = False
    methods_hint: Optional[str] = None


class PasswordResetRequestResponse(MagicLinkSendResponse):
    """Confirmation that a password-reset email was requested."""

# --- Session models ---


@dataclass(repr=False, eq=False)
class SessionSummary(_Model):
    """The session behind the current access token."""

    session_id: str = field(metadata=_ID_ALIAS)
    user_id: str
    application_id: str
    created_at: datetime
    expires_at: datetime
    last_activity: Optional[datetime] = None
    tier: Optional[str] = None
    wallets_count: Optional[int] = None
    duration_minutes: Optional[float] = None
    idle_minutes: Optional[float] = None


@dataclass(repr=False, eq=False)
class SessionValidationResult(_Model):
    """Whether the current session is valid."""

    valid: bool
    session_id: Optional[str] = None
    expires_at: Optional[datetime] = None
    renewed: Optional[bool] = None
    reason: Optional[str] = None


@dataclass(repr=False, eq=False)
class SessionRecord(_Model):
    """One of the user's sessions, as listed by ``list_sessions``."""

    session_id: str = field(metadata=_ID_ALIAS)
    user_id: str
    application_id: str
    created_at: datetime
    expires_at: Optional[datetime] = None
    last_used: Optional[datetime] = None
    last_activity: Optional[datetime] = None
    user_agent: Optional[str] = None
    ip_address: Optional[str] = None
    is_current: Optional[bool] = None


@dataclass(repr=False, eq=False)
class SessionListResult(_Model):
    """A page of sessions; ``total`` counts all of them."""

    sessions: List[SessionRecord] = field(default_factory=list)
    total: int = 0

    @classmethod
    def _prepare(cls, obj: Mapping[str, Any]) -> Mapping[str, Any]:
        return _counted(obj, "sessions")


@dataclass(repr=False, eq=False)
class SessionTouchResult(_Model):
    """Result of ``touch_session``."""

    message: str
    session_id: str
    last_activity: Optional[datetime] = None


@dataclass(repr=False, eq=False)
class SessionRevokeResult(_Model):
    """Result of ``revoke_session``."""

    message: str
    session_id: str


# --- Payment models ---


@dataclass(repr=False, eq=False)
class CheckoutSession(_Model):
    """A Stripe checkout session: send the user to ``checkout_url``."""

    session_id: str = field(metadata={"alias": "id"})
    checkout_url: Optional[str] = field(default=None, metadata={"alias": "url"})
    expires_at: Optional[datetime] = None
    status: Optional[str] = None
    payment_status: Optional[str] = None
    amount_total: Optional[int] = None
    currency: Optional[str] = None
    metadata: Optional[Dict[str, Any]] = None


@dataclass(repr=False, eq=False)
class PaymentIntent(_Model):
    """A Stripe payment intent; ``client_secret`` is hidden from ``repr``."""

    payment_intent_id: str
    client_secret: Optional[str] = field(default=None, repr=False)
    status: Optional[str] = None


@dataclass(repr=False, eq=False)
class WalletDeposit(_Model):
    """A recorded crypto wallet deposit."""

    deposit_id: str
    status: Optional[str] = None
    amount: Optional[float] = None
    currency: Optional[str] = None
    confirmation_required: Optional[int] = None
    confirmation_current: Optional[int] = None


@dataclass(repr=False, eq=False)
class WalletTransaction(_Model):
    """A wallet deposit transaction and its confirmations."""

    transaction_id: str
    status: Optional[str] = None
    chain_type: Optional[str] = None
    currency: Optional[str] = None
    confirmations: Optional[int] = None
    amount: Optional[float] = None
    balance_added: Optional[float] = None
    completed_at: Optional[datetime] = None


@dataclass(repr=False, eq=False)
class SubscriptionPlan(_Model):
    """The price a subscription is on."""

    price_id: Optional[str] = None
    interval: Optional[str] = None


@dataclass(repr=False, eq=False)
class SubscriptionDetail(_Model):
    """A subscription and its plan."""

    subscription_id: str = field(metadata=_ID_ALIAS)
    plan: SubscriptionPlan = field(default_factory=SubscriptionPlan)
    status: Optional[str] = None
    current_period_end: Optional[datetime] = None
    cancel_at_period_end: Optional[bool] = None
    current_period_start: Optional[datetime] = None
    canceled_at: Optional[datetime] = None
    items: List[Dict[str, Any]] = field(default_factory=list)
    price_id: Optional[str] = None

    @classmethod
    def _prepare(cls, obj: Mapping[str, Any]) -> Mapping[str, Any]:
        # SPAPS names the price only inside the first item, as Stripe does.
        items = obj.get("items")
        first = items[0] if isinstance(items, list) and items else None
        price = first.get("price") if isinstance(first, dict) else None
        if not isinstance(price, dict) or not isinstance(price.get("id"), str):
            return obj
        recurring = _object_at(price, "recurring")
        return {"price_id": price["id"],
                "plan": {"price_id": price["id"], "interval": recurring.get("interval")},
                **obj}


@dataclass(repr=False, eq=False)
class SubscriptionList(_Model):
    """A page of the user's subscriptions."""

    subscriptions: List[SubscriptionDetail] = field(default_factory=list)
    has_more: bool = False


@dataclass(repr=False, eq=False)
class Price(_Model):
    """A price SPAPS manages; ``unit_amount`` in minor units (cents)."""

    price_id: str = field(metadata=_ID_ALIAS)
    currency: Optional[str] = None
    type: Optional[str] = None
    unit_amount: Optional[int] = None
    recurring: Optional[Dict[str, Any]] = None
    nickname: Optional[str] = None
    product_id: Optional[str] = None
    active: Optional[bool] = None


@dataclass(repr=False, eq=False)
class Product(_Model):
    """A product of the application's catalogue and its default price."""

    product_id: str = field(metadata=_ID_ALIAS)
    name: Optional[str] = None
    description: Optional[str] = None
    active: Optional[bool] = None
    default_price: Optional[Price] = None
    prices: List[Price] = field(default_factory=list)
    images: List[str] = field(default_factory=list)
    metadata: Optional[Dict[str, Any]] = None
    created_at: Optional[datetime] = None


@dataclass(repr=False, eq=False)
class ProductList(_Model):
    """A page of products; ``total`` counts all of them."""

    products: List[Product] = field(default_factory=list)
    total: Optional[int] = None


@dataclass(repr=False, eq=False)
class CheckoutSessionList(_Model):
    """A page of the user's checkout sessions."""

    sessions: List[CheckoutSession] = field(default_factory=list)
    has_more: bool = False


@dataclass(repr=False, eq=False)
class PortalSession(_Model):
    """A Stripe billing-portal session: send the user to ``url``."""

    url: Optional[str] = None
    session_id: Optional[str] = field(default=None, metadata=_ID_ALIAS)
    return_url: Optional[str] = None


@dataclass(repr=False, eq=False)
class PaymentRecord(_Model):
    """A payment in the user's history; ``amount`` in minor units (cents)."""

    payment_id: str = field(metadata=_ID_ALIAS)
    amount: Optional[int] = None
    currency: Optional[str] = None
    status: Optional[str] = None
    description: Optional[str] = None
    created_at: Optional[datetime] = None
    stripe_payment_intent_id: Optional[str] = None
    metadata: Optional[Dict[str, Any]] = None


@dataclass(repr=False, eq=False)
class PaymentHistory(_Model):
    """A page of the user's payments."""

    payments: List[PaymentRecord] = field(default_factory=list)
    has_more: bool = False
    total_count: Optional[int] = None


@dataclass(repr=False, eq=False)
class SubscriptionCancellation(_Model):
    """Result of ``cancel_subscription``."""

    subscription_id: str = field(metadata=_ID_ALIAS)
    status: Optional[str] = None
    cancel_at_period_end: Optional[bool] = None
    canceled_at: Optional[datetime] = None
    current_period_end: Optional[datetime] = None


@dataclass(repr=False, eq=False)
class BalanceAmounts(_Model):
    """Available and pending balance in one currency."""

    available: float
    pending: float
    currency: str


@dataclass(repr=False, eq=False)
class UsageSummary(_Model):
    """Credits used in the current billing period."""

    current_period_start: Optional[datetime] = None
    current_period_end: Optional[datetime] = None
    credits_used: Optional[int] = None
    credits_remaining: Optional[int] = None


@dataclass(repr=False, eq=False)
class BalanceOverview(_Model):
    """The user's balance, tier and usage."""

    balance: BalanceAmounts
    usage: UsageSummary = field(default_factory=UsageSummary)
    tier: Optional[str] = None
    tier_expires_at: Optional[datetime] = None


@dataclass(repr=False, eq=False)
class PaymentMethodUpdateResult(_Model):
    """Result of ``update_payment_method``."""

    payment_method_id: str
    message: Optional[str] = None
    customer_id: Optional[str] = None
    is_default: bool = False


@dataclass(repr=False, eq=False)
class CryptoInvoice(_Model):
    """A crypto invoice; ``amount`` is a decimal string such as ``"42.75"``."""

    invoice_id: str = field(metadata=_ID_ALIAS)
    asset: str
    network: str
    amount: str
    status: str
    expires_at: Optional[str] = None
    beneficiary: Optional[Dict[str, Any]] = None
    metadata: Optional[Dict[str, Any]] = None
    application_id: Optional[str] = None
    destination: Optional[Dict[str, Any]] = None
    underpaid: Optional[bool] = None
    overpaid: Optional[bool] = None
    settled_at: Optional[str] = None
    created_at: Optional[str] = None


@dataclass(repr=False, eq=False)
class CryptoInvoiceStatus(_Model):
    """The settlement status of a crypto invoice."""

    invoice_id: str = field(metadata=_ID_ALIAS)
    status: str
    finalized_at: Optional[str] = None
    normalized_amount: Optional[str] = None
    settlement_ids: Optional[List[str]] = None
    underpaid: Optional[bool] = None
    overpaid: Optional[bool] = None
    amount: Optional[str] = None
    settled_at: Optional[str] = None
    expires_at: Optional[str] = None


@dataclass(repr=False, eq=False)
class CryptoReconcileJob(_Model):
    """The outcome of ``reconcile``: SPAPS 0.6 runs it at once (``reconciled``,
    ``message``); servers that schedule it answer ``job_id`` and ``scheduled_at``."""

    job_id: Optional[str] = None
    scheduled_at: Optional[str] = None
    cursor: Optional[Dict[str, Any]] = None
    reconciled: Optional[bool] = None
    message: Optional[str] = None


# --- Usage models ---


@dataclass(repr=False, eq=False)
class UsagePeriod(_Model):
    """The billing period usage is counted in."""

    start: Optional[str] = None
    end: Optional[str] = None


@dataclass(repr=False, eq=False)
class UsageFeature(_Model):
    """A metered feature: its key (``name``, JSON ``feature_key``), dimensions and limits."""

    name: str = field(metadata={"alias": "feature_key"})
    description: Optional[str] = None
    used: Optional[float] = None
    limit: Optional[float] = None
    percentage: Optional[float] = None
    reset_at: Optional[str] = None
    display_name: Optional[str] = None
    dimensions: List[str] = field(default_factory=list)
    limits: Dict[str, Any] = field(default_factory=dict)
    active: Optional[bool] = None
    policy_key: Optional[str] = None
    active_entitlements: List[str] = field(default_factory=list)


@dataclass(repr=False, eq=False)
class UsageFeaturesResponse(_Model):
    """The user's metered features."""

    user_id: Optional[str] = None
    tier: Optional[str] = None
    period: UsagePeriod = field(default_factory=UsagePeriod)
    features: List[UsageFeature] = field(default_factory=list)
    overage: Optional[Dict[str, Any]] = None


@dataclass(repr=False, eq=False)
class UsageRecordUsage(_Model):
    """Usage of a feature after recording."""

    used: Optional[float] = None
    limit: Optional[float] = None
    remaining: Optional[float] = None


@dataclass(repr=False, eq=False)
class UsageRecordResult(_Model):
    """Result of ``record_usage``: the recorded event and the usage it brings the window to.

    ``replayed`` is true when SPAPS had already recorded this ``idempotency_key``.
    """

    record_id: str = field(metadata={"alias": "event_id"})
    feature: str = field(metadata={"alias": "feature_key"})
    quantity: Optional[float] = None
    recorded_at: Optional[str] = None
    warning: Optional[str] = None
    current_usage: UsageRecordUsage = field(default_factory=UsageRecordUsage)
    status: Optional[str] = None
    replayed: Optional[bool] = None
    idempotency_key: Optional[str] = None
    authorization_ref: Optional[str] = None
    window_totals: Dict[str, Any] = field(default_factory=dict)


@dataclass(repr=False, eq=False)
class UsageReason(_Model):
    """Why SPAPS decided as it did about a usage authorization."""

    code: str
    message: Optional[str] = None
    details: Optional[Dict[str, Any]] = None


@dataclass(repr=False, eq=False)
class UsageWindow(_Model):
    """The metering window a usage decision counts in."""

    window_key: Optional[str] = None
    starts_at: Optional[datetime] = None
    ends_at: Optional[datetime] = None


@dataclass(repr=False, eq=False)
class UsageAuthorization(_Model):
    """SPAPS's decision on using a feature (``allowed``, ``allowed_with_warning``,
    ``blocked`` or ``escalate``); record the use with ``authorization_ref``."""

    decision: str
    feature_key: str
    authorization_ref: Optional[str] = None
    resource_type: Optional[str] = None
    resource_id: Optional[str] = None
    subject_user_id: Optional[str] = None
    active_entitlements: List[str] = field(default_factory=list)
    policy_key: Optional[str] = None
    window: Optional[UsageWindow] = None
    window_totals: Dict[str, Any] = field(default_factory=dict)
    remaining: Dict[str, Any] = field(default_factory=dict)
    reasons: List[UsageReason] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    expires_at: Optional[datetime] = None

    @property
    def allowed(self) -> bool:
        """Whether the use may go ahead (``allowed`` or ``allowed_with_warning``)."""
        return self.decision in ("allowed", "allowed_with_warning")


@dataclass(repr=False, eq=False)
class UsageEvent(_Model):
    """One recorded use of a feature, as ``get_history`` lists it."""

    event_id: str
    feature_key: str
    dimensions: Dict[str, Any] = field(default_factory=dict)
    resource_type: Optional[str] = None
    resource_id: Optional[str] = None
    subject_user_id: Optional[str] = None
    authorization_ref: Optional[str] = None
    idempotency_key: Optional[str] = None
    policy_key: Optional[str] = None
    active_entitlements: List[str] = field(default_factory=list)
    metadata: Optional[Dict[str, Any]] = None
    occurred_at: Optional[datetime] = None
    recorded_at: Optional[datetime] = None


@dataclass(repr=False, eq=False)
class UsageHistoryEntry(_Model):
    """Usage on one date."""

    date: Optional[str] = None
    features: Dict[str, Any] = field(default_factory=dict)
    total_cost: Optional[float] = None


@dataclass(repr=False, eq=False)
class UsageHistoryResponse(_Model):
    """Usage history over a period."""

    period: Optional[str] = None
    start_date: Optional[str] = None
    end_date: Optional[str] = None
    history: List[UsageHistoryEntry] = field(default_factory=list)
    summary: Optional[Dict[str, Any]] = None
    events: List[UsageEvent] = field(default_factory=list)
    has_more: bool = False
    next_offset: Optional[int] = None


# --- Entitlement models ---


@dataclass(repr=False, eq=False)
class Entitlement(_Model):
    """What a user (or company, org, ...) may use, from a purchase or a manual grant."""

    id: str
    entitlement_key: str
    application_id: Optional[str] = None
    beneficiary_user_id: Optional[str] = None
    beneficiary_email: Optional[str] = None
    source: Optional[str] = None
    entitlement_type: Optional[str] = None
    status: Optional[str] = None
    resource_type: Optional[str] = None
    resource_id: Optional[str] = None
    starts_at: Optional[datetime] = None
    ends_at: Optional[datetime] = None
    revoked_at: Optional[datetime] = None
    revoked_reason: Optional[str] = None
    manual_grant_reason: Optional[str] = None
    granted_by_user_id: Optional[str] = None
    metadata: Dict[str, Any] = field(default_factory=dict)
    created_at: Optional[datetime] = None
    updated_at: Optional[datetime] = None


@dataclass(repr=False, eq=False)
class EntitlementClaimResult(_Model):
    """Entitlements bought for the user's e-mail before the account existed, now theirs."""

    claimed: List[Entitlement] = field(default_factory=list)
    count: int = 0


@dataclass
class ManualGrantParams:
    """What ``entitlements.grant_manual`` grants; name a beneficiary by id or e-mail."""

    entitlement_key: str
    beneficiary_user_id: Optional[str] = None
    beneficiary_email: Optional[str] = None
    starts_at: Optional[str] = None
    ends_at: Optional[str] = None
    reason: Optional[str] = None
    metadata: Optional[Dict[str, Any]] = None
    resource_type: Optional[str] = None
    resource_id: Optional[str] = None


# --- Whitelist and secure message models ---


@dataclass(repr=False, eq=False)
class WhitelistEntry(_Model):
    """An email on the whitelist."""

    email: str
    application_id: Optional[str] = None
    tier: Optional[str] = None
    bypass_payment: Optional[bool] = None
    metadata: Optional[Dict[str, Any]] = None
    id: Optional[str] = None
    created_by: Optional[str] = None
    created_at: Optional[datetime] = None
    updated_at: Optional[datetime] = None


@dataclass(repr=False, eq=False)
class WhitelistCheckResult(_Model):
    """Whether an email is whitelisted; ``entry`` is ``None`` when it is not."""

    message: str
    entry: Optional[WhitelistEntry] = None


@dataclass(repr=False, eq=False)
class WhitelistListResult(_Model):
    """A page of whitelist entries."""

    entries: List[WhitelistEntry] = field(default_factory=list)
    total: int = 0

    @classmethod
    def _prepare(cls, obj: Mapping[str, Any]) -> Mapping[str, Any]:
        return _counted(obj, "entries")


class WhitelistMessage(MessageResponse):
    """A whitelist confirmation message."""

@dataclass(repr=False, eq=False)
class SecureMessage(_Model):
    """A secure message between a patient and a practitioner."""

    id: str
    patient_id: str
    practitioner_id: str
    content: str = field(repr=False)
    application_id: Optional[str] = None
    metadata: Optional[Dict[str, Any]] = None
    created_at: Optional[str] = None


@dataclass(repr=False, eq=False)
class SpapsWebhookPayload(_Model):
    """A verified SPAPS webhook event."""

    id: str
    type: str
    schema_version: int
    application_id: str
    created_at: str
    data: Dict[str, Any]


# =============================================================================
# Token storage
# =============================================================================


@dataclass
class StoredTokens:
    """Tokens kept between calls; the tokens are hidden from ``repr``."""

    access_token: str = field(repr=False)
    refresh_token: Optional[str] = field(default=None, repr=False)
    expires_at: Optional[datetime] = None
    token_type: Optional[str] = None

    def expires_within(self, seconds: float) -> bool:
        """Whether the access token expires in less than ``seconds`` (False if unknown)."""
        if self.expires_at is None:
            return False
        expires_at = self.expires_at
        if expires_at.tzinfo is None:
            expires_at = expires_at.replace(tzinfo=timezone.utc)
        return expires_at - datetime.now(timezone.utc) < timedelta(seconds=seconds)


_LOCK_CREATION = threading.Lock()


class TokenStorage(ABC):
    """Where a client keeps its tokens. Implement ``save``, ``load`` and ``clear``.

    ``lock()`` guards a token refresh: the default serialises threads of this
    process; storages shared by several processes or machines (files, Redis)
    should override it with a lock those share, so that one refresh happens per
    expiry (SPAPS rotates refresh tokens: a second refresh with the old one
    fails).
    """

    _refresh_lock: Optional[threading.RLock] = None

    @abstractmethod
    def save(self, tokens: StoredTokens) -> None:
        """Replace the stored tokens with ``tokens``."""

    @abstractmethod
    def load(self) -> Optional[StoredTokens]:
        """The stored tokens, or ``None``."""

    @abstractmethod
    def clear(self) -> None:
        """Forget the stored tokens."""

    def lock(self) -> ContextManager[Any]:
        """A context manager held while tokens are refreshed."""
        lock = self._refresh_lock
        if lock is None:
            with _LOCK_CREATION:  # two threads must never get two different locks
                lock = self.__dict__.setdefault("_refresh_lock", threading.RLock())
        return lock


class InMemoryTokenStorage(TokenStorage):
    """Tokens in process memory (the default). Thread-safe; ``load`` returns a copy."""

    def __init__(self) -> None:
        self._tokens: Optional[StoredTokens] = None
        self._lock = threading.Lock()

    def save(self, tokens: StoredTokens) -> None:
        with self._lock:
            self._tokens = _copy_tokens(tokens)

    def load(self) -> Optional[StoredTokens]:
        with self._lock:
            return None if self._tokens is None else _copy_tokens(self._tokens)

    def clear(self) -> None:
        with self._lock:
            self._tokens = None


def _copy_tokens(tokens: StoredTokens) -> StoredTokens:
    return StoredTokens(tokens.access_token, tokens.refresh_token, tokens.expires_at,
                        tokens.token_type)


class FileTokenStorage(TokenStorage):
    """Tokens in a JSON file (default ``~/.config/spaps/tokens.json``), safe under crashes.

    Saves write a temporary file in the same directory with mode 0600 from the
    first byte, fsync it and atomically rename it over the old file, so the
    file is always either the old or the new complete token set. The parent
    directory is created with mode 0700 on the first save. ``lock()`` takes an
    exclusive ``fcntl`` lock on ``<path>.lock`` so several processes sharing
    the file refresh once per expiry; where ``fcntl`` does not exist
    (Windows) it only serialises threads of this process.
    """

    DEFAULT_PATH = "~/.config/spaps/tokens.json"

    def __init__(self, *, path: Optional[Union[str, os.PathLike[str]]] = None) -> None:
        self.path: str = os.path.abspath(os.path.expanduser(os.fspath(path or self.DEFAULT_PATH)))
        self._thread_lock = threading.RLock()

    def __repr__(self) -> str:
        return f"FileTokenStorage(path={self.path!r})"

    def save(self, tokens: StoredTokens) -> None:
        data = _encode_tokens(tokens)
        directory = os.path.dirname(self.path)
        with self._thread_lock:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            temp = f"{self.path}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                try:
                    os.write(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(temp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temp)
                raise
            _fsync_directory(directory)
            self._remove_temp_files(only_orphans=True)

    def load(self) -> Optional[StoredTokens]:
        with self._thread_lock:
            try:
                with open(self.path, "rb") as handle:
                    raw = handle.read()
            except OSError:  # missing, unreadable or not a file: no usable tokens
                return None
        return _decode_tokens(raw)

    def clear(self) -> None:
        with self._thread_lock:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            self._remove_temp_files(only_orphans=False)

    def _remove_temp_files(self, *, only_orphans: bool) -> None:
        """Delete temporary files of interrupted saves: they hold complete token sets.

        With ``only_orphans``, files of processes still running are left alone (they may be
        saving right now).
        """
        directory, name = os.path.split(self.path)
        try:
            entries = os.listdir(directory)
        except OSError:
            return
        for entry in entries:
            parts = entry[len(name) + 1:].split(".")
            if not (entry.startswith(name + ".") and len(parts) == 3 and parts[2] == "tmp"
                    and parts[0].isdigit()):
                continue
            if only_orphans and _process_alive(int(parts[0])):
                continue
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, entry))

    def lock(self) -> ContextManager[Any]:
        return _FileLock(self.path + ".lock", self._thread_lock)


class _FileLock:
    """An exclusive lock across threads (RLock) and processes (fcntl.flock)."""

    def __init__(self, path: str, thread_lock: threading.RLock) -> None:
        self._path = path
        self._thread_lock = thread_lock
        self._fd: Optional[int] = None

    def __enter__(self) -> _FileLock:
        self._thread_lock.acquire()
        try:
            import fcntl
        except ImportError:  # Windows: threads of this process only
            return self
        try:
            os.makedirs(os.path.dirname(self._path), mode=0o700, exist_ok=True)
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._release_fd()
            self._thread_lock.release()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._release_fd()
        self._thread_lock.release()

    def _release_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, ValueError, OverflowError):
        return True  # exists but not ours, or cannot tell: leave its file alone
    return True


def _fsync_directory(directory: str) -> None:
    """Make the rename durable; not every platform can open a directory."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _encode_tokens(tokens: StoredTokens) -> bytes:
    """The JSON document file and Redis storages keep."""
    document = {
        "access_token": tokens.access_token,
        "refresh_token": tokens.refresh_token,
        "expires_at": tokens.expires_at.isoformat() if tokens.expires_at else None,
        "token_type": tokens.token_type,
    }
    return json.dumps(document, indent=2).encode("utf-8")


def _decode_tokens(raw: Union[bytes, str]) -> Optional[StoredTokens]:
    """Tokens from ``_encode_tokens``'s document; ``None`` for anything unusable."""
    try:
        document = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(document, dict) or not isinstance(document.get("access_token"), str):
        return None
    expires_at: Optional[datetime] = None
    if document.get("expires_at"):
        try:
            expires_at = _to_datetime(document["expires_at"])
        except ValueError:
            expires_at = None
    refresh = document.get("refresh_token")
    token_type = document.get("token_type")
    return StoredTokens(
        document["access_token"],
        refresh if isinstance(refresh, str) else None,
        expires_at,
        token_type if isinstance(token_type, str) else None,
    )


class RedisTokenStorage(TokenStorage):
    """Tokens in Redis, shared by every process and host acting as one service identity.

    ``client`` is any object with redis-py's interface (``redis.Redis`` or a
    compatible client; this module does not import one). It must provide
    ``get(name)``, ``set(name, value, nx=..., px=...)``, ``delete(name)`` and
    ``eval(script, numkeys, *keys_and_args)``; values may come back as bytes or
    text. The tokens live under ``key`` as one JSON value, so every save is atomic.

    ``lock()`` is a fleet-wide lease on ``<key>:lock``: taken with ``SET NX PX``
    under a random owner token and released by a script that deletes the key only
    while it still holds that owner token. A holder that crashes blocks the fleet
    for ``lock_timeout`` seconds at most; one slower than the lease can never
    release a lock another host has taken since. Waiting for the lease gives up
    with ``TokenStorageError`` after ``lock_wait`` seconds (default: the lease
    time); any Redis failure is a ``TokenStorageError`` too, so a refresh never
    happens without the lock. See docs/fleet.md.
    """

    _RELEASE = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
                "return redis.call('del', KEYS[1]) else return 0 end")

    def __init__(self, client: Any, *, key: str = "spaps:tokens", lock_timeout: float = 30.0,
                 lock_wait: Optional[float] = None) -> None:
        if lock_timeout <= 0:
            raise ValueError("lock_timeout must be a positive number of seconds")
        if lock_wait is not None and lock_wait < 0:
            raise ValueError("lock_wait must be a number of seconds, 0 or more")
        self.client = client
        self.key = key
        self.lock_timeout = float(lock_timeout)
        self.lock_wait = float(lock_timeout if lock_wait is None else lock_wait)
        self._thread_lock = threading.RLock()

    def __repr__(self) -> str:
        return f"RedisTokenStorage(key={self.key!r})"

    def save(self, tokens: StoredTokens) -> None:
        self._redis("save tokens to", self.client.set, self.key, _encode_tokens(tokens))

    def load(self) -> Optional[StoredTokens]:
        raw = self._redis("read tokens from", self.client.get, self.key)
        return None if raw is None else _decode_tokens(raw)

    def clear(self) -> None:
        self._redis("clear tokens in", self.client.delete, self.key)

    def lock(self) -> ContextManager[Any]:
        return _RedisLease(self, self.lock_wait)

    def _redis(self, what: str, command: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except Exception as exc:  # the client's own errors: we import no Redis library
            raise TokenStorageError(
                f"could not {what} Redis key {self.key!r}: {type(exc).__name__}: {exc}"
            ) from exc


class _RedisLease:
    """One holder's lease of a ``RedisTokenStorage`` lock (threads of a process queue
    on a local lock first, so that only one of them polls Redis)."""

    def __init__(self, storage: RedisTokenStorage, wait: float) -> None:
        self.storage = storage
        self.wait = wait
        self.owner = os.urandom(16).hex()

    def __enter__(self) -> _RedisLease:
        storage = self.storage
        deadline = time.monotonic() + self.wait  # one wait for both locks
        if not storage._thread_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise TokenStorageError("timed out waiting for another thread's token refresh")
        try:
            pause = 0.01
            while not storage._redis("take the refresh lock on", storage.client.set,
                                     storage.key + ":lock", self.owner, nx=True,
                                     px=int(storage.lock_timeout * 1000)):
                if time.monotonic() >= deadline:
                    raise TokenStorageError(
                        f"timed out waiting for the refresh lock {storage.key + ':lock'!r} "
                        "held by another process (a crashed holder's lease lapses after "
                        f"lock_timeout={storage.lock_timeout:g} s)")
                time.sleep(pause)
                pause = min(pause * 2, 0.2)
        except BaseException:
            storage._thread_lock.release()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        storage = self.storage
        try:
            storage._redis("release the refresh lock on", storage.client.eval,
                           RedisTokenStorage._RELEASE, 1, storage.key + ":lock", self.owner)
        except TokenStorageError as exc:
            # The work under the lock is done (and saved, or reported); an unreleased lease
            # only lapses on its own, so this must not fail the call or mask its error.
            _logger().warning("%s; it lapses by itself", exc)
        finally:
            storage._thread_lock.release()


def _tokens_from(access_token: str, refresh_token: Optional[str], expires_in: Optional[int],
                 token_type: Optional[str]) -> StoredTokens:
    expires_at = None
    if expires_in is not None:
        try:
            expires_at = datetime.now(timezone.utc) + timedelta(seconds=expires_in)
        except OverflowError:  # "never" in practice: treat the expiry as unknown
            expires_at = None
    return StoredTokens(access_token, refresh_token, expires_at, token_type)


# =============================================================================
# Services
# =============================================================================
#
# Each endpoint is one method of a sync service class; the async classes below
# run the very same methods in worker threads, so the wire behaviour of both
# surfaces cannot drift apart. Every call gets one deadline, passed down
# explicitly: a token refresh and a replay after a 401 share it.


class _TokenSource:
    """Where a service finds its access token; this base holds a fixed one."""

    def __init__(self, token: Optional[str] = None) -> None:
        self.token = token

    def current(self, deadline: float) -> Optional[str]:
        """The token for the next request (refreshed first if it is about to expire)."""
        return self.token

    def peek(self) -> Optional[str]:
        """The token as last seen, without refreshing."""
        return self.token

    def after_rejection(self, rejected: str, deadline: float) -> Optional[str]:
        """A new token after the server rejected ``rejected`` with 401, or ``None``."""
        return None

    def known_secrets(self) -> List[str]:
        """The tokens this source holds, so that error messages can be scrubbed of them."""
        return [self.token] if self.token else []


class _StoredTokenSource(_TokenSource):
    """Tokens read from a ``TokenStorage`` at every request, refreshed when they expire.

    A refresh happens under ``storage.lock()`` and reads the storage again first:
    whoever waited for the lock finds the new token and sends no request of its
    own, so one expiry costs one refresh however many threads, tasks or
    processes hit it.
    """

    EXPIRY_MARGIN = 30.0  # seconds before expires_at: covers clock skew and transit time

    def __init__(self, storage: TokenStorage,
                 refresh: Optional[Callable[[str, float], StoredTokens]] = None) -> None:
        super().__init__()
        self.storage = storage
        self.refresh = refresh
        self.lifetime: Optional[float] = None  # of access tokens, once a sign-in told us
        # Tokens SPAPS issued that the storage refused to save: kept for this process, so
        # that a broken storage never costs the session the server already opened.
        self.unsaved: Optional[StoredTokens] = None
        self.last: Optional[StoredTokens] = None  # what peek() shows without reading storage
        self.clock: Callable[[], float] = time.monotonic  # the HTTP client's, for deadlines
        self._local_lock = threading.RLock()

    def load(self) -> Optional[StoredTokens]:
        """The tokens to use: unsaved ones first, else the storage's."""
        tokens = self.unsaved if self.unsaved is not None else _storage_call(
            self.storage, "read tokens from", self.storage.load)
        self.last = tokens
        return None if tokens is None else _copy_tokens(tokens)

    def save(self, tokens: StoredTokens) -> None:
        """Save ``tokens``; if the storage fails, keep them in memory and say so."""
        self.last = _copy_tokens(tokens)
        try:
            _storage_call(self.storage, "save tokens to", self.storage.save, tokens)
        except TokenStorageError as exc:
            self.unsaved = _copy_tokens(tokens)
            _logger().warning("%s; the session is kept in memory for this process only", exc)
        else:
            self.unsaved = None

    def clear(self) -> None:
        """Forget the tokens, in memory and in the storage."""
        self.unsaved = self.last = None
        _storage_call(self.storage, "clear tokens in", self.storage.clear)

    def current(self, deadline: float) -> Optional[str]:
        tokens = self.load()
        if tokens is None:
            return None
        if self.refresh is not None and tokens.refresh_token and tokens.expires_within(
                self._margin()):
            try:
                return self._refresh(tokens.access_token, deadline).access_token
            except SpapsError:
                if tokens.expires_within(0):
                    raise
        return tokens.access_token

    def peek(self) -> Optional[str]:
        # Tokens seen before are trusted without reading the storage again; their absence is
        # not, since another client or process may have signed in since.
        tokens = self.last or self.load()
        return tokens.access_token if tokens else None

    def known_secrets(self) -> List[str]:
        tokens = self.last
        return [tokens.access_token, tokens.refresh_token or ""] if tokens else []

    def after_rejection(self, rejected: str, deadline: float) -> Optional[str]:
        if self.refresh is None:
            return None
        stored = self.load()
        if stored is None or (stored.access_token == rejected and not stored.refresh_token):
            return None  # nothing to refresh with: the caller reports the original 401
        return self._refresh(rejected, deadline).access_token

    def _refresh(self, stale: str, deadline: float) -> StoredTokens:
        assert self.refresh is not None
        # Tokens only this process holds (the storage failed to save them) need no lock
        # shared with other processes, which a broken storage could not give anyway.
        guard = (self._local_lock if self.unsaved is not None
                 else _StorageLock(self.storage, deadline - self.clock()))
        with guard:
            tokens = self.load()
            if tokens is None:
                raise AuthError("no stored tokens to refresh; sign in again", status_code=401,
                                error_code="NO_TOKENS", retryable=False)
            if tokens.access_token != stale and not tokens.expires_within(0):
                return tokens  # another thread or process refreshed while we waited
            if not tokens.refresh_token:
                raise AuthError("the access token expired and no refresh token is stored",
                                status_code=401, error_code="NO_REFRESH_TOKEN", retryable=False)
            return self.refresh(tokens.refresh_token, deadline)

    def _margin(self) -> float:
        """How early to refresh: ``EXPIRY_MARGIN``, or half the life of short-lived tokens
        (which would otherwise be refreshed by every call of every client)."""
        return self.EXPIRY_MARGIN if self.lifetime is None else min(self.EXPIRY_MARGIN,
                                                                     self.lifetime / 2)


def _storage_call(storage: TokenStorage, what: str, call: Callable[..., _T], *args: Any) -> _T:
    """``call(*args)``, with a failure of the storage raised as ``TokenStorageError``."""
    try:
        return call(*args)
    except SpapsError:
        raise
    except Exception as exc:  # OSError from files, anything from a user's own storage
        raise TokenStorageError(
            f"could not {what} {storage!r}: {type(exc).__name__}: {exc} (check that the "
            "storage is reachable and writable, or pass another token_storage=)") from exc


class _StorageLock:
    """``storage.lock()`` with its failures (a lock file in a read-only directory, Redis
    down) raised as ``TokenStorageError``; a Redis lease is waited for at most ``wait``."""

    def __init__(self, storage: TokenStorage, wait: float) -> None:
        self.storage = storage
        self.wait = max(0.0, wait)
        self.held: Optional[ContextManager[Any]] = None

    def __enter__(self) -> None:
        storage = self.storage
        held = _storage_call(storage, "lock", storage.lock)
        if isinstance(held, _RedisLease):
            held.wait = min(held.wait, self.wait)  # never wait past the call's budget
        _storage_call(storage, "lock", held.__enter__)
        self.held = held

    def __exit__(self, *exc_info: Any) -> None:
        assert self.held is not None
        self.held.__exit__(*exc_info)


class _Context:
    """What a service needs to talk to SPAPS; services of one aggregate client share it."""

    __slots__ = ("api_key", "base_url", "http", "tokens")

    def __init__(self, http: RetryClient, base_url: str, api_key: str,
                 tokens: _TokenSource) -> None:
        self.http = http
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.tokens = tokens

    def copy(self) -> _Context:
        return _Context(self.http, self.base_url, self.api_key, self.tokens)


_NONE, _KEY, _BEARER, _OPTIONAL_BEARER = "none", "key", "bearer", "optional"
_NO_BODY: Any = object()
# Request-body fields whose values are credentials.
_SECRET_FIELDS = ("password", "new_password", "refresh_token", "access_token", "token", "code",
                  "recovery_code", "signature")


class _Reply:
    """A successful JSON response, with helpers that turn surprises into service errors."""

    __slots__ = ("body", "response", "service")

    def __init__(self, service: _Service, response: HttpResponse, body: Dict[str, Any]) -> None:
        self.service = service
        self.response = response
        self.body = body

    def data(self) -> Dict[str, Any]:
        """The payload: the ``data`` object when the body has one, else the body itself."""
        if "data" not in self.body:
            return self.body
        data = self.body["data"]
        if not isinstance(data, dict):
            raise self.invalid(f"'data' is {_kind(data)}, expected an object")
        return data

    def model(self, model: Type[_M], inside: Optional[str] = None, **defaults: Any) -> _M:
        """The payload as ``model``: the object under key ``inside`` if there is one,
        with ``defaults`` for what the server leaves out."""
        payload = self.data()
        nested = payload.get(inside) if inside else None
        return self.parse(model, {**defaults, **(nested if isinstance(nested, dict)
                                                 else payload)})

    def parse(self, model: Type[_M], payload: Any) -> _M:
        try:
            return model.model_validate(payload)
        except ValueError as exc:
            raise self.invalid(str(exc)) from None

    def invalid(self, problem: str) -> SpapsError:
        response = self.response
        return self.service._error(
            f"{self.service._label} response was not understood: {problem}",
            status_code=response.status_code, error_code="INVALID_RESPONSE",
            response=response.redacted(), request_id=_request_id(response, self.body),
            retryable=False)


def _first_text(*candidates: Any) -> Optional[str]:
    return next((value for value in candidates if isinstance(value, str) and value), None)


def _request_id(response: HttpResponse, body: Optional[Mapping[str, Any]]) -> Optional[str]:
    metadata = body.get("metadata") if body else None
    return _first_text(response.headers.get("x-request-id"), body and body.get("request_id"),
                       metadata.get("request_id") if isinstance(metadata, dict) else None)


def _segment(value: Any, what: str) -> str:
    """Percent-encode one path parameter so that it can never change the request target."""
    text = str(value) if value is not None else ""
    if not text or text in (".", ".."):
        raise ValueError(f"{what} must be a non-empty identifier, got {value!r}")
    return quote(text, safe="@+:!$&'()*,;=")


def _pick(**pairs: Any) -> Dict[str, Any]:
    """Keep the pairs whose value is not ``None``."""
    return {key: value for key, value in pairs.items() if value is not None}


def _query(**filters: Any) -> List[Tuple[str, str]]:
    """Query pairs for the filters that are set; booleans as ``true``/``false``."""
    return [(key, ("true" if value else "false") if isinstance(value, bool) else str(value))
            for key, value in filters.items() if value is not None]


def _scrub(text: str, secrets: List[str]) -> str:
    """``text`` with every occurrence of a known secret (raw or percent-encoded) redacted."""
    # Longest first, so that a secret containing another is hidden whole. Very short values
    # (a 3-character "password" a server rejects) would blank out ordinary words.
    for secret in sorted(set(secrets), key=len, reverse=True):
        if len(secret) >= 4:
            text = text.replace(secret, _REDACTED).replace(quote(secret, safe=""), _REDACTED)
    return text


def _scrub_json(value: Any, secrets: List[str]) -> Any:
    if isinstance(value, str):
        return _scrub(value, secrets)
    if isinstance(value, dict):
        return {_scrub(str(key), secrets): _scrub_json(item, secrets)
                for key, item in value.items()}
    if isinstance(value, list):
        return [_scrub_json(item, secrets) for item in value]
    return value


def _content_type(response: HttpResponse) -> str:
    return response.headers.get("content-type", "no content type").split(";")[0]


def _json_or_none(content: bytes) -> Any:
    """The JSON document in ``content``; ``ValueError`` (the class) when it is not JSON."""
    try:
        return json.loads(content)
    except (ValueError, RecursionError):  # invalid UTF-8 too; absurd nesting too
        return ValueError


class _Service:
    """Shared machinery of the service clients: headers, tokens, envelopes, errors."""

    _error: ClassVar[Type[SpapsError]] = SpapsError
    _label: ClassVar[str] = "SPAPS"
    _ctx: _Context
    _owns_http: bool

    def __init__(
        self, *, base_url: str, api_key: str, access_token: Optional[str] = None,
        client: Optional[RetryClient] = None, request_timeout: float = DEFAULT_TIMEOUT,
        retry_config: Optional[Union[RetryConfig, Mapping[str, Any]]] = None,
        logging_hooks: Optional[Union[LoggingHooks, Mapping[str, Any]]] = None,
        ssl_context: Optional[ssl.SSLContext] = None, allow_insecure_http: bool = False,
    ) -> None:
        http = client or RetryClient(
            base_url=base_url, timeout=request_timeout, retry_config=retry_config,
            logging_hooks=logging_hooks, ssl_context=ssl_context,
            allow_insecure_http=allow_insecure_http)
        self._ctx = _Context(http, base_url, api_key, _TokenSource(access_token))
        self._owns_http = client is None
        self._setup()

    @classmethod
    def _attached(cls: Type[_S], ctx: _Context) -> _S:
        """An instance sharing ``ctx`` (transport, tokens) with an aggregate client."""
        service = cls.__new__(cls)
        service._ctx = ctx.copy()
        service._owns_http = False
        service._setup()
        return service

    def _setup(self) -> None:
        """Hook for sub-services (``payments.crypto``)."""

    @property
    def base_url(self) -> str:
        """The SPAPS base URL, trailing slashes removed."""
        return self._ctx.base_url

    @property
    def api_key(self) -> str:
        """The API key sent as ``X-API-Key``."""
        return self._ctx.api_key

    @property
    def access_token(self) -> Optional[str]:
        """The access token sent as ``Authorization: Bearer``; assignable."""
        return self._ctx.tokens.peek()

    @access_token.setter
    def access_token(self, token: Optional[str]) -> None:
        self._ctx.tokens = _TokenSource(token)

    def close(self) -> None:
        """Close the HTTP client if this service created it."""
        if self._owns_http:
            self._ctx.http.close()

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    def _call(self, method: str, path: str, *, auth: str = _BEARER, token: Optional[str] = None,
              query: Optional[List[Tuple[str, str]]] = None, body: Any = _NO_BODY,
              headers: Optional[Dict[str, str]] = None, idempotency_key: Optional[str] = None,
              deadline: Optional[float] = None) -> _Reply:
        """Send one request and return its JSON reply; raise the service's error otherwise.

        ``deadline`` (of the HTTP client's clock) is the budget shared with a token
        refresh and a replay after 401; a new one is started when it is not given.
        """
        ctx = self._ctx
        url = ctx.base_url + path + ("?" + urlencode(query) if query else "")
        payload = None if body is _NO_BODY else json.dumps(
            body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if deadline is None:
            deadline = ctx.http.clock() + ctx.http.timeout
        if token == "":  # a backend passing on an absent header must not act as itself
            raise ValueError(f"{self._label} call given an empty access token; pass None "
                             "to use the stored one")
        explicit = token
        if auth in (_BEARER, _OPTIONAL_BEARER) and not token:
            token = ctx.tokens.current(deadline)
            if not token and auth == _BEARER:
                raise ValueError(f"{self._label} calls need an access token: sign in with "
                                 "client.auth.sign_in_with_password() or call set_tokens() first")
        response = self._send(method, url, auth, token, payload, headers, idempotency_key,
                              deadline)
        sent = [token or ""]
        if response.status_code == 401 and token and not explicit:
            fresh = ctx.tokens.after_rejection(token, deadline)
            if fresh and fresh != token:
                sent.append(fresh)
                response = self._send(method, url, auth, fresh, payload, headers,
                                      idempotency_key, deadline)
        return self._reply(response, lambda: self._secrets(sent, body))

    def _secrets(self, tokens: List[str], body: Any) -> List[str]:
        """Every secret this call could have shown the server: key, tokens, body secrets."""
        found = [self._ctx.api_key, *tokens, *self._ctx.tokens.known_secrets()]
        if isinstance(body, Mapping):
            found.extend(body[key] for key in _SECRET_FIELDS if isinstance(body.get(key), str))
        return found

    def _send(self, method: str, url: str, auth: str, token: Optional[str],
              payload: Optional[bytes], extra: Optional[Dict[str, str]],
              idempotency_key: Optional[str], deadline: float) -> HttpResponse:
        headers: Dict[str, str] = {}
        if auth != _NONE:
            headers["X-API-Key"] = self._ctx.api_key
        if token and auth in (_BEARER, _OPTIONAL_BEARER):
            headers["Authorization"] = "Bearer " + token
        headers.update(extra or {})
        return self._ctx.http.request(method, url, headers=headers, body=payload,
                                      idempotency_key=idempotency_key, deadline=deadline)

    def _reply(self, response: HttpResponse, secrets: Callable[[], List[str]]) -> _Reply:
        if response.status_code >= 300:
            raise self._status_error(response, secrets())
        reply = _Reply(self, response, {})
        if response.status_code == 204:  # No Content: done, and nothing to say about it
            return reply
        if not response.content:
            raise reply.invalid("the body is empty")
        body = _json_or_none(response.content)
        if body is ValueError:
            raise reply.invalid(f"the body is not JSON ({_content_type(response)})")
        if not isinstance(body, dict):
            raise reply.invalid(f"the body is JSON {_kind(body)}, expected an object")
        if body.get("success") is False:  # an error envelope, whatever the status says
            raise self._status_error(response, secrets())
        reply.body = body
        return reply

    def _status_error(self, response: HttpResponse, secrets: List[str]) -> SpapsError:
        """The service's error for a failed call, from whatever the body offers.

        Servers echo input in their messages: every secret the client knows is scrubbed
        from the text (before it is shortened, which could cut a secret in two) so that
        it never reaches logs and error trackers through the exception.
        """
        document = _json_or_none(response.content) if response.content else None
        body = document if isinstance(document, dict) else None
        info = body.get("error") if body else None
        details = None
        if isinstance(info, dict):
            message = _first_text(info.get("message"))
            code = _first_text(info.get("code"))
            details = info.get("details") if isinstance(info.get("details"), dict) else None
        else:
            message, code = _first_text(info), None
        message = message or _first_text(body and body.get("message")) or (
            f"{self._label} request failed with HTTP {response.status_code}"
            + (f"; the body was not JSON ({_content_type(response)})"
               if document is ValueError else ""))
        return self._error(
            _scrub(message, secrets), status_code=response.status_code, error_code=code,
            response=response.redacted(), request_id=_request_id(response, body),
            retry_after=_parse_retry_after(response.headers.get("retry-after")),
            details=details and _scrub_json(details, secrets))


class AuthClient(_Service):
    """Sign-in, registration, magic links, wallets, MFA, tokens and passwords (``/api/auth``).

    When constructed with a ``token_storage`` (aggregate clients always give
    one), every call that issues tokens stores them and ``logout`` clears them.
    """

    AUTH_PREFIX = "/api/auth"
    _error = AuthError
    _label = "Authentication"

    def __init__(self, /, *, base_url: str, api_key: str, client: Optional[RetryClient] = None,
                 request_timeout: float = DEFAULT_TIMEOUT,
                 token_storage: Optional[TokenStorage] = None, **options: Any) -> None:
        super().__init__(base_url=base_url, api_key=api_key, client=client,
                         request_timeout=request_timeout, **options)
        if token_storage is not None:
            self._ctx.tokens = _StoredTokenSource(token_storage)

    @property
    def token_storage(self) -> Optional[TokenStorage]:
        """The storage tokens are saved to, if any."""
        tokens = self._ctx.tokens
        return tokens.storage if isinstance(tokens, _StoredTokenSource) else None

    def request_nonce(self, *, wallet_address: str, chain: Optional[str] = None) -> NonceResponse:
        """Ask for a message to sign with ``wallet_address`` (step 1 of wallet sign-in)."""
        return self._post("/nonce", {"wallet_address": wallet_address, **_pick(chain=chain or None)}
                          ).model(NonceResponse)

    def verify_wallet(self, *, wallet_address: str, signature: str, message: str,
                      chain: Optional[str] = None) -> TokenPair:
        """Sign in with a wallet signature of the nonce message; stores the tokens."""
        return self._token_pair(self._post("/wallet-sign-in", {
            "wallet_address": wallet_address, "signature": signature, "message": message,
            **_pick(chain_type=chain or None)}))

    def sign_in_with_password(self, *, email: str, password: str) -> TokenPair:
        """Sign in with email and password; stores the tokens.

        Raises ``MfaRequiredError`` when the account has a second factor: finish with
        ``verify_mfa``.
        """
        reply = self._post("/login", {"email": email, "password": password})
        data = reply.data()
        if data.get("mfa_required") is True or ("challenge_id" in data
                                                 and "access_token" not in data):
            challenge_id, challenge = data.get("challenge_id"), data.get("challenge")
            if not isinstance(challenge_id, str) or not isinstance(challenge, str):
                raise reply.invalid("an MFA challenge without challenge_id and challenge")
            methods = data.get("methods")
            raise MfaRequiredError(
                "this account needs a second factor: complete the sign-in with "
                "auth.verify_mfa(challenge_id=..., challenge=..., code=...)",
                challenge_id=challenge_id, challenge=challenge,
                methods=[str(m) for m in methods] if isinstance(methods, list) else None,
                expires_at=_first_text(data.get("expires_at")),
                status_code=reply.response.status_code, response=reply.response.redacted(),
                request_id=_request_id(reply.response, reply.body))
        return self._token_pair(reply)

    def verify_mfa(self, *, challenge_id: str, challenge: str, code: Optional[str] = None,
                   recovery_code: Optional[str] = None) -> TokenPair:
        """Finish an MFA sign-in with a TOTP ``code`` or a ``recovery_code``; stores the
        tokens (``recovery_codes_remaining`` says how many recovery codes are left)."""
        if (code is None) == (recovery_code is None):
            raise ValueError("verify_mfa needs exactly one of code= or recovery_code=")
        return self._token_pair(self._post("/mfa/verify", {
            "challenge_id": challenge_id, "challenge": challenge,
            **_pick(code=code, recovery_code=recovery_code)}))

    def enroll_totp(self, *, access_token: Optional[str] = None) -> TotpEnrollment:
        """Start TOTP for the signed-in user: a secret for an authenticator app. Nothing
        changes until ``activate_totp`` confirms a code from that app."""
        return self._post("/mfa/totp/enroll", {}, auth=_BEARER, token=access_token
                          ).model(TotpEnrollment)

    def activate_totp(self, *, code: str, access_token: Optional[str] = None
                      ) -> TotpActivation:
        """Switch TOTP on with a current ``code``; returns the one-time recovery codes."""
        return self._post("/mfa/totp/activate", {"code": code}, auth=_BEARER,
                          token=access_token).model(TotpActivation)

    def disable_totp(self, *, code: str, access_token: Optional[str] = None
                     ) -> MessageResponse:
        """Switch TOTP off; ``code`` is a current TOTP code or a recovery code."""
        reply = self._post("/mfa/totp/disable", {"code": code}, auth=_BEARER,
                           token=access_token)
        return MessageResponse(_first_text(reply.data().get("message")) or "TOTP disabled")

    def get_auth_methods(self) -> AuthMethods:
        """The sign-in methods the application offers (API key only)."""
        return self._call("GET", self.AUTH_PREFIX + "/methods", auth=_KEY).model(AuthMethods)

    def get_session_context(self, *, access_token: Optional[str] = None) -> SessionContext:
        """The signed-in user with their entitlements, wallets, tier and MFA state."""
        return self._call("GET", self.AUTH_PREFIX + "/session-context", token=access_token
                          ).model(SessionContext)

    def refresh_tokens(self, *, refresh_token: str) -> TokenPair:
        """Exchange a refresh token for a new pair (the old refresh token stops working)."""
        return self._refresh_within(refresh_token, None)

    def register(self, *, email: str, password: str, username: Optional[str] = None,
                 phone_number: Optional[str] = None, referral_click_id: Optional[str] = None,
                 ref: Optional[str] = None) -> RegistrationResponse:
        """Create an account; stores tokens when the server signs the user in at once."""
        return self._user_and_tokens(self._post("/register", {
            "email": email, "password": password, **_pick(
                username=username, phone_number=phone_number,
                referral_click_id=referral_click_id, ref=ref)}), RegistrationResponse)

    def send_magic_link(self, *, email: str) -> MagicLinkSendResponse:
        """Email a one-time sign-in link to ``email``."""
        return self._confirmation(self._post("/magic-link", {"email": email}),
                                  MagicLinkSendResponse, "Magic link sent")

    def verify_magic_link(self, *, token: str, type: str = "magiclink") -> MagicLinkAuthResponse:
        """Sign in with the token from a magic link; stores the tokens."""
        return self._user_and_tokens(self._post("/verify-magic-link", {
            "token": token, "type": type}), MagicLinkAuthResponse)

    def logout(self, *, access_token: Optional[str] = None,
               refresh_token: Optional[str] = None) -> MessageResponse:
        """End the session of ``access_token`` (default: the stored one) and clear storage.

        The refresh token (default: the stored one, when ``access_token`` is the stored
        access token) is revoked with it; without one, SPAPS revokes only the access
        token and the refresh token would go on working.
        """
        stored = self.get_stored_tokens()
        if access_token is None:
            access_token = stored.access_token if stored else self._ctx.tokens.peek()
        if not access_token:
            raise ValueError("logout needs an access token: none was given or stored")
        if refresh_token is None and stored is not None and stored.access_token == access_token:
            refresh_token = stored.refresh_token
        reply = self._post("/logout", {"refresh_token": refresh_token} if refresh_token
                           else _NO_BODY, auth=_BEARER, token=access_token)
        data = reply.body.get("data")
        message = _first_text(data.get("message") if isinstance(data, dict) else None,
                              reply.body.get("message")) or "Logged out"
        self.clear_stored_tokens()
        return MessageResponse(message=message)

    def get_current_user(self, *, access_token: Optional[str] = None) -> UserProfile:
        """The signed-in user's profile."""
        reply = self._call("GET", self.AUTH_PREFIX + "/user", token=access_token)
        data = reply.data()
        user = data.get("user") if isinstance(data.get("user"), dict) else reply.body.get("user")
        return reply.parse(UserProfile, user)

    def request_password_reset(self, *, email: str, redirect_url: Optional[str] = None
                               ) -> PasswordResetRequestResponse:
        """Email a password-reset link (answers the same whether or not the user exists)."""
        reply = self._post("/password-reset", {"email": email, **_pick(redirect_url=redirect_url)})
        return self._confirmation(reply, PasswordResetRequestResponse, "Password reset requested")

    def confirm_password_reset(self, *, token: str, new_password: str) -> MessageResponse:
        """Set a new password with the token from a reset email."""
        reply = self._post("/reset-password-confirm", {"token": token,
                                                       "new_password": new_password})
        return self._confirmation(reply, MessageResponse, "Password changed")

    def get_stored_tokens(self) -> Optional[StoredTokens]:
        """The stored tokens (``None`` without storage or tokens)."""
        tokens = self._ctx.tokens
        return tokens.load() if isinstance(tokens, _StoredTokenSource) else None

    def clear_stored_tokens(self) -> None:
        """Forget the stored tokens."""
        tokens = self._ctx.tokens
        if isinstance(tokens, _StoredTokenSource):
            tokens.clear()

    def _post(self, path: str, body: Any, *, auth: str = _KEY, token: Optional[str] = None,
              deadline: Optional[float] = None) -> _Reply:
        return self._call("POST", self.AUTH_PREFIX + path, auth=auth, token=token, body=body,
                          deadline=deadline)

    def _refresh_within(self, refresh_token: str, deadline: Optional[float]) -> TokenPair:
        """``refresh_tokens``, as one step of a larger call when given its ``deadline``."""
        return self._token_pair(self._post("/refresh", {"refresh_token": refresh_token},
                                           deadline=deadline))

    def _token_pair(self, reply: _Reply) -> TokenPair:
        data = reply.data()
        self._store_issued(reply, data, data.get("token_type"))
        return reply.parse(TokenPair, data)

    def _user_and_tokens(self, reply: _Reply, model: Type[_M]) -> _M:
        """Registration-style replies: user, tokens and message at the top or under data."""
        body = reply.body
        data = body.get("data") if isinstance(body.get("data"), dict) else {}
        assert isinstance(data, dict)
        user = body.get("user") if isinstance(body.get("user"), dict) else data.get("user")
        tokens = body.get("tokens") if isinstance(body.get("tokens"), dict) else data.get(
            "tokens")
        if isinstance(tokens, dict):
            self._store_issued(reply, tokens, data.get("token_type"))
        return reply.parse(model, {
            **{key: value for key, value in data.items() if key not in ("user", "tokens")},
            "user": user, "tokens": tokens if isinstance(tokens, dict) else None,
            "message": _first_text(body.get("message"), data.get("message"))})

    def _store_issued(self, reply: _Reply, tokens: Mapping[str, Any], token_type: Any) -> None:
        """Store the tokens of a reply before anything else can fail.

        The server has already spent the refresh token or opened the session: a model
        that cannot be built from the rest of the reply must not lose them.
        """
        access = tokens.get("access_token")
        if not isinstance(access, str) or not access:
            raise reply.invalid("the reply carries no access_token")
        try:
            expires_in: Optional[int] = _to_int(tokens.get("expires_in"))
        except ValueError:
            expires_in = None
        source = self._ctx.tokens
        if isinstance(source, _StoredTokenSource):
            source.save(_tokens_from(access, _first_text(tokens.get("refresh_token")),
                                     expires_in, _first_text(token_type) or "Bearer"))
            if expires_in:
                source.lifetime = float(expires_in)  # tells how early refreshing makes sense

    @staticmethod
    def _confirmation(reply: _Reply, model: Type[_M], default: str) -> _M:
        """A confirmation: ``default`` stands in when the server says nothing (SPAPS 0.6
        answers a password-reset request with ``{email, sent_at}`` only)."""
        data = reply.data()
        return reply.parse(model, {**data, "message": _first_text(
            reply.body.get("message"), data.get("message")) or default})


class SessionsClient(_Service):
    """The signed-in user's sessions (``/api/sessions``)."""

    SESSIONS_PREFIX = "/api/sessions"
    _error = SessionError
    _label = "Session"

    def get_current_session(self, *, access_token_override: Optional[str] = None
                            ) -> SessionSummary:
        """The session behind the access token."""
        return self._call("GET", self.SESSIONS_PREFIX + "/current", token=access_token_override
                          ).model(SessionSummary, "session")

    def validate_session(self, *, access_token_override: Optional[str] = None
                         ) -> SessionValidationResult:
        """Whether the session is still valid."""
        reply = self._call("POST", self.SESSIONS_PREFIX + "/validate",
                           token=access_token_override, body={})
        data = reply.data()
        # SPAPS answers {valid, reason, session{id, expires_at, ...}}; older servers nest
        # everything under "session".
        if "valid" not in data:
            return reply.model(SessionValidationResult, "session")
        session = _object_at(data, "session")
        return reply.parse(SessionValidationResult, {
            "session_id": session.get("id") or session.get("session_id"),
            "expires_at": session.get("expires_at"), **data})

    def list_sessions(self, *, limit: Optional[int] = None, starting_after: Optional[str] = None,
                      offset: Optional[int] = None, access_token_override: Optional[str] = None
                      ) -> SessionListResult:
        """The user's sessions, ``limit`` at a time, from ``offset`` (or after session
        ``starting_after``, for servers that page by cursor)."""
        # The collection lives at "/api/sessions/"; without the slash SPAPS answers 307.
        return self._call("GET", self.SESSIONS_PREFIX + "/", token=access_token_override,
                          query=_query(limit=limit, offset=offset,
                                       starting_after=starting_after or None)
                          ).model(SessionListResult)

    def touch_session(self, *, access_token_override: Optional[str] = None
                      ) -> SessionTouchResult:
        """Mark the session active now.

        On SPAPS 0.6 this also spends the session's refresh token: a later refresh with
        it fails with ``REFRESH_TOKEN_REPLAY``, so after touching, sign in again when the
        access token expires (``get_current_session`` and ``validate_session`` do not
        spend it).
        """
        return self._call("POST", self.SESSIONS_PREFIX + "/touch", token=access_token_override,
                          body={}).model(SessionTouchResult)

    def revoke_session(self, session_id: str, *, access_token_override: Optional[str] = None
                       ) -> SessionRevokeResult:
        """End session ``session_id``; its tokens stop working (SPAPS answers 204)."""
        return self._call("DELETE", self.SESSIONS_PREFIX + "/" + _segment(
            session_id, "session_id"), token=access_token_override).model(
            SessionRevokeResult, message="Session revoked", session_id=session_id)


def _object_at(payload: Mapping[str, Any], key: str) -> Dict[str, Any]:
    """``payload[key]`` if it is a JSON object, else an empty one."""
    inner = payload.get(key)
    return inner if isinstance(inner, dict) else {}


class CryptoPaymentsClient(_Service):
    """Crypto invoices (``payments.crypto``, ``/api/payments/crypto``).

    Normally reached as ``payments.crypto``, sharing the parent's transport and
    token. The standalone form takes a ``RetryClient`` and a ``header_builder``
    that maps an optional override token to the headers to send.
    """

    CRYPTO_PREFIX = "/api/payments/crypto"
    _error = CryptoPaymentsError
    _label = "Crypto payments"
    _header_builder: Optional[Callable[[Optional[str]], Dict[str, str]]] = None

    def __init__(self, *, client: RetryClient,
                 header_builder: Callable[[Optional[str]], Dict[str, str]]) -> None:
        self._ctx = _Context(client, client.base_url, "", _TokenSource())
        self._owns_http = False
        self._header_builder = header_builder

    @classmethod
    def _invoice_path(cls, invoice_id: str, *, include_prefix: bool = False) -> str:
        path = "/invoices/" + _segment(invoice_id, "invoice_id")
        return cls.CRYPTO_PREFIX + path if include_prefix else path

    def _send(self, method: str, url: str, auth: str, token: Optional[str],
              payload: Optional[bytes], extra: Optional[Dict[str, str]],
              idempotency_key: Optional[str], deadline: float) -> HttpResponse:
        if self._header_builder is None:
            return super()._send(method, url, auth, token, payload, extra, idempotency_key,
                                 deadline)
        headers = {**self._header_builder(token), **(extra or {})}
        return super()._send(method, url, _NONE, None, payload, headers, idempotency_key,
                             deadline)

    def _call(self, method: str, path: str, **kwargs: Any) -> _Reply:
        if self._header_builder is not None:
            kwargs["auth"] = _NONE  # the builder decides every header
        return super()._call(method, path, **kwargs)

    def create_invoice(
        self, *, asset: str, network: str, amount: Union[str, int, float],
        expires_in_seconds: Optional[int] = None, beneficiary: Optional[Dict[str, Any]] = None,
        metadata: Optional[Dict[str, Any]] = None, idempotency_key: Optional[str] = None,
        access_token_override: Optional[str] = None,
    ) -> CryptoInvoice:
        """Create an invoice for ``amount`` (sent as a decimal string) of ``asset``."""
        body = {"asset": asset, "network": network, "amount": _decimal_text(amount), **_pick(
            expires_in_seconds=expires_in_seconds, beneficiary=beneficiary, metadata=metadata)}
        return self._call("POST", self.CRYPTO_PREFIX + "/invoices", body=body,
                          token=access_token_override, idempotency_key=idempotency_key
                          ).model(CryptoInvoice, "invoice")

    def get_invoice(self, invoice_id: str, *, access_token_override: Optional[str] = None
                    ) -> CryptoInvoice:
        """Invoice ``invoice_id``."""
        return self._call("GET", self._invoice_path(invoice_id, include_prefix=True),
                          token=access_token_override).model(CryptoInvoice, "invoice")

    def get_invoice_status(self, invoice_id: str, *, access_token_override: Optional[str] = None
                           ) -> CryptoInvoiceStatus:
        """The settlement status of invoice ``invoice_id``."""
        return self._call("GET", self._invoice_path(invoice_id, include_prefix=True) + "/status",
                          token=access_token_override).model(CryptoInvoiceStatus)

    def reconcile(self, *, recon_token: Optional[str] = None, cursor: Optional[Any] = None,
                  access_token_override: Optional[str] = None) -> CryptoReconcileJob:
        """Reconcile invoices from ``cursor``; ``recon_token`` goes in ``X-Recon-Token``."""
        return self._call("POST", self.CRYPTO_PREFIX + "/reconcile",
                          body={"cursor": cursor} if cursor is not None else {},
                          headers={"X-Recon-Token": recon_token} if recon_token else None,
                          token=access_token_override).model(CryptoReconcileJob)


def _token_subject(token: Optional[str]) -> Optional[str]:
    """The ``sub`` claim of a JWT, or ``None`` when ``token`` is not one."""
    parts = (token or "").split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except ValueError:  # binascii.Error, invalid UTF-8 and invalid JSON are all ValueErrors
        return None
    return _first_text(claims.get("sub")) if isinstance(claims, dict) else None


def _decimal_text(amount: Union[str, int, float]) -> str:
    if isinstance(amount, bool) or not isinstance(amount, (str, int, float)):
        raise TypeError(f"amount must be a decimal string or number, got {type(amount).__name__}")
    if isinstance(amount, float):
        from decimal import Decimal  # floats are the rare case; strings are the rule

        return format(Decimal(repr(amount)), "f")  # never exponent notation such as 1e-07
    return str(amount)


class PaymentsClient(_Service):
    """Stripe checkouts, subscriptions, products, portal and history; crypto invoices in
    ``crypto``.

    Mutating calls accept ``idempotency_key``: the server then applies the
    request once however often it arrives, and the client may retry it safely.
    """

    PAYMENTS_PREFIX = "/api/payments"
    _error = PaymentsError
    _label = "Payments"
    crypto: CryptoPaymentsClient

    def _setup(self) -> None:
        self.crypto = CryptoPaymentsClient._attached(self._ctx)
        self.crypto._ctx = self._ctx  # one token for both: assigning access_token updates both

    def create_checkout_session(
        self, *, price_id: str, mode: str, success_url: str, cancel_url: str,
        metadata: Optional[Dict[str, Any]] = None, require_legal_consent: Optional[bool] = None,
        legal_consent_text: Optional[str] = None, idempotency_key: Optional[str] = None,
        access_token_override: Optional[str] = None,
    ) -> CheckoutSession:
        """Start a Stripe checkout of one ``price_id``; send the user to ``checkout_url``.

        ``price_id`` must be a price that SPAPS manages (unknown ones raise
        ``PaymentsError`` 404 ``PRICE_NOT_FOUND``). ``require_legal_consent`` and
        ``legal_consent_text`` are sent in ``metadata``, where SPAPS keeps them with the
        session.
        """
        tags = {**(metadata or {}), **_pick(legal_consent_text=legal_consent_text or None)}
        if require_legal_consent is not None:
            tags["require_legal_consent"] = "true" if require_legal_consent else "false"
        body = {"mode": mode, "line_items": [{"price_id": price_id, "quantity": 1}],
                "success_url": success_url, "cancel_url": cancel_url,
                **_pick(metadata=tags or None)}
        return self._call("POST", "/api/stripe/checkout-sessions", body=body,
                          token=access_token_override, idempotency_key=idempotency_key,
                          headers={"Idempotency-Key": idempotency_key} if idempotency_key
                          else None).model(CheckoutSession, "session")

    def get_balance(self, *, access_token_override: Optional[str] = None) -> BalanceOverview:
        """The user's balance, tier and usage."""
        return self._stub("GET", "/balance", access_token_override,
                          instead="payments are listed at GET /api/stripe/history"
                          ).model(BalanceOverview)

    def create_payment_intent(
        self, *, amount: int, currency: str, payment_method_types: Optional[List[str]] = None,
        metadata: Optional[Dict[str, Any]] = None, idempotency_key: Optional[str] = None,
        access_token_override: Optional[str] = None,
    ) -> PaymentIntent:
        """Create a payment intent for ``amount`` minor units (cents) of ``currency``."""
        body = {"amount": amount, "currency": currency, **_pick(
            payment_method_types=payment_method_types, metadata=metadata or None)}
        return self._stub("POST", "/create-payment-intent", access_token_override,
                          instead="use create_checkout_session()", body=body,
                          idempotency_key=idempotency_key).model(PaymentIntent)

    def update_payment_method(self, *, payment_method_id: str, set_default: Optional[bool] = None,
                              access_token_override: Optional[str] = None
                              ) -> PaymentMethodUpdateResult:
        """Attach payment method ``payment_method_id``, optionally as the default."""
        if not payment_method_id:
            raise ValueError("payment_method_id must not be empty")
        body = {"payment_method_id": payment_method_id, **_pick(set_default=set_default)}
        return self._stub("POST", "/update-payment-method", access_token_override,
                          instead="send the user to the Stripe billing portal "
                          "(POST /api/stripe/portal-session)", body=body
                          ).model(PaymentMethodUpdateResult)

    def wallet_deposit(
        self, *, wallet_address: str, chain_type: str, transaction_id: str, amount: float,
        currency: str, tier: Optional[str] = None, idempotency_key: Optional[str] = None,
        access_token_override: Optional[str] = None,
    ) -> WalletDeposit:
        """Record an on-chain deposit ``transaction_id`` to the user's balance."""
        body = {"wallet_address": wallet_address, "chain_type": chain_type,
                "transaction_id": transaction_id, "amount": float(amount), "currency": currency,
                **_pick(tier=tier or None)}
        return self._stub("POST", "/wallet-deposit", access_token_override, body=body,
                          instead="take crypto payments with payments.crypto.create_invoice()",
                          idempotency_key=idempotency_key).model(WalletDeposit)

    def get_wallet_transaction(self, *, transaction_id: str,
                               access_token_override: Optional[str] = None) -> WalletTransaction:
        """Wallet transaction ``transaction_id``."""
        return self._stub("GET", "/wallet-transaction/" + _segment(
            transaction_id, "transaction_id"), access_token_override,
            instead="follow crypto payments with payments.crypto.get_invoice_status()"
        ).model(WalletTransaction)

    def get_subscription(self, subscription_id: str, *,
                         access_token_override: Optional[str] = None) -> SubscriptionDetail:
        """Subscription ``subscription_id``."""
        return self._call("GET", _subscription_path(subscription_id),
                          token=access_token_override).model(
            SubscriptionDetail, "subscription", subscription_id=subscription_id)

    def cancel_subscription(self, subscription_id: str, *,
                            cancel_at_period_end: Optional[bool] = None,
                            immediately: Optional[bool] = None,
                            access_token_override: Optional[str] = None
                            ) -> SubscriptionCancellation:
        """Cancel a subscription at the end of the period (the default) or at once
        (``immediately=True``, or the reference client's ``cancel_at_period_end=False``)."""
        if immediately is None:
            immediately = cancel_at_period_end is False
        elif cancel_at_period_end is not None and cancel_at_period_end == immediately:
            raise ValueError("cancel_at_period_end and immediately contradict each other")
        return self._call("POST", _subscription_path(subscription_id) + "/cancel",
                          body={"immediately": immediately}, token=access_token_override
                          ).model(SubscriptionCancellation, "subscription",
                                  subscription_id=subscription_id)

    def update_subscription(self, subscription_id: str, *, price_id: str,
                            access_token_override: Optional[str] = None) -> SubscriptionDetail:
        """Move subscription ``subscription_id`` to price ``price_id``."""
        return self._call("POST", _subscription_path(subscription_id) + "/update",
                          body={"price_id": price_id}, token=access_token_override).model(
            SubscriptionDetail, "subscription", subscription_id=subscription_id)

    def list_subscriptions(self, *, status: Optional[str] = None, limit: Optional[int] = None,
                           offset: Optional[int] = None,
                           access_token_override: Optional[str] = None) -> SubscriptionList:
        """The user's subscriptions, optionally only those in ``status``."""
        return self._call("GET", "/api/stripe/subscriptions", token=access_token_override,
                          query=_query(status=status, limit=limit, offset=offset)
                          ).model(SubscriptionList)

    def list_products(self, *, category: Optional[str] = None, active: Optional[bool] = None,
                      limit: Optional[int] = None, offset: Optional[int] = None,
                      access_token_override: Optional[str] = None) -> ProductList:
        """The application's products and their default prices."""
        return self._call("GET", "/api/stripe/products", token=access_token_override,
                          query=_query(category=category, active=active, limit=limit,
                                       offset=offset)).model(ProductList)

    def get_product(self, product_id: str, *, access_token_override: Optional[str] = None
                    ) -> Product:
        """Product ``product_id``."""
        return self._call("GET", "/api/stripe/products/" + _segment(product_id, "product_id"),
                          token=access_token_override).model(Product, "product")

    def list_checkout_sessions(self, *, limit: Optional[int] = None,
                               offset: Optional[int] = None,
                               access_token_override: Optional[str] = None
                               ) -> CheckoutSessionList:
        """The user's checkout sessions, newest first."""
        return self._call("GET", "/api/stripe/checkout-sessions", token=access_token_override,
                          query=_query(limit=limit, offset=offset)).model(CheckoutSessionList)

    def get_checkout_session(self, session_id: str, *,
                             access_token_override: Optional[str] = None) -> CheckoutSession:
        """Checkout session ``session_id`` and its payment status."""
        return self._call("GET", "/api/stripe/checkout-sessions/" + _segment(
            session_id, "session_id"), token=access_token_override).model(
            CheckoutSession, "session")

    def expire_checkout_session(self, session_id: str, *,
                                access_token_override: Optional[str] = None
                                ) -> CheckoutSession:
        """End checkout session ``session_id`` before the user pays."""
        return self._call("POST", "/api/stripe/checkout-sessions/" + _segment(
            session_id, "session_id") + "/expire", token=access_token_override, body={}
        ).model(CheckoutSession, "session", session_id=session_id)

    def create_portal_session(self, *, return_url: str,
                              access_token_override: Optional[str] = None) -> PortalSession:
        """A Stripe billing-portal session where the user manages cards and invoices."""
        return self._call("POST", "/api/stripe/portal-session", token=access_token_override,
                          body={"return_url": return_url}).model(PortalSession,
                                                                 return_url=return_url)

    def list_payment_history(self, *, status: Optional[str] = None, limit: Optional[int] = None,
                             offset: Optional[int] = None,
                             access_token_override: Optional[str] = None) -> PaymentHistory:
        """The user's payments, newest first."""
        return self._call("GET", "/api/stripe/history", token=access_token_override,
                          query=_query(status=status, limit=limit, offset=offset)
                          ).model(PaymentHistory)

    def _stub(self, method: str, path: str, token: Optional[str], *, instead: str,
              **options: Any) -> _Reply:
        """Call a route of the reference client that SPAPS 0.6 serves as a 501 stub.

        A server that implements it is still used; one that does not gets an error
        that says so and what to use instead, rather than "Feature not yet available".
        """
        path = self.PAYMENTS_PREFIX + path
        try:
            return self._call(method, path, token=token, **options)
        except PaymentsError as exc:
            if exc.status_code != 501:
                raise
            exc.message = (f"{method} {path} is not available on this SPAPS server "
                           f"(501 Not Implemented); {instead}")
            exc.args = (exc.message,)
            raise


def _subscription_path(subscription_id: str) -> str:
    return "/api/stripe/subscription/" + _segment(subscription_id, "subscription_id")


class UsageClient(_Service):
    """Metered feature usage (``/api/usage``)."""

    USAGE_PREFIX = "/api/usage"
    _error = UsageError
    _label = "Usage"

    def get_features(self, *, access_token_override: Optional[str] = None
                     ) -> UsageFeaturesResponse:
        """The user's metered features and their usage."""
        return self._call("GET", self.USAGE_PREFIX + "/features", token=access_token_override
                          ).model(UsageFeaturesResponse)

    def authorize_usage(
        self, *, feature_key: str, dimensions: Mapping[str, Union[int, float]],
        resource_type: str = "user", resource_id: Optional[str] = None,
        subject_user_id: Optional[str] = None, metadata: Optional[Dict[str, Any]] = None,
        access_token_override: Optional[str] = None,
    ) -> UsageAuthorization:
        """Ask whether ``dimensions`` of ``feature_key`` may be used now (nothing is counted).

        Record the use afterwards with ``record_usage(authorization_ref=...)``; the
        reference stays valid for a few minutes (``expires_at``).
        """
        body = {"feature_key": feature_key, "resource_type": resource_type,
                "dimensions": dict(dimensions), **_pick(
                    resource_id=resource_id, metadata=metadata, subject_user_id=self._subject(
                        resource_type, subject_user_id, access_token_override))}
        return self._call("POST", self.USAGE_PREFIX + "/authorize", body=body,
                          token=access_token_override).model(UsageAuthorization)

    def get_usage_status(
        self, *, feature_key: str, resource_type: str = "user", resource_id: Optional[str] = None,
        subject_user_id: Optional[str] = None, access_token_override: Optional[str] = None,
    ) -> UsageAuthorization:
        """Where ``feature_key`` stands now (decision, window totals, remaining), without
        authorizing anything: the result has no ``authorization_ref``."""
        query = _query(feature_key=feature_key, resource_type=resource_type,
                       resource_id=resource_id, subject_user_id=self._subject(
                           resource_type, subject_user_id, access_token_override))
        return self._call("GET", self.USAGE_PREFIX + "/status", auth=_OPTIONAL_BEARER,
                          token=access_token_override, query=query).model(UsageAuthorization)

    def record_usage(
        self, *, feature: str, quantity: Optional[Union[int, float]] = None,
        metadata: Optional[Dict[str, Any]] = None, timestamp: Optional[str] = None,
        idempotency_key: Optional[str] = None, access_token_override: Optional[str] = None,
        dimensions: Optional[Mapping[str, Union[int, float]]] = None,
        authorization_ref: Optional[str] = None, resource_type: str = "user",
        resource_id: Optional[str] = None, subject_user_id: Optional[str] = None,
    ) -> UsageRecordResult:
        """Count a use of ``feature``: ``quantity`` units, or several ``dimensions``.

        Without ``authorization_ref`` the use is authorized first (``authorize_usage``);
        a decision other than allowed raises ``UsageError`` and records nothing.
        ``quantity`` counts in the feature's only dimension (as ``get_features`` lists
        it); use ``dimensions`` for features with several. The record is sent with an
        idempotency key (``idempotency_key``, or a fresh one), so SPAPS counts it once
        however often it arrives and the client may retry it safely.
        """
        if (quantity is None) == (dimensions is None):
            raise ValueError("record_usage needs either quantity= or dimensions=")
        if dimensions is None:
            assert quantity is not None
            dimensions = {self._dimension_of(feature, access_token_override): quantity}
        authorization: Optional[UsageAuthorization] = None
        if authorization_ref is None:
            authorization = self.authorize_usage(
                feature_key=feature, dimensions=dimensions, resource_type=resource_type,
                resource_id=resource_id, subject_user_id=subject_user_id, metadata=metadata,
                access_token_override=access_token_override)
            if not authorization.allowed or not authorization.authorization_ref:
                reason = authorization.reasons[0] if authorization.reasons else None
                raise UsageError(
                    f"usage of {feature!r} was not authorized ({authorization.decision})"
                    + (f": {reason.message}" if reason and reason.message else ""),
                    error_code=reason.code if reason else "USAGE_NOT_AUTHORIZED",
                    retryable=False)
            authorization_ref = authorization.authorization_ref
        # "" would make every later record a replay of the first
        idempotency_key = idempotency_key or "spaps-" + os.urandom(16).hex()
        body = {"authorization_ref": authorization_ref, "idempotency_key": idempotency_key,
                "feature_key": feature, "resource_type": resource_type,
                "dimensions": dict(dimensions), **_pick(
                    resource_id=resource_id, metadata=metadata, occurred_at=timestamp,
                    subject_user_id=self._subject(resource_type, subject_user_id,
                                                  access_token_override))}
        reply = self._record(body, idempotency_key, access_token_override,
                             own_authorization=authorization is not None)
        data = reply.data()
        current: Dict[str, Any] = {}
        if quantity is not None and len(dimensions) == 1:
            (name,) = dimensions
            used = _object_at(data, "window_totals").get(name)
            # "remaining" of an authorization already counts the use it authorizes, which
            # a replayed record did not count again.
            left = authorization.remaining.get(name) if authorization else None
            if isinstance(left, (int, float)):
                if data.get("replayed") is True:
                    left += dimensions[name]
                current["remaining"] = left
                if isinstance(used, (int, float)):
                    current["limit"] = used + left
            current["used"] = used
        return reply.parse(UsageRecordResult, {
            "feature": feature, "quantity": quantity, "current_usage": current, **data})

    def _record(self, body: Dict[str, Any], idempotency_key: str, token: Optional[str], *,
                own_authorization: bool) -> _Reply:
        """POST the record; when the client authorized it a moment ago, wait briefly for
        the authorization to become visible (SPAPS stores it after answering)."""
        pause = 0.05
        for _ in range(3):
            try:
                return self._call("POST", self.USAGE_PREFIX + "/record", body=body, token=token,
                                  idempotency_key=idempotency_key)
            except UsageError as exc:
                if not own_authorization or exc.error_code != "USAGE_AUTHORIZATION_EXPIRED":
                    raise
            self._ctx.http.sleep(pause)  # the record is keyed: sending it again cannot count twice
            pause *= 2
        return self._call("POST", self.USAGE_PREFIX + "/record", body=body, token=token,
                          idempotency_key=idempotency_key)

    def _subject(self, resource_type: str, subject_user_id: Optional[str],
                 token: Optional[str]) -> Optional[str]:
        """The user a ``user`` usage counts for: given, or the signed-in user.

        SPAPS requires it; the signed-in user's id is the ``sub`` of the access token
        (read, not verified: the server verifies the token that comes with it).
        """
        if subject_user_id is not None or resource_type != "user":
            return subject_user_id
        return _token_subject(token or self._ctx.tokens.peek())

    def _dimension_of(self, feature: str, token: Optional[str]) -> str:
        """The one dimension ``feature`` is metered in, from ``get_features`` (cached)."""
        cache: Dict[str, str] = self.__dict__.setdefault("_dimensions", {})
        if feature not in cache:
            listed = {item.name: item for item in self.get_features(
                access_token_override=token).features}
            known = listed.get(feature)
            if known is None:
                raise UsageError(f"feature {feature!r} is not metered for this application "
                                 f"(known: {', '.join(sorted(listed)) or 'none'})",
                                 error_code="FEATURE_NOT_FOUND", retryable=False)
            if len(known.dimensions) != 1:
                raise ValueError(f"feature {feature!r} is metered in {len(known.dimensions)} "
                                 f"dimensions ({', '.join(known.dimensions) or 'none'}): "
                                 "pass dimensions=")
            cache[feature] = known.dimensions[0]
        return cache[feature]

    def get_history(
        self, *, period: Optional[str] = None, start_date: Optional[str] = None,
        end_date: Optional[str] = None, feature: Optional[str] = None,
        format: Optional[str] = None, limit: Optional[int] = None, offset: Optional[int] = None,
        access_token_override: Optional[str] = None,
    ) -> UsageHistoryResponse:
        """Recorded usage events (``events``; ``has_more``/``next_offset`` page them),
        filtered by ``feature``; ``period``, ``start_date``, ``end_date`` and ``format``
        are sent for servers that filter by them."""
        query = _query(feature_key=feature or None, period=period or None,
                       start_date=start_date or None, end_date=end_date or None,
                       format=format or None, limit=limit, offset=offset)
        return self._call("GET", self.USAGE_PREFIX + "/history", token=access_token_override,
                          query=query).model(UsageHistoryResponse)


class EntitlementsClient(_Service):
    """Entitlements: what users may use, from purchases or manual grants
    (``/api/entitlements``). Lookups need only the API key; grants and revokes an
    admin's token."""

    ENTITLEMENTS_PREFIX = "/api/entitlements"
    _error = EntitlementsError
    _label = "Entitlements"

    def check_access(self, user_id: Optional[str] = None,
                     entitlement_key: Optional[str] = None, *, email: Optional[str] = None,
                     resource_type: Optional[str] = None, resource_id: Optional[str] = None
                     ) -> bool:
        """Whether the user (by ``user_id`` or ``email``) holds ``entitlement_key`` now."""
        if not entitlement_key:
            raise ValueError("check_access needs entitlement_key")
        if not user_id and not email:
            raise ValueError("check_access needs user_id or email")
        reply = self._call("GET", self.ENTITLEMENTS_PREFIX + "/check", auth=_OPTIONAL_BEARER,
                           query=_query(user_id=user_id or None, email=email,
                                        entitlement_key=entitlement_key,
                                        resource_type=resource_type, resource_id=resource_id))
        granted = reply.data().get("has_entitlement")
        if not isinstance(granted, bool):
            raise reply.invalid("the reply has no has_entitlement")
        return granted

    def get_user_entitlements(
        self, *, user_id: Optional[str] = None, email: Optional[str] = None,
        entitlement_key: Optional[str] = None, include_expired: bool = False,
        include_revoked: bool = False, limit: Optional[int] = None, offset: Optional[int] = None,
        resource_type: Optional[str] = None, resource_id: Optional[str] = None,
    ) -> List[Entitlement]:
        """The entitlements of a user given by ``user_id`` or ``email``."""
        if not user_id and not email:
            raise ValueError("get_user_entitlements needs user_id or email")
        query = _query(user_id=user_id or None, email=email or None,
                       entitlement_key=entitlement_key or None,
                       include_expired=include_expired or None,
                       include_revoked=include_revoked or None, limit=limit, offset=offset,
                       resource_type=resource_type, resource_id=resource_id)
        reply = self._call("GET", self.ENTITLEMENTS_PREFIX, auth=_OPTIONAL_BEARER, query=query)
        return _model_list(reply, "entitlements", Entitlement)

    def grant_manual(
        self, params: Optional[ManualGrantParams] = None, *,
        entitlement_key: Optional[str] = None, beneficiary_user_id: Optional[str] = None,
        beneficiary_email: Optional[str] = None, starts_at: Optional[str] = None,
        ends_at: Optional[str] = None, reason: Optional[str] = None,
        metadata: Optional[Dict[str, Any]] = None, resource_type: Optional[str] = None,
        resource_id: Optional[str] = None, access_token: Optional[str] = None,
    ) -> Entitlement:
        """Grant an entitlement by hand (admins only): a ``ManualGrantParams`` or keywords.

        For usage metering, name the features and limits in ``metadata``:
        ``{"usage_features": ["api_calls"], "usage_limits": {"requests": 1000}}``.
        """
        if params is None:
            if not entitlement_key:
                raise ValueError("grant_manual needs entitlement_key (or a ManualGrantParams)")
            params = ManualGrantParams(
                entitlement_key=entitlement_key, beneficiary_user_id=beneficiary_user_id,
                beneficiary_email=beneficiary_email, starts_at=starts_at, ends_at=ends_at,
                reason=reason, metadata=metadata, resource_type=resource_type,
                resource_id=resource_id)
        elif entitlement_key is not None:
            raise ValueError("pass either a ManualGrantParams or keywords, not both")
        if not params.beneficiary_user_id and not params.beneficiary_email:
            raise ValueError("grant_manual needs beneficiary_user_id or beneficiary_email")
        body = {info.name: getattr(params, info.name) for info in fields(params)
                if getattr(params, info.name)}
        return self._call("POST", self.ENTITLEMENTS_PREFIX + "/manual", token=access_token,
                          body=body).model(Entitlement, "entitlement")

    def revoke(self, entitlement_id: str, *, reason: Optional[str] = None,
               access_token: Optional[str] = None) -> Optional[Entitlement]:
        """Revoke entitlement ``entitlement_id`` (admins only); SPAPS 0.6 answers 204, so
        the result is ``None`` unless the server returns the revoked entitlement."""
        reply = self._call("DELETE", self.ENTITLEMENTS_PREFIX + "/" + _segment(
            entitlement_id, "entitlement_id"), token=access_token,
            query=_query(reason=reason or None))
        return reply.model(Entitlement, "entitlement") if reply.data() else None

    def claim_pending(self, *, access_token: Optional[str] = None) -> EntitlementClaimResult:
        """Take over entitlements bought for the signed-in user's e-mail before sign-up."""
        reply = self._call("POST", self.ENTITLEMENTS_PREFIX + "/claim", token=access_token,
                           body={})
        claimed = reply.data().get("claimed")
        return reply.model(EntitlementClaimResult,
                           count=len(claimed) if isinstance(claimed, list) else 0)


def _model_list(reply: _Reply, key: str, model: Type[_M]) -> List[_M]:
    """The list under ``key`` of the payload, each item read as ``model``."""
    items = reply.data().get(key) or []
    if not isinstance(items, list):
        raise reply.invalid(f"'{key}' is {_kind(items)}, expected a list")
    return [reply.parse(model, item) for item in items]


class WhitelistClient(_Service):
    """The application's email whitelist (``/api/v1/whitelist``)."""

    WHITELIST_PREFIX = "/api/v1/whitelist"
    _error = WhitelistError
    _label = "Whitelist"

    def check(self, *, email: str) -> WhitelistCheckResult:
        """Whether ``email`` is whitelisted (sends the API key only, never a token)."""
        reply = self._call("GET", self.WHITELIST_PREFIX + "/check", auth=_KEY,
                           query=[("email", email)])
        data = _object_at(reply.body, "data")
        return reply.parse(WhitelistCheckResult, {
            "message": _first_text(data.get("message"), reply.body.get("message")),
            "entry": _object_at(data, "entry") or None})

    def list(self, *, limit: int = 10, offset: int = 0, tier: Optional[str] = None,
             access_token_override: Optional[str] = None) -> WhitelistListResult:
        """A page of whitelist entries."""
        reply = self._call("GET", self.WHITELIST_PREFIX, token=access_token_override,
                           query=_query(limit=limit, offset=offset, tier=tier or None))
        return reply.parse(WhitelistListResult, _object_at(reply.body, "data"))

    def add(self, *, email: str, tier: str = "premium", bypass_payment: bool = True,
            metadata: Optional[Dict[str, Any]] = None,
            access_token_override: Optional[str] = None) -> WhitelistEntry:
        """Whitelist ``email`` at ``tier``."""
        body = {"email": email, "tier": tier, "bypass_payment": bypass_payment,
                **_pick(metadata=metadata)}
        reply = self._call("POST", self.WHITELIST_PREFIX, body=body, token=access_token_override)
        return reply.parse(WhitelistEntry, _object_at(reply.body, "data").get("entry"))

    def update(self, *, email: str, tier: Optional[str] = None,
               bypass_payment: Optional[bool] = None, metadata: Optional[Dict[str, Any]] = None,
               access_token_override: Optional[str] = None) -> WhitelistEntry:
        """Change the tier, payment bypass or metadata of ``email``'s entry."""
        reply = self._call("PUT", self.WHITELIST_PREFIX + "/" + _segment(email, "email"),
                           body=_pick(tier=tier, bypass_payment=bypass_payment,
                                      metadata=metadata), token=access_token_override)
        return reply.parse(WhitelistEntry, _object_at(reply.body, "data").get("entry"))

    def remove(self, *, email: str, access_token_override: Optional[str] = None
               ) -> WhitelistMessage:
        """Remove ``email`` from the whitelist (SPAPS answers 204)."""
        reply = self._call("DELETE", self.WHITELIST_PREFIX + "/" + _segment(email, "email"),
                           token=access_token_override)
        return WhitelistMessage(_first_text(_object_at(reply.body, "data").get("message"),
                                            reply.body.get("message"))
                                or f"{email} was removed from the whitelist")


class SecureMessagesClient(_Service):
    """Secure patient/practitioner messages (``/api/secure-messages``)."""

    SECURE_MESSAGES_PREFIX = "/api/secure-messages"
    _error = SecureMessagesError
    _label = "Secure message"

    def create_message(self, *, patient_id: str, practitioner_id: str, content: str,
                       metadata: Optional[Dict[str, Any]] = None,
                       idempotency_key: Optional[str] = None,
                       access_token_override: Optional[str] = None) -> SecureMessage:
        """Store a message (request keys go out camelCase: ``patientId``, ``practitionerId``)."""
        body = {"patientId": patient_id, "practitionerId": practitioner_id, "content": content,
                **_pick(metadata=metadata)}
        return self._call("POST", self.SECURE_MESSAGES_PREFIX, auth=_OPTIONAL_BEARER, body=body,
                          token=access_token_override, idempotency_key=idempotency_key
                          ).model(SecureMessage)

    def list_messages(self, *, access_token_override: Optional[str] = None
                      ) -> List[SecureMessage]:
        """The application's messages, oldest first."""
        return _model_list(self._call("GET", self.SECURE_MESSAGES_PREFIX, auth=_OPTIONAL_BEARER,
                                      token=access_token_override), "messages", SecureMessage)


class MetricsClient(_Service):
    """Health, readiness and metrics endpoints; they need no API key or token."""

    _error = MetricsError
    _label = "Metrics"

    def __init__(self, /, *, base_url: str, client: Optional[RetryClient] = None,
                 request_timeout: float = DEFAULT_TIMEOUT, **options: Any) -> None:
        super().__init__(base_url=base_url, api_key="", client=client,
                         request_timeout=request_timeout, **options)

    def get_prometheus_metrics(self) -> str:
        """The Prometheus exposition text from ``/api/metrics``."""
        response = self._ctx.http.request("GET", self.base_url + "/api/metrics",
                                          headers={"Accept": "text/plain"})
        if response.status_code >= 300:
            raise self._status_error(response, [])
        return response.content.decode("utf-8", "replace")

    def get_metrics_json(self) -> Dict[str, Any]:
        """Metrics as the JSON object ``/api/metrics/json`` returns."""
        return self._call("GET", "/api/metrics/json", auth=_NONE,
                          headers={"Accept": "application/json"}).body

    def health(self) -> Dict[str, Any]:
        """The ``/health`` document as sent; SPAPS puts the verdict in ``data``:
        ``{"success": true, "data": {"status": "ok", "version": ...}, ...}``."""
        return self._call("GET", "/health", auth=_NONE).body

    def readiness(self) -> Dict[str, Any]:
        """The ``/health/ready`` document as sent; SPAPS puts the verdict in ``data``:
        ``{"success": true, "data": {"status": "ready", "checks": {...}}, ...}``."""
        return self._call("GET", "/health/ready", auth=_NONE).body


# =============================================================================
# Async: the sync services, run in worker threads the client owns
# =============================================================================


class _Runner:
    """Runs blocking calls for async code, as ``asyncio.to_thread`` does (context
    variables included), on a thread pool that belongs to one client.

    The pool holds as many threads as the client keeps connections, so calls in
    flight never outnumber the connections they need; ``close`` shuts it down.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._executor: Optional[ThreadPoolExecutor] = None
        self._closed = False
        self._lock = threading.Lock()

    async def run(self, function: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        import asyncio  # only async users pay for importing it
        import contextvars
        import functools

        call = functools.partial(contextvars.copy_context().run, function, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._pool(), call)

    def close(self) -> None:
        with self._lock:
            executor, self._executor, self._closed = self._executor, None, True
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._closed:
                raise SpapsConfigurationError("the client is closed")
            if self._executor is None:
                from concurrent.futures import ThreadPoolExecutor

                self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="spaps")
            return self._executor


if TYPE_CHECKING and sys.version_info < (3, 10):
    # What a checker targeting 3.9 sees: results typed, parameters not (no ParamSpec).
    def _async_twin(method: Callable[..., _T]) -> Callable[..., Coroutine[None, None, _T]]: ...

    def _keywords_of(source: Callable[..., Any]
                     ) -> Callable[[Callable[..., _T]], Callable[..., _T]]: ...

else:

    def _async_twin(method: Callable[Concatenate[_S, _P], _T],
                    ) -> Callable[Concatenate[_AsyncService[_S], _P], Coroutine[None, None, _T]]:
        """The async form of a sync service method: the same call, run in a worker thread."""
        name = method.__name__

        async def twin(self: _AsyncService[_S], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
            return await self._runner.run(getattr(self._sync, name), *args, **kwargs)

        twin.__name__ = twin.__qualname__ = name
        twin.__doc__ = method.__doc__
        return twin

    def _keywords_of(source: Callable[Concatenate[Any, _P], Any],
                     ) -> Callable[[Callable[..., _T]], Callable[Concatenate[Any, _P], _T]]:
        """Give a ``**options`` forwarder the exact signature of the method it forwards to."""

        def apply(forwarder: Callable[..., _T]) -> Callable[Concatenate[Any, _P], _T]:
            forwarder.__doc__ = forwarder.__doc__ or source.__doc__
            return forwarder

        return apply


class _AsyncService(Generic[_S]):
    """Base of the async service clients: the sync client of the same service, awaited.

    The constructor takes the same keywords as the sync class; a standalone
    instance owns its worker threads and ``aclose()`` stops them.
    """

    _sync_class: ClassVar[Type[_Service]]
    _sync: _S
    _runner: _Runner
    _owns_runner: bool

    def __init__(self, **options: Any) -> None:
        self._sync = self._sync_class(**options)  # type: ignore[assignment]
        self._runner = _Runner(self._sync._ctx.http.pool_maxsize)
        self._owns_runner = True

    @classmethod
    def _wrap(cls, sync: Any, runner: _Runner) -> Any:
        service = cls.__new__(cls)
        service._sync, service._runner, service._owns_runner = sync, runner, False
        return service

    @property
    def base_url(self) -> str:
        """The SPAPS base URL, trailing slashes removed."""
        return self._sync.base_url

    @property
    def api_key(self) -> str:
        """The API key sent as ``X-API-Key``."""
        return self._sync.api_key

    @property
    def access_token(self) -> Optional[str]:
        """The access token sent as ``Authorization: Bearer``; assignable."""
        return self._sync.access_token

    @access_token.setter
    def access_token(self, token: Optional[str]) -> None:
        self._sync.access_token = token

    async def aclose(self) -> None:
        """Close the HTTP client if this service created it, and its worker threads."""
        self._sync.close()
        if self._owns_runner:
            self._runner.close()

    async def __aenter__(self: _T) -> _T:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r})"


class AsyncAuthClient(_AsyncService[AuthClient]):
    """Async ``AuthClient``: same constructor keywords, every call awaitable."""

    _sync_class = AuthClient

    @_keywords_of(AuthClient.__init__)
    def __init__(self, **options: Any) -> None:
        super().__init__(**options)

    AUTH_PREFIX = AuthClient.AUTH_PREFIX
    request_nonce = _async_twin(AuthClient.request_nonce)
    verify_wallet = _async_twin(AuthClient.verify_wallet)
    sign_in_with_password = _async_twin(AuthClient.sign_in_with_password)
    refresh_tokens = _async_twin(AuthClient.refresh_tokens)
    register = _async_twin(AuthClient.register)
    send_magic_link = _async_twin(AuthClient.send_magic_link)
    verify_magic_link = _async_twin(AuthClient.verify_magic_link)
    logout = _async_twin(AuthClient.logout)
    get_current_user = _async_twin(AuthClient.get_current_user)
    request_password_reset = _async_twin(AuthClient.request_password_reset)
    confirm_password_reset = _async_twin(AuthClient.confirm_password_reset)
    verify_mfa = _async_twin(AuthClient.verify_mfa)
    enroll_totp = _async_twin(AuthClient.enroll_totp)
    activate_totp = _async_twin(AuthClient.activate_totp)
    disable_totp = _async_twin(AuthClient.disable_totp)
    get_auth_methods = _async_twin(AuthClient.get_auth_methods)
    get_session_context = _async_twin(AuthClient.get_session_context)

    @property
    def token_storage(self) -> Optional[TokenStorage]:
        """The storage tokens are saved to, if any."""
        return self._sync.token_storage

    def get_stored_tokens(self) -> Optional[StoredTokens]:
        """The stored tokens (``None`` without storage or tokens)."""
        return self._sync.get_stored_tokens()

    def clear_stored_tokens(self) -> None:
        """Forget the stored tokens."""
        self._sync.clear_stored_tokens()


class AsyncSessionsClient(_AsyncService[SessionsClient]):
    """Async ``SessionsClient``: same constructor keywords, every call awaitable."""

    _sync_class = SessionsClient

    @_keywords_of(SessionsClient.__init__)
    def __init__(self, **options: Any) -> None:
        super().__init__(**options)

    SESSIONS_PREFIX = SessionsClient.SESSIONS_PREFIX
    get_current_session = _async_twin(SessionsClient.get_current_session)
    validate_session = _async_twin(SessionsClient.validate_session)
    list_sessions = _async_twin(SessionsClient.list_sessions)
    touch_session = _async_twin(SessionsClient.touch_session)
    revoke_session = _async_twin(SessionsClient.revoke_session)


class AsyncCryptoPaymentsClient(_AsyncService[CryptoPaymentsClient]):
    """Async ``CryptoPaymentsClient`` (``payments.crypto`` of the async clients)."""

    _sync_class = CryptoPaymentsClient

    @_keywords_of(CryptoPaymentsClient.__init__)
    def __init__(self, **options: Any) -> None:
        super().__init__(**options)

    CRYPTO_PREFIX = CryptoPaymentsClient.CRYPTO_PREFIX
    create_invoice = _async_twin(CryptoPaymentsClient.create_invoice)
    get_invoice = _async_twin(CryptoPaymentsClient.get_invoice)
    get_invoice_status = _async_twin(CryptoPaymentsClient.get_invoice_status)
    reconcile = _async_twin(CryptoPaymentsClient.reconcile)


class AsyncPaymentsClient(_AsyncService[PaymentsClient]):
    """Async ``PaymentsClient``: same constructor keywords, every call awaitable."""

    _sync_class = PaymentsClient

    @_keywords_of(PaymentsClient.__init__)
    def __init__(self, **options: Any) -> None:
        super().__init__(**options)

    PAYMENTS_PREFIX = PaymentsClient.PAYMENTS_PREFIX
    create_checkout_session = _async_twin(PaymentsClient.create_checkout_session)
    get_balance = _async_twin(PaymentsClient.get_balance)
    create_payment_intent = _async_twin(PaymentsClient.create_payment_intent)
    update_payment_method = _async_twin(PaymentsClient.update_payment_method)
    wallet_deposit = _async_twin(PaymentsClient.wallet_deposit)
    get_wallet_transaction = _async_twin(PaymentsClient.get_wallet_transaction)
    get_subscription = _async_twin(PaymentsClient.get_subscription)
    cancel_subscription = _async_twin(PaymentsClient.cancel_subscription)
    update_subscription = _async_twin(PaymentsClient.update_subscription)
    list_subscriptions = _async_twin(PaymentsClient.list_subscriptions)
    list_products = _async_twin(PaymentsClient.list_products)
    get_product = _async_twin(PaymentsClient.get_product)
    list_checkout_sessions = _async_twin(PaymentsClient.list_checkout_sessions)
    get_checkout_session = _async_twin(PaymentsClient.get_checkout_session)
    expire_checkout_session = _async_twin(PaymentsClient.expire_checkout_session)
    create_portal_session = _async_twin(PaymentsClient.create_portal_session)
    list_payment_history = _async_twin(PaymentsClient.list_payment_history)

    @property
    def crypto(self) -> AsyncCryptoPaymentsClient:
        """Crypto invoices, sharing this client's transport, token and worker threads."""
        return AsyncCryptoPaymentsClient._wrap(self._sync.crypto, self._runner)  # type: ignore[no-any-return]


class AsyncUsageClient(_AsyncService[UsageClient]):
    """Async ``UsageClient``: same constructor keywords, every call awaitable."""

    _sync_class = UsageClient

    @_keywords_of(UsageClient.__init__)
    def __init__(self, **options: Any) -> None:
        super().__init__(**options)

    USAGE_PREFIX = UsageClient.USAGE_PREFIX
    get_features = _async_twin(UsageClient.get_features)
    authorize_usage = _async_twin(UsageClient.authorize_usage)
    get_usage_status = _async_twin(UsageClient.get_usage_status)
    record_usage = _async_twin(UsageClient.record_usage)
    get_history = _async_twin(UsageClient.get_history)


class AsyncEntitlementsClient(_AsyncService[EntitlementsClient]):
    """Async ``EntitlementsClient``: same constructor keywords, every call awaitable."""

    _sync_class = EntitlementsClient

    @_keywords_of(EntitlementsClient.__init__)
    def __init__(self, **options: Any) -> None:
        super().__init__(**options)

    ENTITLEMENTS_PREFIX = EntitlementsClient.ENTITLEMENTS_PREFIX
    check_access = _async_twin(EntitlementsClient.check_access)
    get_user_entitlements = _async_twin(EntitlementsClient.get_user_entitlements)
    grant_manual = _async_twin(EntitlementsClient.grant_manual)
    revoke = _async_twin(EntitlementsClient.revoke)
    claim_pending = _async_twin(EntitlementsClient.claim_pending)


class AsyncWhitelistClient(_AsyncService[WhitelistClient]):
    """Async ``WhitelistClient``: same constructor keywords, every call awaitable."""

    _sync_class = WhitelistClient

    @_keywords_of(WhitelistClient.__init__)
    def __init__(self, **options: Any) -> None:
        super().__init__(**options)

    WHITELIST_PREFIX = WhitelistClient.WHITELIST_PREFIX
    check = _async_twin(WhitelistClient.check)
    list = _async_twin(WhitelistClient.list)
    add = _async_twin(WhitelistClient.add)
    update = _async_twin(WhitelistClient.update)
    remove = _async_twin(WhitelistClient.remove)


class AsyncSecureMessagesClient(_AsyncService[SecureMessagesClient]):
    """Async ``SecureMessagesClient``: same constructor keywords, every call awaitable."""

    _sync_class = SecureMessagesClient

    @_keywords_of(SecureMessagesClient.__init__)
    def __init__(self, **options: Any) -> None:
        super().__init__(**options)

    SECURE_MESSAGES_PREFIX = SecureMessagesClient.SECURE_MESSAGES_PREFIX
    create_message = _async_twin(SecureMessagesClient.create_message)
    list_messages = _async_twin(SecureMessagesClient.list_messages)


class AsyncMetricsClient(_AsyncService[MetricsClient]):
    """Async ``MetricsClient``: same constructor keywords, every call awaitable."""

    _sync_class = MetricsClient

    @_keywords_of(MetricsClient.__init__)
    def __init__(self, **options: Any) -> None:
        super().__init__(**options)

    get_prometheus_metrics = _async_twin(MetricsClient.get_prometheus_metrics)
    get_metrics_json = _async_twin(MetricsClient.get_metrics_json)
    health = _async_twin(MetricsClient.health)
    readiness = _async_twin(MetricsClient.readiness)


# =============================================================================
# Webhooks
# =============================================================================


def _signature_header(header: str) -> Tuple[Optional[str], List[str]]:
    """The ``t`` value and the ``v1`` values of a ``t=<unix>,v1=<hex>[,v1=...]`` header."""
    timestamp, signatures = None, []
    for part in header.split(","):
        key, _, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if key == "t" and value:
            timestamp = value
        elif key == "v1" and value:
            signatures.append(value)
    return timestamp, signatures


def _webhook_digest(secret: str, timestamp: str, body: bytes) -> bytes:
    """HMAC-SHA256 of ``<timestamp>.<body>``, the signature SPAPS webhooks carry."""
    import hashlib  # only webhook receivers need them (a few milliseconds of import)
    import hmac

    return hmac.new(secret.encode("utf-8"), timestamp.encode() + b"." + body,
                    hashlib.sha256).digest()


def _same_digest(given: bytes, expected: bytes) -> bool:
    import hmac

    return hmac.compare_digest(given, expected)


def verify_crypto_webhook_signature(*, body: Union[bytes, bytearray, str], signature: str,
                                    secret: str, tolerance_seconds: int = 300) -> bool:
    """Check a crypto webhook's ``t=<unix>,v1=<hex hmac>`` signature header.

    ``body`` must be the raw request body. Several ``v1`` values may be given
    (during a secret rotation); one match suffices. The timestamp must lie
    within ``tolerance_seconds`` of now, in the past or the future, so a
    captured webhook cannot be replayed later. Returns ``True``; every failure
    raises ``WebhookVerificationError`` (a ``ValueError``).
    """
    if not signature:
        raise WebhookVerificationError("missing webhook signature", "MISSING_SIGNATURE")
    if tolerance_seconds <= 0:
        raise ValueError("tolerance_seconds must be positive; replay protection cannot be off")
    timestamp, candidates = _signature_header(signature)
    if timestamp is None or not candidates:
        raise WebhookVerificationError("invalid signature header format", "INVALID_FORMAT")
    if isinstance(body, str):
        raw = body.encode("utf-8")
    elif isinstance(body, (bytes, bytearray)):
        raw = bytes(body)
    else:
        raise ValueError("body must be the raw request body (bytes or str), not parsed JSON")
    expected = _webhook_digest(secret, timestamp, raw)
    matched = False
    for candidate in candidates:
        try:
            matched |= _same_digest(bytes.fromhex(candidate), expected)
        except ValueError:
            continue
    if not matched:
        raise WebhookVerificationError("webhook signature does not match", "INVALID_SIGNATURE")
    if not (timestamp.isascii() and timestamp.isdigit()):
        raise WebhookVerificationError("signature timestamp is not an integer", "INVALID_FORMAT")
    if abs(time.time() - int(timestamp)) > tolerance_seconds:
        raise WebhookVerificationError("signature timestamp outside the tolerance window",
                                       "TIMESTAMP_OUT_OF_TOLERANCE")
    return True


def verify_spaps_webhook(body: Union[bytes, str], signature: str, secret: str, *,
                         max_age_seconds: int = 300,
                         timestamp: Optional[int] = None) -> SpapsWebhookPayload:
    """Verify a SPAPS webhook (header ``X-SPAPS-Signature``) and return its payload.

    The header must be exactly ``t=<digits>,v1=<64 lowercase hex>``. Events
    older than ``max_age_seconds``, or dated more than that into the future
    (clock skew), are rejected before the HMAC is checked. ``timestamp``
    replaces "now" in tests. Failures raise ``WebhookVerificationError`` with
    ``code`` one of ``INVALID_FORMAT``, ``TIMESTAMP_FUTURE``,
    ``SIGNATURE_EXPIRED``, ``INVALID_SIGNATURE``, ``INVALID_JSON``,
    ``INVALID_PAYLOAD``.
    """
    sent, candidates = _signature_header(signature or "")
    if (sent is None or not sent.isascii() or not sent.isdigit() or len(candidates) != 1
            or signature != f"t={sent},v1={candidates[0]}"
            or not re.fullmatch(r"[0-9a-f]{64}", candidates[0])):
        raise WebhookVerificationError("invalid X-SPAPS-Signature format", "INVALID_FORMAT")
    now = int(time.time()) if timestamp is None else timestamp
    if int(sent) - now > max_age_seconds:
        raise WebhookVerificationError("webhook timestamp is in the future", "TIMESTAMP_FUTURE")
    if now - int(sent) > max_age_seconds:
        raise WebhookVerificationError("webhook signature expired", "SIGNATURE_EXPIRED")
    raw = body.encode("utf-8") if isinstance(body, str) else bytes(body)
    if not _same_digest(bytes.fromhex(candidates[0]), _webhook_digest(secret, sent, raw)):
        raise WebhookVerificationError("webhook signature does not match", "INVALID_SIGNATURE")
    try:
        payload = json.loads(raw)
    except ValueError:  # also invalid UTF-8
        raise WebhookVerificationError("webhook body is not JSON", "INVALID_JSON") from None
    try:
        return SpapsWebhookPayload.model_validate(payload)
    except ValueError as exc:
        raise WebhookVerificationError(f"webhook payload invalid: {exc}",
                                       "INVALID_PAYLOAD") from None


def generate_test_signature(payload: Mapping[str, Any], secret: str,
                            timestamp: Optional[int] = None) -> str:
    """Sign ``json.dumps(payload)`` as SPAPS would; returns the header value (for tests)."""
    sent = str(int(time.time()) if timestamp is None else timestamp)
    return f"t={sent},v1={_webhook_digest(secret, sent, json.dumps(payload).encode()).hex()}"


# =============================================================================
# Clients: the whole API behind one object
# =============================================================================

_Sync = TypeVar("_Sync")
_Async = TypeVar("_Async")


class _ServiceSlot(Generic[_Sync, _Async]):
    """One service of the aggregate clients: the sync class for ``SpapsClient``, the async
    one for ``AsyncSpapsClient``, built once per client and shared from then on."""

    def __init__(self, sync: Type[_Sync], async_: Type[_Async], doc: str, *,
                 needs_tokens: bool) -> None:
        self.sync, self.async_, self.needs_tokens = sync, async_, needs_tokens
        self.__doc__ = doc

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, client: None, owner: type) -> _ServiceSlot[_Sync, _Async]: ...

    @overload
    def __get__(self, client: SpapsClient, owner: type) -> _Sync: ...

    @overload
    def __get__(self, client: AsyncSpapsClient, owner: type) -> _Async: ...

    def __get__(self, client: Optional[_Clients], owner: type) -> Any:
        if client is None:
            return self
        return client._service(self)

    def __set__(self, client: _Clients, value: object) -> None:
        raise AttributeError(f"{self.name} is a service of the client; it cannot be replaced")


class _Clients:
    """What ``SpapsClient`` and ``AsyncSpapsClient`` share: their services, one table."""

    _services: Dict[str, Any]

    auth = _ServiceSlot(AuthClient, AsyncAuthClient,
                        "Sign-in, registration, tokens (usable without tokens).",
                        needs_tokens=False)
    sessions = _ServiceSlot(SessionsClient, AsyncSessionsClient,
                            "Sessions; raises ``ValueError`` until tokens are stored.",
                            needs_tokens=True)
    payments = _ServiceSlot(PaymentsClient, AsyncPaymentsClient, "Payments and "
                            "``payments.crypto``; raises ``ValueError`` until tokens are stored.",
                            needs_tokens=True)
    usage = _ServiceSlot(UsageClient, AsyncUsageClient,
                         "Usage metering; raises ``ValueError`` until tokens are stored.",
                         needs_tokens=True)
    secure_messages = _ServiceSlot(
        SecureMessagesClient, AsyncSecureMessagesClient,
        "Secure messages; raises ``ValueError`` until tokens are stored.", needs_tokens=True)
    whitelist = _ServiceSlot(WhitelistClient, AsyncWhitelistClient, "The whitelist (``check`` "
                             "works without tokens; the rest needs them).", needs_tokens=False)
    entitlements = _ServiceSlot(EntitlementsClient, AsyncEntitlementsClient, "Entitlements "
                                "(lookups work without tokens; grants need an admin's).",
                                needs_tokens=False)
    metrics = _ServiceSlot(MetricsClient, AsyncMetricsClient,
                           "Health and metrics (no credentials sent).", needs_tokens=False)

    def _service(self, slot: _ServiceSlot[Any, Any]) -> Any:
        raise NotImplementedError


class SpapsClient(_Clients):
    """The whole SPAPS API behind one object, sharing connections and tokens.

    ``auth`` signs in and stores tokens in ``token_storage`` (in memory unless
    given); the other services use them. Access tokens are refreshed
    automatically shortly before they expire and once after a 401
    (``auto_refresh=False`` turns this off). ``app_info`` (e.g.
    ``"billing-worker/1.4"``) is appended to the User-Agent, so SPAPS and its
    logs can tell your services apart. Use it as a context manager or call
    ``close()``.
    """

    def __init__(
        self, *, base_url: Optional[str] = None, api_key: Optional[str] = None,
        request_timeout: Optional[float] = None, token_storage: Optional[TokenStorage] = None,
        http_client: Optional[RetryClient] = None,
        retry_config: Optional[Union[RetryConfig, Mapping[str, Any]]] = None,
        logging_hooks: Optional[Union[LoggingHooks, Mapping[str, Any]]] = None,
        ssl_context: Optional[ssl.SSLContext] = None, allow_insecure_http: bool = False,
        auto_refresh: bool = True, app_info: Optional[str] = None,
    ) -> None:
        self.settings = Settings(base_url=base_url, api_key=api_key,
                                 request_timeout=request_timeout)
        self.token_storage: TokenStorage = (token_storage if token_storage is not None
                                            else InMemoryTokenStorage())
        if http_client is not None and (
                retry_config is not None or logging_hooks is not None or ssl_context is not None
                or allow_insecure_http or app_info is not None):
            raise ValueError("retry_config, logging_hooks, ssl_context, allow_insecure_http "
                             "and app_info belong to the http_client you pass; configure "
                             "them there")
        self.http_client = http_client or create_http_client(
            settings=self.settings, retry_config=retry_config, logging_hooks=logging_hooks,
            ssl_context=ssl_context, allow_insecure_http=allow_insecure_http, app_info=app_info)
        self._owns_http = http_client is None
        self._tokens = _StoredTokenSource(self.token_storage)
        self._tokens.clock = self.http_client.clock
        self._ctx = _Context(self.http_client, self.http_client.base_url
                             or self.settings.base_url, self.settings.api_key, self._tokens)
        self._services = {}
        if auto_refresh:
            self._tokens.refresh = self._refresh

    def _refresh(self, refresh_token: str, deadline: float) -> StoredTokens:
        self.auth._refresh_within(refresh_token, deadline)
        stored = self._tokens.load()
        if stored is None:
            raise AuthError("token storage lost the refreshed tokens", status_code=500)
        return stored

    def __repr__(self) -> str:
        return f"SpapsClient(base_url={self._ctx.base_url!r})"

    def __enter__(self) -> SpapsClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close pooled connections (only of an HTTP client this object created)."""
        if self._owns_http:
            self.http_client.close()

    def get_tokens(self) -> Optional[StoredTokens]:
        """The stored tokens, or ``None`` (tokens the storage failed to save count)."""
        return self._tokens.load()

    def set_tokens(self, *, access_token: str, refresh_token: Optional[str] = None,
                   token_type: str = "Bearer",  # noqa: S107 - a token type, not a secret
                   expires_in: Optional[int] = None,
                   expires_at: Optional[datetime] = None) -> None:
        """Store tokens obtained elsewhere; ``expires_at`` wins over ``expires_in``."""
        tokens = _tokens_from(access_token, refresh_token, expires_in, token_type)
        if expires_at is not None:
            tokens.expires_at = expires_at
        self._tokens.save(tokens)

    def clear_tokens(self) -> None:
        """Forget the stored tokens."""
        self._tokens.clear()

    def _service(self, slot: _ServiceSlot[Any, Any]) -> Any:
        if slot.needs_tokens and not self._tokens.peek():
            raise ValueError("No access token found: authenticate with client.auth (for "
                             "example sign_in_with_password) or call set_tokens() first")
        service = self._services.get(slot.name)
        if service is None:
            service = self._services.setdefault(slot.name, slot.sync._attached(self._ctx))
        return service


class AsyncSpapsClient(_Clients):
    """The async ``SpapsClient``: the same keywords and services, awaitable calls.

    Calls run in worker threads this client owns, one per pooled connection
    (``RetryClient(pool_maxsize=...)``, 256 by default), over the same keep-alive
    connections; use ``async with`` or ``await aclose()``, which stops them.
    """

    @_keywords_of(SpapsClient.__init__)
    def __init__(self, **options: Any) -> None:
        self._sync = SpapsClient(**options)
        self._runner = _Runner(self._sync.http_client.pool_maxsize)
        self._services = {}

    @property
    def settings(self) -> Settings:
        """Resolved settings."""
        return self._sync.settings

    @property
    def token_storage(self) -> TokenStorage:
        """Where tokens are kept."""
        return self._sync.token_storage

    def __repr__(self) -> str:
        return f"AsyncSpapsClient(base_url={self._sync._ctx.base_url!r})"

    async def __aenter__(self) -> AsyncSpapsClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the worker threads; close pooled connections (only of an HTTP client this
        object created)."""
        self._runner.close()
        self._sync.close()

    def get_tokens(self) -> Optional[StoredTokens]:
        """The stored tokens, or ``None``."""
        return self._sync.get_tokens()

    @_keywords_of(SpapsClient.set_tokens)
    def set_tokens(self, **tokens: Any) -> None:
        """Store tokens obtained elsewhere; ``expires_at`` wins over ``expires_in``."""
        self._sync.set_tokens(**tokens)

    def clear_tokens(self) -> None:
        """Forget the stored tokens."""
        self._sync.clear_tokens()

    def _service(self, slot: _ServiceSlot[Any, Any]) -> Any:
        sync = self._sync._service(slot)  # the same token check as the sync client
        wrapped = self._services.get(slot.name)
        if wrapped is None:
            wrapped = self._services.setdefault(slot.name, slot.async_._wrap(sync, self._runner))
        return wrapped


# =============================================================================
# Command line: python -m spaps_client
# =============================================================================

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_NOT_SIGNED_IN = 0, 1, 2, 3, 4


def main(argv: Optional[List[str]] = None) -> int:
    """Run the operator command line; returns the process exit code.

    Exit codes: 0 success (healthy, ready); 1 SPAPS answered with an error or
    is not healthy/ready; 2 bad usage; 3 SPAPS unreachable (network, TLS,
    timeout); 4 not signed in (no stored tokens, or they were rejected). With
    ``--json`` every outcome, errors included, is one JSON document on stdout.
    """
    import argparse  # only the command line needs it

    parser = argparse.ArgumentParser(
        prog="python -m spaps_client",
        description="Check a SPAPS deployment and the stored sign-in from a shell.",
    )
    parser.add_argument("--base-url", help="SPAPS URL (default: $SPAPS_API_URL)")
    parser.add_argument("--api-key", help="API key (default: $SPAPS_API_KEY)")
    parser.add_argument("--timeout", type=float, help="seconds per call")
    parser.add_argument("--token-file", help="FileTokenStorage path (default: "
                        f"$SPAPS_TOKEN_FILE or {FileTokenStorage.DEFAULT_PATH})")
    parser.add_argument("--allow-insecure-http", action="store_true",
                        help="send credentials over plain http:// to a non-loopback host")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("command", choices=["health", "ready", "version", "whoami", "sessions"])
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return EXIT_OK if exc.code == 0 else EXIT_USAGE
    if args.command == "version":
        _print_result(args.json, {"version": __version__}, f"spaps_client {__version__}")
        return EXIT_OK
    storage = FileTokenStorage(path=args.token_file or os.environ.get("SPAPS_TOKEN_FILE"))
    try:
        client = SpapsClient(base_url=args.base_url, api_key=args.api_key,
                             request_timeout=args.timeout, token_storage=storage,
                             allow_insecure_http=args.allow_insecure_http)
        with client:
            return _run_command(client, storage, args.command, args.json)
    except SpapsTransportError as exc:
        if exc.status_code is not None:  # it answered, in a way that broke HTTP/1.1
            return _print_error(args.json, EXIT_FAILED, str(exc), exc)
        return _print_error(args.json, EXIT_UNREACHABLE, f"SPAPS unreachable: {exc}", exc)
    except (SpapsConfigurationError, ValueError) as exc:
        return _print_error(args.json, EXIT_USAGE, str(exc).replace(
            "allow_insecure_http=True", "--allow-insecure-http"))
    except SpapsError as exc:
        code = EXIT_NOT_SIGNED_IN if exc.status_code == 401 else EXIT_FAILED
        return _print_error(args.json, code, str(exc), exc)


def _run_command(client: SpapsClient, storage: FileTokenStorage, command: str,
                 as_json: bool) -> int:
    if command in ("health", "ready"):
        document = client.metrics.health() if command == "health" else client.metrics.readiness()
        # SPAPS wraps the verdict in "data"; older servers answered it at the top.
        data = document.get("data")
        verdict = data if isinstance(data, dict) else document
        good = (verdict.get("status") in ("healthy", "ok") if command == "health"
                else verdict.get("ready") is True or verdict.get("status") == "ready")
        _print_result(as_json, document, f"{command}: " + ("ok" if good else "NOT OK")
                      + f" {json.dumps(document, sort_keys=True)}")
        return EXIT_OK if good else EXIT_FAILED
    if client.get_tokens() is None:
        problem = (f"{storage.path} holds no readable tokens (damaged, or not a token file); "
                   "sign in again" if os.path.exists(storage.path)
                   else f"no tokens in {storage.path}")
        return _print_error(as_json, EXIT_NOT_SIGNED_IN, f"not signed in: {problem}")
    if command == "whoami":
        user = client.auth.get_current_user()
        _print_result(as_json, user.model_dump(),
                      f"{user.email or user.username or '-'} (id {user.id}, tier {user.tier})")
        return EXIT_OK
    listing = client.sessions.list_sessions()
    current = {s.session_id for s in listing.sessions if s.is_current}
    if not current:  # SPAPS 0.6 lists every session with is_current null
        current = {client.sessions.get_current_session().session_id}
        for session in listing.sessions:
            session.is_current = session.session_id in current
    lines = [f"{s.session_id}{' (current)' if s.is_current else ''} created {s.created_at:%c}"
             for s in listing.sessions]
    total = f"{listing.total} session" + ("" if listing.total == 1 else "s")
    _print_result(as_json, listing.model_dump(), "\n".join([*lines, total]))
    return EXIT_OK


def _print_result(as_json: bool, document: Any, text: str) -> None:
    print(_as_json(document) if as_json else text)


def _print_error(as_json: bool, exit_code: int, message: str,
                 error: Optional[SpapsError] = None) -> int:
    """Report a failure: a JSON document on stdout with ``--json``, else a line on stderr."""
    facts = {"status_code": error.status_code, "error_code": error.error_code,
             "request_id": error.request_id} if error is not None else {}
    if as_json:
        print(_as_json({"error": {"message": message, **facts, "exit_code": exit_code}}))
        return exit_code
    labels = {"status_code": "HTTP", "error_code": "code", "request_id": "request id"}
    shown = [f"{labels[key]} {value}" for key, value in facts.items()
             if value is not None and str(value) not in message]
    print(f"error: {message}" + (f" ({', '.join(shown)})" if shown else ""), file=sys.stderr)
    return exit_code


def _as_json(document: Any) -> str:
    def encode(value: Any) -> Any:
        if isinstance(value, datetime):
            return value.isoformat()
        return str(value)

    return json.dumps(document, default=encode, indent=2)


if __name__ == "__main__":
    raise SystemExit(main())
