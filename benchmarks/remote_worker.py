"""One measurement of ``benchmarks/remote.py`` in a fresh process; prints one JSON line.

Started by ``benchmarks/remote.py`` (which imports ``server_stats`` from it); it shares
``benchmarks/worker.py``'s helpers. Usage::

    python -I -S benchmarks/remote_worker.py CLIENT MODE key=value ...      # ours, floor
    .peer-venv/bin/python -I benchmarks/remote_worker.py peer MODE key=value ...

CLIENT is ``ours`` (this repository's ``spaps_client``; the repository root is put on
``sys.path`` here and nothing else is importable under ``-I -S``), ``peer`` (``spaps``
0.1.2 from the peer venv; the repository root is NOT on ``sys.path``) or ``floor`` (the
standard library alone: ``http.client`` for ``sync``, ``asyncio`` streams for ``async``).

Every client trusts the benchmark CA through the same ``ssl.create_default_context(cafile=)``
context, built before anything is timed: ``ssl_context=`` for ours, ``verify=`` for the
peer's httpx client, ``context=``/``ssl=`` for the floor.

MODE is one of:

``sync``   build a fresh client and make ``calls`` sequential calls, all timed: the
           constructor, the first call (connect, TLS handshake, whatever the client puts off
           until then) and the rest. Reports the mean per call over the whole (constructor
           included), the first call, the mean of the later calls and every latency.
``async``  one async client (the floor: one asyncio stream per task); twice
           ``concurrency`` concurrent calls to warm up (they open the connections; twice, so
           that a pool that grows lazily gets there), then ``concurrency`` tasks share
           ``calls`` calls, each task looping. Reports calls/s, the client's CPU time and
           threads, and (through ``control``) the server's CPU time, requests, new
           connections and timer error over exactly the timed part.

Options: ``url``, ``cafile``, ``calls``, ``concurrency``, ``control`` (port of the server's
control listener; async only, so that the sync mode imports nothing the client would
otherwise import on its first call).
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import worker  # benchmarks/worker.py: imports nothing but sys and time
from worker import ACCESS_TOKEN, API_KEY, EXPECTED_SESSION, PATH, session_id

del sys.path[0]  # nothing else is looked up in benchmarks/

OPTIONS = {"url": "", "cafile": "", "calls": "100", "concurrency": "1", "control": ""}
PROG = "remote_worker.py"
PEER_TIMEOUT = 10.0  # spaps 0.1.2's default request timeout (Settings.request_timeout)


def tls_context(cafile):
    import ssl

    return ssl.create_default_context(cafile=cafile)


def host_port(url):
    rest = url.partition("://")[2].partition("/")[0]
    host, _, port = rest.rpartition(":")
    return host, int(port)


def server_stats(port):
    """The remote server's control document (counts, CPU time), read over a raw socket."""
    import json
    import socket

    with socket.create_connection(("127.0.0.1", int(port)), timeout=10) as sock:
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return json.loads(b"".join(chunks))


# --- sync: a fresh client, sequential calls ---


def make_sync(client, module, url, context):
    """Build the client (this is timed); return (zero-argument call, close)."""
    if client == "ours":
        spaps = module.SpapsClient(base_url=url, api_key=API_KEY, ssl_context=context)
        spaps.set_tokens(access_token=ACCESS_TOKEN)
        return (lambda: spaps.sessions.get_current_session()), spaps.close
    if client == "peer":
        # the peer's own helper for a configured httpx client (its docstring: extra keywords
        # go to httpx.Client), as a user with a private CA would build it
        http = module.create_http_client(
            settings=module.Settings(base_url=url, api_key=API_KEY), verify=context)
        spaps = module.SpapsClient(base_url=url, api_key=API_KEY, http_client=http)
        spaps.set_tokens(access_token=ACCESS_TOKEN)

        def close():
            spaps.close()
            http.close()

        return (lambda: spaps.sessions.get_current_session()), close
    http_client, json = module
    host, port = host_port(url)
    conn = http_client.HTTPSConnection(host, port, timeout=10.0, context=context)
    return worker.floor_call(conn, json), conn.close


