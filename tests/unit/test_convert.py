"""Pickled AnimeGANv2 styles → safetensors, in a separate process: what is accepted (a flat state
dict with exactly the generator's keys and shapes) comes out loadable by the service and equal to
the input; a pickle carrying any other object is refused without running it; wrong keys, shapes,
wrappers and values are refused, naming them.

The style files are real torch pickles of the real generator architecture with seeded random
weights (the published ones cannot be downloaded here); the child processes are real.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from deployments.animegan import load_generator, random_generator
from deployments.identity import sha256
from serve_app import convert
from serve_app.convert import ConversionError


def style_state(seed: int = 7) -> OrderedDict[str, torch.Tensor]:
    """A state dict as the published port saves it: an OrderedDict of float32 tensors."""
    return OrderedDict((k, v.clone()) for k, v in random_generator(seed).state_dict().items())


def save_pt(path: Path, obj: object) -> Path:
    torch.save(obj, path)
    return path


def _touch(path: str) -> None:
    """What the hostile pickle below calls when unpickled without weights_only."""
    Path(path).write_text("code from a pickle ran")


class Payload:
    """An object whose unpickling calls `_touch(marker)`: stands for code hidden in a weights file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return _touch, (self.marker,)


def assert_equal_state(path: Path, expected: dict[str, torch.Tensor]) -> None:
    loaded = load_generator(path).state_dict()
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


def test_a_published_style_converts_in_a_child_process_to_an_equal_loadable_file(tmp_path: Path) -> None:
    state = style_state()
    source = save_pt(tmp_path / "paprika.pt", state)
    output = tmp_path / "styles" / "paprika.safetensors"
    output.parent.mkdir()
    digest = convert.convert("animegan", source, output)
    assert digest == sha256(output)
    assert_equal_state(output, state)  # the service's loader accepts it; every tensor is the input's
    with safe_open(str(output), framework="pt") as handle:
        origin = json.loads(handle.metadata()["converted_from"])
    assert origin == {"converter": "animegan", "source": "paprika.pt", "source_sha256": sha256(source)}
    assert sorted(p.name for p in output.parent.iterdir()) == ["paprika.safetensors"]  # no partial left
    # Deterministic: the same pickle gives the same bytes, so a recorded sha256 can be checked again.
    again = tmp_path / "again.safetensors"
    assert convert.convert("animegan", source, again) == digest


def test_a_pickle_with_any_other_object_is_refused_and_its_code_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran.txt"
    state = style_state()
    state["block_a.0.1.weight"] = Payload(marker)  # type: ignore[assignment]
    source = save_pt(tmp_path / "face_paint_512_v2.pt", state)
    # The payload is real: an ordinary torch.load would run it.
    torch.load(source, weights_only=False)
    assert marker.read_text() == "code from a pickle ran"
    marker.unlink()

    output = tmp_path / "face_paint_512_v2.safetensors"
    with pytest.raises(ConversionError) as refused:
        convert.convert("animegan", source, output)
    assert str(refused.value) == ("face_paint_512_v2.pt: refused by torch.load(weights_only=True): it holds "
                                  "tests.unit.test_convert._touch, which is neither a tensor nor a plain container")
    assert not marker.exists()
    assert not output.exists() and not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("version, refused", [("2.5.1", True), ("2.9.1+cu128", True), ("2.10.0", False),
                                              ("2.13.0+cpu", False), ("3.0.0", False)])
def test_the_converter_refuses_a_torch_whose_unpickler_has_known_bypasses(version: str, refused: bool) -> None:
    if refused:
        with pytest.raises(ConversionError, match=rf"torch {re.escape(version)} cannot read pickles safely.*torch>=2\.10"):
            convert.check_torch(version)
    else:
        convert.check_torch(version)


def test_an_old_torch_never_opens_the_pickle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "ran"
    source = save_pt(tmp_path / "style.pt", Payload(marker))
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    with pytest.raises(ConversionError, match="torch 2.5.1"):
        convert.convert_file("animegan", source, tmp_path / "style.safetensors")
    assert not marker.exists() and not (tmp_path / "style.safetensors").exists()


