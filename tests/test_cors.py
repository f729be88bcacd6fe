"""CORS on the bridge (docs/adr/0016-metrics-traces-cors.md), as a browser sees it.

Headless Chromium loads a page from one origin (a small aiohttp server on 127.0.0.1)
whose script streams a chat completion from the bridge on another port with
``fetch``, reading the body incrementally, and writes what it read into the DOM;
``--dump-dom`` prints that DOM once the page has loaded, and an image the page server
holds until the script reports it wrote its result keeps the load event from firing
before (no timing assumption). An allowed origin reads the reply; any other origin
is blocked by the browser (the fetch rejects). The HTTP-level checks (preflight
answer, headers on a streamed reply, off by default) run without a browser.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import re
import shutil
import tempfile
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from inferd.backends.mock import Mock
from inferd.serve import cors
from inferd.serve.bridge import make_app
from tests.conftest import missing

#: Seconds Chromium gets to load the page and run the fetch (generous: a cold start).
BROWSER_TIMEOUT_S = 90
TOKENS = ["Hello", " from", " the", " bridge"]

PAGE = """<!doctype html><html><body><pre id="out">pending</pre><script>
(async () => {
  const out = document.getElementById("out");
  try {
    const r = await fetch("BRIDGE/v1/chat/completions", {
      method: "POST",
      headers: {"Content-Type": "application/json", "Authorization": "Bearer k"},
      body: JSON.stringify({model: "m", stream: true,
                            messages: [{role: "user", content: "hi"}]}),
    });
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let text = "", reads = 0;
    for (;;) {
      const {done, value} = await reader.read();
      if (done) break;
      reads += 1;
      text += dec.decode(value, {stream: true});
    }
    let content = "";
    for (const line of text.split("\\n")) {
      if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
      const d = JSON.parse(line.slice(6)).choices[0].delta;
      if (d.content) content += d.content;
    }
    out.textContent = "OK reads=" + reads + " content=" + content;
  } catch (e) {
    out.textContent = "FAILED " + e.name;
  }
  await fetch("/written", {method: "POST"});  // same origin: lets the load event fire
})();
</script><img src="/hold" alt=""></body></html>"""


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        missing("chromium (Debian package 'chromium')")
    assert path is not None
    return path


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


async def _browse(url: str) -> str:
    """The DOM of ``url`` after its script ran, as headless Chromium prints it."""
    with tempfile.TemporaryDirectory(prefix="ifd-chromium-") as profile:
        proc = await asyncio.create_subprocess_exec(
            _chromium(),
            "--headless",
            "--no-sandbox",  # tests may run as root in CI containers
            "--disable-gpu",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--dump-dom",
            url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), BROWSER_TIMEOUT_S)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    return out.decode()


@contextlib.asynccontextmanager
async def _page_and_bridge(origins: list[str] | None) -> AsyncIterator[str]:
    """The page's URL; the bridge allows ``origins`` (``None``: the page's own origin)."""
    where: dict[str, str] = {}
    written = asyncio.Event()

    async def index(_: web.Request) -> web.Response:
        page = PAGE.replace("BRIDGE", where["bridge"])
        return web.Response(text=page, content_type="text/html")

    async def hold(_: web.Request) -> web.Response:
        """Held until the script wrote its result: the page's load event (after which
        --dump-dom prints the DOM) waits for this image."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(written.wait(), BROWSER_TIMEOUT_S / 2)
        return web.Response(status=204)

    async def mark(_: web.Request) -> web.Response:
        written.set()
        return web.Response(status=204)

    page_app = web.Application()
    page_app.router.add_get("/", index)
    page_app.router.add_get("/hold", hold)
    page_app.router.add_post("/written", mark)
    page_runner, page = await _serve(page_app)
    allowed = [page] if origins is None else origins
    app = make_app(Mock(TOKENS, delay=0.01), api_key="k", cors_origins=allowed)
    bridge_runner, where["bridge"] = await _serve(app)
    try:
        yield page + "/"
    finally:
        await page_runner.cleanup()
        await bridge_runner.cleanup()


def _result(dom: str) -> str:
    m = re.search(r'<pre id="out">(.*?)</pre>', dom, re.S)
    assert m, f"no result element in the DOM: {dom[:300]!r}"
    return html.unescape(m.group(1))


async def test_browser_on_allowed_origin_streams_the_reply():
    async with _page_and_bridge(None) as page:
        result = _result(await _browse(page))
    assert result.startswith("OK "), result
    assert result.endswith("content=" + "".join(TOKENS)), result


async def test_browser_on_other_origin_is_blocked():
    async with _page_and_bridge(["http://127.0.0.1:1"]) as page:  # another origin only
        result = _result(await _browse(page))
    assert result == "FAILED TypeError", result  # fetch rejects: the browser blocked it


# --------------------------------------------------------------------------- HTTP level

ORIGIN = "http://127.0.0.1:5173"


async def test_preflight_answered_before_the_key_check():
    app = make_app(Mock(TOKENS), api_key="secret", cors_origins=[ORIGIN])
    async with TestClient(TestServer(app)) as tc:
        r = await tc.options(
            "/v1/chat/completions",
            headers={
                "Origin": ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert r.status == 204
        assert r.headers["Access-Control-Allow-Methods"] == cors.ALLOWED_METHODS
        assert r.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
        assert r.headers["Access-Control-Max-Age"] == str(cors.CORS_MAX_AGE_S)
        bad = await tc.options(
            "/v1/chat/completions",
            headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert bad.status == 403
        assert "Access-Control-Allow-Origin" not in bad.headers
        odd = await tc.options(
            "/v1/chat/completions",
            headers={
                "Origin": ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "x" * (cors.MAX_REQUEST_HEADERS_CHARS + 1),
            },
        )
        assert odd.status == 204 and "Access-Control-Allow-Headers" not in odd.headers


async def test_streamed_and_error_replies_carry_the_headers():
    app = make_app(Mock(TOKENS), api_key="secret", cors_origins=[ORIGIN])
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with TestClient(TestServer(app)) as tc:
        auth = {"Origin": ORIGIN, "Authorization": "Bearer secret"}
        r = await tc.post("/v1/chat/completions", json=body, headers=auth)
        assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
        assert r.headers["Access-Control-Allow-Origin"] == ORIGIN
        assert "Origin" in r.headers.getall("Vary")
        assert b"data: [DONE]" in await r.read()
        denied = await tc.post("/v1/chat/completions", json=body, headers={"Origin": ORIGIN})
        assert denied.status == 401  # the page can read why it failed
        assert denied.headers["Access-Control-Allow-Origin"] == ORIGIN
        other = await tc.post(
            "/v1/chat/completions", json=body, headers={**auth, "Origin": "http://evil.example"}
        )
        assert other.status == 200 and "Access-Control-Allow-Origin" not in other.headers


async def test_off_by_default():
    app = make_app(Mock(TOKENS))
    async with TestClient(TestServer(app)) as tc:
        r = await tc.options(
            "/v1/chat/completions",
            headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"},
        )
        assert "Access-Control-Allow-Origin" not in r.headers
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        r = await tc.post("/v1/chat/completions", json=body, headers={"Origin": ORIGIN})
        assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers


def test_cors_needs_an_origin():
    with pytest.raises(ValueError, match="at least one origin"):
        cors.Cors([])
