"""The Cargo catalog: which workloads the coordinator offers, their limits and prices.

The catalog is a TOML file (default: ``scheduler/cargos.toml``, shipped as package
data). :meth:`Catalog.load` parses and validates it (scheduler/catalog_file.py) and raises
:class:`CatalogError` (scheduler/cargo.py) listing every problem, each naming the Cargo
and the field. A :class:`Catalog` is
immutable; :meth:`Catalog.with_enabled` returns a new one, so run-time enable/disable
events can be folded over it. Format and pricing: docs/CARGOS.md.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import msgspec

from scheduler.cargo import Cargo, CatalogError, UnknownCargo
from scheduler.catalog_file import cargo_label, check_cargo, parse_cargo

DEFAULT_CATALOG_PATH = Path(__file__).parent / "cargos.toml"












# --------------------------------------------------------------------------------------
# Catalog
# --------------------------------------------------------------------------------------


class Catalog:
    """An immutable, validated set of Cargos, indexed by slug and id."""

    __slots__ = ("_by_id", "_by_slug", "_ordered")

    def __init__(self, cargos: Iterable[Cargo]) -> None:
        ordered = sorted(cargos, key=lambda c: c.id)
        problems: list[str] = []
        by_id: dict[int, Cargo] = {}
        by_slug: dict[str, Cargo] = {}
        for cargo in ordered:
            problems.extend(check_cargo(cargo))
            if cargo.id in by_id:
                problems.append(
                    f"{cargo_label(cargo.slug, cargo.id)}: id: duplicate id {cargo.id} "
                    f"(also used by '{by_id[cargo.id].slug}')"
                )
            if cargo.slug in by_slug:
                problems.append(
                    f"{cargo_label(cargo.slug, cargo.id)}: slug: duplicate slug '{cargo.slug}' "
                    f"(also used by #{by_slug[cargo.slug].id})"
                )
            by_id.setdefault(cargo.id, cargo)
            by_slug.setdefault(cargo.slug, cargo)
        if problems:
            raise CatalogError(problems)
        self._ordered: tuple[Cargo, ...] = tuple(ordered)
        self._by_id = by_id
        self._by_slug = by_slug

    # -- loading ------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path | None = None) -> Catalog:
        """Load and validate a catalog file (default: the packaged ``cargos.toml``).

        Raises :class:`CatalogError` (unreadable file, TOML syntax, any invalid field).
        """
        file = Path(path) if path is not None else DEFAULT_CATALOG_PATH
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CatalogError([f"cannot read file: {exc}"], source=str(file)) from exc
        return cls.loads(text, source=str(file))

    @classmethod
    def loads(cls, text: str, source: str = "<string>") -> Catalog:
        """Parse and validate catalog TOML text. Raises :class:`CatalogError`."""
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise CatalogError([f"TOML syntax error: {exc}"], source=source) from exc
        return cls.from_dict(document, source=source)

    @classmethod
    def from_dict(cls, document: dict[str, Any], source: str = "<dict>") -> Catalog:
        """Build from an already parsed document (``{"schema_version": 1, "cargo": [...]}``)."""
        problems: list[str] = []
        version = document.get("schema_version", 1)
        if version != 1:
            problems.append(f"schema_version: unsupported version {version!r} (expected 1)")
        for key in document:
            if key not in ("schema_version", "cargo"):
                problems.append(f"{key}: unknown top-level key (expected 'cargo' tables)")
        tables = document.get("cargo")
        if not isinstance(tables, list) or not tables:
            problems.append("cargo: expected at least one [[cargo]] table")
            tables = []
        cargos: list[Cargo] = []
        for index, table in enumerate(tables):
            cargo = parse_cargo(index, table, problems)
            if cargo is not None:
                cargos.append(cargo)
        if problems:
            raise CatalogError(problems, source=source)
        try:
            return cls(cargos)
        except CatalogError as exc:
            raise CatalogError(exc.problems, source=source) from None

    # -- queries ------------------------------------------------------------------------

    def by_slug(self, slug: str) -> Cargo:
        """The Cargo with this slug; raises :class:`UnknownCargo`."""
        try:
            return self._by_slug[slug]
        except (KeyError, TypeError):
            raise UnknownCargo(f"unknown Cargo slug {slug!r}") from None

    def by_id(self, cargo_id: int) -> Cargo:
        """The Cargo with this id; raises :class:`UnknownCargo`."""
        try:
            return self._by_id[cargo_id]
        except (KeyError, TypeError):
            raise UnknownCargo(f"unknown Cargo id {cargo_id!r}") from None

    def get(self, slug: str) -> Cargo | None:
        """The Cargo with this slug, or ``None``."""
        return self._by_slug.get(slug) if isinstance(slug, str) else None

    def all(self) -> tuple[Cargo, ...]:
        """Every Cargo, enabled or not, ordered by id."""
        return self._ordered

    def enabled(self) -> tuple[Cargo, ...]:
        """The enabled Cargos, ordered by id."""
        return tuple(c for c in self._ordered if c.enabled)

    def with_enabled(self, slug: str, enabled: bool) -> Catalog:
        """A new Catalog where Cargo ``slug`` is enabled or disabled (self is unchanged).

        Raises :class:`UnknownCargo`.
        """
        target = self.by_slug(slug)
        if target.enabled == bool(enabled):
            return self
        replaced = msgspec.structs.replace(target, enabled=bool(enabled))
        return Catalog(replaced if c.slug == slug else c for c in self._ordered)

    def __iter__(self) -> Iterator[Cargo]:
        return iter(self._ordered)

    def __len__(self) -> int:
        return len(self._ordered)

    def __contains__(self, slug: object) -> bool:
        return isinstance(slug, str) and slug in self._by_slug

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Catalog) and self._ordered == other._ordered

    def __hash__(self) -> int:
        return hash(self._ordered)

    def __repr__(self) -> str:
        return f"Catalog({', '.join(c.slug for c in self._ordered)})"


# --------------------------------------------------------------------------------------
# Parsing and checks
# --------------------------------------------------------------------------------------

















