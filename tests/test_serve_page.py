"""The page of `transferkit serve` in a real browser: headless Chromium driven by Debian's chromium-driver
through selenium uploads an image with the file input and must show the label the API predicts."""

from __future__ import annotations

import shutil

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from serve_client import ServerProcess, post_files  # noqa: E402
from tiny_run import export_tiny  # noqa: E402


# Flags that keep Chromium from reaching the network or needing a display, a GPU or a sandbox.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]


def _browser_or_skip() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("needs Debian's chromium and chromium-driver (`make browser` installs them)")
    return chromium, driver


@pytest.fixture
def browser(tmp_path):
    chromium, driver = _browser_or_skip()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    # An explicit driver path: selenium must not try to download one.
    session = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    yield session
    session.quit()


@pytest.mark.slow
def test_page_uploads_an_image_and_shows_its_predicted_label(browser, tmp_path):
    data, _, model = export_tiny(tmp_path / "tiny")
    image = sorted((data / "val" / "bees").glob("*.png"))[0]
    server = ServerProcess.transferkit(model, log_dir=tmp_path)
    try:
        expected = post_files(server.url, [(image.name, image.read_bytes())])[1]["predictions"][0]["label"]
        browser.get(server.url)
        wait = WebDriverWait(browser, 60)
        wait.until(EC.text_to_be_present_in_element((By.ID, "card"), "ants, bees"))  # the model card
        assert "95% interval" in browser.find_element(By.ID, "card").text  # the val accuracy's
        browser.find_element(By.ID, "files").send_keys(str(image))
        label = wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, "#results .label")))
        assert label.text.split()[0] == expected
        assert browser.find_element(By.CSS_SELECTOR, "#results .name").text == image.name
        assert len(browser.find_elements(By.CSS_SELECTOR, "#results .bar")) == 2  # top-k bars, 2 classes
    finally:
        assert server.stop(), server.log.read_text()
