"""Projection metrics (prometheus-client default registry; the /metrics endpoint exposes it)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LAG = Histogram(
    "coordinator_projection_lag_seconds",
    "Time from an event's commit (in this process) to the commit of the views that include it",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
POSITION = Gauge("coordinator_projection_position", "Log position the projection has committed", ["projection"])
BEHIND = Gauge("coordinator_projection_behind_events",
               "Log positions between the head of the log and the lowest projection position")
EVENTS = Counter("coordinator_projection_events_total", "Events applied to the views", ["projection"])
PAGES = Counter("coordinator_projection_pages_total", "View transactions committed")
RESETS = Counter("coordinator_projection_resets_total",
                 "Times the runner found the tracking row moved by someone else (rebuild, another runner) "
                 "and reloaded")
ERRORS = Counter("coordinator_projection_errors_total", "Failed view transactions (rolled back, retried)")
