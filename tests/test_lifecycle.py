"""Run lifecycle with real signals and real killed processes: a rank killed with SIGKILL, main.py killed with
SIGKILL (one rank, its own child), a stop during data preparation or before the first step, the legacy stop
flag, the task host's stop flag and its stop, and two "nodes" on one machine. Elsewhere, sharing their launches:
main.py killed under accelerate's launcher, a signal's stop and the resume after each (test_cpu_twins' QLoRA
runs), FSDP (test_e2e's headless run), merging (test_e2e's chat run)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from .conftest import ROOT, RUN_TAG, base_config, last_json, run_main, tagged_processes, tensor_dtypes, write_config
from .task_host import TaskRun, make_lab_job, mark_stopping
from .test_e2e import _legacy_input, injection, lab_jobs, metrics_rows, read_job
from .test_trackio import check_a_completed_task_jobs_page, host_trackio_env

pytestmark = pytest.mark.slow


class Running:
    """main.py started in its own process group, as TransformerLab's runner starts it."""

    def __init__(self, args: list[str], env: dict | None = None):
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "main.py"), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
            cwd=str(ROOT),
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.stdout = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._out: list[str] = []
        self._out_reader = threading.Thread(target=lambda: self._out.append(self.proc.stdout.read()), daemon=True)
        self._out_reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    def session(self) -> list[psutil.Process]:
        """The processes left in this run's session: main.py's, and whatever it started."""
        left = []
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):
                if os.getsid(proc.pid) == self.proc.pid:
                    left.append(proc)
        return left

    def wait_for(self, text: str, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(text in line for line in self.lines):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"never saw {text!r}; output:\n{''.join(self.lines[-40:])}")

    def finish(self, timeout: float = 180) -> int:
        """main.py's exit code, once it has exited and nothing it started holds its output open any more. Past
        `timeout`, the run's session is killed and the test fails naming what was still there: a hang is a
        defect to find, never a wait for pytest's own timeout."""
        deadline = time.time() + timeout
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=timeout)
        for reader in (self._out_reader, self._reader):
            reader.join(timeout=max(deadline - time.time(), 5))
        if self.proc.poll() is None or self._out_reader.is_alive() or self._reader.is_alive():
            left = self.session()
            described = [_described(p) for p in left]
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            for proc in left:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            raise AssertionError(
                f"main.py (exit {self.proc.poll()}) or what it started was still there after {timeout} s: "
                f"{described}\n{self.stderr[-3000:]}"
            )
        self.stdout = "".join(self._out)
        return self.proc.returncode

    @property
    def stderr(self) -> str:
        return "".join(self.lines)


def _described(proc: psutil.Process) -> str:
    """A process for a failure message: its command line, or why there is none."""
    try:
        return f"{proc.pid} {' '.join(proc.cmdline()[:4])}"
    except psutil.ZombieProcess:
        return f"{proc.pid} (a zombie: ended, not yet waited for by its parent)"
    except psutil.Error:
        return f"{proc.pid} (gone)"


def no_processes_left(tag: str, timeout: float = 15) -> list[psutil.Process]:
    """The processes started under `tag` that are still alive once `timeout` has passed."""
    _, alive = psutil.wait_procs(tagged_processes(tag), timeout=timeout)
    return alive


def test_kill_9_of_one_rank_fails_the_job_and_leaves_no_process(tiny_model, tmp_path):
    tag = f"kill-9-{os.getpid()}-{time.monotonic_ns()}"
    config = base_config(tiny_model, tmp_path, num_processes=2, max_steps=3000, logging_steps=1, save_steps=10000)
    run = Running(["--config", write_config(tmp_path, config), "--json"], env={RUN_TAG: tag})
    run.wait_for("step 3/3000")
    ranks = [p for p in tagged_processes(tag, "plugin_utils.rank") if p.environ().get("RANK") == "1"]
    assert len(ranks) == 1
    killed = time.time()
    ranks[0].kill()
    assert run.finish() == 1, run.stderr[-3000:]
    print(f"dead rank detected and run ended in {time.time() - killed:.2f} s")
    result = last_json(run.stdout)
    assert result["status"] == "FAILED"
    assert "rank 1" in result["error"] and ("SIGKILL" in result["error"] or "exit" in result["error"])
    [index] = lab_jobs(tmp_path / "tflhome")
    job = read_job(index)
    assert job["status"] == "FAILED" and "rank 1" in job["job_data"]["completion_details"]
    assert not no_processes_left(tag), "no orphan processes"
    assert not (tmp_path / "outputs" / "test-adaptor").exists()


