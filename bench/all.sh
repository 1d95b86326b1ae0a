#!/bin/sh
# Run every benchmark scenario in turn with the repo's venv Python; extra arguments go to each command,
# e.g.  bench/all.sh --no-linkproxy --duration 3
set -u
here=$(cd "$(dirname "$0")" && pwd)
py="$here/../.venv/bin/python"
rc=0
for s in tcp http1 h2; do
    "$py" "$here/$s.py" "$@" || rc=$?
done
exit $rc
