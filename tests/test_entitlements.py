"""Entitlements against the emulator, sync and async: an admin grants, the user holds it, an
admin revokes; e-mail grants are claimed after sign-up; non-admins and bad arguments refused."""

from __future__ import annotations

from typing import Iterator

import pytest
from conftest import API_KEY, DEMO_EMAIL, subject_of
from service_twin import SURFACES, Twin, access_token, aggregate, assert_json_body, last_request

from spaps_client import Entitlement, EntitlementClaimResult, EntitlementsError, ManualGrantParams
from spaps_mock import ADMIN_EMAIL, ADMIN_PASSWORD, MockServer

KEY = "pro_plan"


def subject(twin: Twin) -> str:
    return subject_of(access_token(twin))


@pytest.fixture(params=SURFACES)
def user(request: pytest.FixtureRequest, server: MockServer) -> Iterator[Twin]:
    with aggregate(server, request.param) as twin:
        yield twin


@pytest.fixture
def admin_twin(server: MockServer, user: Twin) -> Iterator[Twin]:
    with aggregate(server, "async" if user._is_async else "sync", sign_in=False) as twin:
        twin.auth.sign_in_with_password(email=ADMIN_EMAIL, password=ADMIN_PASSWORD)
        yield twin


def test_grant_then_check_access_and_list(
    user: Twin, admin_twin: Twin, server: MockServer
) -> None:
    uid = subject(user)
    assert user.entitlements.check_access(uid, KEY) is False

    granted = admin_twin.entitlements.grant_manual(
        entitlement_key=KEY, beneficiary_user_id=uid, reason="support ticket 42",
        metadata={"seats": 3})

    request = last_request(server, "POST", "/api/entitlements/manual")
    assert request.headers["authorization"] == "Bearer " + access_token(admin_twin)
    assert_json_body(request, {"entitlement_key": KEY, "beneficiary_user_id": uid,
                               "reason": "support ticket 42", "metadata": {"seats": 3}})
    assert isinstance(granted, Entitlement)
    assert (granted.entitlement_key, granted.beneficiary_user_id) == (KEY, uid)
    assert granted.source == "manual" and granted.manual_grant_reason == "support ticket 42"
    assert granted.revoked_at is None and granted.starts_at is not None

    assert user.entitlements.check_access(uid, KEY) is True
    check = last_request(server, "GET", "/api/entitlements/check")
    assert check.query == {"user_id": [uid], "entitlement_key": [KEY]}
    assert check.headers["x-api-key"] == API_KEY
    assert user.entitlements.check_access(uid, "other_plan") is False

    listed = user.entitlements.get_user_entitlements(user_id=uid)
    assert [e.id for e in listed] == [granted.id]
    assert all(isinstance(e, Entitlement) for e in listed)
    assert user.entitlements.get_user_entitlements(user_id=uid, entitlement_key="nope") == []
    context = user.auth.get_session_context()
    assert context.entitlements_count == 1
    assert context.entitlements[0]["entitlement_key"] == KEY


def test_grant_with_params_object(user: Twin, admin_twin: Twin) -> None:
    uid = subject(user)
    params = ManualGrantParams(entitlement_key=KEY, beneficiary_user_id=uid, reason="promo")

    granted = admin_twin.entitlements.grant_manual(params)

    assert granted.entitlement_key == KEY
    assert user.entitlements.check_access(uid, KEY) is True


def test_revoke_then_access_is_gone(user: Twin, admin_twin: Twin, server: MockServer) -> None:
    uid = subject(user)
    granted = admin_twin.entitlements.grant_manual(entitlement_key=KEY, beneficiary_user_id=uid)

    assert admin_twin.entitlements.revoke(granted.id, reason="refund") is None

    request = last_request(server, "DELETE", f"/api/entitlements/{granted.id}")
    assert request.query == {"reason": ["refund"]}
    assert user.entitlements.check_access(uid, KEY) is False
    assert user.entitlements.get_user_entitlements(user_id=uid) == []
    revoked = user.entitlements.get_user_entitlements(user_id=uid, include_revoked=True)
    assert last_request(server, "GET", "/api/entitlements").query == {
        "user_id": [uid], "include_revoked": ["true"]}
    assert [(e.id, e.revoked_reason) for e in revoked] == [(granted.id, "refund")]
    assert revoked[0].revoked_at is not None

    with pytest.raises(EntitlementsError) as again:
        admin_twin.entitlements.revoke(granted.id)
    assert (again.value.status_code, again.value.error_code) == (400, "ALREADY_REVOKED")


