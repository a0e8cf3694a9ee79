"""Auth service (docs/api.md, "Auth — AuthClient"), sync and async, over real HTTP to
``spaps_mock``.

Each test checks what the server saw (method, path, headers, JSON body) and what the
caller got back (models, stored tokens, errors).
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from typing import Any, Dict, List

import pytest
from conftest import API_KEY, DEMO_EMAIL, DEMO_PASSWORD, is_uuid, only

from spaps_client import (
    AsyncAuthClient,
    AsyncSpapsClient,
    AuthClient,
    AuthError,
    InMemoryTokenStorage,
    MagicLinkAuthResponse,
    MagicLinkSendResponse,
    MessageResponse,
    NonceResponse,
    PasswordResetRequestResponse,
    RegistrationResponse,
    RegistrationTokens,
    RegistrationUser,
    SessionError,
    SessionsClient,
    SpapsClient,
    SpapsError,
    StoredTokens,
    TokenPair,
    TokenUser,
    UserProfile,
    UserWallet,
)
from spaps_mock import MockServer, RecordedRequest

WALLET = "0x52908400098527886E0F7030069857D2E4169EE7"
# SPAPS wants at least 8 characters, an upper-case letter and a digit (else WEAK_PASSWORD).
STRONG_PASSWORD = "A-long-password-1"
# The access-token lifetime SPAPS 0.6.6 reports (JWT_EXPIRES_IN=1h).
EXPIRES_IN = 3600




def last(server: MockServer, method: str, path: str) -> RecordedRequest:
    matches = [r for r in server.requests if r.method == method and r.path == path]
    assert matches, f"no {method} {path} was recorded"
    return matches[-1]


def assert_key_only(request: RecordedRequest) -> None:
    """API key sent, no bearer token: sign-in calls send only the API key (docs/api.md, "Auth")."""
    assert request.headers.get("x-api-key") == API_KEY
    assert "authorization" not in request.headers


def assert_json_post(request: RecordedRequest, body: Dict[str, Any]) -> None:
    assert request.method == "POST"
    assert request.headers.get("content-type", "").startswith("application/json")
    assert request.json == body


def assert_stored_pair(stored: StoredTokens | None, access: str, refresh: str,
                       expires_in: int, before: datetime) -> None:
    assert stored is not None
    assert stored.access_token == access
    assert stored.refresh_token == refresh
    assert stored.token_type == "Bearer"
    assert stored.expires_at is not None
    assert stored.expires_at.tzinfo is not None
    after = datetime.now(timezone.utc)
    assert before + timedelta(seconds=expires_in) <= stored.expires_at
    assert stored.expires_at <= after + timedelta(seconds=expires_in)


# --------------------------------------------------------------------------------------------
# Password sign-in
# --------------------------------------------------------------------------------------------


def test_sign_in_with_password_wire_format_and_model(server: MockServer,
                                                     client: SpapsClient) -> None:
    before = datetime.now(timezone.utc)
    pair = client.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)

    request = only(server, "POST", "/api/auth/login")
    assert_key_only(request)
    assert_json_post(request, {"email": DEMO_EMAIL, "password": DEMO_PASSWORD})
    assert request.raw_query == ""

    assert isinstance(pair, TokenPair)
    assert isinstance(pair.access_token, str) and pair.access_token
    assert isinstance(pair.refresh_token, str) and pair.refresh_token
    assert pair.access_token != pair.refresh_token
    assert pair.expires_in == EXPIRES_IN and isinstance(pair.expires_in, int)
    assert pair.token_type == "Bearer"
    assert isinstance(pair.user, TokenUser)
    assert is_uuid(pair.user.user_id)
    assert pair.user.email == DEMO_EMAIL
    assert pair.user.username == "demo"
    assert pair.user.tier == "basic"
    assert pair.user.roles == ["user"]
    assert pair.user.is_admin is False
    # The login reply leaves out null keys: no wallets, no email_confirmed.
    assert pair.user.wallets is None
    assert pair.user.email_confirmed is None

    assert_stored_pair(client.get_tokens(), pair.access_token, pair.refresh_token, EXPIRES_IN,
                       before)
    assert client.auth.get_stored_tokens() == client.get_tokens()


def test_stored_token_is_what_later_calls_send(server: MockServer, client: SpapsClient) -> None:
    pair = client.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
    client.sessions.get_current_session()
    request = only(server, "GET", "/api/sessions/current")
    assert request.headers["authorization"] == f"Bearer {pair.access_token}"
    assert request.headers["x-api-key"] == API_KEY


def test_wrong_password_maps_to_auth_error(server: MockServer, client: SpapsClient) -> None:
    server.inject("POST", "/api/auth/login",
                  {"passthrough": True, "headers": {"x-request-id": "req_from_the_test"}})
    with pytest.raises(AuthError) as caught:
        client.auth.sign_in_with_password(email=DEMO_EMAIL, password="not-the-password")
    error = caught.value
    assert isinstance(error, SpapsError)
    assert error.status_code == 401
    assert error.error_code == "INVALID_CREDENTIALS"
    assert error.request_id == "req_from_the_test"
    assert str(error) == ("Invalid email or password. Check your credentials, or use Forgot "
                          "password to reset.")
    assert error.response is not None and error.response.status_code == 401
    assert client.get_tokens() is None
    # The failed sign-in is not retried (a POST answered with 401).
    assert server.request_count("POST", "/api/auth/login") == 1


def test_request_id_falls_back_to_body_request_id(client: SpapsClient,
                                                 server: MockServer) -> None:
    # An empty x-request-id header: the id must come from the error body's top-level
    # request_id (SPAPS puts it there, not under metadata).
    server.inject("POST", "/api/auth/login",
                  {"status": 401, "code": "INVALID_CREDENTIALS", "headers": {"x-request-id": ""}})
    with pytest.raises(AuthError) as caught:
        client.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
    assert caught.value.status_code == 401
    assert caught.value.error_code == "INVALID_CREDENTIALS"
    assert caught.value.response is not None
    assert not caught.value.response.headers.get("x-request-id")
    assert caught.value.request_id is not None and is_uuid(caught.value.request_id)


def test_unknown_user_is_invalid_credentials(client: SpapsClient) -> None:
    with pytest.raises(AuthError) as caught:
        client.auth.sign_in_with_password(email="nobody@example.com", password="whatever-pw")
    assert (caught.value.status_code, caught.value.error_code) == (401, "INVALID_CREDENTIALS")
    # The request id is the x-request-id header the server answered with.
    assert caught.value.response is not None
    assert caught.value.request_id == caught.value.response.headers["x-request-id"]


def test_server_error_maps_to_auth_error_with_status(server: MockServer,
                                                     client: SpapsClient) -> None:
    server.inject("POST", "/api/auth/login",
                  {"status": 500, "code": "SERVER_ERROR", "message": "boom"})
    with pytest.raises(AuthError) as caught:
        client.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
    assert caught.value.status_code == 500
    assert caught.value.error_code == "SERVER_ERROR"
    assert str(caught.value) == "boom"


# --------------------------------------------------------------------------------------------
# Refresh
# --------------------------------------------------------------------------------------------


def test_refresh_rotates_and_old_refresh_token_is_rejected(server: MockServer,
                                                          client: SpapsClient) -> None:
    first = client.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
    before = datetime.now(timezone.utc)
    second = client.auth.refresh_tokens(refresh_token=first.refresh_token)

    request = only(server, "POST", "/api/auth/refresh")
    assert_key_only(request)
    assert_json_post(request, {"refresh_token": first.refresh_token})

    assert isinstance(second, TokenPair)
    assert second.access_token != first.access_token
    assert second.refresh_token != first.refresh_token
    assert second.user is None  # SPAPS names the user in sign-in replies only
    assert second.expires_in == EXPIRES_IN
    assert_stored_pair(client.get_tokens(), second.access_token, second.refresh_token,
                       EXPIRES_IN, before)

    # The same client sending the consumed token again within 60 s gets the same pair back
    # (SPAPS's rotation grace for a client that lost the first answer).
    again = client.auth.refresh_tokens(refresh_token=first.refresh_token)
    assert (again.access_token, again.refresh_token) == (second.access_token,
                                                         second.refresh_token)

    # A token the server never issued is rejected, and the good tokens stay in place.
    with pytest.raises(AuthError) as caught:
        client.auth.refresh_tokens(refresh_token="not-a-refresh-token")
    assert caught.value.status_code == 401
    assert caught.value.error_code == "INVALID_REFRESH_TOKEN"
    assert caught.value.request_id and is_uuid(caught.value.request_id)
    stored = client.get_tokens()
    assert stored is not None and stored.refresh_token == second.refresh_token

    # The new tokens work.
    client.sessions.get_current_session()
    assert last(server, "GET", "/api/sessions/current").headers["authorization"] == (
        f"Bearer {second.access_token}"
    )


def test_consumed_refresh_token_after_the_grace_is_a_replay() -> None:
    now = [1_900_000_000.0]
    with MockServer(clock=lambda: now[0]) as server, \
            SpapsClient(base_url=server.url, api_key=API_KEY) as client:
        first = client.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
        second = client.auth.refresh_tokens(refresh_token=first.refresh_token)
        now[0] += 61  # past the 60 s grace
        with pytest.raises(AuthError) as caught:
            client.auth.refresh_tokens(refresh_token=first.refresh_token)
        assert (caught.value.status_code, caught.value.error_code) == (
            401, "REFRESH_TOKEN_REPLAY")
        stored = client.get_tokens()
        assert stored is not None and stored.refresh_token == second.refresh_token
        # A replay signs the identity out: the successor refresh token is revoked as well.
        with pytest.raises(AuthError) as revoked:
            client.auth.refresh_tokens(refresh_token=second.refresh_token)
        assert (revoked.value.status_code, revoked.value.error_code) == (
            401, "REFRESH_TOKEN_REPLAY")


def test_refresh_sends_the_argument_not_the_stored_token(server: MockServer,
                                                        client: SpapsClient) -> None:
    first = client.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
    client.set_tokens(access_token="other-access", refresh_token="other-refresh")
    client.auth.refresh_tokens(refresh_token=first.refresh_token)
    assert only(server, "POST", "/api/auth/refresh").json == {
        "refresh_token": first.refresh_token
    }


# --------------------------------------------------------------------------------------------
# Wallet sign-in
# --------------------------------------------------------------------------------------------


def test_request_nonce_sends_chain_and_stores_nothing(server: MockServer,
                                                      client: SpapsClient) -> None:
    nonce = client.auth.request_nonce(wallet_address=WALLET, chain="solana")

    request = only(server, "POST", "/api/auth/nonce")
    assert_key_only(request)
    assert_json_post(request, {"wallet_address": WALLET, "chain": "solana"})
    assert "chain_type" not in request.json

    assert isinstance(nonce, NonceResponse)
    assert nonce.wallet_address == WALLET.lower()  # SPAPS lower-cases 0x addresses
    assert nonce.nonce and nonce.nonce in nonce.message
    assert isinstance(nonce.expires_at, datetime) and nonce.expires_at.tzinfo is not None
    assert nonce.expires_at > datetime.now(timezone.utc)
    assert client.get_tokens() is None


@pytest.mark.parametrize("chain", [None, ""])
def test_request_nonce_omits_empty_chain(server: MockServer, client: SpapsClient,
                                         chain: Any) -> None:
    client.auth.request_nonce(wallet_address=WALLET, chain=chain)
    assert only(server, "POST", "/api/auth/nonce").json == {"wallet_address": WALLET}


def test_verify_wallet_sends_chain_type_and_stores_tokens(server: MockServer,
                                                          client: SpapsClient) -> None:
    nonce = client.auth.request_nonce(wallet_address=WALLET, chain="ethereum")
    before = datetime.now(timezone.utc)
    pair = client.auth.verify_wallet(wallet_address=WALLET, signature="0xsigned",
                                     message=nonce.message, chain="ethereum")

    request = only(server, "POST", "/api/auth/wallet-sign-in")
    assert_key_only(request)
    assert_json_post(request, {"wallet_address": WALLET, "signature": "0xsigned",
                               "message": nonce.message, "chain_type": "ethereum"})
    assert "chain" not in request.json

    assert isinstance(pair, TokenPair)
    assert pair.user is not None and is_uuid(pair.user.user_id)
    assert pair.user.roles == ["user"]
    assert pair.user.email is None  # a wallet-only account
    assert_stored_pair(client.get_tokens(), pair.access_token, pair.refresh_token,
                       pair.expires_in, before)

    # The wallet identifies the account: signing in again gives the same user.
    nonce = client.auth.request_nonce(wallet_address=WALLET, chain="ethereum")
    again = client.auth.verify_wallet(wallet_address=WALLET, signature="0xsigned",
                                      message=nonce.message, chain="ethereum")
    assert again.user is not None and again.user.user_id == pair.user.user_id


def test_verify_wallet_omits_chain_type_when_none(server: MockServer,
                                                  client: SpapsClient) -> None:
    nonce = client.auth.request_nonce(wallet_address=WALLET)
    client.auth.verify_wallet(wallet_address=WALLET, signature="0xsig", message=nonce.message)
    assert only(server, "POST", "/api/auth/wallet-sign-in").json == {
        "wallet_address": WALLET, "signature": "0xsig", "message": nonce.message,
    }


def test_verify_wallet_with_unknown_message_is_auth_error(client: SpapsClient) -> None:
    with pytest.raises(AuthError) as caught:
        client.auth.verify_wallet(wallet_address=WALLET, signature="0x", message="forged")
    assert caught.value.status_code == 401
    assert caught.value.error_code == "INVALID_SIGNATURE"
    assert client.get_tokens() is None


# --------------------------------------------------------------------------------------------
# Registration and magic links
# --------------------------------------------------------------------------------------------


def test_register_round_trip_stores_tokens(server: MockServer, client: SpapsClient) -> None:
    before = datetime.now(timezone.utc)
    result = client.auth.register(email="new@example.com", password=STRONG_PASSWORD,
                                  username="newbie", phone_number="+15550100")

    request = only(server, "POST", "/api/auth/register")
    assert_key_only(request)
    assert_json_post(request, {"email": "new@example.com", "password": STRONG_PASSWORD,
                               "username": "newbie", "phone_number": "+15550100"})

    assert isinstance(result, RegistrationResponse)
    assert result.message is None  # SPAPS's register reply carries no message
    assert result.email_confirmed is True  # an unknown key, kept and readable
    assert isinstance(result.user, RegistrationUser)
    assert is_uuid(result.user.id)
    assert result.user.email == "new@example.com"
    assert result.user.username == "newbie"
    assert result.user.phone_number == "+15550100"
    assert isinstance(result.tokens, RegistrationTokens)
    assert_stored_pair(client.get_tokens(), result.tokens.access_token,
                       result.tokens.refresh_token, result.tokens.expires_in, before)

    # The new account can sign in with its password.
    pair = client.auth.sign_in_with_password(email="new@example.com",
                                             password=STRONG_PASSWORD)
    assert pair.user.user_id == result.user.id


def test_register_omits_optional_keys_when_none(server: MockServer, client: SpapsClient) -> None:
    client.auth.register(email="plain@example.com", password=STRONG_PASSWORD)
    assert only(server, "POST", "/api/auth/register").json == {
        "email": "plain@example.com", "password": STRONG_PASSWORD,
    }


def test_register_sends_empty_optional_strings(server: MockServer, client: SpapsClient) -> None:
    # "if not None": an empty username is still sent.
    client.auth.register(email="empty@example.com", password=STRONG_PASSWORD, username="")
    assert only(server, "POST", "/api/auth/register").json == {
        "email": "empty@example.com", "password": STRONG_PASSWORD, "username": "",
    }


def test_register_duplicate_email_is_auth_error(client: SpapsClient) -> None:
    with pytest.raises(AuthError) as caught:
        client.auth.register(email=DEMO_EMAIL, password=STRONG_PASSWORD)
    assert caught.value.status_code == 400
    assert caught.value.error_code == "EMAIL_ALREADY_EXISTS"
    assert client.get_tokens() is None


@pytest.mark.parametrize("password", ["a-long-password", "A-LONG-PASSWORD", "Short-1"])
def test_register_weak_password_is_auth_error(server: MockServer, client: SpapsClient,
                                              password: str) -> None:
    with pytest.raises(AuthError) as caught:
        client.auth.register(email="weak@example.com", password=password)
    assert (caught.value.status_code, caught.value.error_code) == (400, "WEAK_PASSWORD")
    assert client.get_tokens() is None
    # Nothing was created: the same e-mail registers with a good password.
    client.auth.register(email="weak@example.com", password=STRONG_PASSWORD)


def test_magic_link_round_trip(server: MockServer, client: SpapsClient) -> None:
    sent = client.auth.send_magic_link(email=DEMO_EMAIL)

    request = only(server, "POST", "/api/auth/magic-link")
    assert_key_only(request)
    assert_json_post(request, {"email": DEMO_EMAIL})
    assert isinstance(sent, MagicLinkSendResponse)
    assert sent.message == "Magic link sent successfully"
    assert sent.email == DEMO_EMAIL
    assert isinstance(sent.sent_at, datetime) and sent.sent_at.tzinfo is not None
    assert client.get_tokens() is None  # sending a link stores nothing

    token = server.magic_link_token(DEMO_EMAIL)
    assert token
    before = datetime.now(timezone.utc)
    result = client.auth.verify_magic_link(token=token)

    request = only(server, "POST", "/api/auth/verify-magic-link")
    assert_key_only(request)
    assert_json_post(request, {"token": token, "type": "magiclink"})
    assert isinstance(result, MagicLinkAuthResponse)
    assert result.user.email == DEMO_EMAIL
    assert result.message is None  # SPAPS's verify reply carries no message
    assert result.tokens is not None
    assert_stored_pair(client.get_tokens(), result.tokens.access_token,
                       result.tokens.refresh_token, result.tokens.expires_in, before)
    assert client.sessions.get_current_session().user_id == result.user.id

    # A magic link works once.
    with pytest.raises(AuthError) as caught:
        client.auth.verify_magic_link(token=token)
    assert (caught.value.status_code, caught.value.error_code) == (401, "INVALID_TOKEN")


def test_verify_magic_link_sends_custom_type(server: MockServer, client: SpapsClient) -> None:
    client.auth.send_magic_link(email="fresh@example.com")
    token = server.magic_link_token("fresh@example.com")
    assert token
    client.auth.verify_magic_link(token=token, type="signup")
    assert only(server, "POST", "/api/auth/verify-magic-link").json == {
        "token": token, "type": "signup",
    }


def test_send_magic_link_does_not_touch_existing_tokens(client: SpapsClient) -> None:
    client.set_tokens(access_token="keep-me", refresh_token="keep-me-too")
    client.auth.send_magic_link(email=DEMO_EMAIL)
    client.auth.request_nonce(wallet_address=WALLET)
    stored = client.get_tokens()
    assert stored is not None
    assert (stored.access_token, stored.refresh_token) == ("keep-me", "keep-me-too")


# --------------------------------------------------------------------------------------------
# Logout
# --------------------------------------------------------------------------------------------


def test_logout_sends_bearer_and_stored_refresh_token_and_clears_storage(
    server: MockServer, client: SpapsClient
) -> None:
    pair = client.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
    result = client.auth.logout()

    request = only(server, "POST", "/api/auth/logout")
    assert request.headers["x-api-key"] == API_KEY
    assert request.headers["authorization"] == f"Bearer {pair.access_token}"
    # The refresh token goes in the body: without it SPAPS would leave it usable.
    assert_json_post(request, {"refresh_token": pair.refresh_token})
    assert isinstance(result, MessageResponse)
    assert result.message == "Successfully logged out"
    assert client.get_tokens() is None

    # The server revoked the refresh token too.
    with pytest.raises(AuthError) as refused:
        client.auth.refresh_tokens(refresh_token=pair.refresh_token)
    assert (refused.value.status_code, refused.value.error_code) == (
        401, "REFRESH_TOKEN_REPLAY")
    assert client.get_tokens() is None

    # The server ended the session: the old access token no longer works.
    sessions = SessionsClient(base_url=server.url, api_key=API_KEY,
                              access_token=pair.access_token)
    with sessions, pytest.raises(SessionError) as rejected:
        sessions.get_current_session()
    assert rejected.value.status_code == 401
    assert rejected.value.error_code == "INVALID_TOKEN"


def test_logout_with_explicit_token_uses_it_and_clears_storage(server: MockServer,
                                                               client: SpapsClient) -> None:
    other = SpapsClient(base_url=server.url, api_key=API_KEY)
    with other:
        theirs = other.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
    client.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
    client.auth.logout(access_token=theirs.access_token)
    request = only(server, "POST", "/api/auth/logout")
    assert request.headers["authorization"] == f"Bearer {theirs.access_token}"
    # The stored refresh token belongs to another session: it is not sent.
    assert request.body == b""
    assert request.headers.get("content-length") == "0"
    assert "content-type" not in request.headers
    assert client.get_tokens() is None


def test_logout_with_explicit_refresh_token_sends_it(server: MockServer,
                                                     client: SpapsClient) -> None:
    other = SpapsClient(base_url=server.url, api_key=API_KEY)
    with other:
        theirs = other.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
    client.auth.logout(access_token=theirs.access_token, refresh_token=theirs.refresh_token)
    assert_json_post(only(server, "POST", "/api/auth/logout"),
                     {"refresh_token": theirs.refresh_token})
    with pytest.raises(AuthError) as refused:
        client.auth.refresh_tokens(refresh_token=theirs.refresh_token)
    assert refused.value.error_code == "REFRESH_TOKEN_REPLAY"


def test_logout_without_token_raises_value_error_and_sends_nothing(
    server: MockServer, client: SpapsClient
) -> None:
    with pytest.raises(ValueError):
        client.auth.logout()
    assert server.requests == []


def test_logout_with_empty_explicit_token_raises_value_error(server: MockServer,
                                                             signed_in: SpapsClient) -> None:
    count = len(server.requests)
    with pytest.raises(ValueError):
        signed_in.auth.logout(access_token="")
    assert len(server.requests) == count
    assert signed_in.get_tokens() is not None


def test_logout_rejected_keeps_tokens(server: MockServer, signed_in: SpapsClient) -> None:
    server.inject("POST", "/api/auth/logout", {"status": 500})
    with pytest.raises(AuthError) as caught:
        signed_in.auth.logout()
    assert caught.value.status_code == 500
    assert signed_in.get_tokens() is not None


# --------------------------------------------------------------------------------------------
# Current user and passwords (docs/api.md, "Auth — AuthClient")
# --------------------------------------------------------------------------------------------


def test_get_current_user(server: MockServer, client: SpapsClient) -> None:
    server.add_user("wallets@example.com", STRONG_PASSWORD, username="walleter", tier="pro",
                    metadata={"plan": "gold"},
                    wallets=[{"wallet_address": WALLET, "chain_type": "solana"}])
    pair = client.auth.sign_in_with_password(email="wallets@example.com",
                                             password=STRONG_PASSWORD)
    user = client.auth.get_current_user()

    request = only(server, "GET", "/api/auth/user")
    assert request.headers["x-api-key"] == API_KEY
    assert request.headers["authorization"] == f"Bearer {pair.access_token}"
    assert request.body == b"" and "content-type" not in request.headers

    assert isinstance(user, UserProfile)
    assert user.id == pair.user.user_id
    assert user.email == "wallets@example.com"
    assert user.username == "walleter"
    assert user.tier == "pro"
    assert user.metadata == {"plan": "gold"}
    assert user.roles == ["user"] and user.is_admin is False
    # SPAPS 0.6.6 answers "wallets": null here even for a user with wallets; the model
    # reads that as no wallets.
    assert user.wallets == []
    assert "wallets" not in user.model_extra


def test_user_wallets_are_parsed_when_the_server_lists_them() -> None:
    user = UserProfile.model_validate({
        "id": "u1", "wallets": [{"wallet_address": WALLET, "chain_type": "solana",
                                 "verified": True}]})
    assert len(user.wallets) == 1 and isinstance(user.wallets[0], UserWallet)
    assert user.wallets[0].wallet_address == WALLET
    assert user.wallets[0].chain_type == "solana"
    assert user.wallets[0].verified is True


def test_get_current_user_with_explicit_token(server: MockServer, client: SpapsClient) -> None:
    other = AuthClient(base_url=server.url, api_key=API_KEY)
    with other:
        pair = other.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
    user = client.auth.get_current_user(access_token=pair.access_token)
    assert user.email == DEMO_EMAIL
    assert only(server, "GET", "/api/auth/user").headers["authorization"] == (
        f"Bearer {pair.access_token}"
    )


def test_get_current_user_without_token_raises_value_error(server: MockServer,
                                                           client: SpapsClient) -> None:
    with pytest.raises(ValueError):
        client.auth.get_current_user()
    assert server.requests == []


def test_password_reset_round_trip(server: MockServer, client: SpapsClient) -> None:
    sent = client.auth.request_password_reset(email=DEMO_EMAIL,
                                              redirect_url="https://app.example.com/reset")
    request = only(server, "POST", "/api/auth/password-reset")
    assert_key_only(request)
    assert_json_post(request, {"email": DEMO_EMAIL,
                               "redirect_url": "https://app.example.com/reset"})
    assert isinstance(sent, PasswordResetRequestResponse)
    # SPAPS answers only {email, sent_at}: the message is the client's stated default.
    assert sent.message == "Password reset requested" and sent.email == DEMO_EMAIL
    assert isinstance(sent.sent_at, datetime)
    assert client.get_tokens() is None

    token = server.password_reset_token(DEMO_EMAIL)
    assert token
    # A weak new password is refused and leaves the token usable.
    with pytest.raises(AuthError) as weak:
        client.auth.confirm_password_reset(token=token, new_password="brand-new-pw")
    assert (weak.value.status_code, weak.value.error_code) == (400, "WEAK_PASSWORD")
    confirmed = client.auth.confirm_password_reset(token=token, new_password="Brand-new-pw-1")
    request = last(server, "POST", "/api/auth/reset-password-confirm")
    assert_key_only(request)
    assert_json_post(request, {"token": token, "new_password": "Brand-new-pw-1"})
    assert isinstance(confirmed, MessageResponse)
    assert confirmed.message == "Password has been reset successfully"

    with pytest.raises(AuthError):
        client.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
    client.auth.sign_in_with_password(email=DEMO_EMAIL, password="Brand-new-pw-1")

    with pytest.raises(AuthError) as caught:  # a reset token works once
        client.auth.confirm_password_reset(token=token, new_password="Another-new-pw-2")
    assert (caught.value.status_code, caught.value.error_code) == (400, "INVALID_TOKEN")


def test_password_reset_omits_redirect_url_when_none(server: MockServer,
                                                     client: SpapsClient) -> None:
    client.auth.request_password_reset(email=DEMO_EMAIL)
    assert only(server, "POST", "/api/auth/password-reset").json == {"email": DEMO_EMAIL}


# --------------------------------------------------------------------------------------------
# Signed-in state must not leak a bearer token into the public auth endpoints
# --------------------------------------------------------------------------------------------


def test_public_auth_calls_never_send_authorization(server: MockServer,
                                                    signed_in: SpapsClient) -> None:
    stored = signed_in.get_tokens()
    assert stored is not None and stored.refresh_token
    signed_in.auth.request_nonce(wallet_address=WALLET)
    signed_in.auth.send_magic_link(email=DEMO_EMAIL)
    signed_in.auth.request_password_reset(email=DEMO_EMAIL)
    signed_in.auth.register(email="other@example.com", password=STRONG_PASSWORD)
    signed_in.auth.refresh_tokens(refresh_token=signed_in.get_tokens().refresh_token)  # type: ignore[union-attr]
    signed_in.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
    for request in server.requests:
        assert_key_only(request)


# --------------------------------------------------------------------------------------------
# Standalone AuthClient
# --------------------------------------------------------------------------------------------


def test_standalone_auth_client_without_storage(server: MockServer) -> None:
    with AuthClient(base_url=server.url + "/", api_key=API_KEY) as auth:
        assert auth.base_url == server.url
        assert auth.AUTH_PREFIX == "/api/auth"
        pair = auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
        assert pair.access_token
        assert auth.get_stored_tokens() is None
    assert only(server, "POST", "/api/auth/login").headers["x-api-key"] == API_KEY


def test_standalone_auth_client_with_storage(server: MockServer) -> None:
    storage = InMemoryTokenStorage()
    with AuthClient(base_url=server.url, api_key=API_KEY, token_storage=storage) as auth:
        pair = auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
        loaded = storage.load()
        assert loaded is not None and loaded.access_token == pair.access_token
        auth.logout()
        assert storage.load() is None
        assert only(server, "POST", "/api/auth/logout").headers["authorization"] == (
            f"Bearer {pair.access_token}"
        )


# --------------------------------------------------------------------------------------------
# Async
# --------------------------------------------------------------------------------------------


def test_async_sign_in_refresh_logout(server: MockServer) -> None:
    async def scenario() -> List[Any]:
        async with AsyncSpapsClient(base_url=server.url, api_key=API_KEY) as spaps:
            pair = await spaps.auth.sign_in_with_password(email=DEMO_EMAIL,
                                                          password=DEMO_PASSWORD)
            stored_after_sign_in = spaps.get_tokens()
            rotated = await spaps.auth.refresh_tokens(refresh_token=pair.refresh_token)
            stored_after_refresh = spaps.get_tokens()
            # Within the grace the same client gets the same successor pair again.
            replayed = await spaps.auth.refresh_tokens(refresh_token=pair.refresh_token)
            with pytest.raises(AuthError) as caught:
                await spaps.auth.refresh_tokens(refresh_token="not-a-refresh-token")
            await spaps.auth.logout()
            return [pair, stored_after_sign_in, rotated, stored_after_refresh, replayed,
                    caught.value, spaps.get_tokens()]

    (pair, after_sign_in, rotated, after_refresh, replayed, error,
     after_logout) = asyncio.run(scenario())
    assert isinstance(pair, TokenPair) and isinstance(rotated, TokenPair)
    assert after_sign_in.access_token == pair.access_token
    assert after_sign_in.refresh_token == pair.refresh_token
    assert after_refresh.access_token == rotated.access_token
    assert rotated.refresh_token != pair.refresh_token
    assert rotated.user is None
    assert (replayed.access_token, replayed.refresh_token) == (rotated.access_token,
                                                               rotated.refresh_token)
    assert isinstance(error, AuthError)
    assert (error.status_code, error.error_code) == (401, "INVALID_REFRESH_TOKEN")
    assert after_logout is None

    assert_json_post(only(server, "POST", "/api/auth/login"),
                     {"email": DEMO_EMAIL, "password": DEMO_PASSWORD})
    assert_key_only(only(server, "POST", "/api/auth/login"))
    logout = only(server, "POST", "/api/auth/logout")
    assert logout.headers["authorization"] == f"Bearer {rotated.access_token}"
    assert_json_post(logout, {"refresh_token": rotated.refresh_token})


def test_async_wrong_password_maps_to_auth_error(server: MockServer) -> None:
    server.inject("POST", "/api/auth/login",
                  {"passthrough": True, "headers": {"x-request-id": "req_async_test"}})

    async def scenario() -> AuthError:
        async with AsyncSpapsClient(base_url=server.url, api_key=API_KEY) as spaps:
            try:
                await spaps.auth.sign_in_with_password(email=DEMO_EMAIL, password="bad-pw-123")
            except AuthError as exc:
                return exc
        raise AssertionError("no AuthError")

    error = asyncio.run(scenario())
    assert error.status_code == 401
    assert error.error_code == "INVALID_CREDENTIALS"
    assert error.request_id == "req_async_test"


def test_async_wallet_register_magic_link_and_user(server: MockServer) -> None:
    async def scenario() -> Dict[str, Any]:
        async with AsyncSpapsClient(base_url=server.url, api_key=API_KEY) as spaps:
            out: Dict[str, Any] = {}
            out["nonce"] = await spaps.auth.request_nonce(wallet_address=WALLET, chain="base")
            out["tokens_after_nonce"] = spaps.get_tokens()
            out["wallet"] = await spaps.auth.verify_wallet(
                wallet_address=WALLET, signature="0xsig", message=out["nonce"].message,
                chain="base")
            out["registered"] = await spaps.auth.register(email="async@example.com",
                                                          password=STRONG_PASSWORD)
            out["stored_after_register"] = spaps.get_tokens()
            spaps.clear_tokens()
            out["sent"] = await spaps.auth.send_magic_link(email="async@example.com")
            out["tokens_after_send"] = spaps.get_tokens()
            token = server.magic_link_token("async@example.com")
            out["verified"] = await spaps.auth.verify_magic_link(token=token)
            out["stored_after_verify"] = spaps.get_tokens()
            out["user"] = await spaps.auth.get_current_user()
            out["reset"] = await spaps.auth.request_password_reset(email="async@example.com")
            reset_token = server.password_reset_token("async@example.com")
            out["confirmed"] = await spaps.auth.confirm_password_reset(
                token=reset_token, new_password="Async-new-password-2")
            out["again"] = await spaps.auth.sign_in_with_password(
                email="async@example.com", password="Async-new-password-2")
            return out

    out = asyncio.run(scenario())
    assert isinstance(out["nonce"], NonceResponse)
    assert out["tokens_after_nonce"] is None
    assert isinstance(out["wallet"], TokenPair) and is_uuid(out["wallet"].user.user_id)
    assert out["wallet"].user.user_id != out["registered"].user.id
    assert isinstance(out["registered"], RegistrationResponse)
    assert out["registered"].tokens is not None
    assert out["stored_after_register"].access_token == out["registered"].tokens.access_token
    assert out["stored_after_register"].token_type == "Bearer"
    assert isinstance(out["sent"], MagicLinkSendResponse)
    assert out["tokens_after_send"] is None
    assert isinstance(out["verified"], MagicLinkAuthResponse)
    assert out["stored_after_verify"].access_token == out["verified"].tokens.access_token
    assert isinstance(out["user"], UserProfile)
    assert out["user"].email == "async@example.com"
    assert out["user"].id == out["registered"].user.id
    assert isinstance(out["reset"], PasswordResetRequestResponse)
    assert isinstance(out["confirmed"], MessageResponse)
    assert out["again"].user.user_id == out["registered"].user.id

    assert only(server, "POST", "/api/auth/nonce").json == {"wallet_address": WALLET,
                                                            "chain": "base"}
    assert only(server, "POST", "/api/auth/wallet-sign-in").json["chain_type"] == "base"
    assert only(server, "POST", "/api/auth/verify-magic-link").json["type"] == "magiclink"
    for path in ("/api/auth/nonce", "/api/auth/wallet-sign-in", "/api/auth/register",
                 "/api/auth/magic-link", "/api/auth/verify-magic-link",
                 "/api/auth/password-reset", "/api/auth/reset-password-confirm"):
        assert_key_only(only(server, "POST", path))
    assert only(server, "GET", "/api/auth/user").headers["authorization"] == (
        f"Bearer {out['verified'].tokens.access_token}"
    )


def test_async_logout_without_token_raises_value_error(server: MockServer) -> None:
    async def scenario() -> None:
        async with AsyncSpapsClient(base_url=server.url, api_key=API_KEY) as spaps:
            await spaps.auth.logout()

    with pytest.raises(ValueError):
        asyncio.run(scenario())
    assert server.requests == []


def test_standalone_async_auth_client(server: MockServer) -> None:
    storage = InMemoryTokenStorage()

    async def scenario() -> TokenPair:
        async with AsyncAuthClient(base_url=server.url, api_key=API_KEY,
                                   token_storage=storage) as auth:
            assert auth.token_storage is storage
            pair = await auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
            assert auth.get_stored_tokens() == storage.load()
            return pair

    pair = asyncio.run(scenario())
    loaded = storage.load()
    assert loaded is not None and loaded.access_token == pair.access_token
    assert_key_only(only(server, "POST", "/api/auth/login"))
