"""Sessions against the real SPAPS, sync and async: current, validate, list (the server
redirects), touch and revoke (the server answers 204)."""

from __future__ import annotations

from datetime import datetime

import pytest
from _realsupport import Flavor, NewUser, RawApi

from spaps_client import AuthError, SessionError

pytestmark = pytest.mark.realserver


def test_get_current_session(flavor: Flavor, user: NewUser) -> None:
    async def flow(c: Flavor) -> None:
        spaps = c.client()
        await c.sign_in(spaps, user.email, user.password)
        current = await c(spaps.sessions.get_current_session())
        assert current.session_id
        assert current.user_id == user.id
        assert current.application_id
        assert isinstance(current.created_at, datetime)
        assert current.expires_at > current.created_at

        # Another sign-in is another session.
        other = c.client()
        await c.sign_in(other, user.email, user.password)
        second = await c(other.sessions.get_current_session())
        assert second.user_id == user.id
        assert second.session_id != current.session_id

    flavor.run(flow)


def test_validate_session(flavor: Flavor, user: NewUser) -> None:
    async def flow(c: Flavor) -> None:
        spaps = c.client()
        await c.sign_in(spaps, user.email, user.password)
        current = await c(spaps.sessions.get_current_session())
        result = await c(spaps.sessions.validate_session())
        assert result.valid is True
        if result.session_id is not None:
            assert result.session_id == current.session_id

    flavor.run(flow)


def test_list_sessions_follows_the_redirect(flavor: Flavor, user: NewUser) -> None:
    async def flow(c: Flavor) -> None:
        first, second = c.client(), c.client()
        await c.sign_in(first, user.email, user.password)
        await c.sign_in(second, user.email, user.password)
        ids = {
            (await c(first.sessions.get_current_session())).session_id,
            (await c(second.sessions.get_current_session())).session_id,
        }

        page = await c(first.sessions.list_sessions(limit=100))
        listed = {record.session_id for record in page.sessions}
        assert ids <= listed
        assert page.total >= len(listed) >= 3  # the registration's session too
        assert {record.user_id for record in page.sessions} == {user.id}

        one = await c(first.sessions.list_sessions(limit=1))
        assert len(one.sessions) == 1
        assert one.total == page.total

    flavor.run(flow)


def test_touch_session(flavor: Flavor, user: NewUser) -> None:
    # Note: on SPAPS 0.6.6 touching spends the session's refresh token.
    async def flow(c: Flavor) -> None:
        spaps = c.client()
        await c.sign_in(spaps, user.email, user.password)
        current = await c(spaps.sessions.get_current_session())
        touched = await c(spaps.sessions.touch_session())
        assert touched.session_id == current.session_id
        assert touched.message
        assert isinstance(touched.last_activity, datetime)
        assert (await c(spaps.sessions.validate_session())).valid is True

    flavor.run(flow)


def test_revoke_session(flavor: Flavor, user: NewUser, raw: RawApi) -> None:
    async def flow(c: Flavor) -> None:
        mine, laptop = c.client(), c.client()
        await c.sign_in(mine, user.email, user.password)
        await c.sign_in(laptop, user.email, user.password)
        laptop_tokens = laptop.get_tokens()
        assert laptop_tokens is not None and laptop_tokens.refresh_token
        other = (await c(laptop.sessions.get_current_session())).session_id

        result = await c(mine.sessions.revoke_session(other))  # the server answers 204
        assert result.session_id == other
        assert result.message
        raw.wait_token_rejected(laptop_tokens.access_token)  # committed after the 204

        # The revoked session's tokens no longer work...
        with pytest.raises(SessionError) as rejected:
            await c(mine.sessions.get_current_session(
                access_token_override=laptop_tokens.access_token))
        assert rejected.value.status_code == 401
        with pytest.raises(AuthError) as no_refresh:
            await c(mine.auth.refresh_tokens(refresh_token=laptop_tokens.refresh_token))
        assert no_refresh.value.status_code == 401
        # ... on the laptop itself either (the refresh it tries fails too).
        with pytest.raises((SessionError, AuthError)) as signed_out:
            await c(laptop.sessions.get_current_session())
        assert signed_out.value.status_code == 401

        # The revoking session is unaffected.
        assert (await c(mine.sessions.validate_session())).valid is True

    flavor.run(flow)
