"""Benchmark ``spaps_client`` against the reference client (the peer) and a bare floor.

One command (from the repository root)::

    python benchmarks/run.py            # full run, a few minutes
    python benchmarks/run.py --quick    # under a minute
    python benchmarks/run.py --no-peer  # offline: ours and the floor only

What it does, all on this machine and only over the loopback interface:

1. Creates (or reuses) ``benchmarks/.peer-venv`` with ``pip install spaps==0.1.2``, the
   httpx + pydantic reference client. It is a benchmark-only throwaway, never a
   dependency of ours. Its import name is also ``spaps_client``, so every client runs in
   its own process.
2. Makes a throw-away CA and server certificate with the ``openssl`` command line in a
   temporary directory (no ``openssl``: the TLS rows are skipped, with a note).
3. Starts ``benchmarks/server.py`` in its own process: keep-alive HTTP/1.1 and TLS
   listeners answering ``GET /api/sessions/current`` with canned JSON, two more listeners
   that delay every new connection (a remote SPAPS's handshake round trips), and a control
   port reporting how many TCP connections each listener accepted.
4. Runs ``benchmarks/worker.py`` once per client, scenario and round. Ours and the floor run
   as ``python -I -S`` (no site-packages: no third-party package is importable; the worker
   puts only the repository root on ``sys.path``); the peer runs with the venv's
   interpreter. Within each round the clients take turns, and the order rotates from
   round to round, so drift (CPU frequency, other load) hits all of them alike; every
   figure is the median over the rounds.
5. Prints a table (ours, peer, floor, ratios, target, result) and writes everything,
   raw samples included, to ``benchmarks/results/latest.json`` (and ``latest.md``).

The exit status is 0 unless the benchmark itself broke; ``--check`` makes a missed target
exit 1 as well. See docs/performance.md for what each metric means.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKER = HERE / "worker.py"
SERVER = HERE / "server.py"
PEER_VENV = HERE / ".peer-venv"
PEER_REQUIREMENT = "spaps==0.1.2"
PEER_VERSION = "0.1.2"
RESULTS = HERE / "results"
WORKER_TIMEOUT = 300.0

CLIENTS = ("ours", "peer", "floor")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- settings ---


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/run.py",
        description="Benchmark spaps_client against the reference client and a bare floor.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="fewer rounds and calls: finishes in under a minute")
    parser.add_argument("--no-peer", action="store_true",
                        help="skip the reference client and its venv (offline use)")
    parser.add_argument("--rounds", type=int, help="rounds of alternating runs (7; quick 2)")
    parser.add_argument("--calls", type=int,
                        help="cap on the calls of every single measurement (smoke tests)")
    parser.add_argument("--import-repeats", type=int,
                        help="fresh processes per import-time figure (21; quick 7)")
    parser.add_argument("--handshake-delay-ms", type=float, default=20.0,
                        help="delay before serving each new connection on the delayed "
                             "listeners (default 20 ms: TCP + TLS 1.3 at 10 ms RTT)")
    parser.add_argument("--handshake-calls", type=int, default=200,
                        help="sequential calls over which the handshake is amortised "
                             "(default 200)")
    parser.add_argument("--json", type=Path, default=RESULTS / "latest.json",
                        help="where to write the results (default benchmarks/results/)")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    quick = args.quick
    plan = {
        "rounds": args.rounds or (2 if quick else 7),
        "import_repeats": args.import_repeats or (7 if quick else 21),
        "sync_warmup": 100 if quick else 200,
        "sync_calls": 1000 if quick else 3000,
        "rss_calls": 1000,
        "handshake_calls": args.handshake_calls,
        "async_calls": 600 if quick else 2000,
        "async_concurrency": [1, 10, 50],
    }
    if args.calls:
        for key in ("sync_warmup", "sync_calls", "rss_calls", "handshake_calls", "async_calls"):
            plan[key] = max(1, min(plan[key], args.calls))
    args.plan = plan
    return args


# --- the peer's throwaway venv ---


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def peer_ready(python: Path) -> bool:
    if not python.exists():
        return False
    probe = (
        "import importlib.metadata as m, httpx, pydantic, spaps_client; "
        "print(m.version('spaps'))"
    )
    try:
        done = subprocess.run([str(python), "-I", "-c", probe], capture_output=True,
                              text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and done.stdout.strip() == PEER_VERSION


def ensure_peer_venv(notes: List[str]) -> Optional[Path]:
    """The peer venv's interpreter, creating the venv if needed; None if that fails."""
    python = venv_python(PEER_VENV)
    if peer_ready(python):
        log(f"peer: reusing {PEER_VENV.relative_to(ROOT)}")
        return python
    log(f"peer: creating {PEER_VENV.relative_to(ROOT)} with {PEER_REQUIREMENT} ...")
    shutil.rmtree(PEER_VENV, ignore_errors=True)
    steps = [
        [sys.executable, "-m", "venv", str(PEER_VENV)],
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         PEER_REQUIREMENT],
    ]
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            notes.append(f"peer skipped: {' '.join(step[:4])} failed: {exc}")
            return None
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["?"]
            notes.append(f"peer skipped: {' '.join(step[:4])} failed: {tail[0]}")
            return None
    if not peer_ready(python):
        notes.append("peer skipped: the venv was built but spaps 0.1.2 does not import")
        return None
    return python


