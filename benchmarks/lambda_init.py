"""Lambda cold-start cost: the init phase of a handler that creates a client at module level.

One command (from the repository root, as root: it needs a private mount namespace)::

    python benchmarks/lambda_init.py            # 15 rounds, about a minute
    python benchmarks/lambda_init.py --quick    # 5 rounds
    python benchmarks/lambda_init.py --no-peer  # offline: ours only

Every run starts the real runtime interface client, ``python -m awslambdaric
handler.handler`` (from the ``dev`` extra), in the sandbox of ``tests/lambda_sandbox.py``:
the layer at ``/opt``, the handler at ``/var/task``, everything read-only except ``/tmp``, as
on Lambda. Its init phase is timed as Lambda times "Init Duration": from the exec of the
interpreter to the runtime's first ``GET /2018-06-01/runtime/invocation/next`` on the
Runtime API stand-in. Each run then serves one invocation (the handler reports which module
it imported, to check the run) and is stopped.

Variants, all on the interpreter running this script:

``empty``
    a handler that imports nothing (the baseline: interpreter and awslambdaric start-up).
``ours``
    ``import spaps_client`` plus one module-level ``SessionsClient``, with the layer that
    ``python scripts/build_layer.py`` (the documented default) builds: bytecode shipped.
``ours-source``
    the same handler with ``--source-only`` (the layer before bytecode was shipped), so the
    module is compiled at every cold start: what the bytecode saves.
``peer``
    the same handler with the reference client ``spaps==0.1.2`` (httpx + pydantic),
    pip-installed with bytecode into ``benchmarks/.peer-venv`` (created as
    ``benchmarks/run.py`` does), whose site-packages is the layer's ``/opt/python``.

Within each round the variants take turns and the order rotates from round to round;
"init overhead" is the median over rounds of (variant - empty of the same round). The target
is ours <= 0.15 x the peer's overhead. The handlers also time their own module body (import
plus client, ``perf_counter`` inside the runtime): the same cost without the jitter of
process start-up, reported as a second column. Results go to ``benchmarks/results/lambda_init.json``
(git-ignored); ``--check`` exits 1 when the target is missed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(HERE))
import lambda_sandbox  # noqa: E402

TARGET = 0.15
RESULTS = HERE / "results" / "lambda_init.json"

# Both handlers time their own module body (the import and the client) with perf_counter:
# a second, less noisy view of the same cost, free of process start-up jitter.
EMPTY_HANDLER = '''\
import time

_started = time.perf_counter()
_import_ms = (time.perf_counter() - _started) * 1000


def handler(event, context):
    return {"import_ms": _import_ms}
'''
CLIENT_HANDLER = '''\
import time

_started = time.perf_counter()
import spaps_client

sessions = spaps_client.SessionsClient(base_url="http://127.0.0.1:9", api_key="bench-key",
                                       access_token="bench-token")
_import_ms = (time.perf_counter() - _started) * 1000


def handler(event, context):
    return {"module": spaps_client.__file__, "import_ms": _import_ms,
            "version": getattr(spaps_client, "__version__", "?")}
'''


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_layer(outdir: Path, *options: str) -> Path:
    """Build and unpack a layer; return the directory to mount at /opt."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "build_layer.py"), "--outdir",
         str(outdir / "dist"), *options], capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    if done.returncode != 0:
        raise SystemExit(f"lambda_init: the layer build failed:\n{done.stderr}")
    zip_path = done.stdout.split()[1]
    opt = outdir / ("opt" + "".join(options).replace("-", "_"))
    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(opt)
    return opt


def peer_layer(outdir: Path, notes: List[str]) -> Optional[Path]:
    """An /opt whose python/ is the peer venv's site-packages (bytecode as pip wrote it)."""
    import run  # benchmarks/run.py: the same venv the main benchmark uses

    python = run.ensure_peer_venv(notes)
    if python is None:
        return None
    probe = ("import sys, sysconfig; "
             "print(sys.version_info[0], sys.version_info[1], sysconfig.get_paths()['purelib'])")
    done = subprocess.run([str(python), "-I", "-c", probe], capture_output=True, text=True,
                          timeout=60, check=True)
    major, minor, purelib = done.stdout.split(maxsplit=2)
    if (int(major), int(minor)) != sys.version_info[:2]:
        notes.append(f"peer skipped: its venv is Python {major}.{minor}, not ours")
        return None
    purelib = purelib.strip()
    if not list(Path(purelib, "spaps_client").glob("__pycache__/*.pyc")):
        notes.append("peer skipped: its venv carries no bytecode")
        return None
    opt = outdir / "opt_peer"
    opt.mkdir()
    (opt / "python").symlink_to(purelib, target_is_directory=True)
    return opt


