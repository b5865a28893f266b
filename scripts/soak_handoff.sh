#!/usr/bin/env bash
# Soak: N handoffs in a row (default 200) under fio verify on NBD (Unix and
# TCP) with one libnbd session held across all of them; any verify error,
# lost connection or failed handoff fails it. Prints the stall and duration
# medians. Run after the README's test command has set up the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
export GLIDE_HANDOFFS="${1:-200}"
exec .venv/bin/python -m pytest -q -s -p no:cacheprovider \
    tests/integration/test_handoff.py -k test_repeated_handoffs_under_fio_verify
