#!/bin/sh
# Instructions per relayed message on the in-process relay path (bench/relay_path.py), by
# callgrind: two runs that differ only in the number of reads, so start-up cancels out.
#   sh bench/instructions.sh [TREE] [relay_path.py flags, --batch excepted]
# TREE is a source tree (default: this one), e.g. build/bench-worktrees/<commit>.
set -eu
TREE=${1:-.}
[ $# -gt 0 ] && shift
PY=${PYTHON:-.venv/bin/python}
count() {
    out=$(mktemp)
    PYTHONPATH="$TREE" valgrind --tool=callgrind --callgrind-out-file=/dev/null "$PY" \
        bench/relay_path.py --batch 8 --repeats 1 --reads "$@" 2>"$out" >/dev/null || true
    sed -n 's/.*Collected : \([0-9]*\).*/\1/p' "$out"
    rm -f "$out"
}
small=$(count 200 "$@")
big=$(count 1200 "$@")
echo "$(( (big - small) / 8000 )) instructions per relayed message"
