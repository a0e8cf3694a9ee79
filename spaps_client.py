"""spaps_client: a zero-dependency Python client for SPAPS.

SPAPS is the Sweet Potato Authentication & Payment Service. This single module
is the whole client: password, magic-link and wallet sign-in, sessions, Stripe
checkouts, crypto invoices, usage metering, secure messages, whitelist and
health checks, with a sync surface (``SpapsClient``) and an async one
(``AsyncSpapsClient``). It imports only the Python standard library (3.9+), so
it can be vendored as one file, installed with ``pip install spaps-stdlib``
or shipped in an AWS Lambda layer.

Version: 0.5.0.   Licence: MIT (the notice is in the LICENSE file of the
``spaps-stdlib`` distribution; keep it next to a vendored copy).   Documentation:
https://pypi.org/project/spaps-stdlib/ and the ``docs/`` directory of the
``spaps-stdlib`` source distribution (docs/api.md is the reference).

Quick start::

    from spaps_client import SpapsClient

    with SpapsClient(base_url="https://spaps.example.com", api_key="...") as spaps:
        spaps.auth.sign_in_with_password(email="a@example.com", password="...")
        print(spaps.sessions.get_current_session().session_id)

Sections, top-down: lazy dataclasses, configuration, errors, transport, models,
token storage, services (sync, then the async classes derived from them),
webhooks, aggregate clients, command line.
"""

from __future__ import annotations

import _thread
import os
import sys
import time
from _collections_abc import Mapping  # collections.abc without importing collections
from abc import ABC, abstractmethod
from datetime import datetime, timedelta, timezone

# ``typing`` costs ~5 ms of import time and annotations are strings here
# (PEP 563), so it is imported for type checkers only; mypy honours this flag.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    import ssl
    import threading
    from concurrent.futures import ThreadPoolExecutor
    from contextlib import AbstractContextManager
    from dataclasses import dataclass as _dataclass
    from dataclasses import field as _field
    from typing import (
        Any,
        Callable,
        ClassVar,
        Coroutine,
        Dict,
        List,
        Optional,
        Tuple,
        Type,
        TypeVar,
        Union,
    )
    from typing import Generic as _GenericBase

    # ParamSpec is 3.10+ (and typing_extensions is not the standard library): checkers that
    # target 3.9 get the plainer signatures of _async_twin and _keywords_of below.
    if sys.version_info >= (3, 10):
        from typing import Concatenate, ParamSpec

        _P = ParamSpec("_P")
    _T = TypeVar("_T")
    _M = TypeVar("_M", bound="_Model")
    _S = TypeVar("_S", bound="_Service")
    _A = TypeVar("_A", bound="_AsyncService[Any]")
else:

    class _GenericBase:
        """Stands in for ``typing.Generic`` at run time: ``Base[X]`` is just ``Base``."""

        def __class_getitem__(cls, item):
            return cls

__version__ = "0.5.0"

__all__ = [
    "__version__",
    # configuration
    "Settings", "RetryConfig", "LoggingHooks", "default_logging_hooks",
    "DEFAULT_BASE_URL", "DEFAULT_API_KEY", "DEFAULT_TIMEOUT",
    # errors
    "SpapsError", "SpapsTransportError", "SpapsTimeoutError", "SpapsConfigurationError",
    "AuthError", "SessionError", "PaymentsError", "CryptoPaymentsError", "UsageError",
    "WhitelistError", "SecureMessagesError", "MetricsError", "WebhookVerificationError",
    "MfaRequiredError", "EntitlementsError",
    # transport
    "HttpRequest", "HttpResponse", "RetryClient", "RetryAsyncClient", "create_http_client",
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
    "RedisTokenStorage", "TokenStorageError",
    # services
    "AuthClient", "SessionsClient", "PaymentsClient", "CryptoPaymentsClient", "UsageClient",
    "WhitelistClient", "SecureMessagesClient", "MetricsClient", "EntitlementsClient",
    "AsyncEntitlementsClient", "AsyncAuthClient", "AsyncSessionsClient", "AsyncPaymentsClient",
    "AsyncCryptoPaymentsClient", "AsyncUsageClient", "AsyncWhitelistClient",
    "AsyncSecureMessagesClient", "AsyncMetricsClient",
    # webhooks
    "verify_crypto_webhook_signature", "verify_spaps_webhook", "generate_test_signature",
    # aggregate clients
    "SpapsClient", "AsyncSpapsClient", "ASYNC_WORKERS",
    # command line
    "main", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_UNREACHABLE", "EXIT_NOT_SIGNED_IN",
]


_REDACTED = "[redacted]"
_USER_AGENT = (
    f"spaps-python/{__version__} (stdlib; Python {sys.version_info[0]}.{sys.version_info[1]})"
)


# =============================================================================
# Lazy dataclasses
# =============================================================================
#
# Settings, configs, tokens and every response model are dataclasses, but
# building ~50 of them (and importing ``dataclasses``, which pulls in
# ``inspect``) would triple the import time that Lambda users pay on every
# cold start. So the classes are declared as dataclasses (type checkers see
# exactly that) and work from their own annotations (``_schema``): they are
# constructed, compared, printed and parsed without the ``dataclasses``
# module. The first time anything introspects one (``dataclasses.fields()``,
# ``is_dataclass()``, ``asdict()``), it is turned into the real dataclass.

if not TYPE_CHECKING:

    def _dataclass(**options):
        def mark(cls):
            cls._dataclass_options = options
            return cls

        return mark

    class _FieldLater:
        __slots__ = ("options",)

        def __init__(self, options):
            self.options = options

    def _field(**options):
        return _FieldLater(options)


_DATACLASS_ATTRIBUTES = frozenset({"__dataclass_fields__", "__dataclass_params__",
                                   "__match_args__"})
_MATERIALIZE_LOCK = _thread.RLock()
_NO_DEFAULT: Any = object()


class _FieldInfo:
    """One declared field: name, annotation text, default or factory, alias, repr."""

    __slots__ = ("alias", "aliases", "annotation", "default", "factory", "name", "repr")

    def __init__(self, name: str, annotation: str, declared: Any) -> None:
        self.name = name
        self.annotation = annotation
        options = declared.options if type(declared).__name__ == "_FieldLater" else (
            {} if declared is _NO_DEFAULT else {"default": declared})
        self.default = options.get("default", _NO_DEFAULT)
        self.factory: Optional[Callable[[], Any]] = options.get("default_factory")
        # "alias" is the JSON name (a string) or several accepted names, the first preferred.
        names = options.get("metadata", {}).get("alias") or ()
        self.aliases: Tuple[str, ...] = (names,) if isinstance(names, str) else tuple(names)
        self.alias: Optional[str] = self.aliases[0] if self.aliases else None
        self.repr: bool = options.get("repr", True)


def _schema(cls: type) -> Tuple[_FieldInfo, ...]:
    """The fields ``cls`` declares, in order, read from its annotations once."""
    schema: Optional[Tuple[_FieldInfo, ...]] = cls.__dict__.get("_spaps_schema")
    if schema is None:
        with _MATERIALIZE_LOCK:  # read the declarations before materializing can change them
            schema = cls.__dict__.get("_spaps_schema")
            if schema is None:
                # The class's own annotations (getattr alone may see a base's on 3.9; the
                # fallback serves Pythons that build annotations lazily).
                annotations = (cls.__dict__.get("__annotations__")  # noqa: RUF063
                               or getattr(cls, "__annotations__", {}))
                schema = tuple(
                    _FieldInfo(name, str(text), cls.__dict__.get(name, _NO_DEFAULT))
                    for name, text in annotations.items()
                )
                type.__setattr__(cls, "_spaps_schema", schema)
    return schema


class _LazyDataclassMeta(type):
    if not TYPE_CHECKING:

        def __getattr__(cls, name):
            # Only reached for attributes the class lacks: dataclass introspection.
            if name in _DATACLASS_ATTRIBUTES and "_dataclass_options" in cls.__dict__:
                _materialize(cls)
                return type.__getattribute__(cls, name)
            raise AttributeError(name)


def _materialize(cls: type) -> None:
    """Make ``cls`` the dataclass it was declared as (once, thread-safely)."""
    if "__dataclass_fields__" in cls.__dict__:
        return
    import dataclasses

    with _MATERIALIZE_LOCK:
        if "__dataclass_fields__" in cls.__dict__:
            return
        _schema(cls)
        for name, value in list(vars(cls).items()):
            if type(value).__name__ == "_FieldLater":
                setattr(cls, name, dataclasses.field(**value.options))
        dataclasses.dataclass(cls, **cls.__dict__["_dataclass_options"])


class _LazyDataclass(metaclass=_LazyDataclassMeta):
    """Base of the lazily built dataclasses: ``__init__``, ``repr`` and ``==`` by field."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        cls = type(self)
        schema = _schema(cls)
        if len(args) > len(schema):
            raise TypeError(f"{cls.__name__}() takes {len(schema)} positional arguments "
                            f"but {len(args)} were given")
        for info, value in zip(schema, args):
            if info.name in kwargs:
                raise TypeError(f"{cls.__name__}() got multiple values for {info.name!r}")
            kwargs[info.name] = value
        for info in schema:
            if info.name in kwargs:
                value = kwargs.pop(info.name)
            elif info.factory is not None:
                value = info.factory()
            elif info.default is not _NO_DEFAULT:
                value = info.default
            else:
                raise TypeError(f"{cls.__name__}() missing required argument {info.name!r}")
            object.__setattr__(self, info.name, value)
        if kwargs:
            raise TypeError(f"{cls.__name__}() got unexpected keyword arguments "
                            f"{sorted(kwargs)!r}")
        post_init = getattr(self, "__post_init__", None)
        if post_init is not None:
            post_init()

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{info.name}={getattr(self, info.name)!r}" for info in _schema(type(self))
            if info.repr
        )
        return f"{type(self).__name__}({shown})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, info.name) == getattr(other, info.name)
                   for info in _schema(type(self)))


# =============================================================================
# Configuration
# =============================================================================

DEFAULT_BASE_URL = "http://localhost:3300"
"""Where a client points when neither ``base_url`` nor ``SPAPS_API_URL`` is given."""

DEFAULT_API_KEY = "test_key_local_dev_only"
"""The development API key used when neither ``api_key`` nor ``SPAPS_API_KEY`` is given."""

DEFAULT_TIMEOUT = 10.0
"""Seconds allowed for one call, retries included, unless configured otherwise."""


@_dataclass(repr=False, eq=False)
class Settings(_LazyDataclass):
    """Connection settings, read from arguments first and ``SPAPS_*`` variables second.

    An explicit argument (anything but ``None``) wins over the environment; an
    unset or empty variable falls back to the defaults. The API key never
    appears in ``repr()``.
    """

    base_url: str = ""
    api_key: str = _field(default="", repr=False)
    request_timeout: float = DEFAULT_TIMEOUT

    def __init__(
        self,
        *,
        base_url: Optional[str] = None,
        api_key: Optional[str] = None,
        request_timeout: Optional[float] = None,
    ) -> None:
        self.base_url = base_url if base_url is not None else (
            os.environ.get("SPAPS_API_URL") or DEFAULT_BASE_URL
        )
        self.api_key = api_key if api_key is not None else (
            os.environ.get("SPAPS_API_KEY") or DEFAULT_API_KEY
        )
        if request_timeout is None:
            raw = os.environ.get("SPAPS_REQUEST_TIMEOUT")
            try:
                request_timeout = float(raw) if raw else DEFAULT_TIMEOUT
            except ValueError:
                raise SpapsConfigurationError(
                    f"SPAPS_REQUEST_TIMEOUT must be a number of seconds, got {raw!r}") from None
        self.request_timeout = float(request_timeout)


@_dataclass(repr=False, eq=False)
class RetryConfig(_LazyDataclass):
    """How failed calls are retried. Retries are on by default (``RetryConfig()``).

    A request is sent again only when that cannot duplicate its effect: the
    method is listed in ``methods`` (idempotent by HTTP), the call carries an
    idempotency key, the connection could not be established, or the server
    answered 429 (it did not process the request). A ``Retry-After`` header is
    honoured up to ``max_retry_after`` seconds; a longer one fails the call at
    once with the error's ``retry_after`` set. ``retry_quota`` bounds retries
    across all calls of one client (a token bucket as in botocore's standard
    mode) so a dead server is not hammered by every caller.
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

    def get_backoff(self, attempt: int) -> float:
        """Seconds to wait before attempt number ``attempt`` (1-based)."""
        if attempt <= 1:
            return 0.0
        delay = min(self.max_backoff, self.backoff_factor * (2.0 ** (attempt - 2)))
        if self.jitter and delay > 0:
            import random

            # Equal jitter: spread the retries without ever collapsing to zero.
            delay = delay / 2 + random.uniform(0, delay / 2)  # noqa: S311 - not crypto
        return delay


@_dataclass(repr=False, eq=False)
class LoggingHooks(_LazyDataclass):
    """Callbacks observing every HTTP exchange; each field is optional.

    ``on_request(request)`` once per call; ``on_response(request, response,
    elapsed, attempt)`` for every attempt that got an answer; ``on_error(request,
    exc, attempt)`` for every attempt that raised; ``on_retry(request,
    attempt)`` before attempt ``attempt`` (>= 2); ``on_backoff(request, delay,
    attempt)`` before sleeping ``delay`` seconds; ``on_give_up(request, reason,
    attempt)`` when a retryable failure is not retried. Requests and responses
    handed to hooks never contain credentials. A hook that raises is reported
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
    import logging

    logger = logging.getLogger("spaps_client.http")

    def on_request(request: HttpRequest) -> None:
        logger.debug("HTTP request", extra={"method": request.method, "url": request.url})

    def on_response(
        request: HttpRequest, response: HttpResponse, elapsed: float, attempt: int
    ) -> None:
        logger.info(
            "HTTP response",
            extra={
                "method": request.method, "url": request.url, "status": response.status_code,
                "elapsed": elapsed, "attempt": attempt, "request_id": response.request_id,
            },
        )

    def on_error(request: HttpRequest, exc: Exception, attempt: int) -> None:
        logger.warning(
            "HTTP error",
            extra={"method": request.method, "url": request.url, "error": repr(exc),
                   "attempt": attempt},
        )

    def on_retry(request: HttpRequest, attempt: int) -> None:
        logger.debug(
            "HTTP retry", extra={"method": request.method, "url": request.url, "attempt": attempt}
        )

    def on_backoff(request: HttpRequest, delay: float, attempt: int) -> None:
        logger.debug(
            "HTTP backoff",
            extra={"method": request.method, "url": request.url, "delay": delay,
                   "attempt": attempt},
        )

    def on_give_up(request: HttpRequest, reason: str, attempt: int) -> None:
        logger.warning(
            "HTTP give up",
            extra={"method": request.method, "url": request.url, "reason": reason,
                   "attempt": attempt},
        )

    return LoggingHooks(on_request, on_response, on_error, on_retry, on_backoff, on_give_up)


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
    (an ``HttpResponse`` without body, or ``None``); ``retry_after`` (seconds
    the server asked to wait, if any); ``retryable`` (whether sending the same
    request again later is safe and may succeed); ``details`` (the server's
    ``error.details`` object, e.g. ``{"fields": {"email": "..."}}`` for a
    ``VALIDATION_ERROR``; empty when it sent none). ``str(error)`` is the message.
    """

    _MAX_MESSAGE = 500

    def __init__(
        self,
        message: str,
        *,
        status_code: Optional[int] = None,
        error_code: Optional[str] = None,
        response: Optional[HttpResponse] = None,
        request_id: Optional[str] = None,
        retry_after: Optional[float] = None,
        retryable: Optional[bool] = None,
        details: Optional[Dict[str, Any]] = None,
    ) -> None:
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
        if retryable is None:
            retryable = status_code in (429, 502, 503, 504)
        self.retryable = retryable
        self.details: Dict[str, Any] = details or {}

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.message!r}, status_code={self.status_code!r}, "
            f"error_code={self.error_code!r}, request_id={self.request_id!r})"
        )


class SpapsTransportError(SpapsError):
    """The request could not be completed: DNS, connect, TLS, reset or protocol failure."""

    def __init__(self, message: str, *, retryable: bool = True, **kwargs: Any) -> None:
        super().__init__(message, retryable=retryable, **kwargs)


class SpapsTimeoutError(SpapsTransportError):
    """The call did not complete within its time budget."""


