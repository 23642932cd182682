"""Random sequences of ledger commands against a simple reference model, on SQLite and
PostgreSQL: balances equal the model, the books sum to zero, no consumer balance goes
negative, verify passes, and a replay of the log rebuilds identical balances."""

from __future__ import annotations

import dataclasses
import uuid

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, precondition, rule

from ledger import audit, names
from ledger.errors import (
    FreeTierExhausted,
    HoldAlreadyResolved,
    HoldExceeded,
    IdempotencyConflict,
    InsufficientCredits,
    KycRequired,
)
from ledger.service import Ledger, LedgerConfig
from ledger.sweeper import HoldSweeper
from store.clock import ManualClock
from store.factory import StoreConfig, iter_log, open_app
from store.unit_of_work import GroupCommitter
from tests.conftest import drop_schema, make_store

CONFIG = LedgerConfig(fee_bps=1_500, hold_ttl_ms=60_000, free_tier_limit_micro=5_000_000,
                      free_tier_grant_micro=2_000_000, expiry_grace_ms=0)
amounts = st.integers(min_value=1, max_value=20_000_000)


class LedgerMachine(RuleBasedStateMachine):
    accounts = Bundle("accounts")

    def __init__(self) -> None:
        super().__init__()
        self.clock = ManualClock()
        self.store = fresh_store(self.base_store)  # every example starts from an empty log
        self.app = open_app(self.store)
        self.committer = GroupCommitter(self.app, self.clock)
        self.ledger = Ledger(self.committer, CONFIG)
        self.owner = uuid.uuid4()
        self.ledger.open_account(self.owner, "owner@x", kyc_verified=True, free_tier_grant=False)
        # reference model
        self.spendable: dict[uuid.UUID, int] = {self.owner: 0}
        self.held: dict[uuid.UUID, int] = {self.owner: 0}
        self.kyc: dict[uuid.UUID, bool] = {self.owner: True}
        self.ft_used: dict[uuid.UUID, int] = {self.owner: 0}
        self.holds: dict[tuple[uuid.UUID, str], list] = {}  # -> [amount, state, expires, free_tier]
        self.keys: dict[tuple[uuid.UUID, str], tuple[int, str, int]] = {}  # idem key -> (amount, code, result)
        self.earned = 0
        self.fees = 0
        self.n = 0

    def teardown(self) -> None:
        try:
            f = audit.fold(iter_log(self.app, topics=audit.LEDGER_TOPICS), check=True)
            f.finish(self.clock.now_ms(), CONFIG.expiry_grace_ms + 10**12)
            assert not f.violations, f.violations[:3]
            assert f.summary()["sum_micro"] == 0
            for acct in self.spendable:
                assert f.balances.get(names.spendable(acct), 0) == self.spendable[acct]
                assert f.balances.get(names.held(acct), 0) == self.held[acct]
            assert f.balances.get(names.earnings(self.owner), 0) == self.earned
            # a fresh application (no cache) rebuilds identical aggregates from the log
            fresh_app = open_app(self.store)
            try:
                for acct in self.spendable:
                    agg = fresh_app.repository.get(acct)
                    assert (agg.spendable_micro, agg.held_micro) == (self.spendable[acct], self.held[acct])
            finally:
                fresh_app.close()
        finally:
            self.committer.close()
            self.app.close()
            if self.store.schema:
                drop_schema(self.store.schema)

    @initialize(target=accounts, kyc=st.booleans())
    def first_account(self, kyc):
        return self._open(kyc)

    @rule(target=accounts, kyc=st.booleans())
    def open_account(self, kyc):
        return self._open(kyc)

    def _open(self, kyc: bool) -> uuid.UUID:
        acct = uuid.uuid4()
        self.ledger.open_account(acct, f"{acct}@x", kyc_verified=kyc)
        self.spendable[acct] = CONFIG.free_tier_grant_micro
        self.held[acct] = 0
        self.kyc[acct] = kyc
        self.ft_used[acct] = 0
        return acct

    @rule(acct=accounts, amount=amounts, code=st.sampled_from(["purchase", "grant"]))
    def fund(self, acct, amount, code):
        self.n += 1
        key = f"fund-{self.n}"
        after = self.ledger.fund(acct, amount, code=code, reference="r", reason="test", idem_key=key)
        self.spendable[acct] += amount
        assert after == self.spendable[acct]
        self.keys[(acct, key)] = (amount, code, after)

    @precondition(lambda self: self.keys)
    @rule(data=st.data(), same=st.booleans())
    def repeat_idempotency_key(self, data, same):
        (acct, key), (amount, code, result) = data.draw(st.sampled_from(sorted(self.keys.items(), key=str)))
        if same:  # the first outcome again, and nothing moves
            assert self.ledger.fund(acct, amount, code=code, reference="r", reason="test", idem_key=key) == result
        else:
            with pytest.raises(IdempotencyConflict):
                self.ledger.fund(acct, amount + 1, code=code, reference="r", reason="test", idem_key=key)

    @rule(acct=accounts, amount=amounts)
    def place_hold(self, acct, amount):
        self.n += 1
        hold_id = f"h{self.n}"
        free_tier = not self.kyc[acct]
        expected: type[Exception] | None = None
        if free_tier:
            remaining = CONFIG.free_tier_limit_micro - self.ft_used[acct]
            if remaining <= 0:
                expected = KycRequired
            elif amount > remaining:
                expected = FreeTierExhausted
        if expected is None and amount > self.spendable[acct]:
            expected = InsufficientCredits
        if expected is not None:
            with pytest.raises(expected):
                self.ledger.place_hold(acct, hold_id, amount, reference=f"job:{hold_id}")
            return
        assert self.ledger.place_hold(acct, hold_id, amount, reference=f"job:{hold_id}") == hold_id
        # the same command again is answered with the first outcome, nothing moves twice
        assert self.ledger.place_hold(acct, hold_id, amount, reference=f"job:{hold_id}") == hold_id
        self.spendable[acct] -= amount
        self.held[acct] += amount
        if free_tier:
            self.ft_used[acct] += amount
        self.holds[(acct, hold_id)] = [amount, "open", self.clock.now_ms() + CONFIG.hold_ttl_ms, free_tier]

    def _open_holds(self):
        return sorted(((k, v) for k, v in self.holds.items() if v[1] == "open"), key=lambda kv: kv[0][1])

    @precondition(lambda self: any(v[1] == "open" for v in self.holds.values()))
    @rule(data=st.data(), frac=st.integers(0, 120))
    def post(self, data, frac):
        (acct, hold_id), hold = data.draw(st.sampled_from(self._open_holds()))
        actual = hold[0] * frac // 100
        if actual > hold[0]:
            with pytest.raises(HoldExceeded):
                self.ledger.post_hold(acct, hold_id, actual, self.owner)
            return
        result = self.ledger.post_hold(acct, hold_id, actual, self.owner)
        assert result.earning_micro + result.fee_micro == actual
        assert result.released_micro == hold[0] - actual
        self.held[acct] -= hold[0]
        self.spendable[acct] += hold[0] - actual
        if hold[3]:
            self.ft_used[acct] -= hold[0] - actual
        self.earned += result.earning_micro
        self.fees += result.fee_micro
        hold[1] = "posted"
        with pytest.raises(HoldAlreadyResolved):
            self.ledger.release_hold(acct, hold_id, "late")

    @precondition(lambda self: any(v[1] == "open" for v in self.holds.values()))
    @rule(data=st.data())
    def release(self, data):
        (acct, hold_id), hold = data.draw(st.sampled_from(self._open_holds()))
        assert self.ledger.release_hold(acct, hold_id, "cancelled") == hold[0]
        assert self.ledger.release_hold(acct, hold_id, "cancelled") == 0  # idempotent
        self._released(acct, hold)

    def _released(self, acct, hold) -> None:
        self.held[acct] -= hold[0]
        self.spendable[acct] += hold[0]
        if hold[3]:
            self.ft_used[acct] -= hold[0]
        hold[1] = "released"

    @rule(ms=st.integers(1_000, 90_000))
    def time_passes_and_sweeper_runs(self, ms):
        self.clock.advance(ms)
        sweeper = HoldSweeper(self.ledger, lambda start: iter_log(self.app, start=start,
                                                                    topics=audit.LEDGER_TOPICS))
        released = sweeper.tick(self.clock.now_ms())
        expected = 0
        for (acct, _), hold in self.holds.items():
            if hold[1] == "open" and hold[2] <= self.clock.now_ms():
                self._released(acct, hold)
                expected += 1
        assert released == expected

    @rule(acct=accounts)
    def verify_kyc(self, acct):
        self.ledger.set_kyc(acct, True, by="test", reference="kyc")
        self.kyc[acct] = True

    @invariant()
    def balances_match_the_model(self):
        for acct in list(self.spendable)[-3:]:
            bal = self.ledger.balance(acct)
            assert (bal.spendable_micro, bal.held_micro) == (self.spendable[acct], self.held[acct])
            assert bal.spendable_micro >= 0


def fresh_store(base: StoreConfig) -> StoreConfig:
    if base.database_url:
        return dataclasses.replace(base, schema=f"t_{uuid.uuid4().hex[:12]}")
    return dataclasses.replace(base, data_dir=base.data_dir / uuid.uuid4().hex[:8])


def _run(kind: str, tmp_path, examples: int, steps: int) -> None:
    LedgerMachine.base_store = make_store(kind, tmp_path)  # type: ignore[attr-defined]
    test = LedgerMachine.TestCase
    test.settings = settings(max_examples=examples, stateful_step_count=steps, deadline=None,
                             suppress_health_check=list(HealthCheck))
    test().runTest()


def test_ledger_state_machine_sqlite(tmp_path):
    _run("sqlite", tmp_path, examples=30, steps=30)


@pytest.mark.postgres
def test_ledger_state_machine_postgres(tmp_path):
    _run("postgres", tmp_path, examples=25, steps=30)

