"""Benchmark (run by hand): 40 LoRA steps on 2 CPU ranks — the plugin next to `trl sft --multi_gpu
--num_processes 2`, same tiny model, data and settings, alternating runs.

    .venv/bin/python bench/train_vs_trl.py [--runs 3] [--steps 40]

Whole wall time is process start to exit (data preparation, model load, training, saving); per-step time
is the trainer's own train_runtime / steps.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import train_runtime, trl_sft_command  # noqa: E402


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed:\n{proc.stderr[-3000:]}")
    return elapsed, proc.stdout + proc.stderr


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    from demo.tiny_model import build

    with tempfile.TemporaryDirectory() as tmp:
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
                    "logging_steps": 10,
                    "save_steps": 100000,
                    "gradient_checkpointing": False,
                    "packing": False,  # trl sft does not pack by default: same settings on both sides
                    "warmup_ratio": 0.0,
                    "learning_rate_schedule": "linear",
                }
            )
        )
        plugin_cmd = [sys.executable, str(ROOT / "main.py"), "--config", str(config)]
        trl_cmd = trl_sft_command(
            model,
            str(data_dir),
            str(Path(tmp, "trl-out")),
            max_length=common["length"],
            learning_rate=common["lr"],
            steps=args.steps,
            cpu_ranks=2,
        )
        results: dict[str, list[tuple[float, float]]] = {"plugin": [], "trl": []}
        for _ in range(args.runs):
            for name, cmd in (("plugin", plugin_cmd), ("trl", trl_cmd)):
                wall, output = run(cmd, env)
                if name == "plugin":  # the plugin's log has no trainer dict: its summary records train_runtime
                    summary = Path(tmp, "plugin-out", "bench", "training_summary.json")
                    runtime = json.loads(summary.read_text())["runtime_seconds"]
                else:
                    runtime = train_runtime(output)
                results[name].append((wall, runtime / args.steps))
        for name, rows in results.items():
            walls = [w for w, _ in rows]
            steps = [s for _, s in rows]
            print(
                f"{name:7s} wall median {statistics.median(walls):6.2f} s (runs {', '.join(f'{w:.2f}' for w in walls)})"
                f"   per step median {1000 * statistics.median(steps):6.1f} ms"
            )


if __name__ == "__main__":
    main()
