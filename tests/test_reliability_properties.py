"""Property-based hardening: whatever body a server sends, only ``SpapsError`` escapes.

A tiny loopback server answers every request with the body hypothesis generated; each endpoint
group is driven with (a) valid responses with one to three fields mutated into hostile values,
(b) error envelopes of every shape on error statuses and (c) junk (random bytes, JSON that is
not an object, absurd nesting).  The property: every call returns or raises a ``SpapsError``
subclass, and an error for an error status carries that status and the request id.
"""

from __future__ import annotations

import copy
import json
import threading
from typing import Any, Callable, Iterator, Tuple

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from loopback import QuietHandler, QuietServer, serving

from spaps_client import RetryConfig, SpapsClient, SpapsError

API_KEY = "test_key_for_tests"
REQUEST_ID = "req_property_0001"

Case = Tuple[str, int, bytes]  # (endpoint name, status, body)


# --- a server that answers with whatever the current example says --------------------------


class _Reply:
    def __init__(self) -> None:
        self.status = 200
        self.body = b"{}"
        self.lock = threading.Lock()


class _Handler(QuietHandler):
    server: _Server

    def _any(self) -> None:
        self.read_body()
        reply = self.server.reply
        with reply.lock:
            status, body = reply.status, reply.body
        if status in (204, 304):
            body = b""  # these statuses cannot carry a body on the wire
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-request-id", REQUEST_ID)
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = _any


class _Server(QuietServer):
    reply: _Reply


@pytest.fixture(scope="module")
def echo() -> Iterator[_Server]:
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.reply = _Reply()
    with serving(httpd):
        yield httpd


@pytest.fixture(scope="module")
def client(echo: _Server) -> Iterator[SpapsClient]:
    url = f"http://127.0.0.1:{echo.port}"
    with SpapsClient(base_url=url, api_key=API_KEY,
                     retry_config=RetryConfig(max_attempts=1)) as spaps:
        yield spaps


# --- endpoints and one valid response each ----------------------------------------------------

NOW = "2024-05-01T12:00:00Z"
USER = {"id": "u_1", "email": "a@example.com", "username": "a", "tier": "basic",
        "wallets": ["0xabc"], "email_confirmed": True}
TOKENS = {"access_token": "at_1", "refresh_token": "rt_1", "expires_in": 900}
SESSION = {"session_id": "s_1", "user_id": "u_1", "application_id": "app", "created_at": NOW,
           "expires_at": NOW, "last_activity": NOW, "tier": "basic", "wallets_count": 1,
           "duration_minutes": 1.5, "idle_minutes": 0.5}
ENTRY = {"email": "a@example.com", "application_id": "app", "tier": "premium",
         "bypass_payment": True, "metadata": {"k": "v"}}
INVOICE = {"id": "inv_1", "asset": "USDC", "network": "base", "amount": "42.75",
           "status": "pending", "expires_at": NOW, "beneficiary": {"a": 1}, "metadata": {}}
MESSAGE = {"id": "m_1", "patient_id": "p", "practitioner_id": "d", "content": "hi",
           "application_id": "app", "metadata": {}, "created_at": NOW}

