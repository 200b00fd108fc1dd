#!/usr/bin/env bash
# GPU throughput arms (see bench/gpu.py); under 8 minutes on one H100/H200. No downloads.
# On a machine whose Python lacks trl/peft/datasets, install their wheels first (e.g. into /tmp/site and
# put that on PYTHONPATH); arms whose packages are missing are reported as not measured.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" bench/gpu.py --steps "${STEPS:-20}" "$@"