@pytest.mark.parametrize(
    ("to_group", "repeated"),
    [(True, False), (False, False), (False, True)],
    ids=["group", "main-alone", "main-repeated"],
)
def test_sigterm_during_data_preparation_stops_and_leaves_nothing_half_written(
    tiny_model, tmp_path, to_group, repeated
):
    """A stop while the data is prepared in worker processes: to the run's process group, to main.py alone, and
    to main.py again and again (an impatient Ctrl-C), where a later signal must not cut short the first one's
    ending or its report."""
    rows = tmp_path / "many.jsonl"
    with rows.open("w") as handle:
        for i in range(25_000):
            handle.write(json.dumps({"prompt": f"What is {i} plus {i}? " * 3, "completion": f" {2 * i}."}) + "\n")
    config = base_config(tiny_model, tmp_path, dataset_name=str(rows), formatting_template="")
    run = Running(["--config", write_config(tmp_path, config), "--json"])
    run.wait_for("data: 25000 rows")
    # Wait until preparation is writing its staging folder: a stop must then remove it.
    deadline = time.time() + 60
    while not list((tmp_path / "prepared").glob("*.tmp-*")) and run.proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    # Preparation runs in worker processes here (one per CPU): they must end with it, never hang. The stop to
    # main.py alone comes once they write their part (in the staging folder's .work), where the pool's own
    # ending raises an error of its own over the stop, and the run must still end STOPPED.
    while not (to_group or repeated) and run.proc.poll() is None and time.time() < deadline:
        if list((tmp_path / "prepared").glob("*.tmp-*/.work/*")):
            break
        time.sleep(0.02)
    if to_group:
        os.killpg(run.proc.pid, signal.SIGTERM)
    else:
        run.proc.send_signal(signal.SIGTERM)
        # Again every 50 ms until it exits: while the first stop ends the workers and removes what was written,
        # while it reports, and while Python shuts down.
        while repeated and run.proc.poll() is None:
            time.sleep(0.05)
            run.proc.send_signal(signal.SIGTERM)
    assert run.finish(timeout=60) == 3, run.stderr[-3000:]
    assert last_json(run.stdout)["status"] == "STOPPED"
    cache = tmp_path / "prepared"
    assert not list(cache.glob("*/stats.json")), "no prepared dataset was published"
    left = [str(path.relative_to(cache)) for path in cache.glob("*.tmp-*/**/*")] + list(map(str, cache.glob("*.tmp-*")))
    assert not left, f"the staging folder was removed; left: {left}\n{run.stderr[-3000:]}"
    assert not (tmp_path / "outputs").exists()


PAUSE_AFTER_THE_RANKS_START = injection(
    "main.py (the one process without SFT_PARENT_PID) pauses for a second right after starting the ranks'"
    " launcher, before the code after the start runs: a stop sent then lands between the start and the"
    " registration that ends them.",
    "subprocess",
    """
    def patch(module):
        import sys, time

        start = module.Popen.__init__

        def paused(self, args, *rest, **options):
            start(self, args, *rest, **options)
            if "plugin_utils.rank" in " ".join(map(str, args)):
                sys.stderr.write("test: the ranks' launcher started\\n")
                sys.stderr.flush()
                time.sleep(1.0)

        module.Popen.__init__ = paused
    """,
    'not os.environ.get("SFT_PARENT_PID")',
)


