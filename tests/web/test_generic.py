"""The page shows any task the service serves, from /v1/models and openapi.json alone: here the
extra `gray` task of tests/extra_task.py (one number field, `amount`), served next to the built-in
ones. The page names no task, so a task it has never seen gets its radio, its field, its stages
and its result like the others.

A service of its own for this module (the registry plus `gray`), deployed before the package's
`web_service` (conftest runs this module first): the two do not fit Ray's CPUs at once, and both
are the app "imgserve" at "/".
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deployments.tasks import TASKS
from tests.conftest import Service, sample_path
from tests.extra_task import GRAY
from tests.web.conftest import MAX_LONG_EDGE, VIEWPORT
from tests.web.test_page import choose_image, download, natural_size, param, shot, wait_for_result

pytestmark = [pytest.mark.serve, pytest.mark.browser]

# The result as the page shows it: [r, g, b] of every pixel of #after, read back through a canvas.
AFTER_PIXELS = """() => {
  const img = document.getElementById("after");
  const canvas = document.createElement("canvas");
  canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
  const context = canvas.getContext("2d");
  context.drawImage(img, 0, 0);
  const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
  let colour = 0;
  for (let i = 0; i < data.length; i += 4) if (data[i] !== data[i + 1] || data[i + 1] !== data[i + 2]) colour++;
  return {pixels: data.length / 4, colour};
}"""


@pytest.fixture(scope="module")
def gray_service(demo_service) -> Iterator[Service]:
    yield from demo_service({"preprocess": {"max_long_edge": MAX_LONG_EDGE}}, tasks=TASKS.plus(GRAY))


@pytest.fixture()
def gray_page(browser, gray_service: Service):
    context = browser.new_context(viewport=VIEWPORT, accept_downloads=True, base_url=gray_service.url,
                                  bypass_csp=True)  # string predicates are evaluated in the page (see conftest)
    context.set_default_timeout(120_000)
    yield context.new_page()
    context.close()


def test_an_extra_task_gets_its_radio_field_stages_and_result(gray_page, gray_service, tmp_path: Path) -> None:
    page = gray_page
    models = gray_service.http.get("/v1/models").json()
    assert list(models["tasks"]) == ["real", "anime", "layers", "gray"]
    page.goto("/")
    page.wait_for_selector('input[name="task"][value="gray"]', state="attached")
    # its radio: the name capitalised, the summary from openapi.json
    radio = 'label:has(input[name="task"][value="gray"])'
    assert page.text_content(f"{radio} b") == "Gray"
    assert page.text_content(f"{radio} small") == "colour → grayscale"
    assert page.is_hidden("#gray-amount")  # until chosen
    page.check('input[name="task"][value="gray"]')
    # its one field, a number input with the schema's bounds and default
    amount = page.eval_on_selector("#gray-amount", "i => [i.tagName, i.type, i.min, i.max, i.step, i.name]")
    assert amount == ["INPUT", "number", "0", "1", "any", "amount"]
    assert float(page.input_value("#gray-amount")) == models["tasks"]["gray"]["default_amount"] == 1.0
    assert page.text_content('label:has(#gray-amount)').strip() == "Amount"
    assert page.eval_on_selector_all('.task-fields[data-task="gray"] [name]', "es => es.map(e => e.name)") == ["amount"]
    # no steps, CFG or seed; the image formats
    page.click("#advanced summary")
    for name in ("steps", "cfg", "seed", "cfg_normalize"):
        assert page.is_hidden(f"#{name}"), name
    assert page.eval_on_selector_all("#format option", "os => os.map(o => o.value)") == ["png", "webp", "jpeg"]
    assert page.text_content("#advanced-note") == "One pass of the model: no steps, CFG or seed."

    choose_image(page, sample_path("photo_1.jpg"))
    page.fill("#gray-amount", "1")
    shot(page, tmp_path, "form-gray")
    page.click("#submit")
    wait_for_result(page)
    assert page.text_content("#progress-state") == "Done"
    # its own stage, reported by its events, between the first and the last
    assert page.eval_on_selector_all("#stages li", "ls => ls.map(l => l.textContent)") == ["preprocess", "gray", "postprocess"]
    assert page.eval_on_selector_all("#stages li", "ls => ls.map(l => l.className)") == ["done"] * 3
    assert page.get_attribute("#progress-bar", "value") == "100"
    # the result, shown before/after, is gray; the amount used is among the parameters
    assert natural_size(page, "#after") == (512, 341)
    seen = page.evaluate(AFTER_PIXELS)
    assert seen["pixels"] == 512 * 341 and seen["colour"] == 0, seen
    assert param(page, "task") == "gray" and float(param(page, "amount")) == 1.0
    assert page.text_content('dt[data-param="amount"]') == "Amount"
    assert page.is_visible("#compare") and page.is_hidden("#layer-view")
    shot(page, tmp_path, "result-gray", "#progress")
    name, data = download(page, "#download")
    assert name == "photo_1-gray.png"
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert pixels.shape == (341, 512, 3)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    assert pixels.std() > 0  # a picture, not a blank

    # a value out of its range: refused, the field named and marked
    page.fill("#gray-amount", "1.5")
    page.click("#submit")
    page.wait_for_selector("#error:not([hidden])")
    assert page.text_content("#error-title") == "A setting is not valid"
    assert page.text_content("#error-message").startswith("Amount: "), page.text_content("#error-message")
    assert page.get_attribute("#gray-amount", "aria-invalid") == "true"
