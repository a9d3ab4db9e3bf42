"""Abuse from one API key while another sends ordinary requests: is the second key still served?

1. Start local Ray (2 CPUs, 4 fake GPUs) and the demo config (configs/demo.yaml) with two API keys
   (`ingress.api_keys_sha256`) and a fresh job directory.
2. Warm-up, then idle: key 2 sends `--idle-requests` ordinary requests one after another (anime at
   `--key2-edge` px, or `--key2-task real`: steps=2): its idle latency, measured in this run.
3. Abuse for `--duration` s, all at once, all from key 1: `--jobs` jobs submitted at the start
   (anime and real steps=2 at 128 px); `--streams` event streams opened on them (a stream that ends
   while jobs are left is reopened on another one; a refused one is not retried); `--slow-clients`
   clients that send the headers and 64 bytes of an upload, then one byte every `--slow-byte-s`
   (1 s; reconnecting when answered); a loop of abandoned `real` requests (steps=100 at 512 px,
   the client hangs up after `--hangup` s). Meanwhile key 2 sends its requests one after another, and /healthz is
   asked every 0.5 s.
4. Drain: every accepted job is followed to its final state (up to `--drain-timeout` s) and a
   succeeded job's result read and decoded. Key 2 then asks for key 1's job (status, events,
   result, cancel) and both keys list their jobs (`GET /v1/jobs`). Last, key 2's idle latency
   once more (`idle_after_latency_s`: a machine busier at the end than at the start shows there).

Reports key 2's latency p50/p95 during the abuse against idle (goal: p50 ≤ 1.5× idle, every
request 200), /healthz (every answer 200; count, max latency), the CPU seconds of every Serve
process over the abuse (the JobRunner's against its idle rate), the streams opened and refused
(429 `too_many_streams`), what the slow clients got (408 `read_timeout` and after how long), and
that nothing was lost (every accepted job ended, every succeeded job's result readable). Fields a
service version does not have (model seconds, `GET /v1/jobs`) are recorded as null.
Writes bench/results/abuse.json.

Run: .venv/bin/python bench/abuse.py   (about 3 minutes on 2 cores)
Smoke: .venv/bin/python bench/abuse.py --duration 20 --jobs 20 --streams 40 --out /tmp/abuse-smoke.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import secrets
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import psutil  # noqa: E402

from bench.common import report_header, upload  # noqa: E402
from bench.soak import (FINAL_STATES, demo_service, error_code, follow_job, process_figures,  # noqa: E402
                        serve_processes, summary)
from serve_app.keys import hash_key  # noqa: E402


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class Abuse:
    """The clients of one run; each appends to its own list, read after the threads are joined."""

    def __init__(self, url: str, keys: tuple[str, str], options: argparse.Namespace) -> None:
        self.url, self.options = url, options
        self.key1, self.key2 = keys
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.images = {edge: upload(edge) for edge in {128, 512, options.key2_edge}}
        self.jobs: list[str] = []
        self.submissions: list[dict[str, Any]] = []
        self.final_jobs: set[str] = set()
        self.streams: list[dict[str, Any]] = []
        self.open_streams = 0
        self.open_samples: list[int] = []
        self.slow: list[dict[str, Any]] = []
        self.abandoned: list[dict[str, Any]] = []
        self.health: list[dict[str, Any]] = []

    def files(self, edge: int) -> dict[str, Any]:
        return {"image": ("in.jpg", self.images[edge], "image/jpeg")}

    # -- key 2 --------------------------------------------------------------------------------------
    def key2_request(self, http: httpx.Client) -> dict[str, Any]:
        fields = {"steps": "2", "seed": "1"} if self.options.key2_task == "real" else {}
        start = time.monotonic()
        try:
            response = http.post(f"/v1/{self.options.key2_task}", files=self.files(self.options.key2_edge),
                                 data=fields, headers=bearer(self.key2))
        except httpx.HTTPError as exc:
            return {"status": None, "exception": type(exc).__name__, "latency_s": time.monotonic() - start}
        outcome = {"status": response.status_code, "latency_s": time.monotonic() - start,
                   "model_seconds": response.headers.get("x-imgserve-model-seconds")}
        if response.status_code >= 400:
            outcome["code"] = error_code(response)
        return outcome

    def key2_loop(self, out: list[dict[str, Any]], count: int | None = None) -> None:
        with httpx.Client(base_url=self.url, timeout=300) as http:
            while not self.stop.is_set() and (count is None or len(out) < count):
                out.append(self.key2_request(http))

    # -- key 1: jobs and their event streams ---------------------------------------------------------
    def submit_jobs(self) -> None:
        rng = random.Random(18)
        with httpx.Client(base_url=self.url, timeout=60, headers=bearer(self.key1)) as http:
            for index in range(self.options.jobs):
                task = "real" if rng.random() < self.options.real_share else "anime"
                fields = {"task": task, **({"steps": "2", "seed": str(index)} if task == "real" else {})}
                try:
                    response = http.post("/v1/jobs", files=self.files(128), data=fields)
                except httpx.HTTPError as exc:
                    self.submissions.append({"task": task, "status": None, "exception": type(exc).__name__})
                    continue
                self.submissions.append({"task": task, "status": response.status_code, "code": error_code(response)
                                         if response.status_code >= 400 else None})
                if response.status_code == 202:
                    with self.lock:
                        self.jobs.append(response.json()["id"])

    def stream_slot(self, slot: int) -> None:
        """One event stream slot: open a stream on a job of key 1 and read it to its end; reopen on an
        unfinished job while the abuse lasts; give up when refused."""
        with httpx.Client(base_url=self.url, headers=bearer(self.key1),
                          timeout=httpx.Timeout(30.0, read=self.options.stream_quiet_s)) as http:
            job_id = self.jobs[slot % len(self.jobs)] if self.jobs else "job-that-does-not-exist"
            reopened = False
            while True:
                record: dict[str, Any] = {"slot": slot, "reopened": reopened, "status": None, "events": 0, "end": None}
                start = time.monotonic()
                try:
                    with http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
                        record["status"], record["open_s"] = response.status_code, round(time.monotonic() - start, 3)
                        if response.status_code != 200:
                            response.read()
                            record["code"] = error_code(response)
                        else:
                            with self.lock:
                                self.open_streams += 1
                            try:
                                for line in response.iter_lines():
                                    if line.startswith(":"):  # an SSE comment: a heartbeat
                                        record["heartbeats"] = record.get("heartbeats", 0) + 1
                                    elif line.startswith("data:"):
                                        record["events"] += 1
                                        if json.loads(line[5:]).get("state") in FINAL_STATES:
                                            record["end"] = "final"
                                            with self.lock:
                                                self.final_jobs.add(job_id)
                            finally:
                                with self.lock:
                                    self.open_streams -= 1
                except (httpx.HTTPError, ValueError) as exc:
                    record["end"] = type(exc).__name__
                record["held_s"] = round(time.monotonic() - start, 3)
                self.streams.append(record)
                if record["status"] != 200 or self.stop.is_set():
                    return
                with self.lock:
                    left = [job for job in self.jobs if job not in self.final_jobs]
                if not left:
                    return
                job_id, reopened = random.choice(left), True

    # -- key 1: the slow body, the abandoned requests -------------------------------------------------
    def slow_client(self) -> None:
        """Send an upload's headers and 64 bytes, then one byte every `--slow-byte-s` until answered
        or the abuse ends; reconnect after an answer."""
        parts = urlsplit(self.url)
        boundary = "slow-body-boundary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n"
                f"Content-Type: image/jpeg\r\n\r\n").encode() + self.images[128] + f"\r\n--{boundary}--\r\n".encode()
        head = (f"POST /v1/anime HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {self.key1}\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        while not self.stop.is_set():
            record: dict[str, Any] = {"status": None}
            start = time.monotonic()
            sent = 64
            try:
                with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
                    sock.sendall(head + body[:sent])
                    sock.settimeout(self.options.slow_byte_s)
                    while not self.stop.is_set():
                        try:
                            data = sock.recv(4096)
                            if data:
                                line = data.split(b"\r\n", 1)[0].decode("latin-1")
                                record["status"] = int(line.split()[1]) if line.startswith("HTTP/") else line
                                record["code"] = _json_code(_rest_of_answer(sock, data))
                            else:
                                record["status"] = "closed"
                            break
                        except socket.timeout:
                            pass
                        if sent < len(body):
                            sock.sendall(body[sent:sent + 1])
                            sent += 1
                    else:
                        record["status"] = "held_until_the_end"
            except OSError as exc:
                record["status"] = record["status"] or type(exc).__name__
            record.update(held_s=round(time.monotonic() - start, 1), body_bytes_sent=sent)
            self.slow.append(record)

    def abandon_loop(self) -> None:
        while not self.stop.is_set():
            record: dict[str, Any] = {"status": None}
            start = time.monotonic()
            # a client of its own, closed on the way out: the connection drops as a user's would
            with httpx.Client(base_url=self.url, timeout=httpx.Timeout(10.0, read=self.options.hangup)) as http:
                try:
                    response = http.post("/v1/real", files=self.files(512), data={"steps": "100", "seed": "9"},
                                         headers=bearer(self.key1))
                    record.update(status=response.status_code, code=error_code(response) if response.status_code >= 400 else None)
                except httpx.ReadTimeout:
                    record["status"] = "hung_up"
                except httpx.HTTPError as exc:
                    record["status"] = type(exc).__name__
            record["s"] = round(time.monotonic() - start, 2)
            self.abandoned.append(record)
            if record["status"] != "hung_up":
                self.stop.wait(0.5)  # refused or answered at once: do not spin

    def health_loop(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            while not self.stop.is_set():
                start = time.monotonic()
                try:
                    status: Any = http.get("/healthz").status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                self.health.append({"status": status, "latency_s": time.monotonic() - start})
                self.stop.wait(max(0.0, 0.5 - (time.monotonic() - start)))

    def count_streams(self) -> None:
        while not self.stop.wait(0.25):
            self.open_samples.append(self.open_streams)


def _rest_of_answer(sock: socket.socket, data: bytes) -> bytes:
    """The answer's bytes after its head, read for up to 2 s more (the body may come in its own packet)."""
    sock.settimeout(2.0)
    with contextlib.suppress(OSError):
        while b"}" not in data.partition(b"\r\n\r\n")[2] and (more := sock.recv(4096)):
            data += more
    return data.partition(b"\r\n\r\n")[2]


