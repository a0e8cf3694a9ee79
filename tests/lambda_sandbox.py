"""A local stand-in for AWS Lambda's Python execution environment (standard library only).

Used by ``tests/test_lambda.py`` and ``benchmarks/lambda_init.py``; not part of the client.

* :class:`RuntimeApi` is a loopback HTTP server speaking the Lambda Runtime API that the real
  runtime interface client, ``awslambdaric`` (its C ``runtime_client`` built on
  aws-lambda-cpp), calls: ``GET /2018-06-01/runtime/invocation/next`` (blocks until an event
  is queued; answers with the ``Lambda-Runtime-Aws-Request-Id``, ``-Deadline-Ms``,
  ``-Invoked-Function-Arn`` and ``-Trace-Id`` headers), ``POST
  .../invocation/{id}/response`` and ``.../invocation/{id}/error`` (202), and ``POST
  /2018-06-01/runtime/init/error`` (202). It records when the first ``next`` arrived: that is
  the end of the init phase, as Lambda measures "Init Duration".
* :func:`start_runtime` runs ``python -m awslambdaric handler.handler`` the way Lambda lays it
  out: the layer directory at ``/opt`` and the function's code at ``/var/task``, both
  read-only, the whole filesystem read-only except a fresh, empty ``/tmp``, cwd
  ``/var/task``. It needs root: a private mount namespace (``unshare --mount``) with
  read-only bind remounts of every mount (only inside that namespace; the host is untouched),
  an overlay on ``/var`` to make the ``/var/task`` mount point, and a tmpfs on ``/tmp``.
  :func:`sandbox_unavailable` says why it cannot run here (not root, no ``unshare``, the
  kernel refuses namespaces or overlayfs), or returns None.

Run as a script (``python lambda_sandbox.py enter ...``) this file is the process inside the
namespace that sets the mounts up, checks them, writes the exec time and execs the runtime.
"""

from __future__ import annotations

import errno
import http.server
import importlib.util
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import IO, Any, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
PREFIX = "/2018-06-01/runtime"
FUNCTION_ARN = "arn:aws:lambda:eu-west-1:123456789012:function:spaps-test"


# --- the Runtime API stand-in ---


