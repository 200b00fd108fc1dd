"""GPU paths that have a twin on this CPU machine, run end to end on two CPU ranks in one gloo group: QLoRA
through bitsandbytes' CPU backend (4-bit layers, the adapter, main.py killed and the run taken up again, a stop
and a resume, fuse_model onto a bf16 base), bf16 autocast, activation checkpointing, a saved accelerate default
config the launch must ignore, and a checkpoint with a vision tower (DDP's unused-parameter check is the same on
gloo as on NCCL). Each real launch is shared by the tests that read it. Full fine-tuning's fp32 master weights
are proven by the run test_lifecycle kills and resumes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import psutil
import pytest

from .conftest import (
    RUN_TAG,
    base_config,
    last_json,
    tagged_processes,
    tensor_dtypes,
    with_bitsandbytes,
    write_config,
)
from .test_e2e import lab_jobs, metrics_rows, read_job
from .test_lifecycle import Running

pytestmark = pytest.mark.slow

# What `accelerate config` saves for a one-GPU fp16 machine, with every value the plugin's launch must not take:
# a single GPU id (accelerate refuses a two-process launch with it), 4 processes, fp16, a CUDA device, debug.
HOSTILE_ACCELERATE_DEFAULT = """\
compute_environment: LOCAL_MACHINE
debug: true
distributed_type: MULTI_GPU
downcast_bf16: 'no'
gpu_ids: '0'
machine_rank: 0
main_training_function: main
mixed_precision: fp16
num_machines: 1
num_processes: 4
rdzv_backend: c10d
same_network: false
use_cpu: false
"""


def losses(index: Path) -> list[tuple[int, float]]:
    rows = [r for r in metrics_rows(index) if "train/loss" in r.get("metrics", {})]
    return [(r["step"], r["metrics"]["train/loss"]) for r in rows]


# --- QLoRA: 4-bit on the CPU, bf16, activation checkpointing, a hostile accelerate default ------------------------


@pytest.fixture(scope="session")
def qlora(tiny_model, tmp_path_factory):
    """QLoRA on two CPU ranks in bf16 with activation checkpointing, under an HF_HOME whose accelerate default
    config would refuse the launch: three runs of one adapter, each beginning where the one before ended.

    1. Planned for 3000 steps; main.py is killed outright (kill -9, the OOM killer) after its first step. The
       ranks, under accelerate's launcher (which outlives main.py) and writing to their own files rather than to
       a pipe to it, see their parent gone, finish the step, save a complete checkpoint and exit. The job stays
       RUNNING: nothing is left to end it.
    2. Planned for 20 steps (a soft change): it closes the job the killed run left open, resumes from its
       checkpoint, and is stopped two steps later by the SIGHUP a closed terminal sends its process group.
    3. Planned for two steps more (a soft change again) with fuse_model: it resumes to the end and writes the
       merged model.

    Session-scoped (and its tests one xdist group): the runs happen once, whatever order the tests run in."""
    tmp = tmp_path_factory.mktemp("qlora")
    hf_home = tmp / "hf-home"
    (hf_home / "accelerate").mkdir(parents=True)
    (hf_home / "accelerate" / "default_config.yaml").write_text(HOSTILE_ACCELERATE_DEFAULT)
    (tmp / "tflhome").mkdir()
    tag = f"qlora-{os.getpid()}-{time.monotonic_ns()}"
    env = with_bitsandbytes(
        {
            "HF_HOME": str(hf_home),
            "HF_HUB_OFFLINE": "1",
            "TFL_HOME_DIR": str(tmp / "tflhome"),
            "SFT_PREPARED_CACHE": str(tmp / "prepared"),
            RUN_TAG: tag,
        }
    )
    config = base_config(
        tiny_model,
        tmp,
        training_mode="qlora",
        precision="bf16",
        gradient_checkpointing=True,
        num_processes=2,
        max_steps=3000,
        logging_steps=1,
        save_steps=100,
        learning_rate=2e-3,
    )
    checkpoints = tmp / "outputs" / "checkpoints" / "test-adaptor"

    def saved() -> dict:
        found = sorted(checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        return {
            "saved": [p.name for p in found],
            "complete": [(p / "trainer_state.json").is_file() and (p / "optimizer.pt").is_file() for p in found],
            "published": (tmp / "outputs" / "test-adaptor").exists(),
            "jobs": {str(i): read_job(i)["status"] for i in lab_jobs(tmp / "tflhome")},
        }

    killed = Running(["--config", write_config(tmp, config), "--json"], env=env)
    killed.wait_for("step 1/3000", timeout=240)
    run_dir = next(line for line in killed.lines if "launch: " in line).split()[-1]
    killed.proc.kill()
    killed.proc.wait(timeout=10)
    try:
        _, left = psutil.wait_procs(tagged_processes(tag), timeout=120)
        rank_logs = "".join(path.read_text() for path in sorted(Path(run_dir, "logs").glob("rank-*.log")))
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)  # what the killed parent would have removed
    at_kill = {**saved(), "left": [p.pid for p in left], "rank_logs": rank_logs}
    [killed_at] = [int(name.split("-")[1]) for name in at_kill["saved"]] or [0]

    stopped = Running(["--config", write_config(tmp, {**config, "max_steps": 20}), "--json"], env=env)
    stopped.wait_for(f"step {killed_at + 2}/20", timeout=240)
    sent = time.time()
    os.killpg(stopped.proc.pid, signal.SIGHUP)
    stopped.finish()
    print(f"stop latency (SIGHUP to exit, 2 CPU ranks): {time.time() - sent:.2f} s")
    at_stop = saved()
    # The loss curve up to the stop, in the run's folder and among the stopped job's artifacts.
    at_stop["curve"] = (tmp / "outputs" / "runs" / "test-adaptor" / "loss_curve.png").is_file()
    jobs = lab_jobs(tmp / "tflhome")
    at_stop["artifacts"] = [sorted(p.name for p in (i.parent / "artifacts").glob("*")) for i in jobs]
    stopped_at = max([int(name.split("-")[1]) for name in at_stop["saved"]] or [0])

    resumed = {**config, "max_steps": stopped_at + 2, "fuse_model": True}
    last = Running(["--config", write_config(tmp, resumed), "--json"], env=env)
    last.finish(timeout=300)
    return {
        "tmp": tmp,
        "model": tiny_model,
        "runs": (killed, stopped, last),
        "at_kill": at_kill,
        "killed_at": killed_at,
        "at_stop": at_stop,
        "stopped_at": stopped_at,
    }


@pytest.mark.xdist_group("qlora")
def test_kill_9_of_main_py_leaves_ranks_that_save_and_the_next_run_closes_the_job_and_resumes(qlora):
    """main.py killed with SIGKILL under a two-rank launch: the ranks save a complete checkpoint and exit, and
    the next run of the adapter closes the job left RUNNING and resumes from that checkpoint. (One rank that is
    main.py's own child: test_lifecycle.)"""
    at_kill, step = qlora["at_kill"], qlora["killed_at"]
    assert not at_kill["left"], "the ranks save and exit once their parent is gone"
    logs = at_kill["rank_logs"]
    assert "the parent process is gone: saving a checkpoint and stopping" in logs
    assert "Traceback" not in logs and "BrokenPipeError" not in logs, logs[-3000:]
    assert at_kill["saved"] == [f"checkpoint-{step}"] and step >= 1 and at_kill["complete"] == [True]
    [(first, status)] = at_kill["jobs"].items()
    assert status == "RUNNING", "nothing was left to end the job"
    assert not at_kill["published"]

    stopped = qlora["runs"][1]
    assert f"resuming at step {step}" in stopped.stderr
    assert "was left open by a process that died; marked STOPPED" in stopped.stderr
    closed = read_job(Path(first))
    assert closed["status"] == "STOPPED", closed
    details = closed["job_data"]["completion_details"]
    assert "ended without concluding it" in details and f"checkpoint at step {step}" in details


@pytest.mark.xdist_group("qlora")
def test_qlora_stops_with_a_checkpoint_and_the_next_run_resumes_it_to_the_end(qlora):
    """A closed SSH session sends SIGHUP to its process group: the run stops as for SIGTERM (the same handler;
    the task host's Stop sends SIGTERM, test_lifecycle), saving a complete checkpoint and publishing nothing. The
    next run extends it: max_steps is a soft change, resumed with a warning naming it, and no step is trained
    twice or skipped."""
    _, stopped, last = qlora["runs"]
    at_stop, stopped_at, killed_at = qlora["at_stop"], qlora["stopped_at"], qlora["killed_at"]
    assert stopped.proc.returncode == 3, stopped.stderr[-3000:]
    assert last_json(stopped.stdout)["status"] == "STOPPED"
    assert list(at_stop["jobs"].values()) == ["STOPPED", "STOPPED"]
    assert at_stop["saved"] == [f"checkpoint-{killed_at}", f"checkpoint-{stopped_at}"]
    assert at_stop["complete"] == [True, True], "trainer_state.json and optimizer.pt are saved"
    assert not at_stop["published"], "a stopped run publishes no adapter"
    assert at_stop["curve"] and ["loss_curve.png"] in at_stop["artifacts"], at_stop["artifacts"]
    assert killed_at + 2 <= stopped_at < 20
    assert last.proc.returncode == 0, last.stderr[-3000:]
    assert "warning: max_steps: changed since the checkpoint" in last.stderr
    assert f"resuming at step {stopped_at}" in last.stderr
    result = last_json(last.stdout)
    assert result["status"] == "COMPLETE" and result["steps"] == stopped_at + 2
    summary = json.loads((Path(result["adaptor_path"]) / "training_summary.json").read_text())
    assert summary["world_size"] == 2, "the two CPU ranks form one gloo group"
    assert summary["resumed_from_step"] == stopped_at and summary["max_steps"] == stopped_at + 2
    [resumed_job] = [i for i in lab_jobs(qlora["tmp"] / "tflhome") if str(i) not in at_stop["jobs"]]
    steps = [step for step, _ in losses(resumed_job)]
    assert min(steps) == stopped_at + 1 and max(steps) == stopped_at + 2, "the resumed job's metrics go on"
    assert summary["plan"]["precision"] == "bf16" and summary["parameters"]["training_mode"] == "qlora"


@pytest.mark.xdist_group("qlora")
def test_qlora_trains_4_bit_layers_on_the_cpu_and_its_loss_falls(qlora):
    runs, last_step = qlora["runs"], qlora["stopped_at"] + 2
    jobs = lab_jobs(qlora["tmp"] / "tflhome")
    trained = sorted(step_loss for index in jobs for step_loss in losses(index))
    steps = [step for step, _ in trained]
    assert steps == sorted(set(steps)) and steps[0] == 1 and steps[-1] == last_step, "no step trained twice"
    first_loss, last_loss = trained[0][1], trained[-1][1]
    assert last_loss < first_loss - 0.1, trained
    # The ranks' own account: fp32 adapters over the 4-bit base, in the first run as in the resumed ones (TRL casts
    # QLoRA's adapters to bf16, PEFT reloads them in fp32 on resume), checkpointed.
    starts = [line for run in runs for line in run.lines if "training started:" in line]
    assert len(starts) == 3 and all("resuming at step" in line for line in starts[1:]), starts
    assert all("trainable parameters (float32), activation checkpointing on" in line for line in starts), starts
    assert all("gradient checkpointing: on (set)" in run.stderr for run in runs)


@pytest.mark.xdist_group("qlora")
def test_a_saved_accelerate_default_config_changes_nothing(qlora):
    """Its gpu_ids "0" alone made accelerate refuse every two-process launch ("Less than two GPU ids were
    configured"); the launch names the run's own config, so the plan's 2 CPU processes without mixed precision
    stand."""
    for run in qlora["runs"]:
        assert "Less than two GPU ids" not in run.stderr
        assert "accelerate.commands.launch --config_file" in run.stderr
        assert "training started: 2 process(es)" in run.stderr


@pytest.mark.xdist_group("qlora")
def test_the_qlora_adapter_loads_onto_the_unquantized_base(qlora):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = qlora["tmp"] / "outputs" / "test-adaptor"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == qlora["model"]
    weights = tensor_dtypes(adapter / "adapter_model.safetensors")
    assert weights and all("lora_" in key for key in weights)
    base = AutoModelForCausalLM.from_pretrained(qlora["model"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter))
    trained = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert trained and any(p.abs().sum() > 0 for p in trained), "lora_B starts at zero: a trained adapter is not"


@pytest.mark.xdist_group("qlora")
def test_fuse_model_merges_the_qlora_adapter_into_a_bf16_model_that_generates(qlora):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = qlora["tmp"] / "outputs" / "test-adaptor-merged"
    assert not (merged / "adapter_config.json").exists()
    assert json.loads((merged / "config.json").read_text())["dtype"] == "bfloat16"
    assert set(tensor_dtypes(merged / "model.safetensors").values()) == {"BF16"}
    model = AutoModelForCausalLM.from_pretrained(merged)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    prompt = tokenizer("Question: What is the capital of France?\nAnswer:", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 8 or out[0, -1] == tokenizer.eos_token_id
    [index] = [i for i in lab_jobs(qlora["tmp"] / "tflhome") if read_job(i)["status"] == "COMPLETE"]
    assert len(read_job(index)["job_data"]["models"]) == 2, "the adapter and the merged model are registered"


# --- a vision tower under DDP, in bf16 ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def vision(tiny_model, tmp_path_factory):
    """LoRA all-linear on a Gemma 3-style checkpoint (vision tower, projector, text model) with text rows, on two
    CPU ranks in bf16."""
    from demo.tiny_model import build_with_vision_tower

    tmp = tmp_path_factory.mktemp("vision")
    model = str(build_with_vision_tower(tmp / "gemma3-tiny", tiny_model))
    (tmp / "tflhome").mkdir()
    env = {"TFL_HOME_DIR": str(tmp / "tflhome"), "SFT_PREPARED_CACHE": str(tmp / "prepared")}
    config = base_config(
        model,
        tmp,
        num_processes=2,
        precision="bf16",
        lora_target_modules="all-linear",
        max_steps=4,
        logging_steps=1,
        save_steps=4,
    )
    run = Running(["--config", write_config(tmp, config), "--json"], env=env)
    run.finish(timeout=300)
    return {"tmp": tmp, "run": run}


@pytest.mark.xdist_group("vision")
def test_all_linear_lora_on_a_checkpoint_with_a_vision_tower_trains_on_two_ranks(vision):
    """all-linear put adapters on the SigLIP tower too, which text rows give no gradient: DDP, told that no
    parameter goes unused, failed at the second step ("Expected to have finished reduction in the prior
    iteration"). The adapters now go into the language model only."""
    run = vision["run"]
    assert run.proc.returncode == 0, run.stderr[-3000:]
    result = last_json(run.stdout)
    assert result["status"] == "COMPLETE" and result["steps"] == 4
    assert "LoRA: adapters in the language model only; not in model.vision_tower, model.multi_modal_projector" in (
        run.stderr
    )
    adapter = Path(result["adaptor_path"])
    keys = tensor_dtypes(adapter / "adapter_model.safetensors")
    assert keys and not any("vision_tower" in key or "multi_modal_projector" in key for key in keys)
    assert any("language_model.layers.1.mlp.down_proj" in key for key in keys)
    assert json.loads((adapter / "training_summary.json").read_text())["world_size"] == 2


@pytest.mark.xdist_group("vision")
def test_bf16_autocast_on_two_cpu_ranks_trains_fp32_adapters_to_a_finite_loss(vision):
    run = vision["run"]
    assert run.proc.returncode == 0, run.stderr[-3000:]
    result = last_json(run.stdout)
    assert result["final_loss"] == pytest.approx(result["final_loss"]) and 0 < result["final_loss"] < 100
    assert "precision: bf16 (set)" in run.stderr
    # PEFT keeps LoRA adapters in fp32 over a bf16 base, and they are saved so.
    assert "trainable parameters (float32)" in run.stderr
    assert set(tensor_dtypes(Path(result["adaptor_path"]) / "adapter_model.safetensors").values()) == {"F32"}


def test_full_fine_tuning_of_a_checkpoint_with_a_vision_tower_trains_its_language_model_only(tiny_model, tmp_path):
    """On text rows a vision tower's weights get no gradient: trainable, they held optimizer state for nothing and,
    with activation checkpointing on (when transformers stops DDP's search for unused weights), failed DDP's check
    like the adapters above. The ranks freeze what lies beside the language model."""
    import dataclasses

    from demo.tiny_model import build_with_vision_tower
    from plugin_utils import worker

    from .conftest import spec_of

    model_dir = str(build_with_vision_tower(tmp_path / "gemma3-tiny", tiny_model))
    spec = dataclasses.replace(spec_of(str(tmp_path)), model_name=model_dir, training_mode="full")
    model = worker._load_model(spec)
    trainable = {name.split(".")[1] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"language_model"}
    assert all(p.requires_grad for p in model.model.language_model.parameters())
    lora = worker._load_model(dataclasses.replace(spec, training_mode="lora"))
    assert all(p.requires_grad for p in lora.model.vision_tower.parameters()), "LoRA excludes, it does not freeze"
