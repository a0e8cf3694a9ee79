"""Secrets never reach an error's text, even when the real server echoes input in its
message. Sync and async."""

from __future__ import annotations

from typing import Callable

import pytest
from _realsupport import Flavor, NewUser, RealServer, unique_email

from spaps_client import AuthError, SessionError

pytestmark = pytest.mark.realserver


def test_weak_password_error_hides_password_and_key(flavor: Flavor, real: RealServer,
                                                    assert_no_secrets: Callable[..., None]
                                                    ) -> None:
    weak = "weakpass"  # no upper-case letter, no digit: refused

    async def flow(c: Flavor) -> None:
        spaps = c.client()
        with pytest.raises(AuthError) as refused:
            await c(spaps.auth.register(email=unique_email("weak"), password=weak))
        assert refused.value.status_code == 400
        assert refused.value.error_code == "WEAK_PASSWORD"
        assert refused.value.message
        assert_no_secrets(refused.value, weak, real.api_key)
        assert spaps.get_tokens() is None

    flavor.run(flow)


def test_echoed_tokens_are_scrubbed(flavor: Flavor, user: NewUser, real: RealServer,
                                    assert_no_secrets: Callable[..., None]) -> None:
    # SPAPS answers an unknown session id with 404 "Session <id> not found": a token passed by
    # mistake as the id comes back in the message.
    async def flow(c: Flavor) -> None:
        spaps = c.client()
        await c.sign_in(spaps, user.email, user.password)
        tokens = spaps.get_tokens()
        assert tokens is not None and tokens.refresh_token
        for mistaken in (tokens.refresh_token, tokens.access_token):
            with pytest.raises(SessionError) as not_found:
                await c(spaps.sessions.revoke_session(mistaken))
            assert not_found.value.status_code == 404
            assert not_found.value.error_code == "NOT_FOUND"
            assert not_found.value.message.startswith("Session ")
            assert_no_secrets(not_found.value, tokens.access_token, tokens.refresh_token,
                              real.api_key, user.password)

        # The session is untouched, and nothing secret shows in the reprs either.
        assert (await c(spaps.sessions.validate_session())).valid is True
        shown = repr(spaps.get_tokens()) + repr(spaps) + repr(spaps.sessions)
        for secret in (tokens.access_token, tokens.refresh_token, real.api_key):
            assert secret not in shown

    flavor.run(flow)


def test_wrong_password_error_hides_the_password(flavor: Flavor, user: NewUser,
                                                 real: RealServer,
                                                 assert_no_secrets: Callable[..., None]) -> None:
    async def flow(c: Flavor) -> None:
        spaps = c.client()
        wrong = user.password + "-Wrong1"
        with pytest.raises(AuthError) as refused:
            await c(spaps.auth.sign_in_with_password(email=user.email, password=wrong))
        assert refused.value.status_code == 401
        assert_no_secrets(refused.value, wrong, user.password, real.api_key)

    flavor.run(flow)
