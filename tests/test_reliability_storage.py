"""Crash safety of ``FileTokenStorage`` (docs/reliability.md, "Token files survive kill -9").

A writer process saves token sets in a tight loop and is killed with SIGKILL at random moments;
after every kill the token file must hold one complete set (the old or a new one), with mode 0600
in a 0700 directory, and leftovers of interrupted saves must never be taken for the token file.
"""

from __future__ import annotations

import json
import os
import random
import signal
import stat
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from spaps_client import FileTokenStorage, StoredTokens

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL") or sys.platform == "win32",
                                reason="POSIX kill -9 and file modes")

FILLER = 8192  # large enough that a kill regularly lands in the middle of a write

WRITER = r"""
import sys
sys.path.insert(0, sys.argv[1])
from datetime import datetime, timedelta, timezone
from spaps_client import FileTokenStorage, StoredTokens

path, generation, filler = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
storage = FileTokenStorage(path=path)
counter = 0
while True:
    tag = f"{generation:03d}-{counter:09d}"
    storage.save(StoredTokens(
        access_token=f"at-{tag}-" + "a" * filler,
        refresh_token=f"rt-{tag}-" + "r" * filler,
        expires_at=datetime(2030, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=counter),
        token_type="Bearer",
    ))
    if counter == 0:
        print("saved", flush=True)
    counter += 1
"""

LOCK_HOLDER = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
from spaps_client import FileTokenStorage

with FileTokenStorage(path=sys.argv[2]).lock():
    print("locked", flush=True)
    time.sleep(60)
"""


def tag_of(tokens: StoredTokens) -> tuple[int, int]:
    """(generation, counter) of a set written by WRITER, checking that it is complete."""
    prefix, generation, counter, filler = tokens.access_token.split("-")
    assert prefix == "at" and filler == "a" * FILLER
    assert tokens.refresh_token == f"rt-{generation}-{counter}-" + "r" * FILLER
    assert tokens.token_type == "Bearer"
    assert tokens.expires_at == (datetime(2030, 1, 1, tzinfo=timezone.utc)
                                 + timedelta(seconds=int(counter)))
    return int(generation), int(counter)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.slow
def test_token_file_survives_sigkill_at_random_moments(tmp_path: Path) -> None:
    directory = tmp_path / "config" / "spaps"
    token_file = directory / "tokens.json"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    rng = random.Random(4)  # reproducible kill moments
    last: tuple[int, int] = (-1, -1)

    for generation in range(20):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(ROOT), str(token_file), str(generation),
             str(FILLER)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "saved", proc.stderr.read()
            time.sleep(rng.uniform(0.0, 0.03))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL

        raw = token_file.read_bytes()
        document = json.loads(raw)  # never a torn or empty file
        assert set(document) >= {"access_token", "refresh_token", "expires_at", "token_type"}
        loaded = FileTokenStorage(path=token_file).load()
        assert loaded is not None, "a complete file must load as tokens, not as 'signed out'"
        current = tag_of(loaded)
        assert current[0] == generation  # this generation saved at least once ...
        assert current > last  # ... and the file never goes back to an older set
        last = current
        assert mode(token_file) == 0o600
        assert mode(directory) == 0o700
        for leftover in directory.iterdir():
            # Interrupted saves may leave temp files behind: private, and never the token file.
            assert mode(leftover) & 0o077 == 0, f"{leftover.name} is readable by others"

    # A fresh save after all those crashes replaces the file; leftovers never shadow it.
    storage = FileTokenStorage(path=token_file)
    storage.save(StoredTokens(access_token="at-final", refresh_token="rt-final"))
    final = storage.load()
    assert final is not None
    assert (final.access_token, final.refresh_token) == ("at-final", "rt-final")
    assert mode(token_file) == 0o600


def test_first_save_creates_private_file_and_directory(tmp_path: Path) -> None:
    token_file = tmp_path / "a" / "b" / "tokens.json"
    storage = FileTokenStorage(path=token_file)
    assert not token_file.parent.exists()  # nothing is created before the first save

    storage.save(StoredTokens(access_token="at-1", refresh_token="rt-1",
                              expires_at=datetime.now(timezone.utc)))

    assert mode(token_file) == 0o600
    assert mode(token_file.parent) == 0o700
    assert [p.name for p in token_file.parent.iterdir()] == ["tokens.json"]


def test_file_never_has_lax_permissions_while_being_written(tmp_path: Path) -> None:
    """Watch the directory while another thread saves: no file there is ever group/world
    readable, not even for an instant (no chmod-after-write window)."""
    token_file = tmp_path / "spaps" / "tokens.json"
    storage = FileTokenStorage(path=token_file)
    storage.save(StoredTokens(access_token="at-0"))
    stop = threading.Event()
    lax: list[str] = []

    def watch() -> None:
        while not stop.is_set():
            for entry in os.scandir(token_file.parent):
                try:
                    if stat.S_IMODE(entry.stat().st_mode) & 0o077:
                        lax.append(entry.name)
                except FileNotFoundError:
                    pass

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for i in range(300):
            storage.save(StoredTokens(access_token=f"at-{i}", refresh_token="r" * 4096))
    finally:
        stop.set()
        watcher.join()
    assert lax == []


def test_refresh_lock_of_a_killed_process_is_released(tmp_path: Path) -> None:
    """A process killed while holding the refresh lock must not lock everybody out."""
    token_file = tmp_path / "spaps" / "tokens.json"
    script = tmp_path / "holder.py"
    script.write_text(LOCK_HOLDER)
    proc = subprocess.Popen([sys.executable, str(script), str(ROOT), str(token_file)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "locked"
        acquired = threading.Event()

        def take_lock() -> None:
            with FileTokenStorage(path=token_file).lock():
                acquired.set()

        contender = threading.Thread(target=take_lock, daemon=True)
        contender.start()
        # The lock really is exclusive across processes while the holder lives ...
        assert not acquired.wait(0.3)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        # ... and is released by the kernel when the holder dies.
        assert acquired.wait(5.0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_corrupt_or_foreign_file_loads_as_no_tokens(tmp_path: Path) -> None:
    """A damaged file (another tool, a full disk) reads as "signed out", never as a crash."""
    token_file = tmp_path / "tokens.json"
    storage = FileTokenStorage(path=token_file)
    for content in (b"", b"{", b"[1, 2]", b'"text"', b"null", b'{"access_token": 5}',
                    b"\xff\xfe\x00garbage", b'{"refresh_token": "rt"}'):
        token_file.write_bytes(content)
        assert storage.load() is None, content


def test_temp_files_of_interrupted_saves_do_not_outlive_the_tokens(tmp_path: Path) -> None:
    """A save killed mid-write leaves a temp file holding a full token set; it must go."""
    path = tmp_path / "spaps" / "tokens.json"
    storage = FileTokenStorage(path=path)
    storage.save(StoredTokens("first-token", "refresh-1"))
    orphan = path.parent / "tokens.json.999999999.deadbeef.tmp"  # a pid no process has
    orphan.write_text('{"access_token": "orphaned-secret"}')
    mine = path.parent / f"tokens.json.{os.getpid()}.cafe0000.tmp"  # a save in progress
    mine.write_text("{}")

    storage.save(StoredTokens("second-token", "refresh-2"))
    assert not orphan.exists()
    assert mine.exists(), "a live process's temp file must not be removed under its feet"

    storage.clear()
    assert sorted(p.name for p in path.parent.iterdir()) == []
