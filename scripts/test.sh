#!/usr/bin/env bash
# Set up everything the test suite needs and run all of it: lint, unit,
# integration with real clients, crash, hostile input, fuzzing, sanitizers.
# Arguments are passed to pytest.
set -euo pipefail
. "$(dirname "$0")/bootstrap.sh"
ensure_build_deps
# Real clients and peers (testing.md), clang for libFuzzer and sanitizers.
ensure_apt qemu-utils libnbd-bin python3-libnbd nbdkit fio clang libclang-rt-14-dev qemu-system-x86 nbd-client e2fsprogs zstd curl systemd rclone
ensure_venv test
cd "$REPO_ROOT"
echo "== ruff" >&2
"$VENV/bin/ruff" check glide tests bench
echo "== pytest" >&2
set +e
"$VENV/bin/python" -m pytest -q -ra "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "test.sh: pytest collected no tests; that is a failure" >&2
    exit 1
fi
exit "$rc"
