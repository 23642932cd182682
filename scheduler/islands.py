"""The Island aggregate: registration under an owner account, approval state,
capabilities, online/offline, and karma (every change with reason, delta and balance
after). Live state (free slots, warm models, latency) is not here: it changes with every
heartbeat and lives in the registry (scheduler/registry.py)."""

from __future__ import annotations

from store.chain import ChainedAggregate
from routing.karma import rebased_milli

PENDING_APPROVAL = "pending"
APPROVED = "approved"
SUSPENDED = "suspended"


class Island(ChainedAggregate):
    class Registered(ChainedAggregate.Created):
        """`karma_start_milli` (50,000 on the 0..100 scale) is absent from Islands
        recorded before decision 0051: their karma events are on the old scale (start 0)
        until a `KarmaRebased` moves them (see `karma_legacy`)."""

        owner_account_id: str
        name: str
        token_hash: str
        capabilities: dict
        approval: str
        karma_start_milli: int

    def __init__(self, owner_account_id: str, name: str, token_hash: str, capabilities: dict, approval: str,
                 karma_start_milli: int | None = None) -> None:
        self.owner_account_id = owner_account_id
        self.name = name
        self.token_hash = token_hash
        self.capabilities = capabilities
        self.approval = approval
        self.online = False
        self.online_since_ms = 0
        # decision 0051: an Island recorded on the old scale keeps its logged numbers
        # (karma_milli is what its events say) until the first change rebases it.
        self.karma_legacy = karma_start_milli is None
        self.karma_milli = 0 if karma_start_milli is None else karma_start_milli
        self.karma_carry = 0
        self.karma_updated_at = self.created_on  # time of the last karma change
        self.jobs_completed = 0
        self.jobs_failed = 0
        self.draining = False
        self.transport = "websocket"
        self.nats_user = ""
        self.nats_password_hash = ""
        # Asking prices per Cargo slug (and "_default"), micro-credits per billing unit
        # (scheduler/market.py); registration's capabilities may carry the first ones.
        self.asks_micro: dict[str, int] = dict(capabilities.get("asks_micro", {}))

    class Approved(ChainedAggregate.Event):
        by: str
        reason: str

        def apply(self, island: Island) -> None:
            island.approval = APPROVED

    class Suspended(ChainedAggregate.Event):
        by: str
        reason: str

        def apply(self, island: Island) -> None:
            island.approval = SUSPENDED

    class DrainChanged(ChainedAggregate.Event):
        """An operator drains an Island (`draining` true: no new Jobs are offered, running
        ones finish) or ends the drain. Approval is unchanged."""

        draining: bool
        by: str
        reason: str

        def apply(self, island: Island) -> None:
            island.draining = self.draining

    class CapabilitiesChanged(ChainedAggregate.Event):
        capabilities: dict

        def apply(self, island: Island) -> None:
            island.capabilities = self.capabilities

    class AsksChanged(ChainedAggregate.Event):
        """The Island's asking prices changed (owner's POST /market/asking-prices, or the
        Island's heartbeat `asking_prices`): `asks_micro` is the whole new map, slug (or
        `_default`) -> micro-credits per the Cargo's billing unit; `by` who set it."""

        asks_micro: dict
        by: str

        def apply(self, island: Island) -> None:
            island.asks_micro = dict(self.asks_micro)

    class WentOnline(ChainedAggregate.Event):
        def apply(self, island: Island) -> None:
            island.online = True
            island.online_since_ms = int(self.timestamp.timestamp() * 1000)

    class WentOffline(ChainedAggregate.Event):
        reason: str

        def apply(self, island: Island) -> None:
            island.online = False

    class TokenRotated(ChainedAggregate.Event):
        token_hash: str

        def apply(self, island: Island) -> None:
            island.token_hash = self.token_hash

    class Paired(ChainedAggregate.Event):
        """An Island of the published agent (NATS, docs/ISLANDS.md "NATS") was bound to
        its owner's account with a pairing code: `host_id` is the agent's own id (the
        Island's id), `agent_version` what its registration said."""

        host_id: str
        transport: str
        agent_version: str

        def apply(self, island: Island) -> None:
            island.transport = self.transport

    class NatsCredentialIssued(ChainedAggregate.Event):
        """A NATS user and password for the Island (decision 0055). Only the bcrypt hash
        of the password is stored; the password was shown once to whoever asked (`by`)."""

        user: str
        password_hash: str
        by: str

        def apply(self, island: Island) -> None:
            island.nats_user = self.user
            island.nats_password_hash = self.password_hash

    class KarmaChanged(ChainedAggregate.Event):
        """Karma moved by `delta_milli` for `reason` (completed, failure, missed_ack,
        lapsed_lease); `karma_after_milli` is the balance after; `carry` is the exact
        fraction of a milli-karma carried to the next compute accrual."""

        delta_milli: int
        reason: str
        job_id: str
        karma_after_milli: int
        carry: int
        compute_ms: int

        def apply(self, island: Island) -> None:
            island.karma_milli += self.delta_milli
            assert island.karma_milli == self.karma_after_milli
            island.karma_carry = self.carry
            island.karma_updated_at = self.timestamp
            if self.reason == "completed":
                island.jobs_completed += 1
            elif self.reason in ("failure", "lapsed_lease"):
                island.jobs_failed += 1

    class KarmaAdjusted(KarmaChanged):
        """An operator moved the karma (decision 0041: the way back below a Cargo's karma
        gate): `reason` is "operator_adjustment", `job_id` "", `carry` unchanged,
        `compute_ms` 0; `by` is the operator, `note` why. A `KarmaChanged`, so every reader
        of karma reads it too."""

        by: str
        note: str

    class KarmaRebased(KarmaChanged):
        """Decision 0051: an Island recorded on the old karma scale (start 0, floor -100,
        no ceiling) moved onto 0..100 before its next change: `delta_milli` =
        `rebased_milli(old) - old`, reason "rebase_0_100", `job_id` "", `compute_ms` 0,
        carry kept. A `KarmaChanged`, so every reader of karma reads it; from here on the
        Island's events are on the new scale."""

        def apply(self, island: Island) -> None:
            super().apply(island)
            island.karma_legacy = False

    @property
    def karma_shown_milli(self) -> int:
        """Karma on the 0..100 scale, also for an Island still on the old scale (an offset
        at read: `routing.karma.rebased_milli`)."""
        return rebased_milli(self.karma_milli) if self.karma_legacy else self.karma_milli
