"""A task as one object: everything the service needs to offer one image-to-image model.

A `Task` names the model class, the request parameters, the output formats and the config section.
The section (a `TaskSection` subclass, declared in the task's module) holds the model's settings
and its Serve options, and implements what depends on them: `resolve` (defaults, ranges, the
choices of its catalog), `describe` (the task's entry in `GET /v1/models`), `limits` (what bounds
each request field, for the OpenAPI document) and, for a task with a catalog worth addressing by
name, `choice_field` and `choices` (the OpenAI-style model ids `<task>:<choice>`). A task's catalog (a
`Catalog`: the names that field may take, its default) is what its model replicas report; the
sections' methods take it, or None where nothing has been reported.

Two request fields are generic, taken by every task and popped before its params are parsed:
`format` (one of `Task.formats`) and `size` (`auto`, or `WxH`: the result fits inside W×H, aspect
kept, never enlarged; each side 16 … the upload's long-edge limit). Both are kept in `Resolved`. `Tasks` is an ordered registry; everything generic
(the app builder, request orchestration, /v1/models, OpenAPI, jobs, the CLI) loops over one and
never names a task. Knows nothing about Ray or HTTP.

Adding a task: a module with its params model, its section, its model class (a `Model`) and one
`Task(...)`, listed in `deployments.tasks.TASKS` (or passed to the builder in a registry of its own).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deployments.errors import InvalidParameter
from deployments.options import DeploymentOptions
from deployments.postprocess import IMAGE_FORMATS
from deployments.records import ImageSpec

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+-]*$"
"""What a catalog name (LoRA version, style) looks like, where the catalog cannot be listed."""
_JSON_TYPES = {"string", "integer", "number", "boolean"}
SIZE_AUTO = "auto"
MIN_SIZE = 16
"""The smallest side a `size` may ask for (the smallest image preprocess returns sensibly)."""
SIZE_PATTERN = r"^(auto|[1-9][0-9]{0,4}x[1-9][0-9]{0,4})$"
_SIZE = re.compile(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})")


class TaskSection(BaseModel):
    """A task's config section: its model's settings plus its Serve options (the `serve:` block).
    Subclasses give `serve` their own default and implement `resolve` and `describe`."""

    model_config = ConfigDict(extra="forbid")

    serve: DeploymentOptions = Field(default_factory=DeploymentOptions)
    """Ray Serve options of the task's model deployment."""

    choice_field: ClassVar[str | None] = None
    """The request field that picks an entry of the task's catalog (a LoRA version, a style), which
    the OpenAI-style route addresses as `model=<task>:<choice>`; None: the task has none."""

    def choices(self, catalog: Any = None) -> list[str]:
        """The values of `choice_field` worth a model id of their own (GET /v1/models); [] when the
        task has none or they cannot be listed in this process."""
        return []

    def resolve(self, params: Any, catalog: Any = None) -> Any:
        """Fill defaults and check ranges; raises InvalidParameter naming the field."""
        raise NotImplementedError

    def describe(self, catalog: Any = None) -> dict[str, Any]:
        """The task's entry in `GET /v1/models` (without `formats`): defaults, limits, choices."""
        raise NotImplementedError

    def limits(self, catalog: Any = None) -> dict[str, dict[str, Any]]:
        """JSON-schema keywords bounding each request field (minimum, maximum, default, enum,
        maxLength); merged over what the params model says, for the OpenAPI document."""
        return {}

    def serve_options(self) -> dict[str, Any]:
        """The keyword arguments for the model deployment's `.options(...)`."""
        return self.serve.serve_options()

    def resident_limit(self) -> int | None:
        """For a task that routes requests by a choice (`Task.route`): how many choices a replica
        keeps resident (Serve's multiplexing limit). None: no routing."""
        return None

    def check_input_edge(self, max_long_edge: int) -> None:
        """Raise ValueError when inputs of this long edge (preprocess's limit) cannot be served."""


def parse_params(model: type[BaseModel], fields: Mapping[str, Any]) -> BaseModel:
    """Request fields (strings from a form or query) → the task's parameter model; 422 naming the field."""
    try:
        return model.model_validate(dict(fields))
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else None
        message = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
        raise InvalidParameter(f"{message} (got {first.get('input')!r})"[:300], field) from None