class SpapsConfigurationError(SpapsError, ValueError):
    """The client is configured in a way that would be unsafe or cannot work (a bad base URL,
    credentials over plain HTTP to a remote host, a closed client). Also a ``ValueError``."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


class AuthError(SpapsError):
    """A call of the Auth service failed (also raised when a token refresh fails)."""


class MfaRequiredError(AuthError):
    """The password was right and the account asks for a second factor.

    Complete the sign-in with ``auth.verify_mfa(challenge_id=error.challenge_id,
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


class WebhookVerificationError(SpapsError, ValueError):
    """A webhook's signature, timestamp or payload is not acceptable; see ``code``.

    Also a ``ValueError``, which is what the reference helper raised.
    """

    def __init__(self, message: str, code: Optional[str] = None) -> None:
        super().__init__(message, error_code=code, retryable=False)
        self.code = code


# =============================================================================
# Transport
# =============================================================================


class HttpRequest:
    """A request as hooks and errors see it: credentials redacted, body omitted.

    Attributes: ``method``, ``url`` (personal data in the query redacted),
    ``headers`` (credentials redacted), ``idempotency_key``.
    """

    __slots__ = ("_headers", "_raw_headers", "_raw_url", "_url", "idempotency_key", "method")

    def __init__(
        self, method: str, url: str, headers: Mapping[str, str],
        idempotency_key: Optional[str] = None,
    ) -> None:
        self.method = method
        self.idempotency_key = idempotency_key
        # Redaction happens when someone looks, so calls without hooks or errors skip it.
        self._raw_url = url
        self._raw_headers = headers
        self._url: Optional[str] = None
        self._headers: Optional[Dict[str, str]] = None

    @property
    def url(self) -> str:
        """The URL, with query values that may be personal data redacted."""
        if self._url is None:
            self._url = _redact_url(self._raw_url)
        return self._url

    @property
    def headers(self) -> Dict[str, str]:
        """The request headers, credentials redacted."""
        if self._headers is None:
            self._headers = _redact_headers(self._raw_headers)
        return self._headers

    def __repr__(self) -> str:
        return f"<HttpRequest {self.method} {self.url}>"


class HttpResponse:
    """A response as hooks and errors see it: status, headers, timing; no body.

    Attributes: ``method``, ``url`` (redacted as in ``HttpRequest``),
    ``status_code``, ``headers`` (lower-case names; cookies redacted),
    ``elapsed`` (seconds), ``request_id``.
    """

    __slots__ = ("_headers", "_raw_headers", "_request", "elapsed", "method", "status_code")

    def __init__(self, method: str, request: HttpRequest, status_code: int,
                 headers: Mapping[str, str], elapsed: float) -> None:
        self.method = method
        self.status_code = status_code
        self.elapsed = elapsed
        self._request = request
        self._raw_headers = headers
        self._headers: Optional[Dict[str, str]] = None

    @property
    def url(self) -> str:
        """The URL of the request this answers (redacted)."""
        return self._request.url

    @property
    def headers(self) -> Dict[str, str]:
        """Response headers with lower-case names, cookies redacted."""
        if self._headers is None:
            self._headers = _redact_headers(self._raw_headers)
        return self._headers

    @property
    def request_id(self) -> Optional[str]:
        """The server's ``x-request-id`` header, if any."""
        return self._raw_headers.get("x-request-id") or None

    def __repr__(self) -> str:
        return f"<HttpResponse {self.status_code} {self.method} {self.url}>"


class _Result:
    """A complete response as the service layer needs it (body included)."""

    __slots__ = ("body", "headers", "public", "status")

    def __init__(self, status: int, headers: Dict[str, str], body: Optional[bytes],
                 public: HttpResponse) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.public = public


_SECRET_HEADERS = frozenset(
    {"authorization", "x-api-key", "x-recon-token", "proxy-authorization", "cookie",
     "set-cookie"}
)
# Query parameters whose values are identifiers, not personal data, and help debugging.
_PLAIN_QUERY_KEYS = frozenset(
    {"limit", "offset", "starting_after", "period", "format", "feature", "feature_key", "tier",
     "start_date", "end_date", "cursor", "status", "active", "category", "entitlement_key",
     "resource_type", "include_expired", "include_revoked"}
)


def _redact_headers(headers: Mapping[str, str]) -> Dict[str, str]:
    return {
        name: (_REDACTED if name.lower() in _SECRET_HEADERS else value)
        for name, value in headers.items()
    }


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


class _NotSent(Exception):
    """The request provably never reached the server (connection not established)."""


def _is_loopback(host: str) -> bool:
    host = host.lower().rstrip(".")
    if host in ("localhost", "::1") or host.endswith(".localhost"):
        return True
    octets = host.split(".")
    return len(octets) == 4 and octets[0] == "127" and all(o.isdigit() for o in octets)


class _Origin:
    """Scheme, host and port of a URL; the key connections are pooled under."""

    __slots__ = ("host", "key", "port", "scheme")

    def __init__(self, scheme: str, host: str, port: int) -> None:
        self.scheme = scheme
        self.host = host
        self.port = port
        self.key = (scheme, host, port)

    @classmethod
    def parse(cls, url: str) -> Tuple[_Origin, str]:
        """Split an absolute URL into its origin and request target (path + query)."""
        scheme, sep, rest = url.partition("://")
        scheme = scheme.lower()
        if not sep or scheme not in ("http", "https"):
            raise SpapsConfigurationError(f"not an http(s) URL: {_redact_url(url)!r}")
        authority, slash, target = rest.partition("/")
        target = "/" + target if slash else "/"
        authority = authority.rsplit("@", 1)[-1]
        host, port_text = authority, ""
        if authority.startswith("["):
            end = authority.find("]")
            host, port_text = authority[1:end], authority[end + 2:]
        elif ":" in authority:
            host, port_text = authority.rsplit(":", 1)
        if not host:
            raise SpapsConfigurationError(f"URL has no host: {_redact_url(url)!r}")
        try:
            port = int(port_text) if port_text else (443 if scheme == "https" else 80)
        except ValueError:
            raise SpapsConfigurationError(f"URL has a bad port: {_redact_url(url)!r}") from None
        return cls(scheme, host, port), target


def _proxy_for(origin: _Origin) -> Optional[str]:
    """The proxy URL for ``origin``, read as ``urllib.request`` reads it, or ``None``."""
    if sys.platform not in ("darwin", "win32") and not any(
        name.lower().endswith("_proxy") for name in os.environ
    ):
        return None  # spares importing urllib.request (and email) on the common path
    import urllib.request

    proxy = urllib.request.getproxies().get(origin.scheme)
    if not proxy or urllib.request.proxy_bypass(f"{origin.host}:{origin.port}"):
        return None
    if "://" not in proxy:
        proxy = "http://" + proxy
    return proxy


class _Connection:
    """One HTTP/1.1 connection: a socket and a buffered reader over it."""

    __slots__ = ("host_header", "proxy_headers", "reader", "sock")

    def __init__(self, sock: socket.socket, host_header: str,
                 proxy_headers: Optional[Dict[str, str]]) -> None:
        self.sock = sock
        self.reader = _Reader(sock)
        self.host_header = host_header
        # Plain-http requests through a proxy go in absolute form with the proxy's credentials.
        self.proxy_headers = proxy_headers

    def close(self) -> None:
        self.sock.close()


class _ConnectionPool:
    """Keep-alive HTTP/1.1 connections per origin, shared safely by many threads.

    Each connection is used by one thread at a time: taken from the idle list,
    used for one exchange, and put back only if the response was read to the
    end and the server did not ask to close.
    """

    def __init__(self, ssl_context: Optional[ssl.SSLContext], maxsize: int) -> None:
        self._ssl_context = ssl_context
        self._maxsize = maxsize
        self._idle: Dict[Tuple[str, str, int], List[_Connection]] = {}
        self._lock = _thread.allocate_lock()
        self._closed = False

    def acquire(self, origin: _Origin, timeout: float) -> _Connection:
        """A connection to ``origin``: an idle one that is still open, else a new one."""
        with self._lock:
            if self._closed:
                raise SpapsConfigurationError("the client is closed")
            idle = self._idle.get(origin.key)
            while idle:
                conn = idle.pop()
                if _still_open(conn.sock):
                    conn.sock.settimeout(timeout)
                    return conn
                conn.close()
        return self._connect(origin, timeout)

    def release(self, origin: _Origin, conn: _Connection) -> None:
        with self._lock:
            idle = self._idle.setdefault(origin.key, [])
            if not self._closed and len(idle) < self._maxsize:
                idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pools, self._idle = list(self._idle.values()), {}
        for idle in pools:
            for conn in idle:
                conn.close()

    def _connect(self, origin: _Origin, timeout: float) -> _Connection:
        """Open a connection (through a proxy if configured); failures here are ``_NotSent``."""
        import socket

        proxy = _proxy_for(origin)
        target = _Origin.parse(proxy)[0] if proxy else origin
        sock = None
        try:
            sock = socket.create_connection((target.host, target.port), timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if origin.scheme == "https":
                if proxy:
                    _open_tunnel(sock, origin, _proxy_auth(proxy))
                sock = self._tls_context().wrap_socket(sock, server_hostname=origin.host)
        except (OSError, _BadResponse) as exc:
            if sock is not None:
                sock.close()
            raise _NotSent(exc) from exc
        default_port = 443 if origin.scheme == "https" else 80
        host = f"[{origin.host}]" if ":" in origin.host else origin.host
        host_header = host if origin.port == default_port else f"{host}:{origin.port}"
        proxy_headers = _proxy_auth(proxy) if proxy and origin.scheme == "http" else None
        return _Connection(sock, host_header, proxy_headers)

    def _tls_context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            import ssl

            # The system trust store; OpenSSL also honours SSL_CERT_FILE / SSL_CERT_DIR.
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context


class _BadResponse(Exception):
    """The server broke HTTP/1.1 (bad status line, bad framing, early close)."""


def _open_tunnel(sock: socket.socket, origin: _Origin, headers: Dict[str, str]) -> None:
    """Ask an HTTP proxy for a CONNECT tunnel to ``origin``."""
    authority = f"[{origin.host}]:{origin.port}" if ":" in origin.host else (
        f"{origin.host}:{origin.port}")
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    reader = _Reader(sock)
    reader.deadline = time.monotonic() + (sock.gettimeout() or DEFAULT_TIMEOUT)
    status, _headers, _close = _read_head(reader)
    if status != 200 or reader.buffer:  # TLS must start right after the proxy's answer
        raise _BadResponse(f"proxy refused the tunnel to {authority} (HTTP {status})")


def _proxy_auth(proxy: str) -> Dict[str, str]:
    userinfo = proxy.partition("://")[2].split("/", 1)[0]
    if "@" not in userinfo:
        return {}
    import base64
    from urllib.parse import unquote

    raw = unquote(userinfo.rsplit("@", 1)[0]).encode()
    return {"Proxy-Authorization": "Basic " + base64.b64encode(raw).decode()}


def _still_open(sock: socket.socket) -> bool:
    """Whether an idle keep-alive connection is still usable.

    A server may close a connection while it sits idle in the pool; the socket
    then reads as end-of-file. Detecting that here means the request goes out
    on a fresh connection and provably never reached the closed one.
    """
    import select

    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    if not readable:
        return True
    # Readable while idle: EOF, stray bytes, or TLS housekeeping (session tickets).
    try:
        sock.setblocking(False)
        try:
            data = sock.recv(1)
        finally:
            sock.setblocking(True)
    except BlockingIOError:
        return True
    except OSError as exc:
        return type(exc).__name__ == "SSLWantReadError"
    del data  # end-of-file or bytes nobody asked for: either way the connection is unusable
    return False


_MAX_HEAD = 65536


class _Reader:
    """Buffered reads from a socket that honour one deadline for the whole response.

    A socket timeout alone bounds each ``recv``; a server trickling a byte at a
    time could then hold a call forever. Each read here gets only the time
    left until ``deadline``.
    """

    __slots__ = ("buffer", "deadline", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.deadline = 0.0

    def fill(self) -> bool:
        """Read more into the buffer; ``False`` at end of stream."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the response did not arrive within the call's time budget")
        self.sock.settimeout(remaining)
        chunk = self.sock.recv(65536)
        if not chunk:
            return False
        self.buffer += chunk
        return True

    def read_head(self) -> bytes:
        """Everything up to the blank line ending a header block."""
        start = 0
        while True:
            end = self.buffer.find(b"\r\n\r\n", start)
            if end >= 0:
                head, self.buffer = self.buffer[:end], self.buffer[end + 4:]
                return head
            if len(self.buffer) > _MAX_HEAD:
                raise _BadResponse("the response headers are too long")
            start = max(0, len(self.buffer) - 3)
            if not self.fill():
                raise _BadResponse(
                    "the server closed the connection without answering" if not self.buffer
                    else "the response headers are cut short"
                )

    def read(self, size: int) -> bytes:
        """Exactly ``size`` bytes, or fewer if the stream ends first."""
        if len(self.buffer) < size:
            parts = [self.buffer]
            have = len(self.buffer)
            self.buffer = b""
            while have < size and self.fill():
                parts.append(self.buffer)
                have += len(self.buffer)
                self.buffer = b""
            self.buffer = b"".join(parts)
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def read_line(self) -> bytes:
        """One CRLF-terminated line (for chunked bodies), without the line break."""
        while True:
            end = self.buffer.find(b"\r\n")
            if end >= 0:
                line, self.buffer = self.buffer[:end], self.buffer[end + 2:]
                return line
            if len(self.buffer) > _MAX_HEAD or not self.fill():
                raise _BadResponse("a chunked body is malformed or cut short")

    def read_to_end(self, limit: int) -> Optional[bytes]:
        """Everything until the server closes, or ``None`` beyond ``limit`` bytes."""
        while len(self.buffer) <= limit and self.fill():
            pass
        data, self.buffer = self.buffer, b""
        return data if len(data) <= limit else None


def _read_head(reader: _Reader) -> Tuple[int, Dict[str, str], bool]:
    """Read a status line and headers, skipping interim 1xx answers.

    Returns the status, the headers (names lower-cased, repeats joined with
    ", ") and whether the server will close the connection afterwards.
    """
    while True:
        lines = reader.read_head().decode("latin-1").split("\r\n")
        parts = lines[0].split(None, 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise _BadResponse(f"bad status line {lines[0][:80]!r}")
        status = int(parts[1])
        headers: Dict[str, str] = {}
        name = ""
        for line in lines[1:]:
            if line[:1] in (" ", "\t") and name:  # an obsolete folded continuation line
                headers[name] += " " + line.strip()
                continue
            name, colon, value = line.partition(":")
            if not colon:
                raise _BadResponse(f"bad header line {line[:80]!r}")
            name = name.strip().lower()
            value = value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        if 100 <= status < 200:
            continue  # 100 Continue and friends precede the real answer
        connection = headers.get("connection", "").lower()
        will_close = "close" in connection or (
            parts[0] == "HTTP/1.0" and "keep-alive" not in connection
        )
        return status, headers, will_close


def _read_response_body(reader: _Reader, method: str, status: int, headers: Dict[str, str]
                        ) -> Tuple[Optional[bytes], bool]:
    """The body (``None`` when larger than ``_MAX_BODY``) and whether it ended the connection."""
    if method == "HEAD" or status in (204, 304):
        return b"", False
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return _read_chunked(reader), False
    length_text = headers.get("content-length")
    if length_text is None:  # the body runs until the server closes the connection
        return reader.read_to_end(_MAX_BODY), True
    values = {value.strip() for value in length_text.split(",")}  # repeats must agree
    single = values.pop() if len(values) == 1 else ""
    if not single.isdigit():
        raise _BadResponse(f"bad or conflicting Content-Length {length_text[:40]!r}")
    length = int(single)
    if length > _MAX_BODY:
        return None, True
    data = reader.read(length)
    if len(data) != length:
        raise _BadResponse(f"the body was cut short ({len(data)} of {length} bytes)")
    return data, False


def _read_chunked(reader: _Reader) -> Optional[bytes]:
    chunks: List[bytes] = []
    size = 0
    while True:
        line = reader.read_line()
        try:
            length = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise _BadResponse(f"bad chunk size line {line[:40]!r}") from None
        if length == 0:
            while reader.read_line():
                pass  # trailer fields are not used
            return b"".join(chunks)
        size += length
        if size > _MAX_BODY:
            return None
        chunk = reader.read(length)
        if len(chunk) != length or reader.read_line():
            raise _BadResponse("a chunk of the body was cut short")
        chunks.append(chunk)


class _RetryQuota:
    """A token bucket that bounds retries across all calls of one client."""

    RETRY_COST = 5
    TIMEOUT_COST = 10

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._level = capacity
        self._lock = _thread.allocate_lock()

    def take(self, cost: int) -> bool:
        with self._lock:
            if self._level < cost:
                return False
            self._level -= cost
            return True

    def give_back(self, amount: int) -> None:
        with self._lock:
            self._level = min(self._capacity, self._level + amount)


_NO_BODY: Any = object()
_MAX_BODY = 16 * 1024 * 1024


class RetryClient:
    """The HTTP client every service uses: pooled keep-alive connections and retries.

    One instance may be shared by many threads. ``base_url`` is used by
    ``create_http_client`` users and by aggregate clients that receive this
    client through ``http_client=``; services send absolute URLs. ``timeout``
    is the budget for one call, retries and back-off included.
    """

    def __init__(
        self,
        *,
        base_url: str = "",
        timeout: float = DEFAULT_TIMEOUT,
        retry_config: Optional[Union[RetryConfig, Mapping[str, Any]]] = None,
        logging_hooks: Optional[Union[LoggingHooks, Mapping[str, Any]]] = None,
        ssl_context: Optional[ssl.SSLContext] = None,
        allow_insecure_http: bool = False,
        pool_maxsize: int = 64,
        app_info: Optional[str] = None,
    ) -> None:
        if not timeout or timeout <= 0:
            raise ValueError("timeout must be a positive number of seconds")
        if app_info is not None and (not app_info.strip() or not app_info.isprintable()):
            raise ValueError("app_info must be printable text such as 'billing-worker/1.4'")
        self.user_agent = f"{_USER_AGENT} {app_info.strip()}" if app_info else _USER_AGENT
        self.base_url = base_url.rstrip("/")
        if self.base_url:
            _Origin.parse(self.base_url)  # a bad URL fails here, not on the first call
        self.timeout = float(timeout)
        self.retry_config = _coerce_config(retry_config, RetryConfig) or RetryConfig()
        self.logging_hooks = _coerce_config(logging_hooks, LoggingHooks) or LoggingHooks()
        self.allow_insecure_http = allow_insecure_http
        self._pool = _ConnectionPool(ssl_context, pool_maxsize)
        self._origins: Dict[str, Tuple[_Origin, bool]] = {}
        self._quota = _RetryQuota(self.retry_config.retry_quota)

    def close(self) -> None:
        """Close every pooled connection; later calls fail."""
        self._pool.close()

    def __enter__(self) -> RetryClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: Optional[Mapping[str, str]] = None,
        body: Optional[bytes] = None,
        timeout: Optional[float] = None,
        idempotency_key: Optional[str] = None,
    ) -> _Result:
        """Send one call (with its retries) and return the final response, body read."""
        if url.startswith("/"):
            url = self.base_url + url
        all_headers = {"User-Agent": self.user_agent}
        if headers:
            all_headers.update(headers)
        if idempotency_key:
            all_headers["X-Idempotency-Key"] = idempotency_key
        if body is not None:
            all_headers.setdefault("Content-Type", "application/json")
        elif method in ("POST", "PUT", "PATCH"):
            all_headers["Content-Length"] = "0"
        public = HttpRequest(method, url, all_headers, idempotency_key)
        origin, target = self._resolve(url, all_headers)
        hooks = self.logging_hooks
        _fire(hooks.on_request, public)
        budget = float(timeout) if timeout else self.timeout
        deadline = time.monotonic() + budget
        outer = getattr(_CALL_BUDGET, "deadline", None)
        if outer is not None and outer < deadline:  # part of a larger call: share its budget
            deadline = outer
        config = self.retry_config
        attempt = 1
        while True:
            remaining = deadline - time.monotonic()
            started = time.monotonic()
            try:
                if remaining <= 0:
                    raise SpapsTimeoutError(f"{method} {public.url} timed out after {budget:g}s")
                result = self._send_following_redirects(method, origin, target, all_headers,
                                                         body, deadline, public)
            except _NotSent as exc:
                error: SpapsError = _transport_error(exc.args[0], public, sent=False)
                may_replay = error.retryable  # False only for permanent failures (certificates)
            except SpapsTransportError as exc:  # the request may have reached the server
                error = exc
                may_replay = error.retryable = config.is_retryable(public, None)
            except SpapsError as exc:  # e.g. the client was closed
                error, may_replay = exc, False
            else:
                elapsed = time.monotonic() - started
                _fire(hooks.on_response, public, result.public, elapsed, attempt)
                if not config.is_retryable(public, result.public):
                    self._quota.give_back(1 if attempt == 1 else _RetryQuota.RETRY_COST)
                    return result
                retry_after = _parse_retry_after(result.headers.get("retry-after"))
                if retry_after is not None and retry_after > config.max_retry_after:
                    _fire(hooks.on_give_up, public, "retry-after too long", attempt)
                    return result
                delay = config.get_backoff(attempt + 1) if retry_after is None else retry_after
                if not self._may_retry(public, attempt, delay, deadline, _RetryQuota.RETRY_COST):
                    return result
                attempt += 1
                continue
            _fire(hooks.on_error, public, error, attempt)
            if not may_replay:
                if error.retryable is False and isinstance(error, SpapsTransportError):
                    _fire(hooks.on_give_up, public, "not safe to send again", attempt)
                raise error
            delay = config.get_backoff(attempt + 1)
            cost = (_RetryQuota.TIMEOUT_COST if isinstance(error, SpapsTimeoutError)
                    else _RetryQuota.RETRY_COST)
            if not self._may_retry(public, attempt, delay, deadline, cost):
                raise error
            attempt += 1

    def _may_retry(
        self, public: HttpRequest, attempt: int, delay: float, deadline: float, cost: int
    ) -> bool:
        """Decide on one more attempt, sleep the back-off, and report through hooks."""
        hooks = self.logging_hooks
        if attempt >= self.retry_config.max_attempts:
            reason = "attempts exhausted"
        elif time.monotonic() + delay >= deadline:
            reason = "deadline reached"
        elif not self._quota.take(cost):
            reason = "retry quota exhausted"
        else:
            if delay > 0:
                _fire(hooks.on_backoff, public, delay, attempt + 1)
                time.sleep(delay)
            _fire(hooks.on_retry, public, attempt + 1)
            return True
        _fire(hooks.on_give_up, public, reason, attempt)
        return False

    def _resolve(self, url: str, headers: Mapping[str, str]) -> Tuple[_Origin, str]:
        """Split ``url`` into origin and target; refuse credentials over remote plain HTTP.

        Origins are parsed once per client: every call to the same SPAPS reuses the result.
        """
        authority_end = url.find("/", url.find("://") + 3)
        prefix, target = (url, "/") if authority_end < 0 else (
            url[:authority_end], url[authority_end:])
        known = self._origins.get(prefix)
        if known is None:
            origin = _Origin.parse(prefix)[0]
            known = self._origins[prefix] = (
                origin, origin.scheme == "http" and not _is_loopback(origin.host))
        origin, plain_and_remote = known
        if plain_and_remote and not self.allow_insecure_http and any(
            name.lower() in ("authorization", "x-api-key") for name in headers
        ):
            raise SpapsConfigurationError(
                f"refusing to send credentials over plain HTTP to {origin.host}; use https:// "
                "or pass allow_insecure_http=True if this network is trusted"
            )
        return origin, target

    def _send_following_redirects(
        self, method: str, origin: _Origin, target: str, headers: Dict[str, str],
        body: Optional[bytes], deadline: float, public: HttpRequest,
    ) -> _Result:
        """Send once, following same-origin 307/308 redirects (method and body kept).

        Every hop shares the one ``deadline``, so redirects cannot stretch a call.
        """
        for _ in range(5):
            result = self._exchange(origin, method, target, headers, body, deadline, public)
            location = result.headers.get("location")
            if result.status not in (307, 308) or not location:
                return result
            from urllib.parse import urljoin

            next_url = urljoin(f"{origin.scheme}://{origin.host}:{origin.port}{target}",
                               location)
            next_origin, next_target = _Origin.parse(next_url)
            if next_origin.key != origin.key:
                return result  # credentials never follow a redirect to another origin
            target = next_target
        return result

    def _exchange(
        self, origin: _Origin, method: str, target: str, headers: Dict[str, str],
        body: Optional[bytes], deadline: float, public: HttpRequest,
    ) -> _Result:
        """One request/response on one pooled connection, all of it before ``deadline``."""
        started = time.monotonic()
        if started >= deadline:
            raise SpapsTimeoutError(f"{method} {public.url}: the call's time budget ran out")
        conn = self._pool.acquire(origin, deadline - started)
        conn.reader.deadline = deadline
        status = 0
        response_headers: Dict[str, str] = {}
        try:
            if conn.proxy_headers is not None:
                target = f"http://{conn.host_header}{target}"
                headers = {**headers, **conn.proxy_headers}
            conn.sock.sendall(_encode_head(method, target, conn.host_header, headers, body))
            status, response_headers, will_close = _read_head(conn.reader)
            data, ended = _read_response_body(conn.reader, method, status, response_headers)
        except (OSError, _BadResponse) as exc:
            conn.close()
            error = _transport_error(exc, public, sent=True)
            if status:  # the status line arrived: say what it was
                error.status_code = status
                error.request_id = response_headers.get("x-request-id")
            raise error from None
        except BaseException:
            conn.close()
            raise
        if data is None or will_close or ended or conn.reader.buffer:
            conn.close()
        else:
            self._pool.release(origin, conn)
        return _Result(status, response_headers, data,
                       HttpResponse(method, public, status, response_headers,
                                    time.monotonic() - started))


def _encode_head(method: str, target: str, host: str, headers: Mapping[str, str],
                 body: Optional[bytes]) -> bytes:
    """The request line and headers (and body) as bytes; refuses header injection."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Accept-Encoding: identity"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    if not "".join(lines).isprintable() or not target.isascii():
        raise SpapsConfigurationError(
            "a header or the URL contains a line break or control character; refusing to "
            "send a request that could be split"
        )
    try:
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    except UnicodeEncodeError:
        raise SpapsConfigurationError("a header value is not Latin-1 text") from None
    return data + body if body is not None else data


class RetryAsyncClient(RetryClient):
    """``RetryClient`` for async clients, which run each call in a worker thread."""

    async def aclose(self) -> None:
        """Close every pooled connection."""
        self.close()


def create_http_client(
    *,
    settings: Settings,
    retry_config: Optional[Union[RetryConfig, Mapping[str, Any]]] = None,
    logging_hooks: Optional[Union[LoggingHooks, Mapping[str, Any]]] = None,
    **kwargs: Any,
) -> RetryClient:
    """A ``RetryClient`` for ``settings`` (``timeout=`` and other ``RetryClient`` keywords
    may be passed to override)."""
    kwargs.setdefault("timeout", settings.request_timeout)
    return RetryClient(
        base_url=settings.base_url, retry_config=retry_config, logging_hooks=logging_hooks,
        **kwargs,
    )


def _fire(hook: Optional[Callable[..., None]], *args: Any) -> None:
    if hook is None:
        return
    try:
        hook(*args)
    except Exception:  # a broken hook must not break the call it observes
        import logging

        logging.getLogger("spaps_client.http").exception("logging hook %r failed", hook)


def _transport_error(exc: BaseException, public: HttpRequest, *, sent: bool) -> SpapsError:
    """Wrap a socket/TLS/protocol failure; say whether the request may have been processed."""
    if isinstance(exc, SpapsError):
        return exc
    what = f"{public.method} {public.url}"
    if isinstance(exc, TimeoutError) or type(exc).__name__ == "timeout":
        phase = "connecting" if not sent else "waiting for the response"
        error: SpapsError = SpapsTimeoutError(f"{what}: timed out {phase}")
    elif type(exc).__name__ == "SSLCertVerificationError":
        error = SpapsTransportError(
            f"{what}: TLS certificate verification failed ({exc}); pass ssl_context= with "
            "your CA, or set SSL_CERT_FILE", retryable=False,
        )
    else:
        state = "could not connect" if not sent else "connection failed"
        error = SpapsTransportError(f"{what}: {state}: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


def _parse_retry_after(value: Optional[str]) -> Optional[float]:
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    from email.utils import parsedate_to_datetime

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


class _Model(_LazyDataclass):
    """Base of every response model: a dataclass with lenient, typed parsing.

    ``model_validate(dict)`` builds an instance the way a server's reply should be
    read: a field that is absent or JSON ``null`` takes its default (an empty list
    for lists), a field may arrive under any of its accepted names (``id`` or
    ``invoice_id``), an optional field whose value has an unexpected type takes its
    default, and every key the model does not declare is kept in ``model_extra``
    and readable as an attribute. Only a required field that is missing or
    unusable raises ``ValueError`` naming it. ``model_dump()`` turns the model back
    into a dict, extra keys included.
    """

    __spaps_fields__: ClassVar[Optional[Tuple[_FieldSpec, ...]]] = None
    __spaps_known__: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def model_validate(cls: Type[_M], obj: Any) -> _M:
        """Build an instance from a mapping (or return ``obj`` if it already is one)."""
        if isinstance(obj, cls):
            return obj
        if type(obj) is not dict and not isinstance(obj, Mapping):
            raise ValueError(f"{cls.__name__}: expected a JSON object, got {_kind(obj)}")
        obj = cls._prepare(obj)
        specs = cls.__dict__.get("__spaps_fields__") or cls._build_specs()
        known = cls.__dict__["__spaps_known__"]
        # Filled in directly rather than through __init__: this runs on every reply.
        model = cls.__new__(cls)
        values = model.__dict__
        extra = {key: value for key, value in obj.items() if key not in known}
        for spec in specs:
            raw = None
            for key in spec.keys:
                raw = obj.get(key)
                if raw is not None:
                    break
            if raw is None:
                if spec.default is None:
                    raise ValueError(f"{cls.__name__}.{spec.name}: missing required field")
                values[spec.name] = spec.default()
                continue
            try:
                values[spec.name] = spec.convert(raw)
            except (ValueError, OverflowError) as exc:  # float(10**400) overflows
                if spec.default is None:
                    raise ValueError(f"{cls.__name__}.{spec.name}: {exc}") from None
                # An optional field the server shaped differently never fails the call:
                # the attribute keeps its default and the value stays reachable.
                values[spec.name] = spec.default()
                extra[key] = raw
        values["_spaps_extra"] = extra
        return model

    @property
    def model_extra(self) -> Dict[str, Any]:
        """What the server sent beyond the declared fields (or in an unexpected shape)."""
        return self.__dict__.setdefault("_spaps_extra", {})  # type: ignore[no-any-return]

    if not TYPE_CHECKING:  # type checkers keep flagging misspelt attributes

        def __getattr__(self, name):
            extra = self.__dict__.get("_spaps_extra")
            if extra is not None and name in extra:
                return extra[name]
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def model_dump(self, *, by_alias: bool = False, exclude_none: bool = False) -> Dict[str, Any]:
        """The model as a dict keyed by attribute names (or JSON names with ``by_alias``)."""
        out: Dict[str, Any] = {}
        for info in _schema(type(self)):
            value = _dump(getattr(self, info.name), by_alias, exclude_none)
            if value is None and exclude_none:
                continue
            out[(info.alias or info.name) if by_alias else info.name] = value
        for key, value in self.model_extra.items():
            if key not in out and not (value is None and exclude_none):
                out[key] = _dump(value, by_alias, exclude_none)
        return out

    @classmethod
    def _prepare(cls, obj: Mapping[str, Any]) -> Mapping[str, Any]:
        return obj

    @classmethod
    def _build_specs(cls) -> Tuple[_FieldSpec, ...]:
        specs = []
        for info in _schema(cls):
            keys = (*info.aliases, info.name) if info.aliases else (info.name,)
            default: Optional[Callable[[], Any]] = info.factory
            if default is None and info.default is not _NO_DEFAULT:
                default = (lambda value: lambda: value)(info.default)
            specs.append(_FieldSpec(info.name, keys, _converter(info.annotation), default))
        cls.__spaps_known__ = frozenset(key for spec in specs for key in spec.keys)
        cls.__spaps_fields__ = tuple(specs)
        return cls.__spaps_fields__


class _FieldSpec:
    """How ``model_validate`` fills one field: JSON keys, converter, default (None: required)."""

    __slots__ = ("convert", "default", "keys", "name")

    def __init__(self, name: str, keys: Tuple[str, ...], convert: Callable[[Any], Any],
                 default: Optional[Callable[[], Any]]) -> None:
        self.name = name
        self.keys = keys
        self.convert = convert
        self.default = default


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


def _converter(annotation: str) -> Callable[[Any], Any]:
    """A function that converts a JSON value to the annotated type or raises ValueError.

    Reads the annotation text (annotations are strings here) in the small grammar the
    models use: ``Optional[X]``, ``List[X]``, ``Dict[...]``, scalars and model names.
    """
    text = annotation.strip()
    if text.startswith("Optional[") and text.endswith("]"):
        convert = _converter(text[len("Optional["):-1])
        return lambda value: None if value is None else convert(value)
    if text.startswith("List[") and text.endswith("]"):
        item = _converter(text[len("List["):-1])
        return lambda value: [item(v) for v in _expect(value, list, "a list")]
    if text.startswith("Dict[") or text == "dict":
        return lambda value: dict(_expect(value, dict, "an object"))
    if text in _SCALARS:
        return _SCALARS[text]
    model = globals().get(text)
    if isinstance(model, type) and issubclass(model, _Model):
        return model.model_validate
    raise TypeError(f"no converter for annotation {annotation!r}")


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


_ISO_PATTERN: Any = None


def _to_datetime(value: Any) -> datetime:
    """Parse ISO-8601 (``Z``, offsets, date-only, space separator) or Unix epoch numbers."""
    if type(value) is not str:
        if isinstance(value, datetime):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return _from_epoch(value)
        if not isinstance(value, str):
            raise ValueError(f"expected a date-time, got {_kind(value)}")
    text = value.strip()
    if len(text) >= 10 and text[4] == "-":
        try:  # the C parser handles the common shapes; the pattern below handles the rest
            if text[-1] in "Zz" and sys.version_info < (3, 11):
                return datetime.fromisoformat(text[:-1] + "+00:00")
            return datetime.fromisoformat(text)
        except ValueError:
            pass
    else:
        try:
            number = float(text)
        except ValueError:
            pass
        else:
            return _from_epoch(number)
    global _ISO_PATTERN
    if _ISO_PATTERN is None:
        import re

        _ISO_PATTERN = re.compile(
            r"(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d+))?)?"
            r"\s*(Z|z|[+-]\d{2}(?::?\d{2})?)?)?"
        )
    match = _ISO_PATTERN.fullmatch(text)
    if match is None:
        raise ValueError(f"expected an ISO-8601 date-time, got {value!r}")
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    tzinfo: Optional[timezone] = None
    if zone in ("Z", "z"):
        tzinfo = timezone.utc
    elif zone:
        sign = -1 if zone[0] == "-" else 1
        digits = zone[1:].replace(":", "")
        offset = timedelta(hours=int(digits[:2]), minutes=int(digits[2:4] or 0))
        tzinfo = timezone(sign * offset)
    try:
        return datetime(
            int(year), int(month), int(day), int(hour or 0), int(minute or 0),
            int(second or 0), int((fraction or "0")[:6].ljust(6, "0")), tzinfo=tzinfo,
        )
    except ValueError as exc:
        raise ValueError(f"invalid date-time {value!r}: {exc}") from None


def _from_epoch(seconds: float) -> datetime:
    try:
        return datetime.fromtimestamp(seconds, tz=timezone.utc)
    except (OverflowError, OSError, ValueError):
        raise ValueError(f"epoch timestamp out of range: {seconds!r}") from None


_SCALARS: Dict[str, Callable[[Any], Any]] = {
    "str": _to_str, "int": _to_int, "float": _to_float, "bool": _to_bool,
    "datetime": _to_datetime, "Any": lambda value: value,
}


# Fields read from JSON key "id"; the attribute name is accepted as well.
_ID_ALIAS = {"alias": "id"}
_IS_ADMIN_ALIAS = {"alias": "isAdmin"}


# --- Auth models ---


@_dataclass(repr=False, eq=False)
class TokenUser(_Model):
    """The user a token pair was issued to."""

    user_id: str = _field(metadata=_ID_ALIAS)
    wallet_address: Optional[str] = None
    chain: Optional[str] = None
    email: Optional[str] = None
    username: Optional[str] = None
    tier: Optional[str] = None
    phone_number: Optional[str] = None
    wallets: Optional[List[str]] = None
    email_confirmed: Optional[bool] = None
    roles: List[str] = _field(default_factory=list)
    permissions: List[str] = _field(default_factory=list)
    is_admin: Optional[bool] = _field(default=None, metadata=_IS_ADMIN_ALIAS)


@_dataclass(repr=False, eq=False)
class TokenPair(_Model):
    """Access and refresh tokens from a sign-in or refresh; tokens hidden from ``repr``.

    ``user`` is ``None`` after a refresh: SPAPS names the user in sign-in replies only.
    """

    access_token: str = _field(repr=False)
    refresh_token: str = _field(repr=False)
    expires_in: int
    user: Optional[TokenUser] = None
    token_type: str = "Bearer"  # noqa: S105 - a token type, not a secret
    mfa_method: Optional[str] = None
    recovery_codes_remaining: Optional[int] = None


@_dataclass(repr=False, eq=False)
class TotpEnrollment(_Model):
    """A TOTP secret to put in an authenticator app (or show as a QR code of
    ``provisioning_uri``); the secret and the URI are hidden from ``repr``."""

    secret: str = _field(repr=False)
    provisioning_uri: str = _field(repr=False)
    issuer: Optional[str] = None
    account_name: Optional[str] = None


@_dataclass(repr=False, eq=False)
class TotpActivation(_Model):
    """TOTP switched on: keep the one-time ``recovery_codes`` (hidden from ``repr``)."""

    recovery_codes: List[str] = _field(default_factory=list, repr=False)
    activated_at: Optional[datetime] = None


@_dataclass(repr=False, eq=False)
class AuthMethod(_Model):
    """A sign-in method of the application (``password``, ``magic_link``,
    ``wallet:ethereum``, ...) and whether it is enabled."""

    method: str
    enabled: bool = False
    config: Dict[str, Any] = _field(default_factory=dict)


@_dataclass(repr=False, eq=False)
class AuthMethods(_Model):
    """The application's sign-in methods."""

    methods: List[AuthMethod] = _field(default_factory=list)


@_dataclass(repr=False, eq=False)
class NonceResponse(_Model):
    """A wallet sign-in challenge: sign ``message`` with the wallet."""

    nonce: str
    message: str
    wallet_address: str
    expires_at: datetime


@_dataclass(repr=False, eq=False)
class RegistrationTokens(_Model):
    """Tokens issued on registration or magic-link sign-in; hidden from ``repr``."""

    access_token: str = _field(repr=False)
    refresh_token: str = _field(repr=False)
    expires_in: int


@_dataclass(repr=False, eq=False)
class RegistrationUser(_Model):
    """The user created by ``register`` or signed in by magic link."""

    id: str
    email: Optional[str] = None
    username: Optional[str] = None
    phone_number: Optional[str] = None
    tier: Optional[str] = None
    email_confirmed: Optional[bool] = None
    wallets: Optional[List[str]] = None
    roles: List[str] = _field(default_factory=list)
    is_admin: Optional[bool] = _field(default=None, metadata=_IS_ADMIN_ALIAS)


@_dataclass(repr=False, eq=False)
class RegistrationResponse(_Model):
    """Result of ``register``: the user and, when the server signs in at once, tokens."""

    user: RegistrationUser
    message: Optional[str] = None
    tokens: Optional[RegistrationTokens] = None


@_dataclass(repr=False, eq=False)
class MagicLinkSendResponse(_Model):
    """Confirmation that a magic link was sent."""

    message: str
    email: Optional[str] = None
    sent_at: Optional[datetime] = None


@_dataclass(repr=False, eq=False)
class MagicLinkAuthResponse(_Model):
    """Result of ``verify_magic_link``."""

    user: RegistrationUser
    message: Optional[str] = None
    tokens: Optional[RegistrationTokens] = None


@_dataclass(repr=False, eq=False)
class MessageResponse(_Model):
    """A plain confirmation message."""

    message: str


@_dataclass(repr=False, eq=False)
class UserWallet(_Model):
    """A wallet linked to a user."""

    wallet_address: str
    chain_type: Optional[str] = None
    verified: Optional[bool] = None


@_dataclass(repr=False, eq=False)
class UserProfile(_Model):
    """The signed-in user (``auth.get_current_user``)."""

    id: str
    username: Optional[str] = None
    email: Optional[str] = None
    phone_number: Optional[str] = None
    wallets: List[UserWallet] = _field(default_factory=list)
    tier: Optional[str] = None
    metadata: Optional[Dict[str, Any]] = None
    roles: List[str] = _field(default_factory=list)
    permissions: List[str] = _field(default_factory=list)
    is_admin: Optional[bool] = _field(default=None, metadata=_IS_ADMIN_ALIAS)


@_dataclass(repr=False, eq=False)
class SessionContext(_Model):
    """Who is signed in and what they may do: user, entitlements, wallets, MFA."""

    user: UserProfile
    entitlements: List[Dict[str, Any]] = _field(default_factory=list)
    entitlements_count: int = 0
    wallets: List[Dict[str, Any]] = _field(default_factory=list)
    tier: Optional[str] = None
    mfa_enrolled: bool = False
    methods_hint: Optional[str] = None


@_dataclass(repr=False, eq=False)
class PasswordResetRequestResponse(_Model):
    """Confirmation that a password-reset email was requested."""

    message: str
    email: Optional[str] = None
    sent_at: Optional[datetime] = None


# --- Session models ---


@_dataclass(repr=False, eq=False)
class SessionSummary(_Model):
    """The session behind the current access token."""

    session_id: str = _field(metadata=_ID_ALIAS)
    user_id: str
    application_id: str
    created_at: datetime
    expires_at: datetime
    last_activity: Optional[datetime] = None
    tier: Optional[str] = None
    wallets_count: Optional[int] = None
    duration_minutes: Optional[float] = None
    idle_minutes: Optional[float] = None


@_dataclass(repr=False, eq=False)
class SessionValidationResult(_Model):
    """Whether the current session is valid."""

    valid: bool
    session_id: Optional[str] = None
    expires_at: Optional[datetime] = None
    renewed: Optional[bool] = None
    reason: Optional[str] = None


@_dataclass(repr=False, eq=False)
class SessionRecord(_Model):
    """One of the user's sessions, as listed by ``list_sessions``."""

    session_id: str = _field(metadata=_ID_ALIAS)
    user_id: str
    application_id: str
    created_at: datetime
    expires_at: Optional[datetime] = None
    last_used: Optional[datetime] = None
    last_activity: Optional[datetime] = None
    user_agent: Optional[str] = None
    ip_address: Optional[str] = None
    is_current: Optional[bool] = None


@_dataclass(repr=False, eq=False)
class SessionListResult(_Model):
    """A page of sessions; ``total`` counts all of them."""

    sessions: List[SessionRecord] = _field(default_factory=list)
    total: int = 0

    @classmethod
    def _prepare(cls, obj: Mapping[str, Any]) -> Mapping[str, Any]:
        sessions = obj.get("sessions") or []
        total = obj.get("total")
        if total is None:
            total = len(sessions) if isinstance(sessions, list) else 0
        return {**obj, "sessions": sessions, "total": total}


@_dataclass(repr=False, eq=False)
class SessionTouchResult(_Model):
    """Result of ``touch_session``."""

    message: str
    session_id: str
    last_activity: Optional[datetime] = None


@_dataclass(repr=False, eq=False)
class SessionRevokeResult(_Model):
    """Result of ``revoke_session``."""

    message: str
    session_id: str


# --- Payment models ---


@_dataclass(repr=False, eq=False)
class CheckoutSession(_Model):
    """A Stripe checkout session: send the user to ``checkout_url``."""

    session_id: str = _field(metadata={"alias": "id"})
    checkout_url: Optional[str] = _field(default=None, metadata={"alias": "url"})
    expires_at: Optional[datetime] = None
    status: Optional[str] = None
    payment_status: Optional[str] = None
    amount_total: Optional[int] = None
    currency: Optional[str] = None
    metadata: Optional[Dict[str, Any]] = None


@_dataclass(repr=False, eq=False)
class PaymentIntent(_Model):
    """A Stripe payment intent; ``client_secret`` is hidden from ``repr``."""

    payment_intent_id: str
    client_secret: Optional[str] = _field(default=None, repr=False)
    status: Optional[str] = None


@_dataclass(repr=False, eq=False)
class WalletDeposit(_Model):
    """A recorded crypto wallet deposit."""

    deposit_id: str
    status: Optional[str] = None
    amount: Optional[float] = None
    currency: Optional[str] = None
    confirmation_required: Optional[int] = None
    confirmation_current: Optional[int] = None


@_dataclass(repr=False, eq=False)
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


@_dataclass(repr=False, eq=False)
class SubscriptionPlan(_Model):
    """The price a subscription is on."""

    price_id: Optional[str] = None
    interval: Optional[str] = None


@_dataclass(repr=False, eq=False)
class SubscriptionDetail(_Model):
    """A subscription and its plan."""

    subscription_id: str = _field(metadata=_ID_ALIAS)
    plan: SubscriptionPlan = _field(default_factory=SubscriptionPlan)
    status: Optional[str] = None
    current_period_end: Optional[datetime] = None
    cancel_at_period_end: Optional[bool] = None
    current_period_start: Optional[datetime] = None
    canceled_at: Optional[datetime] = None
    items: List[Dict[str, Any]] = _field(default_factory=list)
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


@_dataclass(repr=False, eq=False)
class SubscriptionList(_Model):
    """A page of the user's subscriptions."""

    subscriptions: List[SubscriptionDetail] = _field(default_factory=list)
    has_more: bool = False


@_dataclass(repr=False, eq=False)
class Price(_Model):
    """A price SPAPS manages; ``unit_amount`` in minor units (cents)."""

    price_id: str = _field(metadata=_ID_ALIAS)
    currency: Optional[str] = None
    type: Optional[str] = None
    unit_amount: Optional[int] = None
    recurring: Optional[Dict[str, Any]] = None
    nickname: Optional[str] = None
    product_id: Optional[str] = None
    active: Optional[bool] = None


@_dataclass(repr=False, eq=False)
class Product(_Model):
    """A product of the application's catalogue and its default price."""

    product_id: str = _field(metadata=_ID_ALIAS)
    name: Optional[str] = None
    description: Optional[str] = None
    active: Optional[bool] = None
    default_price: Optional[Price] = None
    prices: List[Price] = _field(default_factory=list)
    images: List[str] = _field(default_factory=list)
    metadata: Optional[Dict[str, Any]] = None
    created_at: Optional[datetime] = None


@_dataclass(repr=False, eq=False)
class ProductList(_Model):
    """A page of products; ``total`` counts all of them."""

    products: List[Product] = _field(default_factory=list)
    total: Optional[int] = None


@_dataclass(repr=False, eq=False)
class CheckoutSessionList(_Model):
    """A page of the user's checkout sessions."""

    sessions: List[CheckoutSession] = _field(default_factory=list)
    has_more: bool = False


@_dataclass(repr=False, eq=False)
class PortalSession(_Model):
    """A Stripe billing-portal session: send the user to ``url``."""

    url: Optional[str] = None
    session_id: Optional[str] = _field(default=None, metadata=_ID_ALIAS)
    return_url: Optional[str] = None


@_dataclass(repr=False, eq=False)
class PaymentRecord(_Model):
    """A payment in the user's history; ``amount`` in minor units (cents)."""

    payment_id: str = _field(metadata=_ID_ALIAS)
    amount: Optional[int] = None
    currency: Optional[str] = None
    status: Optional[str] = None
    description: Optional[str] = None
    created_at: Optional[datetime] = None
    stripe_payment_intent_id: Optional[str] = None
    metadata: Optional[Dict[str, Any]] = None


@_dataclass(repr=False, eq=False)
class PaymentHistory(_Model):
    """A page of the user's payments."""

    payments: List[PaymentRecord] = _field(default_factory=list)
    has_more: bool = False
    total_count: Optional[int] = None


@_dataclass(repr=False, eq=False)
class SubscriptionCancellation(_Model):
    """Result of ``cancel_subscription``."""

    subscription_id: str = _field(metadata=_ID_ALIAS)
    status: Optional[str] = None
    cancel_at_period_end: Optional[bool] = None
    canceled_at: Optional[datetime] = None
    current_period_end: Optional[datetime] = None


@_dataclass(repr=False, eq=False)
class BalanceAmounts(_Model):
    """Available and pending balance in one currency."""

    available: float
    pending: float
    currency: str


@_dataclass(repr=False, eq=False)
class UsageSummary(_Model):
    """Credits used in the current billing period."""

    current_period_start: Optional[datetime] = None
    current_period_end: Optional[datetime] = None
    credits_used: Optional[int] = None
    credits_remaining: Optional[int] = None


@_dataclass(repr=False, eq=False)
class BalanceOverview(_Model):
    """The user's balance, tier and usage."""

    balance: BalanceAmounts
    usage: UsageSummary = _field(default_factory=UsageSummary)
    tier: Optional[str] = None
    tier_expires_at: Optional[datetime] = None


@_dataclass(repr=False, eq=False)
class PaymentMethodUpdateResult(_Model):
    """Result of ``update_payment_method``."""

    payment_method_id: str
    message: Optional[str] = None
    customer_id: Optional[str] = None
    is_default: bool = False


@_dataclass(repr=False, eq=False)
class CryptoInvoice(_Model):
    """A crypto invoice; ``amount`` is a decimal string such as ``"42.75"``."""

    invoice_id: str = _field(metadata=_ID_ALIAS)
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


@_dataclass(repr=False, eq=False)
class CryptoInvoiceStatus(_Model):
    """The settlement status of a crypto invoice."""

    invoice_id: str = _field(metadata=_ID_ALIAS)
    status: str
    finalized_at: Optional[str] = None
    normalized_amount: Optional[str] = None
    settlement_ids: Optional[List[str]] = None
    underpaid: Optional[bool] = None
    overpaid: Optional[bool] = None
    amount: Optional[str] = None
    settled_at: Optional[str] = None
    expires_at: Optional[str] = None


@_dataclass(repr=False, eq=False)
class CryptoReconcileJob(_Model):
    """The outcome of ``reconcile``: SPAPS 0.6 runs it at once (``reconciled``,
    ``message``); servers that schedule it answer ``job_id`` and ``scheduled_at``."""

    job_id: Optional[str] = None
    scheduled_at: Optional[str] = None
    cursor: Optional[Dict[str, Any]] = None
    reconciled: Optional[bool] = None
    message: Optional[str] = None


# --- Usage models ---


@_dataclass(repr=False, eq=False)
class UsagePeriod(_Model):
    """The billing period usage is counted in."""

    start: Optional[str] = None
    end: Optional[str] = None


@_dataclass(repr=False, eq=False)
class UsageFeature(_Model):
    """A metered feature: its key (``name``, JSON ``feature_key``), dimensions and limits."""

    name: str = _field(metadata={"alias": "feature_key"})
    description: Optional[str] = None
    used: Optional[float] = None
    limit: Optional[float] = None
    percentage: Optional[float] = None
    reset_at: Optional[str] = None
    display_name: Optional[str] = None
    dimensions: List[str] = _field(default_factory=list)
    limits: Dict[str, Any] = _field(default_factory=dict)
    active: Optional[bool] = None
    policy_key: Optional[str] = None
    active_entitlements: List[str] = _field(default_factory=list)


@_dataclass(repr=False, eq=False)
class UsageFeaturesResponse(_Model):
    """The user's metered features."""

    user_id: Optional[str] = None
    tier: Optional[str] = None
    period: UsagePeriod = _field(default_factory=UsagePeriod)
    features: List[UsageFeature] = _field(default_factory=list)
    overage: Optional[Dict[str, Any]] = None


@_dataclass(repr=False, eq=False)
class UsageRecordUsage(_Model):
    """Usage of a feature after recording."""

    used: Optional[float] = None
    limit: Optional[float] = None
    remaining: Optional[float] = None


@_dataclass(repr=False, eq=False)
class UsageRecordResult(_Model):
    """Result of ``record_usage``: the recorded event and the usage it brings the window to.

    ``replayed`` is true when SPAPS had already recorded this ``idempotency_key``.
    """

    record_id: str = _field(metadata={"alias": "event_id"})
    feature: str = _field(metadata={"alias": "feature_key"})
    quantity: Optional[float] = None
    recorded_at: Optional[str] = None
    warning: Optional[str] = None
    current_usage: UsageRecordUsage = _field(default_factory=UsageRecordUsage)
    status: Optional[str] = None
    replayed: Optional[bool] = None
    idempotency_key: Optional[str] = None
    authorization_ref: Optional[str] = None
    window_totals: Dict[str, Any] = _field(default_factory=dict)


@_dataclass(repr=False, eq=False)
class UsageReason(_Model):
    """Why SPAPS decided as it did about a usage authorization."""

    code: str
    message: Optional[str] = None
    details: Optional[Dict[str, Any]] = None


@_dataclass(repr=False, eq=False)
class UsageWindow(_Model):
    """The metering window a usage decision counts in."""

    window_key: Optional[str] = None
    starts_at: Optional[datetime] = None
    ends_at: Optional[datetime] = None


@_dataclass(repr=False, eq=False)
class UsageAuthorization(_Model):
    """SPAPS's decision on using a feature (``allowed``, ``allowed_with_warning``,
    ``blocked`` or ``escalate``); record the use with ``authorization_ref``."""

    decision: str
    feature_key: str
    authorization_ref: Optional[str] = None
    resource_type: Optional[str] = None
    resource_id: Optional[str] = None
    subject_user_id: Optional[str] = None
    active_entitlements: List[str] = _field(default_factory=list)
    policy_key: Optional[str] = None
    window: Optional[UsageWindow] = None
    window_totals: Dict[str, Any] = _field(default_factory=dict)
    remaining: Dict[str, Any] = _field(default_factory=dict)
    reasons: List[UsageReason] = _field(default_factory=list)
    warnings: List[str] = _field(default_factory=list)
    expires_at: Optional[datetime] = None

    @property
    def allowed(self) -> bool:
        """Whether the use may go ahead (``allowed`` or ``allowed_with_warning``)."""
        return self.decision in ("allowed", "allowed_with_warning")


@_dataclass(repr=False, eq=False)
class UsageEvent(_Model):
    """One recorded use of a feature, as ``get_history`` lists it."""

    event_id: str
    feature_key: str
    dimensions: Dict[str, Any] = _field(default_factory=dict)
    resource_type: Optional[str] = None
    resource_id: Optional[str] = None
    subject_user_id: Optional[str] = None
    authorization_ref: Optional[str] = None
    idempotency_key: Optional[str] = None
    policy_key: Optional[str] = None
    active_entitlements: List[str] = _field(default_factory=list)
    metadata: Optional[Dict[str, Any]] = None
    occurred_at: Optional[datetime] = None
    recorded_at: Optional[datetime] = None


@_dataclass(repr=False, eq=False)
class UsageHistoryEntry(_Model):
    """Usage on one date."""

    date: Optional[str] = None
    features: Dict[str, Any] = _field(default_factory=dict)
    total_cost: Optional[float] = None


@_dataclass(repr=False, eq=False)
class UsageHistoryResponse(_Model):
    """Usage history over a period."""

    period: Optional[str] = None
    start_date: Optional[str] = None
    end_date: Optional[str] = None
    history: List[UsageHistoryEntry] = _field(default_factory=list)
    summary: Optional[Dict[str, Any]] = None
    events: List[UsageEvent] = _field(default_factory=list)
    has_more: bool = False
    next_offset: Optional[int] = None


# --- Entitlement models ---


@_dataclass(repr=False, eq=False)
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
    metadata: Dict[str, Any] = _field(default_factory=dict)
    created_at: Optional[datetime] = None
    updated_at: Optional[datetime] = None


@_dataclass(repr=False, eq=False)
class EntitlementClaimResult(_Model):
    """Entitlements bought for the user's e-mail before the account existed, now theirs."""

    claimed: List[Entitlement] = _field(default_factory=list)
    count: int = 0


@_dataclass(repr=False, eq=False)
class ManualGrantParams(_LazyDataclass):
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


@_dataclass(repr=False, eq=False)
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


@_dataclass(repr=False, eq=False)
class WhitelistCheckResult(_Model):
    """Whether an email is whitelisted; ``entry`` is ``None`` when it is not."""

    message: str
    entry: Optional[WhitelistEntry] = None


@_dataclass(repr=False, eq=False)
class WhitelistListResult(_Model):
    """A page of whitelist entries."""

    entries: List[WhitelistEntry] = _field(default_factory=list)
    total: int = 0

    @classmethod
    def _prepare(cls, obj: Mapping[str, Any]) -> Mapping[str, Any]:
        entries = obj.get("entries") or []
        total = obj.get("total")
        if total is None:
            total = len(entries) if isinstance(entries, list) else 0
        return {**obj, "entries": entries, "total": total}


@_dataclass(repr=False, eq=False)
class WhitelistMessage(_Model):
    """A whitelist confirmation message."""

    message: str


@_dataclass(repr=False, eq=False)
class SecureMessage(_Model):
    """A secure message between a patient and a practitioner."""

    id: str
    patient_id: str
    practitioner_id: str
    content: str = _field(repr=False)
    application_id: Optional[str] = None
    metadata: Optional[Dict[str, Any]] = None
    created_at: Optional[str] = None


@_dataclass(repr=False, eq=False)
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


@_dataclass(repr=False, eq=False)
class StoredTokens(_LazyDataclass):
    """Tokens kept between calls; the tokens are hidden from ``repr``."""

    access_token: str = _field(repr=False)
    refresh_token: Optional[str] = _field(default=None, repr=False)
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


_LOCK_CREATION = _thread.allocate_lock()


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

    def lock(self) -> AbstractContextManager[Any]:
        """A context manager held while tokens are refreshed."""
        lock = self._refresh_lock
        if lock is None:
            with _LOCK_CREATION:  # two threads must never get two different locks
                lock = self.__dict__.setdefault("_refresh_lock", _thread.RLock())
        return lock


class InMemoryTokenStorage(TokenStorage):
    """Tokens in process memory (the default). Thread-safe; ``load`` returns a copy."""

    def __init__(self) -> None:
        self._tokens: Optional[StoredTokens] = None
        self._lock = _thread.allocate_lock()

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
        self._thread_lock = _thread.RLock()

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
                with _suppress_os_error():
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
            with _suppress_os_error():
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
            with _suppress_os_error():
                os.unlink(os.path.join(directory, entry))

    def lock(self) -> AbstractContextManager[Any]:
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


class _suppress_os_error:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Optional[type], *rest: object) -> bool:
        return kind is not None and issubclass(kind, OSError)


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
    import json

    document = {
        "access_token": tokens.access_token,
        "refresh_token": tokens.refresh_token,
        "expires_at": tokens.expires_at.isoformat() if tokens.expires_at else None,
        "token_type": tokens.token_type,
    }
    return json.dumps(document, indent=2).encode("utf-8")


def _decode_tokens(raw: Union[bytes, str]) -> Optional[StoredTokens]:
    """Tokens from ``_encode_tokens``'s document; ``None`` for anything unusable."""
    import json

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


class TokenStorageError(SpapsError):
    """The token storage could not be read or written (Redis down, a lock lost, ...)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code="TOKEN_STORAGE_FAILED", retryable=False)


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
        self._thread_lock = _thread.RLock()

    def __repr__(self) -> str:
        return f"RedisTokenStorage(key={self.key!r})"

    def save(self, tokens: StoredTokens) -> None:
        self._redis("save tokens to", self.client.set, self.key, _encode_tokens(tokens))

    def load(self) -> Optional[StoredTokens]:
        raw = self._redis("read tokens from", self.client.get, self.key)
        return None if raw is None else _decode_tokens(raw)

    def clear(self) -> None:
        self._redis("clear tokens in", self.client.delete, self.key)

    def lock(self) -> AbstractContextManager[Any]:
        return _RedisLease(self)

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

    def __init__(self, storage: RedisTokenStorage) -> None:
        self.storage = storage
        self.owner = os.urandom(16).hex()

    def __enter__(self) -> _RedisLease:
        storage = self.storage
        # One wait for both locks, and never past the budget of the call that needs them.
        deadline = time.monotonic() + storage.lock_wait
        budget = getattr(_CALL_BUDGET, "deadline", None)
        if budget is not None and budget < deadline:
            deadline = budget
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
            import logging

            logging.getLogger("spaps_client").warning("%s; it lapses by itself", exc)
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
# Each endpoint is one method of a sync service class. The async classes are
# derived from them (``_async_twin``): they run the very same method in a
# worker thread, so the wire behaviour of both surfaces cannot drift apart.


class _TokenSource:
    """Where a service finds its access token; this base holds a fixed one."""

    def __init__(self, token: Optional[str] = None) -> None:
        self.token = token

    def current(self) -> Optional[str]:
        """The token for the next request (refreshed first if it is about to expire)."""
        return self.token

    def peek(self) -> Optional[str]:
        """The token as it is now, without refreshing."""
        return self.token

    def after_rejection(self, rejected: str) -> Optional[str]:
        """A new token after the server rejected ``rejected`` with 401, or ``None``."""
        return None

    def known_secrets(self) -> List[str]:
        """The tokens this source holds, so that error messages can be scrubbed of them."""
        return [self.token] if self.token else []


class _StoredTokenSource(_TokenSource):
    """Tokens read from a ``TokenStorage`` at every request, refreshed when they expire.

    A refresh happens under ``storage.lock()`` and re-reads the storage first:
    whoever waited for the lock finds the new token and sends no request of its
    own, so one expiry costs one refresh however many threads, tasks or
    processes hit it.
    """

    EXPIRY_MARGIN = 30.0  # seconds before expires_at: covers clock skew and transit time

    def __init__(self, storage: TokenStorage,
                 refresh: Optional[Callable[[str], StoredTokens]] = None) -> None:
        super().__init__()
        self.storage = storage
        self.refresh = refresh
        self.lifetime: Optional[float] = None  # of access tokens, once a sign-in told us
        # Tokens SPAPS issued that the storage refused to save: kept for this process, so
        # that a broken storage never costs the session the server already opened.
        self.unsaved: Optional[StoredTokens] = None
        self._local_lock = _thread.RLock()

    def load(self) -> Optional[StoredTokens]:
        """The tokens to use: unsaved ones first, else the storage's."""
        if self.unsaved is not None:
            return _copy_tokens(self.unsaved)
        return _storage_call(self.storage, "read tokens from", self.storage.load)

    def save(self, tokens: StoredTokens) -> None:
        """Save ``tokens``; if the storage fails, keep them in memory and say so."""
        try:
            _storage_call(self.storage, "save tokens to", self.storage.save, tokens)
        except TokenStorageError as exc:
            import logging

            self.unsaved = _copy_tokens(tokens)
            logging.getLogger("spaps_client").warning(
                "%s; the session is kept in memory for this process only", exc)
        else:
            self.unsaved = None

    def clear(self) -> None:
        """Forget the tokens, in memory and in the storage."""
        self.unsaved = None
        _storage_call(self.storage, "clear tokens in", self.storage.clear)

    def current(self) -> Optional[str]:
        tokens = self.load()
        if tokens is None:
            return None
        if self.refresh is not None and tokens.refresh_token and tokens.expires_within(
            self._margin(tokens)
        ):
            try:
                return self._refresh(tokens.access_token).access_token
            except SpapsError:
                if tokens.expires_within(0):
                    raise
        return tokens.access_token

    def peek(self) -> Optional[str]:
        tokens = self.load()
        return tokens.access_token if tokens else None

    def known_secrets(self) -> List[str]:
        try:
            tokens = self.load()
        except Exception:  # a broken storage must not hide the error being reported
            return []
        return [tokens.access_token, tokens.refresh_token or ""] if tokens else []

    def after_rejection(self, rejected: str) -> Optional[str]:
        if self.refresh is None:
            return None
        stored = self.load()
        if stored is None or (stored.access_token == rejected and not stored.refresh_token):
            return None  # nothing to refresh with: the caller reports the original 401
        return self._refresh(rejected).access_token

    def _refresh(self, stale: str) -> StoredTokens:
        assert self.refresh is not None
        # Tokens only this process holds (the storage failed to save them) need no lock
        # shared with other processes, which a broken storage could not give anyway.
        guard = self._local_lock if self.unsaved is not None else _StorageLock(self.storage)
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
            return self.refresh(tokens.refresh_token)

    def _margin(self, tokens: StoredTokens) -> float:
        """How early to refresh: ``EXPIRY_MARGIN``, or half the life of short-lived tokens.

        With tokens that live less than the margin, every call (of every client sharing
        the storage) would otherwise refresh.
        """
        if self.lifetime is None:
            return self.EXPIRY_MARGIN
        return min(self.EXPIRY_MARGIN, self.lifetime / 2)


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
    down) raised as ``TokenStorageError``."""

    def __init__(self, storage: TokenStorage) -> None:
        self.storage = storage
        self.held: Optional[AbstractContextManager[Any]] = None

    def __enter__(self) -> None:
        held = _storage_call(self.storage, "lock", self.storage.lock)
        _storage_call(self.storage, "lock", held.__enter__)
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


class _Reply:
    """A successful JSON response, with helpers that turn surprises into service errors."""

    __slots__ = ("body", "result", "service")

    def __init__(self, service: _Service, result: _Result, body: Dict[str, Any]) -> None:
        self.service = service
        self.result = result
        self.body = body

    def data(self) -> Dict[str, Any]:
        """The payload: the ``data`` object when the body has one, else the body itself."""
        if "data" not in self.body:
            return self.body
        data = self.body["data"]
        if not isinstance(data, dict):
            raise self.invalid(f"'data' is {_kind(data)}, expected an object")
        return data

    def first_text(self, *candidates: Any) -> Optional[str]:
        for value in candidates:
            if isinstance(value, str) and value:
                return value
        return None

    def parse(self, model: Type[_M], payload: Any) -> _M:
        try:
            return model.model_validate(payload)
        except ValueError as exc:
            raise self.invalid(str(exc)) from None

    def invalid(self, problem: str) -> SpapsError:
        result = self.result
        return self.service._error(
            f"{self.service._label} response was not understood: {problem}",
            status_code=result.status, error_code="INVALID_RESPONSE", response=result.public,
            request_id=_request_id(result, self.body), retryable=False,
        )


def _request_id(result: _Result, body: Optional[Mapping[str, Any]]) -> Optional[str]:
    header = result.headers.get("x-request-id")
    if header:
        return header
    if body and isinstance(body.get("request_id"), str) and body["request_id"]:
        return str(body["request_id"])
    metadata = body.get("metadata") if body else None
    if isinstance(metadata, dict) and isinstance(metadata.get("request_id"), str):
        return str(metadata["request_id"])
    return None


def _segment(value: Any, what: str) -> str:
    """Percent-encode one path parameter so it can never change the request target."""
    text = str(value) if value is not None else ""
    if not text or text in (".", ".."):
        raise ValueError(f"{what} must be a non-empty identifier, got {value!r}")
    from urllib.parse import quote

    return quote(text, safe="@+:!$&'()*,;=")


def _json_body(pairs: Mapping[str, Any]) -> bytes:
    import json

    return json.dumps(pairs, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


# The deadline of the user call running on this thread, if any (see _Service._call).
_CALL_BUDGET = _thread._local()


class _Service:
    """Shared machinery of the service clients: headers, tokens, envelopes, errors."""

    _error: ClassVar[Type[SpapsError]] = SpapsError
    _label: ClassVar[str] = "SPAPS"
    _ctx: _Context
    _owns_http: bool

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str,
        access_token: Optional[str] = None,
        client: Optional[RetryClient] = None,
        request_timeout: float = DEFAULT_TIMEOUT,
        retry_config: Optional[Union[RetryConfig, Mapping[str, Any]]] = None,
        logging_hooks: Optional[Union[LoggingHooks, Mapping[str, Any]]] = None,
        ssl_context: Optional[ssl.SSLContext] = None,
        allow_insecure_http: bool = False,
    ) -> None:
        http = client or RetryClient(
            base_url=base_url, timeout=request_timeout, retry_config=retry_config,
            logging_hooks=logging_hooks, ssl_context=ssl_context,
            allow_insecure_http=allow_insecure_http,
        )
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

    def _call(
        self,
        method: str,
        path: str,
        *,
        auth: str = _BEARER,
        token: Optional[str] = None,
        query: Optional[List[Tuple[str, str]]] = None,
        body: Any = _NO_BODY,
        headers: Optional[Dict[str, str]] = None,
        idempotency_key: Optional[str] = None,
    ) -> _Reply:
        """Send one request and return its JSON reply; raise the service's error otherwise."""
        ctx = self._ctx
        url = ctx.base_url + path
        if query:
            from urllib.parse import urlencode

            url += "?" + urlencode(query)
        payload = None if body is _NO_BODY else _json_body(body)
        outermost = getattr(_CALL_BUDGET, "deadline", None) is None
        if outermost:  # the outermost call sets the budget that a refresh and a replay share
            _CALL_BUDGET.deadline = time.monotonic() + ctx.http.timeout
        try:
            return self._call_within_budget(method, url, auth, token, payload, headers,
                                            idempotency_key, lambda: self._secrets(token, body))
        finally:
            if outermost:
                _CALL_BUDGET.deadline = None

    def _secrets(self, token: Optional[str], body: Any) -> List[str]:
        """Every secret this call could have shown the server: key, tokens, body secrets."""
        found = [self._ctx.api_key, token or "", *self._ctx.tokens.known_secrets()]
        if isinstance(body, Mapping):
            found.extend(str(body[key]) for key in _SECRET_FIELDS
                         if isinstance(body.get(key), str))
        return found

    def _call_within_budget(self, method: str, url: str, auth: str, token: Optional[str],
                            payload: Optional[bytes], headers: Optional[Dict[str, str]],
                            idempotency_key: Optional[str],
                            secrets: Callable[[], List[str]]) -> _Reply:
        ctx = self._ctx
        explicit = token
        if token == "":  # a backend passing on an absent header must not act as itself
            raise ValueError(f"{self._label} call given an empty access token; pass None "
                             "to use the stored one")
        if auth in (_BEARER, _OPTIONAL_BEARER) and not token:
            token = ctx.tokens.current()
            if not token and auth == _BEARER:
                raise ValueError(
                    f"{self._label} calls need an access token: sign in with "
                    "client.auth.sign_in_with_password() or call set_tokens() first"
                )
        result = self._send(method, url, auth, token, payload, headers, idempotency_key)
        if result.status == 401 and token and not explicit:
            fresh = ctx.tokens.after_rejection(token)
            if fresh and fresh != token:
                result = self._send(method, url, auth, fresh, payload, headers, idempotency_key)
        return self._reply(result, secrets)

    def _send(self, method: str, url: str, auth: str, token: Optional[str],
              payload: Optional[bytes], extra: Optional[Dict[str, str]],
              idempotency_key: Optional[str]) -> _Result:
        headers: Dict[str, str] = {}
        if auth != _NONE:
            headers["X-API-Key"] = self._ctx.api_key
        if token and auth in (_BEARER, _OPTIONAL_BEARER):
            headers["Authorization"] = "Bearer " + token
        if extra:
            headers.update(extra)
        return self._ctx.http.request(method, url, headers=headers, body=payload,
                                      idempotency_key=idempotency_key)

    def _reply(self, result: _Result, secrets: Callable[[], List[str]]) -> _Reply:
        import json

        if result.status >= 300:
            raise self._status_error(result, secrets())
        reply = _Reply(self, result, {})
        if result.status == 204:  # No Content: done, and nothing to say about it
            return reply
        if result.body is None:
            raise reply.invalid(f"the body exceeds {_MAX_BODY} bytes")
        if not result.body:
            raise reply.invalid("the body is empty")
        try:
            body = json.loads(result.body.decode("utf-8"))
        except (ValueError, RecursionError):  # invalid UTF-8 too; absurd nesting too
            raise reply.invalid(f"the body is not JSON ({_content_type(result)})") from None
        if not isinstance(body, dict):
            raise reply.invalid(f"the body is JSON {_kind(body)}, expected an object")
        if body.get("success") is False:  # an error envelope, whatever the status says
            raise self._status_error(result, secrets())
        reply.body = body
        return reply

    def _status_error(self, result: _Result, secrets: List[str]) -> SpapsError:
        """The service's error for a status >= 300, from whatever the body offers.

        Servers echo input in their messages: every secret the client knows is scrubbed
        from the text (before it is shortened, which could cut a secret in two) so that
        it never reaches logs and error trackers through the exception.
        """
        import json

        document: Any = None
        if result.body:
            try:
                document = json.loads(result.body)
            except (ValueError, RecursionError):
                document = ValueError
        body = document if isinstance(document, dict) else None
        info = body.get("error") if body else None
        code = None
        message = None
        details = None
        if isinstance(info, dict):
            message = info.get("message") if isinstance(info.get("message"), str) else None
            code = info.get("code") if isinstance(info.get("code"), str) else None
            details = info.get("details") if isinstance(info.get("details"), dict) else None
        elif isinstance(info, str):
            message = info
        if not message and body and isinstance(body.get("message"), str):
            message = body["message"]
        if not message:
            detail = (f"; the body was not JSON ({_content_type(result)})"
                      if document is ValueError else "")
            message = f"{self._label} request failed with HTTP {result.status}{detail}"
        retry_after = _parse_retry_after(result.headers.get("retry-after"))
        return self._error(
            _scrub(message, secrets), status_code=result.status, error_code=code,
            response=result.public, request_id=_request_id(result, body),
            retry_after=retry_after, details=details and _scrub_json(details, secrets),
        )


# Request-body fields whose values are credentials.
_SECRET_FIELDS = ("password", "new_password", "refresh_token", "access_token", "token", "code",
                  "recovery_code", "signature")


def _scrub(text: str, secrets: List[str]) -> str:
    """``text`` with every occurrence of a known secret (raw or percent-encoded) redacted."""
    from urllib.parse import quote

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


def _content_type(result: _Result) -> str:
    return result.headers.get("content-type", "no content type").split(";")[0]


def _pick(**pairs: Any) -> Dict[str, Any]:
    """Keep the pairs whose value is not ``None``."""
    return {key: value for key, value in pairs.items() if value is not None}


class AuthClient(_Service):
    """Sign-in, registration, magic links, wallets, tokens and passwords (``/api/auth``).

    When constructed with a ``token_storage`` (aggregate clients always give
    one), every call that issues tokens stores them and ``logout`` clears them.
    """

    AUTH_PREFIX = "/api/auth"
    _error = AuthError
    _label = "Authentication"

    def __init__(
        self,
        /,
        *,
        base_url: str,
        api_key: str,
        client: Optional[RetryClient] = None,
        request_timeout: float = DEFAULT_TIMEOUT,
        token_storage: Optional[TokenStorage] = None,
        **options: Any,
    ) -> None:
        super().__init__(base_url=base_url, api_key=api_key, client=client,
                         request_timeout=request_timeout, **options)
        self.token_storage = token_storage
        if token_storage is not None:
            self._ctx.tokens = _StoredTokenSource(token_storage)

    def _setup(self) -> None:
        tokens = self._ctx.tokens
        self.token_storage = tokens.storage if isinstance(tokens, _StoredTokenSource) else None

    def request_nonce(self, *, wallet_address: str, chain: Optional[str] = None) -> NonceResponse:
        """Ask for a message to sign with ``wallet_address`` (step 1 of wallet sign-in)."""
        body: Dict[str, Any] = {"wallet_address": wallet_address}
        if chain:
            body["chain"] = chain
        reply = self._call("POST", "/api/auth/nonce", auth=_KEY, body=body)
        return reply.parse(NonceResponse, reply.data())

    def verify_wallet(
        self, *, wallet_address: str, signature: str, message: str, chain: Optional[str] = None
    ) -> TokenPair:
        """Sign in with a wallet signature of the nonce message; stores the tokens."""
        body: Dict[str, Any] = {
            "wallet_address": wallet_address, "signature": signature, "message": message,
        }
        if chain:
            body["chain_type"] = chain
        return self._token_pair(self._call("POST", "/api/auth/wallet-sign-in", auth=_KEY,
                                           body=body))

    def sign_in_with_password(self, *, email: str, password: str) -> TokenPair:
        """Sign in with email and password; stores the tokens.

        Raises ``MfaRequiredError`` when the account has a second factor: finish with
        ``verify_mfa``.
        """
        reply = self._call("POST", "/api/auth/login", auth=_KEY,
                           body={"email": email, "password": password})
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
                expires_at=data.get("expires_at") if isinstance(data.get("expires_at"), str)
                else None,
                status_code=reply.result.status, response=reply.result.public,
                request_id=_request_id(reply.result, reply.body))
        return self._token_pair(reply)

    def verify_mfa(self, *, challenge_id: str, challenge: str, code: Optional[str] = None,
                   recovery_code: Optional[str] = None) -> TokenPair:
        """Finish an MFA sign-in with a TOTP ``code`` or a ``recovery_code``; stores the
        tokens (``recovery_codes_remaining`` says how many recovery codes are left)."""
        if (code is None) == (recovery_code is None):
            raise ValueError("verify_mfa needs exactly one of code= or recovery_code=")
        body = {"challenge_id": challenge_id, "challenge": challenge,
                **_pick(code=code, recovery_code=recovery_code)}
        return self._token_pair(self._call("POST", "/api/auth/mfa/verify", auth=_KEY,
                                           body=body))

    def enroll_totp(self, *, access_token: Optional[str] = None) -> TotpEnrollment:
        """Start TOTP for the signed-in user: a secret for an authenticator app. Nothing
        changes until ``activate_totp`` confirms a code from that app."""
        reply = self._call("POST", "/api/auth/mfa/totp/enroll", token=access_token, body={})
        return reply.parse(TotpEnrollment, reply.data())

    def activate_totp(self, *, code: str, access_token: Optional[str] = None
                      ) -> TotpActivation:
        """Switch TOTP on with a current ``code``; returns the one-time recovery codes."""
        reply = self._call("POST", "/api/auth/mfa/totp/activate", token=access_token,
                           body={"code": code})
        return reply.parse(TotpActivation, reply.data())

    def disable_totp(self, *, code: str, access_token: Optional[str] = None
                     ) -> MessageResponse:
        """Switch TOTP off; ``code`` is a current TOTP code or a recovery code."""
        reply = self._call("POST", "/api/auth/mfa/totp/disable", token=access_token,
                           body={"code": code})
        return reply.parse(MessageResponse, {"message": reply.first_text(
            reply.data().get("message")) or "TOTP disabled"})

    def get_auth_methods(self) -> AuthMethods:
        """The sign-in methods the application offers (API key only)."""
        reply = self._call("GET", "/api/auth/methods", auth=_KEY)
        return reply.parse(AuthMethods, reply.data())

    def get_session_context(self, *, access_token: Optional[str] = None) -> SessionContext:
        """The signed-in user with their entitlements, wallets, tier and MFA state."""
        reply = self._call("GET", "/api/auth/session-context", token=access_token)
        return reply.parse(SessionContext, reply.data())

    def refresh_tokens(self, *, refresh_token: str) -> TokenPair:
        """Exchange a refresh token for a new pair (the old refresh token stops working)."""
        return self._token_pair(self._call(
            "POST", "/api/auth/refresh", auth=_KEY, body={"refresh_token": refresh_token}
        ))

    def register(
        self,
        *,
        email: str,
        password: str,
        username: Optional[str] = None,
        phone_number: Optional[str] = None,
        referral_click_id: Optional[str] = None,
        ref: Optional[str] = None,
    ) -> RegistrationResponse:
        """Create an account; stores tokens when the server signs the user in at once."""
        body = {"email": email, "password": password, **_pick(
            username=username, phone_number=phone_number, referral_click_id=referral_click_id,
            ref=ref,
        )}
        return self._user_and_tokens(
            self._call("POST", "/api/auth/register", auth=_KEY, body=body), RegistrationResponse
        )

    def send_magic_link(self, *, email: str) -> MagicLinkSendResponse:
        """Email a one-time sign-in link to ``email``."""
        reply = self._call("POST", "/api/auth/magic-link", auth=_KEY, body={"email": email})
        return self._message_with_data(reply, MagicLinkSendResponse, "Magic link sent")

    def verify_magic_link(self, *, token: str, type: str = "magiclink") -> MagicLinkAuthResponse:
        """Sign in with the token from a magic link; stores the tokens."""
        reply = self._call("POST", "/api/auth/verify-magic-link", auth=_KEY,
                           body={"token": token, "type": type})
        return self._user_and_tokens(reply, MagicLinkAuthResponse)

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
        reply = self._call("POST", "/api/auth/logout", token=access_token,
                           body={"refresh_token": refresh_token} if refresh_token else _NO_BODY)
        data = reply.body.get("data")
        message = reply.first_text(
            data.get("message") if isinstance(data, dict) else None, reply.body.get("message")
        ) or "Logged out"
        self.clear_stored_tokens()
        return MessageResponse(message=message)

    def get_current_user(self, *, access_token: Optional[str] = None) -> UserProfile:
        """The signed-in user's profile."""
        reply = self._call("GET", "/api/auth/user", token=access_token)
        data = reply.data()
        user = data.get("user") if isinstance(data.get("user"), dict) else reply.body.get("user")
        return reply.parse(UserProfile, user)

    def request_password_reset(
        self, *, email: str, redirect_url: Optional[str] = None
    ) -> PasswordResetRequestResponse:
        """Email a password-reset link (answers the same whether or not the user exists)."""
        reply = self._call("POST", "/api/auth/password-reset", auth=_KEY,
                           body={"email": email, **_pick(redirect_url=redirect_url)})
        return self._message_with_data(reply, PasswordResetRequestResponse,
                                       "Password reset requested")

    def confirm_password_reset(self, *, token: str, new_password: str) -> MessageResponse:
        """Set a new password with the token from a reset email."""
        reply = self._call("POST", "/api/auth/reset-password-confirm", auth=_KEY,
                           body={"token": token, "new_password": new_password})
        return reply.parse(MessageResponse, {"message": reply.first_text(
            reply.body.get("message"), reply.data().get("message")) or "Password changed"})

    def get_stored_tokens(self) -> Optional[StoredTokens]:
        """The stored tokens (``None`` without storage or tokens)."""
        tokens = self._ctx.tokens
        return tokens.load() if isinstance(tokens, _StoredTokenSource) else None

    def clear_stored_tokens(self) -> None:
        """Forget the stored tokens."""
        tokens = self._ctx.tokens
        if isinstance(tokens, _StoredTokenSource):
            tokens.clear()

    def _store(self, access: str, refresh: Optional[str], expires_in: Optional[int],
               token_type: Optional[str]) -> None:
        tokens = self._ctx.tokens
        if isinstance(tokens, _StoredTokenSource):
            tokens.save(_tokens_from(access, refresh, expires_in, token_type))
            if expires_in:
                tokens.lifetime = float(expires_in)  # tells how early refreshing makes sense

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
            "message": reply.first_text(body.get("message"), data.get("message")),
        })

    def _store_issued(self, reply: _Reply, tokens: Mapping[str, Any], token_type: Any) -> None:
        """Store the tokens of a reply before anything else can fail.

        The server has already spent the refresh token or opened the session: a model
        that cannot be built from the rest of the reply must not lose them.
        """
        access = tokens.get("access_token")
        if not isinstance(access, str) or not access:
            raise reply.invalid("the reply carries no access_token")
        refresh = tokens.get("refresh_token")
        try:
            expires_in: Optional[int] = _to_int(tokens.get("expires_in"))
        except ValueError:
            expires_in = None
        self._store(access, refresh if isinstance(refresh, str) and refresh else None,
                    expires_in, token_type if isinstance(token_type, str) else "Bearer")

    def _message_with_data(self, reply: _Reply, model: Type[_M], default: str) -> _M:
        """A confirmation: ``default`` stands in when the server says nothing (SPAPS 0.6
        answers a password-reset request with ``{email, sent_at}`` only)."""
        data = reply.data()
        return reply.parse(model, {
            **data, "message": reply.first_text(reply.body.get("message"), data.get("message"))
            or default,
        })


