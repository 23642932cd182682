"""Scenario files (TOML) -> validated msgspec Structs.

``load_scenario(path)`` reads a file, refuses unknown keys (naming the key and where it
is), checks every cross-reference (tiers, regions, consumer classes, Cargos, trace files)
and parses the expectations, so a broken scenario fails before anything runs. The file
format is documented key by key in docs/SIMULATOR.md.
"""

from __future__ import annotations

import os
import re
import tomllib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import msgspec

from simulations.consumers import ConsumerClass
from simulations.demand import DEFAULT_SIZES, DemandSpec, SizeSpec, TraceDemand, _Sizer
from simulations.expectations import Expectation, ExpectationError, parse_expectations
from simulations.fleet import FleetGroup, RegionSpec, TierSpec, resolve_regions, resolve_tiers
from simulations.traces import FORMATS
from simulations.units import credits_to_micro

REPO_ROOT = Path(__file__).resolve().parents[1]
SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"


class ScenarioError(ValueError):
    """A scenario that cannot run; the message names the file and the key."""


class CoordinatorSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Knobs handed to the system under test (defaults = scheduler.config defaults)."""

    ack_timeout_s: float = 10.0
    lease_s: float = 60.0
    queue_timeout_s: float = 120.0
    max_attempts: int = 3
    heartbeat_interval_s: float = 10.0
    missed_heartbeats_offline: int = 3
    free_tier_credits: str | int = "5"
    fee_bps: int = 1500
    extra: dict[str, Any] = {}  # passed verbatim to the adapter of the real system


class FaultsSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    islands: bool = False  # apply the tiers' crash / missed-ack / hang / disconnect / slow-heartbeat rates
    rate_multiplier: float = 1.0  # scales all of those rates
    coordinator_restarts_s: list[float] = []  # simulated times at which the coordinator restarts
    restart_downtime_s: float = 5.0
    slow_heartbeat_s: float = 45.0  # length of one late-heartbeat episode


class CargoSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The simulator's view of a Cargo, used by its own oracles (KYC, free tier). Must
    agree with the catalog (scheduler/cargos.toml); the adapter of the real system checks."""

    kind: str  # "chat" | "image"
    requires_kyc: bool = False
    free_tier: bool = True


DEFAULT_CARGOS: dict[str, dict] = {
    "llm-chat": {"kind": "chat", "requires_kyc": False, "free_tier": True},
    "llm-chat-lite": {"kind": "chat", "requires_kyc": False, "free_tier": True},
    "sdxl": {"kind": "image", "requires_kyc": True, "free_tier": False},
}


