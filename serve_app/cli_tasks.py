"""The task commands of `imgserve` (`imgserve real|anime|layers IMAGE -o OUT ...`), generated from a
task registry, and `imgserve jobs list|show|wait|cancel`.

Contract: `add_task_commands(commands, tasks)` adds one sub-command per task of the registry (a
task named like a built-in command is left to `imgserve submit --task`). Every field of the task's
params model becomes an option: `--dashed-name`, typed from its annotation (int, float, str; a
bool as `--x/--no-x`; a Literal as choices; anything else a string the service parses), its help
the field's docstring. Next to them the generic request fields `--format` (the task's formats) and
`--size` (`auto` or WxH), `--set FIELD=VALUE` for a field this registry does not know (a newer
service), and `--job` (queue it, show a progress bar; only then `--priority`, `--idempotency-key`,
`--webhook-url`, `--webhook-events`). Nothing here names a task or a field: a field added to a
params model, or a task added to the registry, is on the command line without editing this module.
`run_task(client, args)` runs the command; `add_jobs_commands` / `jobs_command` are `imgserve jobs`.
Errors propagate as `ServiceError` (the caller prints them, exit status 1); a usage error is exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from datetime import datetime
from typing import Any, Literal, Union, get_args, get_origin

from deployments.task import Task, Tasks
from serve_app.client import Client, Job, Result, progress_line

JOB_ONLY = ("priority", "idempotency_key", "webhook_url", "webhook_events")
"""Options of a task command that mean something for a job only (`POST /v1/jobs`' own fields and header)."""
GENERIC = ("image", "output", "format", "size", "set", "job", *JOB_ONLY)
"""The task commands' own options: a params field of one of these names is reachable by `--set` only
(the service reads `format`, `size` and the job options before the task's params anyway)."""
FIELD_DEST = "field:"
"""Prefix of the parsed fields' attribute names, so no field can overwrite a generic option's value."""
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
PRIORITIES = ("low", "normal", "high")
METAVARS = {int: "N", float: "X", str: "TEXT"}


def _option_type(annotation: Any) -> Any:
    """bool, int, float, str, a tuple of Literal choices, or str for anything else (the service parses it)."""
    if get_origin(annotation) in (Union, types.UnionType):
        kinds = [kind for kind in get_args(annotation) if kind is not type(None)]
        annotation = kinds[0] if len(kinds) == 1 else str
    if get_origin(annotation) is Literal:
        return tuple(get_args(annotation))
    return annotation if annotation in (bool, int, float, str) else str


def _help(text: str | None) -> str:
    return " ".join((text or "").split()).replace("%", "%%")  # argparse formats help with %


def task_fields(task: Task) -> list[tuple[str, Any, str]]:
    """(field, option type, help) of each params field that gets an option of its own."""
    return [(name, _option_type(info.annotation), _help(info.description))
            for name, info in task.params.model_fields.items() if name not in GENERIC]


def add_task_commands(commands: Any, tasks: Tasks, reserved: tuple[str, ...] = ()) -> None:
    """One sub-command per task of `tasks` (see the module's docstring), except those named like a
    command already there or in `reserved` (the built-in commands added later)."""
    for task in tasks:
        if task.name in commands.choices or task.name in reserved:
            continue
        parser = commands.add_parser(task.name, help=task.summary, description=f"{task.name}: {task.summary}")
        parser.add_argument("image", help="input image file")
        parser.add_argument("-o", "--output", required=True, help="where to write the result")
        names = []
        for name, kind, text in task_fields(task):
            option, dest = "--" + name.replace("_", "-"), FIELD_DEST + name
            if kind is bool:
                parser.add_argument(option, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=text)
            elif isinstance(kind, tuple):
                parser.add_argument(option, dest=dest, choices=kind, help=text)
            else:
                parser.add_argument(option, dest=dest, type=kind, metavar=METAVARS[kind], help=text)
            names.append(name)
        parser.add_argument("--format", choices=task.formats,
                            help=f"output format (default {task.formats[0]})")
        parser.add_argument("--size", metavar="auto|WxH",
                            help="the result fits inside W×H, aspect kept, never enlarged (default auto)")
        parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                            help="any other field the service takes (repeatable); the options above win")
        job = parser.add_argument_group("as a job")
        job.add_argument("--job", action="store_true", help="queue it as a job and show its progress")
        job.add_argument("--priority", choices=PRIORITIES, help="the job's priority (default normal)")
        job.add_argument("--idempotency-key", metavar="KEY",
                         help="the same key and request within a day return the first job")
        job.add_argument("--webhook-url", metavar="URL",
                         help="where the service posts the job's events (operator-allowed hosts)")
        job.add_argument("--webhook-events", metavar="EVENTS",
                         help="comma-separated: started,progress,succeeded,failed,cancelled")
        parser.set_defaults(task=task.name, task_fields=tuple(names))


