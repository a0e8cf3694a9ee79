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