Call = Callable[[SpapsClient], Any]
# group -> name -> (call, valid response payload)
ENDPOINTS: dict[str, dict[str, tuple[Call, Any]]] = {
    "auth": {
        "login": (lambda c: c.auth.sign_in_with_password(email="a@example.com", password="pw"),
                  {"data": {**TOKENS, "token_type": "Bearer", "user": USER}}),
        "refresh": (lambda c: c.auth.refresh_tokens(refresh_token="rt_0"),
                    {"data": {**TOKENS, "user": USER}}),
        "register": (lambda c: c.auth.register(email="a@example.com", password="password1"),
                     {"data": {"user": USER, "tokens": TOKENS, "message": "ok"}}),
        "verify-magic-link": (lambda c: c.auth.verify_magic_link(token="t"),
                              {"user": USER, "tokens": TOKENS, "message": "ok"}),
        "send-magic-link": (lambda c: c.auth.send_magic_link(email="a@example.com"),
                            {"message": "sent", "data": {"email": "a@example.com",
                                                         "sent_at": NOW}}),
        "nonce": (lambda c: c.auth.request_nonce(wallet_address="0xabc"),
                  {"data": {"nonce": "n", "message": "sign", "wallet_address": "0xabc",
                            "expires_at": NOW}}),
        "wallet-sign-in": (lambda c: c.auth.verify_wallet(wallet_address="0xabc",
                                                          signature="0x1", message="sign"),
                           {"data": {**TOKENS, "user": USER}}),
        "current-user": (lambda c: c.auth.get_current_user(),
                         {"data": {"user": {**USER, "wallets": [
                             {"wallet_address": "0xabc", "chain_type": "ethereum",
                              "verified": True}], "metadata": {}}}}),
        "password-reset": (lambda c: c.auth.request_password_reset(email="a@example.com"),
                           {"message": "sent", "data": {"email": "a@example.com",
                                                        "sent_at": NOW}}),
        "reset-confirm": (lambda c: c.auth.confirm_password_reset(token="t",
                                                                  new_password="password2"),
                          {"message": "done"}),
        "logout": (lambda c: c.auth.logout(), {"data": {"message": "bye"}}),
    },
    "sessions": {
        "current": (lambda c: c.sessions.get_current_session(), {"data": {"session": SESSION}}),
        "validate": (lambda c: c.sessions.validate_session(),
                     {"data": {"valid": True, "session_id": "s_1", "expires_at": NOW,
                               "renewed": False}}),
        "list": (lambda c: c.sessions.list_sessions(),
                 {"data": {"sessions": [{**SESSION, "is_current": True, "ip_address": "1.2.3.4",
                                         "user_agent": "ua", "last_used": NOW}], "total": 1}}),
        "touch": (lambda c: c.sessions.touch_session(),
                  {"data": {"message": "ok", "session_id": "s_1", "last_activity": NOW}}),
        "revoke": (lambda c: c.sessions.revoke_session("s_1"),
                   {"data": {"message": "revoked", "session_id": "s_1"}}),
    },
    "payments": {
        "checkout": (lambda c: c.payments.create_checkout_session(
            price_id="price_1", mode="payment", success_url="https://a.example/ok",
            cancel_url="https://a.example/no"),
            {"data": {"session_id": "cs_1", "checkout_url": "https://pay.example/cs_1",
                      "expires_at": NOW}}),
        "balance": (lambda c: c.payments.get_balance(),
                    {"data": {"balance": {"available": 1.5, "pending": 0, "currency": "USD"},
                              "usage": {"current_period_start": NOW,
                                        "current_period_end": NOW, "credits_used": 3,
                                        "credits_remaining": 7},
                              "tier": "basic", "tier_expires_at": NOW}}),
        "intent": (lambda c: c.payments.create_payment_intent(amount=100, currency="usd"),
                   {"data": {"payment_intent_id": "pi_1", "client_secret": "pi_1_secret",
                             "status": "requires_payment_method"}}),
        "payment-method": (lambda c: c.payments.update_payment_method(payment_method_id="pm_1"),
                           {"data": {"payment_method_id": "pm_1", "message": "ok",
                                     "customer_id": "cus_1", "is_default": True}}),
        "deposit": (lambda c: c.payments.wallet_deposit(
            wallet_address="0xabc", chain_type="ethereum", transaction_id="0xt", amount=1.0,
            currency="USDC"),
            {"data": {"deposit_id": "dep_1", "status": "completed", "amount": 1.0,
                      "currency": "USDC", "confirmation_required": 12,
                      "confirmation_current": 12}}),
        "transaction": (lambda c: c.payments.get_wallet_transaction(transaction_id="0xt"),
                        {"data": {"transaction_id": "0xt", "status": "completed",
                                  "chain_type": "ethereum", "currency": "USDC",
                                  "confirmations": 12, "amount": 1.0, "balance_added": 1.0,
                                  "completed_at": NOW}}),
        "subscription": (lambda c: c.payments.get_subscription(subscription_id="sub_1"),
                         {"data": {"subscription_id": "sub_1", "status": "active",
                                   "plan": {"price_id": "price_1", "interval": "month"},
                                   "current_period_end": NOW,
                                   "cancel_at_period_end": False}}),
        "cancel": (lambda c: c.payments.cancel_subscription(subscription_id="sub_1"),
                   {"data": {"subscription_id": "sub_1", "status": "canceled",
                             "cancel_at_period_end": True}}),
    },
    "crypto": {
        "create": (lambda c: c.payments.crypto.create_invoice(asset="USDC", network="base",
                                                              amount="42.75"),
                   {"data": {"invoice": INVOICE}}),
        "get": (lambda c: c.payments.crypto.get_invoice("inv_1"), {"data": INVOICE}),
        "status": (lambda c: c.payments.crypto.get_invoice_status("inv_1"),
                   {"data": {"invoice_id": "inv_1", "status": "confirmed", "finalized_at": NOW,
                             "normalized_amount": "42.75", "settlement_ids": ["st_1"],
                             "underpaid": False, "overpaid": False}}),
        "reconcile": (lambda c: c.payments.crypto.reconcile(),
                      {"data": {"job_id": "job_1", "scheduled_at": NOW, "cursor": {"a": 1}}}),
    },
    "usage": {
        "features": (lambda c: c.usage.get_features(),
                     {"data": {"user_id": "u_1", "tier": "basic",
                               "period": {"start": NOW, "end": NOW},
                               "features": [{"name": "api_calls", "description": "d",
                                             "used": 3, "limit": 10, "percentage": 30.0,
                                             "reset_at": NOW}],
                               "overage": {}}}),
        "record": (lambda c: c.usage.record_usage(feature="api_calls", quantity=1),
                   {"data": {"record_id": "r_1", "feature": "api_calls", "quantity": 1,
                             "recorded_at": NOW, "warning": None,
                             "current_usage": {"used": 4, "limit": 10, "remaining": 6}}}),
        "history": (lambda c: c.usage.get_history(),
                    {"data": {"period": "month", "start_date": "2024-05-01",
                              "end_date": "2024-05-31",
                              "history": [{"date": "2024-05-01", "features": {"api_calls": 3},
                                           "total_cost": 0.003}],
                              "summary": {"total": 3}}}),
    },
    "whitelist": {
        "check": (lambda c: c.whitelist.check(email="a@example.com"),
                  {"data": {"message": "whitelisted", "entry": ENTRY}}),
        "list": (lambda c: c.whitelist.list(), {"data": {"entries": [ENTRY], "total": 1}}),
        "add": (lambda c: c.whitelist.add(email="a@example.com"), {"data": {"entry": ENTRY}}),
        "update": (lambda c: c.whitelist.update(email="a@example.com", tier="basic"),
                   {"data": {"entry": ENTRY}}),
        "remove": (lambda c: c.whitelist.remove(email="a@example.com"),
                   {"data": {"message": "removed"}}),
    },
    "secure_messages": {
        "create": (lambda c: c.secure_messages.create_message(
            patient_id="p", practitioner_id="d", content="hi"), {"data": MESSAGE}),
        "list": (lambda c: c.secure_messages.list_messages(),
                 {"data": {"messages": [MESSAGE, MESSAGE]}}),
    },
    "metrics": {
        "health": (lambda c: c.metrics.health(), {"status": "healthy"}),
        "ready": (lambda c: c.metrics.readiness(), {"ready": True}),
        "json": (lambda c: c.metrics.get_metrics_json(), {"requests": {"total": 1}}),
        "prometheus": (lambda c: c.metrics.get_prometheus_metrics(), {"text": "x 1"}),
    },
}
ALL = {f"{group}.{name}": entry
       for group, endpoints in ENDPOINTS.items() for name, entry in endpoints.items()}


