"""The dependency contract: pyproject.toml's floors keep out releases with known vulnerabilities, the
hashed locks in requirements/ pin everything `make demo`/`make test` install except torch (pinned by
version in scripts/setup.sh), and the serving path (deployments/, serve_app/ but the converter)
reads model weights from safetensors only: nothing in it unpickles, and every weights loader asks
for safetensors."""

from __future__ import annotations

import ast
import re
import shutil
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
LOCKS = ROOT / "requirements"

VULNERABLE = {
    "torch": ["2.5.1", "2.9.1"],  # weights_only bypasses: CVE-2025-32434 (< 2.6), CVE-2026-24747 (< 2.10)
    "starlette": ["0.39.2", "0.47.1", "0.49.0", "1.0.0", "1.3.0"],  # multipart/Range/Host/form DoS
    "fastapi": ["0.109.0", "0.136.3"],  # CVE-2024-24762; MAL-2026-4750
    "python-multipart": ["0.0.17", "0.0.21", "0.0.26", "0.0.30"],  # fixed in 0.0.18 … 0.0.31
    "pillow": ["12.1.0"],  # CVE-2026-25990
}
"""Releases pyproject.toml's comment names as vulnerable: its ranges must admit none of them."""
MACHINE_SPECIFIC = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")
"""torch's wheel and the CUDA packages it pulls differ per machine: never in a lock."""
CONVERTER = ROOT / "serve_app" / "convert.py"
"""The one module that unpickles: published .pt files, ahead of serving, in a child process."""


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirements(extra: str | None = None) -> dict[str, Requirement]:
    declared = project()["project"]
    listed = declared["dependencies"] if extra is None else declared["optional-dependencies"][extra]
    return {canonicalize_name(r.name): r for r in map(Requirement, listed)}


def read_lock(name: str) -> dict[str, tuple[Version, frozenset[str]]]:
    """{package: (version, hashes)} of requirements/NAME.txt; fails on any line that is not
    `package==version` with sha256 hashes (pip's --require-hashes would refuse it too)."""
    text = (LOCKS / f"{name}.txt").read_text().replace("\\\n", " ")
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        found = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})+)", line)
        assert found, f"requirements/{name}.txt: not a hashed pin: {line[:120]}"
        pins[canonicalize_name(found.group(1))] = (Version(found.group(2)),
                                                   frozenset(re.findall(r"[0-9a-f]{64}", found.group(3))))
    return pins


def setup_torch_version() -> str:
    found = re.search(r"^TORCH_VERSION=(\S+)$", (ROOT / "scripts" / "setup.sh").read_text(), re.M)
    assert found, "scripts/setup.sh pins no TORCH_VERSION"
    return found.group(1)


# -- floors and locks ------------------------------------------------------------------------------
@pytest.mark.parametrize("package", sorted(VULNERABLE))
def test_pyproject_ranges_admit_no_known_vulnerable_release(package: str) -> None:
    requirement = requirements()[package]
    admitted = [v for v in VULNERABLE[package] if requirement.specifier.contains(v, prereleases=True)]
    assert not admitted, f"pyproject.toml `{requirement}` admits vulnerable {package} {admitted}"


def test_the_locks_and_setup_install_only_releases_above_the_floors() -> None:
    test_lock = read_lock("test")
    for package, bad in VULNERABLE.items():
        version = Version(setup_torch_version()) if package == "torch" else test_lock[package][0]
        assert version > max(map(Version, bad)), f"{package} {version} is pinned"
        assert requirements()[package].specifier.contains(version), f"{package} {version} is outside pyproject"


@pytest.mark.parametrize("name, extras", [("base", ()), ("test", ("test",)), ("gpu", ("gpu",))])
def test_each_lock_pins_with_hashes_what_pyproject_asks_for(name: str, extras: tuple[str, ...]) -> None:
    lock = read_lock(name)
    wanted = {} if name == "gpu" else dict(requirements())
    if name != "gpu":
        build = [Requirement(r) for r in project()["build-system"]["requires"]]  # setup.sh installs without build isolation
        wanted.update({canonicalize_name(r.name): r for r in build})
    for extra in extras:
        wanted.update(requirements(extra))
    for package, requirement in wanted.items():
        if MACHINE_SPECIFIC.match(package):
            continue
        assert package in lock, f"requirements/{name}.txt does not pin {package} (pyproject: {requirement})"
        version, hashes = lock[package]
        assert requirement.specifier.contains(version, prereleases=True), f"{package} {version} vs {requirement}"
        assert hashes, package
    held = sorted(p for p in lock if MACHINE_SPECIFIC.match(p))
    assert not held, f"requirements/{name}.txt pins machine-specific {held}: setup.sh installs torch itself"


def test_demo_installs_the_versions_ci_tested_without_the_test_tools() -> None:
    base, test = read_lock("base"), read_lock("test")
    differing = sorted(p for p in base if test.get(p) != base[p])
    assert not differing, f"requirements/base.txt and test.txt pin {differing} differently"
    assert "pytest" in test and "pytest" not in base
    assert set(read_lock("gpu")).isdisjoint(test)  # gpu.txt adds to a lock, never re-pins


def test_the_locks_say_how_they_are_made_and_make_lock_makes_them() -> None:
    for name in ("base", "test", "gpu"):
        header = (LOCKS / f"{name}.txt").read_text()[:1200]
        assert "#    make lock" in header and "--require-hashes" in header, name
    assert re.search(r"^lock:\n\tscripts/setup\.sh lock$", (ROOT / "Makefile").read_text(), re.M)


