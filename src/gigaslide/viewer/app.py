"""The viewer's HTTP API (read-only: GET only) and its static page.

Every route addresses slides by their key in the catalogue, never by a file path, so nothing but
the deep-zoom / overlay renderings of the slides named by the given folders and the packaged
static files can be fetched (the static folder is served by Starlette, which refuses ``..``).
A request that reached a loopback address must name a loopback host (:class:`_LoopbackHost`): a web page
the user visits cannot read the viewer through DNS rebinding.
"""

from __future__ import annotations

import io
import ipaddress
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gigaslide.errors import GigaslideError
from gigaslide.export.catalog import text
from gigaslide.viewer.deepzoom import Geometry, TileOutside
from gigaslide.viewer.overlays import COLORMAPS, lut, render_categories, render_grid, render_scores, to_png
from gigaslide.viewer.state import Activity, ViewerState

STATIC = Path(__file__).parent / "static"
OVERLAY_TILE = 256
log = logging.getLogger("gigaslide.viewer")


class NotFound(LookupError):
    pass


def _texts(obj: Any) -> Any:
    """``obj`` with every string valid UTF-8 (:func:`gigaslide.files.shown_name`): a path or message naming a file
    whose name is not UTF-8 made the whole answer fail (the slide list: a 500, an empty page)."""
    if isinstance(obj, str):
        return text(obj)
    if isinstance(obj, dict):
        return {text(str(k)): _texts(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_texts(v) for v in obj]
    return obj


def _tile_address(tile: str) -> tuple[int, int]:
    try:
        col, row = tile.split("_")
        return int(col), int(row)
    except ValueError:
        raise NotFound(f"bad tile address '{tile}' (want COL_ROW)") from None


def _is_loopback(host: str) -> bool:
    """``localhost`` (and ``*.localhost``, which browsers resolve to this machine themselves) or a loopback address."""
    h = host.strip().lower().rstrip(".")
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(h.removeprefix("[").removesuffix("]"))
    except ValueError:
        return False
    return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)


def _not_rebindable(name: str) -> bool:
    """A Host no other site's page can send: a loopback name, or an address typed as such (``0.0.0.0`` of ``--host
    0.0.0.0``, ``127.0.1.1``, a LAN address): DNS rebinding needs a domain name the attacker controls."""
    if _is_loopback(name):
        return True
    try:
        ipaddress.ip_address(name.removeprefix("[").removesuffix("]"))
    except ValueError:
        return False
    return True


def _host_name(header: str) -> str:
    """The name of a Host header (``name``, ``name:port``, ``[::1]:port``) without its port."""
    if header.startswith("["):
        return header[:header.find("]") + 1] if "]" in header else header
    return header.rpartition(":")[0] if header.count(":") == 1 else header


class _LoopbackHost:
    """ASGI middleware: a request that came in on a loopback address (the default ``--host 127.0.0.1``, or a local
    browser's connection to ``--host 0.0.0.0``) is answered only when its Host header is a loopback name or an IP
    address (:func:`_not_rebindable`), or a name in ``allow``.
    Without it a web page the user visits could read every slide, path and tile through DNS rebinding (its own
    domain re-pointed at 127.0.0.1: the browser then treats the viewer as that site). Connections that came in on
    another address (a viewer shared with ``--host 0.0.0.0``) are not checked: they may use any name of the machine.
    ``allow``: more host names to answer (a proxy in front of the viewer -- JupyterHub's jupyter-server-proxy passes the
    browser's Host on, the hub's name); ``*`` answers any."""

    def __init__(self, app, allow: Sequence[str] = ()):  # noqa: ANN001
        self.app = app
        self.allow = {_host_name(h.strip()).lower().rstrip(".") for h in allow if h.strip()}

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        server = scope.get("server") if scope["type"] in ("http", "websocket") else None
        if server and _is_loopback(str(server[0])):
            host = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"host"), "")
            name = _host_name(host).lower().rstrip(".")
            if host and not _not_rebindable(name) and name not in self.allow and "*" not in self.allow:
                from starlette.responses import JSONResponse

                url = f"http://127.0.0.1:{server[1]}/"
                detail = (f"Host '{text(host[:100])}' is not this viewer's address (a page of another site asking "
                          f"through DNS rebinding is refused) -- fix: open {url}; behind a proxy (JupyterHub, Open "
                          f"OnDemand) start the viewer with --allow-host {text(name[:100])}")
                return await JSONResponse({"detail": detail}, status_code=403)(scope, receive, send)
        return await self.app(scope, receive, send)


