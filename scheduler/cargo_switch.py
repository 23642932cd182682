"""The Cargo kill switch: operators enable or disable a Cargo at run time. One small
aggregate per Cargo slug (id = uuid5 of the slug); every switch names the operator and
the reason. The dispatch core folds these events over the catalog file's defaults, so
every coordinator process admits by the same switch state."""

from __future__ import annotations

import uuid

from eventsourcing.domain import Aggregate

CARGO_SWITCH_NAMESPACE = uuid.UUID("6f1d7a52-3c1e-4c55-9a55-0a7c1e0c0004")


def switch_id(slug: str) -> uuid.UUID:
    return uuid.uuid5(CARGO_SWITCH_NAMESPACE, slug)


class CargoSwitch(Aggregate):
    class Created(Aggregate.Created):
        slug: str

    def __init__(self, slug: str) -> None:
        self.slug = slug
        self.enabled: bool | None = None  # None: the catalog file decides

    class Switched(Aggregate.Event):
        enabled: bool
        by: str
        reason: str

        def apply(self, switch: CargoSwitch) -> None:
            switch.enabled = self.enabled
