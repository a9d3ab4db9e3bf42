"""The web page as a person uses it, in headless Chromium against the demo service.

Each test picks a sample photo, chooses a task and its settings, starts it and checks what the page
shows: sizes, progress, queue position, the result and its parameters, the downloads' bytes, and
errors as sentences. Screenshots of each state are saved (see conftest). No timings are asserted.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import ray
from PIL import Image

from tests.conftest import sample_path
from tests.web.conftest import VIEWPORT

pytestmark = [pytest.mark.serve, pytest.mark.browser]

STEPS = 4
# Records every value the progress bar takes and every line the state shows, as a person watching would.
WATCH_PROGRESS = """() => {
  window.seen = {values: [], states: []};
  const bar = document.getElementById("progress-bar"), state = document.getElementById("progress-state");
  new MutationObserver(() => window.seen.values.push(Number(bar.value)))
    .observe(bar, {attributes: true, attributeFilter: ["value"]});
  new MutationObserver(() => window.seen.states.push(state.textContent))
    .observe(state, {childList: true, characterData: true, subtree: true});
}"""


def natural_size(page, selector: str) -> tuple[int, int]:
    return tuple(page.eval_on_selector(selector, "img => [img.naturalWidth, img.naturalHeight]"))


def param(page, key: str) -> str:
    return page.text_content(f'dd[data-param="{key}"]')


def open_page(page):
    page.goto("/")
    page.wait_for_function("document.querySelectorAll('#real-lora option').length > 0")
    return page


def choose_image(page, path: Path) -> None:
    page.set_input_files("#file", str(path))
    page.wait_for_function("(t => t.includes(' px') || t.includes('cannot preview'))"
                           "(document.getElementById('image-info').textContent)")


def advanced(page, **values) -> None:
    """Unfold the advanced parameters and set some."""
    if not page.eval_on_selector("#advanced", "details => details.open"):
        page.click("#advanced summary")
    for name, value in values.items():
        page.fill(f"#{name}", str(value))


def wait_for_result(page) -> None:
    """Until the result or an error shows; an error fails the test with the page's own words."""
    page.wait_for_selector("#result:not([hidden]), #error:not([hidden])")
    assert page.is_hidden("#error"), " ".join(page.text_content("#error").split())
    page.wait_for_selector("#result:not([hidden])")


def start_and_wait(page) -> None:
    page.click("#submit")
    wait_for_result(page)


def download(page, selector: str) -> tuple[str, bytes]:
    with page.expect_download() as info:
        page.click(selector)
    item = info.value
    return item.suggested_filename, Path(item.path()).read_bytes()


def shot(page, screenshots: Path, name: str, selector: str | None = None) -> None:
    if selector:
        page.eval_on_selector(selector, "node => node.scrollIntoView({block: 'start'})")
    png = Image.open(io.BytesIO(page.screenshot())).convert("RGB")
    # 256 colours: the page is flat colours and text, the photos survive it; a third of the bytes
    png.quantize(256, method=Image.Quantize.MEDIANCUT).save(screenshots / f"{name}.png", optimize=True)