def test_revoke_unknown_is_404(admin_twin: Twin) -> None:
    with pytest.raises(EntitlementsError) as caught:
        admin_twin.entitlements.revoke("6f1c2d3e-0000-4000-8000-000000000000")

    assert type(caught.value) is EntitlementsError
    assert (caught.value.status_code, caught.value.error_code) == (404, "NOT_FOUND")


def test_claim_pending_takes_over_an_email_grant(
    user: Twin, admin_twin: Twin, server: MockServer
) -> None:
    uid = subject(user)
    granted = admin_twin.entitlements.grant_manual(entitlement_key=KEY,
                                                   beneficiary_email=DEMO_EMAIL)
    assert granted.beneficiary_user_id is None and granted.beneficiary_email == DEMO_EMAIL
    assert user.entitlements.check_access(uid, KEY) is False
    assert [e.id for e in user.entitlements.get_user_entitlements(email=DEMO_EMAIL)] == [
        granted.id]

    result = user.entitlements.claim_pending()

    request = last_request(server, "POST", "/api/entitlements/claim")
    assert request.headers["authorization"] == "Bearer " + access_token(user)
    assert isinstance(result, EntitlementClaimResult)
    assert result.count == 1
    assert [(e.id, e.beneficiary_user_id) for e in result.claimed] == [(granted.id, uid)]
    assert user.entitlements.check_access(uid, KEY) is True
    assert user.entitlements.claim_pending().count == 0


def test_non_admin_grant_is_forbidden(user: Twin, server: MockServer) -> None:
    uid = subject(user)

    with pytest.raises(EntitlementsError) as caught:
        user.entitlements.grant_manual(entitlement_key=KEY, beneficiary_user_id=uid)

    assert type(caught.value) is EntitlementsError
    assert (caught.value.status_code, caught.value.error_code) == (403, "FORBIDDEN")
    assert str(caught.value) == "Admin access required"
    assert user.entitlements.check_access(uid, KEY) is False
    with pytest.raises(EntitlementsError) as revoke:
        user.entitlements.revoke("6f1c2d3e-0000-4000-8000-000000000000")
    assert revoke.value.status_code == 403


@pytest.mark.parametrize("call", [
    lambda e: e.check_access(entitlement_key=KEY),
    lambda e: e.check_access("3d1c2d3e-0000-4000-8000-000000000000"),
    lambda e: e.check_access("", KEY),
    lambda e: e.get_user_entitlements(),
    lambda e: e.grant_manual(entitlement_key=KEY),
    lambda e: e.grant_manual(),
    lambda e: e.grant_manual(ManualGrantParams(entitlement_key=KEY, beneficiary_email="a@b.c"),
                             entitlement_key=KEY),
], ids=["check-no-user", "check-no-key", "check-empty-user", "list-no-user",
        "grant-no-beneficiary", "grant-no-key", "grant-params-and-keywords"])
def test_missing_user_or_key_is_a_value_error_before_any_request(
    user: Twin, server: MockServer, call: object
) -> None:
    before = len(server.requests)

    with pytest.raises(ValueError):
        call(user.entitlements)  # type: ignore[operator]

    assert len(server.requests) == before


@pytest.mark.parametrize("surface", SURFACES)
def test_lookups_work_without_tokens(server: MockServer, surface: str) -> None:
    with aggregate(server, surface, sign_in=False) as anonymous:
        assert anonymous.entitlements.check_access(email="nobody@example.com",
                                                   entitlement_key=KEY) is False
        request = last_request(server, "GET", "/api/entitlements/check")
        assert "authorization" not in request.headers
        assert request.query == {"email": ["nobody@example.com"], "entitlement_key": [KEY]}
