"""A task is one unit: the registry, each task's definition, the config built from a registry (a leaf
that imports no runtime), the OpenAPI fields derived from a task's params and limits, and one
model scaffold (the same `stats()` shape for every model, settings decided on the model thread)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from pydantic import BaseModel, ValidationError

from deployments.anime import AnimeModel
from deployments.layers import LayersModel
from deployments.model import Model
from deployments.postprocess import MEDIA_TYPES
from deployments.real import RealModel
from deployments.records import Prepared, PreparedImage
from deployments.errors import InvalidParameter
from deployments.task import SIZE_PATTERN, Catalog, Task, Tasks, parse_size
from deployments.tasks import TASKS
from serve_app.config import AppConfig, config_model, load_config
from tests.conftest import REPO, demo_args, run_fresh
from tests.extra_task import GRAY, GrayModel, GrayParams, GraySection

COMMON_STATS = {"pid", "cuda_visible_devices", "replica", "device", "dtype", "plan", "loads", "stops", "last_stop"}


def test_the_built_in_tasks_are_real_anime_layers_each_one_consistent_unit() -> None:
    assert TASKS.names == ("real", "anime", "layers")
    for task in TASKS:
        assert issubclass(task.model, Model) and task.model.task == task.name and task.deployment == task.model.__name__
        assert isinstance(task.section(), task.model.config_class)
        assert set(task.formats) <= set(MEDIA_TYPES) and task.formats
        assert task.params.model_config["extra"] == "forbid"  # unknown fields are refused by name
        assert set(task.headers) <= set(task.params.model_fields) | {"layer_size", "adapters"}  # the model's own
    assert list(AppConfig.model_fields) == ["name", "cache_dir", "ingress", "preprocess", "postprocess", "jobs", "text_encoder",
                                            *TASKS.names]


def test_a_registry_refuses_names_that_collide() -> None:
    with pytest.raises(ValueError, match="unique"):
        Tasks(GRAY, GRAY)
    for name in ("jobs", "models", "images", "status", "not a name"):
        with pytest.raises(ValueError, match="identifier and not a route"):
            Tasks(Task(name=name, summary="", model=GrayModel, params=GrayParams, section=GraySection))
    assert TASKS.plus(GRAY).names == ("real", "anime", "layers", "gray") and "gray" not in TASKS
    assert TASKS.choices_text() == "real, anime or layers"


def test_an_extra_task_gets_its_own_config_section_and_only_its_registry_accepts_it() -> None:
    tasks = TASKS.plus(GRAY)
    config = load_config({**demo_args(), "gray": {"default_amount": 0.5, "serve": {"num_replicas": 2}}}, tasks)
    assert config.section("gray").default_amount == 0.5 and config.gray.serve_options()["num_replicas"] == 2
    assert list(config.sections()) == ["real", "anime", "layers", "gray"]
    assert config_model(tasks) is type(config)  # built once per registry
    with pytest.raises(ValidationError, match="gray"):
        load_config({"gray": {}})  # the built-in registry has no such section
    with pytest.raises(ValidationError, match="default_amount"):
        load_config({"gray": {"default_amount": "lots"}}, tasks)


def test_openapi_fields_come_from_the_params_model_and_the_sections_limits(tmp_path: Path) -> None:
    args = demo_args()
    args["real"].update(max_steps=12, default_steps=5, lora_dir="tiny")
    config = load_config({**args, "cache_dir": str(tmp_path)})
    for task in TASKS:
        fields = task.configured(config.section(task.name)).field_schemas()
        assert list(fields) == [*task.params.model_fields, "size", "format"]
        for name, field in task.params.model_fields.items():
            assert fields[name]["description"] == " ".join(field.description.split())
        assert fields["format"] == {"type": "string", "enum": list(task.formats), "default": task.formats[0]}
        assert fields["size"]["pattern"] == SIZE_PATTERN and fields["size"]["default"] == "auto"
    reported = Catalog(tuple(config.real.lora_store(tmp_path).settle()), "v2511-0823")  # as a replica reports it
    real = TASKS["real"].configured(config.real, reported).field_schemas()
    assert real["steps"] == {**real["steps"], "type": "integer", "minimum": 2, "maximum": 12, "default": 5}
    assert real["cfg"]["type"] == "number" and real["prompt"]["maxLength"] == config.real.max_prompt_chars
    assert real["lora"]["enum"] == ["none", "v2511-0715", "v2511-0801", "v2511-0823"]
    layers = TASKS["layers"].configured(config.layers).field_schemas()
    assert layers["resolution"]["enum"] == [640, 1024] and layers["cfg_normalize"]["type"] == "boolean"
    gray = GRAY.configured(GraySection(default_amount=0.25)).field_schemas()
    assert gray["amount"] == {"type": "number", "description": "How far towards gray: 0 keeps the colours, 1 is fully gray.",
                              "minimum": 0.0, "maximum": 1.0, "default": 0.25}


def test_the_config_and_the_offline_commands_import_no_runtime(model_cache: Path, tmp_path: Path) -> None:
    from deployments.lora import ensure_tiny_loras

    document = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    document["applications"][0]["args"]["cache_dir"] = str(model_cache)
    config = tmp_path / "demo.yaml"
    config.write_text(yaml.safe_dump(document))
    lora = ensure_tiny_loras(model_cache) / "v2511-0715.safetensors"
    out = run_fresh(f"""
        import contextlib, io, json, sys
        import serve_app.config
        report = {{"config": sorted(m for m in ("ray", "fastapi", "starlette") if m in sys.modules)}}
        from serve_app import cli
        for argv in (["plan", "--task", "real", "--gpus", "1x24"], ["kuberay", {str(config)!r}],
                     ["lora", "inspect", "--config", {str(config)!r}, {str(lora)!r}]):
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                report[argv[0]] = [cli.main(argv), printed.getvalue()[:40]]
        report["commands"] = sorted(m for m in ("ray", "fastapi", "starlette") if m in sys.modules)
        print(json.dumps(report))
    """)
    report = json.loads(out.splitlines()[-1])
    assert report["config"] == [] and report["commands"] == []
    assert report["plan"][0] == 0 and report["plan"][1].startswith("plan: real")
    assert report["kuberay"][0] == 0 and report["kuberay"][1].startswith("# Generated by `imgserve kuberay")
    assert report["lora"][0] == 0 and report["lora"][1].startswith("file:")  # it fits: exit 0


@pytest.mark.parametrize("section, field", [("real", "condition_area"), ("layers", "tiny_edge")])
def test_demo_only_knobs_are_refused_for_a_real_model(section: str, field: str) -> None:
    args = demo_args()
    args[section]["source"] = "/models/qwen"
    args[section][field] = 64
    with pytest.raises(ValidationError) as error:
        load_config(args)
    message = error.value.errors()[0]["msg"]
    assert f"{section}.{field} (64) is for the tiny demo models only" in message and "/models/qwen" in message


def _prepared(size: tuple[int, int] = (48, 32)) -> Prepared:
    array = np.zeros((size[1], size[0], 3), np.uint8)
    array[..., 0] = 200
    return Prepared(array, PreparedImage(size, size, size, 1.0, "PNG", "RGB"))


def test_every_model_reports_stats_in_one_shape_and_runs_on_its_model_thread(model_cache: Path) -> None:
    threads = torch.get_num_threads()
    models = [RealModel(load_config(demo_args()).real, model_cache), LayersModel(None, model_cache),
              AnimeModel(load_config(demo_args()).anime, model_cache), GrayModel(GraySection(num_threads=1))]
    try:
        for model in models:
            with pytest.raises(RuntimeError, match="not loaded"):
                model.check_health()
            model.load()
            model.check_health()
            stats = model.stats()
            assert COMMON_STATS <= set(stats), (type(model).__name__, sorted(stats))
            assert stats["loads"] == 1 and stats["device"] == "cpu" and stats["dtype"] == "float32"
            assert stats["stops"] == {} and stats["plan"] is None
        gray = models[-1]
        assert asyncio.run(gray.on_model_thread(torch.get_num_threads)) == 1  # decided on the model thread
        result = gray.generate(_prepared(), GrayParams())
        assert result.params == {"task": "gray", "amount": 1.0} and np.ptp(result.array, axis=2).max() == 0
    finally:
        torch.set_num_threads(threads)


def test_params_models_are_strict_and_documented() -> None:
    for task in [*TASKS, GRAY]:
        assert issubclass(task.params, BaseModel)
        for name, field in task.params.model_fields.items():
            assert field.description, f"{task.name}.{name} has no docstring"
            assert field.default is None, f"{task.name}.{name}: None must mean the configured default"


@pytest.mark.parametrize(("text", "size"), [("auto", None), ("512x384", (512, 384)), ("64x16", (64, 16)),
                                            ("1024x1024", (1024, 1024)), ("16x1024", (16, 1024))])
def test_size_is_auto_or_width_x_height(text: str, size: tuple[int, int] | None) -> None:
    assert parse_size(text, 1024) == size


@pytest.mark.parametrize("text", ["512", "512x", "x512", "512*512", "-16x16", "16x16x16", "0x512", "512x0", "15x512",
                                  "512x15", "1025x16", "16x1025", "99999x99999", "1e3x16", "５１２x512", "none", "", "AUTO",
                                  " auto", "64X64", "64x64 ", "0512x512"])
def test_size_outside_16_to_the_long_edge_limit_or_not_wxh_is_refused_naming_size(text: str) -> None:
    with pytest.raises(InvalidParameter) as error:
        parse_size(text, 1024)
    assert error.value.field == "size" and error.value.message


def test_size_is_a_generic_field_every_task_resolves_and_keeps(tmp_path: Path) -> None:
    config = load_config({**demo_args(), "cache_dir": str(tmp_path)})
    for task in [*TASKS, GRAY]:
        section = config.section(task.name) if task.name in config.sections() else GraySection()
        configured = task.configured(section)
        assert configured.resolve({}).size is None and "size" not in configured.resolve({}).fields()
        resolved = configured.resolve({"size": "256x128"}, max_edge=512)
        assert resolved.size == (256, 128) and resolved.fields()["size"] == "256x128"
        assert configured.resolve(resolved.fields(), max_edge=512) == resolved  # what a job stores runs the same
        with pytest.raises(InvalidParameter, match="between 16 and 512") as error:
            configured.resolve({"size": "1024x1024"}, max_edge=512)
        assert error.value.field == "size"


def test_a_task_names_the_field_its_model_ids_choose(tmp_path: Path) -> None:
    args = demo_args()
    args["real"]["lora_dir"] = "tiny"
    config = load_config({**args, "cache_dir": str(tmp_path)})
    versions = Catalog(tuple(config.real.lora_store(tmp_path).settle()), "v2511-0823")  # as a replica reports it
    real = TASKS["real"].configured(config.real, versions)
    assert real.section.choice_field == "lora" and "lora" in TASKS["real"].params.model_fields
    assert real.section.choices(real.catalog) == ["v2511-0715", "v2511-0801", "v2511-0823"]  # `none` is the field's
    assert real.section.choices(None) == []  # nothing reported: no ids of versions
    anime = TASKS["anime"].configured(config.anime, Catalog(tuple(config.anime.styles()), config.anime.default_style))
    assert anime.section.choice_field == "style" and "style" in TASKS["anime"].params.model_fields
    assert anime.section.choices(anime.catalog) == config.anime.styles()
    layers = TASKS["layers"].configured(config.layers)
    assert layers.section.choice_field is None and layers.section.choices(layers.catalog) == []
    assert GraySection.choice_field is None  # the default: a task without a catalog
