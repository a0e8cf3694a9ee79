"""Smoke test: the benchmark harness runs end to end in its smallest mode.

No timing is asserted: the point is that ``python benchmarks/run.py`` keeps working
(server, certificates, workers for ours and the floor, table, JSON), not how fast
anything is. The peer (a pip-installed venv) is skipped with ``--no-peer``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "benchmarks" / "run.py"


def test_benchmark_runs_in_smallest_mode(tmp_path: Path) -> None:
    output = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--no-peer", "--calls", "20", "--rounds", "1",
         "--import-repeats", "1", "--json", str(output)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    header = next(line for line in done.stdout.splitlines() if line.startswith("metric"))
    assert header.split() == ["metric", "ours", "peer", "floor", "ours/peer", "ours/floor",
                              "target", "result"]
    for metric in ("import time", "RSS after import", "sync calls/s, HTTP",
                   "TCP connections per 1,000 calls", "async calls/s, concurrency 50",
                   "CPU time per call"):
        assert metric in done.stdout

    document = json.loads(output.read_text())
    assert document["plan"]["rounds"] == 1
    assert "peer" not in document["samples"]["sync_http"]
    ours = document["samples"]["sync_http"]["ours"][0]
    assert ours["third_party_importable"] == []
    assert ours["requests_served"] >= 20
    assert output.with_suffix(".md").read_text().startswith("spaps benchmark")


REMOTE = ROOT / "benchmarks" / "remote.py"


def test_remote_benchmark_runs_in_smallest_mode(tmp_path: Path) -> None:
    output = tmp_path / "remote.json"
    done = subprocess.run(
        [sys.executable, str(REMOTE), "--quick", "--no-peer", "--rounds", "1", "--calls", "10",
         "--concurrency", "2,50", "--cold-runs", "1", "--json", str(output)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    header = next(line for line in done.stdout.splitlines() if line.startswith("metric"))
    assert header.split() == ["metric", "ours", "peer", "floor", "limit", "ours/limit",
                              "floor/limit", "ours/peer", "target", "result"]
    for metric in ("remote sync: mean per call, 10 calls of a fresh client",
                   "remote sync: first call", "remote async: calls/s at concurrency 50",
                   "cold start, one TLS call, with bytecode",
                   "cold start, one TLS call, without bytecode", "server CPU/request"):
        assert metric in done.stdout

    document = json.loads(output.read_text())
    assert document["plan"]["rounds"] == 1
    assert set(document["samples"]) == {"sync", "async_c2", "async_c50"}
    assert "peer" not in document["samples"]["sync"]
    ours = document["samples"]["sync"]["ours"][0]
    assert ours["third_party_importable"] == []
    assert ours["requests_served"] == 10 and ours["connections_opened"] == 1
    assert len(ours["latencies_us"]) == 10
    assert ours["server"]["cpu_s"] >= 0
    floor = document["samples"]["async_c50"]["floor"][0]
    assert floor["connections_opened"] == 50 and floor["timed_server"]["requests"] == 10
    assert set(document["cold_start"]["without_bytecode"]) == {"ours"}
    assert document["server_table"] and document["load_average"]["before"]
    assert output.with_suffix(".md").read_text().startswith("spaps remote benchmark")
