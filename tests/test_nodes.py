"""Several nodes as schedulers describe them: SkyPilot, SLURM and torchrun-style variables give
the machine count, this machine's rank and the main node's address; node-level RANK/WORLD_SIZE never reach the
ranks' launcher; SLURM, which runs the task once per allocation, gets the command again on every node."""

from __future__ import annotations

import os
import stat

import pytest

from plugin_utils import launch, machine

from .conftest import plan_of, resolve

SKYPILOT = {
    # What SkyPilot sets on node 1 of 2, and what TransformerLab's SkyPilot provider prepends to `run`.
    "SKYPILOT_NUM_NODES": "2",
    "SKYPILOT_NODE_RANK": "1",
    "SKYPILOT_NODE_IPS": "10.0.0.5\n10.0.0.6\n",
    "MASTER_ADDR": "10.0.0.5",
    "MASTER_PORT": "29500",
    "NODE_RANK": "1",
    "RANK": "1",
    "LOCAL_RANK": "0",
    "WORLD_SIZE": "2",
}


def test_skypilot_nodes():
    nodes = machine.nodes_from_env(SKYPILOT)
    assert (nodes.count, nodes.rank, nodes.main_ip, nodes.main_port) == (2, 1, "10.0.0.5", 29500)
    assert not nodes.needs_srun and "SKYPILOT_NUM_NODES" in nodes.source


def test_slurm_in_the_batch_script_needs_srun_and_inside_a_step_does_not():
    env = {"SLURM_NNODES": "3", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "gpu[07-08],cpu1", "PATH": "/nonexistent"}
    nodes = machine.nodes_from_env(env)
    assert (nodes.count, nodes.rank, nodes.main_ip, nodes.main_port) == (3, 0, "gpu07", 29500)
    assert nodes.needs_srun
    step = machine.nodes_from_env({**env, "SLURM_NODEID": "2", "SLURM_STEP_ID": "0", "MASTER_PORT": "12345"})
    assert (step.rank, step.main_port, step.needs_srun) == (2, 12345, False)
    assert not machine.nodes_from_env({**env, "SFT_UNDER_SRUN": "1"}).needs_srun


def test_slurm_host_lists_expand_like_scontrol(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert machine.slurm_hosts("node[01-03,07],login") == ["node01", "node02", "node03", "node07", "login"]
    # scontrol, when it is here, is asked first (a fake one here: no SLURM on this machine).
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\nprintf 'alpha\\nbeta\\n'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert machine.slurm_hosts("whatever[1-2]") == ["alpha", "beta"]


def test_torchrun_style_variables_and_a_single_node():
    nodes = machine.nodes_from_env({"MASTER_ADDR": "h0", "MASTER_PORT": "4000", "NODE_RANK": "1", "NNODES": "2"})
    assert (nodes.count, nodes.rank, nodes.main_ip, nodes.main_port) == (2, 1, "h0", 4000)
    assert machine.nodes_from_env({"MASTER_ADDR": "h0", "NODE_RANK": "0", "WORLD_SIZE": "2"}).count == 2
    assert machine.nodes_from_env({}) is None
    assert machine.nodes_from_env({"SKYPILOT_NUM_NODES": "1", "SLURM_NNODES": "1", "MASTER_ADDR": "x"}) is None


def test_nodes_fill_the_machine_settings_the_user_left_alone():
    nodes = machine.nodes_from_env(SKYPILOT)
    p, _ = resolve({"model_name": "m", "dataset_name": "d", "adaptor_name": "a"}, headless=False, nodes=nodes)
    assert (p.num_machines, p.machine_rank, p.main_process_ip, p.main_process_port) == (
        2,
        1,
        "10.0.0.5",
        29500,
    )
    given = {"model_name": "m", "dataset_name": "d", "adaptor_name": "a", "main_process_port": 4444}
    p, _ = resolve(given, headless=False, nodes=nodes)
    assert p.main_process_port == 4444 and p.num_machines == 2
    # A multi-node run set by hand keeps its own settings.
    own = {**given, "num_machines": 3, "machine_rank": 2, "main_process_ip": "h"}
    p, _ = resolve(own, headless=False, nodes=nodes)
    assert (p.num_machines, p.machine_rank, p.main_process_ip) == (3, 2, "h")


def test_node_level_rank_variables_never_reach_the_ranks(monkeypatch):
    for name, value in SKYPILOT.items():
        monkeypatch.setenv(name, value)
    env = launch.rank_env(plan_of(num_machines=2, machine_rank=1, main_process_ip="10.0.0.5"))
    assert not {"RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"} & set(env)
    assert env["SKYPILOT_NODE_RANK"] == "1"


def test_srun_runs_this_command_once_per_node():
    nodes = machine.Nodes(2, 0, "h", 29500, "SLURM", needs_srun=True)
    cmd = launch.srun_command(nodes, ["--json"])
    assert cmd[:5] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert cmd[-2:] == [os.path.join(launch.PLUGIN_DIR, "main.py"), "--json"]


def test_without_srun_a_slurm_allocation_fails_with_the_fix(monkeypatch):
    from plugin_utils.errors import RunFailed

    monkeypatch.setenv("PATH", "/nonexistent")
    nodes = machine.Nodes(2, 0, "h", 29500, "SLURM", needs_srun=True)
    with pytest.raises(RunFailed, match="srun is not on PATH"):
        launch.run_on_every_node(nodes, ["--json"], launch.StopFlag())
