"""The chat web page end to end: headless Chromium types questions into the real page served by the real
server with the real SmolLM2-135M, and the streamed answers must equal greedy ``generate`` on the same history.

Needs the Debian packages ``chromium`` and ``chromium-driver`` and the PyPI package ``selenium``.
"""
from __future__ import annotations

import json
import shutil
import threading
import urllib.error
import urllib.request

import pytest

from colossal_llama.eval.web.server import ChatBackend, make_server
from colossal_llama.inference.generation import SamplingConfig, generate_text
from colossal_llama.inference.loading import load_model_and_tokenizer
from colossal_llama.inference.prompting import resolve_chat_template

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]
SAMPLING = SamplingConfig(max_new_tokens=16, do_sample=False)


@pytest.fixture(scope="module")
def backend(smollm2_dir):
    model, tok = load_model_and_tokenizer(smollm2_dir, device="cpu")
    return ChatBackend(model, tok, resolve_chat_template(smollm2_dir, tok), SAMPLING, "SmolLM2-135M")


@pytest.fixture(scope="module")
def base_url(backend):
    server = make_server(backend, "127.0.0.1", 0)  # port 0: any free port
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    yield f"http://{host}:{port}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver")
    binary, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (binary and driver_path):
        pytest.skip("Debian packages chromium and chromium-driver are not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    yield driver
    driver.quit()


def expected_reply(backend, history):
    """What greedy generation gives for this history, computed without the server."""
    return generate_text(backend.model, backend.tokenizer, backend.template.encode_prompt(history), backend.sampling)


def ask_in_page(driver, question: str, turn: int) -> str:
    """Type ``question``, press Send, wait until the ``turn``-th assistant bubble finished streaming."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    box = driver.find_element(By.ID, "input")
    box.clear()
    box.send_keys(question)
    driver.find_element(By.ID, "send").click()
    WebDriverWait(driver, 120).until(
        lambda d: d.execute_script(
            "const b = document.querySelectorAll('.msg.assistant, .msg.error');"
            f"return b.length >= {turn} && b[{turn - 1}].dataset.state !== 'streaming';"))
    state, text = driver.execute_script(
        f"const b = document.querySelectorAll('.msg.assistant, .msg.error')[{turn - 1}];"
        "return [b.dataset.state, b.textContent];")
    assert state == "done", text
    return text


def test_single_and_multi_turn_chat_in_headless_chromium(browser, base_url, backend):
    browser.get(base_url + "/")
    assert "Chat with" in browser.page_source
    first_q = "What is the capital of France?"
    first = ask_in_page(browser, first_q, 1)
    history = [{"from": "human", "content": first_q}]
    assert first == expected_reply(backend, history) and first.strip()

    second_q = "What language do people speak there?"
    second = ask_in_page(browser, second_q, 2)
    history += [{"from": "assistant", "content": first}, {"from": "human", "content": second_q}]
    assert second == expected_reply(backend, history), "turn 2 must be conditioned on turn 1"
    # greedy SmolLM2 answers "The language spoken in Paris is French.": the follow-up really used turn 1
    assert second != expected_reply(backend, history[-1:]), "history made no difference: the test proves nothing"
    print(f"turn 1: {first!r}\nturn 2: {second!r}")
    bubbles = browser.execute_script("return [...document.querySelectorAll('.msg')].map(b => b.className);")
    assert bubbles == ["msg human", "msg assistant"] * 2


def _post(url: str, payload) -> tuple:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.headers.get("Content-Type"), resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Content-Type"), err.read().decode()


def test_api_streams_server_sent_events_and_rejects_bad_conversations(base_url, backend):
    history = [{"from": "human", "content": "Say hello."}]
    status, ctype, body = _post(base_url + "/api/chat", {"messages": history})
    assert status == 200 and ctype.startswith("text/event-stream")
    events = [json.loads(block[len("data: "):]) for block in body.split("\n\n") if block.startswith("data: ")]
    assert events[-1]["done"] is True and len(events) > 2
    assert "".join(e.get("delta", "") for e in events) == expected_reply(backend, history)

    status, _, body = _post(base_url + "/api/chat", {"messages": [{"from": "assistant", "content": "hi"}]})
    assert status == 400 and "messages[0].from" in json.loads(body)["error"]
    status, _, body = _post(base_url + "/api/chat", {"history": []})
    assert status == 400 and "messages" in json.loads(body)["error"]
    with urllib.request.urlopen(base_url + "/api/info", timeout=10) as resp:
        assert json.loads(resp.read()) == {"model": "SmolLM2-135M", "template": "tokenizer", "max_new_tokens": 16}
