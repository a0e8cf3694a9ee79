"""Deliberate misuses of the installed ``spaps``: every checker must reject each tagged line.

tests/test_typing.py type-checks this file with mypy --strict and pyright (strict), for Python
3.9 and 3.13. Each misuse sits on one line ending in ``# expect-error: WORD``; the checker must
report an error on that line whose message contains WORD (case-insensitive), and nothing
anywhere else. Lines tagged ``# expect-error(3.10+): WORD`` misuse the parameters of async
methods, which checkers see only from Python 3.10 (typing.ParamSpec; the client imports the
standard library alone, so no typing_extensions): for 3.9 they must pass unflagged. Never run:
it only has to type-check (badly).
"""

from __future__ import annotations

import asyncio
from typing import Optional

from spaps_client import (
    AsyncAuthClient,
    AsyncSpapsClient,
    SessionSummary,
    SpapsClient,
    SpapsError,
    StoredTokens,
    TokenPair,
    TokenStorage,
    UserProfile,
)
from spaps_mock import MockServer


class BrokenStorage(TokenStorage):
    def save(self, tokens: StoredTokens) -> None:
        pass

    def load(self) -> str:  # expect-error: load
        return ""

    def clear(self) -> None:
        pass


def sync_misuses(client: SpapsClient, maybe: Optional[str]) -> None:
    client.auth.sign_in_with_password(email=1, password="pw")  # expect-error: email
    client.auth.sign_in_with_password(mail="a@example.com", password="pw")  # expect-error: mail
    client.auth.sign_in_with_password(email="a@example.com")  # expect-error: password
    client.auth.sign_in_with_password("a@example.com", "pw")  # expect-error: positional
    client.auth.send_magic_link(email=None)  # expect-error: email
    client.auth.send_magic_link(email=maybe)  # expect-error: email
    client.sessions.revoke_session(None)  # expect-error: None
    client.sessions.list_sessions(limit="5")  # expect-error: limit
    pair = client.auth.sign_in_with_password(email="a@example.com", password="pw")
    print(pair.acess_token)  # expect-error: acess_token
    print(pair.user.email)  # expect-error: None
    total: str = client.sessions.list_sessions().total  # expect-error: int
    print(total, client.sessions.get_current_session().sesion_id)  # expect-error: sesion_id
    SpapsClient(base="http://127.0.0.1:1", api_key="k")  # expect-error: base
    SpapsClient(request_timeout="slow")  # expect-error: request_timeout
    TokenStorage()  # expect-error: abstract
    TokenPair(access_token="a")  # expect-error: refresh_token
    asyncio.run(client.sessions.get_current_session())  # expect-error: SessionSummary


async def async_misuses(client: AsyncSpapsClient, sync: SpapsClient) -> None:
    await sync.sessions.get_current_session()  # expect-error: SessionSummary
    session: SessionSummary = client.sessions.get_current_session()  # expect-error: Coroutine
    print(session, client.auth.get_current_user().email)  # expect-error: email
    await client.auth.sign_in_with_password(mail="a@b.c", password="")  # expect-error(3.10+): mail
    await client.auth.sign_in_with_password(email="a@example.com")  # expect-error(3.10+): password
    await client.sessions.list_sessions(limit="5")  # expect-error(3.10+): limit
    await client.sessions.revoke_session(None)  # expect-error(3.10+): None
    client.aclose()  # expect-error: used
    me, current = await asyncio.gather(client.auth.get_current_user(),
                                       client.sessions.get_current_session())
    user_id: int = me.id  # expect-error: int
    print(user_id, current.tire)  # expect-error: tire
    AsyncSpapsClient(request_timeout="slow")  # expect-error(3.10+): request_timeout
    client.set_tokens(access_token=1)  # expect-error(3.10+): access_token
    with AsyncSpapsClient():  # expect-error: __enter__
        pass


def service_misuses(auth: AsyncAuthClient, profile: UserProfile, error: SpapsError) -> None:
    AsyncAuthClient(base_url=1, api_key="k")  # expect-error(3.10+): base_url
    print(profile.emial)  # expect-error: emial
    print(error.status)  # expect-error: status


def emulator_misuses(server: MockServer) -> None:
    MockServer(port="0")  # expect-error: port
    server.inject("GET", "/health", {"status": 503}, retries=3)  # expect-error: retries
    server.request_count("GET")  # expect-error: path
    server.add_user("x@example.com")  # expect-error: password
    url: int = server.url  # expect-error: int
    print(url, server.requests[0].methd)  # expect-error: methd
