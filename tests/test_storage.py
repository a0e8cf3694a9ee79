"""Token storage (docs/token-storage.md): in memory, on disk, and through the clients."""

from __future__ import annotations

import json
import os
import stat
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import List, Optional

import pytest
from conftest import API_KEY, DEMO_EMAIL, DEMO_PASSWORD

from spaps_client import (
    FileTokenStorage,
    InMemoryTokenStorage,
    SpapsClient,
    StoredTokens,
    TokenStorage,
)
from spaps_mock import MockServer

UTC = timezone.utc
POSIX = sys.platform != "win32"
posix_only = pytest.mark.skipif(not POSIX, reason="POSIX permission bits")

SAMPLE = StoredTokens(
    access_token="at_sample",
    refresh_token="rt_sample",
    expires_at=datetime(2025, 1, 1, 0, 0, 0, 123456, tzinfo=UTC),
    token_type="Bearer",
)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# --------------------------------------------------------------------------------------------
# InMemoryTokenStorage
# --------------------------------------------------------------------------------------------


def test_in_memory_round_trip_and_clear() -> None:
    storage = InMemoryTokenStorage()
    assert isinstance(storage, TokenStorage)
    assert storage.load() is None
    storage.save(SAMPLE)
    assert storage.load() == SAMPLE
    storage.clear()
    assert storage.load() is None
    storage.clear()  # clearing twice is fine


def test_in_memory_load_returns_a_copy() -> None:
    storage = InMemoryTokenStorage()
    original = StoredTokens(access_token="a", refresh_token="r", token_type="Bearer")
    storage.save(original)
    original.access_token = "mutated-after-save"
    loaded = storage.load()
    assert loaded is not None and loaded.access_token == "a"
    loaded.access_token = "mutated-after-load"
    again = storage.load()
    assert again is not None and again.access_token == "a"
    assert again is not loaded


def test_save_replaces_rather_than_merges(tmp_path: Path) -> None:
    for storage in (InMemoryTokenStorage(), FileTokenStorage(path=tmp_path / "t.json")):
        storage.save(SAMPLE)
        storage.save(StoredTokens(access_token="only-access"))
        assert storage.load() == StoredTokens(access_token="only-access")


# --------------------------------------------------------------------------------------------
# FileTokenStorage: location, format, permissions
# --------------------------------------------------------------------------------------------


