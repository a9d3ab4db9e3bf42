"""One pydantic validator the deployment configs share: "FIELD must be >= N, got VALUE"."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationInfo, field_validator


def at_least(minimum: int, *fields: str) -> Any:
    """A field validator for a config class body: each of `fields` must be >= `minimum` (None,
    the value of an unset optional field, passes). Give it a name unique along the class's bases:
    pydantic keys validators by attribute name, so a subclass reusing one replaces the base's."""

    def check(cls: type, value: Any, info: ValidationInfo) -> Any:
        if value is not None and value < minimum:
            raise ValueError(f"{info.field_name} must be >= {minimum}, got {value}")
        return value

    return field_validator(*fields)(classmethod(check))
