#!/usr/bin/env bash
# Builds the libFuzzer targets with ASan+UBSan into native/fuzz/out/.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$here/out"
mkdir -p "$out"
CC="${CC:-clang}"
flags=(-g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -Wall -Wextra -Werror -pthread)
n="$here/.."
"$CC" "${flags[@]}" -o "$out/fuzz_nbd_request" "$here/fuzz_nbd_request.c" "$n/nbd_proto.c"
"$CC" "${flags[@]}" -o "$out/fuzz_wal_record" "$here/fuzz_wal_record.c" "$n/wal_record.c" "$n/crc32c.c"
"$CC" "${flags[@]}" -o "$out/fuzz_wal_replay" "$here/fuzz_wal_replay.c" "$n/wal.c" "$n/wal_record.c" "$n/crc32c.c" "$n/crash_point.c"
"$CC" "${flags[@]}" -o "$out/fuzz_state_file" "$here/fuzz_state_file.c" "$n/state_file.c" "$n/crc32c.c"