def test_sigterm_as_the_ranks_start_ends_them_before_the_run_exits(tiny_model, tmp_path):
    """A stop that lands the moment the ranks' launcher has started (the injection widens that moment to a
    second) still ends the launcher and its ranks: they run in a session of their own, which no signal to the
    run reaches, and hold the run lock, so left running they would keep the next run of these outputs out."""
    tag = f"start-stop-{os.getpid()}-{time.monotonic_ns()}"
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(PAUSE_AFTER_THE_RANKS_START)
    config = base_config(tiny_model, tmp_path, num_processes=2)
    env = {RUN_TAG: tag, "PYTHONPATH": os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")])}
    run = Running(["--config", write_config(tmp_path, config), "--json"], env=env)
    run.wait_for("test: the ranks' launcher started")
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish(timeout=60) == 3, run.stderr[-3000:]
    assert last_json(run.stdout)["status"] == "STOPPED"
    # Within 2 s (a killed process's exit, on a busy machine): a rank left running would still be importing its
    # libraries for seconds more, then wait for a spec.
    assert not no_processes_left(tag, timeout=2.0), "the launcher and its ranks ended with the run"
    assert not (tmp_path / "outputs").exists()


def test_ctrl_c_during_a_dry_run_creates_no_job(tiny_model, tmp_path):
    rows = tmp_path / "many.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"Q {i}?", "completion": f" {i}."}) + "\n" for i in range(25_000)))
    config = base_config(tiny_model, tmp_path, dataset_name=str(rows), formatting_template="")
    run = Running(["--config", write_config(tmp_path, config), "--dry-run", "--json"])
    run.wait_for("data: 25000 rows")
    run.proc.send_signal(signal.SIGINT)
    assert run.finish(timeout=60) == 3, run.stderr[-3000:]
    assert last_json(run.stdout)["status"] == "STOPPED"
    assert not (tmp_path / "tflhome" / "workspace").exists(), "a dry run never creates or changes a job"


def test_the_legacy_stop_flag_before_the_first_step_stops_the_run_with_nothing_trained_or_saved(tiny_model, tmp_path):
    # The Stop button of TransformerLab 0.31 pressed while the model loads: the run stops before its first step.
    input_file, index, adapter = _legacy_input(
        tmp_path, tiny_model, max_steps="300", logging_steps="1", save_steps="1", num_processes="1"
    )
    env = {"TFL_HOME_DIR": str(tmp_path / "tflhome"), "PYTHONPATH": str(ROOT / ".legacy-lab")}
    script = (
        "import sys; sys.path.append(sys.argv[1]); sys.argv = [sys.argv[0]] + sys.argv[2:]; import main; main.main()"
    )
    log = tmp_path / "harness.log"
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(ROOT), "--plugin_dir", str(ROOT), "--input_file", str(input_file)],
        stderr=subprocess.STDOUT,
        stdout=log.open("w"),  # as the host does: the output goes to the job's output file, never a full pipe
        env={**os.environ, **env},
    )
    deadline = time.time() + 120
    while "launch:" not in log.read_text() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    # What the Stop button does. The job file has no lock and the plugin rewrites it, so (like the host) keep
    # the flag set until the run ends.
    while proc.poll() is None and time.time() < deadline:
        job = read_job(index)
        if not job["job_data"].get("stop"):
            job["job_data"]["stop"] = True
            index.write_text(json.dumps(job))
        time.sleep(0.2)
    proc.wait(timeout=120)
    assert proc.returncode == 3, log.read_text()[-3000:]
    assert read_job(index)["status"] == "STOPPED"
    assert "step 1/" not in log.read_text(), "nothing was trained"
    # Ended at once, not after the model loaded: nothing trained is lost.
    assert "stop requested before the first step: nothing is trained yet; ending the ranks" in log.read_text()
    checkpoints = Path(tmp_path / "tflhome" / "workspace" / "experiments" / "alpha" / "tensorboards" / "demo")
    assert not list(checkpoints.rglob("checkpoint-*")), "nothing was saved"
    assert not adapter.exists()