def one_run(opt: Path, task: Path) -> Dict[str, Any]:
    api = lambda_sandbox.RuntimeApi().start()
    runtime = None
    try:
        request_id = api.invoke({})
        runtime = lambda_sandbox.start_runtime(str(opt), str(task),
                                               lambda_sandbox.runtime_env(api.address))
        kind, body = api.wait_result(request_id, timeout=60, process=runtime.process)
        if kind != "response" or api.init_errors:
            raise SystemExit(f"lambda_init: the run failed: {body}\n{runtime.output()[-3000:]}")
        assert api.first_next_ns is not None
        return {"init_ms": (api.first_next_ns - runtime.exec_ns) / 1e6, "answer": body}
    finally:
        if runtime is not None:
            runtime.stop()
        api.stop()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/lambda_init.py",
                                     description="Lambda init overhead: ours vs the reference.")
    parser.add_argument("--rounds", type=int, help="rounds of alternating runs (15; quick 5)")
    parser.add_argument("--quick", action="store_true", help="5 rounds")
    parser.add_argument("--no-peer", action="store_true", help="skip the reference client")
    parser.add_argument("--json", type=Path, default=RESULTS, help="where to write results")
    parser.add_argument("--check", action="store_true", help="exit 1 when the target is missed")
    args = parser.parse_args(argv)
    rounds = args.rounds or (5 if args.quick else 15)

    reason = lambda_sandbox.sandbox_unavailable()
    if reason:
        raise SystemExit(f"lambda_init: cannot build the read-only sandbox: {reason}")
    if importlib.util.find_spec("awslambdaric") is None:
        raise SystemExit("lambda_init: awslambdaric is not installed (pip install -e '.[dev]')")

    notes: List[str] = []
    scratch = Path(tempfile.mkdtemp(prefix="spaps-lambda-bench-"))
    try:
        empty_task, client_task = scratch / "task_empty", scratch / "task_client"
        for task, text in ((empty_task, EMPTY_HANDLER), (client_task, CLIENT_HANDLER)):
            task.mkdir()
            (task / "handler.py").write_text(text)
        ours_opt = build_layer(scratch)
        variants = {
            "empty": (ours_opt, empty_task),
            "ours": (ours_opt, client_task),
            "ours-source": (build_layer(scratch, "--source-only"), client_task),
        }
        if not args.no_peer:
            peer_opt = peer_layer(scratch, notes)
            if peer_opt is not None:
                variants["peer"] = (peer_opt, client_task)
        names = list(variants)
        samples: Dict[str, List[float]] = {name: [] for name in names}
        in_process: Dict[str, List[float]] = {name: [] for name in names}
        answers: Dict[str, Any] = {}
        one_run(*variants["empty"])  # warm the page cache; not recorded
        for index in range(rounds):
            shift = index % len(names)
            for name in names[shift:] + names[:shift]:
                result = one_run(*variants[name])
                samples[name].append(result["init_ms"])
                in_process[name].append(result["answer"]["import_ms"])
                answers[name] = result["answer"]
            log(f"round {index + 1}/{rounds}: " + ", ".join(
                f"{name} {samples[name][-1]:.1f} ms" for name in names))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    for name in ("ours", "ours-source"):
        if answers[name].get("module") != "/opt/python/spaps_client.py":
            raise SystemExit(f"lambda_init: {name} imported {answers[name]}")
    if "peer" in answers and answers["peer"].get("version") != "0.1.2":
        raise SystemExit(f"lambda_init: the peer imported {answers['peer']}")

    def overhead(name: str) -> float:
        return statistics.median(v - e for v, e in zip(samples[name], samples["empty"]))

    table = {name: {"init_ms_median": statistics.median(samples[name]),
                    "overhead_ms_median": overhead(name) if name != "empty" else 0.0,
                    "module_body_ms_median": statistics.median(in_process[name])}
             for name in names}
    ratio = (table["ours"]["overhead_ms_median"] / table["peer"]["overhead_ms_median"]
             if "peer" in table and table["peer"]["overhead_ms_median"] > 0 else None)
    met = None if ratio is None else ratio <= TARGET

    python = f"{platform.python_implementation()} {platform.python_version()}"
    lines = [f"Lambda init under awslambdaric, read-only FS, {python}, {rounds} rounds "
             "(medians)", "",
             "| handler's layer | init | overhead over an empty handler | handler module body |",
             "| --- | --- | --- | --- |"]
    labels = {"empty": "empty handler (baseline)",
              "ours": "spaps_client, `build_layer.py` default (bytecode)",
              "ours-source": "spaps_client, `--source-only` (no bytecode)",
              "peer": "reference `spaps==0.1.2`, pip-installed with bytecode"}
    for name in names:
        row = table[name]
        lines.append(f"| {labels[name]} | {row['init_ms_median']:.1f} ms | "
                     f"{row['overhead_ms_median']:.1f} ms | "
                     f"{row['module_body_ms_median']:.1f} ms |")
    lines.append("")
    if ratio is not None:
        lines.append(f"ours / reference overhead: {ratio:.3f} (target <= {TARGET}: "
                     f"{'met' if met else 'MISSED'})")
    for note in notes:
        lines.append(f"note: {note}")
    print("\n".join(lines))

    document = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": python, "machine": platform.machine(), "cpus": os.cpu_count(),
        "rounds": rounds, "target": TARGET, "ratio": ratio, "met": met,
        "table": table, "samples_ms": samples, "module_body_samples_ms": in_process,
        "notes": notes,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 1 if args.check and met is False else 0


if __name__ == "__main__":
    sys.exit(main())
