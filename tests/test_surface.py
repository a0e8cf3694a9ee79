"""The public surface: the reference client's exports, error classes, constructors and
constants (docs/compatibility.md, docs/api.md), and no sync/async twin code in
``spaps_client.py``: each coroutine runs the matching sync method (docs/async.md, "How a call
runs")."""

from __future__ import annotations

import ast
import inspect
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import pytest
from conftest import API_KEY, DEMO_EMAIL, DEMO_PASSWORD, ROOT
from service_twin import (
    _PLAIN_METHODS,
    SURFACES,
    Twin,
    aggregate,
    assert_auth,
    close,
    demo_token,
    last_request,
    standalone,
)

import spaps_client
from spaps_client import (
    HttpRequest,
    InMemoryTokenStorage,
    PaymentsError,
    RetryClient,
    Settings,
    SpapsError,
)
from spaps_mock import ADMIN_EMAIL, ADMIN_PASSWORD, MockServer

# The 72 names of the reference client 0.1.2's ``__all__`` (docs/compatibility.md: the same
# names as the reference client).
REFERENCE_ALL = [
    "__version__",
    "SpapsClient", "AsyncSpapsClient",
    "AuthClient", "SessionsClient", "PaymentsClient", "CryptoPaymentsClient", "UsageClient",
    "WhitelistClient", "SecureMessagesClient", "MetricsClient",
    "AsyncAuthClient", "AsyncSessionsClient", "AsyncPaymentsClient", "AsyncCryptoPaymentsClient",
    "AsyncUsageClient", "AsyncWhitelistClient", "AsyncSecureMessagesClient", "AsyncMetricsClient",
    "AuthError", "SessionError", "PaymentsError", "CryptoPaymentsError", "UsageError",
    "WhitelistError", "SecureMessagesError",
    "NonceResponse", "TokenPair", "TokenUser",
    "SessionSummary", "SessionValidationResult", "SessionListResult", "SessionRecord",
    "SessionTouchResult", "SessionRevokeResult",
    "CheckoutSession", "PaymentIntent", "WalletDeposit", "WalletTransaction", "SubscriptionPlan",
    "SubscriptionDetail", "SubscriptionCancellation", "BalanceOverview", "BalanceAmounts",
    "UsageSummary", "PaymentMethodUpdateResult",
    "CryptoInvoice", "CryptoInvoiceStatus", "CryptoReconcileJob",
    "UsagePeriod", "UsageFeature", "UsageFeaturesResponse", "UsageRecordUsage",
    "UsageRecordResult", "UsageHistoryEntry", "UsageHistoryResponse",
    "WhitelistEntry", "WhitelistCheckResult", "WhitelistListResult", "WhitelistMessage",
    "SecureMessage",
    "Settings", "create_http_client", "RetryConfig", "LoggingHooks", "default_logging_hooks",
    "RetryAsyncClient",
    "StoredTokens", "TokenStorage", "InMemoryTokenStorage", "FileTokenStorage",
    "verify_crypto_webhook_signature",
]

# Names added beyond the reference client for the real SPAPS usage API (authorize, then record).
SPAPS_ADDITIONS = ["UsageAuthorization", "UsageReason", "UsageWindow", "UsageEvent"]


@pytest.mark.parametrize("name", SPAPS_ADDITIONS)
def test_spaps_usage_models_are_exported(name: str) -> None:
    assert name in spaps_client.__all__
    assert isinstance(getattr(spaps_client, name), type)


# (service, method, the 0.1.2 keywords in their order, keywords added for SPAPS 0.6.6)
METHOD_KEYWORDS: List[Tuple[str, str, List[str], List[str]]] = [
    ("AuthClient", "logout", ["access_token"], ["refresh_token"]),
    ("SessionsClient", "list_sessions", ["limit", "starting_after", "access_token_override"],
     ["offset"]),
    ("UsageClient", "record_usage",
     ["feature", "quantity", "metadata", "timestamp", "idempotency_key",
      "access_token_override"],
     ["dimensions", "authorization_ref", "resource_type", "resource_id", "subject_user_id"]),
    ("UsageClient", "get_history",
     ["period", "start_date", "end_date", "feature", "format", "access_token_override"],
     ["limit", "offset"]),
    ("UsageClient", "authorize_usage", [],
     ["feature_key", "dimensions", "resource_type", "resource_id", "subject_user_id",
      "metadata", "access_token_override"]),
]


@pytest.mark.parametrize(("service", "method", "old", "new"), METHOD_KEYWORDS,
                         ids=[f"{m[0]}.{m[1]}" for m in METHOD_KEYWORDS])
