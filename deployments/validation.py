"""The pydantic validators the configs share: "FIELD must be >= N", "FIELD must be between A and B", paths with `~` expanded."""

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


def between(low: float, high: float, *fields: str) -> Any:
    """A field validator for a config class body: each of `fields` must lie in [`low`, `high`]
    (NaN fails; None passes). Name it uniquely along the class's bases, as for `at_least`."""

    def check(cls: type, value: Any, info: ValidationInfo) -> Any:
        if value is not None and not low <= value <= high:
            raise ValueError(f"{info.field_name} must be between {low} and {high}, got {value}")
        return value

    return field_validator(*fields)(classmethod(check))


def expanded_paths(*fields: str) -> Any:
    """A field validator for a config class body: each of `fields` (a Path) with `~` expanded."""

    def expand(cls: type, value: Any) -> Any:
        return value.expanduser() if value is not None else value

    return field_validator(*fields)(classmethod(expand))