def test_anime_shows_sizes_progress_and_the_result(page, web_service, screenshots) -> None:
    open_page(page)
    models = web_service.http.get("/v1/models").json()
    choose_image(page, sample_path("photo_1.jpg"))
    # the upload and the size it will be processed at (long edge capped, aspect kept)
    assert natural_size(page, "#preview") == (1280, 853)
    info = page.text_content("#image-info")
    assert "1280 × 853 px" in info and f"processed at 512 × 341 px (long edge capped at {models['max_long_edge']})" in info
    # one radio per task the service lists, in its order
    assert page.eval_on_selector_all('input[name="task"]', "rs => rs.map(r => r.value)") == list(models["tasks"])
    page.check('input[name="task"][value="anime"]')
    styles = page.eval_on_selector_all("#anime-style option", "os => os.map(o => o.value)")
    assert styles == models["tasks"]["anime"]["styles"]
    assert page.input_value("#anime-style") == models["tasks"]["anime"]["default_style"]
    page.select_option("#anime-style", "paprika")
    advanced(page)
    assert page.is_hidden("#steps") and page.is_hidden("#seed")  # anime has no steps, cfg or seed
    assert page.eval_on_selector_all("#format option", "os => os.map(o => o.value)") == ["png", "webp", "jpeg"]
    page.evaluate(WATCH_PROGRESS)
    start_and_wait(page)
    # the bar moved through the stages to the end; the stage names were shown
    seen = page.evaluate("window.seen")
    values = seen["values"]
    assert values[-1] == 100 and any(0 < v < 100 for v in values), values
    assert values == sorted(values), values
    assert "Running: stylize" in seen["states"], seen["states"]
    assert page.text_content("#progress-state") == "Done"
    assert page.eval_on_selector_all("#stages li", "ls => ls.map(l => l.textContent)") == ["preprocess", "stylize", "postprocess"]
    # before/after at the processed size, with the parameters used
    assert natural_size(page, "#after") == (512, 341)
    assert natural_size(page, "#before") == (1280, 853)
    assert param(page, "task") == "anime" and param(page, "style") == "paprika" and param(page, "size") == "512x341"
    page.eval_on_selector("#compare-slider", "s => { s.value = 30; s.dispatchEvent(new Event('input')); }")
    assert page.eval_on_selector("#compare", "c => c.style.getPropertyValue('--split')") == "30%"
    shot(page, screenshots, "result-anime", "#progress")
    name, data = download(page, "#download")
    assert name == "photo_1-anime.png"
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and image.size == (512, 341)
    assert json.loads(image.info["imgserve"])["style"] == "paprika"


def test_real_progress_queue_cancel_and_the_chosen_version(context, web_service, hold, screenshots) -> None:
    models = web_service.http.get("/v1/models").json()
    lora = models["tasks"]["real"]["lora"]
    ray.get(hold.close.remote(2))  # the first job stops after denoising step 2 until opened
    try:
        first = open_page(context.new_page())
        # the form offers the versions in numeric order with the default preselected, and the defaults
        assert first.eval_on_selector_all("#real-lora option", "os => os.map(o => o.value)") == lora["versions"]
        assert lora["versions"][1:] == ["v2511-0715", "v2511-0801", "v2511-0823"]
        assert first.input_value("#real-lora") == lora["default"] == "v2511-0823"
        assert first.input_value("#real-prompt") == models["tasks"]["real"]["defaults"]["prompt"]
        assert first.eval_on_selector_all('.task-fields[data-task="real"] [name]', "es => es.map(e => e.id)") == [
            "real-lora", "real-preset", "real-lora_scale", "real-depth_compensation", "real-prompt",
            "real-negative_prompt"]
        assert first.is_hidden("#steps")  # folded away
        choose_image(first, sample_path("photo_2.jpg"))
        first.select_option("#real-lora", "v2511-0801")
        advanced(first)
        assert first.input_value("#steps") == str(models["tasks"]["real"]["defaults"]["steps"])
        assert float(first.input_value("#cfg")) == models["tasks"]["real"]["defaults"]["cfg"]
        # the speed choice next to the version: a preset sets the steps and CFG it stands for
        assert first.eval_on_selector_all("#real-preset option", "os => os.map(o => o.textContent)") == [
            "full (30 steps, CFG 7)", "fast (4 steps, no CFG)"]
        first.select_option("#real-preset", "fast")
        assert first.input_value("#steps") == "4" and float(first.input_value("#cfg")) == 1.0
        first.select_option("#real-preset", "full")
        assert first.input_value("#steps") == "30" and float(first.input_value("#cfg")) == 7.0
        advanced(first, steps=STEPS, seed=7)
        shot(first, screenshots, "form")
        first.click("#submit")
        first.wait_for_function("document.getElementById('progress-state').textContent.includes('step 2/4')")
        assert first.text_content("#progress-state") == f"Running: denoise, step 2/{STEPS}"
        assert first.text_content('#stages li[data-stage="denoise"]') == f"denoise 2/{STEPS}"
        assert 0 < int(first.get_attribute("#progress-bar", "value")) < 100
        assert first.is_visible("#cancel")
        shot(first, screenshots, "progress", "#progress")

        # a second job waits in the queue and shows its position; it can be cancelled there
        second = open_page(context.new_page())
        choose_image(second, sample_path("photo_3.jpg"))
        advanced(second, steps=2)
        second.click("#submit")
        second.wait_for_function("document.getElementById('progress').dataset.state === 'queued'")
        assert second.text_content("#progress-state") == "Waiting in the queue: position 1 (next to start)"
        shot(second, screenshots, "queued", "#progress")

        # the queue holds one job: a third is refused with a sentence, not JSON
        third = open_page(context.new_page())
        choose_image(third, sample_path("photo_3.jpg"))
        third.click("#submit")
        third.wait_for_selector("#error:not([hidden])")
        assert third.text_content("#error-title") == "The service is busy"
        message = third.text_content("#error-message")
        assert message.startswith("1 job is waiting; retry later.") and "Please try again in" in message
        assert "{" not in message and "queue_full" not in message
        assert third.is_hidden("#progress") and third.is_enabled("#submit")
        shot(third, screenshots, "error-queue-full", "#error")

        second.click("#cancel")
        second.wait_for_function("document.getElementById('progress').dataset.state === 'cancelled'")
        assert second.text_content("#progress-state") == "Cancelled"
        assert second.is_hidden("#cancel") and second.is_hidden("#result") and second.is_hidden("#error")
    finally:
        ray.get(hold.open.remote())

    wait_for_result(first)
    assert first.text_content("#progress-state") == "Done"
    assert param(first, "lora") == "v2511-0801"
    assert param(first, "preset") == "full" and param(first, "adapters") == "v2511-0801:1"
    assert param(first, "steps") == str(STEPS) and param(first, "seed") == "7"
    processed = first.get_attribute("#image-info", "data-processed")
    assert processed == "512x347" and param(first, "size") == processed
    assert natural_size(first, "#after") == (512, 347)
    shot(first, screenshots, "result-real", "#progress")
    name, data = download(first, "#download")
    assert name == "photo_2-real.png"
    image = Image.open(io.BytesIO(data))
    assert image.size == (512, 347) and json.loads(image.info["imgserve"])["lora"] == "v2511-0801"


