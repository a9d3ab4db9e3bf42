"""The OpenAPI document served at /openapi.json (and shown at /docs), built from the running config.

The upload routes read the raw `Request` (multipart or a raw image body), so FastAPI cannot infer
what they take; this module describes it from the tasks the orchestrator serves, whose fields are
derived from each task's params model and its section's limits (`ConfiguredTask.field_schemas`),
the same config that validates requests, so the documented limits are the enforced ones:

- `POST /v1/{task}` spelled out for each served task (each takes its own fields): a multipart body
  with an `image` file and the task's fields, or a raw image body (one of the accepted image types,
  or application/octet-stream) with the fields as query parameters; 200 with the result's media
  types, and every error status with the one error shape `{"error": {"code", "message", "field"?, "type", "param"}}`;
- `POST /v1/jobs`: the same with a required `task`, answered 202 with the job's status;
- `POST /v1/images/edits` (OpenAI's image edit form: `image`, `prompt`, `model` from the model
  ids, `n`, `size`, `response_format`, `output_format`, `user`, plus every task's fields), answered
  with OpenAI's `{"created", "data": [...]}`; `GET /v1/jobs/{job_id}/result` takes `layer`;
- `GET /v1/jobs` (the caller's jobs, newest first, a page at a time), the job routes, `/v1/models`
  and `/healthz` with their real answers and errors; a status whose code means different things on
  different routes (429, 507) is described per route.

`document(app, orchestrator)` is rebuilt on each request of /openapi.json (milliseconds), so LoRA
versions and styles added to their directories while the service runs are listed.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from deployments.postprocess import MEDIA_TYPES
from serve_app.orchestrator import Orchestrator
from serve_app.job_record import FINAL_STATES

# Pillow's format names (preprocess.formats) → the media type a raw upload declares.
UPLOAD_MEDIA_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif",
                      "BMP": "image/bmp", "TIFF": "image/tiff"}
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
        "type": {"type": "string", "enum": ["invalid_request_error", "authentication_error", "permission_error",
                                            "rate_limit_error", "server_error"],
                 "description": "OpenAI's error type for the status (OpenAI clients read it)"},
        "param": {"type": ["string", "null"], "description": "OpenAI's name for `field`"},
    },
}
ERROR_SCHEMA = {
    "type": "object",
    "title": "Error",
    "description": "Every error, from every route: a stable machine-readable `code`, a sentence, the "
                   "request field to blame when there is one, and the same in OpenAI's terms (`type`, `param`).",
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
        "model_seconds": {"type": ["number", "null"],
                          "description": "seconds spent inside model deployments for this job (model and "
                                         "text encoder), once it ran"},
        "priority": {"type": "string", "enum": ["low", "normal", "high"]},
        "webhook": {"type": "object", "description": "where the job's events are delivered, and how that went "
                                                     "(only for a job submitted with `webhook_url`)"},
    },
}
JOB_LIST_SCHEMA = {
    "type": "object",
    "title": "JobList",
    "required": ["object", "data", "next_cursor"],
    "properties": {
        "object": {"const": "list"},
        "data": {"type": "array", "items": {"$ref": "#/components/schemas/JobStatus"},
                 "description": "the caller's jobs, newest first"},
        "next_cursor": {"type": ["string", "null"], "description": "pass as `cursor` for the next page; null: "
                                                                   "this was the last"},
    },
}

# Why each error status happens (the README's table).
ERROR_STATUSES = {
    400: "`bad_image`: empty, truncated, corrupt or not an image; a multipart body that cannot be read",
    401: "`unauthorized`: no accepted API key (only when API keys are configured)",
    404: "`not_found`: no such task or job (a job of another API key is not found either)",
    408: "`read_timeout`: the client paused longer than `ingress.read_timeout_s` while sending its body",
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
# What 429 and 507 mean on the routes where they mean more than the table says.
RATE_LIMITED = ERROR_STATUSES[429]
SUBMIT_429 = (f"{RATE_LIMITED}; or `quota_exceeded`: this key (client address, with keys off) has "
              "`jobs.max_queued_per_key` jobs waiting")
SUBMIT_507 = ("`insufficient_storage`: the job store's disk is full or `jobs.max_store_bytes` is reached; "
              "nothing was accepted")
EVENTS_429 = (f"{RATE_LIMITED}; or `too_many_streams`: `ingress.max_event_streams` open on this replica or "
              "`ingress.max_event_streams_per_key` for this key; poll the job's status instead")
EDITS_404 = "`not_found`: no such model (`model` names a task, or `<task>:<choice>`; GET /v1/models lists them)"
EDITS_409 = "`cancelled`: with response_format=url, a job of the request was cancelled (DELETE /v1/jobs/{id})"
EDITS_422 = (f"{ERROR_STATUSES[422]}; a second image; `format` (this route takes `output_format`); an "
             "Idempotency-Key without response_format=url, or reused for another request (`idempotency_conflict`)")
RESULT_422 = "`invalid_parameter`: `layer` outside the result's layers, or given for a result that is not a ZIP of layers"
IMAGES_RESPONSE_SCHEMA = {
    "type": "object",
    "title": "ImagesResponse",
    "description": "OpenAI's images response",
    "required": ["created", "data"],
    "properties": {
        "created": {"type": "integer", "description": "unix seconds"},
        "data": {"type": "array", "minItems": 1, "items": {
            "type": "object",
            "properties": {
                "b64_json": {"type": "string", "description": "the result's bytes, base64 (response_format=b64_json)"},
                "url": {"type": "string", "description": "GET it with the same API key (response_format=url): "
                                                          "the stored job's result, `?layer=i` for a layer"},
                "revised_prompt": {"type": "string", "description": "the prompt the result was made with, where "
                                                                    "it differs from the one sent (a default, a caption)"},
            }}},
        "output_format": {"type": "string", "enum": ["png", "webp", "jpeg"]},
    },
}
EDGE = (401, 429)  # any /v1/* route, decided before the route runs
UPLOAD_ERRORS = (400, 408, 413, 415, 422)
MODEL_ERRORS = (500, 503, 504, 507)


def _errors(*statuses: int, described: dict[int, str] | None = None) -> dict[str, Any]:
    """The error responses of `statuses`, described by ERROR_STATUSES unless `described` says more."""
    responses: dict[str, Any] = {}
    for status in sorted(set(statuses) | set(described or {})):
        response: dict[str, Any] = {
            "description": (described or {}).get(status, ERROR_STATUSES[status]),
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        if status in (429, 503):
            response["headers"] = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "string"}}}
        responses[str(status)] = response
    return responses


def task_fields(orchestrator: Orchestrator) -> dict[str, dict[str, dict[str, Any]]]:
    """{task: {field: JSON schema}} from the served tasks' params, limits and catalogs."""
    return {name: task.field_schemas() for name, task in orchestrator.tasks.items()}


