#!/usr/bin/env bash
# Prepares, here, what benchmarks/gpu_check.sh needs on a lent GPU machine. That machine has Python 3.12
# with PyTorch, timm, h5py, scikit-image, scikit-learn and Lightning, but not gigaslide's other
# dependencies, no ../shared/data, and no package index. This writes .gpu/ (git-ignored, never committed):
#   .gpu/whl/   wheels (CPython 3.12, manylinux x86-64) of the packages the GPU sections import that the
#               device image lacks, at the versions pyproject.toml pins (timm too, to run the pinned version)
#   .gpu/data/  MANIFEST.md, the first N PCam train tiles of each class (hard links into ../shared/data
#               where the file system allows, else copies) for the streaming section's end-to-end experiment and
#               the tile_ssl section's pre-training and probe, the first V PCam valid tiles of each class (the
#               tile_ssl section's test tiles), and slides/cmu-1-small-region.svs (1.9 MB, Aperio RGB JPEG tiles)
#               for the encode section's JPEG rows
# Then one device call runs every check (gpu_check.sh installs the wheels and finds the data itself):
#   run(command="bash benchmarks/gpu_check.sh", carry=[".gpu"], timeout_s=600)
#
#   bash benchmarks/gpu_prepare.sh [--tiles-per-class N] [--valid-per-class V] [--no-wheels] [--out DIR]
#
# Defaults N=1200, V=400: with the wheels (31 MB) about 56 MB, under the 58 MB this script allows (the working tree
# travels in the same 64 MiB). 400 valid tiles per class give the linear probe's balanced accuracy a 95 % CI of about
# +-0.03 (bench_tile_ssl.py scores on all 3,000 PCam valid tiles here).
set -euo pipefail
cd "$(dirname "$0")/.."
n=1200 nv=400 wheels=1 out=.gpu
while [ $# -gt 0 ]; do
  case "$1" in
    --tiles-per-class) n=$2; shift 2 ;;
    --valid-per-class) nv=$2; shift 2 ;;
    --no-wheels) wheels=0; shift ;;
    --out) out=$2; shift 2 ;;
    *) echo "gpu_prepare.sh: unknown option $1 (see the header of benchmarks/gpu_prepare.sh)" >&2; exit 2 ;;
  esac
done
py=${PYTHON:-.venv/bin/python}
[ -x "$py" ] || py=python3
PACKAGES="openslide-python openslide-bin imagecodecs lightly defusedxml timm"

if [ "$wheels" = 1 ]; then
  rm -rf "$out/whl" && mkdir -p "$out/whl"
  for name in $PACKAGES; do
    spec=$(grep -oE "\"$name==[^\"]+\"" pyproject.toml | tr -d '"') || true
    [ -n "$spec" ] || { echo "gpu_prepare.sh: $name is not pinned in pyproject.toml" >&2; exit 1; }
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux1_x86_64 -d "$out/whl" "$spec" 2>&1 | grep -v "is ignored: it is neither" || true
    ls "$out/whl" | grep -qi "^${name//-/_}-" || { echo "gpu_prepare.sh: no wheel downloaded for $spec" >&2; exit 1; }
  done
fi

data=${GIGASLIDE_SHARED_DATA:-../shared/data}
src="$data/tiles/pcam/train"
[ -d "$src/0" ] && [ -d "$src/1" ] || { echo "gpu_prepare.sh: no PCam train tiles in $src" >&2; exit 1; }
rm -rf "$out/data" && mkdir -p "$out/data/tiles/pcam/train"
cp "$data/MANIFEST.md" "$out/data/MANIFEST.md"
first_tiles() {  # SPLIT COUNT: the first COUNT tiles (by name) of each class of PCam's SPLIT
  local from="$data/tiles/pcam/$1" to="$out/data/tiles/pcam/$1" c f names
  for c in 0 1; do
    mkdir -p "$to/$c"
    mapfile -t names < <(ls "$from/$c" | LC_ALL=C sort)
    for f in "${names[@]:0:$2}"; do
      ln "$from/$c/$f" "$to/$c/$f" 2>/dev/null || cp "$from/$c/$f" "$to/$c/$f"
    done
  done
}
first_tiles train "$n"
if [ "$nv" -gt 0 ] && [ -d "$data/tiles/pcam/valid/0" ] && [ -d "$data/tiles/pcam/valid/1" ]; then
  first_tiles valid "$nv"
elif [ "$nv" -gt 0 ]; then
  echo "gpu_prepare.sh: no PCam valid tiles in $data/tiles/pcam/valid: the tile_ssl section will stop" >&2
fi
if [ -f "$data/slides/cmu-1-small-region.svs" ]; then
  mkdir -p "$out/data/slides"
  ln "$data/slides/cmu-1-small-region.svs" "$out/data/slides/" 2>/dev/null || cp "$data/slides/cmu-1-small-region.svs" "$out/data/slides/"
fi
mb=$(du -smL "$out" | cut -f1)
n_valid=$(find "$out/data/tiles/pcam/valid" -type f 2>/dev/null | wc -l)
echo "$out: $(ls "$out/whl" 2>/dev/null | wc -l) wheels, $(find "$out/data/tiles" -type f | wc -l) tiles" \
  "($n_valid of them PCam valid), ${mb} MB (the device call carries at most 64 MiB with the working tree)"
[ "$mb" -le 58 ] || { echo "gpu_prepare.sh: $out is over 58 MB; use fewer --tiles-per-class / --valid-per-class" >&2
  exit 1; }