def parse_size(value: Any, max_edge: int | None = None) -> tuple[int, int] | None:
    """A request's `size` → (width, height), or None for `auto`; 422 naming `size` when it is not
    exactly `auto` or `WxH` (what the OpenAPI document's pattern says) or a side is outside
    16 … `max_edge` (preprocess's long-edge limit)."""
    text = str(value)
    if text == SIZE_AUTO:
        return None
    match = _SIZE.fullmatch(text)
    if match is None:
        raise InvalidParameter(f"must be `auto` or WIDTHxHEIGHT in pixels, e.g. 512x512 (got {text[:40]!r})", "size")
    width, height = int(match.group(1)), int(match.group(2))
    if min(width, height) < MIN_SIZE or (max_edge is not None and max(width, height) > max_edge):
        bounds = f"between {MIN_SIZE} and {max_edge}" if max_edge is not None else f"at least {MIN_SIZE}"
        raise InvalidParameter(f"each side must be {bounds} px, got {width}x{height}", "size")
    return width, height


def choice_schema(names: list[str]) -> dict[str, Any]:
    """Limits of a field choosing one of `names`; where the list is unknown here, the names' form."""
    return {"enum": names} if names else {"pattern": NAME_PATTERN}


@dataclass(frozen=True)
class Task:
    """One image-to-image task: its name, model, request parameters, formats and config section."""

    name: str
    """The route (`POST /v1/{name}`), the config section's key and the `task` of a job."""
    summary: str
    """What it does, in a few words (`art → photoreal person`): OpenAPI, the app's description, the page."""
    model: type
    """The model class: a `deployments.model.Model` (plain; the builder makes it a deployment)."""
    params: type[BaseModel]
    """The request parameters (None: the section's default); strict: unknown fields are refused."""
    section: type[TaskSection]
    """The config section model: the model's settings and its Serve options."""
    formats: tuple[str, ...] = IMAGE_FORMATS
    """Output formats, the default first."""
    headers: tuple[str, ...] = ()
    """Result parameters echoed as `X-Imgserve-*` response headers (besides task, size, scale)."""
    route: Callable[[Any], str | None] | None = None
    """Resolved params → the choice Serve routes the request by (a replica that holds it), or None."""
    prepare: Callable[[Any, ImageSpec], ImageSpec] | None = None
    """(resolved params, the model's `input_spec`) → how preprocess prepares this request's image,
    where a request field changes it (e.g. depth compensation); None: always the model's spec."""

    @property
    def deployment(self) -> str:
        """The Serve deployment's name: the model class's."""
        return self.model.__name__

    @property
    def encodes_text(self) -> bool:
        """Whether its model conditions on a text encoder the text encoder stage can run for it
        (its class has `encode_text`)."""
        return callable(getattr(self.model, "encode_text", None))

    @property
    def input_spec(self) -> ImageSpec:
        """What the model needs from preprocess."""
        return self.model.input_spec

    def spec_for(self, params: Any) -> ImageSpec:
        """How preprocess prepares the image of a request with these resolved params."""
        return self.prepare(params, self.input_spec) if self.prepare is not None else self.input_spec

    def configured(self, section: TaskSection, catalog: Catalog | None = None) -> ConfiguredTask:
        """This task as a service offers it, with `section` and what its replicas reported."""
        return ConfiguredTask(self, section, catalog)


@dataclass(frozen=True)
class Catalog:
    """What a task's model replicas can serve, as they report it (`Model.catalog`): the names its
    `choice_field` may take (LoRA versions, styles) in order, the default one, and why files that
    are not listed are not. Never read from disk outside the replicas that hold the models."""

    names: tuple[str, ...] = ()
    default: str | None = None
    """The name a request that chooses none gets (fixed when the replica started, or configured)."""
    problems: dict[str, str] = field(default_factory=dict)
    """Files that are not (yet) names: name → why (still being copied, does not fit the base)."""
    default_problem: str | None = None
    """Why the default cannot be loaded from disk now (None: it can); a replica that holds it in
    memory still serves it."""

    def to_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "default": self.default, "problems": dict(self.problems),
                "default_problem": self.default_problem}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Catalog:
        return cls(tuple(data.get("names", ())), data.get("default"), dict(data.get("problems") or {}),
                   data.get("default_problem"))

    def unknown(self, name: str, field_name: str, what: str, also: tuple[str, ...] = (),
                label: str = "valid") -> InvalidParameter:
        """The 422 for a name that is not in the catalog: why, when a file of that name is not
        usable, and the valid names (`also`: valid values that are not files, e.g. `none`)."""
        why = self.problems.get(name)
        detail = f" ({name} is not usable: {why})" if why else ""
        valid = ", ".join([*also, *self.names]) or "none"
        return InvalidParameter(f"unknown {what} {name!r}{detail}; {label}: {valid}"[:800], field_name)