def _query(fields: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"name": name, "in": "query", "required": False, "schema": schema,
             "description": "with a raw image body; a field may be given once, here or in the form"}
            for name, schema in fields.items()]


def _body(orchestrator: Orchestrator, fields: dict[str, dict[str, Any]], required: tuple[str, ...] = ()) -> dict[str, Any]:
    form = {
        "type": "object",
        "required": ["image", *required],
        "additionalProperties": False,
        "properties": {"image": {**BINARY, "description": "the picture (JPEG, PNG, WebP, GIF, BMP or TIFF; "
                                                         "animations: the first frame)"}, **fields},
    }
    upload = orchestrator.upload
    raw_types = [UPLOAD_MEDIA_TYPES[fmt] for fmt in upload.formats if fmt in UPLOAD_MEDIA_TYPES]
    content: dict[str, Any] = {"multipart/form-data": {"schema": form, "encoding": {"image": {"contentType": "image/*"}}}}
    for media_type in [*dict.fromkeys(raw_types), "application/octet-stream"]:
        content[media_type] = {"schema": BINARY}
    return {
        "required": True,
        "description": f"multipart/form-data with an `image` file and the fields, or the raw image with the "
                       f"fields as query parameters; at most {upload.max_bytes} bytes of image, "
                       f"{upload.max_pixels} pixels; downscaled to {upload.max_long_edge} px on the long edge",
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


def _edits(orchestrator: Orchestrator, union: dict[str, dict[str, Any]], max_images: int) -> dict[str, Any]:
    """`POST /v1/images/edits`: OpenAI's form, with every task's fields as extra fields."""
    ids = orchestrator.model_ids()
    extra = {name: schema for name, schema in union.items() if name not in ("format", "prompt", "size")}
    form = {
        "type": "object",
        "required": ["image"],
        "additionalProperties": False,
        "properties": {
            "image": {**BINARY, "description": "the picture; OpenAI's client sends `image[]` for a list, of which "
                                               "one file is taken (a second is 400 `bad_image`)"},
            "prompt": {"type": "string", "description": "for a task with a prompt; a task without one (anime) "
                                                        "ignores it"},
            "model": {"type": "string", "enum": ids, "default": ids[0],
                      "description": "a task, or `<task>:<choice>` (a LoRA version, a style); GET /v1/models lists them"},
            "n": {"type": "integer", "minimum": 1, "maximum": max_images, "default": 1,
                  "description": "results, with consecutive seeds (ingress.max_images at most)"},
            "size": union.get("size", {"type": "string"}),
            "response_format": {"type": "string", "enum": ["b64_json", "url"], "default": "b64_json",
                                "description": "`url`: jobs; links to their results (same API key); with an "
                                               "Idempotency-Key they outlive a timeout or a disconnect"},
            "output_format": {"type": "string", "enum": ["png", "webp", "jpeg"], "default": "png",
                              "description": "the task's format; a task answering layers: png only (one item a layer)"},
            "user": {"type": "string", "description": "noted in the request's log line, else ignored"},
            **extra,
        },
    }
    return {
        "summary": "OpenAI-compatible image edit: any task, n results",
        "description": "OpenAI's `images.edit` (clients: openai, litellm, Open WebUI). Runs the same validation, "
                       "queues and limits as `POST /v1/{task}` (b64_json) or `POST /v1/jobs` (url). With "
                       "response_format=url, a timeout or a client that hangs up cancels the jobs unless the "
                       "request carries an `Idempotency-Key`; a retry with the key and the same request gets them "
                       "(header `Idempotent-Replayed: true`).",
        "operationId": "images_edits",
        "tags": ["openai"],
        "requestBody": {"required": True, "description": "multipart/form-data, as OpenAI's client sends it",
                        "content": {"multipart/form-data": {"schema": form,
                                                            "encoding": {"image": {"contentType": "image/*"}}}}},
        "responses": {
            "200": {"description": "the results", "content": {"application/json": {"schema": {
                "$ref": "#/components/schemas/ImagesResponse"}}}},
            **_errors(*UPLOAD_ERRORS, *MODEL_ERRORS, *EDGE,
                      described={404: EDITS_404, 409: EDITS_409, 422: EDITS_422, 429: SUBMIT_429,
                                 507: f"{ERROR_STATUSES[507]}; or {SUBMIT_507}"}),
        },
    }


def document(app: FastAPI, orchestrator: Orchestrator, max_images: int = 4) -> dict[str, Any]:
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
    schemas["JobList"] = JOB_LIST_SCHEMA
    schemas["ImagesResponse"] = IMAGES_RESPONSE_SCHEMA
    fields = task_fields(orchestrator)
    binary = {"schema": BINARY}

    template = paths.pop("/v1/{task}", {}).get("post", {})
    for task, task_schema in fields.items():
        media = [MEDIA_TYPES[fmt] for fmt in orchestrator.tasks[task].task.formats]
        paths[f"/v1/{task}"] = {"post": {
            "summary": f"Run `{task}` on one image: {orchestrator.tasks[task].task.summary}",
            "x-imgserve-task": {"name": task, "summary": orchestrator.tasks[task].task.summary},
            "description": "Synchronous: answers with the result's bytes; the parameters used are echoed in "
                           "X-Imgserve-* headers (and embedded in PNG/WebP/JPEG results).",
            "operationId": f"run_{task}",
            "tags": template.get("tags", []) or ["tasks"],
            "parameters": _query(task_schema),
            "requestBody": _body(orchestrator, task_schema),
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
                    union[name]["enum"] = list(dict.fromkeys(fmt for served in orchestrator.tasks.values()
                                                             for fmt in served.task.formats))
            else:
                union.setdefault(name, schema)
    task_field = {"task": {"type": "string", "enum": list(fields), "description": "which task to run"}}
    submit = paths.setdefault("/v1/jobs", {}).setdefault("post", {})
    submit.update(
        summary="Submit a job (any task) and follow it",
        description="Validated exactly like the synchronous route (bad fields are refused before anything is "
                    "queued); the image itself is decoded when the job runs. Beyond `jobs.max_queued` waiting "
                    "jobs: 503 with Retry-After; beyond `jobs.max_queued_per_key` for this key: 429 "
                    "`quota_exceeded`. The job belongs to the API key that submitted it: any other key gets 404 "
                    "for it (with keys off the service is single-tenant).",
        parameters=_query({**task_field, **union}),
        requestBody=_body(orchestrator, {**task_field, **union}, required=("task",)),
        responses={
            "202": {"description": "queued", "headers": {"Location": {"schema": {"type": "string"}}},
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobStatus"}}}},
            **_errors(*UPLOAD_ERRORS, 404, 503, *EDGE, described={429: SUBMIT_429, 507: SUBMIT_507}),
        },
    )
    listing = paths.setdefault("/v1/jobs", {}).setdefault("get", {})
    listing.update(
        summary="List the caller's jobs",
        description="The jobs of the calling API key (every job with keys off), newest first, `limit` at a time; "
                    "the next page is asked for with `cursor` = the answer's `next_cursor`.",
        parameters=[
            {"name": "limit", "in": "query", "required": False,
             "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}},
            {"name": "cursor", "in": "query", "required": False, "schema": {"type": "string"},
             "description": "`next_cursor` of the previous page"},
            {"name": "state", "in": "query", "required": False,
             "schema": {"type": "string", "enum": ["queued", "running", *sorted(FINAL_STATES)]}},
            {"name": "task", "in": "query", "required": False, "schema": {"type": "string", "enum": list(fields)}},
        ],
        responses={"200": {"description": "a page of jobs", "content": {"application/json": {"schema": {
            "$ref": "#/components/schemas/JobList"}}}}, **_errors(422, 503, *EDGE)},
    )
    submit["requestBody"]["description"] += "; `task` is required (in the form or the query)"
    if "/v1/images/edits" in paths:
        paths["/v1/images/edits"]["post"] = _edits(orchestrator, union, max_images)

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
            **_errors(404, 409, 503, *EDGE, described={422: RESULT_422})},
        ("/v1/jobs/{job_id}/events", "get"): {
            "200": {"description": "Server-Sent Events (`event: progress`, `id: <n>`, JSON data) until the final "
                                   "state; an SSE comment `: keep-alive` every `ingress.event_heartbeat_s` on a quiet "
                                   "stream; after `ingress.event_stream_max_s` the stream ends with a comment and the "
                                   "client reconnects (with `Last-Event-ID` it resumes after that event)",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}}},
            **_errors(404, 422, 503, *EDGE, described={429: EVENTS_429})},
        ("/v1/models", "get"): {
            "200": {"description": "tasks with their defaults, limits, formats, LoRA versions, styles; and "
                                   "OpenAI's model list (`object`, `data`) of the same service",
                    "content": {"application/json": {"schema": {
                        "type": "object", "required": ["tasks", "max_long_edge", "max_bytes", "object", "data"],
                        "properties": {"tasks": {"type": "object"}, "max_long_edge": {"type": "integer"},
                                       "max_bytes": {"type": "integer"}, "object": {"const": "list"},
                                       "data": {"type": "array", "items": {
                                           "type": "object", "required": ["id", "object", "created", "owned_by"],
                                           "properties": {"id": {"type": "string"}, "object": {"const": "model"},
                                                          "created": {"type": "integer"},
                                                          "owned_by": {"type": "string"}}}}}}}}},
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
