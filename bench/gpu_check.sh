#!/usr/bin/env bash
# Every GPU check of trainerd in one run (see bench/gpu_check.py): speed of each attention and loss against a
# hand loop, MFU, flex against SDPA, an FSDP2 save and bitwise resume, the largest micro-batch per card size.
#   bench/gpu_check.sh               one H100 or H200, under 8 minutes
#   bench/gpu_check.sh --cpu-smoke   the same paths on the CPU, tiny sizes
# On a machine whose Python lacks some of the project's packages (lz4, pyzmq, datasets, liger-kernel), put
# their wheels in .whl/ (bench/gpu_wheels.sh downloads them) and they are installed to /tmp/site first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
exec "$PY" bench/gpu_check.py "$@"
