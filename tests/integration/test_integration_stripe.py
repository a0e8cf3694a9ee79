"""Every Stripe method of ``payments`` against the real SPAPS, sync and async.

The local server has no Stripe key and no products, so no flow can complete: lists answer from
the local database (empty), and a lookup of anything answers "not found". Each test proves the
request reached the server's real route under ``/api/stripe/`` (the ``on_request`` hook records
method and path) and that the typed ``PaymentsError`` says why: status, error code and the
server's own message (never a 501 stub: these routes exist).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

import pytest
from _realsupport import Flavor, NewUser, Recorded

from spaps_client import (
    CheckoutSessionList,
    PaymentHistory,
    PaymentsError,
    ProductList,
    SubscriptionList,
)

pytestmark = pytest.mark.realserver

ORIGIN = "http://127.0.0.1"  # one of the application's allowed origins

# method name -> (call, the route it must reach, the typed result of an empty account)
LISTS: Dict[str, Tuple[Callable[[Any], Any], str, type]] = {
    "list_products": (lambda pay: pay.list_products(), "/api/stripe/products", ProductList),
    "list_products_filtered": (
        lambda pay: pay.list_products(category="software", active=True, limit=5, offset=0),
        "/api/stripe/products", ProductList),
    "list_checkout_sessions": (lambda pay: pay.list_checkout_sessions(limit=5, offset=0),
                               "/api/stripe/checkout-sessions", CheckoutSessionList),
    "list_subscriptions": (lambda pay: pay.list_subscriptions(status="active", limit=5),
                           "/api/stripe/subscriptions", SubscriptionList),
    "list_payment_history": (lambda pay: pay.list_payment_history(limit=5, offset=0),
                             "/api/stripe/history", PaymentHistory),
}


def _items(result: Any) -> Any:
    for name in ("products", "sessions", "subscriptions", "payments"):
        if hasattr(result, name):
            return getattr(result, name)
    raise AssertionError(f"no list in {result!r}")


@pytest.mark.parametrize("method", sorted(LISTS))
def test_stripe_lists_are_empty_without_stripe(flavor: Flavor, user: NewUser,
                                               recorded: Recorded, method: str) -> None:
    call, path, kind = LISTS[method]

    async def flow(c: Flavor) -> None:
        spaps = c.client(recorded=recorded)
        await c.sign_in(spaps, user.email, user.password)
        recorded.clear()
        result = await c(call(spaps.payments))
        assert recorded.calls == [("GET", path)]
        assert isinstance(result, kind)
        assert _items(result) == []
        if isinstance(result, ProductList):
            assert result.total == 0
        else:
            assert result.has_more is False
        if isinstance(result, PaymentHistory):
            assert result.total_count == 0

    flavor.run(flow)


# method name -> (call, (method, path) it must send, status, error code, words of the message)
REFUSED: Dict[str, Tuple[Callable[[Any], Any], Tuple[str, str], int, str, str]] = {
    "get_product": (
        lambda pay: pay.get_product("prod_it_unknown"),
        ("GET", "/api/stripe/products/prod_it_unknown"), 404, "PRODUCT_NOT_FOUND",
        "product not found"),
    "get_checkout_session": (
        lambda pay: pay.get_checkout_session("cs_test_it_unknown"),
        ("GET", "/api/stripe/checkout-sessions/cs_test_it_unknown"), 404, "SESSION_NOT_FOUND",
        "checkout session not found"),
    "expire_checkout_session": (
        lambda pay: pay.expire_checkout_session("cs_test_it_unknown"),
        ("POST", "/api/stripe/checkout-sessions/cs_test_it_unknown/expire"), 404,
        "SESSION_NOT_FOUND", "checkout session not found"),
    "create_checkout_session": (
        lambda pay: pay.create_checkout_session(
            price_id="price_it_unknown", mode="subscription",
            success_url=ORIGIN + "/paid", cancel_url=ORIGIN + "/cart"),
        ("POST", "/api/stripe/checkout-sessions"), 404, "PRICE_NOT_FOUND", "price not found"),
    "get_subscription": (
        lambda pay: pay.get_subscription("sub_it_unknown"),
        ("GET", "/api/stripe/subscription/sub_it_unknown"), 404, "SUBSCRIPTION_NOT_FOUND",
        "subscription not found"),
    "cancel_subscription": (
        lambda pay: pay.cancel_subscription("sub_it_unknown", immediately=True),
        ("POST", "/api/stripe/subscription/sub_it_unknown/cancel"), 404,
        "SUBSCRIPTION_NOT_FOUND", "subscription not found"),
    "cancel_subscription_at_period_end": (
        lambda pay: pay.cancel_subscription(subscription_id="sub_it_unknown",
                                            cancel_at_period_end=True),
        ("POST", "/api/stripe/subscription/sub_it_unknown/cancel"), 404,
        "SUBSCRIPTION_NOT_FOUND", "subscription not found"),
    "update_subscription": (
        lambda pay: pay.update_subscription("sub_it_unknown", price_id="price_it_unknown"),
        ("POST", "/api/stripe/subscription/sub_it_unknown/update"), 404,
        "SUBSCRIPTION_NOT_FOUND", "subscription not found"),
    "create_portal_session": (
        lambda pay: pay.create_portal_session(return_url=ORIGIN + "/account"),
        ("POST", "/api/stripe/portal-session"), 404, "SESSION_NOT_FOUND",
        "no stripe customer found"),
}


@pytest.mark.parametrize("method", sorted(REFUSED))
def test_stripe_call_reaches_the_route_and_says_why(flavor: Flavor, user: NewUser,
                                                    recorded: Recorded,
                                                    method: str) -> None:
    call, sent, status, code, words = REFUSED[method]

    async def flow(c: Flavor) -> None:
        spaps = c.client(recorded=recorded)
        await c.sign_in(spaps, user.email, user.password)
        recorded.clear()
        with pytest.raises(PaymentsError) as failed:
            await c(call(spaps.payments))
        error = failed.value
        assert recorded.calls == [sent]  # one request (a 404 is not retried), the real route
        assert error.status_code == status
        assert error.error_code == code
        assert words in error.message.lower()
        assert error.request_id
        assert error.retryable is False
        assert spaps.get_tokens() is not None  # a payments refusal leaves the session alone

    flavor.run(flow)


def test_stripe_routes_need_a_signed_in_user(flavor: Flavor, recorded: Recorded) -> None:
    async def flow(c: Flavor) -> None:
        spaps = c.client(recorded=recorded)
        with pytest.raises(ValueError):  # refused before anything is sent
            await c(spaps.payments.list_products())
        assert recorded.calls == []

    flavor.run(flow)
