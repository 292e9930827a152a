"""Run every benchmark (or the ones named) and collect benchmarks/results/*.md into benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/run_all.py                 # all
    .venv/bin/python benchmarks/run_all.py encode tiling   # some
    .venv/bin/python benchmarks/run_all.py --collect       # only rebuild RESULTS.md
    .venv/bin/python benchmarks/run_all.py --dry-run       # print the commands only

A benchmark whose results file records the command(s) that measured it (``command: `...` `` footers, ``Command:``
lines of sectioned files) is re-run with exactly those arguments, so ``make bench`` reproduces what RESULTS.md
shows; one without a result yet runs with its defaults.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: Sections in data-flow order; any other bench_<name>.py / results/<name>.md follows alphabetically.
#: (bench_tile_finetune writes into tile_ssl.md)
ORDER = [
    "reader", "downsample", "encode", "encode_precision", "encoder_load", "manifest", "feature_load", "tiling",
    "tiling_parallel", "startup", "cpu_paths", "tile_ssl", "tile_finetune", "tile_precision", "tile_ablation", "dinov2",
    "nuclei", "mil", "mil_memory", "transmil_attention", "encoder_leaderboard", "slide_ssl", "slide_ssl_stain",
    "slide_ssl_composition", "slide_ssl_composition_task", "slide_ssl_tumour_full", "slide_ssl_composition_full",
    "slide_ssl_context_full", "slide_ssl_context_slpd_seeds", "slide_ssl_context_grid14", "slide_ssl_context_s120",
    "slide_ssl_context_s120g14", "slide_ssl_context_nocomp", "slide_ssl_context_annotated",
    "slide_ssl_context_annotated30", "slide_ssl_context_full_annotated", "slide_ssl_context_tissue_pair",
    "slide_ssl_context_nocomp_pair", "slide_ssl_context_ppeg", "slide_pretrain_speed", "slide_context", "streaming",
    "viewer", "reliability",
]


def scripts() -> list[str]:
    found = {p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py")}
    return [n for n in ORDER if n in found] + sorted(found - set(ORDER))


_COMMAND = re.compile(r"[Cc]ommand: `([^`]*bench_[a-z_0-9]+\.py[^`]*)`")


def recorded_commands(text: str) -> list[list[str]]:
    """The benchmark commands a results file records, in order, each once, as argv for this interpreter."""
    out: list[list[str]] = []
    for m in _COMMAND.finditer(text):
        argv = shlex.split(m.group(1).split("&&")[-1])
        while argv and argv[0] in ("nice", "env"):
            argv = argv[1:]
        i = next(k for k, a in enumerate(argv) if a.endswith(".py"))
        script = HERE / Path(argv[i]).name
        cmd = [sys.executable, str(script), *argv[i + 1:]]
        if script.is_file() and cmd not in out:
            out.append(cmd)
    return out


def plan(names: list[str]) -> list[list[str]]:
    """Commands for the named benchmarks: the commands their results files record (``<name>.md``, ``<name>_*.md``),
    else the script's defaults unless another results file records a run of that script (e.g. a section)."""
    results = {p.stem: recorded_commands(p.read_text()) for p in sorted((HERE / "results").glob("*.md"))}
    everywhere = {Path(c[1]).name for cmds in results.values() for c in cmds}
    out: list[list[str]] = []
    for n in names:
        recorded = [c for t, cmds in results.items() if t == n or t.startswith(n + "_") for c in cmds]
        if not recorded and (HERE / f"bench_{n}.py").is_file() and f"bench_{n}.py" not in everywhere:
            recorded = [[sys.executable, str(HERE / f"bench_{n}.py")]]
        out += [c for c in recorded if c not in out]
    return out


