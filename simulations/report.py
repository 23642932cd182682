"""report.md and the six PNG plots of a run (matplotlib, Agg backend, no display).

Plots: ``queue_depth.png``, ``wait_cdf.png``, ``utilisation_by_tier.png``, ``karma.png``,
``credit_flows.png``, ``market.png`` (clearing amounts per minute with the surge periods
shaded, and Island earnings per tier). A plot whose data the system under test does not provide (karma
and credits for the bare queue) is still written, saying so, so a report always has the
same files.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from simulations.expectations import Outcome
from simulations.metrics import PERCENTILES, job_samples

if TYPE_CHECKING:
    from simulations.world import World

PLOTS = ("queue_depth.png", "wait_cdf.png", "utilisation_by_tier.png", "karma.png", "credit_flows.png", "market.png")
_MAX_POINTS = 2000


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(fig)


def _empty(plt, path: Path, title: str, note: str) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.set_title(title)
    ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes, fontsize=11, color="#555")
    ax.set_axis_off()
    _save(fig, path)


def _thin(xs: list, ys: list) -> tuple[list, list]:
    if len(xs) <= _MAX_POINTS:
        return xs, ys
    step = -(-len(xs) // _MAX_POINTS)
    return xs[::step], ys[::step]


def _moving_sum(values: list[int], window: int) -> list[int]:
    """Trailing sums over ``window`` samples (same length as ``values``)."""
    out, acc = [], 0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc)
    return out


def _hours_axis(world: World) -> tuple[list[float], str]:
    span = world.s_t[-1] if world.s_t else 0
    if span >= 3 * 3_600_000:
        return [t / 3_600_000 for t in world.s_t], "simulated time (h)"
    if span >= 3 * 60_000:
        return [t / 60_000 for t in world.s_t], "simulated time (min)"
    return [t / 1000 for t in world.s_t], "simulated time (s)"


def write_plots(world: World, sut_report: dict[str, Any], out: Path) -> list[Path]:
    plt = _plt()
    paths = [out / name for name in PLOTS]
    xs, xlabel = _hours_axis(world)

    # queue depth vs capacity
    fig, ax = plt.subplots(figsize=(8, 4.5))
    cap = [sum(o) for o in world.s_online]
    x1, q1 = _thin(xs, world.s_queue)
    x2, c2 = _thin(xs, cap)
    ax.plot(x1, q1, label="queued Jobs", color="#c0392b")
    ax.plot(x2, c2, label="online slots (capacity)", color="#2c3e50", linestyle="--")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.set_title("Queue depth over time")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    _save(fig, paths[0])

    # wait-time CDF
    waits, ttfts, _ = job_samples(world)
    if waits:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for label, data, color in (("wait", waits, "#2980b9"), ("time to first token", ttfts, "#27ae60")):
            if not data:
                continue
            v = sorted(data)
            n = len(v)
            step = max(1, n // _MAX_POINTS)
            px = [v[i] / 1000 for i in range(0, n, step)] + [v[-1] / 1000]
            py = [(i + 1) / n for i in range(0, n, step)] + [1.0]
            ax.step(px, py, where="post", label=label, color=color)
        ax.set_xscale("symlog", linthresh=0.1)
        ax.set_xlabel("seconds since arrival")
        ax.set_ylabel("share of Jobs")
        ax.set_ylim(0, 1.01)
        ax.set_title("Wait-time CDF")
        ax.legend(loc="lower right")
        ax.grid(alpha=0.3)
        _save(fig, paths[1])
    else:
        _empty(plt, paths[1], "Wait-time CDF", "no Job was ever offered to an Island")

    # utilisation by tier (moving average over ~1% of the run: instantaneous samples are noisy)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    window = max(1, len(xs) // 100)
    for ti, name in enumerate(world.tier_names):
        busy = _moving_sum([b[ti] for b in world.s_busy], window)
        online = _moving_sum([o[ti] for o in world.s_online], window)
        ys = [b / o if o else 0.0 for b, o in zip(busy, online)]
        xt, yt = _thin(xs, ys)
        ax.plot(xt, yt, label=name)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("busy slots / online slots")
    ax.set_title("Utilisation by hardware tier" + (f" (moving average of {window} samples)" if window > 1 else ""))
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, paths[2])

    # karma distribution
    karma = sut_report.get("karma_values")
    if karma:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        ax.hist([k / 1000 for k in karma], bins=min(50, max(5, len(karma) // 10)), color="#8e44ad")
        ax.set_xlabel("karma at the end of the run")
        ax.set_ylabel("Islands")
        ax.set_title("Karma distribution")
        ax.grid(alpha=0.3)
        _save(fig, paths[3])
    else:
        _empty(plt, paths[3], "Karma distribution", f"system '{sut_report.get('_system', '?')}' keeps no karma")

    # credit flows
    pts = [(x, c) for x, c in zip(xs, world.s_credits) if c is not None]
    if pts:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for idx, label in enumerate(("charged to consumers", "earned by Islands", "platform fees", "released holds")):
            xt, yt = _thin([p[0] for p in pts], [p[1][idx] / 1_000_000 for p in pts])
            ax.plot(xt, yt, label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("credits (cumulative)")
        ax.set_title("Credit flows")
        ax.legend(loc="upper left")
        ax.grid(alpha=0.3)
        _save(fig, paths[4])
    else:
        _empty(plt, paths[4], "Credit flows", f"system '{sut_report.get('_system', '?')}' keeps no ledger")

    market = (sut_report.get("system") or {}).get("market")
    if market and market.get("clearing_per_minute"):
        _market_plot(plt, market, paths[5])
    else:
        _empty(plt, paths[5], "Compute Exchange", f"system '{sut_report.get('_system', '?')}' has no market")
    return paths


def _market_plot(plt, market: dict[str, Any], path: Path) -> None:
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(8, 7), gridspec_kw={"height_ratios": [3, 2]})
    for cargo, rows in market["clearing_per_minute"].items():
        ax.plot([r[0] / 60 for r in rows], [r[1] / 1_000_000 for r in rows], label=f"{cargo} (avg)")
    on_at = None
    for sw in market.get("surge_switches", ()):
        if sw["active"] and on_at is None:
            on_at = sw["t_s"]
        elif not sw["active"] and on_at is not None:
            ax.axvspan(on_at / 3600, sw["t_s"] / 3600, color="#e67e22", alpha=0.2, lw=0)
            on_at = None
    if on_at is not None:
        ax.axvspan(on_at / 3600, ax.get_xlim()[1], color="#e67e22", alpha=0.2, lw=0)
    ax.set_xlabel("hours (shaded: surge on)")
    ax.set_ylabel("credits per billing unit")
    ax.set_title("Clearing amounts per minute")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    tiers = market.get("earned_by_tier_micro", {})
    bx.bar(list(tiers), [v / 1_000_000 for v in tiers.values()], color="#16a085")
    bx.set_ylabel("credits earned")
    bx.set_title(f"Island earnings per tier; refused for budget: {market.get('refused_for_budget', 0)}")
    bx.tick_params(axis="x", labelsize=8)
    _save(fig, path)


def _market_lines(market: dict[str, Any]) -> list[str]:
    lines = ["## Compute Exchange", "",
             f"* surge switched on {market['surge_on']} times and off {market['surge_off']} times"
             + (" (times in s: " + ", ".join(f"{'on' if s['active'] else 'off'} {s['t_s']:.0f}"
                                             for s in market["surge_switches"][:40]) + ")"
                if market["surge_switches"] else ""),
             f"* Jobs refused for budget (no approved Island within it): {market['refused_for_budget']}", ""]
    if market.get("clearing_per_minute"):
        lines += ["| Cargo | clearings | min | avg | max (credits per billing unit) |", "| --- | ---: | ---: | ---: | ---: |"]
        for cargo, rows in market["clearing_per_minute"].items():
            n = sum(r[4] for r in rows)
            avg = sum(r[1] * r[4] for r in rows) // n if n else 0
            lines.append(f"| {cargo} | {n} | {min(r[2] for r in rows) / 1e6:g} | {avg / 1e6:g} | "
                         f"{max(r[3] for r in rows) / 1e6:g} |")
        lines.append("")
    if market.get("earned_by_tier_micro"):
        lines += ["| tier | Jobs completed | credits earned |", "| --- | ---: | ---: |"]
        for tier, micro in market["earned_by_tier_micro"].items():
            lines.append(f"| {tier} | {market['jobs_by_tier'].get(tier, 0)} | {micro / 1e6:,.2f} |")
        lines.append("")
    return lines


def _v(x: Any) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        text = f"{x:.3f}".rstrip("0").rstrip(".")
        return text if text not in ("", "-0") else "0"
    return str(x)


def write_report(path: Path, metrics: dict[str, Any], outcomes: list[Outcome], *, description: str = "",
                 source: str = "", notes: list[str] | None = None, protocol_errors: list[str] | None = None,
                 plots: bool = True) -> None:
    m = metrics
    lines = [f"# Simulation report: {m['scenario']}", ""]
    if description:
        lines += [description.strip(), ""]
    lines += [
        f"* scenario file: `{source}`" if source else "* scenario: built from the command line",
        f"* system under test: **{m['system']}**",
        f"* seed: {m['seed']}",
        f"* simulated time: {_v(m['sim_seconds'])} s; wall time: {_v(m['wall_seconds'])} s "
        f"({_v(m['jobs_per_wall_second'])} Jobs/s, {_v(m['events_per_wall_second'])} events/s)",
        f"* event log: {m['log_events']} events, digest `{m['log_digest']}`"
        + (f"; system log digest `{m['system_log_digest']}`" if m.get("system_log_digest") else ""),
        "",
    ]
    for n in notes or []:
        lines.append(f"> {n}")
    if notes:
        lines.append("")
    failed = [o for o in outcomes if not o.ok]
    if outcomes:
        lines += ["## Expectations", "",
                  f"{len(outcomes) - len(failed)} of {len(outcomes)} met." if failed else f"All {len(outcomes)} met.",
                  "", "| | expectation | actual |", "| --- | --- | --- |"]
        for o in outcomes:
            lines.append(f"| {'ok' if o.ok else o.why.upper()} | `{o.expectation.text}` | {_v(o.actual)} |")
        lines.append("")
    lines += ["## Jobs", "", "| outcome | Jobs |", "| --- | ---: |"]
    for key in ("jobs_total", "jobs_completed", "jobs_failed", "jobs_timeout", "jobs_cancelled", "jobs_refused",
                "jobs_unfinished"):
        lines.append(f"| {key.removeprefix('jobs_')} | {m[key]} |")
    lines.append(f"| success rate (completed / admitted) | {_v(m['success_rate'])} |")
    lines.append("")
    if m["refusals"]:
        lines += ["Refusals by reason: " + ", ".join(f"{k} {v}" for k, v in m["refusals"].items()), ""]
    if m["end_reasons"]:
        lines += ["Endings with a reason: " + ", ".join(f"{k} {v}" for k, v in m["end_reasons"].items()), ""]
    lines += ["## Latency (seconds since arrival)", "",
              "| | n | " + " | ".join(n for n, _ in PERCENTILES) + " | mean | max |",
              "| --- | ---: |" + " ---: |" * (len(PERCENTILES) + 2)]
    for key, label in (("wait_s", "wait"), ("ttft_s", "time to first token"), ("e2e_s", "end to end")):
        s = m[key]
        lines.append(f"| {label} | {s['n']} | " + " | ".join(_v(s[n]) for n, _ in PERCENTILES)
                     + f" | {_v(s['mean'])} | {_v(s['max'])} |")
    lines.append("")
    u = m["island_utilisation"]
    lines += ["## Islands", "", f"{m['islands']['total']} Islands, {m['islands']['slots']} slots. "
              f"Mean utilisation {_v(u['mean'])}. Queue depth max {m['queue_depth']['max']}, "
              f"time-average {_v(m['queue_depth']['mean'])}, max queue / online slots "
              f"{_v(m['queue_depth']['max_over_capacity'])}.", "",
              "| tier | Islands | utilisation |", "| --- | ---: | ---: |"]
    for t, n in m["islands"]["by_tier"].items():
        lines.append(f"| {t} | {n} | {_v(u['by_tier'].get(t))} |")
    lines.append("")
    lines += ["Faults: " + ", ".join(f"{k} {v}" for k, v in m["faults"].items()), ""]
    lines += ["## Rules and money", "",
              f"* KYC violations (image Jobs started for accounts without KYC): {m['kyc_violations']}",
              f"* free-tier violations: {_v(m['free_tier_violations'])}",
              f"* ledger balanced: {_v(m['ledger_balanced'])}",
              f"* protocol errors (the system broke the simulator's protocol): {m['protocol_errors']}"]
    if m["credits"]:
        lines.append("* credits: " + ", ".join(f"{k} {v}" for k, v in m["credits"].items()))
    else:
        lines.append("* credits: n/a (the system keeps no ledger)")
    if m["karma"]:
        lines.append("* karma at the end: " + ", ".join(f"{k} {_v(v)}" for k, v in m["karma"].items()))
    else:
        lines.append("* karma: n/a (the system keeps no karma)")
    lines.append("")
    market = (m.get("system_details") or {}).get("market")
    if market:
        lines += _market_lines(market)
    if protocol_errors:
        lines += ["First protocol errors:", ""] + [f"* {e}" for e in protocol_errors[:20]] + [""]
    if plots:
        lines += ["## Plots", ""]
        for name in PLOTS:
            lines.append(f"![{name.removesuffix('.png').replace('_', ' ')}]({name})")
            lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
