"""A user's program: correct uses of the sync and async surfaces of the installed ``spaps``.

tests/test_typing.py type-checks this file against the installed wheel with mypy --strict and
pyright (strict), for Python 3.9 and 3.13, and expects no diagnostics at all; it then runs it.
``assert_type`` fails the check when a result is ``Any`` (an annotated assignment would not).
"""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Tuple

import spaps_client
from spaps_client import (
    AsyncAuthClient,
    AsyncSpapsClient,
    AuthClient,
    AuthError,
    CheckoutSession,
    CryptoInvoice,
    FileTokenStorage,
    InMemoryTokenStorage,
    MfaRequiredError,
    SessionListResult,
    SessionRecord,
    SessionSummary,
    SpapsClient,
    SpapsError,
    SpapsTransportError,
    StoredTokens,
    TokenPair,
    TokenStorage,
    TokenUser,
    UserProfile,
)
from spaps_mock import ADMIN_EMAIL, MockServer, RecordedRequest, totp_code

if TYPE_CHECKING:
    from typing_extensions import assert_type
else:

    def assert_type(value, _type):
        return value


DEMO_EMAIL = "demo@example.com"
DEMO_PASSWORD = "demo-password"  # the emulator's seeded demo user


class DictTokenStorage(TokenStorage):
    """A user's own storage: tokens in a dict keyed by tenant."""

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self.saved: Dict[str, StoredTokens] = {}

    def save(self, tokens: StoredTokens) -> None:
        self.saved[self.tenant] = tokens

    def load(self) -> Optional[StoredTokens]:
        return self.saved.get(self.tenant)

    def clear(self) -> None:
        self.saved.pop(self.tenant, None)


def sync_flow(server: MockServer) -> Tuple[str, int]:
    storage = DictTokenStorage("acme")
    with SpapsClient(base_url=server.url, api_key="typed-key", token_storage=storage,
                     request_timeout=5.0, app_info="typing-check/1.0") as client:
        try:
            pair = client.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
        except MfaRequiredError as exc:
            challenge: str = exc.challenge_id
            raise SystemExit(f"unexpected MFA challenge {challenge}") from exc
        assert_type(pair, TokenPair)
        assert_type(pair.access_token, str)
        assert_type(pair.expires_in, int)
        assert_type(pair.user, Optional[TokenUser])
        email = pair.user.email if pair.user is not None else None
        assert_type(email, Optional[str])

        me = client.auth.get_current_user()
        assert_type(me, UserProfile)
        assert_type(me.id, str)
        session = client.sessions.get_current_session()
        assert_type(session, SessionSummary)
        assert_type(session.session_id, str)
        listing = client.sessions.list_sessions(limit=5)
        assert_type(listing, SessionListResult)
        assert_type(listing.sessions, List[SessionRecord])
        ids = [record.session_id for record in listing.sessions]
        assert_type(ids, List[str])

        price = server.add_price("price_typed_monthly", recurring_interval="month")
        checkout = client.payments.create_checkout_session(
            price_id=str(price["price_id"]), mode="subscription",
            success_url="https://example.com/success", cancel_url="https://example.com/cancel",
        )
        assert_type(checkout, CheckoutSession)
        assert_type(checkout.checkout_url, Optional[str])

        health = client.metrics.health()
        assert_type(health, Dict[str, Any])  # JSON documents stay dicts
        tokens = client.get_tokens()
        assert_type(tokens, Optional[StoredTokens])
        assert tokens is not None and storage.load() is not None
        file_storage = FileTokenStorage(path="tokens.json")  # creates nothing until a save
        assert_type(file_storage.path, str)
        assert me.id == session.user_id
        return email or "-", listing.total


def sub_clients(server: MockServer) -> str:
    """Services used on their own, with a token from elsewhere."""
    with AuthClient(base_url=server.url, api_key="typed-key",
                    token_storage=InMemoryTokenStorage()) as auth:
        pair = auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
        profile: UserProfile = auth.get_current_user(access_token=pair.access_token)
        stored: Optional[StoredTokens] = auth.get_stored_tokens()
        assert stored is not None
    return profile.email or ""


def crypto_invoice(client: SpapsClient) -> CryptoInvoice:
    """Typed, not run: the emulator needs an entitlement for this."""
    return client.payments.crypto.create_invoice(asset="USDC", network="base", amount="12.50")


async def async_flow(server: MockServer) -> Tuple[str, int, str]:
    async with AsyncSpapsClient(base_url=server.url, api_key="typed-key",
                                request_timeout=5.0) as client:
        pair = await client.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
        assert_type(pair, TokenPair)
        me, session, listing = await asyncio.gather(
            client.auth.get_current_user(),
            client.sessions.get_current_session(),
            client.sessions.list_sessions(limit=5),
        )
        assert_type(me, UserProfile)
        assert_type(session, SessionSummary)
        assert_type(listing, SessionListResult)
        tasks = [asyncio.ensure_future(client.sessions.get_current_session()) for _ in range(3)]
        sessions = await asyncio.gather(*tasks)
        assert_type(sessions, List[SessionSummary])
        health = await client.metrics.health()
        assert_type(health, Dict[str, Any])
        client.set_tokens(access_token=pair.access_token, refresh_token=pair.refresh_token,
                          expires_in=pair.expires_in)
        assert me.id == session.user_id and {s.session_id for s in sessions} == {
            session.session_id}
        return me.id, listing.total, str(health.get("success"))


async def standalone_async(server: MockServer) -> str:
    auth = AsyncAuthClient(base_url=server.url, api_key="typed-key")
    try:
        pair = await auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
        user = await auth.get_current_user(access_token=pair.access_token)
        assert_type(user, UserProfile)
        return user.id
    finally:
        await auth.aclose()


def errors(server: MockServer) -> Optional[int]:
    with SpapsClient(base_url=server.url, api_key="typed-key") as client:
        try:
            client.auth.sign_in_with_password(email=DEMO_EMAIL, password="wrong")
        except AuthError as exc:
            code: Optional[int] = exc.status_code
            error_code: Optional[str] = exc.error_code
            retryable: bool = exc.retryable
            assert error_code and not retryable
            return code
        except SpapsTransportError:
            return None
        except SpapsError as exc:
            return exc.status_code
    return None


def emulator() -> Iterator[RecordedRequest]:
    with MockServer(access_token_ttl=60.0, rate_limit=False) as server:
        server.inject("GET", "/health", {"status": 503}, {"passthrough": True, "delay": 0.01})
        assert server.request_count("GET", "/health") == 0
        server.clear_faults()
        user: Dict[str, object] = server.add_user("typed@example.com", "typed-password")
        assert user and ADMIN_EMAIL
        code: str = totp_code("JBSWY3DPEHPK3PXP", at=0.0)
        assert len(code) == 6
        yield from server.requests


def main() -> int:
    version: str = spaps_client.__version__
    with MockServer() as server:
        email, total = sync_flow(server)
        profile_email = sub_clients(server)
        user_id, async_total, success = asyncio.run(async_flow(server))
        same_user = asyncio.run(standalone_async(server))
        status = errors(server)
        seen = [request.path for request in server.requests]
    recorded = list(emulator())
    assert email == profile_email == DEMO_EMAIL and same_user == user_id, (email, user_id)
    assert total >= 1 and async_total >= 1 and success == "True" and status == 401, status
    assert "/api/auth/login" in seen and not recorded
    print("user program ok", version)
    return 0


if __name__ == "__main__":
    sys.exit(main())