class SessionsClient(_Service):
    """The signed-in user's sessions (``/api/sessions``)."""

    SESSIONS_PREFIX = "/api/sessions"
    _error = SessionError
    _label = "Session"

    def get_current_session(self, *, access_token_override: Optional[str] = None
                            ) -> SessionSummary:
        """The session behind the access token."""
        reply = self._call("GET", "/api/sessions/current", token=access_token_override)
        return reply.parse(SessionSummary, _unwrap(reply.data(), "session"))

    def validate_session(self, *, access_token_override: Optional[str] = None
                         ) -> SessionValidationResult:
        """Whether the session is still valid."""
        reply = self._call("POST", "/api/sessions/validate", token=access_token_override,
                           body={})
        data = reply.data()
        # SPAPS answers {valid, reason, session{id, expires_at, ...}}; older fixtures
        # nest everything under "session".
        if "valid" not in data:
            return reply.parse(SessionValidationResult, _unwrap(data, "session"))
        session = _object_at(data, "session")
        return reply.parse(SessionValidationResult, {
            "session_id": session.get("id") or session.get("session_id"),
            "expires_at": session.get("expires_at"), **data,
        })

    def list_sessions(
        self,
        *,
        limit: Optional[int] = None,
        starting_after: Optional[str] = None,
        offset: Optional[int] = None,
        access_token_override: Optional[str] = None,
    ) -> SessionListResult:
        """The user's sessions, ``limit`` at a time, from ``offset`` (or after session
        ``starting_after``, for servers that page by cursor)."""
        query = [("limit", str(limit))] if limit is not None else []
        if offset is not None:
            query.append(("offset", str(offset)))
        if starting_after:
            query.append(("starting_after", starting_after))
        # The collection lives at "/api/sessions/"; without the slash SPAPS answers 307.
        reply = self._call("GET", "/api/sessions/", token=access_token_override, query=query)
        return reply.parse(SessionListResult, reply.data())

    def touch_session(self, *, access_token_override: Optional[str] = None
                      ) -> SessionTouchResult:
        """Mark the session active now.

        On SPAPS 0.6 this also spends the session's refresh token: a later refresh with
        it fails with ``REFRESH_TOKEN_REPLAY``, so after touching, sign in again when the
        access token expires (``get_current_session`` and ``validate_session`` do not
        spend it).
        """
        reply = self._call("POST", "/api/sessions/touch", token=access_token_override, body={})
        return reply.parse(SessionTouchResult, reply.data())

    def revoke_session(self, session_id: str, *, access_token_override: Optional[str] = None
                       ) -> SessionRevokeResult:
        """End session ``session_id``; its tokens stop working."""
        path = "/api/sessions/" + _segment(session_id, "session_id")
        reply = self._call("DELETE", path, token=access_token_override)
        # SPAPS answers 204 with no body.
        return reply.parse(SessionRevokeResult, {"message": "Session revoked",
                                                 "session_id": session_id, **reply.data()})