def test_layers_show_tiles_and_download_zip_and_psd(page, web_service, screenshots) -> None:
    from psd_tools import PSDImage

    open_page(page)
    choose_image(page, sample_path("photo_1.jpg"))
    page.check('input[name="task"][value="layers"]')
    layers = web_service.http.get("/v1/models").json()["tasks"]["layers"]
    assert page.input_value("#layers-layers") == str(layers["default_layers"])
    assert page.eval_on_selector_all("#layers-resolution option", "os => os.map(o => o.value)") == [
        str(r) for r in layers["resolutions"]]
    # layers' own fields come from its schema: the texts after the numbers and choices
    assert page.eval_on_selector_all('.task-fields[data-task="layers"] [name]', "es => es.map(e => e.id)") == [
        "layers-layers", "layers-resolution", "layers-prompt", "layers-negative_prompt"]
    assert page.get_attribute("#layers-prompt", "placeholder") == "(blank: the model describes the image itself)"
    page.fill("#layers-layers", "3")
    page.select_option("#layers-resolution", "640")
    page.fill("#layers-prompt", "a street with a tree")
    advanced(page, steps=2, seed=3)
    assert page.is_hidden("#format")  # layers come as a ZIP, the PSD is offered with the result
    assert page.is_checked("#cfg_normalize") == layers["default_cfg_normalize"]
    assert page.text_content("#advanced-note") == "Layers come as a ZIP of PNGs; the PSD is offered with the result."
    start_and_wait(page)
    assert param(page, "layers") == "3" and param(page, "resolution") == "640"
    width, height = map(int, param(page, "layer-size").split("x"))
    tiles = page.query_selector_all(".layer-tile img")
    assert len(tiles) == 3
    assert [natural_size(page, f'.layer-tile[data-layer="{i}"] img') for i in range(3)] == [(width, height)] * 3
    captions = page.eval_on_selector_all(".layer-tile figcaption span", "ss => ss.map(s => s.textContent)")
    assert captions == ["layer_00 (bottom)", "layer_01", "layer_02 (top)"]
    assert natural_size(page, "#after") == (width, height)  # the composite, next to the upload
    assert param(page, "prompt") == "a street with a tree"
    shot(page, screenshots, "result-layers", "#result")

    name, data = download(page, "#download")
    assert name == "photo_1-layers.zip"
    archive = zipfile.ZipFile(io.BytesIO(data))
    pngs = sorted(n for n in archive.namelist() if n.startswith("layer_") and n.endswith(".png"))
    assert pngs == ["layer_00.png", "layer_01.png", "layer_02.png"]
    for png in pngs:
        layer = Image.open(io.BytesIO(archive.read(png)))
        assert layer.format == "PNG" and layer.mode == "RGBA" and layer.size == (width, height)

    name, data = download(page, "#download-psd")
    assert name == "photo_1-layers.psd"
    assert data[:4] == b"8BPS"
    psd = PSDImage.open(io.BytesIO(data))
    assert psd.size == (width, height)
    assert [layer.name for layer in psd] == ["layer_00", "layer_01", "layer_02"]
    # the same layers as the ZIP: the same request, seed and prompt run again with format=psd
    for layer, png in zip(psd, pngs):
        zipped = np.asarray(Image.open(io.BytesIO(archive.read(png))))
        assert np.array_equal(np.asarray(layer.topil().convert("RGBA")), zipped), layer.name
    assert page.text_content("#psd-state") == "PSD ready"