class _Counted:
    """ASGI middleware: every HTTP request is counted in ``activity`` while it is served."""

    def __init__(self, app, activity: Activity):  # noqa: ANN001
        self.app, self.activity = app, activity

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        with self.activity:
            return await self.app(scope, receive, send)


def build_app(state: ViewerState, allow_hosts: Sequence[str] = ()):  # noqa: ANN201, C901 - one place for every route
    """The viewer's FastAPI app; ``allow_hosts``: Host names answered besides loopback ones (:class:`_LoopbackHost`)."""
    # FastAPI is imported when a viewer is built, not whenever the CLI lists its commands
    from fastapi import FastAPI, Query, Request
    from fastapi.responses import FileResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles

    app = FastAPI(title="gigaslide viewer", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_Counted, activity=state.activity)
    app.add_middleware(_LoopbackHost, allow=tuple(allow_hosts))  # added last: runs first
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    cache = {"Cache-Control": "max-age=600"}

    @app.exception_handler(NotFound)
    @app.exception_handler(TileOutside)
    @app.exception_handler(KeyError)
    @app.exception_handler(IndexError)
    async def not_found(request: Request, exc: Exception) -> JSONResponse:  # noqa: ARG001
        return JSONResponse({"detail": text(f"not found: {exc}".replace("'", ""))}, status_code=404)

    @app.exception_handler(GigaslideError)
    async def unavailable(request: Request, exc: GigaslideError) -> JSONResponse:  # noqa: ARG001
        return JSONResponse({"detail": text(exc.one_line())}, status_code=404)

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception) -> JSONResponse:
        line = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        log.warning("%s -> %s", request.url.path, line)
        return JSONResponse({"detail": text(line)}, status_code=500)

    def key_of(key: str) -> str:
        if key not in state.entries:
            raise NotFound(f"no slide '{key}'")
        return key

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/api/state")
    def api_state() -> dict[str, Any]:
        """Everything the page starts with; no slide is opened for it (rows of slides not opened yet are "pending",
        :func:`slides_known` brings them as they are opened)."""
        checked = len(state.checked)  # before the rows: a slide opened meanwhile comes again with the next rows
        return _texts({"slides": [state.slide_row(k) for k in state.entries], "runs": [r.summary() for r in state.runs],
                       "problems": state.problems, "out_dirs": state.out_dirs, "colormaps": list(COLORMAPS),
                       "version": state.version, "checked": checked, "pending": state.pending()})

    @app.get("/api/slides")
    def slides_known(since: int = Query(0, ge=0)) -> dict[str, Any]:
        """Rows of the slides whose status became known since the page's ``since``-th one (``checked`` counts
        them), for the page to fill in its list while the slides are opened in the background."""
        keys = state.checked[since:]
        return _texts({"slides": [state.slide_row(k) for k in keys], "checked": since + len(keys),
                       "pending": state.pending()})

    @app.get("/api/colormaps/{name}.png")
    def colormap(name: str) -> Response:
        """The colour scale of score layers: a 256 x 1 px strip, pixel i the colour of a value i / 255 (as drawn)."""
        if name not in COLORMAPS:
            raise NotFound(f"colour map '{name}' (choose one of {', '.join(COLORMAPS)})")
        rgba = np.concatenate([lut(name), np.full((256, 1), 255, np.uint8)], 1)[None]
        return Response(to_png(rgba), media_type="image/png", headers=cache)

    def dzi(key: str) -> Response:
        return Response(state.tiles(key_of(key)).geometry.dzi(), media_type="application/xml")

    @app.get("/api/slides/{key}", response_model=None)
    def slide(key: str) -> dict[str, Any] | Response:
        """The slide's details; ``/api/slides/<key>.dzi`` its Deep Zoom descriptor. One route, so that a slide whose
        id ends in ``.dzi`` is found (a route of its own for ``{key}.dzi`` took ``x.dzi`` for the descriptor of
        ``x``); a slide's own key comes first."""
        if key not in state.entries and key.endswith(".dzi") and key[:-4] in state.entries:
            return dzi(key[:-4])
        t = state.tiles(key_of(key))
        g = t.geometry
        mpp, src = state.mpp(key)
        try:
            lat = state.lattice(key)
            size0, n_tiles = lat.size0, len(lat.coords)
        except GigaslideError:
            size0, n_tiles = None, 0
        return _texts({**state.slide_row(key), "width": g.width, "height": g.height, "levels": g.level_count,
                       "tile_size": g.tile_size, "overlap": g.overlap, "overlay_tile_size": OVERLAY_TILE, "mpp": mpp,
                       "mpp_source": src, "backend": t.backend, "tile_size0": size0, "n_tiles": n_tiles,
                       "layers": state.layers(key)})

    @app.get("/api/slides/{key}/dz/{level}/{tile}.jpeg")
    def slide_tile(key: str, level: int, tile: str) -> Response:
        col, row = _tile_address(tile)
        return Response(state.tiles(key_of(key)).tile(level, col, row), media_type="image/jpeg", headers=cache)

    @app.get("/api/slides/{key}/overlay/{layer}/{level}/{tile}.png")
    def overlay_tile(key: str, layer: str, level: int, tile: str, fold: str | None = None,
                     threshold: float = Query(0.0, ge=0.0, le=1.0), cmap: str = "jet") -> Response:
        col, row = _tile_address(tile)
        if cmap not in COLORMAPS:
            raise NotFound(f"colour map '{cmap}' (choose one of {', '.join(COLORMAPS)})")
        g = state.tiles(key_of(key)).geometry
        og = Geometry(g.width, g.height, OVERLAY_TILE, 0)
        box = og.tile_box(level, col, row)
        scale = og.scale(level)
        if layer == "tissue":
            rgba = state.tissue(key).render(box, scale)
        elif layer == "grid":
            rgba = render_grid(state.lattice(key), box, scale)
        elif layer == "nuclei":
            rgba = state.nuclei(key).render(box, scale)
        else:
            d = state.layer_data(key, layer, fold)
            rgba = (render_categories(d.lattice, d.values, box, scale, d.k) if d.kind == "category"
                    else render_scores(d.lattice, d.values, box, scale, cmap, threshold))
        return Response(to_png(rgba), media_type="image/png", headers=cache)

    @app.get("/api/slides/{key}/tile_at")
    def tile_at(key: str, x: float, y: float) -> dict[str, Any]:
        i = state.lattice(key_of(key)).at(x, y)
        if i < 0:
            raise NotFound(f"no tile at ({x:.0f}, {y:.0f})")
        return _texts(state.tile_info(key, i))

    @app.get("/api/slides/{key}/tiles/{i}.jpeg")
    def tile_thumb(key: str, i: int, px: int = Query(96, ge=16, le=512)) -> Response:
        ff = state.features(key_of(key))
        if not 0 <= i < len(ff):
            raise NotFound(f"tile {i} (slide has {len(ff)})")
        img = state.tiles(key).region(int(ff.coords[i, 0]), int(ff.coords[i, 1]), state.lattice(key).size0, px)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        return Response(buf.getvalue(), media_type="image/jpeg", headers=cache)

    @app.get("/api/slides/{key}/tiles/{i}")
    def tile_info(key: str, i: int) -> dict[str, Any]:
        return _texts(state.tile_info(key_of(key), i))

    @app.get("/api/slides/{key}/tiles/{i}/neighbours")
    def neighbours(key: str, i: int, k: int = Query(8, ge=1, le=100)) -> dict[str, Any]:
        ff = state.features(key_of(key))
        if not 0 <= i < len(ff):
            raise NotFound(f"tile {i} (slide has {len(ff)})")
        idx = state.index(key)
        if not idx.has(key):  # left out of the index: say why, not "not found: <key>"
            _, why = state.status(key)
            raise NotFound(f"slide '{key}' is not searched ({why or 'its features are unreadable'})")
        if not idx.searchable(key, i):  # NaN / inf features: similar to nothing (not a list of arbitrary tiles)
            raise NotFound(f"tile {i} of slide '{key}' has NaN/inf features: not searched "
                           "(re-encode the slide in fp32)")
        out = []
        for n in idx.query(key, i, k):
            c = state.features(n.slide).coords[n.index]
            out.append({"slide": n.slide, "index": n.index, "similarity": n.similarity, "x": int(c[0]), "y": int(c[1]),
                        "size0": state.lattice(n.slide).size0})
        return {"slide": key, "index": i, "searched": len(idx), "neighbours": out}

    return app