def test_method_keywords_keep_the_reference_ones_and_add_the_spaps_ones(
    service: str, method: str, old: List[str], new: List[str]
) -> None:
    parameters = inspect.signature(getattr(getattr(spaps_client, service), method)).parameters
    names = [name for name in parameters if name != "self"]
    assert sorted(names) == sorted(old + new)
    assert [name for name in names if name in old] == old  # 0.1.2 order kept
    assert all(parameters[name].kind is inspect.Parameter.KEYWORD_ONLY for name in names)
    required = {"record_usage": ["feature"], "authorize_usage": ["feature_key", "dimensions"]}
    for name in new:
        if name not in required.get(method, []):
            expected = "user" if name == "resource_type" else None
            assert parameters[name].default == expected, name  # callers of 0.1.2 unaffected


SYNC_SERVICES = ["AuthClient", "SessionsClient", "PaymentsClient", "CryptoPaymentsClient",
                 "UsageClient", "WhitelistClient", "SecureMessagesClient", "MetricsClient",
                 "EntitlementsClient"]
PUBLIC_METHODS = [
    (service, method) for service in SYNC_SERVICES
    for method, value in vars(getattr(spaps_client, service)).items()
    if callable(value) and not method.startswith("_")
]


@pytest.mark.parametrize(("service", "method"), PUBLIC_METHODS,
                         ids=[f"{s}.{m}" for s, m in PUBLIC_METHODS])
def test_every_sync_method_has_an_awaitable_async_twin(service: str, method: str) -> None:
    twin = getattr(getattr(spaps_client, "Async" + service), method, None)
    assert twin is not None, f"Async{service}.{method} is missing"
    # Token-storage helpers stay plain on both surfaces; every call to the server awaits.
    assert inspect.iscoroutinefunction(twin) is (method not in _PLAIN_METHODS)


SERVICE_ERRORS = ["AuthError", "SessionError", "PaymentsError", "CryptoPaymentsError",
                  "UsageError", "WhitelistError", "SecureMessagesError"]


def test_reference_names_are_all_exported() -> None:
    assert len(REFERENCE_ALL) == len(set(REFERENCE_ALL)) == 72
    missing_from_all = [name for name in REFERENCE_ALL if name not in spaps_client.__all__]
    missing_attrs = [name for name in REFERENCE_ALL if not hasattr(spaps_client, name)]
    assert missing_from_all == []
    assert missing_attrs == []
    assert isinstance(spaps_client.__version__, str) and spaps_client.__version__


def test_star_import_gives_the_reference_names() -> None:
    namespace: Dict[str, Any] = {}
    exec("from spaps_client import *", namespace)  # the import users write
    assert set(REFERENCE_ALL) - {"__version__"} <= set(namespace)


def test_every_exported_name_exists() -> None:
    assert [name for name in spaps_client.__all__ if not hasattr(spaps_client, name)] == []


@pytest.mark.parametrize(
    "name",
    [*SERVICE_ERRORS, "MetricsError", "WebhookVerificationError", "SpapsTransportError",
     "SpapsTimeoutError", "SpapsConfigurationError"],
)
def test_errors_share_the_spaps_error_base(name: str) -> None:
    assert "SpapsError" in spaps_client.__all__
    cls = getattr(spaps_client, name)
    assert issubclass(cls, SpapsError)
    assert issubclass(SpapsError, Exception)


@pytest.mark.parametrize("name", SERVICE_ERRORS)
def test_service_error_constructor(name: str) -> None:
    cls = getattr(spaps_client, name)

    error = cls("Card declined", status_code=402, error_code="CARD_DECLINED", response=None,
                request_id="req_abc")

    assert str(error) == "Card declined"
    assert (error.status_code, error.error_code, error.request_id) == (402, "CARD_DECLINED",
                                                                        "req_abc")
    assert error.response is None
    minimal = cls("boom", status_code=500)
    assert (minimal.error_code, minimal.request_id, minimal.response) == (None, None, None)


def test_service_errors_are_distinct_classes() -> None:
    classes = [getattr(spaps_client, name) for name in SERVICE_ERRORS]
    for cls in classes:
        assert [other for other in classes if other is not cls and issubclass(cls, other)] == []


# --- constructors (docs/api.md, "Service clients") ----------------------------------------

BASE = "http://127.0.0.1:9/spaps//"
STRIPPED = "http://127.0.0.1:9/spaps"

