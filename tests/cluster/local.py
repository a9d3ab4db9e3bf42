"""The local multi-node Ray cluster of `cluster/local.sh` (head + workers on this machine, fake
GPUs), with Serve started on it: for tests/cluster and for benchmarks that need several nodes
(bench/scaling.py).

Only the standard library is imported at module level (benchmarks import this where Ray may be
missing); Ray is imported inside `local_cluster`.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def cluster_env(port: int, dashboard_port: int, worker_gpus: int) -> dict[str, str]:
    """Environment for cluster/local.sh: its GCS port, 1 CPU and `worker_gpus` fake GPUs per worker,
    and the dashboard, which serves Ray's state API (it tells on which node each actor lives)."""
    return {**os.environ, "IMGSERVE_CLUSTER_PORT": str(port), "IMGSERVE_DASHBOARD": "1",
            "IMGSERVE_DASHBOARD_PORT": str(dashboard_port), "IMGSERVE_WORKER_GPUS": str(worker_gpus),
            "IMGSERVE_WORKER_CPUS": "1"}


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
def local_cluster(env: dict[str, str], http_port: int, timeout: float = 300) -> Iterator[str]:
    """A fresh cluster (`down`, then `up`), this process connected to it and Serve started with its
    proxy on the head only, at 127.0.0.1:`http_port`; yields the cluster's address. On leaving,
    even after an error: Serve shut down, the connection closed, the cluster `down`."""
    import ray
    from ray import serve

    address = f"{cluster_ip(env)}:{env['IMGSERVE_CLUSTER_PORT']}"
    local_sh(env, "down", timeout=timeout)
    local_sh(env, "up", timeout=timeout)
    try:
        ray.init(address=address, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": http_port}, proxy_location="HeadOnly")
        yield address
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            local_sh(env, "down", timeout=timeout)
