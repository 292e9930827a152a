"""``gigaslide benchmark``: tile-level and slide-level scores of several encoders in one table.

For each encoder (registry name or exported encoder folder, see ``gigaslide encoders``):

* tile level -- the labelled tile folders ``TILES/train`` and ``TILES/valid`` (or ``TILES/test``)
  are encoded (class sub-folders, sorted: ``0``, ``1``, ...) and probed with
  :func:`gigaslide.evaluation.tiles.evaluate_tile_features` (linear probe and 20-NN);
* slide level -- the mosaic slides ``SLIDES/slides/*.tiff`` are encoded by the spine
  (:func:`gigaslide.features.extract.encode_slides`, i.e. ``gigaslide encode``), then ``--model`` (ABMIL) is
  cross-validated on ``SLIDES/labels.csv`` and the attention-localisation AUC is measured against
  ``SLIDES/ground_truth``.

Output ``OUT/``: ``{encoder}/tiles/{train,test}.h5``, ``{encoder}/slides/`` (encode output),
``{encoder}/mil/`` (run), ``{encoder}/tile_report/``, and ``leaderboard.{md,json,png}``. The leaderboard
compares every encoder with the first one paired (:mod:`gigaslide.evaluation.compare`): on the same test
tiles for the probes, on the same slides for the MIL run — not by overlapping CIs.
Everything already computed is reused (resume).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from gigaslide import atomic
from gigaslide.provenance import provenance
from gigaslide.errors import GigaslideError
from gigaslide.evaluation.compare import Diffs, comparison_markdown
from gigaslide.evaluation.metrics import fmt_ci


def _safe(name: str) -> str:
    """The encoder's folder in OUT: the whole name or path made file-safe (``runs/dino/encoder`` ->
    ``runs_dino_encoder``), so two runs' exports (both ``.../encoder``) never share a folder."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.") or "encoder"


def split_weights(name: str) -> tuple[str, str | None]:
    """``ENCODER@WEIGHTS`` -> (encoder, its own weights: random, default or a file), so that one leaderboard can
    hold a model and its from-scratch baseline (``runs/dino/encoder@random,runs/dino/encoder``); no ``@``: the
    command's ``--weights``."""
    model, sep, w = name.rpartition("@")
    return (model, w) if sep and model and w else (name, None)


def _test_folder(tiles: Path) -> Path:
    for name in ("valid", "test", "val"):
        if (tiles / name).is_dir():
            return tiles / name
    raise GigaslideError("tile folder needs train/ and valid/ (or test/) sub-folders", path=tiles,
                         fix="pass e.g. ../shared/data/tiles/pcam")


def benchmark_encoder(name: str, out: Path, *, tiles: Path | None, slides: Path | None, weights: str, mpp: float,
                      tile_size: int, folds: int, mil_model: str, epochs: int, max_tiles_per_class: int | None,
                      n_bootstrap: int, seed: int, verbose: bool = True) -> dict[str, Any]:
    from gigaslide.encoders import build_encoder

    model, own_weights = split_weights(name)
    enc = build_encoder(model, own_weights or weights)
    row: dict[str, Any] = {"encoder": name, "dim": enc.embed_dim, "weights": enc.weights_id}
    d = atomic.ensure_writable_dir(out / _safe(name))
    if tiles is not None:
        from gigaslide.evaluation.tiles import evaluate_tile_features

        t0 = time.perf_counter()
        from gigaslide.features.tiles import embed_tile_folder

        tr = embed_tile_folder(enc, tiles / "train", d / "tiles" / "train.h5", max_per_class=max_tiles_per_class, seed=seed,
                               source=name)["out"]
        te = embed_tile_folder(enc, _test_folder(tiles), d / "tiles" / "test.h5", max_per_class=max_tiles_per_class,
                               seed=seed, source=name)["out"]
        row["tile_encode_seconds"] = round(time.perf_counter() - t0, 1)
        from gigaslide.features import store

        rep = evaluate_tile_features(store.load(tr), store.load(te), ["linear", "knn"], n_bootstrap=n_bootstrap, seed=seed,
                                     out=d / "tile_report")
        row["tile"] = {p: rep["protocols"][p] for p in ("linear", "knn")}
    if slides is not None:
        from gigaslide.features.extract import encode_slides
        from gigaslide.mil.cv import run_cv
        from gigaslide.mil.heatmap import run_localisation
        from gigaslide.mil.train import TrainConfig
        from gigaslide.slides import find_slides
        from gigaslide.tiling import TilingParams

        t0 = time.perf_counter()
        res = encode_slides(find_slides([str(slides / "slides")]), d / "slides", enc, TilingParams(mpp, tile_size, 0, 0.25),
                            seed=seed, overlays=False)
        if res.failed:
            raise GigaslideError(f"{len(res.failed)} slide(s) failed to encode: {next(iter(res.failed.values()))}",
                                 path=d / "slides" / "manifest.json", fix="see the manifest for every failure")
        row["slide_encode_seconds"] = round(time.perf_counter() - t0, 1)
        ev = run_cv(d / "slides" / "features", slides / "labels.csv", d / "mil",
                    cfg=TrainConfig(model=mil_model, epochs=epochs, seed=seed), folds=folds, n_bootstrap=n_bootstrap,
                    verbose=verbose)
        row["slide"] = {"model": mil_model, **ev["metrics"], "seconds_per_fold": ev.get("seconds_per_fold")}
        row["localisation"] = run_localisation(d / "mil", slides / "ground_truth", n_bootstrap=n_bootstrap, seed=seed)
    return row