def _json_code(body: bytes) -> str | None:
    """The error code of the JSON error in a raw HTTP body (plain or one chunk)."""
    try:
        return (json.loads(body[body.index(b"{"):body.rindex(b"}") + 1]).get("error") or {}).get("code")
    except (ValueError, AttributeError):
        return None


def cpu_delta(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    return {name: round(after[name]["cpu_s"] - fig["cpu_s"], 2)
            if after.get(name, {}).get("cpu_s") is not None and fig["cpu_s"] is not None else None
            for name, fig in before.items()}


def isolation(url: str, keys: tuple[str, str], job_id: str | None) -> dict[str, Any]:
    """What key 2 gets for key 1's job, and what each key's `GET /v1/jobs` lists (null items where the
    route is missing: not 200)."""
    key1, key2 = keys
    found: dict[str, Any] = {}
    with httpx.Client(base_url=url, timeout=30) as http:
        if job_id:
            for what, method, path in (("status", "GET", ""), ("events", "GET", "/events"),
                                       ("result", "GET", "/result"), ("cancel", "DELETE", "")):
                found[f"key2_{what}_of_key1_job"] = http.request(method, f"/v1/jobs/{job_id}{path}",
                                                                 headers=bearer(key2)).status_code
        for name, key in (("key1", key1), ("key2", key2)):
            response = http.get("/v1/jobs", params={"limit": 100}, headers=bearer(key))
            listed = response.json().get("data") if response.status_code == 200 else None
            found[f"{name}_list_status"] = response.status_code
            found[f"{name}_listed"] = len(listed) if isinstance(listed, list) else None
    codes = [v for k, v in found.items() if k.startswith("key2_") and k.endswith("_job")]
    found["key2_refused_on_every_route"] = all(code == 404 for code in codes) if codes else None
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=90.0, help="seconds of abuse")
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--real-share", type=float, default=0.3, help="share of the jobs that are real (steps=2)")
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--slow-clients", type=int, default=1)
    parser.add_argument("--slow-byte-s", type=float, default=1.0, help="seconds between a slow client's bytes")
    parser.add_argument("--hangup", type=float, default=1.5, help="seconds before an abandoned request's client hangs up")
    parser.add_argument("--key2-task", choices=("anime", "real"), default="anime")
    parser.add_argument("--key2-edge", type=int, default=256)
    parser.add_argument("--idle-requests", type=int, default=30)
    parser.add_argument("--stream-quiet-s", type=float, default=60.0, help="a stream silent this long is dropped")
    parser.add_argument("--drain-timeout", type=float, default=180.0)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "abuse.json"))
    options = parser.parse_args()
    started = time.monotonic()
    keys = (f"isk_bench1_{secrets.token_urlsafe(24)}", f"isk_bench2_{secrets.token_urlsafe(24)}")
    directory = Path(tempfile.mkdtemp(prefix="imgserve-abuse-jobs-"))
    overrides = {"ingress": {"api_keys_sha256": [hash_key(key) for key in keys]}, "jobs": {"directory": str(directory)}}
    idle: list[dict[str, Any]] = []
    during: list[dict[str, Any]] = []
    with demo_service(overrides) as url:
        abuse = Abuse(url, keys, options)
        warm: list[dict[str, Any]] = []
        abuse.key2_loop(warm, count=5)
        with httpx.Client(base_url=url, timeout=120, headers=bearer(keys[0])) as http:  # the job path, warm
            for fields in ({"task": "anime"}, {"task": "real", "steps": "2"}):
                response = http.post("/v1/jobs", files=abuse.files(128), data=fields)
                if response.status_code == 202:
                    follow_job(http, response.json()["id"], time.monotonic() + 120)
        procs = serve_processes()
        idle_start, idle_cpu_before = time.monotonic(), process_figures(procs)
        abuse.key2_loop(idle, count=options.idle_requests)
        idle_s, idle_cpu_after = time.monotonic() - idle_start, process_figures(procs)
        print(f"idle: key 2 p50 {summary([o['latency_s'] for o in idle])['p50']} s", flush=True)

        abuse_start, before = time.monotonic(), process_figures(procs)
        threads = [threading.Thread(target=abuse.key2_loop, args=(during,)),
                   threading.Thread(target=abuse.health_loop), threading.Thread(target=abuse.count_streams),
                   threading.Thread(target=abuse.abandon_loop),
                   *(threading.Thread(target=abuse.slow_client) for _ in range(options.slow_clients))]
        for thread in threads:
            thread.start()
        abuse.submit_jobs()
        stream_threads = [threading.Thread(target=abuse.stream_slot, args=(slot,), daemon=True)
                          for slot in range(options.streams)]
        for thread in stream_threads:
            thread.start()
        abuse.stop.wait(max(0.0, options.duration - (time.monotonic() - abuse_start)))
        abuse.stop.set()
        after = process_figures(procs)
        abuse_s = time.monotonic() - abuse_start
        for thread in threads:
            thread.join()
        print(f"abuse: {abuse_s:.0f} s; {len(abuse.jobs)} jobs accepted; draining", flush=True)

        deadline = time.monotonic() + options.drain_timeout
        with httpx.Client(base_url=url, timeout=60) as http:
            ended = [{"id": job, **follow_job(http, job, deadline, headers=bearer(keys[0]))} for job in abuse.jobs]
        for thread in stream_threads:
            thread.join(timeout=max(1.0, deadline - time.monotonic()))
        stuck_streams = sum(1 for thread in stream_threads if thread.is_alive())
        found = isolation(url, keys, abuse.jobs[0] if abuse.jobs else None)
        abuse.stop.clear()  # idle again: the same requests once more, to tell the abuse from a busier machine
        idle_again: list[dict[str, Any]] = []
        abuse.key2_loop(idle_again, count=options.idle_requests)
        procs_after = serve_processes()
    shutil.rmtree(directory, ignore_errors=True)
    import ray

    result = report(options, abuse, idle, during, ended, found, stuck_streams, configured_read_timeout(overrides))
    result["key2"]["idle_after_latency_s"] = summary([o["latency_s"] for o in idle_again if o["status"] == 200])
    runner_idle = cpu_delta(idle_cpu_before, idle_cpu_after).get("JobRunner")
    runner_idle = runner_idle / idle_s if runner_idle is not None else None
    cpu = cpu_delta(before, after)
    result["cpu_s_during_abuse"] = cpu
    result["runner_cpu"] = {"abuse_s": round(abuse_s, 1), "cpu_s": cpu.get("JobRunner"),
                            "cpu_per_s": round(cpu["JobRunner"] / abuse_s, 3) if cpu.get("JobRunner") is not None else None,
                            "idle_cpu_per_s": round(runner_idle, 3) if runner_idle is not None else None}
    result["same_processes"] = {name: procs_after.get(name) is not None and procs_after[name].pid == fig["pid"]
                                for name, fig in before.items()}
    header = report_header("abuse", ray=ray.__version__, httpx=httpx.__version__, psutil=psutil.__version__)
    header["machine"]["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    result = {**header, **result, "wall_s": round(time.monotonic() - started, 1)}
    result["goal"]["no_replica_restarted"] = all(result["same_processes"].values())
    result["goal"]["pass"] = all(v is True for k, v in result["goal"].items() if k not in ("key2_p50_ratio_max", "pass"))
    Path(options.out).parent.mkdir(parents=True, exist_ok=True)
    Path(options.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("key2", "healthz", "runner_cpu", "event_streams", "slow_body")}))
    print(json.dumps(result["goal"]))


