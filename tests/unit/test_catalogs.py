"""Catalogs where the models are, without Serve: the LoRA store lists only complete files that fit
the base; a replica fixes its default at start and reports it unusable instead of replacing it;
the ingress's orchestrator resolves from what replicas report, reads them again once for a name it
does not know, and never reads a model directory."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from deployments import metrics
from deployments.errors import InvalidParameter, Unavailable
from deployments.lora import TINY_VERSIONS, LoraStore, ensure_tiny_loras
from deployments.real import RealModel
from deployments.real_config import RealModelConfig, RealParams
from deployments.task import Catalog
from serve_app.catalogs import Catalogs, Report, Reporter, replica_report
from serve_app.config import AppConfig
from serve_app.orchestrator import Orchestrator
from tests.conftest import demo_args

A, B, C = TINY_VERSIONS


# -- the store: complete files only -------------------------------------------------------------------
def test_a_file_is_a_version_once_two_scans_find_it_unchanged_and_its_header_is_whole(tmp_path: Path) -> None:
    data = (ensure_tiny_loras(tmp_path / "cache") / f"{A}.safetensors").read_bytes()
    directory = tmp_path / "loras"
    directory.mkdir()
    store = LoraStore(directory, rescan_s=3600, settle_s=0)
    target = directory / f"{A}.safetensors"
    target.write_bytes(data[: len(data) // 3])
    assert store.scan() == [] and "new" in store.pending[A]
    target.write_bytes(data[: len(data) // 2])  # still growing
    assert store.scan() == [] and "still being written" in store.pending[A]
    assert store.scan() == []  # stopped growing, but cut short: its header does not cover the file
    assert A not in store.pending and "not a readable .safetensors file" in store.problems[A]
    with pytest.raises(InvalidParameter, match=f"{A} is not usable: not a readable"):
        store.path(A)
    target.write_bytes(data)
    store.scan()
    assert store.scan() == [A] and not store.problems and store.path(A) == target


def test_settle_waits_between_its_two_scans_so_a_complete_file_is_listed_at_start(tmp_path: Path) -> None:
    directory = ensure_tiny_loras(tmp_path)
    store = LoraStore(directory, settle_s=0.05)
    started = time.monotonic()
    assert store.settle() == list(TINY_VERSIONS)
    assert time.monotonic() - started >= 0.05


def test_the_replicas_check_refuses_a_file_that_does_not_fit_its_base(tmp_path: Path) -> None:
    directory = tmp_path / "loras"
    directory.mkdir()
    save_file({"transformer.no_such_block.to_q.lora_A.weight": np.zeros((4, 8), np.float32),
               "transformer.no_such_block.to_q.lora_B.weight": np.zeros((8, 4), np.float32)},
              str(directory / "v9.safetensors"))
    store = LoraStore(directory, settle_s=0, check=lambda path: ["does not fit the base"])
    assert store.settle() == [] and store.problems == {"v9": "does not fit the base"}


# -- the replica: its default and its report ------------------------------------------------------------
@pytest.fixture(scope="module")
def replica(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[RealModel, Path]:
    directory = tmp_path_factory.mktemp("replica-loras")
    source = ensure_tiny_loras(model_cache)
    for version in (A, B):
        (directory / f"{version}.safetensors").write_bytes((source / f"{version}.safetensors").read_bytes())
    config = RealModelConfig(condition_area=4096, num_threads=1, lora_dir=str(directory), lora_rescan_s=0,
                             lora_settle_s=0, max_adapters_per_replica=2)
    model = RealModel(config, model_cache)
    model.load()
    return model, directory


def test_the_default_is_the_newest_complete_version_at_start_and_stays_so(replica, model_cache: Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    model, directory = replica
    assert model.default_lora == B
    (directory / f"{C}.safetensors").write_bytes((ensure_tiny_loras(model_cache) / f"{C}.safetensors").read_bytes())
    model.catalog()  # first sight of the new file
    catalog = model.catalog()
    assert catalog.names == (A, B, C) and catalog.default == B  # newer, listed, not the default
    assert model.config.resolve(RealParams(), catalog).lora == B
    with caplog.at_level(logging.INFO, logger="imgserve"):
        model.fix_default()
    assert "default LoRA version" in caplog.text and repr(C) in caplog.text  # a restart takes the newest
    model.default_lora = B


def test_an_unusable_default_is_reported_kept_in_memory_and_never_silently_replaced(replica, model_cache: Path,
                                                                                     caplog) -> None:
    model, directory = replica
    (directory / f"{C}.safetensors").write_bytes((ensure_tiny_loras(model_cache) / f"{C}.safetensors").read_bytes())
    model.catalog()
    model.ensure_adapter(B)
    model.ensure_adapter(A)  # both resident, B the least recently used
    saved = (directory / f"{B}.safetensors").read_bytes()
    (directory / f"{B}.safetensors").unlink()
    try:
        with caplog.at_level(logging.WARNING, logger="imgserve"), metrics.capture() as records:
            catalog = model.catalog()
        assert catalog.default == B and catalog.default_problem == "no such file"
        assert "is not usable" in caplog.text
        assert ("imgserve_lora_default_usable", 0, {"version": B}) in records  # the metric says so too
        assert model.config.resolve(RealParams(), catalog).lora == B  # still the default
        model.ensure_adapter(C)  # the LRU would evict B; while its file is unusable A goes instead
        assert list(model.adapters.versions) == [B, C]
        model.adapters.versions.pop(B)  # once it is gone from memory too: 503, not a silent base-only run
        with pytest.raises(Unavailable, match="cannot be loaded"):
            model.ensure_adapter(B)
    finally:
        (directory / f"{B}.safetensors").write_bytes(saved)
    model.catalog()
    with metrics.capture() as records:
        assert model.catalog().default_problem is None
    assert ("imgserve_lora_default_usable", 1, {"version": B}) in records
    report = replica_report(model)
    assert report.catalog.names[:2] == (A, B) and report.replica == model.replica


def test_a_reporter_sends_at_start_and_then_every_interval() -> None:
    sent: list[Report] = []
    reporter = Reporter(lambda: Report("r", time.time(), Catalog(("x",), "x")), sent.append, every_s=0.01).start()
    assert len(sent) == 1  # at once: the ingress knows the replica's catalog once it is up
    deadline = time.monotonic() + 10
    while len(sent) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    reporter.stop()
    assert len(sent) >= 3


# -- the ingress: what replicas report, never the disk ------------------------------------------------------
class Board:
    """The reports as the cluster store would return them, with a count of reads."""

    def __init__(self) -> None:
        self.reports: dict[str, list[Report]] = {}
        self.reads = 0

    def __call__(self, deployment: str) -> list[Report]:
        self.reads += 1
        return self.reports.get(deployment, [])


@pytest.fixture
def ingress(tmp_path: Path) -> tuple[Orchestrator, Board]:
    args = demo_args()
    args["cache_dir"] = str(tmp_path)
    args["real"]["lora_dir"] = str(tmp_path / "only-on-the-workers")  # never created here
    args["anime"]["styles_dir"] = str(tmp_path / "only-on-the-workers" / "styles")
    config = AppConfig.model_validate(args)
    orchestrator = Orchestrator(config.tasks, config.sections(), config.preprocess, tmp_path, handles=None)
    board = Board()
    orchestrator.catalogs = Catalogs({"real": "RealModel", "anime": "AnimeModel"}, board, ttl_s=3600)
    return orchestrator, board


def test_the_ingress_lists_and_checks_what_replicas_report(ingress) -> None:
    orchestrator, board = ingress
    assert orchestrator.tasks["real"].catalog is None  # nothing reported: names checked by form only
    assert asyncio.run(orchestrator.validate("real", {"lora": "v7"})).params.lora == "v7"
    with pytest.raises(InvalidParameter, match="not a version name"):
        orchestrator.resolve("real", {"lora": "../x"})
    board.reports["RealModel"] = [Report("r1", time.time(), Catalog((A, B), B, {C: "still being written"}))]
    board.reports["AnimeModel"] = [Report("r2", time.time(), Catalog(("paprika",), "paprika"))]
    orchestrator.catalogs = Catalogs(orchestrator.catalogs.deployments, board, ttl_s=3600)  # a later start
    asyncio.run(orchestrator.refresh())
    assert orchestrator.model_ids() == ["real", f"real:{A}", f"real:{B}", "anime", "anime:paprika", "layers"]
    assert orchestrator.resolve("real", {}).params.lora == B
    with pytest.raises(InvalidParameter, match=f"{C} is not usable: still being written") as error:
        orchestrator.resolve("real", {"lora": C})
    assert error.value.field == "lora"
    with pytest.raises(InvalidParameter, match="available: paprika"):
        orchestrator.resolve("anime", {"style": "hayao"})


def test_an_unknown_name_reads_the_reports_again_once(ingress) -> None:
    orchestrator, board = ingress
    board.reports["RealModel"] = [Report("r1", time.time(), Catalog((A,), A))]
    asyncio.run(orchestrator.refresh(fresh=True))
    reads = board.reads
    assert asyncio.run(orchestrator.validate("real", {})).params.lora == A  # within the TTL: no read
    assert board.reads == reads
    board.reports["RealModel"] = [Report("r1", time.time(), Catalog((A, B), A))]  # B added on the workers
    orchestrator.catalogs._read["real"] = (time.monotonic() - 2, orchestrator.catalogs._read["real"][1])
    assert asyncio.run(orchestrator.validate("real", {"lora": B})).params.lora == B
    assert board.reads == reads + 1
    with pytest.raises(InvalidParameter, match="unknown LoRA version 'v9'"):
        asyncio.run(orchestrator.validate("real", {"lora": "v9"}))
    assert board.reads == reads + 1  # read again at most once a second: a flood of bad names reads nothing
