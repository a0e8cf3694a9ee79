"""One host of a fleet, for ``tests/test_fleet.py``: its own Python process, its own User-Agent.

Run as ``python tests/fleet_worker.py '<json config>'``. The config names the SPAPS server
(``url``, ``api_key``), the Redis server (``redis_port``), the shared token ``key``, this host's
number ``host`` (the client is built with ``app_info=f"fleet-host-{host}"`` unless the config
names an ``app_info``, so the server sees a different User-Agent per worker), the lease
(``lock_timeout``, ``lock_wait``) and a ``mode``:

``call``
    print ``ready``, wait on the barrier (``BLPOP <barrier>``, bounded by ``barrier_timeout``),
    then make one call, ``sessions.get_current_session()``;
``stall``
    make the call at once, but stall inside ``storage.lock()`` right after taking the Redis
    lease, before any refresh is sent: print ``holding`` and sleep until killed.

Before taking the lease a worker prints ``lock-wait``. The last stdout line is a JSON report:
``ok``, ``session_id``, ``error_code``, ``error``, ``refreshes`` (POST /api/auth/refresh
requests this process sent, seen through ``LoggingHooks.on_request``),
``refresh_user_agents``, ``refresh_statuses`` and ``lock_entries`` (leases it took).
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import redis  # noqa: E402

from spaps_client import LoggingHooks, RedisTokenStorage, SpapsClient, SpapsError  # noqa: E402

REFRESH_PATH = "/api/auth/refresh"


class FleetRedisTokenStorage(RedisTokenStorage):
    """The real ``RedisTokenStorage``, telling the test when this host goes for the lease.

    Prints ``lock-wait`` before taking the lease and counts the leases taken. With
    ``stall=True`` it stalls right after taking the lease, before the client can send a
    refresh: it prints ``holding`` and sleeps until killed (a host that hangs mid-refresh).
    """

    def __init__(self, *args: Any, stall: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stall = stall
        self.entries = 0

    @contextmanager
    def lock(self) -> Iterator[None]:  # type: ignore[override]
        print("lock-wait", flush=True)
        with super().lock():
            self.entries += 1
            if self.stall:
                print("holding", flush=True)
                time.sleep(120)  # the test kills us long before this ends
            yield


def main() -> int:
    config: Dict[str, Any] = json.loads(sys.argv[1])
    host = int(config["host"])
    connection = redis.Redis(host="127.0.0.1", port=int(config["redis_port"]),
                             socket_timeout=5, socket_connect_timeout=5)
    storage = FleetRedisTokenStorage(connection, key=config["key"],
                                     lock_timeout=float(config["lock_timeout"]),
                                     lock_wait=float(config["lock_wait"]),
                                     stall=config["mode"] == "stall")

    refreshes: List[str] = []
    statuses: List[int] = []

    def on_request(request: Any) -> None:
        if request.method == "POST" and request.url.split("?")[0].endswith(REFRESH_PATH):
            agents = [v for k, v in request.headers.items() if k.lower() == "user-agent"]
            refreshes.append(agents[0] if agents else "")

    def on_response(request: Any, response: Any, elapsed: float, attempt: int) -> None:
        if request.method == "POST" and request.url.split("?")[0].endswith(REFRESH_PATH):
            statuses.append(response.status_code)

    report: Dict[str, Any] = {"host": host, "ok": False, "session_id": None,
                              "error_code": None, "error": None}
    with SpapsClient(base_url=config["url"], api_key=config["api_key"], token_storage=storage,
                     app_info=config.get("app_info") or f"fleet-host-{host}",
                     request_timeout=float(config.get("request_timeout", 30.0)),
                     logging_hooks=LoggingHooks(on_request=on_request,
                                                on_response=on_response)) as spaps:
        if config["mode"] == "call":
            print("ready", flush=True)
            released = connection.blpop([config["barrier"]], timeout=config["barrier_timeout"])
            if released is None:
                report["error"] = "barrier timeout"
                print(json.dumps(report), flush=True)
                return 2
        try:
            report["session_id"] = spaps.sessions.get_current_session().session_id
            report["ok"] = True
        except SpapsError as exc:
            report["error_code"] = exc.error_code
            report["error"] = f"{type(exc).__name__}: {exc}"
    report["refreshes"] = len(refreshes)
    report["refresh_user_agents"] = refreshes
    report["lock_entries"] = storage.entries
    report["refresh_statuses"] = statuses
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