# --- strategies -------------------------------------------------------------------------------

HOSTILE = [
    None, True, False, 0, -1, 2**63, -(2**63), 10**400, -(10**400), 1e18, -1e18, 1e308,
    -1e308, 5e-324, float("nan"), float("inf"), float("-inf"), "", " ", "x", "1e18", "-1e18",
    "NaN", "Infinity", "9" * 5000, "2024-02-30", "2024-01-01T25:61:61Z",
    "9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59", "2024-01-01T00:00:00+99:99",
    "\x00", "\ud800", [], {}, [None], [[]], {"": None}, {"id": None},
]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
values = st.sampled_from(HOSTILE) | json_values
DELETE = object()


def leaf_paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    paths = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, inner in value.items():
            paths += leaf_paths(inner, (*prefix, key))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            paths += leaf_paths(inner, (*prefix, index))
    return paths


def mutated(payload: Any, edits: list[tuple[tuple[Any, ...], Any]]) -> Any:
    document = json.loads(json.dumps(payload))
    for path, replacement in edits:
        parent = document
        try:
            for step in path[:-1]:
                parent = parent[step]
            if replacement is DELETE:
                del parent[path[-1]]
            else:  # a copy: the shared HOSTILE values must never be edited in place
                parent[path[-1]] = copy.deepcopy(replacement)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit removed or replaced this part
    return document


def encode(document: Any) -> bytes:
    return json.dumps(document, allow_nan=True).encode("utf-8", "surrogatepass")


@st.composite
def mutated_success(draw: st.DrawFn, names: list[str]) -> Case:
    name = draw(st.sampled_from(names))
    payload = ALL[name][1]
    paths = leaf_paths(payload)
    edits = draw(st.lists(st.tuples(st.sampled_from(paths), values | st.just(DELETE)),
                          min_size=1, max_size=3))
    return name, draw(st.sampled_from([200, 201])), encode(mutated(payload, edits))


@st.composite
def error_envelope(draw: st.DrawFn, names: list[str]) -> Case:
    name = draw(st.sampled_from(names))
    status = draw(st.sampled_from([400, 402, 403, 404, 409, 422, 429, 500, 502, 503]))
    error = draw(values | st.fixed_dictionaries({}, optional={"code": values, "message": values}))
    body = draw(st.fixed_dictionaries({"success": st.just(False)}, optional={
        "error": st.just(error), "metadata": values, "message": values, "data": values}))
    return name, status, encode(body)


