"""Benchmark (run by hand): the speed defaults that can be measured on a CPU machine, each setting on and
off on 2 CPU ranks, same model, data and seed, runs alternated.

    .venv/bin/python bench/cpu_defaults.py [--runs 3] [--only packing,checkpointing,find_unused,workers]

- packing: the plugin, one epoch over the same rows with packing off and on (SDPA on the CPU), for the
  bundled short rows and for synthetic rows of mixed length. Equal work, so train time compares directly.
- checkpointing: the plugin, 40 steps with gradient checkpointing off and on: time per step and the peak
  resident memory of the whole process tree.
- find_unused / workers: `trl sft` itself (the plugin does not expose them), 40 steps with
  `ddp_find_unused_parameters` true/false and `dataloader_num_workers` 0/2.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import train_runtime, trl_sft_command  # noqa: E402

STEPS = 40


class PeakRss:
    """Highest resident memory of a process and its children, sampled every 50 ms."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            self._stop.wait(0.05)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run(cmd: list[str], env: dict[str, str]) -> tuple[str, int]:
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    rss = PeakRss(proc.pid)
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        # `trl sft` twice left one rank waiting forever after it had trained and saved; its numbers are in.
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        if "train_runtime" not in out + err:
            raise SystemExit(f"{cmd[:4]} hung:\n{err[-3000:]}") from None
        print(f"  ({Path(cmd[0]).name} {cmd[1]}: a process did not exit after training; killed)", flush=True)
        return out + err, rss.stop()
    peak = rss.stop()
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed:\n{err[-3000:]}")
    return out + err, peak


def mixed_rows(path: Path, rows: int) -> None:
    """Prompt/completion rows whose lengths spread from a few words to a few hundred, like real SFT data."""
    from demo.tiny_model import corpus_lines

    words = " ".join(corpus_lines()).split()
    rng = random.Random(0)
    with path.open("w") as handle:
        for _ in range(rows):
            prompt = " ".join(rng.choice(words) for _ in range(rng.randint(5, 60)))
            completion = " " + " ".join(rng.choice(words) for _ in range(int(rng.paretovariate(1.2) * 15)))
            handle.write(json.dumps({"prompt": prompt, "completion": completion[:2000]}) + "\n")


