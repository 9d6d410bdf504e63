#!/bin/sh
# Installs the Autobahn TestSuite (wstest, Python 2.7 only) into build/autobahn-venv.
# Idempotent: does nothing when that wstest runs and was installed from the current
# tests/conformance/requirements-py27.txt.
#
# Python 2.7: $PYTHON2, else pyenv's 2.7.18, else python2.7 on PATH. Debian has no Python 2.7
# package any more; `pyenv install 2.7.18` builds one. The C extension wsaccel is built from
# source, so gcc and libc6-dev are installed with apt-get when missing (as root).
set -eu
cd "$(dirname "$0")/.."

VENV=build/autobahn-venv
REQ=tests/conformance/requirements-py27.txt
STAMP=$VENV/.requirements-installed
LOG=build/autobahn-install.log

say() { echo "install-autobahn: $*"; }
die() { echo "install-autobahn: $*" >&2; exit 1; }

if [ -x "$VENV/bin/wstest" ] && "$VENV/bin/wstest" -a >/dev/null 2>&1 && cmp -s "$REQ" "$STAMP"; then
    say "wstest already installed in $VENV"
    exit 0
fi

is_py27() { [ -n "$1" ] && "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (2, 7))' >/dev/null 2>&1; }

PY=""
if [ -n "${PYTHON2:-}" ]; then
    is_py27 "$PYTHON2" || die "PYTHON2=$PYTHON2 is not a working Python 2.7 interpreter"
    PY=$PYTHON2
else
    for cand in \
        "$(pyenv root 2>/dev/null || true)/versions/2.7.18/bin/python" \
        "${PYENV_ROOT:-$HOME/.pyenv}/versions/2.7.18/bin/python" \
        "$(command -v python2.7 || true)"; do
        if is_py27 "$cand"; then PY=$cand; break; fi
    done
fi
[ -n "$PY" ] || die "no Python 2.7 found: install one (pyenv install 2.7.18) or set PYTHON2=/path/to/python2.7"

# A C compiler and libc headers for wsaccel (autobahn[accelerate]).
missing=""
command -v gcc >/dev/null 2>&1 || missing="$missing gcc"
[ -e /usr/include/stdio.h ] || missing="$missing libc6-dev"
if [ -n "$missing" ]; then
    [ "$(id -u)" -eq 0 ] || die "missing Debian packages:$missing (run as root, or: sudo apt-get install$missing)"
    say "installing Debian packages:$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $missing
fi

mkdir -p build
: >"$LOG"
quiet() {  # run "$@" with its output in $LOG; show the end of it if it fails
    if ! "$@" >>"$LOG" 2>&1; then
        tail -n 30 "$LOG" >&2
        die "failed: $* (full output in $LOG)"
    fi
}

say "using $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])' 2>&1))"
if ! "$PY" -m pip --version >/dev/null 2>&1; then
    say "no pip for $PY: running ensurepip"
    quiet "$PY" -m ensurepip
fi
if ! "$PY" -m virtualenv --version >/dev/null 2>&1; then
    say "installing virtualenv<20.22 for $PY"
    quiet "$PY" -m pip install -q --disable-pip-version-check 'virtualenv<20.22'
fi
if ! "$VENV/bin/python" -c '' >/dev/null 2>&1; then
    rm -rf "$VENV"
    say "creating $VENV"
    quiet "$PY" -m virtualenv -q "$VENV"
fi
say "installing $REQ into $VENV (log: $LOG)"
quiet "$VENV/bin/pip" install -q --disable-pip-version-check -r "$REQ"
"$VENV/bin/wstest" -a >/dev/null 2>&1 || die "$VENV/bin/wstest does not run after install (see $LOG)"
cp "$REQ" "$STAMP"
say "installed: $("$VENV/bin/wstest" -a 2>&1 | tr '\n' ' ')"
