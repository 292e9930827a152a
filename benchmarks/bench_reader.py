"""Tiling + reading: gigaslide vs hs2p, TIAToolbox and plain OpenSlide on identical coordinates.

For each slide the tissue grid (224 px at 0.5 µm/px) of ``tile_slide`` gives the coordinates; then,
interleaved in the same rounds (median of ``--repeats``), at 1 and 2 processes (coordinates split into
two contiguous halves, forked workers):

* ``gigaslide iter_tiles`` — ``TileReader`` with the direct path (stored JPEG tiles decoded once each),
* ``gigaslide via OpenSlide`` — the same reader with the direct path off (``Slide.read_region``),
* ``plain OpenSlide`` — ``OpenSlide.read_region(...).convert("RGB")``,
* ``hs2p`` / ``TIAToolbox`` — in their own virtualenv (``peers/setup.sh``), run by ``peers/read_peer.py``
  on the identical coordinates (``--peers none`` skips them),
* the decode limit for these tiles — exactly the stored tiles (of the TIFF page our reader uses) that the
  requested tiles touch, each decoded once (tifffile + imagecodecs), as requested tiles per second;
  beside it the old figure, every stored tile of level 0 decoded once, in 224²-tile equivalents.

Segmentation + tiling (gigaslide ``tile_slide``, hs2p ``tile_slide``, TIAToolbox's patch extractor with
its Otsu mask) is timed in a fresh process per tool and round, with that process's peak RSS.

    nice .venv/bin/python benchmarks/bench_reader.py [--quick] [--repeats 3] [--peers hs2p,tiatoolbox|none]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, load_note, write_result  # noqa: E402

from gigaslide.slides import Slide, TileReader  # noqa: E402
from gigaslide.slides.tiled import split_offset  # noqa: E402
from gigaslide.testing import make_slide, shared_data_dir  # noqa: E402
from gigaslide.tiling import TilingParams, tile_slide  # noqa: E402

TILE, MPP, MIN_TISSUE = 224, 0.5, 0.25
PEERS_DIR = Path(__file__).resolve().parent / "peers"
PEER_VENV = Path(os.environ.get("GIGASLIDE_PEERS_VENV", "/tmp/gigaslide-peers-venv"))
PEER_NAMES = {"hs2p": "hs2p", "tiatoolbox": "TIAToolbox"}
GOAL_PEER, GOAL_LIMIT, GOAL_TILE_S, GOAL_TILE_MB = 1.5, 0.8, 0.5, 300


# ---- gigaslide and plain OpenSlide, in this process ----

def _read(args: tuple) -> int:
    kind, path, coords = args
    if kind == "plain":
        import openslide

        o = openslide.OpenSlide(str(path))
        for x, y in coords:
            np.asarray(o.read_region((int(x), int(y)), 0, (TILE, TILE)).convert("RGB"))
        o.close()
        return len(coords)
    with Slide(path) as s:
        r = TileReader(s, TILE, MPP, direct=kind == "ours")
        assert r.direct == (kind == "ours"), "the direct path does not apply to this slide"
        for x, y in coords:
            r.read(x, y)
        r.close()
    return len(coords)


def _pool_map(fn, parts: list) -> list:
    if len(parts) == 1:
        return [fn(parts[0])]
    with mp.get_context("fork").Pool(len(parts)) as pool:
        return pool.map(fn, parts)


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def rate(kind: str, path: Path, coords: np.ndarray, procs: int) -> tuple[float, float]:
    """(tiles/s, cores used = CPU s ÷ wall s)."""
    t, c = time.perf_counter(), _cpu()
    n = sum(_pool_map(_read, [(kind, path, part) for part in np.array_split(coords, procs)]))
    wall = time.perf_counter() - t
    return n / wall, (_cpu() - c) / wall


# ---- the decode limit ----

def touched_tiles(reader: TileReader, coords: np.ndarray) -> list[int]:
    """Indices of the stored tiles (of the page ``reader`` decodes) that the tiles at ``coords`` touch, in order."""
    t, ds, n = reader.tiff_level, reader.level.level_downsample, TILE * reader.factor
    seen: dict[int, None] = {}
    for x, y in np.asarray(coords).tolist():
        (ix, wx), (iy, wy) = split_offset(x / ds), split_offset(y / ds)
        extra = 1 if wx or wy else 0  # a sub-pixel offset reads one more row and column
        for index, _, _ in t.tiles_under(ix, iy, ix + n + extra, iy + n + extra):
            seen[index] = None
    return list(seen)


def _decode(args: tuple) -> float:
    """Seconds to read and decode the stored tiles ``indices`` of one page (the file is opened untimed)."""
    import tifffile

    path, page_index, indices = args
    with tifffile.TiffFile(str(path)) as tif:
        page = tif.pages[page_index]
        fh, dec, tables = tif.filehandle, page.decode, getattr(page, "jpegtables", None)
        offsets, counts = page.dataoffsets, page.databytecounts
        t = time.perf_counter()
        for i in indices:
            if counts[i]:  # 0: a sparse tile, nothing stored
                fh.seek(offsets[i])
                dec(fh.read(counts[i]), i, jpegtables=tables)
        return time.perf_counter() - t


def decode_limit(path: Path, page_index: int, tiles: list[int], n_out: int, procs: int) -> float:
    """Requested tiles per second when only the stored tiles they touch are decoded, once each: an upper
    bound (no slide opening, no process start, the slowest of ``procs`` workers' decode time)."""
    parts = [(path, page_index, part.tolist()) for part in np.array_split(np.asarray(tiles), procs)]
    return n_out / max(_pool_map(_decode, parts))


def raw_decode(path: Path) -> float:
    """224²-tile equivalents per second decoding every stored tile of level 0 once (glass tiles included)."""
    import tifffile

    with tifffile.TiffFile(str(path)) as tif:
        page = next(p for p in tif.pages if p.is_tiled)
        index, n, area = page.index, len(page.dataoffsets), page.tilewidth * page.tilelength
    return n * area / TILE**2 / _decode((path, index, range(n)))


def pixel_diff(path: Path, coords: np.ndarray, k: int = 8) -> tuple[int, int]:
    """(max |iter_tiles - OpenSlide| over k interior tiles, k)."""
    import openslide

    o = openslide.OpenSlide(str(path))
    w, h = o.dimensions
    inner = [c for c in coords.tolist() if c[0] + TILE < w and c[1] + TILE < h]
    picks = [inner[int(i)] for i in np.linspace(0, len(inner) - 1, min(k, len(inner)))] if inner else []
    with Slide(path) as s:
        r = TileReader(s, TILE, MPP)
        d = max((int(np.abs(r.read(x, y).astype(np.int16) - np.asarray(
            o.read_region((x, y), 0, (TILE, TILE)).convert("RGB"))).max()) for x, y in picks), default=0)
    return d, len(picks)


# ---- child processes: gigaslide's seg + tiling and read RSS, and the peers ----

def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "no output")[:200]


