"""Fault-injection tests of the retry layer (docs/reliability.md, "Retries that are safe").

Every test talks real HTTP over loopback to ``spaps_mock`` (or to a port nobody listens on) and
injects faults on the server side; nothing in ``urllib``/``http.client``/``socket`` is patched.
Delays are kept tiny (``backoff_factor=0.01``); a test that proves how long the client waits or
when it stops gives it a ``FakeTime`` (injected clock and sleep) and asserts the waits it asked
for, never the wall clock.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
import uuid
from email.utils import formatdate
from typing import Any, Callable, Iterator

import pytest
from conftest import grant_usage, user_id_of
from loopback import FakeTime, Wire, client_factory, closed_port

from spaps_client import (
    LoggingHooks,
    PaymentsError,
    RetryConfig,
    SessionError,
    SpapsClient,
    SpapsError,
    SpapsTimeoutError,
    SpapsTransportError,
)
from spaps_mock import ADMIN_EMAIL, ADMIN_PASSWORD, ADMIN_USER_ID, MockServer

API_KEY = "test_key_for_tests"
DEMO_EMAIL = "demo@example.com"
DEMO_PASSWORD = "demo-password"

# An authenticated GET that SPAPS 0.6.6 implements (the 0.1.2 balance route is a 501 stub).
CURRENT = "/api/sessions/current"
CHECKOUT = "/api/stripe/checkout-sessions"
INVOICE = "/api/payments/crypto/invoices"
MESSAGES = "/api/secure-messages"
WHITELIST = "/api/v1/whitelist"
INTENT = "/api/payments/create-payment-intent"
DEPOSIT = "/api/payments/wallet-deposit"
USAGE = "/api/usage/record"
REFRESH = "/api/auth/refresh"
LOGIN = "/api/auth/login"
PRICE = "price_basic_monthly"


def fast(**overrides: Any) -> RetryConfig:
    """Retries with back-offs of at most a few hundredths of a second."""
    settings: dict[str, Any] = {"backoff_factor": 0.01, "max_backoff": 0.05}
    settings.update(overrides)
    return RetryConfig(**settings)


class HookLog:
    """Records every LoggingHooks callback as a tuple, in order (thread-safe)."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self._lock = threading.Lock()

    def _add(self, *event: Any) -> None:
        with self._lock:
            self.events.append(event)

    @property
    def hooks(self) -> LoggingHooks:
        return LoggingHooks(
            on_request=lambda request: self._add("request", request.method),
            on_response=lambda request, response, elapsed, attempt: self._add(
                "response", response.status_code, attempt
            ),
            on_error=lambda request, exc, attempt: self._add("error", type(exc).__name__, attempt),
            on_retry=lambda request, attempt: self._add("retry", attempt),
            on_backoff=lambda request, delay, attempt: self._add("backoff", delay, attempt),
            on_give_up=lambda request, reason, attempt: self._add("give_up", reason, attempt),
        )

    def of(self, kind: str) -> list[tuple[Any, ...]]:
        return [event for event in self.events if event[0] == kind]

    def kinds(self) -> list[str]:
        return [str(event[0]) for event in self.events]

    def clear(self) -> None:
        with self._lock:
            self.events.clear()


@pytest.fixture
def log() -> HookLog:
    return HookLog()


def add_members(server: MockServer, *emails: str) -> None:
    """Make ``emails`` members of the application, as an admin does (secure messages need it)."""
    with SpapsClient(base_url=server.url, api_key=API_KEY) as spaps:
        spaps.auth.sign_in_with_password(email=ADMIN_EMAIL, password=ADMIN_PASSWORD)
        tokens = spaps.get_tokens()
        assert tokens is not None
        for email in emails:
            request = urllib.request.Request(
                server.url + "/api/users/memberships", data=json.dumps({"email": email}).encode(),
                method="POST", headers={"X-API-Key": API_KEY, "Content-Type": "application/json",
                                        "Authorization": "Bearer " + tokens.access_token})
            with urllib.request.urlopen(request, timeout=10) as answer:
                assert answer.status in (200, 201)


