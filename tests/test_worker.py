"""The rank's stop agreement: the steps at which every rank checks for a stop and agrees on it, and a stop requested
mid-run ending two real gloo ranks at the same step, soon after the request."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from plugin_utils.launch import free_port

from .conftest import ROOT


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_next_stop_check_comes_after_about_agree_every_seconds_of_steps_at_the_pace_since_the_last(
    monkeypatch, worker
):
    clock = Clock()
    monkeypatch.setattr(worker.time, "monotonic", clock)
    checks = worker.StopChecks(step=10)  # a resumed run: the first check is at the end of its first step
    assert not checks.due(10) and checks.due(11)
    clock.now += 1.5  # a first step is slow (warm-up): check again after the next one
    assert checks.proposal(11) == 1
    checks.agreed(11, 1)
    assert checks.due(12)
    clock.now += 0.02  # then 20 ms a step: 0.2 s of them before the next check
    assert checks.proposal(12) == int(worker.AGREE_EVERY_SECONDS / 0.02)
    checks.agreed(12, 7)  # the ranks take the fewest steps any of them proposed
    assert not checks.due(18) and checks.due(19)
    clock.now += 7 * 0.5  # steps as slow as the check interval or slower: every step is checked
    assert checks.proposal(19) == 1
    checks.agreed(19, 1)
    clock.now += 0.0001  # however fast the steps, a check at least every AGREE_AT_LEAST_EVERY_STEPS
    assert checks.proposal(20) == worker.AGREE_AT_LEAST_EVERY_STEPS


def test_one_rank_agrees_with_itself_without_a_process_group(worker):
    assert worker._agree_with_next(True, 5) == (True, 5)
    assert worker._agree_with_next(False, 1) == (False, 1)


RANK = """
import json, os, sys, time, types

import torch
import torch.distributed as dist

from plugin_utils import worker
from plugin_utils.runfolder import RunFolder

dist.init_process_group("gloo")
rank = dist.get_rank()
folder = RunFolder(sys.argv[1])
request_at, step_seconds = int(sys.argv[2]), float(sys.argv[3 + rank])
agreements = []
agree = worker._agree_with_next
worker._agree_with_next = lambda flag, steps: agreements.append(steps) or agree(flag, steps)
reporter = worker.Reporter(folder, is_main=False)
args = types.SimpleNamespace(world_size=2)
state = types.SimpleNamespace(global_step=0, max_steps=10**6)
control = types.SimpleNamespace(should_training_stop=False, should_save=False, should_log=False)
reporter.on_train_begin(args, state, control, model=torch.nn.Linear(2, 2))
requested = None
while not control.should_training_stop and state.global_step < 2000:
    time.sleep(step_seconds)  # the step's work
    state.global_step += 1
    if rank == 0 and state.global_step == request_at:
        folder.request_stop()  # as the parent does, while the ranks train
    if requested is None and folder.stop_requested():
        requested = time.monotonic()
    reporter.on_step_end(args, state, control)
print(json.dumps({
    "rank": rank, "stopped_at": state.global_step, "saves": control.should_save, "checks": len(agreements),
    "seconds_after_request": time.monotonic() - (requested or time.monotonic()),
}))
"""


@pytest.mark.slow
def test_a_stop_requested_mid_run_ends_every_rank_at_the_same_step_within_a_second(tmp_path):
    """Two gloo ranks, one stepping every 10 ms and one every 25 ms (a collective brings them together at each
    check), check for a stop a few times a second instead of at every step; the stop file written at rank 0's
    step 60 ends both at one step, with a save, within about AGREE_EVERY_SECONDS."""
    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent(RANK))
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
    }
    ranks = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path), "60", "0.01", "0.025"],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    results = []
    for rank in ranks:
        out, err = rank.communicate(timeout=240)
        assert rank.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    first, second = results
    assert first["stopped_at"] == second["stopped_at"] >= 60, results
    assert first["saves"] and second["saves"]
    # The request is seen at the next check, at most AGREE_EVERY_SECONDS of steps later (a loaded machine adds some).
    assert all(r["seconds_after_request"] < 1.0 for r in results), results
    # A check every few steps, not every step.
    assert first["checks"] == second["checks"] <= first["stopped_at"] / 3, results
