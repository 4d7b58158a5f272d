"""The web app in a real browser: headless Chromium (Debian's `chromium` + `chromium-driver`) via selenium.

Starts the app on a free local port, loads a shipped membrane, types a prompt, and checks that the
rates and the two images (without, with) appear; saves a screenshot (to $SPM_APP_SCREENSHOT if set,
which is how docs/images/app.png is made).
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import pytest

gradio = pytest.importorskip("gradio", reason="pip install 'diffusers-spm[app]'")
webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from diffusers_spm.app import MembraneSession  # noqa: E402
from diffusers_spm.app.ui import build_app  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs headless Chromium: apt-get install -y chromium chromium-driver",
)
TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def app_url():
    port = free_port()
    app = build_app(MembraneSession(num_inference_steps=4, display_size=128))
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}"
    app.close()


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1900", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_load_a_membrane_type_a_prompt_see_rates_and_images(app_url, browser, tmp_path):
    started = time.time()
    wait = WebDriverWait(browser, TIMEOUT_S)
    browser.get(app_url)
    source = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#membrane-source input")))
    source.send_keys("red", Keys.ENTER)
    browser.find_element(By.ID, "load").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "Loaded red."))
    assert "red" in browser.find_element(By.ID, "membranes").text

    browser.find_element(By.CSS_SELECTOR, "#prompts textarea").send_keys("a red circle\na blue square")
    browser.find_element(By.ID, "generate").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "rates"), "1.000"))
    rates = browser.find_element(By.ID, "rates").text
    assert "a red circle" in rates and "a blue square" in rates and "red" in rates
    images = wait.until(lambda d: (found := d.find_elements(By.CSS_SELECTOR, "#images img")) and len(found) >= 4 and found)
    assert len(images) == 4 and all(image.get_attribute("src") for image in images)
    captions = browser.find_element(By.ID, "images").text
    assert "without membranes" in captions and "with red x1" in captions
    screenshot = Path(os.environ.get("SPM_APP_SCREENSHOT", tmp_path / "app.png"))
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000

    # bad input: a message in the page, and the app keeps working
    source = browser.find_element(By.CSS_SELECTOR, "#membrane-source input")
    source.send_keys(Keys.CONTROL, "a")
    source.send_keys("no_such_membrane", Keys.ENTER)
    browser.find_element(By.ID, "load").click()
    wait.until(lambda d: "Known short names" in d.find_element(By.TAG_NAME, "body").text)
    print(f"browser test: {time.time() - started:.1f} s, screenshot {screenshot}")
