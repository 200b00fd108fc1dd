"""`make demo`: a real training run on the bundled sample, offline, on two CPU ranks.

Builds a tiny model (tokenizer trained on the spot, two-layer Llama), then runs the plugin headless
through the lab SDK into a workspace folder inside the repo (demo/workspace, git-ignored), with
prompt/completion rows, a formatting template and completion-only loss: the combination TRL itself
refuses. Prints the job id, its status and the adapter path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKSPACE = HERE / "workspace"


def demo_config(model: str, output_dir: str, adaptor_name: str = "demo-adaptor", num_processes: int = 2) -> dict:
    """The demo's parameters: 40 epochs of LoRA on the bundled rows, on the CPU (also what bench/host_stack.sh
    trains in TransformerLab's job venv)."""
    return {
        "model_name": model,
        "dataset_name": str(HERE / "sample_data.jsonl"),
        "formatting_template": "Question: {{ prompt }}\nAnswer:{{ completion }}",
        "completion_only_loss": "auto",
        "adaptor_name": adaptor_name,
        "output_dir": output_dir,
        "overwrite_output": True,
        "train_device": "cpu",
        "num_processes": num_processes,
        "num_train_epochs": 40,
        "batch_size": 8,
        "gradient_accumulation_steps": 1,
        "learning_rate": 3e-3,
        "lora_r": 16,
        "lora_alpha": 32,
        "maximum_sequence_length": 128,
        "logging_steps": 25,
        "save_steps": 40,  # a checkpoint halfway and one at the end (80 steps)
        "eval_split": 0.1,
    }


def main() -> int:
    sys.path.insert(0, str(ROOT))
    from demo.tiny_model import build

    home = WORKSPACE / "tflhome"
    home.mkdir(parents=True, exist_ok=True)
    model = build(WORKSPACE / "tiny-model-128x4", hidden=128, layers=4)
    config = demo_config(str(model), str(WORKSPACE / "outputs"))
    config_path = WORKSPACE / "demo_config.json"
    config_path.write_text(json.dumps(config, indent=2))
    env = {
        **os.environ,
        "TFL_HOME_DIR": str(home),
        "HF_HUB_OFFLINE": "1",
        "SFT_PREPARED_CACHE": str(WORKSPACE / "prepared"),
    }
    env.pop("_TFL_JOB_ID", None)
    started = time.time()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "--config", str(config_path), "--experiment", "demo", "--json"],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
        cwd=str(ROOT),
    )
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    try:
        result = json.loads(lines[-1])
    except (IndexError, ValueError):
        result = {"status": "FAILED", "error": "no result line"}
    print()
    print(f"job id:      {result.get('job_id')}")
    print(f"status:      {result.get('status')}")
    print(f"adapter:     {result.get('adaptor_path')}")
    print(f"steps:       {result.get('steps')}, final loss {result.get('final_loss')}")
    print(f"workspace:   {home / 'workspace'}")
    print(f"wall time:   {time.time() - started:.1f} s")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
