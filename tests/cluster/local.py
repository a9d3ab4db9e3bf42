"""The local multi-node Ray cluster of `cluster/local.sh` (head + workers on this machine, fake
GPUs), with Serve started on it: for tests/cluster and for benchmarks that need several nodes
(bench/scaling.py).

The cluster runs with Ray's token authentication, its token random per process (`cluster_env`
puts it in RAY_AUTH_TOKEN); `local_cluster` gives this process the token while it is connected
and restores the environment afterwards, so a Ray started later in the same process (tests/serve)
runs as it would have.

Only the standard library is imported at module level (benchmarks import this where Ray may be
missing); Ray is imported inside `local_cluster`.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
AUTH_VARIABLES = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
"""What Ray reads to authenticate (2.60): the mode, then the token or the file holding it."""


def cluster_env(port: int, dashboard_port: int, worker_gpus: int) -> dict[str, str]:
    """Environment for cluster/local.sh: its GCS port, 1 CPU and `worker_gpus` fake GPUs per worker,
    the dashboard, which serves Ray's state API (it tells on which node each actor lives), and a
    fresh random token (RAY_AUTH_TOKEN; any token of this process's own environment is left out)."""
    env = {name: value for name, value in os.environ.items() if name not in AUTH_VARIABLES}
    return {**env, "IMGSERVE_CLUSTER_PORT": str(port), "IMGSERVE_DASHBOARD": "1",
            "IMGSERVE_DASHBOARD_PORT": str(dashboard_port), "IMGSERVE_WORKER_GPUS": str(worker_gpus),
            "IMGSERVE_WORKER_CPUS": "1", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


def worker_env(variables: dict[str, str]) -> dict[str, str]:
    """The cluster/local.sh setting that gives the worker nodes (not the head) `variables`."""
    if any(char.isspace() for value in variables.values() for char in value):
        raise ValueError(f"worker environment values cannot hold spaces (cluster/local.sh splits on them): {variables}")
    return {"IMGSERVE_WORKER_ENV": " ".join(f"{name}={value}" for name, value in variables.items())}


def dashboard_url(env: dict[str, str]) -> str:
    """The head's dashboard (and job API) as cluster/local.sh starts it."""
    return f"http://{cluster_ip(env)}:{env.get('IMGSERVE_DASHBOARD_PORT') or 8265}"


def cluster_ip(env: dict[str, str]) -> str:
    """The address cluster/local.sh binds the cluster to: IMGSERVE_CLUSTER_IP, as local.sh reads it."""
    return env.get("IMGSERVE_CLUSTER_IP") or "127.0.0.2"


def local_sh(env: dict[str, str], *args: str, timeout: float = 300) -> str:
    """Run `cluster/local.sh ARGS` with `env`; its stdout, or RuntimeError with the end of its stderr."""
    done = subprocess.run([str(REPO / "cluster" / "local.sh"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"cluster/local.sh {' '.join(args)} failed: {done.stderr[-2000:]}")
    return done.stdout


@contextmanager
def ray_token(token: str) -> Iterator[None]:
    """This process authenticates to Ray with `token` inside the block (Ray reads the mode and the
    token from the environment and caches both); outside it, as before."""
    from ray._raylet import AuthenticationTokenLoader, Config

    def reload() -> None:
        Config.initialize("")  # the mode, cached by Ray's config
        AuthenticationTokenLoader.instance().reset_cache()  # the token, cached by the loader

    saved = {name: os.environ.get(name) for name in AUTH_VARIABLES}
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    reload()
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        reload()


@contextmanager
def local_cluster(env: dict[str, str], http_port: int, timeout: float = 300) -> Iterator[str]:
    """A fresh cluster (`down`, then `up`), this process connected to it with the cluster's token
    (`env`'s RAY_AUTH_TOKEN) and Serve started with its proxy on the head only, at
    127.0.0.1:`http_port`; yields the cluster's address. On leaving, even after an error: Serve
    shut down, the connection closed, the cluster `down`, this process's environment restored."""
    import ray
    from ray import serve

    address = f"{cluster_ip(env)}:{env['IMGSERVE_CLUSTER_PORT']}"
    local_sh(env, "down", timeout=timeout)
    local_sh(env, "up", timeout=timeout)
    try:
        with ray_token(env["RAY_AUTH_TOKEN"]):
            try:
                ray.init(address=address, log_to_driver=False)
                serve.start(http_options={"host": "127.0.0.1", "port": http_port}, proxy_location="HeadOnly")
                yield address
            finally:
                try:
                    serve.shutdown()
                finally:
                    ray.shutdown()
    finally:
        local_sh(env, "down", timeout=timeout)
