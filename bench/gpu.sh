#!/usr/bin/env bash
# The GPU checks and throughput arms of bench/gpu.py, in one run of under 8 minutes on one H100/H200. No downloads
# there: what the GPU machine's image lacks travels as wheels in .whl/.
#
#   bench/gpu.sh --fetch-wheels   here (registries reachable): every package the plugin needs that the device image
#                                 lacks, at the plugin's pins (requirements.txt, setup.sh), into .whl/ (about 30 MiB:
#                                 bitsandbytes keeps only its CPU and CUDA 13 libraries; DeepSpeed, published as
#                                 source only, is built into a wheel here)
#   bench/gpu.sh --dry-run        here, on the CPU: the same install and import steps into a fresh environment that
#                                 holds only what the device image holds, then the preflight and the smoke arms
#   bench/gpu.sh [gpu.py flags]   there: installs .whl into /tmp/site, puts it first on PYTHONPATH, and runs gpu.py,
#                                 whose preflight stops at once, naming any package missing or at a refused version
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

pin() {  # the plugin's pin of a distribution, from requirements.txt or setup.sh
    grep -hoE "(^|\")$1==[^ \"]+" requirements.txt setup.sh | tr -d '"' | head -n 1
}
# What the device image (KINDS.md's package list: torch 2.11, transformers 5.17, accelerate 1.15, hub 1.33, tokenizers
# 0.23.2, safetensors 0.8, pyarrow, pandas, jinja2, psutil, werkzeug, aiofiles, fsspec, ninja, ...) lacks or holds at
# another release than the plugin's. DeepSpeed's pydantic is pinned to a release that accepts an older typing-extensions.
CARRIED="$(pin trl) $(pin transformers) $(pin peft) $(pin datasets) dill==0.4.1 multiprocess==0.70.19 \
transformerlab==0.1.46 $(pin tensorboardX) $(pin liger-kernel) hjson==3.1.0 pydantic==2.11.9 pydantic-core==2.33.2 \
annotated-types==0.7.0 typing-inspection==0.4.1"
BITSANDBYTES="$(pin bitsandbytes)"
DEEPSPEED="$(pin deepspeed)"

# fetch DIR PYTHON_VERSION: the wheels for that Python into DIR.
fetch() {
    local dir=$1 version=$2
    mkdir -p "$dir"
    # shellcheck disable=SC2086
    "$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
        --python-version "$version" --implementation cp --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$dir" $CARRIED "$BITSANDBYTES"
    # bitsandbytes ships a library per CUDA and ROCm release (43 MiB): keep the CPU's and CUDA 13's (the device's
    # torch is built for CUDA 13.0).
    zip -q -d "$dir"/bitsandbytes-*.whl 'bitsandbytes/libbitsandbytes_cuda1[12]*.so' \
        'bitsandbytes/libbitsandbytes_rocm*.so' 'bitsandbytes/libbitsandbytes_xpu*.so' >/dev/null || true
    # DeepSpeed is published as source; its CUDA ops are compiled on first use (nvcc and ninja are on the device),
    # so the wheel is pure Python. Its build imports torch: the local one serves.
    "$PYTHON" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w "$dir" "$DEEPSPEED"
    du -sh "$dir"
}

# install DIR: the wheels into /tmp/site (the device's way), first on PYTHONPATH.
install() {
    local dir=$1
    rm -rf /tmp/site
    "$PYTHON" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
        --target /tmp/site "$dir"/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PATH="/tmp/site/bin:$PATH"
}

case "${1:-}" in
--fetch-wheels)
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
    rm -rf .whl
    fetch .whl 3.12
    exit 0
    ;;
--dry-run)
    # A stand-in for the device image: a fresh environment with this machine's CPU torch and the device's own
    # releases of what the plugin shares with it, then exactly the device's install step and gpu.py's checks.
    here=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    venv=/tmp/gpu-dry-run-venv
    rm -rf "$venv" /tmp/gpu-dry-run-wheels
    "$PYTHON" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0 accelerate==1.15.0 \
        huggingface_hub==1.33.0 tokenizers==0.23.2 safetensors==0.8.0 transformers==5.17.0 peft==0.17.1 \
        numpy pandas pyarrow==23.0.1 jinja2 psutil nvidia-ml-py werkzeug aiofiles fsspec requests pyyaml xxhash \
        tqdm regex typer sentencepiece protobuf packaging filelock ninja py-cpuinfo msgpack einops
    PYTHON="$venv/bin/python"
    fetch /tmp/gpu-dry-run-wheels "$here"
    install /tmp/gpu-dry-run-wheels
    export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    "$PYTHON" bench/gpu.py --preflight
    exec "$PYTHON" bench/gpu.py --smoke
    ;;
esac

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    install .whl
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec "$PYTHON" bench/gpu.py "$@"