def _unwrap(payload: Dict[str, Any], key: str) -> Dict[str, Any]:
    inner = payload.get(key)
    return inner if isinstance(inner, dict) else payload


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
              idempotency_key: Optional[str]) -> _Result:
        if self._header_builder is None:
            return super()._send(method, url, auth, token, payload, extra, idempotency_key)
        headers = dict(self._header_builder(token))
        headers.update(extra or {})
        return super()._send(method, url, _NONE, None, payload, headers, idempotency_key)

    def _call(self, method: str, path: str, **kwargs: Any) -> _Reply:
        if self._header_builder is not None:
            kwargs["auth"] = _NONE
        return super()._call(method, path, **kwargs)

    def create_invoice(
        self,
        *,
        asset: str,
        network: str,
        amount: Union[str, int, float],
        expires_in_seconds: Optional[int] = None,
        beneficiary: Optional[Dict[str, Any]] = None,
        metadata: Optional[Dict[str, Any]] = None,
        idempotency_key: Optional[str] = None,
        access_token_override: Optional[str] = None,
    ) -> CryptoInvoice:
        """Create an invoice for ``amount`` (sent as a decimal string) of ``asset``."""
        body = {"asset": asset, "network": network, "amount": _decimal_text(amount), **_pick(
            expires_in_seconds=expires_in_seconds, beneficiary=beneficiary, metadata=metadata,
        )}
        reply = self._call("POST", self.CRYPTO_PREFIX + "/invoices", body=body,
                           token=access_token_override, idempotency_key=idempotency_key)
        return reply.parse(CryptoInvoice, _unwrap(reply.data(), "invoice"))

    def get_invoice(self, invoice_id: str, *, access_token_override: Optional[str] = None
                    ) -> CryptoInvoice:
        """Invoice ``invoice_id``."""
        reply = self._call("GET", self._invoice_path(invoice_id, include_prefix=True),
                           token=access_token_override)
        return reply.parse(CryptoInvoice, _unwrap(reply.data(), "invoice"))

    def get_invoice_status(self, invoice_id: str, *, access_token_override: Optional[str] = None
                           ) -> CryptoInvoiceStatus:
        """The settlement status of invoice ``invoice_id``."""
        path = self._invoice_path(invoice_id, include_prefix=True) + "/status"
        reply = self._call("GET", path, token=access_token_override)
        return reply.parse(CryptoInvoiceStatus, reply.data())

    def reconcile(
        self,
        *,
        recon_token: Optional[str] = None,
        cursor: Optional[Any] = None,
        access_token_override: Optional[str] = None,
    ) -> CryptoReconcileJob:
        """Schedule a reconciliation from ``cursor``; ``recon_token`` goes in ``X-Recon-Token``."""
        headers = {"X-Recon-Token": recon_token} if recon_token else None
        body = {"cursor": cursor} if cursor is not None else {}
        reply = self._call("POST", self.CRYPTO_PREFIX + "/reconcile", body=body,
                           headers=headers, token=access_token_override)
        return reply.parse(CryptoReconcileJob, reply.data())