# --- certificates and the server ---


def make_certificates(directory: Path, notes: List[str]) -> Optional[Dict[str, str]]:
    """A throw-away CA and a localhost/127.0.0.1 server certificate, or None."""
    openssl = shutil.which("openssl")
    if openssl is None:
        notes.append("TLS rows skipped: the openssl command is not installed")
        return None
    ca_key, ca_pem = directory / "ca.key", directory / "ca.pem"
    key, csr, pem = directory / "server.key", directory / "server.csr", directory / "server.pem"
    extensions = directory / "server.ext"
    extensions.write_text(
        "basicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n"
    )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    steps = [
        [openssl, "req", "-x509", *ec, "-keyout", ca_key, "-out", ca_pem, "-days", "2",
         "-subj", "/CN=spaps benchmark CA",
         # Python 3.13 verifies strictly (VERIFY_X509_STRICT): a CA must say it is one.
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        [openssl, "req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=localhost"],
        [openssl, "x509", "-req", "-in", csr, "-CA", ca_pem, "-CAkey", ca_key,
         "-CAcreateserial", "-out", pem, "-days", "2", "-extfile", extensions],
    ]
    for step in steps:
        done = subprocess.run([str(part) for part in step], capture_output=True, text=True,
                              timeout=60)
        if done.returncode != 0:
            notes.append(f"TLS rows skipped: openssl failed: {done.stderr.strip()[-200:]}")
            return None
    return {"cafile": str(ca_pem), "cert": str(pem), "key": str(key)}


class ServerProcess:
    """A benchmark server in its own process: its first stdout line is a JSON description
    with its ``ports``; it stops on SIGTERM or when its standard input closes."""

    def __init__(self, command: List[str], name: str) -> None:
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            self.stop()
            raise RuntimeError(f"{name} did not start")
        self.info: Dict[str, Any] = json.loads(line)
        self.ports: Dict[str, int] = self.info["ports"]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()


class Server(ServerProcess):
    """``benchmarks/server.py`` in its own process, and its control port."""

    def __init__(self, certs: Optional[Dict[str, str]], delay_ms: float) -> None:
        command = [sys.executable, "-I", "-S", str(SERVER), "--delay-ms", str(delay_ms)]
        if certs:
            command += ["--cert", certs["cert"], "--key", certs["key"]]
        super().__init__(command, "the benchmark server")

    def url(self, listener: str) -> str:
        scheme = "https" if listener.startswith("tls") else "http"
        host = "localhost" if scheme == "https" else "127.0.0.1"
        return f"{scheme}://{host}:{self.ports[listener]}"

    def stats(self) -> Dict[str, Dict[str, int]]:
        conn = http.client.HTTPConnection("127.0.0.1", self.ports["control"], timeout=10)
        try:
            conn.request("GET", "/stats")
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()


# --- running workers ---


class WorkerBench:
    """Runs a worker script (``script``) in a fresh process per measurement; keeps samples."""

    script: Path = WORKER

    def __init__(self, plan: Dict[str, Any], peer_python: Optional[Path],
                 server: ServerProcess, certs: Optional[Dict[str, str]]) -> None:
        self.plan = plan
        self.peer_python = peer_python
        self.server = server
        self.certs = certs
        self.clients = [c for c in CLIENTS if c != "peer" or peer_python is not None]
        self.samples: Dict[str, Dict[str, List[Dict[str, Any]]]] = {}

    def command(self, client: str) -> List[str]:
        if client == "peer":
            assert self.peer_python is not None
            return [str(self.peer_python), "-I", str(self.script), client]
        return [sys.executable, "-I", "-S", str(self.script), client]

    def launch(self, argv: List[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, capture_output=True, text=True, timeout=WORKER_TIMEOUT,
                              cwd=tempfile.gettempdir())

    def report_of(self, client: str, argv: List[str],
                  done: subprocess.CompletedProcess[str]) -> Dict[str, Any]:
        """The worker's JSON report; an error if it failed or third-party code was importable."""
        if done.returncode != 0:
            raise RuntimeError(f"worker failed: {' '.join(argv)}\n{done.stderr.strip()}")
        report: Dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        if report.get("third_party_importable"):
            raise RuntimeError(f"{client} ran with third-party packages importable: "
                               f"{report['third_party_importable']}")
        return report

    def record(self, scenario: str, client: str, report: Dict[str, Any]) -> None:
        self.samples.setdefault(scenario, {}).setdefault(client, []).append(report)


class Bench(WorkerBench):
    server: Server

    def __init__(self, args: argparse.Namespace, peer_python: Optional[Path],
                 server: Server, certs: Optional[Dict[str, str]]) -> None:
        super().__init__(args.plan, peer_python, server, certs)
        self.delay_ms: float = args.handshake_delay_ms

    def worker(self, client: str, mode: str, listener: str, **options: Any) -> Dict[str, Any]:
        """Run one worker against ``listener`` and attach the server-side counts."""
        options["url"] = self.server.url(listener)
        if listener.startswith("tls"):
            assert self.certs is not None
            options["cafile"] = self.certs["cafile"]
        argv = self.command(client) + [mode] + [f"{k}={v}" for k, v in options.items()]
        before = self.server.stats()[listener]
        done = self.launch(argv)
        after = self.server.stats()[listener]
        report = self.report_of(client, argv, done)
        report["connections_opened"] = after["connections"] - before["connections"]
        report["requests_served"] = after["requests"] - before["requests"]
        return report

    def scenarios(self) -> List[Tuple[str, str, str, Dict[str, Any], Tuple[str, ...]]]:
        """(name, mode, listener, options, clients) of every per-round measurement."""
        plan = self.plan
        tls = self.certs is not None
        everyone = tuple(self.clients)
        no_floor = tuple(c for c in self.clients if c != "floor")
        items: List[Tuple[str, str, str, Dict[str, Any], Tuple[str, ...]]] = [
            ("cold_http", "sync", "http", {"warmup": 0, "calls": plan["rss_calls"]}, everyone),
            ("sync_http", "sync", "http",
             {"warmup": plan["sync_warmup"], "calls": plan["sync_calls"]}, everyone),
        ]
        if tls:
            items.append(("sync_tls", "sync", "tls",
                          {"warmup": plan["sync_warmup"], "calls": plan["sync_calls"]},
                          everyone))
        items.append(("handshake", "sync", "tls_delay" if tls else "http_delay",
                      {"warmup": 0, "calls": plan["handshake_calls"]}, everyone))
        for concurrency in plan["async_concurrency"]:
            items.append((f"async_c{concurrency}", "async", "http",
                          {"calls": plan["async_calls"], "concurrency": concurrency},
                          no_floor))
        return items

    def run_rounds(self) -> None:
        rounds = self.plan["rounds"]
        for index in range(rounds):
            started = time.monotonic()
            for name, mode, listener, options, clients in self.scenarios():
                shift = index % len(clients)
                for client in clients[shift:] + clients[:shift]:
                    report = self.worker(client, mode, listener, **dict(options))
                    self.record(name, client, report)
            log(f"round {index + 1}/{rounds} done in {time.monotonic() - started:.1f}s")

    def import_times(self, repeats: int) -> Dict[str, Dict[str, Any]]:
        """Wall time of fresh processes that import each client, minus a bare interpreter."""
        ours_code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import spaps_client"
        commands = {
            "ours": [sys.executable, "-I", "-S", "-c", ours_code],
            "ours_bare": [sys.executable, "-I", "-S", "-c", "pass"],
            "floor": [sys.executable, "-I", "-S", "-c", "import http.client, json"],
        }
        if self.peer_python is not None:
            commands["peer"] = [str(self.peer_python), "-I", "-c", "import spaps_client"]
            commands["peer_bare"] = [str(self.peer_python), "-I", "-c", "pass"]
        names = list(commands)
        walls: Dict[str, List[float]] = {name: [] for name in names}
        for name in names:  # warm the file cache and write any missing bytecode
            subprocess.run(commands[name], check=True, timeout=60, cwd=tempfile.gettempdir())
        for index in range(repeats):
            shift = index % len(names)
            for name in names[shift:] + names[:shift]:
                walls[name].append(wall_time(commands[name]))
        medians = {name: statistics.median(values) for name, values in walls.items()}
        result: Dict[str, Dict[str, Any]] = {}
        for client, bare in (("ours", "ours_bare"), ("floor", "ours_bare"),
                             ("peer", "peer_bare")):
            if client in medians:
                result[client] = {
                    "import_s": medians[client] - medians[bare],
                    "process_s": medians[client],
                    "bare_s": medians[bare],
                    "samples_s": walls[client],
                    "bare_samples_s": walls[bare],
                }
        return result


def wall_time(command: List[str], env: Optional[Dict[str, str]] = None,
              stdout: Optional[int] = None, shown: Optional[str] = None) -> float:
    """Seconds from spawning ``command`` to reaping it.

    Not ``subprocess.run(timeout=...)``: its wait polls with growing sleeps, which rounds
    short processes up to tens of milliseconds. ``env`` and ``stdout`` go to ``Popen``;
    ``shown`` names the command in the error (default: the whole command line).
    """
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, cwd=tempfile.gettempdir(), stdout=stdout)
    if hasattr(os, "wait4"):
        _, status, _ = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    else:
        process.wait()
    elapsed = time.perf_counter() - started
    if process.returncode != 0:
        name = " ".join(command) if shown is None else shown
        raise RuntimeError(f"{name} exited with {process.returncode}")
    return elapsed


# --- the table ---


def median_of(samples: Dict[str, Dict[str, List[Dict[str, Any]]]], scenario: str,
              client: str, key: str) -> Optional[float]:
    values = [s[key] for s in samples.get(scenario, {}).get(client, []) if key in s]
    return statistics.median(values) if values else None


def meets(higher: bool, ratio: Optional[float], target: float) -> Optional[bool]:
    """Whether ``ratio`` reaches ``target`` (None: not measured)."""
    if ratio is None:
        return None
    return ratio >= target if higher else ratio <= target


def target_text(higher: bool, targets: Sequence[Tuple[str, Optional[float]]]) -> str:
    """``>= 3 peer, >= 0.6 floor``: a row's targets (None: no target), or ``-``."""
    sign = ">=" if higher else "<="
    parts = [f"{sign} {target:g} {name}" for name, target in targets if target is not None]
    return ", ".join(parts) or "-"


def verdict(checks: List[Tuple[str, Optional[bool]]]) -> str:
    """A row's result from its (target, met?) checks; None: not measured."""
    if not checks:
        return "-"
    failed = [name for name, ok in checks if ok is False]
    if failed:
        return "FAIL" + ("" if len(checks) == 1 else f" ({', '.join(failed)})")
    if any(ok is None for _, ok in checks):
        return "n/a" if all(ok is None for _, ok in checks) else "PASS (partial)"
    return "PASS"


class Row:
    def __init__(self, metric: str, unit: str, values: Dict[str, Optional[float]],
                 higher_is_better: bool, peer_target: Optional[float] = None,
                 floor_target: Optional[float] = None, note: str = "") -> None:
        self.metric = metric
        self.unit = unit
        self.values = values
        self.higher = higher_is_better
        self.peer_target = peer_target
        self.floor_target = floor_target
        self.note = note
        self.rounds: Dict[str, List[float]] = {}

    def ratio(self, other: str) -> Optional[float]:
        ours, theirs = self.values.get("ours"), self.values.get(other)
        if ours is None or theirs is None or theirs == 0:
            return None
        return ours / theirs

    def meets(self, ratio: Optional[float], target: float) -> Optional[bool]:
        return meets(self.higher, ratio, target)

    def target_text(self) -> str:
        return target_text(self.higher, (("peer", self.peer_target),
                                         ("floor", self.floor_target)))

    def outcome(self) -> str:
        checks = []
        if self.peer_target is not None:
            checks.append(("peer", self.meets(self.ratio("peer"), self.peer_target)))
        if self.floor_target is not None:
            checks.append(("floor", self.meets(self.ratio("floor"), self.floor_target)))
        return verdict(checks)

    def as_dict(self) -> Dict[str, Any]:
        return {
            "metric": self.metric, "unit": self.unit, "values": self.values,
            "ours_over_peer": self.ratio("peer"), "ours_over_floor": self.ratio("floor"),
            "higher_is_better": self.higher, "target": self.target_text(),
            "result": self.outcome(), "note": self.note, "per_round": self.rounds,
            "median_of_round_ratios": {
                other: self.round_ratio(other) for other in ("peer", "floor")
                if self.round_ratio(other) is not None
            },
        }

    def round_ratio(self, other: str) -> Optional[float]:
        """Median over rounds of ours / other within the same round: a cross-check."""
        ours, theirs = self.rounds.get("ours", []), self.rounds.get(other, [])
        pairs = [a / b for a, b in zip(ours, theirs) if b]
        return statistics.median(pairs) if pairs else None


def build_rows(bench: Bench, imports: Dict[str, Dict[str, Any]],
               notes: List[str]) -> List[Row]:
    samples = bench.samples
    plan = bench.plan
    clients = CLIENTS

    def per_client(scenario: str, key: str, scale: float = 1.0,
                   only: Tuple[str, ...] = clients) -> Dict[str, Optional[float]]:
        out: Dict[str, Optional[float]] = {}
        for client in only:
            value = median_of(samples, scenario, client, key)
            out[client] = None if value is None else value * scale
        return out

    def spread(scenario: str, key: str, scale: float = 1.0) -> Dict[str, List[float]]:
        """Every round's value, to judge the noise behind a median."""
        return {client: [s[key] * scale for s in runs if key in s]
                for client, runs in samples.get(scenario, {}).items()}

    mib = 1 / 1024
    rows = [
        Row("import time", "ms",
            {c: imports[c]["import_s"] * 1e3 if c in imports else None for c in clients},
            False, 0.10, note="fresh process minus bare interpreter; median"),
        Row("RSS after import", "MiB", per_client("cold_http", "rss_after_import_kib", mib),
            False, 0.60),
        Row(f"RSS after {plan['rss_calls']:,} calls", "MiB",
            per_client("cold_http", "rss_after_calls_kib", mib), False),
        Row("sync calls/s, HTTP", "calls/s", per_client("sync_http", "calls_per_s"),
            True, 3.0, 0.6),
        Row("p50 latency, sync HTTP", "us", per_client("sync_http", "p50_us"), False),
        Row("p99 latency, sync HTTP", "us", per_client("sync_http", "p99_us"), False, 0.5),
    ]
    if "sync_tls" in samples:
        rows += [
            Row("sync calls/s, TLS", "calls/s", per_client("sync_tls", "calls_per_s"),
                True, 3.0),
            Row("p50 latency, sync TLS", "us", per_client("sync_tls", "p50_us"), False),
            Row("p99 latency, sync TLS", "us", per_client("sync_tls", "p99_us"), False, 0.5),
        ]
    conns = {}
    for client in clients:
        value = median_of(samples, "cold_http", client, "connections_opened")
        conns[client] = None if value is None else value * 1000 / plan["rss_calls"]
    rows.append(Row(f"TCP connections per 1,000 calls ({plan['rss_calls']:,} sequential)",
                    "conns", conns, False, 1.0))
    rows.append(Row("first call of a fresh client, HTTP, no delay", "us",
                    per_client("cold_http", "first_call_us"), False,
                    note="connect + any imports and set-up deferred to the first call"))
    listener = "TLS" if "sync_tls" in samples else "HTTP"
    delay = bench.delay_ms
    rows += [
        Row(f"mean latency, {plan['handshake_calls']} calls, {delay:g} ms handshake ({listener})",
            "us", per_client("handshake", "mean_us"), False, 0.6),
        Row(f"first call on a new connection, {delay:g} ms handshake ({listener})", "us",
            per_client("handshake", "first_call_us"), False),
    ]
    for concurrency in plan["async_concurrency"]:
        rows.append(Row(f"async calls/s, concurrency {concurrency}", "calls/s",
                        per_client(f"async_c{concurrency}", "calls_per_s",
                                   only=("ours", "peer")),
                        True, 5.0 if concurrency == 50 else None))
    rows.append(Row("CPU time per call, sync HTTP", "us",
                    per_client("sync_http", "cpu_us_per_call"), False, 0.3))
    sources = {
        "RSS after import": ("cold_http", "rss_after_import_kib", mib),
        "sync calls/s, HTTP": ("sync_http", "calls_per_s", 1.0),
        "p99 latency, sync HTTP": ("sync_http", "p99_us", 1.0),
        "sync calls/s, TLS": ("sync_tls", "calls_per_s", 1.0),
        "p99 latency, sync TLS": ("sync_tls", "p99_us", 1.0),
        "async calls/s, concurrency 50": ("async_c50", "calls_per_s", 1.0),
        "CPU time per call, sync HTTP": ("sync_http", "cpu_us_per_call", 1.0),
    }
    for row in rows:
        if row.metric in sources:
            row.rounds = spread(*sources[row.metric])
        elif row.metric.startswith("mean latency"):
            row.rounds = spread("handshake", "mean_us")
    if "sync_tls" not in samples:
        notes.append("handshake row measured over plain HTTP (no TLS available)")
    return rows


def fmt_value(value: Optional[float], unit: str) -> str:
    if value is None:
        return "-"
    if unit == "calls/s":
        return f"{value:,.0f}"
    if unit == "conns":
        return f"{value:.2f}"
    if unit in ("MiB", "ms"):
        return f"{value:.1f}"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def fmt_ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


HEADER = ("metric", "ours", "peer", "floor", "ours/peer", "ours/floor", "target", "result")


def table_cells(rows: List[Row]) -> List[Tuple[str, ...]]:
    cells = []
    for row in rows:
        cells.append((
            f"{row.metric} [{row.unit}]",
            fmt_value(row.values.get("ours"), row.unit),
            fmt_value(row.values.get("peer"), row.unit),
            fmt_value(row.values.get("floor"), row.unit),
            fmt_ratio(row.ratio("peer")),
            fmt_ratio(row.ratio("floor")),
            row.target_text(),
            row.outcome(),
        ))
    return cells


def render_text(rows: List[Row]) -> str:
    cells = [HEADER, *table_cells(rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(HEADER))]

    def line(items: Tuple[str, ...]) -> str:
        first = items[0].ljust(widths[0])
        rest = [item.rjust(width) for item, width in zip(items[1:6], widths[1:6])]
        tail = [item.ljust(width) for item, width in zip(items[6:], widths[6:])]
        return "  ".join([first, *rest, *tail]).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(HEADER), rule, *(line(c) for c in cells[1:])])