@pytest.fixture
def make_client(server: MockServer) -> Iterator[Callable[..., SpapsClient]]:
    """Build clients signed in as the demo user (``admin=True``: as the admin) against
    ``server``, closed at teardown.

    The server is set up so that every call used here can succeed: a seeded price for
    checkout, an ``api_calls`` entitlement for the demo user and application memberships of
    the demo user and the admin for secure messages.
    """
    server.add_price(PRICE, unit_amount=1999)
    add_members(server, DEMO_EMAIL, ADMIN_EMAIL)
    granted: list[str] = []
    with client_factory(server.url, API_KEY) as make:
        def make_ready(*, admin: bool = False, **kwargs: Any) -> SpapsClient:
            if admin:
                client = make(sign_in=False, **kwargs)
                client.auth.sign_in_with_password(email=ADMIN_EMAIL, password=ADMIN_PASSWORD)
                return client
            client = make(**kwargs)
            if kwargs.get("sign_in", True) and not granted:
                grant_usage(server, user_id_of(client))
                granted.append(user_id_of(client))
            return client

        yield make_ready


def current(client: SpapsClient) -> Any:
    return client.sessions.get_current_session()


def checkout(client: SpapsClient, **kwargs: Any) -> Any:
    return client.payments.create_checkout_session(
        price_id=PRICE, mode="payment", success_url="https://shop.example/ok",
        cancel_url="https://shop.example/cancel", **kwargs,
    )


def deposit(client: SpapsClient, **kwargs: Any) -> Any:
    return client.payments.wallet_deposit(
        wallet_address="0xabc0000000000000000000000000000000000001", chain_type="ethereum",
        transaction_id="0xtx" + str(time.monotonic_ns()), amount=12.5, currency="USDC", **kwargs,
    )


def intent(client: SpapsClient, **kwargs: Any) -> Any:
    return client.payments.create_payment_intent(amount=1999, currency="usd", **kwargs)


def invoice(client: SpapsClient, **kwargs: Any) -> Any:
    return client.payments.crypto.create_invoice(asset="USDC", network="base", amount="12.50",
                                                 **kwargs)


def message(client: SpapsClient, **kwargs: Any) -> Any:
    """A message from the signed-in demo user to the admin (both application members)."""
    return client.secure_messages.create_message(
        patient_id=user_id_of(client), practitioner_id=ADMIN_USER_ID, content="hello", **kwargs)


def whitelist_add(client: SpapsClient, **kwargs: Any) -> Any:
    return client.whitelist.add(email=f"w{uuid.uuid4().hex[:12]}@example.com", tier="basic",
                                **kwargs)


def usage(client: SpapsClient, **kwargs: Any) -> Any:
    return client.usage.record_usage(feature="api_calls", quantity=7, **kwargs)


def refresh(client: SpapsClient, **kwargs: Any) -> Any:
    tokens = client.get_tokens()
    assert tokens is not None and tokens.refresh_token
    return client.auth.refresh_tokens(refresh_token=tokens.refresh_token)


def api_calls_used(client: SpapsClient) -> float:
    """What the server has counted for the signed-in user's ``api_calls`` (its usage events)."""
    events = client.usage.get_history(feature="api_calls", limit=1000).events
    return sum(float(event.dimensions.get("requests", 0)) for event in events)


# POSTs sent without an idempotency key: (id, path, call, as the admin).
# record_usage is not among them: it always sends one (generated when not given).
POSTS = [
    ("checkout", CHECKOUT, checkout, False),
    ("crypto_invoice", INVOICE, invoice, False),
    ("secure_message", MESSAGES, message, False),
    ("whitelist_add", WHITELIST, whitelist_add, True),
    ("wallet_deposit", DEPOSIT, deposit, False),
    ("payment_intent", INTENT, intent, False),
    ("refresh", REFRESH, refresh, False),
]
# POSTs that accept idempotency_key= and succeed on SPAPS 0.6.6: (id, path, call).
KEYED_POSTS = [
    ("checkout", CHECKOUT, checkout),
    ("crypto_invoice", INVOICE, invoice),
    ("secure_message", MESSAGES, message),
    ("usage_record", USAGE, usage),
]


# --- on by default --------------------------------------------------------------------------


def test_retries_are_on_by_default(server: MockServer, signed_in: SpapsClient) -> None:
    """A client built without retry_config rides out two 503s on a GET."""
    assert signed_in.http_client.retry_config == RetryConfig()
    server.inject("GET", CURRENT, {"status": 503}, {"status": 503})

    session = signed_in.sessions.get_current_session()

    assert session.user_id == user_id_of(signed_in)
    assert server.request_count("GET", CURRENT) == 3


