"""Loading a large encoder from a checkpoint: the trunk made on the meta device with the checkpoint assigned into it
(``build_encoder``'s path) vs made with a random init and the checkpoint copied into it (the earlier path).

The released weights are gated and not on this machine, so each entry's checkpoint is made here with random
weights in its own timm layout (the same size and keys as the released file). Each load runs in a fresh process;
the two paths alternate; peak RSS is the child's own.

    .venv/bin/python benchmarks/bench_encoder_load.py [--encoders virchow2,h_optimus_0] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_note, run_child_peak_rss, write_result  # noqa: E402

CHILD = """
import time, torch
import gigaslide.encoders.model as M
from gigaslide.encoders import build_encoder
if {copy!r}:
    M.assignable = lambda trunk: False  # the random-init + copy path
t = time.perf_counter()
enc = build_encoder({name!r}, {path!r})
seconds = time.perf_counter() - t
with torch.no_grad():
    f = enc(torch.randint(0, 256, (1, 224, 224, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))
print(__import__('json').dumps({{"seconds": seconds, "dim": int(f.shape[1]), "norm": float(f.norm())}}))
"""


def checkpoint(name: str, work: Path) -> tuple[Path, float]:
    """A random checkpoint of ``name``'s architecture (safetensors) and its size in GB."""
    import torch
    from safetensors.torch import save_file

    from gigaslide.encoders import ENCODERS, create_trunk

    path = work / f"{name}.safetensors"
    torch.manual_seed(0)
    trunk = create_trunk(ENCODERS.get(name))
    save_file({k: v.contiguous() for k, v in trunk.state_dict().items()}, str(path))
    return path, path.stat().st_size / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--encoders", default="virchow2,h_optimus_0")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    note = load_note()
    work = Path(tempfile.mkdtemp(prefix="gs-encload-"))
    rows, verdicts = [], []
    for name in args.encoders.split(","):
        path, gb = checkpoint(name, work)
        got: dict[str, list[tuple[float, float, dict]]] = {"meta": [], "copy": []}
        for r in range(args.repeats):
            for arm in (("meta", "copy") if r % 2 == 0 else ("copy", "meta")):
                peak, out = run_child_peak_rss(CHILD.format(copy=arm == "copy", name=name, path=str(path)))
                got[arm].append((json.loads(out.strip().splitlines()[-1])["seconds"], peak,
                                 json.loads(out.strip().splitlines()[-1])))
        same = len({round(x[2]["norm"], 3) for a in got.values() for x in a}) == 1
        med = {a: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for a, v in got.items()}
        for arm, label in (("meta", "meta device, checkpoint assigned (build_encoder)"),
                           ("copy", "random init, checkpoint copied (earlier path)")):
            runs = ", ".join(f"{x[0]:.1f}" for x in got[arm])
            rows.append(f"| {name} | {gb:.2f} | {label} | {med[arm][0]:.1f} ({runs}) | {med[arm][1]:.2f} |")
        (ms, mgb), (cs, cgb) = med["meta"], med["copy"]
        verdicts.append(f"- {name}: assigning into a meta-device trunk loads in {ms:.1f} s vs {cs:.1f} s (×{cs / ms:.1f} "
                        f"faster) with peak RSS {mgb:.2f} vs {cgb:.2f} GB ({abs(cgb - mgb):.2f} GB "
                        f"{'less' if cgb >= mgb else 'MORE'}); features {'identical' if same else 'DIFFERENT'} across "
                        "paths and runs (norm of one tile's embedding).")
        path.unlink()
    text = "\n".join([
        "# Loading a large encoder from a checkpoint", "",
        "Each entry's checkpoint is made here with random weights in its timm layout (the released weights are gated; "
        "same size and keys). `build_encoder(name, checkpoint)` in a fresh process, then one 224² tile embedded; the "
        f"two paths alternate, {args.repeats} runs each (median, then each run). Peak RSS = the child process "
        f"(torch and the model included). {note}.", "",
        "| encoder | checkpoint GB | trunk | load s (per run) | peak RSS GB |", "|---|---|---|---|---|", *rows, "",
        "Verdicts (computed from the rows above):", "", *verdicts])
    print(write_result("encoder_load", text).read_text())


if __name__ == "__main__":
    main()
