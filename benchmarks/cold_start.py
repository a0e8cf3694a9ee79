"""Cold start: a fresh process that imports a client, builds it and makes one call.

    python benchmarks/cold_start.py [--runs 21]          # step by step, over HTTP
    python benchmarks/cold_start.py --tls [--runs 21] [--source-runs 11]

Both need the ``benchmarks/.peer-venv`` a ``benchmarks/run.py`` run made (without it the
peer is skipped).

**Step by step** (the default): each run is a fresh process (ours: ``python -I -S``, no
site-packages; the peer: the venv's interpreter) that times the three steps with
``perf_counter`` against ``benchmarks/server.py`` over loopback HTTP. Ours and the peer
alternate; medians are printed with the ours/peer ratio of the sum. This is what a Lambda
pays when it builds its client during initialisation.

**Over TLS, spawn to exit** (``--tls``; also run by ``benchmarks/remote.py``): the whole
process, from spawning it to reaping it, minus the same interpreter running ``-c pass`` with
the same flags: import, ``SpapsClient(...)``, one HTTPS call to a local listener with no delay
(``benchmarks/remote_server.py``), close, interpreter exit. The certificate store is found
the default way: ``SSL_CERT_DIR`` points at a hashed certificate directory holding the
system's certificates and the benchmark CA, as ``/etc/ssl/certs`` is on Debian and Ubuntu.
Ours (OpenSSL's default paths) and the peer (httpx 0.28 reads ``SSL_CERT_DIR`` when
``verify=True``, the default, instead of certifi's bundle) both trust it. ``--trust bundle``
instead appends the benchmark CA to a copy of the system bundle and sets ``SSL_CERT_FILE``,
so that both load a whole trust store first. Variants:

``ours``, ``peer``, ``floor`` (``http.client`` + ``ssl`` + ``json``)
    with bytecode: ours' ``__pycache__`` in the repository, the peer's pip-installed one.
``ours-source``, ``peer-source``
    without bytecode for the client's own code: ``-B`` (write none) and a copy made for this
    run in a temporary directory with no ``__pycache__`` (ours: ``spaps_client.py``; the
    peer: its whole site-packages, httpx and pydantic included, without pip and setuptools,
    run with ``-S`` and the copy on ``sys.path``), so every run compiles it. The standard
    library keeps its installed bytecode, as it would on a real machine.

Every variant and its bare interpreter take turns in each repetition, the order rotating.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEER_PYTHON = HERE / ".peer-venv" / "bin" / "python"
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
import run  # noqa: E402  (spawn-to-exit timing and the certificates, as run.py makes them)

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

# One HTTPS call from a fresh process, the trust store found the default way.
TLS_PROGRAM = """
import sys
{path_setup}
from spaps_client import SpapsClient
client = SpapsClient(base_url="https://localhost:{port}", api_key="bench_api_key")
client.set_tokens(access_token="bench_access_token")
session = client.sessions.get_current_session()
client.close()
if session.session_id != "sess_123":
    raise SystemExit("unexpected answer")
"""

TLS_FLOOR_PROGRAM = """
import http.client, json, ssl
conn = http.client.HTTPSConnection("localhost", {port}, context=ssl.create_default_context())
conn.request("GET", "/api/sessions/current", headers={{
    "X-API-Key": "bench_api_key", "Authorization": "Bearer bench_access_token"}})
body = conn.getresponse().read()
conn.close()
if json.loads(body)["data"]["session"]["id"] != "sess_123":
    raise SystemExit("unexpected answer")
