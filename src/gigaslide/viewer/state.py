"""Everything the viewer serves, opened lazily and kept: slides, features, tile lattices, layers, search index."""

from __future__ import annotations

import os
import secrets
import threading
import time
from typing import Any

import numpy as np

from gigaslide.errors import GigaslideError
from gigaslide.export.catalog import SlideEntry
from gigaslide.export.once import Once
from gigaslide.export.runs import Run, TileScorer, load_runs
from gigaslide.export.tables import fold_for, tissue_fraction
from gigaslide.features import store
from gigaslide.mil.heatmap import tile_size_of
from gigaslide.mil.train import check_features_fit
from gigaslide.viewer.catalog import Catalog
from gigaslide.viewer.deepzoom import Geometry, SlideTiles
from gigaslide.viewer.neighbours import FeatureIndex
from gigaslide.viewer.overlays import NucleiOutlines, TileLattice, TissueRaster
from gigaslide.viewer.runlayers import ClusterLayers, LayerData, StreamingLayers, layer as _layer


def _same_scan(e: SlideEntry, t: SlideTiles) -> None:
    """Refuse a slide file that is not the scan ``features/<id>.h5`` was cut from: its level-0 size, and where the file
    is not the one the features record (a relative path of the manifest found from another folder, a guess), its
    :func:`~gigaslide.tiling.job.slide_identity` -- another slide under the same name had every layer drawn over it."""
    from gigaslide.tiling.job import IDENTITY_KEY, slide_identity
    from gigaslide.tiling.store import level0_dimensions

    fa = e.feature_attrs or {}
    dims, g = level0_dimensions(fa.get("coords") or {}), t.geometry
    what = None
    if dims is not None and tuple(dims) != (g.width, g.height):
        what = f"is {g.width}x{g.height} px, the slide features/{e.slide_id}.h5 was cut from {dims[0]}x{dims[1]} px"
    elif fa.get(IDENTITY_KEY) and str(fa.get("slide_path")) != str(e.slide_path):
        now = slide_identity(e.slide_path)
        if now is not None and now != fa[IDENTITY_KEY]:
            what = f"is not the file features/{e.slide_id}.h5 was cut from (other bytes, same size in px)"
    if what:
        raise GigaslideError(f"{what}: another slide under this name", path=e.slide_path,
                             fix=f"put the slide the features record ({fa.get('slide_path')}) back, or run the viewer "
                                 f"from the folder the encode job ran in ({e.out_dir / 'manifest.json'} records the "
                                 "slides' paths relative to it)")


class Activity:
    """Requests in flight, so that background work (:meth:`ViewerState.warm`) waits while the page is served."""

    def __init__(self) -> None:
        self._n = 0
        self._last = 0.0
        self._lock = threading.Lock()

    def __enter__(self) -> Activity:
        with self._lock:
            self._n += 1
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._n -= 1
            self._last = time.monotonic()

    def wait_idle(self, stop: threading.Event, quiet: float = 0.3) -> None:
        """Return once no request was in flight for ``quiet`` seconds (or ``stop`` is set)."""
        while not stop.is_set():
            with self._lock:
                idle = self._n == 0 and time.monotonic() - self._last >= quiet
            if idle:
                return
            stop.wait(quiet / 3)