def test_default_retry_config_is_applied_even_without_arguments(client: SpapsClient) -> None:
    config = client.http_client.retry_config
    assert config.max_attempts >= 2
    assert 503 in config.status_codes and 429 in config.status_codes
    assert "GET" in config.methods and "POST" not in config.methods
    assert config.max_backoff > 0 and config.max_retry_after > 0 and config.retry_quota > 0


def test_transport_failure_on_get_is_retried_by_default(
    server: MockServer, signed_in: SpapsClient
) -> None:
    """A GET whose connection dies before the answer is sent again (default config)."""
    server.inject("GET", CURRENT, {"drop": "after_read"})

    assert signed_in.sessions.get_current_session().user_id == user_id_of(signed_in)
    assert server.request_count("GET", CURRENT) == 2


# --- Retry-After -----------------------------------------------------------------------------


def test_retry_after_seconds_is_honoured(
    server: MockServer, make_client: Callable[..., SpapsClient], log: HookLog
) -> None:
    """The retry waits exactly what the server asked for, not the (much shorter) back-off."""
    fake = FakeTime()
    client = make_client(http_client=fake.http_client(
        server.url, retry_config=fast(), logging_hooks=log.hooks))
    server.inject("GET", CURRENT, {"status": 503, "retry_after": "1"})
    log.clear()

    client.sessions.get_current_session()

    assert fake.sleeps == [1.0]
    assert log.of("backoff") == [("backoff", 1.0, 2)]
    assert server.request_count("GET", CURRENT) == 2


def test_retry_after_http_date_is_honoured(
    server: MockServer, make_client: Callable[..., SpapsClient]
) -> None:
    """A Retry-After date is waited out until that date (read against the wall clock)."""
    fake = FakeTime()
    client = make_client(http_client=fake.http_client(server.url, timeout=60.0,
                                                      retry_config=fast()))
    # HTTP-dates have one-second resolution: "now + 20 s" lies between 19 and 20 s ahead when
    # it is written, and a moment less when the client reads it.
    server.inject("GET", CURRENT, {"status": 503,
                                   "retry_after": formatdate(time.time() + 20, usegmt=True)})

    client.sessions.get_current_session()

    assert len(fake.sleeps) == 1 and 18.0 < fake.sleeps[0] <= 20.0, fake.sleeps
    assert server.request_count("GET", CURRENT) == 2


@pytest.mark.parametrize("method, path, call, error", [
    ("GET", CURRENT, current, SessionError),
    ("POST", CHECKOUT, checkout, PaymentsError),
], ids=["get-503", "post-429"])
def test_retry_after_above_the_cap_fails_fast_with_retry_after(
    server: MockServer, make_client: Callable[..., SpapsClient], log: HookLog,
    method: str, path: str, call: Callable[[SpapsClient], Any], error: type[SpapsError],
) -> None:
    fake = FakeTime()
    client = make_client(http_client=fake.http_client(
        server.url, retry_config=fast(max_retry_after=5.0), logging_hooks=log.hooks))
    status = 503 if method == "GET" else 429
    server.inject(method, path, {"status": status, "retry_after": "3600"})
    log.clear()

    with pytest.raises(error) as caught:
        call(client)

    assert fake.sleeps == []  # not slept, not even in part
    assert caught.value.status_code == status
    if status == 429:
        assert caught.value.error_code == "RATE_LIMIT_EXCEEDED"
    assert caught.value.retry_after == 3600
    assert caught.value.retryable is True
    assert server.request_count(method, path) == 1
    assert log.of("give_up") == [("give_up", "retry-after too long", 1)]
    assert not log.of("retry") and not log.of("backoff")


def test_retry_after_beyond_the_call_deadline_fails_fast(
    server: MockServer, make_client: Callable[..., SpapsClient], log: HookLog
) -> None:
    """A wait the server asks for that the caller's budget cannot afford is not slept."""
    fake = FakeTime()
    # 20 s is under max_retry_after (30 s) but over the call's budget of 10 s.
    client = make_client(http_client=fake.http_client(
        server.url, timeout=10.0, retry_config=fast(), logging_hooks=log.hooks))
    server.inject("GET", CURRENT, {"status": 503, "retry_after": "20"})
    log.clear()

    with pytest.raises(SessionError) as caught:
        client.sessions.get_current_session()

    assert fake.sleeps == []
    assert log.of("give_up") == [("give_up", "deadline reached", 1)]
    assert caught.value.retry_after == 20
    assert server.request_count("GET", CURRENT) == 1