CONSTRUCTORS: List[Tuple[str, Dict[str, Any]]] = [
    ("AuthClient", {"base_url": BASE, "api_key": "k", "client": None, "request_timeout": 10.0,
                    "token_storage": None}),
    ("SessionsClient", {"base_url": BASE, "api_key": "k", "access_token": "tok", "client": None,
                        "request_timeout": 10.0}),
    ("PaymentsClient", {"base_url": BASE, "api_key": "k", "access_token": "tok", "client": None,
                        "request_timeout": 10.0}),
    ("UsageClient", {"base_url": BASE, "api_key": "k", "access_token": "tok", "client": None,
                     "request_timeout": 10.0}),
    ("WhitelistClient", {"base_url": BASE, "api_key": "k", "access_token": None, "client": None,
                         "request_timeout": 10.0}),
    ("SecureMessagesClient", {"base_url": BASE, "api_key": "k", "access_token": None,
                              "client": None, "request_timeout": 10.0}),
    ("MetricsClient", {"base_url": BASE, "client": None, "request_timeout": 10.0}),
]


@pytest.mark.parametrize("surface", SURFACES)
@pytest.mark.parametrize(("name", "kwargs"), CONSTRUCTORS, ids=[n for n, _ in CONSTRUCTORS])
def test_service_constructor_keywords(surface: str, name: str, kwargs: Dict[str, Any]) -> None:
    client = standalone(surface, name, **kwargs)
    try:
        assert client.base_url == STRIPPED
        if "api_key" in kwargs:
            assert client.api_key == "k"
        if "access_token" in kwargs:
            assert client.access_token == kwargs["access_token"]
        if name == "PaymentsClient":
            assert type(client.target.crypto).__name__ == (
                "AsyncCryptoPaymentsClient" if surface == "async" else "CryptoPaymentsClient"
            )
    finally:
        close(client)


@pytest.mark.parametrize("surface", SURFACES)
@pytest.mark.parametrize("name", [n for n, _ in CONSTRUCTORS])
def test_service_constructors_are_keyword_only(surface: str, name: str) -> None:
    cls = getattr(spaps_client, ("Async" if surface == "async" else "") + name)

    with pytest.raises(TypeError):
        cls(BASE, "k")


@pytest.mark.parametrize("name", ["SessionsClient", "PaymentsClient", "UsageClient"])
def test_sync_signatures_list_access_token_as_keyword(name: str) -> None:
    parameters = inspect.signature(getattr(spaps_client, name)).parameters
    for keyword in ("base_url", "api_key", "access_token", "client", "request_timeout"):
        assert parameters[keyword].kind is inspect.Parameter.KEYWORD_ONLY


def _sessions(c: Twin) -> Any:
    return c.get_current_session()


PRICE_ID = "price_surface"


def _payments(c: Twin) -> Any:
    # SPAPS serves GET /api/payments/balance as a 501 stub; checkout is a real route (for a
    # price the server manages: the tests seed PRICE_ID).
    return c.create_checkout_session(price_id=PRICE_ID, mode="payment",
                                     success_url="https://a.example/ok",
                                     cancel_url="https://a.example/no")


def admin_token(server: MockServer) -> str:
    """A fresh access token for the seeded admin (whitelist listing is admin-only on SPAPS)."""
    with spaps_client.SpapsClient(base_url=server.url, api_key=API_KEY) as client:
        return client.auth.sign_in_with_password(
            email=ADMIN_EMAIL, password=ADMIN_PASSWORD).access_token


def _usage(c: Twin) -> Any:
    return c.get_features()


def _whitelist(c: Twin) -> Any:
    return c.list()


def _messages(c: Twin) -> Any:
    return c.list_messages()


SMOKE: List[Tuple[str, Callable[[Twin], Any], str, str]] = [
    ("SessionsClient", _sessions, "GET", "/api/sessions/current"),
    ("PaymentsClient", _payments, "POST", "/api/stripe/checkout-sessions"),
    ("UsageClient", _usage, "GET", "/api/usage/features"),
    ("WhitelistClient", _whitelist, "GET", "/api/v1/whitelist"),
    ("SecureMessagesClient", _messages, "GET", "/api/secure-messages"),
]


@pytest.mark.parametrize("surface", SURFACES)
@pytest.mark.parametrize(("name", "call", "method", "path"), SMOKE, ids=[s[0] for s in SMOKE])
def test_standalone_clients_send_their_access_token(
    server: MockServer, surface: str, name: str, call: Callable[[Twin], Any], method: str,
    path: str,
) -> None:
    server.add_price(PRICE_ID)
    token = admin_token(server) if name == "WhitelistClient" else demo_token(server)
    client = standalone(surface, name, base_url=server.url, api_key=API_KEY, access_token=token)
    try:
        assert call(client) is not None
    finally:
        close(client)

    assert_auth(last_request(server, method, path), token)


