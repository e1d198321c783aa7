"""The browser's side of `podembed serve`: the dashboard at `/`, its data at `/fleet`, `/metrics`, and `/docs`.

The dashboard is one HTML page and one script (`producer/web/static/`), served with a Content-Security-Policy
that allows nothing but this server: it reads `/fleet`, `/fleet/ledger` and the same `/jobs` routes the CLI's commands
mirror, with the token the person types once (kept in the tab's sessionStorage, sent as a bearer header,
never in a URL). The page and its script hold no data, so they need no token; `/fleet` does, and so does
`/metrics` unless `PODEMBED_METRICS_PUBLIC=1`. `/docs` is Swagger UI from the `swagger-ui-bundle-v2`
package (Apache-2.0), so it renders without internet.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import swagger_ui_bundle
from fastapi import Depends, FastAPI, Response
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from config.settings import Settings
from producer import fleet
from producer.job_status import JobState
from producer.jobs import JobRecords
from producer.web.metrics import metrics_registry

STATIC = Path(__file__).parent / "static"
SWAGGER_UI = "/static/swagger-ui"
# The dashboard loads and connects to nothing but this server.
DASHBOARD_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
                    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def add_browser_routes(app: FastAPI, settings: Settings, records: JobRecords, authorize: Callable[..., None]) -> None:
    """Add the dashboard, `/fleet`, `/metrics` and the offline `/docs` to the API (`authorize`: its token check)."""
    registry = metrics_registry(settings, records)
    guarded = [Depends(authorize)]
    unauthorized = {401: {"description": "missing or wrong bearer token"}}

    @app.get("/", include_in_schema=False)
    def dashboard() -> FileResponse:
        return FileResponse(STATIC / "dashboard.html", headers={"Content-Security-Policy": DASHBOARD_POLICY,
                                                                "Cache-Control": "no-store"})

    @app.get("/fleet", tags=["operating"], dependencies=guarded, responses=unauthorized)
    def read_fleet() -> dict:
        """Queues and workers now, and the states in which a job has ended: the dashboard's data besides the jobs."""
        now = datetime.now(UTC)
        workers = fleet.read_workers(settings, records.redis, records.db, now)
        return {
            "now": now.isoformat(timespec="seconds"),
            "queues": [asdict(q) for q in fleet.read_queues(settings, records.redis, now)],
            "workers": [asdict(w) for w in workers.live],
            "workers_lost": workers.lost,
            "ended_states": sorted(JobState.ENDED),
        }

    @app.get("/fleet/ledger", tags=["operating"], dependencies=guarded, responses=unauthorized)
    def read_ledger() -> list[dict]:
        """Chunks/s and $/h of compute per 15 minutes over the last 24 h, oldest first, from the ledger
        (the latest 20,000 batches at most)."""
        return fleet.ledger_series(records.db, datetime.now(UTC))

    @app.get("/metrics", tags=["operating"], dependencies=[] if settings.metrics_public else guarded,
             responses=unauthorized, response_class=Response)
    def metrics() -> Response:
        """Prometheus text format, read from Redis and MongoDB at each scrape (README, "Operating it")."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} - API",
                                   swagger_js_url=f"{SWAGGER_UI}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{SWAGGER_UI}/swagger-ui.css",
                                   swagger_favicon_url=f"{SWAGGER_UI}/favicon-32x32.png")

    app.mount(SWAGGER_UI, StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="swagger-ui")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