# --- deadline, back-off cap, quota ------------------------------------------------------------


@pytest.mark.parametrize("fault", [
    pytest.param({"status": 503}, id="slow-503s"),
    pytest.param({"drop": "after_read"}, id="slow-resets"),
])
def test_retries_never_exceed_the_call_deadline(
    server: MockServer, make_client: Callable[..., SpapsClient], log: HookLog,
    fault: dict[str, Any],
) -> None:
    """Attempts allowed 20 times, each taking 2.5 s of a 10 s budget: the call stops at the
    first retry whose back-off would end past the deadline, and each attempt is given only
    the budget left."""
    fake = FakeTime()
    wire = Wire(fake)
    config = RetryConfig(max_attempts=20, backoff_factor=0.5, jitter=False)
    client = make_client(http_client=fake.http_client(
        server.url, timeout=10.0, retry_config=config, logging_hooks=log.hooks,
        transport=wire))
    server.inject("GET", CURRENT, *([fault] * 20))
    wire.expect([2.5] * 20)
    log.clear()

    with pytest.raises(SpapsError):
        client.sessions.get_current_session()

    # 0 -> 2.5, sleep 0.5, 3 -> 5.5, sleep 1, 6.5 -> 9: a 2 s back-off would end at 11 s.
    assert wire.timeouts() == [10.0, 7.0, 3.5]
    assert fake.sleeps == [0.5, 1.0]
    assert log.of("give_up") == [("give_up", "deadline reached", 3)]
    assert fake.elapsed == 9.0
    assert server.request_count("GET", CURRENT) == 3


def test_refresh_and_retry_after_401_stay_within_the_call_budget(
    server: MockServer, make_client: Callable[..., SpapsClient], log: HookLog
) -> None:
    """The 401, the refresh and the replay are one call: together they get one budget."""
    fake = FakeTime()
    wire = Wire(fake)
    config = RetryConfig(backoff_factor=2.0, jitter=False)
    client = make_client(http_client=fake.http_client(
        server.url, timeout=10.0, retry_config=config, logging_hooks=log.hooks,
        transport=wire))
    server.expire_access_tokens()
    server.inject("GET", CURRENT, {"passthrough": True}, {"status": 503})
    wire.expect([4.0, 4.0, 1.0])  # the 401, the refresh, the replay (answered 503)
    log.clear()

    with pytest.raises(SessionError) as caught:
        client.sessions.get_current_session()

    # Each step is given what the one 10 s budget has left; with 1 s left after the replay,
    # its 2 s back-off is not slept (a budget of its own would have let it retry).
    assert [(method, path) for method, path, _ in wire.sent] == [
        ("GET", CURRENT), ("POST", REFRESH), ("GET", CURRENT)]
    assert wire.timeouts() == [10.0, 6.0, 2.0]
    assert fake.sleeps == []
    assert log.of("give_up") == [("give_up", "deadline reached", 1)]
    assert caught.value.status_code == 503
    assert server.request_count("POST", REFRESH) == 1


def test_read_timeout_on_get_respects_the_budget(
    server: MockServer, make_client: Callable[..., SpapsClient], log: HookLog
) -> None:
    """A socket wait is bounded by the call's budget (real clock: the socket's own timeout),
    and a read that used it all up is not retried."""
    client = make_client(retry_config=fast(), request_timeout=0.5, logging_hooks=log.hooks)
    server.inject("GET", CURRENT, {"delay": 1.2})  # answers, but only after the budget
    log.clear()

    with pytest.raises(SpapsTimeoutError) as caught:
        client.sessions.get_current_session()

    assert caught.value.status_code is None
    assert log.of("error") == [("error", "SpapsTimeoutError", 1)]
    assert log.of("give_up") == [("give_up", "deadline reached", 1)]
    assert server.request_count("GET", CURRENT) == 1


