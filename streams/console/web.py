"""``autoglm console``: the aiohttp server of the ops page.

Routes::

    GET  /login?token=T   sets the HttpOnly, SameSite=Strict cookie, redirects to /  (public)
    GET  /static/<file>   the page's HTML/JS/CSS, shipped as package data            (public)
    GET  /                the page                                                   (token)
    GET  /api/state       everything the page shows, one JSON object                 (token)
    GET  /events          Server-Sent Events: snapshot, workers, points, command, dead_letter (token)
    POST /api/control     {"command", "model"?, "worker"?, "pipeline"?, "step"?, "params"?} -> publish
                                                                                     (token + same origin)

Every request but the public ones passes :func:`~autoglm.streams.console.guard.refusal`.
No page and no log line holds the token or the control key: the access log writes the
path without its query string, the key never leaves :class:`~autoglm.streams.console.feed.ConsoleFeed`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from importlib import resources
from typing import Any

import orjson
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from autoglm.processors.errors import AutoGLMError
from autoglm.streams.console.feed import ConsoleFeed
from autoglm.streams.console.guard import COOKIE_NAME, parse_control_form, refusal, token_matches
from autoglm.streams.console.state import ConsoleState

log = logging.getLogger(__name__)

STATIC = resources.files("autoglm.streams.console") / "static"
PUBLIC_PREFIXES = ("/login", "/static/")
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def now_ms() -> int:
    """Epoch milliseconds (status events carry the workers' epoch-ms clocks)."""
    return int(time.time() * 1000)


class PathOnlyAccessLogger(AbstractAccessLogger):
    """Access log without query strings (``/login?token=...`` must not reach a log)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info("%s %s %s %.1f ms", request.method, request.path, response.status, time * 1000.0)


class Console:
    """The console server: a :class:`ConsoleState` fed by a :class:`ConsoleFeed`, served over HTTP.

    Args:
        feed_factory: ``feed_factory(on_status, on_dead_letter) -> ConsoleFeed`` (tests pass a
            feed on their broker).
        token: the console token.
        ack_timeout_s: seconds after which a targeted worker without an ack shows ``missing``.
        tick_s: seconds between pushes of the worker table (ages, live/stale changes).
        state: the state (default: a fresh one, 15 minutes of history).
    """

    def __init__(self, feed_factory: Any, *, token: str, ack_timeout_s: float = 30.0, tick_s: float = 2.0,
                 state: ConsoleState | None = None):
        self.token = token
        self.ack_timeout_s = ack_timeout_s
        self.tick_s = tick_s
        self.state = state or ConsoleState()
        self.feed: ConsoleFeed = feed_factory(self._on_status, self._on_dead_letter)
        self._subscribers: set[asyncio.Queue] = set()
        self._announced: set[str] = set()
        self._ticker: asyncio.Task | None = None

    # -- feed callbacks ---------------------------------------------------------------

    def _on_status(self, doc: dict[str, Any]) -> None:
        updates = self.state.observe_status(doc)
        if updates:
            self._broadcast(*updates[1:])
            self._broadcast(self._workers_message())

    def _on_dead_letter(self, record: dict[str, Any]) -> None:
        update = self.state.observe_dead_letter(record)
        if update is not None:
            self._broadcast(update)

    def _workers_message(self) -> dict[str, Any]:
        now = now_ms()
        return {"type": "workers", "now_ms": now,
                "workers": [self.state.worker_view(w, now) for w in sorted(self.state.workers)],
                "models": self.state.models_view(now), "pipelines": self.state.pipelines_view(now)}

    def _broadcast(self, *messages: dict[str, Any]) -> None:
        for message in messages:
            data = orjson.dumps(message)
            for queue in list(self._subscribers):
                try:
                    queue.put_nowait(data)
                except asyncio.QueueFull:  # a browser that stopped reading: drop it, it reconnects
                    self._subscribers.discard(queue)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            now = now_ms()
            self.state.forget(now)
            self._broadcast(self._workers_message())
            for event_id, pending in self.state.commands.items():
                if event_id not in self._announced and pending.expired(now):
                    self._announced.add(event_id)
                    self._broadcast({"type": "command", "command": pending.view(now)})

    # -- lifecycle --------------------------------------------------------------------

    async def on_startup(self, app: web.Application) -> None:
        await self.feed.start()
        self._ticker = asyncio.ensure_future(self._tick())

    async def on_cleanup(self, app: web.Application) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
        await self.feed.stop()

    def app(self) -> web.Application:
        """The aiohttp application."""
        app = web.Application(middlewares=[self._guard], client_max_size=64 * 1024)
        app.router.add_get("/login", self.login)
        app.router.add_get("/", self.index)
        app.router.add_get("/api/state", self.api_state)
        app.router.add_get("/events", self.events)
        app.router.add_post("/api/control", self.control)
        app.router.add_get("/static/{name}", self.static)
        app.on_startup.append(self.on_startup)
        app.on_cleanup.append(self.on_cleanup)
        return app

    # -- middleware -----------------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if not request.path.startswith(PUBLIC_PREFIXES):
            refused = refusal(request.method, request.headers, request.cookies, self.token,
                              scheme=request.scheme, host=request.host)
            if refused is not None:
                status, reason = refused
                log.warning("console: refused %s %s: %s", request.method, request.path, reason)
                if request.path == "/" and status == 401:
                    raise web.HTTPFound("/login")
                response: web.StreamResponse = web.json_response({"error": reason}, status=status)
                response.headers.update(SECURITY_HEADERS)
                return response
        response = await handler(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    # -- handlers ---------------------------------------------------------------------

    async def login(self, request: web.Request) -> web.StreamResponse:
        """``?token=T``: a valid token sets the cookie and redirects to the page; otherwise the form."""
        given = request.query.get("token")
        if given is not None and token_matches(given, self.token):
            response = web.HTTPFound("/")
            response.set_cookie(COOKIE_NAME, self.token, httponly=True, samesite="Strict", path="/",
                                secure=request.secure)
            raise response
        body = (STATIC / "login.html").read_text()
        return web.Response(text=body, content_type="text/html", status=401 if given is not None else 200)

    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text=(STATIC / "index.html").read_text(), content_type="text/html",
                            headers={"Cache-Control": "no-store"})

    async def static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        types = {".js": "application/javascript", ".css": "text/css", ".html": "text/html"}
        kind = next((t for ext, t in types.items() if name.endswith(ext)), None)
        item = STATIC / name
        if kind is None or "/" in name or not item.is_file():
            raise web.HTTPNotFound()
        return web.Response(body=item.read_bytes(), content_type=kind)

    async def api_state(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=orjson.dumps(self.state.snapshot(now_ms())), content_type="application/json",
                            headers={"Cache-Control": "no-store"})

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-Sent Events (``text/event-stream``): one ``data:`` JSON message per update."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                               "X-Accel-Buffering": "no", **SECURITY_HEADERS})
        await response.prepare(request)
        queue: asyncio.Queue = asyncio.Queue(maxsize=2000)
        self._subscribers.add(queue)
        try:
            snapshot = dict(self.state.snapshot(now_ms()), type="snapshot")
            await response.write(b"retry: 2000\ndata: " + orjson.dumps(snapshot) + b"\n\n")
            while queue in self._subscribers:
                try:
                    data = await asyncio.wait_for(queue.get(), 15.0)
                except asyncio.TimeoutError:
                    await response.write(b": keep-alive\n\n")
                    continue
                await response.write(b"data: " + data + b"\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self._subscribers.discard(queue)
        return response

    async def control(self, request: web.Request) -> web.StreamResponse:
        """Publish one control event; 400 with ``ctl``'s message for an invalid one (nothing published)."""
        try:
            doc = await request.json(loads=orjson.loads)
        except ValueError:
            return web.json_response({"error": "the request body must be JSON"}, status=400)
        try:
            command, target, params = parse_control_form(doc)
            event = await self.feed.send(command, target, params)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        except AutoGLMError as exc:
            log.warning("console: control event not published: %s", exc)
            return web.json_response({"error": f"not published: {exc}"}, status=502)
        pending = self.state.command_sent(event_id=event.id, command=command, target=target, params=params,
                                          issued_ms=event.issued_ms, now_ms=now_ms(), timeout_s=self.ack_timeout_s)
        view = pending.view(now_ms())
        log.info("console: published %s %s %s (event %s), expecting %s", command, target or "all", params or "",
                 event.id, pending.expected)
        self._broadcast({"type": "command", "command": view})
        return web.json_response(view)