def _cell(d: dict | None) -> str:
    if d and d.get("n_slides") == 0:  # localisation without a test slide of tumour and normal tiles (was "nan")
        return "undefined: no test slide has both tumour and normal tiles"
    return fmt_ci(d) if d else "-"


def _mil_name(rows: list[dict[str, Any]]) -> str:
    """The slide-level MIL model of the rows (``--model``; was always called ABMIL), upper case."""
    return next((str(r["slide"].get("model", "abmil")) for r in rows if r.get("slide")), "abmil").upper()


def leaderboard_markdown(rows: list[dict[str, Any]]) -> str:
    lines = [f"| encoder | D | tile linear AUC | tile linear bal-acc | tile 20-NN AUC | slide {_mil_name(rows)} AUC | "
             "slide bal-acc | attention loc. AUC |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t, s = r.get("tile", {}), r.get("slide", {})
        lines.append(f"| {r['encoder']} | {r['dim']} | {_cell(t.get('linear', {}).get('auc'))} | "
                     f"{_cell(t.get('linear', {}).get('balanced_accuracy'))} | {_cell(t.get('knn', {}).get('auc'))} | "
                     f"{_cell(s.get('auc'))} | {_cell(s.get('balanced_accuracy'))} | {_cell(r.get('localisation'))} |")
    return "\n".join(lines) + "\n"


def plot_leaderboard(rows: list[dict[str, Any]], path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = [("tile linear AUC", lambda r: r.get("tile", {}).get("linear", {}).get("auc")),
            ("tile 20-NN AUC", lambda r: r.get("tile", {}).get("knn", {}).get("auc")),
            (f"slide {_mil_name(rows)} AUC", lambda r: r.get("slide", {}).get("auc")),
            ("attention loc. AUC", lambda r: r.get("localisation"))]
    fig = Figure(figsize=(max(5, 1.6 * len(rows) + 2), 3.6))  # not pyplot's: the caller's backend stays as it was
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    w = 0.8 / len(cols)
    for j, (label, get) in enumerate(cols):
        v, lo, hi = [], [], []
        for r in rows:
            m = get(r) or {}
            v.append(m.get("value", np.nan))
            lo.append(m.get("ci_low", np.nan))
            hi.append(m.get("ci_high", np.nan))
        v, lo, hi = map(np.asarray, (v, lo, hi))
        ax.bar(np.arange(len(rows)) + (j - 1.5) * w, np.nan_to_num(v), w, label=label,
               yerr=np.nan_to_num(np.stack([v - lo, hi - v])), capsize=2)
    ax.set_xticks(np.arange(len(rows)), [r["encoder"] for r in rows], rotation=15)
    ax.set_ylim(0, 1.05)
    ax.axhline(0.5, color="grey", lw=0.6, ls="--")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("encoders: tile-level vs slide-level (95 % bootstrap CIs)")
    fig.tight_layout()
    with atomic.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


def paired_vs_first(rows: list[dict[str, Any]], out: Path, *, n_bootstrap: int, seed: int) -> Diffs:
    """Every other encoder minus the first, paired on the same test tiles (linear, 20-NN) and the same slides
    (the MIL run's out-of-fold predictions): ``"ENCODER: level"`` -> metric -> paired difference."""
    from gigaslide.evaluation.slides import compare_predictions
    from gigaslide.evaluation.tiles import compare_with, saved_predictions

    diffs: Diffs = {}
    first = out / _safe(rows[0]["encoder"]) if rows else None
    for r in rows[1:]:
        d = out / _safe(r["encoder"])
        if "tile" in r:
            tile = compare_with(saved_predictions(d / "tile_report"), first / "tile_report", n_bootstrap=n_bootstrap,
                                seed=seed)
            diffs.update({f"{r['encoder']}: tile {_PROTOCOL_NAMES[p]}": v for p, v in tile.items()})
        if "slide" in r:
            diffs[f"{r['encoder']}: slide {r['slide']['model']}"] = compare_predictions(
                d / "mil", first / "mil", n_bootstrap=n_bootstrap, seed=seed)
    return diffs


_PROTOCOL_NAMES = {"linear": "linear", "knn": "20-NN"}


def run_benchmark(encoders: list[str], out: str | os.PathLike, *, tiles: str | os.PathLike | None = None,
                  slides: str | os.PathLike | None = None, weights: str = "default", mpp: float = 0.97,
                  tile_size: int = 96, folds: int = 5, mil_model: str = "abmil", epochs: int = 30,
                  max_tiles_per_class: int | None = None, n_bootstrap: int = 1000, seed: int = 0,
                  verbose: bool = True) -> list[dict[str, Any]]:
    """Benchmark every encoder; writes ``leaderboard.{md,json,png}`` into ``out``."""
    if not encoders:
        raise GigaslideError("no encoders given", fix="pass --encoders a,b,c (see `gigaslide encoders`)")
    if tiles is None and slides is None:
        raise GigaslideError("nothing to benchmark", fix="pass --tiles (tile-level) and/or --slides (mosaic slide-level)")
    tiles_p = Path(tiles) if tiles is not None else None
    slides_p = Path(slides) if slides is not None else None
    if tiles_p is not None and not (tiles_p / "train").is_dir():
        raise GigaslideError("tile folder has no train/ sub-folder", path=tiles_p, fix="pass e.g. ../shared/data/tiles/pcam")
    if slides_p is not None and not (slides_p / "labels.csv").is_file():
        raise GigaslideError("not a mosaic folder (no labels.csv)", path=slides_p,
                             fix="build one with `gigaslide mosaic --tiles ... --out DIR` and pass DIR")
    folders: dict[str, str] = {}
    for name in encoders:
        if _safe(name) in folders:
            raise GigaslideError(f"encoders '{folders[_safe(name)]}' and '{name}' would share the folder "
                                 f"{_safe(name)}", fix="list each encoder once, under distinct names or paths")
        folders[_safe(name)] = name
    out_d = atomic.ensure_writable_dir(out)
    rows = []
    for name in encoders:
        if verbose:
            print(f"== {name}")
        rows.append(benchmark_encoder(name, out_d, tiles=tiles_p, slides=slides_p, weights=weights, mpp=mpp,
                                      tile_size=tile_size, folds=folds, mil_model=mil_model, epochs=epochs,
                                      max_tiles_per_class=max_tiles_per_class, n_bootstrap=n_bootstrap, seed=seed,
                                      verbose=verbose))
    paired = paired_vs_first(rows, out_d, n_bootstrap=n_bootstrap, seed=seed)
    text = "# Encoder benchmark\n\n" + leaderboard_markdown(rows)
    if paired:
        text += "\n" + comparison_markdown(paired, rows[0]["encoder"], "test tiles / slides")
    atomic.write_json(out_d / "leaderboard.json", {**provenance(kind="benchmark", seed=seed), "rows": rows,
                                                   "paired_vs_first": paired})
    atomic.write_text(out_d / "leaderboard.md", text)
    plot_leaderboard(rows, out_d / "leaderboard.png")
    return rows
