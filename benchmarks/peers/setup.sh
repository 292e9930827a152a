#!/usr/bin/env bash
# Creates the peers' own virtualenv for bench_reader.py (not a project dependency), once per requirements.txt.
#
#   bash benchmarks/peers/setup.sh [VENV]     (default /tmp/gigaslide-peers-venv)
#
# hs2p reads through pyvips, with libvips from the pyvips-binary wheel (no apt). TIAToolbox comes with
# every dependency it declares (torch, torchvision, timm, ... : `tiatoolbox.tools` imports its model
# package at import, so a trimmed install does not import), several GB.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
VENV="${1:-/tmp/gigaslide-peers-venv}"
STAMP="$VENV/.gigaslide-peers-$(cat "$HERE/requirements.txt" "$0" | sha1sum | cut -c1-12)"
[ -f "$STAMP" ] && exit 0
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
if ! "$VENV/bin/pip" install -q --disable-pip-version-check -r "$HERE/requirements.txt" > "$VENV/pip.log" 2>&1; then
  grep -v "^WARNING: Location" "$VENV/pip.log" | tail -5 >&2
  exit 1
fi
"$VENV/bin/python" -c "import hs2p, pyvips; from tiatoolbox.tools import patchextraction, tissuemask; from tiatoolbox.wsicore.wsireader import WSIReader"
touch "$STAMP"
