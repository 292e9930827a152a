"""``gigaslide demo``: the main job end to end on an embedded default.

Slides (the real ones in ../shared/data/slides, or generated ones when that folder is absent)
-> tissue -> tiles -> features, then every later stage that is installed, then a short report.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from gigaslide.cli.main import Command

#: Resolutions assumed for the shared slides whose files carry none (stated in the report).
DEMO_MPP = {"tcga-cr-7395-01a-01-ts1": 0.25, "kidney-48-5": 0.5, "boxes": 1.0}


def _slides(work: Path) -> tuple[list[Path], str]:
    from gigaslide.slides import find_slides
    from gigaslide.testing import make_slide, shared_data_dir

    shared = shared_data_dir()
    if shared and (shared / "slides").is_dir():
        return find_slides([shared / "slides"]), f"real slides from {shared / 'slides'}"
    gen = work / "generated_slides"
    return [make_slide(gen / f"generated-{i}.tiff", (3072, 2048), mpp=0.5, seed=i) for i in range(3)], "generated slides"


def demo(out: str = "demo_out", encoder: str = "resnet18", weights: str = "random", mpp: float = 1.0,
         tile_size: int = 224, mosaic_slides: int = 24) -> None:
    """Run the main job end to end on the embedded default data and write a report.

    Example:
        gigaslide demo --out demo_out

    Tiles and encodes every slide in ../shared/data/slides (broken ones are reported, as a batch
    job must), writes tissue overlays, GeoJSON, tile-grid overlays and REPORT.md.

    Args:
        out: output folder
        encoder: tile encoder (registry name or exported folder)
        weights: encoder weights; random by default because no weights can be downloaded here
        mpp: target resolution in µm/px
        tile_size: tile size in px at the target resolution
        mosaic_slides: slides of the CAMELYON-like mosaic benchmark built from PCam tiles (0 skips the slide-level part)
    """
    import torch

    from gigaslide import atomic
    from gigaslide.encoders import build_encoder
    from gigaslide.features.extract import encode_slides
    from gigaslide.tiling import TilingParams

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    outp = atomic.ensure_writable_dir(out)
    slides, source = _slides(outp)
    mpp_csv = outp / "assumed_mpp.csv"
    atomic.write_text(mpp_csv, "slide_id,mpp\n" + "".join(f"{k},{v}\n" for k, v in DEMO_MPP.items()))
    enc = build_encoder(encoder, weights)
    n_steps = 2 if mosaic_slides else 1
    print(f"[1/{n_steps}] tiles -> features: {len(slides)} {source}, {encoder} ({weights} weights), {mpp} µm/px, {tile_size} px")
    res = encode_slides(slides, outp / "spine", enc, TilingParams(mpp, tile_size, 0, 0.25), batch_size=32,
                        slide_mpp=str(mpp_csv))  # the table lists only slides whose files carry no mpp
    table_head = "| slide | status | tiles | outputs / reason |"
    caveat = (" (no weights can be downloaded on this machine; features of a random network are a pipeline check, "
              "not a result)") if weights == "random" else f" (weights {enc.weights_id[:23]}...)"
    lines = ["# gigaslide demo report", "", f"Source: {source}. Encoder `{encoder}` with {weights} weights{caveat}.",
             f"Resolution {mpp} µm/px, tiles {tile_size} px; slides without an mpp in their metadata use the values in "
             f"`{mpp_csv.name}` (assumed for the demo).", "",
             table_head, "|---|---|---|---|"]
    from gigaslide.features import store

    for sid in res.done + res.skipped:
        ff = store.load(outp / "spine" / "features" / f"{sid}.h5")
        lines.append(f"| {sid} | done | {len(ff)} | spine/features/{sid}.h5 [{len(ff)}×{ff.dim}], "  # from REPORT.md
                     f"spine/tissue/{sid}.png, spine/tissue/{sid}.geojson, spine/grid/{sid}.png |")
    for sid, err in res.failed.items():
        lines.append(f"| {sid} | failed (reported, batch went on) | 0 | {err.replace('|', '/')} |")
    speed = f" at {res.tiles / max(res.seconds, 1e-9):.1f} tiles/s ({res.precision})" if res.tiles else ""
    lines += ["", f"Encoded {res.tiles} tiles{speed}; total {time.perf_counter() - t0:.1f} s."]
    print("\n".join(lines[lines.index(table_head):]))  # the table with its header row
    if mosaic_slides:
        lines += _slide_level(outp, encoder, weights, mosaic_slides, n_steps)
    report = atomic.write_text(outp / "REPORT.md", "\n".join(lines) + "\n")
    print(f"\nreport: {report}\nfeatures: {outp / 'spine' / 'features'}\noverlays: {outp / 'spine' / 'tissue'}, "
          f"{outp / 'spine' / 'grid'}", file=sys.stdout)
    runs = [str(outp / "runs" / "abmil")] if (outp / "runs" / "abmil" / "predictions.csv").is_file() else []
    runs += [str(outp / "runs" / "gigassl")] if runs and (outp / "runs" / "gigassl" / "model.safetensors").is_file() else []
    print(f"open in the browser: gigaslide view {outp / 'spine'}"
          + (f" {outp / 'mosaic_features'} --runs {','.join(runs)}" if runs else ""))


def _train(run, argv: list[str], out: Path) -> None:  # noqa: ANN001
    """A demo training step; when an earlier demo left a run of other inputs in ``out`` (e.g. features re-encoded by a
    newer gigaslide), that old demo run is replaced instead of stopping the demo."""
    import shutil

    from gigaslide.errors import GigaslideError

    try:
        run([*argv, "--out", str(out)])
    except GigaslideError as e:
        if "holds another run" not in str(e) or not out.is_dir():
            raise
        print(f"note: {out} is an earlier demo's run of other inputs ({e.what}); training it again")
        shutil.rmtree(out)
        run([*argv, "--out", str(out)])


def _replace_other_mosaic(mos: Path, feats: Path, n_slides: int) -> None:
    """An earlier demo's mosaic of other settings (e.g. --mosaic-slides) is rebuilt, with its features: these are the
    demo's own folders, and a mosaic refuses to resume with other settings."""
    import shutil

    from gigaslide.mil.mosaic import MosaicConfig, parse_range, settings_diff

    cfg = MosaicConfig(slides=n_slides, grid=14, tumor_fraction=parse_range("0.15-0.3"), seed=0)
    if settings_diff(mos / "mosaic.json", cfg):
        print(f"  {mos} holds a mosaic of other settings: rebuilding it")
        shutil.rmtree(mos)
        shutil.rmtree(feats, ignore_errors=True)


