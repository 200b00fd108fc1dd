"""Benchmark (run by hand): 40 LoRA steps on 2 CPU ranks — the plugin next to `trl sft --multi_gpu
--num_processes 2`, same tiny model, data and settings, alternating runs.

    .venv/bin/python bench/train_vs_trl.py [--runs 3] [--steps 40] [--logging-steps 1] [--skip 5]

Three figures per side, each the median over the runs:
- steady seconds per step: the time between the logged steps `--skip` and `--steps`, over the steps between them,
  so start-up and the first, slower steps are left out. The plugin's times are its rank 0's own (the `at` of its
  `logged` events, read from the run folder's events file); TRL's are when its rank 0 printed each step's log
  row (read from its unbuffered output as it comes). Both are taken at the same point of a step, the trainer's
  `on_log`;
- time to first step: from starting the command to the first logged step, the same way;
- whole run: wall time from start to exit (data preparation, model load, training, saving).
Each side's `train_runtime` / steps is printed too (the trainer's own figure, which includes the first steps).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import train_runtime, trl_sft_command  # noqa: E402

TIMEOUT = 600
HANG_GRACE = 30


@dataclass
class Sample:
    wall: float
    first_step: float  # seconds from the command's start to the first logged step
    steady: float  # seconds per step between the logged steps skip and steps
    runtime_per_step: float  # the trainer's train_runtime / steps


def steady(times: dict[int, float], skip: int, steps: int) -> float:
    """Seconds per step from the first logged step at or after `skip` to the last one."""
    logged = sorted(step for step in times if step >= skip)
    first, last = logged[0], logged[-1]
    if last <= first:
        raise SystemExit(f"too few logged steps after step {skip} to time the steady state: {sorted(times)}")
    return (times[last] - times[first]) / (last - first)


def keep_events(tmpdir: Path, kept: Path, done: threading.Event) -> None:
    """Hard-link the run folder's events file (in TMPDIR, removed when main.py ends) as soon as rank 0 creates it:
    the link keeps every line rank 0 appends. Polls every 20 ms until then, and nothing after."""
    while not done.is_set():
        found = glob.glob(str(tmpdir / "sft-run-*" / "events.jsonl"))
        if found:
            os.link(found[0], kept)
            return
        done.wait(0.02)


def run_plugin(cmd: list[str], env: dict[str, str], work: Path, summary: Path, steps: int, skip: int) -> Sample:
    tmpdir = work / "plugin-tmp"
    shutil.rmtree(tmpdir, ignore_errors=True)
    tmpdir.mkdir()
    kept = work / "plugin-events.jsonl"
    kept.unlink(missing_ok=True)
    done = threading.Event()
    keeper = threading.Thread(target=keep_events, args=(tmpdir, kept, done), daemon=True)
    started = time.time()
    keeper.start()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**env, "TMPDIR": str(tmpdir)}, timeout=TIMEOUT)
    wall = time.time() - started
    done.set()
    keeper.join()
    if proc.returncode != 0:
        raise SystemExit(f"the plugin failed:\n{proc.stderr[-3000:]}")
    times = {}
    for line in kept.read_text().splitlines():
        event = json.loads(line)
        if event["type"] == "logged" and "loss" in event["metrics"]:
            times[event["step"]] = event["at"]
    runtime = json.loads(summary.read_text())["runtime_seconds"]
    return Sample(wall, times[min(times)] - started, steady(times, skip, steps), runtime / steps)


def kill_tree(pid: int) -> None:
    """The process and every descendant: torch's launcher starts each rank in a session of its own."""
    import psutil

    try:
        root = psutil.Process(pid)
        family = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for process in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


LOG_ROW = re.compile(r"^\{'loss'")


