"""LoRA files for `real`: a store of versions in a directory, and an inspector that checks a file
against the base transformer before anything is loaded into it.

The store lists complete `*.safetensors` files (size and time unchanged across two scans, header
checked) as versions named after their stems, ordered by the numbers in their names
(`v2511-0715 < v2511-0801 < v2511-0823`), rescanning the directory when asked for an unknown name
or after a short interval, so a file dropped in appears without a restart and a file still being
copied never does. Names are never paths. The inspector reads only the safetensors header (never pickle) and reports the key
format (diffusers/PEFT, `.default.`, kohya, ComfyUI/ai-toolkit, bare), ranks, alphas, target modules
and, given the base transformer's Linear shapes, every key that has no module or whose shape does
not fit. Knows nothing about Ray, HTTP or pipelines.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from deployments.cachedir import build_once
from deployments.errors import InvalidParameter

NONE = "none"
"""The version name that means "the base model alone"."""
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._+-]{0,127}\Z")  # \Z: "$" would admit a trailing newline
_NUMBER = re.compile(r"\d+")

# key suffix → (role, how it names the pair); role A = down projection (r, in), B = up (out, r)
_ROLES = (
    (".lora_A.default.weight", "A"),
    (".lora_B.default.weight", "B"),
    (".lora_A.weight", "A"),
    (".lora_B.weight", "B"),
    (".lora.down.weight", "A"),
    (".lora.up.weight", "B"),
    (".lora_down.weight", "A"),
    (".lora_up.weight", "B"),
    (".alpha", "alpha"),
)
_UNSUPPORTED = {"lokr_": "LoKr", "hada_": "LoHa", ".oft_": "OFT", "boft_": "BOFT"}


def version_key(name: str) -> tuple:
    """Sort key: the numbers in the name compared as numbers, then the name itself."""
    return tuple(int(n) for n in _NUMBER.findall(name)), name


def check_name(name: str, field_name: str = "lora") -> str:
    """`name` if it is a plain version name; refuses anything path-like."""
    if not _NAME.match(name) or ".." in name:
        raise InvalidParameter(f"{name[:80]!r} is not a version name (letters, digits, . _ + -; no paths)", field_name)
    return name


# -- the store -----------------------------------------------------------------------------------
class LoraStore:
    """The versions in one directory of `.safetensors` files: only complete, readable ones.

    A file becomes a version once two scans at least `settle_s` apart saw the same size and
    modification time (a copy in progress keeps changing them) and its header passes `check` (by
    default: a readable safetensors header holding LoRA pairs; the replica passes a check against
    its base). Until then it is `pending`; a file that fails the check is in `problems`. Checks are
    cached per (size, mtime), so a rescan reads only new or changed headers.
    """

    def __init__(self, directory: Path | str, rescan_s: float = 10.0, settle_s: float = 1.0,
                 check: Callable[[Path], list[str]] | None = None) -> None:
        self.directory = Path(directory).expanduser()
        self.rescan_s = rescan_s
        self.settle_s = settle_s
        self.check = check or (lambda path: inspect_lora(path).problems)
        self.pending: dict[str, str] = {}
        """Files not (yet) listed because their size or time still changed: name → why."""
        self.problems: dict[str, str] = {}
        """Complete files that are not usable versions: name → why (the header's problems)."""
        self._files: dict[str, Path] = {}
        self._seen: dict[str, tuple[int, int, float]] = {}  # name → (size, mtime_ns, first seen so)
        self._checked: dict[tuple[str, int, int], list[str]] = {}
        self._scanned_at = float("-inf")
        self._lock = threading.Lock()  # the model thread and the catalog reporter both rescan

    def scan(self) -> list[str]:
        """Re-read the directory; returns the versions in order."""
        with self._lock:
            return self._scan()

    def _scan(self) -> list[str]:
        now = time.monotonic()
        files, seen, pending, problems = {}, {}, {}, {}
        for name, path in self._candidates().items():
            try:
                stat = path.stat()
            except OSError:  # removed between the listing and here
                continue
            signature = (stat.st_size, stat.st_mtime_ns)
            earlier = self._seen.get(name)
            since = earlier[2] if earlier is not None and earlier[:2] == signature else now
            seen[name] = (*signature, since)
            if since == now or now - since < self.settle_s:
                pending[name] = "still being written (its size or time changed since the last scan)" \
                    if earlier is not None else "new: listed once a second scan finds its size unchanged"
                continue
            key = (name, *signature)
            if key not in self._checked:
                self._checked[key] = self.check(path)
            if self._checked[key]:
                problems[name] = "; ".join(self._checked[key])[:500]
            else:
                files[name] = path
        self._files, self._seen, self.pending, self.problems = files, seen, pending, problems
        self._checked = {key: value for key, value in self._checked.items() if key[0] in seen}
        self._scanned_at = now
        return self.versions(rescan=False)

    def settle(self) -> list[str]:
        """Two scans `settle_s` apart (a replica's start): files complete now are listed at once."""
        self.scan()
        if self.pending:
            time.sleep(self.settle_s)
            self.scan()
        return self.versions(rescan=False)

    def _candidates(self) -> dict[str, Path]:
        if not self.directory.is_dir():
            return {}
        return {path.stem: path for path in self.directory.iterdir()
                if path.suffix == ".safetensors" and _NAME.match(path.stem) and path.is_file()}

    def versions(self, rescan: bool = True) -> list[str]:
        """Versions in numeric order; rescans when the last scan is older than `rescan_s`."""
        if rescan and time.monotonic() - self._scanned_at > self.rescan_s:
            self.settle() if self._scanned_at == float("-inf") else self.scan()
        return sorted(self._files, key=version_key)

    def newest(self) -> str | None:
        versions = self.versions()
        return versions[-1] if versions else None

    def usable(self, version: str) -> str | None:
        """None when `version` is a listed version now; else why not (after a rescan)."""
        self.versions()
        if version in self._files:
            return None
        return self.problems.get(version) or self.pending.get(version) or "no such file"

    def path(self, version: str) -> Path:
        """The file of `version`; rescans once for an unknown name, then refuses listing the valid ones."""
        check_name(version)
        if version not in self._files:
            self.versions() if self._scanned_at == float("-inf") else self.scan()
        if version not in self._files:
            valid = ", ".join([NONE, *self.versions(rescan=False)])
            why = self.problems.get(version) or self.pending.get(version)
            detail = f" ({version} is {'not usable: ' if version in self.problems else ''}{why})" if why else ""
            raise InvalidParameter(f"unknown LoRA version {version!r}{detail}; valid: {valid}"[:800], "lora")
        return self._files[version]


# -- the inspector -------------------------------------------------------------------------------
@dataclass
class LoraReport:
    """What a LoRA file holds, and whether it fits a base transformer."""

    path: str
    size_bytes: int
    format: str
    """diffusers | peft-default | kohya | comfyui | bare | unsupported"""
    targets: dict[str, dict] = field(default_factory=dict)
    """module path → {"A": shape, "B": shape, "alpha": value or None, "keys": role → key in the file}"""
    problems: list[str] = field(default_factory=list)
    """Why the file cannot be loaded (empty when it fits)."""
    checked_against_base: bool = False

    @property
    def ranks(self) -> list[int]:
        return sorted({t["A"][0] for t in self.targets.values() if t.get("A")})

    @property
    def alphas(self) -> list[float]:
        return sorted({t["alpha"] for t in self.targets.values() if t.get("alpha") is not None})

    @property
    def leaf_names(self) -> list[str]:
        """Distinct layer names targeted (to_q, to_out.0, ...), without the block paths."""
        leaves = set()
        for module in self.targets:
            parts = module.split(".")
            leaves.add(".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1])
        return sorted(leaves)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        lines = [
            f"file:    {self.path} ({self.size_bytes / 1e6:.2f} MB)",
            f"format:  {self.format}",
            f"rank:    {', '.join(map(str, self.ranks)) or '-'}",
            f"alpha:   {', '.join(f'{a:g}' for a in self.alphas) or '(none: alpha = rank)'}",
            f"targets: {len(self.targets)} modules ({', '.join(self.leaf_names) or '-'})",
        ]
        if not self.checked_against_base:
            lines.append("fits:    not checked (no base model given)")
        elif self.ok:
            lines.append("fits:    yes, every target module exists in the base and every shape fits")
        else:
            lines.append("fits:    NO")
        lines += [f"  - {problem}" for problem in self.problems]
        return "\n".join(lines)


def _detect_format(keys: list[str]) -> str:
    if any(k.startswith("lora_unet_") for k in keys):
        return "kohya"
    if any(k.startswith("diffusion_model.") for k in keys):
        return "comfyui"
    if any(".default." in k for k in keys):
        return "peft-default"
    if any(k.startswith("transformer.") for k in keys):
        return "diffusers"
    return "bare"


def _module_path(key_stem: str, fmt: str, underscored: dict[str, str]) -> str | None:
    """The base transformer's module path named by a key (without its role suffix)."""
    for prefix in ("transformer.", "diffusion_model.", "base_model.model."):
        if key_stem.startswith(prefix):
            return key_stem[len(prefix):]
    if fmt == "kohya":
        return underscored.get(key_stem[len("lora_unet_"):]) if key_stem.startswith("lora_unet_") else None
    return key_stem if fmt == "bare" else None


def inspect_lora(path: Path | str, linear_shapes: dict[str, tuple[int, int]] | None = None) -> LoraReport:
    """Read the header of a LoRA file and check it against `linear_shapes` (module → (in, out)).

    Never loads pickle; never raises for a bad file: every reason it cannot be used is in
    `report.problems`.
    """
    path = Path(path)
    size = path.stat().st_size if path.is_file() else 0
    report = LoraReport(path=str(path), size_bytes=size, format="unsupported")
    if not path.is_file():
        report.problems.append("no such file")
        return report
    if path.suffix.lower() in PICKLE_SUFFIXES:
        report.problems.append(
            f"{path.suffix} is a pickle file, which can run code when loaded; only .safetensors is accepted "
            "(convert it with safetensors first)"
        )
        return report
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
            alphas = {key: float(handle.get_tensor(key).reshape(-1)[0]) for key in shapes if key.endswith(".alpha")}
    except Exception as exc:  # safetensors raises its own error types for broken headers
        report.problems.append(f"not a readable .safetensors file: {exc}")
        return report
    keys = sorted(shapes)
    if not keys:
        report.problems.append("the file holds no tensors")
        return report
    for marker, kind in _UNSUPPORTED.items():
        if any(marker in key for key in keys):
            report.problems.append(f"{kind} adapters are not supported, only LoRA (found keys like {marker}…)")
            return report
    fmt = report.format = _detect_format(keys)
    underscored = {name.replace(".", "_"): name for name in (linear_shapes or {})}
    unmatched: list[str] = []
    for key in keys:
        role = next(((suffix, r) for suffix, r in _ROLES if key.endswith(suffix)), None)
        module = _module_path(key[: -len(role[0])], fmt, underscored) if role else None
        if role is None or module is None:
            unmatched.append(key)
            continue
        entry = report.targets.setdefault(module, {"A": None, "B": None, "alpha": None, "keys": {}})
        entry[role[1]] = alphas[key] if role[1] == "alpha" else shapes[key]
        entry["keys"][role[1]] = key
    for module, entry in report.targets.items():
        if entry["A"] is None or entry["B"] is None:
            report.problems.append(f"{module}: has only one of the two LoRA matrices")
    if linear_shapes is not None:
        report.checked_against_base = True
        for module, entry in report.targets.items():
            if module not in linear_shapes:
                unmatched.append(module)
                continue
            fan_in, fan_out = linear_shapes[module]
            a, b = entry["A"], entry["B"]
            if a and b and (len(a) != 2 or len(b) != 2 or a[1] != fan_in or b[0] != fan_out or a[0] != b[1]):
                report.problems.append(
                    f"{module}: shapes A{list(a)} B{list(b)} do not fit a Linear({fan_in} → {fan_out})"
                )
    if unmatched:
        shown = ", ".join(unmatched[:8]) + (f" … (+{len(unmatched) - 8} more)" if len(unmatched) > 8 else "")
        report.problems.append(f"{len(unmatched)} keys match no module of the base transformer: {shown}")
    return report


def diffusers_state_dict(path: Path | str, report: LoraReport) -> dict:
    """The file's tensors under canonical diffusers keys (`transformer.<module>.lora_A/B.weight`),
    with any alpha folded into B (scale alpha / rank), ready for `load_lora_weights`.

    One conversion for every format, driven by the same report that was checked: diffusers itself
    loads nothing from bare keys and, in 0.42, keeps the `transformer.` prefix of `.default.` keys
    (so finds no module), so the project does not rely on its per-format converters.
    """
    from safetensors import safe_open

    state = {}
    with safe_open(str(path), framework="pt") as handle:
        for module, entry in report.targets.items():
            down = handle.get_tensor(entry["keys"]["A"])
            up = handle.get_tensor(entry["keys"]["B"])
            if entry["alpha"] is not None:
                up = up * (entry["alpha"] / down.shape[0])
            state[f"transformer.{module}.lora_A.weight"] = down
            state[f"transformer.{module}.lora_B.weight"] = up
    return state


def linear_shapes(module) -> dict[str, tuple[int, int]]:
    """module path → (in_features, out_features) for every Linear in a torch module (meta is fine)."""
    import torch

    return {name: (m.in_features, m.out_features) for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)}


def base_linear_shapes(transformer_dir: Path | str) -> dict[str, tuple[int, int]]:
    """Linear shapes of a Qwen-Image transformer from its `config.json`, built on the meta device:
    no weights are read, so this is instant even for the 20 B real model."""
    import torch
    from diffusers import QwenImageTransformer2DModel

    config = QwenImageTransformer2DModel.load_config(str(transformer_dir))
    with torch.device("meta"):
        model = QwenImageTransformer2DModel.from_config(config)
    return linear_shapes(model)


# -- tiny adapters for the demo and tests ----------------------------------------------------------
TINY_VERSIONS = ("v2511-0715", "v2511-0801", "v2511-0823")
TINY_SPEED_ADAPTER = "fast"
TINY_LORA_VERSION = "v1"
# The tiny edit transformer (deployments/tiny.py): 2 blocks, 3 heads × 16 = 48 wide attention.
_TINY_TARGETS = [f"transformer_blocks.{b}.attn.{m}" for b in (0, 1) for m in ("to_q", "to_k", "to_v", "to_out.0")]
_TINY_WIDTH = 48


def ensure_tiny_loras(cache_dir: Path | str, rank: int = 4) -> Path:
    """A directory with three tiny random adapters named like the real versions (demo, tests).

    Written with numpy only, so the ingress can list them without torch; atomic like the tiny models.
    """
    return _tiny_adapters(Path(cache_dir).expanduser() / f"tiny-lora-{TINY_LORA_VERSION}",
                          {version: 1000 + index for index, version in enumerate(TINY_VERSIONS)}, rank)


def ensure_tiny_speed_adapter(cache_dir: Path | str, rank: int = 4) -> Path:
    """The file of a tiny random stand-in for a step-distilled speed adapter (demo `fast` preset),
    kept apart from the versions' directory so it is never listed as a version."""
    directory = _tiny_adapters(Path(cache_dir).expanduser() / f"tiny-speed-lora-{TINY_LORA_VERSION}",
                               {TINY_SPEED_ADAPTER: 2000}, rank)
    return directory / f"{TINY_SPEED_ADAPTER}.safetensors"


def _tiny_adapters(final: Path, seeds: dict[str, int], rank: int) -> Path:
    """`final` holding one tiny random adapter per name of `seeds` (each from its own seed)."""
    import numpy as np
    from safetensors.numpy import save_file

    def build(directory: Path) -> None:
        for name, seed in seeds.items():
            rng = np.random.default_rng(seed)
            tensors = {}
            for module in _TINY_TARGETS:
                tensors[f"transformer.{module}.lora_A.weight"] = rng.normal(0, 0.5, (rank, _TINY_WIDTH)).astype(np.float32)
                tensors[f"transformer.{module}.lora_B.weight"] = rng.normal(0, 0.5, (_TINY_WIDTH, rank)).astype(np.float32)
            save_file(tensors, str(directory / f"{name}.safetensors"))

    return build_once(final, build, lambda done: all((done / f"{name}.safetensors").is_file() for name in seeds))
