"""A Flask (WSGI) API whose endpoints are protected by SPAPS. Guide: docs/backend.md.

    SPAPS_API_URL=... SPAPS_API_KEY=... flask --app flask_app run

``GET /api/me`` needs a valid bearer token; ``GET /api/reports`` also the ``pro`` entitlement.
"""

from __future__ import annotations

import atexit
import functools
import os
import sys
from typing import Any, Callable, Optional, TypeVar

from flask import Flask, current_app, g, jsonify, request

# Run from a checkout: spaps_auth is next door, the client two levels up (as quickstart.py).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from spaps_auth import AuthProblem, SpapsGuard, TokenCache, client_settings

from spaps_client import SpapsClient

View = TypeVar("View", bound=Callable[..., Any])


def protected(entitlement: Optional[str] = None) -> Callable[[View], View]:
    """Only callers with a valid SPAPS token (and ``entitlement``, if given); sets ``g.user``."""
    def decorate(view: View) -> View:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            guard: SpapsGuard = current_app.extensions["spaps"]
            g.user = guard.authenticate(request.headers.get("Authorization"))
            if entitlement:
                guard.require_entitlement(g.user, entitlement)
            return view(*args, **kwargs)
        return wrapper  # type: ignore[return-value]
    return decorate


def create_app(*, cache: Optional[TokenCache] = None, **client_options: Any) -> Flask:
    app = Flask(__name__)
    # One client for the whole process, built at startup: thread-safe, keep-alive pool,
    # the secret API key from the environment, no user tokens stored in it.
    spaps = SpapsClient(**client_settings(**client_options))
    atexit.register(spaps.close)  # WSGI has no shutdown hook; close at interpreter exit
    app.extensions["spaps"] = SpapsGuard(spaps, cache)

    @app.errorhandler(AuthProblem)
    def auth_problem(problem: AuthProblem) -> Any:
        return jsonify(problem.body()), problem.status, problem.headers

    @app.get("/api/me")
    @protected()
    def me() -> Any:
        return {"id": g.user.id, "email": g.user.email}

    @app.get("/api/reports")
    @protected(entitlement="pro")
    def reports() -> Any:
        return {"user": g.user.id, "reports": ["2024-q1", "2024-q2"]}

    return app


if __name__ == "__main__":
    create_app().run(port=8000)