def _slide_level(outp: Path, encoder: str, weights: str, n_slides: int, n_steps: int) -> list[str]:
    """Mosaic slides from PCam tiles -> encode -> ABMIL cross-validation -> evaluation -> heatmap."""
    import csv

    from gigaslide.cli.main import run
    from gigaslide.testing import shared_data_dir

    shared = shared_data_dir()
    tiles = shared / "tiles" / "pcam" / "train" if shared else None
    if tiles is None or not tiles.is_dir():
        return ["", "## Slide level", "", "Skipped: no labelled tiles (../shared/data/tiles/pcam/train) to build mosaic slides from."]
    print(f"[2/{n_steps}] slide level: {n_slides} mosaic slides from PCam -> encode -> ABMIL (4-fold CV) -> heatmap "
          "-> Giga-SSL slide embeddings -> linear probe")
    mos, feats, runs = outp / "mosaic", outp / "mosaic_features", outp / "runs" / "abmil"
    _replace_other_mosaic(mos, feats, n_slides)
    run(["mosaic", "--tiles", str(tiles), "--out", str(mos), "--slides", str(n_slides), "--grid", "14",
         "--tumor-fraction", "0.15-0.3", "--seed", "0"])
    run(["encode", str(mos / "slides"), "--out", str(feats), "--encoder", encoder, "--weights", weights, "--mpp", "0.97",
         "--tile-size", "96", "--min-tissue", "0.1", "--batch-size", "64"])
    _train(run, ["train-mil", "--features", str(feats), "--labels", str(mos / "labels.csv"), "--model", "abmil",
                 "--folds", "4", "--epochs", "20", "--patience", "5", "--bootstrap", "500"], runs)
    with open(mos / "labels.csv", newline="") as fh:
        positive = next(r["slide_id"] for r in csv.DictReader(fh) if r["label"] == "1")
    slide = next((mos / "slides").glob(f"{positive}.*"))
    fold = next(d for d in sorted(runs.glob("fold*")) if d.is_dir())
    run(["heatmap", str(slide), "--features", str(feats / "features" / f"{positive}.h5"), "--model", str(fold),
         "--out", str(outp / "heatmap.png")])
    # slide-level SSL: Giga-SSL views -> slide encoder without labels -> one small vector per slide -> linear probe
    cache, gssl, emb, lin = outp / "gigassl_cache", outp / "runs" / "gigassl", outp / "embeddings.h5", outp / "runs" / "gigassl_linear"
    run(["augment-cache", *[str(p) for p in sorted((mos / "slides").glob("*.tif*"))], "--out", str(cache),
         "--encoder", encoder, "--weights", weights, "--views", "4", "--tiles-per-view", "16", "--mpp", "0.97",
         "--tile-size", "96", "--min-tissue", "0.1"])  # --precision auto: probed on the first batch
    _train(run, ["pretrain-slides", "--method", "gigassl", "--cache", str(cache), "--epochs", "40",
                 "--batch-size", "12", "--out-dim", "128", "--tiles-per-step", "12"], gssl)
    run(["embed-slides", "--model", str(gssl), "--features", str(feats), "--ensemble", "10", "--out", str(emb), "--fp16", "true"])
    run(["evaluate", "embeddings", "--embeddings", str(emb), "--labels", str(mos / "labels.csv"), "--folds", "4",
         "--bootstrap", "500", "--out", str(lin)])
    from gigaslide.evaluation.slides import evaluation_markdown

    def table(run_dir: Path, title: str) -> str:
        return evaluation_markdown(json.loads((run_dir / "evaluation.json").read_text()), title).split("\n", 2)[2]

    lines = ["", "## Slide level: mosaic benchmark (CAMELYON-like slides built from PCam train tiles)", "",
             f"{n_slides} pyramidal TIFF slides (`mosaic/`), encoded by the same spine (`mosaic_features/`).", "",
             f"### ABMIL, patient-grouped 4-fold cross-validation (`runs/abmil/`); attention heatmap of {positive}: `heatmap.png`",
             "", table(runs, "ABMIL"), "### Giga-SSL slide embeddings (no labels)", "",
             f"Augment cache `gigassl_cache/` (4 views x 16 tiles per slide), SparseConvMIL slide encoder `runs/gigassl/`, "
             f"embeddings `{emb.name}` (128-d fp16: 256 bytes per slide)."]
    lines += _gigassl_lines(gssl, lin, table, n_slides, weights)
    print(lines[-1])
    return lines


