"""Payments (docs/payments.md), sync and async: what SPAPS receives and what the caller gets back.

Against SPAPS 0.6 (see docs/compatibility.md, rows S11 to S13): checkout goes to
``POST /api/stripe/checkout-sessions`` with server-managed prices, subscriptions to
``/api/stripe/subscription/{id}``, and the other 0.1.2 ``/api/payments/*`` routes are 501 stubs
that the client still calls (a server implementing them is used) but reports as a
``PaymentsError`` naming what to use instead.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, Dict, Iterator

import pytest
from conftest import API_KEY
from service_twin import (
    REQUEST_ID,
    SURFACES,
    Twin,
    access_token,
    aggregate,
    assert_auth,
    assert_json_body,
    assert_no_body,
    assert_service_error,
    close,
    demo_token,
    last_request,
    standalone,
    tag_request_id,
)

from spaps_client import (
    BalanceAmounts,
    BalanceOverview,
    CheckoutSession,
    CryptoInvoice,
    CryptoPaymentsError,
    PaymentIntent,
    PaymentMethodUpdateResult,
    PaymentsError,
    SubscriptionCancellation,
    SubscriptionDetail,
    SubscriptionPlan,
    UsageSummary,
    WalletDeposit,
    WalletTransaction,
)
from spaps_mock import MockServer

CHECKOUT = "/api/stripe/checkout-sessions"
BALANCE = "/api/payments/balance"
INTENT = "/api/payments/create-payment-intent"
PAYMENT_METHOD = "/api/payments/update-payment-method"
DEPOSIT = "/api/payments/wallet-deposit"
TRANSACTION = "/api/payments/wallet-transaction/"
SUBSCRIPTION = "/api/stripe/subscription/"

PRICE_ID = "price_basic_monthly"
PRICE_AMOUNT = 1999

CHECKOUT_ARGS: Dict[str, Any] = {
    "price_id": PRICE_ID,
    "mode": "subscription",
    "success_url": "https://example.com/success?x=1",
    "cancel_url": "https://example.com/cancel",
}
# What SPAPS receives for CHECKOUT_ARGS: the price as the one line item.
CHECKOUT_SENT: Dict[str, Any] = {
    "mode": "subscription",
    "line_items": [{"price_id": PRICE_ID, "quantity": 1}],
    "success_url": "https://example.com/success?x=1",
    "cancel_url": "https://example.com/cancel",
}

# Stripe epochs as the real server's SubscriptionOut sends them.
PERIOD_START = 1764547200  # 2025-12-01T00:00:00Z
PERIOD_END = 1767225600  # 2026-01-01T00:00:00Z


@pytest.fixture(params=SURFACES)
def api(request: pytest.FixtureRequest, server: MockServer) -> Iterator[Twin]:
    server.add_price(PRICE_ID, unit_amount=PRICE_AMOUNT, currency="usd",
                     product_name="Basic", recurring_interval="month")
    with aggregate(server, request.param) as twin:
        yield twin


def deposit(api: Twin, transaction_id: str, amount: float = 25, **extra: Any) -> WalletDeposit:
    result: WalletDeposit = api.payments.wallet_deposit(
        wallet_address="0xWallet", chain_type="ethereum", transaction_id=transaction_id,
        amount=amount, currency="USDC", **extra,
    )
    return result


def answer(server: MockServer, method: str, path: str, data: Any, status: int = 200) -> None:
    """Let the next ``method path`` be answered with a SPAPS success envelope around ``data``
    (for routes the emulator does not serve, such as a live Stripe subscription)."""
    body = {"success": True, "data": data, "request_id": REQUEST_ID,
            "timestamp": "2026-12-01T00:00:00+00:00"}
    server.inject(method, path, {"status": status, "raw_body": json.dumps(body),
                                 "content_type": "application/json",
                                 "headers": {"x-request-id": REQUEST_ID}})


def assert_stub_error(exc: BaseException, method: str, path: str, instead: str) -> None:
    """The 501 stub answer, raised as PaymentsError whose message says what to use instead."""
    assert_service_error(exc, PaymentsError, 501, "NOT_IMPLEMENTED")
    message = str(exc)
    assert f"{method} {path}" in message
    assert "not available on this SPAPS server" in message
    assert instead in message
    assert "Feature not yet available" not in message
    assert not isinstance(exc, CryptoPaymentsError)


# --- checkout sessions --------------------------------------------------------------------


def test_checkout_session_drops_empty_metadata_and_returns_model(
    api: Twin, server: MockServer
) -> None:
    checkout = api.payments.create_checkout_session(**CHECKOUT_ARGS, metadata={})

    request = last_request(server, "POST", CHECKOUT)
    assert request.raw_query == ""
    assert_auth(request, access_token(api))
    assert_json_body(request, CHECKOUT_SENT)  # metadata={} is not truthy: omitted
    assert "idempotency-key" not in request.headers
    assert "x-idempotency-key" not in request.headers
    assert server.request_count("POST", "/api/payments/create-checkout-session") == 0
    assert isinstance(checkout, CheckoutSession)
    assert checkout.session_id.startswith("cs_test_")
    assert checkout.checkout_url == f"https://checkout.stripe.com/c/pay/{checkout.session_id}"
    assert checkout.status == "open"
    assert checkout.payment_status == "unpaid"
    assert checkout.amount_total == PRICE_AMOUNT
    assert checkout.currency == "usd"
    assert checkout.metadata == {}
    assert isinstance(checkout.expires_at, datetime)
    assert checkout.expires_at.tzinfo is not None
    assert checkout.expires_at > datetime.now(timezone.utc)


@pytest.mark.parametrize(
    ("options", "sent"),
    [
        ({"metadata": {"order": "42"}}, {"metadata": {"order": "42"}}),
        ({"require_legal_consent": False}, {"metadata": {"require_legal_consent": "false"}}),
        (
            {"require_legal_consent": True, "legal_consent_text": "I accept the terms"},
            {"metadata": {"require_legal_consent": "true",
                          "legal_consent_text": "I accept the terms"}},
        ),
        (
            {"metadata": {"order": "42"}, "require_legal_consent": True},
            {"metadata": {"order": "42", "require_legal_consent": "true"}},
        ),
        ({"require_legal_consent": None, "legal_consent_text": ""}, {}),
    ],
    ids=["metadata", "consent-false-sent", "consent-and-text", "metadata-and-consent-merged",
         "none-and-empty-omitted"],
)
def test_checkout_session_optional_keys(
    api: Twin, server: MockServer, options: Dict[str, Any], sent: Dict[str, Any]
) -> None:
    checkout = api.payments.create_checkout_session(**CHECKOUT_ARGS, **options)

    assert_json_body(last_request(server, "POST", CHECKOUT), {**CHECKOUT_SENT, **sent})
    assert isinstance(checkout, CheckoutSession)
    assert checkout.metadata == sent.get("metadata", {})  # SPAPS keeps them with the session


def test_checkout_idempotency_key_is_sent_in_both_headers(api: Twin, server: MockServer) -> None:
    first = api.payments.create_checkout_session(**CHECKOUT_ARGS, idempotency_key="order-77")

    request = last_request(server, "POST", CHECKOUT)
    assert request.headers.get("idempotency-key") == "order-77"
    assert request.headers.get("x-idempotency-key") == "order-77"
    assert_json_body(request, CHECKOUT_SENT)

    again = api.payments.create_checkout_session(**CHECKOUT_ARGS, idempotency_key="order-77")
    assert again.session_id == first.session_id  # the server applied it once
    other = api.payments.create_checkout_session(**CHECKOUT_ARGS, idempotency_key="order-78")
    assert other.session_id != first.session_id


def test_checkout_invalid_price_raises_payments_error(api: Twin, server: MockServer) -> None:
    tag_request_id(server, "POST", CHECKOUT)

    with pytest.raises(PaymentsError) as caught:
        api.payments.create_checkout_session(**{**CHECKOUT_ARGS, "price_id": "gold_plan"})

    assert_json_body(last_request(server, "POST", CHECKOUT),
                     {**CHECKOUT_SENT, "line_items": [{"price_id": "gold_plan", "quantity": 1}]})
    assert_service_error(caught.value, PaymentsError, 404, "PRICE_NOT_FOUND")
    assert not isinstance(caught.value, CryptoPaymentsError)


# --- balance (a 501 stub on SPAPS 0.6) ----------------------------------------------------


def test_balance_is_a_stub_naming_the_stripe_history(api: Twin, server: MockServer) -> None:
    tag_request_id(server, "GET", BALANCE)

    with pytest.raises(PaymentsError) as caught:
        api.payments.get_balance()

    request = last_request(server, "GET", BALANCE)
    assert request.raw_query == ""
    assert_auth(request, access_token(api))
    assert_no_body(request)
    assert_stub_error(caught.value, "GET", BALANCE, "GET /api/stripe/history")


def test_balance_from_a_server_that_implements_it(api: Twin, server: MockServer) -> None:
    answer(server, "GET", BALANCE, {
        "balance": {"available": 37.5, "pending": 0, "currency": "USD"},
        "tier": "basic", "tier_expires_at": None,
        "usage": {"current_period_start": "2026-12-01T00:00:00Z",
                  "current_period_end": "2027-01-01T00:00:00Z",
                  "credits_used": 0, "credits_remaining": 1000},
    })

    balance = api.payments.get_balance()

    assert_auth(last_request(server, "GET", BALANCE), access_token(api))
    assert isinstance(balance, BalanceOverview)
    assert isinstance(balance.balance, BalanceAmounts)
    assert balance.balance.available == 37.5 and isinstance(balance.balance.available, float)
    assert balance.balance.pending == 0.0 and isinstance(balance.balance.pending, float)
    assert balance.balance.currency == "USD"
    assert balance.tier == "basic"
    assert balance.tier_expires_at is None
    assert isinstance(balance.usage, UsageSummary)
    assert balance.usage.credits_used == 0 and isinstance(balance.usage.credits_used, int)
    assert balance.usage.credits_remaining == 1000
    assert balance.usage.current_period_start == datetime(2026, 12, 1, tzinfo=timezone.utc)
    assert isinstance(balance.usage.current_period_end, datetime)


# --- payment intents (a 501 stub on SPAPS 0.6) --------------------------------------------


def test_payment_intent_sends_empty_method_list_and_drops_empty_metadata(
    api: Twin, server: MockServer
) -> None:
    tag_request_id(server, "POST", INTENT)

    with pytest.raises(PaymentsError) as caught:
        api.payments.create_payment_intent(
            amount=1999, currency="usd", payment_method_types=[], metadata={}
        )

    request = last_request(server, "POST", INTENT)
    assert_auth(request, access_token(api))
    assert_json_body(request, {"amount": 1999, "currency": "usd", "payment_method_types": []})
    assert isinstance(request.json["amount"], int)
    assert_stub_error(caught.value, "POST", INTENT, "create_checkout_session()")


def test_payment_intent_optional_keys(api: Twin, server: MockServer) -> None:
    with pytest.raises(PaymentsError):
        api.payments.create_payment_intent(amount=500, currency="eur")
    assert_json_body(last_request(server, "POST", INTENT), {"amount": 500, "currency": "eur"})

    with pytest.raises(PaymentsError):
        api.payments.create_payment_intent(
            amount=500, currency="eur", payment_method_types=["card"], metadata={"cart": "c1"},
            idempotency_key="intent-1",
        )
    request = last_request(server, "POST", INTENT)
    assert_json_body(
        request,
        {"amount": 500, "currency": "eur", "payment_method_types": ["card"],
         "metadata": {"cart": "c1"}},
    )
    assert request.headers.get("x-idempotency-key") == "intent-1"


def test_payment_intent_from_a_server_that_implements_it(api: Twin, server: MockServer) -> None:
    answer(server, "POST", INTENT, {"payment_intent_id": "pi_123",
                                    "client_secret": "pi_123_secret_abc",
                                    "status": "requires_payment_method"})

    intent = api.payments.create_payment_intent(amount=1999, currency="usd")

    assert isinstance(intent, PaymentIntent)
    assert intent.payment_intent_id == "pi_123"
    assert intent.status == "requires_payment_method"
    assert intent.client_secret == "pi_123_secret_abc"
    assert "pi_123_secret_abc" not in repr(intent)


# --- payment methods (a 501 stub on SPAPS 0.6) --------------------------------------------


def test_update_payment_method_sends_set_default_false(api: Twin, server: MockServer) -> None:
    tag_request_id(server, "POST", PAYMENT_METHOD)

    with pytest.raises(PaymentsError) as caught:
        api.payments.update_payment_method(payment_method_id="pm_card_visa", set_default=False)

    request = last_request(server, "POST", PAYMENT_METHOD)
    assert_auth(request, access_token(api))
    assert_json_body(request, {"payment_method_id": "pm_card_visa", "set_default": False})
    assert_stub_error(caught.value, "POST", PAYMENT_METHOD,
                      "Stripe billing portal (POST /api/stripe/portal-session)")


def test_update_payment_method_omits_set_default_when_none(
    api: Twin, server: MockServer
) -> None:
    with pytest.raises(PaymentsError) as caught:
        api.payments.update_payment_method(payment_method_id="pm_card_visa")

    assert_json_body(last_request(server, "POST", PAYMENT_METHOD),
                     {"payment_method_id": "pm_card_visa"})
    assert caught.value.status_code == 501


def test_update_payment_method_from_a_server_that_implements_it(
    api: Twin, server: MockServer
) -> None:
    answer(server, "POST", PAYMENT_METHOD, {"payment_method_id": "pm_card_visa",
                                            "customer_id": "cus_1", "is_default": True,
                                            "message": "Payment method updated"})

    result = api.payments.update_payment_method(payment_method_id="pm_card_visa")

    assert isinstance(result, PaymentMethodUpdateResult)
    assert result.payment_method_id == "pm_card_visa"
    assert result.is_default is True
    assert result.customer_id == "cus_1"
    assert result.message == "Payment method updated"


def test_update_payment_method_empty_id_is_refused_before_sending(
    api: Twin, server: MockServer
) -> None:
    sent = len(server.requests)

    with pytest.raises(ValueError):
        api.payments.update_payment_method(payment_method_id="")

    assert len(server.requests) == sent


# --- wallet deposits and transactions (501 stubs on SPAPS 0.6) ----------------------------


def test_wallet_deposit_sends_amount_as_float_and_omits_empty_tier(
    api: Twin, server: MockServer
) -> None:
    tag_request_id(server, "POST", DEPOSIT)

    with pytest.raises(PaymentsError) as caught:
        deposit(api, "0xabc", amount=25, tier="")

    request = last_request(server, "POST", DEPOSIT)
    assert_auth(request, access_token(api))
    assert_json_body(request, {"wallet_address": "0xWallet", "chain_type": "ethereum",
                               "transaction_id": "0xabc", "amount": 25.0, "currency": "USDC"})
    assert isinstance(request.json["amount"], float)
    assert_stub_error(caught.value, "POST", DEPOSIT, "payments.crypto.create_invoice()")


def test_wallet_deposit_sends_truthy_tier(api: Twin, server: MockServer) -> None:
    with pytest.raises(PaymentsError):
        deposit(api, "0xdef", amount=1.5, tier="premium", idempotency_key="dep-1")

    request = last_request(server, "POST", DEPOSIT)
    assert request.json["tier"] == "premium"
    assert request.json["amount"] == 1.5
    assert request.headers.get("x-idempotency-key") == "dep-1"


def test_wallet_deposit_from_a_server_that_implements_it(api: Twin, server: MockServer) -> None:
    answer(server, "POST", DEPOSIT, {"deposit_id": "dep_1", "status": "completed",
                                     "amount": 25, "currency": "USDC",
                                     "confirmation_required": 12, "confirmation_current": 12})

    result = deposit(api, "0xabc", amount=25)

    assert isinstance(result, WalletDeposit)
    assert result.deposit_id == "dep_1"
    assert result.status == "completed"
    assert result.amount == 25.0 and isinstance(result.amount, float)
    assert result.currency == "USDC"
    assert result.confirmation_required == 12 and isinstance(result.confirmation_required, int)
    assert result.confirmation_current == 12


def test_wallet_transaction_is_a_stub_naming_invoice_status(
    api: Twin, server: MockServer
) -> None:
    path = TRANSACTION + "0xfeed"
    tag_request_id(server, "GET", path)

    with pytest.raises(PaymentsError) as caught:
        api.payments.get_wallet_transaction(transaction_id="0xfeed")

    request = last_request(server, "GET", path)
    assert request.raw_query == ""
    assert_auth(request, access_token(api))
    assert_no_body(request)
    assert_stub_error(caught.value, "GET", path, "payments.crypto.get_invoice_status()")


def test_wallet_transaction_from_a_server_that_implements_it(
    api: Twin, server: MockServer
) -> None:
    answer(server, "GET", TRANSACTION + "0xfeed", {
        "transaction_id": "0xfeed", "status": "completed", "chain_type": "ethereum",
        "currency": "USDC", "confirmations": 12, "amount": 40, "balance_added": 40.0,
        "completed_at": "2026-12-01T08:00:00Z",
    })

    transaction = api.payments.get_wallet_transaction(transaction_id="0xfeed")

    assert isinstance(transaction, WalletTransaction)
    assert transaction.transaction_id == "0xfeed"
    assert transaction.status == "completed"
    assert transaction.chain_type == "ethereum"
    assert transaction.currency == "USDC"
    assert transaction.confirmations == 12
    assert transaction.amount == 40.0 and isinstance(transaction.amount, float)
    assert transaction.balance_added == 40.0
    assert transaction.completed_at == datetime(2026, 12, 1, 8, tzinfo=timezone.utc)


def test_wallet_transaction_id_is_percent_encoded(api: Twin, server: MockServer) -> None:
    path = TRANSACTION + "tx%2F..%2Fbalance%3Fa%23b"
    tag_request_id(server, "GET", path)

    with pytest.raises(PaymentsError) as caught:
        api.payments.get_wallet_transaction(transaction_id="tx/../balance?a#b")

    last_request(server, "GET", path)
    assert server.request_count("GET", BALANCE) == 0
    assert_stub_error(caught.value, "GET", path, "payments.crypto.get_invoice_status()")


@pytest.mark.parametrize("bad_id", ["", "..", "."])
def test_empty_or_dot_path_ids_are_refused_before_sending(
    api: Twin, server: MockServer, bad_id: str
) -> None:
    sent = len(server.requests)

    with pytest.raises(ValueError):
        api.payments.get_wallet_transaction(transaction_id=bad_id)
    with pytest.raises(ValueError):
        api.payments.get_subscription(subscription_id=bad_id)
    with pytest.raises(ValueError):
        api.payments.cancel_subscription(subscription_id=bad_id)

    assert len(server.requests) == sent


# --- subscriptions (/api/stripe/subscription/{id}) -----------------------------------------


def subscription_data(status: str = "active", cancel_at_period_end: bool = False,
                      canceled_at: Any = None) -> Dict[str, Any]:
    """A ``SubscriptionOut`` as the real server sends it (Stripe epochs, expanded items)."""
    return {
        "id": "sub_demo", "status": status, "current_period_start": PERIOD_START,
        "current_period_end": PERIOD_END, "cancel_at_period_end": cancel_at_period_end,
        "canceled_at": canceled_at,
        "items": [{"id": "si_1", "price": {"id": PRICE_ID, "product": "prod_basic",
                                           "unit_amount": PRICE_AMOUNT, "currency": "usd"}}],
    }


def test_get_subscription(api: Twin, server: MockServer) -> None:
    answer(server, "GET", SUBSCRIPTION + "sub_demo", subscription_data())

    subscription = api.payments.get_subscription(subscription_id="sub_demo")

    request = last_request(server, "GET", SUBSCRIPTION + "sub_demo")
    assert request.raw_query == ""
    assert_auth(request, access_token(api))
    assert_no_body(request)
    assert server.request_count("GET", "/api/payments/subscription/sub_demo") == 0
    assert isinstance(subscription, SubscriptionDetail)
    assert subscription.subscription_id == "sub_demo"
    assert subscription.status == "active"
    assert isinstance(subscription.plan, SubscriptionPlan)
    assert subscription.current_period_start == datetime(2025, 12, 1, tzinfo=timezone.utc)
    assert subscription.current_period_end == datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert subscription.cancel_at_period_end is False
    assert subscription.canceled_at is None
    assert [item["price"]["id"] for item in subscription.items] == [PRICE_ID]


def test_get_subscription_nested_reply_without_id_keeps_the_requested_id(
    api: Twin, server: MockServer
) -> None:
    answer(server, "GET", SUBSCRIPTION + "sub_demo",
           {"subscription": {"status": "trialing", "cancel_at_period_end": True}})

    subscription = api.payments.get_subscription(subscription_id="sub_demo")

    assert subscription.subscription_id == "sub_demo"
    assert subscription.status == "trialing"
    assert subscription.cancel_at_period_end is True


def test_subscription_id_is_percent_encoded(api: Twin, server: MockServer) -> None:
    path = SUBSCRIPTION + "sub%2F..%2Fx%3Fa"
    answer(server, "GET", path, subscription_data())

    subscription = api.payments.get_subscription(subscription_id="sub/../x?a")

    last_request(server, "GET", path)
    assert subscription.subscription_id == "sub_demo"


def test_get_subscription_unknown(api: Twin, server: MockServer) -> None:
    path = SUBSCRIPTION + "sub_missing"
    server.inject("GET", path, {"status": 404, "code": "SUBSCRIPTION_NOT_FOUND",
                                "message": "Subscription not found",
                                "headers": {"x-request-id": REQUEST_ID}})

    with pytest.raises(PaymentsError) as caught:
        api.payments.get_subscription(subscription_id="sub_missing")

    last_request(server, "GET", path)
    assert_service_error(caught.value, PaymentsError, 404, "SUBSCRIPTION_NOT_FOUND")
    assert str(caught.value) == "Subscription not found"


def test_cancel_subscription_now(api: Twin, server: MockServer) -> None:
    path = SUBSCRIPTION + "sub_demo/cancel"
    answer(server, "POST", path, {"id": "sub_demo", "status": "canceled",
                                  "cancel_at_period_end": False, "canceled_at": PERIOD_START})

    result = api.payments.cancel_subscription(subscription_id="sub_demo",
                                              cancel_at_period_end=False)

    request = last_request(server, "POST", path)
    assert_auth(request, access_token(api))
    assert_json_body(request, {"immediately": True})
    assert isinstance(result, SubscriptionCancellation)
    assert result.subscription_id == "sub_demo"
    assert result.status == "canceled"
    assert result.cancel_at_period_end is False


@pytest.mark.parametrize("flag", [None, True], ids=["unset", "true"])
def test_cancel_subscription_at_period_end_by_default(
    api: Twin, server: MockServer, flag: Any
) -> None:
    path = SUBSCRIPTION + "sub_demo/cancel"
    answer(server, "POST", path, {"id": "sub_demo", "status": "active",
                                  "cancel_at_period_end": True, "canceled_at": None})

    options = {} if flag is None else {"cancel_at_period_end": flag}
    result = api.payments.cancel_subscription(subscription_id="sub_demo", **options)

    assert_json_body(last_request(server, "POST", path), {"immediately": False})
    assert result.subscription_id == "sub_demo"
    assert result.status == "active"
    assert result.cancel_at_period_end is True


def test_cancel_subscription_unknown(api: Twin, server: MockServer) -> None:
    path = SUBSCRIPTION + "sub_missing/cancel"
    server.inject("POST", path, {"status": 404, "code": "SUBSCRIPTION_NOT_FOUND",
                                 "message": "Subscription not found",
                                 "headers": {"x-request-id": REQUEST_ID}})

    with pytest.raises(PaymentsError) as caught:
        api.payments.cancel_subscription(subscription_id="sub_missing")

    last_request(server, "POST", path)
    assert server.request_count("POST", "/api/payments/cancel-subscription") == 0
    assert_service_error(caught.value, PaymentsError, 404, "SUBSCRIPTION_NOT_FOUND")


# --- tokens and constructors --------------------------------------------------------------


@pytest.mark.parametrize("surface", SURFACES)
def test_payments_needs_sign_in(server: MockServer, surface: str) -> None:
    with aggregate(server, surface, sign_in=False) as client, pytest.raises(
        ValueError, match="access token"
    ):
        client.payments  # noqa: B018 - the property itself refuses

    assert server.requests == []


@pytest.mark.parametrize("surface", SURFACES)
def test_standalone_payments_client(server: MockServer, surface: str) -> None:
    server.add_price(PRICE_ID, unit_amount=PRICE_AMOUNT)
    token = demo_token(server)
    payments = standalone(surface, "PaymentsClient", base_url=server.url + "/",
                          api_key=API_KEY, access_token=token)
    try:
        assert payments.base_url == server.url
        assert payments.access_token == token
        checkout = payments.create_checkout_session(**CHECKOUT_ARGS)
        assert isinstance(checkout, CheckoutSession)
        assert checkout.amount_total == PRICE_AMOUNT
        assert_auth(last_request(server, "POST", CHECKOUT), token)

        invoice = payments.crypto.create_invoice(asset="USDC", network="base", amount="1.00")
        assert isinstance(invoice, CryptoInvoice)
        assert_auth(last_request(server, "POST", "/api/payments/crypto/invoices"), token)

        with pytest.raises(PaymentsError) as caught:
            payments.create_checkout_session(**CHECKOUT_ARGS,
                                             access_token_override="not-a-real-token")
        assert caught.value.status_code == 401
        assert_auth(last_request(server, "POST", CHECKOUT), "not-a-real-token")

        with pytest.raises(PaymentsError) as stub:
            payments.get_balance()
        assert stub.value.status_code == 501
        assert_auth(last_request(server, "GET", BALANCE), token)
    finally:
        close(payments)


@pytest.mark.parametrize("surface", SURFACES)
def test_standalone_payments_client_without_token_sends_nothing(
    server: MockServer, surface: str
) -> None:
    payments = standalone(surface, "PaymentsClient", base_url=server.url, api_key=API_KEY,
                          access_token=None)
    try:
        with pytest.raises(ValueError):
            payments.get_balance()
    finally:
        close(payments)

    assert server.requests == []
