"""RealModel used directly, without Ray: load once, generate, determinism, parameter validation."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from deployments.errors import InvalidParameter
from deployments.preprocess import Preprocess
from deployments.real import RealModel
from deployments.real_config import RealModelConfig, RealParams


@pytest.fixture(scope="module")
def model(model_cache) -> RealModel:
    real = RealModel(RealModelConfig(source="tiny", condition_area=4096, num_threads=1), model_cache)
    assert real.pipe is None and real.loads == 0  # construction only stores config
    real.load()
    return real


def prepared(size=(96, 64), seed=0):
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    from io import BytesIO

    from PIL import Image

    buffer = BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return Preprocess().prepare(buffer.getvalue(), RealModel.input_spec)


def test_check_health_fails_before_load(model_cache) -> None:
    with pytest.raises(RuntimeError, match="not loaded"):
        RealModel(RealModelConfig(), model_cache).check_health()


def test_generate_returns_model_size_uint8_and_used_params(model: RealModel) -> None:
    result = model.generate(prepared((96, 64)), RealParams(steps=2, seed=1, cfg=3.0))
    assert result.array.shape == (64, 96, 3) and result.array.dtype == np.uint8
    assert result.array.std() > 0  # not a constant image
    assert result.params["steps"] == 2 and result.params["seed"] == 1 and result.params["cfg"] == 3.0
    assert result.params["task"] == "real"
    assert model.stats()["loads"] == 1 and model.stats()["device"] == "cpu"


def test_same_seed_same_output_different_seed_different_output(model: RealModel) -> None:
    image = prepared((64, 64), seed=3)
    first = model.generate(image, RealParams(steps=2, seed=9)).array
    again = model.generate(image, RealParams(steps=2, seed=9)).array
    other = model.generate(image, RealParams(steps=2, seed=10)).array
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


@pytest.mark.parametrize(
    "params,field",
    [
        (RealParams(steps=0), "steps"),
        (RealParams(steps=101), "steps"),
        (RealParams(cfg=math.nan), "cfg"),
        (RealParams(cfg=21.0), "cfg"),
        (RealParams(seed=2**32), "seed"),
        (RealParams(prompt="a" * 2001), "prompt"),
    ],
)
def test_out_of_range_parameters_name_the_field(model: RealModel, params, field) -> None:
    with pytest.raises(InvalidParameter) as error:
        model.generate(prepared(), params)
    assert error.value.field == field


def test_resolve_fills_defaults_and_a_seed() -> None:
    resolved = RealModelConfig(default_steps=12).resolve(RealParams())
    assert resolved.steps == 12 and resolved.cfg == 7.0 and resolved.prompt.startswith("transform")
    assert 0 <= resolved.seed < 2**32


class Clock:
    """Stands in for the `time` module that `deployments.records.Deadline` reads (`time.time()`):
    the deadline passes exactly when a test says, whatever the machine's speed."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


class Steps:
    """A progress sink that records the steps it hears; `during_first` runs while step 1 is reported."""

    def __init__(self, during_first=None) -> None:
        self.steps: list[int] = []
        self.during_first = during_first

    def stage(self, name: str) -> None:
        pass

    def step(self, step: int, total: int) -> bool:
        self.steps.append(step)
        if step == 1 and self.during_first is not None:
            self.during_first()
        return False


def test_a_deadline_stops_generation_at_the_next_step_and_is_recorded(model: RealModel, monkeypatch) -> None:
    from deployments import records
    from deployments.errors import TimedOut
    from deployments.records import Deadline

    clock = Clock()
    monkeypatch.setattr(records, "time", clock)
    # the deadline passes during step 1: the boundary after it raises, the other 5 never run
    until = clock.now + 1.0

    def pass_the_deadline() -> None:
        clock.now = until + 1.0

    heard = Steps(during_first=pass_the_deadline)
    with pytest.raises(TimedOut, match="after step 1 of 6"):
        model.generate(prepared(), RealParams(steps=6, seed=1), Deadline(until=until, limit_s=1.0, inner=heard))
    assert heard.steps == [1]  # the inner progress still heard the step that ran
    with pytest.raises(TimedOut, match="before encode_prompt"):  # already late: nothing runs
        model.generate(prepared(), RealParams(steps=6, seed=1), Deadline(until=clock.now - 1, limit_s=1.0))
    assert model.stats()["last_stop"]["reason"] == "timeout"
    # a deadline in the future changes nothing: same bytes as without one
    plain = model.generate(prepared(), RealParams(steps=2, seed=3))
    timed = model.generate(prepared(), RealParams(steps=2, seed=3), Deadline(clock.now + 600, 600))
    assert np.array_equal(plain.array, timed.array)


def test_an_out_of_memory_in_the_pipeline_fails_one_request_and_the_next_one_runs(model: RealModel) -> None:
    from deployments.errors import OutOfMemory
    from tests.serve.gate import raise_oom_once

    before = model.stats()["stops"].get("out_of_memory", 0)
    raise_oom_once(model)
    with pytest.raises(OutOfMemory, match="GPU out of memory at 96x64, 2 steps"):
        model.generate(prepared(), RealParams(steps=2, seed=1))
    assert model.stats()["stops"]["out_of_memory"] == before + 1
    assert model.stats()["last_stop"]["reason"] == "out_of_memory"
    assert model.generate(prepared(), RealParams(steps=2, seed=1)).array.shape == (64, 96, 3)


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"max_adapters_per_replica": 0}, "max_adapters_per_replica must be >= 1, got 0"),
        ({"condition_area": 0}, "condition_area must be >= 1, got 0"),
        ({"num_threads": 0}, "num_threads must be >= 1, got 0"),  # DiffusionConfig's, inherited
        ({"max_prompt_chars": 0}, "max_prompt_chars must be >= 1, got 0"),
        ({"default_steps": 1}, "default_steps must be >= 2, got 1"),
    ],
)
def test_config_minimums_are_refused_with_the_limit(fields: dict, message: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=re.escape(message)):
        RealModelConfig(**fields)
    unset = RealModelConfig(condition_area=None, num_threads=None)  # optional ones may stay unset
    assert unset.condition_area is None and unset.num_threads is None
