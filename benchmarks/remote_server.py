"""A stand-in for a remote SPAPS: HTTPS on loopback, with network delays (stdlib only).

Run by ``benchmarks/remote.py`` in its own process::

    python -I -S benchmarks/remote_server.py --cert CERT --key KEY \\
        [--response-delay-ms 5] [--connect-delay-ms 20] [--nice -10]

Two TLS listeners on 127.0.0.1 (ephemeral ports):

* ``remote``  every response leaves ``--response-delay-ms`` after its request arrived (the
  round trip and the server's own time), and every new connection waits
  ``--connect-delay-ms`` after ``accept`` before its TLS handshake starts (the TCP and TLS
  round trips of reaching a distant host);
* ``local``   the same answers with no delay (for the cold-start measurement);

and a ``control`` port (plain TCP): every connection to it gets one JSON document with the
per-listener counts of accepted connections and served requests, the CPU time this process
has used so far (``getrusage``) and how accurate its timers were, and is closed. Connections
to it are not counted.

**Efficiency.** One thread and one ``epoll`` loop serve everything: non-blocking sockets, TLS
through ``ssl.SSLObject`` and memory BIOs (OpenSSL in C, no ``asyncio`` layers), and the
delays are timers in a heap, not sleeping threads, so hundreds of connections waiting out
their delay cost nothing. The harness reads the CPU time per run.

**Accuracy.** A request "arrives" when the kernel received it (``SO_TIMESTAMPNS`` on every
connection), not when this process got round to reading it: on a VM, waking a process blocked
in ``epoll`` takes 0.1 to 0.2 ms, and a remote server's network delay does not include this
machine's wake-ups. ``epoll`` waits in whole milliseconds (CPython rounds its timeout up), so
the loop waits in ``epoll`` only to the last whole millisecond before the next timer and the
rest in ``select`` on the epoll descriptor, which takes microseconds. The process asks for a
1 ns timer slack (Linux), and since waking up still lands about 0.1 ms after the time asked
for, it wakes early by a lead that every fired timer corrects (at most 0.5 ms), so delays are
right on average rather than all late. ``--nice`` raises its scheduling priority where
allowed (the harness asks for -10), so that a busy client on the same two CPUs delays it less:
a remote server does not queue for this machine's CPUs. The control document carries the
timers' summed error, so a late server shows.

Once listening it prints one JSON line ``{"ports": {...}, "pid": ..., ...}`` on stdout. It
answers ``GET /api/sessions/current`` with the same canned session reply as
``benchmarks/server.py`` and everything else with a JSON 404. It stops on SIGTERM, when its
standard input reaches end-of-file (the harness went away), or after ``--max-seconds``.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import os
import resource
import select
import signal
import socket
import ssl
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from server import MAX_HEAD, answer, content_length  # the same parsing and canned answers

READ = select.EPOLLIN
WRITE = select.EPOLLOUT
MAX_LEAD = 0.0005
# Linux (asm-generic: x86_64, arm64): SO_TIMESTAMPNS, whose control message carries a
# struct timespec of the time the kernel received the data (CLOCK_REALTIME).
SO_TIMESTAMPNS = 35
TIMESPEC = struct.Struct("@qq")
ANCILLARY_SIZE = socket.CMSG_SPACE(TIMESPEC.size)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def narrow_timer_slack() -> bool:
    """Ask Linux for a 1 ns timer slack (the default, 50 us, would lengthen every delay)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(29, 1, 0, 0, 0) == 0  # PR_SET_TIMERSLACK
    except (OSError, AttributeError):
        return False


class Listener:
    def __init__(self, name: str, tls: ssl.SSLContext, response_delay: float,
                 connect_delay: float) -> None:
        self.name = name
        self.tls = tls
        self.response_delay = response_delay
        self.connect_delay = connect_delay
        self.connections = 0
        self.requests = 0
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]


class Connection:
    __slots__ = ("buffer", "closing", "incoming", "listener", "mask", "out", "outgoing",
                 "sock", "state", "tls")

    def __init__(self, sock: socket.socket, listener: Listener) -> None:
        self.sock = sock
        self.listener = listener
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls: ssl.SSLObject | None = None
        self.buffer = b""  # decrypted request bytes not parsed yet
        self.out = b""  # encrypted bytes a full send buffer left behind (rare)
        self.closing = False  # close once ``out`` is sent
        self.state = "waiting"  # waiting -> handshake -> open -> closed
        self.mask = 0


