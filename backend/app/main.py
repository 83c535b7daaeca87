"""The ASA service: ``create_app()`` builds the FastAPI application; ``lifespan`` owns resources.

Run it with ``make run`` (or ``uvicorn app.main:app`` from ``backend/``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from app.api.auth import current_principal, start_access_control
from app.api.guards import BodySizeLimitMiddleware
from app.api.v1.admin_keys import router as admin_keys_router
from app.api.v1.admin_prices import router as admin_prices_router
from app.api.v1.health import router as health_router
from app.api.v1.limits import router as limits_router
from app.api.v1.notifications import router as notifications_router
from app.api.v1.tasks import router as tasks_router
from app.api.v1.usage import router as usage_router
from app.api.v1.usage_forecast import router as usage_forecast_router
from app.core.config import Settings, get_settings
from app.core.errors import install_error_handlers
from app.core.heap import freeze_startup_heap
from app.core.migrations import upgrade_to_head
from app.core.redaction import install_log_redaction
from app.core.runtime import Runtime, set_runtime
from app.gateway.proxy import Gateway
from app.gateway.routes import router as gateway_router
from app.observability import check_metrics_mode, setup_telemetry
from app.schemas.errors import ERROR_RESPONSES
from app.tasks.examples import materialize_examples
from app.web.mount import install_console

logger = logging.getLogger("app")
# Every /api route needs a principal, including routes added later that forget to ask for one.
AUTHENTICATED = [Depends(current_principal)]


def create_app(settings: Settings | None = None) -> FastAPI:
    """The application; every resource is built in its lifespan, nothing at import time."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        cfg = settings or get_settings()
        _configure_logging()
        stop_redacting_logs = install_log_redaction(cfg.secret_values)
        check_metrics_mode(cfg)  # several processes, one /metrics (docs/DEPLOYMENT.md)
        if cfg.auto_migrate:
            upgrade_to_head(cfg.database_url)
        runtime = Runtime.build(cfg)
        try:
            app.state.access = start_access_control(cfg, runtime.session_factory)
        except BaseException:
            runtime.close()
            stop_redacting_logs()
            raise
        telemetry = setup_telemetry(cfg, app=app, engine=runtime.engine)
        try:
            app.state.gateway = Gateway.build(runtime, app.state.access)  # /v1 (app/gateway)
        except BaseException:
            telemetry.shutdown()
            runtime.close()
            stop_redacting_logs()
            raise
        app.state.runtime = runtime
        set_runtime(runtime)
        materialize_examples(cfg.examples_dir)
        runtime.start_jobs()
        if runtime.db_worker.process is not None:
            runtime.db_worker.process.start()  # ready before the first async calls need it
        freeze_startup_heap()  # full collections then skip it (app/core/heap.py)
        logger.info(
            "ASA ready: database %s, LLM endpoint %s",
            runtime.engine.url.render_as_string(hide_password=True),
            runtime.llm_endpoint,
        )
        try:
            yield
        finally:
            runtime.stop_jobs()
            set_runtime(None)
            try:
                await app.state.gateway.aclose()
                await runtime.async_openai_client.close()
            finally:
                runtime.close()  # the final spool replay happens here, whatever failed above
                telemetry.shutdown()
            stop_redacting_logs()

    app = FastAPI(
        title="ASA — Automated Software Agent",
        version="0.1.0",
        description="Submit a bug, get a verified patch, and know what every LLM call cost.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware)
    app.include_router(health_router)
    # The OpenAI-compatible gateway: its own keys check and OpenAI-shaped errors (app/gateway).
    app.include_router(gateway_router)
    app.include_router(limits_router, dependencies=AUTHENTICATED, responses=ERROR_RESPONSES)
    app.include_router(tasks_router, dependencies=AUTHENTICATED, responses=ERROR_RESPONSES)
    # Before the usage router: its fixed path must win over any /usage/{...} route added there.
    app.include_router(usage_forecast_router, dependencies=AUTHENTICATED, responses=ERROR_RESPONSES)
    app.include_router(usage_router, dependencies=AUTHENTICATED, responses=ERROR_RESPONSES)
    app.include_router(admin_keys_router, dependencies=AUTHENTICATED, responses=ERROR_RESPONSES)
    app.include_router(admin_prices_router, dependencies=AUTHENTICATED, responses=ERROR_RESPONSES)
    app.include_router(notifications_router, dependencies=AUTHENTICATED, responses=ERROR_RESPONSES)
    install_console(app)  # the web console at / (app/web), outside the OpenAPI schema
    return app


def _configure_logging() -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )


app = create_app()