def test_max_backoff_caps_every_backoff(
    server: MockServer, make_client: Callable[..., SpapsClient], log: HookLog
) -> None:
    fake = FakeTime()
    config = RetryConfig(max_attempts=3, backoff_factor=120.0, max_backoff=2.0, jitter=False)
    client = make_client(http_client=fake.http_client(
        server.url, retry_config=config, logging_hooks=log.hooks))
    server.inject("GET", CURRENT, {"drop": "after_read"}, {"drop": "after_read"})
    log.clear()

    client.sessions.get_current_session()

    assert fake.sleeps == [2.0, 2.0]  # not 120 s and 240 s
    assert [delay for _, delay, _ in log.of("backoff")] == [2.0, 2.0]
    assert server.request_count("GET", CURRENT) == 3


def test_retry_quota_stops_a_retry_storm_against_a_dead_endpoint(
    server: MockServer, make_client: Callable[..., SpapsClient], log: HookLog
) -> None:
    # 5 units per retry: a quota of 10 pays for exactly two retries across all calls.
    client = make_client(retry_config=fast(max_attempts=5, retry_quota=10),
                         logging_hooks=log.hooks)
    server.inject("GET", CURRENT, *([{"drop": "after_read"}] * 40))
    log.clear()

    calls = 6
    for _ in range(calls):
        with pytest.raises(SpapsTransportError):
            client.sessions.get_current_session()

    assert server.request_count("GET", CURRENT) == calls + 2
    reasons = [reason for _, reason, _ in log.of("give_up")]
    assert reasons.count("retry quota exhausted") == calls


def test_retry_quota_refills_after_successes(
    server: MockServer, make_client: Callable[..., SpapsClient]
) -> None:
    """As in botocore's standard mode, successful calls pay the bucket back, so a client
    that recovered from an outage can retry again (one unit per plain success)."""
    client = make_client(retry_config=fast(max_attempts=3, retry_quota=10))
    server.inject("GET", CURRENT, *([{"drop": "after_read"}] * 3))
    with pytest.raises(SpapsTransportError):
        client.sessions.get_current_session()  # two retries: the bucket is empty
    assert server.request_count("GET", CURRENT) == 3

    for _ in range(5):  # five plain successes: five units back
        client.sessions.get_current_session()
    server.reset_stats()
    server.inject("GET", CURRENT, *([{"drop": "after_read"}] * 3))
    with pytest.raises(SpapsTransportError):
        client.sessions.get_current_session()

    assert server.request_count("GET", CURRENT) == 2  # exactly one retry was affordable


def test_retry_quota_also_bounds_connection_refused_retries(log: HookLog) -> None:
    dead = f"http://127.0.0.1:{closed_port()}"
    with SpapsClient(base_url=dead, api_key=API_KEY, logging_hooks=log.hooks,
                     retry_config=fast(max_attempts=4, retry_quota=5)) as client:
        client.set_tokens(access_token="at_x", refresh_token="rt_x", expires_in=3600)
        for _ in range(5):
            with pytest.raises(SpapsTransportError):
                client.sessions.get_current_session()

    # One retry (5 units) for the whole client, then every call is tried exactly once.
    assert len(log.of("error")) == 5 + 1
    assert len(log.of("retry")) == 1


# --- non-idempotent requests ------------------------------------------------------------------


@pytest.mark.parametrize("fault", [
    pytest.param({"status": 500}, id="500"),
    pytest.param({"drop": "after_process"}, id="reset-after-processing"),
    pytest.param({"drop": "after_read"}, id="reset-after-reading"),
    # A reset right after the request head is no proof either: the body may have been acted on.
    pytest.param({"drop": "before_read"}, id="reset-before-reading"),
    pytest.param({"delay": 0.5}, id="read-timeout"),
])
@pytest.mark.parametrize("name, path, call, as_admin", POSTS, ids=[post[0] for post in POSTS])
def test_post_without_idempotency_key_is_sent_exactly_once(
    server: MockServer, make_client: Callable[..., SpapsClient], log: HookLog,
    name: str, path: str, call: Callable[..., Any], as_admin: bool, fault: dict[str, Any],
) -> None:
    client = make_client(retry_config=fast(max_attempts=5), logging_hooks=log.hooks,
                         request_timeout=0.25 if "delay" in fault else 5.0, admin=as_admin)
    server.inject("POST", path, fault)
    log.clear()

    with pytest.raises(SpapsError) as caught:
        call(client)

    assert server.request_count("POST", path) == 1
    assert not log.of("retry")
    sent = [r for r in server.requests if r.method == "POST" and r.path == path]
    assert "x-idempotency-key" not in sent[0].headers
    assert "idempotency-key" not in sent[0].headers
    if "status" in fault:
        assert caught.value.status_code == 500
        assert not isinstance(caught.value, SpapsTransportError)
    elif "delay" in fault:
        assert isinstance(caught.value, SpapsTimeoutError)
    else:
        assert isinstance(caught.value, SpapsTransportError)
        assert caught.value.status_code is None


