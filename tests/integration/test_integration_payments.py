"""Payments against the real SPAPS, sync and async: checkout goes to the Stripe route (an
unknown price is a 404), and the reference client's other ``/api/payments/*`` routes, which
SPAPS 0.6.6 serves as 501 stubs, fail with a message that says so."""

from __future__ import annotations

from typing import Any, Callable, Dict

import pytest
from _realsupport import Flavor, NewUser, Recorded

from spaps_client import PaymentsError

pytestmark = pytest.mark.realserver


def test_checkout_with_an_unknown_price(flavor: Flavor, user: NewUser,
                                        recorded: Recorded) -> None:
    async def flow(c: Flavor) -> None:
        spaps = c.client(recorded=recorded)
        await c.sign_in(spaps, user.email, user.password)
        recorded.clear()
        with pytest.raises(PaymentsError) as refused:
            await c(spaps.payments.create_checkout_session(
                price_id="price_unknown", mode="payment",
                # SPAPS checks the URLs' origin against the application's allowed origins
                # (here http://127.0.0.1 and http://localhost) before it looks at the price.
                success_url="http://127.0.0.1/paid", cancel_url="http://127.0.0.1/cart"))
        assert refused.value.status_code == 404
        assert refused.value.error_code == "PRICE_NOT_FOUND"
        assert ("POST", "/api/stripe/checkout-sessions") in recorded.calls

    flavor.run(flow)


STUBS: Dict[str, Callable[[Any], Any]] = {
    "get_balance": lambda pay: pay.get_balance(),
    "create_payment_intent": lambda pay: pay.create_payment_intent(amount=1999, currency="usd"),
    "update_payment_method": lambda pay: pay.update_payment_method(
        payment_method_id="pm_card_visa", set_default=True),
    "wallet_deposit": lambda pay: pay.wallet_deposit(
        wallet_address="0x52908400098527886e0f7030069857d2e4169ee7", chain_type="ethereum",
        transaction_id="0x" + "ab" * 32, amount=25.0, currency="USDC"),
    "get_wallet_transaction": lambda pay: pay.get_wallet_transaction(transaction_id="tx_1"),
    "get_subscription": lambda pay: pay.get_subscription(subscription_id="sub_unknown"),
    "cancel_subscription": lambda pay: pay.cancel_subscription(subscription_id="sub_unknown",
                                                               cancel_at_period_end=True),
}


def _assert_says_route_is_missing(error: PaymentsError, path: str) -> None:
    assert error.status_code == 501
    assert error.error_code == "NOT_IMPLEMENTED"
    # Not the server's bare "Feature not yet available": the message names the route and
    # says this server does not have it.
    assert path in error.message
    assert "not" in error.message.lower()
    assert error.message != "Feature not yet available"
    assert str(error) == error.message


@pytest.mark.parametrize("method", sorted(STUBS))
def test_payments_route_the_server_lacks(flavor: Flavor, user: NewUser, recorded: Recorded,
                                         method: str) -> None:
    async def flow(c: Flavor) -> None:
        spaps = c.client(recorded=recorded)
        await c.sign_in(spaps, user.email, user.password)
        recorded.clear()
        with pytest.raises(PaymentsError) as failed:
            await c(STUBS[method](spaps.payments))
        (_, path), = recorded.calls
        if path.startswith("/api/payments/"):
            # A 0.1.2 route that SPAPS 0.6.6 serves as a 501 stub.
            _assert_says_route_is_missing(failed.value, path)
        else:
            # The client went to a route the server really has (subscriptions live under
            # /api/stripe/): an unknown id is then a plain "not found", never a 501.
            assert path.startswith("/api/stripe/"), path
            assert failed.value.status_code == 404
            assert failed.value.error_code == "SUBSCRIPTION_NOT_FOUND"

    flavor.run(flow)
