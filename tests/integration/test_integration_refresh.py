"""Automatic token refresh against the real SPAPS, sync and async: ahead of time when the stored
access token has expired, and once after the server rejected a revoked access token."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from _realsupport import Flavor, NewUser, RawApi, Recorded

pytestmark = pytest.mark.realserver

REFRESH = "/api/auth/refresh"
CURRENT = "/api/sessions/current"


def test_expired_access_token_is_refreshed_before_the_call(flavor: Flavor, user: NewUser,
                                                           recorded: Recorded) -> None:
    async def flow(c: Flavor) -> None:
        spaps = c.client(recorded=recorded)
        await c.sign_in(spaps, user.email, user.password)
        before = spaps.get_tokens()
        assert before is not None and before.refresh_token
        past = datetime.now(timezone.utc) - timedelta(hours=1)
        spaps.set_tokens(access_token=before.access_token, refresh_token=before.refresh_token,
                         expires_at=past)
        recorded.clear()

        current = await c(spaps.sessions.get_current_session())
        assert current.user_id == user.id

        after = spaps.get_tokens()
        assert after is not None
        assert after.access_token != before.access_token
        assert after.refresh_token and after.refresh_token != before.refresh_token
        assert after.expires_at is not None and after.expires_at > past
        # One refresh, then the call itself with the new token.
        assert recorded.paths() == [REFRESH, CURRENT]

    flavor.run(flow)


def test_revoked_access_token_is_refreshed_after_the_401(flavor: Flavor, user: NewUser,
                                                         raw: RawApi, recorded: Recorded) -> None:
    async def flow(c: Flavor) -> None:
        spaps = c.client(recorded=recorded)
        await c.sign_in(spaps, user.email, user.password)
        before = spaps.get_tokens()
        assert before is not None and before.refresh_token

        # A body-less logout blacklists the access token only; the refresh token stays usable.
        assert raw.logout_access_only(before.access_token) == 200
        raw.wait_token_rejected(before.access_token)
        recorded.clear()

        current = await c(spaps.sessions.get_current_session())
        assert current.user_id == user.id

        after = spaps.get_tokens()
        assert after is not None
        assert after.access_token != before.access_token
        assert after.refresh_token and after.refresh_token != before.refresh_token
        # Rejected once, refreshed once, sent again once.
        assert recorded.paths() == [CURRENT, REFRESH, CURRENT]
        assert raw.user_status(after.access_token) == 200

    flavor.run(flow)
