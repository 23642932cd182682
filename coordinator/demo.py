"""`coordinator demo`: the coordinator on the embedded default with three local reference
Islands (fast chat in eu-west, slow chat in us-east, an image Island), a demo account with
credits and KYC, and a printed base URL, API key and SDK snippet. Ctrl-C stops everything
cleanly. Starting it twice reuses the account, its key and the Islands (their ids and
tokens are kept in `$COORDINATOR_DATA_DIR/demo.json`)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import structlog

from config.settings import Settings

log = structlog.get_logger("coordinator.demo")

CONSUMER_EMAIL = "demo@archipelag.io"
OWNER_EMAIL = "islands@demo.archipelag.io"
CONSUMER_CREDITS_MICRO = 100_000_000
ISLANDS = (
    # name, backend, capabilities, backend options
    ("demo-chat-fast-eu", "echo", {"region": "eu-west", "hardware_tier": 3, "vram_mb": 24_576, "ram_mb": 65_536,
                                   "slots": 4}, {"tokens_per_s": 60.0}),
    ("demo-chat-slow-us", "echo", {"region": "us-east", "hardware_tier": 1, "vram_mb": 8_192, "ram_mb": 16_384,
                                   "slots": 2}, {"tokens_per_s": 12.0}),
    ("demo-image-eu", "image", {"region": "eu-west", "hardware_tier": 3, "vram_mb": 24_576, "ram_mb": 65_536,
                                "slots": 1}, {"steps_per_s": 15.0}),
)


def _load_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _save_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.chmod(tmp, 0o600)  # it holds an API key and Island tokens
    tmp.replace(path)


def _ensure_account(c: Any, email: str, *, kyc: bool, credits_micro: int) -> uuid.UUID:
    from ledger.errors import AccountExists
    from ledger.service import account_id_for_email

    account_id = account_id_for_email(email)
    try:
        c.ledger.open_account(account_id, email, kyc_verified=kyc, initial_grant_micro=credits_micro)
    except AccountExists:
        pass
    return account_id


def _backend(kind: str, options: dict[str, Any], slots: int) -> Any:
    from island.backends import EchoBackend, ImageBackend

    if kind == "image":
        return ImageBackend(slots=slots, **options)
    return EchoBackend(slots=slots, **options)


def prepare(services: Any, state_path: Path) -> dict[str, Any]:
    """Accounts, API key and Islands, created once and reused."""
    from protocol.island import make_token

    c = services.coordinator
    state = _load_state(state_path)
    consumer = _ensure_account(c, CONSUMER_EMAIL, kyc=True, credits_micro=CONSUMER_CREDITS_MICRO)
    owner = _ensure_account(c, OWNER_EMAIL, kyc=True, credits_micro=0)
    key = state.get("api_key")
    if not key or not _key_works(services, key):
        key, _info = services.keys.issue(consumer, "demo")
    islands = []
    known = {i["name"]: i for i in state.get("islands", [])}
    for name, kind, caps, options in ISLANDS:
        entry = known.get(name)
        if entry and c.scheduler.island_by_token(uuid.UUID(entry["island_id"]), entry["token"]) is not None:
            islands.append(entry)
            continue
        island_id = uuid.uuid4()
        backend = _backend(kind, options, caps["slots"])
        full_caps = {**_caps_dict(backend.default_capabilities()), **caps}
        creds = c.scheduler.register_island(owner, name, full_caps, approve=True, island_id=island_id,
                                            token=make_token(island_id))
        islands.append({"name": name, "island_id": creds.island_id, "token": creds.token})
    state = {"account_id": str(consumer), "api_key": key, "islands": islands}
    _save_state(state_path, state)
    return state


def _caps_dict(caps: Any) -> dict[str, Any]:
    import msgspec

    raw = msgspec.to_builtins(caps)
    return {k: v for k, v in raw.items() if k in ("cargos", "models", "vram_mb", "ram_mb", "cpu_cores", "gpu_model",
                                                  "region", "platform", "hardware_tier", "slots", "asks")}


def _key_works(services: Any, key: str) -> bool:
    try:
        asyncio.run(services.authenticator.authenticate(key))
        return True
    except Exception:  # noqa: BLE001 - revoked, unknown, or from another data dir
        return False


def run_demo(host: str = "127.0.0.1", port: int = 8000) -> int:
    from coordinator.app import build_services
    from coordinator.logs import configure_logging
    from coordinator.server import make_server, tune_gc
    from coordinator.wiring import build
    from island.agent import AgentConfig, run_agents

    settings = Settings.from_env()
    configure_logging(settings.log_format, "warning")
    settings = dataclasses.replace(
        settings, scheduler=dataclasses.replace(settings.scheduler, auto_approve_islands=True),
        api=dataclasses.replace(settings.api, projections="thread"))
    c = build(settings)
    services = build_services(settings, coordinator=c)
    state = prepare(services, settings.data_dir / "demo.json")
    tune_gc()
    server = make_server(services, host, port)
    server_thread = threading.Thread(target=server.run, name="http", daemon=True)
    server_thread.start()
    deadline = time.monotonic() + 30
    while not server.started and server_thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not server.started:
        print(f"coordinator demo: the server did not start on {host}:{port} (port in use? try --port)")
        c.close()
        return 1
    base = f"http://{host}:{port}"
    from web.login_links import LoginLinks

    link_token, _ = LoginLinks(c.committer).issue(uuid.UUID(state["account_id"]), ttl_s=3600, by="demo")
    configs = []
    for (name, kind, caps, options), entry in zip(ISLANDS, state["islands"], strict=True):
        backend = _backend(kind, options, caps["slots"])
        agent_caps = backend.default_capabilities()
        for attr, value in caps.items():
            setattr(agent_caps, attr, value)
        configs.append(AgentConfig(server=base, token=entry["token"], backend=backend, capabilities=agent_caps,
                                   grace_s=5.0, agent_name=f"demo {name}"))
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    agents_thread = threading.Thread(target=lambda: loop.run_until_complete(run_agents(configs, stop)),
                                     name="islands", daemon=True)
    agents_thread.start()
    print(f"""
Archipelag coordinator demo — {settings.store.describe()}

  base URL : {base}/api/v1        (OpenAPI: {base}/api/v1/schema)
  API key  : {state['api_key']}
  Web app  : {base}/login/link/{link_token}   (one-time sign-in link, 1 hour; or sign in at {base}/login with the key)
  Islands  : {', '.join(i['name'] for i in state['islands'])}

Try it with the Python SDK (pip install archipelag):

  from archipelag import Client
  client = Client(api_key="{state['api_key']}", base_url="{base}/api/v1")
  print(client.chat("Hello from the demo!"))

or with curl:

  curl -s {base}/api/v1/jobs -H "Authorization: Bearer {state['api_key']}" \\
       -H 'Content-Type: application/json' -d '{{"workload": "llm-chat", "input": {{"prompt": "Hello"}}}}'

Ctrl-C stops the demo.""", flush=True)
    stopping = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stopping.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stopping.is_set() and server_thread.is_alive():
            stopping.wait(0.5)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        print("\nstopping: Islands finish or return their Jobs, then the server drains…", flush=True)
        loop.call_soon_threadsafe(stop.set)
        agents_thread.join(15)
        server.should_exit = True
        server_thread.join(30)
        c.close()
    print("stopped.")
    return 0
