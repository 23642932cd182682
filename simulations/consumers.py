"""Simulated consumers: accounts with KYC status, balances, a Cargo mix, a preferred
region, bids and patience.

``build_accounts`` expands the scenario's consumer classes into ``SimAccount`` specs. The
simulator never debits them: balances are the *starting* balances the system under test
is given; the real ledger does the rest.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from itertools import accumulate

import msgspec

from simulations.units import credits_to_micro


class ConsumerClass(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``count`` accounts that behave alike."""

    name: str
    count: int
    kyc: bool = True
    balance: str | int = "100"  # starting balance, credits
    cargo_mix: dict[str, float] = msgspec.field(default_factory=lambda: {"llm-chat": 1.0})  # Cargo -> share of this class's Jobs
    regions: dict[str, float] = {}  # preferred Island region -> weight; {} = no preference
    bid: dict[str, str | int] = {}  # Cargo -> the bid_price it sends (credits per billing unit); absent = market rate
    activity: float = 1.0  # relative share of a stream's Jobs per account
    patience_s: float = 0.0  # cancel a Job still waiting after this long; 0 = never


class SimAccount(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    no: int
    account_id: str
    cls: str
    kyc: bool
    balance_micro: int
    region: str  # preferred region, "" = any
    bids_micro: dict[str, int]
    cargos: tuple[str, ...]
    cargo_cum: tuple[float, ...]  # cumulative weights of ``cargos``
    activity: float
    patience_ms: int


def build_accounts(classes: Sequence[ConsumerClass], rng: random.Random) -> list[SimAccount]:
    accounts: list[SimAccount] = []
    names = set()
    for ci, c in enumerate(classes):
        what = f"consumers[{ci}] ({c.name})"
        if c.name in names:
            raise ValueError(f"{what}: duplicate consumer class name")
        names.add(c.name)
        if c.count < 0 or c.activity < 0 or c.patience_s < 0:
            raise ValueError(f"{what}: count, activity and patience_s must be >= 0")
        if not c.cargo_mix or any(w < 0 for w in c.cargo_mix.values()) or sum(c.cargo_mix.values()) <= 0:
            raise ValueError(f"{what}: cargo_mix needs weights >= 0 with a positive sum")
        balance = credits_to_micro(c.balance, what=f"{what}.balance")
        bids = {slug: credits_to_micro(v, what=f"{what}.bid.{slug}") for slug, v in c.bid.items()}
        cargos = tuple(c.cargo_mix)
        cum = tuple(accumulate(float(c.cargo_mix[s]) for s in cargos))
        rnames = list(c.regions)
        rweights = [float(c.regions[r]) for r in rnames]
        if rnames and (any(w < 0 for w in rweights) or sum(rweights) <= 0):
            raise ValueError(f"{what}: region weights must be >= 0 with a positive sum")
        for _ in range(c.count):
            no = len(accounts)
            region = rng.choices(rnames, rweights)[0] if rnames else ""
            accounts.append(SimAccount(
                no=no, account_id=f"acct-{no:06d}", cls=c.name, kyc=c.kyc, balance_micro=balance, region=region,
                bids_micro=bids, cargos=cargos, cargo_cum=cum, activity=float(c.activity),
                patience_ms=int(c.patience_s * 1000)))
    return accounts