def run_trl(cmd: list[str], env: dict[str, str], steps: int, skip: int, logging_steps: int) -> Sample:
    env = {**env, "PYTHONUNBUFFERED": "1"}  # each log row is timed as it is printed
    started = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    killer = threading.Timer(TIMEOUT, kill_tree, (proc.pid,))
    killer.start()
    lines, rows = [], []
    last_line = started
    for line in proc.stdout:
        last_line = time.time()
        if LOG_ROW.match(line):
            rows.append(last_line)
        elif "'train_runtime'" in line:
            # `trl sft` now and then leaves one rank waiting forever once it has trained and saved (seen in
            # bench/cpu_defaults.py too): its numbers are in, so such a run is ended after a grace.
            killer.cancel()
            killer = threading.Timer(HANG_GRACE, kill_tree, (proc.pid,))
            killer.start()
        lines.append(line)
    proc.wait()
    ended = time.time()
    killer.cancel()
    output = "".join(lines)
    if proc.returncode == -signal.SIGKILL and train_runtime(output) is not None:
        print(f"  (trl sft: a process did not exit {HANG_GRACE} s after training; killed)", flush=True)
        ended = last_line  # its whole run is taken to end with its last line of output
    elif proc.returncode != 0:
        raise SystemExit(f"trl sft failed:\n{output[-3000:]}")
    wall = ended - started
    times = {logging_steps * (i + 1): at for i, at in enumerate(rows)}
    return Sample(wall, rows[0] - started, steady(times, skip, steps), train_runtime(output) / steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--logging-steps", type=int, default=1)
    parser.add_argument("--skip", type=int, default=5, help="the steady state is timed from this step on")
    args = parser.parse_args()
    from demo.tiny_model import build

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        home = Path(tmp, "home")
        home.mkdir()
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TFL_HOME_DIR": str(home),
            "OMP_NUM_THREADS": "1",
            "SFT_PREPARED_CACHE": str(Path(tmp, "prepared")),
        }
        model = str(build(Path(tmp, "model"), hidden=128, layers=4))
        data_dir = Path(tmp, "data")
        data_dir.mkdir()
        shutil.copy(ROOT / "demo" / "sample_data.jsonl", data_dir / "train.jsonl")
        common = {"batch": 4, "lr": 1e-3, "length": 128, "r": 16, "alpha": 32}
        config = Path(tmp, "run.json")
        config.write_text(
            json.dumps(
                {
                    "model_name": model,
                    "dataset_name": str(data_dir / "train.jsonl"),
                    "adaptor_name": "bench",
                    "output_dir": str(Path(tmp, "plugin-out")),
                    "overwrite_output": True,
                    "train_device": "cpu",
                    "num_processes": 2,
                    "max_steps": args.steps,
                    "batch_size": common["batch"],
                    "gradient_accumulation_steps": 1,
                    "learning_rate": common["lr"],
                    "maximum_sequence_length": common["length"],
                    "lora_r": common["r"],
                    "lora_alpha": common["alpha"],
                    "lora_dropout": 0.05,
                    "logging_steps": args.logging_steps,
                    "save_steps": 100000,
                    "gradient_checkpointing": False,
                    "packing": False,  # trl sft does not pack by default: same settings on both sides
                    "warmup_ratio": 0.0,
                    "learning_rate_schedule": "linear",
                }
            )
        )
        plugin_cmd = [sys.executable, str(ROOT / "main.py"), "--config", str(config)]
        summary = Path(tmp, "plugin-out", "bench", "training_summary.json")
        results: dict[str, list[Sample]] = {"plugin": [], "trl": []}
        for _ in range(args.runs):
            results["plugin"].append(run_plugin(plugin_cmd, env, work, summary, args.steps, args.skip))
            trl_cmd = trl_sft_command(  # a fresh port each run
                model,
                str(data_dir),
                str(Path(tmp, "trl-out")),
                max_length=common["length"],
                learning_rate=common["lr"],
                steps=args.steps,
                cpu_ranks=2,
                logging_steps=args.logging_steps,
            )
            results["trl"].append(run_trl(trl_cmd, env, args.steps, args.skip, args.logging_steps))
        print(f"{args.steps} steps, logging every {args.logging_steps}, steady state from step {args.skip}")
        for name, rows in results.items():

            def figures(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
                runs = ", ".join(f"{scale * v:.{digits}f}" for v in values)
                return f"{scale * statistics.median(values):.{digits}f} ({runs})"

            print(
                f"{name:7s} steady {figures([r.steady for r in rows], 1000, 1)} ms/step"
                f" | first step {figures([r.first_step for r in rows])} s"
                f" | whole run {figures([r.wall for r in rows])} s"
                f" | train_runtime/steps {figures([r.runtime_per_step for r in rows], 1000, 1)} ms"
            )
        ratio = statistics.median(r.steady for r in results["plugin"]) / statistics.median(
            r.steady for r in results["trl"]
        )
        print(f"plugin / trl, steady seconds per step: {ratio:.2f}")


if __name__ == "__main__":
    main()