def test_default_path_under_home_config(monkeypatch: pytest.MonkeyPatch,
                                        tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("USERPROFILE", str(tmp_path))
    storage = FileTokenStorage()
    expected = tmp_path / ".config" / "spaps" / "tokens.json"
    assert Path(storage.path) == expected
    assert not (tmp_path / ".config").exists()  # nothing is created by the constructor
    assert storage.load() is None
    storage.save(SAMPLE)
    assert expected.is_file()
    assert storage.load() == SAMPLE


def test_path_accepts_str_path_and_tilde(monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("USERPROFILE", str(tmp_path))
    assert Path(FileTokenStorage(path="~/t.json").path) == tmp_path / "t.json"
    assert Path(FileTokenStorage(path=tmp_path / "p.json").path) == tmp_path / "p.json"
    assert Path(FileTokenStorage(path=str(tmp_path / "s.json")).path) == tmp_path / "s.json"


def test_file_format_and_key_order(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    FileTokenStorage(path=path).save(SAMPLE)
    text = path.read_text(encoding="utf-8")
    document = json.loads(text)
    assert list(document) == ["access_token", "refresh_token", "expires_at", "token_type"]
    assert document == {
        "access_token": "at_sample",
        "refresh_token": "rt_sample",
        "expires_at": "2025-01-01T00:00:00.123456+00:00",
        "token_type": "Bearer",
    }
    assert text == json.dumps(document, indent=2)  # two-space indentation


def test_file_format_with_nulls(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    storage = FileTokenStorage(path=path)
    storage.save(StoredTokens(access_token="just-access"))
    assert json.loads(path.read_text()) == {
        "access_token": "just-access", "refresh_token": None, "expires_at": None,
        "token_type": None,
    }
    assert storage.load() == StoredTokens(access_token="just-access")


@posix_only
def test_permissions_file_0600_and_directory_0700(tmp_path: Path) -> None:
    directory = tmp_path / "nested" / "spaps"
    path = directory / "tokens.json"
    storage = FileTokenStorage(path=path)
    assert not directory.exists()  # created on first save, not in the constructor
    storage.save(SAMPLE)
    assert mode(directory) == 0o700
    assert mode(path) == 0o600
    storage.save(SAMPLE)  # a replacement keeps the mode
    assert mode(path) == 0o600


@posix_only
def test_permissions_do_not_depend_on_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = tmp_path / "fresh" / "tokens.json"
        FileTokenStorage(path=path).save(SAMPLE)
    finally:
        os.umask(old)
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700


@posix_only
def test_existing_world_readable_file_is_replaced_by_a_private_one(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text('{"access_token": "old"}')
    os.chmod(path, 0o644)
    FileTokenStorage(path=path).save(SAMPLE)
    assert mode(path) == 0o600
    assert json.loads(path.read_text())["access_token"] == "at_sample"


def test_save_leaves_no_temporary_files(tmp_path: Path) -> None:
    storage = FileTokenStorage(path=tmp_path / "tokens.json")
    for index in range(20):
        storage.save(StoredTokens(access_token=f"at_{index}"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokens.json"]
    loaded = storage.load()
    assert loaded is not None and loaded.access_token == "at_19"


def test_replacement_is_atomic_for_a_concurrent_reader(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    writer = FileTokenStorage(path=path)
    reader = FileTokenStorage(path=path)  # a second instance: no shared in-process lock
    writer.save(StoredTokens(access_token="at_initial", refresh_token="rt_initial"))
    written = {"at_initial"} | {f"at_{i:03d}_" + "x" * 2000 for i in range(200)}
    seen: List[Optional[StoredTokens]] = []
    raw_problems: List[str] = []
    stop = threading.Event()

    def read_loop() -> None:
        while not stop.is_set():
            seen.append(reader.load())
            try:
                json.loads(path.read_bytes())
            except (ValueError, OSError) as exc:  # what another tool reading the file would see
                raw_problems.append(repr(exc))

    thread = threading.Thread(target=read_loop)
    thread.start()
    try:
        for i in range(200):
            writer.save(StoredTokens(access_token=f"at_{i:03d}_" + "x" * 2000,
                                     refresh_token=f"rt_{i}", token_type="Bearer"))
    finally:
        stop.set()
        thread.join()
    assert seen, "the reader never ran"
    assert all(tokens is not None for tokens in seen)
    assert {tokens.access_token for tokens in seen if tokens} <= written
    assert raw_problems == []
    final = reader.load()
    assert final is not None and final.access_token.startswith("at_199_")


# --------------------------------------------------------------------------------------------
# FileTokenStorage: tolerant load, clear
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    ["", "{not json", '["a", "b"]', "null", '"a string"', "42", '{"refresh_token": "r"}',
     b"\xff\xfe\x00garbage"],
)
def test_load_tolerates_unusable_files(tmp_path: Path, content: object) -> None:
    path = tmp_path / "tokens.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(str(content))
    assert FileTokenStorage(path=path).load() is None


def test_load_missing_file_is_none(tmp_path: Path) -> None:
    assert FileTokenStorage(path=tmp_path / "absent" / "tokens.json").load() is None
    assert not (tmp_path / "absent").exists()


def test_load_os_error_is_none(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.mkdir()
    assert FileTokenStorage(path=path).load() is None


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("2025-01-01T00:00:00Z", datetime(2025, 1, 1, tzinfo=UTC)),
        ("2025-01-01T00:00:00.5Z", datetime(2025, 1, 1, 0, 0, 0, 500000, tzinfo=UTC)),
        ("2025-01-01T02:00:00+02:00",
         datetime(2025, 1, 1, 2, tzinfo=timezone(timedelta(hours=2)))),
    ],
)
def test_load_parses_timestamps_written_by_other_tools(tmp_path: Path, raw: str,
                                                       expected: datetime) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"access_token": "a", "refresh_token": "r", "expires_at": raw,
                                "token_type": "Bearer"}))
    loaded = FileTokenStorage(path=path).load()
    assert loaded is not None
    assert loaded.expires_at == expected
    assert loaded.expires_at is not None and loaded.expires_at.utcoffset() == (
        expected.utcoffset())


def test_load_keeps_tokens_when_the_timestamp_is_garbage(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"access_token": "a", "refresh_token": "r",
                                "expires_at": "someday", "token_type": "Bearer"}))
    assert FileTokenStorage(path=path).load() == StoredTokens(
        access_token="a", refresh_token="r", expires_at=None, token_type="Bearer")


def test_load_ignores_extra_keys(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"access_token": "a", "scope": "everything"}))
    assert FileTokenStorage(path=path).load() == StoredTokens(access_token="a")