def _two_node_job(tiny_model, tmp_path) -> tuple[Path, str, dict]:
    """A task's job in the shared workspace both "nodes" see, as providers run a task on several nodes."""
    home = tmp_path / "tflhome"
    params = base_config(tiny_model, tmp_path, num_processes=1, max_steps=4, logging_steps=1)
    params.pop("output_dir")
    return home, make_lab_job(home, params), params


def _one_job_for_two_nodes(home: Path, job_id: str, outputs: list[str]) -> None:
    """The main node alone reported: one COMPLETE, one row of metrics per step, one adapter of world size 2."""
    [index] = lab_jobs(home, "exp1")
    job = read_job(index)
    assert job["status"] == "COMPLETE" and job["progress"] == 100, outputs
    steps = [r["step"] for r in metrics_rows(index) if "train/loss" in r.get("metrics", {})]
    assert steps == sorted(set(steps)) == [1, 2, 3, 4], "one node reports each step"
    [model] = job["job_data"]["models"]
    assert json.loads(Path(model, "training_summary.json").read_text())["world_size"] == 2


def test_two_skypilot_nodes_train_one_model_and_only_node_0_reports(tiny_model, tmp_path):
    from plugin_utils.launch import free_port

    home, job_id, _ = _two_node_job(tiny_model, tmp_path)
    port = free_port()
    runs = []
    for rank in (0, 1):
        # What SkyPilot sets on each node, and what TransformerLab's SkyPilot provider prepends to `run`,
        # node-level RANK and WORLD_SIZE included.
        env = {
            "SKYPILOT_NUM_NODES": "2",
            "SKYPILOT_NODE_RANK": str(rank),
            "SKYPILOT_NODE_IPS": "127.0.0.1\n127.0.0.1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "NODE_RANK": str(rank),
            "RANK": str(rank),
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "2",
            "_TFL_JOB_ID": job_id,
            "_TFL_EXPERIMENT_ID": "exp1",
            "SFT_PREPARED_CACHE": str(tmp_path / f"prepared{rank}"),
        }
        runs.append(Running(["--json"], env=env))
    codes = [run.finish() for run in runs]
    assert codes == [0, 0], "\n".join(run.stderr[-2000:] for run in runs)
    assert "nodes: 2 machines from SkyPilot" in runs[1].stderr and "this is machine 1" in runs[1].stderr
    main_node, other = (last_json(run.stdout) for run in runs)
    assert main_node["status"] == other["status"] == "COMPLETE" and other["adaptor_path"] is None
    _one_job_for_two_nodes(home, job_id, [run.stderr[-2000:] for run in runs])


FAKE_SRUN = """#!{python}
# srun as SLURM runs it for --nodes=N --ntasks-per-node=1: the command once per node (here all on this machine,
# each "node" with its own SLURM_NODEID and prepared-data cache), ending with the worst exit code.
import os, subprocess, sys
args = sys.argv[1:]
nodes = int(next(a.split("=", 1)[1] for a in args if a.startswith("--nodes=")))
command = args[next(i for i, a in enumerate(args) if not a.startswith("--")):]
cache = os.environ["SFT_PREPARED_CACHE"]
step = {{"SLURM_STEP_ID": "0"}}
procs = [
    subprocess.Popen(command, env={{**os.environ, **step, "SLURM_NODEID": str(n), "SLURM_PROCID": str(n),
                                    "SFT_PREPARED_CACHE": cache + str(n)}})
    for n in range(nodes)
]
sys.exit(max(p.wait() for p in procs))
"""


