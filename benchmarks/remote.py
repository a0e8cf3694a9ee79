"""Benchmarks where users pay: a remote SPAPS over HTTPS, and cold starts.

One command (from the repository root)::

    python benchmarks/remote.py            # full run, about 4 minutes on 2 cores
    python benchmarks/remote.py --quick    # about a minute
    python benchmarks/remote.py --no-peer  # offline: ours and the floor only

Ours (``spaps_client``) against the reference client ``spaps`` 0.1.2 (the peer, from
``benchmarks/.peer-venv``, created as ``benchmarks/run.py`` creates it) and a bare
standard-library client (the floor), and against the physical limit the simulated network
sets, in one run:

1. **remote**: ``benchmarks/remote_server.py``, its own process, serves HTTPS on loopback and
   waits 5 ms before every response and 20 ms before the TLS handshake of every new
   connection. *sync*: a fresh client (built inside the measurement) makes 100 sequential
   calls; the limit is 5 ms + 20 ms / 100 per call. *async*: one client, ``c`` tasks
   (``c`` = 10, 50, 200) sharing the calls; the limit is ``c`` / 5 ms calls per second.
   Each measurement is a fresh ``benchmarks/remote_worker.py`` process.
2. **cold start**: a fresh process that imports, builds a client and makes one TLS call
   (no delay), spawn to exit, minus a bare interpreter; with the client's bytecode and
   without (``benchmarks/cold_start.py`` does the measuring).
3. **Lambda**: the init overhead ``benchmarks/lambda_init.py`` last wrote to
   ``benchmarks/results/lambda_init.json`` (not rerun).

Rounds alternate the clients, the order rotating from round to round; every figure is a
median over rounds. The server's CPU time is recorded for every measurement. The table goes
to stdout; ``benchmarks/results/remote.json`` keeps every raw sample. See
benchmarks/README.md ("Remote and cold start") for the method.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import cold_start  # noqa: E402
import remote_worker  # noqa: E402  (the control document, read as the worker reads it)
import run  # noqa: E402  (peer venv, certificates, server process, machine description)

WORKER = HERE / "remote_worker.py"
SERVER = HERE / "remote_server.py"
RESULTS = HERE / "results"
LAMBDA_RESULTS = RESULTS / "lambda_init.json"
CLIENTS = ("ours", "peer", "floor")

# targets: (kind, value); "limit" ratios are ours / limit, "peer" ratios ours / peer
SYNC_LIMIT_TARGET = 1.05  # mean per call <= 1.05 x the limit
ASYNC_LIMIT_TARGETS = {50: 0.75, 200: 0.45}  # calls/s >= this fraction of the limit
ASYNC_PEER_TARGETS = {50: 3.0}  # calls/s >= this many times the peer's
COLD_TARGET = 0.20
COLD_SOURCE_TARGET = 0.30


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/remote.py",
        description="A remote SPAPS (5 ms per response, 20 ms per connection) and cold starts: "
                    "ours, the reference client, a bare floor and the physical limit.")
    parser.add_argument("--quick", action="store_true", help="fewer rounds, calls and runs")
    parser.add_argument("--no-peer", action="store_true",
                        help="skip the reference client and its venv (offline use)")
    parser.add_argument("--rounds", type=int, help="alternating rounds (5; quick 2)")
    parser.add_argument("--sync-calls", type=int, default=100,
                        help="sequential calls of a fresh client (default 100)")
    parser.add_argument("--concurrency", default="10,50,200",
                        help="async concurrency levels (default 10,50,200)")
    parser.add_argument("--calls", type=int,
                        help="cap on the calls of every measurement (smoke tests)")
    parser.add_argument("--cold-runs", type=int,
                        help="cold starts per variant with bytecode (21; quick 7); the runs "
                             "without bytecode are half as many, at least 1")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold starts")
    parser.add_argument("--response-delay-ms", type=float, default=5.0)
    parser.add_argument("--connect-delay-ms", type=float, default=20.0)
    parser.add_argument("--json", type=Path, default=RESULTS / "remote.json",
                        help="where to write the results (default benchmarks/results/)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    quick = args.quick
    levels = [int(part) for part in args.concurrency.split(",") if part.strip()]
    cold_runs = args.cold_runs or (7 if quick else 21)
    plan: Dict[str, Any] = {
        "rounds": args.rounds or (2 if quick else 5),
        "sync_calls": args.sync_calls,
        "async_concurrency": levels,
        # enough calls for the timed part to last well beyond one call's latency
        "async_calls": {c: max(400, 5 * c) if quick else max(1000, 10 * c) for c in levels},
        "cold_runs": cold_runs,
        "cold_source_runs": max(1, cold_runs // 2),
        "response_delay_ms": args.response_delay_ms,
        "connect_delay_ms": args.connect_delay_ms,
    }
    if args.calls:
        plan["sync_calls"] = max(1, min(plan["sync_calls"], args.calls))
        plan["async_calls"] = {c: max(1, min(n, args.calls))
                               for c, n in plan["async_calls"].items()}
    args.plan = plan
    return args


# --- the server ---


class RemoteServer(run.ServerProcess):
    """``benchmarks/remote_server.py`` in its own process, and its control port."""

    def __init__(self, certs: Dict[str, str], response_delay_ms: float,
                 connect_delay_ms: float) -> None:
        command = [sys.executable, "-I", "-S", str(SERVER), "--cert", certs["cert"],
                   "--key", certs["key"], "--response-delay-ms", str(response_delay_ms),
                   "--connect-delay-ms", str(connect_delay_ms), "--nice", "-10"]
        super().__init__(command, "the remote benchmark server")

    def url(self, listener: str) -> str:
        return f"https://localhost:{self.ports[listener]}"

    def stats(self) -> Dict[str, Any]:
        return remote_worker.server_stats(self.ports["control"])


# --- the rounds ---


class Bench(run.WorkerBench):
    script = WORKER
    server: RemoteServer
    certs: Dict[str, str]

    def worker(self, client: str, mode: str, **options: Any) -> Dict[str, Any]:
        options["url"] = self.server.url("remote")
        options["cafile"] = self.certs["cafile"]
        if mode == "async":
            options["control"] = self.server.ports["control"]
        argv = self.command(client) + [mode] + [f"{k}={v}" for k, v in options.items()]
        before = self.server.stats()
        started = time.perf_counter()
        done = self.launch(argv)
        wall = time.perf_counter() - started
        after = self.server.stats()
        report = self.report_of(client, argv, done)
        timers = after["server"]["timers"] - before["server"]["timers"]
        report["connections_opened"] = (after["remote"]["connections"]
                                        - before["remote"]["connections"])
        report["requests_served"] = after["remote"]["requests"] - before["remote"]["requests"]
        report["server"] = {  # over the whole worker process, start-up included
            "cpu_s": after["server"]["cpu_s"] - before["server"]["cpu_s"],
            "process_wall_s": wall,
            "timers": timers,
            "timer_mean_error_us": ((after["server"]["timer_error_sum_s"]
                                     - before["server"]["timer_error_sum_s"])
                                    / timers * 1e6) if timers else 0.0,
        }
        return report

    def scenarios(self) -> List[Tuple[str, str, Dict[str, Any]]]:
        items: List[Tuple[str, str, Dict[str, Any]]] = [
            ("sync", "sync", {"calls": self.plan["sync_calls"]})]
        for c in self.plan["async_concurrency"]:
            items.append((f"async_c{c}", "async",
                          {"calls": self.plan["async_calls"][c], "concurrency": c}))
        return items

    def run_rounds(self) -> None:
        rounds = self.plan["rounds"]
        for index in range(rounds):
            started = time.monotonic()
            for name, mode, options in self.scenarios():
                shift = index % len(self.clients)
                for client in self.clients[shift:] + self.clients[:shift]:
                    report = self.worker(client, mode, **dict(options))
                    self.record(name, client, report)
            log(f"round {index + 1}/{rounds} done in {time.monotonic() - started:.1f}s "
                f"(load average {run.load_average():.2f})")


# --- the table ---


class Row:
    """One line of the table: ours, peer, floor, the limit, ratios, targets."""

    def __init__(self, metric: str, unit: str, values: Dict[str, Optional[float]],
                 higher_is_better: bool, limit: Optional[float] = None,
                 limit_target: Optional[float] = None, peer_target: Optional[float] = None,
                 note: str = "", rounds: Optional[Dict[str, List[float]]] = None) -> None:
        self.metric, self.unit, self.values = metric, unit, values
        self.higher, self.limit = higher_is_better, limit
        self.limit_target, self.peer_target = limit_target, peer_target
        self.note = note
        self.rounds = rounds or {}

    def ratio(self, other: str) -> Optional[float]:
        ours = self.values.get("ours")
        theirs = self.limit if other == "limit" else self.values.get(other)
        if ours is None or not theirs:
            return None
        return ours / theirs

    def floor_over_limit(self) -> Optional[float]:
        floor = self.values.get("floor")
        return None if floor is None or not self.limit else floor / self.limit

    def checks(self) -> List[Tuple[str, Optional[bool]]]:
        out = []
        for other, target in (("limit", self.limit_target), ("peer", self.peer_target)):
            if target is None:
                continue
            out.append((other, run.meets(self.higher, self.ratio(other), target)))
        return out

    def target_text(self) -> str:
        return run.target_text(self.higher, (("limit", self.limit_target),
                                             ("peer", self.peer_target)))

    def outcome(self) -> str:
        return run.verdict(self.checks())

    def as_dict(self) -> Dict[str, Any]:
        return {
            "metric": self.metric, "unit": self.unit, "values": self.values,
            "limit": self.limit, "ours_over_limit": self.ratio("limit"),
            "floor_over_limit": self.floor_over_limit(), "ours_over_peer": self.ratio("peer"),
            "higher_is_better": self.higher, "target": self.target_text(),
            "result": self.outcome(), "note": self.note, "per_round": self.rounds,
        }


def median_of(samples: Dict[str, Dict[str, List[Dict[str, Any]]]], scenario: str,
              client: str, key: str) -> Optional[float]:
    values = [s[key] for s in samples.get(scenario, {}).get(client, []) if key in s]
    return statistics.median(values) if values else None


def build_rows(bench: Optional[Bench], plan: Dict[str, Any], cold: Optional[Dict[str, Any]],
               lambda_result: Optional[Dict[str, Any]], notes: List[str]) -> List[Row]:
    rows: List[Row] = []
    delay = plan["response_delay_ms"]
    connect = plan["connect_delay_ms"]
    if bench is not None:
        samples = bench.samples

        def values(scenario: str, key: str) -> Dict[str, Optional[float]]:
            return {c: median_of(samples, scenario, c, key) for c in CLIENTS}

        def per_round(scenario: str, key: str) -> Dict[str, List[float]]:
            return {c: [s[key] for s in runs if key in s]
                    for c, runs in samples.get(scenario, {}).items()}

        n = plan["sync_calls"]
        rows += [
            Row(f"remote sync: mean per call, {n} calls of a fresh client", "ms",
                values("sync", "mean_ms"), False, limit=delay + connect / n,
                limit_target=SYNC_LIMIT_TARGET, rounds=per_round("sync", "mean_ms"),
                note="client built inside the measurement, first call included"),
            Row("remote sync: first call (connect + TLS + first request)", "ms",
                values("sync", "first_call_ms"), False, limit=delay + connect,
                rounds=per_round("sync", "first_call_ms")),
            Row(f"remote sync: mean of calls 2 to {n}", "ms",
                values("sync", "steady_mean_ms"), False, limit=delay,
                rounds=per_round("sync", "steady_mean_ms")),
            Row("remote sync: building the client", "ms", values("sync", "construct_ms"),
                False, rounds=per_round("sync", "construct_ms")),
            Row(f"remote sync: connections opened, {n} calls", "conns",
                values("sync", "connections_opened"), False, limit=1.0),
        ]
        for c in plan["async_concurrency"]:
            scenario = f"async_c{c}"
            rows.append(Row(
                f"remote async: calls/s at concurrency {c}", "calls/s",
                values(scenario, "calls_per_s"), True, limit=c / (delay / 1000),
                limit_target=ASYNC_LIMIT_TARGETS.get(c), peer_target=ASYNC_PEER_TARGETS.get(c),
                rounds=per_round(scenario, "calls_per_s")))
            rows.append(Row(
                f"remote async: connections opened, concurrency {c}", "conns",
                values(scenario, "connections_opened"), False, limit=float(c)))
    if cold is not None:
        for label, target, text in (
                ("with_bytecode", COLD_TARGET, "cold start, one TLS call, with bytecode"),
                ("without_bytecode", COLD_SOURCE_TARGET,
                 "cold start, one TLS call, without bytecode")):
            data = cold.get(label, {})
            rows.append(Row(
                text, "ms", {c: data[c]["cold_ms"] if c in data else None for c in CLIENTS},
                False, peer_target=target,
                note="spawn to exit minus a bare interpreter; full trust store via "
                     "SSL_CERT_FILE"))
    if lambda_result is not None:
        table = lambda_result.get("table", {})
        target = lambda_result.get("target", 0.15)
        rows.append(Row(
            f"Lambda init overhead (lambda_init.json, {lambda_result.get('date', '?')})", "ms",
            {"ours": table.get("ours", {}).get("overhead_ms_median"),
             "peer": table.get("peer", {}).get("overhead_ms_median"), "floor": None},
            False, peer_target=target, note="read from benchmarks/results/lambda_init.json"))
        client = ROOT / "spaps_client.py"
        if client.exists() and LAMBDA_RESULTS.stat().st_mtime < client.stat().st_mtime:
            notes.append("benchmarks/results/lambda_init.json is older than spaps_client.py: "
                         "the Lambda row may not describe this code; rerun python "
                         "benchmarks/lambda_init.py (as root, about a minute)")
    elif LAMBDA_RESULTS.exists():
        notes.append("lambda_init.json could not be read")
    else:
        notes.append("no benchmarks/results/lambda_init.json: run python "
                     "benchmarks/lambda_init.py (as root) for the Lambda row")
    return rows


def fmt_value(value: Optional[float], unit: str) -> str:
    if value is None:
        return "-"
    if unit == "calls/s":
        return f"{value:,.0f}"
    if unit == "conns":
        return f"{value:g}"
    return f"{value:,.2f}" if value < 100 else f"{value:,.1f}"


def fmt_ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}" if value >= 0.1 else f"{value:.3f}"


HEADER = ("metric", "ours", "peer", "floor", "limit", "ours/limit", "floor/limit",
          "ours/peer", "target", "result")


def table_cells(rows: List[Row]) -> List[Tuple[str, ...]]:
    return [(
        f"{row.metric} [{row.unit}]",
        fmt_value(row.values.get("ours"), row.unit),
        fmt_value(row.values.get("peer"), row.unit),
        fmt_value(row.values.get("floor"), row.unit),
        fmt_value(row.limit, row.unit),
        fmt_ratio(row.ratio("limit")),
        fmt_ratio(row.floor_over_limit()),
        fmt_ratio(row.ratio("peer")),
        row.target_text(),
        row.outcome(),
    ) for row in rows]


def render_text(header: Tuple[str, ...], cells: List[Tuple[str, ...]], numeric: int) -> str:
    """Left-aligned first column, ``numeric`` right-aligned columns, the rest left-aligned."""
    everything = [header, *cells]
    widths = [max(len(line[i]) for line in everything) for i in range(len(header))]

    def line(items: Tuple[str, ...]) -> str:
        parts = [items[0].ljust(widths[0])]
        parts += [item.rjust(w) for item, w in zip(items[1:numeric + 1], widths[1:numeric + 1])]
        parts += [item.ljust(w) for item, w in zip(items[numeric + 1:], widths[numeric + 1:])]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(header), rule, *(line(c) for c in cells)])


def render_markdown(header: Tuple[str, ...], cells: List[Tuple[str, ...]],
                    numeric: int) -> str:
    align = ["---"] + ["---:"] * numeric + ["---"] * (len(header) - numeric - 1)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(cell) + " |" for cell in cells]
    return "\n".join(lines)


SERVER_HEADER = ("scenario", "client", "server CPU/run [ms]", "server CPU/request [us]",
                 "server busy (timed part)", "server timer error [us]",
                 "client CPU (timed part)", "client CPU/call [us]")


def timer_error_us(report: Dict[str, Any]) -> float:
    """The server timers' mean error: over the timed part where known, else the whole run."""
    timed = report.get("timed_server")
    if timed and timed["timers"]:
        return timed["timer_error_sum_s"] / timed["timers"] * 1e6
    return report["server"]["timer_mean_error_us"]


