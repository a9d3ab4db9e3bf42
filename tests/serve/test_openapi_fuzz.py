"""schemathesis against the live demo service, driven by the service's own /openapi.json.

For every documented operation, schemathesis generates requests from the document (valid ones,
then ones that break it: wrong types, out-of-range numbers, missing fields, odd bodies; its
generated image files include real 1×1 PNG/JPEG/GIF/WebP files, so the models run too) and checks
every answer: no server error (5xx), the status code is documented for the operation, the
Content-Type is one the document lists, and the body matches the documented schema. So the
document is accurate and the service holds up against what the document allows and what it does not.

The service is the demo profile with `max_steps` 4 and at most 3 layers (both documented as such
by /openapi.json, which is built from the running config), so that generated requests at the
documented maxima stay quick on this 2-core machine. Examples are derandomized: the same requests
on every run.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import Service

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES = {GenerationMode.POSITIVE: 25, GenerationMode.NEGATIVE: 15}
FUZZ_STEPS = 4
FUZZ_LAYERS = 3


@pytest.fixture(scope="module")
def service(demo_service) -> Iterator[Service]:
    yield from demo_service({"real": {"max_steps": FUZZ_STEPS, "default_steps": FUZZ_STEPS},
                             "layers": {"max_steps": FUZZ_STEPS, "default_steps": FUZZ_STEPS,
                                        "max_layers": FUZZ_LAYERS, "default_layers": 2}})


@pytest.fixture(scope="module")
def schema(service: Service):
    return schemathesis.openapi.from_url(f"{service.url}/openapi.json")


def test_the_document_describes_the_upload_routes_with_the_running_limits(service: Service) -> None:
    doc = service.http.get("/openapi.json").json()
    models = service.http.get("/v1/models").json()
    real = doc["paths"]["/v1/real"]["post"]
    form = real["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["image"] and form["properties"]["image"]["format"] == "binary"
    assert form["properties"]["steps"]["maximum"] == FUZZ_STEPS == models["tasks"]["real"]["limits"]["steps"][1]
    assert form["properties"]["lora"]["enum"] == models["tasks"]["real"]["lora"]["versions"]
    assert {"image/png", "image/jpeg", "application/octet-stream"} <= set(real["requestBody"]["content"])
    assert {param["name"] for param in real["parameters"]} == set(form["properties"]) - {"image"}
    assert set(real["responses"]["200"]["content"]) == {"image/png", "image/webp", "image/jpeg"}
    for status in ("400", "413", "415", "422", "503", "504"):
        assert real["responses"][status]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    layers = doc["paths"]["/v1/layers"]["post"]
    assert set(layers["responses"]["200"]["content"]) == {"application/zip", "image/vnd.adobe.photoshop"}
    layer_form = layers["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert layer_form["layers"]["maximum"] == FUZZ_LAYERS and layer_form["resolution"]["enum"] == [640, 1024]
    anime = doc["paths"]["/v1/anime"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert anime["properties"]["style"]["enum"] == models["tasks"]["anime"]["styles"]
    jobs = doc["paths"]["/v1/jobs"]["post"]
    assert "202" in jobs["responses"] and "task" in jobs["requestBody"]["content"]["multipart/form-data"]["schema"]["required"]
    assert doc["components"]["schemas"]["Error"]["required"] == ["error"]
    assert "HTTPValidationError" not in doc["components"]["schemas"]  # FastAPI's 422 shape is never sent


def operations(schema) -> list:
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", list(EXAMPLES), ids=lambda mode: mode.value)
def test_fuzz_every_operation(schema, service: Service, mode: GenerationMode) -> None:
    failures: list[str] = []
    statuses: dict[str, Counter[int]] = {}
    accepted: list[str] = []
    for operation in operations(schema):
        seen = statuses.setdefault(operation.label, Counter())

        @settings(max_examples=EXAMPLES[mode], deadline=None, derandomize=True, database=None,
                  phases=[Phase.explicit, Phase.generate], report_multiple_bugs=False,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case) -> None:
            response = case.call_and_validate(base_url=service.url, checks=CHECKS, timeout=120)
            seen[response.status_code] += 1
            if response.status_code == 200 and mode == GenerationMode.NEGATIVE:  # named if the assert below fails
                accepted.append(f"{operation.label} {case.query!r} {str(case.body)[:300]}")

        try:
            run()
        except Unsatisfiable:
            pass  # nothing in this operation can be made invalid (no parameters, or any string is valid)
        except Exception as error:  # noqa: BLE001 - every operation is tried, then all failures reported
            failures.append(f"{operation.label}: {error}"[:3000])
    print({label: dict(counts) for label, counts in statuses.items()})
    assert not failures, "\n\n".join(failures)
    # an operation counts as exercised only if at least one request was answered (every operation
    # gets an entry before its run; in negative mode some, such as GET /v1/jobs/{job_id}, have
    # nothing that can be made invalid and send no request)
    exercised = {label for label, counts in statuses.items() if counts}
    task_routes = [f"POST /v1/{task}" for task in ("real", "anime", "layers")]
    assert {*task_routes, "POST /v1/jobs"} <= exercised, statuses
    tasks = sum((statuses[route] for route in task_routes), Counter())
    if mode == GenerationMode.POSITIVE:  # schemathesis' sample files are real images: the models ran
        assert "GET /v1/jobs/{job_id}" in exercised, statuses
        assert all(statuses[route][200] > 0 for route in task_routes), statuses
        assert statuses["POST /v1/jobs"][202] > 0, statuses
    else:
        assert tasks[422] > 0 and not tasks[200], (statuses, accepted)
    assert service.http.get("/healthz").status_code == 200