def run_sync(client, module, options, report):
    context = tls_context(options["cafile"])  # the user's trust settings, not timed
    calls = int(options["calls"])
    perf_ns = time.perf_counter_ns
    latencies = [0] * calls
    cpu_start = time.process_time()
    start = perf_ns()
    call, close = make_sync(client, module, options["url"], context)
    built = perf_ns()
    first, end = worker.timed_calls(call, latencies, built)
    cpu = time.process_time() - cpu_start
    close()
    if session_id(first) != EXPECTED_SESSION:
        raise SystemExit(f"remote_worker.py: unexpected answer {first!r}")
    later = latencies[1:] or latencies
    ordered = sorted(later)
    report.update(
        calls=calls,
        elapsed_s=(end - start) / 1e9,
        mean_ms=(end - start) / calls / 1e6,
        construct_ms=(built - start) / 1e6,
        first_call_ms=latencies[0] / 1e6,
        steady_mean_ms=sum(later) / len(later) / 1e6,
        steady_p50_ms=ordered[len(ordered) // 2] / 1e6,
        steady_p99_ms=ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))] / 1e6,
        cpu_ms=cpu * 1e3,
        latencies_us=[round(value / 1e3, 1) for value in latencies],
    )


# --- async: one client, c tasks ---


def make_async(client, module, url, context, concurrency, report):
    """(coroutine function making one call, async close) for ours and the peer."""
    if client == "ours":
        # Async calls run in worker threads, as many as the client's pool_maxsize; above
        # that, a user raises it with their own RetryClient (docs/async.md). The default is
        # read from a default RetryClient (it opens nothing), whatever its signature says.
        probe = module.RetryClient(base_url=url)
        default = int(probe.pool_maxsize)
        probe.close()
        http = None
        if concurrency > default:
            http = module.RetryClient(base_url=url, pool_maxsize=concurrency,
                                      ssl_context=context)
            spaps = module.AsyncSpapsClient(base_url=url, api_key=API_KEY, http_client=http)
        else:
            spaps = module.AsyncSpapsClient(base_url=url, api_key=API_KEY,
                                            ssl_context=context)
        spaps.set_tokens(access_token=ACCESS_TOKEN)
        report["pool_maxsize"] = concurrency if http is not None else default
        report["configured"] = ("http_client=RetryClient(pool_maxsize=c)" if http is not None
                                else "defaults")

        async def close():
            await spaps.aclose()
            if http is not None:
                http.close()

        return (lambda: spaps.sessions.get_current_session()), close
    if client == "peer":
        import httpx
        from spaps_client.http_async import RetryAsyncClient

        # httpx allows 100 connections and keeps 20 idle by default: raised to c, as a user
        # running c tasks would, so that no connection is closed and reopened
        limits = httpx.Limits(max_connections=max(100, concurrency),
                              max_keepalive_connections=max(20, concurrency))
        http = RetryAsyncClient(base_url=url.rstrip("/"), timeout=PEER_TIMEOUT,
                                verify=context, limits=limits)
        spaps = module.AsyncSpapsClient(base_url=url, api_key=API_KEY, http_client=http)
        spaps.set_tokens(access_token=ACCESS_TOKEN)
        report["configured"] = (f"http_client=RetryAsyncClient(verify=ctx, limits=Limits("
                                f"max_connections={limits.max_connections}, "
                                f"max_keepalive_connections={limits.max_keepalive_connections}"
                                "))")

        async def close():
            await spaps.aclose()
            await http.aclose()

        return (lambda: spaps.sessions.get_current_session()), close
    raise SystemExit("remote_worker.py: the floor's async client is built per task")