def _gigassl_lines(gssl: Path, lin: Path, table: Callable[[Path, str], str], n_slides: int, weights: str) -> list[str]:
    """The report's Giga-SSL result: the probe's table only when its CI is clear of chance, and said plainly when the
    pre-training did not beat its untrained encoder on the run's own label-free monitor (the probe then measures
    an untrained slide encoder over the tile features, not the method)."""
    rec = json.loads((gssl / "run.json").read_text())
    out: list[str] = []
    if (rec.get("summary") or {}).get("learned") is False:
        hist, u, raw = rec.get("history") or [], rec.get("untrained_monitor") or {}, rec.get("raw_monitor") or {}
        ep = (rec.get("summary") or {}).get("exported_epoch") or len(hist)
        got = hist[ep - 1]["retrieval_top1"] if 0 < ep <= len(hist) else float("nan")
        out += ["", f"The slide encoder did **not learn** here: its exported epoch does not beat the untrained encoder "
                f"on the run's label-free monitor (view retrieval top-1 {got:.3f} vs {u.get('retrieval_top1', 0):.3f} "
                f"untrained, chance {1 / n_slides:.3f}; the cached views' mean features retrieve at "
                f"{raw.get('retrieval_top1', float('nan')):.3f}). Mosaic slides built from random PCam tiles share no "
                "identity beyond their tiles, so there is nothing slide-specific to learn: the probe below measures "
                "an untrained slide encoder over the tile features, not Giga-SSL."]
    ev = json.loads((lin / "evaluation.json").read_text())
    a = _auc_of(ev)
    if a is not None and a[1] > 0.5:  # shown as a result only when its CI is clear of chance
        out += ["", "Linear probe, same protocol (`runs/gigassl_linear/`):", "", table(lin, "Giga-SSL + linear")]
    else:
        what = f"AUC {a[0]:.2f} [{a[1]:.2f}, {a[2]:.2f}]" if a else "no AUC"
        out += ["", f"Not a result: the linear probe on these embeddings ({what}, `runs/gigassl_linear/`) is not "
                f"clear of chance with {n_slides} slides and a {weights}-weight tile encoder (too few slides and no "
                "trained tile features); the measured comparison is in benchmarks/results/slide_ssl.md."]
    return out


def _auc_of(ev: dict) -> tuple[float, float, float] | None:
    """(AUC, CI low, CI high) from an evaluation.json, or None."""
    m = (ev.get("metrics") or {}).get("auc")
    if isinstance(m, dict) and all(k in m for k in ("value", "ci_low", "ci_high")):
        return float(m["value"]), float(m["ci_low"]), float(m["ci_high"])
    return None


COMMANDS = {"demo": Command(demo)}