def test_wrong_keys_are_refused_naming_the_keys(tmp_path: Path) -> None:
    state = style_state()
    state["block_a.0.1.weights"] = state.pop("block_a.0.1.weight")
    source = save_pt(tmp_path / "celeba_distill.pt", state)
    output = tmp_path / "celeba_distill.safetensors"
    with pytest.raises(ConversionError) as refused:
        convert.convert("animegan", source, output)
    message = str(refused.value)
    assert "missing keys ['block_a.0.1.weight']" in message
    assert "unexpected keys ['block_a.0.1.weights']" in message
    assert not output.exists()


def wrapped(state):
    return {"state_dict": state}


def with_epoch(state):
    return {**state, "epoch": 3}


def wrong_shape(state):
    state["out_layer.0.weight"] = torch.zeros(3, 32, 3, 3)
    return state


def half(state):
    state["block_b.1.2.bias"] = state["block_b.1.2.bias"].half()
    return state


def not_finite(state):
    state["block_e.2.2.weight"][0] = float("nan")
    return state


@pytest.mark.parametrize("change, message", [
    (wrapped, "`state_dict` is not a tensor (OrderedDict)"),
    (with_epoch, "`epoch` is not a tensor (int)"),
    (wrong_shape, "wrong shapes ['out_layer.0.weight (3, 32, 3, 3) (expected (3, 32, 1, 1))']"),
    (half, "`block_b.1.2.bias` is torch.float16, not float32"),
    (not_finite, "`block_e.2.2.weight` has non-finite values"),
    (lambda state: list(state.values()), "expected a flat state_dict (dict of tensors), got list"),
])
def test_anything_but_a_flat_float32_state_dict_of_the_generator_is_refused(tmp_path: Path, change, message) -> None:
    # The checks the child runs, called in this process (the child adds only the process boundary).
    source = save_pt(tmp_path / "style.pt", change(style_state()))
    output = tmp_path / "style.safetensors"
    with pytest.raises(ConversionError) as refused:
        convert.convert_file("animegan", source, output)
    assert message in str(refused.value)
    assert not output.exists() and not list(tmp_path.glob("*.partial"))


def test_convert_styles_converts_a_quarantine_directory_and_deletes_the_pickles(tmp_path: Path, capsys) -> None:
    quarantine, styles = tmp_path / "quarantine", tmp_path / "styles"
    quarantine.mkdir()
    state = style_state(3)
    save_pt(quarantine / "face_paint_512_v1.pt", state)
    with pytest.raises(ConversionError, match="must not be the styles directory"):
        convert.convert_styles(quarantine, quarantine)
    written = convert.convert_styles(quarantine, styles)
    assert list(written) == ["face_paint_512_v1.safetensors"]
    assert written["face_paint_512_v1.safetensors"] in capsys.readouterr().out
    assert not any(quarantine.iterdir())  # the pickle is gone
    assert_equal_state(styles / "face_paint_512_v1.safetensors", state)
    with pytest.raises(ConversionError, match="unknown converter 'onnx'"):
        convert.convert_styles(quarantine, styles, kind="onnx")


def test_the_convert_styles_command_parses_and_reports_refusals(tmp_path: Path, capsys) -> None:
    parser = argparse.ArgumentParser(prog="imgserve")
    convert.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["convert-styles", str(tmp_path / "q"), str(tmp_path / "styles")])
    assert (args.command, args.source, args.dest) == ("convert-styles", str(tmp_path / "q"), str(tmp_path / "styles"))
    assert convert.command(args.source, args.dest) == 2
    assert f"imgserve: {tmp_path / 'q'} is not a directory" in capsys.readouterr().err
    (tmp_path / "q").mkdir()
    assert convert.command(args.source, args.dest) == 2
    assert "no .pt/.pth files" in capsys.readouterr().err