class FloorConnection:
    """The async floor: one asyncio stream over TLS, a hand-written HTTP/1.1 GET."""

    def __init__(self, reader, writer, request, loads):
        self.reader, self.writer, self.request, self.loads = reader, writer, request, loads

    @classmethod
    async def open(cls, url, context):  # asyncio and json are imported before timing
        import asyncio
        import json

        host, port = host_port(url)
        reader, writer = await asyncio.open_connection(host, port, ssl=context,
                                                       server_hostname=host)
        request = (f"GET {PATH} HTTP/1.1\r\nHost: {host}:{port}\r\nX-API-Key: {API_KEY}\r\n"
                   f"Authorization: Bearer {ACCESS_TOKEN}\r\n\r\n").encode()
        return cls(reader, writer, request, json.loads)

    async def call(self):
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        if not head.startswith((b"HTTP/1.1 200 ", b"HTTP/1.0 200 ")):
            raise RuntimeError(f"floor: {head[:40]!r}")
        lower = head.lower()
        at = lower.find(b"\r\ncontent-length:")
        if at < 0:
            raise RuntimeError("floor: no Content-Length")
        length = int(lower[at + 17: lower.find(b"\r\n", at + 2)])
        body = await self.reader.readexactly(length)
        return self.loads(body)["data"]["session"]

    async def close(self):
        import contextlib

        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


def run_async(client, module, options, report):
    import asyncio

    calls = int(options["calls"])
    concurrency = max(1, int(options["concurrency"]))
    context = tls_context(options["cafile"])
    url = options["url"]
    shares = [calls // concurrency + (1 if i < calls % concurrency else 0)
              for i in range(concurrency)]

    async def main():
        if client == "floor":
            conns = await asyncio.gather(*(FloorConnection.open(url, context)
                                           for _ in range(concurrency)))
            calls_of = [conn.call for conn in conns]

            async def close():
                await asyncio.gather(*(conn.close() for conn in conns))
        else:
            call, close = make_async(client, module, url, context, concurrency, report)
            calls_of = [call] * concurrency
        try:
            for _ in range(2):  # twice: a pool that grows lazily reaches its size
                warm = await asyncio.gather(*(call() for call in calls_of))
            if session_id(warm[0]) != EXPECTED_SESSION:
                raise SystemExit(f"remote_worker.py: unexpected answer {warm[0]!r}")

            async def task(call, count):
                for _ in range(count):
                    await call()

            before = server_stats(options["control"]) if options["control"] else None
            cpu_start = time.process_time()
            start = time.perf_counter()
            await asyncio.gather(*(task(call, count) for call, count in zip(calls_of, shares)))
            elapsed = time.perf_counter() - start
            cpu = time.process_time() - cpu_start
            after = server_stats(options["control"]) if options["control"] else None
            threading = sys.modules.get("threading")
            report["threads"] = threading.active_count() if threading else 1
        finally:
            await close()
        return elapsed, cpu, before, after

    elapsed, cpu, before, after = asyncio.run(main())
    report.update(
        calls=calls,
        concurrency=concurrency,
        elapsed_s=elapsed,
        calls_per_s=calls / elapsed,
        client_cpu_s=cpu,
        client_cpu_us_per_call=cpu / calls * 1e6,
        client_cpu_share=cpu / elapsed,  # 1.0 = one CPU busy all the time
    )
    if before is not None and after is not None:
        report["timed_server"] = {
            "cpu_s": after["server"]["cpu_s"] - before["server"]["cpu_s"],
            "requests": after["remote"]["requests"] - before["remote"]["requests"],
            "connections": after["remote"]["connections"] - before["remote"]["connections"],
            "timers": after["server"]["timers"] - before["server"]["timers"],
            "timer_error_sum_s": (after["server"]["timer_error_sum_s"]
                                  - before["server"]["timer_error_sum_s"]),
        }


def main(argv):
    client, mode, options = worker.parse_args(argv, OPTIONS, PROG)
    module = worker.import_client(client, PROG)
    report = {"client": client, "mode": mode, "python": sys.version.split()[0]}
    if mode == "sync":
        run_sync(client, module, options, report)
    elif mode == "async":
        run_async(client, module, options, report)
    else:
        raise SystemExit(f"remote_worker.py: unknown mode {mode!r}")
    worker.describe_client(client, module, report)  # afterwards: importlib.util is not free
    return worker.emit(report)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