def test_errors_are_sentences(page, tmp_path, screenshots) -> None:
    open_page(page)
    notes = tmp_path / "notes.txt"
    notes.write_text("this is not a picture\n" * 20)
    choose_image(page, notes)
    assert "the browser cannot preview this file" in page.text_content("#image-info")
    page.click("#submit")
    page.wait_for_selector("#error:not([hidden])")
    assert page.text_content("#error-title") == "This file is not an image the service can read"
    assert page.text_content("#error-message") == "Image: Not a recognised image."
    assert page.get_attribute("#drop-zone", "aria-invalid") == "true"
    assert page.text_content("#progress-state") == "Failed" and page.is_hidden("#result")
    shot(page, screenshots, "error-bad-file")

    # a version that is not (or no longer) on the service: the field is named and marked
    choose_image(page, sample_path("photo_3.jpg"))
    assert page.is_hidden("#error")
    page.eval_on_selector("#real-lora", "s => s.add(new Option('v2511-9999', 'v2511-9999', true, true))")
    page.click("#submit")
    page.wait_for_selector("#error:not([hidden])")
    assert page.text_content("#error-title") == "A setting is not valid"
    message = page.text_content("#error-message")
    # the field, the value and the versions there are (the list's wording is the catalog's)
    assert message.startswith("LoRA version: Unknown LoRA version 'v2511-9999';"), message
    assert "v2511-0823" in message
    assert page.get_attribute("#real-lora", "aria-invalid") == "true"


def test_the_page_works_under_its_content_security_policy(browser, web_service) -> None:
    """No bypass here: the page as a user's browser enforces it, driven by selectors only."""
    context = browser.new_context(viewport=VIEWPORT, base_url=web_service.url)
    context.set_default_timeout(120_000)
    try:
        page = context.new_page()
        refused: list[str] = []
        page.on("console", lambda message: refused.append(message.text)
                if "Content Security Policy" in message.text else None)
        response = page.goto("/")
        assert "default-src 'self'" in response.headers["content-security-policy"]
        page.wait_for_selector("#real-lora option", state="attached")
        page.set_input_files("#file", str(sample_path("photo_1.jpg")))
        page.wait_for_selector("#preview:not([hidden])")
        page.check('input[name="task"][value="anime"]')
        start_and_wait(page)
        assert page.get_attribute("#download", "href").startswith("blob:")
        assert refused == []
    finally:
        context.close()