def _child(cmd: list[str], timeout: float = 1800) -> dict:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(_one_line(p.stderr or p.stdout))
    return json.loads(next(ln for ln in p.stdout.splitlines() if ln.startswith("PEER_JSON "))[len("PEER_JSON "):])


def ours_child(job: dict) -> dict:
    """What ``--child`` runs in a fresh process: gigaslide's seg + tiling, or one read (for its peak RSS)."""
    ru = resource.getrusage
    base, t = ru(resource.RUSAGE_SELF).ru_maxrss / 1024, time.perf_counter()
    if job["mode"] == "tile":
        grid = tile_slide(Path(job["slide"]), Path(job["out"]), TilingParams(MPP, TILE, 0, MIN_TISSUE), overlays=False,
                          reuse=False)
        out = {"seconds": time.perf_counter() - t, "tiles": len(grid.coords)}
    else:
        out = {"tiles_per_s": rate("ours", Path(job["slide"]), np.load(job["coords"]), job["procs"])[0]}
    out["peak_rss_mb"] = (ru(resource.RUSAGE_SELF).ru_maxrss + ru(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    out["import_rss_mb"] = base
    return out


def run_ours(job: dict) -> dict:
    return _child([sys.executable, __file__, "--child", json.dumps(job)])


def setup_peers() -> str | None:
    """None when the peers' virtualenv is ready, else why not (one line)."""
    try:
        p = subprocess.run(["bash", str(PEERS_DIR / "setup.sh"), str(PEER_VENV)], capture_output=True, text=True,
                           timeout=3600)
    except Exception as e:  # noqa: BLE001 - reported in the table
        return f"{type(e).__name__}: {e}"
    return None if p.returncode == 0 else "setup.sh failed: " + _one_line(p.stderr or p.stdout)


VERSIONS = ("hs2p", "pyvips", "pyvips-binary", "tiatoolbox", "openslide-python", "tifffile", "imagecodecs")


def peer_versions() -> str:
    code = ("import importlib.metadata as m, pyvips; print(', '.join(f'{n} {m.version(n)}' for n in %r) + "
            "', libvips %%d.%%d.%%d' %% tuple(pyvips.version(i) for i in range(3)))" % (VERSIONS,))
    return subprocess.run([str(PEER_VENV / "bin" / "python"), "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip()


def run_peer(mode: str, peer: str, path: Path, mpp0: float, **kw) -> dict:
    cmd = [str(PEER_VENV / "bin" / "python"), str(PEERS_DIR / "read_peer.py"), mode, peer, str(path), "--tile",
           str(TILE), "--mpp", str(MPP), "--mpp0", str(mpp0), "--min-tissue", str(MIN_TISSUE)]
    for k, v in kw.items():
        cmd += [f"--{k}", str(v)]
    return _child(cmd)


# ---- the benchmark ----

def med(values: list[float]) -> float:
    return statistics.median(values)


def cell(rows: list, fmt: str = "{:.0f}") -> str:
    return fmt.format(med(rows))


def rcell(rates: list, cores: list) -> str:
    return f"{med(rates):.0f} ({med(cores):.1f})"


def bench_slide(path: Path, work: Path, reps: int, peers: dict[str, str | None]) -> dict:
    """All measurements of one slide; a peer's entry is a reason string where it did not run."""
    tiles_dir = work / "tiles"
    with Slide(path) as s:
        mpp0 = float(s.mpp)
    res: dict = {"tile": {k: [] for k in ["gigaslide", *peers]}, "read": {}, "limit": {}, "check": {}}
    failed: dict[tuple, str] = {(p, m): why for p, why in peers.items() if why for m in ("tile", 1, 2)}

    def attempt(key: tuple, fn):  # a peer's failure becomes its reason; gigaslide's are raised
        if key in failed:
            return None
        try:
            return fn()
        except Exception as e:  # noqa: BLE001
            if key[0] == "gigaslide":
                raise
            failed[key] = _one_line(str(e) if isinstance(e, RuntimeError) else f"{type(e).__name__}: {e}")
            return None

    for _ in range(reps):
        for tool in res["tile"]:
            if tool == "gigaslide":
                r = run_ours({"mode": "tile", "slide": str(path), "out": str(tiles_dir)})
            else:
                r = attempt((tool, "tile"), lambda t=tool: run_peer("tile", t, path, mpp0))
            if r:
                res["tile"][tool].append(r)
    grid = tile_slide(path, tiles_dir, TilingParams(MPP, TILE, 0, MIN_TISSUE), overlays=False, reuse=True)
    coords = np.asarray(grid.coords, dtype=np.int64)
    cpath = work / f"{path.stem}.coords.npy"
    np.save(cpath, coords)
    with Slide(path) as s:
        reader = TileReader(s, TILE, MPP)
        level, page_index = reader.level.level, reader.tiff_level.page.index
        touched = touched_tiles(reader, coords)
        reader.close()
    res.update(coords=len(coords), stored=len(touched))
    res["check"]["gigaslide"] = pixel_diff(path, coords)
    res["raw"] = []
    for kind in ("ours", "openslide", "plain"):  # one untimed pass: first-use costs out of the first round
        _read((kind, path, coords))
    _decode((path, page_index, touched))
    for procs in (1, 2):
        rd = res["read"][procs] = {k: ([], []) for k in ["ours", "openslide", "plain", *peers]}
        res["limit"][procs] = []
        for _ in range(reps):  # every reader in every round: the machine's speed drifts
            for kind in ("ours", "openslide", "plain"):
                r = rate(kind, path, coords, procs)
                rd[kind][0].append(r[0])
                rd[kind][1].append(r[1])
            for peer in peers:
                r = attempt((peer, procs), lambda p=peer: run_peer("read", p, path, mpp0, coords=cpath, level=level,
                                                                     procs=procs))
                if r:
                    rd[peer][0].append(r["tiles_per_s"])
                    rd[peer][1].append(r["cpu_s"] / r["wall_s"])
                    res["check"][peer] = (r["max_abs_diff"], r["checked"])
                    res.setdefault("rss", {})[(peer, procs)] = r["peak_rss_mb"]
            res["limit"][procs].append(decode_limit(path, page_index, touched, len(coords), procs))
            if procs == 1:
                res["raw"].append(raw_decode(path))
        res.setdefault("rss", {})[("gigaslide", procs)] = run_ours(
            {"mode": "read", "slide": str(path), "coords": str(cpath), "procs": procs})["peak_rss_mb"]
    res["failed"] = failed
    return res


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def report(path: Path, res: dict, peers: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(reading rows, tiling rows, verdicts) of one slide."""
    failed = res["failed"]
    reading, tiling, verdicts = [], [], []
    for procs, rd in res["read"].items():
        ours = rd["ours"][0]
        ok = ["plain", *[p for p in peers if (p, procs) not in failed]]
        peer_cells = [rcell(*rd[p]) if p in ok else f"not run: {failed[(p, procs)]}" for p in peers]
        best = [max(vals) for vals in zip(*(rd[k][0] for k in ok))]
        who = max(ok, key=lambda k: med(rd[k][0]))
        r_plain = med([o / p for o, p in zip(ours, rd["plain"][0])])
        r_best = med([o / b for o, b in zip(ours, best)])
        limit = res["limit"][procs]
        share = med([o / lim for o, lim in zip(ours, limit)])
        raw = cell(res["raw"]) if procs == 1 else "—"
        row = [path.name, res["coords"], procs, rcell(*rd["ours"]), rcell(*rd["openslide"]), rcell(*rd["plain"]),
               *peer_cells, f"**{r_plain:.2f}**", f"**{r_best:.2f}**", f"{cell(limit)} ({res['stored']} stored tiles)",
               f"{share:.0%}", raw]
        reading.append("| " + " | ".join(map(str, row)) + " |")
        name = "plain OpenSlide" if who == "plain" else PEER_NAMES[who]
        verdicts.append(f"{path.name}, {procs} proc{'s' if procs > 1 else ''}: iter_tiles = {r_best:.2f}x the best "
                        f"peer ({name}) — goal ≥ {GOAL_PEER}x {_met(r_best >= GOAL_PEER)}; {share:.0%} of the decode "
                        f"limit for these tiles — goal ≥ {GOAL_LIMIT:.0%} {_met(share >= GOAL_LIMIT)}")
    for tool in ["gigaslide", *peers]:
        name = PEER_NAMES.get(tool, tool)
        rss = [f"{res['rss'][(tool, p)]:.0f}" if (tool, p) in res.get("rss", {}) else "—" for p in (1, 2)]
        rows = res["tile"][tool]
        if (tool, "tile") in failed:
            t_cells = [f"not run: {failed[(tool, 'tile')]}"] * 3
        else:
            secs, mb = med([r["seconds"] for r in rows]), med([r["peak_rss_mb"] for r in rows])
            t_cells = [f"{secs:.2f}", str(rows[0]["tiles"]), f"{mb:.0f} ({cell([r['import_rss_mb'] for r in rows])})"]
            if "reader" in rows[0]:
                name += f" ({rows[0]['reader']})"
            if tool == "gigaslide" and path.name.startswith("gen20k"):
                ok = secs <= GOAL_TILE_S and mb <= GOAL_TILE_MB
                verdicts.append(f"{path.name}: gigaslide seg + tiling {secs:.2f} s at {mb:.0f} MB peak RSS — goal "
                                f"≤ {GOAL_TILE_S} s and ≤ {GOAL_TILE_MB} MB {_met(ok)}")
        chk = res["check"].get(tool)
        chk = f"{chk[0]} ({chk[1]} tiles)" if chk else f"not run: {failed.get((tool, 1), failed.get((tool, 2)))}"
        tiling.append("| " + " | ".join([path.name, name, *t_cells, *rss, chk]) + " |")
    return reading, tiling, verdicts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="cmu-1-small-region.svs only, one round")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peers", default="hs2p,tiatoolbox", help="comma-separated, or 'none'")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("PEER_JSON " + json.dumps(ours_child(json.loads(args.child))), flush=True)
        return
    work = ROOT / "bench_out" / "reader"
    work.mkdir(parents=True, exist_ok=True)
    shared = shared_data_dir()
    slides = [shared / "slides" / "cmu-1-small-region.svs"] if shared else []
    if not args.quick or not slides:
        size = 8000 if args.quick else 20000
        gen = work.parent / f"gen{size // 1000}k.tiff"
        if not gen.is_file():
            make_slide(gen, (size, size), mpp=0.5, seed=11, blobs=5)
        slides.append(gen)
    reps = 1 if args.quick else args.repeats
    peers = [] if args.peers == "none" else [p.strip().lower() for p in args.peers.split(",") if p.strip()]
    unknown = set(peers) - set(PEER_NAMES)
    if unknown:
        ap.error(f"unknown peers: {', '.join(sorted(unknown))}")
    why = setup_peers() if peers else None
    reading, tiling, verdicts = [], [], []
    for path in slides:
        r, t, v = report(path, bench_slide(path, work, reps, {p: why for p in peers}), peers)
        reading += r
        tiling += t
        verdicts += v
        print("\n".join(r + t), flush=True)
    names = [PEER_NAMES[p] for p in peers]
    lines = [
        "# Slide reading: gigaslide vs " + ", ".join([*names, "plain OpenSlide"]), "",
        f"Tiles of {TILE} px at {MPP} µm/px on the tissue grid of `gigaslide tile`, read in grid order as RGB uint8; "
        "every reader gets the identical level-0 coordinates and reads the same pyramid level. 2 processes = the "
        "coordinates split into two contiguous halves, one forked process each, timed from opening the slide to the "
        f"last tile (peers: in a fresh process per run, imports done before the clock starts). Median of {reps} "
        f"interleaved round(s) after one untimed pass of the in-process readers; {load_note()} (absolute rates drift "
        "with load; the ratios on identical work are the result). Cells are tiles/s, with the cores used "
        "(CPU s ÷ wall s) in brackets. "
        "`vs plain OpenSlide` and `vs best peer` = gigaslide iter_tiles tiles/s ÷ that reader's at the same process "
        "count (median of the per-round ratios; best peer = the fastest of plain OpenSlide"
        + "".join(f", {n}" for n in names) + " in that round). `decode limit` = only the stored tiles of the TIFF page "
        "our reader decodes that the requested tiles touch, each decoded once (tifffile + imagecodecs), in requested "
        "tiles/s; `all stored tiles` = every stored level-0 tile, glass included, decoded once, in 224²-tile "
        "equivalents (not a limit for these tiles: glass tiles decode fast).",
        "", "| slide | tiles | procs | gigaslide iter_tiles | gigaslide via OpenSlide | plain OpenSlide | "
        + "".join(f"{n} | " for n in names) + "vs plain OpenSlide | vs best peer | decode limit (these tiles) | "
        "iter_tiles share of limit | all stored tiles (1 proc) |",
        "|" + "---|" * (11 + len(names)), *reading, "",
        "Segmentation + tiling, each tool its own (gigaslide `tile_slide`; hs2p `tile_slide`, HSV segmentation, "
        "libvips backend; TIAToolbox `SlidingWindowPatchExtractor`, Otsu mask, on the reader class in brackets: "
        "`WSIReader.open`'s, or its OpenSlide reader where `open` would load a generic pyramidal TIFF as one flat "
        "in-memory image) at the same tile size, resolution and "
        f"min tissue {MIN_TISSUE}, in a fresh process per run; peak RSS = that process (the reading columns: the "
        "process plus its largest worker). The pixel check compares each reader's tiles with OpenSlide's at a few "
        "interior coordinates (max absolute difference per channel).", "",
        "| slide | tool | seg + tiling s | tiles | seg + tiling peak RSS MB (after imports alone) | "
        "read peak RSS MB, 1 proc | 2 procs | max abs diff vs OpenSlide |", "|---|---|---|---|---|---|---|---|",
        *tiling, "",
        "Verdicts: " + "; ".join(verdicts) + ".",
    ]
    if not any(p.name.startswith("gen20k") for p in slides):
        lines[-1] += " The 20k² slide was not measured (--quick): its seg + tiling goal is not judged here."
    lines[-1] += (" On a slide with few tissue tiles, opening the slide and starting the workers is a large part of "
                  "every reader's time, so its 2-process rates say little.")
    if why:
        lines += ["", f"{' and '.join(names)} were not run: {why}."]
    if peers and not why:
        lines += ["", f"Peers, in their own virtualenv (`benchmarks/peers/setup.sh`): {peer_versions()}; gigaslide "
                  "reads with " + ", ".join(f"{m} {version(m)}" for m in VERSIONS[-3:]) + "."]
    print(write_result("reader", "\n".join(lines)).read_text())


if __name__ == "__main__":
    main()
