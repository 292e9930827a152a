#!/usr/bin/env bash
# Every GPU check of gigaslide, in one script that runs in <= 10 minutes on a lent GPU.
#
#   bash benchmarks/gpu_check.sh [--tiny] [OUT_DIR]      (default OUT_DIR: $OUT, else bench_out/gpu)
#
# Sections (each a python script `benchmarks/gpu_<name>.py --mode tiny|full --out FILE.md`, with its own
# time limit so one slow section cannot eat the others' time):
#   encode     model-only forward vs end-to-end encode tiles/s (ResNet-50, ViT-S/16, ViT-L/16 @224; CPU reader
#              processes, and tiles decoded on the GPU: encode --decode-device cuda),
#              reader-only tiles/s with 1/4/8/16 processes, encode on 16 untiled slides: tiling first vs while encoding,
#              and stored JPEG tiles decoded on the GPU (nvJPEG) vs one CPU thread, pixels compared
#   streaming  StreamingCLAM ResNet-34 fwd+bwd time and peak GPU memory at 8192², 16384², 32768²,
#              and the end-to-end StreamingCLAM vs two-stage experiment sized from a 1-minute probe
#   dinov2     `pretrain --method dinov2` ViT-S/14 at 224 px: CUDA autocast vs fp32, and the Lightning engine
#   tile_ssl   issue #19's protocol at GPU scale, shortened: `pretrain --method mocov2` ResNet-18 on the PCam train
#              tiles at 96 px for 40 s, then bench_tile_ssl.py's linear probe fitted on PCam train, scored on PCam
#              valid: balanced accuracy vs random init (paired bootstrap) and the verdict against the goal (+0.05)
# --tiny (or no CUDA device): a CPU smoke mode that runs in seconds; the test suite runs it so it cannot rot.
# The collected report is OUT_DIR/gpu_check.md; the exit code is non-zero if any section failed. Each section
# rewrites its report after every row, so one stopped by its time limit still shows what it measured.
#
# On a lent GPU machine: run `bash benchmarks/gpu_prepare.sh` here first (wheels of the dependencies the
# device image lacks, and a PCam train + valid subset, into .gpu/), then one device call:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".gpu"], timeout_s=600)
# This script installs .gpu/whl into a private folder, puts src/ on the path where gigaslide is not
# installed, reads .gpu/data where ../shared/data is absent, and stops at once, saying what is missing,
# if the environment cannot run the sections (no device minutes spent on tracebacks).
set -uo pipefail
cd "$(dirname "$0")/.."
mode=full
if [ "${1:-}" = "--tiny" ]; then mode=tiny; shift; fi
out=${1:-${OUT:-bench_out/gpu}}
py=${PYTHON:-.venv/bin/python}
[ -x "$py" ] || py=python3
mkdir -p "$out"
if ! "$py" -c "import gigaslide" 2>/dev/null; then export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"; fi
if ls .gpu/whl/*.whl >/dev/null 2>&1 && ! "$py" -c "import openslide, imagecodecs, lightly" 2>/dev/null; then
  site=${TMPDIR:-/tmp}/gigaslide-gpu-site
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .gpu/whl/*.whl \
    && export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ -z "${GIGASLIDE_SHARED_DATA:-}" ] && [ ! -f ../shared/data/MANIFEST.md ] && [ -f .gpu/data/MANIFEST.md ]; then
  export GIGASLIDE_SHARED_DATA="$PWD/.gpu/data"
fi
missing=$("$py" -c "
import importlib.util as u
need = 'torch torchvision timm h5py skimage sklearn scipy safetensors openslide imagecodecs tifffile lightly defusedxml pytorch_lightning gigaslide'
print(' '.join(m for m in need.split() if u.find_spec(m) is None))" 2>&1) || missing="python ($py) failed: $missing"
if [ -n "$missing" ]; then
  { echo "# GPU check ($mode mode)"; echo; echo "- environment: missing $missing -- run benchmarks/gpu_prepare.sh here" \
      "and carry .gpu (see this script's header)"; } | tee "$out/gpu_check.md"
  exit 1
fi
if [ "$mode" = full ] && ! "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device here: running the tiny CPU mode instead"
  mode=tiny
fi
# 560 s in all: the rest of a 600-s device call sets up. tile_ssl needs ~90 s (40 s of pre-training, ~35 s of imports,
# embedding and two probes with 1,000 bootstrap resamples, measured here on CPU: ~7 s per probe); taken mostly from
# streaming (310 -> 245; its default --budget 300 -> 235 s, so the part-2 experiment shrinks, and its report says when
# it does not fit), and 25 s from encode, whose report keeps every row measured before its limit.
# every section's scratch files (generated slides, tile folders, runs: up to ~250 MB) in one folder, removed at exit
# (each section made its own under /tmp and left it there; a section stopped by its time limit cannot clean up)
scratch=$(mktemp -d "${TMPDIR:-/tmp}/gigaslide-gpu-check.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
export TMPDIR="$scratch"
declare -A limit_full=([encode]=170 [streaming]=245 [dinov2]=55 [tile_ssl]=90)
declare -A limit_tiny=([encode]=120 [streaming]=120 [dinov2]=120 [tile_ssl]=120)
report="$out/gpu_check.md"
env_line=$("$py" -c "
import platform, torch
dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device'
print(f'Python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), {dev}')" 2>&1 | tail -1)
{ echo "# GPU check ($mode mode)"; echo; echo "$(date -u +%FT%TZ) on $(hostname): $env_line"; echo; } > "$report"
status=0
for name in encode streaming dinov2 tile_ssl; do
  script="benchmarks/gpu_${name}.py"
  if [ ! -f "$script" ]; then
    echo "- section $name: MISSING ($script not found)" >> "$report"; status=1; continue
  fi
  if [ "$mode" = full ]; then lim=${limit_full[$name]}; else lim=${limit_tiny[$name]}; fi
  t0=$(date +%s)
  timeout "$lim" "$py" "$script" --mode "$mode" --out "$out/gpu_${name}.md"
  rc=$?
  dt=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ] && [ -s "$out/gpu_${name}.md" ]; then
    echo "- section $name: ok (${dt} s)" >> "$report"
  else
    echo "- section $name: FAILED (exit $rc after ${dt} s, limit ${lim} s)" >> "$report"; status=1
  fi
done
echo >> "$report"
for name in encode streaming dinov2 tile_ssl; do
  [ -s "$out/gpu_${name}.md" ] && { cat "$out/gpu_${name}.md"; echo; } >> "$report"
done
cat "$report"
exit $status
