"""TransMIL's attention on large bags in training: one call (torch's plain path with attention dropout) vs query
chunks recomputed in the backward pass (``gigaslide.mil.models.ATTENTION_CHUNK_BYTES``), side by side in one run.

Each row is one training step (forward + backward of a sum) of ``_SelfAttention(64, 2 heads, dropout 0.25)`` on a
bag of N tokens, each arm in a fresh process (peak RSS of that process, imports included; the baseline row is a
process that only imports). The one-call arm sets the chunk bound out of reach, as the code was before chunking.
The verdict lines are computed from the rows.

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
if {one_call}:
    M.ATTENTION_CHUNK_BYTES = 1 << 62
att = M._SelfAttention(64, 2, dropout=0.25).train()
x = torch.randn({n}, 64, requires_grad=True)
t = time.perf_counter()
out, _ = att(x)
out.square().sum().backward()
print(time.perf_counter() - t)
"""


def step(n: int, one_call: bool) -> tuple[float, float]:
    gb, out = run_child_peak_rss(STEP.format(n=n, one_call=one_call))
    return gb, float(out.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="5000,10000", help="bag sizes run in both arms, comma-separated")
    ap.add_argument("--chunked-only", default="20000", help="larger bag sizes run chunked only (the one-call arm "
                                                             "needs heads x N x N weights several times over)")
    args = ap.parse_args()
    base, _ = run_child_peak_rss("import torch\nfrom gigaslide.mil import models")
    both = [int(v) for v in args.tokens.split(",") if v]
    only = [int(v) for v in args.chunked_only.split(",") if v]
    rows = []
    for n in both + only:
        one = step(n, True) if n in both else None
        chunked = step(n, False)
        rows.append((n, one, chunked))
    lines = ["# TransMIL attention on large bags in training: one call vs query chunks", "",
             f"{load_note()}; one training step (forward + backward) of the attention layer (64-d, 2 heads, dropout "
             f"0.25), 1 torch thread, each arm in a fresh process; a process that only imports peaks at {base:.2f} GB.",
             "",
             "| tokens | one call: peak RSS GB | one call: s | chunked: peak RSS GB | chunked: s | "
             "peak RSS above imports, one call / chunked |", "|---|---|---|---|---|---|"]
    for n, one, ch in rows:
        if one is None:
            lines.append(f"| {n:,} | not run | not run | {ch[0]:.2f} | {ch[1]:.1f} | — |")
        else:
            lines.append(f"| {n:,} | {one[0]:.2f} | {one[1]:.1f} | {ch[0]:.2f} | {ch[1]:.1f} | "
                         f"{(one[0] - base) / max(ch[0] - base, 1e-9):.1f}x |")
    lines += ["", "Verdicts (computed from the rows above):", ""]
    for n, one, ch in rows:
        if one is not None:
            lines.append(f"- {n:,} tokens: chunked attention holds {ch[0] - base:.2f} GB above imports where one call "
                         f"held {one[0] - base:.2f} GB; its step takes {ch[1] / one[1]:.2f}x the one call's time.")
        else:
            lines.append(f"- {n:,} tokens: chunked attention holds {ch[0] - base:.2f} GB above imports.")
    print(write_result("transmil_attention", "\n".join(lines)))


if __name__ == "__main__":
    main()