def test_a_slurm_allocation_starts_the_run_on_every_node_with_srun(tiny_model, tmp_path):
    from plugin_utils.launch import free_port

    home, job_id, _ = _two_node_job(tiny_model, tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"  # a fake: there is no SLURM here
    srun.write_text(FAKE_SRUN.format(python=sys.executable))
    srun.chmod(0o755)
    # What TransformerLab's SLURM provider exports in the batch script, which runs `run` once.
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_NNODES": "2",
        "SLURM_NODEID": "0",
        "SLURM_JOB_NODELIST": "localhost",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "NODE_RANK": "0",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "2",
        "_TFL_JOB_ID": job_id,
        "_TFL_EXPERIMENT_ID": "exp1",
        "SFT_PREPARED_CACHE": str(tmp_path / "prepared"),
    }
    run = Running(["--json"], env=env)
    assert run.finish() == 0, run.stderr[-4000:]
    assert "SLURM: 2 nodes; starting on each: srun --nodes=2" in run.stderr
    assert "this is machine 1" in run.stderr
    _one_job_for_two_nodes(home, job_id, [run.stderr[-3000:]])


def test_task_stops_by_flag_and_by_signal_end_stopped_with_complete_checkpoints_and_each_next_job_resumes(
    tiny_model, tmp_path
):
    """Three jobs of one adapter under a task host, each taking up where the one before stopped.
    1. A provider that only marks the job (job_data.stop, STOPPING) and sends no signal: the run stops and exits 0.
    2. The next job continues from that checkpoint and gets the task's Stop: the run ends STOPPED (exit 0: the trap
       counts anything else as a crash) before the SIGKILL that follows SIGTERM by 3 s; the checkpoints folder
       holds complete checkpoint-N folders only, listed in job_data.
    3. A job queued again continues from the step it stopped at; one that changes the adapter's rank is refused."""
    home = tmp_path / "tflhome"
    tag = f"task-stop-{os.getpid()}-{time.monotonic_ns()}"
    params = base_config(tiny_model, tmp_path, max_steps=60, logging_steps=1, save_steps=2)
    params.pop("output_dir")
    # As a current TransformerLab task delivers them: the form's leftovers, and a schema dict the form did not
    # replace (its default applies).
    params.update(use_spot=False, docker_image="", sweep_metric="eval/loss", lower_is_better=True)
    params["save_total_limit"] = {"type": "int", "default": 3, "min": 1, "title": "Checkpoints to keep"}

    flagged = make_lab_job(home, params)
    [flagged_index] = lab_jobs(home, "exp1")
    run = TaskRun(home, flagged, env={RUN_TAG: tag})
    run.wait_for("step 2/60")
    # The job's record has no lock and the run rewrites it (progress, metrics), so a write of the host's can be
    # lost: like the host, keep the request there until the run ends.
    deadline = time.time() + 120
    while run.proc.poll() is None and time.time() < deadline:
        if not read_job(flagged_index)["job_data"].get("stop"):
            mark_stopping(home, flagged)
        time.sleep(0.5)
    assert run.proc.wait(timeout=30) == 0, run.output[-3000:]
    job = read_job(flagged_index)
    assert job["status"] == "STOPPED" and job["job_data"]["live_status"] == "Remote command finished"
    flag_stopped_at = max(int(p.name.split("-")[1]) for p in (flagged_index.parent / "checkpoints").iterdir())
    assert f"the newest complete checkpoint is step {flag_stopped_at}" in job["job_data"]["completion_details"]

    first = make_lab_job(home, params)
    [first_index] = [i for i in lab_jobs(home, "exp1") if str(read_job(i).get("id")) == str(first)]
    run = TaskRun(home, first, env={RUN_TAG: tag})
    run.wait_for(f"step {flag_stopped_at + 3}/60")  # past one save of its own
    assert f"continuing job {flagged} from step {flag_stopped_at}" in run.output
    run.stop()
    output = run.output
    assert last_json(output)["status"] == "STOPPED", output[-3000:]
    job = read_job(first_index)
    # The shell between the trap and main.py dies of the SIGTERM, so the trap would mark the job FAILED once
    # main.py's output ends: main.py keeps it open until the SIGKILL takes the trap.
    assert job["status"] == "STOPPED", json.dumps(job, indent=1)[-3000:]
    assert job["job_data"].get("live_status") != "Remote command crashed"
    assert "Stopped on request at step" in job["job_data"]["completion_details"]
    # The checkpoints folder holds complete checkpoint-N folders and nothing else, as job_data lists them.
    folder = first_index.parent / "checkpoints"
    entries = sorted(folder.iterdir(), key=lambda p: int(p.name.split("-")[1]))
    assert entries and all(p.name.startswith("checkpoint-") for p in entries), [p.name for p in entries]
    assert all((p / "trainer_state.json").is_file() and (p / "adapter_model.safetensors").is_file() for p in entries)
    assert len(entries) <= 3, "save_total_limit (its schema default) is kept"
    assert job["job_data"]["checkpoints"] == [str(p) for p in entries]
    assert job["job_data"]["latest_checkpoint"] == str(entries[-1])
    checkpoint = entries[-1]
    stopped_at = int(checkpoint.name.split("-")[1])
    assert f"the newest complete checkpoint is step {stopped_at}" in job["job_data"]["completion_details"]
    assert not no_processes_left(tag, timeout=10), "no process of the run is left"

    # Queued again with the same adaptor_name (every launch is a new job): it continues the stopped run. The Queue
    # form's Trackio tracking is on, and report_to names trackio (test_trackio checks what the job page shows).
    params["max_steps"] = stopped_at + 4  # a soft change: the resumed run goes on to it, with a warning
    second = make_lab_job(home, {**params, "report_to": "trackio"})
    env = {"_TFL_JOB_ID": second, "_TFL_EXPERIMENT_ID": "exp1", **host_trackio_env(tmp_path / "trackio")}
    run = Running(["--json"], env=env)
    assert run.finish() == 0, run.stderr[-3000:]
    assert f"continuing job {first} from step {stopped_at} ({checkpoint})" in run.stderr
    assert f"resuming at step {stopped_at}" in run.stderr
    assert "unknown parameter" not in run.stderr, "form leftovers are taken silently"
    # The schema dict means its default: the logged effective parameters show it, and nothing complains.
    assert "  save_total_limit: 3\n" in run.stderr
    assert not [line for line in run.stderr.splitlines() if "save_total_limit" in line and "[sft]" in line]
    result = last_json(run.stdout)
    assert result["steps"] == stopped_at + 4 and result["status"] == "COMPLETE" and result["job_id"] == second
    # What the job page shows: progress, metrics, the registered adapter, the checkpoints.
    [index] = [i for i in lab_jobs(home, "exp1") if str(read_job(i).get("id")) == str(second)]
    job = read_job(index)
    assert job["status"] == "COMPLETE" and job["progress"] == 100
    steps = [r["step"] for r in metrics_rows(index) if "train/loss" in r.get("metrics", {})]
    assert min(steps) == stopped_at + 1 and max(steps) == stopped_at + 4, "the metrics continue from the step"
    assert "warning: max_steps: changed since the checkpoint" in run.stderr
    # The loss curve is of the whole run: the steps the stopped jobs trained, read from the checkpoint, included.
    assert re.search(rf"loss curve: \S+loss_curve.png \(steps 1 to {stopped_at + 4}\)", run.stderr), run.stderr[-3000:]
    models = job["job_data"].get("models") or []
    assert len(models) == 1 and Path(models[0], "adapter_model.safetensors").is_file()
    assert Path(result["adaptor_path"]) == Path(models[0])
    saved = sorted(Path(index.parent, "checkpoints").iterdir())
    assert saved and all(p.name.startswith("checkpoint-") for p in saved), "the run's own files live elsewhere"
    check_a_completed_task_jobs_page(index, home, tmp_path / "trackio", run.stderr, "test-adaptor")

    # "Restart from checkpoint" on the job page names the checkpoint; a change that makes it unusable (the
    # adapter's rank) is refused, naming it.
    third = make_lab_job(home, {**params, "lora_r": 8}, parent_job_id=first, resumed_from_checkpoint=checkpoint.name)
    run = Running(["--json"], env={"_TFL_JOB_ID": third, "_TFL_EXPERIMENT_ID": "exp1"})
    assert run.finish() == 2
    assert "lora_r" in last_json(run.stdout)["errors"][0]["message"]


