"""Commands to look at results: ``view`` (slide viewer in the browser) and ``export anndata|qupath``."""

from __future__ import annotations

from gigaslide.cli.main import Command


def _paths(v: list[str] | str | None) -> list[str]:
    """``--runs A``, ``--runs A,B`` or ``--runs [A,B]`` -> [A, B]."""
    if v is None:
        return []
    items = [v] if isinstance(v, str) else list(v)
    return [p for item in items for p in str(item).split(",") if p]


def view(out_dirs: list[str], runs: list[str] | str | None = None, port: int = 8765, host: str = "127.0.0.1",
         allow_host: list[str] | str | None = None) -> None:
    """Serve a read-only slide viewer (deep-zoom slides, attention / tissue / grid / nuclei overlays) until Ctrl-C.

    Example: gigaslide view OUT_DIR --runs RUN_DIR --port 8765

    Args:
        out_dirs: encode output folder(s) (OUT/manifest.json, OUT/features/, OUT/patches/, OUT/tissue/, OUT/nuclei/)
        runs: run folder(s) shown as layers: `train-mil` (attention, tile probabilities), `train-streaming` (the attention
            grids `heatmap-streaming` saved), `pretrain-slides` (SLPD prototype / Giga-SSL cluster per tile); several: --runs A,B
        port: TCP port (0 picks a free one)
        host: address to listen on; 127.0.0.1 keeps the viewer on this machine
        allow_host: host names answered on 127.0.0.1 besides localhost: the name of a proxy the viewer is reached
            through (JupyterHub's jupyter-server-proxy passes the hub's name on), '*' any; other names are refused, so
            that a web page of another site cannot read the viewer (DNS rebinding)
    """
    from gigaslide.viewer import Server, ViewerState, build_app  # heavy (torch, FastAPI): only when the command runs

    state = ViewerState(out_dirs, _paths(runs))
    # --host's own name too: the URL printed below (a machine name Debian maps to 127.0.1.1)
    server = Server(build_app(state, [*_paths(allow_host), host]), host=host, port=port)
    import threading

    # no slide is opened before the page is served (thousands of slides: seconds); the first slide is opened while
    # the page loads, then the others one by one, and the page's slide list fills in their status
    warm = threading.Thread(target=state.warm, name="viewer-warm", daemon=True)
    warm.start()
    for p in state.problems:
        print(f"note: {p}")
    try:
        server.run(on_ready=lambda url: print(f"{url}   ({len(state.entries)} slides, {len(state.runs)} run(s); "
                                               "Ctrl-C stops)", flush=True))
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown, or returns: both end here
        pass
    finally:  # a thread stopped inside h5py at exit would deadlock the interpreter's exit (h5py's lock)
        state.stopping.set()
        warm.join(timeout=30)
    print("viewer stopped", flush=True)


def export_anndata(out_dirs: list[str], out: str = "features.h5ad", runs: list[str] | str | None = None,
                   tile_probability: bool = False) -> None:
    """Write tile features as AnnData (.h5ad) for scverse: X = features, obs = slide / tile / labels / predictions.

    Example: gigaslide export anndata OUT_DIR --out features.h5ad --runs RUN_DIR

    Args:
        out_dirs: encode output folder(s)
        out: the .h5ad file to write
        runs: training run folder(s) whose slide predictions and tile attention go into obs
        tile_probability: also each tile's class probability alone (one model pass per tile)
    """
    from gigaslide.export import export_anndata as run_export  # heavy (torch, anndata): only when the command runs

    path, adata, problems = run_export(out_dirs, out, _paths(runs), tile_probability)
    for p in problems:
        print(f"note: {p}")
    print(f"wrote {path}: {adata.n_obs} tiles x {adata.n_vars} features from {adata.obs['slide_id'].nunique()} slides; "
          f"obs: {', '.join(adata.obs.columns)}; obsm['spatial'] = level-0 px")


def export_qupath(out_dirs: list[str], out: str = "geojson", runs: list[str] | str | None = None, object_type: str = "tile",
                  tile_probability: bool = True) -> None:
    """Write one QuPath GeoJSON per slide: tile polygons (level-0 px) with attention / probability measurements.

    Example: gigaslide export qupath OUT_DIR --runs RUN_DIR --out geojson/

    Args:
        out_dirs: encode output folder(s)
        out: folder for <slide>.geojson files
        runs: training run folder(s) whose scores become measurements
        object_type: QuPath object type of each tile: tile, detection or annotation
        tile_probability: also each tile's class probability alone (one model pass per tile)
    """
    from gigaslide.export import export_qupath as run_export  # heavy: only when the command runs

    files, problems = run_export(out_dirs, out, _paths(runs), object_type, tile_probability)
    for p in problems:
        print(f"note: {p}")
    print(f"wrote {len(files)} GeoJSON file(s) to {out} (QuPath: File > Import objects, or drag onto the slide)")


COMMANDS: dict = {
    "view": Command(view, positional="out_dirs"),
    "export": {
        "anndata": Command(export_anndata, positional="out_dirs"),
        "qupath": Command(export_qupath, positional="out_dirs"),
    },
}
