"""Layers of StreamingCLAM and slide-SSL runs (MIL layers: :mod:`gigaslide.viewer.state`).

* StreamingCLAM: the attention grid ``gigaslide heatmap-streaming`` saved as
  ``RUN/heatmaps/fold<k>/<slide_id>.npz`` (:mod:`gigaslide.streaming.grids`), one cell per pooled
  feature-map position (level-0 boxes), shown as percentiles like the MIL attention; per-position
  class probabilities when the head has them (mean / max heads). Never recomputed here.
* Slide SSL (SLPD / Giga-SSL): per-tile cluster ids from :mod:`gigaslide.ssl.slide.assign`, computed
  from the run's exported model and the slide's tile features, in a categorical palette.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from gigaslide.errors import GigaslideError
from gigaslide.export.once import Once
from gigaslide.export.runs import Run
from gigaslide.mil.heatmap import percentile
from gigaslide.runs import keeps_caller_rng
from gigaslide.viewer.overlays import TileLattice, palette


@dataclass
class LayerData:
    """What an overlay tile samples: per-cell ``values`` on ``lattice``; ``kind`` score ([0, 1]) or category (ids)."""

    lattice: TileLattice
    values: np.ndarray
    kind: str = "score"
    k: int = 0


def layer(lid: str, name: str, kind: str, available: bool, reason: str | None, **extra: Any) -> dict[str, Any]:
    return {"id": lid, "name": name, "kind": kind, "available": bool(available), "reason": None if available else reason,
            **extra}


def held_out(run: Run, slide_id: str) -> str | None:
    p = run.predictions.get(slide_id)
    return None if p is None else f"fold{p['fold']}"


class StreamingLayers:
    """Saved StreamingCLAM attention grids, read once per (run, slide, fold)."""

    def __init__(self) -> None:
        self._once = Once()

    def folds(self, run: Run, slide_id: str) -> list[str]:
        from gigaslide.streaming.grids import grid_folds

        return [f"fold{k}" for k in grid_folds(run.path, slide_id)]

    def default_fold(self, run: Run, slide_id: str) -> str | None:
        folds = self.folds(run, slide_id)
        held = held_out(run, slide_id)
        return held if held in folds else (folds[0] if folds else None)

    def grid(self, run: Run, slide_id: str, fold: str, size: tuple[int, int]) -> tuple[Any, TileLattice, np.ndarray]:
        """(grid, its lattice, attention percentiles); refuses a grid made on a slide of another size."""
        from gigaslide.streaming.grids import load_grid

        if not (fold.startswith("fold") and fold[4:].isdigit()):
            raise KeyError(fold)

        def make():  # noqa: ANN202
            g = load_grid(run.path, slide_id, int(fold[4:]))
            if tuple(g.slide_size) != tuple(size):
                raise GigaslideError(f"attention grid of a {g.slide_size[0]}x{g.slide_size[1]} px slide, this one is "
                                     f"{size[0]}x{size[1]}", path=run.path / "heatmaps" / fold,
                                     fix="re-run `gigaslide heatmap-streaming` on this slide")
            return g, TileLattice(g.coords, g.box_level0_px), percentile(g.attention)

        # the size is part of the key: two folders may each hold a slide of this id (keys id and id@k)
        return self._once.get((str(run.path), slide_id, fold, tuple(size)), make)

    def layers(self, r_i: int, run: Run, slide_id: str, size: tuple[int, int]) -> list[dict[str, Any]]:
        folds = self.folds(run, slide_id)
        fold = self.default_fold(run, slide_id)
        common = dict(folds=folds, fold=fold, held_out=fold is not None and fold == held_out(run, slide_id), run=run.name)
        name = f"{run.name}: StreamingCLAM attention (percentile)"
        if fold is None:
            why = (f"no attention grid of {slide_id} in {run.path}/heatmaps: run `gigaslide heatmap-streaming SLIDE "
                   f"--run {run.path} --fold K --out PNG`")
            return [layer(f"run{r_i}-attention", name, "score", False, why, cmap="jet", **common)]
        try:
            g, _, _ = self.grid(run, slide_id, fold, size)
        except GigaslideError as e:
            return [layer(f"run{r_i}-attention", name, "score", False, e.one_line(), cmap="jet", **common)]
        out = [layer(f"run{r_i}-attention", name, "score", True, None, cmap="jet", **common)]
        if g.instance_probs is not None:
            out += [layer(f"run{r_i}-prob{c}", f"{run.name}: StreamingCLAM position P({run.class_label(c)})", "score",
                          True, None, cmap="viridis", **common) for c in range(1, g.instance_probs.shape[1])]
        return out

    def values(self, run: Run, slide_id: str, kind: str, fold: str | None, size: tuple[int, int]) -> LayerData:
        fold = fold or self.default_fold(run, slide_id)
        if fold is None:
            raise GigaslideError(f"no attention grid of {slide_id}", path=run.path / "heatmaps",
                                 fix="run `gigaslide heatmap-streaming` on this slide")
        g, lat, pct = self.grid(run, slide_id, fold, size)
        if kind == "attention":
            return LayerData(lat, pct)
        if kind.startswith("prob") and kind[4:].isdigit() and g.instance_probs is not None \
                and int(kind[4:]) < g.instance_probs.shape[1]:
            return LayerData(lat, g.instance_probs[:, int(kind[4:])])
        raise KeyError(kind)

    def info(self, run: Run, slide_id: str, x: float, y: float, size: tuple[int, int]) -> list[dict[str, Any]]:
        """The attention at level-0 point (x, y) for every fold with a grid."""
        out = []
        for fold in self.folds(run, slide_id):
            rec: dict[str, Any] = {"run": run.name, "fold": fold, "held_out": fold == held_out(run, slide_id),
                                   "source": "streaming"}
            try:
                g, lat, pct = self.grid(run, slide_id, fold, size)
                j = lat.at(x, y)
                if j < 0:
                    rec["error"] = "outside the StreamingCLAM attention grid"
                else:
                    rec.update(attention=float(g.attention[j]), attention_percentile=float(pct[j]),
                               slide_probs=[float(v) for v in g.probs])
            except GigaslideError as e:
                rec["error"] = e.one_line()
            out.append(rec)
        return out


class ClusterLayers:
    """Per-tile cluster ids of slide-SSL runs: each run's encoder loaded once, each slide clustered once."""

    NAMES = {"slpd": "nearest region prototype (SLPD, per slide)",
             "gigassl": "tile cluster (Giga-SSL tile states, k-means per slide)"}

    def __init__(self) -> None:
        self._once = Once()

    def config(self, run: Run) -> dict[str, Any]:
        from gigaslide.ssl.slide.export import read_config

        return self._once.get(("config", str(run.path)), lambda: read_config(run.path))

    def check(self, run: Run, key: str, ff: Any) -> None:
        from gigaslide.ssl.slide.assign import check_slide

        def make() -> bool:
            if not (run.path / "model.safetensors").is_file():
                raise GigaslideError("no model.safetensors (pre-training did not finish)", path=run.path,
                                     fix="re-run the same `gigaslide pretrain-slides` command")
            check_slide(run.path, self.config(run), ff)
            return True

        self._once.get(("check", str(run.path), key), make)

    def k(self, run: Run) -> int:
        from gigaslide.ssl.slide.assign import n_clusters

        return n_clusters(self.config(run))

    def layer(self, r_i: int, run: Run, key: str, features: Any, why_no_features: str | None) -> dict[str, Any]:
        """The layer entry of ``run`` for slide ``key`` (``features(key)``: its feature file; None: there is none)."""
        lid, name = f"run{r_i}-clusters", f"{run.name}: {self.NAMES.get(run.kind, run.kind)}"
        try:
            k = self.k(run)
            if features is None:
                raise GigaslideError(why_no_features or "no features")
            self.check(run, key, features(key))
        except GigaslideError as e:
            return layer(lid, name, "category", False, e.one_line(), run=run.name)
        except (KeyError, TypeError, ValueError) as e:  # a run.json without the fields pretrain-slides writes
            why = f"{run.path / 'run.json'}: incomplete config ({type(e).__name__}: {e}) -- fix: re-run pretrain-slides"
            return layer(lid, name, "category", False, why, run=run.name)
        return layer(lid, name, "category", True, None, run=run.name, palette=palette(k))

    def ids(self, run: Run, key: str, ff: Any):  # noqa: ANN201 - TileClusters
        from gigaslide.ssl.slide.assign import tile_clusters

        self.check(run, key, ff)

        def model():  # noqa: ANN202
            if run.kind == "slpd":
                from gigaslide.ssl.slide.slpd import load_encoder
            else:
                from gigaslide.ssl.slide.gigassl import load_encoder
            return load_encoder(run.path)[0]

        enc = self._once.get(("model", str(run.path)), keeps_caller_rng(model))
        return self._once.get(("ids", str(run.path), key), lambda: tile_clusters(run.path, ff, enc))

    def info(self, run: Run, key: str, ff: Any, i: int) -> dict[str, Any]:
        rec: dict[str, Any] = {"run": run.name, "method": run.kind}
        try:
            c = self.ids(run, key, ff)
            cid = int(c.ids[i])
            rec.update(cluster=None if cid < 0 else cid, k=c.k, colour=None if cid < 0 else palette(c.k)[cid])
        except GigaslideError as e:
            rec["error"] = e.one_line()
        return rec