def test_kill_9_of_main_py_in_full_fine_tuning_leaves_a_rank_that_saves_fp32_weights_and_the_next_run_publishes(
    tiny_model, tmp_path
):
    """main.py killed outright (kill -9, the OOM killer) while one rank, its own child, trains and logs rarely:
    the rank, whose output is its own file rather than a pipe to main.py, sees its parent gone, finishes the step,
    saves a complete checkpoint and exits. The job stays RUNNING (nothing is left to end it) until the next run of
    the adapter finds it, closes it and resumes. (Two ranks under accelerate's launcher, which outlives main.py:
    test_cpu_twins' QLoRA runs.)

    The run fine-tunes every weight in bf16. Full fine-tuning loaded bf16 weights and updated them in bf16, where
    updates below bf16's resolution are lost (and in fp16, the loss scaler raises "Attempting to unscale FP16
    gradients": fp16 needs a GPU, so that twin is bench/gpu.py's). The weights are fp32 now, autocast computes in
    bf16, the checkpoint holds the fp32 weights the next run resumes from, and the published model is bf16, as
    the run trained it."""
    tag = f"parent-kill-{os.getpid()}-{time.monotonic_ns()}"
    config = base_config(
        tiny_model,
        tmp_path,
        training_mode="full",
        precision="bf16",
        max_steps=3000,
        logging_steps=10,
        save_steps=10000,
        learning_rate=1e-4,
    )
    run = Running(["--config", write_config(tmp_path, config), "--json"], env={RUN_TAG: tag})
    run.wait_for("step 1/3000")
    run_dir = next(line for line in run.lines if "launch: " in line).split()[-1]
    run.proc.kill()
    run.proc.wait(timeout=10)
    try:
        assert not no_processes_left(tag, timeout=120), "the rank saves and exits once its parent is gone"
        rank_logs = "".join(path.read_text() for path in sorted(Path(run_dir, "logs").glob("rank-*.log")))
        assert "the parent process is gone: saving a checkpoint and stopping" in rank_logs
        assert "Traceback" not in rank_logs and "BrokenPipeError" not in rank_logs, rank_logs[-3000:]
    finally:
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)  # what the killed parent would have removed
    assert "weights: fp32, computed in bf16" in run.stderr
    assert "trainable parameters (float32)" in run.stderr
    saved = sorted((tmp_path / "outputs" / "checkpoints" / "test-adaptor").glob("checkpoint-*"))
    assert len(saved) == 1, saved
    step = int(saved[0].name.split("-")[1])
    assert step >= 1 and (saved[0] / "trainer_state.json").is_file() and (saved[0] / "optimizer.pt").is_file()
    assert set(tensor_dtypes(saved[0] / "model.safetensors").values()) == {"F32"}
    [first] = lab_jobs(tmp_path / "tflhome")
    assert read_job(first)["status"] == "RUNNING"

    resumed = run_main(["--config", write_config(tmp_path, {**config, "max_steps": step + 2}), "--json"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming at step {step}" in resumed.stderr
    assert "was left open by a process that died; marked STOPPED" in resumed.stderr
    result = last_json(resumed.stdout)
    assert result["status"] == "COMPLETE" and result["steps"] == step + 2
    closed = read_job(first)
    assert closed["status"] == "STOPPED", closed
    details = closed["job_data"]["completion_details"]
    assert "ended without concluding it" in details and f"checkpoint at step {step}" in details
    published = Path(result["adaptor_path"])
    assert set(tensor_dtypes(published / "model.safetensors").values()) == {"BF16"}
    assert "weights: fp32, computed in bf16" in resumed.stderr
