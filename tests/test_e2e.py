"""End to end: real `accelerate launch` with two CPU ranks (one gloo group), the real lab SDK on a temp
workspace, the legacy job store of lab 0.0.98, and a rank that raises."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from plugin_utils.report import EVAL_COLOUR, TRAIN_COLOUR

from .conftest import (
    LEGACY_LAB,
    LEGACY_LAB_032,
    ROOT,
    RUN_TAG,
    base_config,
    last_json,
    run_main,
    tagged_processes,
    write_config,
)
from .task_host import make_lab_job
from .test_report import pixels_of

pytestmark = pytest.mark.slow


def lab_jobs(home: Path, experiment: str = "alpha") -> list[Path]:
    return sorted((home / "workspace" / "experiments" / experiment / "jobs").glob("*/index.json"))


def read_job(index: Path) -> dict:
    # The lab SDK rewrites index.json in place (truncate, then write): a read can land in between.
    for _ in range(100):
        try:
            return json.loads(index.read_text())
        except ValueError:
            time.sleep(0.02)
    return json.loads(index.read_text())


def metrics_rows(index: Path) -> list[dict]:
    path = index.parent / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_headless_run_trains_on_two_cpu_ranks_with_fsdp_and_completes_the_job(tiny_model, tmp_path):
    # Logged at steps 1, 3 and 6 by logging_steps; step 8, the last one trained, is logged because it is the last.
    # FSDP, sharded over the two ranks' gloo group (DDP, the default, trains in every other two-rank run).
    config = base_config(tiny_model, tmp_path, num_processes=2, max_steps=8, logging_steps=3)
    config["distributed_strategy"] = "fsdp"
    config["report_to"] = "tensorboard,trackio"
    del config["gradient_checkpointing"]  # auto: decided from the memory estimate
    tag = f"fsdp-{os.getpid()}-{time.monotonic_ns()}"
    proc = run_main(
        ["--config", write_config(tmp_path, config), "--json"], env={"TLAB_TRACKIO_AUTO_INIT": "", RUN_TAG: tag}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = last_json(proc.stdout)
    assert result["status"] == "COMPLETE"
    assert result["steps"] == 8
    adapter = Path(result["adaptor_path"])
    assert adapter == tmp_path / "outputs" / "test-adaptor"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "training_summary.json"):
        assert (adapter / name).is_file(), name
    summary = json.loads((adapter / "training_summary.json").read_text())
    assert summary["world_size"] == 2, "the two CPU ranks must form one gloo group"
    assert summary["steps"] == 8
    assert summary["plan"]["strategy"] == "fsdp" and "--config_file" in proc.stderr
    assert summary["versions"]["trl"] == "1.16.0"
    assert not list(adapter.parent.glob("*.partial-*")), "no staging folder is left behind"
    speed = summary["plan"]["speed"]
    # auto on 2 CPU ranks, 4 x 128 tokens per batch: packed (a cheap mask keeps rows apart), no checkpointing.
    assert (speed["attention"], speed["packing"], speed["gradient_checkpointing"]) == ("sdpa", True, False)
    # The parameters as asked; what `auto` became is the plan's.
    assert summary["parameters"]["packing"] == "auto"
    assert summary["plan"]["speed"]["packing"] is True and summary["plan"]["speed"]["gradient_checkpointing"] is False
    assert "plan:\n" in proc.stderr and "precision: fp32 (auto: the CPU trains in fp32)" in proc.stderr
    # The effective parameters, defaults filled in, are in the job's log (what a sweep's child ran with).
    assert "parameters:\n" in proc.stderr and "  learning_rate: 0.001\n" in proc.stderr
    assert '  learning_rate_schedule: "cosine"\n' in proc.stderr
    assert "gradient checkpointing: off (about" in proc.stderr and "loss: on completions only (auto" in proc.stderr
    # A log a person reads: one line per logged step (1, 3 and 6 by logging_steps, 8 as the last), no trainer's
    # raw dict beside it, no library progress bars, and no warning repeated by the second rank.
    step_lines = [line for line in proc.stderr.splitlines() if line.startswith("[sft] step ")]
    assert [line.split(":")[0] for line in step_lines] == [f"[sft] step {s}/8" for s in (1, 3, 6, 8)], step_lines
    assert "{'loss'" not in proc.stderr and "'train_runtime'" not in proc.stderr
    assert "it/s]" not in proc.stderr and "examples/s]" not in proc.stderr and "%|" not in proc.stderr
    assert "FutureWarning" not in proc.stderr and "warnings.warn(" not in proc.stderr
    assert "Trackio available" not in proc.stderr  # the lab SDK's debugging line, printed for every job

    [index] = lab_jobs(tmp_path / "tflhome")
    job = read_job(index)
    assert job["id"] == result["job_id"]
    assert job["status"] == "COMPLETE"
    assert job["progress"] == 100
    assert job["job_data"]["score"]["loss"] == pytest.approx(result["final_loss"])
    assert job["job_data"]["score"]["train/loss"] == pytest.approx(result["final_loss"])
    rows = metrics_rows(index)
    # Named as TensorBoard names them, so the job page's Metrics charts read train/loss, eval/loss, ...
    logged = [r["metrics"] for r in rows if "train/loss" in r.get("metrics", {})]
    assert logged and all("loss" not in m and "learning_rate" not in m for m in logged)
    assert {"train/learning_rate", "train/tokens_per_second"} <= set().union(*logged)
    # The final loss, the score and the last row of the metrics are the loss at the last trained step.
    # Every logged step, in order, with its own step, however the parent batched them on the way.
    assert [r["step"] for r in rows if "train/loss" in r.get("metrics", {})] == [1, 3, 6, 8], rows
    last = [r for r in rows if "train/loss" in r.get("metrics", {})][-1]
    assert last["metrics"]["train/loss"] == pytest.approx(result["final_loss"])
    assert last.get("step") == 8, rows
    progress = [r["progress"] for r in rows]
    assert progress == sorted(progress), "progress is monotonic"
    assert job["job_data"]["parameters"]["adaptor_name"] == "test-adaptor"
    # The loss curve as a picture: beside the adapter, in the run's folder, and among the job's artifacts.
    curve = Image.open(adapter / "loss_curve.png")
    assert curve.size == (1000, 600) and pixels_of(curve, TRAIN_COLOUR)
    assert not pixels_of(curve, EVAL_COLOUR), "no eval split: no eval line"
    assert (tmp_path / "outputs" / "runs" / "test-adaptor" / "loss_curve.png").is_file()
    assert (index.parent / "artifacts" / "loss_curve.png").read_bytes() == (adapter / "loss_curve.png").read_bytes()
    # The adapter's model card replaces TRL's: what it was trained from and on, how well, and how to load it.
    card = (adapter / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert (meta["base_model"], meta["library_name"]) == (tiny_model, "peft") and "lora" in meta["tags"]
    assert "has been trained using [TRL]" not in card and "![loss curve](loss_curve.png)" in card
    assert f"| final train loss | {result['final_loss']:.4f} |" in card and "| rows trained on |" in card
    # report_to: the first rank alone reports, into the run's logs folder, at every logged step.
    logs = tmp_path / "outputs" / "runs" / "test-adaptor" / "logs"
    [run] = (logs / "tensorboard").iterdir()
    [events] = run.glob("events.out.tfevents.*")
    assert f"report_to tensorboard: {run}; open: tensorboard --logdir {logs / 'tensorboard'}" in proc.stderr
    assert f"report_to trackio: {logs / 'trackio'}; open: TRACKIO_DIR=" in proc.stderr
    scalars = [(e.step, v.simple_value) for e in tensorboard_events(events) for v in e.summary.value]
    losses = [(r["step"], r["metrics"]["train/loss"]) for r in rows if "train/loss" in r.get("metrics", {})]
    assert [(step, pytest.approx(loss)) for step, loss in losses] == [
        (e.step, v.simple_value) for e in tensorboard_events(events) for v in e.summary.value if v.tag == "train/loss"
    ], scalars
    tracked = trackio_rows(logs / "trackio" / "test-adaptor.db", run.name)
    assert [(r["train/global_step"], pytest.approx(r["train/loss"])) for r in tracked if "train/loss" in r] == losses

    # Sample answers (sample_generations 4, no eval split: the last training rows), made on the first rank from the
    # saved adapter (FSDP shards the trained model): beside the adapter, in the job's log and among its evals.
    answers = [json.loads(line) for line in (adapter / "samples.jsonl").read_text().splitlines()]
    assert len(answers) == 4 and all(a["output"] and a["input"].startswith("Question: ") for a in answers), answers
    rows = [json.loads(line) for line in (ROOT / "demo" / "sample_data.jsonl").read_text().splitlines()[-4:]]
    assert [a["expected_output"] for a in answers] == [row["completion"].strip() for row in rows]
    log_text = (index.parent / f"output_{job['id']}.txt").read_text()
    assert "sample answers of the trained model (4, greedy, from the last training rows):" in log_text
    assert all(f"  reference: {a['expected_output']}" in log_text for a in answers)
    assert job["job_data"]["eval_results"] == [str(index.parent / "eval_results" / "sample_generations.csv")]
    assert "## Sample answers" in card and f"````text\n{answers[0]['expected_output']}\n````" in card
    assert not tagged_processes(tag, "plugin_utils.rank"), "the ranks are gone once the run is over"


def trackio_rows(database: Path, run: str) -> list[dict]:
    """A run's rows in a Trackio project's database (trackio 0.43's `metrics` table), read with sqlite3 rather
    than trackio's reader, which would cost a process importing trackio (seconds on 2 busy cores)."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(database)) as db:
        found = db.execute("SELECT metrics FROM metrics WHERE run_name = ? ORDER BY id", (run,)).fetchall()
    return [json.loads(metrics) for (metrics,) in found]


def tensorboard_events(path: Path) -> list:
    """The records of a TensorBoard event file (TFRecord framing: length, crc, payload, crc)."""
    import struct

    from tensorboardX.proto import event_pb2

    events, data, offset = [], path.read_bytes(), 0
    while offset < len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        payload = data[offset + 12 : offset + 12 + length]
        offset += 12 + length + 4
        event = event_pb2.Event()
        event.ParseFromString(payload)
        events.append(event)
    return events


def _legacy_job(home: Path, job_id: str) -> Path:
    job_dir = home / "workspace" / "jobs" / job_id
    job_dir.mkdir(parents=True)
    index = job_dir / "index.json"
    index.write_text(
        json.dumps(
            {"id": job_id, "experiment_id": "1", "job_data": {}, "status": "RUNNING", "type": "TRAIN", "progress": 0}
        )
    )
    return index


def _run_like_the_harness(input_file: Path, home: Path, lab_dir: Path = LEGACY_LAB, hooks: Path | None = None):
    """What TransformerLab's plugin_harness.py does: plugin dir on sys.path, import main, call main.main().
    `hooks`: a folder whose sitecustomize.py every process of the run loads (a test's injection)."""
    script = (
        "import sys; sys.path.append(sys.argv[1]); sys.argv = [sys.argv[0]] + sys.argv[2:]; import main; main.main()"
    )
    path = os.pathsep.join(str(folder) for folder in (hooks, lab_dir) if folder)
    env = {**os.environ, "TFL_HOME_DIR": str(home), "PYTHONPATH": path}
    args = ["--plugin_dir", str(ROOT), "--input_file", str(input_file), "--experiment_name", "alpha"]
    return subprocess.run(
        [sys.executable, "-c", script, str(ROOT), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=str(tmp_cwd(home)),
    )


def tmp_cwd(home: Path) -> Path:
    return home


def _legacy_input(tmp_path: Path, tiny_model: str, **form) -> tuple[Path, Path, Path]:
    home = tmp_path / "tflhome"
    index = _legacy_job(home, "7")
    workspace = home / "workspace"
    config = {
        "plugin_name": "sft_trainer_trl",
        "model_name": tiny_model,
        "model_architecture": "LlamaForCausalLM",
        "dataset_name": str(ROOT / "demo" / "sample_data.jsonl"),
        "template_name": "demo",
        "job_id": "7",
        "type": "LoRA",
        "adaptor_name": "legacy-adaptor",
        "adaptor_output_dir": str(workspace / "adaptors" / "tiny" / "legacy-adaptor"),
        "output_dir": str(workspace / "experiments" / "alpha" / "tensorboards" / "demo"),
        "formatting_template": "Question: {{ prompt }}\nAnswer:{{ completion }}",
        "apply_chat_template": False,
        "chatml_formatted_column": "messages",
        "formatting_chat_template": "",
        "run_sweeps": False,
        "sweep_config": {},
        # Form values arrive as strings from the Train tab.
        "num_processes": "2",
        "train_device": "cpu",
        "max_steps": "6",
        "batch_size": "4",
        "gradient_accumulation_steps": "1",
        "logging_steps": "2",
        "save_steps": "3",
        "maximum_sequence_length": "128",
        "learning_rate": "1e-3",
        "gradient_checkpointing": "off",
    }
    config.update(form)
    input_file = workspace / "temp" / "plugin_input_7.json"
    input_file.parent.mkdir(parents=True)
    input_file.write_text(json.dumps({"experiment": {"id": 1, "name": "alpha", "config": {}}, "config": config}))
    return input_file, index, Path(config["adaptor_output_dir"])


# The lab SDKs that TransformerLab 0.31 and 0.32 put in a plugin's venv; `make setup` installs both.
LEGACY_SDKS = {"0.0.98 (TransformerLab 0.31)": LEGACY_LAB, "0.1.1 (TransformerLab 0.32)": LEGACY_LAB_032}
# One rank: the host is the parent's alone (two ranks are proven headless and under the lab SDK).
LEGACY_PROCESSES = {"0.0.98 (TransformerLab 0.31)": 1, "0.1.1 (TransformerLab 0.32)": 1}
# The sample answers each carries: none asked for, or a generation that fails (FAILING_GENERATION).
LEGACY_SAMPLES = {"0.0.98 (TransformerLab 0.31)": "off", "0.1.1 (TransformerLab 0.32)": "failing"}


def injection(purpose: str, module: str, patch: str, when: str) -> str:
    """A sitecustomize.py for a test injection: in the processes where `when` holds, `patch(module)` runs as soon
    as `module` has been imported, before anything uses it."""
    hook = f"""
        # Test injection: {purpose}
        import importlib.abc, importlib.util, os, sys

        class _Hook(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name != {module!r}:
                    return None
                sys.meta_path.remove(self)
                spec = importlib.util.find_spec(name)
                real_exec = spec.loader.exec_module

                def exec_module(module):
                    real_exec(module)
                    patch(module)

                spec.loader.exec_module = exec_module
                return spec

        if {when}:
            sys.meta_path.insert(0, _Hook())
        """
    return textwrap.dedent(hook) + textwrap.dedent(patch)


FAILING_GENERATION = injection(
    "in a rank (SFT_PARENT_PID is set for the ranks alone), generating raises, as it would where the GPU has no"
    " room left for the sample answers' batch.",
    "transformers.generation.utils",
    """
    def patch(module):
        def generate(self, *args, **kwargs):
            raise RuntimeError("injected generation failure")

        module.GenerationMixin.generate = generate
    """,
    'os.environ.get("SFT_PARENT_PID")',
)


@pytest.mark.parametrize(
    ("lab_dir", "processes", "samples"),
    [(LEGACY_SDKS[name], LEGACY_PROCESSES[name], LEGACY_SAMPLES[name]) for name in LEGACY_SDKS],
    ids=list(LEGACY_SDKS),
)
def test_legacy_harness_run_completes_the_legacy_job(tiny_model, tmp_path, lab_dir, processes, samples):
    assert lab_dir.is_dir(), "make setup installs the legacy lab SDKs"
    form = {"num_processes": str(processes)}
    hooks = tmp_path / "hooks"
    if samples == "off":
        form["sample_generations"] = "0"
    else:
        hooks.mkdir()
        (hooks / "sitecustomize.py").write_text(FAILING_GENERATION)
    input_file, index, adapter = _legacy_input(tmp_path, tiny_model, **form)
    proc = _run_like_the_harness(input_file, tmp_path / "tflhome", lab_dir, hooks)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Neither run has sample answers: one asked for none, the other's generation failed, which is one warning.
    assert not (adapter / "samples.jsonl").exists() and "sample answers of the trained model (" not in proc.stderr
    warned = proc.stderr.count("could not generate sample answers of the trained model: RuntimeError: injected")
    assert warned == (0 if samples == "off" else 1), proc.stderr[-3000:]
    job = read_job(index)
    assert job["status"] == "COMPLETE", job
    assert job["progress"] == 100
    assert job["job_data"]["completion_status"] == "success"
    assert "loss" in job["job_data"]["current_metrics"]
    summary = json.loads((adapter / "training_summary.json").read_text())
    assert summary["world_size"] == processes
    assert summary["parameters"]["max_steps"] == 6 and summary["parameters"]["gradient_checkpointing"] == "false"
    sweep_metrics = json.loads(Path(summary["parameters"]["output_dir"], "metrics.json").read_text())
    assert sweep_metrics["train/loss"] == pytest.approx(summary["final_loss"])
    # The 0.31 Train tab charts TensorBoard logs found through job_data["tensorboard_output_dir"].
    assert job["job_data"]["tensorboard_output_dir"] == summary["parameters"]["output_dir"]
    [events] = Path(summary["parameters"]["output_dir"], "job_7_demo").glob("events.out.tfevents.*")
    tags = {value.tag for event in tensorboard_events(events) for value in event.summary.value}
    assert {"train/loss", "train/learning_rate"} <= tags


def test_invalid_parameters_fail_the_legacy_job_with_the_same_text(tiny_model, tmp_path):
    input_file, index, adapter = _legacy_input(tmp_path, tiny_model, max_steps="0", lora_r="lots")
    proc = _run_like_the_harness(input_file, tmp_path / "tflhome")
    assert proc.returncode == 2
    job = read_job(index)
    assert job["status"] == "FAILED"
    details = job["job_data"]["completion_details"]
    assert "lora_r: expected a number" in details
    assert "lora_r" in proc.stderr
    assert not adapter.exists()


FAILING_RANK = injection(
    "in the rank named by SFT_TEST_FAIL_RANK, TRL's loss raises on the third step.",
    "trl.trainer.sft_trainer",
    """
    def patch(module):
        real_loss = module.SFTTrainer.compute_loss
        calls = []

        def compute_loss(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("injected failure in rank " + os.environ["RANK"])
            return real_loss(self, *args, **kwargs)

        module.SFTTrainer.compute_loss = compute_loss
    """,
    'os.environ.get("RANK") is not None and os.environ.get("RANK") == os.environ.get("SFT_TEST_FAIL_RANK")',
)


def test_a_rank_that_raises_fails_the_job_with_its_message_and_leaves_no_process(tiny_model, tmp_path):
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(FAILING_RANK)
    config = base_config(tiny_model, tmp_path, num_processes=2)
    tag = f"rank-raises-{os.getpid()}-{time.monotonic_ns()}"
    proc = run_main(
        ["--config", write_config(tmp_path, config), "--json"],
        env={"PYTHONPATH": str(hook_dir), "SFT_TEST_FAIL_RANK": "1", RUN_TAG: tag},
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    result = last_json(proc.stdout)
    assert result["status"] == "FAILED"
    assert "rank 1 failed: RuntimeError: injected failure in rank 1" in result["error"]
    # Its traceback's innermost frames, from the rank's own error file: where the injected failure was raised.
    assert "\nwhere it failed:\n" in result["error"] and "sitecustomize.py" in result["error"], result["error"]
    [index] = lab_jobs(tmp_path / "tflhome")
    job = read_job(index)
    assert job["status"] == "FAILED"
    assert "injected failure in rank 1" in job["job_data"]["completion_details"]
    assert job["job_data"]["error_msg"] == job["job_data"]["completion_details"]  # what the job card shows
    assert not (tmp_path / "outputs" / "test-adaptor").exists()
    leftovers = tagged_processes(tag, "plugin_utils.rank")
    assert not leftovers, leftovers


def test_invalid_parameters_fail_a_lab_sdk_job_with_every_line(tiny_model, tmp_path):
    home = tmp_path / "tflhome"
    params = base_config(tiny_model, tmp_path, max_steps=0, lora_r="lots", precision="fp16")
    job_id = make_lab_job(home, params)
    proc = run_main(["--json"], env={"_TFL_JOB_ID": job_id, "_TFL_EXPERIMENT_ID": "exp1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    report = last_json(proc.stdout)
    # Single-value and cross-parameter problems come together, each once.
    assert sorted(e["parameter"] for e in report["errors"]) == ["lora_r", "max_steps", "precision"]
    [index] = lab_jobs(home, "exp1")
    job = read_job(index)
    assert job["status"] == "FAILED"
    details = job["job_data"]["completion_details"]
    assert all(f"{name}:" in details for name in ("lora_r", "max_steps", "precision"))
    # The job card of a failed job shows error_msg: the same lines, one per problem.
    lines = job["job_data"]["error_msg"].splitlines()
    assert lines[0] == "Invalid configuration:" and len(lines) == 4
    assert sorted(line.split(":")[0] for line in lines[1:]) == ["lora_r", "max_steps", "precision"]
    assert "Traceback" not in proc.stderr


def test_cross_parameter_errors_are_reported_together_and_fail_the_job(tiny_model, tmp_path):
    home = tmp_path / "tflhome"
    params = base_config(tiny_model, tmp_path, max_steps=0, precision="fp16", lora_target_modules="lm_head")
    job_id = make_lab_job(home, params)
    proc = run_main(["--json"], env={"_TFL_JOB_ID": job_id, "_TFL_EXPERIMENT_ID": "exp1"})
    assert proc.returncode == 2
    report = last_json(proc.stdout)
    assert {e["parameter"] for e in report["errors"]} == {"max_steps", "precision", "lora_target_modules"}
    details = read_job(lab_jobs(home, "exp1")[0])["job_data"]["completion_details"]
    assert all(name in details for name in ("max_steps:", "precision:", "lora_target_modules:"))


def test_data_errors_exit_2_and_end_the_ranks_that_started_while_the_data_was_read(tiny_model, tmp_path):
    """The ranks start once the check passes, to import their libraries while the data is prepared; a refusal
    found in the data ends them at once, with the same exit code and message, and leaves no process and
    nothing in the outputs (not even the run lock the ranks were given)."""
    import psutil

    rows = tmp_path / "text.jsonl"
    rows.write_text('{"text": "plain words"}\n' * 8)
    config = base_config(
        tiny_model, tmp_path, dataset_name=str(rows), formatting_template="", completion_only_loss="true"
    )
    proc = run_main(["--config", write_config(tmp_path, config), "--json"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    [error] = last_json(proc.stdout)["errors"]
    assert error["parameter"] == "completion_only_loss"
    [launch] = [line for line in proc.stderr.splitlines() if "launch:" in line]
    run_folder = launch.split()[-1]
    assert "sft-run-" in run_folder and not Path(run_folder).exists()
    left = []
    for process in psutil.process_iter(["cmdline"]):
        if run_folder in " ".join(process.info["cmdline"] or []):
            left.append(process)
    assert not left, left
    assert not (tmp_path / "outputs").exists()


def test_chat_rows_with_a_published_template_train_end_to_end_and_fuse(tiny_model, tmp_path):
    """Messages as datasets hold them (a tool call, a `gpt` role, a validation file) through a real run:
    Qwen2.5's published chat template, two CPU ranks, evaluation on the dataset's own split, fuse_model."""
    template = (ROOT / "tests" / "fixtures" / "chat_templates" / "qwen2.5.jinja").read_text()
    call = {"type": "function", "function": {"name": "lookup", "arguments": {"city": "Lima"}}}
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Weather {i}?"},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "content": "sunny"},
                {"role": "gpt", "content": f"Sunny, {i}."},
            ]
        }
        for i in range(24)
    ]
    folder = tmp_path / "chat"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:20]))
    (folder / "validation.jsonl").write_text("\n".join(json.dumps(r) for r in rows[20:]))
    config = base_config(
        tiny_model,
        tmp_path,
        dataset_name=str(folder),
        formatting_template="",
        formatting_chat_template=template,
        num_processes=2,
        max_steps=4,
        save_steps=2,
        eval_split=0.1,
        maximum_sequence_length=256,
    )
    dry = run_main(["--config", write_config(tmp_path, config), "--dry-run", "--json"])
    assert dry.returncode == 0, dry.stderr[-3000:]
    report = last_json(dry.stdout)
    assert report["dataset"]["format"] == "chat"
    assert (report["dataset"]["rows_used"], report["dataset"]["eval_rows"]) == (20, 4)
    assert report["samples"][0]["trained_text"] == (
        '<tool_call>\n{"name": "lookup", "arguments": {"city": "Lima"}}\n</tool_call><|im_end|>Sunny, 0.<|im_end|>'
    )
    assert [w["parameter"] for w in report["warnings"]] == ["eval_split"]  # its own split replaces the fraction

    # The real run, merged into a full model at the end, with main.py's stderr closed once the ranks start (a
    # closed terminal or log reader): the ranks' output flows through main.py, which must keep draining their
    # pipe (test_launch.py proves the draining with a megabyte of output) and still register what it wrote.
    fused = write_config(tmp_path, {**config, "fuse_model": True})
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), "--config", fused, "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(ROOT),
    )
    for line in proc.stderr:
        if "launch:" in line:
            break
    proc.stderr.close()
    out = proc.stdout.read()
    assert proc.wait(timeout=300) == 0, out[-3000:]
    result = last_json(out)
    assert result["status"] == "COMPLETE" and result["steps"] == 4
    summary = json.loads((Path(result["adaptor_path"]) / "training_summary.json").read_text())
    assert summary["world_size"] == 2
    # Evaluated on its own split: the score carries the keys sweeps rank by, `loss` being the eval loss.
    [index] = lab_jobs(tmp_path / "tflhome")
    job = read_job(index)
    score = job["job_data"]["score"]
    assert score["eval/loss"] == pytest.approx(summary["eval_loss"]) and score["loss"] == score["eval/loss"]
    assert score["train/loss"] == pytest.approx(summary["final_loss"])
    # fuse_model: a merged model that loads without any adapter, registered beside the adapter.
    merged = tmp_path / "outputs" / "test-adaptor-merged"
    assert (merged / "config.json").is_file() and (merged / "tokenizer.json").is_file()
    assert not (merged / "adapter_config.json").exists()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged)
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert len(job["job_data"]["models"]) == 2
    # Its loss curve shows the eval loss too, and the merged model carries the same picture.
    curve = Image.open(Path(result["adaptor_path"]) / "loss_curve.png")
    assert pixels_of(curve, TRAIN_COLOUR) and pixels_of(curve, EVAL_COLOUR)
    assert (merged / "loss_curve.png").is_file()
    cards = [(folder / "README.md").read_text() for folder in (Path(result["adaptor_path"]), merged)]
    assert [yaml.safe_load(card.split("---\n")[1])["library_name"] for card in cards] == ["peft", "transformers"]
    assert "| final eval loss |" in cards[0] and "PeftModel" not in cards[1]
    # Sample answers from the dataset's own eval split, each prompted with the conversation up to its last answer
    # (the tool call and its result included) and answered in memory before the adapter was merged.
    answers = [json.loads(line) for line in (Path(result["adaptor_path"]) / "samples.jsonl").read_text().splitlines()]
    assert [a["expected_output"] for a in answers] == [f"Sunny, {i}." for i in range(20, 24)]
    assert all(a["input"].endswith("\nsunny\n</tool_response>\nassistant") for a in answers), answers[0]
    assert [f"Weather {i}?" in a["input"] for i, a in zip(range(20, 24), answers, strict=True)] == [True] * 4