def test_usage_recorded_once_when_the_answer_is_lost(
    server: MockServer, make_client: Callable[..., SpapsClient]
) -> None:
    """record_usage without idempotency_key= still sends one (generated): the attempt whose
    answer was lost is replayed with the same key, and SPAPS counts the use once."""
    client = make_client(retry_config=fast(max_attempts=5))
    before = api_calls_used(client)
    server.inject("POST", USAGE, {"drop": "after_process"})
    server.reset_stats()

    result = usage(client)

    sent = [r for r in server.requests if r.method == "POST" and r.path == USAGE]
    assert len(sent) == 2
    keys = [r.json["idempotency_key"] for r in sent]
    assert keys[0] and keys[0] == keys[1]
    assert [r.headers.get("x-idempotency-key") for r in sent] == keys
    assert sent[0].body == sent[1].body
    assert result.replayed is True and result.idempotency_key == keys[0]
    assert api_calls_used(client) == before + 7


def test_each_record_usage_call_gets_its_own_generated_key(
    server: MockServer, make_client: Callable[..., SpapsClient]
) -> None:
    """The generated key belongs to one call: two calls are two uses, not one replayed."""
    client = make_client(retry_config=fast())
    before = api_calls_used(client)
    server.reset_stats()

    first, second = usage(client), usage(client)

    keys = [r.json["idempotency_key"] for r in server.requests
            if r.method == "POST" and r.path == USAGE]
    assert len(keys) == 2 and keys[0] != keys[1]
    assert not first.replayed and not second.replayed
    assert api_calls_used(client) == before + 14


@pytest.mark.parametrize("fault", [
    pytest.param({"status": 500}, id="500"),
    pytest.param({"drop": "after_read"}, id="reset-after-reading"),
])
@pytest.mark.parametrize("name, path, call", KEYED_POSTS, ids=[p[0] for p in KEYED_POSTS])
def test_post_with_idempotency_key_is_retried_with_the_same_key(
    server: MockServer, make_client: Callable[..., SpapsClient],
    name: str, path: str, call: Callable[..., Any], fault: dict[str, Any],
) -> None:
    client = make_client(retry_config=fast())
    key = f"idem-{name}-0001"
    server.inject("POST", path, fault)
    server.reset_stats()

    call(client, idempotency_key=key)

    sent = [r for r in server.requests if r.method == "POST" and r.path == path]
    assert len(sent) == 2
    assert [r.headers.get("x-idempotency-key") for r in sent] == [key, key]
    if path == CHECKOUT:  # Stripe's header name too, which SPAPS deduplicates checkouts by
        assert [r.headers.get("idempotency-key") for r in sent] == [key, key]
    assert sent[0].body == sent[1].body


def test_keyed_checkout_is_created_once_although_sent_twice(
    server: MockServer, make_client: Callable[..., SpapsClient]
) -> None:
    """The first attempt is processed but its answer lost; the keyed replay gets that session."""
    client = make_client(retry_config=fast())
    server.inject("POST", CHECKOUT, {"drop": "after_process"})
    server.reset_stats()

    session = checkout(client, idempotency_key="checkout-once-7")

    assert server.request_count("POST", CHECKOUT) == 2
    again = checkout(client, idempotency_key="checkout-once-7")
    assert again.session_id == session.session_id
    assert session.checkout_url and session.amount_total == 1999


def test_keyed_usage_record_is_counted_once_although_sent_twice(
    server: MockServer, make_client: Callable[..., SpapsClient]
) -> None:
    """The first attempt is processed but its answer lost; the keyed replay is deduplicated."""
    client = make_client(retry_config=fast())
    before = api_calls_used(client)
    server.inject("POST", USAGE, {"drop": "after_process"})

    result = usage(client, idempotency_key="usage-once-42")

    assert result.feature == "api_calls"
    assert result.idempotency_key == "usage-once-42" and result.replayed is True
    assert server.request_count("POST", USAGE) == 2
    assert api_calls_used(client) == before + 7


