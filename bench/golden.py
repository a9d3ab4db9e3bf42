"""Golden outputs of the demo profile: SHA-256 of what the service answers for fixed inputs and seeds.

Deploys `configs/demo.yaml` (tiny models, a fresh cache and job store) on a local Ray, sends a
fixed list of requests (each task and format, LoRA versions, a caption, the Python handle, jobs)
and records, per request, the SHA-256 of the answer's bytes and of its `X-Imgserve-*` headers
(without `X-Imgserve-Replica`, which names a process). A layers ZIP is digested member by member
with the manifest's `timings_s` left out (stage times differ on every run). A refactoring that
must not change behaviour shows it by giving the same list:

    .venv/bin/python bench/golden.py                      # writes bench/results/golden.json
    .venv/bin/python bench/golden.py --check bench/results/golden.json   # exit 1 on any difference
    .venv/bin/python bench/golden.py --check bench/results/golden.json --pixels-only

`--pixels-only` compares only the decoded pixels of each image result (and of each layer in a
ZIP): for a change that adds result metadata on purpose but must not change what the models make.

Digests are of this machine's float arithmetic (torch CPU kernels differ between CPU families), so
compare runs of one machine; the JSON records which.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402

from bench.common import REPO, report_header  # noqa: E402

SAMPLES = REPO / "tests" / "data" / "samples"


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def inputs() -> dict[str, bytes]:
    """Fixed uploads: a sample photo, a synthetic RGB gradient and an RGBA picture with a hole."""
    y, x = np.mgrid[0:80, 0:120]
    gradient = np.stack([x * 2, y * 3, (x + y) % 256], axis=-1).astype(np.uint8)
    rgba = Image.new("RGBA", (120, 80), (30, 160, 90, 255))
    rgba.paste((0, 0, 0, 0), (40, 20, 80, 60))
    return {"photo_1.jpg": (SAMPLES / "photo_1.jpg").read_bytes(), "gradient.png": _png(Image.fromarray(gradient)),
            "rgba.png": _png(rgba)}


# (name, route task, upload, fields): route "jobs" submits a job whose result is digested
CASES: list[tuple[str, str, str, dict[str, Any]]] = [
    ("real-png", "real", "gradient.png", {"steps": 3, "seed": 1}),
    ("real-webp", "real", "gradient.png", {"steps": 3, "seed": 1, "format": "webp"}),
    ("real-jpeg", "real", "gradient.png", {"steps": 3, "seed": 1, "format": "jpeg"}),
    ("real-photo", "real", "photo_1.jpg", {"steps": 2, "seed": 7, "cfg": 3.5, "prompt": "a person"}),
    ("real-lora-0715", "real", "gradient.png", {"steps": 3, "seed": 1, "lora": "v2511-0715"}),
    ("real-lora-none", "real", "gradient.png", {"steps": 3, "seed": 1, "lora": "none"}),
    ("anime-png", "anime", "photo_1.jpg", {}),
    ("anime-paprika-webp", "anime", "gradient.png", {"style": "paprika", "format": "webp"}),
    ("anime-jpeg", "anime", "gradient.png", {"format": "jpeg"}),
    ("layers-zip", "layers", "rgba.png", {"steps": 3, "seed": 2, "layers": 3, "prompt": "a green card"}),
    ("layers-psd", "layers", "rgba.png", {"steps": 3, "seed": 2, "layers": 2, "format": "psd", "prompt": "x"}),
    ("layers-caption-1024", "layers", "gradient.png", {"steps": 2, "seed": 3, "layers": 2, "resolution": 1024}),
    ("job-real", "jobs", "gradient.png", {"task": "real", "steps": 3, "seed": 5, "lora": "v2511-0801"}),
    ("job-layers", "jobs", "rgba.png", {"task": "layers", "steps": 2, "seed": 5, "layers": 2, "prompt": "p"}),
]
# refused requests: the error body must stay the same too
ERRORS: list[tuple[str, str, dict[str, Any]]] = [
    ("error-real-steps", "real", {"steps": 1000}),
    ("error-real-lora", "real", {"lora": "v9"}),
    ("error-anime-style", "anime", {"style": "nope"}),
    ("error-layers-resolution", "layers", {"resolution": 700}),
    ("error-unknown-field", "layers", {"style": "paprika"}),
    ("error-job-task", "jobs", {"task": "paint"}),
]


def digest_body(data: bytes, media_type: str) -> str:
    if media_type != "application/zip":
        return hashlib.sha256(data).hexdigest()
    digest = hashlib.sha256()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for name in archive.namelist():
            member = archive.read(name)
            if name == "manifest.json":
                manifest = json.loads(member)
                manifest.pop("timings_s", None)
                member = json.dumps(manifest, sort_keys=True).encode()
            digest.update(name.encode() + b"\0" + member)
    return digest.hexdigest()


def digest_pixels(data: bytes, media_type: str) -> str | None:
    """SHA-256 of the decoded pixels (every layer's, for a ZIP); None for other bodies (PSD)."""
    digest = hashlib.sha256()
    if media_type == "application/zip":
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for name in archive.namelist():
                if name.endswith(".png"):
                    digest.update(np.asarray(Image.open(io.BytesIO(archive.read(name)))).tobytes())
        return digest.hexdigest()
    if not media_type.startswith("image/"):
        return None
    return hashlib.sha256(np.asarray(Image.open(io.BytesIO(data))).tobytes()).hexdigest()


def digest_headers(headers: httpx.Headers) -> dict[str, str]:
    return {k.lower(): v for k, v in sorted(headers.items())
            if k.lower().startswith("x-imgserve-") and k.lower() != "x-imgserve-replica"}


def run(cache: Path) -> dict[str, Any]:
    import ray
    from ray import serve

    from serve_app.app import build_app

    config = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    args = config["applications"][0]["args"]
    args["cache_dir"] = str(cache)
    args["jobs"] = {"directory": str(cache / "jobs")}
    uploads = inputs()
    results: dict[str, Any] = {}
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": 8123})
        serve.run(build_app(args), name="imgserve", route_prefix="/")
        with httpx.Client(base_url="http://127.0.0.1:8123", timeout=600) as http:
            for name, route, upload, fields in CASES:
                files = {"image": ("in", uploads[upload], "application/octet-stream")}
                data = {k: str(v) for k, v in fields.items()}
                response = http.post(f"/v1/{route}", files=files, data=data)
                if route == "jobs":
                    assert response.status_code == 202, response.text
                    job = response.json()["id"]
                    with http.stream("GET", f"/v1/jobs/{job}/events") as events:
                        for _ in events.iter_lines():
                            pass
                    response = http.get(f"/v1/jobs/{job}/result")
                assert response.status_code == 200, (name, response.text)
                media_type = response.headers["content-type"]
                headers = digest_headers(response.headers)
                results[name] = {"media_type": media_type, "body_sha256": digest_body(response.content, media_type),
                                 "pixels_sha256": digest_pixels(response.content, media_type),
                                 "headers_sha256": hashlib.sha256(json.dumps(headers).encode()).hexdigest(),
                                 "headers": headers}
            for name, route, fields in ERRORS:
                files = {"image": ("in", uploads["gradient.png"], "application/octet-stream")}
                response = http.post(f"/v1/{route}", files=files, data={k: str(v) for k, v in fields.items()})
                results[name] = {"status": response.status_code, "body": response.json()}
            models = http.get("/v1/models").json()
            results["models"] = {"body_sha256": hashlib.sha256(json.dumps(models, sort_keys=True).encode()).hexdigest(),
                                 "body": models}
            handle = serve.get_app_handle("imgserve")
            encoded = handle.run.remote("real", uploads["gradient.png"], {"steps": 3, "seed": 1}).result()
            results["handle-real"] = {"media_type": encoded.media_type,
                                      "body_sha256": hashlib.sha256(encoded.data).hexdigest()}
    finally:
        serve.shutdown()
        ray.shutdown()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "golden.json"))
    parser.add_argument("--check", help="a golden.json to compare with (exit 1 on any difference)")
    parser.add_argument("--pixels-only", action="store_true", help="with --check: compare decoded pixels only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="imgserve-golden-") as cache:
        results = run(Path(cache))
    import diffusers
    import ray
    import torch

    report = {**report_header("golden", torch=torch.__version__, diffusers=diffusers.__version__, ray=ray.__version__),
              "cases": results}
    if args.check:
        expected = json.loads(Path(args.check).read_text())["cases"]
        if args.pixels_only:
            expected = {name: case["pixels_sha256"] for name, case in expected.items() if case.get("pixels_sha256")}
            compared = {name: results.get(name, {}).get("pixels_sha256") for name in expected}
            differ = sorted(name for name in expected if expected[name] != compared[name])
        else:
            differ = sorted(name for name in expected.keys() | results.keys()
                            if {k: v for k, v in expected.get(name, {}).items() if k not in ("headers", "body")}
                            != {k: v for k, v in results.get(name, {}).items() if k not in ("headers", "body")}
                            or (name.startswith("error") and expected[name] != results.get(name)))
        for name in differ:
            print(f"DIFFERS {name}: expected {expected.get(name)} got {results.get(name)}")
        print(f"{len(expected) - len(differ)} of {len(expected)} cases identical")
        if differ:
            return 1
    if args.out and not args.check:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    for name, result in results.items():
        print(f"{name:24s} {result.get('body_sha256') or result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
