"""One benchmark measurement in a fresh process; prints one JSON line on stdout.

Started by ``benchmarks/run.py``; ``benchmarks/remote_worker.py`` imports its helpers (it
imports nothing but ``sys`` and ``time`` before the client). Usage::

    python -I -S benchmarks/worker.py CLIENT MODE key=value ...       # ours, floor
    .peer-venv/bin/python -I benchmarks/worker.py peer MODE key=value ...

CLIENT is ``ours`` (this repository's stdlib-only ``spaps_client``; the repository root
is put on ``sys.path`` here, and nothing else is importable under ``-I -S``), ``peer``
(the reference ``spaps`` 0.1.2 installed in the peer venv; the repository root is NOT
on ``sys.path``), or ``floor`` (a bare ``http.client`` keep-alive loop sending the same
request and decoding the body with ``json.loads``).

MODE is one of:

``sync``   import the client, build one long-lived client, make ``warmup`` untimed calls
           and then ``calls`` timed sequential calls; report RSS after import and after the
           calls, calls/s, per-call latency percentiles and CPU time per call.
``async``  ``concurrency`` tasks share one async client and make ``calls`` calls in all
           (after one untimed warm-up call per task); report calls/s.

Options: ``url`` (base URL), ``cafile`` (CA bundle for https), ``warmup``, ``calls``,
``concurrency``.

The worker imports as little as possible before the client so that "RSS after import"
and the import time it reports belong to the client, not to the harness.
"""

import sys
import time

API_KEY = "bench_api_key"
ACCESS_TOKEN = "bench_access_token"
PATH = "/api/sessions/current"
EXPECTED_SESSION = "sess_123"


def rss_kib() -> int:
    """Resident set size of this process in KiB (``VmRSS`` of /proc/self/status)."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource  # fallback only (peak RSS, not current)

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


OPTIONS = {"url": "", "cafile": "", "warmup": "0", "calls": "1000", "concurrency": "1"}


def parse_args(argv, defaults=OPTIONS, prog="worker.py"):
    """``CLIENT MODE key=value ...``: (client, mode, ``defaults`` updated with the options)."""
    client, mode = argv[0], argv[1]
    options = dict(defaults)
    for item in argv[2:]:
        key, _, value = item.partition("=")
        if key not in options:
            raise SystemExit(f"{prog}: unknown option {key!r}")
        options[key] = value
    return client, mode, options


# --- the three clients, each behind the same two small factories ---


def import_client(client, prog="worker.py"):
    """Import what ``client`` needs; return the module (the floor: ``(http.client, json)``)."""
    if client == "ours":
        import os  # already loaded by the interpreter at start-up: costs nothing

        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        import spaps_client

        return spaps_client
    if client == "peer":
        import spaps_client

        return spaps_client
    if client == "floor":
        import http.client
        import json

        return (http.client, json)
    raise SystemExit(f"{prog}: unknown client {client!r}")


def tls_context(cafile):
    """The same verifying context for every client: the benchmark's CA, or none for HTTP."""
    if not cafile:
        return None
    import ssl

    return ssl.create_default_context(cafile=cafile)


def make_sync(client, module, url, cafile):
    """A zero-argument function making one call, and a function closing the client."""
    if client == "ours":
        sessions = module.SessionsClient(
            base_url=url, api_key=API_KEY, access_token=ACCESS_TOKEN,
            ssl_context=tls_context(cafile),
        )
        return sessions.get_current_session, sessions.close
    if client == "peer":
        http_client = None
        if cafile:
            import httpx

            # verify= gets a context built from the CA path exactly as ours and the floor do
            http_client = httpx.Client(base_url=url, verify=tls_context(cafile), timeout=10.0)
        sessions = module.SessionsClient(
            base_url=url, api_key=API_KEY, access_token=ACCESS_TOKEN, client=http_client
        )

        def close():
            sessions.close()
            if http_client is not None:
                http_client.close()

        return sessions.get_current_session, close
    return make_floor(module, url, cafile)


def make_floor(module, url, cafile):
    """The floor: one ``http.client`` connection, the same headers, ``json.loads``."""
    http_client, json = module
    scheme, _, rest = url.partition("://")
    host, _, port = rest.partition("/")[0].rpartition(":")
    if scheme == "https":
        conn = http_client.HTTPSConnection(host, int(port), timeout=10.0,
                                           context=tls_context(cafile))
    else:
        conn = http_client.HTTPConnection(host, int(port), timeout=10.0)
    return floor_call(conn, json), conn.close


def floor_call(conn, json):
    """One GET of the session over ``conn`` (an ``http.client`` connection), decoded."""
    headers = {"X-API-Key": API_KEY, "Authorization": "Bearer " + ACCESS_TOKEN}
    loads = json.loads

    def call():
        conn.request("GET", PATH, headers=headers)
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"floor: HTTP {response.status}")
        return loads(body)["data"]["session"]

    return call


def session_id(result):
    if isinstance(result, dict):
        return result.get("id")
    return getattr(result, "session_id", None)


def make_async(client, module, url, cafile):
    """An async factory: returns (coroutine function making one call, async close)."""
    if client == "ours":
        sessions = module.AsyncSessionsClient(
            base_url=url, api_key=API_KEY, access_token=ACCESS_TOKEN,
            ssl_context=tls_context(cafile),
        )
        return sessions.get_current_session, sessions.aclose
    if client == "peer":
        http_client = None
        if cafile:
            import httpx

            http_client = httpx.AsyncClient(base_url=url, verify=tls_context(cafile),
                                            timeout=10.0)
        sessions = module.AsyncSessionsClient(
            base_url=url, api_key=API_KEY, access_token=ACCESS_TOKEN, client=http_client
        )

        async def close():
            await sessions.aclose()
            if http_client is not None:
                await http_client.aclose()

        return sessions.get_current_session, close
    raise SystemExit("worker.py: the floor has no async mode")