# -- safetensors only in the serving path ----------------------------------------------------------
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "marshal", "shelve"}
UNPICKLING_CALLS = {"torch.load", "torch.jit.load", "torch.serialization.load", "pickle.load", "pickle.loads",
                    "pickle.Unpickler", "cloudpickle.load", "cloudpickle.loads", "dill.load", "dill.loads",
                    "joblib.load", "numpy.load", "np.load"}
NO_WEIGHTS = re.compile(r"(Config|Processor|Tokenizer|Scheduler)$")
"""`from_pretrained` of these reads JSON and tokenizer files, never weights."""


def dotted(node: ast.AST) -> str:
    """`torch.jit.load` for the expression torch.jit.load; '' for anything that is not a name chain."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = dotted(node.value)
        return f"{inner}.{node.attr}" if inner else node.attr
    return ""


def unpickling(tree: ast.AST) -> list[str]:
    """Where ``tree`` imports a pickle module or calls something that unpickles (line: what)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"{node.lineno}: import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in PICKLE_MODULES or (
                    node.module in ("torch", "torch.serialization") and any(a.name == "load" for a in node.names)):
                found.append(f"{node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = dotted(node.func)
            keywords = {k.arg: k.value for k in node.keywords}
            allow_pickle = keywords.get("allow_pickle")
            numpy_arrays_only = name in ("np.load", "numpy.load") and not (
                isinstance(allow_pickle, ast.Constant) and allow_pickle.value)  # numpy's default refuses pickles
            if name in UNPICKLING_CALLS and not numpy_arrays_only:
                found.append(f"{node.lineno}: {name}()")
            weights_only = keywords.get("weights_only")
            if isinstance(weights_only, ast.Constant) and weights_only.value is False:
                found.append(f"{node.lineno}: weights_only=False")
    return found


def loaders_without_safetensors(tree: ast.AST) -> list[str]:
    """`from_pretrained` calls that may read weights but do not pass use_safetensors=True, and any
    save with safe_serialization=False (line: what)."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        keywords = {k.arg: k.value for k in node.keywords}
        safe = keywords.get("use_safetensors")
        receiver = dotted(node.func.value)
        if (node.func.attr == "from_pretrained" and not NO_WEIGHTS.search(receiver)
                and not (isinstance(safe, ast.Constant) and safe.value is True)):
            found.append(f"{node.lineno}: {receiver or '(...)'}.from_pretrained without use_safetensors=True")
        serialization = keywords.get("safe_serialization")
        if isinstance(serialization, ast.Constant) and serialization.value is False:
            found.append(f"{node.lineno}: safe_serialization=False")
    return found


def serving_modules() -> list[Path]:
    files = sorted((ROOT / "deployments").rglob("*.py")) + sorted((ROOT / "serve_app").rglob("*.py"))
    return [f for f in files if f != CONVERTER]


def test_the_scanners_find_what_they_look_for() -> None:
    sample = ast.parse("import torch, pickle\nfrom torch import load\nimport numpy as np\n"
                       "torch.load(p, weights_only=False)\nnp.load(p, allow_pickle=True)\nnp.load(p)\n"
                       "DiffusionPipeline.from_pretrained(d)\nAutoConfig.from_pretrained(d)\n"
                       "pipeline_class(k).from_pretrained(d, use_safetensors=True)\n"
                       "pipe.save_pretrained(d, safe_serialization=False)\n")
    assert unpickling(sample) == ["1: import pickle", "2: from torch import ...", "4: torch.load()",
                                  "4: weights_only=False", "5: np.load()"]
    assert loaders_without_safetensors(sample) == ["7: DiffusionPipeline.from_pretrained without use_safetensors=True",
                                                   "10: safe_serialization=False"]


def test_nothing_in_the_serving_path_unpickles_or_loads_weights_but_from_safetensors() -> None:
    problems = []
    for path in serving_modules():
        tree = ast.parse(path.read_text())
        problems += [f"{path.relative_to(ROOT)}:{where}" for where in unpickling(tree) + loaders_without_safetensors(tree)]
    assert not problems, "the serving path reads weights from safetensors only:\n" + "\n".join(problems)
    # The converter is the one exception, and it keeps torch's restricted unpickler.
    assert "torch.load(source, map_location=\"cpu\", weights_only=True)" in CONVERTER.read_text()


@pytest.mark.parametrize("component, checkpoint", [("transformer", "diffusion_pytorch_model"),
                                                   ("text_encoder", "model")])
def test_a_pipeline_component_with_only_a_pickled_checkpoint_is_refused(
        tmp_path: Path, model_cache: Path, component: str, checkpoint: str) -> None:
    import torch
    from safetensors.torch import load_file

    from deployments import tiny
    from deployments.checkpoints import load_pipeline

    directory = tmp_path / "checkout"
    shutil.copytree(tiny.ensure_tiny("edit", model_cache), directory)
    load_pipeline("edit", directory)  # as prepared: safetensors everywhere
    weights = directory / component / f"{checkpoint}.safetensors"
    pickled = weights.with_name(("pytorch_model" if component == "text_encoder" else checkpoint) + ".bin")
    torch.save(load_file(str(weights)), pickled)  # what an old checkout, or a tampered one, would hold
    weights.unlink()
    with pytest.raises(OSError, match=r"\.safetensors"):
        load_pipeline("edit", directory)