class ViewerState:
    """What the viewer serves. Nothing of a slide is opened until it is asked for: the slide list comes from the
    folders' file names (:class:`~gigaslide.viewer.catalog.Catalog`); a slide's status and size become known when it
    is first opened (by a request, or by :meth:`warm` in the background) and the list's rows fill in then."""

    def __init__(self, out_dirs: list[str | os.PathLike], runs: list[str | os.PathLike] = ()):
        self.out_dirs = [str(d) for d in out_dirs]
        self.catalog = Catalog(list(out_dirs))
        self.entries, self.problems = self.catalog.entries, self.catalog.problems
        self.runs: list[Run] = load_runs(runs, self.problems)
        if not runs:
            self.problems.append("no runs given: attention / probability / cluster layers need `--runs RUN_DIR` "
                                 "(the --out folder of `gigaslide train-mil`, `train-streaming` or `pretrain-slides`)")
        for run in self.runs:
            self.problems += [f"run {run.name}: {p}" for p in run.problems]
        # in every tile URL: a browser keeps tiles for minutes (max-age), and a viewer restarted on the same port
        # with other runs or folders serves other pictures under the same addresses (run0-attention, s0/dz/...)
        self.version = secrets.token_hex(6)
        self.scorer = TileScorer()
        self.streaming = StreamingLayers()
        self.clusters = ClusterLayers()
        self._once = Once()
        self._known: dict[str, tuple[str, str | None, Geometry | None]] = {}  # key -> (status, why, geometry)
        self.checked: list[str] = []  # keys in the order their status became known (rows the page updates)
        self._known_lock = threading.Lock()
        self.activity = Activity()  # the app counts its requests in here
        self.stopping = threading.Event()  # set: warm() stops at the next slide

    # -- lazily opened things ---------------------------------------------------------------------
    def _get(self, what: str, key: str, make):  # noqa: ANN001, ANN202
        return self._once.get((what, key), make)

    def entry(self, key: str) -> SlideEntry:
        """Slide ``key``'s entry, completed (its files' records read) on first use."""
        if key not in self.entries:
            raise KeyError(key)
        return self._get("entry", key, lambda: self.catalog.complete(key))

    def _open(self, key: str) -> SlideTiles:
        e = self.entry(key)
        if e.slide_path is None:
            raise GigaslideError("no slide file recorded for this slide", path=e.out_dir,
                                 fix="re-run `gigaslide encode` (its manifest records each slide's path)")
        t = SlideTiles(e.slide_path, e.slide_mpp)
        try:
            _same_scan(e, t)
        except GigaslideError:
            t.close()
            raise
        return t

    def tiles(self, key: str) -> SlideTiles:
        """The slide's deep-zoom tiles, opened on first use and kept."""
        try:
            t = self._get("tiles", key, lambda: self._open(key))
        except GigaslideError as err:
            self._note(key, err)
            raise
        self._note(key, t)
        return t

    def _note(self, key: str, opened: SlideTiles | GigaslideError) -> tuple[str, str | None, Geometry | None]:
        """Record what opening slide ``key`` showed: its status for the list, and its size."""
        with self._known_lock:
            if key in self._known:
                return self._known[key]
        if isinstance(opened, GigaslideError):
            rec = ("broken", opened.one_line(), None)
        else:
            e = self.entry(key)
            rec = ("ok", None, opened.geometry) if e.features is not None else (
                "no features", f"features/{e.slide_id}.h5 is missing ({e.error or 'not encoded'})", opened.geometry)
        with self._known_lock:
            if key not in self._known:
                self._known[key] = rec
                self.checked.append(key)
            return self._known[key]

    def features(self, key: str):  # noqa: ANN201
        e = self.entry(key)

        def make():  # noqa: ANN202
            if e.features is None:
                raise GigaslideError(f"no features/{e.slide_id}.h5", path=e.out_dir,
                                     fix=f"run `gigaslide encode` for this slide{f' ({e.error})' if e.error else ''}")
            return store.load(e.features)

        return self._get("features", key, make)

    def lattice(self, key: str) -> TileLattice:
        def make() -> TileLattice:
            ff = self.features(key)
            return TileLattice(ff.coords, float(tile_size_of(ff)), ff.tile_step_level0)

        return self._get("lattice", key, make)

    def tissue(self, key: str) -> TissueRaster:
        e = self.entry(key)

        def make() -> TissueRaster:
            if e.tissue_geojson is None:
                raise GigaslideError(f"no tissue/{e.slide_id}.geojson", path=e.out_dir, fix="re-run `gigaslide tile`")
            g = self.tiles(key).geometry
            return TissueRaster(e.tissue_geojson, (g.width, g.height))

        return self._get("tissue", key, make)

    def nuclei(self, key: str) -> NucleiOutlines:
        e = self.entry(key)

        def make() -> NucleiOutlines:
            if e.nuclei_geojson is None:
                raise GigaslideError(f"no nuclei/{e.slide_id}.geojson", path=e.out_dir,
                                     fix="run nuclei segmentation into OUT_DIR/nuclei/")
            return NucleiOutlines(e.nuclei_geojson)

        return self._get("nuclei", key, make)

    def index(self, key: str) -> FeatureIndex:
        """The search index of all slides whose features share this slide's encoder and dimension. Each slide's
        features are read from its file into the index's matrix (not kept open here as well: holding every slide's
        features besides the matrix doubled the memory of a large project's first search)."""
        ff = self.features(key)
        group = (str(ff.encoder), ff.dim)

        def make() -> FeatureIndex:
            feats = {}
            for k in self.entries:
                e = self.entries[k]
                if e.features is None or self.status(k)[0] == "broken":  # broken: no thumbnails of its tiles
                    continue
                try:
                    other = store.load(e.features, arrays=False)  # features read when the index is filled
                except GigaslideError:
                    continue
                if (str(other.encoder), other.dim) == group:
                    feats[k] = other.features
            return FeatureIndex(feats)

        return self._get("index", f"{group[0]}:{group[1]}", make)

    # -- what the page shows ------------------------------------------------------------------------
    def status(self, key: str) -> tuple[str, str | None]:
        """("ok" | "no features" | "broken", why); opens the slide when that is not known yet, and closes it again
        (only the slides viewed are kept open: not a file handle per slide of a large project)."""
        self.entry(key)
        with self._known_lock:
            rec = self._known.get(key)
        if rec is None:
            try:
                t = self._open(key)
            except GigaslideError as err:
                rec = self._note(key, err)
            else:
                t.close()
                rec = self._note(key, t)
        return rec[0], rec[1]

    def known_status(self, key: str) -> tuple[str, str | None]:
        """The status if the slide was opened already, else ("pending", why) -- nothing is opened here."""
        with self._known_lock:
            rec = self._known.get(key)
        return ("pending", "not opened yet") if rec is None else (rec[0], rec[1])

    def pending(self) -> int:
        """How many slides were not opened yet."""
        with self._known_lock:
            return len(self.entries) - len(self._known)

    def slide_row(self, key: str) -> dict[str, Any]:
        """The slide list's row of ``key``, from what is known (a slide not opened yet is "pending")."""
        e = self.entries[key]
        st, why = self.known_status(key)
        preds = {}
        for r in self.runs:
            p = r.predictions.get(e.slide_id)
            if p is not None:
                preds[r.name] = {"label": p["label"], "prob": p["probs"][-1], "fold": p["fold"],
                                 "predicted": int(np.argmax(p["probs"])),
                                 "class_name": r.class_label(p["label"]) if r.class_names else None}
        row = {"key": key, "slide_id": e.slide_id, "status": st, "reason": why, "out_dir": str(e.out_dir),
               "predictions": preds}
        with self._known_lock:
            g = self._known[key][2] if key in self._known else None
        if g is not None:  # the page opens the deep-zoom pyramid with these, before the slide's details arrive
            row.update(width=g.width, height=g.height, levels=g.level_count, tile_size=g.tile_size, overlap=g.overlap)
        return row

    def warm(self) -> None:
        """In the background, after the page is served: open what the first screenful needs (the first slide that
        opens, its features and layers), then every other slide once (closed again) so the list's rows fill in --
        each while no request is being served (the user's views first), until :attr:`stopping` is set."""
        first = True
        for key in list(self.entries):
            self.activity.wait_idle(self.stopping, quiet=0.0 if first else 0.3)
            if self.stopping.is_set():
                return
            if first and self.status(key)[0] == "ok":
                first = False
                try:
                    self.tiles(key)
                    self.lattice(key)
                    self.layers(key)
                except GigaslideError:
                    pass
            else:
                self.status(key)

    def mpp(self, key: str) -> tuple[float | None, str]:
        t = self.tiles(key)
        e = self.entry(key)
        # a --slide-mpp given to encode overrides the metadata (open_slide): its record is what the tiles were cut with
        if t.metadata_mpp and not (e.slide_mpp and abs(e.slide_mpp - t.metadata_mpp) > 1e-6 * t.metadata_mpp):
            return t.metadata_mpp, "slide metadata"
        return (e.slide_mpp, "tiling record (patches/features attrs)") if e.slide_mpp else (None, "unknown")

    def layers(self, key: str) -> list[dict[str, Any]]:
        e = self.entry(key)
        why_feats = f"features/{e.slide_id}.h5 is missing" if e.features is None else None
        if why_feats is None:
            try:  # a damaged file: its layers say so, rather than offering layers whose every tile is refused
                self.features(key)
            except GigaslideError as err:
                why_feats = err.one_line()
        feats_ok = why_feats is None
        out = [
            _layer("tissue", "tissue mask", "mask", e.tissue_geojson is not None, f"no tissue/{e.slide_id}.geojson"),
            _layer("grid", "tile grid", "grid", feats_ok, why_feats),
            _layer("nuclei", "nuclei outlines", "nuclei", e.nuclei_geojson is not None,
                   f"no nuclei/{e.slide_id}.geojson in {e.out_dir}"),
        ]
        for r_i, run in enumerate(self.runs):
            if run.kind == "streaming":
                out += self.streaming.layers(r_i, run, e.slide_id, self._size(key))
            elif run.kind in ("slpd", "gigassl"):
                out.append(self.clusters.layer(r_i, run, key, self.features if feats_ok else None, why_feats))
            if run.kind != "mil":
                continue
            fold = fold_for(run, e.slide_id)
            held = run.held_out_fold(e.slide_id) is not None
            n_classes = int(run.meta.get("n_classes", 2) or 2)
            common = dict(folds=run.folds, fold=fold, held_out=held, run=run.name)
            ok, why = feats_ok, why_feats
            if ok and "in_dim" in run.meta:  # features of another encoder: the scorer refuses every tile of the layer
                try:
                    check_features_fit(run.meta, self.features(key), run.path / run.folds[0],
                                       fix="view the run with the OUT_DIR whose encoder it was trained on")
                except GigaslideError as err:
                    ok, why = False, err.one_line()
            out.append(_layer(f"run{r_i}-attention", f"{run.name}: attention (percentile)", "score", ok, why,
                              cmap="jet", **common))
            for c in range(1, n_classes):
                out.append(_layer(f"run{r_i}-prob{c}", f"{run.name}: tile P({run.class_label(c)})", "score", ok, why,
                                  cmap="viridis", **common))
        return out

    def _size(self, key: str) -> tuple[int, int]:
        g = self.tiles(key).geometry
        return g.width, g.height

    def _run_layer(self, layer: str):  # noqa: ANN202 - (run, layer kind)
        """``run<i>-<kind>`` -> (the i-th run, kind); KeyError for any other name (``xyz0-attention`` too)."""
        run_part, _, kind = layer.partition("-")
        if not (run_part.startswith("run") and run_part[3:].isdigit() and kind) or int(run_part[3:]) >= len(self.runs):
            raise KeyError(layer)
        return self.runs[int(run_part[3:])], kind

    def layer_data(self, key: str, layer: str, fold: str | None) -> LayerData:
        """What a run's layer (``run<i>-attention`` / ``run<i>-prob<c>`` / ``run<i>-clusters``) draws."""
        run, kind = self._run_layer(layer)
        sid = self.entry(key).slide_id
        if run.kind == "streaming":
            return self.streaming.values(run, sid, kind, fold, self._size(key))
        if run.kind in ("slpd", "gigassl") and kind == "clusters":
            c = self.clusters.ids(run, key, self.features(key))
            return LayerData(self.lattice(key), c.ids, "category", c.k)
        if run.kind != "mil":
            raise KeyError(layer)
        return LayerData(self.lattice(key), self.layer_values(key, layer, fold))

    def layer_values(self, key: str, layer: str, fold: str | None) -> np.ndarray:
        """Per-tile values in [0, 1] of a MIL score layer (``run<i>-attention`` / ``run<i>-prob<c>``)."""
        run, kind = self._run_layer(layer)
        if run.kind != "mil":
            return self.layer_data(key, layer, fold).values
        fold = fold or fold_for(run, self.entry(key).slide_id)
        ff = self.features(key)
        if kind == "attention":
            return self.scorer.scores(run, fold, ff, "attention_pct")
        if kind.startswith("prob") and kind[4:].isdigit():
            probs = self.scorer.scores(run, fold, ff, "probability")
            c = int(kind[4:])
            if c >= probs.shape[1]:
                raise KeyError(layer)
            return probs[:, c]
        raise KeyError(layer)

    def tile_info(self, key: str, i: int) -> dict[str, Any]:
        ff = self.features(key)
        lat = self.lattice(key)
        if not 0 <= i < len(ff):
            raise IndexError(f"tile {i} (slide has {len(ff)})")  # not "not found: 0"
        e = self.entry(key)
        scores, clusters = [], []
        cx, cy = float(ff.coords[i, 0]) + lat.size0 / 2, float(ff.coords[i, 1]) + lat.size0 / 2
        for run in self.runs:
            if run.kind == "streaming":
                scores += self.streaming.info(run, e.slide_id, cx, cy, self._size(key))
            elif run.kind in ("slpd", "gigassl"):
                clusters.append(self.clusters.info(run, key, ff, i))
            if run.kind != "mil":
                continue
            default = fold_for(run, e.slide_id)
            for fold in run.folds:
                rec: dict[str, Any] = {"run": run.name, "fold": fold, "held_out": fold == run.held_out_fold(e.slide_id)}
                try:
                    rec["attention"] = float(self.scorer.scores(run, fold, ff, "attention")[i])
                    rec["attention_percentile"] = float(self.scorer.scores(run, fold, ff, "attention_pct")[i])
                    if fold == default:  # one forward pass per tile: only for the fold the layers show first
                        rec["tile_probs"] = [float(v) for v in self.scorer.scores(run, fold, ff, "probability")[i]]
                    rec["slide_probs"] = [float(v) for v in self.scorer.scores(run, fold, ff, "slide_probs")]
                except GigaslideError as err:
                    rec["error"] = err.one_line()
                scores.append(rec)
        tissue = float(tissue_fraction(e, ff.coords[i:i + 1])[0])
        return {"slide": key, "index": i, "x": int(ff.coords[i, 0]), "y": int(ff.coords[i, 1]), "size0": lat.size0,
                "tissue": None if np.isnan(tissue) else tissue, "scores": scores, "clusters": clusters}

