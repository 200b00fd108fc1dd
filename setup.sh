#!/usr/bin/env bash
# Installs the plugin's pinned dependencies into the ACTIVE Python environment.
# TransformerLab runs this inside the plugin's own venv, which uv made without pip: then `uv pip` installs.
# torch and the lab SDK (transformerlab) belong to the host: kept when present, installed only when absent.
# Optional: WITH_DEEPSPEED=1 also installs deepspeed; WITH_BITSANDBYTES=1 installs bitsandbytes (QLoRA);
# WITH_LIGER=1 installs liger-kernel (fused Triton kernels, used on GPUs when installed). flash-attn is not
# installed here: its wheel must match the host's torch and CUDA; the plugin uses it when it is importable.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
  py="$VIRTUAL_ENV/bin/python"
else
  py="$(command -v python3 || command -v python)"
fi
echo "setup.sh: installing into $("$py" -c 'import sys; print(sys.prefix)')"

has_module() { "$py" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"; }

if "$py" -m pip --version >/dev/null 2>&1; then
  install() { "$py" -m pip install --disable-pip-version-check "$@"; }
elif command -v uv >/dev/null 2>&1; then
  install() { uv pip install --python "$py" "$@"; }
else
  echo "setup.sh: the active environment has neither pip nor uv; install one of them first." >&2
  exit 1
fi

if ! has_module torch; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    install "torch==2.13.0"
  else
    # The CPU build. uv does not look at a machine's local wheel folders the way pip's config does,
    # so a pip-less venv gets pip (from the standard library) for this one install.
    if ! "$py" -m pip --version >/dev/null 2>&1; then
      "$py" -m ensurepip --upgrade >/dev/null
    fi
    "$py" -m pip install --disable-pip-version-check "torch==2.13.0"
  fi
fi

if ! has_module lab; then
  install "transformerlab==0.1.46"
fi

# The lab SDK depends on trackio. TransformerLab's own job venv (0.40: transformers 4.57, so huggingface_hub<1)
# holds trackio 0.20 and gradio 6.17, which refuse huggingface_hub 2.x, and TRL imports trackio whenever it is
# installed (the model card at every checkpoint save): with the pinned huggingface_hub that import fails and
# the run with it. Those two are raised, in the same resolve as the pins, to releases that accept it.
older() {  # the distribution $1 is installed, at a release before $2
  "$py" - "$1" "$2" <<'EOF'
import importlib.metadata as md
import re
import sys


def key(version):
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


try:
    have = md.version(sys.argv[1])
except md.PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if key(have) < key(sys.argv[2]) else 1)
EOF
}
host_upgrades=()
if older trackio 0.43.0; then host_upgrades+=("trackio==0.43.0"); fi
if older gradio 6.31.0; then host_upgrades+=("gradio==6.31.0"); fi

install -r "$here/requirements.txt" ${host_upgrades[@]+"${host_upgrades[@]}"}

if [ "${WITH_DEEPSPEED:-0}" = "1" ]; then
  install "deepspeed==0.19.8"
fi
if [ "${WITH_BITSANDBYTES:-0}" = "1" ]; then
  install "bitsandbytes==0.50.2"
fi
if [ "${WITH_LIGER:-0}" = "1" ]; then
  install "liger-kernel==0.8.5"
fi
echo "setup.sh: done"
