#!/usr/bin/env bash
# setup.sh and a real run in the environment TransformerLab's Local provider gives a task (0.40.1).
#
# The provider (api/transformerlab/compute_providers/local.py) makes each job a fresh uv venv without pip
# (`uv venv --python 3.11`), installs TransformerLab's own stack into it with `uv pip install`, then runs the
# task's `setup:` as `/bin/bash -c "set -e -o pipefail; bash setup.sh"` with a 600 s timeout, the venv
# activated (VIRTUAL_ENV, PATH), HOME in the job's workspace, UV_CACHE_DIR shared with the stack's install,
# and uv on PATH. This script builds that venv in a temporary folder, times setup.sh in it exactly so, checks
# that the host's torch was kept and the plugin's pins are in place, then trains the `make demo` run headless
# on the CPU with one process and with two, and asserts both end COMPLETE.
#
#   bash bench/host_stack.sh [--torch 2.9.1] [--worktree] [--keep] [--dir DIR]
#
#   --torch V    the host's torch (default 2.9.1, TransformerLab 0.40.1's). On x86_64 Linux PyPI's build is
#                the CUDA one with its nvidia-* wheels (several GB); the provider takes the CPU build from
#                PyTorch's own index on a machine without a GPU, which this machine cannot reach.
#   --worktree   use the working tree's files (default: `git archive HEAD`, the committed plugin).
#   --keep       keep the temporary folder (default: removed at the end; the venv is several GB).
#   --dir DIR    where to build (default: a new folder under ${TMPDIR:-/tmp}).
# Exit status: 0 when setup.sh finished within 600 s, torch was kept, every pin is in place, `uv pip check`
# is clean and both runs ended COMPLETE; 1 otherwise (every step still runs and is reported).
set -euo pipefail

TORCH=2.9.1
HOST_STACK=(transformers==4.57.1 accelerate==1.3.0 peft==0.14.0 datasets==3.6.0 transformerlab==0.1.46)
UV_VERSION=0.13.9
SETUP_TIMEOUT=600
use_worktree=0
keep=0
work=""
while [ $# -gt 0 ]; do
  case "$1" in
    --torch) TORCH="$2"; shift 2 ;;
    --worktree) use_worktree=1; shift ;;
    --keep) keep=1; shift ;;
    --dir) work="$2"; shift 2 ;;
    *) echo "host_stack.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "$work" ]; then
  work="$(mktemp -d "${TMPDIR:-/tmp}/host-stack.XXXXXX")"
else
  mkdir -p "$work"
