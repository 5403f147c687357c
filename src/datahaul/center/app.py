"""The center's HTTP app: the file API, the dashboard, its feed, and /metrics."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog
from aiohttp import web
from prometheus_client import REGISTRY

from datahaul import metrics
from datahaul.center import files, openapi
from datahaul.center.errors import ApiError
from datahaul.center.live import LiveView, PipelineCollector
from datahaul.center.service import Center
from datahaul.config import Settings

log = structlog.get_logger("datahaul.center")

STATIC = Path(__file__).parent / "static"
LIVE_KEY = web.AppKey("live", LiveView)
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8090

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_pipeline_collector: PipelineCollector | None = None


def create_app(settings: Settings) -> web.Application:
    center = Center(settings)
    live = LiveView(center)
    app = web.Application(middlewares=[count_requests, errors_as_json])
    app[files.CENTER_KEY] = center
    app[LIVE_KEY] = live

    files.register(app)
    app.router.add_get("/", dashboard, name="dashboard")
    app.router.add_static("/static/", STATIC, name="static")
    app.router.add_get("/v1/live", live_feed, name="live")
    app.router.add_get("/openapi.json", openapi_document, name="openapi")
    app.router.add_get("/healthz", healthz, name="healthz")
    app.router.add_get("/metrics", scrape, name="metrics")
    _serve_pipeline_metrics(live)

    app.on_startup.append(_start)
    app.on_cleanup.append(_stop)
    return app


def _serve_pipeline_metrics(live: LiveView) -> None:
    """Register the center's metrics once per process; follow the newest app."""
    global _pipeline_collector
    metrics.use(metrics.CENTER)
    if _pipeline_collector is None:
        _pipeline_collector = PipelineCollector(live)
        REGISTRY.register(_pipeline_collector)
    _pipeline_collector.view = live


async def _start(app: web.Application) -> None:
    await app[files.CENTER_KEY].start()


async def _stop(app: web.Application) -> None:
    await app[files.CENTER_KEY].close()


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every refusal is JSON that names what was wrong and what to do."""
    try:
        return await handler(request)
    except ApiError as exc:
        if exc.status >= 500:
            log.error("center.request_failed", path=request.path, reason=exc.reason)
            metrics.CENTER.error(exc.error)
        return web.json_response(exc.to_json(), status=exc.status, headers=exc.headers)
    except web.HTTPNotFound:
        return web.json_response(
            {
                "error": "NotFound",
                "field": "path",
                "reason": f"no route {request.path}; see /openapi.json for the API",
            },
            status=404,
        )


@web.middleware
async def count_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await handler(request)
    route = request.match_info.route.name or "unmatched"
    metrics.CENTER.requests.labels(route, str(response.status)).inc()
    return response


async def dashboard(request: web.Request) -> web.FileResponse:
    return web.FileResponse(
        STATIC / "index.html", headers={"Cache-Control": "no-cache"}
    )


async def live_feed(request: web.Request) -> web.Response:
    snapshot = await request.app[LIVE_KEY].snapshot()
    return web.json_response(snapshot, headers={"Cache-Control": "no-store"})


async def openapi_document(request: web.Request) -> web.Response:
    return web.json_response(openapi.document())


async def healthz(request: web.Request) -> web.Response:
    center = request.app[files.CENTER_KEY]
    return web.json_response({"status": "ok", "broker": center.broker.to_json()})


async def scrape(request: web.Request) -> web.Response:
    # The pipeline's figures come from a snapshot: take a fresh one first.
    await request.app[LIVE_KEY].snapshot()
    response = web.Response(body=metrics.exposition())
    response.headers["Content-Type"] = metrics.CONTENT_TYPE
    return response


def run(settings: Settings, host: str, port: int) -> None:
    """Serve until interrupted."""
    app = create_app(settings)
    log.info("center.listening", host=host, port=port, url=f"http://{host}:{port}/")
    web.run_app(
        app, host=host, port=port, print=None, access_log=None, handle_signals=True
    )
