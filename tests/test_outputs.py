"""plugin_utils/outputs.py: the adapter moved into place atomically with its summary, checkpoints found
for resuming, the loss plot, and the versions recorded (info.md, "Stopping, resuming, failures")."""

from __future__ import annotations

import json
import os
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest

from plugin_utils import checkpoints, outputs
from plugin_utils.launch import RunResult
from plugin_utils.runfolder import IDENTITY_FILE

from .conftest import ROOT, params_of, plan_of, stats_of


def stage(final) -> str:
    """A staged adapter as the worker leaves it: weights and tokenizer under the temporary name."""
    staging = outputs.staging_path(str(final))
    os.makedirs(staging)
    with open(os.path.join(staging, "adapter_model.safetensors"), "wb") as handle:
        handle.write(b"new weights")
    with open(os.path.join(staging, "tokenizer.json"), "w") as handle:
        handle.write("{}")
    return staging


def leftovers(folder) -> list[str]:
    return sorted(name for name in os.listdir(folder) if ".old-" in name or ".partial-" in name)


IDENTITY = outputs.identity(params_of(), 1, "k")


def where(adapter, checkpoints) -> outputs.Where:
    return outputs.Where(str(adapter), str(checkpoints), os.path.join(os.path.dirname(str(checkpoints)), "runs"))


def resume_point(adapter: str, checkpoints: str, identity: dict, *, overwrite: bool) -> str | None:
    """What a run resumes from, with the checkpoint folder made ready for it (as main.py does at launch)."""
    return outputs.prepare_checkpoints(outputs.inspect(where(adapter, checkpoints), identity, overwrite=overwrite))


def record(checkpoint: str, identity: dict) -> None:
    """The identity the first rank writes into each checkpoint it saves."""
    Path(checkpoint, IDENTITY_FILE).write_text(json.dumps(identity))


def make_checkpoint(folder, step: int, complete: bool = True) -> str:
    path = os.path.join(str(folder), f"checkpoint-{step}")
    os.makedirs(path)
    if complete:
        with open(os.path.join(path, "trainer_state.json"), "w") as handle:
            json.dump({"global_step": step}, handle)
    return path


def test_staging_path_sits_next_to_the_final_folder(tmp_path):
    final = str(tmp_path / "my-adaptor")
    staging = outputs.staging_path(final)
    assert os.path.dirname(staging) == str(tmp_path)
    assert os.path.basename(staging) == f"my-adaptor.partial-{os.getpid()}"
    assert outputs.staging_path(final + os.sep) == staging


def test_publish_moves_staging_into_place_with_the_summary(tmp_path):
    final = tmp_path / "adapters" / "my-adaptor"
    os.makedirs(final.parent)
    staging = stage(final)
    result = outputs.publish(staging, str(final), {"steps": 6, "final_loss": 1.5})
    assert result == os.path.abspath(final)
    assert not os.path.exists(staging)
    assert (final / "adapter_model.safetensors").read_bytes() == b"new weights"
    assert json.loads((final / outputs.SUMMARY_FILE).read_text()) == {"steps": 6, "final_loss": 1.5}
    assert outputs.is_complete_adapter(str(final))
    assert leftovers(final.parent) == []


def test_publish_creates_missing_parent_folders(tmp_path):
    staging_root = tmp_path / "staged"
    staging_root.mkdir()
    staging = stage(staging_root / "x")
    final = tmp_path / "deep" / "er" / "x"
    outputs.publish(staging, str(final), {})
    assert outputs.is_complete_adapter(str(final))


def test_publish_replaces_an_existing_adapter_without_leftovers(tmp_path):
    final = tmp_path / "my-adaptor"
    final.mkdir()
    (final / "adapter_model.safetensors").write_bytes(b"old weights")
    (final / "stale.txt").write_text("from the previous run")
    (final / outputs.SUMMARY_FILE).write_text('{"steps": 1}')
    staging = stage(final)
    outputs.publish(staging, str(final), {"steps": 2})
    assert (final / "adapter_model.safetensors").read_bytes() == b"new weights"
    assert not (final / "stale.txt").exists()
    assert json.loads((final / outputs.SUMMARY_FILE).read_text()) == {"steps": 2}
    assert leftovers(tmp_path) == []
    assert [name for name in os.listdir(tmp_path) if name.startswith("my-adaptor")] == ["my-adaptor"]


