"""The tracking table: one row per projection table with the log position it has applied
(decision 0021)."""

from __future__ import annotations

from projections.sql import INT, TEXT, Table

TRACKING = Table(
    "proj_tracking",
    (("name", TEXT), ("position", INT), ("generation", INT), ("version", INT), ("events", INT),
     ("updated_at_ms", INT)),
    key=("name",),
)
