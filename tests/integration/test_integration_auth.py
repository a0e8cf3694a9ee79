"""Auth flows against the real SPAPS: register, sign-in, refresh, profile, magic link, wallet
nonce, logout and the errors a user meets. Each test runs with the sync and the async client."""

from __future__ import annotations

import uuid
from datetime import datetime

import pytest
from _realsupport import Flavor, NewUser, RawApi, strong_password, unique_email, wait_until

from spaps_client import AuthError

pytestmark = pytest.mark.realserver


def test_register_signs_in_and_stores_tokens(flavor: Flavor, raw: RawApi) -> None:
    email, password = unique_email("register"), strong_password()

    async def flow(c: Flavor) -> None:
        spaps = c.client()
        created = await c(spaps.auth.register(email=email, password=password))
        assert created.user.id
        assert created.user.email == email
        # ENV=development auto-confirms the e-mail, so the server signs the user in at once.
        assert created.tokens is not None
        assert created.tokens.access_token and created.tokens.refresh_token

        stored = spaps.get_tokens()
        assert stored is not None
        assert stored.access_token == created.tokens.access_token
        assert stored.refresh_token == created.tokens.refresh_token
        assert isinstance(stored.expires_at, datetime)
        assert (stored.token_type or "Bearer").lower() == "bearer"

        # The stored tokens are usable as they are (once the server has committed the user).
        raw.wait_user_visible(stored.access_token)
        me = await c(spaps.auth.get_current_user())
        assert me.id == created.user.id
        assert me.email == email

    flavor.run(flow)


def test_sign_in_with_password(flavor: Flavor, user: NewUser) -> None:
    async def flow(c: Flavor) -> None:
        spaps = c.client()
        pair = await c(spaps.auth.sign_in_with_password(email=user.email, password=user.password))
        assert pair.user is not None
        assert pair.user.user_id == user.id
        assert pair.user.email == user.email
        assert pair.expires_in > 0
        assert pair.token_type.lower() == "bearer"
        assert pair.access_token != user.access_token  # a new session, new tokens

        stored = spaps.get_tokens()
        assert stored is not None
        assert stored.access_token == pair.access_token
        assert stored.refresh_token == pair.refresh_token
        assert isinstance(stored.expires_at, datetime)

    flavor.run(flow)


def test_refresh_tokens_rotates_and_has_no_user(flavor: Flavor, user: NewUser) -> None:
    async def flow(c: Flavor) -> None:
        spaps = c.client()
        first = await c.sign_in(spaps, user.email, user.password)
        pair = await c(spaps.auth.refresh_tokens(refresh_token=first.refresh_token))
        # The real refresh reply is {access_token, refresh_token, expires_in, token_type}.
        assert pair.user is None
        assert pair.access_token and pair.access_token != first.access_token
        assert pair.refresh_token and pair.refresh_token != first.refresh_token
        assert pair.expires_in > 0

        stored = spaps.get_tokens()
        assert stored is not None
        assert stored.access_token == pair.access_token
        assert stored.refresh_token == pair.refresh_token

        me = await c(spaps.auth.get_current_user())
        assert me.id == user.id

    flavor.run(flow)


def test_get_current_user(flavor: Flavor, user: NewUser) -> None:
    async def flow(c: Flavor) -> None:
        spaps = c.client()
        await c.sign_in(spaps, user.email, user.password)
        me = await c(spaps.auth.get_current_user())
        assert me.id == user.id
        assert me.email == user.email
        assert me.wallets == []  # the server sends "wallets": null

        # An explicit token works without anything stored.
        other = c.client()
        again = await c(other.auth.get_current_user(access_token=user.access_token))
        assert again.id == user.id
        assert other.get_tokens() is None

    flavor.run(flow)


