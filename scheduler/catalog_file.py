"""The catalog file: parse the TOML tables into Cargos and check every field, collecting
every problem (each naming the Cargo and the field) instead of stopping at the first.
Format: docs/CARGOS.md."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from ledger.pricing import (
    ChatPricing,
    ImagePricing,
    chat_price_micro,
    credits_to_micro,
    image_price_micro,
    micro_to_credits,
)
from scheduler.cargo import (
    KINDS,
    MAX_INT32,
    MODEL_RE,
    RUNTIME_TYPES,
    SLUG_RE,
    Cargo,
    ImageBounds,
)

_CARGO_KEYS = {
    "id",
    "slug",
    "name",
    "description",
    "runtime_type",
    "kind",
    "required_vram_mb",
    "required_ram_mb",
    "model",
    "models",
    "min_karma_milli",
    "requires_kyc",
    "free_tier",
    "enabled",
    "typical_prompt_tokens",
    "typical_completion_tokens",
    "pricing",
    "image",
}


_CHAT_PRICE_KEYS = {
    "base": "base_micro",
    "per_1k_prompt_tokens": "per_1k_prompt_tokens_micro",
    "per_1k_completion_tokens": "per_1k_completion_tokens_micro",
    "min": "min_micro",
    "max": "max_micro",
}


_IMAGE_PRICE_KEYS = {
    "base": "base_micro",
    "per_megapixel_step": "per_megapixel_step_micro",
    "min": "min_micro",
    "max": "max_micro",
    "hq_min": "hq_min_micro",
    "hq_max": "hq_max_micro",
}


_IMAGE_PRICE_INT_KEYS = ("hq_steps_threshold", "hq_pixels_threshold")


_IMAGE_BOUND_INT_KEYS = (
    "min_width",
    "max_width",
    "min_height",
    "max_height",
    "dimension_multiple",
    "max_steps",
    "default_width",
    "default_height",
    "default_steps",
)


def cargo_label(slug: object, cargo_id: object) -> str:
    slug_text = slug if isinstance(slug, str) else "?"
    id_text = cargo_id if isinstance(cargo_id, int) and not isinstance(cargo_id, bool) else "?"
    return f"cargo '{slug_text}' (#{id_text})"


class _Reader:
    """Typed field access on one [[cargo]] table, collecting problems."""

    def __init__(self, label: str, table: dict[str, Any], problems: list[str]) -> None:
        self.label = label
        self.table = table
        self.problems = problems
        self.ok = True

    def fail(self, field: str, message: str) -> None:
        self.ok = False
        self.problems.append(f"{self.label}: {field}: {message}")

    def _get(self, table: dict[str, Any], key: str, field: str) -> Any:
        if key not in table:
            self.fail(field, "missing")
            return None
        return table[key]

    def string(self, key: str, *, pattern: re.Pattern[str] | None = None) -> str:
        value = self._get(self.table, key, key)
        if value is None:
            return ""
        if not isinstance(value, str) or not value.strip():
            self.fail(key, f"must be a non-empty string, got {value!r}")
            return ""
        if pattern is not None and not pattern.fullmatch(value):
            self.fail(key, f"invalid value {value!r} (allowed: {pattern.pattern})")
        return value

    def choice(self, key: str, choices: tuple[str, ...]) -> str:
        value = self._get(self.table, key, key)
        if value is None:
            return ""
        if value not in choices:
            self.fail(key, f"unknown {key} {value!r} (expected one of: {', '.join(choices)})")
            return ""
        return value

    def integer(
        self, key: str, *, table: dict[str, Any] | None = None, prefix: str = "", low: int = 0,
        high: int = MAX_INT32, default: int | None = None,
    ) -> int:
        source = self.table if table is None else table
        field = prefix + key
        if key not in source and default is not None:
            return default
        value = self._get(source, key, field)
        if value is None:
            return 0
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(field, f"must be an integer, got {value!r}")
            return 0
        if not low <= value <= high:
            self.fail(field, f"must be between {low} and {high}, got {value}")
            return 0
        return value

    def boolean(self, key: str) -> bool:
        value = self._get(self.table, key, key)
        if value is None:
            return False
        if not isinstance(value, bool):
            self.fail(key, f"must be true or false, got {value!r}")
            return False
        return value

    def money(self, table: dict[str, Any], key: str, prefix: str) -> int:
        field = prefix + key
        value = self._get(table, key, field)
        if value is None:
            return 0
        if isinstance(value, float):
            self.fail(field, f"money must be a string of credits like \"{value}\", not a TOML float")
            return 0
        try:
            return credits_to_micro(value)
        except (TypeError, ValueError) as exc:
            self.fail(field, str(exc))
            return 0

    def unknown_keys(self, table: dict[str, Any], allowed: Iterable[str], prefix: str) -> None:
        allowed_set = set(allowed)
        for key in table:
            if key not in allowed_set:
                self.fail(prefix + str(key), "unknown field")


def parse_cargo(index: int, table: Any, problems: list[str]) -> Cargo | None:
    if not isinstance(table, dict):
        problems.append(f"cargo[{index}]: expected a table, got {type(table).__name__}")
        return None
    label = cargo_label(table.get("slug"), table.get("id"))
    if label.startswith("cargo '?'"):
        label = f"cargo[{index}] {label}"
    r = _Reader(label, table, problems)
    r.unknown_keys(table, _CARGO_KEYS, "")

    cargo_id = r.integer("id", low=1)
    slug = r.string("slug", pattern=SLUG_RE)
    name = r.string("name")
    description = r.string("description")
    runtime_type = r.choice("runtime_type", RUNTIME_TYPES)
    kind = r.choice("kind", KINDS)
    vram = r.integer("required_vram_mb", high=1_048_576)
    ram = r.integer("required_ram_mb", high=4_194_304)
    model = r.string("model", pattern=MODEL_RE)
    models_value = table.get("models", [model] if model else [])
    models: frozenset[str] = frozenset()
    if not isinstance(models_value, list) or not models_value:
        r.fail("models", f"must be a non-empty list of model names, got {models_value!r}")
    else:
        for i, item in enumerate(models_value):
            if not isinstance(item, str) or not MODEL_RE.fullmatch(item):
                r.fail(f"models[{i}]", f"invalid model name {item!r}")
        if len(set(models_value)) != len(models_value):
            r.fail("models", "contains duplicates")
        models = frozenset(m for m in models_value if isinstance(m, str))
        if model and model not in models:
            r.fail("model", f"default model {model!r} is not in models {sorted(models)}")
    min_karma = r.integer("min_karma_milli", low=-(2**31), high=MAX_INT32)
    requires_kyc = r.boolean("requires_kyc")
    free_tier = r.boolean("free_tier")
    enabled = r.boolean("enabled")
    if free_tier and requires_kyc:
        r.fail("free_tier", "a Cargo that requires KYC cannot be offered on the free tier")

    pricing_table = table.get("pricing")
    image_table = table.get("image")
    pricing: ChatPricing | ImagePricing | None = None
    bounds: ImageBounds | None = None
    typical = 0
    if not isinstance(pricing_table, dict):
        r.fail("pricing", "missing [cargo.pricing] table")
    elif kind == "chat":
        if image_table is not None:
            r.fail("image", "only image Cargos have an [cargo.image] table")
        r.unknown_keys(pricing_table, _CHAT_PRICE_KEYS, "pricing.")
        amounts = {f: r.money(pricing_table, k, "pricing.") for k, f in _CHAT_PRICE_KEYS.items()}
        prompt_tokens = r.integer("typical_prompt_tokens", high=1_000_000)
        completion_tokens = r.integer("typical_completion_tokens", high=1_000_000)
        if r.ok:
            _order_problems(r, amounts, [("min", "max")])
        if r.ok:
            try:
                pricing = ChatPricing(**amounts)
            except (TypeError, ValueError) as exc:
                r.fail("pricing", _strip_struct(str(exc)))
        if pricing is not None:
            typical = chat_price_micro(pricing, prompt_tokens, completion_tokens)
    elif kind == "image":
        for key in ("typical_prompt_tokens", "typical_completion_tokens"):
            if key in table:
                r.fail(key, "only chat Cargos have typical token counts")
        r.unknown_keys(
            pricing_table, [*_IMAGE_PRICE_KEYS, *_IMAGE_PRICE_INT_KEYS], "pricing."
        )
        amounts = {f: r.money(pricing_table, k, "pricing.") for k, f in _IMAGE_PRICE_KEYS.items()}
        thresholds = {
            k: r.integer(k, table=pricing_table, prefix="pricing.", high=2**40)
            for k in _IMAGE_PRICE_INT_KEYS
        }
        bounds = _parse_bounds(r, image_table)
        if r.ok:
            _order_problems(r, amounts, [("min", "max"), ("hq_min", "hq_max"), ("max", "hq_min")])
        if r.ok:
            try:
                pricing = ImagePricing(**amounts, **thresholds)
            except (TypeError, ValueError) as exc:
                r.fail("pricing", _strip_struct(str(exc)))
        if pricing is not None and bounds is not None:
            typical = image_price_micro(
                pricing, bounds.default_width, bounds.default_height, bounds.default_steps
            )

    if not r.ok or pricing is None:
        return None
    return Cargo(
        id=cargo_id,
        slug=slug,
        name=name,
        description=description,
        runtime_type=runtime_type,  # type: ignore[arg-type]
        kind=kind,  # type: ignore[arg-type]
        required_vram_mb=vram,
        required_ram_mb=ram,
        model=model,
        models=models,
        pricing=pricing,
        typical_price_micro=typical,
        min_karma_milli=min_karma,
        requires_kyc=requires_kyc,
        free_tier=free_tier,
        enabled=enabled,
        image=bounds,
    )


def _parse_bounds(r: _Reader, image_table: Any) -> ImageBounds | None:
    if not isinstance(image_table, dict):
        r.fail("image", "image Cargos need an [cargo.image] table with size and step bounds")
        return None
    r.unknown_keys(image_table, [*_IMAGE_BOUND_INT_KEYS, "default_guidance_scale"], "image.")
    values = {
        k: r.integer(k, table=image_table, prefix="image.", low=1, high=65_536)
        for k in _IMAGE_BOUND_INT_KEYS
    }
    guidance = image_table.get("default_guidance_scale", 7.5)
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not (
        0 <= guidance <= 30
    ):
        r.fail("image.default_guidance_scale", f"must be a number between 0 and 30, got {guidance!r}")
        guidance = 7.5
    if not r.ok:
        return None
    bounds = ImageBounds(**values, default_guidance_scale=float(guidance))
    before = len(r.problems)
    for problem in _bounds_problems(bounds):
        r.fail(*problem)
    return bounds if len(r.problems) == before else None


def _bounds_problems(b: ImageBounds) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for axis in ("width", "height"):
        low, high = getattr(b, f"min_{axis}"), getattr(b, f"max_{axis}")
        default = getattr(b, f"default_{axis}")
        if low > high:
            out.append((f"image.min_{axis}", f"min_{axis} ({low}) > max_{axis} ({high})"))
        elif not low <= default <= high:
            out.append(
                (f"image.default_{axis}", f"default {default} outside [{low}, {high}]")
            )
        for name, value in ((f"min_{axis}", low), (f"max_{axis}", high), (f"default_{axis}", default)):
            if value % b.dimension_multiple:
                out.append(
                    (f"image.{name}", f"{value} is not a multiple of {b.dimension_multiple}")
                )
    if not 1 <= b.default_steps <= b.max_steps:
        out.append(("image.default_steps", f"default {b.default_steps} outside [1, {b.max_steps}]"))
    return out


def check_cargo(cargo: Cargo) -> list[str]:
    """Cross-field invariants, also for Cargos built in code (tests, simulator)."""
    label = cargo_label(cargo.slug, cargo.id)
    out: list[str] = []
    if cargo.kind not in KINDS:
        out.append(f"{label}: kind: unknown kind {cargo.kind!r}")
    if cargo.runtime_type not in RUNTIME_TYPES:
        out.append(f"{label}: runtime_type: unknown runtime_type {cargo.runtime_type!r}")
    if cargo.kind == "chat" and not isinstance(cargo.pricing, ChatPricing):
        out.append(f"{label}: pricing: a chat Cargo needs ChatPricing")
    if cargo.kind == "image":
        if not isinstance(cargo.pricing, ImagePricing):
            out.append(f"{label}: pricing: an image Cargo needs ImagePricing")
        if cargo.image is None:
            out.append(f"{label}: image: an image Cargo needs ImageBounds")
        else:
            out.extend(f"{label}: {f}: {m}" for f, m in _bounds_problems(cargo.image))
    elif cargo.image is not None:
        out.append(f"{label}: image: only image Cargos have ImageBounds")
    if cargo.model not in cargo.models:
        out.append(f"{label}: model: default model {cargo.model!r} is not in models")
    if cargo.free_tier and cargo.requires_kyc:
        out.append(f"{label}: free_tier: a Cargo that requires KYC cannot be on the free tier")
    return out


def _strip_struct(message: str) -> str:
    return (
        message.replace("ChatPricing.", "").replace("ImagePricing.", "").replace("_micro", "")
    )


def _order_problems(r: _Reader, amounts: dict[str, int], pairs: Iterable[tuple[str, str]]) -> None:
    """Report ``low > high`` for each (low, high) pair of TOML pricing keys, in credits."""
    for low, high in pairs:
        lo, hi = amounts[low + "_micro"], amounts[high + "_micro"]
        if lo > hi:
            r.fail(
                f"pricing.{low}",
                f"{low} ({micro_to_credits(lo)}) must be <= {high} ({micro_to_credits(hi)})",
            )