def server_cells(bench: Bench) -> List[Tuple[str, ...]]:
    """Per scenario and client, medians over rounds: the server's load and the client's."""
    cells = []
    for scenario, by_client in bench.samples.items():
        for client in CLIENTS:
            runs = by_client.get(client)
            if not runs:
                continue
            cpu = statistics.median(r["server"]["cpu_s"] for r in runs)
            per_request = statistics.median(r["server"]["cpu_s"] / r["requests_served"]
                                            for r in runs if r["requests_served"])
            if all("timed_server" in r for r in runs):
                busy = statistics.median(r["timed_server"]["cpu_s"] / r["elapsed_s"]
                                         for r in runs)
                client_share = statistics.median(r["client_cpu_share"] for r in runs)
                client_call = statistics.median(r["client_cpu_us_per_call"] for r in runs)
                busy_text = f"{busy:.0%}"
                client_text, call_text = f"{client_share:.0%}", f"{client_call:,.0f}"
            else:
                busy_text = client_text = "-"
                client_call = statistics.median(r["cpu_ms"] / r["calls"] * 1e3 for r in runs)
                call_text = f"{client_call:,.0f}"
            error = statistics.median(timer_error_us(r) for r in runs)
            cells.append((scenario, client, f"{cpu * 1e3:,.1f}", f"{per_request * 1e6:,.1f}",
                          busy_text, f"{error:+.0f}", client_text, call_text))
    return cells


