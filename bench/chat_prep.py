"""Benchmark (run by hand): preparing chat rows (user/assistant/user/assistant conversations of varied lengths)
with the tiny model's own chat template and with a real one (Qwen2.5's, from the test fixtures, set through
formatting_chat_template), next to the floor: one chat-template render per conversation and the bare fast
tokenizer (`encode_batch_fast`) on the rendered texts.

    .venv/bin/python bench/chat_prep.py [--rows 10000] [--runs 3] [--profile] [--checkouts DIR,DIR]

Arms, each in its own process, runs alternated:
- baseline: `apply_chat_template(..., tokenize=False)` once per conversation, then `encode_batch_fast` in
  batches of 1,000 rows, timed from the loaded rows to the token ids;
- plugin: `main.py --config CFG --dry-run` (fresh SFT_PREPARED_CACHE, SFT_LAYERS_CACHE and datasets cache per
  run), the whole process: start, imports, the model's layers, load, prepare, save, report; and the same on the
  first 10 rows, what a dry run costs whatever the rows (the rows' share is the difference);
- prepare: `data.load` and `data.prepare` in process, timed after the imports (fresh caches);
- encoder: the plugin's Encoder over the same rows in batches of 1,000 (what `encoding.build`'s map runs in each
  process), with the chat template's renders counted; `--profile` prints where its time goes.
Each figure is wall time and CPU time (the process and those it waited for): on a shared machine the CPU time
is the steadier one. `--checkouts` runs the plugin and encoder arms of other checkouts too (an older commit:
`git archive COMMIT | tar -x -C DIR`), alternated with this one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.data_prep import WORDS  # noqa: E402

QWEN = ROOT / "tests" / "fixtures" / "chat_templates" / "qwen2.5.jinja"

BASELINE_ARM = """
import json, sys, time
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
template = json.loads(sys.argv[3]) or None
rows = [json.loads(line)["messages"] for line in open(sys.argv[2])]
backend = tok._tokenizer
started, cpu = time.perf_counter(), time.process_time()
count = 0
for i in range(0, len(rows), 1000):
    texts = [tok.apply_chat_template(m, tokenize=False, chat_template=template) for m in rows[i : i + 1000]]
    count += len(backend.encode_batch_fast(texts, add_special_tokens=False))
print(json.dumps({"seconds": time.perf_counter() - started, "cpu": time.process_time() - cpu, "rows": count}))
"""

# The parent's whole preparation in process, as bench/data_prep.py's plugin arm times it: load, render, tokenize,
# label, write, statistics, save (imports before the clock).
PREPARE_ARM = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
import datasets, transformers
from plugin_utils import data, params, planning
p = params.defaults().replace(model_name=sys.argv[2], dataset_name=sys.argv[3], adaptor_name="bench",
                              formatting_chat_template=json.loads(sys.argv[4]), maximum_sequence_length=512)
started, cpu = time.perf_counter(), time.process_time()
dataset = data.load(p.data)
prepared = data.prepare(p.data, dataset, planning.loss_mode(p, dataset.format)[0])
seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
print(json.dumps({"seconds": seconds, "cpu": cpu, "rows": prepared.stats.rows_used}))
"""

ENCODER_ARM = """
import cProfile, json, pstats, sys, time
sys.path.insert(0, sys.argv[1])
import jinja2
from transformers import AutoTokenizer
from plugin_utils import params
from plugin_utils.data import encoding
rows = [json.loads(line) for line in open(sys.argv[3])]
settings = params.defaults().replace(model_name=sys.argv[2], formatting_chat_template=json.loads(sys.argv[4])).data
encoder = encoding.Encoder(settings, "chat", AutoTokenizer.from_pretrained(sys.argv[2]), ["messages"], True)
encoder.encode_many(rows[:3])  # the template's check, once per process, before the clock
renders, render = 0, jinja2.Template.render
def counted(self, *args, **kwargs):
    global renders
    renders += 1
    return render(self, *args, **kwargs)
jinja2.Template.render = counted  # every render: apply_chat_template's and direct ones
profiler = cProfile.Profile() if sys.argv[5] == "profile" else None
started, cpu = time.perf_counter(), time.process_time()
if profiler:
    profiler.enable()
for i in range(0, len(rows), 1000):
    encoder.encode_many(rows[i : i + 1000])
if profiler:
    profiler.disable()
seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
if profiler:
    pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(30)
print(json.dumps({"seconds": seconds, "cpu": cpu, "renders_per_row": renders / len(rows)}))
"""


