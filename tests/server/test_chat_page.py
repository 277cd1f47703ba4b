"""The chat page in headless Chromium (Debian's `chromium` + `chromium-driver`, driven by selenium; no
browser is ever downloaded): a message streams its thinking and its answer, Stop aborts the request
on the server, markdown cannot inject HTML, and a screenshot is saved. Skips itself without them."""
from __future__ import annotations

import os
import shutil
import time

import pytest

from nanoseek.engine import LLM, SamplingParams
from nanoseek.server.app import ServerConfig
from nanoseek.server.reasoning import split
from tests.server.conftest import LiveServer

CHROMIUM, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="no system Chromium: apt-get install chromium chromium-driver")
QUESTION = "What is 12 + 30? Think first."


@pytest.fixture(scope="module")
def page_server(model_dir):
    llm = LLM(model_dir, num_blocks=1200, block_size=4, max_model_len=4096)
    llm.eos_ids = frozenset()          # replies run until max_tokens: Stop always has something to stop
    live = LiveServer(llm, ServerConfig(served_model_names=("tiny",), shutdown_grace_s=0.0))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    os.environ.setdefault("SE_OFFLINE", "true")     # selenium-manager must not fetch anything
    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1100,800"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
    yield driver
    driver.quit()


def _seed_with_both_channels(tok, reference) -> tuple[int, str, str]:
    ids = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    for seed in range(64):
        c = reference.generate(ids, SamplingParams(temperature=1.0, top_p=1.0, max_tokens=48, seed=seed))[0][0]
        reasoning, answer = split(c.text)
        if c.finish_reason == "length" and reasoning.strip() and answer and answer.strip():
            return seed, reasoning, answer
    pytest.fail("no seed in 0..63 reaches an answer")


def _set(driver, element_id: str, value) -> None:
    el = driver.find_element("id", element_id)
    el.clear()
    el.send_keys(str(value))


def _wait(predicate, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the page")


def test_chat_page_streams_thinking_and_answer_and_stop_aborts(page_server, browser, tok, reference, tmp_path):
    seed, reasoning, answer = _seed_with_both_channels(tok, reference)
    d = browser
    d.get(page_server.url + "/")
    _wait(lambda: d.find_element("id", "status").text == "connected")
    assert [o.text for o in d.find_elements("css selector", "#model option")] == ["tiny"]
    for k, v in dict(temperature=1.0, top_p=1.0, max_tokens=48, seed=seed).items():
        _set(d, k, v)
    d.find_element("id", "input").send_keys(QUESTION + "\n")                  # Enter sends
    msg = _wait(lambda: d.find_elements("css selector", ".msg.assistant"))[-1]
    _wait(lambda: msg.find_element("css selector", ".usage").text)         # the usage chunk ends the stream
    thinking = msg.find_element("css selector", "details.thinking")
    assert thinking.get_attribute("hidden") is None and thinking.get_attribute("open") is None   # collapsed
    assert thinking.find_element("css selector", "summary").text.startswith("Thought for")
    shown = d.execute_script("return arguments[0].querySelector('.reasoning').textContent", msg)
    assert shown == reasoning
    assert msg.find_element("css selector", ".answer").text.strip()
    usage = msg.find_element("css selector", ".usage").text
    assert "cache hit" in usage and "reasoning" in usage and "CNY" in usage
    assert not d.find_element("id", "regen").get_attribute("disabled")

    # markdown from the model is rendered from escaped text: tags stay text
    html = d.execute_script("return markdown('**b** <img src=x onerror=alert(1)> [l](javascript:alert(1)) `c`')")
    assert "<strong>b</strong>" in html and "<img" not in html and "&lt;img" in html and "href" not in html

    # Stop: a long reply is aborted on the server, its KV blocks freed
    aborted = page_server.metrics.finished["abort"]
    _set(d, "max_tokens", 3000)
    d.find_element("id", "input").send_keys("Count to a thousand.\n")
    _wait(lambda: page_server.engine.in_flight == 1 and not d.find_element("id", "stop").get_attribute("disabled"))
    _wait(lambda: d.find_elements("css selector", ".msg.assistant")[-1].find_element(
        "css selector", ".reasoning").get_attribute("textContent"))
    d.find_element("id", "stop").click()
    last = d.find_elements("css selector", ".msg.assistant")[-1]
    _wait(lambda: last.find_element("css selector", ".error").text == "stopped")
    page_server.wait_idle(timeout=10)
    assert page_server.metrics.finished["abort"] == aborted + 1
    shot = tmp_path / "chat_page.png"
    assert d.save_screenshot(str(shot)) and shot.read_bytes()[:4] == b"\x89PNG"