def parse_sets(items: list[str]) -> dict[str, str]:
    """`--set FIELD=VALUE` items as fields; ValueError on one without `=`."""
    fields = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--set takes FIELD=VALUE, got {item!r}")
        fields[name] = value
    return fields


def request_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The fields a task command sends: `--set` ones, then the options given (None: not given)."""
    fields: dict[str, Any] = parse_sets(args.set)
    for name in args.task_fields:
        value = getattr(args, FIELD_DEST + name)
        if value is not None:
            fields[name] = value
    for name in ("format", "size"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    return fields


def _show_progress(event: dict[str, Any]) -> None:
    print("\r" + progress_line(event).ljust(70), end="", file=sys.stderr)


def follow(job: Job) -> Result:
    """A job's progress bar on stderr, then its result (ServiceError when it did not succeed)."""
    try:
        return job.wait(_show_progress)
    finally:
        print(file=sys.stderr)


def saved(result: Result, output: str) -> None:
    result.save(output)
    print(f"{output}: " + ", ".join(f"{k}={v}" for k, v in sorted(result.params.items())))


def run_task(client: Client, args: argparse.Namespace) -> int:
    """`imgserve TASK IMAGE -o OUT ...`: run it (synchronously, or with `--job` as a job) and save the result."""
    job_only = [f"--{name.replace('_', '-')}" for name in JOB_ONLY if getattr(args, name) is not None]
    if job_only and not args.job:
        print(f"imgserve: {', '.join(job_only)} only with --job", file=sys.stderr)
        return 2
    try:
        fields = request_fields(args)
    except ValueError as error:
        print(f"imgserve: {error}", file=sys.stderr)
        return 2
    if not args.job:
        saved(client.run(args.task, args.image, **fields), args.output)
        return 0
    job = client.submit(args.task, args.image, priority=args.priority, idempotency_key=args.idempotency_key,
                        webhook_url=args.webhook_url, webhook_events=args.webhook_events, **fields)
    print(f"job {job.id}" + (" (replayed: the earlier job with this Idempotency-Key)" if job.replayed else ""),
          file=sys.stderr)
    saved(follow(job), args.output)
    return 0


def add_jobs_commands(commands: Any) -> None:
    """`imgserve jobs list|show|wait|cancel`."""
    jobs = commands.add_parser("jobs", help="this key's jobs").add_subparsers(dest="jobs_command", required=True)
    listing = jobs.add_parser("list", help="jobs, newest first")
    listing.add_argument("--state", choices=JOB_STATES)
    listing.add_argument("--task", help="only jobs of this task")
    listing.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    listing.add_argument("--json", action="store_true", help="print the statuses as JSON")
    jobs.add_parser("show", help="a job's status as JSON").add_argument("id")
    wait = jobs.add_parser("wait", help="follow a job with a progress bar; save its result with -o")
    wait.add_argument("id")
    wait.add_argument("-o", "--output", help="where to write the result")
    jobs.add_parser("cancel", help="cancel a job (queued: now; running: at its next step)").add_argument("id")


def _when(seconds: float | None) -> str:
    return datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S") if seconds else "-"


def job_row(status: dict[str, Any]) -> str:
    """One line of `imgserve jobs list`: id, task, state, stage (step i/N), priority, created."""
    stage = status.get("stage") or ""
    if status.get("step") and status.get("total_steps"):
        stage += f" {status['step']}/{status['total_steps']}"
    return (f"{status['id']}  {status['task']:<8} {status['state']:<10} {stage or '-':<16} "
            f"{status.get('priority') or '-':<7} {_when(status.get('created_at'))}")


def jobs_command(client: Client, args: argparse.Namespace) -> int:
    """`imgserve jobs ...`: exit 0, or 1 when `wait` ends with a job that did not succeed."""
    if args.jobs_command == "list":
        if args.limit < 1:
            print("imgserve: --limit must be at least 1", file=sys.stderr)
            return 2
        found = list(client.all_jobs(state=args.state, task=args.task, limit=args.limit))
        if args.json:
            print(json.dumps(found, indent=2))
        else:
            for status in found:
                print(job_row(status))
        return 0
    job = client.job(args.id)
    if args.jobs_command == "show":
        print(json.dumps(job.status(), indent=2))
    elif args.jobs_command == "cancel":
        status = job.cancel()
        later = " (stops at its next step)" if status["state"] == "running" else ""
        print(f"job {status['id']}: {status['state']}{later}")
    elif args.jobs_command == "wait":
        try:
            for event in job.events():
                _show_progress(event)
        finally:
            print(file=sys.stderr)
        status = job.status()
        if status["state"] != "succeeded":
            error = status.get("error") or {}
            detail = f": {error.get('code')}: {error.get('message')}" if error else ""
            print(f"imgserve: job {job.id} {status['state']}{detail}", file=sys.stderr)
            return 1
        if args.output:
            saved(job.result(), args.output)
        else:
            print(f"job {job.id}: succeeded")
    return 0
