"""A broken token storage never loses a session SPAPS issued, and fails as a SpapsError."""

from __future__ import annotations

import logging
from typing import List, Optional

import pytest
from conftest import API_KEY, DEMO_EMAIL, DEMO_PASSWORD

from spaps_client import (
    FileTokenStorage,
    InMemoryTokenStorage,
    SpapsClient,
    SpapsError,
    StoredTokens,
    TokenStorageError,
)
from spaps_mock import MockServer


class FlakyStorage(InMemoryTokenStorage):
    """An in-memory storage whose operations fail while ``broken`` names them."""

    def __init__(self) -> None:
        super().__init__()
        self.broken: List[str] = []
        self.saves = 0

    def save(self, tokens: StoredTokens) -> None:
        if "save" in self.broken:
            raise OSError(30, "Read-only file system")
        self.saves += 1
        super().save(tokens)

    def load(self) -> Optional[StoredTokens]:
        if "load" in self.broken:
            raise OSError(5, "Input/output error")
        return super().load()


def test_a_failed_save_keeps_the_session_in_memory_and_says_so(
        server: MockServer, caplog: pytest.LogCaptureFixture) -> None:
    storage = FlakyStorage()
    storage.broken = ["save"]
    with SpapsClient(base_url=server.url, api_key=API_KEY, token_storage=storage) as spaps, \
            caplog.at_level(logging.WARNING, logger="spaps_client"):
        pair = spaps.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
        tokens = spaps.get_tokens()
        assert tokens is not None and tokens.access_token == pair.access_token
        assert spaps.sessions.get_current_session().session_id
        warning = " ".join(record.getMessage() for record in caplog.records)
        assert "kept in memory" in warning and "Read-only file system" in warning
        assert pair.access_token not in warning and pair.refresh_token not in warning

        # The session survives its expiry too: the refresh uses the in-memory tokens.
        server.expire_access_tokens()
        assert spaps.sessions.get_current_session().session_id
        assert server.request_count("POST", "/api/auth/refresh") == 1
        refreshed = spaps.get_tokens()
        assert refreshed is not None and refreshed.access_token != pair.access_token

        # Once the storage works again, the next save lands there and memory lets go.
        storage.broken = []
        server.expire_access_tokens()
        spaps.sessions.get_current_session()
        saved = storage.load()
        assert saved is not None and saved.access_token == spaps.get_tokens().access_token


def test_an_unwritable_token_file_does_not_cost_the_sign_in(server: MockServer) -> None:
    storage = FileTokenStorage(path="/proc/spaps-no-such-dir/tokens.json")
    with SpapsClient(base_url=server.url, api_key=API_KEY, token_storage=storage) as spaps:
        spaps.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
        server.expire_access_tokens()  # the refresh cannot take the file lock either
        assert spaps.sessions.get_current_session().session_id
        assert server.request_count("POST", "/api/auth/login") == 1


def test_a_failed_load_is_a_token_storage_error(server: MockServer) -> None:
    storage = FlakyStorage()
    with SpapsClient(base_url=server.url, api_key=API_KEY, token_storage=storage) as spaps:
        spaps.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
        sessions = spaps.sessions
        storage.broken = ["load"]
        with pytest.raises(TokenStorageError) as caught:
            sessions.get_current_session()
    error = caught.value
    assert isinstance(error, SpapsError) and error.error_code == "TOKEN_STORAGE_FAILED"
    assert "FlakyStorage" in str(error) and "Input/output error" in str(error)
    assert "token_storage=" in str(error)  # says what to do
    assert isinstance(error.__cause__, OSError)
    assert server.request_count("GET", "/api/sessions/current") == 0