@st.composite
def junk(draw: st.DrawFn, names: list[str]) -> Case:
    name = draw(st.sampled_from(names))
    status = draw(st.sampled_from([200, 201, 204, 400, 500]))
    body = draw(st.binary(max_size=64) | json_values.map(encode)
                | st.sampled_from(HOSTILE).map(encode))
    return name, status, body


def cases(group: str) -> st.SearchStrategy[Case]:
    names = sorted(f"{group}.{name}" for name in ENDPOINTS[group])
    # Mutated valid responses find the most: they get three of the five draws.
    success = mutated_success(names)
    return st.one_of(success, success, success, error_envelope(names), junk(names))


# --- the property -----------------------------------------------------------------------------


def check(echo: _Server, client: SpapsClient, case: Case) -> None:
    name, status, body = case
    with echo.reply.lock:
        echo.reply.status, echo.reply.body = status, body
    # Every example starts from the same long-lived tokens, whatever the previous one stored.
    client.set_tokens(access_token="at_prop", refresh_token="rt_prop", expires_in=3600)
    try:
        ALL[name][0](client)
    except SpapsError as exc:
        if status >= 300 and status != 401:
            assert exc.status_code == status, repr(exc)
            assert exc.request_id == REQUEST_ID, repr(exc)
        assert len(str(exc)) <= 600


PROPERTY = settings(max_examples=50, deadline=None, derandomize=True, database=None,
                    report_multiple_bugs=False,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


def property_test(group: str, *known: Case) -> Callable[..., None]:
    """A hypothesis test of ``group``; ``known`` cases always run first (``@example``)."""

    @PROPERTY
    @given(case=cases(group))
    def run(echo: _Server, client: SpapsClient, case: Case) -> None:
        check(echo, client, case)

    for case in known:
        run = example(case=case)(run)
    return run


def body(document: Any) -> bytes:
    return encode(document)


# Each group replays the hostile bodies that once crashed the client (regressions; they run
# before the generated ones): huge epoch numbers in date-time fields (OSError/OverflowError),
# huge integers in float fields (OverflowError), expires_in so large that now + expires_in
# overflows, and "sessions"/"entries" that are not lists (TypeError from len()).
test_auth_responses_only_raise_spaps_errors = property_test(
    "auth",
    ("auth.login", 200, body({"data": {**TOKENS, "expires_in": 10**15, "user": USER}})),
    ("auth.register", 200, body({"data": {"user": USER,
                                          "tokens": {**TOKENS, "expires_in": 2**62}}})),
    ("auth.nonce", 200, body({"data": {"nonce": "n", "message": "m", "wallet_address": "0x",
                                       "expires_at": -1e18}})),
)
test_sessions_responses_only_raise_spaps_errors = property_test(
    "sessions",
    ("sessions.list", 200, body({"data": {"sessions": 5}})),
    ("sessions.list", 200, body({"data": {"sessions": True, "total": 1}})),
    ("sessions.current", 200, body({"data": {**SESSION, "created_at": 1e18}})),
    ("sessions.validate", 200, body({"data": {"valid": True, "expires_at": "1e18"}})),
)
test_payments_responses_only_raise_spaps_errors = property_test(
    "payments",
    ("payments.balance", 200, body({"data": {"balance": {"available": 10**400, "pending": 0,
                                                         "currency": "USD"}}})),
    ("payments.checkout", 200, body({"data": {"session_id": "cs", "checkout_url": "u",
                                              "expires_at": 1e20}})),
    ("payments.subscription", 200, body({"data": {"subscription_id": "s",
                                                  "current_period_end": float("inf")}})),
)
test_crypto_responses_only_raise_spaps_errors = property_test("crypto")
test_usage_responses_only_raise_spaps_errors = property_test(
    "usage",
    ("usage.record", 200, body({"data": {"record_id": "r", "feature": "f",
                                         "quantity": 10**400}})),
    ("usage.history", 200, body({"data": {"history": [{"total_cost": -(10**400)}]}})),
)
test_whitelist_responses_only_raise_spaps_errors = property_test(
    "whitelist",
    ("whitelist.list", 200, body({"data": {"entries": True}})),
    ("whitelist.list", 200, body({"data": {"entries": 3.5, "total": 1}})),
)
test_secure_messages_responses_only_raise_spaps_errors = property_test("secure_messages")
test_metrics_responses_only_raise_spaps_errors = property_test("metrics")


@pytest.mark.parametrize("name", ["payments.checkout", "sessions.current", "auth.login",
                                  "metrics.health"])
@pytest.mark.parametrize("status", [200, 400])
def test_deeply_nested_json_raises_a_spaps_error(
    echo: _Server, client: SpapsClient, name: str, status: int
) -> None:
    check(echo, client, (name, status, b"[" * 100_000 + b"]" * 100_000))
