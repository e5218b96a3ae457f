#!/bin/sh
# One packer of N: shard I of the sources into $CACHE_ROOT/cache-I, announced on tcp://*:$PORT (the manifest
# records this machine's name with the port, for trainers to connect to). The command of
# launch/cluster/k8s-packers.yaml and launch/cluster/slurm-pack.sbatch, and of tests/test_shard.py.
#
# I comes from the scheduler: JOB_COMPLETION_INDEX (a Kubernetes indexed Job) or SLURM_ARRAY_TASK_ID (a SLURM
# job array). Settings, from the environment:
#   SHARDS      N, the number of packers (the Job's completions, the array's size)
#   CACHE_ROOT  a folder on a filesystem the trainer's machines read too
#   SOURCE      what packerd run --source takes (the same on every packer)
#   TOKENIZER   what packerd run --tokenizer takes
#   PORT        the notification port (default 5557)
#   PYTHON      the interpreter with streampack installed (default python)
# Arguments are passed on to packerd run (e.g. --seq-len 1024 --curve-dir /shared/keys).
set -eu
I="${JOB_COMPLETION_INDEX:-${SLURM_ARRAY_TASK_ID:-}}"
if [ -z "$I" ]; then
    echo "Error: set JOB_COMPLETION_INDEX or SLURM_ARRAY_TASK_ID (the shard index)" >&2
    exit 1
fi
exec "${PYTHON:-python}" -m packerd run --shard "$I/${SHARDS:?set SHARDS}" --cache-dir "${CACHE_ROOT:?set CACHE_ROOT}/cache-$I" \
    --source "${SOURCE:?set SOURCE}" --tokenizer "${TOKENIZER:?set TOKENIZER}" --endpoint "tcp://*:${PORT:-5557}" "$@"
