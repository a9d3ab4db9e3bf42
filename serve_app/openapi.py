"""The OpenAPI document served at /openapi.json (and shown at /docs), built from the running config.

The upload routes read the raw `Request` (multipart or a raw image body), so FastAPI cannot infer
what they take; this module describes it, from the same config that validates requests, so the
documented limits are the enforced ones:

- `POST /v1/real`, `/v1/anime`, `/v1/layers` (the route `/v1/{task}` with each served task spelled
  out, since each takes its own fields): a multipart body with an `image` file and the task's
  fields, or a raw image body (one of the accepted image types, or application/octet-stream)
  with the fields as query parameters; 200 with the result's media types, and every error status
  with the one error shape `{"error": {"code", "message", "field"?}}`;
- `POST /v1/jobs`: the same with a required `task`, answered 202 with the job's status;
- the job routes, `/v1/models` and `/healthz` with their real answers and errors.

Rebuilt on each request of /openapi.json (milliseconds), so LoRA versions and styles added to their
directories while the service runs are listed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from deployments.diffusion import MAX_SEED, MIN_STEPS
from deployments.lora import NONE
from deployments.postprocess import IMAGE_FORMATS, LAYER_FORMATS, MEDIA_TYPES
from serve_app.pipeline import TASKS
from serve_app.store import FINAL_STATES

if TYPE_CHECKING:
    from serve_app.pipeline import Pipeline

# Pillow's format names (preprocess.formats) → the media type a raw upload declares.
UPLOAD_MEDIA_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif",
                      "BMP": "image/bmp", "TIFF": "image/tiff"}
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+-]*$"
BINARY = {"type": "string", "format": "binary", "contentMediaType": "application/octet-stream"}

ERROR_DETAIL_SCHEMA = {
    "type": "object",
    "title": "ErrorDetail",
    "required": ["code", "message"],
    "additionalProperties": False,
    "properties": {
        "code": {"type": "string", "examples": ["invalid_parameter"]},
        "message": {"type": "string"},
        "field": {"type": "string", "examples": ["steps"]},
    },
}
ERROR_SCHEMA = {
    "type": "object",
    "title": "Error",
    "description": "Every error, from every route: a stable machine-readable `code`, a sentence, and the "
                   "request field to blame when there is one.",
    "required": ["error"],
    "additionalProperties": False,
    "properties": {"error": {"$ref": "#/components/schemas/ErrorDetail"}},
}
NULLABLE_INT = {"type": ["integer", "null"]}
JOB_STATUS_SCHEMA = {
    "type": "object",
    "title": "JobStatus",
    "required": ["id", "task", "state", "stage", "step", "total_steps", "queue_position", "error", "created_at",
                 "finished_at"],
    "properties": {
        "id": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
        "task": {"type": "string"},
        "state": {"type": "string", "enum": ["queued", "running", *sorted(FINAL_STATES)]},
        "stage": {"type": ["string", "null"]},
        "step": NULLABLE_INT,
        "total_steps": NULLABLE_INT,
        "queue_position": NULLABLE_INT,
        "error": {"anyOf": [{"type": "null"}, {"$ref": "#/components/schemas/ErrorDetail"}]},
        "created_at": {"type": "number"},
        "finished_at": {"type": ["number", "null"]},
        "request_id": {"type": ["string", "null"]},
    },
}

# Why each error status happens (the README's table).
ERROR_STATUSES = {
    400: "`bad_image`: empty, truncated, corrupt or not an image; a multipart body that cannot be read",
    401: "`unauthorized`: no accepted API key (only when API keys are configured)",
    404: "`not_found`: no such task or job",
    409: "`not_ready`: the job has no result (yet)",
    413: "`too_large`: body over `preprocess.max_bytes`, or more pixels than `preprocess.max_pixels`",
    415: "`unsupported_format`: neither multipart/form-data nor an image body, or an image format not accepted",
    422: "`invalid_parameter`: a field out of range, unknown, duplicated, malformed or not UTF-8",
    429: "`rate_limited`: this key's requests are used up for now (only when a rate limit is configured); "
         "see Retry-After",
    500: "`internal` / `model_failure`: the service failed on this request",
    503: "`queue_full` or `unavailable`: at capacity or a replica was lost; see Retry-After",
    504: "`timeout`: the request took longer than `ingress.request_timeout_s`",
    507: "`out_of_memory`: the GPU ran out of memory on this request; the replica keeps serving",
}
EDGE = (401, 429)  # any /v1/* route, decided before the route runs
UPLOAD_ERRORS = (400, 413, 415, 422)
MODEL_ERRORS = (500, 503, 504, 507)


def _errors(*statuses: int) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for status in sorted(set(statuses)):
        response: dict[str, Any] = {
            "description": ERROR_STATUSES[status],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        if status in (429, 503):
            response["headers"] = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "string"}}}
        responses[str(status)] = response
    return responses


def _names(values: list[str], description: str) -> dict[str, Any]:
    return {"type": "string", "enum": values, "description": description} if values else \
        {"type": "string", "pattern": NAME_PATTERN, "description": description}


def task_fields(pipeline: Pipeline) -> dict[str, dict[str, dict[str, Any]]]:
    """{task: {field: JSON schema}} from the config and the current LoRA / style listings."""
    config = pipeline.config
    fields: dict[str, dict[str, dict[str, Any]]] = {}
    for task in pipeline.models:
        section = getattr(config, task)
        schema: dict[str, dict[str, Any]] = {}
        if task in ("real", "layers"):
            schema.update(
                prompt={"type": "string", "maxLength": section.max_prompt_chars,
                        "description": "what the result should show; blank → "
                                       + ("the default prompt" if task == "real" else "the model captions the image")},
                negative_prompt={"type": "string", "maxLength": section.max_prompt_chars},
                steps={"type": "integer", "minimum": MIN_STEPS, "maximum": section.max_steps,
                       "default": section.default_steps, "description": "denoising steps"},
                cfg={"type": "number", "minimum": 1.0, "maximum": section.max_cfg, "default": section.default_cfg,
                     "description": "true_cfg_scale"},
                seed={"type": "integer", "minimum": 0, "maximum": MAX_SEED, "description": "random when absent; echoed"},
            )
        if task == "real":
            schema["lora"] = _names([NONE, *pipeline.lora_versions()],
                                    "LoRA version (GET /v1/models lists them); `none`: the base alone")
        elif task == "anime":
            schema["style"] = _names(pipeline.styles(), "style name (GET /v1/models lists them)")
            schema["style"]["default"] = config.anime.default_style
        elif task == "layers":
            schema.update(
                layers={"type": "integer", "minimum": 1, "maximum": section.max_layers,
                        "default": section.default_layers},
                resolution={"type": "integer", "enum": list(section.resolutions),
                            "default": section.default_resolution},
                cfg_normalize={"type": "boolean", "default": section.default_cfg_normalize},
            )
        formats = list(TASKS[task].formats)
        schema["format"] = {"type": "string", "enum": formats, "default": formats[0]}
        fields[task] = schema
    return fields


def _query(fields: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"name": name, "in": "query", "required": False, "schema": schema,
             "description": "with a raw image body; a field may be given once, here or in the form"}
            for name, schema in fields.items()]


def _body(pipeline: Pipeline, fields: dict[str, dict[str, Any]], required: tuple[str, ...] = ()) -> dict[str, Any]:
    form = {
        "type": "object",
        "required": ["image", *required],
        "additionalProperties": False,
        "properties": {"image": {**BINARY, "description": "the picture (JPEG, PNG, WebP, GIF, BMP or TIFF; "
                                                         "animations: the first frame)"}, **fields},
    }
    raw_types = [UPLOAD_MEDIA_TYPES[fmt] for fmt in pipeline.config.preprocess.formats if fmt in UPLOAD_MEDIA_TYPES]
    content: dict[str, Any] = {"multipart/form-data": {"schema": form, "encoding": {"image": {"contentType": "image/*"}}}}
    for media_type in [*dict.fromkeys(raw_types), "application/octet-stream"]:
        content[media_type] = {"schema": BINARY}
    return {
        "required": True,
        "description": f"multipart/form-data with an `image` file and the fields, or the raw image with the "
                       f"fields as query parameters; at most {pipeline.config.preprocess.max_bytes} bytes of image, "
                       f"{pipeline.config.preprocess.max_pixels} pixels; downscaled to "
                       f"{pipeline.config.preprocess.max_long_edge} px on the long edge",
        "content": content,
    }


def _result_headers() -> dict[str, Any]:
    names = {
        "X-Imgserve-Task": "the task",
        "X-Imgserve-Size": "the size the result was made at (WxH, after the long-edge limit)",
        "X-Imgserve-Seed": "the seed used",
        "X-Imgserve-Scale": "the resize factor applied to the upload",
    }
    return {name: {"description": description, "schema": {"type": "string"}} for name, description in names.items()}


def document(app: FastAPI, pipeline: Pipeline) -> dict[str, Any]:
    """The OpenAPI document: FastAPI's, with the upload routes and every error response described."""
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    paths: dict[str, Any] = doc["paths"]
    doc.setdefault("components", {}).setdefault("schemas", {})
    schemas = doc["components"]["schemas"]
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    schemas["Error"] = ERROR_SCHEMA
    schemas["ErrorDetail"] = ERROR_DETAIL_SCHEMA
    schemas["JobStatus"] = JOB_STATUS_SCHEMA
    fields = task_fields(pipeline)
    binary = {"schema": BINARY}

    template = paths.pop("/v1/{task}", {}).get("post", {})
    for task, task_schema in fields.items():
        media = [MEDIA_TYPES[fmt] for fmt in TASKS[task].formats]
        paths[f"/v1/{task}"] = {"post": {
            "summary": f"Run `{task}` on one image",
            "description": "Synchronous: answers with the result's bytes; the parameters used are echoed in "
                           "X-Imgserve-* headers (and embedded in PNG/WebP/JPEG results).",
            "operationId": f"run_{task}",
            "tags": template.get("tags", []) or ["tasks"],
            "parameters": _query(task_schema),
            "requestBody": _body(pipeline, task_schema),
            "responses": {
                "200": {"description": "the result", "headers": _result_headers(),
                        "content": {media_type: binary for media_type in media}},
                **_errors(*UPLOAD_ERRORS, *MODEL_ERRORS, *EDGE),
            },
        }}

    # jobs: any task's fields, plus the task
    union: dict[str, dict[str, Any]] = {}
    for task_schema in fields.values():
        for name, schema in task_schema.items():
            if name in union and union[name] != schema:  # per-task limits differ: the widest, named in the text
                merged = {key: value for key, value in union[name].items() if key in ("type", "description")}
                merged["description"] = "per task: see /v1/{task}"
                union[name] = merged  # every task field's schema names its type
                if name == "format":
                    union[name]["enum"] = [*IMAGE_FORMATS, *LAYER_FORMATS]
            else:
                union.setdefault(name, schema)
    task_field = {"task": {"type": "string", "enum": list(fields), "description": "which task to run"}}
    submit = paths.setdefault("/v1/jobs", {}).setdefault("post", {})
    submit.update(
        summary="Submit a job (any task) and follow it",
        description="Validated exactly like the synchronous route (bad fields are refused before anything is "
                    "queued); the image itself is decoded when the job runs. Beyond `jobs.max_queued` waiting "
                    "jobs: 503 with Retry-After.",
        parameters=_query({**task_field, **union}),
        requestBody=_body(pipeline, {**task_field, **union}, required=("task",)),
        responses={
            "202": {"description": "queued", "headers": {"Location": {"schema": {"type": "string"}}},
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobStatus"}}}},
            **_errors(*UPLOAD_ERRORS, 404, 503, *EDGE),
        },
    )
    submit["requestBody"]["description"] += "; `task` is required (in the form or the query)"

    job_status = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobStatus"}}}}
    answers = {
        ("/v1/jobs/{job_id}", "get"): {"200": {"description": "the job's state", **job_status}, **_errors(404, 503, *EDGE)},
        ("/v1/jobs/{job_id}", "delete"): {
            "200": {"description": "queued: cancelled now; running: stops at the next step; finished: unchanged",
                    **job_status}, **_errors(404, 503, *EDGE)},
        ("/v1/jobs/{job_id}/result", "get"): {
            "200": {"description": "the same bytes and headers the synchronous route answers",
                    "headers": _result_headers(),
                    "content": {media_type: binary for media_type in
                                MEDIA_TYPES.values()}},
            **_errors(404, 409, 503, *EDGE)},
        ("/v1/jobs/{job_id}/events", "get"): {
            "200": {"description": "Server-Sent Events (`event: progress`, JSON data) until the final state",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}}},
            **_errors(404, 503, *EDGE)},
        ("/v1/models", "get"): {
            "200": {"description": "tasks with their defaults, limits, formats, LoRA versions, styles",
                    "content": {"application/json": {"schema": {
                        "type": "object", "required": ["tasks", "max_long_edge", "max_bytes"],
                        "properties": {"tasks": {"type": "object"}, "max_long_edge": {"type": "integer"},
                                       "max_bytes": {"type": "integer"}}}}}},
            **_errors(*EDGE)},
        ("/healthz", "get"): {
            "200": {"description": "the ingress answers", "content": {"application/json": {"schema": {
                "type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}}}}}},
    }
    for (path, method), responses in answers.items():
        operation = paths.get(path, {}).get(method)
        if operation is not None:
            operation["responses"] = responses
    return doc


_pipeline: Pipeline | None = None


def use(pipeline: Pipeline) -> None:
    """Describe this pipeline (its config, tasks, LoRA versions, styles) in this process's document."""
    global _pipeline
    _pipeline = pipeline


class _Document:
    """`app.openapi`: FastAPI calls it for every /openapi.json. An object (not a closure over a
    pipeline) because Ray Serve serves a pickled copy of the app, made when the ingress class is
    decorated: the pipeline only exists later, in the replica, which hands it over with `use`."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def __call__(self) -> dict[str, Any]:
        if _pipeline is None:  # outside a replica: FastAPI's own document
            return get_openapi(title=self.app.title, version=self.app.version, description=self.app.description,
                               routes=self.app.routes)
        return document(self.app, _pipeline)


def install(app: FastAPI) -> None:
    """Make `app` serve `document(app, pipeline)` at /openapi.json, once a pipeline is `use`d."""
    app.openapi = _Document(app)  # type: ignore[method-assign]
