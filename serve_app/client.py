"""A typed HTTP client for imgserve: the same calls as the Python handle, over the network.

`Client("http://127.0.0.1:8000").real("art.png", steps=20, seed=1)` returns a `Result` (bytes,
media type, the echoed parameters). Error responses raise `ServiceError` carrying the status and
the JSON error's code, message and field; 503 also carries the server's Retry-After.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx


@dataclass
class Result:
    """One result: the encoded bytes and what the service says it did."""

    data: bytes
    media_type: str
    params: dict[str, str] = field(default_factory=dict)
    """The X-Imgserve-* headers, lower-cased without the prefix (size, steps, cfg, seed, scale, ...)."""

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_bytes(self.data)
        return path


class ServiceError(Exception):
    """The service refused or failed a request."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(f"{status} {code}: {message}" + (f" (field {field})" if field else ""))
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.retry_after = retry_after


def _raise_for_error(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        error = {"code": "http_error", "message": response.text[:200]}
    retry_after = response.headers.get("retry-after")
    raise ServiceError(response.status_code, error.get("code", "error"), error.get("message", ""),
                       error.get("field"), float(retry_after) if retry_after else None)


class Client:
    """HTTP client for one imgserve service."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", timeout: float = 600.0) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def health(self) -> dict[str, Any]:
        response = self.http.get("/healthz")
        _raise_for_error(response)
        return response.json()

    def models(self) -> dict[str, Any]:
        response = self.http.get("/v1/models")
        _raise_for_error(response)
        return response.json()

    def run(self, task: str, image: bytes | str | Path, **fields: Any) -> Result:
        """POST /v1/{task} with `image` (bytes or a path) and the task's fields (None values omitted)."""
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        form = {key: str(value) for key, value in fields.items() if value is not None}
        response = self.http.post(f"/v1/{task}", files={"image": ("image", data, "application/octet-stream")},
                                  data=form)
        _raise_for_error(response)
        prefix = "x-imgserve-"
        params = {k[len(prefix):]: v for k, v in response.headers.items() if k.lower().startswith(prefix)}
        return Result(response.content, response.headers.get("content-type", ""), params)

    def real(self, image: bytes | str | Path, *, prompt: str | None = None, negative_prompt: str | None = None,
             steps: int | None = None, cfg: float | None = None, seed: int | None = None,
             format: str = "png") -> Result:
        """2.5D / anime art → photoreal person."""
        return self.run("real", image, prompt=prompt, negative_prompt=negative_prompt, steps=steps, cfg=cfg,
                        seed=seed, format=format)


def embedded_metadata(png: bytes) -> dict[str, Any]:
    """The parameters a PNG result carries in its `imgserve` text chunk."""
    from io import BytesIO

    from PIL import Image

    return json.loads(Image.open(BytesIO(png)).info["imgserve"])