class RuntimeApi:
    """A loopback Lambda Runtime API; ``.address`` goes into ``AWS_LAMBDA_RUNTIME_API``."""

    def __init__(self) -> None:
        self.events: queue.Queue[Optional[Tuple[str, bytes]]] = queue.Queue()
        self.first_next_ns: Optional[int] = None
        self.next_calls = 0
        self.responses: Dict[str, bytes] = {}
        self.errors: Dict[str, Tuple[str, bytes]] = {}
        self.init_errors: List[Tuple[str, bytes]] = []
        self.unexpected: List[str] = []
        self._changed = threading.Condition()
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, and "Expect: 100-continue" handled

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path != f"{PREFIX}/invocation/next":
                    api._unexpected(f"GET {self.path}")
                    self._answer(404, b'{"errorType":"NotFound"}')
                    return
                with api._changed:
                    if api.first_next_ns is None:
                        api.first_next_ns = time.monotonic_ns()
                    api.next_calls += 1
                    api._changed.notify_all()
                event = api.events.get()
                if event is None:  # stopping: hang up, the runtime exits
                    self.close_connection = True
                    return
                request_id, body = event
                deadline = int(time.time() * 1000) + 60_000
                self._answer(200, body, {
                    "Lambda-Runtime-Aws-Request-Id": request_id,
                    "Lambda-Runtime-Deadline-Ms": str(deadline),
                    "Lambda-Runtime-Invoked-Function-Arn": FUNCTION_ARN,
                    "Lambda-Runtime-Trace-Id": f"Root=1-{uuid.uuid4().hex[:8]}-"
                                               f"{uuid.uuid4().hex[:24]}",
                })

            def do_POST(self) -> None:
                body = self._body()
                path = self.path
                error_type = self.headers.get("Lambda-Runtime-Function-Error-Type", "")
                with api._changed:
                    if path == f"{PREFIX}/init/error":
                        api.init_errors.append((error_type, body))
                    elif path.startswith(f"{PREFIX}/invocation/") and path.endswith("/response"):
                        api.responses[path.split("/")[-2]] = body
                    elif path.startswith(f"{PREFIX}/invocation/") and path.endswith("/error"):
                        api.errors[path.split("/")[-2]] = (error_type, body)
                    else:
                        api.unexpected.append(f"POST {path}")
                        self._answer(404, b'{"errorType":"NotFound"}')
                        return
                    api._changed.notify_all()
                self._answer(202, b'{"status":"OK"}')

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks: List[bytes] = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _answer(self, status: int, body: bytes,
                        headers: Optional[Dict[str, str]] = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a runtime killed mid-poll resets its connection: expected

        self._server = Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _unexpected(self, what: str) -> None:
        with self._changed:
            self.unexpected.append(what)
            self._changed.notify_all()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self._server.server_port}"

    def start(self) -> RuntimeApi:
        self._thread.start()
        return self

    def invoke(self, event: Any) -> str:
        """Queue one event; return its request id."""
        request_id = str(uuid.uuid4())
        self.events.put((request_id, json.dumps(event).encode()))
        return request_id

    def wait(self, predicate: Any, timeout: float, process: Optional[subprocess.Popen[Any]] = None
             ) -> bool:
        """Wait until ``predicate()`` holds (False on timeout or if ``process`` exited)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0 or (process is not None and process.poll() is not None):
                    return bool(predicate())
                self._changed.wait(min(left, 0.05))
        return True

    def wait_result(self, request_id: str, timeout: float = 30.0,
                    process: Optional[subprocess.Popen[Any]] = None) -> Tuple[str, Any]:
        """``("response", body)`` or ``("error", (type, body))`` of one invocation."""
        self.wait(lambda: request_id in self.responses or request_id in self.errors
                  or bool(self.init_errors), timeout, process)
        if request_id in self.responses:
            return "response", json.loads(self.responses[request_id])
        if request_id in self.errors:
            kind, body = self.errors[request_id]
            return "error", (kind, json.loads(body))
        raise AssertionError(f"no result for {request_id}: init errors {self.init_errors}, "
                             f"unexpected requests {self.unexpected}")

    def stop(self) -> None:
        for _ in range(4):
            self.events.put(None)
        self._server.shutdown()
        self._server.server_close()


# --- the sandbox ---


def sandbox_unavailable() -> Optional[str]:
    """Why :func:`start_runtime` cannot work on this machine, or None if it can."""
    if not sys.platform.startswith("linux"):
        return "needs Linux mount namespaces"
    if os.geteuid() != 0:
        return "needs root (a private mount namespace with read-only bind mounts)"
    for tool in ("unshare", "mount"):
        if shutil.which(tool) is None:
            return f"the {tool} command is not installed"
    with tempfile.TemporaryDirectory() as scratch:
        script = (f"mount -t tmpfs spaps-probe {scratch} && mkdir {scratch}/u {scratch}/w "
                  f"{scratch}/m && mount -t overlay overlay -o lowerdir=/var,upperdir="
                  f"{scratch}/u,workdir={scratch}/w {scratch}/m && "
                  "mount -o remount,bind,ro /")
        try:
            done = subprocess.run(["unshare", "--mount", "--propagation", "private",
                                   "sh", "-c", script], capture_output=True, text=True,
                                  timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"unshare failed: {exc}"
        if done.returncode != 0:
            return f"the kernel refused the mount namespace: {done.stderr.strip()[-300:]}"
    return None


def runtime_env(api_address: str, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment Lambda gives the runtime (the parts awslambdaric and a handler read)."""
    minor = f"{sys.version_info[0]}.{sys.version_info[1]}"
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "en_US.UTF-8",
        "TZ": ":UTC",
        "LAMBDA_TASK_ROOT": "/var/task",
        "LAMBDA_RUNTIME_DIR": "/var/runtime",
        "PYTHONPATH": "/opt/python",
        "AWS_LAMBDA_RUNTIME_API": api_address,
        "AWS_EXECUTION_ENV": f"AWS_Lambda_python{minor}",
        "AWS_LAMBDA_FUNCTION_NAME": "spaps-test",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "512",
        "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
        "AWS_REGION": "eu-west-1",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_LAMBDA_LOG_GROUP_NAME": "/aws/lambda/spaps-test",
        "AWS_LAMBDA_LOG_STREAM_NAME": "local",
        "_HANDLER": "handler.handler",
        "HOME": os.environ.get("HOME", "/root"),
    }
    env.update(extra or {})
    return env


