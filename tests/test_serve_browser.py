"""The chat page in a real browser: headless Chromium, driven through the Chrome DevTools protocol.

The page is loaded from serve.py on a tiny model; the test types a question, presses send and
watches the reply grow, then checks it is the model's greedy answer; a second turn carries the
history; stop ends a long reply and frees its slot; reset clears the chat. Skipped only where no
Chromium or Chrome is installed (Debian: `apt-get install -y chromium`).
"""

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request

import pytest
import websocket  # websocket-client: the DevTools protocol speaks JSON over a WebSocket
from conftest import tiny_base

from nanohuatuo import Transformer
from nanohuatuo.generate import generate
from nanohuatuo.serve import ServeConfig, make_server
from nanohuatuo.templates import render_prompt, stop_token_ids
from nanohuatuo.tokenizer import Tokenizer

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
BROWSER = os.environ.get("CHROME_BIN") or next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no Chromium or Chrome found (apt-get install -y chromium, "
                                                        "or set CHROME_BIN)")
LINES = ["头痛三天了，伴有低烧，需要吃什么药？", "建议多休息，多喝水，体温超过38.5度可以服用退烧药。",
         "孩子咳嗽有痰怎么办？", "可以先观察，注意保暖，如果持续加重请及时就医。"] * 3
TEMPLATE = "huatuo"


class Browser:
    """Headless Chromium with one page, commanded over the DevTools protocol."""

    def __init__(self, profile):
        self.proc = subprocess.Popen(
            [BROWSER, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--no-default-browser-check", "--disable-extensions", "--remote-debugging-port=0",
             "--remote-allow-origins=*", f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        port = None
        while port is None:  # Chromium prints "DevTools listening on ws://127.0.0.1:PORT/..." on stderr
            line = self.proc.stderr.readline()
            if not line and (self.proc.poll() is not None or time.time() > deadline):
                raise RuntimeError(f"{BROWSER} did not start (exit code {self.proc.poll()})")
            if "DevTools listening on ws://" in line:
                port = int(line.split("ws://")[1].split("/")[0].split(":")[1])
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()  # keep the pipe drained
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=30, suppress_origin=True)
        self.next_id = 0

    def call(self, method, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:  # events arrive in between; the answer carries our id
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def js(self, expression):
        """The value of a JavaScript expression in the page."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait(self, expression, timeout=60):
        deadline = time.time() + timeout
        # false (not an error) while the page is still loading and the element is not there yet
        while not self.js(f"(() => {{ try {{ return {expression}; }} catch (e) {{ return false; }} }})()"):
            if time.time() > deadline:
                raise AssertionError(f"timed out waiting for {expression}")
            time.sleep(0.02)

    def close(self):
        self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tiny_base(tmp_path_factory.mktemp("pagemodel"), LINES, max_seq_len=1024).dir
    srv = make_server(ServeConfig(model=d, port=0, template=TEMPLATE, served_model_name="tiny", batch_size=2,
                                  log_requests=False)).start()
    # slow each engine step a little, so the test sees a reply grow instead of arriving at once
    engine = srv.service.runner.engine
    step = engine.step
    engine.step = lambda: (time.sleep(0.02), step())[1]
    profile = tempfile.mkdtemp(prefix="chromium-")
    browser = Browser(profile)
    yield srv, browser, Transformer.from_pretrained(d).eval(), Tokenizer.from_pretrained(d)
    browser.close()
    srv.close()
    shutil.rmtree(profile, ignore_errors=True)


def greedy(model, tok, messages, max_tokens):
    stops = stop_token_ids(tok, TEMPLATE)
    out = generate(model, [render_prompt(messages, tok, TEMPLATE)], max_tokens, stop_ids=stops)[0]
    return tok.decode([t for t in out if t not in stops]).rstrip("\ufffd").split("<病人>")[0].rstrip()


REPLY = "[...document.querySelectorAll('.msg.assistant')].at(-1)"


def ask(browser, text):
    browser.js(f"document.getElementById('input').value = {json.dumps(text)}")
    browser.js("document.getElementById('send').click()")


def test_page_streams_a_reply(setup):
    srv, browser, model, tok = setup
    browser.call("Page.navigate", url=srv.url + "/")
    browser.wait("document.getElementById('model').textContent === 'tiny'")  # it asked /v1/models
    assert "不构成医疗建议" in browser.js("document.getElementById('notice').textContent")
    browser.js("document.getElementById('temperature').value = '0'")
    browser.js("document.getElementById('max-tokens').value = '24'")

    ask(browser, "头痛怎么办？")
    browser.wait("document.querySelectorAll('.msg.assistant').length === 1")
    seen = set()
    while not browser.js(f"{REPLY}.dataset.done"):
        seen.add(browser.js(f"{REPLY}.textContent"))
        time.sleep(0.01)
    first = greedy(model, tok, [{"role": "user", "content": "头痛怎么办？"}], 24)
    assert browser.js(f"{REPLY}.textContent") == first and first
    assert int(browser.js(f"{REPLY}.dataset.chunks")) > 1
    assert any(s and s != first and first.startswith(s) for s in seen)  # it was seen growing

    # a second turn: the page sends the history with it
    ask(browser, "需要吃什么药？")
    browser.wait(f"document.querySelectorAll('.msg.assistant').length === 2 && {REPLY}.dataset.done", timeout=60)
    history = [{"role": "user", "content": "头痛怎么办？"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "需要吃什么药？"}]
    assert browser.js(f"{REPLY}.textContent") == greedy(model, tok, history, 24)


def test_stop_and_reset(setup):
    srv, browser, _, _ = setup
    browser.js("document.getElementById('reset').click()")
    assert browser.js("document.querySelectorAll('.msg').length") == 0
    browser.js("document.getElementById('temperature').value = '1'")
    browser.js("document.getElementById('max-tokens').value = '600'")  # ~12 s at this pace
    ask(browser, "孩子咳嗽有痰怎么办？")
    browser.wait(f"document.querySelectorAll('.msg.assistant').length === 1 && {REPLY}.dataset.chunks > 2")
    assert browser.js("document.body.dataset.state") == "busy"
    browser.js("document.getElementById('stop').click()")
    browser.wait(f"{REPLY}.dataset.done === 'stopped'", timeout=10)
    assert browser.js("document.body.dataset.state") == "idle"
    deadline = time.time() + 10  # the server noticed the closed stream and freed the slot
    while srv.service.runner.in_flight and time.time() < deadline:
        time.sleep(0.05)
    assert srv.service.runner.in_flight == 0 and srv.service.runner.cancelled >= 1
    browser.js("document.getElementById('reset').click()")
    assert browser.js("document.querySelectorAll('.msg').length") == 0
