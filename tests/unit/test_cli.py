"""The `imgserve` task commands and the client, against a real local HTTP server that records what
it receives and answers from a script: every field of the registry's tasks is an option (a field or
a task added to the registry too, without editing the CLI or the client), what each option sends,
job mode, `imgserve jobs`, and the bounded retries of 429/503 after Retry-After."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.parser import BytesParser
from email.policy import HTTP
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from deployments.anime_config import AnimeParams
from deployments.task import Tasks
from deployments.tasks import TASKS
from serve_app import cli
from serve_app.cli_tasks import FIELD_DEST
from serve_app.client import Client, ServiceError, retry_after_seconds
from tests.extra_task import GRAY

PNG = b"\x89PNG\r\n\x1a\n fake result"
JOB_ID = "0123456789abcdef0123456789abcdef"


@dataclass
class Seen:
    """One request the server received."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    fields: dict[str, str]
    image: bytes | None
    at: float = field(default_factory=time.monotonic)


Answer = tuple[int, dict[str, str], bytes]


def png(**params: str) -> Answer:
    return 200, {"Content-Type": "image/png", **{f"X-Imgserve-{k}": v for k, v in params.items()}}, PNG


def error(status: int, code: str, retry_after: str | None = None) -> Answer:
    headers = {"Content-Type": "application/json", **({"Retry-After": retry_after} if retry_after is not None else {})}
    return status, headers, json.dumps({"error": {"code": code, "message": "try later"}}).encode()


def as_json(status: int, body: Any) -> Answer:
    return status, {"Content-Type": "application/json"}, json.dumps(body).encode()


def sse(*events: dict) -> Answer:
    frames = "".join(f"event: progress\nid: {i}\ndata: {json.dumps(e)}\n\n" for i, e in enumerate(events, 1))
    return 200, {"Content-Type": "text/event-stream"}, frames.encode()


def status(state: str, **extra: Any) -> dict:
    return {"id": JOB_ID, "task": "real", "state": state, "stage": None, "step": None, "total_steps": None,
            "queue_position": None, "error": None, "created_at": 1.7e9, "priority": "normal", **extra}