@pytest.mark.parametrize("surface", SURFACES)
def test_standalone_metrics_and_auth_clients(server: MockServer, surface: str) -> None:
    metrics = standalone(surface, "MetricsClient", base_url=server.url)
    auth = standalone(surface, "AuthClient", base_url=server.url, api_key=API_KEY)
    try:
        health = metrics.health()  # the document as sent: SPAPS envelopes it
        assert health["success"] is True and health["data"]["status"] == "ok"
        request = last_request(server, "GET", "/health")
        assert "x-api-key" not in request.headers and "authorization" not in request.headers

        pair = auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
        assert pair.access_token
        assert_auth(last_request(server, "POST", "/api/auth/login"), None)
    finally:
        close(metrics)
        close(auth)


@pytest.mark.parametrize("surface", SURFACES)
def test_injected_client_is_used_and_left_open(server: MockServer, surface: str) -> None:
    server.add_price(PRICE_ID)
    token = demo_token(server)
    transport = RetryClient(base_url=server.url)
    try:
        payments = standalone(surface, "PaymentsClient", base_url=server.url, api_key=API_KEY,
                              access_token=token, client=transport)
        _payments(payments)
        close(payments)
        # The caller owns the injected client: it still works after the service is closed.
        again = standalone(surface, "PaymentsClient", base_url=server.url, api_key=API_KEY,
                           access_token=token, client=transport)
        _payments(again)
        assert server.request_count("POST", "/api/stripe/checkout-sessions") == 2
    finally:
        transport.close()


# --- aggregate clients (docs/api.md, "Aggregate clients") ---------------------------------


@pytest.mark.parametrize("surface", SURFACES)
def test_aggregate_accepts_its_keywords_with_dict_configs(
    server: MockServer, surface: str
) -> None:
    storage = InMemoryTokenStorage()
    seen: List[str] = []

    def on_request(request: HttpRequest) -> None:
        seen.append(f"{request.method} {request.url}")

    with aggregate(
        server, surface, request_timeout=5, token_storage=storage,
        retry_config={"max_attempts": 1, "backoff_factor": 0, "jitter": False},
        logging_hooks={"on_request": on_request},
    ) as client:
        assert isinstance(client.settings, Settings)
        assert client.settings.base_url == server.url
        assert client.settings.api_key == API_KEY
        assert client.settings.request_timeout == 5.0
        assert client.token_storage is storage
        stored = storage.load()
        assert stored is not None and stored.access_token  # sign-in wrote the given storage
        assert seen == [f"POST {server.url}/api/auth/login"]

        server.inject("GET", "/api/payments/balance", {"status": 503}, {"status": 503})
        with pytest.raises(PaymentsError) as caught:
            client.payments.get_balance()

    assert caught.value.status_code == 503
    assert server.request_count("GET", "/api/payments/balance") == 1  # max_attempts=1 honoured


@pytest.mark.parametrize("surface", SURFACES)
def test_aggregate_uses_an_injected_http_client(server: MockServer, surface: str) -> None:
    server.add_price(PRICE_ID)
    transport = RetryClient(base_url=server.url)
    try:
        kind = spaps_client.AsyncSpapsClient if surface == "async" else spaps_client.SpapsClient
        client = Twin(kind(api_key=API_KEY, http_client=transport), surface == "async")
        client.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
        _payments(client.payments)
        close(client)

        assert server.request_count("POST", "/api/auth/login") == 1
        with spaps_client.PaymentsClient(base_url=server.url, api_key=API_KEY,
                                         access_token=demo_token(server),
                                         client=transport) as payments:
            _payments(payments)  # still open: the caller owns it
        assert server.request_count("POST", "/api/stripe/checkout-sessions") == 2
    finally:
        transport.close()


def test_aggregate_constructor_is_keyword_only() -> None:
    parameters = inspect.signature(spaps_client.SpapsClient).parameters
    for keyword in ("base_url", "api_key", "request_timeout", "token_storage", "http_client",
                    "retry_config", "logging_hooks"):
        assert parameters[keyword].kind is inspect.Parameter.KEYWORD_ONLY
        assert parameters[keyword].default is None


@pytest.mark.parametrize("kind", ["SpapsClient", "AsyncSpapsClient"])
def test_aggregate_constructor_refuses_positional_and_unknown_arguments(kind: str) -> None:
    cls = getattr(spaps_client, kind)
    with pytest.raises(TypeError):
        cls("http://127.0.0.1:9", "key")
    with pytest.raises(TypeError):
        cls(base_url="http://127.0.0.1:9", api_token="key")


