"""The /api/stripe reads and subscription changes of PaymentsClient against the emulator, sync
and async: routes, queries and bodies sent, parsed models, and the real server's 404s."""

from __future__ import annotations

import base64
import json
from datetime import datetime, timezone
from typing import Any, Dict, Iterator

import pytest
from service_twin import SURFACES, Twin, access_token, aggregate, assert_json_body, last_request

from spaps_client import (
    CheckoutSession,
    CheckoutSessionList,
    PaymentHistory,
    PaymentRecord,
    PaymentsError,
    PortalSession,
    Price,
    Product,
    ProductList,
    SubscriptionCancellation,
    SubscriptionDetail,
    SubscriptionList,
)
from spaps_mock import MockServer

PRICE_ID = "price_pro_monthly"
OTHER_PRICE = "price_team_monthly"
CHECKOUT: Dict[str, Any] = {"price_id": PRICE_ID, "mode": "subscription",
                            "success_url": "https://app.example/ok",
                            "cancel_url": "https://app.example/no"}


def subject(twin: Twin) -> str:
    payload = access_token(twin).split(".")[1]
    return str(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["sub"])


@pytest.fixture(params=SURFACES)
def api(request: pytest.FixtureRequest, server: MockServer) -> Iterator[Twin]:
    server.add_price(PRICE_ID, unit_amount=1999, product_name="Pro", recurring_interval="month")
    server.add_price(OTHER_PRICE, unit_amount=4999, product_name="Team",
                     recurring_interval="month")
    with aggregate(server, request.param) as twin:
        yield twin


def assert_404(caught: pytest.ExceptionInfo[PaymentsError], code: str) -> None:
    assert type(caught.value) is PaymentsError
    assert (caught.value.status_code, caught.value.error_code) == (404, code)


# --- products ---------------------------------------------------------------------------------


def test_list_products(api: Twin, server: MockServer) -> None:
    listed = api.payments.list_products(active=True, limit=5, offset=0)

    request = last_request(server, "GET", "/api/stripe/products")
    assert request.query == {"active": ["true"], "limit": ["5"], "offset": ["0"]}
    assert request.headers["authorization"] == "Bearer " + access_token(api)
    assert isinstance(listed, ProductList)
    assert listed.total == 2
    pro = {p.product_id: p for p in listed.products}["prod_" + PRICE_ID]
    assert isinstance(pro, Product) and pro.name == "Pro" and pro.active is True
    assert isinstance(pro.default_price, Price)
    assert (pro.default_price.price_id, pro.default_price.unit_amount) == (PRICE_ID, 1999)
    assert pro.default_price.currency == "usd"
    assert pro.default_price.recurring == {"interval": "month", "interval_count": 1}
    assert [p.price_id for p in pro.prices] == [PRICE_ID]


def test_get_product_and_unknown_product(api: Twin, server: MockServer) -> None:
    product = api.payments.get_product("prod_" + PRICE_ID)

    last_request(server, "GET", f"/api/stripe/products/prod_{PRICE_ID}")
    assert isinstance(product, Product)
    assert product.product_id == "prod_" + PRICE_ID
    assert product.default_price is not None and product.default_price.price_id == PRICE_ID

    with pytest.raises(PaymentsError) as caught:
        api.payments.get_product("prod_missing")
    assert_404(caught, "PRODUCT_NOT_FOUND")


# --- checkout sessions ------------------------------------------------------------------------


def test_list_get_and_expire_checkout_sessions(api: Twin, server: MockServer) -> None:
    created = api.payments.create_checkout_session(**CHECKOUT)

    listed = api.payments.list_checkout_sessions(limit=10, offset=0)
    assert last_request(server, "GET", "/api/stripe/checkout-sessions").query == {
        "limit": ["10"], "offset": ["0"]}
    assert isinstance(listed, CheckoutSessionList)
    assert [s.session_id for s in listed.sessions] == [created.session_id]
    assert listed.has_more is False

    fetched = api.payments.get_checkout_session(created.session_id)
    last_request(server, "GET", f"/api/stripe/checkout-sessions/{created.session_id}")
    assert isinstance(fetched, CheckoutSession)
    assert (fetched.session_id, fetched.status, fetched.amount_total) == (
        created.session_id, "open", 1999)
    assert fetched.checkout_url == created.checkout_url

    expired = api.payments.expire_checkout_session(created.session_id)
    assert_json_body(
        last_request(server, "POST", f"/api/stripe/checkout-sessions/{created.session_id}/expire"),
        {})
    assert isinstance(expired, CheckoutSession)
    assert (expired.session_id, expired.status) == (created.session_id, "expired")
    assert api.payments.get_checkout_session(created.session_id).status == "expired"


def test_checkout_session_404s(api: Twin) -> None:
    with pytest.raises(PaymentsError) as get:
        api.payments.get_checkout_session("cs_missing")
    assert_404(get, "SESSION_NOT_FOUND")
    with pytest.raises(PaymentsError) as expire:
        api.payments.expire_checkout_session("cs_missing")
    assert_404(expire, "SESSION_NOT_FOUND")


# --- subscriptions ----------------------------------------------------------------------------