"""

# not needed to import the peer (and slow to copy)
PEER_COPY_SKIP = ("pip", "setuptools", "pkg_resources", "_distutils_hack")


def step_by_step(runs: int) -> int:
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
        for _ in range(runs):
            for name, command in commands.items():
                done = subprocess.run(command, check=True, capture_output=True, text=True,
                                      timeout=60)
                samples[name].append([float(part) for part in done.stdout.split()])
    finally:
        server.terminate()
    totals: Dict[str, float] = {}
    print(f"{'client':<6} {'import':>9} {'build':>9} {'1st call':>9} {'sum':>9}   (ms, medians "
          f"of {runs})")
    for name, rows in samples.items():
        steps = [statistics.median(row[i] for row in rows) for i in range(3)]
        totals[name] = statistics.median(sum(row) for row in rows)
        print(f"{name:<6} {steps[0]:9.1f} {steps[1]:9.1f} {steps[2]:9.1f} {totals[name]:9.1f}")
    if "peer" in totals:
        print(f"ours/peer, whole cold start: {totals['ours'] / totals['peer']:.3f}")
    return 0


# --- over TLS, spawn to exit ---


def spawn_wall(command: List[str], env: Dict[str, str]) -> float:
    """Seconds from spawning ``command`` to reaping it (``os.wait4``, no polling)."""
    return run.wall_time(command, env=env, stdout=subprocess.DEVNULL,
                         shown=f"{' '.join(command[:4])} ...")


def trust_bundle(cafile: str, directory: Path) -> Dict[str, Any]:
    """The system CA bundle with the benchmark CA appended, for ``SSL_CERT_FILE``."""
    paths = ssl.get_default_verify_paths()
    system = next((path for path in (paths.cafile, paths.openssl_cafile)
                   if path and os.path.isfile(path)), None)
    text = Path(system).read_text() if system else ""
    bundle = directory / "trust-bundle.pem"
    bundle.write_text(text.rstrip("\n") + "\n" + Path(cafile).read_text())
    return {"path": str(bundle), "system_bundle": system,
            "certificates": bundle.read_text().count("BEGIN CERTIFICATE")}


def trust_directory(cafile: str, directory: Path) -> Dict[str, Any]:
    """A hashed CA directory (the system's certificates and the benchmark CA), for
    ``SSL_CERT_DIR``."""
    system = ssl.get_default_verify_paths().capath
    store = directory / "trust-dir"
    store.mkdir()
    count = 0
    if system and os.path.isdir(system):
        for entry in os.scandir(system):
            name = entry.name
            if len(name) >= 10 and name[8] == "." and name[9:].isdigit():
                os.symlink(os.path.realpath(entry.path), store / name)
                count += 1
    subject_hash = subprocess.run(["openssl", "x509", "-hash", "-noout", "-in", cafile],
                                  capture_output=True, text=True, check=True).stdout.strip()
    index = 0
    while (store / f"{subject_hash}.{index}").exists():
        index += 1
    shutil.copy(cafile, store / f"{subject_hash}.{index}")
    return {"path": str(store), "system_directory": system, "certificates": count + 1}


def copy_peer_site_packages(peer_python: Path, target: Path) -> Path:
    """The peer venv's site-packages without bytecode (nor pip and setuptools)."""
    done = subprocess.run([str(peer_python), "-I", "-c",
                           "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True, timeout=60)
    source = Path(done.stdout.strip())

    def ignore(directory: str, names: List[str]) -> List[str]:
        skipped = [name for name in names if name == "__pycache__" or name.endswith(".pyc")]
        if Path(directory) == source:
            skipped += [name for name in names
                        if name.startswith(PEER_COPY_SKIP) or name.endswith(".pth")]
        return skipped

    shutil.copytree(source, target, ignore=ignore)
    return target


def has_bytecode(directory: Path) -> bool:
    return any(directory.rglob("__pycache__")) or any(directory.rglob("*.pyc"))


def tls_cold_start(peer_python: Optional[Path], port: int, cafile: str, runs: int,
                   source_runs: int, log: Callable[[str], None] = print,
                   trust: str = "directory") -> Dict[str, Any]:
    """Spawn-to-exit cold starts with one TLS call; see the module docstring."""
    with tempfile.TemporaryDirectory(prefix="spaps-cold-") as tmp:
        directory = Path(tmp)
        env = {key: value for key, value in os.environ.items()
               if key not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
        if trust == "bundle":
            bundle = trust_bundle(cafile, directory)
            env["SSL_CERT_FILE"] = bundle["path"]
        else:
            bundle = trust_directory(cafile, directory)
            env["SSL_CERT_DIR"] = bundle["path"]
        env.pop("PYTHONDONTWRITEBYTECODE", None)  # -B says it where wanted
        ours_source = directory / "ours-source"
        ours_source.mkdir()
        shutil.copy2(ROOT / "spaps_client.py", ours_source / "spaps_client.py")
        python = sys.executable

        def program(path: Optional[Path]) -> str:
            setup = f"sys.path.insert(0, {str(path)!r})" if path else ""
            return TLS_PROGRAM.format(path_setup=setup, port=port)

        with_bytecode: Dict[str, List[str]] = {
            "ours": [python, "-I", "-S", "-c", program(ROOT)],
            "floor": [python, "-I", "-S", "-c", TLS_FLOOR_PROGRAM.format(port=port)],
            "bare": [python, "-I", "-S", "-c", "pass"],
        }
        without_bytecode: Dict[str, List[str]] = {
            "ours": [python, "-I", "-S", "-B", "-c", program(ours_source)],
            "bare": [python, "-I", "-S", "-B", "-c", "pass"],
        }
        bares = {"ours": "bare", "floor": "bare"}
        peer_source = None
        if peer_python is not None:
            with_bytecode["peer"] = [str(peer_python), "-I", "-c", program(None)]
            with_bytecode["peer_bare"] = [str(peer_python), "-I", "-c", "pass"]
            peer_source = copy_peer_site_packages(peer_python, directory / "peer-source")
            without_bytecode["peer"] = [str(peer_python), "-I", "-S", "-B", "-c",
                                        program(peer_source)]
            without_bytecode["peer_bare"] = [str(peer_python), "-I", "-S", "-B", "-c", "pass"]
            bares["peer"] = "peer_bare"
        result: Dict[str, Any] = {"trust_bundle": bundle, "port": port}
        for label, commands, repeats in (("with_bytecode", with_bytecode, runs),
                                         ("without_bytecode", without_bytecode, source_runs)):
            log(f"cold start over TLS, {label.replace('_', ' ')}: {repeats} runs of "
                f"{', '.join(commands)}")
            names = list(commands)
            walls: Dict[str, List[float]] = {name: [] for name in names}
            for name in names:  # warm the file cache (and, with bytecode, write it)
                spawn_wall(commands[name], env)
            for index in range(repeats):
                shift = index % len(names)
                for name in names[shift:] + names[:shift]:
                    if label == "without_bytecode" and has_bytecode(ours_source):
                        raise RuntimeError("bytecode appeared in the ours-source copy")
                    walls[name].append(spawn_wall(commands[name], env))
            medians = {name: statistics.median(values) for name, values in walls.items()}
            result[label] = {
                client: {
                    "cold_ms": (medians[client] - medians[bare]) * 1e3,
                    "process_ms": medians[client] * 1e3,
                    "bare_ms": medians[bare] * 1e3,
                    "samples_ms": [value * 1e3 for value in walls[client]],
                    "bare_samples_ms": [value * 1e3 for value in walls[bare]],
                }
                for client, bare in bares.items() if client in commands
            }
        if peer_source is not None and has_bytecode(peer_source):
            raise RuntimeError("bytecode appeared in the peer-source copy")
    return result


def tls_main(runs: int, source_runs: int, trust: str = "directory") -> int:
    notes: List[str] = []
    with tempfile.TemporaryDirectory(prefix="spaps-cold-certs-") as tmp:
        certs = run.make_certificates(Path(tmp), notes)
        if certs is None:
            print("; ".join(notes))
            return 1
        server = subprocess.Popen(
            [sys.executable, "-I", "-S", str(HERE / "remote_server.py"),
             "--cert", certs["cert"], "--key", certs["key"]],
            stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None
            port = json.loads(server.stdout.readline())["ports"]["local"]
            peer = PEER_PYTHON if PEER_PYTHON.exists() else None
            if peer is None:
                print("peer skipped: run benchmarks/run.py once to create benchmarks/.peer-venv")
            result = tls_cold_start(peer, port, certs["cafile"], runs, source_runs,
                                    log=lambda text: print(text, file=sys.stderr), trust=trust)
        finally:
            server.terminate()
            server.wait()
    print(f"cold start with one TLS call, spawn to exit minus a bare interpreter (ms, "
          f"medians; trust store: {result['trust_bundle']['certificates']} certificates)")
    print(f"{'':<18} {'ours':>8} {'peer':>8} {'floor':>8} {'ours/peer':>10}")
    for label in ("with_bytecode", "without_bytecode"):
        row = result[label]
        values = [row.get(name, {}).get("cold_ms") for name in ("ours", "peer", "floor")]
        cells = ["-" if value is None else f"{value:.1f}" for value in values]
        ratio = "-" if values[1] is None else f"{values[0] / values[1]:.3f}"
        print(f"{label.replace('_', ' '):<18} {cells[0]:>8} {cells[1]:>8} {cells[2]:>8} "
              f"{ratio:>10}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument("--tls", action="store_true",
                        help="spawn-to-exit cold start with one TLS call, with and without "
                             "bytecode")
    parser.add_argument("--source-runs", type=int, default=11,
                        help="runs without bytecode (--tls; default 11)")
    parser.add_argument("--trust", choices=("directory", "bundle"), default="directory",
                        help="--tls: the trust store as a hashed directory (SSL_CERT_DIR, "
                             "the default) or one bundle file (SSL_CERT_FILE)")
    args = parser.parse_args()
    if args.tls:
        return tls_main(args.runs, args.source_runs, args.trust)
    return step_by_step(args.runs)


if __name__ == "__main__":
    raise SystemExit(main())
