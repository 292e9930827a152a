"""``gigaslide demo``: the main job end to end on an embedded default.

Slides (the real ones in ../shared/data/slides, or generated ones when that folder is absent)
-> tissue -> tiles -> features, then every later stage that is installed, then a short report.
"""

from __future__ import annotations

import sys
import time
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
         tile_size: int = 224) -> None:
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
    print(f"[1/1] tiles -> features: {len(slides)} {source}, {encoder} ({weights} weights), {mpp} µm/px, {tile_size} px")
    res = encode_slides(slides, outp / "spine", enc, TilingParams(mpp, tile_size, 0, 0.25), batch_size=32, workers=1,
                        slide_mpp=str(mpp_csv))  # the table lists only slides whose files carry no mpp
    lines = ["# gigaslide demo report", "", f"Source: {source}. Encoder `{encoder}` with {weights} weights "
             "(no weights can be downloaded on this machine; features of a random network are a pipeline check, not a result).",
             f"Resolution {mpp} µm/px, tiles {tile_size} px; slides without an mpp in their metadata use the values in "
             f"`{mpp_csv.name}` (assumed for the demo).", "",
             "| slide | status | tiles | outputs / reason |", "|---|---|---|---|"]
    from gigaslide.features import store

    for sid in res.done + res.skipped:
        ff = store.load(outp / "spine" / "features" / f"{sid}.h5")
        lines.append(f"| {sid} | done | {len(ff)} | features/{sid}.h5 [{len(ff)}×{ff.dim}], tissue/{sid}.png, "
                     f"tissue/{sid}.geojson, grid/{sid}.png |")
    for sid, err in res.failed.items():
        lines.append(f"| {sid} | failed (reported, batch went on) | 0 | {err.replace('|', '/')} |")
    lines += ["", f"Encoded {res.tiles} tiles at {res.tiles / max(res.seconds, 1e-9):.1f} tiles/s ({res.precision}); "
              f"total {time.perf_counter() - t0:.1f} s."]
    report = atomic.write_text(outp / "REPORT.md", "\n".join(lines) + "\n")
    print("\n".join(lines[6:]))
    print(f"\nreport: {report}\nfeatures: {outp / 'spine' / 'features'}\noverlays: {outp / 'spine' / 'tissue'}, "
          f"{outp / 'spine' / 'grid'}", file=sys.stdout)


COMMANDS = {"demo": Command(demo)}