def test_clear_deletes_the_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    storage = FileTokenStorage(path=path)
    storage.save(SAMPLE)
    storage.clear()
    assert not path.exists()
    assert storage.load() is None
    storage.clear()  # nothing to delete: no error


# --------------------------------------------------------------------------------------------
# Through the clients
# --------------------------------------------------------------------------------------------


def test_sign_in_persists_across_client_instances(server: MockServer, tmp_path: Path) -> None:
    path = tmp_path / "spaps" / "tokens.json"
    with SpapsClient(base_url=server.url, api_key=API_KEY,
                     token_storage=FileTokenStorage(path=path)) as first:
        pair = first.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
        session_id = first.sessions.get_current_session().session_id
    on_disk = json.loads(path.read_text())
    assert on_disk["access_token"] == pair.access_token
    assert on_disk["refresh_token"] == pair.refresh_token
    assert on_disk["token_type"] == "Bearer"

    server.reset_stats()
    with SpapsClient(base_url=server.url, api_key=API_KEY,
                     token_storage=FileTokenStorage(path=path)) as second:
        assert second.get_tokens() is not None
        assert second.sessions.get_current_session().session_id == session_id
        second.auth.logout()
    assert [r.headers["authorization"] for r in server.requests] == [
        f"Bearer {pair.access_token}"] * 2
    assert not path.exists()


def test_refresh_is_written_to_the_file(server: MockServer, tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    with SpapsClient(base_url=server.url, api_key=API_KEY,
                     token_storage=FileTokenStorage(path=path)) as spaps:
        first = spaps.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
        second = spaps.auth.refresh_tokens(refresh_token=first.refresh_token)
    loaded = FileTokenStorage(path=path).load()
    assert loaded is not None
    assert (loaded.access_token, loaded.refresh_token) == (second.access_token,
                                                           second.refresh_token)
    assert loaded.expires_at is not None and loaded.expires_at.tzinfo is not None


def test_set_tokens_with_expires_in(client: SpapsClient) -> None:
    before = datetime.now(UTC)
    client.set_tokens(access_token="a", refresh_token="r", expires_in=120)
    after = datetime.now(UTC)
    stored = client.get_tokens()
    assert stored is not None
    assert (stored.access_token, stored.refresh_token, stored.token_type) == ("a", "r", "Bearer")
    assert stored.expires_at is not None and stored.expires_at.tzinfo is not None
    assert before + timedelta(seconds=120) <= stored.expires_at <= after + timedelta(seconds=120)


def test_set_tokens_explicit_expires_at_wins(client: SpapsClient) -> None:
    moment = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)
    client.set_tokens(access_token="a", expires_in=60, expires_at=moment, token_type="DPoP")
    assert client.get_tokens() == StoredTokens(access_token="a", refresh_token=None,
                                               expires_at=moment, token_type="DPoP")


def test_set_tokens_without_expiry(client: SpapsClient) -> None:
    client.set_tokens(access_token="a")
    assert client.get_tokens() == StoredTokens(access_token="a", refresh_token=None,
                                               expires_at=None, token_type="Bearer")


def test_set_tokens_is_used_by_the_next_call(server: MockServer, client: SpapsClient) -> None:
    with SpapsClient(base_url=server.url, api_key=API_KEY) as other:
        pair = other.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
    server.reset_stats()
    client.set_tokens(access_token=pair.access_token, refresh_token=pair.refresh_token,
                      expires_in=pair.expires_in)
    client.sessions.validate_session()
    assert server.requests[-1].headers["authorization"] == f"Bearer {pair.access_token}"


def test_clear_tokens(server: MockServer, signed_in: SpapsClient) -> None:
    assert signed_in.get_tokens() is not None
    signed_in.clear_tokens()
    assert signed_in.get_tokens() is None
    assert signed_in.token_storage.load() is None
    with pytest.raises(ValueError):
        signed_in.sessions  # noqa: B018


def test_client_uses_the_given_storage(server: MockServer, tmp_path: Path) -> None:
    storage = FileTokenStorage(path=tmp_path / "t.json")
    with SpapsClient(base_url=server.url, api_key=API_KEY, token_storage=storage) as spaps:
        assert spaps.token_storage is storage
        spaps.set_tokens(access_token="x")
    assert storage.load() == StoredTokens(access_token="x", token_type="Bearer")
    with SpapsClient(base_url=server.url, api_key=API_KEY) as spaps:
        assert isinstance(spaps.token_storage, InMemoryTokenStorage)
        assert spaps.get_tokens() is None
