"""TransMIL's attention on large bags in training: exact attention as one call (torch's plain path with attention
dropout) vs in query chunks recomputed in the backward pass (``gigaslide.mil.models.ATTENTION_CHUNK_BYTES``), and the
paper's Nystrom attention (``TransMIL(attention="nystrom")``, ``gigaslide.mil.nystrom``), side by side in one run.

Each row is one training step (forward + backward of a sum) of one attention layer (64-d, 2 heads, dropout 0.25;
Nystrom: 32 landmarks, TransMIL's dim // 2) on a bag of N tokens, each arm in a fresh process (peak RSS of that
process, imports included; the baseline row is a process that only imports). The one-call arm sets the chunk bound
out of reach, as the code was before chunking. The verdict lines are computed from the rows.

    .venv/bin/python benchmarks/bench_transmil_attention.py [--tokens 5000,10000] [--chunked-only 20000]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_note, run_child_peak_rss, write_result  # noqa: E402

STEP = """
import time, torch
from gigaslide.mil import models as M
torch.set_num_threads(1)
torch.manual_seed(0)
if {arm!r} == "one call":
    M.ATTENTION_CHUNK_BYTES = 1 << 62
if {arm!r} == "nystrom":
    from gigaslide.mil.nystrom import NystromSelfAttention
    att = NystromSelfAttention(64, 2, dropout=0.25).train()
else:
    att = M._SelfAttention(64, 2, dropout=0.25).train()
x = torch.randn({n}, 64, requires_grad=True)
t = time.perf_counter()
out, _ = att(x)
out.square().sum().backward()
print(time.perf_counter() - t)
"""


def step(n: int, arm: str) -> tuple[float, float]:
    gb, out = run_child_peak_rss(STEP.format(n=n, arm=arm))
    return gb, float(out.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="5000,10000", help="bag sizes run in both arms, comma-separated")
    ap.add_argument("--chunked-only", default="20000", help="larger bag sizes run chunked only (the one-call arm "
                                                             "needs heads x N x N weights several times over)")
    args = ap.parse_args()
    base, _ = run_child_peak_rss("import torch\nfrom gigaslide.mil import models, nystrom")
    both = [int(v) for v in args.tokens.split(",") if v]
    only = [int(v) for v in args.chunked_only.split(",") if v]
    rows = []
    for n in both + only:
        one = step(n, "one call") if n in both else None
        rows.append((n, one, step(n, "chunked"), step(n, "nystrom")))
    lines = ["# TransMIL attention on large bags in training: exact (one call, query chunks) vs Nystrom", "",
             f"{load_note()}; one training step (forward + backward) of the attention layer (64-d, 2 heads, dropout "
             f"0.25; Nystrom with 32 landmarks), 1 torch thread, each arm in a fresh process; a process that only "
             f"imports peaks at {base:.2f} GB.",
             "",
             "| tokens | exact, one call: peak RSS GB | one call: s | exact, chunked: peak RSS GB | chunked: s | "
             "peak RSS above imports, one call / chunked | Nystrom: peak RSS GB | Nystrom: s |",
             "|---|---|---|---|---|---|---|---|"]
    for n, one, ch, ny in rows:
        first = (f"| {n:,} | not run | not run | " if one is None else f"| {n:,} | {one[0]:.2f} | {one[1]:.1f} | ")
        ratio = "—" if one is None else f"{(one[0] - base) / max(ch[0] - base, 1e-9):.1f}x"
        lines.append(f"{first}{ch[0]:.2f} | {ch[1]:.1f} | {ratio} | {ny[0]:.2f} | {ny[1]:.2f} |")
    lines += ["", "Verdicts (computed from the rows above):", ""]
    for n, one, ch, ny in rows:
        if one is not None:
            lines.append(f"- {n:,} tokens: chunked attention holds {ch[0] - base:.2f} GB above imports where one call "
                         f"held {one[0] - base:.2f} GB; its step takes {ch[1] / one[1]:.2f}x the one call's time.")
        else:
            lines.append(f"- {n:,} tokens: chunked attention holds {ch[0] - base:.2f} GB above imports.")
        lines.append(f"- {n:,} tokens: Nystrom attention holds {ny[0] - base:.2f} GB above imports and its step takes "
                     f"{ny[1] / ch[1]:.3f}x the chunked exact step's time ({ny[1]:.2f} s vs {ch[1]:.1f} s).")
    print(write_result("transmil_attention", "\n".join(lines)))


if __name__ == "__main__":
    main()
