#!/usr/bin/env bash
# Set up llm-pack on a build host, and run its demo or its tests.
#
#   ./build.sh            create .venv and install the `pack` command into it
#   ./build.sh demo       ... then build the built-in demo bundle, install it into a network-less systemd
#                         container, start llm@tiny and print a real completion (needs root + apt)
#   ./build.sh test       ... then run the whole test suite (what CI runs)
#
# Environment: PYTHON (interpreter to build the venv with, default python3), LLM_PACK_VENV (default .venv),
#              LLM_TEST_WORKERS (test processes for ./build.sh test, default 2; 0: none).
set -eu

main() {
    local here cmd
    here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
    cd "$here"
    cmd="${1:-setup}"
    [ "$#" -gt 0 ] && shift
    case "$cmd" in
        -h|--help|help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; return 0 ;;
        setup|demo|test) ;;
        *) echo "build.sh: unknown command '$cmd' (try: ./build.sh --help)" >&2; return 2 ;;
    esac
    setup_venv
    [ "$cmd" = demo ] && ensure_demo_tools
    case "$cmd" in
        setup) echo "ready: $(venv_bin)/pack --help" ;;
        demo) "$(venv_bin)/python" -m devkit.demo "$@" ;;
        # whole test files go to LLM_TEST_WORKERS workers (default 2; 0 runs them in this process)
        test) "$(venv_bin)/python" -m pytest -n "${LLM_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@" ;;
    esac
}

# The demo boots a systemd container and builds a small conda channel: it needs a few Debian packages.
ensure_demo_tools() {
    local missing="" tool
    for tool in debootstrap systemd-nspawn patchelf zstd; do
        command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
    done
    [ -z "$missing" ] && return 0
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "build.sh demo: missing:$missing; install the packages in .ci/apt-packages.txt (as root)" >&2
        return 1
    fi
    echo "installing the demo's system packages (missing:$missing)"
    apt-get update -qq
    # shellcheck disable=SC2046
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        $(grep -hv '^\s*#' .ci/apt-packages.txt) >/dev/null
}

venv_bin() { echo "${LLM_PACK_VENV:-$PWD/.venv}/bin"; }

setup_venv() {
    local venv py stamp
    venv="${LLM_PACK_VENV:-$PWD/.venv}"
    py="${PYTHON:-python3}"
    if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "build.sh: needs Python >= 3.11 (found: $("$py" --version 2>&1 || echo none)); set PYTHON=..." >&2
        return 1
    fi
    [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
    # reinstall only when the dependency list changed
    stamp="$venv/.llm-pack-setup.sha256"
    if [ ! -f "$stamp" ] || ! sha256sum --status -c "$stamp" 2>/dev/null; then
        echo "setting up $venv (pip install -e .[test]; log: $venv/setup.log)"
        if ! { "$venv/bin/python" -m pip install --upgrade pip &&
               "$venv/bin/python" -m pip install -e ".[test]"; } >"$venv/setup.log" 2>&1; then
            tail -n 30 "$venv/setup.log" >&2
            echo "build.sh: pip install failed (full log: $venv/setup.log)" >&2
            return 1
        fi
        sha256sum setup.cfg pyproject.toml > "$stamp"
    fi
    # An editable install compiles nothing, and PYTHONDONTWRITEBYTECODE (set on many CI hosts) stops Python
    # from caching it later: every `pack` run would compile our sources again (~40 ms). Only stale files
    # are recompiled.
    "$venv/bin/python" -m compileall -q packager installer devkit >/dev/null
}

main "$@"