def render_markdown(rows: List[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |",
             "| " + " | ".join(["---"] + ["---:"] * 5 + ["---", "---"]) + " |"]
    lines += ["| " + " | ".join(c) + " |" for c in table_cells(rows)]
    return "\n".join(lines)


# --- machine description ---


def machine() -> Dict[str, Any]:
    model = "unknown"
    try:
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.lower().startswith("model name"):
                model = text.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 0
    return {
        "nproc": usable,
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "openssl": __import__("ssl").OPENSSL_VERSION,
    }


def load_average() -> float:
    """The 1-minute load average (other work on the machine skews every figure)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return float("nan")


# --- main ---


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    plan = args.plan
    notes: List[str] = []
    started = time.monotonic()
    load_before = load_average()
    peer_python = None if args.no_peer else ensure_peer_venv(notes)
    if args.no_peer:
        notes.append("peer skipped: --no-peer")
    for note in notes:
        log(note)
    with tempfile.TemporaryDirectory(prefix="spaps-bench-") as tmp:
        certs = make_certificates(Path(tmp), notes)
        server = Server(certs, args.handshake_delay_ms)
        try:
            bench = Bench(args, peer_python, server, certs)
            log(f"import time: {plan['import_repeats']} fresh processes per client ...")
            imports = bench.import_times(plan["import_repeats"])
            log(f"{plan['rounds']} rounds of: {', '.join(s[0] for s in bench.scenarios())}")
            bench.run_rounds()
            served = server.stats()
        finally:
            server.stop()
    load_after = load_average()
    rows = build_rows(bench, imports, notes)
    info = machine()
    when = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    peer_versions = {s.get("peer_version") for c in bench.samples.values()
                     for s in c.get("peer", [])}
    header = (
        f"spaps benchmark, {when.isoformat()}; {info['nproc']} CPUs ({info['cpu_model']}); "
        f"Python {info['python']}; peer: "
        + (f"spaps {', '.join(sorted(v for v in peer_versions if v))}" if peer_python
           else "not run")
        + f"; {plan['rounds']} rounds, medians; {time.monotonic() - started:.0f}s"
        + f"; load average {load_before:.2f} before, {load_after:.2f} after"
    )
    text = render_text(rows)
    print(header)
    print()
    print(text)
    if notes:
        print()
        for note in notes:
            print(f"note: {note}")
    document = {
        "date": when.isoformat(),
        "machine": info,
        "command": " ".join(["python", "benchmarks/run.py", *(argv or sys.argv[1:])]),
        "plan": plan,
        "handshake_delay_ms": args.handshake_delay_ms,
        "peer": {"requirement": PEER_REQUIREMENT, "python": str(peer_python or "")},
        "tls": certs is not None,
        "load_average": {"before": load_before, "after": load_after},
        "notes": notes,
        "rows": [row.as_dict() for row in rows],
        "import": imports,
        "samples": bench.samples,
        "server_totals": served,
        "duration_s": time.monotonic() - started,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2) + "\n")
    args.json.with_suffix(".md").write_text(
        header + "\n\n" + render_markdown(rows) + "\n"
        + "".join(f"\nnote: {note}\n" for note in notes)
    )
    log(f"results written to {args.json}")
    failed = [row.metric for row in rows if row.outcome().startswith("FAIL")]
    return 1 if args.check and failed else 0


if __name__ == "__main__":
    sys.exit(main())