class Runtime:
    """One runtime process in the sandbox; ``exec_ns`` is when the interpreter was exec'd."""

    def __init__(self, process: subprocess.Popen[bytes], exec_ns: int, log: IO[bytes],
                 scratch: str) -> None:
        self.process = process
        self.exec_ns = exec_ns
        self._log = log
        self._scratch = scratch
        self._output: Optional[str] = None

    def output(self) -> str:
        """What the runtime printed (stdout and stderr) so far, or in all once stopped."""
        if self._output is not None:
            return self._output
        self._log.flush()
        self._log.seek(0)
        text = self._log.read().decode("utf-8", "replace")
        self._log.seek(0, os.SEEK_END)
        return text

    def stop(self) -> None:
        if self._output is not None:
            return
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)
        self._output = self.output()
        self._log.close()
        shutil.rmtree(self._scratch, ignore_errors=True)


def _runtime_paths(python: str) -> List[str]:
    """Directories the runtime needs: its interpreter, venv, stdlib and awslambdaric."""
    paths = {os.path.dirname(os.path.abspath(python)),
             os.path.dirname(os.path.realpath(python)), sys.base_prefix}
    venv = os.path.dirname(os.path.dirname(os.path.abspath(python)))
    if os.path.exists(os.path.join(venv, "pyvenv.cfg")):
        paths.add(venv)
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        paths.add(sys.prefix)
        spec = importlib.util.find_spec("awslambdaric")
        if spec is not None and spec.origin:
            paths.add(os.path.dirname(os.path.dirname(spec.origin)))
    return sorted(paths)


def start_runtime(layer_dir: str, task_dir: str, env: Dict[str, str],
                  python: str = sys.executable, handler: str = "handler.handler",
                  python_flags: Sequence[str] = ()) -> Runtime:
    """Start ``python -m awslambdaric handler`` with ``/opt`` = layer, ``/var/task`` = task."""
    scratch = tempfile.mkdtemp(prefix="spaps-lambda-")
    log = tempfile.TemporaryFile()  # noqa: SIM115 - owned by the Runtime, closed in stop()
    read_end, write_end = os.pipe()
    command = [
        "unshare", "--mount", "--propagation", "private", "--",
        sys.executable, "-I", "-S", os.path.abspath(__file__), "enter",
        os.path.abspath(layer_dir), os.path.abspath(task_dir), scratch, str(write_end),
        os.pathsep.join(_runtime_paths(python)),
        "--", python, *python_flags, "-m", "awslambdaric", handler,
    ]
    try:
        process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, pass_fds=(write_end,))
    finally:
        os.close(write_end)
    with os.fdopen(read_end, "rb") as stamp:
        line = stamp.read()
    if not line.startswith(b"exec "):
        process.wait(timeout=30)
        log.seek(0)
        shutil.rmtree(scratch, ignore_errors=True)
        raise RuntimeError(f"the sandbox did not start:\n{log.read().decode(errors='replace')}")
    return Runtime(process, int(line.split()[1]), log, scratch)