def test_settings_and_create_http_client() -> None:
    settings = Settings(base_url="https://spaps.example.com/base//", api_key="key",
                        request_timeout=3)
    assert (settings.base_url, settings.api_key, settings.request_timeout) == (
        "https://spaps.example.com/base//", "key", 3.0
    )
    with spaps_client.create_http_client(settings=settings) as http:
        assert isinstance(http, RetryClient)
        assert http.base_url == "https://spaps.example.com/base"
        assert http.timeout == 3.0
    with pytest.raises(TypeError):
        Settings("https://spaps.example.com")  # type: ignore[misc]


PREFIXES = [
    ("AuthClient", "AUTH_PREFIX", "/api/auth"),
    ("SessionsClient", "SESSIONS_PREFIX", "/api/sessions"),
    ("PaymentsClient", "PAYMENTS_PREFIX", "/api/payments"),
    ("CryptoPaymentsClient", "CRYPTO_PREFIX", "/api/payments/crypto"),
    ("UsageClient", "USAGE_PREFIX", "/api/usage"),
    ("WhitelistClient", "WHITELIST_PREFIX", "/api/v1/whitelist"),
    ("SecureMessagesClient", "SECURE_MESSAGES_PREFIX", "/api/secure-messages"),
]


@pytest.mark.parametrize(("name", "constant", "value"), PREFIXES)
def test_class_prefix_constants(name: str, constant: str, value: str) -> None:
    assert getattr(getattr(spaps_client, name), constant) == value
    assert getattr(getattr(spaps_client, "Async" + name), constant) == value


def test_crypto_invoice_path_helper() -> None:
    cls = spaps_client.CryptoPaymentsClient
    assert cls._invoice_path("inv_1") == "/invoices/inv_1"
    assert cls._invoice_path("inv_1", include_prefix=True) == "/api/payments/crypto/invoices/inv_1"


# --- no sync/async twin code (docs/async.md, "How a call runs") ---------------------------

_ROW = re.compile(r"^D\d+ (\S+?):(\d+)-(\d+) ~ (\S+?):(\d+)-(\d+)(.*)$")


def _split_definitions(source: str, into: Path) -> Dict[str, str]:
    """One file per top-level class/function, so ``duplicates`` (which reports one row per pair
    of files) lists every pair of definitions that repeat each other."""
    lines = source.splitlines(keepends=True)
    texts: Dict[str, str] = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            name = f"L{start:05d}_{node.name}.py"
            texts[name] = "".join(lines[start - 1:node.end_lineno])
            (into / name).write_text(texts[name], encoding="utf-8")
    return texts


def _is_async_side(file_name: str, text: str) -> bool:
    definition = file_name.split("_", 1)[1][:-3]
    return definition.lstrip("_").lower().startswith("async") or bool(
        re.search(r"\basync def\b|\bawait\b", text)
    )


def test_duplicates_finds_no_sync_async_twins(tmp_path: Path) -> None:
    tool = shutil.which("duplicates")
    if tool is None:
        pytest.skip("the duplicates tool is not installed")
    with open(os.path.join(ROOT, "spaps_client.py"), encoding="utf-8") as handle:
        texts = _split_definitions(handle.read(), tmp_path)
    try:
        run = subprocess.run(
            [tool, "--repo", str(tmp_path), "--most", "200", "--seconds", "60"],
            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"duplicates is not usable non-interactively: {exc}")
    output = run.stdout
    finished = "pairs of places" in output or "no duplicates" in output
    if run.returncode != 0 or "incomplete:" in output or not finished:
        pytest.skip(f"duplicates did not complete: {output[-500:]} {run.stderr[-500:]}")
    assert "more pairs" not in output, "raise --most: some pairs were not listed"

    twins = []
    for line in output.splitlines():
        match = _ROW.match(line)
        if match is None or "boilerplate" in match.group(7):
            continue
        left, right = match.group(1), match.group(4)
        left_text = "".join(texts[left].splitlines(keepends=True)[
            int(match.group(2)) - 1:int(match.group(3))])
        right_text = "".join(texts[right].splitlines(keepends=True)[
            int(match.group(5)) - 1:int(match.group(6))])
        if _is_async_side(left, left_text) != _is_async_side(right, right_text):
            twins.append(line)

    assert twins == [], "sync/async twin code in spaps_client.py:\n" + "\n".join(twins)
