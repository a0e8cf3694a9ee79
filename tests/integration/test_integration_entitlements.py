"""Entitlements against the real SPAPS, sync and async: the admin grants through the client's own
``entitlements.grant_manual``; ``check_access`` (API key only, as a backend calls it) sees the
grant, the user's list shows it, a revoke (204) takes it away; a grant made for an e-mail before
the account exists is taken over with ``claim_pending``; a non-admin may not grant.

Each test uses an entitlement key of its own, so earlier runs (the database persists) and the
other flavour cannot interfere. The server commits a grant, revoke or claim after it has replied:
the flow waits (bounded) until the raw check shows it before asserting through the client.
"""

from __future__ import annotations

import urllib.parse
import uuid
from datetime import datetime

import pytest
from _realsupport import Flavor, NewUser, RawApi, strong_password, unique_email, wait_until

from spaps_client import Entitlement, EntitlementsError

pytestmark = pytest.mark.realserver


def unique_key(prefix: str = "it_feature") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def raw_has(raw: RawApi, user_id: str, key: str) -> bool:
    query = urllib.parse.urlencode({"user_id": user_id, "entitlement_key": key})
    return raw.data("GET", f"/api/entitlements/check?{query}").get("has_entitlement") is True


def wait_access(raw: RawApi, user_id: str, key: str, expected: bool) -> None:
    wait_until(lambda: raw_has(raw, user_id, key) is expected,
               f"entitlement {key} to be {'granted' if expected else 'gone'}")


def test_grant_check_list_revoke(flavor: Flavor, user: NewUser, raw: RawApi) -> None:
    admin_email, admin_password = raw.admin_credentials()
    key = unique_key()

    async def flow(c: Flavor) -> None:
        backend = c.client()  # a backend's client: the API key, no user signed in
        assert await c(backend.entitlements.check_access(user.id, key)) is False

        admin = c.client()
        admin_pair = await c.sign_in(admin, admin_email, admin_password)
        assert admin_pair.user is not None
        granted = await c(admin.entitlements.grant_manual(
            entitlement_key=key, beneficiary_user_id=user.id, reason="integration grant",
            metadata={"plan": "pro", "seats": 3}))
        assert isinstance(granted, Entitlement)
        assert granted.id
        assert granted.entitlement_key == key
        assert granted.beneficiary_user_id == user.id
        assert granted.source == "manual"
        assert granted.manual_grant_reason == "integration grant"
        assert granted.granted_by_user_id == admin_pair.user.user_id
        assert granted.metadata == {"plan": "pro", "seats": 3}
        assert isinstance(granted.starts_at, datetime)
        assert granted.revoked_at is None

        wait_access(raw, user.id, key, True)
        assert await c(backend.entitlements.check_access(user.id, key)) is True
        assert await c(backend.entitlements.check_access(
            user_id=user.id, entitlement_key=unique_key("it_other"))) is False

        listed = await c(backend.entitlements.get_user_entitlements(user_id=user.id))
        assert granted.id in [item.id for item in listed]
        only = await c(backend.entitlements.get_user_entitlements(user_id=user.id,
                                                                  entitlement_key=key))
        assert [item.id for item in only] == [granted.id]
        assert only[0].metadata == {"plan": "pro", "seats": 3}

        # -- revoke (204): then neither check_access nor the list sees it ------------------
        assert await c(admin.entitlements.revoke(granted.id, reason="integration revoke")) is None
        wait_access(raw, user.id, key, False)
        assert await c(backend.entitlements.check_access(user.id, key)) is False
        # An unknown id is a typed "not found".
        with pytest.raises(EntitlementsError) as unknown:
            await c(admin.entitlements.revoke(str(uuid.uuid4())))
        assert unknown.value.status_code == 404
        assert unknown.value.error_code == "NOT_FOUND"

        after = await c(backend.entitlements.get_user_entitlements(user_id=user.id,
                                                                   entitlement_key=key))
        assert after == []
        history = await c(backend.entitlements.get_user_entitlements(
            user_id=user.id, entitlement_key=key, include_revoked=True))
        (revoked,) = [item for item in history if item.id == granted.id]
        assert revoked.revoked_reason == "integration revoke"
        assert isinstance(revoked.revoked_at, datetime)

    flavor.run(flow)


def test_non_admin_may_not_grant_or_revoke(flavor: Flavor, user: NewUser) -> None:
    async def flow(c: Flavor) -> None:
        spaps = c.client()
        await c.sign_in(spaps, user.email, user.password)
        with pytest.raises(EntitlementsError) as refused:
            await c(spaps.entitlements.grant_manual(entitlement_key=unique_key(),
                                                    beneficiary_user_id=user.id))
        assert refused.value.status_code == 403
        assert refused.value.error_code == "FORBIDDEN"
        assert refused.value.request_id

        with pytest.raises(EntitlementsError) as not_revoked:
            await c(spaps.entitlements.revoke(str(uuid.uuid4())))
        assert not_revoked.value.status_code == 403
        assert not_revoked.value.error_code == "FORBIDDEN"

        with pytest.raises(ValueError):
            await c(spaps.entitlements.grant_manual(entitlement_key=unique_key()))
        with pytest.raises(ValueError):
            await c(spaps.entitlements.check_access(entitlement_key=unique_key()))

    flavor.run(flow)


def test_claim_pending_takes_over_a_grant_made_for_the_email(flavor: Flavor,
                                                            raw: RawApi) -> None:
    admin_email, admin_password = raw.admin_credentials()
    key = unique_key("it_claim")
    email, password = unique_email("claim"), strong_password()

    async def flow(c: Flavor) -> None:
        admin = c.client()
        await c.sign_in(admin, admin_email, admin_password)
        pending = await c(admin.entitlements.grant_manual(
            entitlement_key=key, beneficiary_email=email, reason="bought before sign-up"))
        assert pending.beneficiary_email == email
        assert pending.beneficiary_user_id is None

        # The buyer signs up afterwards: the grant is not theirs until they claim it.
        spaps = c.client()
        created = await c(spaps.auth.register(email=email, password=password))
        user_id = created.user.id
        assert created.tokens is not None
        raw.wait_session_visible(created.tokens.access_token)
        assert await c(spaps.entitlements.check_access(user_id, key)) is False

        result = await c(spaps.entitlements.claim_pending())
        assert result.count == 1
        (claimed,) = result.claimed
        assert claimed.id == pending.id
        assert claimed.entitlement_key == key
        assert claimed.beneficiary_user_id == user_id

        wait_access(raw, user_id, key, True)
        assert await c(spaps.entitlements.check_access(user_id, key)) is True
        mine = await c(spaps.entitlements.get_user_entitlements(user_id=user_id))
        assert pending.id in [item.id for item in mine]

        # Nothing is left to claim.
        again = await c(spaps.entitlements.claim_pending())
        assert again.count == 0 and again.claimed == []

    flavor.run(flow)