# --- inside the namespace ---


def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"lambda_sandbox: mount {' '.join(args)}: {done.stderr.strip()}")


def _mount_points() -> List[str]:
    points = []
    with open("/proc/self/mountinfo", encoding="utf-8") as handle:
        for line in handle:
            raw = line.split()[4]
            points.append(raw.encode().decode("unicode_escape"))  # \040 and friends
    return points


def _check_read_only(path: str) -> None:
    probe = os.path.join(path, f".spaps-write-probe-{os.getpid()}")
    try:
        with open(probe, "w"):
            pass
    except OSError as exc:
        if exc.errno == errno.EROFS:
            return
        raise SystemExit(f"lambda_sandbox: {path}: expected EROFS, got {exc}") from None
    os.unlink(probe)
    raise SystemExit(f"lambda_sandbox: {path} is writable in the sandbox")


def _under_tmp(path: str) -> bool:
    return path == "/tmp" or path.startswith("/tmp/")


def enter(layer: str, task: str, scratch: str, stamp_fd: int, keep: List[str],
          argv: List[str]) -> None:
    # What the runtime itself needs (``keep``: the interpreter, its venv and stdlib): made
    # read-only like the rest, and carried over if it lives under /tmp, replaced below.
    carried = {path: os.open(path, os.O_RDONLY | os.O_DIRECTORY)
               for path in keep if _under_tmp(os.path.realpath(path))}
    # A private tmpfs for the overlay's upper and work directories, then /var as an overlay
    # so that /var/task can be made without touching the host's /var.
    _mount("-t", "tmpfs", "-o", "mode=0700", "spaps-scratch", scratch)
    os.makedirs(os.path.join(scratch, "upper"))
    os.makedirs(os.path.join(scratch, "work"))
    _mount("-t", "overlay", "overlay", "-o",
           f"lowerdir=/var,upperdir={scratch}/upper,workdir={scratch}/work", "/var")
    os.makedirs("/var/task", exist_ok=True)
    _mount("--bind", task, "/var/task")
    _mount("--bind", layer, "/opt")
    _mount("-t", "tmpfs", "-o", "mode=1777,size=512m", "lambda-tmp", "/tmp")
    for path, fd in carried.items():
        target = os.path.realpath(path)
        os.makedirs(target, exist_ok=True)
        _mount("--no-canonicalize", "--bind", f"/proc/{os.getpid()}/fd/{fd}", target)
        os.close(fd)
    for point in _mount_points():
        if point == "/tmp" or point.startswith(("/proc", "/sys", "/dev")):
            continue
        if _under_tmp(point) and not os.path.isdir(point):
            continue  # hidden under the new /tmp (our scratch): nothing can reach it
        _mount("-o", "remount,bind,ro", point)
    for path in ("/", "/opt", "/opt/python", "/var/task", "/var", *keep,
                 os.environ.get("HOME", "/root")):
        if os.path.isdir(path):
            _check_read_only(path)
    for directory in os.listdir("/tmp"):  # only what was carried over: Lambda's /tmp is empty
        if not any(os.path.realpath(path).startswith(f"/tmp/{directory}") for path in carried):
            raise SystemExit(f"lambda_sandbox: /tmp is not empty: {directory}")
    probe = f"/tmp/.spaps-probe-{os.getpid()}"
    with open(probe, "w") as handle:
        handle.write("ok")
    os.unlink(probe)
    os.chdir("/var/task")
    os.write(stamp_fd, f"exec {time.monotonic_ns()}\n".encode())
    os.close(stamp_fd)
    os.execve(argv[0], argv, dict(os.environ))


if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) < 8 or args[0] != "enter" or args[6] != "--":
        raise SystemExit("usage: lambda_sandbox.py enter LAYER TASK SCRATCH FD KEEP -- PYTHON ...")
    enter(args[1], args[2], args[3], int(args[4]), args[5].split(os.pathsep), args[7:])
