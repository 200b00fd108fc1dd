#!/usr/bin/env bash
# GPU throughput arms (see bench/gpu.py): one epoch per arm, under 8 minutes on one H100/H200. No downloads.
#
# On a machine whose Python lacks the plugin's pinned trl/peft/datasets/transformers (the lent device
# machines), fetch their wheels here first with `bench/gpu.sh --fetch-wheels` (into .whl/, about 17 MiB, the lab SDK included;
# add pyarrow==24.0.0, 47 MiB, only where the GPU machine's pyarrow is older than 24), carry .whl along,
# and run `bench/gpu.sh` there: the wheels are installed into /tmp/site and put on PYTHONPATH.
# Arms whose packages are missing (flash-attn, liger-kernel, bitsandbytes) are reported as not measured.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 peft==0.21.2 transformers==5.24.0 liger-kernel==0.8.5 transformerlab==0.1.46"
if [ "${1:-}" = "--fetch-wheels" ]; then
    mkdir -p .whl
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    # shellcheck disable=SC2086
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl $WHEELS
    du -sh .whl
    exit 0
fi
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "${PYTHON:-python3}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PATH="/tmp/site/bin:$PATH"
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" bench/gpu.py "$@"
