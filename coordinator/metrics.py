"""`/metrics` in Prometheus text format (prometheus-client, default registry).

Counters that must see every event are fed by listeners (scheduler notifications, commit
listener); gauges that describe "now" are read at scrape time from the live state by a
custom collector, so nothing is added to hot paths but a dict increment."""

from __future__ import annotations

import threading
from collections import Counter as _Counter
from typing import Any

from litestar import MediaType, Response, get
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from scheduler.jobs import Job
from store.clock import datetime_to_ms

JOBS = Counter("coordinator_jobs_total", "Job transitions seen by this process's dispatch core",
               ["cargo", "status"])
DISPATCH_LATENCY = Histogram("coordinator_dispatch_latency_seconds", "Submission to first offer",
                             buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
TRANSFERS = Counter("coordinator_ledger_transfers_total", "Ledger transfer rows committed by this process", ["code"])
EVENTS = Counter("coordinator_events_committed_total", "Events committed by this process")


class MetricsListener:
    """SchedulerListener + commit listener feeding the counters above."""

    def __init__(self, core: Any) -> None:
        self.core = core

    def offer(self, island_id: str, offer: Any) -> None:
        pass

    def cancel(self, island_id: str, job_id: str) -> None:
        pass

    def job_changed(self, job_id: str, status: str, event: Any) -> None:
        live = self.core.jobs.get(event.originator_id)
        cargo = live.cargo if live is not None else getattr(event, "cargo", "?")
        JOBS.labels(cargo=cargo, status=status).inc()
        if isinstance(event, Job.Assigned) and live is not None:
            DISPATCH_LATENCY.observe(max(0, datetime_to_ms(event.timestamp) - live.submitted_ms) / 1000)

    def on_commit(self, recordings: list[Any]) -> None:
        EVENTS.inc(len(recordings))
        codes: _Counter[str] = _Counter()
        for r in recordings:
            for row in getattr(r.domain_event, "transfers", ()) or ():
                codes[row[3]] += 1
        for code, n in codes.items():
            TRANSFERS.labels(code=code).inc(n)


class LiveCollector:
    """Gauges read at scrape time: queue depth, Islands online, refusals, commit batches."""

    def __init__(self, coordinator: Any) -> None:
        self.c = coordinator
        self._lock = threading.Lock()

    def collect(self) -> Any:
        sched = self.c.scheduler
        core = sched.core
        queue = GaugeMetricFamily("coordinator_queue_depth", "Queued Jobs per Cargo", labels=["cargo"])
        live = GaugeMetricFamily("coordinator_jobs_live", "Non-terminal Jobs by state and Cargo",
                                 labels=["cargo", "status"])
        islands = GaugeMetricFamily("coordinator_islands", "Islands known to the dispatcher", labels=["state"])
        with core.lock:
            for cargo, depth in core.queue.depths().items():
                queue.add_metric([cargo], depth)
            by_state: _Counter[tuple[str, str]] = _Counter((j.cargo, j.status) for j in core.jobs.values())
            recs = list(core.registry.islands.values())
        for (cargo, status), n in sorted(by_state.items()):
            live.add_metric([cargo, status], n)
        islands.add_metric(["online"], sum(1 for r in recs if r.online))
        islands.add_metric(["approved"], sum(1 for r in recs if r.approved))
        islands.add_metric(["known"], len(recs))
        refusals = CounterMetricFamily("coordinator_admission_refusals", "Admission refusals by reason",
                                       labels=["reason"])
        for reason, n in sorted(sched.refusals.counts.items()):
            refusals.add_metric([reason], n)
        stats = self.c.committer.stats
        batches = CounterMetricFamily("coordinator_commit_batches", "Group-commit transactions")
        batches.add_metric([], stats.batches)
        commands = CounterMetricFamily("coordinator_commit_commands", "Commands committed in batches")
        commands.add_metric([], stats.commands)
        conflicts = CounterMetricFamily("coordinator_commit_conflicts", "Version conflicts retried")
        conflicts.add_metric([], stats.conflicts)
        recent = GaugeMetricFamily("coordinator_commit_batch_size_mean", "Mean commands per batch (recent)")
        sizes = list(stats.batch_sizes[-512:])
        recent.add_metric([], sum(sizes) / len(sizes) if sizes else 0.0)
        leader = GaugeMetricFamily("coordinator_dispatch_leader", "1 if this process dispatches")
        leader.add_metric([], 1 if core.leader.is_leader() else 0)
        yield from (queue, live, islands, refusals, batches, commands, conflicts, recent, leader)
        link = getattr(self.c, "nats_link", None)
        if link is not None:
            nats_msgs = CounterMetricFamily("coordinator_nats_messages", "NATS Island link events by kind "
                                            "(bad_messages:<subject>, refused:<code>, offers, heartbeats, ...)",
                                            labels=["kind"])
            for kind, n in sorted(link.stats.items()):
                nats_msgs.add_metric([kind], n)
            connected = GaugeMetricFamily("coordinator_nats_connected", "1 while the NATS link is connected")
            connected.add_metric([], 1 if link.connected.is_set() else 0)
            yield from (nats_msgs, connected)


def install(services: Any, registry: CollectorRegistry = REGISTRY) -> None:
    c = services.coordinator
    listener = MetricsListener(c.scheduler.core)
    c.listeners.add(listener)
    c.committer.add_listener(listener.on_commit)
    collector = LiveCollector(c)
    try:
        registry.register(collector)
    except ValueError:  # a second app in one process (tests): replace the old collector
        for old in [x for x in list(registry._collector_to_names) if isinstance(x, LiveCollector)]:
            registry.unregister(old)
        registry.register(collector)


@get("/metrics", media_type=MediaType.TEXT, sync_to_thread=False)
def metrics_handler() -> Response:
    return Response(generate_latest(REGISTRY), media_type="text/plain; version=0.0.4; charset=utf-8")