def plugin(tmp: Path, env: dict[str, str], model: str, data: Path, **overrides) -> dict:
    out = tmp / f"out-{time.time_ns()}"
    config = {
        "model_name": model,
        "dataset_name": str(data),
        "adaptor_name": "bench",
        "output_dir": str(out),
        "train_device": "cpu",
        "num_processes": 2,
        "batch_size": 4,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1e-3,
        "lora_r": 16,
        "lora_alpha": 32,
        "logging_steps": 10,
        "save_steps": 100000,
        "warmup_ratio": 0.0,
        **overrides,
    }
    path = tmp / "run.json"
    path.write_text(json.dumps(config))
    _, peak = run([sys.executable, str(ROOT / "main.py"), "--config", str(path)], env)
    summary = json.loads((out / "bench" / "training_summary.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    return {
        "runtime": summary["runtime_seconds"],
        "steps": summary["steps"],
        "tokens": summary["dataset"]["trainable_tokens"],
        "peak_mib": peak / 2**20,
    }


def trl(tmp: Path, env: dict[str, str], model: str, data: Path, *extra: str) -> dict:
    output_dir = str(tmp / f"trl-{time.time_ns()}")
    options = {"max_length": 128, "learning_rate": 1e-3, "steps": STEPS, "cpu_ranks": 2, "extra": extra}
    output, peak = run(trl_sft_command(model, str(data.parent), output_dir, **options), env)
    return {"runtime": train_runtime(output), "steps": STEPS, "peak_mib": peak / 2**20}


def compare(title: str, arms: dict[str, object], runs: int, unit: str) -> None:
    results: dict[str, list[dict]] = {name: [] for name in arms}
    for _ in range(runs):
        for name, arm in arms.items():
            results[name].append(arm())
    print(f"\n{title}")
    for name, rows in results.items():
        runtime = statistics.median(r["runtime"] for r in rows)
        per_step = statistics.median(1000 * r["runtime"] / r["steps"] for r in rows)
        peak = statistics.median(r["peak_mib"] for r in rows)
        detail = f"train {runtime:6.2f} s" if unit == "epoch" else f"{per_step:6.1f} ms/step"
        runs_text = ", ".join(f"{r['runtime']:.2f}" for r in rows)
        print(f"  {name:34s} {detail}  steps {rows[0]['steps']:4d}  peak RSS {peak:6.0f} MiB  (train s: {runs_text})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", default="packing,checkpointing,find_unused,workers")
    args = parser.parse_args()
    only = set(args.only.split(","))
    from demo.tiny_model import build

    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        (tmp / "home").mkdir()
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TFL_HOME_DIR": str(tmp / "home"),
            "SFT_PREPARED_CACHE": str(tmp / "prepared"),
        }
        model = str(build(tmp / "model", hidden=128, layers=4, max_positions=1024))
        short = tmp / "short" / "train.jsonl"
        short.parent.mkdir()
        shutil.copy(ROOT / "demo" / "sample_data.jsonl", short)
        mixed = tmp / "mixed" / "train.jsonl"
        mixed.parent.mkdir()
        mixed_rows(mixed, 400)  # 53k tokens; rows of 31 to 693 tokens, median 106
        print(f"{psutil.cpu_count()} CPUs; 2 CPU ranks; 4-layer/128-hidden Llama-shaped model; LoRA r=16 all-linear")

        if "packing" in only:
            cases = (
                ("bundled rows", short, 128, 2),
                ("mixed-length rows", mixed, 256, 1),
                ("mixed-length rows", mixed, 512, 1),
                ("mixed-length rows", mixed, 1024, 1),
            )
            for label, data, length, epochs in cases:
                common = {"maximum_sequence_length": length, "num_train_epochs": epochs, "max_steps": -1}
                compare(
                    f"packing, {label} (max length {length}: {4 * length} tokens per packed batch, {epochs} epoch(s))",
                    {
                        "packing off": lambda d=data, c=common: plugin(tmp, env, model, d, packing=False, **c),
                        "packing on (BFD, padding-free)": lambda d=data, c=common: plugin(
                            tmp, env, model, d, packing=True, **c
                        ),
                    },
                    args.runs,
                    "epoch",
                )
        if "checkpointing" in only:
            common = {"maximum_sequence_length": 512, "max_steps": STEPS}
            compare(
                f"gradient checkpointing, mixed-length rows, {STEPS} steps",
                {
                    "gradient checkpointing off": lambda: plugin(
                        tmp, env, model, mixed, gradient_checkpointing=False, **common
                    ),
                    "gradient checkpointing on": lambda: plugin(
                        tmp, env, model, mixed, gradient_checkpointing=True, **common
                    ),
                },
                args.runs,
                "step",
            )
        if "find_unused" in only:
            compare(
                f"ddp_find_unused_parameters (trl sft, bundled rows, {STEPS} steps)",
                {
                    "find_unused_parameters false": lambda: trl(
                        tmp, env, model, short, "--ddp_find_unused_parameters", "false"
                    ),
                    "find_unused_parameters true": lambda: trl(
                        tmp, env, model, short, "--ddp_find_unused_parameters", "true"
                    ),
                },
                args.runs,
                "step",
            )
        if "workers" in only:
            compare(
                f"dataloader workers (trl sft, bundled rows, {STEPS} steps)",
                {
                    "0 workers": lambda: trl(tmp, env, model, short, "--dataloader_num_workers", "0"),
                    "2 workers": lambda: trl(tmp, env, model, short, "--dataloader_num_workers", "2"),
                },
                args.runs,
                "step",
            )


if __name__ == "__main__":
    main()
