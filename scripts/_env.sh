# Sourced by scripts/run and scripts/test: find Python 3.12 and make .venv with edgemeter installed.
# Idempotent: a venv whose install stamp matches pyproject.toml is reused as it is.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${EDGEMETER_VENV:-$ROOT/.venv}"

find_python() {
    local c
    for c in python3.12 "$(command -v pyenv >/dev/null 2>&1 && pyenv root)/versions/3.12"*/bin/python3.12; do
        if [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 \
            && "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
            echo "$c"; return 0
        fi
    done
    # pyenv shims only resolve python3.12 when a 3.12 is selected; select the newest one we have.
    if command -v pyenv >/dev/null 2>&1; then
        local v
        v="$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.[0-9]+)?$' | sort -V | tail -n 1 || true)"
        if [ -n "$v" ]; then echo "$(pyenv root)/versions/$v/bin/python3.12"; return 0; fi
    fi
    return 1
}

ensure_venv() {
    local extras="$1" stamp="$VENV/.edgemeter-install-$1"
    if [ ! -x "$VENV/bin/python" ]; then
        local py
        py="$(find_python)" || { echo "edgemeter needs Python 3.12 (python3.12 on PATH or via pyenv)" >&2; exit 2; }
        "$py" -m venv "$VENV"
    fi
    if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
        # pip's and setuptools' chatter goes to a log; shown only when the install fails.
        local log="$VENV/install.log"
        if ! { "$VENV/bin/python" -m pip install --quiet --upgrade pip \
                && "$VENV/bin/python" -m pip install --quiet -e "$ROOT[$extras]"; } >"$log" 2>&1; then
            cat "$log" >&2
            echo "edgemeter: installing the environment failed (log: $log)" >&2
            exit 2
        fi
        touch "$stamp"
    fi
    export PATH="$VENV/bin:$PATH"
}
