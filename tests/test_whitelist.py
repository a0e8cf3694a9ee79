"""Whitelist (docs/api.md, "Whitelist"), sync and async: check, list, add, update, remove."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Iterator

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

import spaps_client
from spaps_client import (
    WhitelistCheckResult,
    WhitelistEntry,
    WhitelistError,
    WhitelistListResult,
    WhitelistMessage,
)
from spaps_mock import ADMIN_EMAIL, ADMIN_PASSWORD, ADMIN_USER_ID, APPLICATION_ID, MockServer

PREFIX = "/api/v1/whitelist"
CHECK = PREFIX + "/check"
TAGGED = "user+tag@example.com"


@pytest.fixture(params=SURFACES)
def api(request: pytest.FixtureRequest, server: MockServer) -> Iterator[Twin]:
    """Signed in as the seeded admin: SPAPS lets only admins list and change the whitelist."""
    with aggregate(server, request.param, sign_in=False) as twin:
        twin.auth.sign_in_with_password(email=ADMIN_EMAIL, password=ADMIN_PASSWORD)
        yield twin


@pytest.fixture(params=SURFACES)
def user_api(request: pytest.FixtureRequest, server: MockServer) -> Iterator[Twin]:
    """Signed in as the demo user, who is no admin."""
    with aggregate(server, request.param) as twin:
        yield twin


def admin_token(server: MockServer) -> str:
    with spaps_client.SpapsClient(base_url=server.url, api_key=API_KEY) as client:
        return client.auth.sign_in_with_password(email=ADMIN_EMAIL,
                                                 password=ADMIN_PASSWORD).access_token


# --- check --------------------------------------------------------------------------------


@pytest.mark.parametrize("surface", SURFACES)
def test_check_works_without_sign_in(server: MockServer, surface: str) -> None:
    with aggregate(server, surface, sign_in=False) as client:
        result = client.whitelist.check(email="nobody+x@example.com")

    request = last_request(server, "GET", CHECK)
    assert request.raw_query == "email=nobody%2Bx%40example.com"
    assert request.query == {"email": ["nobody+x@example.com"]}
    assert_auth(request, None)
    assert_no_body(request)
    assert isinstance(result, WhitelistCheckResult)
    assert result.message == "Email nobody+x@example.com is not whitelisted"
    assert result.entry is None


def test_check_never_sends_the_bearer_token(api: Twin, server: MockServer) -> None:
    api.whitelist.add(email=TAGGED, tier="basic")

    result = api.whitelist.check(email=TAGGED)

    assert_auth(last_request(server, "GET", CHECK), None)
    assert result.message == f"Email {TAGGED} is whitelisted"
    assert isinstance(result.entry, WhitelistEntry)
    assert result.entry.email == TAGGED
    assert result.entry.tier == "basic"
    assert result.entry.bypass_payment is True


def test_check_works_for_a_user_who_is_no_admin(api: Twin, user_api: Twin,
                                                server: MockServer) -> None:
    api.whitelist.add(email=TAGGED)

    result = user_api.whitelist.check(email=TAGGED)

    assert_auth(last_request(server, "GET", CHECK), None)
    assert result.entry is not None and result.entry.email == TAGGED


def test_check_error(api: Twin, server: MockServer) -> None:
    tag_request_id(server, "GET", CHECK)

    with pytest.raises(WhitelistError) as caught:
        api.whitelist.check(email="")

    assert_service_error(caught.value, WhitelistError, 400, "VALIDATION_ERROR")


# --- list ---------------------------------------------------------------------------------


def test_list_defaults(api: Twin, server: MockServer) -> None:
    empty = api.whitelist.list()

    request = last_request(server, "GET", PREFIX)
    assert request.raw_query == "limit=10&offset=0"
    assert_auth(request, access_token(api))
    assert_no_body(request)
    assert isinstance(empty, WhitelistListResult)
    assert empty.entries == []
    assert empty.total == 0


def test_list_pages_and_filters_persisted_entries(api: Twin, server: MockServer) -> None:
    api.whitelist.add(email="a@example.com", tier="basic")
    api.whitelist.add(email="b@example.com", tier="premium")
    api.whitelist.add(email="c@example.com", tier="basic")

    everything = api.whitelist.list()
    assert [entry.email for entry in everything.entries] == [
        "a@example.com", "b@example.com", "c@example.com"
    ]
    assert everything.total == 3
    assert all(isinstance(entry, WhitelistEntry) for entry in everything.entries)

    page = api.whitelist.list(limit=1, offset=1, tier="basic")
    assert last_request(server, "GET", PREFIX).raw_query == "limit=1&offset=1&tier=basic"
    assert [entry.email for entry in page.entries] == ["c@example.com"]
    assert page.total == 2

    api.whitelist.list(tier="")
    assert last_request(server, "GET", PREFIX).raw_query == "limit=10&offset=0"


@pytest.mark.parametrize("surface", SURFACES)
def test_list_needs_a_token(server: MockServer, surface: str) -> None:
    with aggregate(server, surface, sign_in=False) as client, pytest.raises(ValueError):
        client.whitelist.list()

    assert server.requests == []


# --- add ----------------------------------------------------------------------------------


def test_add_defaults(api: Twin, server: MockServer) -> None:
    entry = api.whitelist.add(email=TAGGED)

    request = last_request(server, "POST", PREFIX)
    assert_auth(request, access_token(api))
    assert_json_body(request, {"email": TAGGED, "tier": "premium", "bypass_payment": True})
    assert isinstance(entry, WhitelistEntry)
    assert entry.email == TAGGED
    assert entry.tier == "premium"
    assert entry.bypass_payment is True
    assert entry.application_id == APPLICATION_ID
    assert entry.metadata == {}
    assert entry.id is not None and uuid.UUID(entry.id)
    assert entry.created_by == ADMIN_USER_ID
    assert isinstance(entry.created_at, datetime) and isinstance(entry.updated_at, datetime)


def test_add_sends_every_given_key(api: Twin, server: MockServer) -> None:
    entry = api.whitelist.add(email=TAGGED, tier="basic", bypass_payment=False, metadata={})

    assert_json_body(last_request(server, "POST", PREFIX),
                     {"email": TAGGED, "tier": "basic", "bypass_payment": False, "metadata": {}})
    assert entry.bypass_payment is False
    assert entry.tier == "basic"


def test_add_error(api: Twin, server: MockServer) -> None:
    tag_request_id(server, "POST", PREFIX)

    with pytest.raises(WhitelistError) as caught:
        api.whitelist.add(email="not-an-email")

    assert_service_error(caught.value, WhitelistError, 400, "VALIDATION_ERROR")
    assert caught.value.details == {"fields": {"email": (
        "value is not a valid email address: An email address must have an @-sign.")}}


def test_add_duplicate(api: Twin, server: MockServer) -> None:
    api.whitelist.add(email=TAGGED, tier="basic")
    tag_request_id(server, "POST", PREFIX)

    with pytest.raises(WhitelistError) as caught:
        api.whitelist.add(email=TAGGED.upper(), tier="premium")

    assert_service_error(caught.value, WhitelistError, 409, "DUPLICATE_ENTRY")
    entry = api.whitelist.check(email=TAGGED).entry
    assert entry is not None and entry.tier == "basic"


# --- only admins may list and change it ---------------------------------------------------


def test_writes_and_list_need_an_admin(api: Twin, user_api: Twin, server: MockServer) -> None:
    api.whitelist.add(email=TAGGED, tier="basic")
    calls = [
        ("GET", PREFIX, lambda: user_api.whitelist.list()),
        ("POST", PREFIX, lambda: user_api.whitelist.add(email="new@example.com")),
        ("PUT", f"{PREFIX}/{TAGGED}", lambda: user_api.whitelist.update(email=TAGGED,
                                                                        tier="enterprise")),
        ("DELETE", f"{PREFIX}/{TAGGED}", lambda: user_api.whitelist.remove(email=TAGGED)),
    ]
    for method, path, call in calls:
        tag_request_id(server, method, path)
        with pytest.raises(WhitelistError) as caught:
            call()
        assert_service_error(caught.value, WhitelistError, 403, "FORBIDDEN")
        assert_auth(last_request(server, method, path), access_token(user_api))

    entries = api.whitelist.list().entries
    assert [(e.email, e.tier) for e in entries] == [(TAGGED, "basic")]


# --- update -------------------------------------------------------------------------------


def test_update_keeps_plus_and_at_literal_in_the_path(api: Twin, server: MockServer) -> None:
    api.whitelist.add(email=TAGGED, tier="basic")

    entry = api.whitelist.update(email=TAGGED, tier="enterprise")

    request = last_request(server, "PUT", f"{PREFIX}/user+tag@example.com")
    assert_auth(request, access_token(api))
    assert_json_body(request, {"tier": "enterprise"})
    assert isinstance(entry, WhitelistEntry)
    assert entry.email == TAGGED
    assert entry.tier == "enterprise"
    assert api.whitelist.list().entries[0].tier == "enterprise"


def test_update_sends_only_given_keys(api: Twin, server: MockServer) -> None:
    api.whitelist.add(email=TAGGED, metadata={"note": "vip"})
    path = f"{PREFIX}/{TAGGED}"

    entry = api.whitelist.update(email=TAGGED, bypass_payment=False, metadata={})
    assert_json_body(last_request(server, "PUT", path), {"bypass_payment": False, "metadata": {}})
    assert entry.bypass_payment is False
    assert entry.metadata == {}

    unchanged = api.whitelist.update(email=TAGGED)
    request = last_request(server, "PUT", path)
    assert_json_body(request, {})
    assert unchanged.bypass_payment is False


def test_update_unknown_email(api: Twin, server: MockServer) -> None:
    tag_request_id(server, "PUT", f"{PREFIX}/ghost@example.com")

    with pytest.raises(WhitelistError) as caught:
        api.whitelist.update(email="ghost@example.com", tier="basic")

    assert_service_error(caught.value, WhitelistError, 404, "NOT_FOUND")


# --- remove -------------------------------------------------------------------------------


def test_remove(api: Twin, server: MockServer) -> None:
    api.whitelist.add(email=TAGGED)

    result = api.whitelist.remove(email=TAGGED)

    request = last_request(server, "DELETE", f"{PREFIX}/user+tag@example.com")
    assert_auth(request, access_token(api))
    assert_no_body(request)
    assert isinstance(result, WhitelistMessage)
    # SPAPS answers 204 without a body: the message is the client's own.
    assert result.message == f"{TAGGED} was removed from the whitelist"
    assert api.whitelist.check(email=TAGGED).entry is None
    assert api.whitelist.list().total == 0


def test_remove_unknown_email(api: Twin, server: MockServer) -> None:
    tag_request_id(server, "DELETE", f"{PREFIX}/ghost@example.com")

    with pytest.raises(WhitelistError) as caught:
        api.whitelist.remove(email="ghost@example.com")

    assert_service_error(caught.value, WhitelistError, 404, "NOT_FOUND")


# --- hostile path parameters --------------------------------------------------------------


@pytest.mark.parametrize(
    ("email", "raw_path"),
    [
        ("../check?email=x@example.com", f"{PREFIX}/..%2Fcheck%3Femail=x@example.com"),
        ("a/b@example.com", f"{PREFIX}/a%2Fb@example.com"),
        ("x@example.com#frag", f"{PREFIX}/x@example.com%23frag"),
        ("with space@example.com", f"{PREFIX}/with%20space@example.com"),
    ],
    ids=["dotdot-query", "slash", "hash", "space"],
)
def test_hostile_email_is_percent_encoded(
    api: Twin, server: MockServer, email: str, raw_path: str
) -> None:
    tag_request_id(server, "DELETE", raw_path)

    with pytest.raises(WhitelistError) as caught:
        api.whitelist.remove(email=email)

    last_request(server, "DELETE", raw_path)
    assert_service_error(caught.value, WhitelistError, 404, "NOT_FOUND")

    api.whitelist.add(email=email)
    updated = api.whitelist.update(email=email, tier="basic")
    assert last_request(server, "PUT", raw_path).json == {"tier": "basic"}
    assert updated.email == email
    assert api.whitelist.check(email=email).entry is not None


def test_empty_email_path_is_refused_before_sending(api: Twin, server: MockServer) -> None:
    sent = len(server.requests)

    with pytest.raises(ValueError):
        api.whitelist.update(email="", tier="basic")
    with pytest.raises(ValueError):
        api.whitelist.remove(email="..")

    assert len(server.requests) == sent


# --- standalone ---------------------------------------------------------------------------


@pytest.mark.parametrize("surface", SURFACES)
def test_standalone_whitelist_client(server: MockServer, surface: str) -> None:
    token = admin_token(server)
    anonymous = standalone(surface, "WhitelistClient", base_url=server.url, api_key=API_KEY)
    signed = standalone(surface, "WhitelistClient", base_url=server.url, api_key=API_KEY,
                        access_token=token)
    try:
        assert anonymous.check(email="a@example.com").entry is None
        assert_auth(last_request(server, "GET", CHECK), None)
        with pytest.raises(ValueError):
            anonymous.list()

        signed.add(email="a@example.com")
        assert_auth(last_request(server, "POST", PREFIX), token)
        assert signed.check(email="a@example.com").entry is not None
        assert_auth(last_request(server, "GET", CHECK), None)
        assert signed.remove(email="a@example.com").message == (
            "a@example.com was removed from the whitelist")
        assert anonymous.check(email="a@example.com").entry is None
    finally:
        close(anonymous)
        close(signed)


@pytest.mark.parametrize("surface", SURFACES)
def test_standalone_whitelist_client_with_a_user_token(server: MockServer,
                                                       surface: str) -> None:
    token = demo_token(server)
    signed = standalone(surface, "WhitelistClient", base_url=server.url, api_key=API_KEY,
                        access_token=token)
    try:
        with pytest.raises(WhitelistError) as caught:
            signed.add(email="a@example.com")
        assert (caught.value.status_code, caught.value.error_code) == (403, "FORBIDDEN")
        assert_auth(last_request(server, "POST", PREFIX), token)
    finally:
        close(signed)
