"""plugin_utils/launch.py and runfolder.py: the launch command and environment, the event file tail, the
relay of rank-0 events to the host, and finding the root cause when a rank dies (info.md, "Stopping, resuming,
failures")."""

from __future__ import annotations

import collections
import json
import os
import sys
import time
from pathlib import Path

import pytest

from plugin_utils import launch, params
from plugin_utils.runfolder import (
    EVENTS_FILE,
    CheckpointSaved,
    Done,
    Event,
    EventReader,
    EventWriter,
    Logged,
    Progress,
    Reporting,
    RunFolder,
    Started,
    Stopped,
)

from .conftest import ROOT, plan_of

CPU_ONE = plan_of()
CPU_TWO = plan_of(num_processes=2)
# GPU plans cannot be built here from a real nvidia-smi: this is what planning gives two Ampere GPUs.
CUDA_TWO = plan_of(device="cuda", gpu_ids=[0, 1], num_processes=2, precision="bf16")


def error_file(run_dir: str, rank: int) -> str:
    return RunFolder(run_dir).error_file(rank)


def option(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


# --- command() -----------------------------------------------------------------------------------------


def launch_of(plan, tmp_path, port: int = 29500) -> tuple[list[str], dict]:
    """The ranks' command for this plan, and the accelerate config it names (empty without one)."""
    from plugin_utils.strategies import write_configs

    configs = write_configs(RunFolder(str(tmp_path)), plan, port)
    cmd = launch.command(str(tmp_path), configs)
    written = json.loads(Path(configs["accelerate"]).read_text()) if "accelerate" in configs else {}
    return cmd, written


def test_one_process_is_a_plain_python_worker(tmp_path):
    cmd, written = launch_of(CPU_ONE, tmp_path)
    assert cmd == [sys.executable, "-m", "plugin_utils.rank", str(tmp_path)]
    assert written == {}


def test_two_processes_go_through_accelerate_launch_with_the_runs_own_config(tmp_path):
    cmd, written = launch_of(CUDA_TWO, tmp_path)
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert option(cmd, "--config_file") == str(tmp_path / "accelerate_config.json")
    assert cmd[-3:] == ["-m", "plugin_utils.rank", str(tmp_path)]
    assert written["distributed_type"] == "MULTI_GPU"
    assert (written["num_processes"], written["num_machines"], written["machine_rank"]) == (2, 1, 0)
    assert written["main_process_port"] == 29500 and written["main_process_ip"] is None
    assert written["mixed_precision"] == "bf16" and written["use_cpu"] is False
    # The plan's GPUs are the ranks' CUDA_VISIBLE_DEVICES already: accelerate must not narrow them again.
    assert written["gpu_ids"] == "all"


def test_two_cpu_processes_also_use_accelerate_launch(tmp_path):
    cmd, written = launch_of(CPU_TWO, tmp_path)
    assert "accelerate.commands.launch" in cmd
    assert written["num_processes"] == 2 and written["use_cpu"] is True and written["mixed_precision"] == "no"


def test_the_launcher_never_reads_a_saved_default_accelerate_config(tmp_path, monkeypatch):
    """accelerate loads ~/.cache/huggingface/accelerate/default_config.yaml unless --config_file names another: a
    saved `gpu_ids: "0"` refused every two-GPU launch, and its other values overrode the plan's. Every launch
    names the run's own file, and that file names every value the launch depends on."""
    from accelerate.commands.config.config_args import ClusterConfig

    for plan in (CPU_TWO, CUDA_TWO, plan_of(num_processes=2, strategy="fsdp")):
        cmd, _ = launch_of(plan, tmp_path)
        assert "--config_file" in cmd
        loaded = ClusterConfig.from_json_file(option(cmd, "--config_file"))  # accelerate's own reader accepts it
        assert loaded.gpu_ids == "all" and loaded.num_processes == plan.world_size


def test_a_lone_deepspeed_rank_gets_the_variables_deepspeed_sets_up_its_group_from(tmp_path):
    """DeepSpeed with one process (every one-GPU machine) starts the rank without a launcher. Without RANK,
    LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT, DeepSpeed's init_distributed runs mpi_discovery, which
    imports mpi4py (not installed): the run crashed before its first step. (DeepSpeed needs CUDA: the plan is a
    fake one-GPU plan, and bench/gpu.py runs deepspeed_zero3 on one GPU for real.)"""
    for strategy in ("deepspeed_zero2", "deepspeed_zero3"):
        plan = plan_of(device="cuda", gpu_ids=[0], precision="bf16", strategy=strategy)
        cmd, _ = launch_of(plan, tmp_path)
        assert cmd[:2] == [sys.executable, "-m"] and "accelerate.commands.launch" not in cmd
        env = launch.rank_env(plan, port=29511)
        assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")} == {
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29511",
        }
    # Without DeepSpeed a lone rank stays undistributed, and launched ranks get their variables from the launcher.
    for plan in (CPU_ONE, plan_of(device="cuda", gpu_ids=[0], precision="bf16"), CUDA_TWO):
        assert "LOCAL_RANK" not in launch.rank_env(plan, port=29511)
    assert "RANK" not in launch.rank_env(
        plan_of(device="cuda", gpu_ids=[0, 1], num_processes=2, strategy="deepspeed_zero3")
    )


