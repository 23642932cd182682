"""scheduler.catalog: the packaged Cargo catalog and the loader's validation."""

from __future__ import annotations

import importlib.resources
from decimal import Decimal
from pathlib import Path

import msgspec
import pytest

from ledger.pricing import MICRO_PER_CREDIT as C
from ledger.pricing import ChatPricing, ImagePricing
from scheduler.cargo import Cargo, CatalogError, UnknownCargo
from scheduler.catalog import DEFAULT_CATALOG_PATH, Catalog

VALID_CHAT = """
[[cargo]]
id = 1
slug = "llm-chat"
name = "LLM Chat"
description = "chat"
runtime_type = "container"
kind = "chat"
required_vram_mb = 6144
required_ram_mb = 8192
model = "m7"
models = ["m7", "m7-alt"]
min_karma_milli = 0
requires_kyc = false
free_tier = true
enabled = true
typical_prompt_tokens = 500
typical_completion_tokens = 500

[cargo.pricing]
base = "4"
per_1k_prompt_tokens = "1"
per_1k_completion_tokens = "3"
min = "5"
max = "20"
"""

VALID_IMAGE = """
[[cargo]]
id = 3
slug = "sdxl"
name = "SDXL"
description = "images"
runtime_type = "container"
kind = "image"
required_vram_mb = 12288
required_ram_mb = 16384
model = "sdxl-base-1.0"
models = ["sdxl-base-1.0"]
min_karma_milli = 0
requires_kyc = true
free_tier = false
enabled = true

[cargo.image]
min_width = 512
max_width = 1536
min_height = 512
max_height = 1536
dimension_multiple = 8
max_steps = 100
default_width = 1024
default_height = 1024
default_steps = 30
default_guidance_scale = 7.5

[cargo.pricing]
base = "8"
per_megapixel_step = "0.4"
min = "10"
max = "25"
hq_min = "25"
hq_max = "50"
hq_steps_threshold = 40
hq_pixels_threshold = 1048576
"""


def problems_of(text: str) -> list[str]:
    with pytest.raises(CatalogError) as info:
        Catalog.loads(text)
    return info.value.problems


# ----------------------------------------------------------------------------- packaged file


def test_default_catalog_is_package_data() -> None:
    assert DEFAULT_CATALOG_PATH == Path(__import__("scheduler.catalog").catalog.__file__).parent / "cargos.toml"
    assert importlib.resources.files("scheduler").joinpath("cargos.toml").is_file()
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if pyproject.exists():  # the wheel must ship the TOML file
        assert '"*.toml"' in pyproject.read_text()


def test_default_catalog_contents() -> None:
    catalog = Catalog.load()
    assert [c.slug for c in catalog.all()] == ["llm-chat", "llm-chat-lite", "sdxl"]
    chat, lite, sdxl = catalog.all()

    assert chat.id == 1 and chat.kind == "chat" and chat.runtime_type == "container"
    assert chat.model == "mistral-7b-instruct" and chat.model in chat.models
    assert chat.free_tier and not chat.requires_kyc and chat.enabled
    assert isinstance(chat.pricing, ChatPricing)
    assert (chat.pricing.min_micro, chat.pricing.max_micro) == (5 * C, 20 * C)
    assert chat.image is None

    assert lite.kind == "chat" and lite.model == "tinyllama-1.1b-chat"
    assert lite.free_tier and not lite.requires_kyc
    assert isinstance(lite.pricing, ChatPricing)
    assert (lite.pricing.min_micro, lite.pricing.max_micro) == (1 * C, 5 * C)
    assert lite.required_vram_mb < chat.required_vram_mb

    assert sdxl.kind == "image" and sdxl.requires_kyc and not sdxl.free_tier
    assert isinstance(sdxl.pricing, ImagePricing)
    p = sdxl.pricing
    assert (p.min_micro, p.max_micro, p.hq_min_micro, p.hq_max_micro) == (10 * C, 25 * C, 25 * C, 50 * C)
    assert sdxl.image is not None and sdxl.image.default_width == 1024
    assert sdxl.required_vram_mb >= 8192

    assert len({c.id for c in catalog}) == len(catalog) == 3
    for cargo in catalog:  # the advertised price lies inside the Cargo's band
        low = cargo.pricing.min_micro
        high = getattr(cargo.pricing, "hq_max_micro", cargo.pricing.max_micro)
        assert low <= cargo.typical_price_micro <= high