# --- modes ---


def percentile(sorted_values, fraction):
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


def run_sync_warm(client, module, options, report):
    """``warmup`` untimed calls, then ``calls`` timed calls on the same long-lived client."""
    call, close = make_sync(client, module, options["url"], options["cafile"])
    warmup, calls = int(options["warmup"]), int(options["calls"])
    first = call()
    if session_id(first) != EXPECTED_SESSION:
        raise SystemExit(f"worker.py: unexpected answer {first!r}")
    for _ in range(warmup - 1):
        call()
    perf_ns = time.perf_counter_ns
    latencies = [0] * calls
    cpu_start = time.process_time()
    start = before = perf_ns()
    for index in range(calls):
        call()
        now = perf_ns()
        latencies[index] = now - before
        before = now
    elapsed_ns = perf_ns() - start
    cpu = time.process_time() - cpu_start
    report["rss_after_calls_kib"] = rss_kib()
    close()
    return latencies, elapsed_ns, cpu


def run_sync_mode(client, module, options, report):
    calls = int(options["calls"])
    if int(options["warmup"]) > 0:
        latencies, elapsed_ns, cpu = run_sync_warm(client, module, options, report)
    else:  # time the very first call too: it opens the connection (and pays any handshake)
        latencies, elapsed_ns, cpu = run_sync_cold(client, module, options, report)
    ordered = sorted(latencies)
    report.update(
        calls=calls,
        elapsed_s=elapsed_ns / 1e9,
        calls_per_s=calls / (elapsed_ns / 1e9),
        mean_us=elapsed_ns / calls / 1e3,
        p50_us=percentile(ordered, 0.50) / 1e3,
        p99_us=percentile(ordered, 0.99) / 1e3,
        max_us=ordered[-1] / 1e3,
        cpu_us_per_call=cpu / calls * 1e6,
    )


def timed_calls(call, latencies, before):
    """As many sequential calls as ``latencies`` holds, each one's nanoseconds stored in it
    (the first counted from ``before``, a ``perf_counter_ns``); returns the first answer and
    the ``perf_counter_ns`` at which the last call ended."""
    perf_ns = time.perf_counter_ns
    first = None
    for index in range(len(latencies)):
        result = call()
        now = perf_ns()
        latencies[index] = now - before
        before = now
        if first is None:
            first = result
    return first, before


def run_sync_cold(client, module, options, report):
    """``calls`` timed calls on a fresh client, the first of which opens the connection."""
    call, close = make_sync(client, module, options["url"], options["cafile"])
    calls = int(options["calls"])
    perf_ns = time.perf_counter_ns
    latencies = [0] * calls
    cpu_start = time.process_time()
    start = perf_ns()
    first, _ = timed_calls(call, latencies, start)
    elapsed_ns = perf_ns() - start
    cpu = time.process_time() - cpu_start
    if session_id(first) != EXPECTED_SESSION:
        raise SystemExit(f"worker.py: unexpected answer {first!r}")
    report["first_call_us"] = latencies[0] / 1e3
    report["rss_after_calls_kib"] = rss_kib()
    close()
    return latencies, elapsed_ns, cpu


def run_async_mode(client, module, options, report):
    import asyncio

    calls = int(options["calls"])
    concurrency = max(1, int(options["concurrency"]))

    async def main():
        call, close = make_async(client, module, options["url"], options["cafile"])
        try:
            warm = await asyncio.gather(*(call() for _ in range(concurrency)))
            if session_id(warm[0]) != EXPECTED_SESSION:
                raise SystemExit(f"worker.py: unexpected answer {warm[0]!r}")
            shares = [calls // concurrency + (1 if i < calls % concurrency else 0)
                      for i in range(concurrency)]

            async def task(count):
                for _ in range(count):
                    await call()

            cpu_start = time.process_time()
            start = time.perf_counter()
            await asyncio.gather(*(task(count) for count in shares))
            elapsed = time.perf_counter() - start
            cpu = time.process_time() - cpu_start
        finally:
            await close()
        return elapsed, cpu

    elapsed, cpu = asyncio.run(main())
    report.update(
        calls=calls,
        concurrency=concurrency,
        elapsed_s=elapsed,
        calls_per_s=calls / elapsed,
        cpu_us_per_call=cpu / calls * 1e6,
        rss_after_calls_kib=rss_kib(),
    )


def describe_client(client, module, report):
    """Ours and the floor: which third-party packages were importable (none, under -I -S);
    the peer: its version."""
    if client in ("ours", "floor"):
        import importlib.util

        report["third_party_importable"] = [
            name for name in ("httpx", "pydantic", "anyio", "h11", "certifi")
            if importlib.util.find_spec(name) is not None
        ]
    if client == "peer":
        report["peer_version"] = getattr(module, "__version__", "?")


def emit(report):
    """The worker's answer: ``report`` as one JSON line on stdout; the exit status."""
    import json

    sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()
    return 0


def main(argv):
    client, mode, options = parse_args(argv)
    rss_start = rss_kib()
    t0 = time.perf_counter()
    module = import_client(client)
    import_s = time.perf_counter() - t0
    rss_import = rss_kib()
    report = {
        "client": client,
        "mode": mode,
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "rss_start_kib": rss_start,
        "rss_after_import_kib": rss_import,
        "import_in_process_s": import_s,
        "modules_after_import": len(sys.modules),
    }
    describe_client(client, module, report)
    if mode == "sync":
        run_sync_mode(client, module, options, report)
    elif mode == "async":
        run_async_mode(client, module, options, report)
    else:
        raise SystemExit(f"worker.py: unknown mode {mode!r}")
    return emit(report)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
