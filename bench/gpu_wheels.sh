#!/usr/bin/env bash
# The wheels bench/gpu_check.sh installs on a GPU machine that cannot reach a package index: the project's
# packages its Python lacks (Python 3.12, x86-64). Run here, where pip can download; .whl/ is git-ignored.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
for spec in lz4 pyzmq liger-kernel; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "$spec"
done
ls .whl