def test_workload_view_matches_the_api_contract() -> None:
    view = Catalog.load().by_slug("llm-chat").workload_view()
    assert set(view) == {
        "id",
        "name",
        "slug",
        "description",
        "runtime_type",
        "required_vram_mb",
        "required_ram_mb",
        "price_per_job",
        "is_enabled",
    }
    assert view["id"] == 1 and view["is_enabled"] is True
    assert view["price_per_job"] == Decimal("6")
    encoded = msgspec.json.Encoder(decimal_format="number").encode(view)
    assert b'"price_per_job":6' in encoded


def test_lookups() -> None:
    catalog = Catalog.load()
    assert catalog.by_id(3).slug == "sdxl"
    assert catalog.by_slug("sdxl").id == 3
    assert catalog.get("nope") is None and catalog.get(3) is None  # type: ignore[arg-type]
    assert "sdxl" in catalog and "nope" not in catalog and 3 not in catalog
    with pytest.raises(UnknownCargo, match="unknown Cargo slug 'nope'"):
        catalog.by_slug("nope")
    with pytest.raises(KeyError):
        catalog.by_id(99)
    with pytest.raises(UnknownCargo):
        catalog.by_slug(["unhashable"])  # type: ignore[arg-type]


def test_with_enabled_returns_a_new_catalog() -> None:
    catalog = Catalog.load()
    off = catalog.with_enabled("sdxl", False)
    assert off.by_slug("sdxl").enabled is False
    assert catalog.by_slug("sdxl").enabled is True  # original unchanged
    assert [c.slug for c in off.enabled()] == ["llm-chat", "llm-chat-lite"]
    assert off.by_id(3).enabled is False and off.by_slug("sdxl").workload_view()["is_enabled"] is False
    on = off.with_enabled("sdxl", True)
    assert on == catalog
    assert catalog.with_enabled("sdxl", True) is catalog
    with pytest.raises(UnknownCargo):
        catalog.with_enabled("nope", True)


def test_cargo_round_trips_through_msgspec() -> None:
    for cargo in Catalog.load():
        encoded = msgspec.json.encode(cargo)
        assert msgspec.json.decode(encoded, type=Cargo) == cargo


def test_load_from_path(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(VALID_CHAT + VALID_IMAGE)
    catalog = Catalog.load(path)
    assert [c.slug for c in catalog] == ["llm-chat", "sdxl"]
    assert catalog.by_slug("llm-chat").typical_price_micro == 6 * C
    assert catalog.by_slug("sdxl").typical_price_micro == 20 * C


# ----------------------------------------------------------------------------- errors


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="cannot read file"):
        Catalog.load(tmp_path / "missing.toml")
    with pytest.raises(CatalogError, match="TOML syntax error"):
        Catalog.loads("[[cargo]\nid = ")
    with pytest.raises(CatalogError, match="at least one"):
        Catalog.loads("schema_version = 1\n")
    assert any("schema_version" in p for p in problems_of("schema_version = 2\n" + VALID_CHAT))


def test_duplicate_id_and_slug() -> None:
    dup_id = VALID_CHAT + VALID_CHAT.replace('slug = "llm-chat"', 'slug = "other"')
    assert problems_of(dup_id) == [
        "cargo 'other' (#1): id: duplicate id 1 (also used by 'llm-chat')"
    ]
    dup_slug = VALID_CHAT + VALID_CHAT.replace("id = 1", "id = 2")
    assert problems_of(dup_slug) == [
        "cargo 'llm-chat' (#2): slug: duplicate slug 'llm-chat' (also used by #1)"
    ]


def test_min_greater_than_max() -> None:
    text = VALID_CHAT.replace('min = "5"', 'min = "25"')
    assert problems_of(text) == ["cargo 'llm-chat' (#1): pricing.min: min (25) must be <= max (20)"]
    text = VALID_IMAGE.replace('max = "25"', 'max = "30"')
    assert problems_of(text) == ["cargo 'sdxl' (#3): pricing.max: max (30) must be <= hq_min (25)"]
    text = VALID_IMAGE.replace("min_width = 512", "min_width = 2048")
    assert "cargo 'sdxl' (#3): image.min_width: min_width (2048) > max_width (1536)" in problems_of(text)
    text = VALID_IMAGE.replace("default_steps = 30", "default_steps = 300")
    assert problems_of(text) == ["cargo 'sdxl' (#3): image.default_steps: default 300 outside [1, 100]"]