def test_a_fixed_free_port_is_kept_and_a_busy_one_replaced_on_one_machine():
    import socket

    free = launch.free_port()
    assert launch.rendezvous_port(plan_of(main_process_port=free)) == free
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        replaced = launch.rendezvous_port(plan_of(main_process_port=taken))
        assert replaced != taken and 0 < replaced < 65536
        # Across machines every node must use the same port, so it is never changed there.
        assert launch.rendezvous_port(plan_of(main_process_port=taken, num_machines=2)) == taken
    assert launch.rendezvous_port(plan_of()) > 0  # 0 picks a free port


def test_multi_node_arguments_pass_through_with_processes_across_all_machines(tmp_path):
    plan = plan_of(
        device="cuda",
        gpu_ids=[0, 1],
        num_processes=2,
        precision="bf16",
        num_machines=2,
        machine_rank=1,
        main_process_ip="10.0.0.1",
        main_process_port=29500,
    )
    _, written = launch_of(plan, tmp_path)
    assert written["num_processes"] == 4  # 2 per node x 2 nodes
    assert (written["num_machines"], written["machine_rank"]) == (2, 1)
    assert (written["main_process_ip"], written["main_process_port"]) == ("10.0.0.1", 29500)


def test_multi_node_with_one_process_per_node_still_uses_accelerate(tmp_path):
    plan = plan_of(
        device="cuda", gpu_ids=[0], precision="bf16", num_machines=3, machine_rank=2, main_process_ip="10.0.0.1"
    )
    cmd, written = launch_of(plan, tmp_path)
    assert "accelerate.commands.launch" in cmd
    assert written["num_processes"] == 3


def test_free_port_is_bindable():
    port = launch.free_port()
    assert 1024 <= port < 65536


# --- rank_env() ----------------------------------------------------------------------------------------