fi
work="$(cd "$work" && pwd)"
cleanup() {
  if [ "$keep" = "1" ]; then
    echo "host_stack.sh: kept $work"
  else
    rm -rf "$work"
  fi
}
trap cleanup EXIT

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
step() { printf '\n=== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }
failures=()
fail() { failures+=("$1"); echo "FAIL: $1"; }

# The provider's layout: <job>/workspace is HOME and holds the venv; the task's files are the cwd.
home="$work/workspace"
venv="$home/venv"
task="$work/task"
export UV_CACHE_DIR="$work/uv_cache" UV_PYTHON_DOWNLOADS=never
mkdir -p "$home" "$task"

step "uv $UV_VERSION (into a throwaway folder: the provider runs with uv on PATH)"
t=$(now)
python3 -m pip install -q --disable-pip-version-check --target "$work/uv" "uv==$UV_VERSION" 2>&1 \
  | grep -v -e "is ignored: it is neither" -e "Running pip as the 'root' user" || true
uv="$work/uv/bin/uv"
"$uv" --version
t_uv=$(since "$t")

step "the task's files"
if [ "$use_worktree" = "1" ]; then
  (cd "$repo" && git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$task")
  src="working tree of $(git -C "$repo" rev-parse --short HEAD)"
else
  git -C "$repo" archive HEAD | tar -x -C "$task"
  src="commit $(git -C "$repo" rev-parse --short HEAD)"
fi
echo "$src -> $task"

step "venv: uv venv --python 3.11"
py311="$(command -v python3.11 || true)"
if [ -n "$py311" ]; then
  py311="$("$py311" -c 'import sys; print(sys.executable)')"
else
  py311=3.11
fi
t=$(now)
"$uv" venv "$venv" --python "$py311" --clear
t_venv=$(since "$t")

step "host stack: torch==$TORCH ${HOST_STACK[*]}"
t=$(now)
"$uv" pip install --python "$venv/bin/python" "torch==$TORCH" "${HOST_STACK[@]}" 2>&1 | tail -n 5
t_stack=$(since "$t")
echo "host stack installed in ${t_stack} s; venv size $(du -sh "$venv" | cut -f1)"

if "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
  fail "the venv has pip; the provider's has none"
fi

step "setup.sh as the provider runs it (timeout ${SETUP_TIMEOUT} s)"
provider_env=(env -u PYTHONPATH -u PYTHONHOME -u _TFL_JOB_ID -u TFL_HOME_DIR -u TFL_WORKSPACE_DIR
  "PATH=$venv/bin:$work/uv/bin:$PATH" "VIRTUAL_ENV=$venv" "HOME=$home")
t=$(now)
set +e
(cd "$task" && "${provider_env[@]}" timeout "$SETUP_TIMEOUT" /bin/bash -c "set -e -o pipefail; bash setup.sh") \
  >"$work/setup.log" 2>&1
setup_rc=$?
set -e
t_setup=$(since "$t")
cat "$work/setup.log"
echo "setup.sh exit status $setup_rc after ${t_setup} s"
if [ "$setup_rc" = "124" ]; then
  fail "setup.sh passed the provider's ${SETUP_TIMEOUT} s timeout"
elif [ "$setup_rc" != "0" ]; then
  fail "setup.sh exited $setup_rc"
fi

step "versions, pins and uv pip check"
set +e
"$venv/bin/python" - "$TORCH" "$task/requirements.txt" <<'EOF'
import importlib.metadata as md
import re
import sys

torch_wanted, requirements = sys.argv[1], sys.argv[2]
ok = True
for name in ("torch", "transformers", "trl", "accelerate", "peft", "datasets", "huggingface_hub", "tokenizers",
             "safetensors", "transformerlab", "numpy", "pyarrow", "fsspec"):
    try:
        print(f"  {name:16} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name:16} (not installed)")
if md.version("torch").split("+")[0] != torch_wanted:
    print(f"torch is {md.version('torch')}, the host's {torch_wanted} was replaced")
    ok = False
if md.version("transformerlab") != "0.1.46":
    print(f"the lab SDK is {md.version('transformerlab')}, the host's 0.1.46 was replaced")
    ok = False
for line in open(requirements):
    m = re.match(r"^\s*([A-Za-z0-9_.\-]+)==([^\s;#]+)", line)
    if not m:
        continue
    name, wanted = m.groups()
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        have = None
    if have != wanted:
        print(f"pin {name}=={wanted} not in place: {have}")
        ok = False
import torch  # noqa: E402  (the build that loads, not just its metadata)

print(f"  torch loads: {torch.__version__}, CUDA build {torch.version.cuda}, cuda available {torch.cuda.is_available()}")
sys.exit(0 if ok else 1)
EOF
pins_rc=$?
"$uv" pip check --python "$venv/bin/python"
check_rc=$?
set -e
[ "$pins_rc" = "0" ] || fail "torch, the lab SDK or a pin is not what it should be"
[ "$check_rc" = "0" ] || fail "uv pip check reports conflicts"

step "tiny model (demo/tiny_model.py, offline)"
t=$(now)
(cd "$task" && "${provider_env[@]}" HF_HUB_OFFLINE=1 python -c \
  "import sys; sys.path.insert(0, '.'); from demo.tiny_model import build; print(build(sys.argv[1], hidden=128, layers=4))" \
  "$work/tiny-model-128x4")
t_model=$(since "$t")

# `make demo`'s parameters (demo/run_demo.py): 40 epochs of LoRA on the bundled rows, CPU.
run_plugin() {  # $1 = label, $2 = num_processes
  local label="$1" procs="$2" cfg="$work/$1.json" t rc status
  "$venv/bin/python" - "$cfg" "$work" "$task" "$label" "$procs" <<'EOF'
import json
import sys

cfg, work, task, label, procs = sys.argv[1:]
sys.path.insert(0, task)
from demo.run_demo import demo_config

config = demo_config(f"{work}/tiny-model-128x4", f"{work}/outputs", f"host-stack-{label}", int(procs))
json.dump(config, open(cfg, "w"), indent=2)
EOF
  step "run: python main.py --config $label.json (num_processes $procs, train_device cpu)"
  mkdir -p "$work/tflhome/workspace"
  t=$(now)
  set +e
  (cd "$task" && "${provider_env[@]}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 \
    TFL_HOME_DIR="$work/tflhome" TFL_WORKSPACE_DIR="$work/tflhome/workspace" \
    SFT_PREPARED_CACHE="$work/prepared-$label" \
    python main.py --config "$cfg" --experiment host-stack --json) >"$work/$label.out" 2>"$work/$label.err"
  rc=$?
  set -e
  run_time=$(since "$t")
  tail -n 25 "$work/$label.err"
  status="$("$venv/bin/python" - "$work/$label.out" <<'EOF'
import json
import sys

lines = [line for line in open(sys.argv[1]).read().splitlines() if line.strip()]
try:
    r = json.loads(lines[-1])
except (IndexError, ValueError):
    r = {"status": "NO RESULT LINE"}
print(r.get("status"), f"steps={r.get('steps')}", f"final_loss={r.get('final_loss')}", f"job={r.get('job_id')}")
EOF
)"
  echo "$label: exit status $rc, $status, ${run_time} s"
  run_summary+=("$label (num_processes $procs): exit $rc, $status, ${run_time} s")
  if [ "$rc" != "0" ] || [ "${status%% *}" != "COMPLETE" ]; then
    fail "$label run did not end COMPLETE (exit $rc, $status)"
  fi
}
run_summary=()
run_plugin cpu1 1
run_plugin cpu2 2

step "summary"
echo "date:               $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "machine:            $(nproc) CPUs, $(free -g | awk '/^Mem:/ {print $2}') GiB, $(uname -m)"
echo "plugin:             $src"
echo "uv:                 $("$uv" --version) (install ${t_uv} s)"
echo "venv build:         ${t_venv} s"
echo "host stack install: ${t_stack} s (torch==$TORCH ${HOST_STACK[*]})"
echo "setup.sh:           ${t_setup} s, exit $setup_rc (limit ${SETUP_TIMEOUT} s)"
echo "tiny model build:   ${t_model} s"
for line in "${run_summary[@]}"; do echo "run:                $line"; done
"$venv/bin/python" -c "
import importlib.metadata as md
print('versions:          ', ', '.join(f'{n} {md.version(n)}' for n in
      ('torch', 'transformers', 'trl', 'accelerate', 'peft', 'datasets', 'huggingface_hub', 'transformerlab')))"
echo "venv size:          $(du -sh "$venv" | cut -f1)"
if [ "${#failures[@]}" -gt 0 ]; then
  printf 'FAILED: %s\n' "${failures[@]}"
  exit 1
fi
echo "OK: setup.sh brought the host stack to the plugin's pins with torch $TORCH kept, and both runs ended COMPLETE"
