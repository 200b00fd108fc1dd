"""Benchmark (run by hand): how fast `main.py --check` answers, next to how long plain TRL takes to
raise the seed error (a formatting function on prompt/completion data with completion-only loss).

    .venv/bin/python bench/check_latency.py [--runs 7]

The valid config has a formatting template (its Jinja syntax is checked); the same without it shows what every
other --check costs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TRL_SEED_ERROR = """
import sys
from datasets import load_dataset
from transformers import AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer

model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
data = load_dataset("json", data_files=sys.argv[2], split="train")
args = SFTConfig(output_dir=sys.argv[3], use_cpu=True, report_to=[], max_steps=1)
try:
    SFTTrainer(model=model, args=args, train_dataset=data,
               formatting_func=lambda row: f"Question: {row['prompt']}\\nAnswer:{row['completion']}")
except ValueError as exc:
    assert "formatting function was provided while `completion_only_loss=True`" in str(exc), exc
    sys.exit(0)
sys.exit("TRL did not raise the seed error")
"""


CPU: list[float] = []  # CPU seconds (user + system) of each timed run, beside its wall time


def timed(cmd: list[str], env: dict[str, str], expect: int) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    if proc.returncode != expect:
        raise SystemExit(f"{cmd[:3]} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    from demo.tiny_model import build

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp, "home")
        home.mkdir()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TFL_HOME_DIR": str(home)}
        # As users run it: Python keeps the compiled modules (__pycache__, written by the warm-up run below); with
        # PYTHONDONTWRITEBYTECODE set and no cache yet, every run compiles the plugin's modules again (+60-100 ms).
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        model = str(build(Path(tmp, "model")))
        data = str(ROOT / "demo" / "sample_data.jsonl")
        config = Path(tmp, "run.json")
        config.write_text(
            json.dumps(
                {
                    "model_name": model,
                    "dataset_name": data,
                    "adaptor_name": "bench",
                    "formatting_template": "Question: {{ prompt }}\nAnswer:{{ completion }}",
                    "output_dir": tmp,
                    "num_processes": 2,
                    "train_device": "cpu",
                    "maximum_sequence_length": 256,  # within the tiny model's 512 positions
                }
            )
        )
        check = [sys.executable, str(ROOT / "main.py"), "--config", str(config), "--check"]
        timed(check, env, 0)  # the warm-up: writes the compiled modules
        CPU.clear()
        ok = [timed(check, env, 0) for _ in range(args.runs)]
        ok_cpu = list(CPU)
        plain = Path(tmp, "plain.json")  # no template: jinja is not imported
        plain.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if "template" not in k}))
        untemplated = [timed([*check[:3], str(plain), "--check"], env, 0) for _ in range(args.runs)]
        config.write_text(json.dumps({**json.loads(config.read_text()), "max_steps": 0, "learning_rat": 1}))
        bad = [
            timed([sys.executable, str(ROOT / "main.py"), "--config", str(config), "--check"], env, 2)
            for _ in range(args.runs)
        ]
        trl = [
            timed([sys.executable, "-c", TRL_SEED_ERROR, model, data, str(Path(tmp, "trl-out"))], env, 0)
            for _ in range(max(3, args.runs // 2))
        ]
    print(
        f"main.py --check (valid config)      median {statistics.median(ok):.3f} s  (n={len(ok)}), "
        f"CPU {statistics.median(ok_cpu):.3f} s"
    )
    print(f"main.py --check (same, no template) median {statistics.median(untemplated):.3f} s  (n={len(ok)})")
    print(f"main.py --check (2 errors reported) median {statistics.median(bad):.3f} s  (n={len(bad)})")
    print(f"plain TRL raising the seed error    median {statistics.median(trl):.3f} s  (n={len(trl)})")


if __name__ == "__main__":
    main()
