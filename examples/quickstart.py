"""The README quickstart, sync and async, runnable from a fresh clone with nothing installed.

    python examples/quickstart.py

With ``SPAPS_API_URL`` unset it starts the bundled emulator (``spaps_mock``) on
a free loopback port and signs in as its demo user. With ``SPAPS_API_URL`` set
it talks to that SPAPS, signing in with ``SPAPS_EMAIL`` / ``SPAPS_PASSWORD``
(and ``SPAPS_API_KEY``); steps that create things (invoice, checkout, usage
record) then run only with ``SPAPS_QUICKSTART_WRITE=1``. A checkout needs a price
that SPAPS manages (``SPAPS_PRICE_ID``) and usage needs an entitlement: without
them those steps print why they did not happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from typing import Iterator

# Run from a checkout without installing anything: the client is one file next door.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from spaps_client import AsyncSpapsClient, PaymentsError, SpapsClient, UsageError

DEMO_EMAIL = "demo@example.com"
DEMO_PASSWORD = "demo-password"


def sync_quickstart(email: str, password: str, *, write: bool) -> None:
    """Sign in, look at the session, list sessions, check health; then pay and meter."""
    with SpapsClient() as spaps:  # base URL and API key come from SPAPS_API_URL / SPAPS_API_KEY
        spaps.auth.sign_in_with_password(email=email, password=password)
        session = spaps.sessions.get_current_session()
        print(f"[sync] signed in; session id: {session.session_id}")
        listing = spaps.sessions.list_sessions(limit=10)
        print(f"[sync] sessions: {listing.total}")
        print(f"[sync] health: {spaps.metrics.health()['data']['status']}")
        if not write:
            return
        invoice = spaps.payments.crypto.create_invoice(asset="USDC", network="base",
                                                       amount="42.75")
        print(f"[sync] crypto invoice: {invoice.invoice_id} ({invoice.status})")
        try:
            checkout = spaps.payments.create_checkout_session(
                price_id=os.environ.get("SPAPS_PRICE_ID", "price_basic_monthly"),
                mode="subscription",
                success_url="https://example.com/success",
                cancel_url="https://example.com/cancel",
            )
            print(f"[sync] checkout: {checkout.checkout_url}")
        except PaymentsError as exc:  # an unknown price, or a SPAPS without Stripe
            print(f"[sync] no checkout: {exc.error_code}: {exc}")
        try:
            record = spaps.usage.record_usage(feature="api_calls", quantity=1)
            print(f"[sync] usage recorded: {record.record_id} (used {record.current_usage.used})")
        except UsageError as exc:  # USAGE_ENTITLEMENT_REQUIRED until the user is entitled
            print(f"[sync] usage not recorded: {exc.error_code}: {exc}")


async def async_quickstart(email: str, password: str) -> None:
    """The same sign-in path on the async client."""
    async with AsyncSpapsClient() as spaps:
        await spaps.auth.sign_in_with_password(email=email, password=password)
        session = await spaps.sessions.get_current_session()
        print(f"[async] signed in; session id: {session.session_id}")
        listing = await spaps.sessions.list_sessions(limit=10)
        print(f"[async] sessions: {listing.total}")
        health = await spaps.metrics.health()
        print(f"[async] health: {health['data']['status']}")


@contextlib.contextmanager
def _spaps_target() -> Iterator[bool]:
    """Point SPAPS_API_URL at the emulator unless it is set; yield whether it is the emulator."""
    if os.environ.get("SPAPS_API_URL"):
        yield False
        return
    from spaps_mock import MockServer

    with MockServer() as server:
        os.environ["SPAPS_API_URL"] = server.url
        print(f"(no SPAPS_API_URL: using the bundled emulator at {server.url})")
        try:
            yield True
        finally:
            del os.environ["SPAPS_API_URL"]


def main() -> int:
    with _spaps_target() as emulated:
        email = DEMO_EMAIL if emulated else os.environ.get("SPAPS_EMAIL", "")
        password = DEMO_PASSWORD if emulated else os.environ.get("SPAPS_PASSWORD", "")
        if not email or not password:
            print("set SPAPS_EMAIL and SPAPS_PASSWORD to sign in to a real SPAPS",
                  file=sys.stderr)
            return 2
        write = emulated or os.environ.get("SPAPS_QUICKSTART_WRITE") == "1"
        sync_quickstart(email, password, write=write)
        asyncio.run(async_quickstart(email, password))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
