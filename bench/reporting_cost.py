"""Benchmark (run by hand): what progress reporting costs per training step.

    .venv/bin/python bench/reporting_cost.py

Rank side: the plugin's callback `on_step_end` (at the steps the ranks last agreed on, a few times a second:
the stop-file check, the parent check and one all-reduce by which every rank agrees on stopping and on the
next such step; a progress event at most once a second) timed over 2,000 calls in a
real 2-rank gloo group on this machine. Parent side: one relayed row (the plugin's lab SDK adapter,
`update_progress` with metrics, which appends to metrics.jsonl and rewrites the job's index.json whole), timed
over 200 rows sent one a call and four a call (the watcher sends one pump's rows together: all but the last are
appended alone), in CPU time (what the ranks lose on a machine whose cores all train) and wall time, next to the
SDK's own in-place write of index.json.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

RANK_SCRIPT = """
import os, sys, time, types
sys.path.insert(0, sys.argv[1])
from accelerate import PartialState
state = PartialState(cpu=True)
from plugin_utils.runfolder import RunFolder
from plugin_utils.worker import Reporter
run_dir = sys.argv[2]
reporter = Reporter(RunFolder(run_dir), is_main=state.is_main_process)
args = types.SimpleNamespace(world_size=state.num_processes)
control = types.SimpleNamespace(should_training_stop=False, should_save=False)
train_state = types.SimpleNamespace(global_step=0, max_steps=10**9, epoch=0.0)
for _ in range(50):
    reporter.on_step_end(args, train_state, control)
calls = 2000
started = time.perf_counter()
for step in range(calls):
    train_state.global_step = step
    reporter.on_step_end(args, train_state, control)
elapsed = time.perf_counter() - started
if state.is_main_process:
    print(f"RESULT {state.num_processes} {1e6 * elapsed / calls:.1f}")
"""

PARENT_SCRIPT = """
import sys, time, contextlib
sys.path.insert(0, sys.argv[1])
from plugin_utils import host
sdk = host.LabSdk("bench")
if sys.argv[2] == "sdk":  # the SDK's own write (index.json truncated, then written), for comparison
    from lab import lab
    with contextlib.redirect_stdout(sys.stderr):
        lab.init("bench")
    sdk.lab = lab
else:  # as the plugin attaches: the job's record written whole (host._whole_record_writes)
    sdk.attach()
batch = int(sys.argv[3])  # rows per call: the watcher sends each pump's rows together
calls = 200 // batch
cpu, started = time.process_time(), time.perf_counter()
for call in range(calls):
    rows = [host.StepRow(step, step % 100, {"loss": 1.0, "learning_rate": 1e-4, "tokens_per_second": 1e4})
            for step in range(call * batch, (call + 1) * batch)]
    sdk.progress(rows)
rows = calls * batch
print(f"RESULT {1e3 * (time.process_time() - cpu) / rows:.2f} {1e3 * (time.perf_counter() - started) / rows:.2f}")
"""


def result(output: str) -> list[str]:
    return next(line.split()[1:] for line in output.splitlines() if line.startswith("RESULT"))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "SFT_PARENT_PID": str(os.getpid()), "TFL_HOME_DIR": tmp}
        launch = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            "29622",
        ]
        script = Path(tmp, "ranks.py")
        script.write_text(RANK_SCRIPT)
        out = subprocess.run([*launch, str(script), str(ROOT), tmp], capture_output=True, text=True, env=env)
        world, per_call = result(out.stdout + out.stderr)
        print(f"rank side: on_step_end {per_call} us per step (world size {world}, gloo)")
        for how, what in (("plugin", "the plugin's adapter, record written whole"), ("sdk", "the SDK's own write")):
            for batch in (1, 4):
                out = subprocess.run(
                    [sys.executable, "-c", PARENT_SCRIPT, str(ROOT), how, str(batch)],
                    capture_output=True,
                    text=True,
                    env=env,
                )
                cpu, wall = result(out.stdout)
                print(f"parent side: {batch} row(s) a call, per row {cpu} ms CPU, {wall} ms wall ({what})")


if __name__ == "__main__":
    main()
