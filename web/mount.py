"""What the process composition (coordinator/app.py) mounts for the web app: its routes,
the static files, the Jinja template engine, the session store and the `WebGate`
middleware (sessions + CSRF, web/sessions.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.middleware import DefineMiddleware
from litestar.static_files import create_static_files_router
from litestar.template.config import TemplateConfig

from api.services import ApiServices
from web.login_links import LoginLinks
from web.pages import STATIC_DIR, TEMPLATE_DIR, web_router
from web.sessions import SESSION_STORE, WebGate, gate_kwargs, session_store
from web.settings import WebSettings

STATIC_PATH = "/static/web"


@dataclass
class WebParts:
    handlers: list = field(default_factory=list)
    middleware: list = field(default_factory=list)
    stores: dict[str, Any] = field(default_factory=dict)
    template_config: TemplateConfig | None = None


def _filters(engine: JinjaTemplateEngine) -> None:
    def credits(value: Any) -> str:
        text = f"{value:,.6f}".rstrip("0").rstrip(".")
        return text or "0"

    engine.engine.filters["credits"] = credits


def web_parts(services: ApiServices, ws: WebSettings, islands: Any = None) -> WebParts:
    if not ws.enabled:
        return WebParts()
    links = LoginLinks(services.coordinator.committer)
    statics = create_static_files_router(path=STATIC_PATH, directories=[STATIC_DIR], opt={"own_auth": True},
                                         include_in_schema=False,
                                         cache_control=None)
    tc = TemplateConfig(directory=TEMPLATE_DIR, engine=JinjaTemplateEngine, engine_callback=_filters)
    store = session_store(services.settings.redis_url, services.settings.api.redis_prefix)
    return WebParts(handlers=[web_router(services, ws, links, islands), statics],
                    middleware=[DefineMiddleware(WebGate, **gate_kwargs(ws))],
                    stores={SESSION_STORE: store}, template_config=tc)
