"""The whole flow of a task in current TransformerLab (0.35 - 0.40.1), under lab SDK jobs made the way its API
server makes them and run the way its Local provider runs them, on this machine's CPU:

1. a 2-process run whose parameters are task.yaml's schema dicts overwritten by the form's values, with the
   form's leftovers: COMPLETE, with its score keys;
2. an invalid run: FAILED, with job_data.error_msg;
3. Stop (job_data.stop and STOPPING, SIGTERM to the process tree, SIGKILL 3 s later): STOPPED, with complete
   checkpoints only;
4. the task queued again with the same adaptor_name: a new job that continues the stopped run;
5. a sweep over two learning rates: two children, the best one picked as TransformerLab's sweep service picks it
   (score[sweep_metric] of COMPLETE children, eval/loss, lower is better).

Run by hand: `.venv/bin/python bench/task_flow.py` (about 3 minutes on 2 CPU cores). Nothing here is a fake but
the API server itself: the jobs are lab SDK jobs in a temporary workspace, `run:` goes through the SDK's real
tfl-remote-trap under `/bin/bash -c` in a new session, and Stop is the provider's own sequence.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.task_host import TaskRun, make_lab_job  # noqa: E402 - after the path is set

TEMPLATE = "Question: {{ prompt }}\nAnswer:{{ completion }}"
LEFTOVERS = {
    "use_spot": False,
    "resource_group_id": "",
    "docker_image": "",
    "region": "",
    "sweep_metric": "eval/loss",
    "lower_is_better": True,
    "trackio_project_name": "",
}


def read_job(home: Path, job_id: str) -> dict:
    index = home / "workspace" / "experiments" / "exp1" / "jobs" / job_id / "index.json"
    for _ in range(100):
        with contextlib.suppress(ValueError):
            return json.loads(index.read_text())
        time.sleep(0.02)
    return json.loads(index.read_text())


def task_parameters(form: dict) -> dict:
    """task.yaml's parameters (schema dicts) overwritten by the form's values, plus the form's leftovers: what
    job_data['parameters'] holds for a task launched from the web UI."""
    spec = yaml.safe_load((ROOT / "task.yaml").read_text())
    return {**spec["parameters"], **form, **LEFTOVERS}


def show(title: str, value) -> None:
    print(f"\n## {title}\n{json.dumps(value, indent=2, default=str) if not isinstance(value, str) else value}")


def summary(job: dict, *keys: str) -> dict:
    data = job["job_data"]
    return {"status": job["status"], "progress": job.get("progress"), **{k: data.get(k) for k in keys}}


def main() -> None:
    from demo.tiny_model import build

    work = Path(tempfile.mkdtemp(prefix="task-flow-"))
    home = work / "tflhome"
    home.mkdir()
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["SFT_PREPARED_CACHE"] = str(work / "prepared")
    model = str(build(work / "model"))
    form = {
        "model_name": model,
        "dataset_name": str(ROOT / "demo" / "sample_data.jsonl"),
        "formatting_template": TEMPLATE,
        "adaptor_name": "flow",
        "train_device": "cpu",
        "num_processes": 2,
        "max_steps": 8,
        "logging_steps": 1,
        "save_steps": 4,
        "eval_split": 0.1,
        "maximum_sequence_length": 128,
        "learning_rate": 0.001,
    }
    started = time.time()

    params = task_parameters(form)
    show(
        "1. parameters as the job holds them (schema dicts, form values, leftovers; first 12 keys)",
        dict(list(params.items())[:12]) | {k: params[k] for k in LEFTOVERS},
    )
    job = make_lab_job(home, params)
    run = TaskRun(home, job)
    run.proc.wait(timeout=600)
    done = read_job(home, job)
    show("1. a 2-process run", summary(done, "score", "completion_details", "checkpoints"))
    print("log lines:", *[line for line in run.output.splitlines() if "training started" in line], sep="\n  ")

    bad = make_lab_job(home, task_parameters({**form, "adaptor_name": "bad", "batch_size": 0, "lora_alpha": "abc"}))
    TaskRun(home, bad).proc.wait(timeout=300)
    show("2. an invalid run", summary(read_job(home, bad), "error_msg", "live_status"))

    stop_form = {**form, "adaptor_name": "stopped", "max_steps": 200, "save_steps": 2, "eval_split": 0}
    first = make_lab_job(home, task_parameters(stop_form))
    run = TaskRun(home, first)
    run.wait_for("checkpoint saved: step 4", timeout=300)
    killed = [" ".join(line.split()[1:3]) for line in run.stop()]
    stopped = read_job(home, first)
    folder = home / "workspace" / "experiments" / "exp1" / "jobs" / first / "checkpoints"
    entries = sorted(p.name for p in folder.iterdir())
    complete = [n for n in entries if (folder / n / "trainer_state.json").is_file()]
    show(
        "3. Stop: SIGTERM to the tree, SIGKILL 3 s later",
        {
            **summary(stopped, "completion_details", "live_status", "latest_checkpoint"),
            "killed at 3 s": killed,
            "checkpoints folder": entries,
            "complete": complete,
        },
    )

    second = make_lab_job(home, task_parameters({**stop_form, "max_steps": int(complete[-1].split("-")[1]) + 4}))
    run = TaskRun(home, second)
    run.proc.wait(timeout=600)
    lines = [line for line in run.output.splitlines() if "continuing job" in line or "resuming at step" in line]
    show("4. queued again with the same adaptor_name: a new job", summary(read_job(home, second), "score"))
    print("log lines:", *lines, sep="\n  ")

    sweep_job = make_lab_job(home, {}, sweep_parent=True, sweep_metric="eval/loss", lower_is_better=True)
    children = []
    for index, rate in enumerate((0.002, 0.0002)):
        child_params = task_parameters({**form, "adaptor_name": "swept", "learning_rate": rate, "num_processes": 1})
        children.append(
            make_lab_job(
                home,
                child_params,
                sweep_params={"learning_rate": rate},
                sweep_run_index=index,
                parent_sweep_job_id=sweep_job,
            )
        )
    runs = [TaskRun(home, child) for child in children]  # on the Local provider they train at the same time
    for child_run in runs:
        child_run.proc.wait(timeout=600)
    # transformerlab-app v0.40.1 services/compute_provider/sweep_job_service.py get_sweep_results: the metric is
    # job_data.score[sweep_metric] of COMPLETE children; the best is the lowest.
    results = []
    for child in children:
        data = read_job(home, child)
        results.append(
            {
                "job": child,
                "status": data["status"],
                "config": data["job_data"]["sweep_params"],
                "eval/loss": (data["job_data"].get("score") or {}).get("eval/loss"),
            }
        )
    ranked = [r for r in results if r["status"] == "COMPLETE" and r["eval/loss"] is not None]
    best = min(ranked, key=lambda r: r["eval/loss"]) if ranked else None
    show("5. a sweep over two learning rates", {"children": results, "best_config": best and best["config"]})
    print(f"\nwhole flow: {time.time() - started:.0f} s; workspace {work}")


if __name__ == "__main__":
    main()
