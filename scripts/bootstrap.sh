# Sourced by scripts/serve.sh and scripts/test.sh: installs what glidefs needs on
# a Debian machine (as root) and builds it into .venv. Idempotent and quick when
# everything is already there: apt runs only for packages that are missing.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO_ROOT/.venv"

ensure_apt() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "glidefs setup: missing Debian packages: ${missing[*]} (run as root, or install them)" >&2
        return 1
    fi
    echo "glidefs setup: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# The build needs a C compiler, Python headers, liburing (ublk), libzstd and
# libxxhash (the pack builder); the venv module.
ensure_build_deps() {
    ensure_apt gcc libc6-dev python3 python3-dev python3-venv liburing-dev libzstd-dev libxxhash-dev
}

ensure_venv() { # ensure_venv [extra]
    local extra="${1:-}"
    if [ ! -x "$VENV/bin/python" ]; then
        python3 -m venv "$VENV"
        "$VENV/bin/pip" install -q --upgrade pip setuptools wheel
    fi
    local spec="$REPO_ROOT"
    [ -n "$extra" ] && spec="$REPO_ROOT[$extra]"
    # Editable install: rebuilds the C extension from native/ every time.
    "$VENV/bin/pip" install -q --no-build-isolation -e "$spec"
}