#: Fixes that change what some recorded sections would measure, for the sections measured before them (each
#: section's rows say when they ran: dates, or the git HEAD a tile-SSL run trained at). Prose only: no numbers.
CHANGES = [
    ("abb7f5e", "MoCo v2's symmetric loss enqueued the first direction's keys before the second direction's loss, so "
     "that direction counted each query's own-view key as a negative", "`mocov2` rows trained at an earlier git HEAD "
     "(tile_ssl sections other than `seeds15`, its fine-tune section included; tile_precision; encoder_leaderboard)"),
    ("e3b52a4", "MIL class weights had no effect (one bag per step divided them out again; the mosaic cohorts are "
     "balanced, so their weights are near 1)", "MIL rows of the slide_ssl* and encoder_leaderboard sections"),
    ("127e4cd", "a few-shot MIL run (`--train-slides N`) could early-stop the draws that held two slides of every "
     "class on a validation split carved from them and train the others on all N to the last epoch (now one "
     "protocol per run)", "few-shot MIL rows of the slide_ssl* sections where a draw held one slide of a class"),
    ("336290d", "`encode` folded batch norms only in runs of 128 tiles or more (now on every run)",
     "encode rows of runs under 128 tiles (their `default folds BN` column says which ran)"),
    ("b81527a", "Giga-SSL's slide embedding drew its random views by the tiles' order in the feature file (now in grid "
     "order, so a re-ordered file gives the same embedding; the same seed now draws other views); SLPD indexed the "
     "position embedding with each slide's own lattice side where slides' lattices differed in size",
     "Giga-SSL rows of the slide_ssl* sections (other random views, same protocol); SLPD rows only where a cohort's "
     "lattice sides differ"),
    ("bd76aac", "prediction CSVs rounded probabilities to 6 significant digits, which tied very confident slides in the "
     "AUC and could flip calls within 5e-7 of 0.5", "MIL and slide-SSL rows scored from prediction files "
     "(slide_ssl*, encoder_leaderboard; the mil section was measured after it), where predictions were that confident"),
    ("7d87f07", "a read resized to a target mpp that is neither within 1 % of a pyramid level's nor 2, 4 or 8 times "
     "one covered up to one level px more than asked, stretched onto the tile", "the dinov2 sections' foundation "
     "tiles cut from CMU-1 (0.499 µm/px) at 0.97 µm/px (the whole region read in one call, so by at most one px at "
     "its far edges)"),
    ("4479831", "EMA teachers took the student's BatchNorm running statistics each step (parameters are still averaged "
     "as before; training in train mode used batch statistics, so only networks evaluated in eval mode with those "
     "statistics change): the exported DINO teacher of a CNN and its progress monitor", "`dino` rows with a ResNet "
     "(tile_ssl sections, tile_precision, encoder_leaderboard's dino encoder); not MoCo v2 (its query encoder is "
     "exported), not DINOv2 / ViTs (no BatchNorm)"),
    ("38e24e1", "Giga-SSL's `learned` flag counted a run as learned when its exported epoch tied the untrained "
     "encoder's view retrieval and beat its cosine gap by any amount (now by 0.01)", "the Giga-SSL 'did not learn' "
     "verdict lines of the slide_ssl* sections, which could be missing for runs that tied their untrained encoder"),
    ("26f8712", "SwAV's prototypes carried a trained bias (lightly's SwaVPrototypes; the paper's scores are z.c_k over "
     "unit prototypes), and DINOv2's layer-wise lr decay was one layer short (last block 1.0, not 0.9; mask token "
     "at the heads' rate) with drop-path rising over the blocks instead of uniform", "`swav` rows (tile_ssl "
     "sections other than `recheck3`, which was trained after it; tile_precision, encoder_leaderboard) and the "
     "dinov2 sections' continued pre-training rows"),
    ("27d69a0", "tile-level bootstrap CIs resampled the test tiles without regard to class (resamples missing a class "
     "were dropped unreported), and few-shot CIs resampled the test tiles only, not the label draws (far too narrow: "
     "a 1-per-class CI excluded 3 of its 5 draws)", "tile-level CI columns (tile_ssl, tile_ablation, tile_precision, "
     "dinov2, encoder_leaderboard patch level), most of all the few-shot ones; point estimates are unchanged"),
]


def collect() -> Path:
    parts = ["# Benchmark results", "",
             "Each section is written by `benchmarks/bench_<topic>.py` (command and machine under each). "
             "Ratios are measured side by side in one run. "
             "This file is rebuilt by `benchmarks/run_all.py --collect`.", "",
             "Fixed after some sections were measured (those rows are what that code measured; re-run them with "
             "`make bench`):", ""]
    parts += [f"- {commit}: {what}. Affects: {where}." for commit, what, where in CHANGES]
    parts += [""]
    names = [n for n in ORDER if (HERE / "results" / f"{n}.md").is_file()]
    names += sorted(p.stem for p in (HERE / "results").glob("*.md") if p.stem not in ORDER)
    for n in names:
        text = (HERE / "results" / f"{n}.md").read_text()
        parts += ["\n".join("#" + ln if ln.startswith("#") else ln for ln in text.splitlines()), ""]  # one level down
    out = HERE / "RESULTS.md"
    out.write_text("\n".join(parts))
    return out


def main() -> None:
    args = sys.argv[1:]
    dry = "--dry-run" in args
    args = [a for a in args if a != "--dry-run"]
    if args != ["--collect"]:
        for cmd in plan(args or scripts()):
            print("== " + " ".join(shlex.quote(c) for c in cmd[1:]), flush=True)
            if not dry:
                subprocess.run(cmd, check=False)
    if not dry:
        print(collect())


if __name__ == "__main__":
    main()