def test_unknown_kind_and_runtime() -> None:
    problems = problems_of(VALID_CHAT.replace('kind = "chat"', 'kind = "video"'))
    assert "cargo 'llm-chat' (#1): kind: unknown kind 'video' (expected one of: chat, image)" in problems
    problems = problems_of(VALID_CHAT.replace('"container"', '"vm"'))
    assert problems == [
        "cargo 'llm-chat' (#1): runtime_type: unknown runtime_type 'vm' (expected one of: container, wasm)"
    ]


def test_money_must_not_be_a_float_and_must_parse() -> None:
    problems = problems_of(VALID_CHAT.replace('base = "4"', "base = 4.5"))
    assert problems == [
        "cargo 'llm-chat' (#1): pricing.base: money must be a string of credits like \"4.5\", not a TOML float"
    ]
    problems = problems_of(VALID_CHAT.replace('base = "4"', 'base = "0.0000001"'))
    assert len(problems) == 1 and "pricing.base" in problems[0] and "6 decimal places" in problems[0]
    problems = problems_of(VALID_CHAT.replace('base = "4"', 'base = "-1"'))
    assert "must not be negative" in problems[0]
    assert Catalog.loads(VALID_CHAT.replace('base = "4"', "base = 4")).by_id(1).pricing.base_micro == 4 * C


def test_every_problem_is_reported_with_cargo_and_field() -> None:
    text = (
        VALID_CHAT.replace("required_vram_mb = 6144", 'required_vram_mb = "lots"')
        .replace("enabled = true", "enabled = 1")
        .replace('models = ["m7", "m7-alt"]', 'models = ["other"]')
        .replace("free_tier = true", "free_tier = true\nfree_teir = true")
        .replace('max = "20"', 'max = "20"\nmaximum = "30"')
    )
    problems = problems_of(text)
    assert "cargo 'llm-chat' (#1): required_vram_mb: must be an integer, got 'lots'" in problems
    assert "cargo 'llm-chat' (#1): enabled: must be true or false, got 1" in problems
    assert "cargo 'llm-chat' (#1): model: default model 'm7' is not in models ['other']" in problems
    assert "cargo 'llm-chat' (#1): free_teir: unknown field" in problems
    assert "cargo 'llm-chat' (#1): pricing.maximum: unknown field" in problems
    assert len(problems) == 5


def test_missing_fields_and_structure() -> None:
    problems = problems_of(VALID_CHAT.replace('name = "LLM Chat"\n', ""))
    assert problems == ["cargo 'llm-chat' (#1): name: missing"]
    problems = problems_of(VALID_CHAT.replace("[cargo.pricing]", "[cargo.prices]"))
    assert "cargo 'llm-chat' (#1): pricing: missing [cargo.pricing] table" in problems
    problems = problems_of(VALID_IMAGE.replace("[cargo.image]", "[cargo.imaging]"))
    assert any("image: image Cargos need an [cargo.image] table" in p for p in problems)
    problems = problems_of(VALID_CHAT.replace('slug = "llm-chat"', 'slug = "LLM Chat!"'))
    assert problems[0].startswith("cargo 'LLM Chat!' (#1): slug: invalid value")
    problems = problems_of(VALID_CHAT.replace("id = 1", "id = 0"))
    assert problems == ["cargo 'llm-chat' (#0): id: must be between 1 and 2147483647, got 0"]
    problems = problems_of(VALID_CHAT.replace("id = 1\n", ""))
    assert problems == ["cargo 'llm-chat' (#?): id: missing"]


def test_kyc_cargo_cannot_be_free_tier() -> None:
    problems = problems_of(VALID_IMAGE.replace("free_tier = false", "free_tier = true"))
    assert problems == [
        "cargo 'sdxl' (#3): free_tier: a Cargo that requires KYC cannot be offered on the free tier"
    ]


def test_image_sizes_must_respect_the_multiple() -> None:
    problems = problems_of(VALID_IMAGE.replace("default_width = 1024", "default_width = 1001"))
    assert problems == ["cargo 'sdxl' (#3): image.default_width: 1001 is not a multiple of 8"]


def test_catalog_built_in_code_is_checked_too() -> None:
    chat = Catalog.loads(VALID_CHAT).by_id(1)
    with pytest.raises(CatalogError, match="default model 'zzz' is not in models"):
        Catalog([msgspec.structs.replace(chat, model="zzz")])
    with pytest.raises(CatalogError, match="a chat Cargo needs ChatPricing"):
        image = Catalog.loads(VALID_IMAGE).by_id(3)
        Catalog([msgspec.structs.replace(chat, pricing=image.pricing)])
    with pytest.raises(CatalogError, match="duplicate id 1"):
        Catalog([chat, msgspec.structs.replace(chat, slug="x")])
