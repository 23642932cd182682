"""Admission: one place that decides whether a Job may enter, with typed refusals.

The pure part (`admit`) validates the Cargo, the input and the preferences and prices
the worst case. The account part (KYC, free tier, balance, suspension) is decided inside
the account aggregate when the hold is placed (ledger.service.place_hold_in), in the same
transaction as `JobSubmitted`; its ledger errors map to the same refusal reasons here."""

from __future__ import annotations


from collections import Counter
from dataclasses import dataclass
from typing import Any

import msgspec

from ledger import errors as lerr
from scheduler.cargo import Cargo
from scheduler.catalog import Catalog
from scheduler.market import BadPrice, parse_price_micro
from scheduler.validation import ChatInput, ImageInput, InvalidInput, validate_input, worst_case_micro

INVALID_INPUT = "invalid_input"
UNKNOWN_CARGO = "unknown_cargo"
CARGO_DISABLED = "cargo_disabled"
KYC_REQUIRED = "kyc_required"
FREE_TIER_EXHAUSTED = "free_tier_exhausted"
INSUFFICIENT_CREDITS = "insufficient_credits"
ACCOUNT_SUSPENDED = "account_suspended"
UNKNOWN_ACCOUNT = "unknown_account"
QUEUE_FULL = "queue_full"
NO_ISLAND_WITHIN_BUDGET = "no_island_within_budget"
REASONS = (INVALID_INPUT, UNKNOWN_CARGO, CARGO_DISABLED, KYC_REQUIRED, FREE_TIER_EXHAUSTED, INSUFFICIENT_CREDITS,
           ACCOUNT_SUSPENDED, UNKNOWN_ACCOUNT, QUEUE_FULL, NO_ISLAND_WITHIN_BUDGET)

MAX_REGIONS = 16
MAX_PREF_TEXT = 64


class AdmissionRefused(Exception):
    """A Job was not admitted. `reason` is one of REASONS; nothing was written."""

    def __init__(self, reason: str, message: str, *, errors: dict[str, list[str]] | None = None,
                 required_micro: int | None = None, available_micro: int | None = None,
                 too_large: bool = False, rate_micro: int | None = None, budget_micro: int | None = None,
                 budget_source: str | None = None) -> None:
        assert reason in REASONS, reason
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.errors = errors or {}
        self.required_micro = required_micro
        self.available_micro = available_micro
        self.too_large = too_large
        self.rate_micro = rate_micro  # no_island_within_budget: the Cargo's current market rate
        self.budget_micro = budget_micro
        self.budget_source = budget_source


@dataclass(frozen=True)
class Admitted:
    cargo: Cargo
    input: ChatInput | ImageInput
    input_dict: dict[str, Any]
    model: str
    hold_micro: int
    prefs: dict[str, Any]


def parse_prefs(raw: dict[str, Any] | None) -> dict[str, Any]:
    """Routing preferences: region(s), platform(s), min hardware tier, max latency, bid.
    Returns a canonical dict (stored in the Job event); raises InvalidInput by field."""
    raw = raw or {}
    errors: dict[str, list[str]] = {}
    out: dict[str, Any] = {}

    def texts(key: str, value: Any) -> list[str]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) and 0 < len(v) <= MAX_PREF_TEXT for v in items):
            errors.setdefault(key, []).append(f"must be a string or a list of strings of 1..{MAX_PREF_TEXT} characters")
            return []
        if len(items) > MAX_REGIONS:
            errors.setdefault(key, []).append(f"at most {MAX_REGIONS} values")
            return []
        return sorted(set(items))

    for key in ("region", "regions"):
        if raw.get(key) is not None:
            out["regions"] = sorted(set(out.get("regions", [])) | set(texts(key, raw[key])))
    if raw.get("platform") is not None:
        out["platforms"] = texts("platform", raw["platform"])
    for key, low, high in (("min_hardware_tier", 0, 4), ("max_latency_ms", 1, 60_000)):
        v = raw.get(key)
        if v is None:
            continue
        if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
            errors.setdefault(key, []).append(f"must be an integer within {low}..{high}")
        else:
            out[key] = v
    bid = raw.get("bid_price")
    if bid is not None:
        try:
            out["bid_micro"] = parse_price_micro(bid)
        except BadPrice as exc:
            errors.setdefault("bid_price", []).append(str(exc))
    if errors:
        raise InvalidInput(errors)
    return out


def admit(catalog: Catalog, cargo_slug: str, raw_input: Any, raw_prefs: dict[str, Any] | None = None) -> Admitted:
    """Everything about a submission that does not depend on the account."""
    if not isinstance(cargo_slug, str) or not cargo_slug:
        raise AdmissionRefused(INVALID_INPUT, "workload is required", errors={"workload": ["is required"]})
    cargo = catalog.get(cargo_slug)
    if cargo is None:
        raise AdmissionRefused(UNKNOWN_CARGO, f"unknown workload {cargo_slug[:64]!r}",
                               errors={"workload": [f"unknown workload {cargo_slug[:64]!r}"]})
    if not cargo.enabled:
        raise AdmissionRefused(CARGO_DISABLED, f"workload {cargo.slug!r} is disabled")
    try:
        validated = validate_input(cargo, raw_input)
        prefs = parse_prefs(raw_prefs)
    except InvalidInput as exc:
        raise AdmissionRefused(INVALID_INPUT, "invalid input: " + "; ".join(
            f"{k}: {', '.join(v)}" for k, v in sorted(exc.errors.items()))[:1000],
            errors=exc.errors, too_large=exc.too_large) from None
    model = getattr(validated, "model", None) or cargo.model
    return Admitted(cargo=cargo, input=validated, input_dict=msgspec.to_builtins(validated), model=model,
                    hold_micro=worst_case_micro(cargo, validated), prefs=prefs)


def refusal_from_ledger(exc: lerr.LedgerError) -> AdmissionRefused:
    if isinstance(exc, lerr.InsufficientCredits):
        return AdmissionRefused(INSUFFICIENT_CREDITS, exc.message, required_micro=exc.required_micro,
                                available_micro=exc.available_micro)
    if isinstance(exc, lerr.FreeTierExhausted):
        return AdmissionRefused(FREE_TIER_EXHAUSTED, exc.message, required_micro=exc.required_micro,
                                available_micro=exc.available_micro)
    if isinstance(exc, lerr.KycRequired):
        return AdmissionRefused(KYC_REQUIRED, exc.message)
    if isinstance(exc, lerr.AccountSuspended):
        return AdmissionRefused(ACCOUNT_SUSPENDED, exc.message)
    if isinstance(exc, lerr.UnknownAccount):
        return AdmissionRefused(UNKNOWN_ACCOUNT, exc.message)
    raise exc


class RefusalCounter:
    """Refusals by reason (countable; exported as a metric)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def record(self, refusal: AdmissionRefused) -> None:
        self.counts[refusal.reason] += 1
