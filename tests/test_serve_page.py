"""The chat page of ``llmtune api`` (``GET /``) in a real browser: headless Chromium (Debian's ``chromium``
package) driven over the Chrome DevTools protocol. The test types an API key, a message and the sampling
settings, clicks Send and reads the streamed reply from the page; the reference is the same request sent
without streaming (greedy, so the text must be equal).

The DevTools protocol is spoken over ``--remote-debugging-pipe`` (JSON messages ended by a NUL byte on file
descriptors 3 and 4, as Puppeteer's pipe transport does): no websocket library is needed. Without chromium on
PATH (or ``LLMTUNE_CHROMIUM``) the browser tests skip with the reason. ``LLMTUNE_PAGE_SCREENSHOT=path.png``
saves the page after the reply (docs/serving_chat_page.png is made this way with the real model).
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from reliability_helpers import make_model_folder  # noqa: E402
from serve_helpers import live_server  # noqa: E402

httpx = pytest.importorskip("httpx")

KEY = "sk-page-test"


def chromium_path() -> str | None:
    exe = os.environ.get("LLMTUNE_CHROMIUM")
    if exe:
        return exe
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


class Browser:
    """Headless Chromium with the DevTools protocol on a pipe; one page (``open``), commands by ``call``."""

    def __init__(self, exe: str, profile: Path, timeout: float = 60.0) -> None:
        to_child, self._w = os.pipe()       # we write commands, chromium reads them on fd 3
        self._r, from_child = os.pipe()     # chromium writes replies and events on fd 4
        hi_r = fcntl.fcntl(to_child, fcntl.F_DUPFD, 10)
        hi_w = fcntl.fcntl(from_child, fcntl.F_DUPFD, 10)

        def fds() -> None:                  # in the child: its fd 3 and 4 (dup2 clears close-on-exec)
            os.dup2(hi_r, 3)
            os.dup2(hi_w, 4)

        args = [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--remote-debugging-pipe", f"--user-data-dir={profile}", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
                "--window-size=1200,760", "about:blank"]
        self.proc = subprocess.Popen(args, preexec_fn=fds, close_fds=False, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for fd in (to_child, from_child, hi_r, hi_w):
            os.close(fd)
        self.timeout = timeout
        self._next = 0
        self._replies: dict = {}
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.session = None

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                data = os.read(self._r, 1 << 16)
            except OSError:
                data = b""
            if not data:
                with self._cond:
                    self._replies["eof"] = True
                    self._cond.notify_all()
                return
            buf += data
            while b"\0" in buf:
                msg, buf = buf.split(b"\0", 1)
                m = json.loads(msg)
                if "id" in m:
                    with self._cond:
                        self._replies[m["id"]] = m
                        self._cond.notify_all()

    def call(self, method: str, session: bool = True, **params):
        """Send one DevTools command (to the page's session unless ``session`` is False); returns its result."""
        self._next += 1
        i = self._next
        msg = {"id": i, "method": method, "params": params}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        with self._cond:
            while i not in self._replies:
                if self._replies.get("eof"):
                    raise RuntimeError(f"chromium exited: {self.proc.stderr.read().decode()[-2000:]}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no DevTools reply to {method} in {self.timeout} s")
                self._cond.wait(left)
            reply = self._replies.pop(i)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    def open(self, url: str) -> None:
        """Open ``url`` in a new page and wait until it has loaded."""
        target = self.call("Target.createTarget", session=False, url=url)["targetId"]
        self.session = self.call("Target.attachToTarget", session=False, targetId=target, flatten=True)["sessionId"]
        self.call("Runtime.enable")
        self.wait(f"document.readyState === 'complete' && location.href === {json.dumps(url)}")

    def js(self, expr: str):
        """The value of a JavaScript expression in the page (JSON-serialisable results only)."""
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expr}: {r['exceptionDetails'].get('text')} {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait(self, expr: str, timeout: float = 60.0):
        """Poll ``expr`` until it is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            try:
                v = self.js(expr)
            except RuntimeError as e:     # e.g. the page is still navigating (its context was replaced)
                v, last = None, e
            if v:
                return v
            if time.monotonic() > deadline:
                raise TimeoutError(f"the page never got {expr!r} (last error: {last})")
            time.sleep(0.1)

    def click(self, selector: str) -> None:
        """A real mouse click (press + release) at the centre of the element."""
        box = self.js(f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
                      " return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def type(self, selector: str, text: str) -> None:
        """Focus the field, select what it holds and type ``text`` over it (``Input.insertText``)."""
        self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.focus(); e.select(); }})()")
        self.call("Input.insertText", text=text)

    def screenshot(self, path: str) -> None:
        """Save the page as a PNG (``Page.captureScreenshot``)."""
        Path(path).write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        """Close the browser (``Browser.close``, else kill it) and the pipes."""
        try:
            self.call("Browser.close", session=False)
        except Exception:  # noqa: BLE001 - it may already be gone
            pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)
        for fd in (self._w, self._r):
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture
def browser(tmp_path):
    exe = chromium_path()
    if exe is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium; or set LLMTUNE_CHROMIUM)")
    b = Browser(exe, tmp_path / "profile")
    try:
        yield b
    finally:
        b.close()


def test_page_is_one_self_contained_file(tmp_path):
    d = make_model_folder(tmp_path / "tiny")
    with live_server(["--model_name_or_path", str(d), "--api_key", KEY, "--served_model_name", "tiny"]) as (base, _):
        r = httpx.get(base + "/", timeout=30)        # the page needs no key; the API behind it does
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        html = r.text
    assert "<script>" in html and "/v1/chat/completions" in html and "/v1/models" in html
    for outside in ("http://", "https://", "src=", "<link", "@import", "url("):   # nothing loaded from elsewhere
        assert outside not in html, outside


def _chat_in_browser(b: Browser, base: str, model: str, text: str, max_tokens: int, key: str | None) -> dict:
    b.open(base + "/")
    if key is not None:
        assert "API key" in b.wait("document.getElementById('status').textContent.includes('API key') && "
                                   "document.getElementById('status').textContent")
        b.type("#api_key", key)
        b.click("#reload")
    options = b.wait("(() => { const o = [...document.getElementById('model').options].map(x => x.value);"
                     " return o.length ? o : null; })()")
    assert model in options
    b.js(f"document.getElementById('model').value = {json.dumps(model)}")
    b.type("#temperature", "0")
    b.type("#top_p", "1")
    b.type("#max_tokens", str(max_tokens))
    b.type("#input", text)
    b.click("#send")
    b.wait("(() => { const m = document.querySelectorAll('.msg.assistant, .msg.error');"
           " return m.length && m[m.length - 1].dataset.done; })()", timeout=240)
    return b.js("(() => { const m = document.querySelectorAll('.msg.assistant');"
                " const e = m[m.length - 1]; return e ? {reply: e.dataset.reply, chunks: Number(e.dataset.chunks),"
                " meta: e.querySelector('.meta').textContent, user: document.querySelector('.msg.user').textContent}"
                " : {error: document.querySelector('.msg.error').textContent}; })()")


def _reference(base: str, model: str, text: str, max_tokens: int, key: str | None) -> str:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.post(base + "/v1/chat/completions", headers=headers, timeout=240,
                   json={"model": model, "messages": [{"role": "user", "content": text}], "temperature": 0,
                         "top_p": 1, "max_tokens": max_tokens})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_browser_streams_a_reply_equal_to_the_non_streamed_one(browser, tmp_path):
    d = make_model_folder(tmp_path / "tiny", max_positions=512)
    text = "what is the color of sky"
    with live_server(["--model_name_or_path", str(d), "--api_key", KEY, "--served_model_name", "tiny",
                      "--max_model_len", "512"]) as (base, _):
        got = _chat_in_browser(browser, base, "tiny", text, 12, KEY)
        expected = _reference(base, "tiny", text, 12, KEY)
    assert "error" not in got, got
    assert got["user"] == text
    assert got["reply"] == expected and expected
    assert got["chunks"] >= 2                      # it arrived in pieces, not at once
    assert "12 tokens" in got["meta"] and "finish: length" in got["meta"]


@pytest.mark.real
def test_browser_chat_with_the_real_model(browser):
    from shared_inputs import real_model

    m = str(real_model())
    text = "What is the capital of France?"
    with live_server(["--model_name_or_path", m, "--max_model_len", "512", "--max_num_seqs", "2",
                      "--served_model_name", "SmolLM2-135M-Instruct"], timeout=240) as (base, _):
        got = _chat_in_browser(browser, base, "SmolLM2-135M-Instruct", text, 48, None)
        expected = _reference(base, "SmolLM2-135M-Instruct", text, 48, None)
        shot = os.environ.get("LLMTUNE_PAGE_SCREENSHOT")
        if shot:
            browser.screenshot(shot)
    assert got["reply"] == expected and "Paris" in expected
    assert got["chunks"] >= 2


def test_browser_stop_cancels_the_request_and_frees_its_slot(browser, tmp_path):
    d = make_model_folder(tmp_path / "tiny", max_positions=4096)
    with live_server(["--model_name_or_path", str(d), "--served_model_name", "tiny", "--max_model_len", "4096"]) \
            as (base, _):
        browser.open(base + "/")
        browser.wait("document.getElementById('model').options.length")
        browser.type("#temperature", "0")
        browser.type("#max_tokens", "4000")
        browser.type("#input", "tell me everything")
        browser.click("#send")
        browser.wait("(() => { const m = document.querySelector('.msg.assistant');"
                     " return m && Number(m.dataset.chunks) >= 3; })()")
        assert httpx.get(base + "/health", timeout=30).json()["running"] == 1
        browser.click("#stop")
        meta = browser.wait("(() => { const m = document.querySelector('.msg.assistant');"
                            " return m.dataset.done && m.querySelector('.meta').textContent; })()")
        assert "stopped" in meta
        deadline = time.monotonic() + 30
        while httpx.get(base + "/health", timeout=30).json()["running"] != 0:   # the server cancelled it
            assert time.monotonic() < deadline, "the stopped request still holds its slot"
            time.sleep(0.2)
        assert browser.js("document.getElementById('send').disabled") is False