class Loop:
    def __init__(self, listeners: list[Listener], control: socket.socket) -> None:
        self.epoll = select.epoll()
        self.listeners = {item.sock.fileno(): item for item in listeners}
        self.all_listeners = listeners
        self.control = control
        self.conns: dict[int, Connection] = {}
        # (due, sequence, connection, answer or None to start TLS, close after sending)
        self.timers: list[tuple[float, int, Connection, bytes | None, bool]] = []
        self.sequence = 0
        self.lead = 0.0  # how early to wake for a timer (seconds)
        self.timer_count = 0
        self.timer_error_sum = 0.0  # sum of (fired - due): positive is late
        self.timer_abs_error_sum = 0.0
        self.arrival_stamps = 0  # requests timed from the kernel's receive timestamp
        self.stopping = False
        for fd in self.listeners:
            self.epoll.register(fd, READ)
        self.epoll.register(control.fileno(), READ)
        self.stdin_fd = -1

    def watch_stdin(self) -> None:
        try:
            fd = sys.stdin.fileno()
            self.epoll.register(fd, READ)
            self.stdin_fd = fd
        except (OSError, ValueError, AttributeError):
            pass

    # --- timers ---

    def at(self, due: float, conn: Connection, payload: bytes | None,
           close_after: bool = False) -> None:
        self.sequence += 1
        heapq.heappush(self.timers, (due, self.sequence, conn, payload, close_after))

    def wait(self) -> list[tuple[int, int]]:
        if not self.timers:
            return self.epoll.poll(-1)
        remaining = self.timers[0][0] - self.lead - time.monotonic()
        if remaining <= 0:
            return self.epoll.poll(0)
        whole_ms = int(remaining * 1000)
        if whole_ms >= 1:
            # (whole_ms - 0.5) ms rounds up to whole_ms: never past the timer
            return self.epoll.poll((whole_ms - 0.5) / 1000)
        ready, _, _ = select.select([self.epoll.fileno()], [], [], remaining)
        return self.epoll.poll(0) if ready else []

    def fire_due(self) -> None:
        timers = self.timers
        now = time.monotonic()
        while timers and timers[0][0] - self.lead <= now:
            due, _, conn, payload, close_after = heapq.heappop(timers)
            error = now - due
            self.lead = min(MAX_LEAD, max(0.0, self.lead + error / 8))
            self.timer_count += 1
            self.timer_error_sum += error
            self.timer_abs_error_sum += abs(error)
            if conn.state == "closed":
                continue
            if payload is None:
                self.start_tls(conn)
            else:
                self.send(conn, payload, close_after)

    # --- connections ---

    def accept(self, listener: Listener) -> None:
        while True:
            try:
                sock, _ = listener.sock.accept()
            except OSError:  # BlockingIOError: nothing more to accept
                return
            listener.connections += 1
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            conn = Connection(sock, listener)
            if listener.connect_delay > 0:
                # the client's ClientHello waits in the kernel until the timer fires
                self.at(time.monotonic() + listener.connect_delay, conn, None)
            else:
                self.start_tls(conn)

    def start_tls(self, conn: Connection) -> None:
        conn.tls = conn.listener.tls.wrap_bio(conn.incoming, conn.outgoing, server_side=True)
        conn.state = "handshake"
        fd = conn.sock.fileno()
        self.conns[fd] = conn
        conn.mask = READ
        self.epoll.register(fd, READ)
        self.readable(conn)

    def want(self, conn: Connection, mask: int) -> None:
        if conn.mask != mask and conn.state != "closed":
            conn.mask = mask
            self.epoll.modify(conn.sock.fileno(), mask)

    def readable(self, conn: Connection) -> None:
        """Everything the kernel holds for ``conn``, through TLS, into requests."""
        sock = conn.sock
        arrived = 0.0
        eof = False
        while True:
            try:
                data, ancillary, _, _ = sock.recvmsg(65536, ANCILLARY_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.close(conn)
                return
            if not data:
                eof = True
                break
            conn.incoming.write(data)
            for level, kind, value in ancillary:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS \
                        and len(value) >= TIMESPEC.size:
                    seconds, nanoseconds = TIMESPEC.unpack_from(value)
                    arrived = seconds + nanoseconds * 1e-9
        # the kernel's time is CLOCK_REALTIME; the timers run on the monotonic clock
        now = time.monotonic()
        arrival = now
        if arrived:
            arrival = min(now, arrived - (time.time() - now))
            self.arrival_stamps += 1
        tls = conn.tls
        assert tls is not None
        try:
            if conn.state == "handshake":
                try:
                    tls.do_handshake()
                    conn.state = "open"
                except ssl.SSLWantReadError:
                    pass
            if conn.state == "open":
                while True:
                    try:
                        plain = tls.read(65536)
                    except ssl.SSLWantReadError:
                        break
                    if not plain:
                        eof = True
                        break
                    conn.buffer += plain
        except (ssl.SSLError, ValueError):
            self.close(conn)
            return
        self.flush(conn)
        if len(conn.buffer) > MAX_HEAD:
            self.close(conn)
            return
        if conn.buffer:
            self.parse(conn, arrival)
        if eof:
            self.close(conn)

    def parse(self, conn: Connection, arrival: float) -> None:
        buffer = conn.buffer
        listener = conn.listener
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buffer[:end]
            lower = head.lower()
            length = content_length(lower)
            if len(buffer) < end + 4 + length:
                break
            buffer = buffer[end + 4 + length:]
            reply, close_after = answer(head, lower)
            listener.requests += 1
            if listener.response_delay > 0:
                self.at(arrival + listener.response_delay, conn, reply, close_after)
            else:
                self.send(conn, reply, close_after)
        conn.buffer = buffer

    def send(self, conn: Connection, payload: bytes, close_after: bool = False) -> None:
        assert conn.tls is not None
        try:
            conn.tls.write(payload)
        except (ssl.SSLError, ValueError):
            self.close(conn)
            return
        conn.closing = conn.closing or close_after
        self.flush(conn)

    def flush(self, conn: Connection) -> None:
        """Send what TLS produced (and anything an earlier full buffer left behind)."""
        data = conn.out + conn.outgoing.read() if conn.outgoing.pending else conn.out
        if data:
            try:
                sent = conn.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.close(conn)
                return
            conn.out = data[sent:]
        if conn.out:
            self.want(conn, READ | WRITE)
        elif conn.closing:
            self.close(conn)
        elif conn.mask != READ:
            self.want(conn, READ)

    def close(self, conn: Connection) -> None:
        if conn.state == "closed":
            return
        if conn.state != "waiting":
            fd = conn.sock.fileno()
            self.conns.pop(fd, None)
            with contextlib.suppress(OSError, ValueError):
                self.epoll.unregister(fd)
        conn.state = "closed"
        with contextlib.suppress(OSError):
            conn.sock.close()

    # --- control ---

    def stats(self) -> bytes:
        document: dict[str, object] = {
            item.name: {"connections": item.connections, "requests": item.requests}
            for item in self.all_listeners}
        document["server"] = {
            "cpu_s": cpu_seconds(), "monotonic": time.monotonic(),
            "open_connections": len(self.conns), "timers": self.timer_count,
            "timer_error_sum_s": self.timer_error_sum,
            "timer_abs_error_sum_s": self.timer_abs_error_sum, "lead_s": self.lead,
            "arrival_stamps": self.arrival_stamps,
        }
        return json.dumps(document).encode()

    def answer_control(self) -> None:
        while True:
            try:
                sock, _ = self.control.accept()
            except OSError:
                return
            try:
                sock.setblocking(True)
                sock.settimeout(2)
                sock.sendall(self.stats())
            except OSError:
                pass
            finally:
                sock.close()

    def run(self, deadline: float) -> None:
        control_fd = self.control.fileno()
        conns = self.conns
        while not self.stopping and time.monotonic() < deadline:
            try:
                events = self.wait()
            except InterruptedError:
                continue
            for fd, mask in events:
                conn = conns.get(fd)
                if conn is not None:
                    if mask & WRITE:
                        self.flush(conn)
                    if mask & (READ | select.EPOLLHUP | select.EPOLLERR) \
                            and conn.state != "closed":
                        self.readable(conn)
                    continue
                listener = self.listeners.get(fd)
                if listener is not None:
                    self.accept(listener)
                elif fd == control_fd:
                    self.answer_control()
                elif fd == self.stdin_fd and not os.read(fd, 4096):
                    self.stopping = True
            self.fire_due()


def _options(argv: list[str]) -> dict[str, str]:
    options = {"--cert": "", "--key": "", "--response-delay-ms": "5",
               "--connect-delay-ms": "20", "--max-seconds": "1800", "--nice": "0"}
    args = iter(argv)
    for name in args:
        if name not in options:
            raise SystemExit(f"remote_server.py: unknown option {name}")
        options[name] = next(args)
    if not options["--cert"]:
        raise SystemExit("remote_server.py: --cert (and --key) are required")
    return options


def main(argv: list[str]) -> int:
    options = _options(argv)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(options["--cert"], options["--key"] or None)
    listeners = [
        Listener("remote", tls, float(options["--response-delay-ms"]) / 1000,
                 float(options["--connect-delay-ms"]) / 1000),
        Listener("local", tls, 0.0, 0.0),
    ]
    control = socket.create_server(("127.0.0.1", 0), backlog=64)
    control.setblocking(False)
    loop = Loop(listeners, control)
    loop.watch_stdin()
    slack = narrow_timer_slack()
    niceness = os.getpriority(os.PRIO_PROCESS, 0)
    if int(options["--nice"]) < niceness:
        # a higher priority (root only): a remote server does not queue for our CPUs
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, int(options["--nice"]))
        niceness = os.getpriority(os.PRIO_PROCESS, 0)

    def stop(*_: object) -> None:
        raise SystemExit(0)  # also interrupts a blocking epoll wait

    signal.signal(signal.SIGTERM, stop)
    ports = {item.name: item.port for item in listeners}
    ports["control"] = control.getsockname()[1]
    print(json.dumps({"ports": ports, "pid": os.getpid(), "timer_slack_1ns": slack,
                      "nice": niceness}), flush=True)
    loop.run(time.monotonic() + float(options["--max-seconds"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
