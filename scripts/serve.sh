#!/usr/bin/env bash
# Set up glidefs on this machine and run `glidefs serve` (embedded defaults
# unless arguments are given: they are passed to `glidefs serve`).
set -euo pipefail
. "$(dirname "$0")/bootstrap.sh"
ensure_build_deps
ensure_venv
exec "$VENV/bin/glidefs" serve "$@"