def test_publish_replaces_an_empty_pre_created_folder(tmp_path):
    final = tmp_path / "my-adaptor"
    final.mkdir()
    staging = stage(final)
    outputs.publish(staging, str(final), {"steps": 3})
    assert (final / "adapter_model.safetensors").exists()
    assert outputs.is_complete_adapter(str(final))
    assert leftovers(tmp_path) == []


def test_publish_writes_values_json_cannot_hold_as_text(tmp_path):
    final = tmp_path / "my-adaptor"
    staging = stage(final)
    outputs.publish(staging, str(final), {"path": tmp_path})
    assert json.loads((final / outputs.SUMMARY_FILE).read_text()) == {"path": str(tmp_path)}


def test_an_adapter_without_a_summary_is_not_complete(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "adapter_model.safetensors").write_bytes(b"")
    assert not outputs.is_complete_adapter(str(tmp_path / "half"))
    assert not outputs.is_complete_adapter(str(tmp_path / "missing"))


# --- checkpoints ---------------------------------------------------------------------------------------------


def test_latest_checkpoint_of_a_missing_folder_is_none(tmp_path):
    assert checkpoints.latest(str(tmp_path / "nothing")) is None


def test_latest_checkpoint_picks_the_highest_complete_step(tmp_path):
    make_checkpoint(tmp_path, 2)
    best = make_checkpoint(tmp_path, 10)  # sorts before checkpoint-2 as text
    make_checkpoint(tmp_path, 9)
    assert checkpoints.latest(str(tmp_path)) == best


def test_latest_checkpoint_ignores_checkpoints_without_trainer_state(tmp_path):
    done = make_checkpoint(tmp_path, 3)
    make_checkpoint(tmp_path, 6, complete=False)  # interrupted while saving
    (tmp_path / "checkpoint-final").mkdir()
    (tmp_path / "checkpoint-final" / "trainer_state.json").write_text("{}")
    (tmp_path / "runs").mkdir()
    (tmp_path / "loss_plot.json").write_text("{}")
    assert checkpoints.latest(str(tmp_path)) == done


def test_latest_checkpoint_with_only_incomplete_checkpoints_is_none(tmp_path):
    make_checkpoint(tmp_path, 4, complete=False)
    assert checkpoints.latest(str(tmp_path)) is None


def test_resume_point_clears_checkpoints_when_overwriting_a_complete_adapter(tmp_path):
    adapter = tmp_path / "my-adaptor"
    stage_dir = stage(adapter)
    outputs.publish(stage_dir, str(adapter), {})
    checkpoints = tmp_path / "checkpoints" / "my-adaptor"
    make_checkpoint(checkpoints, 5)
    assert resume_point(str(adapter), str(checkpoints), IDENTITY, overwrite=True) is None
    assert not (checkpoints / "checkpoint-5").exists()


def test_resume_point_returns_the_latest_checkpoint_of_an_interrupted_run(tmp_path):
    checkpoints = tmp_path / "checkpoints" / "my-adaptor"
    make_checkpoint(checkpoints, 5)
    latest = make_checkpoint(checkpoints, 10)
    adapter = str(tmp_path / "my-adaptor")
    assert resume_point(adapter, str(checkpoints), IDENTITY, overwrite=False) == latest
    # overwrite only discards work that a finished adapter already holds
    assert resume_point(adapter, str(checkpoints), IDENTITY, overwrite=True) == latest
    assert os.path.isdir(latest)


def test_a_finished_adapter_is_never_resumed(tmp_path):
    # Without overwrite_output validation refuses the run (finished_adapter_kept); nothing is resumed either way.
    adapter = tmp_path / "my-adaptor"
    outputs.publish(stage(adapter), str(adapter), {})
    checkpoints = tmp_path / "checkpoints" / "my-adaptor"
    make_checkpoint(checkpoints, 7)
    out = outputs.inspect(where(adapter, checkpoints), IDENTITY, overwrite=False)
    assert out.adapter_complete and out.resume_from is None