def test_rank_env_puts_the_plugin_dir_first_on_pythonpath(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = launch.rank_env(CPU_ONE)
    assert env["PYTHONPATH"].split(os.pathsep) == [str(ROOT), "/elsewhere"]
    assert str(ROOT) == launch.PLUGIN_DIR


def test_rank_env_without_pythonpath_is_the_plugin_dir(monkeypatch):
    monkeypatch.delenv("PYTHONPATH", raising=False)
    assert launch.rank_env(CPU_ONE)["PYTHONPATH"] == str(ROOT)


def test_rank_env_sets_omp_threads_shared_between_cpu_ranks(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    env = launch.rank_env(CPU_TWO)
    assert env["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))
    assert env["CUDA_VISIBLE_DEVICES"] == ""


def test_rank_env_keeps_a_users_omp_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert launch.rank_env(CPU_TWO)["OMP_NUM_THREADS"] == "3"


def test_rank_env_on_gpus_selects_them_and_leaves_omp_alone(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    env = launch.rank_env(CUDA_TWO)
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert "OMP_NUM_THREADS" not in env


def test_rank_env_pins_pci_bus_order_so_gpu_ids_match_nvidia_smi(monkeypatch):
    # gpu_ids are nvidia-smi indices (PCI bus order); CUDA numbers devices fastest-first unless told.
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    assert launch.rank_env(CUDA_TWO).get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID"


def test_rank_env_replaces_an_inherited_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    plan = plan_of(device="cuda", gpu_ids=[2], precision="bf16")
    assert launch.rank_env(plan)["CUDA_VISIBLE_DEVICES"] == "2"


def test_rank_env_is_unbuffered_and_quiet():
    env = launch.rank_env(CPU_ONE)
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["TOKENIZERS_PARALLELISM"] == "false"


def reporting_of(tmp_path, monkeypatch, **raw) -> Reporting:
    monkeypatch.delenv("TLAB_TRACKIO_AUTO_INIT", raising=False)
    return launch.reporting(params.defaults().replace(adaptor_name="my-adapter", **raw), str(tmp_path / "runs"))


@pytest.mark.parametrize(("key", "mode"), [(None, "offline"), ("secret", None)])
def test_rank_env_runs_wandb_offline_without_a_key(monkeypatch, tmp_path, key, mode):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    if key is None:
        monkeypatch.delenv("WANDB_API_KEY", raising=False)
    else:
        monkeypatch.setenv("WANDB_API_KEY", key)
    wandb = reporting_of(tmp_path, monkeypatch, log_to_wandb=True)
    assert launch.rank_env(CPU_ONE, wandb).get("WANDB_MODE") == mode
    assert launch.rank_env(CPU_ONE, wandb)["SFT_LOG_TO_WANDB"] == "1"  # the rank imports W&B
    assert "WANDB_MODE" not in launch.rank_env(CPU_ONE, reporting_of(tmp_path, monkeypatch, report_to="tensorboard"))
    assert not launch.rank_env(CPU_ONE)["SFT_LOG_TO_WANDB"]


def test_each_tracker_writes_in_the_runs_logs_folder_and_the_log_says_how_to_open_it(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    reporting = reporting_of(tmp_path, monkeypatch, report_to="tensorboard,trackio,wandb")
    logs, run = tmp_path / "runs" / "logs", reporting.run_name
    assert (reporting.reporters, reporting.project) == (("tensorboard", "trackio", "wandb"), "my-adapter")
    env = launch.rank_env(CPU_ONE, reporting)
    assert env["TENSORBOARD_LOGGING_DIR"] == str(logs / "tensorboard" / run)
    assert env["TRACKIO_DIR"] == str(logs / "trackio")
    assert (env["WANDB_DIR"], env["WANDB_PROJECT"], env["WANDB_MODE"]) == (str(logs), "my-adapter", "offline")
    assert launch.reporting_lines(reporting.reporters, reporting, os.environ) == [
        f"report_to tensorboard: {logs}/tensorboard/{run}; open: tensorboard --logdir {logs}/tensorboard",
        f"report_to trackio: {logs}/trackio; open: TRACKIO_DIR={logs}/trackio trackio show --project my-adapter",
        f"report_to wandb: offline, in {logs}/wandb; upload: wandb sync {logs}/wandb/offline-run-*",
    ]


def test_under_the_hosts_trackio_run_the_ranks_log_no_second_copy(monkeypatch, tmp_path):
    """The parent already logs every row to the job's Trackio run (TLAB_TRACKIO_AUTO_INIT, tests/test_trackio.py):
    the ranks' trainer reports to the rest, and the host's TRACKIO_DIR is left as it is."""
    p = params.defaults().replace(adaptor_name="a", report_to="trackio,tensorboard")
    monkeypatch.setenv("TLAB_TRACKIO_AUTO_INIT", "true")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "hosts-trackio"))
    reporting = launch.reporting(p, str(tmp_path))
    assert reporting.reporters == ("tensorboard",)
    assert launch.rank_env(CPU_ONE, reporting)["TRACKIO_DIR"] == str(tmp_path / "hosts-trackio")
    [trackio, tensorboard] = launch.reporting_lines(p.reporters, reporting, os.environ)
    assert trackio == "report_to trackio: the job's own Trackio run has the rows; the ranks log no second copy"
    assert tensorboard.startswith("report_to tensorboard: ")


# --- EventReader -----------------------------------------------------------------------------------------


def test_event_reader_before_the_file_exists_reads_nothing(tmp_path):
    assert EventReader(str(tmp_path / EVENTS_FILE)).read() == []


def test_event_reader_returns_only_whole_lines(tmp_path):
    path = tmp_path / EVENTS_FILE
    reader = EventReader(str(path))
    first, second = Progress(step=1, max_steps=4).to_json(), Progress(step=2, max_steps=4).to_json()
    path.write_bytes((first + "\n" + second[:10]).encode())
    assert [e.step for e in reader.read()] == [1]
    assert reader.read() == []
    with open(path, "ab") as handle:
        handle.write((second[10:] + "\n").encode())
    assert [e.step for e in reader.read()] == [2]
    assert reader.read() == []


def test_events_are_typed_and_refuse_another_version_or_unknown_fields(tmp_path):
    """The same discipline as the run spec: parent and ranks of different versions fail loudly, never misread."""
    event = Done(
        step=4,
        max_steps=4,
        world_size=2,
        final_loss=1.0,
        eval_loss=None,
        runtime=3.5,
        has_adapter=True,
        peak_gpu_memory_mib=None,
        loss_history=({"step": 2, "loss": 1.5},),
    )
    assert Event.from_json(event.to_json()) == event
    line = json.loads(event.to_json())
    for changed in ({**line, "version": 0}, {**line, "train_loss": 1.1}, {**line, "type": "finished"}):
        with pytest.raises(ValueError):
            Event.from_json(json.dumps(changed))


def test_event_writer_lines_are_read_back_in_order(tmp_path):
    path = str(tmp_path / EVENTS_FILE)
    writer = EventWriter(path)
    reader = EventReader(path)
    writer.emit(started())
    writer.emit(Progress(step=1, max_steps=4))
    events = reader.read()
    writer.close()
    assert [type(e) for e in events] == [Started, Progress]
    assert events[0].world_size == 2
    assert all(isinstance(e.at, float) for e in events)


def test_error_file_is_per_rank(tmp_path):
    assert error_file(str(tmp_path), 3) == os.path.join(str(tmp_path), "error-rank3.txt")


# --- Watcher ---------------------------------------------------------------------------------------------


class RecordingHost:
    """A fake host: records what the watcher relays (the relay logic alone is under test here)."""

    def __init__(self):
        self.logs: list[str] = []
        self.rows: list[tuple[int, dict | None, int | None]] = []
        self.calls: list[str] = []  # "log" or "progress", in order
        self.stop_asked = 0

    def log(self, *messages):
        self.calls.append("log")
        self.logs.extend(messages)

    def progress(self, rows):
        self.calls.append("progress")
        self.rows.extend((row.percent, row.metrics or None, row.step) for row in rows)

    def should_stop(self):
        self.stop_asked += 1
        return False


def relay(watcher, event) -> None:
    """One event, relayed at once (as if each came in a pump of its own)."""
    watcher.handle(event)
    watcher.flush()


@pytest.fixture
def watcher(tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "RELAY_INTERVAL", 0.0)
    return launch.Watcher(RecordingHost(), RunFolder(str(tmp_path)))


def started(max_steps=10, global_step=0, at=None, trainable=1234567, checkpointing=True) -> Started:
    return Started(
        at=time.time() - 10 if at is None else at,
        world_size=2,
        max_steps=max_steps,
        global_step=global_step,
        marks={},
        trainable_parameters=trainable,
        trainable_dtypes=("float32",),
        checkpointing=checkpointing,
    )


def logged(step, max_steps=10, **metrics) -> Logged:
    return Logged(step=step, max_steps=max_steps, metrics=metrics)


def progress(step, max_steps=10) -> Progress:
    return Progress(step=step, max_steps=max_steps)


def done(step=10, final_loss=0.4) -> Done:
    return Done(
        step=step,
        max_steps=10,
        world_size=2,
        final_loss=final_loss,
        eval_loss=None,
        runtime=1.0,
        has_adapter=True,
        peak_gpu_memory_mib=None,
        loss_history=(),
    )


def test_watcher_logs_the_start(watcher):
    relay(watcher, started())
    assert watcher.host.logs == [
        "training started: 2 process(es), 10 steps; 1,234,567 trainable parameters (float32), "
        "activation checkpointing on"
    ]
    relay(watcher, started(global_step=4, checkpointing=False))
    assert watcher.host.logs[-1].startswith("training started: 2 process(es), 10 steps, resuming at step 4; ")
    assert watcher.host.logs[-1].endswith("activation checkpointing off")


def test_watcher_relays_log_events_with_loss_as_progress_rows(watcher):
    relay(watcher, started())
    relay(watcher, logged(5, loss=1.25, learning_rate=2e-4, epoch=0.5, num_tokens=1000.0, grad_norm=0.3))
    [(percent, row, step)] = watcher.host.rows
    assert percent == 50
    assert step == 5
    assert row["loss"] == 1.25
    assert row["learning_rate"] == 2e-4
    assert row["epoch"] == 0.5
    assert row["grad_norm"] == 0.3
    assert "num_tokens" not in row
    # 10 s for 5 steps, 5 steps to go.
    assert row["eta_seconds"] == pytest.approx(10.0, abs=1.0)
    assert watcher.host.logs[-1].startswith("step 5/10: loss=1.25, learning_rate=0.0002, epoch=0.5")


def test_watcher_relays_eval_loss_rows(watcher):
    relay(watcher, logged(4, eval_loss=0.9))
    [(percent, row, step)] = watcher.host.rows
    assert (percent, step) == (40, 4)
    assert row["eval_loss"] == 0.9


def test_watcher_skips_the_closing_summary_row_without_loss(watcher):
    relay(watcher, logged(10, train_runtime=12.5, train_loss=1.1, train_samples_per_second=3.0))
    assert watcher.host.rows == []
    assert watcher.host.logs == []


def test_watcher_keeps_percent_monotonic_and_below_100(watcher):
    relay(watcher, logged(6, loss=1.0))
    relay(watcher, progress(3))  # an older step arriving late
    relay(watcher, progress(10))
    relay(watcher, logged(10, loss=0.5))
    percents = [percent for percent, _, _ in watcher.host.rows]
    assert percents == [60, 60, 99, 99]
    assert percents == sorted(percents)
    assert max(percents) < 100


def test_watcher_progress_without_max_steps_stays_put(watcher):
    relay(watcher, progress(3, max_steps=0))
    assert watcher.host.rows == [(0, None, 3)]


def test_watcher_throttles_progress_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "RELAY_INTERVAL", 3600.0)
    w = launch.Watcher(RecordingHost(), RunFolder(str(tmp_path)))
    relay(w, logged(1, loss=2.0))
    relay(w, progress(2))
    relay(w, progress(3))
    assert [step for _, _, step in w.host.rows] == [1]
    assert w.percent == 30


def test_watcher_records_done_and_stopped_events(watcher):
    finished = done()
    relay(watcher, finished)
    assert watcher.end == finished
    stopped = Stopped(step=3)
    relay(watcher, stopped)
    assert watcher.end == stopped


def test_watcher_notes_when_the_first_step_arrived(watcher):
    relay(watcher, started())
    assert watcher.first_step_at is None
    first = progress(1)
    relay(watcher, first)
    relay(watcher, progress(2))
    assert watcher.first_step_at == first.at


def test_watcher_pump_reads_the_event_file(watcher, tmp_path):
    writer = EventWriter(str(tmp_path / EVENTS_FILE))
    writer.emit(started(max_steps=4))
    writer.emit(logged(2, max_steps=4, loss=1.5))
    watcher.pump()
    writer.emit(done(step=4, final_loss=1.0))
    writer.close()
    watcher.pump()
    assert [(percent, step) for percent, _, step in watcher.host.rows] == [(50, 2)]
    assert watcher.end.final_loss == 1.0


def test_watcher_relays_a_pumps_rows_and_lines_in_one_call_each_and_in_order(watcher, tmp_path):
    """Each write to a job costs the parent CPU that the ranks would otherwise have (measured: 8 ms a row through
    the lab SDK): the rows of one pump go out in one progress call and their lines in one log call. A start or a
    checkpoint first sends what came before it, so the job's log keeps the ranks' order."""
    writer = EventWriter(str(tmp_path / EVENTS_FILE))
    writer.emit(started(max_steps=4))
    for step in (1, 2, 3):
        writer.emit(logged(step, max_steps=4, loss=2.0 / step))
    writer.emit(CheckpointSaved(step=3, path="/ckpt/checkpoint-3"))
    writer.emit(logged(4, max_steps=4, loss=0.4))
    writer.close()
    watcher.pump()
    assert watcher.host.calls == ["log", "progress", "log", "log", "progress", "log"]
    assert [(percent, step) for percent, _, step in watcher.host.rows] == [(25, 1), (50, 2), (75, 3), (99, 4)]
    assert [row["loss"] for _, row, _ in watcher.host.rows] == [2.0, 1.0, pytest.approx(2.0 / 3), 0.4]
    assert [line.split(":")[0] for line in watcher.host.logs] == [
        "training started",
        "step 1/4",
        "step 2/4",
        "step 3/4",
        "checkpoint saved",
        "step 4/4",
    ]


def test_stop_flag_forces_on_a_second_request():
    stop = launch.StopFlag()
    assert not stop.requested
    stop.request()
    assert stop.requested and not stop.forced
    stop.request()
    assert stop.forced


# --- _rank_failure ------------------------------------------------------------------------------------------

ROOT_CAUSE = "RuntimeError: expected scalar type Float"
SECONDARY = "DistBackendError: Connection closed by peer; remote worker died"


def write_report(run_dir, rank: int, summary: str, mtime_ns: int) -> None:
    path = error_file(str(run_dir), rank)
    with open(path, "w") as handle:
        handle.write(
            f'{summary}\n\nTraceback (most recent call last):\n  File "/x/train.py", line 7, in step\n'
            f"    loss = model(batch)\n{summary}\n"
        )
    os.utime(path, ns=(mtime_ns, mtime_ns))


def first_line(message: str) -> str:
    return message.split("\n", 1)[0]


def test_rank_failure_ends_with_the_innermost_frames_of_the_ranks_traceback(tmp_path):
    write_report(tmp_path, 1, ROOT_CAUSE, time.time_ns())
    assert launch._rank_failure(RunFolder(str(tmp_path)), collections.deque(), 1) == (
        f"rank 1 failed: {ROOT_CAUSE}\nwhere it failed:\nTraceback (most recent call last):\n"
        '  File "/x/train.py", line 7, in step\n    loss = model(batch)'
    )


def test_rank_failure_prefers_the_root_cause_over_an_older_secondary_report(tmp_path):
    now = time.time_ns()
    write_report(tmp_path, 0, SECONDARY, now - 5_000_000_000)
    write_report(tmp_path, 1, ROOT_CAUSE, now)
    assert (
        first_line(launch._rank_failure(RunFolder(str(tmp_path)), collections.deque(), 1))
        == f"rank 1 failed: {ROOT_CAUSE}"
    )


def test_rank_failure_prefers_the_root_cause_over_a_newer_secondary_report(tmp_path):
    now = time.time_ns()
    write_report(tmp_path, 1, ROOT_CAUSE, now - 5_000_000_000)
    write_report(tmp_path, 0, SECONDARY, now)
    assert (
        first_line(launch._rank_failure(RunFolder(str(tmp_path)), collections.deque(), 1))
        == f"rank 1 failed: {ROOT_CAUSE}"
    )


def test_rank_failure_picks_the_earliest_of_several_root_causes(tmp_path):
    now = time.time_ns()
    write_report(tmp_path, 0, "ValueError: second", now)
    write_report(tmp_path, 1, "ValueError: first", now - 1_000_000_000)
    assert (
        first_line(launch._rank_failure(RunFolder(str(tmp_path)), collections.deque(), 1))
        == "rank 1 failed: ValueError: first"
    )


def test_rank_failure_reports_a_secondary_failure_when_it_is_all_there_is(tmp_path):
    write_report(tmp_path, 2, SECONDARY, time.time_ns())
    assert (
        first_line(launch._rank_failure(RunFolder(str(tmp_path)), collections.deque(), 1))
        == f"rank 2 failed: {SECONDARY}"
    )


def test_rank_failure_falls_back_to_the_output_tail(tmp_path):
    tail = collections.deque([f"line {i}" for i in range(30)] + ["", "Killed"], maxlen=200)
    message = launch._rank_failure(RunFolder(str(tmp_path)), tail, -9)
    assert message.startswith("a training process exited with code -9; last output:\n")
    shown = message.split("last output:\n", 1)[1].splitlines()
    assert len(shown) == 15
    assert shown[-1] == "Killed"
    assert shown[0] == "line 16"


def test_rank_failure_without_reports_or_output_gives_the_exit_code(tmp_path):
    assert (
        launch._rank_failure(RunFolder(str(tmp_path)), collections.deque(), 1)
        == "a training process exited with code 1"
    )


def test_cuda_out_of_memory_is_explained_with_the_parameters_to_lower(tmp_path):
    write_report(tmp_path, 1, "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", time.time_ns())
    message = launch._rank_failure(RunFolder(str(tmp_path)), collections.deque(), 1)
    assert message.startswith("The GPU ran out of memory: lower batch_size")
    assert "rank 1 failed: torch.OutOfMemoryError" in message


def test_a_rank_killed_by_a_signal_is_named_from_the_launcher_summary(tmp_path):
    tail = collections.deque(
        [
            "Root Cause (first observed failure):",
            "[0]:",
            "  time      : 2026-11-28_03:00:00",
            "  host      : localhost",
            "  rank      : 1 (local_rank: 1)",
            "  exitcode  : -9 (pid: 4242)",
            "  error_file: <N/A>",
            "  traceback : Signal 9 (SIGKILL) received by PID 4242",
        ]
    )
    write_report(tmp_path, 0, "RuntimeError: Connection closed by peer ... remote worker", time.time_ns())
    assert launch._rank_failure(RunFolder(str(tmp_path)), tail, 1) == "rank 1 was killed (Signal 9 (SIGKILL))"


# --- Tail: the ranks' log files, followed ------------------------------------------------------------------


def test_the_tail_echoes_the_launcher_and_rank_0_keeps_every_rank_and_waits_for_whole_lines(tmp_path, capsys):
    folder = RunFolder(str(tmp_path))
    os.makedirs(folder.logs_dir)
    Path(folder.launcher_log).write_text("launcher says\n")
    Path(folder.rank_log(0)).write_text("rank zero line\nhalf a li")
    Path(folder.rank_log(1)).write_text("FutureWarning: repeated by every rank\n")
    tail = launch.Tail(folder)
    tail.read()
    assert capsys.readouterr().err == "launcher says\nrank zero line\n"
    with open(folder.rank_log(0), "a") as handle:
        handle.write("ne\nunfinished")
    tail.read()
    assert capsys.readouterr().err == "half a line\n"
    tail.read(final=True)  # the ranks are gone: what is left is a last line without its newline
    assert capsys.readouterr().err == "unfinished\n"
    assert list(tail.lines) == [
        "launcher says",
        "rank zero line",
        "[rank 1] FutureWarning: repeated by every rank",
        "half a line",
        "unfinished",
    ]


def test_the_tail_keeps_reading_after_our_stderr_is_gone(tmp_path, monkeypatch):
    # A closed terminal or log reader: the tail goes on keeping lines for the failure message, silently.
    import io

    folder = RunFolder(str(tmp_path))
    os.makedirs(folder.logs_dir)
    Path(folder.rank_log(0)).write_text("".join(f"line {i}\n" for i in range(1000)))
    gone = io.StringIO()
    gone.close()
    monkeypatch.setattr(sys, "stderr", gone)
    tail = launch.Tail(folder)
    tail.read()
    assert list(tail.lines)[-1] == "line 999"


def test_a_rank_imports_its_libraries_with_the_collector_off_and_without_wandb_unless_it_logs_there(monkeypatch):
    """The collector is off only while the libraries import (a tenth of their CPU time), on again afterwards even
    when an import fails, and what the imports made is frozen out of later collections. W&B, which transformers
    and TRL import wherever it is installed, is absent from a rank that does not log to it."""
    import gc
    import importlib.util

    from plugin_utils import rank, worker

    seen = []
    monkeypatch.setattr(worker, "import_libraries", lambda: seen.append(gc.isenabled()))
    # Set, then removed: monkeypatch records sys.modules' own entry (none, or the module) and puts it back at the
    # end, whatever the test did. A delitem alone records nothing when W&B was never imported, and the None the
    # rank leaves would make every later test of this worker find W&B not installed.
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.delitem(sys.modules, "wandb")
    gc.unfreeze()
    try:
        assert rank.import_libraries(logs_to_wandb=True) is worker
        assert "wandb" not in sys.modules
        assert rank.import_libraries(logs_to_wandb=False) is worker
        assert seen == [False, False] and gc.isenabled() and gc.get_freeze_count() > 0
        assert importlib.util.find_spec("wandb") is None, "every 'is it installed' check answers no"
        with pytest.raises(ImportError):
            import wandb  # noqa: F401

        def failing() -> None:
            raise ImportError("no module named trl")

        monkeypatch.setattr(worker, "import_libraries", failing)
        with pytest.raises(ImportError):
            rank.import_libraries(logs_to_wandb=False)
        assert gc.isenabled()
    finally:
        gc.unfreeze()
        gc.enable()


KILLS_ITS_CHILDREN = """
import signal, subprocess, sys
import multiprocess
from plugin_utils import launch
from plugin_utils.errors import StopRequested

stop = launch.StopFlag()
stop.guard_forks()
ignoring = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
)
child = subprocess.Popen([sys.executable, "-c", ignoring], stdout=subprocess.PIPE, text=True)
child.stdout.readline()
pool = multiprocess.Pool(2)
pool.map(abs, [1, 2])  # the workers wait for tasks: one of them holds the task queue's lock while it reads
try:
    stop.on_signal(signal.SIGTERM)
except StopRequested:
    print("stopped", child.wait(timeout=10), flush=True)
pool.terminate()  # datasets' map does this on the way out: it takes the task queue's lock
print("pool ended", flush=True)
"""


def test_a_stop_while_the_data_is_prepared_ends_every_child_and_the_pool_can_still_end():
    """Seen once in eight fresh-clone suites: main.py stopped during the parallel preparation never exited. Two
    stacks, two causes. (1) In multiprocess's Pool.__init__, joining a worker forked just as the stop came: it
    never got the group's signal and, stuck on a lock the fork copied held, never ran the handler that would end
    it on the pool's SIGTERM. (2) In Pool.terminate, taking the task queue's lock, which an idle worker holds
    while it waits to read and which a worker killed by the group's signal never gives back. A stop before the
    ranks start now kills every child and gives back the locks only workers take, before it unwinds main.py. Run
    in its own process: the stop kills every child of the process it is in."""
    import subprocess

    script = [sys.executable, "-c", KILLS_ITS_CHILDREN]
    done = subprocess.run(script, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["stopped", str(-9), "pool", "ended"], done.stdout + done.stderr
