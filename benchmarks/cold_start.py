"""Cold start, step by step: import, build a client, first call; ours against the peer.

    python benchmarks/cold_start.py [--runs 21]

Each run is a fresh process (ours: ``python -I -S``, no site-packages; the peer: the
benchmark's ``benchmarks/.peer-venv``, made by ``benchmarks/run.py``) that times the three
steps with ``perf_counter`` against ``benchmarks/server.py`` over loopback HTTP. Ours and the
peer alternate; medians are printed with the ours/peer ratio of the sum. This is what a
Lambda pays when it builds its client during initialisation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEER_PYTHON = HERE / ".peer-venv" / "bin" / "python"

PROGRAM = """
import sys, time
t0 = time.perf_counter()
{path_setup}
from spaps_client import SessionsClient
t1 = time.perf_counter()
client = SessionsClient(base_url="http://127.0.0.1:{port}", api_key="k", access_token="t")
t2 = time.perf_counter()
client.get_current_session()
t3 = time.perf_counter()
print((t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=21)
    args = parser.parse_args()
    server = subprocess.Popen([sys.executable, "-I", "-S", str(HERE / "server.py")],
                              stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = json.loads(server.stdout.readline())["ports"]["http"]
        time.sleep(0.3)
        commands = {"ours": [sys.executable, "-I", "-S", "-c", PROGRAM.format(
            path_setup=f"sys.path.insert(0, {str(ROOT)!r})", port=port)]}
        if PEER_PYTHON.exists():
            commands["peer"] = [str(PEER_PYTHON), "-I", "-c",
                                PROGRAM.format(path_setup="", port=port)]
        else:
            print("peer skipped: run benchmarks/run.py once to create benchmarks/.peer-venv")
        samples: Dict[str, List[List[float]]] = {name: [] for name in commands}
        for command in commands.values():  # warm-up: bytecode and file cache
            subprocess.run(command, check=True, capture_output=True, timeout=60)
        for _ in range(args.runs):
            for name, command in commands.items():
                done = subprocess.run(command, check=True, capture_output=True, text=True,
                                      timeout=60)
                samples[name].append([float(part) for part in done.stdout.split()])
    finally:
        server.terminate()
    totals: Dict[str, float] = {}
    print(f"{'client':<6} {'import':>9} {'build':>9} {'1st call':>9} {'sum':>9}   (ms, medians "
          f"of {args.runs})")
    for name, rows in samples.items():
        steps = [statistics.median(row[i] for row in rows) for i in range(3)]
        totals[name] = statistics.median(sum(row) for row in rows)
        print(f"{name:<6} {steps[0]:9.1f} {steps[1]:9.1f} {steps[2]:9.1f} {totals[name]:9.1f}")
    if "peer" in totals:
        print(f"ours/peer, whole cold start: {totals['ours'] / totals['peer']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
