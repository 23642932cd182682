"""The served OpenAPI document describes what is sent: credit amounts (`Decimal` in
api/schemas.py) are encoded as JSON numbers (`encode`, decimal_format="number"), so the
schema says `number` for them, not Litestar's default `string` (issue #16)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from litestar.openapi.spec import OpenAPIType, Schema
from litestar.plugins import OpenAPISchemaPlugin


class DecimalAsNumber(OpenAPISchemaPlugin):
    """`Decimal` -> `{"type": "number"}` in the OpenAPI document."""

    @staticmethod
    def is_plugin_supported_type(value: Any) -> bool:
        return value is Decimal

    def to_openapi_schema(self, field_definition: Any, schema_creator: Any) -> Schema:
        return Schema(type=OpenAPIType.NUMBER, description="credits (an exact decimal, sent as a JSON number)")


OPENAPI_PLUGINS = [DecimalAsNumber()]