def test_resume_point_without_checkpoints_is_none(tmp_path):
    assert resume_point(str(tmp_path / "a"), str(tmp_path / "c"), IDENTITY, overwrite=False) is None


# --- plot, versions, summary ---------------------------------------------------------------------------------


def test_write_plot_writes_a_plotly_figure_of_the_loss(tmp_path):
    path = str(tmp_path / "loss_plot.json")
    history = [{"step": 2, "loss": 2.0}, {"step": 4, "loss": 1.5}, {"step": 6, "loss": 1.2}]
    assert outputs.write_plot(path, history) == path
    figure = json.loads((tmp_path / "loss_plot.json").read_text())
    [trace] = figure["data"]
    assert trace["x"] == [2, 4, 6]
    assert trace["y"] == [2.0, 1.5, 1.2]
    assert trace["type"] == "scatter"
    assert trace["mode"] == "lines"
    assert figure["layout"]["xaxis"]["title"] == "step"
    assert figure["layout"]["yaxis"]["title"] == "loss"


def test_write_plot_without_history_writes_nothing(tmp_path):
    assert outputs.write_plot(str(tmp_path / "loss_plot.json"), []) is None
    assert not (tmp_path / "loss_plot.json").exists()


def test_versions_include_trl_and_the_plugin():
    found = outputs.versions()
    assert found["trl"] == metadata.version("trl")
    assert found["transformers"] == metadata.version("transformers")
    assert found["plugin"] == json.loads((ROOT / "index.json").read_text())["version"]


def test_summary_records_parameters_world_size_steps_loss_runtime_and_versions():
    p = params_of(adaptor_name="my-adaptor", learning_rate="2e-4", packing="on")
    plan = plan_of(num_processes=2)
    result = RunResult(steps=6, max_steps=6, world_size=2, final_loss=1.25, eval_loss=None, runtime=12.345)
    found = outputs.summary(p, plan, result, stats_of(rows=190))
    assert found["parameters"] == p.as_dict()
    assert found["parameters"]["learning_rate"] == 2e-4 and found["parameters"]["packing"] == "true"
    assert found["plan"] == plan.as_dict()
    assert (found["world_size"], found["steps"], found["max_steps"]) == (2, 6, 6)
    assert found["final_loss"] == 1.25
    assert found["runtime_seconds"] == 12.35
    assert found["dataset"]["rows"] == 190 and found["dataset"] == stats_of(rows=190).as_dict()
    assert "trl" in found["versions"]
    json.dumps(found)


def test_a_changed_checkpoint_is_replaced_only_under_overwrite_output(tmp_path):
    checkpoints = tmp_path / "c"
    record(make_checkpoint(checkpoints, 4), IDENTITY)
    changed = {**IDENTITY, "asked": {**IDENTITY["asked"], "lora_r": 8}}
    out = outputs.inspect(where(tmp_path / "a", checkpoints), changed, overwrite=False)
    assert out.resume_from is not None and out.changed() == ["lora_r"]  # validation refuses it
    # overwrite_output starts afresh instead: the checkpoints go (the lock lives in the run's own folder)
    assert resume_point(str(tmp_path / "a"), str(checkpoints), changed, overwrite=True) is None
    assert not (checkpoints / "checkpoint-4").exists() and checkpoints.is_dir()


def test_a_checkpoint_missing_a_ranks_rng_state_is_incomplete(tmp_path):
    older = make_checkpoint(tmp_path, 2)
    for rank in (0, 1):
        open(os.path.join(older, f"rng_state_{rank}.pth"), "w").close()
    newer = make_checkpoint(tmp_path, 4)
    open(os.path.join(newer, "rng_state_0.pth"), "w").close()  # rank 1 never finished saving
    assert checkpoints.latest(str(tmp_path), world_size=2) == older
    identity = {**IDENTITY, "world_size": 2}
    record(older, identity)
    assert resume_point(str(tmp_path / "a"), str(tmp_path), identity, overwrite=False) == older
    assert not os.path.exists(newer), "a checkpoint cut off mid-save is removed before resuming"