def configured_read_timeout(overrides: dict[str, Any]) -> float | None:
    """The demo ingress's `read_timeout_s` (None for a version without the setting)."""
    try:
        from serve_app.config import IngressSection
        from tests.conftest import demo_args, merged

        return getattr(IngressSection.model_validate(merged(demo_args(), overrides)["ingress"]), "read_timeout_s", None)
    except Exception:  # a config this version cannot read: the figure is unknown, not a failure
        return None


def report(options: argparse.Namespace, abuse: Abuse, idle: list[dict[str, Any]], during: list[dict[str, Any]],
           ended: list[dict[str, Any]], found: dict[str, Any], stuck_streams: int,
           read_timeout_s: float | None) -> dict[str, Any]:
    idle_ok = summary([o["latency_s"] for o in idle if o["status"] == 200])
    during_ok = summary([o["latency_s"] for o in during if o["status"] == 200])
    ratio = round(during_ok["p50"] / idle_ok["p50"], 3) if during_ok["p50"] and idle_ok["p50"] else None
    model_seconds = [float(o["model_seconds"]) for o in during if o.get("model_seconds")]
    health = abuse.health
    firsts = [s for s in abuse.streams if not s["reopened"]]
    lost = [job for job in ended if job["lost"]]
    job_model_seconds = [job["model_seconds"] for job in ended if job.get("model_seconds") is not None]
    return {
        "settings": {
            "config": "configs/demo.yaml (local Ray: 2 CPUs, 4 fake GPUs), two API keys, fresh job directory",
            "duration_s": options.duration, "jobs": options.jobs, "real_share": options.real_share,
            "streams": options.streams, "slow_clients": options.slow_clients, "hangup_s": options.hangup,
            "key2_request": f"POST /v1/{options.key2_task} at {options.key2_edge} px"
                            + (", steps=2" if options.key2_task == "real" else ""),
            "jobs_detail": "key 1: anime, or real steps=2, at 128 px",
            "abandoned_detail": "key 1: POST /v1/real steps=100 at 512 px, client hangs up after hangup_s",
            "slow_body_detail": "key 1: POST /v1/anime, headers and 64 bytes of a ~5 KB multipart body, then one byte "
                                "every slow_byte_s s", "slow_byte_s": options.slow_byte_s,
        },
        "key2": {"idle_latency_s": idle_ok, "abuse_latency_s": during_ok, "p50_ratio": ratio,
                 "idle_statuses": dict(Counter(str(o["status"]) for o in idle)),
                 "abuse_statuses": dict(Counter(str(o["status"]) for o in during)),
                 "abuse_error_codes": dict(Counter(o.get("code") for o in during if o.get("code"))),
                 "model_seconds_p50": round(sorted(model_seconds)[len(model_seconds) // 2], 3) if model_seconds else None},
        "healthz": {"count": len(health), "statuses": dict(Counter(str(h["status"]) for h in health)),
                    "latency_s": summary([h["latency_s"] for h in health])},
        "event_streams": {"slots": options.streams, "first_opened": sum(1 for s in firsts if s["status"] == 200),
                          "first_refused_too_many_streams": sum(1 for s in firsts if s.get("code") == "too_many_streams"),
                          "first_other": dict(Counter(f"{s['status']} {s.get('code')}" for s in firsts
                                                      if s["status"] != 200 and s.get("code") != "too_many_streams")),
                          "reopened": sum(1 for s in abuse.streams if s["reopened"]),
                          "reopen_refused": sum(1 for s in abuse.streams if s["reopened"] and s["status"] != 200),
                          "open_at_once_max": max(abuse.open_samples, default=0),
                          "open_s_p50": summary([s["open_s"] for s in abuse.streams if "open_s" in s])["p50"],
                          "ends": dict(Counter(str(s["end"]) for s in abuse.streams if s["status"] == 200)),
                          "heartbeats": sum(s.get("heartbeats", 0) for s in abuse.streams),
                          "stuck_after_drain": stuck_streams},
        "slow_body": {"attempts": len(abuse.slow), "statuses": dict(Counter(str(s["status"]) for s in abuse.slow)),
                      "codes": dict(Counter(s.get("code") for s in abuse.slow if s.get("code"))),
                      "held_s": [s["held_s"] for s in abuse.slow][:20],
                      "read_timeout_s": read_timeout_s,
                      # what the ingress's read deadline is for: the slow client got 408 and its slot back
                      "released_with_408": any(s["status"] == 408 for s in abuse.slow)},
        "abandoned": {"sent": len(abuse.abandoned), "outcomes": dict(Counter(str(a["status"]) for a in abuse.abandoned))},
        "jobs": {"submitted": len(abuse.submissions),
                 "submit_statuses": dict(Counter(f"{s['status']} {s.get('code') or ''}".strip() for s in abuse.submissions)),
                 "accepted": len(ended), "final_states": dict(Counter(str(job["state"]) for job in ended)),
                 "error_codes": dict(Counter(job["error_code"] for job in ended if job["error_code"])),
                 "lost_count": len(lost), "lost": lost[:20],
                 "model_seconds_total": round(sum(job_model_seconds), 2) if job_model_seconds else None},
        "isolation": found,
        "goal": {
            "key2_p50_ratio_max": 1.5,
            "key2_p50_within_1_5x_idle": ratio is not None and ratio <= 1.5,
            "key2_every_request_200": bool(during) and all(o["status"] == 200 for o in during),
            "healthz_always_200": bool(health) and all(h["status"] == 200 for h in health),
            "nothing_lost": not lost and all(job["state"] in FINAL_STATES for job in ended),
        },
    }


if __name__ == "__main__":
    main()
