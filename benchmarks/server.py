"""A fast loopback HTTP/1.1 server for the spaps benchmarks (stdlib only).

Run by ``benchmarks/run.py`` in its own process::

    python -I -S benchmarks/server.py [--cert CERT --key KEY] [--delay-ms 20]

It listens on 127.0.0.1 (ephemeral ports) with up to five listeners:

* ``http``        plain HTTP/1.1, keep-alive;
* ``tls``         the same over TLS (only when ``--cert``/``--key`` are given);
* ``http_delay``  plain HTTP, every *new* connection waits ``--delay-ms`` before it is served;
* ``tls_delay``   TLS, every new connection waits ``--delay-ms`` before the TLS handshake;
* ``control``     ``GET /stats`` returns the per-listener counts of accepted TCP connections
  and served requests as JSON (connections to this listener are not counted).

The delay models the handshake round trips of a remote SPAPS: a client that reuses its
connection pays it once, a client that reconnects pays it on every call.

Once listening it prints one JSON line ``{"ports": {...}}`` on stdout. It answers
``GET /api/sessions/current`` with a session reply shaped like SPAPS's (canned bytes,
built once) and every other target with a JSON 404. It stops on SIGTERM, when its standard
input reaches end-of-file (the harness went away), or after ``--max-seconds``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import sys
import threading
import time

SESSION_FIXTURE = {
    "success": True,
    "data": {
        "session": {
            "id": "sess_123",
            "user_id": "user_123",
            "application_id": "app_123",
            "tier": "basic",
            "created_at": "2025-01-01T12:00:00Z",
            "expires_at": "2025-01-02T12:00:00Z",
            "last_activity": "2025-01-01T12:05:00Z",
            "wallets_count": 2,
            "duration_minutes": 600,
            "idle_minutes": 5,
        }
    },
    "metadata": {"timestamp": "2025-01-01T12:05:00Z", "request_id": "req_bench"},
}

NOT_FOUND = {
    "success": False,
    "error": {"code": "NOT_FOUND", "message": "no such benchmark endpoint"},
}


def _response(status: str, document: object) -> bytes:
    body = json.dumps(document, separators=(",", ":")).encode()
    head = (
        f"HTTP/1.1 {status}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "\r\n"
    ).encode()
    return head + body


ROUTES = {
    b"GET /api/sessions/current": _response("200 OK", SESSION_FIXTURE),
}
RESPONSE_404 = _response("404 Not Found", NOT_FOUND)
MAX_HEAD = 64 * 1024


def content_length(lower: bytes) -> int:
    """The Content-Length of a request head (lower-cased, without the blank line), or 0."""
    at = lower.find(b"\r\ncontent-length:")
    if at < 0:
        return 0
    stop = lower.find(b"\r\n", at + 2)
    return int(lower[at + 17: stop if stop >= 0 else None])


def answer(head: bytes, lower: bytes) -> tuple[bytes, bool]:
    """The canned reply to a request head, and whether to close the connection after it."""
    request_line = head.split(b"\r\n", 1)[0]
    close_after = b"\r\nconnection: close" in lower or request_line.endswith(b"HTTP/1.0")
    return ROUTES.get(request_line.rsplit(b" ", 1)[0], RESPONSE_404), close_after


class Listener:
    """One listening socket; counts what it accepted and served."""

    def __init__(self, name: str, tls: ssl.SSLContext | None, delay: float) -> None:
        self.name = name
        self.tls = tls
        self.delay = delay
        self.connections = 0
        self.requests = 0
        self.lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.port = self.sock.getsockname()[1]

    def serve_forever(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()

    def handle(self, conn: socket.socket) -> None:
        try:
            if self.delay:
                time.sleep(self.delay)
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            self.exchange(conn)
        except (OSError, ValueError):
            pass
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def exchange(self, conn: socket.socket) -> None:
        """Serve requests on one connection until the client closes it."""
        buffer = b""
        recv = conn.recv
        send = conn.sendall
        served = 0
        try:
            while True:
                end = buffer.find(b"\r\n\r\n")
                while end < 0:
                    chunk = recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                    if len(buffer) > MAX_HEAD:
                        return
                    end = buffer.find(b"\r\n\r\n")
                head = buffer[:end]
                buffer = buffer[end + 4:]
                lower = head.lower()
                length = content_length(lower)
                while len(buffer) < length:
                    chunk = recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                buffer = buffer[length:]
                reply, close_after = answer(head, lower)
                send(reply)
                served += 1
                if close_after:
                    return
        finally:
            with self.lock:
                self.requests += served

    def stats(self) -> dict[str, int]:
        with self.lock:
            return {"connections": self.connections, "requests": self.requests}


def _control(sock: socket.socket, listeners: list[Listener]) -> None:
    """Answer every request on the control port with the current counts, then close."""
    while True:
        try:
            conn, _ = sock.accept()
        except OSError:
            return
        with conn:
            try:
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                body = json.dumps({item.name: item.stats() for item in listeners}).encode()
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Connection: close\r\nContent-Length: "
                    + str(len(body)).encode() + b"\r\n\r\n" + body
                )
            except OSError:
                pass


def _options(argv: list[str]) -> dict[str, str]:
    options = {"--cert": "", "--key": "", "--delay-ms": "20", "--max-seconds": "1800"}
    args = iter(argv)
    for name in args:
        if name not in options:
            raise SystemExit(f"server.py: unknown option {name}")
        options[name] = next(args)
    return options


def main(argv: list[str]) -> int:
    options = _options(argv)
    delay = float(options["--delay-ms"]) / 1000.0
    tls: ssl.SSLContext | None = None
    if options["--cert"]:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(options["--cert"], options["--key"] or None)
    listeners = [Listener("http", None, 0.0), Listener("http_delay", None, delay)]
    if tls is not None:
        listeners += [Listener("tls", tls, 0.0), Listener("tls_delay", tls, delay)]
    control = socket.create_server(("127.0.0.1", 0))
    for item in listeners:
        threading.Thread(target=item.serve_forever, daemon=True).start()
    threading.Thread(target=_control, args=(control, listeners), daemon=True).start()
    ports = {item.name: item.port for item in listeners}
    ports["control"] = control.getsockname()[1]
    print(json.dumps({"ports": ports, "pid": os.getpid()}), flush=True)

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())

    def watch_stdin() -> None:
        try:
            while sys.stdin.buffer.read(4096):
                pass
        except (OSError, ValueError):
            pass
        done.set()

    if sys.stdin is not None:
        threading.Thread(target=watch_stdin, daemon=True).start()
    done.wait(float(options["--max-seconds"]))
    sys.stdout.flush()
    os._exit(0)  # not a normal exit: daemon threads may be blocked in reads of stdin


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