def test_a_second_run_on_the_same_output_is_refused_while_the_first_holds_the_lock(tmp_path):
    import subprocess

    from plugin_utils.errors import InvalidConfig

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; sys.path.insert(0, sys.argv[1]);"
            "from plugin_utils.outputs import RunLock; lock = RunLock(sys.argv[2]).__enter__();"
            "print('held', flush=True);"
            "time.sleep(30)",
            str(ROOT),
            str(tmp_path / "lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with (
            pytest.raises(InvalidConfig, match=r"adaptor_name: another run \(pid \d+\) is writing"),
            outputs.RunLock(str(tmp_path / "lock")),
        ):
            pass
    finally:
        holder.kill()
        holder.wait()
    with outputs.RunLock(str(tmp_path / "lock")):  # released with the process that held it
        pass


def test_a_run_that_ends_before_training_removes_its_lock_and_a_run_that_opened_it_meanwhile_locks_anew(
    tmp_path, monkeypatch
):
    """The ranks start holding the run lock, before the data is read; a run refused by its data then removes the
    lock file and the folders made for it (while still holding it). A run that opened the file just before
    locks the file then at the path, never the removed one, which no later run would see."""
    import fcntl

    from plugin_utils.errors import InvalidConfig

    path = tmp_path / "outputs" / "runs" / "adaptor" / "lock"
    first = outputs.RunLock(str(path)).__enter__()
    with pytest.raises(InvalidConfig), outputs.RunLock(str(path)):
        pass
    first.discard()
    first.__exit__(None, None, None)
    assert not (tmp_path / "outputs").exists()

    path.parent.mkdir(parents=True)
    path.write_text("")
    real_flock, calls = fcntl.flock, []

    def flock_after_a_removal(handle, operation):
        if not calls:  # another run removes the file between this run's open and its lock
            os.unlink(path)
        calls.append(operation)
        return real_flock(handle, operation)

    monkeypatch.setattr(fcntl, "flock", flock_after_a_removal)
    with outputs.RunLock(str(path)) as lock:
        assert len(calls) == 2 and path.exists()
        assert os.path.samestat(os.stat(path), os.fstat(lock.fileno()))
        monkeypatch.setattr(fcntl, "flock", real_flock)
        assert outputs.RunLock.holder(str(path)) == f"pid {os.getpid()}"


def test_a_write_failure_while_publishing_is_a_clear_failure_and_registers_nothing(tmp_path, monkeypatch):
    from plugin_utils.errors import RunFailed

    registered = []

    class Job:
        def register_model(self, path, p):
            registered.append(path)
            return path

        register_merged = register_model

    staged = outputs.Staged(str(tmp_path / "a"), str(tmp_path / "a-merged"))
    os.makedirs(staged.adapter_staging)
    os.makedirs(staged.merged_staging)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "a-merged"))

    real_replace = os.replace
    monkeypatch.setattr(outputs.os, "replace", lambda a, b: full_disk() if "merged" in b else real_replace(a, b))
    with staged, pytest.raises(RunFailed, match="No space left on device"):
        staged.publish(Job(), {}, {})
    assert registered == []
    assert not os.path.exists(staged.merged_staging) and not os.path.exists(staged.adapter_staging)


def test_the_score_has_the_keys_transformerlab_sweeps_rank_by():
    trained = RunResult(final_loss=1.5, eval_loss=None)
    assert outputs.score(trained) == {"loss": 1.5, "train/loss": 1.5}
    evaluated = RunResult(final_loss=1.5, eval_loss=1.25)
    assert outputs.score(evaluated) == {"loss": 1.25, "train/loss": 1.5, "eval/loss": 1.25}


# --- the checkpoints folder: complete checkpoint-N folders only --------------------------------------------


