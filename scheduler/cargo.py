"""A Cargo (one workload the coordinator offers: limits, prices, gates) and the errors of
the catalog that holds them (scheduler/catalog.py)."""

from __future__ import annotations

import re
from typing import Any, Literal

import msgspec

from ledger.pricing import (
    ChatPricing,
    ImagePricing,
    micro_to_credits,
)

RuntimeType = Literal["container", "wasm"]


Kind = Literal["chat", "image"]


RUNTIME_TYPES = ("container", "wasm")


KINDS = ("chat", "image")


SLUG_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


MODEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")


MAX_INT32 = 2**31 - 1


class CatalogError(ValueError):
    """The catalog file (or a Catalog built in code) is invalid.

    ``problems`` lists every problem found, each as ``"cargo 'slug' (#id): field: why"``.
    """

    def __init__(self, problems: list[str], source: str = "catalog") -> None:
        self.problems = list(problems)
        self.source = source
        lines = "\n  - ".join(self.problems)
        super().__init__(f"invalid Cargo catalog {source}:\n  - {lines}")


class UnknownCargo(KeyError):
    """No Cargo with that slug or id."""

    def __str__(self) -> str:  # KeyError's default repr-quotes the message
        return str(self.args[0]) if self.args else "unknown Cargo"


class ImageBounds(msgspec.Struct, frozen=True, kw_only=True):
    """Accepted input range and defaults of an image Cargo."""

    min_width: int
    max_width: int
    min_height: int
    max_height: int
    dimension_multiple: int
    max_steps: int
    default_width: int
    default_height: int
    default_steps: int
    default_guidance_scale: float


class Cargo(msgspec.Struct, frozen=True, kw_only=True):
    """One workload the coordinator offers (API: a Workload)."""

    id: int
    slug: str
    name: str
    description: str
    runtime_type: RuntimeType
    kind: Kind
    required_vram_mb: int
    required_ram_mb: int
    model: str
    """Default model variant when the input names none."""
    models: frozenset[str]
    """Allowed model variants (always contains ``model``)."""
    pricing: ChatPricing | ImagePricing
    typical_price_micro: int
    """Price of the typical request; the API's ``price_per_job``."""
    min_karma_milli: int
    """Minimum Island karma, in thousandths of a karma point."""
    requires_kyc: bool
    free_tier: bool
    """Whether accounts without KYC may use it within the free-tier allowance."""
    enabled: bool
    image: ImageBounds | None = None
    """Input bounds; set exactly when ``kind == "image"``."""

    def workload_view(self) -> dict[str, Any]:
        """The API Workload object. ``price_per_job`` is an exact ``Decimal`` of credits:
        encode it as a JSON number with ``msgspec.json.Encoder(decimal_format="number")``."""
        return {
            "id": self.id,
            "name": self.name,
            "slug": self.slug,
            "description": self.description,
            "runtime_type": self.runtime_type,
            "required_vram_mb": self.required_vram_mb,
            "required_ram_mb": self.required_ram_mb,
            "price_per_job": micro_to_credits(self.typical_price_micro),
            "is_enabled": self.enabled,
        }
