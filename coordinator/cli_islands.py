"""`coordinator islands create|approve|suspend|list` (operators) and
`coordinator island run` (the reference Island agent). Added to coordinator/cli.py's parser by
`add_island_commands`; `island run` sets `standalone` so the CLI does not open the event
store for it (an Island needs only the coordinator's URL and its token)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import uuid
from typing import Any

from coordinator.cli_admin import add_island_action_parsers
from coordinator.cli_common import UsageError, _print


def _usage(message: str) -> Exception:
    return UsageError(message)


def _uuid(text: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise _usage(f"not an {what} id: {text!r}") from None


# ------------------------------------------------------------------ operators
def cmd_islands_create(c, args) -> int:
    from protocol.island import make_token
    from scheduler.commands import IslandExists
    from scheduler.registry import BadCapabilities

    owner = _uuid(args.owner, "account")
    name = args.name.strip()
    if not 0 < len(name) <= 128:
        raise _usage("--name must be 1..128 characters")
    caps: dict[str, Any] = {}
    if args.region:
        caps["region"] = args.region
    island_id = uuid.uuid4()
    try:
        creds = c.scheduler.register_island(owner, name, caps, approve=args.approve, island_id=island_id,
                                            token=make_token(island_id))
    except BadCapabilities as exc:
        raise _usage(str(exc)) from None
    except IslandExists:
        raise _usage(f"island {island_id} exists") from None
    approved = args.approve or c.settings.scheduler.auto_approve_islands
    _print({"island_id": creds.island_id, "name": name, "owner_account_id": str(owner),
            "approval": "approved" if approved else "pending", "token": creds.token,
            "note": "the token is shown once; run: coordinator island run --server URL --token TOKEN"})
    return 0


def cmd_islands_nats_credentials(c, args) -> int:
    """A new NATS password for a paired NATS Island, printed once (decision 0055). The old
    one stops working when the coordinator next writes the NATS authorization file."""
    from protocol.nats import nats_user
    from scheduler.commands import NotNatsIsland, NotYourJob
    from scheduler.pairing import hash_password, make_password

    island_id = _uuid(args.island_id, "island")
    password = make_password()
    try:
        c.scheduler.issue_nats_credential(island_id, nats_user=nats_user(str(island_id)),
                                          password_hash=hash_password(password), by=args.by or "operator")
    except (NotNatsIsland, NotYourJob) as exc:
        raise _usage(str(exc)) from None
    user = nats_user(str(island_id))
    _print({"island_id": str(island_id), "user": user, "password": password,
            "url": f"nats://{user}:{password}@NATS_HOST:4222",
            "note": "shown once; put it in the Island's NATS URL (its config's nats_url)"})
    return 0


def cmd_islands_list(c, args) -> int:
    """Every Island from the log (approval, online, karma, capabilities)."""
    from scheduler.dispatcher import ISLAND_TOPICS
    from scheduler.islands import Island, rebased_milli
    from store.factory import iter_log

    rows: dict[str, dict[str, Any]] = {}
    for _, ev in iter_log(c.app, topics=ISLAND_TOPICS):
        iid = str(ev.originator_id)
        if isinstance(ev, Island.Registered):
            rows[iid] = {"island_id": iid, "name": ev.name, "owner_account_id": ev.owner_account_id,
                         "approval": ev.approval, "online": False,
                         "karma_legacy": getattr(ev, "karma_start_milli", None) is None,
                         "karma_milli": rebased_milli(0) if getattr(ev, "karma_start_milli", None) is None
                         else ev.karma_start_milli,
                         "region": ev.capabilities.get("region", "unknown"),
                         "cargos": list(ev.capabilities.get("cargos", ())), "slots": ev.capabilities.get("slots", 1)}
            continue
        row = rows.get(iid)
        if row is None:
            continue
        if isinstance(ev, Island.Approved):
            row["approval"] = "approved"
        elif isinstance(ev, Island.Suspended):
            row["approval"] = "suspended"
        elif isinstance(ev, Island.WentOnline):
            row["online"] = True
        elif isinstance(ev, Island.WentOffline):
            row["online"] = False
        elif isinstance(ev, Island.KarmaChanged):  # decision 0051: old-scale numbers shown rebased
            if row["karma_legacy"] and not isinstance(ev, Island.KarmaRebased):
                row["karma_milli"] = rebased_milli(ev.karma_after_milli)
            else:
                row["karma_legacy"] = False
                row["karma_milli"] = ev.karma_after_milli
        elif isinstance(ev, Island.CapabilitiesChanged):
            row.update(region=ev.capabilities.get("region", "unknown"), cargos=list(ev.capabilities.get("cargos", ())),
                       slots=ev.capabilities.get("slots", 1))
    out = sorted(rows.values(), key=lambda r: (r["owner_account_id"], r["name"], r["island_id"]))
    if args.json:
        _print(out)
        return 0
    print(f"{'island_id':<36}  {'name':<20} {'approval':<9} {'online':<6} {'karma':>8}  {'region':<10} cargos")
    for r in out:
        print(f"{r['island_id']:<36}  {r['name'][:20]:<20} {r['approval']:<9} {str(r['online']).lower():<6} "
              f"{r['karma_milli'] / 1000:>8.3f}  {r['region'][:10]:<10} {','.join(r['cargos'])}")
    return 0


# ------------------------------------------------------------------ the agent
def _csv(text: str | None) -> list[str] | None:
    return [x.strip() for x in text.split(",") if x.strip()] if text else None


def make_agent_config(args) -> Any:
    from island.agent import AgentConfig
    from island.backends import EchoBackend, FlakyEchoBackend, ImageBackend, OpenAIBackend

    if args.backend == "flaky":
        backend: Any = FlakyEchoBackend(tokens_per_s=args.tokens_per_s, first_token_s=args.first_token_s,
                                        reply_tokens=args.reply_tokens, slots=args.slots or 4)
    elif args.backend == "echo":
        backend = EchoBackend(tokens_per_s=args.tokens_per_s, first_token_s=args.first_token_s,
                                   reply_tokens=args.reply_tokens, slots=args.slots or 4)
    elif args.backend == "image":
        backend = ImageBackend(steps_per_s=args.steps_per_s, slots=args.slots or 2)
    else:
        if not args.backend_url:
            raise _usage("--backend openai needs --backend-url (e.g. http://127.0.0.1:8080)")
        backend = OpenAIBackend(base_url=args.backend_url, model=args.model,
                                api_key=args.backend_key or os.environ.get("ISLAND_BACKEND_API_KEY"),
                                models=_csv(args.models) or OpenAIBackend.__dataclass_fields__["models"].default_factory(),
                                cargos=_csv(args.cargos) or ["llm-chat", "llm-chat-lite"], slots=args.slots or 1)
    caps = backend.default_capabilities()
    if args.cargos:
        caps.cargos = _csv(args.cargos) or caps.cargos
    if args.models:
        caps.models = _csv(args.models) or caps.models
    for attr in ("region", "vram_mb", "ram_mb", "hardware_tier", "slots", "gpu_model", "platform"):
        value = getattr(args, attr, None)
        if value is not None:
            setattr(caps, attr, value)
    for ask in args.ask or ():
        slug, sep, price = ask.partition("=")
        if not sep or not slug or not price:
            raise _usage(f"--ask takes CARGO=CREDITS, got {ask!r}")
        caps.asks[slug] = price
    return AgentConfig(server=args.server, token=args.token, backend=backend, capabilities=caps,
                       grace_s=args.grace_s, agent_name=f"archipelag-reference-island/0.1 ({args.backend})")


TIER_TOK_S = {1: 10.0, 2: 30.0, 3: 60.0, 4: 120.0}  # what the agent would estimate at each hardware tier


def make_nats_agent_config(args) -> Any:
    """`island run --transport nats`: the published agent's protocol (island/nats_agent.py);
    the chat backend (echo/openai) and the image backend side by side (an agent of the
    published kind is offered every Cargo its runtimes can run)."""
    from pathlib import Path

    from island.backends import EchoBackend, ImageBackend
    from island.nats_agent import NatsAgentConfig

    chosen = make_agent_config(args).backend
    backends = [chosen]
    if "chat" in chosen.kinds:
        backends.append(ImageBackend(steps_per_s=args.steps_per_s, slots=2))
    else:
        backends.append(EchoBackend(tokens_per_s=args.tokens_per_s, first_token_s=args.first_token_s,
                                    reply_tokens=args.reply_tokens))
    asks: dict[str, str] = {}
    for ask in args.ask or ():
        slug, _, price = ask.partition("=")
        asks[slug] = price
    caps = chosen.default_capabilities()
    tier = args.hardware_tier if args.hardware_tier is not None else caps.hardware_tier
    return NatsAgentConfig(url=args.server, backends=backends, host_id=args.host_id or "",
                           state_dir=Path(args.state_dir) if args.state_dir else None,
                           ram_mb=args.ram_mb or caps.ram_mb, gpu_model=args.gpu_model or caps.gpu_model or None,
                           gpu_vram_mb=args.vram_mb or caps.vram_mb or None, cpu_cores=caps.cpu_cores,
                           region=args.region, heartbeat_s=args.heartbeat_s, lease_every_s=args.lease_every_s,
                           asking_prices=asks or None, max_concurrent=args.slots,
                           estimated_llm_tok_s=TIER_TOK_S.get(tier))


def cmd_island_run_nats(args) -> int:
    from island.nats_agent import NatsIslandAgent

    try:
        config = make_nats_agent_config(args)
    except Exception as exc:  # noqa: BLE001
        print(f"coordinator: {exc}", file=sys.stderr)
        return 2

    async def main() -> int:
        agent = NatsIslandAgent(config)
        print(f"island host id: {agent.host_id}", file=sys.stderr, flush=True)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, agent.request_stop)
            except (NotImplementedError, RuntimeError, ValueError):
                pass
        return await agent.run()

    return asyncio.run(main())


def cmd_island_run(_c, args) -> int:
    from coordinator.logs import configure_logging
    from island.agent import IslandAgent

    if getattr(args, "transport", "websocket") == "nats":
        configure_logging(os.environ.get("COORDINATOR_LOG_FORMAT") or "auto",
                          os.environ.get("COORDINATOR_LOG_LEVEL") or "info")
        return cmd_island_run_nats(args)
    token = args.token or os.environ.get("ISLAND_TOKEN")
    if not token:
        print("coordinator: --token (or ISLAND_TOKEN) is required", file=sys.stderr)
        return 2
    args.token = token
    configure_logging(os.environ.get("COORDINATOR_LOG_FORMAT") or "auto",
                      os.environ.get("COORDINATOR_LOG_LEVEL") or "info")
    try:
        config = make_agent_config(args)
    except Exception as exc:  # noqa: BLE001 - UsageError and friends: one clear line
        print(f"coordinator: {exc}", file=sys.stderr)
        return 2

    async def main() -> int:
        agent = IslandAgent(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, agent.request_stop)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread / not POSIX
                pass
        return await agent.run()

    return asyncio.run(main())


# ------------------------------------------------------------------ parser
def add_island_commands(sub: Any) -> None:
    isl = sub.add_parser("islands", help="Islands: register, approve, suspend, list").add_subparsers(
        dest="cmd", required=True)
    cr = isl.add_parser("create", help="register an Island under an account (prints its token once)")
    cr.add_argument("--owner", required=True, help="the owner's account id (earns what the Island earns)")
    cr.add_argument("--name", required=True)
    cr.add_argument("--region", default=None)
    cr.add_argument("--approve", action="store_true", help="approve at once (otherwise pending)")
    cr.set_defaults(func=cmd_islands_create)
    add_island_action_parsers(isl, drain=False)
    nc = isl.add_parser("nats-credentials", help="issue a new NATS password for a NATS Island (printed once)")
    nc.add_argument("island_id")
    nc.add_argument("--by", default=None, help="who asks (recorded in the event)")
    nc.set_defaults(func=cmd_islands_nats_credentials)
    ls = isl.add_parser("list", help="every Island with approval, online state and karma")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_islands_list)

    one = sub.add_parser("island", help="run the reference Island agent").add_subparsers(dest="cmd", required=True)
    r = one.add_parser("run", help="connect to a coordinator and run Jobs (Ctrl-C drains, twice returns Jobs)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r.add_argument("--server", required=True, help="coordinator base URL, e.g. http://127.0.0.1:8000; with "
                   "--transport nats the NATS URL with the Island's credentials, nats://host-ID:PASSWORD@HOST:4222 "
                   "(nats://pairing:pairing@HOST:4222 before pairing)")
    r.add_argument("--transport", choices=("websocket", "nats"), default="websocket",
                   help="websocket: our own Island channel; nats: the published agent's NATS JetStream protocol")
    r.add_argument("--host-id", default=None, help="nats: the Island's host id (default: from --state-dir or new)")
    r.add_argument("--state-dir", default=None, help="nats: where state.json (host id, paired) is kept")
    r.add_argument("--heartbeat-s", type=float, default=10.0, help="nats: heartbeat period")
    r.add_argument("--lease-every-s", type=float, default=30.0, help="nats: lease renewal period per running Job")
    r.add_argument("--token", default=None, help="the Island token (or ISLAND_TOKEN)")
    r.add_argument("--backend", choices=("echo", "flaky", "openai", "image"), default="echo")
    r.add_argument("--backend-url", default=None, help="openai: the OpenAI-compatible server's base URL")
    r.add_argument("--backend-key", default=None, help="openai: API key for it (or ISLAND_BACKEND_API_KEY)")
    r.add_argument("--model", default=None, help="openai: the model name the backend knows (default: the Job's)")
    r.add_argument("--tokens-per-s", type=float, default=50.0, help="echo: pacing")
    r.add_argument("--first-token-s", type=float, default=0.05, help="echo: time to first token")
    r.add_argument("--reply-tokens", type=int, default=48, help="echo: reply length (capped by max_tokens)")
    r.add_argument("--steps-per-s", type=float, default=40.0, help="image: pacing of the steps")
    r.add_argument("--slots", type=int, default=None, help="Jobs at once (default: echo 4, image 2, openai 1)")
    r.add_argument("--cargos", default=None, help="comma-separated Cargo slugs to advertise")
    r.add_argument("--models", default=None, help="comma-separated model names to advertise")
    r.add_argument("--region", default=None)
    r.add_argument("--platform", default=None)
    r.add_argument("--gpu-model", dest="gpu_model", default=None)
    r.add_argument("--vram-mb", dest="vram_mb", type=int, default=None)
    r.add_argument("--ram-mb", dest="ram_mb", type=int, default=None)
    r.add_argument("--hardware-tier", dest="hardware_tier", type=int, default=None)
    r.add_argument("--ask", action="append", default=None, help="CARGO=CREDITS asking price (repeatable)")
    r.add_argument("--grace-s", type=float, default=30.0, help="on Ctrl-C: time for running Jobs to finish")
    r.set_defaults(func=cmd_island_run, standalone=True)