def test_post_answered_429_is_retried(
    server: MockServer, make_client: Callable[..., SpapsClient]
) -> None:
    client = make_client(retry_config=fast())
    server.inject("POST", CHECKOUT, {"status": 429, "retry_after": "0"})

    session = checkout(client)

    assert session.checkout_url and session.amount_total == 1999
    assert server.request_count("POST", CHECKOUT) == 2


def test_post_is_not_retried_on_503_without_key(
    server: MockServer, make_client: Callable[..., SpapsClient]
) -> None:
    """503 does not prove the request was not acted on: a checkout is not replayed."""
    client = make_client(retry_config=fast())
    server.inject("POST", CHECKOUT, {"status": 503})

    with pytest.raises(PaymentsError) as caught:
        checkout(client)

    assert caught.value.status_code == 503
    assert server.request_count("POST", CHECKOUT) == 1


def test_post_whose_connection_is_refused_is_retried(log: HookLog) -> None:
    dead = f"http://127.0.0.1:{closed_port()}"
    with SpapsClient(base_url=dead, api_key=API_KEY, logging_hooks=log.hooks,
                     retry_config=fast(max_attempts=3)) as client:
        client.set_tokens(access_token="at_x", refresh_token="rt_x", expires_in=3600)
        with pytest.raises(SpapsTransportError) as caught:
            checkout(client)

    assert [attempt for _, _, attempt in log.of("error")] == [1, 2, 3]
    assert [attempt for _, attempt in log.of("retry")] == [2, 3]
    assert log.of("give_up") == [("give_up", "attempts exhausted", 3)]
    assert caught.value.status_code is None


def test_post_refused_once_then_served_is_processed_exactly_once(log: HookLog) -> None:
    """The server comes up between attempt 1 (refused) and attempt 2: one sign-in, no dupes."""
    port = closed_port()
    late: list[MockServer] = []

    def start_server_after_first_refusal(request: Any, exc: Exception, attempt: int) -> None:
        log.events.append(("error", type(exc).__name__, attempt))
        if attempt == 1:
            late.append(MockServer(port=port).start())

    hooks = log.hooks
    hooks.on_error = start_server_after_first_refusal
    try:
        with SpapsClient(base_url=f"http://127.0.0.1:{port}", api_key=API_KEY,
                         logging_hooks=hooks, retry_config=fast()) as client:
            pair = client.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
        assert pair.access_token
        assert late and late[0].request_count("POST", LOGIN) == 1
        assert log.of("error") == [("error", "SpapsConnectError", 1)]
    finally:
        for server in late:
            server.stop()


# --- stale keep-alive connections -------------------------------------------------------------


WHITELISTED = "stale@example.com"


def whitelist_someone(client: SpapsClient) -> None:
    client.whitelist.add(email=WHITELISTED, tier="premium")


# (method, raw path, setup that also leaves a pooled connection, call, as the admin)
STALE_CALLS: list[tuple[str, str, Callable[[SpapsClient], Any], Callable[[SpapsClient], Any],
                        bool]]
STALE_CALLS = [
    ("GET", "/api/usage/features", current, lambda c: c.usage.get_features(), False),
    ("GET", CURRENT, current, current, False),
    ("POST", CHECKOUT, current, checkout, False),
    ("POST", INVOICE, current, invoice, False),
    ("POST", MESSAGES, current, message, False),
    ("POST", USAGE, current, usage, False),
    ("POST", "/api/sessions/touch", current, lambda c: c.sessions.touch_session(), False),
    ("PUT", f"/api/v1/whitelist/{WHITELISTED}", whitelist_someone,
     lambda c: c.whitelist.update(email=WHITELISTED, tier="basic"), True),
    ("DELETE", f"/api/v1/whitelist/{WHITELISTED}", whitelist_someone,
     lambda c: c.whitelist.remove(email=WHITELISTED), True),
]


@pytest.mark.parametrize("method, path, setup, call, as_admin", STALE_CALLS,
                         ids=[f"{m}-{p.rsplit('/', 1)[-1]}" for m, p, *_ in STALE_CALLS])
