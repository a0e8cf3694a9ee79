"""Payments (contract 2.3), sync and async: what SPAPS receives and what the caller gets back."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Dict, Iterator

import pytest
from conftest import API_KEY
from service_twin import (
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

CHECKOUT = "/api/payments/create-checkout-session"
BALANCE = "/api/payments/balance"
INTENT = "/api/payments/create-payment-intent"
PAYMENT_METHOD = "/api/payments/update-payment-method"
DEPOSIT = "/api/payments/wallet-deposit"
CANCEL = "/api/payments/cancel-subscription"

CHECKOUT_ARGS: Dict[str, Any] = {
    "price_id": "price_basic_monthly",
    "mode": "subscription",
    "success_url": "https://example.com/success?x=1",
    "cancel_url": "https://example.com/cancel",
}


@pytest.fixture(params=SURFACES)
def api(request: pytest.FixtureRequest, server: MockServer) -> Iterator[Twin]:
    with aggregate(server, request.param) as twin:
        yield twin


def deposit(api: Twin, transaction_id: str, amount: float = 25, **extra: Any) -> WalletDeposit:
    result: WalletDeposit = api.payments.wallet_deposit(
        wallet_address="0xWallet", chain_type="ethereum", transaction_id=transaction_id,
        amount=amount, currency="USDC", **extra,
    )
    return result


# --- checkout sessions --------------------------------------------------------------------


def test_checkout_session_drops_empty_metadata_and_returns_model(
    api: Twin, server: MockServer
) -> None:
    checkout = api.payments.create_checkout_session(**CHECKOUT_ARGS, metadata={})

    request = last_request(server, "POST", CHECKOUT)
    assert request.raw_query == ""
    assert_auth(request, access_token(api))
    assert_json_body(request, CHECKOUT_ARGS)  # metadata={} is not truthy: omitted
    assert isinstance(checkout, CheckoutSession)
    assert checkout.session_id.startswith("cs_test_")
    assert checkout.checkout_url == f"https://checkout.stripe.com/c/pay/{checkout.session_id}"
    assert isinstance(checkout.expires_at, datetime)
    assert checkout.expires_at.tzinfo is not None
    assert checkout.expires_at > datetime.now(timezone.utc)


@pytest.mark.parametrize(
    ("options", "sent"),
    [
        ({"metadata": {"order": "42"}}, {"metadata": {"order": "42"}}),
        ({"require_legal_consent": False}, {"require_legal_consent": False}),
        (
            {"require_legal_consent": True, "legal_consent_text": "I accept the terms"},
            {"require_legal_consent": True, "legal_consent_text": "I accept the terms"},
        ),
        ({"require_legal_consent": None, "legal_consent_text": ""}, {}),
    ],
    ids=["metadata", "consent-false-sent", "consent-and-text", "none-and-empty-omitted"],
)
def test_checkout_session_optional_keys(
    api: Twin, server: MockServer, options: Dict[str, Any], sent: Dict[str, Any]
) -> None:
    checkout = api.payments.create_checkout_session(**CHECKOUT_ARGS, **options)

    assert_json_body(last_request(server, "POST", CHECKOUT), {**CHECKOUT_ARGS, **sent})
    assert isinstance(checkout, CheckoutSession)


def test_checkout_invalid_price_raises_payments_error(api: Twin, server: MockServer) -> None:
    tag_request_id(server, "POST", CHECKOUT)

    with pytest.raises(PaymentsError) as caught:
        api.payments.create_checkout_session(**{**CHECKOUT_ARGS, "price_id": "gold_plan"})

    assert_service_error(caught.value, PaymentsError, 400, "INVALID_PRICE")
    assert "gold_plan" in str(caught.value)
    assert not isinstance(caught.value, CryptoPaymentsError)


# --- balance ------------------------------------------------------------------------------


def test_balance_model_and_deposit_changes_it(api: Twin, server: MockServer) -> None:
    before = api.payments.get_balance()

    request = last_request(server, "GET", BALANCE)
    assert request.raw_query == ""
    assert_auth(request, access_token(api))
    assert_no_body(request)
    assert isinstance(before, BalanceOverview)
    assert isinstance(before.balance, BalanceAmounts)
    assert before.balance.available == 0.0 and isinstance(before.balance.available, float)
    assert before.balance.pending == 0.0 and isinstance(before.balance.pending, float)
    assert before.balance.currency == "USD"
    assert before.tier == "basic"
    assert before.tier_expires_at is None
    assert isinstance(before.usage, UsageSummary)
    assert before.usage.credits_used == 0 and isinstance(before.usage.credits_used, int)
    assert before.usage.credits_remaining == 1000
    assert isinstance(before.usage.current_period_start, datetime)
    assert isinstance(before.usage.current_period_end, datetime)

    deposit(api, "0xdeposit-1", amount=25)
    deposit(api, "0xdeposit-2", amount=12.5)

    after = api.payments.get_balance()
    assert after.balance.available == 37.5


# --- payment intents ----------------------------------------------------------------------


def test_payment_intent_sends_empty_method_list_and_drops_empty_metadata(
    api: Twin, server: MockServer
) -> None:
    intent = api.payments.create_payment_intent(
        amount=1999, currency="usd", payment_method_types=[], metadata={}
    )

    request = last_request(server, "POST", INTENT)
    assert_auth(request, access_token(api))
    assert_json_body(request, {"amount": 1999, "currency": "usd", "payment_method_types": []})
    assert isinstance(request.json["amount"], int)
    assert isinstance(intent, PaymentIntent)
    assert intent.payment_intent_id.startswith("pi_")
    assert intent.status == "requires_payment_method"
    assert isinstance(intent.client_secret, str)
    assert intent.client_secret.startswith(intent.payment_intent_id + "_secret_")


def test_payment_intent_optional_keys(api: Twin, server: MockServer) -> None:
    api.payments.create_payment_intent(amount=500, currency="eur")
    assert_json_body(last_request(server, "POST", INTENT), {"amount": 500, "currency": "eur"})

    api.payments.create_payment_intent(
        amount=500, currency="eur", payment_method_types=["card"], metadata={"cart": "c1"}
    )
    assert_json_body(
        last_request(server, "POST", INTENT),
        {"amount": 500, "currency": "eur", "payment_method_types": ["card"],
         "metadata": {"cart": "c1"}},
    )


def test_payment_intent_error(api: Twin, server: MockServer) -> None:
    tag_request_id(server, "POST", INTENT)

    with pytest.raises(PaymentsError) as caught:
        api.payments.create_payment_intent(amount=0, currency="usd")

    assert_service_error(caught.value, PaymentsError, 400, "VALIDATION_ERROR")


# --- payment methods ----------------------------------------------------------------------


def test_update_payment_method_sends_set_default_false(api: Twin, server: MockServer) -> None:
    result = api.payments.update_payment_method(payment_method_id="pm_card_visa",
                                                set_default=False)

    request = last_request(server, "POST", PAYMENT_METHOD)
    assert_auth(request, access_token(api))
    assert_json_body(request, {"payment_method_id": "pm_card_visa", "set_default": False})
    assert isinstance(result, PaymentMethodUpdateResult)
    assert result.payment_method_id == "pm_card_visa"
    assert result.is_default is False
    assert isinstance(result.customer_id, str) and result.customer_id.startswith("cus_")
    assert result.message == "Payment method updated"


def test_update_payment_method_omits_set_default_when_none(
    api: Twin, server: MockServer
) -> None:
    result = api.payments.update_payment_method(payment_method_id="pm_card_visa")

    assert_json_body(last_request(server, "POST", PAYMENT_METHOD),
                     {"payment_method_id": "pm_card_visa"})
    assert result.is_default is True


def test_update_payment_method_empty_id_is_refused_before_sending(
    api: Twin, server: MockServer
) -> None:
    sent = len(server.requests)

    with pytest.raises(ValueError):
        api.payments.update_payment_method(payment_method_id="")

    assert len(server.requests) == sent


def test_update_payment_method_unknown_method(api: Twin, server: MockServer) -> None:
    tag_request_id(server, "POST", PAYMENT_METHOD)

    with pytest.raises(PaymentsError) as caught:
        api.payments.update_payment_method(payment_method_id="card_unknown")

    assert_service_error(caught.value, PaymentsError, 404, "PAYMENT_METHOD_NOT_FOUND")


# --- wallet deposits and transactions -----------------------------------------------------


def test_wallet_deposit_sends_amount_as_float_and_omits_empty_tier(
    api: Twin, server: MockServer
) -> None:
    result = deposit(api, "0xabc", amount=25, tier="")

    request = last_request(server, "POST", DEPOSIT)
    assert_auth(request, access_token(api))
    assert_json_body(request, {"wallet_address": "0xWallet", "chain_type": "ethereum",
                               "transaction_id": "0xabc", "amount": 25.0, "currency": "USDC"})
    assert isinstance(request.json["amount"], float)
    assert isinstance(result, WalletDeposit)
    assert result.deposit_id.startswith("dep_")
    assert result.status == "completed"
    assert result.amount == 25.0 and isinstance(result.amount, float)
    assert result.currency == "USDC"
    assert result.confirmation_required == 12 and isinstance(result.confirmation_required, int)
    assert result.confirmation_current == 12


def test_wallet_deposit_sends_truthy_tier(api: Twin, server: MockServer) -> None:
    deposit(api, "0xdef", amount=1.5, tier="premium")

    assert last_request(server, "POST", DEPOSIT).json["tier"] == "premium"
    assert api.payments.get_balance().tier == "premium"


def test_wallet_deposit_error(api: Twin, server: MockServer) -> None:
    deposit(api, "0xdup")
    tag_request_id(server, "POST", DEPOSIT)

    with pytest.raises(PaymentsError) as caught:
        deposit(api, "0xdup")

    assert_service_error(caught.value, PaymentsError, 409, "DUPLICATE_TRANSACTION")


def test_wallet_transaction_reads_back_the_deposit(api: Twin, server: MockServer) -> None:
    deposit(api, "0xfeed", amount=40)

    transaction = api.payments.get_wallet_transaction(transaction_id="0xfeed")

    request = last_request(server, "GET", "/api/payments/wallet-transaction/0xfeed")
    assert request.raw_query == ""
    assert_auth(request, access_token(api))
    assert_no_body(request)
    assert isinstance(transaction, WalletTransaction)
    assert transaction.transaction_id == "0xfeed"
    assert transaction.status == "completed"
    assert transaction.chain_type == "ethereum"
    assert transaction.currency == "USDC"
    assert transaction.confirmations == 12
    assert transaction.amount == 40.0 and isinstance(transaction.amount, float)
    assert transaction.balance_added == 40.0
    assert isinstance(transaction.completed_at, datetime)


def test_wallet_transaction_id_is_percent_encoded(api: Twin, server: MockServer) -> None:
    path = "/api/payments/wallet-transaction/tx%2F..%2Fbalance%3Fa%23b"
    tag_request_id(server, "GET", path)

    with pytest.raises(PaymentsError) as caught:
        api.payments.get_wallet_transaction(transaction_id="tx/../balance?a#b")

    last_request(server, "GET", path)
    assert server.request_count("GET", BALANCE) == 0
    assert_service_error(caught.value, PaymentsError, 404, "TRANSACTION_NOT_FOUND")


@pytest.mark.parametrize("bad_id", ["", "..", "."])
def test_empty_or_dot_path_ids_are_refused_before_sending(
    api: Twin, server: MockServer, bad_id: str
) -> None:
    sent = len(server.requests)

    with pytest.raises(ValueError):
        api.payments.get_wallet_transaction(transaction_id=bad_id)
    with pytest.raises(ValueError):
        api.payments.get_subscription(subscription_id=bad_id)

    assert len(server.requests) == sent


# --- subscriptions ------------------------------------------------------------------------


def test_get_subscription(api: Twin, server: MockServer) -> None:
    subscription = api.payments.get_subscription(subscription_id="sub_demo")

    request = last_request(server, "GET", "/api/payments/subscription/sub_demo")
    assert_auth(request, access_token(api))
    assert_no_body(request)
    assert isinstance(subscription, SubscriptionDetail)
    assert subscription.subscription_id == "sub_demo"
    assert subscription.status == "active"
    assert isinstance(subscription.plan, SubscriptionPlan)
    assert subscription.plan.price_id == "price_basic_monthly"
    assert subscription.plan.interval == "month"
    assert isinstance(subscription.current_period_end, datetime)
    assert subscription.current_period_end.tzinfo is not None
    assert subscription.cancel_at_period_end is False


def test_get_subscription_unknown(api: Twin, server: MockServer) -> None:
    tag_request_id(server, "GET", "/api/payments/subscription/sub_missing")

    with pytest.raises(PaymentsError) as caught:
        api.payments.get_subscription(subscription_id="sub_missing")

    assert_service_error(caught.value, PaymentsError, 404, "SUBSCRIPTION_NOT_FOUND")


def test_cancel_subscription_now(api: Twin, server: MockServer) -> None:
    result = api.payments.cancel_subscription(subscription_id="sub_demo",
                                              cancel_at_period_end=False)

    request = last_request(server, "POST", CANCEL)
    assert_auth(request, access_token(api))
    assert_json_body(request, {"subscription_id": "sub_demo", "cancel_at_period_end": False})
    assert isinstance(result, SubscriptionCancellation)
    assert result.subscription_id == "sub_demo"
    assert result.status == "canceled"
    assert result.cancel_at_period_end is False
    assert api.payments.get_subscription(subscription_id="sub_demo").status == "canceled"


def test_cancel_subscription_omits_unset_flag(api: Twin, server: MockServer) -> None:
    result = api.payments.cancel_subscription(subscription_id="sub_demo")

    assert_json_body(last_request(server, "POST", CANCEL), {"subscription_id": "sub_demo"})
    assert result.cancel_at_period_end is True
    assert api.payments.get_subscription(subscription_id="sub_demo").cancel_at_period_end


def test_cancel_subscription_unknown(api: Twin, server: MockServer) -> None:
    tag_request_id(server, "POST", CANCEL)

    with pytest.raises(PaymentsError) as caught:
        api.payments.cancel_subscription(subscription_id="sub_missing")

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
    token = demo_token(server)
    payments = standalone(surface, "PaymentsClient", base_url=server.url + "/",
                          api_key=API_KEY, access_token=token)
    try:
        assert payments.base_url == server.url
        assert payments.access_token == token
        assert isinstance(payments.get_balance(), BalanceOverview)
        assert_auth(last_request(server, "GET", BALANCE), token)

        invoice = payments.crypto.create_invoice(asset="USDC", network="base", amount="1.00")
        assert isinstance(invoice, CryptoInvoice)
        assert_auth(last_request(server, "POST", "/api/payments/crypto/invoices"), token)

        with pytest.raises(PaymentsError) as caught:
            payments.get_balance(access_token_override="not-a-real-token")
        assert caught.value.status_code == 401
        assert_auth(last_request(server, "GET", BALANCE), "not-a-real-token")
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
