"""The ledger's faster computations agree with the ones they replace (old vs new on
hypothesis inputs): the hold fingerprint and the ledger
account names an Account builds once at load time."""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from uuid import UUID

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from ledger import names
from ledger.accounts import Account
from ledger.service import fingerprint, hold_fingerprint

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


class LoudStr(str):
    """A str whose text differs from its characters, and whose own formatting differs
    again: for it f"{x}" and str(x) disagree (they agree for every type that keeps the
    default __format__)."""

    def __str__(self) -> str:
        return "loud:" + str.__str__(self)

    def __format__(self, spec: str) -> str:
        return "formatted:" + str.__str__(self)


class Small(enum.IntEnum):
    ONE = 1
    BIG = 10**12


class LoudUUID(UUID):
    def __str__(self) -> str:
        return "loud-" + super().__str__()


# ------------------------------------------------------------------ hold fingerprint
texts = st.text(max_size=60) | st.sampled_from(["", "|", "job:a|b", "h\u00e9\u2603", "job:00000000-0000"])
odd_parts = st.one_of(texts.map(LoudStr), st.integers(-(10**20), 10**20), st.sampled_from(list(Small)),
                      st.booleans(), st.none(), st.integers(0, 2**128 - 1).map(lambda i: UUID(int=i)))


@given(hold_id=texts, amount=st.integers(-(10**20), 10**20), reference=texts)
def test_hold_fingerprint_equals_fingerprint_for_plain_values(hold_id: str, amount: int, reference: str) -> None:
    assert hold_fingerprint(hold_id, amount, reference) == fingerprint("hold", hold_id, amount, reference)


@given(hold_id=texts | odd_parts, amount=st.integers(0, 10**15) | odd_parts, reference=texts | odd_parts)
@example(hold_id=LoudStr("h"), amount=1, reference="r")
@example(hold_id="h", amount=Small.ONE, reference=LoudStr("r"))
@example(hold_id="h", amount=True, reference=UUID(int=5))
def test_hold_fingerprint_equals_fingerprint_for_any_values(hold_id, amount, reference) -> None:  # noqa: ANN001
    assert hold_fingerprint(hold_id, amount, reference) == fingerprint("hold", hold_id, amount, reference)


def test_hold_fingerprint_str_subclass_takes_the_general_path() -> None:
    # f"{x}" of this subclass is "formatted:abc", str(x) is "loud:abc": the fast path must not be used.
    assert hold_fingerprint(LoudStr("abc"), 1, "r") == fingerprint("hold", "loud:abc", 1, "r")
    assert hold_fingerprint(LoudStr("abc"), 1, "r") != fingerprint("hold", "abc", 1, "r")


# ------------------------------------------------------------------ ledger names
def _account(ident: UUID) -> Account:
    return Account._create(Account.Opened, id=ident, email="x@example", kyc_verified=False, timestamp=T0)


uuids = st.integers(0, 2**128 - 1).map(lambda i: UUID(int=i))


@given(ident=uuids, other=uuids)
def test_ledger_names_equal_names_of_the_given_id(ident: UUID, other: UUID) -> None:
    acct = _account(ident)
    for given_id in (ident, UUID(int=ident.int), UUID(str(ident)), str(ident), str(ident).upper(), other,
                     str(other), LoudUUID(int=ident.int)):
        assert acct.ledger_names(given_id) == (names.spendable(given_id), names.held(given_id))


@given(ident=uuids)
def test_ledger_names_of_an_account_with_a_uuid_subclass_id(ident: UUID) -> None:
    loud = LoudUUID(int=ident.int)
    acct = _account(loud)
    for given_id in (loud, ident, UUID(int=ident.int), str(ident)):
        assert acct.ledger_names(given_id) == (names.spendable(given_id), names.held(given_id))
    assert acct.ledger_names(loud)[0].startswith("spendable:loud-")


@pytest.mark.parametrize("given_id", ["ABC", "spendable"])
def test_ledger_names_of_text_ids(given_id: str) -> None:
    acct = _account(UUID(int=7))
    assert acct.ledger_names(given_id) == (f"spendable:{given_id}", f"held:{given_id}")