def test_connection_closed_while_idle_is_replaced_transparently(
    server: MockServer, make_client: Callable[..., SpapsClient], log: HookLog,
    method: str, path: str, setup: Callable[[SpapsClient], Any],
    call: Callable[[SpapsClient], Any], as_admin: bool,
) -> None:
    # No retries at all: surviving the dead socket must not depend on the retry machinery.
    client = make_client(retry_config=RetryConfig(max_attempts=1), logging_hooks=log.hooks,
                         admin=as_admin)
    setup(client)  # leaves a keep-alive connection in the pool
    assert server.close_idle_connections() >= 1
    server.reset_stats()
    log.clear()

    call(client)

    assert server.request_count(method, path) == 1
    assert server.connections_opened == 1
    assert not log.of("error") and not log.of("retry")


def test_every_pooled_connection_closed_while_idle_is_replaced(
    server: MockServer, make_client: Callable[..., SpapsClient]
) -> None:
    """Several idle connections die at once; a burst of POSTs each lands exactly once."""
    client = make_client(retry_config=RetryConfig(max_attempts=1))
    before = api_calls_used(client)
    barrier = threading.Barrier(4)

    def warm() -> None:
        barrier.wait()
        client.sessions.get_current_session()

    threads = [threading.Thread(target=warm) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert server.close_idle_connections() >= 1
    server.reset_stats()

    for _ in range(4):
        usage(client)

    assert server.request_count("POST", USAGE) == 4
    assert api_calls_used(client) == before + 4 * 7


# --- observability ----------------------------------------------------------------------------


def test_hooks_show_error_backoff_retry_and_success(
    server: MockServer, make_client: Callable[..., SpapsClient], log: HookLog
) -> None:
    client = make_client(retry_config=fast(), logging_hooks=log.hooks)
    server.inject("GET", CURRENT, {"drop": "after_read"})
    log.clear()

    client.sessions.get_current_session()

    assert log.kinds() == ["request", "error", "backoff", "retry", "response"]
    assert log.of("error")[0][1:] == ("SpapsTransportError", 1)
    assert log.of("backoff")[0][2] == 2
    assert log.of("retry") == [("retry", 2)]
    assert log.of("response") == [("response", 200, 2)]


def test_hooks_show_give_up_after_transport_failures(
    server: MockServer, make_client: Callable[..., SpapsClient], log: HookLog
) -> None:
    client = make_client(retry_config=fast(max_attempts=3), logging_hooks=log.hooks)
    server.inject("GET", CURRENT, *([{"drop": "after_read"}] * 3))
    log.clear()

    with pytest.raises(SpapsTransportError):
        client.sessions.get_current_session()

    assert log.kinds() == ["request", "error", "backoff", "retry", "error", "backoff", "retry",
                           "error", "give_up"]
    assert [event[-1] for event in log.events] == [
        "GET", 1, 2, 2, 2, 3, 3, 3, 3,
    ]
    assert log.of("give_up") == [("give_up", "attempts exhausted", 3)]


def test_hooks_show_every_response_and_the_give_up(
    server: MockServer, make_client: Callable[..., SpapsClient], log: HookLog
) -> None:
    client = make_client(retry_config=fast(max_attempts=3), logging_hooks=log.hooks)
    server.inject("GET", CURRENT, {"status": 503}, {"status": 502}, {"status": 503})
    log.clear()

    with pytest.raises(SessionError):
        client.sessions.get_current_session()

    assert log.kinds() == ["request", "response", "backoff", "retry", "response", "backoff",
                           "retry", "response", "give_up"]
    assert [r[1:] for r in log.of("response")] == [(503, 1), (502, 2), (503, 3)]
    assert log.of("give_up") == [("give_up", "attempts exhausted", 3)]


def test_hooks_fire_once_per_call_for_a_plain_success(
    server: MockServer, make_client: Callable[..., SpapsClient], log: HookLog
) -> None:
    client = make_client(logging_hooks=log.hooks)
    log.clear()

    client.sessions.get_current_session()

    assert log.events == [("request", "GET"), ("response", 200, 1)]


def test_a_broken_hook_does_not_break_the_call(
    server: MockServer, make_client: Callable[..., SpapsClient]
) -> None:
    def explode(*args: Any) -> None:
        raise RuntimeError("hook failure")

    hooks = LoggingHooks(on_request=explode, on_response=explode, on_error=explode,
                         on_retry=explode, on_backoff=explode, on_give_up=explode)
    client = make_client(retry_config=fast(), logging_hooks=hooks)
    server.inject("GET", CURRENT, {"drop": "after_read"})

    assert client.sessions.get_current_session().user_id == user_id_of(client)
