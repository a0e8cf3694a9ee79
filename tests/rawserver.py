"""A loopback TCP server that answers with exactly the bytes a test hands it.

``tests/loopback.py`` serves well-formed HTTP through ``http.server``; the wire tests need the
opposite: malformed, truncated or oddly framed responses written byte for byte, connections
held open after the answer, and a count of the TCP connections a client opened. A handler is a
function ``handler(conn, index)`` called on its own daemon thread for the ``index``-th accepted
connection; ``RawConnection`` gives it the small verbs those tests need.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Callable, Iterator, List, Optional, Set, Tuple

_HEAD_LIMIT = 1 << 20
_POLL = 0.05  # seconds a blocked accept or read waits before looking at ``stopping``


class RawConnection:
    """One accepted connection, seen from the server side."""

    def __init__(self, sock: socket.socket, server: RawServer) -> None:
        self.sock = sock
        self.server = server
        self.buffer = b""

    def read_head(self) -> Optional[bytes]:
        """The next request head (through its blank line), or ``None`` when the peer is gone.

        The requests of these tests carry no body, so the head is all there is to read.
        """
        while b"\r\n\r\n" not in self.buffer:
            chunk = self._recv()
            if not chunk:
                return None
            self.buffer += chunk
            if len(self.buffer) > _HEAD_LIMIT:
                return None
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        head += b"\r\n\r\n"
        self.server.record(head)
        return head

    def send(self, data: bytes) -> bool:
        """Write ``data``; ``False`` when the peer has already gone away."""
        self.sock.settimeout(10)  # a slow reader is not a gone one
        try:
            self.sock.sendall(data)
        except OSError:
            return False
        finally:
            with contextlib.suppress(OSError):
                self.sock.settimeout(_POLL)
        return True

    def hold(self) -> None:
        """Keep the connection open, reading and discarding, until the peer or server ends."""
        while self._recv():
            pass

    def finish(self) -> None:
        """Close gracefully: send FIN, then wait (bounded) for the peer to close its side.

        Closing at once while unread bytes sit in our receive buffer would send a reset, which
        may destroy response bytes the client has not read yet.
        """
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and self._recv():
            pass

    def _recv(self) -> bytes:
        """Bytes from the peer; ``b""`` at end of stream, on error or when the server stops."""
        while not self.server.stopping.is_set():
            try:
                return self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return b""
        return b""


Handler = Callable[[RawConnection, int], None]


class RawServer:
    """Accepts on 127.0.0.1 and runs ``handler`` per connection; counts what arrives.

    ``connections`` counts accepted TCP connections (``settle()`` first makes the count
    final); ``requests`` lists ``(connection index, request head)`` in arrival order.
    """

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.stopping = threading.Event()
        self.requests: List[Tuple[int, bytes]] = []
        self._accepted = 0
        self._probes: Set[Tuple[str, int]] = set()
        self._seen_probes: Set[Tuple[str, int]] = set()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._sockets: List[socket.socket] = []
        self._threads: List[threading.Thread] = []
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(_POLL)
        self.port = int(self._listener.getsockname()[1])
        self._acceptor = threading.Thread(target=self._accept_loop, name="rawserver-accept",
                                          daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def connections(self) -> int:
        with self._lock:
            return self._accepted

    def heads(self) -> List[bytes]:
        with self._lock:
            return [head for _, head in self.requests]

    def record(self, head: bytes) -> None:
        with self._lock:
            self.requests.append((getattr(self._local, "index", -1), head))

    def settle(self, timeout: float = 5.0) -> int:
        """Make sure every connection a client opened so far has been accepted; the count.

        A probe connection is queued behind them (the listen backlog is first in, first
        out), so once the probe has been accepted, so has every earlier connection.
        """
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            probe.bind(("127.0.0.1", 0))  # known before connecting, so never mistaken
            name = probe.getsockname()[:2]
            with self._lock:
                self._probes.add(name)
            probe.settimeout(timeout)
            probe.connect(("127.0.0.1", self.port))
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                with self._lock:
                    if name in self._seen_probes:
                        return self._accepted
                time.sleep(0.005)
            raise AssertionError("the raw server did not accept its probe connection")
        finally:
            probe.close()

    def start(self) -> RawServer:
        self._acceptor.start()
        return self

    def close(self) -> None:
        self.stopping.set()
        self._acceptor.join(timeout=5)
        with self._lock:
            sockets, threads = list(self._sockets), list(self._threads)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()
        for thread in threads:
            thread.join(timeout=5)
        self._listener.close()

    def _accept_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                sock, peer = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            sock.settimeout(_POLL)  # lets blocked reads notice ``stopping``
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if peer[:2] in self._probes:
                    self._seen_probes.add(peer[:2])
                    sock.close()
                    continue
                index = self._accepted
                self._accepted += 1
                self._sockets.append(sock)
                thread = threading.Thread(target=self._serve, args=(sock, index),
                                          name=f"rawserver-{index}", daemon=True)
                self._threads.append(thread)
            thread.start()

    def _serve(self, sock: socket.socket, index: int) -> None:
        self._local.index = index
        try:
            self.handler(RawConnection(sock, self), index)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sock.close()


@contextlib.contextmanager
def raw_server(handler: Handler) -> Iterator[RawServer]:
    server = RawServer(handler).start()
    try:
        yield server
    finally:
        server.close()


# ---------------------------------------------------------------------------------------------
# Handlers the wire tests share
# ---------------------------------------------------------------------------------------------


def answer_once(raw: bytes, *, hold: bool = False) -> Handler:
    """Each connection: read one request head, write ``raw``, then close (or hold it open)."""

    def handler(conn: RawConnection, index: int) -> None:
        if conn.read_head() is None:
            return
        conn.send(raw)
        if hold:
            conn.hold()
        else:
            conn.finish()

    return handler


def keep_answering(answer: Callable[[int], bytes]) -> Handler:
    """Each connection: answer every request head with ``answer(connection index)``.

    The connection stays open however the answer is framed (even after ``Connection:
    close``), so only a client that opens a new connection gets a new one.
    """

    def handler(conn: RawConnection, index: int) -> None:
        while conn.read_head() is not None:
            if not conn.send(answer(index)):
                return

    return handler
