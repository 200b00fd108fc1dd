"""plugin_utils/strategies.py: the generated FSDP (accelerate) and DeepSpeed configurations, and the
launch command each strategy gets. DeepSpeed cannot run here (it needs CUDA): its config is checked as
generated; FSDP also runs for real on two CPU ranks in test_lifecycle.py."""

from __future__ import annotations

import json

from plugin_utils import launch, strategies
from plugin_utils.runfolder import RunFolder
from tests.conftest import plan_of, spec_of

# GPU plans cannot be built here from a real nvidia-smi: these are what planning gives two Ampere GPUs.
GPUS = plan_of(device="cuda", gpu_ids=[0, 1], num_processes=2, precision="bf16")
CPUS = plan_of(device="cpu", gpu_ids=[], num_processes=2, precision="fp32")


def gpus(**decisions):
    return plan_of(device="cuda", gpu_ids=[0, 1], num_processes=2, precision="bf16", **decisions)


def read(path: str) -> dict:
    with open(path) as handle:
        return json.load(handle)


def test_ddp_writes_a_multi_gpu_launcher_config(tmp_path):
    written = strategies.write_configs(RunFolder(str(tmp_path)), GPUS, 29500)
    assert set(written) == {"accelerate"}
    data = read(written["accelerate"])
    assert data["distributed_type"] == "MULTI_GPU" and data["mixed_precision"] == "bf16"
    assert "fsdp_config" not in data
    cmd = launch.command(str(tmp_path), written)
    assert cmd[cmd.index("--config_file") + 1] == written["accelerate"]


def test_fsdp_writes_an_fsdp2_accelerate_config_used_by_the_launcher(tmp_path):
    plan = gpus(strategy="fsdp", speed=strategies_speed(gradient_checkpointing=True))
    written = strategies.write_configs(RunFolder(str(tmp_path)), plan, 29501)
    data = read(written["accelerate"])
    assert data["distributed_type"] == "FSDP"
    assert data["num_processes"] == 2 and data["main_process_port"] == 29501
    assert data["mixed_precision"] == "bf16" and data["use_cpu"] is False
    fsdp = data["fsdp_config"]
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert fsdp["fsdp_activation_checkpointing"] is True
    cmd = launch.command(str(tmp_path), written)
    assert cmd[cmd.index("--config_file") + 1] == written["accelerate"]


def test_fsdp_on_cpu_uses_cpu_ranks_and_full_precision(tmp_path):
    cpus = plan_of(num_processes=2, strategy="fsdp")
    written = strategies.write_configs(RunFolder(str(tmp_path)), cpus, 29502)
    data = read(written["accelerate"])
    assert data["use_cpu"] is True and data["mixed_precision"] == "no"


def test_fsdp_multi_node_counts_every_process(tmp_path):
    plan = gpus(strategy="fsdp", num_machines=2, machine_rank=1, main_process_ip="10.0.0.1")
    data = read(strategies.write_configs(RunFolder(str(tmp_path)), plan, 29500)["accelerate"])
    assert (data["num_processes"], data["num_machines"], data["machine_rank"]) == (4, 2, 1)
    assert data["main_process_ip"] == "10.0.0.1"


def test_deepspeed_zero2_and_zero3_configs(tmp_path):
    zero2 = strategies.deepspeed_config(gpus(strategy="deepspeed_zero2"))
    zero3 = strategies.deepspeed_config(gpus(strategy="deepspeed_zero3"))
    assert zero2["zero_optimization"]["stage"] == 2
    assert "stage3_gather_16bit_weights_on_model_save" not in zero2["zero_optimization"]
    assert zero3["zero_optimization"]["stage"] == 3
    assert zero3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    for generated in (zero2, zero3):
        # Batch sizes and precision come from the training arguments, so the two can never disagree.
        assert generated["train_micro_batch_size_per_gpu"] == "auto"
        assert generated["bf16"] == {"enabled": "auto"}
    plan = gpus(strategy="deepspeed_zero3")
    written = strategies.write_configs(RunFolder(str(tmp_path)), plan, 1)
    assert read(written["deepspeed"]) == zero3
    # The spec names the same file, so the ranks hand it to the training arguments.
    assert (
        spec_of(str(tmp_path), {"distributed_strategy": "deepspeed_zero3"}, plan).deepspeed_config
        == written["deepspeed"]
    )
    # Two DeepSpeed ranks are MULTI_GPU processes: the DeepSpeed config reaches them through the training arguments.
    assert read(written["accelerate"])["distributed_type"] == "MULTI_GPU"


def test_the_worker_leaves_activation_checkpointing_to_fsdp(tmp_path):
    from plugin_utils import worker

    plan = plan_of(num_processes=2, strategy="fsdp", speed=strategies_speed(gradient_checkpointing=True))
    args = worker._sft_config(spec_of(str(tmp_path), {"distributed_strategy": "fsdp"}, plan))
    assert not args.activation_checkpointing


def strategies_speed(**settings):
    from plugin_utils.speed import Speed

    return Speed(**settings)
