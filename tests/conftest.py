"""Shared fixtures: sample photos, a tiny-model cache built once per session, the demo config, and
for tests/serve and tests/web one local Ray per session with the demo service deployed on it.

Ray, Serve and httpx are imported only by the fixtures and classes that use them: tests/unit (no
Ray) shares this file.
"""

from __future__ import annotations

import copy
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

if TYPE_CHECKING:
    import httpx

    from deployments.task import Tasks

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "tests" / "data" / "samples"
"""The sample photos (photo_1.jpg … photo_3.jpg; SOURCE.md there says where they come from)."""


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 180.0, interval: float = 0.05) -> Any:
    """Poll until `condition()` is truthy and return that value: a deadline against hangs, never a
    timing assertion (a busy 2-core machine may take long)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


def run_fresh(code: str) -> str:
    """Run `code` (dedented) in a new interpreter in the repository and return its stripped stdout:
    for what is process-wide (Pillow's settings, which modules were imported)."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def demo_args() -> dict[str, Any]:
    """The `args:` of configs/demo.yaml, as a fresh dict a test may change."""
    config = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    return copy.deepcopy(config["applications"][0]["args"])


LORA_VERSIONS = ["v2511-0715", "v2511-0801"]


def resolving_orchestrator(root: Path) -> Any:
    """An Orchestrator of the demo config that only resolves requests (no handles), as if its model
    replicas had reported `LORA_VERSIONS` (the newest the default) and the tiny styles."""
    from deployments.styles import TINY_STYLES
    from deployments.task import Catalog
    from serve_app.config import AppConfig
    from serve_app.orchestrator import Orchestrator

    args = demo_args()
    args["cache_dir"] = str(root)
    args["real"]["lora_dir"] = str(root / "loras")
    config = AppConfig.model_validate(args)
    orchestrator = Orchestrator(config.tasks, config.sections(), config.preprocess, root, handles=None)
    return reported(orchestrator, {"real": Catalog(tuple(LORA_VERSIONS), LORA_VERSIONS[-1]),
                                   "anime": Catalog(tuple(sorted(TINY_STYLES)), config.anime.default_style)})


def reported(orchestrator: Any, catalogs: dict[str, Any]) -> Any:
    """`orchestrator` reading `catalogs` (task → `Catalog`) as its tasks' replicas' reports."""
    from serve_app.catalogs import Catalogs, Report

    by_deployment = {orchestrator.registry[task].deployment: catalog for task, catalog in catalogs.items()}
    orchestrator.catalogs = Catalogs({task: orchestrator.registry[task].deployment for task in catalogs},
                                     lambda deployment: [Report("test", time.time(), by_deployment[deployment])])
    for task in catalogs:
        orchestrator.catalogs.reports(task)
    return orchestrator


def merged(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `base` with `overrides` deep-merged in: a mapping merges into a mapping key by key,
    any other value (a list, a number, a mapping where `base` has none) replaces."""
    result = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(result.get(key), Mapping):
            result[key] = merged(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def sample_path(name: str) -> Path:
    """The sample photo `name` in tests/data/samples; fails the test when it is missing (the
    photos are part of the repository)."""
    path = SAMPLES / name
    if not path.is_file():
        pytest.fail(f"sample photo {path.relative_to(REPO)} is missing (the repository's tests/data/samples "
                    "holds photo_1.jpg, photo_2.jpg and photo_3.jpg)", pytrace=False)
    return path


@pytest.fixture(scope="session")
def sample_photo() -> bytes:
    return sample_path("photo_1.jpg").read_bytes()


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache directory per test session: tiny models are generated into it once."""
    return tmp_path_factory.mktemp("imgserve-cache")


# -- real Ray Serve on this machine (tests/serve, tests/web) -------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


METRICS_PORT: int | None = None
"""Where this session's Ray node exports Prometheus metrics (`http://127.0.0.1:PORT/metrics`); set
by `ray_cluster` (read it as `tests.conftest.METRICS_PORT` once the fixture has run)."""
RAY_LOGS: Path | None = None
"""This session's Ray log directory (Serve's replica logs are under `serve/`); set by `ray_cluster`."""


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[int]:
    """Local Ray (2 CPUs, 4 fake GPUs) and Serve's HTTP proxy on a free loopback port: one per
    session, for tests/serve and tests/web alike; yields that port."""
    import ray
    from ray import serve

    global METRICS_PORT, RAY_LOGS
    METRICS_PORT = free_port()
    context = ray.init(address="local", num_cpus=2, num_gpus=4, include_dashboard=False, log_to_driver=False,
                       _metrics_export_port=METRICS_PORT)
    RAY_LOGS = Path(context.address_info["session_dir"]) / "logs"
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()
    ray.shutdown()


class Service:
    """A running imgserve app: its base URL and an HTTP client."""

    def __init__(self, port: int) -> None:
        import httpx

        self.url = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(base_url=self.url, timeout=120)

    def post_image(self, data: bytes, fields: dict[str, Any] | None = None, task: str = "real",
                   filename: str = "input.jpg", content_type: str = "image/jpeg",
                   headers: dict[str, str] | None = None) -> httpx.Response:
        """A multipart upload of `data` as `image` with `fields` to `/v1/{task}` (`task` "jobs":
        a job submission; then `fields` names the task)."""
        return self.http.post(
            f"/v1/{task}", files={"image": (filename, data, content_type)},
            data={k: str(v) for k, v in (fields or {}).items()}, headers=headers,
        )

    def model_stats(self) -> dict[str, Any]:
        """`stats()` of a RealModel replica."""
        from ray import serve

        return serve.get_deployment_handle("RealModel", "imgserve").stats.remote().result()


def run_service(port: int, args: dict[str, Any], logging_config: dict[str, Any] | None = None,
                **build_kwargs: Any) -> Iterator[Service]:
    """Deploy imgserve from `args` and delete it afterwards.

    Without substitutions (`build_kwargs`: `build_graph`'s `tasks`, `models`) the app is built the
    way `serve run CONFIG.yaml` builds it (Serve's own builder call, which checks the builder's
    signature); with them, through `build_graph`. `logging_config`: Serve's, for every deployment
    of the app (as in configs/*.yaml).
    """
    from ray import serve
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from serve_app.app import build_app, build_graph

    if build_kwargs:
        app = build_graph(args, **build_kwargs)
    else:
        app = call_user_app_builder_with_args_if_necessary(build_app, args)
    serve.run(app, name="imgserve", route_prefix="/", logging_config=logging_config)
    service = Service(port)
    yield service
    service.http.close()
    serve.delete("imgserve")


StartService = Callable[..., Iterator[Service]]


@pytest.fixture(scope="session")
def demo_service(ray_cluster: int, model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> StartService:
    """`start(overrides, *, models=None, tasks=None, encoder=None, logging_config=None)`: deploys the demo service
    (configs/demo.yaml's args) with `overrides` deep-merged in, on this session's Ray, and yields its
    `Service`; deleted when the generator resumes (a module fixture: `yield from start({...})`).

    Unless `overrides` say otherwise: `cache_dir` is the session's model cache and `jobs.directory`
    a fresh temporary directory. `models` substitutes a task's model class (e.g.
    `{"real": GatedRealModel}`), `tasks` the task registry and `encoder` the TextEncoder class
    (`build_graph`'s keywords);
    `logging_config`: Serve's, for every deployment of the app.
    """

    def start(overrides: Mapping[str, Any] | None = None, *, models: dict[str, type] | None = None,
              tasks: Tasks | None = None, encoder: type | None = None,
              logging_config: dict[str, Any] | None = None) -> Iterator[Service]:
        base = merged(demo_args(), {"cache_dir": str(model_cache), "ingress": {"expose_replica": True},
                                    "jobs": {"directory": str(tmp_path_factory.mktemp("jobs"))}})
        args = merged(base, overrides or {})
        substitutes = {name: value for name, value in (("models", models), ("tasks", tasks), ("encoder", encoder))
                       if value is not None}
        yield from run_service(ray_cluster, args, logging_config, **substitutes)

    return start
