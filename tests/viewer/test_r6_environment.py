"""Round 6: the viewer in the user's environment -- served behind a reverse proxy under a path prefix (JupyterHub's
jupyter-server-proxy ``/user/NAME/proxy/PORT/``, Open OnDemand's ``/rnode/HOST/PORT/``, code-server's ``/proxy/PORT/``:
how a cluster's compute node is reached from a browser elsewhere)."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

from gigaslide.viewer import ViewerState, build_app
from gigaslide.viewer.app import STATIC

PREFIX = "/user/me/proxy/8765/"


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:  # noqa: ANN001
        a = dict(attrs)
        ref = a.get("src") or (a.get("href") if tag == "link" else None)
        if ref and not ref.startswith("data:"):
            self.refs.append(ref)


def test_page_works_behind_a_proxy_under_a_path_prefix(tiny):
    """The page asked for /static/... and /api/... from the proxy's root, outside the prefix: behind a proxy the page
    stayed empty (its script, style and every API answer 404)."""
    from fastapi.testclient import TestClient
    from starlette.applications import Starlette
    from starlette.routing import Mount

    proxy = Starlette(routes=[Mount(PREFIX.rstrip("/"), app=build_app(ViewerState([tiny.out], [tiny.run])))])
    c = TestClient(proxy)
    page = c.get(PREFIX)
    assert page.status_code == 200 and "gigaslide viewer" in page.text
    p = _Refs()
    p.feed(page.text)
    assert len(p.refs) == 4  # the state preload, the style, OpenSeadragon and the page's script
    for ref in p.refs:
        url = urlsplit(urljoin("http://node" + PREFIX, ref))
        r = c.get(url.path)
        assert url.path.startswith(PREFIX) and r.status_code == 200, (ref, r.status_code)
    # the script asks for every API address relative to the page as well
    js = (STATIC / "viewer.js").read_text()
    assert re.findall(r"[`\"'](/(?:api|static)/[^`\"']*)", js) == []
    assert len(re.findall(r"[`\"']api/", js)) >= 9


def test_page_in_a_browser_behind_a_proxy_shows_the_slide(tiny):
    """The same in headless Chromium (skipped without it): the page under the prefix loads the slide's tiles and says
    nothing on the console (each absolute address was a 404 there)."""
    import shutil

    import pytest

    chromium = shutil.which("chromium")
    pw = pytest.importorskip("playwright.sync_api", reason="playwright (pip, test extra) is not installed")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed")
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from gigaslide.viewer import Server

    state = ViewerState([tiny.out], [tiny.run])
    server = Server(Starlette(routes=[Mount(PREFIX.rstrip("/"), app=build_app(state))]), port=0).start()
    try:
        with pw.sync_playwright() as p:
            b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
            page = b.new_page(viewport={"width": 1200, "height": 800})
            console, asked = [], []
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
            page.on("response", lambda r: asked.append((urlsplit(r.url).path, r.status)))
            page.goto(server.url + PREFIX)
            page.wait_for_function("window.gigaslide && window.gigaslide.allLoaded()", timeout=60000)
            b.close()
    finally:
        server.stop()
    assert console == []
    tiles = [a for a in asked if "/dz/" in a[0]]
    assert tiles and all(path.startswith(PREFIX + "api/slides/") and status == 200 for path, status in tiles), tiles
    assert all(status == 200 for _, status in asked), [a for a in asked if a[1] != 200]


def _latin1_names(out) -> str:  # noqa: ANN001
    """What a cohort with a Latin-1 file name leaves: ``encode`` refuses the slide ``caf\\xe9`` and records it in
    manifest.json under its name as Python holds it (a lone surrogate per undecodable byte); another tool's features
    file ``s\\xff.h5`` (a copy of s1's) beside. Returns the id the viewer and the exports show for the latter."""
    import json
    import os
    import shutil

    man = json.loads((out / "manifest.json").read_text())
    bad = os.fsdecode(b"caf\xe9")
    man["slides"][bad] = {"status": "failed", "path": str(out.parent / "slides" / f"{bad}.svs"),
                          "error": "the path is not valid UTF-8"}
    (out / "manifest.json").write_text(json.dumps(man))
    shutil.copy(out / "features" / "s1.h5", os.fsencode(out / "features") + b"/s\xff.h5")
    return "s\\xff"


def test_slides_whose_file_names_are_not_utf8_are_listed_and_open(tiny_copy):
    """A lone surrogate cannot be written as JSON: /api/state answered 500 and the page stayed empty for every slide."""
    from urllib.parse import quote

    from fastapi.testclient import TestClient

    shown = _latin1_names(tiny_copy.out)
    c = TestClient(build_app(ViewerState([tiny_copy.out], [tiny_copy.run])))
    r = c.get("/api/state")
    assert r.status_code == 200, r.text
    rows = {s["key"]: s for s in r.json()["slides"]}
    assert sorted(rows) == ["caf\\xe9", "s0", "s1", "s2", "s3", "s4", "s5", shown]
    assert rows["caf\\xe9"]["slide_id"] == "caf\\xe9"
    r = c.get(f"/api/slides/{quote(shown, safe='')}")
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["n_tiles"] > 0, r.text
    refused = quote("caf\\xe9", safe="")
    r = c.get(f"/api/slides/{refused}")  # its slide file is not there: one line naming it, not a 500
    assert r.status_code == 404 and "caf\\xe9.svs" in r.json()["detail"], r.text