def _subscription(reply: _Reply, subscription_id: str) -> SubscriptionDetail:
    """A subscription reply, keeping the id asked for when the reply names none."""
    return reply.parse(SubscriptionDetail, {"subscription_id": subscription_id,
                                            **_unwrap(reply.data(), "subscription")})


def _paging(**filters: Any) -> List[Tuple[str, str]]:
    """Query pairs for the filters that are set; booleans as ``true``/``false``."""
    return [(key, ("true" if value else "false") if isinstance(value, bool) else str(value))
            for key, value in filters.items() if value is not None]


def _token_subject(token: Optional[str]) -> Optional[str]:
    """The ``sub`` claim of a JWT, or ``None`` when ``token`` is not one."""
    import base64
    import json

    parts = (token or "").split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except ValueError:  # binascii.Error, invalid UTF-8 and invalid JSON are all ValueErrors
        return None
    subject = claims.get("sub") if isinstance(claims, dict) else None
    return subject if isinstance(subject, str) and subject else None


def _decimal_text(amount: Union[str, int, float]) -> str:
    if isinstance(amount, bool) or not isinstance(amount, (str, int, float)):
        raise TypeError(f"amount must be a decimal string or number, got {type(amount).__name__}")
    if isinstance(amount, float):
        from decimal import Decimal

        return format(Decimal(repr(amount)), "f")  # never exponent notation such as 1e-07
    return str(amount)


