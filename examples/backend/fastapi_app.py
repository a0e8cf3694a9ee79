"""A FastAPI (ASGI) API whose endpoints are protected by SPAPS. Guide: docs/backend.md.

    SPAPS_API_URL=... SPAPS_API_KEY=... uvicorn fastapi_app:app

``GET /api/me`` needs a valid bearer token; ``GET /api/reports`` also the ``pro`` entitlement.
It uses ``AsyncSpapsClient``: SPAPS calls are awaited, so the event loop never blocks, and they
run on the client's own worker threads rather than in the thread pool that FastAPI shares
with every sync endpoint and dependency.
"""

from __future__ import annotations

import os
import sys
from contextlib import asynccontextmanager
from typing import Annotated, Any, AsyncIterator, Callable, Coroutine, Optional

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse

# Run from a checkout: spaps_auth is next door, the client two levels up (as quickstart.py).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from spaps_auth import AsyncSpapsGuard, AuthProblem, TokenCache, client_settings

from spaps_client import AsyncSpapsClient, UserProfile


async def current_user(request: Request) -> UserProfile:
    guard: AsyncSpapsGuard = request.app.state.spaps
    return await guard.authenticate(request.headers.get("authorization"))


def entitled(key: str) -> Callable[..., Coroutine[Any, Any, UserProfile]]:
    async def dependency(request: Request,
                         user: Annotated[UserProfile, Depends(current_user)]) -> UserProfile:
        await request.app.state.spaps.require_entitlement(user, key)
        return user
    return dependency


User = Annotated[UserProfile, Depends(current_user)]
ProUser = Annotated[UserProfile, Depends(entitled("pro"))]


def create_app(*, cache: Optional[TokenCache] = None, **client_options: Any) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # One client for the whole process: opened at startup, closed at shutdown.
        client = AsyncSpapsClient(**client_settings(**client_options))
        app.state.spaps = AsyncSpapsGuard(client, cache)
        try:
            yield
        finally:
            await client.aclose()

    app = FastAPI(lifespan=lifespan)

    @app.exception_handler(AuthProblem)
    async def auth_problem(request: Request, problem: AuthProblem) -> JSONResponse:
        return JSONResponse(problem.body(), status_code=problem.status, headers=problem.headers)

    @app.get("/api/me")
    async def me(user: User) -> dict[str, Any]:
        return {"id": user.id, "email": user.email}

    @app.get("/api/reports")
    async def reports(user: ProUser) -> dict[str, Any]:
        return {"user": user.id, "reports": ["2024-q1", "2024-q2"]}

    return app


app = create_app()  # for `uvicorn fastapi_app:app`; the client is built when it starts