class Server:
    """A real HTTP server on 127.0.0.1: records each request; answers with the first queued answer
    for its "METHOD path" (then the route's default, else 200 with a PNG)."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.queued: dict[str, list[Answer]] = {}
        self.routes: dict[str, Callable[[Seen], Answer]] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                url = urlsplit(self.path)
                fields, image = {}, None
                if self.headers.get("content-type", "").startswith("multipart/form-data"):
                    head = f"Content-Type: {self.headers['content-type']}\r\n\r\n".encode()
                    for part in BytesParser(policy=HTTP).parsebytes(head + body).iter_parts():
                        name = part.get_param("name", header="content-disposition")
                        if name == "image":
                            image = part.get_payload(decode=True)
                        else:
                            fields[name] = part.get_payload(decode=True).decode()
                seen = Seen(self.command, url.path, {k: v[0] for k, v in parse_qs(url.query).items()},
                            {k.lower(): v for k, v in self.headers.items()}, fields, image)
                server.seen.append(seen)
                key = f"{self.command} {url.path}"
                if server.queued.get(key):
                    code, headers, data = server.queued[key].pop(0)
                elif key in server.routes:
                    code, headers, data = server.routes[key](seen)
                else:
                    code, headers, data = png()
                self.send_response(code)
                for name, value in {**headers, "Content-Length": str(len(data))}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _answer

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self.thread.start()

    def queue(self, route: str, *answers: Answer) -> None:
        self.queued.setdefault(route, []).extend(answers)

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    running = Server()
    yield running
    running.close()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "in.png"
    path.write_bytes(b"input image bytes")
    return path


def run(server: Server, *argv: str, tasks=TASKS) -> int:
    return cli.main(["--url", server.url, *argv], tasks=tasks)


# --- the options come from the registry -----------------------------------------------------------

def test_every_field_of_every_task_is_an_option_typed_and_documented_from_its_params() -> None:
    parser = cli.build_parser()
    samples = {int: ("7", 7), float: ("0.5", 0.5), str: ("v2511-0801", "v2511-0801")}
    for task in TASKS:
        subparser = parser._subparsers._group_actions[0].choices[task.name]
        helps = {option: action.help for action in subparser._actions for option in action.option_strings}
        for name, info in task.params.model_fields.items():
            option = "--" + name.replace("_", "-")
            assert option in helps, (task.name, option)
            assert " ".join(info.description.split())[:40] in helps[option]  # the field's docstring is the help
            kind = next(k for k in (bool, int, float, str) if k in getattr(info.annotation, "__args__", ()))
            if kind is bool:
                on = parser.parse_args([task.name, "in.png", "-o", "out", option])
                off = parser.parse_args([task.name, "in.png", "-o", "out", "--no-" + option[2:]])
                assert (getattr(on, FIELD_DEST + name), getattr(off, FIELD_DEST + name)) == (True, False)
            else:
                text, value = samples[kind]
                parsed = parser.parse_args([task.name, "in.png", "-o", "out", option, text])
                assert getattr(parsed, FIELD_DEST + name) == value
        assert helps["--format"] and subparser._option_string_actions["--format"].choices == task.formats
    assert {"--lora", "--lora-scale", "--preset", "--negative-prompt", "--depth-compensation"} <= set(
        parser._subparsers._group_actions[0].choices["real"]._option_string_actions)
    with pytest.raises(SystemExit):
        parser.parse_args(["real", "in.png", "-o", "out", "--steps", "many"])  # typed: an int


def test_a_task_added_to_the_registry_is_a_command_whose_fields_are_sent(server, image, tmp_path) -> None:
    registry = TASKS.plus(GRAY)
    gray = cli.build_parser(registry)._subparsers._group_actions[0].choices["gray"]
    assert "How far towards gray" in gray._option_string_actions["--amount"].help
    assert "gray" not in cli.build_parser()._subparsers._group_actions[0].choices  # it came from the registry
    out = tmp_path / "out.png"
    assert run(server, "gray", str(image), "-o", str(out), "--amount", "0.5", tasks=registry) == 0
    (seen,) = server.seen
    assert (seen.method, seen.path, seen.fields, seen.image) == ("POST", "/v1/gray", {"amount": "0.5"},
                                                                 image.read_bytes())
    assert out.read_bytes() == PNG


def test_a_field_added_to_a_tasks_params_is_an_option_and_passes_through_the_client(server, image, tmp_path) -> None:
    class MoreAnime(AnimeParams):
        strength: float | None = None
        """How strongly the style is applied."""

    registry = Tasks(*(dataclasses.replace(t, params=MoreAnime) if t.name == "anime" else t for t in TASKS))
    assert run(server, "anime", str(image), "-o", str(tmp_path / "o.png"), "--style", "paprika",
               "--strength", "0.3", tasks=registry) == 0
    with Client(server.url) as client:
        client.anime(image, style="hayao", strength=0.7)
        client.layers(image.read_bytes(), layers=2, new_field="x")
    assert [(s.path, s.fields) for s in server.seen] == [
        ("/v1/anime", {"style": "paprika", "strength": "0.3"}),
        ("/v1/anime", {"style": "hayao", "strength": "0.7"}),
        ("/v1/layers", {"layers": "2", "new_field": "x"}),
    ]


def test_the_old_real_options_and_the_generic_fields_are_sent_as_given(server, image, tmp_path) -> None:
    out = tmp_path / "out.webp"
    server.queue("POST /v1/real", png(seed="5", steps="2"))
    assert run(server, "real", str(image), "-o", str(out), "--prompt", "a person", "--negative-prompt", "blur",
               "--steps", "2", "--cfg", "4.5", "--seed", "5", "--lora", "v2511-0801", "--preset", "fast",
               "--lora-scale", "0.5", "--format", "webp", "--size", "512x512", "--depth-compensation") == 0
    assert run(server, "real", str(image), "-o", str(out), "--no-depth-compensation",
               "--set", "steps=9", "--set", "future_field=1", "--steps", "3") == 0
    assert run(server, "layers", str(image), "-o", str(out), "--layers", "3", "--resolution", "640",
               "--no-cfg-normalize", "--format", "psd") == 0
    assert [s.fields for s in server.seen] == [
        {"prompt": "a person", "negative_prompt": "blur", "steps": "2", "cfg": "4.5", "seed": "5",
         "lora": "v2511-0801", "preset": "fast", "lora_scale": "0.5", "depth_compensation": "true",
         "format": "webp", "size": "512x512"},
        {"depth_compensation": "false", "steps": "3", "future_field": "1"},  # the option wins over --set
        {"layers": "3", "resolution": "640", "cfg_normalize": "false", "format": "psd"},
    ]
    assert out.read_bytes() == PNG
    with pytest.raises(SystemExit):  # each task's own formats
        run(server, "real", str(image), "-o", str(out), "--format", "zip")


def test_job_options_without_job_and_a_bad_set_are_usage_errors(server, image, tmp_path, capsys) -> None:
    out = str(tmp_path / "out.png")
    assert run(server, "real", str(image), "-o", out, "--priority", "high") == 2
    assert run(server, "anime", str(image), "-o", out, "--idempotency-key", "k1") == 2
    assert run(server, "anime", str(image), "-o", out, "--set", "style") == 2
    assert "only with --job" in capsys.readouterr().err
    assert server.seen == []


# --- jobs -----------------------------------------------------------------------------------------

def job_routes(server: Server, final: str = "succeeded") -> None:
    server.routes[f"GET /v1/jobs/{JOB_ID}/events"] = lambda seen: sse(
        {**status("queued"), "queue_position": 0},
        {**status("running"), "stage": "denoise", "step": 1, "total_steps": 2},
        status(final))
    server.routes[f"GET /v1/jobs/{JOB_ID}"] = lambda seen: as_json(200, status(final))
    server.routes[f"GET /v1/jobs/{JOB_ID}/result"] = lambda seen: (
        png(seed="3") if final == "succeeded" else error(409, "not_ready"))


def test_job_mode_sends_priority_and_idempotency_key_follows_progress_and_saves(server, image, tmp_path,
                                                                              capsys) -> None:
    job_routes(server)
    server.queue("POST /v1/jobs", error(503, "queue_full", "0"), as_json(202, status("queued")))  # full once
    out = tmp_path / "out.png"
    assert run(server, "real", str(image), "-o", str(out), "--job", "--lora", "v2511-0801", "--priority", "high",
               "--idempotency-key", "abc-1", "--webhook-url", "https://hooks.example/x",
               "--webhook-events", "succeeded,failed") == 0
    posts = [s for s in server.seen if s.method == "POST"]
    assert len(posts) == 2 and all(p.path == "/v1/jobs" for p in posts)
    assert posts[1].fields == {"task": "real", "lora": "v2511-0801", "priority": "high",
                               "webhook_url": "https://hooks.example/x", "webhook_events": "succeeded,failed"}
    assert posts[1].headers["idempotency-key"] == "abc-1"
    assert out.read_bytes() == PNG
    err = capsys.readouterr().err
    assert f"job {JOB_ID}" in err and "step 1/2" in err and "retrying" in err


def test_jobs_commands_list_show_wait_cancel(server, tmp_path, capsys) -> None:
    job_routes(server, final="failed")
    pages = {None: ([status("succeeded"), status("running")], "cur1"), "cur1": ([status("queued")], "cur2")}
    server.routes["GET /v1/jobs"] = lambda seen: as_json(200, {"object": "list", "next_cursor": pages[
        seen.query.get("cursor")][1], "data": pages[seen.query.get("cursor")][0]})
    server.routes[f"DELETE /v1/jobs/{JOB_ID}"] = lambda seen: as_json(200, status("cancelled"))
    assert run(server, "jobs", "list", "--state", "running", "--task", "real", "--limit", "3") == 0
    lists = [s.query for s in server.seen if s.path == "/v1/jobs"]
    assert lists == [{"limit": "3", "state": "running", "task": "real"},
                     {"limit": "1", "state": "running", "task": "real", "cursor": "cur1"}]
    assert len(capsys.readouterr().out.strip().splitlines()) == 3
    assert run(server, "jobs", "show", JOB_ID) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "failed"
    assert run(server, "jobs", "cancel", JOB_ID) == 0
    assert "cancelled" in capsys.readouterr().out
    out = tmp_path / "never.png"
    assert run(server, "jobs", "wait", JOB_ID, "-o", str(out)) == 1  # the job failed: nothing saved
    assert not out.exists() and f"job {JOB_ID} failed" in capsys.readouterr().err


# --- retries --------------------------------------------------------------------------------------

def test_503_is_retried_after_its_retry_after(server, image) -> None:
    server.queue("POST /v1/real", error(503, "queue_full", "1"))
    with Client(server.url) as client:
        assert client.real(image, steps=2).data == PNG
    first, second = server.seen
    assert second.at - first.at >= 1.0  # the server's Retry-After was honoured
    assert first.fields == second.fields == {"steps": "2"} and second.image == image.read_bytes()


def test_retries_are_bounded_and_can_be_turned_off(server, image) -> None:
    server.queue("POST /v1/anime", *[error(429, "rate_limited", "0")] * 2)
    told = []
    with Client(server.url, max_retries=3, on_retry=lambda e, s: told.append((e.status, s))) as client:
        assert client.anime(image).data == PNG  # two 429s, then served
    assert len(server.seen) == 3 and told == [(429, 0.0), (429, 0.0)]

    server.seen.clear()
    server.queue("POST /v1/anime", *[error(503, "queue_full", "0")] * 5)
    with Client(server.url, max_retries=2) as client, pytest.raises(ServiceError) as raised:
        client.anime(image)
    assert raised.value.status == 503 and len(server.seen) == 3  # 1 + 2 retries, then the error

    server.seen.clear()
    server.queued.clear()
    server.queue("POST /v1/anime", error(503, "queue_full", "1"))
    with Client(server.url, max_retries=0) as client, pytest.raises(ServiceError) as raised:
        client.anime(image)
    assert (raised.value.status, raised.value.retry_after, len(server.seen)) == (503, 1.0, 1)

    server.seen.clear()
    server.queue("POST /v1/anime", error(429, "quota_exceeded", "120"))  # longer than max_retry_wait
    with Client(server.url, max_retry_wait=30) as client, pytest.raises(ServiceError) as raised:
        client.anime(image)
    assert (raised.value.retry_after, len(server.seen)) == (120.0, 1)  # raised at once, not retried early


def test_cli_retries_unless_no_retry(server, image, tmp_path, capsys) -> None:
    out = str(tmp_path / "out.png")
    server.queue("POST /v1/anime", error(503, "queue_full", "0"))
    assert run(server, "--no-retry", "anime", str(image), "-o", out) == 1
    assert "503 queue_full" in capsys.readouterr().err and len(server.seen) == 1
    server.queue("POST /v1/anime", error(503, "queue_full", "0"))
    assert run(server, "anime", str(image), "-o", out) == 0
    assert len(server.seen) == 3 and "retrying in 0 s" in capsys.readouterr().err


def test_an_event_stream_refused_with_429_is_retried(server) -> None:
    job_routes(server)
    server.queue(f"GET /v1/jobs/{JOB_ID}/events", error(429, "too_many_streams", "0"))
    with Client(server.url) as client:
        states = [e["state"] for e in client.job(JOB_ID).events()]
    assert states == ["queued", "running", "succeeded"]
    assert [s.path for s in server.seen].count(f"/v1/jobs/{JOB_ID}/events") == 2


def test_retry_after_as_seconds_or_an_http_date() -> None:
    assert retry_after_seconds("3") == 3.0 and retry_after_seconds("0.5") == 0.5
    later = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=90), usegmt=True)
    assert 80 < retry_after_seconds(later) <= 90
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
