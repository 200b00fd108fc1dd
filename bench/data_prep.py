"""Benchmark (run by hand): preparing alpaca-style rows with a formatting template — the plugin's
parent-side preparation next to TRL's own formatting_func path on the same rows and tokenizer, and next to
the bare fast tokenizer on the same rendered texts (the limit: tokenization alone).

    .venv/bin/python bench/data_prep.py [--rows 100000] [--scaling 25000,50000,100000]
    .venv/bin/python bench/data_prep.py --rows 20000 --whole 3   # main.py --dry-run next to the bare work

Each arm runs in its own process with its own datasets cache; peak memory is the highest PSS summed over
that process tree, sampled every 20 ms. Rows/s counts the rows prepared (templated, tokenized, labelled, written).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TEMPLATE = (
    "### Instruction:\n{{ instruction }}\n{% if input %}### Input:\n{{ input }}\n{% endif %}### Response:\n{{ output }}"
)
WORDS = [
    "the",
    "a",
    "model",
    "data",
    "train",
    "answer",
    "question",
    "river",
    "light",
    "stone",
    "music",
    "garden",
    "window",
    "cloud",
    "bread",
    "tree",
]

PLUGIN_ARM = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
import datasets, transformers  # imported before the clock starts, as in the TRL arm
from plugin_utils import data, params, planning
p = params.defaults().replace(model_name=sys.argv[2], dataset_name=sys.argv[3], adaptor_name="bench",
                              formatting_template=json.loads(sys.argv[4]), maximum_sequence_length=512)
started = time.perf_counter()
dataset = data.load(p.data)
prepared = data.prepare(p.data, dataset, planning.loss_mode(p, dataset.format)[0])
print(json.dumps({"seconds": time.perf_counter() - started, "rows": prepared.stats.rows_used}))
"""

TRL_ARM = """
import json, sys, time
from jinja2 import Template
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer
template = Template(json.loads(sys.argv[4]))
model = AutoModelForCausalLM.from_pretrained(sys.argv[2])
tokenizer = AutoTokenizer.from_pretrained(sys.argv[2])
rows = load_dataset("json", data_files=sys.argv[3], split="train")
procs = int(sys.argv[5]) or None
args = SFTConfig(output_dir=sys.argv[6], use_cpu=True, report_to=[], max_length=512, dataset_num_proc=procs)
started = time.perf_counter()
trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer,
                     formatting_func=lambda row: template.render(**row))
print(json.dumps({"seconds": time.perf_counter() - started, "rows": len(trainer.train_dataset)}))
"""

# The physical limit: the tokenizer alone on the same rendered texts (rendered before the clock starts),
# in the Rust batch call without offsets; and the same call with offsets, which token-exact labels need.
# --bare-only runs just these arms and the plugin's.
BARE_ARM = """
import json, sys, time
from jinja2 import Template
from transformers import PreTrainedTokenizerFast
template = Template(json.loads(sys.argv[4]))
rows = [json.loads(line) for line in open(sys.argv[3])]
texts = [template.render(**row) for row in rows]
backend = PreTrainedTokenizerFast.from_pretrained(sys.argv[2])._tokenizer
encode = backend.encode_batch if sys.argv[5] == "offsets" else backend.encode_batch_fast
started = time.perf_counter()
rows = 0
for i in range(0, len(texts), 1000):  # batches of 1,000 rows, as the plugin's map (one huge batch is slower)
    rows += len(encode(texts[i : i + 1000], add_special_tokens=True))
print(json.dumps({"seconds": time.perf_counter() - started, "rows": rows}))
"""


# The whole-process comparison (--whole): `main.py --dry-run` from start to exit, next to a script that does the
# least the same rows need, also from start to exit: read the JSON lines, render the template, encode_batch_fast.
WHOLE_BARE = """
import json, sys
from jinja2 import Template
from tokenizers import Tokenizer
template = Template(json.loads(sys.argv[3]))
texts = [template.render(**json.loads(line)) for line in open(sys.argv[2])]
backend = Tokenizer.from_file(sys.argv[1] + "/tokenizer.json")
for i in range(0, len(texts), 1000):
    backend.encode_batch_fast(texts[i : i + 1000])
"""


