"""A single-file Django API whose endpoints are protected by SPAPS. Guide: docs/backend.md.

    SPAPS_API_URL=... SPAPS_API_KEY=... python django_app.py runserver

``GET /api/me`` needs a valid bearer token; ``GET /api/reports`` also the ``pro`` entitlement.
Settings, URLs and views all live here; in a project they go to settings.py, urls.py and an
app's views.py, and ``start_spaps()`` to ``AppConfig.ready()`` or wsgi.py.
"""

from __future__ import annotations

import atexit
import functools
import os
import secrets
import sys
from typing import Any, Callable, Optional

import django
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import path

# Run from a checkout: spaps_auth is next door, the client two levels up (as quickstart.py).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from spaps_auth import AuthProblem, SpapsGuard, TokenCache, client_settings

from spaps_client import SpapsClient

if not settings.configured:
    settings.configure(
        DEBUG=False,
        # Nothing here is signed (no sessions, no CSRF): a per-process key does.
        SECRET_KEY=os.environ.get("DJANGO_SECRET_KEY") or secrets.token_urlsafe(50),
        ALLOWED_HOSTS=["localhost", "127.0.0.1", "testserver"],
        ROOT_URLCONF=__name__,
        INSTALLED_APPS=[],
        MIDDLEWARE=[],
        DATABASES={},
    )
    django.setup()

_guard: Optional[SpapsGuard] = None


def start_spaps(*, cache: Optional[TokenCache] = None, **client_options: Any) -> SpapsGuard:
    """Build the process's one SPAPS client (call once, at startup)."""
    global _guard
    stop_spaps()
    _guard = SpapsGuard(SpapsClient(**client_settings(**client_options)), cache)
    return _guard


def stop_spaps() -> None:
    """Close the shared client (at shutdown)."""
    global _guard
    if _guard is not None:
        _guard.client.close()
        _guard = None


atexit.register(stop_spaps)

View = Callable[..., HttpResponse]


def protected(entitlement: Optional[str] = None) -> Callable[[View], View]:
    """Only callers with a valid SPAPS token (and ``entitlement``); sets
    ``request.spaps_user`` (not ``request.user``, which belongs to django.contrib.auth)."""
    def decorate(view: View) -> View:
        @functools.wraps(view)
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if _guard is None:
                raise RuntimeError("call start_spaps() at startup")
            try:
                user = _guard.authenticate(request.headers.get("Authorization"))
                if entitlement:
                    _guard.require_entitlement(user, entitlement)
            except AuthProblem as problem:
                return JsonResponse(problem.body(), status=problem.status,
                                    headers=problem.headers)
            request.spaps_user = user
            return view(request, *args, **kwargs)
        return wrapper
    return decorate


@protected()
def me(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"id": request.spaps_user.id, "email": request.spaps_user.email})


@protected(entitlement="pro")
def reports(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"user": request.spaps_user.id, "reports": ["2024-q1", "2024-q2"]})


urlpatterns = [path("api/me", me), path("api/reports", reports)]


if __name__ == "__main__":
    from django.core.management import execute_from_command_line

    start_spaps()
    execute_from_command_line(sys.argv)