def staged_save(saving, step: int, ranks: int = 1) -> str:
    """A save as the ranks leave it in the staging folder: weights, RNG states, trainer_state.json last."""
    path = os.path.join(str(saving), f"checkpoint-{step}")
    os.makedirs(path)
    Path(path, "adapter_model.safetensors").write_bytes(b"weights")
    for rank in range(ranks):
        Path(path, f"rng_state_{rank}.pth" if ranks > 1 else "rng_state.pth").write_bytes(b"rng")
    Path(path, "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def test_a_published_save_is_renamed_in_whole_with_its_identity_and_older_ones_rotate(tmp_path):
    from plugin_utils import checkpoints

    identity = tmp_path / "run_params.json"
    identity.write_text(json.dumps(IDENTITY))
    folder = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        final = checkpoints.publish(staged_save(tmp_path / "saving", step), str(folder), str(identity))
        assert final == str(folder / f"checkpoint-{step}")
        checkpoints.rotate(str(folder), keep=2)
    assert sorted(os.listdir(folder)) == ["checkpoint-4", "checkpoint-6"]
    assert not os.listdir(tmp_path / "saving"), "the staging folder is emptied by each rename"
    assert outputs.recorded_identity(str(folder / "checkpoint-6")) == IDENTITY


def test_a_save_cut_off_in_staging_never_reaches_the_checkpoints_folder_and_is_cleared(tmp_path):
    # SIGKILL mid-save (a task host's Stop, 3 s after SIGTERM) leaves the half-written save in staging only.
    where = outputs.Where(str(tmp_path / "a"), str(tmp_path / "checkpoints"), str(tmp_path / "runs"))
    from plugin_utils import checkpoints

    checkpoints.publish(staged_save(where.saving_dir, 2), where.checkpoint_dir, None)
    cut = os.path.join(where.saving_dir, "checkpoint-4")
    os.makedirs(cut)
    Path(cut, "adapter_model.safetensors").write_bytes(b"half")
    out = outputs.inspect(where, IDENTITY, overwrite=False)
    assert out.resume_from == os.path.join(where.checkpoint_dir, "checkpoint-2")
    assert outputs.prepare_checkpoints(out) == out.resume_from
    assert not os.path.exists(where.saving_dir)


def test_a_half_written_trainer_state_is_no_complete_checkpoint(tmp_path):
    from plugin_utils import checkpoints

    done = make_checkpoint(tmp_path, 2)
    cut = make_checkpoint(tmp_path, 4)
    Path(cut, "trainer_state.json").write_text('{"global_st')  # cut off while written
    assert checkpoints.latest(str(tmp_path)) == done


# --- continuing an earlier job's run (each task launch is a new job) ---------------------------------------


def job_run(jobs, job_id: str, adaptor: str, started: float, *, steps=(), finished=False) -> outputs.Where:
    where = outputs.Where("", str(jobs / job_id / "checkpoints"), str(jobs / job_id / "sft"))
    os.makedirs(where.run_dir)
    Path(where.record_path).write_text(
        json.dumps({"adaptor_name": adaptor, "job_id": job_id, "started": started, "finished": finished})
    )
    for step in steps:
        make_checkpoint(where.checkpoint_dir, step)
    return where


def test_a_new_job_continues_the_newest_unfinished_run_of_its_adapter(tmp_path):
    runs = [
        (job_run(tmp_path, "1", "mine", 100.0, steps=(10, 20)), "1"),
        (job_run(tmp_path, "2", "mine", 200.0, steps=(30,)), "2"),
        (job_run(tmp_path, "3", "other", 300.0, steps=(40,)), "3"),
    ]
    found = outputs.unfinished_run(runs, "mine", 1)
    assert found == outputs.Continued("2", str(tmp_path / "2" / "checkpoints" / "checkpoint-30"))
    assert found.step == 30
    # Stopped before its first save: the run before it is continued.
    runs.append((job_run(tmp_path, "4", "mine", 400.0), "4"))
    assert outputs.unfinished_run(runs, "mine", 1).job_id == "2"
    assert outputs.unfinished_run(runs, "nobody", 1) is None


def test_a_finished_or_running_newer_run_means_a_fresh_start(tmp_path):
    older = (job_run(tmp_path, "1", "mine", 100.0, steps=(10,)), "1")
    finished = (job_run(tmp_path, "2", "mine", 200.0, steps=(20,), finished=True), "2")
    assert outputs.unfinished_run([older, finished], "mine", 1) is None
    running_where = job_run(tmp_path, "3", "mine", 300.0, steps=(30,))
    with outputs.RunLock(running_where.lock_path):
        assert outputs.unfinished_run([older, (running_where, "3")], "mine", 1) is None
    assert outputs.unfinished_run([older, (running_where, "3")], "mine", 1).job_id == "3"


def test_the_run_record_keeps_its_start_and_says_when_it_finished(tmp_path):
    where = outputs.Where(str(tmp_path / "a"), str(tmp_path / "c"), str(tmp_path / "runs"))
    outputs.write_record(where, "mine", "7", finished=False)
    started = outputs.read_record(where.run_dir)["started"]
    outputs.write_record(where, "mine", "7", finished=True)
    assert outputs.read_record(where.run_dir) == {
        "adaptor_name": "mine",
        "job_id": "7",
        "started": started,
        "finished": True,
    }


# --- the run lock survives what the run deletes ---------------------------------------------------------------


def test_overwrite_output_removes_the_checkpoints_but_never_the_lock_held_on_them(tmp_path):
    where = outputs.Where(str(tmp_path / "a"), str(tmp_path / "checkpoints"), str(tmp_path / "runs"))
    record(make_checkpoint(where.checkpoint_dir, 4), IDENTITY)
    changed = {**IDENTITY, "asked": {**IDENTITY["asked"], "lora_r": 8}}
    with outputs.RunLock(where.lock_path):
        out = outputs.inspect(where, changed, overwrite=True)
        assert outputs.prepare_checkpoints(out) is None and not os.listdir(where.checkpoint_dir)
        # The lock is in the run's own folder, which nothing deletes: a second run is still refused.
        assert os.path.isfile(where.lock_path)
        assert outputs.inspect(where, changed, overwrite=True).lock_holder == f"pid {os.getpid()}"


def test_of_two_runs_started_at_the_same_moment_exactly_one_takes_the_lock(tmp_path):
    import subprocess

    lock, go = tmp_path / "runs" / "lock", tmp_path / "go"
    script = (
        "import os, sys, time; sys.path.insert(0, sys.argv[1])\n"
        "from plugin_utils.errors import InvalidConfig\n"
        "from plugin_utils.outputs import RunLock\n"
        "while not os.path.exists(sys.argv[3]): time.sleep(0.001)\n"
        "try:\n"
        "    with RunLock(sys.argv[2]):\n"
        "        print('took', flush=True); time.sleep(2)\n"
        "except InvalidConfig as exc:\n"
        "    print('refused', exc, flush=True)\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(ROOT), str(lock), str(go)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    time.sleep(1.0)  # both are waiting for the same start
    go.touch()
    answers = sorted(proc.communicate(timeout=60)[0].split()[0] for proc in procs)
    assert answers == ["refused", "took"]


def test_the_run_lock_lasts_while_a_process_that_inherited_it_lives(tmp_path):
    # The ranks' launcher inherits the lock: once main.py has gone (killed, or exited after a task's Stop), a
    # run started meanwhile is still refused until the ranks that save into these outputs are done.
    import subprocess
    import sys

    from plugin_utils.errors import InvalidConfig

    lock = outputs.RunLock(str(tmp_path / "run" / "lock"))
    with lock:
        child = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(60)"], pass_fds=(lock.fileno(),), start_new_session=True
        )
    try:
        assert outputs.RunLock.holder(lock.path) is not None, "held by the child after our own handle closed"
        with pytest.raises(InvalidConfig, match="another run"), outputs.RunLock(lock.path):
            pass
    finally:
        child.kill()
        child.wait()
    assert outputs.RunLock.holder(lock.path) is None
    with outputs.RunLock(lock.path):
        pass