def make_rows(path: Path, count: int) -> None:
    rng = random.Random(0)

    def words(low: int, high: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."

    with path.open("w") as handle:
        for _ in range(count):
            messages = [
                {"role": "user", "content": words(4, 30)},
                {"role": "assistant", "content": words(5, 120)},
                {"role": "user", "content": words(3, 25)},
                {"role": "assistant", "content": words(5, 120)},
            ]
            handle.write(json.dumps({"messages": messages}) + "\n")


def run(cmd: list[str], env: dict[str, str], cwd: Path = ROOT) -> tuple[float, float, str, str]:
    """Wall and CPU seconds (the process and every process it waited for) of a command, and its output."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(cwd))
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} failed:\n{proc.stderr[-3000:]}")
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return seconds, cpu, proc.stdout, proc.stderr


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def plugin_dry_run(checkout: Path, model: str, data: Path, template: str, tmp: Path, env: dict[str, str]):
    """Wall and CPU time of `main.py --dry-run` on fresh caches."""
    run_dir = Path(tempfile.mkdtemp(dir=tmp))
    config = {
        "model_name": model,
        "dataset_name": str(data),
        "adaptor_name": "bench",
        "output_dir": str(run_dir / "out"),
        "train_device": "cpu",
        "maximum_sequence_length": 512,
        "formatting_chat_template": template,
    }
    (run_dir / "run.json").write_text(json.dumps(config))
    fresh = {name: str(run_dir / name) for name in ("SFT_PREPARED_CACHE", "SFT_LAYERS_CACHE", "HF_DATASETS_CACHE")}
    command = [sys.executable, "main.py", "--config", str(run_dir / "run.json"), "--dry-run", "--json"]
    seconds, cpu, out, _ = run(command, {**env, **fresh}, cwd=checkout)
    assert last_json(out)["dataset"]["format"] == "chat"
    return seconds, cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=1, help="alternating runs of the baseline and the plugin")
    parser.add_argument("--profile", action="store_true", help="print the Encoder's cProfile")
    parser.add_argument("--checkouts", default=str(ROOT), help="plugin checkouts to run, comma-separated")
    args = parser.parse_args()
    from demo.tiny_model import build

    checkouts = [Path(c).resolve() for c in args.checkouts.split(",")]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        model = str(build(tmp / "model"))
        data, few = tmp / "chat.jsonl", tmp / "chat-10.jsonl"
        make_rows(data, args.rows)
        few.write_text("".join(data.read_text().splitlines(keepends=True)[:10]))
        print(f"{args.rows} two-turn conversations (user/assistant/user/assistant), tiny model, {os.cpu_count()} CPUs")
        for name, template in (("tiny model's template", ""), ("qwen2.5 template", QWEN.read_text())):
            for _ in range(args.runs):
                _, _, out, _ = run([sys.executable, "-c", BASELINE_ARM, model, str(data), json.dumps(template)], env)
                floor = last_json(out)
                base_wall, base_cpu = floor["seconds"], floor["cpu"]
                print(f"{name}: baseline (render + encode_batch_fast) {base_wall:5.2f} s ({base_cpu:5.2f} CPU-s)")
                for checkout in checkouts:
                    wall, cpu = plugin_dry_run(checkout, model, data, template, tmp, env)
                    fixed_wall, fixed_cpu = plugin_dry_run(checkout, model, few, template, tmp, env)
                    print(
                        f"    {checkout.name:12s} dry-run {wall:5.2f} s ({cpu:5.2f} CPU-s): {wall / base_wall:4.2f}x "
                        f"the baseline ({cpu / base_cpu:4.2f}x in CPU); on 10 rows {fixed_wall:5.2f} s "
                        f"({fixed_cpu:5.2f} CPU-s), so the rows take {wall - fixed_wall:5.2f} s "
                        f"({cpu - fixed_cpu:5.2f} CPU-s): {(wall - fixed_wall) / base_wall:4.2f}x the baseline "
                        f"({(cpu - fixed_cpu) / base_cpu:4.2f}x in CPU)"
                    )
                for checkout in checkouts:
                    fresh = {name: tempfile.mkdtemp(dir=tmp) for name in ("SFT_PREPARED_CACHE", "HF_DATASETS_CACHE")}
                    arm = [sys.executable, "-c", PREPARE_ARM, str(checkout), model, str(data), json.dumps(template)]
                    prepared = last_json(run(arm, {**env, **fresh})[2])
                    print(
                        f"    {checkout.name:12s} prepare {prepared['seconds']:5.2f} s ({prepared['cpu']:5.2f} CPU-s "
                        f"in this process): {prepared['seconds'] / base_wall:4.2f}x the baseline"
                    )
            for checkout in checkouts:
                arm = [sys.executable, "-c", ENCODER_ARM, str(checkout), model, str(data), json.dumps(template)]
                _, _, out, err = run([*arm, "profile" if args.profile else ""], env)
                encoded = last_json(out)
                print(
                    f"    {checkout.name:12s} Encoder {encoded['seconds']:5.2f} s ({encoded['cpu']:5.2f} CPU-s), "
                    f"{encoded['renders_per_row']:.2f} renders per conversation"
                )
                if args.profile:
                    print(err[-6000:])


if __name__ == "__main__":
    main()