def test_list_and_get_subscriptions(api: Twin, server: MockServer) -> None:
    seeded = server.add_subscription(subject(api), PRICE_ID, subscription_id="sub_pro")
    server.add_subscription(subject(api), OTHER_PRICE, subscription_id="sub_old",
                            status="canceled")

    active = api.payments.list_subscriptions(status="active", limit=5)
    assert last_request(server, "GET", "/api/stripe/subscriptions").query == {
        "status": ["active"], "limit": ["5"]}
    assert isinstance(active, SubscriptionList)
    assert [(s.subscription_id, s.status, s.price_id) for s in active.subscriptions] == [
        ("sub_pro", "active", PRICE_ID)]
    assert active.subscriptions[0].current_period_end == datetime.fromisoformat(
        seeded["current_period_end"])
    assert len(api.payments.list_subscriptions().subscriptions) == 2

    detail = api.payments.get_subscription("sub_pro")
    last_request(server, "GET", "/api/stripe/subscription/sub_pro")
    assert isinstance(detail, SubscriptionDetail)
    assert (detail.subscription_id, detail.status) == ("sub_pro", "active")
    assert detail.cancel_at_period_end is False and detail.canceled_at is None
    assert isinstance(detail.current_period_end, datetime)
    assert detail.current_period_end.tzinfo is not None
    assert [item["price"]["id"] for item in detail.items] == [PRICE_ID]


def test_cancel_at_period_end_then_immediately(api: Twin, server: MockServer) -> None:
    server.add_subscription(subject(api), PRICE_ID, subscription_id="sub_pro")

    later = api.payments.cancel_subscription("sub_pro")
    assert_json_body(last_request(server, "POST", "/api/stripe/subscription/sub_pro/cancel"),
                     {"immediately": False})
    assert isinstance(later, SubscriptionCancellation)
    assert (later.subscription_id, later.status, later.cancel_at_period_end) == (
        "sub_pro", "active", True)

    now = api.payments.cancel_subscription("sub_pro", immediately=True)
    assert_json_body(last_request(server, "POST", "/api/stripe/subscription/sub_pro/cancel"),
                     {"immediately": True})
    assert (now.subscription_id, now.status) == ("sub_pro", "canceled")
    detail = api.payments.get_subscription("sub_pro")
    assert detail.status == "canceled"
    assert detail.canceled_at is not None and detail.canceled_at.tzinfo == timezone.utc


def test_update_subscription_moves_to_another_price(api: Twin, server: MockServer) -> None:
    server.add_subscription(subject(api), PRICE_ID, subscription_id="sub_pro")

    updated = api.payments.update_subscription("sub_pro", price_id=OTHER_PRICE)

    assert_json_body(last_request(server, "POST", "/api/stripe/subscription/sub_pro/update"),
                     {"price_id": OTHER_PRICE})
    assert isinstance(updated, SubscriptionDetail)
    assert updated.subscription_id == "sub_pro"
    assert [item["price"]["id"] for item in updated.items] == [OTHER_PRICE]
    assert api.payments.list_subscriptions().subscriptions[0].price_id == OTHER_PRICE
    with pytest.raises(PaymentsError) as unknown_price:
        api.payments.update_subscription("sub_pro", price_id="price_missing")
    assert_404(unknown_price, "PRICE_NOT_FOUND")


def test_subscription_404s(api: Twin, server: MockServer) -> None:
    # another user's subscription is as unknown as a missing one
    other = server.add_user("someone@example.com", "Someone-Pass-1")
    server.add_subscription(other["id"], PRICE_ID, subscription_id="sub_theirs")

    for call in (lambda: api.payments.get_subscription("sub_theirs"),
                 lambda: api.payments.get_subscription("sub_missing"),
                 lambda: api.payments.cancel_subscription("sub_missing"),
                 lambda: api.payments.update_subscription("sub_missing", price_id=PRICE_ID)):
        with pytest.raises(PaymentsError) as caught:
            call()
        assert_404(caught, "SUBSCRIPTION_NOT_FOUND")


# --- portal and history -----------------------------------------------------------------------


def test_portal_needs_a_stripe_customer(api: Twin, server: MockServer) -> None:
    with pytest.raises(PaymentsError) as caught:
        api.payments.create_portal_session(return_url="https://app.example/account")
    assert_404(caught, "SESSION_NOT_FOUND")
    assert str(caught.value) == "No Stripe customer found for this user"

    api.payments.create_checkout_session(**CHECKOUT)  # checking out makes the user a customer
    portal = api.payments.create_portal_session(return_url="https://app.example/account")

    assert_json_body(last_request(server, "POST", "/api/stripe/portal-session"),
                     {"return_url": "https://app.example/account"})
    assert isinstance(portal, PortalSession)
    assert portal.url is not None and portal.url.startswith("https://")
    assert portal.session_id
    assert portal.return_url == "https://app.example/account"


def test_list_payment_history(api: Twin, server: MockServer) -> None:
    uid = subject(api)
    server.add_payment(uid, 1999, description="first")
    server.add_payment(uid, 500, status="failed")
    server.add_payment(uid, 4999, description="latest")

    history = api.payments.list_payment_history(status="succeeded", limit=1, offset=0)

    assert last_request(server, "GET", "/api/stripe/history").query == {
        "status": ["succeeded"], "limit": ["1"], "offset": ["0"]}
    assert isinstance(history, PaymentHistory)
    assert history.total_count == 2 and history.has_more is True
    assert len(history.payments) == 1
    latest = history.payments[0]
    assert isinstance(latest, PaymentRecord)
    assert (latest.amount, latest.currency, latest.status) == (4999, "usd", "succeeded")
    assert latest.payment_id and latest.stripe_payment_intent_id
    assert isinstance(latest.created_at, datetime)
    everything = api.payments.list_payment_history()
    assert [p.amount for p in everything.payments] == [4999, 500, 1999]
    assert everything.has_more is False


def test_empty_lists_for_a_new_user(api: Twin) -> None:
    assert api.payments.list_subscriptions().subscriptions == []
    assert api.payments.list_checkout_sessions().sessions == []
    history = api.payments.list_payment_history()
    assert (history.payments, history.total_count, history.has_more) == ([], 0, False)