def test_magic_link_send_and_verify(flavor: Flavor, user: NewUser, raw: RawApi) -> None:
    raw.require_mailbox()

    async def flow(c: Flavor) -> None:
        spaps = c.client()
        sent = await c(spaps.auth.send_magic_link(email=user.email))
        assert sent.message
        assert sent.email == user.email
        assert isinstance(sent.sent_at, datetime)

        token = raw.magic_link_token(user.email)
        signed_in = await c(spaps.auth.verify_magic_link(token=token))
        assert signed_in.user.id == user.id
        assert signed_in.user.email == user.email
        assert signed_in.tokens is not None

        stored = spaps.get_tokens()
        assert stored is not None
        assert stored.access_token == signed_in.tokens.access_token
        assert stored.refresh_token == signed_in.tokens.refresh_token

        raw.wait_session_visible(stored.access_token)  # committed after the reply
        me = await c(spaps.auth.get_current_user())
        assert me.id == user.id
        current = await c(spaps.sessions.get_current_session())
        assert current.user_id == user.id

        # A magic link works once.
        with pytest.raises(AuthError) as reused:
            await c(spaps.auth.verify_magic_link(token=token))
        assert reused.value.status_code == 401
        assert reused.value.error_code == "INVALID_TOKEN"

    flavor.run(flow)


def test_wallet_nonce_and_bad_signature(flavor: Flavor) -> None:
    address = "0x" + (uuid.uuid4().hex + uuid.uuid4().hex)[:40].upper()

    async def flow(c: Flavor) -> None:
        spaps = c.client()
        nonce = await c(spaps.auth.request_nonce(wallet_address=address, chain="ethereum"))
        assert len(nonce.nonce) == 64
        assert nonce.nonce in nonce.message
        assert nonce.wallet_address == address.lower()  # the server lower-cases addresses
        assert address.lower() in nonce.message
        assert isinstance(nonce.expires_at, datetime)

        with pytest.raises(AuthError) as refused:
            await c(spaps.auth.verify_wallet(wallet_address=address, signature="0x" + "11" * 65,
                                             message=nonce.message, chain="ethereum"))
        assert refused.value.status_code == 401
        assert refused.value.error_code == "INVALID_SIGNATURE"
        assert spaps.get_tokens() is None

    flavor.run(flow)


def test_logout_revokes_access_and_refresh_tokens(flavor: Flavor, user: NewUser,
                                                  raw: RawApi) -> None:
    async def flow(c: Flavor) -> None:
        spaps = c.client()
        pair = await c.sign_in(spaps, user.email, user.password)
        session_id = (await c(spaps.sessions.get_current_session())).session_id
        done = await c(spaps.auth.logout())
        assert done.message
        assert spaps.get_tokens() is None
        # The ended session leaves the user's list once the server has committed the logout
        # (a refresh sent before that would still succeed, and spend the token).
        wait_until(lambda: session_id not in raw.auth_session_ids(user.access_token),
                   "the logged-out session to leave GET /api/auth/sessions")

        with pytest.raises(AuthError) as old_access:
            await c(spaps.auth.get_current_user(access_token=pair.access_token))
        assert old_access.value.status_code == 401

        # The refresh token of the ended session must be dead too (the server revokes it only
        # when the logout names it).
        with pytest.raises(AuthError) as old_refresh:
            await c(spaps.auth.refresh_tokens(refresh_token=pair.refresh_token))
        assert old_refresh.value.status_code == 401
        assert spaps.get_tokens() is None

        # Other sessions of the same user are unaffected.
        assert raw.user_status(user.access_token) == 200

    flavor.run(flow)


def test_wrong_password_is_refused(flavor: Flavor, user: NewUser) -> None:
    async def flow(c: Flavor) -> None:
        spaps = c.client()
        with pytest.raises(AuthError) as refused:
            await c(spaps.auth.sign_in_with_password(email=user.email,
                                                     password=user.password + "-wrong"))
        assert refused.value.status_code == 401
        assert refused.value.error_code == "INVALID_CREDENTIALS"
        assert refused.value.request_id
        assert spaps.get_tokens() is None

    flavor.run(flow)


def test_duplicate_register_is_refused(flavor: Flavor, user: NewUser) -> None:
    async def flow(c: Flavor) -> None:
        spaps = c.client()
        with pytest.raises(AuthError) as refused:
            await c(spaps.auth.register(email=user.email, password=strong_password()))
        assert refused.value.status_code == 400
        assert refused.value.error_code == "EMAIL_ALREADY_EXISTS"
        assert spaps.get_tokens() is None

    flavor.run(flow)