def server_notes(bench: Bench, notes: List[str]) -> None:
    for scenario, by_client in bench.samples.items():
        for client, runs in by_client.items():
            timed = [r["timed_server"] for r in runs if "timed_server" in r]
            if timed:
                busy = statistics.median(t["cpu_s"] / r["elapsed_s"]
                                         for t, r in zip(timed, runs))
                if busy > 0.8:
                    notes.append(f"{scenario}, {client}: the server was busy {busy:.0%} of "
                                 "the timed part: it may be the bottleneck")
            error = statistics.median(timer_error_us(r) for r in runs)
            if error > 250:
                notes.append(f"{scenario}, {client}: the server's timers fired {error:.0f} us "
                             "late on average (CPU contention): the delays were longer than "
                             "asked for")


def read_lambda() -> Optional[Dict[str, Any]]:
    try:
        return json.loads(LAMBDA_RESULTS.read_text())
    except (OSError, ValueError):
        return None


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    plan = args.plan
    notes: List[str] = []
    started = time.monotonic()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    peer_python = None if args.no_peer else run.ensure_peer_venv(notes)
    if args.no_peer:
        notes.append("peer skipped: --no-peer")
    for note in notes:
        log(note)
    cold: Optional[Dict[str, Any]] = None
    with tempfile.TemporaryDirectory(prefix="spaps-remote-") as tmp:
        certs = run.make_certificates(Path(tmp), notes)
        if certs is None:
            log("; ".join(notes))
            return 2
        server = RemoteServer(certs, plan["response_delay_ms"], plan["connect_delay_ms"])
        try:
            log(f"server: pid {server.info['pid']}, nice {server.info.get('nice')}, "
                f"1 ns timer slack: {server.info.get('timer_slack_1ns')}")
            bench = Bench(plan, peer_python, server, certs)
            log(f"{plan['rounds']} rounds of: "
                + ", ".join(f"{name} ({', '.join(bench.clients)})"
                            for name, _, _ in bench.scenarios()))
            bench.run_rounds()
            if not args.no_cold:
                cold = cold_start.tls_cold_start(
                    peer_python, server.ports["local"], certs["cafile"], plan["cold_runs"],
                    plan["cold_source_runs"], log=log)
            totals = server.stats()
        finally:
            server.stop()
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    lambda_result = read_lambda()
    rows = build_rows(bench, plan, cold, lambda_result, notes)
    server_notes(bench, notes)
    info = run.machine()
    when = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    duration = time.monotonic() - started
    header = (
        f"spaps remote benchmark, {when.isoformat()}; {info['nproc']} CPUs "
        f"({info['cpu_model']}); Python {info['python']}; peer: "
        + ("spaps 0.1.2" if peer_python else "not run")
        + f"; {plan['rounds']} rounds, medians; {duration:.0f}s; load average (1/5/15 min) "
        + f"{'/'.join(f'{v:.2f}' for v in load_before)} before, "
        + f"{'/'.join(f'{v:.2f}' for v in load_after)} after"
    )
    cells = table_cells(rows)
    scells = server_cells(bench)
    print(header)
    print()
    print(render_text(HEADER, cells, 7))
    print()
    print(render_text(SERVER_HEADER, scells, 0))
    if notes:
        print()
        for note in notes:
            print(f"note: {note}")
    command = " ".join(["python", "benchmarks/remote.py",
                        *(sys.argv[1:] if argv is None else argv)])
    document = {
        "date": when.isoformat(),
        "machine": info,
        "command": command,
        "plan": {**plan, "async_calls": {str(k): v for k, v in plan["async_calls"].items()}},
        "peer": {"requirement": run.PEER_REQUIREMENT, "python": str(peer_python or "")},
        "server": server.info,
        "server_totals": totals,
        "load_average": {"before": load_before, "after": load_after},
        "notes": notes,
        "rows": [row.as_dict() for row in rows],
        "server_table": [dict(zip(SERVER_HEADER, cell)) for cell in scells],
        "samples": bench.samples,
        "cold_start": cold,
        "lambda": lambda_result,
        "duration_s": duration,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=1) + "\n")
    args.json.with_suffix(".md").write_text(
        header + "\n\n" + render_markdown(HEADER, cells, 7) + "\n\n"
        + render_markdown(SERVER_HEADER, scells, 0) + "\n"
        + "".join(f"\nnote: {note}\n" for note in notes) + f"\ncommand: `{command}`\n")
    log(f"results written to {args.json}")
    failed = [row.metric for row in rows if row.outcome().startswith("FAIL")]
    return 1 if args.check and failed else 0


if __name__ == "__main__":
    sys.exit(main())