def whole(model: str, data: Path, template: str, runs: int, tmp: str) -> None:
    """Medians of alternating runs, each a fresh process with fresh prepared, layers and datasets caches."""
    import statistics

    config = Path(tmp, "whole.json")
    config.write_text(
        json.dumps(
            {
                "model_name": model,
                "dataset_name": str(data),
                "formatting_template": json.loads(template),
                "adaptor_name": "bench",
                "train_device": "cpu",
                "maximum_sequence_length": 512,
                "output_dir": str(Path(tmp, "outputs")),
            }
        )
    )
    arms = {
        "plugin main.py --dry-run": [sys.executable, str(ROOT / "main.py"), "--config", str(config), "--dry-run"],
        "bare (read, render, encode_batch_fast)": [sys.executable, "-c", WHOLE_BARE, model, str(data), template],
    }
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(runs):
        for name, cmd in arms.items():
            fresh = tempfile.mkdtemp(dir=tmp)
            env = {
                **os.environ,
                "HF_HUB_OFFLINE": "1",
                "SFT_PREPARED_CACHE": str(Path(fresh, "prepared")),
                "SFT_LAYERS_CACHE": str(Path(fresh, "layers")),
                "HF_DATASETS_CACHE": str(Path(fresh, "datasets")),
            }
            started = time.perf_counter()
            subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) for name, values in times.items()}
    bare = medians["bare (read, render, encode_batch_fast)"]
    for name, median in medians.items():
        shown = ", ".join(f"{t:.2f}" for t in times[name])
        print(f"{name:40s} median {median:6.2f} s ({shown})  {median / bare:.2f}x bare")


def make_rows(path: Path, count: int) -> None:
    rng = random.Random(0)

    def words(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    with path.open("w") as handle:
        for _ in range(count):
            row = {
                "instruction": words(rng.randint(6, 20)),
                "input": words(rng.randint(0, 30)) if rng.random() < 0.5 else "",
                "output": words(rng.randint(10, 80)),
            }
            handle.write(json.dumps(row) + "\n")


def tree_memory(proc: psutil.Process) -> int:
    """PSS summed over the process tree: forked workers' shared pages are counted once."""
    total = 0
    for member in [proc, *proc.children(recursive=True)]:
        try:
            total += member.memory_full_info().pss
        except psutil.Error:
            continue
    return total


def run_arm(cmd: list[str], env: dict[str, str]) -> dict:
    # A fresh datasets cache per arm: no arm may reuse another's mapped files.
    env = {**env, "HF_DATASETS_CACHE": tempfile.mkdtemp(dir=env["BENCH_TMP"])}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    watched = psutil.Process(proc.pid)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            with contextlib.suppress(psutil.Error):
                peak = max(peak, tree_memory(watched))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"arm failed:\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_mib"] = peak / 2**20
    result["rows_per_s"] = result["rows"] / result["seconds"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--scaling", default="25000,50000,100000")
    parser.add_argument("--bare-only", action="store_true", help="skip the TRL arms and the scaling runs")
    parser.add_argument("--whole", type=int, default=0, help="only the whole-process comparison, this many runs")
    args = parser.parse_args()
    from demo.tiny_model import build

    with tempfile.TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "SFT_PREPARED_CACHE": str(Path(tmp, "cache")),
            "BENCH_TMP": tmp,
        }
        model = str(build(Path(tmp, "model")))
        template = json.dumps(TEMPLATE)
        data = Path(tmp, f"rows-{args.rows}.jsonl")
        make_rows(data, args.rows)
        if args.whole:
            print(f"{args.rows} alpaca-style rows, whole processes, {os.cpu_count()} CPUs")
            whole(model, data, template, args.whole, tmp)
            return
        print(f"{args.rows} alpaca-style rows, template with a conditional, tiny BPE tokenizer, {os.cpu_count()} CPUs")
        plugin = run_arm([sys.executable, "-c", PLUGIN_ARM, str(ROOT), model, str(data), template], env)
        print(
            f"plugin prepare()          {plugin['rows_per_s']:9.0f} rows/s  {plugin['seconds']:7.1f} s  "
            f"peak {plugin['peak_mib']:6.0f} MiB"
        )
        for variant in ("fast", "offsets"):
            bare = run_arm([sys.executable, "-c", BARE_ARM, str(ROOT), model, str(data), template, variant], env)
            print(
                f"bare tokenizer ({variant:7s})  {bare['rows_per_s']:9.0f} rows/s  {bare['seconds']:7.1f} s  "
                f"(plugin / bare: {plugin['seconds'] / bare['seconds']:.2f}x)"
            )
        for procs in () if args.bare_only else (0, 2):
            trl = run_arm(
                [
                    sys.executable,
                    "-c",
                    TRL_ARM,
                    str(ROOT),
                    model,
                    str(data),
                    template,
                    str(procs),
                    str(Path(tmp, "trl")),
                ],
                env,
            )
            print(
                f"TRL formatting_func np={procs or 1}  {trl['rows_per_s']:9.0f} rows/s  {trl['seconds']:7.1f} s  "
                f"peak {trl['peak_mib']:6.0f} MiB"
            )
        for count in [] if args.bare_only else [int(c) for c in args.scaling.split(",") if c]:
            rows = Path(tmp, f"scale-{count}.jsonl")
            make_rows(rows, count)
            result = run_arm([sys.executable, "-c", PLUGIN_ARM, str(ROOT), model, str(rows), template], env)
            print(f"plugin, {count:7d} rows   {result['rows_per_s']:9.0f} rows/s  peak {result['peak_mib']:6.0f} MiB")


if __name__ == "__main__":
    main()
