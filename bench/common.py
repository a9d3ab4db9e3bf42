"""What several benchmarks (and tests/cluster) share: the local multi-node cluster of
`cluster/local.sh` with Serve started on it, the sample upload, and the closed- and open-loop
request drivers of bench/load.py and bench/scaling.py."""

from __future__ import annotations

import io
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO.parent / "shared" / "samples"


# -- the local multi-node cluster ---------------------------------------------------------------------
def cluster_env(port: int, dashboard_port: int, worker_gpus: int) -> dict[str, str]:
    """Environment for cluster/local.sh: its GCS port, 1 CPU and `worker_gpus` fake GPUs per worker,
    and the dashboard, which serves Ray's state API (it tells on which node each actor lives)."""
    return {**os.environ, "IMGSERVE_CLUSTER_PORT": str(port), "IMGSERVE_DASHBOARD": "1",
            "IMGSERVE_DASHBOARD_PORT": str(dashboard_port), "IMGSERVE_WORKER_GPUS": str(worker_gpus),
            "IMGSERVE_WORKER_CPUS": "1"}


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

    address = f"127.0.0.2:{env['IMGSERVE_CLUSTER_PORT']}"  # local.sh's default IMGSERVE_CLUSTER_IP
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


# -- load -----------------------------------------------------------------------------------------------
def upload(edge: int) -> bytes:
    """The first sample photo (../shared/samples; random pixels where there is none) scaled to `edge`
    px long edge, as JPEG."""
    import numpy as np
    from PIL import Image

    samples = sorted(SAMPLES.glob("*.jpg"))
    image = Image.open(samples[0]).convert("RGB") if samples else Image.fromarray(
        np.random.default_rng(0).integers(0, 255, (edge, edge, 3), dtype=np.uint8))
    image.thumbnail((edge, edge))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def closed_loop(call: Callable[[float], None], clients: int, duration_s: float) -> float:
    """`clients` threads, each calling `call(seconds since the start)` back to back until `duration_s`
    has passed; returns the seconds until the last call finished."""
    begin = time.monotonic()
    deadline = begin + duration_s

    def caller() -> None:
        while time.monotonic() < deadline:
            call(time.monotonic() - begin)

    threads = [threading.Thread(target=caller) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.monotonic() - begin


def open_loop(call: Callable[[float], None], arrivals: list[float], max_workers: int) -> float:
    """`call(offset)` on a pool of `max_workers` threads at each offset of `arrivals` (seconds from
    the start, ascending); returns the seconds until every call finished."""
    begin = time.monotonic()
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        for offset in arrivals:
            delay = begin + offset - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            pool.submit(call, offset)
    return time.monotonic() - begin
