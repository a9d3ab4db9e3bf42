"""What several benchmarks share: the header every benchmark's JSON starts with (command, machine,
versions, git state, environment), which Serve role a process of a local Ray instance plays, the
sample upload, and the request caller and closed- and open-loop drivers of bench/load.py and
bench/scaling.py. The local multi-node cluster is the test harness's (`tests.cluster.local`).

Only the standard library is imported at module level (bench/placement_gpu.py runs where Ray and
httpx may be missing); what a function needs beyond it is imported inside that function."""

from __future__ import annotations

import io
import os
import platform
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "tests" / "data" / "samples"
ENVIRONMENT_PREFIXES = ("RAY_", "OMP_", "MALLOC_", "PILLOW_")
_SECRET = re.compile(r"TOKEN|SECRET|PASSWORD|CREDENTIAL", re.IGNORECASE)


# -- the report header ----------------------------------------------------------------------------------
def report_header(benchmark: str, **versions: Any) -> dict[str, Any]:
    """The keys every benchmark's JSON starts with: `benchmark`; `timestamp` (UTC, ISO, seconds);
    `command` (this interpreter relative to the repository, then `sys.argv`); `machine` (platform,
    cpu_count, processor, CPU model, memory_gb, loadavg now); `versions` (python, then `versions`
    as given); `git` (see `git_state`); `environment` (the variables starting with one of
    ENVIRONMENT_PREFIXES, which change how Ray, OpenMP, the allocator and Pillow behave; the value
    of one whose name says token, secret, password or credential is left out, as the JSON is
    committed). Call it when the report is written: timestamp and loadavg are read then."""
    return {
        "benchmark": benchmark,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([os.path.relpath(sys.executable, REPO), *sys.argv]),
        "machine": machine(),
        "versions": {"python": platform.python_version(), **versions},
        "git": git_state(),
        "environment": {k: "<redacted>" if _SECRET.search(k) else v for k, v in sorted(os.environ.items())
                        if k.startswith(ENVIRONMENT_PREFIXES)},
    }


def machine() -> dict[str, Any]:
    """platform, cpu_count, processor (`platform.processor()`, else the architecture), cpu (the
    model name from /proc/cpuinfo, else the processor), memory_gb (physical memory in GiB), loadavg
    (1, 5 and 15 min, now)."""
    processor = platform.processor() or platform.machine()
    try:
        memory_gb: float | None = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1)
    except (ValueError, OSError):
        memory_gb = None
    try:
        loadavg: list[float] | None = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        loadavg = None
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "processor": processor,
            "cpu": cpu_model() or processor, "memory_gb": memory_gb, "loadavg": loadavg}


def cpu_model() -> str | None:
    """The first `model name` of /proc/cpuinfo; None where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def git_state() -> dict[str, Any]:
    """The repository's HEAD (short hash) and the tracked files modified in the work tree ("" and
    [] where git cannot tell)."""
    def git(*argv: str) -> str:
        try:
            return subprocess.run(["git", *argv], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.rstrip("\n")
        except (OSError, subprocess.SubprocessError):
            return ""

    changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    return {"head": git("rev-parse", "--short", "HEAD"), "modified_tracked_files": changed}


# -- which process is which ----------------------------------------------------------------------------
_SERVE_REPLICA = re.compile(r"ServeReplica:[^:\s]+:([A-Za-z0-9_]+)")


def serve_role(proc: Any) -> str:
    """What a process of a local Ray instance is, from its command line (Ray retitles its workers):
    a Serve replica's deployment name (`ray::ServeReplica:APP:DEPLOYMENT` -> DEPLOYMENT), `proxy`,
    `controller`, `raylet`, `gcs`, else `ray_other`. `proc` is a psutil.Process; its errors
    (the process gone, access denied) propagate."""
    cmd = " ".join(proc.cmdline())
    if m := _SERVE_REPLICA.search(cmd):
        return m.group(1)
    for key, role in (("ProxyActor", "proxy"), ("ServeController", "controller"), ("raylet", "raylet"),
                      ("gcs_server", "gcs")):
        if key in cmd:
            return role
    return "ray_other"


# -- load -----------------------------------------------------------------------------------------------
def upload(edge: int) -> bytes:
    """The first sample photo (tests/data/samples; random pixels where there is none) scaled to `edge`
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


class Caller:
    """`POST /v1/real` (the upload as multipart `image`, steps=2, seed=1) from any number of threads,
    each with its own keep-alive httpx client, `timeout_s` per request. Every call appends one
    outcome to `outcomes`: sent (`sent_at`, seconds from the start of the loop driving it), status
    (None where no response came: a timeout or a dropped connection, named in `exception`),
    retry_after, code (the error code of a JSON error body, for status >= 400) and latency_s."""

    def __init__(self, url: str, body: bytes, timeout_s: float) -> None:
        self.url, self.body, self.timeout_s = url, body, timeout_s
        self.local = threading.local()
        self.lock = threading.Lock()
        self.outcomes: list[dict[str, Any]] = []

    def one(self, sent_at: float) -> None:
        client = getattr(self.local, "client", None)
        if client is None:
            import httpx

            client = self.local.client = httpx.Client(base_url=self.url, timeout=self.timeout_s)
        outcome: dict[str, Any] = {"sent": sent_at}
        start = time.monotonic()
        try:
            response = client.post("/v1/real", files={"image": ("in.jpg", self.body, "image/jpeg")},
                                   data={"steps": "2", "seed": "1"})
            outcome.update(status=response.status_code, retry_after=response.headers.get("retry-after"))
            if response.status_code >= 400:
                try:
                    outcome["code"] = (response.json().get("error") or {}).get("code")
                except (ValueError, AttributeError):  # a body that is not imgserve's JSON error
                    outcome["code"] = None
        except Exception as exc:  # a hang (timeout) or a dropped connection: what must never happen
            outcome.update(status=None, exception=type(exc).__name__)
        outcome["latency_s"] = time.monotonic() - start
        with self.lock:
            self.outcomes.append(outcome)


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


def save_figure(fig: Any, path: Path, dpi: int = 100) -> None:
    """Write a matplotlib figure to `path` (its folder made) and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