@dataclass(frozen=True)
class Resolved:
    """A validated request: everything needed to run it again with the same result."""

    task: str
    params: BaseModel
    format: str
    size: tuple[int, int] | None = None
    """(width, height) the result must fit inside; None: `auto` (only the upload limits apply)."""

    def fields(self) -> dict[str, Any]:
        """The resolved request as plain fields (seed included): what a job stores to retry."""
        fields = {**self.params.model_dump(exclude_none=True), "format": self.format}
        if self.size is not None:
            fields["size"] = f"{self.size[0]}x{self.size[1]}"
        return fields


@dataclass(frozen=True)
class ConfiguredTask:
    """A task with its config section and its catalog: what one process resolves requests with."""

    task: Task
    section: TaskSection
    catalog: Catalog | None = None
    """What its replicas reported; None: nothing yet (names are then checked for their form only,
    and the replica that takes the request checks them again)."""

    def resolve(self, fields: Mapping[str, Any] | None, max_edge: int | None = None) -> Resolved:
        """Check the fields without touching pixels; fills defaults and the seed. `max_edge`: the
        upload's long-edge limit, the largest side a `size` may ask for."""
        fields = dict(fields or {})
        fmt = fields.pop("format", self.task.formats[0])
        if fmt not in self.task.formats:
            raise InvalidParameter(f"unknown format {fmt!r}; allowed: {', '.join(self.task.formats)}", "format")
        size = parse_size(fields.pop("size", SIZE_AUTO), max_edge)
        params = self.section.resolve(parse_params(self.task.params, fields), self.catalog)
        return Resolved(self.task.name, params, fmt, size)

    def describe(self) -> dict[str, Any]:
        """The task's entry in `GET /v1/models`."""
        return {**self.section.describe(self.catalog), "formats": list(self.task.formats)}

    def field_schemas(self) -> dict[str, dict[str, Any]]:
        """{field: JSON schema} of the request fields, then `size` and `format`: types and
        descriptions from the params model, bounds from the section's `limits`."""
        limits = self.section.limits(self.catalog)
        schema = self.task.params.model_json_schema()["properties"]
        fields: dict[str, dict[str, Any]] = {}
        for name, prop in schema.items():
            kinds = [option.get("type") for option in prop.get("anyOf", [prop])]
            field: dict[str, Any] = {"type": next(kind for kind in kinds if kind in _JSON_TYPES)}
            if prop.get("description"):
                field["description"] = " ".join(prop["description"].split())
            fields[name] = {**field, **limits.get(name, {})}
        fields["size"] = {"type": "string", "pattern": SIZE_PATTERN, "default": SIZE_AUTO,
                          "description": f"`auto`, or WIDTHxHEIGHT: the result fits inside it, aspect kept, never "
                                         f"enlarged (each side {MIN_SIZE} … the upload's long-edge limit)"}
        fields["format"] = {"type": "string", "enum": list(self.task.formats), "default": self.task.formats[0]}
        return fields


class Tasks:
    """An ordered registry of tasks, by name."""

    def __init__(self, *tasks: Task) -> None:
        names = [task.name for task in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        for name in names:
            if not name.isidentifier() or name in ("jobs", "models", "images", "status"):
                raise ValueError(f"task name {name!r} must be an identifier and not a route of its own")
        self._tasks = {task.name: task for task in tasks}

    def __iter__(self) -> Iterator[Task]:
        return iter(self._tasks.values())

    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __getitem__(self, name: str) -> Task:
        return self._tasks[name]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tasks) and list(self) == list(other)

    def __hash__(self) -> int:
        return hash(tuple(self._tasks))

    def __repr__(self) -> str:
        return f"Tasks({', '.join(self._tasks)})"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._tasks)

    def plus(self, *tasks: Task) -> Tasks:
        """This registry with more tasks after its own."""
        return Tasks(*self, *tasks)

    def choices_text(self) -> str:
        """The names as a sentence's list: `real, anime or layers`."""
        names = list(self._tasks)
        return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