class PaymentsClient(_Service):
    """Stripe checkouts, balance, payment intents, wallet deposits, subscriptions.

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
        self,
        *,
        price_id: str,
        mode: str,
        success_url: str,
        cancel_url: str,
        metadata: Optional[Dict[str, Any]] = None,
        require_legal_consent: Optional[bool] = None,
        legal_consent_text: Optional[str] = None,
        idempotency_key: Optional[str] = None,
        access_token_override: Optional[str] = None,
    ) -> CheckoutSession:
        """Start a Stripe checkout of one ``price_id``; send the user to ``checkout_url``.

        ``price_id`` must be a price that SPAPS manages (unknown ones raise
        ``PaymentsError`` 404 ``PRICE_NOT_FOUND``). ``require_legal_consent`` and
        ``legal_consent_text`` are sent in ``metadata``, where SPAPS keeps them with the
        session.
        """
        body: Dict[str, Any] = {"mode": mode, "line_items": [{"price_id": price_id,
                                                              "quantity": 1}],
                                "success_url": success_url, "cancel_url": cancel_url}
        tags = {**(metadata or {})}
        if require_legal_consent is not None:
            tags["require_legal_consent"] = "true" if require_legal_consent else "false"
        if legal_consent_text:
            tags["legal_consent_text"] = legal_consent_text
        if tags:
            body["metadata"] = tags
        reply = self._call("POST", "/api/stripe/checkout-sessions", body=body,
                           token=access_token_override, idempotency_key=idempotency_key,
                           headers={"Idempotency-Key": idempotency_key} if idempotency_key
                           else None)
        return reply.parse(CheckoutSession, _unwrap(reply.data(), "session"))

    def get_balance(self, *, access_token_override: Optional[str] = None) -> BalanceOverview:
        """The user's balance, tier and usage."""
        reply = self._stub("GET", "/api/payments/balance", access_token_override,
                           instead="payments are listed at GET /api/stripe/history")
        return reply.parse(BalanceOverview, reply.data())

    def create_payment_intent(
        self,
        *,
        amount: int,
        currency: str,
        payment_method_types: Optional[List[str]] = None,
        metadata: Optional[Dict[str, Any]] = None,
        idempotency_key: Optional[str] = None,
        access_token_override: Optional[str] = None,
    ) -> PaymentIntent:
        """Create a payment intent for ``amount`` minor units (cents) of ``currency``."""
        body: Dict[str, Any] = {"amount": amount, "currency": currency,
                                **_pick(payment_method_types=payment_method_types)}
        if metadata:
            body["metadata"] = metadata
        reply = self._stub("POST", "/api/payments/create-payment-intent", access_token_override,
                           instead="use create_checkout_session()", body=body,
                           idempotency_key=idempotency_key)
        return reply.parse(PaymentIntent, reply.data())

    def update_payment_method(
        self,
        *,
        payment_method_id: str,
        set_default: Optional[bool] = None,
        access_token_override: Optional[str] = None,
    ) -> PaymentMethodUpdateResult:
        """Attach payment method ``payment_method_id``, optionally as the default."""
        if not payment_method_id:
            raise ValueError("payment_method_id must not be empty")
        body = {"payment_method_id": payment_method_id, **_pick(set_default=set_default)}
        reply = self._stub("POST", "/api/payments/update-payment-method", access_token_override,
                           instead="send the user to the Stripe billing portal "
                           "(POST /api/stripe/portal-session)", body=body)
        return reply.parse(PaymentMethodUpdateResult, reply.data())

    def wallet_deposit(
        self,
        *,
        wallet_address: str,
        chain_type: str,
        transaction_id: str,
        amount: float,
        currency: str,
        tier: Optional[str] = None,
        idempotency_key: Optional[str] = None,
        access_token_override: Optional[str] = None,
    ) -> WalletDeposit:
        """Record an on-chain deposit ``transaction_id`` to the user's balance."""
        body: Dict[str, Any] = {
            "wallet_address": wallet_address, "chain_type": chain_type,
            "transaction_id": transaction_id, "amount": float(amount), "currency": currency,
        }
        if tier:
            body["tier"] = tier
        reply = self._stub("POST", "/api/payments/wallet-deposit", access_token_override,
                           instead="take crypto payments with payments.crypto.create_invoice()",
                           body=body, idempotency_key=idempotency_key)
        return reply.parse(WalletDeposit, reply.data())

    def get_wallet_transaction(self, *, transaction_id: str,
                               access_token_override: Optional[str] = None) -> WalletTransaction:
        """Wallet transaction ``transaction_id``."""
        path = "/api/payments/wallet-transaction/" + _segment(transaction_id, "transaction_id")
        reply = self._stub("GET", path, access_token_override,
                           instead="follow crypto payments with "
                           "payments.crypto.get_invoice_status()")
        return reply.parse(WalletTransaction, reply.data())

    def get_subscription(self, subscription_id: str, *,
                         access_token_override: Optional[str] = None) -> SubscriptionDetail:
        """Subscription ``subscription_id`` (``GET /api/stripe/subscription/{id}``)."""
        path = "/api/stripe/subscription/" + _segment(subscription_id, "subscription_id")
        reply = self._call("GET", path, token=access_token_override)
        return _subscription(reply, subscription_id)

    def cancel_subscription(
        self,
        subscription_id: str,
        *,
        cancel_at_period_end: Optional[bool] = None,
        immediately: Optional[bool] = None,
        access_token_override: Optional[str] = None,
    ) -> SubscriptionCancellation:
        """Cancel a subscription at the end of the period (the default) or at once
        (``immediately=True``, or the reference client's ``cancel_at_period_end=False``)."""
        if immediately is None:
            immediately = cancel_at_period_end is False
        elif cancel_at_period_end is not None and cancel_at_period_end == immediately:
            raise ValueError("cancel_at_period_end and immediately contradict each other")
        path = ("/api/stripe/subscription/" + _segment(subscription_id, "subscription_id")
                + "/cancel")
        reply = self._call("POST", path, body={"immediately": immediately},
                           token=access_token_override)
        return reply.parse(SubscriptionCancellation, {"subscription_id": subscription_id,
                                                      **_unwrap(reply.data(), "subscription")})

    def update_subscription(self, subscription_id: str, *, price_id: str,
                            access_token_override: Optional[str] = None) -> SubscriptionDetail:
        """Move subscription ``subscription_id`` to price ``price_id``."""
        path = ("/api/stripe/subscription/" + _segment(subscription_id, "subscription_id")
                + "/update")
        reply = self._call("POST", path, body={"price_id": price_id},
                           token=access_token_override)
        return _subscription(reply, subscription_id)

    def list_subscriptions(self, *, status: Optional[str] = None, limit: Optional[int] = None,
                           offset: Optional[int] = None,
                           access_token_override: Optional[str] = None) -> SubscriptionList:
        """The user's subscriptions, optionally only those in ``status``."""
        reply = self._call("GET", "/api/stripe/subscriptions", token=access_token_override,
                           query=_paging(status=status, limit=limit, offset=offset))
        return reply.parse(SubscriptionList, reply.data())

    def list_products(self, *, category: Optional[str] = None, active: Optional[bool] = None,
                      limit: Optional[int] = None, offset: Optional[int] = None,
                      access_token_override: Optional[str] = None) -> ProductList:
        """The application's products and their default prices."""
        reply = self._call("GET", "/api/stripe/products", token=access_token_override,
                           query=_paging(category=category, active=active, limit=limit,
                                         offset=offset))
        return reply.parse(ProductList, reply.data())

    def get_product(self, product_id: str, *, access_token_override: Optional[str] = None
                    ) -> Product:
        """Product ``product_id``."""
        reply = self._call("GET", "/api/stripe/products/" + _segment(product_id, "product_id"),
                           token=access_token_override)
        return reply.parse(Product, _unwrap(reply.data(), "product"))

    def list_checkout_sessions(self, *, limit: Optional[int] = None,
                               offset: Optional[int] = None,
                               access_token_override: Optional[str] = None
                               ) -> CheckoutSessionList:
        """The user's checkout sessions, newest first."""
        reply = self._call("GET", "/api/stripe/checkout-sessions", token=access_token_override,
                           query=_paging(limit=limit, offset=offset))
        return reply.parse(CheckoutSessionList, reply.data())

    def get_checkout_session(self, session_id: str, *,
                             access_token_override: Optional[str] = None) -> CheckoutSession:
        """Checkout session ``session_id`` and its payment status."""
        path = "/api/stripe/checkout-sessions/" + _segment(session_id, "session_id")
        reply = self._call("GET", path, token=access_token_override)
        return reply.parse(CheckoutSession, _unwrap(reply.data(), "session"))

    def expire_checkout_session(self, session_id: str, *,
                                access_token_override: Optional[str] = None
                                ) -> CheckoutSession:
        """End checkout session ``session_id`` before the user pays."""
        path = "/api/stripe/checkout-sessions/" + _segment(session_id, "session_id") + "/expire"
        reply = self._call("POST", path, token=access_token_override, body={})
        return reply.parse(CheckoutSession, {"session_id": session_id,
                                             **_unwrap(reply.data(), "session")})

    def create_portal_session(self, *, return_url: str,
                              access_token_override: Optional[str] = None) -> PortalSession:
        """A Stripe billing-portal session where the user manages cards and invoices."""
        reply = self._call("POST", "/api/stripe/portal-session", token=access_token_override,
                           body={"return_url": return_url})
        return reply.parse(PortalSession, {"return_url": return_url, **reply.data()})

    def list_payment_history(self, *, status: Optional[str] = None, limit: Optional[int] = None,
                             offset: Optional[int] = None,
                             access_token_override: Optional[str] = None) -> PaymentHistory:
        """The user's payments, newest first."""
        reply = self._call("GET", "/api/stripe/history", token=access_token_override,
                           query=_paging(status=status, limit=limit, offset=offset))
        return reply.parse(PaymentHistory, reply.data())

    def _stub(self, method: str, path: str, token: Optional[str], *, instead: str,
              **options: Any) -> _Reply:
        """Call a route of the reference client that SPAPS 0.6 serves as a 501 stub.

        A server that implements it is still used; one that does not gets an error
        that says so and what to use instead, rather than "Feature not yet available".
        """
        try:
            return self._call(method, path, token=token, **options)
        except PaymentsError as exc:
            if exc.status_code != 501:
                raise
            exc.message = (f"{method} {path} is not available on this SPAPS server "
                           f"(501 Not Implemented); {instead}")
            exc.args = (exc.message,)
            raise