class Scenario(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: str
    description: str = ""
    seed: int = 0
    start: str = "2026-01-05T00:00:00Z"  # wall-clock time of simulated t=0 (sets the hour of day)
    duration_s: float | None = None  # arrivals stop here; None = until the demand ends (traces)
    drain_s: float = 900.0  # after arrivals stop, let open Jobs finish for at most this long
    max_jobs: int | None = None  # stop arrivals after this many Jobs
    sample_interval_s: float | None = None  # time-series resolution; None = auto (<= 720 points)
    expect: list[str] = []
    coordinator: CoordinatorSpec = msgspec.field(default_factory=CoordinatorSpec)
    faults: FaultsSpec = msgspec.field(default_factory=FaultsSpec)
    regions: dict[str, dict[str, Any]] = {}
    tiers: dict[str, dict[str, Any]] = {}
    cargos: dict[str, dict[str, Any]] = {}
    sizes: dict[str, dict[str, Any]] = {}
    fleet: list[FleetGroup] = []
    consumers: list[ConsumerClass] = []
    demand: list[DemandSpec] = []


class Resolved(msgspec.Struct, kw_only=True):
    """A scenario with defaults merged and every reference checked."""

    scenario: Scenario
    source: str  # file path or "<string>"
    base_dir: str  # directory relative paths are resolved against first
    start_epoch_ms: int
    day_offset_ms: int  # ms since UTC midnight at t=0
    tiers: dict[str, TierSpec]
    regions: dict[str, RegionSpec]
    cargos: dict[str, CargoSpec]
    sizes: dict[str, SizeSpec]
    trace_paths: list[str | None]  # per demand stream: resolved trace file
    expectations: list[Expectation]
    free_tier_micro: int


_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<key>[^`]+)`$")


def _explain(exc: msgspec.ValidationError) -> str:
    m = _AT.match(str(exc))
    msg, path = (m.group("msg"), m.group("path") or "") if m else (str(exc), "")
    where = path.lstrip(".") or "the top level"
    u = _UNKNOWN.match(msg)
    if u:
        return f"unknown key `{u.group('key')}` in {where}"
    return f"{where}: {msg}" if path else msg


def parse_start(text: str) -> datetime:
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ScenarioError(f"start: not an ISO-8601 time: {text!r}") from None
    if dt.tzinfo is None:
        raise ScenarioError(f"start: {text!r} has no timezone; add Z or +00:00")
    return dt.astimezone(timezone.utc)


def resolve_data_path(path: str, base_dir: str | Path | None) -> Path | None:
    """A data file named in a scenario: absolute; else tried relative to the scenario's
    directory, the current directory, the repository root and the repository root's
    parent (so ``../shared/traces/x.csv`` works from the repo root and from a checkout
    next to ``shared/``), then ``$SIM_DATA_DIR``. None if not found."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p if p.is_file() else None
    bases: list[Path] = []
    if base_dir:
        bases.append(Path(base_dir))
    bases += [Path.cwd(), REPO_ROOT, REPO_ROOT.parent]
    if os.environ.get("SIM_DATA_DIR"):
        bases.append(Path(os.environ["SIM_DATA_DIR"]))
    for b in bases:
        cand = (b / p)
        if cand.is_file():
            return cand.resolve()
    if os.environ.get("SIM_DATA_DIR"):
        cand = Path(os.environ["SIM_DATA_DIR"]) / p.name
        if cand.is_file():
            return cand.resolve()
    return None


def loads_scenario(text: str, *, source: str = "<string>", base_dir: str | Path | None = None) -> Resolved:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{source}: not valid TOML: {exc}") from None
    return scenario_from_dict(data, source=source, base_dir=base_dir)


def load_scenario(path: str | Path) -> Resolved:
    p = Path(path)
    if not p.is_file() and not p.suffix and (SCENARIO_DIR / f"{p}.toml").is_file():
        p = SCENARIO_DIR / f"{p}.toml"  # a bare name: one of the packaged scenarios
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return loads_scenario(text, source=str(p), base_dir=p.resolve().parent)


def scenario_from_dict(data: dict[str, Any], *, source: str = "<dict>", base_dir: str | Path | None = None) -> Resolved:
    def fail(msg: str) -> ScenarioError:
        return ScenarioError(f"{source}: {msg}")

    try:
        sc = msgspec.convert(data, Scenario)
    except msgspec.ValidationError as exc:
        raise fail(_explain(exc)) from None
    try:
        return _resolve(sc, source, base_dir)
    except (ValueError, ExpectationError) as exc:
        if isinstance(exc, ScenarioError):
            raise ScenarioError(f"{source}: {exc}") from None
        raise fail(str(exc)) from None


def _resolve(sc: Scenario, source: str, base_dir: str | Path | None) -> Resolved:
    if not sc.name.strip():
        raise ValueError("name must not be empty")
    start = parse_start(sc.start)
    if sc.duration_s is not None and sc.duration_s <= 0:
        raise ValueError("duration_s must be > 0")
    if sc.drain_s < 0:
        raise ValueError("drain_s must be >= 0")
    if sc.max_jobs is not None and sc.max_jobs < 0:
        raise ValueError("max_jobs must be >= 0")
    if sc.sample_interval_s is not None and sc.sample_interval_s <= 0:
        raise ValueError("sample_interval_s must be > 0")
    c = sc.coordinator
    if c.max_attempts < 1 or c.ack_timeout_s <= 0 or c.lease_s <= 0 or c.queue_timeout_s <= 0:
        raise ValueError("coordinator: max_attempts >= 1 and timeouts > 0 required")
    if not 0 <= c.fee_bps <= 10_000:
        raise ValueError("coordinator.fee_bps must be in 0..10000")
    free_tier_micro = credits_to_micro(c.free_tier_credits, what="coordinator.free_tier_credits")
    f = sc.faults
    if f.rate_multiplier < 0 or f.restart_downtime_s < 0 or f.slow_heartbeat_s < 0:
        raise ValueError("faults: rate_multiplier, restart_downtime_s and slow_heartbeat_s must be >= 0")
    if any(t < 0 for t in f.coordinator_restarts_s):
        raise ValueError("faults.coordinator_restarts_s: times must be >= 0")

    tiers = resolve_tiers(sc.tiers)
    regions = resolve_regions(sc.regions)
    cargos: dict[str, CargoSpec] = {}
    for slug in list(DEFAULT_CARGOS) + [s for s in sc.cargos if s not in DEFAULT_CARGOS]:
        merged = dict(DEFAULT_CARGOS.get(slug, {}))
        merged.update(sc.cargos.get(slug, {}))
        try:
            cargos[slug] = msgspec.convert(merged, CargoSpec)
        except msgspec.ValidationError as exc:
            raise ValueError(f"cargos.{slug}: {_explain(exc)}") from None
        if cargos[slug].kind not in ("chat", "image"):
            raise ValueError(f"cargos.{slug}.kind must be \"chat\" or \"image\"")
    sizes: dict[str, SizeSpec] = {}
    for slug in cargos:
        merged = dict(DEFAULT_SIZES.get(slug, {}))
        merged.update(sc.sizes.get(slug, {}))
        try:
            sizes[slug] = msgspec.convert(merged, SizeSpec)
        except msgspec.ValidationError as exc:
            raise ValueError(f"sizes.{slug}: {_explain(exc)}") from None
        _Sizer(slug, sizes[slug])  # validates
    for slug in sc.sizes:
        if slug not in cargos:
            raise ValueError(f"sizes.{slug}: unknown Cargo; add a [cargos.{slug}] table")

    if not sc.fleet:
        raise ValueError("no [[fleet]] groups: a scenario needs Islands")
    for gi, g in enumerate(sc.fleet):
        if g.tier not in tiers:
            raise ValueError(f"fleet[{gi}]: unknown tier {g.tier!r}; known: {', '.join(tiers)}")
        for r in g.regions:
            if r not in regions:
                raise ValueError(f"fleet[{gi}]: unknown region {r!r}; known: {', '.join(regions)}")
    for name, t in tiers.items():
        for slug in t.cargos:
            if slug not in cargos:
                raise ValueError(f"tiers.{name}: serves unknown Cargo {slug!r}")
    if not sc.consumers:
        raise ValueError("no [[consumers]] classes: a scenario needs accounts")
    class_names = {cc.name for cc in sc.consumers}
    for ci, cc in enumerate(sc.consumers):
        for slug in list(cc.cargo_mix) + list(cc.bid):
            if slug not in cargos:
                raise ValueError(f"consumers[{ci}] ({cc.name}): unknown Cargo {slug!r}; known: {', '.join(cargos)}")
        for r in cc.regions:
            if r not in regions:
                raise ValueError(f"consumers[{ci}] ({cc.name}): unknown region {r!r}")
    if not sc.demand:
        raise ValueError("no [[demand]] streams")
    trace_paths: list[str | None] = []
    for di, d in enumerate(sc.demand):
        for name in d.consumers:
            if name not in class_names:
                raise ValueError(f"demand[{di}]: unknown consumer class {name!r}; known: {', '.join(sorted(class_names))}")
        if d.cargo is not None and d.cargo not in cargos:
            raise ValueError(f"demand[{di}]: unknown Cargo {d.cargo!r}")
        if d.start_s < 0 or (d.end_s is not None and d.end_s <= d.start_s):
            raise ValueError(f"demand[{di}]: need 0 <= start_s < end_s")
        for attr in ("rate_per_s", "burst_rate_per_s"):
            if getattr(d, attr, 0) < 0:
                raise ValueError(f"demand[{di}].{attr} must be >= 0")
        if isinstance(d, TraceDemand):
            if d.format not in FORMATS:
                raise ValueError(f"demand[{di}]: unknown trace format {d.format!r}; known: {', '.join(sorted(FORMATS))}")
            found = resolve_data_path(d.path, base_dir)
            if found is None:
                raise ValueError(f"demand[{di}]: trace file {d.path!r} not found (tried relative to the scenario, the "
                                 f"current directory, {REPO_ROOT} and {REPO_ROOT.parent}; or set SIM_DATA_DIR)")
            trace_paths.append(str(found))
        else:
            trace_paths.append(None)
        if not isinstance(d, TraceDemand) and sc.duration_s is None and sc.max_jobs is None and d.end_s is None:
            raise ValueError(f"demand[{di}] ({type(d).__name__}) never ends: set duration_s, max_jobs or end_s")
    expectations = parse_expectations(sc.expect)
    midnight = start.replace(hour=0, minute=0, second=0, microsecond=0)
    return Resolved(
        scenario=sc, source=source, base_dir=str(base_dir or ""),
        start_epoch_ms=int(start.timestamp() * 1000), day_offset_ms=int((start - midnight).total_seconds() * 1000),
        tiers=tiers, regions=regions, cargos=cargos, sizes=sizes, trace_paths=trace_paths,
        expectations=expectations, free_tier_micro=free_tier_micro)


def _scaled_count(n: int, scale: float) -> int:
    return 0 if n <= 0 else max(1, int(n * scale + 0.5))


def scale_scenario(sc: Scenario, scale: float) -> Scenario:
    """A smaller (or larger) copy of a scenario: every fleet group's and consumer class's
    count (rounded, at least 1 when it was > 0) and every demand rate times ``scale``
    (a trace keeps ``sample x scale`` of its rows). Times, sizes, tiers and expectations
    stay: load, availability curves and fault rates per Island are unchanged, only the
    number of Islands, accounts and Jobs shrinks. Used by tests and quick runs."""
    if not scale > 0:
        raise ValueError("scale must be > 0")
    fleet = [msgspec.structs.replace(g, count=_scaled_count(g.count, scale)) for g in sc.fleet]
    consumers = [msgspec.structs.replace(c, count=_scaled_count(c.count, scale)) for c in sc.consumers]
    demand = []
    for d in sc.demand:
        if isinstance(d, TraceDemand):
            demand.append(msgspec.structs.replace(d, sample=min(1.0, d.sample * scale)))
            continue
        changes = {attr: getattr(d, attr) * scale for attr in ("rate_per_s", "burst_rate_per_s") if hasattr(d, attr)}
        demand.append(msgspec.structs.replace(d, **changes))
    return msgspec.structs.replace(sc, fleet=fleet, consumers=consumers, demand=demand)


def with_overrides(res: Resolved, *, seed: int | None = None, max_jobs: int | None = None,
                   duration_s: float | None = None, unlimited_duration: bool = False,
                   scale: float | None = None) -> Resolved:
    """The same scenario with CLI overrides applied (re-validated). ``scale``: see
    ``scale_scenario``."""
    sc = res.scenario
    if scale is not None and scale != 1.0:
        sc = scale_scenario(sc, scale)
    changes: dict[str, Any] = {}
    if seed is not None:
        changes["seed"] = seed
    if max_jobs is not None:
        changes["max_jobs"] = max_jobs
    if duration_s is not None:
        changes["duration_s"] = duration_s
    elif unlimited_duration:
        changes["duration_s"] = None
    if not changes and sc is res.scenario:
        return res
    sc2 = msgspec.structs.replace(sc, **changes)
    return _resolve(sc2, res.source, res.base_dir or None)