class UsageClient(_Service):
    """Metered feature usage (``/api/usage``)."""

    USAGE_PREFIX = "/api/usage"
    _error = UsageError
    _label = "Usage"

    def get_features(self, *, access_token_override: Optional[str] = None
                     ) -> UsageFeaturesResponse:
        """The user's metered features and their usage."""
        reply = self._call("GET", "/api/usage/features", token=access_token_override)
        return reply.parse(UsageFeaturesResponse, reply.data())

    def authorize_usage(
        self,
        *,
        feature_key: str,
        dimensions: Mapping[str, Union[int, float]],
        resource_type: str = "user",
        resource_id: Optional[str] = None,
        subject_user_id: Optional[str] = None,
        metadata: Optional[Dict[str, Any]] = None,
        access_token_override: Optional[str] = None,
    ) -> UsageAuthorization:
        """Ask whether ``dimensions`` of ``feature_key`` may be used now (nothing is counted).

        Record the use afterwards with ``record_usage(authorization_ref=...)``; the
        reference stays valid for a few minutes (``expires_at``).
        """
        body = {"feature_key": feature_key, "resource_type": resource_type,
                "dimensions": dict(dimensions), **_pick(
                    resource_id=resource_id,
                    subject_user_id=self._subject(resource_type, subject_user_id,
                                                  access_token_override),
                    metadata=metadata)}
        reply = self._call("POST", "/api/usage/authorize", body=body,
                           token=access_token_override)
        return reply.parse(UsageAuthorization, reply.data())

    def get_usage_status(
        self,
        *,
        feature_key: str,
        resource_type: str = "user",
        resource_id: Optional[str] = None,
        subject_user_id: Optional[str] = None,
        access_token_override: Optional[str] = None,
    ) -> UsageAuthorization:
        """Where ``feature_key`` stands now (decision, window totals, remaining), without
        authorizing anything: the result has no ``authorization_ref``."""
        query = _paging(feature_key=feature_key, resource_type=resource_type,
                        resource_id=resource_id,
                        subject_user_id=self._subject(resource_type, subject_user_id,
                                                      access_token_override))
        reply = self._call("GET", "/api/usage/status", auth=_OPTIONAL_BEARER,
                           token=access_token_override, query=query)
        return reply.parse(UsageAuthorization, reply.data())

    def record_usage(
        self,
        *,
        feature: str,
        quantity: Optional[Union[int, float]] = None,
        metadata: Optional[Dict[str, Any]] = None,
        timestamp: Optional[str] = None,
        idempotency_key: Optional[str] = None,
        access_token_override: Optional[str] = None,
        dimensions: Optional[Mapping[str, Union[int, float]]] = None,
        authorization_ref: Optional[str] = None,
        resource_type: str = "user",
        resource_id: Optional[str] = None,
        subject_user_id: Optional[str] = None,
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
        if not idempotency_key:  # "" would make every later record a replay of the first
            import uuid

            idempotency_key = "spaps-" + uuid.uuid4().hex
        body = {"authorization_ref": authorization_ref, "idempotency_key": idempotency_key,
                "feature_key": feature, "resource_type": resource_type,
                "dimensions": dict(dimensions), **_pick(
                    resource_id=resource_id,
                    subject_user_id=self._subject(resource_type, subject_user_id,
                                                  access_token_override),
                    metadata=metadata, occurred_at=timestamp)}
        reply = self._record(body, idempotency_key, access_token_override,
                             own_authorization=authorization is not None)
        data = reply.data()
        totals = _object_at(data, "window_totals")
        current: Dict[str, Any] = {}
        if quantity is not None and len(dimensions) == 1:
            (name,) = dimensions
            used = totals.get(name)
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
                return self._call("POST", "/api/usage/record", body=body, token=token,
                                  idempotency_key=idempotency_key)
            except UsageError as exc:
                if not own_authorization or exc.error_code != "USAGE_AUTHORIZATION_EXPIRED":
                    raise
            time.sleep(pause)  # the record is keyed: sending it again cannot count twice
            pause *= 2
        return self._call("POST", "/api/usage/record", body=body, token=token,
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
                raise ValueError(f"feature {feature!r} is metered in "
                                 f"{len(known.dimensions)} dimensions "
                                 f"({', '.join(known.dimensions) or 'none'}): pass dimensions=")
            cache[feature] = known.dimensions[0]
        return cache[feature]

    def get_history(
        self,
        *,
        period: Optional[str] = None,
        start_date: Optional[str] = None,
        end_date: Optional[str] = None,
        feature: Optional[str] = None,
        format: Optional[str] = None,
        limit: Optional[int] = None,
        offset: Optional[int] = None,
        access_token_override: Optional[str] = None,
    ) -> UsageHistoryResponse:
        """Recorded usage events (``events``; ``has_more``/``next_offset`` page them),
        filtered by ``feature``; ``period``, ``start_date``, ``end_date`` and ``format``
        are sent for servers that filter by them."""
        filters = {"feature_key": feature, "period": period, "start_date": start_date,
                   "end_date": end_date, "format": format,
                   "limit": None if limit is None else str(limit),
                   "offset": None if offset is None else str(offset)}
        query = [(key, value) for key, value in filters.items() if value]
        reply = self._call("GET", "/api/usage/history", token=access_token_override, query=query)
        return reply.parse(UsageHistoryResponse, reply.data())


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
                           query=_paging(user_id=user_id or None, email=email,
                                         entitlement_key=entitlement_key,
                                         resource_type=resource_type, resource_id=resource_id))
        granted = reply.data().get("has_entitlement")
        if not isinstance(granted, bool):
            raise reply.invalid("the reply has no has_entitlement")
        return granted

    def get_user_entitlements(
        self,
        *,
        user_id: Optional[str] = None,
        email: Optional[str] = None,
        entitlement_key: Optional[str] = None,
        include_expired: bool = False,
        include_revoked: bool = False,
        limit: Optional[int] = None,
        offset: Optional[int] = None,
        resource_type: Optional[str] = None,
        resource_id: Optional[str] = None,
    ) -> List[Entitlement]:
        """The entitlements of a user given by ``user_id`` or ``email``."""
        if not user_id and not email:
            raise ValueError("get_user_entitlements needs user_id or email")
        query = _paging(user_id=user_id or None, email=email or None,
                        entitlement_key=entitlement_key or None,
                        include_expired=True if include_expired else None,
                        include_revoked=True if include_revoked else None,
                        limit=limit, offset=offset, resource_type=resource_type,
                        resource_id=resource_id)
        reply = self._call("GET", self.ENTITLEMENTS_PREFIX, auth=_OPTIONAL_BEARER, query=query)
        items = reply.data().get("entitlements") or []
        if not isinstance(items, list):
            raise reply.invalid(f"'entitlements' is {_kind(items)}, expected a list")
        return [reply.parse(Entitlement, item) for item in items]

    def grant_manual(
        self,
        params: Optional[ManualGrantParams] = None,
        *,
        entitlement_key: Optional[str] = None,
        beneficiary_user_id: Optional[str] = None,
        beneficiary_email: Optional[str] = None,
        starts_at: Optional[str] = None,
        ends_at: Optional[str] = None,
        reason: Optional[str] = None,
        metadata: Optional[Dict[str, Any]] = None,
        resource_type: Optional[str] = None,
        resource_id: Optional[str] = None,
        access_token: Optional[str] = None,
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
        body = {"entitlement_key": params.entitlement_key, **_pick(
            beneficiary_user_id=params.beneficiary_user_id or None,
            beneficiary_email=params.beneficiary_email or None,
            starts_at=params.starts_at or None, ends_at=params.ends_at or None,
            reason=params.reason or None, metadata=params.metadata or None,
            resource_type=params.resource_type or None, resource_id=params.resource_id or None)}
        reply = self._call("POST", self.ENTITLEMENTS_PREFIX + "/manual", token=access_token,
                           body=body)
        return reply.parse(Entitlement, _unwrap(reply.data(), "entitlement"))

    def revoke(self, entitlement_id: str, *, reason: Optional[str] = None,
               access_token: Optional[str] = None) -> Optional[Entitlement]:
        """Revoke entitlement ``entitlement_id`` (admins only); SPAPS 0.6 answers 204, so
        the result is ``None`` unless the server returns the revoked entitlement."""
        path = self.ENTITLEMENTS_PREFIX + "/" + _segment(entitlement_id, "entitlement_id")
        reply = self._call("DELETE", path, token=access_token,
                           query=_paging(reason=reason or None))
        data = _unwrap(reply.data(), "entitlement")
        return reply.parse(Entitlement, data) if data else None

    def claim_pending(self, *, access_token: Optional[str] = None) -> EntitlementClaimResult:
        """Take over entitlements bought for the signed-in user's e-mail before sign-up."""
        reply = self._call("POST", self.ENTITLEMENTS_PREFIX + "/claim", token=access_token,
                           body={})
        data = reply.data()
        claimed = data.get("claimed")
        return reply.parse(EntitlementClaimResult, {
            **data, "count": data.get("count", len(claimed) if isinstance(claimed, list) else 0)})


class WhitelistClient(_Service):
    """The application's email whitelist (``/api/v1/whitelist``)."""

    WHITELIST_PREFIX = "/api/v1/whitelist"
    _error = WhitelistError
    _label = "Whitelist"

    def check(self, *, email: str) -> WhitelistCheckResult:
        """Whether ``email`` is whitelisted (sends the API key only, never a token)."""
        reply = self._call("GET", self.WHITELIST_PREFIX + "/check", auth=_KEY,
                           query=[("email", email)])
        data = self._data(reply)
        entry = data.get("entry") if isinstance(data.get("entry"), dict) else None
        return reply.parse(WhitelistCheckResult, {
            "message": reply.first_text(data.get("message"), reply.body.get("message")),
            "entry": entry,
        })

    def list(
        self,
        *,
        limit: int = 10,
        offset: int = 0,
        tier: Optional[str] = None,
        access_token_override: Optional[str] = None,
    ) -> WhitelistListResult:
        """A page of whitelist entries."""
        query = [("limit", str(limit)), ("offset", str(offset))]
        if tier:
            query.append(("tier", tier))
        reply = self._call("GET", self.WHITELIST_PREFIX, token=access_token_override,
                           query=query)
        return reply.parse(WhitelistListResult, self._data(reply))

    def add(
        self,
        *,
        email: str,
        tier: str = "premium",
        bypass_payment: bool = True,
        metadata: Optional[Dict[str, Any]] = None,
        access_token_override: Optional[str] = None,
    ) -> WhitelistEntry:
        """Whitelist ``email`` at ``tier``."""
        body = {"email": email, "tier": tier, "bypass_payment": bypass_payment,
                **_pick(metadata=metadata)}
        reply = self._call("POST", self.WHITELIST_PREFIX, body=body,
                           token=access_token_override)
        return reply.parse(WhitelistEntry, self._data(reply).get("entry"))

    def update(
        self,
        *,
        email: str,
        tier: Optional[str] = None,
        bypass_payment: Optional[bool] = None,
        metadata: Optional[Dict[str, Any]] = None,
        access_token_override: Optional[str] = None,
    ) -> WhitelistEntry:
        """Change the tier, payment bypass or metadata of ``email``'s entry."""
        body = _pick(tier=tier, bypass_payment=bypass_payment, metadata=metadata)
        reply = self._call("PUT", self.WHITELIST_PREFIX + "/" + _segment(email, "email"),
                           body=body, token=access_token_override)
        return reply.parse(WhitelistEntry, self._data(reply).get("entry"))

    def remove(self, *, email: str, access_token_override: Optional[str] = None
               ) -> WhitelistMessage:
        """Remove ``email`` from the whitelist."""
        reply = self._call("DELETE", self.WHITELIST_PREFIX + "/" + _segment(email, "email"),
                           token=access_token_override)
        # SPAPS answers 204 with no body.
        return reply.parse(WhitelistMessage, {"message": reply.first_text(
            self._data(reply).get("message"), reply.body.get("message"),
        ) or f"{email} was removed from the whitelist"})

    @staticmethod
    def _data(reply: _Reply) -> Dict[str, Any]:
        data = reply.body.get("data")
        return data if isinstance(data, dict) else {}


class SecureMessagesClient(_Service):
    """Secure patient/practitioner messages (``/api/secure-messages``)."""

    SECURE_MESSAGES_PREFIX = "/api/secure-messages"
    _error = SecureMessagesError
    _label = "Secure message"

    def create_message(
        self,
        *,
        patient_id: str,
        practitioner_id: str,
        content: str,
        metadata: Optional[Dict[str, Any]] = None,
        idempotency_key: Optional[str] = None,
        access_token_override: Optional[str] = None,
    ) -> SecureMessage:
        """Store a message (request keys go out camelCase: ``patientId``, ``practitionerId``)."""
        body = {"patientId": patient_id, "practitionerId": practitioner_id, "content": content,
                **_pick(metadata=metadata)}
        reply = self._call("POST", self.SECURE_MESSAGES_PREFIX, auth=_OPTIONAL_BEARER, body=body,
                           token=access_token_override, idempotency_key=idempotency_key)
        return reply.parse(SecureMessage, reply.data())

    def list_messages(self, *, access_token_override: Optional[str] = None
                      ) -> List[SecureMessage]:
        """The application's messages, oldest first."""
        reply = self._call("GET", self.SECURE_MESSAGES_PREFIX, auth=_OPTIONAL_BEARER,
                           token=access_token_override)
        data = reply.data()
        messages = data.get("messages", [])
        if not isinstance(messages, list):
            raise reply.invalid(f"'messages' is {_kind(messages)}, expected a list")
        return [reply.parse(SecureMessage, item) for item in messages]


class MetricsClient(_Service):
    """Health, readiness and metrics endpoints; they need no API key or token."""

    _error = MetricsError
    _label = "Metrics"

    def __init__(
        self,
        /,
        *,
        base_url: str,
        client: Optional[RetryClient] = None,
        request_timeout: float = DEFAULT_TIMEOUT,
        **options: Any,
    ) -> None:
        super().__init__(base_url=base_url, api_key="", client=client,
                         request_timeout=request_timeout, **options)

    def get_prometheus_metrics(self) -> str:
        """The Prometheus exposition text from ``/api/metrics``."""
        result = self._send("GET", self.base_url + "/api/metrics", _NONE, None, None,
                            {"Accept": "text/plain"}, None)
        if result.status >= 300:
            raise self._status_error(result, [])
        if result.body is None:
            raise _Reply(self, result, {}).invalid(f"the body exceeds {_MAX_BODY} bytes")
        return result.body.decode("utf-8", "replace")

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


# --- The async surface, derived from the sync services ---

_executor_lock = _thread.allocate_lock()
_shared_executor: Optional[ThreadPoolExecutor] = None
ASYNC_WORKERS = 64
"""Worker threads shared by all async clients (a call occupies one while it runs)."""


def _async_executor() -> ThreadPoolExecutor:
    # Our own pool: the loop's default executor would cap concurrency at cpu_count + 4.
    global _shared_executor
    with _executor_lock:
        if _shared_executor is None:
            from concurrent.futures import ThreadPoolExecutor

            _shared_executor = ThreadPoolExecutor(ASYNC_WORKERS, thread_name_prefix="spaps")
        return _shared_executor


async def _in_thread(function: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    import asyncio
    import contextvars
    import functools

    call = functools.partial(contextvars.copy_context().run, function, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(_async_executor(), call)


if TYPE_CHECKING and sys.version_info < (3, 10):
    # What a checker targeting 3.9 sees: results typed, parameters not (no ParamSpec).
    def _async_twin(method: Callable[..., _T]) -> Callable[..., Coroutine[None, None, _T]]: ...

    def _keywords_of(
        source: Callable[..., _T],
    ) -> Callable[[Callable[..., _T]], Callable[..., _T]]: ...

else:

    def _async_twin(
        method: Callable[Concatenate[_S, _P], _T],
    ) -> Callable[Concatenate[_AsyncService[_S], _P], Coroutine[None, None, _T]]:
        """The async form of a sync service method: the same call, run in a worker thread."""
        name = method.__name__

        async def twin(self: _AsyncService[_S], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
            return await _in_thread(getattr(self._sync, name), *args, **kwargs)

        twin.__name__ = twin.__qualname__ = name
        twin.__doc__ = method.__doc__
        return twin

    def _keywords_of(
        source: Callable[Concatenate[Any, _P], _T],
    ) -> Callable[[Callable[..., _T]], Callable[Concatenate[Any, _P], _T]]:
        """Give a ``**options`` forwarder the exact signature of the method it forwards to."""

        def apply(forwarder: Callable[..., _T]) -> Callable[Concatenate[Any, _P], _T]:
            forwarder.__doc__ = forwarder.__doc__ or source.__doc__
            return forwarder

        return apply


class _AsyncService(_GenericBase["_S"]):
    """Base of the async service clients: wraps the sync client of the same service.

    The constructor takes the same keywords as the sync class.
    """

    _sync_class: ClassVar[Type[_Service]]
    _sync: _S

    def __init__(self, **kwargs: Any) -> None:
        self._sync = self._sync_class(**kwargs)  # type: ignore[assignment]

    @classmethod
    def _wrap(cls: Type[_A], sync: Any) -> _A:
        service = cls.__new__(cls)
        service._sync = sync
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
        """Close the HTTP client if this service created it."""
        self._sync.close()

    async def __aenter__(self: _T) -> _T:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r})"


class AsyncAuthClient(_AsyncService[AuthClient]):
    """Async ``AuthClient``: same constructor keywords, every method awaitable."""

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
    """Async ``SessionsClient``: same constructor keywords, every method awaitable."""

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
    """Async ``PaymentsClient``: same constructor keywords, every method awaitable."""

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
        """Crypto invoices, sharing this client's transport and token."""
        return AsyncCryptoPaymentsClient._wrap(self._sync.crypto)


class AsyncUsageClient(_AsyncService[UsageClient]):
    """Async ``UsageClient``: same constructor keywords, every method awaitable."""

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
    """Async ``EntitlementsClient``: same constructor keywords, every method awaitable."""

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
    """Async ``WhitelistClient``: same constructor keywords, every method awaitable."""

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
    """Async ``SecureMessagesClient``: same constructor keywords, every method awaitable."""

    _sync_class = SecureMessagesClient

    @_keywords_of(SecureMessagesClient.__init__)
    def __init__(self, **options: Any) -> None:
        super().__init__(**options)

    SECURE_MESSAGES_PREFIX = SecureMessagesClient.SECURE_MESSAGES_PREFIX
    create_message = _async_twin(SecureMessagesClient.create_message)
    list_messages = _async_twin(SecureMessagesClient.list_messages)


class AsyncMetricsClient(_AsyncService[MetricsClient]):
    """Async ``MetricsClient``: same constructor keywords, every method awaitable."""

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


def verify_crypto_webhook_signature(
    *,
    body: Union[bytes, bytearray, str],
    signature: str,
    secret: str,
    tolerance_seconds: int = 300,
) -> bool:
    """Check a crypto webhook's ``t=<unix>,v1=<hex hmac>`` signature header.

    ``body`` must be the raw request body. Several ``v1`` values may be given
    (during a secret rotation); one match suffices. The timestamp must lie
    within ``tolerance_seconds`` of now, in the past or the future, so a
    captured webhook cannot be replayed later. Returns ``True``; every failure
    raises ``WebhookVerificationError`` (a ``ValueError``).
    """
    import hashlib
    import hmac

    if not signature:
        raise WebhookVerificationError("missing webhook signature", "MISSING_SIGNATURE")
    if tolerance_seconds <= 0:
        raise ValueError("tolerance_seconds must be positive; replay protection cannot be off")
    timestamp = None
    candidates: List[str] = []
    for part in signature.split(","):
        key, _, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if key == "t" and value:
            timestamp = value
        elif key == "v1" and value:
            candidates.append(value)
    if timestamp is None or not candidates:
        raise WebhookVerificationError("invalid signature header format", "INVALID_FORMAT")
    if isinstance(body, str):
        raw = body.encode("utf-8")
    elif isinstance(body, (bytes, bytearray)):
        raw = bytes(body)
    else:
        raise ValueError("body must be the raw request body (bytes or str), not parsed JSON")
    expected = hmac.new(secret.encode("utf-8"), timestamp.encode() + b"." + raw,
                        hashlib.sha256).digest()
    matched = False
    for candidate in candidates:
        try:
            given = bytes.fromhex(candidate)
        except ValueError:
            continue
        matched |= hmac.compare_digest(given, expected)
    if not matched:
        raise WebhookVerificationError("webhook signature does not match", "INVALID_SIGNATURE")
    try:
        sent_at = int(timestamp)
    except ValueError:
        raise WebhookVerificationError("signature timestamp is not an integer",
                                       "INVALID_FORMAT") from None
    if abs(time.time() - sent_at) > tolerance_seconds:
        raise WebhookVerificationError("signature timestamp outside the tolerance window",
                                       "TIMESTAMP_OUT_OF_TOLERANCE")
    return True


def verify_spaps_webhook(
    body: Union[bytes, str],
    signature: str,
    secret: str,
    *,
    max_age_seconds: int = 300,
    timestamp: Optional[int] = None,
) -> SpapsWebhookPayload:
    """Verify a SPAPS webhook (header ``X-SPAPS-Signature``) and return its payload.

    The header must be exactly ``t=<digits>,v1=<64 lowercase hex>``. Events
    older than ``max_age_seconds``, or dated more than that into the future
    (clock skew), are rejected before the HMAC is checked. ``timestamp``
    replaces "now" in tests. Failures raise ``WebhookVerificationError`` with
    ``code`` one of ``INVALID_FORMAT``, ``TIMESTAMP_FUTURE``,
    ``SIGNATURE_EXPIRED``, ``INVALID_SIGNATURE``, ``INVALID_JSON``,
    ``INVALID_PAYLOAD``.
    """
    import hashlib
    import hmac
    import json
    import re

    match = re.fullmatch(r"t=(\d+),v1=([0-9a-f]{64})", signature or "")
    if match is None:
        raise WebhookVerificationError("invalid X-SPAPS-Signature format", "INVALID_FORMAT")
    sent_at, given = int(match.group(1)), match.group(2)
    now = int(time.time()) if timestamp is None else timestamp
    if sent_at - now > max_age_seconds:
        raise WebhookVerificationError("webhook timestamp is in the future", "TIMESTAMP_FUTURE")
    if now - sent_at > max_age_seconds:
        raise WebhookVerificationError("webhook signature expired", "SIGNATURE_EXPIRED")
    raw = body.encode("utf-8") if isinstance(body, str) else bytes(body)
    expected = hmac.new(secret.encode("utf-8"), match.group(1).encode() + b"." + raw,
                        hashlib.sha256).hexdigest()
    if not hmac.compare_digest(given, expected):
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


def generate_test_signature(
    payload: Mapping[str, Any], secret: str, timestamp: Optional[int] = None
) -> str:
    """Sign ``json.dumps(payload)`` as SPAPS would; returns the header value (for tests)."""
    import hashlib
    import hmac
    import json

    sent_at = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode("utf-8"), f"{sent_at}.{json.dumps(payload)}".encode(),
                      hashlib.sha256).hexdigest()
    return f"t={sent_at},v1={digest}"


# =============================================================================
# Aggregate clients
# =============================================================================


class SpapsClient:
    """The whole SPAPS API behind one object, sharing connections and tokens.

    ``auth`` signs in and stores tokens in ``token_storage`` (in memory unless
    given); ``sessions``, ``payments``, ``usage``, ``whitelist``,
    ``secure_messages`` and ``metrics`` use them. Access tokens are refreshed
    automatically shortly before they expire and once after a 401
    (``auto_refresh=False`` turns this off). ``app_info`` (e.g.
    ``"billing-worker/1.4"``) is appended to the User-Agent, so SPAPS and its
    logs can tell your services apart. Use it as a context manager or call
    ``close()``.
    """

    def __init__(
        self,
        *,
        base_url: Optional[str] = None,
        api_key: Optional[str] = None,
        request_timeout: Optional[float] = None,
        token_storage: Optional[TokenStorage] = None,
        http_client: Optional[RetryClient] = None,
        retry_config: Optional[Union[RetryConfig, Mapping[str, Any]]] = None,
        logging_hooks: Optional[Union[LoggingHooks, Mapping[str, Any]]] = None,
        ssl_context: Optional[ssl.SSLContext] = None,
        allow_insecure_http: bool = False,
        auto_refresh: bool = True,
        app_info: Optional[str] = None,
    ) -> None:
        self.settings = Settings(base_url=base_url, api_key=api_key,
                                 request_timeout=request_timeout)
        self._token_storage = token_storage if token_storage is not None else (
            InMemoryTokenStorage()
        )
        if http_client is None:
            http = create_http_client(
                settings=self.settings, retry_config=retry_config, logging_hooks=logging_hooks,
                ssl_context=ssl_context, allow_insecure_http=allow_insecure_http,
                app_info=app_info,
            )
        else:
            if (retry_config is not None or logging_hooks is not None
                    or ssl_context is not None or allow_insecure_http or app_info is not None):
                raise ValueError("retry_config, logging_hooks, ssl_context, "
                                 "allow_insecure_http and app_info belong to the http_client "
                                 "you pass; configure them there")
            http = http_client
        self._owns_http = http_client is None
        self._http = http
        tokens = _StoredTokenSource(self._token_storage)
        self._tokens = tokens
        self._ctx = _Context(http, http.base_url or self.settings.base_url,
                             self.settings.api_key, tokens)
        self._auth = AuthClient._attached(self._ctx)
        if auto_refresh:
            tokens.refresh = self._refresh
        self._services: Dict[type, Any] = {}

    def _refresh(self, refresh_token: str) -> StoredTokens:
        self._auth.refresh_tokens(refresh_token=refresh_token)
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
            self._http.close()

    @property
    def token_storage(self) -> TokenStorage:
        """Where tokens are kept."""
        return self._token_storage

    @property
    def http_client(self) -> RetryClient:
        """The shared HTTP client."""
        return self._http

    @property
    def auth(self) -> AuthClient:
        """Sign-in, registration, tokens (usable without tokens)."""
        return self._auth

    @property
    def sessions(self) -> SessionsClient:
        """Sessions; raises ``ValueError`` until tokens are stored."""
        self._require_tokens()
        return self._service(SessionsClient)

    @property
    def payments(self) -> PaymentsClient:
        """Payments and ``payments.crypto``; raises ``ValueError`` until tokens are stored."""
        self._require_tokens()
        return self._service(PaymentsClient)

    @property
    def usage(self) -> UsageClient:
        """Usage metering; raises ``ValueError`` until tokens are stored."""
        self._require_tokens()
        return self._service(UsageClient)

    @property
    def secure_messages(self) -> SecureMessagesClient:
        """Secure messages; raises ``ValueError`` until tokens are stored."""
        self._require_tokens()
        return self._service(SecureMessagesClient)

    @property
    def whitelist(self) -> WhitelistClient:
        """The whitelist (``check`` works without tokens; the rest needs them)."""
        return self._service(WhitelistClient)

    @property
    def entitlements(self) -> EntitlementsClient:
        """Entitlements (lookups work without tokens; grants need an admin's)."""
        return self._service(EntitlementsClient)

    @property
    def metrics(self) -> MetricsClient:
        """Health and metrics (no credentials sent)."""
        return self._service(MetricsClient)

    def get_tokens(self) -> Optional[StoredTokens]:
        """The stored tokens, or ``None`` (tokens the storage failed to save count)."""
        return self._tokens.load()

    def set_tokens(
        self,
        *,
        access_token: str,
        refresh_token: Optional[str] = None,
        token_type: str = "Bearer",  # noqa: S107 - a token type, not a secret
        expires_in: Optional[int] = None,
        expires_at: Optional[datetime] = None,
    ) -> None:
        """Store tokens obtained elsewhere; ``expires_at`` wins over ``expires_in``."""
        tokens = _tokens_from(access_token, refresh_token, expires_in, token_type)
        if expires_at is not None:
            tokens.expires_at = expires_at
        self._tokens.save(tokens)

    def clear_tokens(self) -> None:
        """Forget the stored tokens."""
        self._tokens.clear()

    def _require_tokens(self) -> None:
        tokens = self._tokens.load()
        if tokens is None or not tokens.access_token:
            raise ValueError(
                "No access token found: authenticate with client.auth (for example "
                "sign_in_with_password) or call set_tokens() first"
            )

    def _service(self, kind: Type[_S]) -> _S:
        service = self._services.get(kind)
        if service is None:
            service = self._services.setdefault(kind, kind._attached(self._ctx))
        return service  # type: ignore[no-any-return]


class AsyncSpapsClient:
    """The async ``SpapsClient``: the same keywords and properties, awaitable calls.

    Calls run in a pool of worker threads (``ASYNC_WORKERS``) over the same
    keep-alive connections; use ``async with`` or ``await aclose()``.
    """

    @_keywords_of(SpapsClient.__init__)
    def __init__(self, **options: Any) -> None:
        self._sync = SpapsClient(**options)
        self._wrapped: Dict[str, Any] = {}

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
        """Close pooled connections (only of an HTTP client this object created)."""
        self._sync.close()

    @property
    def auth(self) -> AsyncAuthClient:
        """Sign-in, registration, tokens (usable without tokens)."""
        return self._wrap("auth", AsyncAuthClient)

    @property
    def sessions(self) -> AsyncSessionsClient:
        """Sessions; raises ``ValueError`` until tokens are stored."""
        return self._wrap("sessions", AsyncSessionsClient)

    @property
    def payments(self) -> AsyncPaymentsClient:
        """Payments and ``payments.crypto``; raises ``ValueError`` until tokens are stored."""
        return self._wrap("payments", AsyncPaymentsClient)

    @property
    def usage(self) -> AsyncUsageClient:
        """Usage metering; raises ``ValueError`` until tokens are stored."""
        return self._wrap("usage", AsyncUsageClient)

    @property
    def secure_messages(self) -> AsyncSecureMessagesClient:
        """Secure messages; raises ``ValueError`` until tokens are stored."""
        return self._wrap("secure_messages", AsyncSecureMessagesClient)

    @property
    def whitelist(self) -> AsyncWhitelistClient:
        """The whitelist (``check`` works without tokens; the rest needs them)."""
        return self._wrap("whitelist", AsyncWhitelistClient)

    @property
    def entitlements(self) -> AsyncEntitlementsClient:
        """Entitlements (lookups work without tokens; grants need an admin's)."""
        return self._wrap("entitlements", AsyncEntitlementsClient)

    @property
    def metrics(self) -> AsyncMetricsClient:
        """Health and metrics (no credentials sent)."""
        return self._wrap("metrics", AsyncMetricsClient)

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

    def _wrap(self, name: str, kind: Type[_A]) -> _A:
        sync = getattr(self._sync, name)  # performs the same token check as the sync client
        wrapped = self._wrapped.get(name)
        if wrapped is None:
            wrapped = self._wrapped.setdefault(name, kind._wrap(sync))
        assert isinstance(wrapped, kind)
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
    import argparse

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
        return _print_error(args.json, EXIT_UNREACHABLE, f"SPAPS unreachable: {exc}", exc)
    except (SpapsConfigurationError, ValueError) as exc:
        return _print_error(args.json, EXIT_USAGE, str(exc).replace(
            "allow_insecure_http=True", "--allow-insecure-http"))
    except SpapsError as exc:
        code = EXIT_NOT_SIGNED_IN if exc.status_code == 401 else EXIT_FAILED
        return _print_error(args.json, code, str(exc), exc)


def _run_command(client: SpapsClient, storage: FileTokenStorage, command: str,
                 as_json: bool) -> int:
    import json

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
    import json

    def encode(value: Any) -> Any:
        if isinstance(value, datetime):
            return value.isoformat()
        return str(value)

    return json.dumps(document, default=encode, indent=2)


if __name__ == "__main__":
    raise SystemExit(main())
