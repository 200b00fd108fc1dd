"""plugin_utils/rules.py: each cross-parameter and machine rule, the run plan, and check().

GPUs cannot exist on the CPU-only machine the suite runs on, so machine rules get a `Machine` built
by hand here: a fake of what nvidia-smi and CUDA_VISIBLE_DEVICES would report. Everything else is real.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from plugin_utils import params, rules
from plugin_utils.errors import InvalidConfig
from plugin_utils.machine import Gpu, Machine

# Fakes for hardware that cannot exist here: an Ampere-class and a pre-Ampere GPU.
A100 = 8.0
V100 = 7.0


def gpus(*capabilities: float) -> list[Gpu]:
    return [
        Gpu(index=i, name=f"fake-gpu-{i}", memory_mib=40960, compute_capability=c) for i, c in enumerate(capabilities)
    ]


CPU_ONLY = Machine(gpus=[], visible=None, cpu_count=8)
TWO_AMPERE = Machine(gpus=gpus(A100, A100), visible=None, cpu_count=16)
ONE_VOLTA = Machine(gpus=gpus(V100), visible=None, cpu_count=16)
FOUR_AMPERE_TWO_VISIBLE = Machine(gpus=gpus(A100, A100, A100, A100), visible=[2, 3], cpu_count=16)
ALL_HIDDEN = Machine(gpus=gpus(A100, A100), visible=[], cpu_count=16)


# A model folder holding only config.json: the rules read that file and never the weights.
MODEL_DIR = tempfile.mkdtemp(prefix="rules-model-")
Path(MODEL_DIR, "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 4096}')


def config(**overrides) -> dict:
    p = params.defaults()
    p.update(model_name=MODEL_DIR, dataset_name="/data/rows.jsonl", adaptor_name="my-adaptor")
    p.update(overrides)
    return p


def without_speed(plan) -> dict:
    return {k: v for k, v in plan.as_dict().items() if k != "speed"}


def findings(rule, p, machine=None) -> set[tuple[str, str]]:
    """(severity, parameter) of what a rule yields."""
    found = rule(p) if machine is None else rule(p, machine)
    return {(severity, problem.parameter) for severity, problem in found}


def messages(rule, p, machine=None) -> list[str]:
    found = rule(p) if machine is None else rule(p, machine)
    return [problem.line() for _, problem in found]


# --- configuration rules, table-driven: (rule, overrides, expected findings) ----------------------------

CONFIG_CASES = [
    (rules.templates_are_valid_jinja, {"formatting_template": "Q: {{ q }} A: {{ a }}"}, set()),
    (rules.templates_are_valid_jinja, {"formatting_template": "Q: {{ q } A"}, {("error", "formatting_template")}),
    (
        rules.templates_are_valid_jinja,
        # transformers' own tags parse: loop controls and {% generation %}.
        {
            "formatting_chat_template": "{% for m in messages %}{% if m.x %}{% break %}{% endif %}"
            "{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}"
        },
        set(),
    ),
    (
        rules.templates_are_valid_jinja,
        {"formatting_chat_template": "{% for m in messages %}{{ m.content }}"},
        {("error", "formatting_chat_template")},
    ),
    (rules.model_and_dataset_given, {}, set()),
    (rules.model_and_dataset_given, {"model_name": ""}, {("error", "model_name")}),
    (rules.model_and_dataset_given, {"dataset_name": ""}, {("error", "dataset_name")}),
    (
        rules.model_and_dataset_given,
        {"model_name": "", "dataset_name": ""},
        {("error", "model_name"), ("error", "dataset_name")},
    ),
    (rules.adaptor_name_is_a_name, {}, set()),
    (rules.adaptor_name_is_a_name, {"adaptor_name": "my-adaptor_1.0"}, set()),
    (rules.adaptor_name_is_a_name, {"adaptor_name": "a/b"}, {("error", "adaptor_name")}),
    (rules.adaptor_name_is_a_name, {"adaptor_name": "a\\b"}, {("error", "adaptor_name")}),
    (rules.adaptor_name_is_a_name, {"adaptor_name": ".hidden"}, {("error", "adaptor_name")}),
    (rules.adaptor_name_is_a_name, {"adaptor_name": ".."}, {("error", "adaptor_name")}),
    (rules.adaptor_name_is_a_name, {"adaptor_name": ""}, {("error", "adaptor_name")}),
    (rules.adaptor_name_is_a_name, {"adaptor_name": None}, {("error", "adaptor_name")}),
    (rules.max_steps_not_zero, {"max_steps": -1}, set()),
    (rules.max_steps_not_zero, {"max_steps": 5}, set()),
    (rules.max_steps_not_zero, {"max_steps": 0}, {("error", "max_steps")}),
    (rules.learning_rate_sane, {"learning_rate": 2e-4}, set()),
    (rules.learning_rate_sane, {"learning_rate": 1e-2}, set()),
    (rules.learning_rate_sane, {"learning_rate": 0.5}, {("warning", "learning_rate")}),
    (rules.lora_settings_ignored_in_full_mode, {"training_mode": "lora", "lora_r": 64}, set()),
    (rules.lora_settings_ignored_in_full_mode, {"training_mode": "full"}, set()),
    (rules.lora_settings_ignored_in_full_mode, {"training_mode": "full", "lora_r": 64}, {("warning", "lora_r")}),
    (
        rules.lora_settings_ignored_in_full_mode,
        {"training_mode": "full", "lora_alpha": 8, "lora_dropout": 0.1},
        {("warning", "lora_alpha, lora_dropout")},
    ),
    (rules.chat_template_wins_over_formatting_template, {"formatting_template": "{{ text }}"}, set()),
    (rules.chat_template_wins_over_formatting_template, {"apply_chat_template": True}, set()),
    (
        rules.chat_template_wins_over_formatting_template,
        {"apply_chat_template": True, "formatting_template": "  "},
        set(),
    ),
    (
        rules.chat_template_wins_over_formatting_template,
        {"apply_chat_template": True, "formatting_template": "{{ text }}"},
        {("warning", "formatting_template")},
    ),
    (rules.qlora_with_ddp_only, {"training_mode": "qlora"}, set()),
    (rules.qlora_with_ddp_only, {"distributed_strategy": "fsdp"}, set()),
    (
        rules.qlora_with_ddp_only,
        {"training_mode": "qlora", "distributed_strategy": "fsdp"},
        {("error", "distributed_strategy")},
    ),
    (rules.fuse_model_explained, {"fuse_model": True}, set()),
    (rules.fuse_model_explained, {"fuse_model": False, "training_mode": "qlora"}, set()),
    (rules.fuse_model_explained, {"fuse_model": True, "training_mode": "qlora"}, {("warning", "fuse_model")}),
    (rules.fuse_model_explained, {"fuse_model": True, "training_mode": "full"}, {("warning", "fuse_model")}),
    (rules.multi_node_needs_address, {}, set()),
    (
        rules.multi_node_needs_address,
        {"num_machines": 2, "machine_rank": 1, "main_process_ip": "10.0.0.1", "main_process_port": 29500},
        set(),
    ),
    (
        rules.multi_node_needs_address,
        {"num_machines": 2, "main_process_port": 29500},
        {("error", "main_process_ip")},
    ),
    (
        rules.multi_node_needs_address,
        {"num_machines": 2, "main_process_ip": "10.0.0.1"},
        {("error", "main_process_port")},
    ),
    (
        rules.multi_node_needs_address,
        {"num_machines": 2, "machine_rank": 2, "main_process_ip": "10.0.0.1", "main_process_port": 29500},
        {("error", "machine_rank")},
    ),
    (rules.multi_node_needs_address, {"machine_rank": 1}, {("error", "machine_rank")}),
    (rules.num_processes_is_auto_or_count, {"num_processes": "auto"}, set()),
    (rules.num_processes_is_auto_or_count, {"num_processes": "AUTO"}, set()),
    (rules.num_processes_is_auto_or_count, {"num_processes": "2"}, set()),
    (rules.num_processes_is_auto_or_count, {"num_processes": "0"}, {("error", "num_processes")}),
    (rules.num_processes_is_auto_or_count, {"num_processes": "-1"}, {("error", "num_processes")}),
    (rules.num_processes_is_auto_or_count, {"num_processes": "two"}, {("error", "num_processes")}),
    (rules.num_processes_is_auto_or_count, {"num_processes": "1.5"}, {("error", "num_processes")}),
    (rules.gpu_ids_is_auto_or_list, {"gpu_ids": "auto"}, set()),
    (rules.gpu_ids_is_auto_or_list, {"gpu_ids": "0"}, set()),
    (rules.gpu_ids_is_auto_or_list, {"gpu_ids": "0,1"}, set()),
    (rules.gpu_ids_is_auto_or_list, {"gpu_ids": "0, 1"}, set()),
    (rules.gpu_ids_is_auto_or_list, {"gpu_ids": "cuda:0"}, {("error", "gpu_ids")}),
    (rules.gpu_ids_is_auto_or_list, {"gpu_ids": "0,,1"}, {("error", "gpu_ids")}),
    (rules.gpu_ids_is_auto_or_list, {"gpu_ids": ""}, {("error", "gpu_ids")}),
    (rules.gpu_ids_is_auto_or_list, {"gpu_ids": "all"}, {("error", "gpu_ids")}),
    (rules.lora_not_on_lm_head, {}, set()),
    (rules.lora_not_on_lm_head, {"lora_target_modules": "q_proj,v_proj"}, set()),
    (rules.lora_not_on_lm_head, {"lora_target_modules": "q_proj, lm_head"}, {("error", "lora_target_modules")}),
    (rules.lora_not_on_lm_head, {"lora_target_modules": "lm_head", "training_mode": "full"}, set()),
    (rules.save_steps_within_max_steps, {"max_steps": -1, "save_steps": 500}, set()),
    (rules.save_steps_within_max_steps, {"max_steps": 100, "save_steps": 50}, set()),
    (rules.save_steps_within_max_steps, {"max_steps": 100, "save_steps": 200}, {("warning", "save_steps")}),
]


@pytest.mark.parametrize(
    ("rule", "overrides", "expected"),
    CONFIG_CASES,
    ids=[f"{rule.__name__}-{overrides}" for rule, overrides, _ in CONFIG_CASES],
)
def test_config_rule_findings(rule, overrides, expected):
    assert findings(rule, config(**overrides)) == expected


# --- machine rules, table-driven: (rule, overrides, machine, expected findings) --------------------------

MACHINE_CASES = [
    (rules.gpus_exist, {}, CPU_ONLY, set()),
    (rules.gpus_exist, {"train_device": "cpu"}, CPU_ONLY, set()),
    (rules.gpus_exist, {"train_device": "cuda"}, CPU_ONLY, {("error", "train_device")}),
    (rules.gpus_exist, {"train_device": "cuda"}, TWO_AMPERE, set()),
    (rules.gpus_exist, {"gpu_ids": "1"}, TWO_AMPERE, set()),
    (rules.gpus_exist, {"gpu_ids": "0,1"}, TWO_AMPERE, set()),
    (rules.gpus_exist, {"gpu_ids": "2"}, TWO_AMPERE, {("error", "gpu_ids")}),
    (rules.gpus_exist, {"gpu_ids": "0"}, CPU_ONLY, {("error", "gpu_ids")}),
    (rules.gpus_exist, {"gpu_ids": "2,3"}, FOUR_AMPERE_TWO_VISIBLE, set()),
    (rules.gpus_exist, {"gpu_ids": "0"}, FOUR_AMPERE_TWO_VISIBLE, {("error", "gpu_ids")}),
    (rules.gpus_exist, {"gpu_ids": "5", "train_device": "cpu"}, TWO_AMPERE, set()),
    (rules.gpus_exist, {"train_device": "cuda"}, ALL_HIDDEN, {("error", "train_device")}),
    (rules.processes_fit_gpus, {"num_processes": "2"}, TWO_AMPERE, set()),
    (rules.processes_fit_gpus, {"num_processes": "3"}, TWO_AMPERE, {("error", "num_processes")}),
    (rules.processes_fit_gpus, {"num_processes": "2", "gpu_ids": "1"}, TWO_AMPERE, {("error", "num_processes")}),
    (rules.processes_fit_gpus, {"num_processes": "auto"}, TWO_AMPERE, set()),
    (rules.processes_fit_gpus, {"num_processes": "4"}, CPU_ONLY, set()),
    (rules.processes_fit_gpus, {"num_processes": "4", "train_device": "cpu"}, TWO_AMPERE, set()),
    (rules.cpu_only_note, {}, CPU_ONLY, {("warning", "train_device")}),
    (rules.cpu_only_note, {"train_device": "cpu"}, CPU_ONLY, set()),
    (rules.cpu_only_note, {}, TWO_AMPERE, set()),
    (rules.cpu_only_note, {}, ALL_HIDDEN, {("warning", "train_device")}),
    (rules.precision_supported, {"precision": "bf16"}, TWO_AMPERE, set()),
    (rules.precision_supported, {"precision": "bf16"}, ONE_VOLTA, {("error", "precision")}),
    (rules.precision_supported, {"precision": "fp16"}, ONE_VOLTA, set()),
    (rules.precision_supported, {"precision": "auto"}, ONE_VOLTA, set()),
    (rules.precision_supported, {"precision": "fp16"}, CPU_ONLY, {("error", "precision")}),
    (rules.precision_supported, {"precision": "fp16", "train_device": "cpu"}, TWO_AMPERE, {("error", "precision")}),
    (rules.precision_supported, {"precision": "fp32"}, CPU_ONLY, set()),
    (rules.precision_supported, {"precision": "bf16"}, CPU_ONLY, set()),
    # The GPU is not used when training on the CPU, so its bf16 support does not matter.
    (rules.precision_supported, {"precision": "bf16", "train_device": "cpu"}, ONE_VOLTA, set()),
    (rules.qlora_needs_cuda_and_bitsandbytes, {"training_mode": "lora"}, CPU_ONLY, set()),
    (rules.qlora_needs_cuda_and_bitsandbytes, {"training_mode": "qlora"}, CPU_ONLY, {("error", "training_mode")}),
    (
        rules.qlora_needs_cuda_and_bitsandbytes,
        {"training_mode": "qlora", "train_device": "cpu"},
        TWO_AMPERE,
        {("error", "training_mode")},
    ),
]


@pytest.mark.parametrize(
    ("rule", "overrides", "machine", "expected"),
    MACHINE_CASES,
    ids=[f"{rule.__name__}-{overrides}-{i}" for i, (rule, overrides, _, _) in enumerate(MACHINE_CASES)],
)
def test_machine_rule_findings(rule, overrides, machine, expected):
    assert findings(rule, config(**overrides), machine) == expected


@pytest.mark.parametrize(
    ("enabled", "key", "expected"),
    [(False, None, set()), (True, "secret", set()), (True, None, {("warning", "log_to_wandb")})],
)
def test_wandb_without_a_key_is_a_warning(monkeypatch, enabled, key, expected):
    if key is None:
        monkeypatch.delenv("WANDB_API_KEY", raising=False)
    else:
        monkeypatch.setenv("WANDB_API_KEY", key)
    assert findings(rules.wandb_key, config(log_to_wandb=enabled)) == expected


@pytest.mark.parametrize(("installed", "expected"), [(True, set()), (False, {("error", "training_mode")})])
def test_qlora_on_a_gpu_needs_bitsandbytes(monkeypatch, installed, expected):
    monkeypatch.setattr(rules, "has_package", lambda name: installed if name == "bitsandbytes" else True)
    assert findings(rules.qlora_needs_cuda_and_bitsandbytes, config(training_mode="qlora"), TWO_AMPERE) == expected


@pytest.mark.parametrize(
    ("strategy", "installed", "expected"),
    [
        ("ddp", False, set()),
        ("fsdp", False, set()),
        ("deepspeed_zero2", True, set()),
        ("deepspeed_zero2", False, {("error", "distributed_strategy")}),
        ("deepspeed_zero3", False, {("error", "distributed_strategy")}),
    ],
)
def test_deepspeed_strategies_need_deepspeed(monkeypatch, strategy, installed, expected):
    monkeypatch.setattr(rules, "has_package", lambda name: installed if name == "deepspeed" else True)
    p = config(distributed_strategy=strategy)
    assert findings(rules.strategy_packages_installed, p, TWO_AMPERE) == expected


@pytest.mark.parametrize(("free_gib", "expected"), [(50.0, set()), (1.0, set()), (0.5, {("error", "output_dir")})])
def test_enough_disk_needs_a_gib_free_where_outputs_go(monkeypatch, tmp_path, free_gib, expected):
    asked = []
    monkeypatch.setattr(rules, "free_disk_gib", lambda path: asked.append(path) or free_gib)
    p = config(output_dir=str(tmp_path / "outputs"))
    assert findings(rules.enough_disk, p, CPU_ONLY) == expected
    assert asked == [str(tmp_path / "outputs")]


def test_enough_disk_measures_the_real_disk_here(tmp_path):
    # A folder that does not exist yet is measured at its nearest existing parent.
    p = config(output_dir=str(tmp_path / "not" / "yet"))
    assert findings(rules.enough_disk, p, CPU_ONLY) <= {("error", "output_dir")}


# --- the model: config.json is read, weights never ------------------------------------------------------


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 512}')
    return str(folder)


def test_model_folder_that_exists_is_reachable(model_dir):
    assert findings(rules.model_is_reachable, config(model_name=model_dir)) == set()


def test_model_folder_that_does_not_exist_is_an_error(tmp_path):
    p = config(model_name=str(tmp_path / "missing"))
    assert findings(rules.model_is_reachable, p) == {("error", "model_name")}


def test_hub_model_missing_from_the_cache_is_an_error_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    rules.model_config.cache_clear()
    assert findings(rules.model_is_reachable, config(model_name="someone/not-cached-model")) == {
        ("error", "model_name")
    }
    rules.model_config.cache_clear()


def test_an_adapter_folder_is_not_a_model(model_dir, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"base_model_name_or_path": "Qwen/Qwen2.5-0.5B"}')
    assert findings(rules.model_is_not_an_adapter, config(model_name=model_dir)) == set()
    [line] = messages(rules.model_is_not_an_adapter, config(model_name=str(adapter)))
    assert "is a LoRA adapter" in line and "Qwen/Qwen2.5-0.5B" in line


@pytest.mark.parametrize(("length", "expected"), [(512, set()), (513, {("error", "maximum_sequence_length")})])
def test_sequence_length_must_fit_the_model_context(model_dir, length, expected):
    rules.model_config.cache_clear()
    p = config(model_name=model_dir, maximum_sequence_length=length)
    assert findings(rules.sequence_fits_model, p) == expected
    if expected:
        assert "Use at most 512" in messages(rules.sequence_fits_model, p)[0]


# --- outputs ---------------------------------------------------------------------------------------------


def test_a_finished_adapter_is_kept_unless_overwrite_output(tmp_path):
    adapter = tmp_path / "a"
    adapter.mkdir()
    (adapter / "training_summary.json").write_text("{}")
    ckpt = str(tmp_path / "ckpt")
    assert {(s, p.parameter) for s, p in rules.finished_adapter_kept(config(), str(adapter), ckpt)} == {
        ("error", "overwrite_output")
    }
    assert not list(rules.finished_adapter_kept(config(overwrite_output=True), str(adapter), ckpt))
    assert not list(rules.finished_adapter_kept(config(), str(tmp_path / "new"), ckpt))


def test_output_folders_must_be_writable(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        found = list(rules.outputs_writable(config(), str(locked / "a"), str(locked / "c")))
        # root can write anywhere; the rule is only observable as an ordinary user.
        import os

        if os.geteuid() != 0:
            assert [(s, p.parameter) for s, p in found] == [("error", "output_dir")]
        assert not list(rules.outputs_writable(config(), str(tmp_path / "a"), str(tmp_path / "c")))
    finally:
        locked.chmod(0o700)


def test_output_writability_is_judged_at_the_nearest_existing_folder(monkeypatch, tmp_path):
    asked = []
    monkeypatch.setattr(rules.os, "access", lambda path, mode: asked.append(path) or False)
    found = list(rules.outputs_writable(config(), str(tmp_path / "x" / "y"), str(tmp_path / "z")))
    assert [(s, p.parameter) for s, p in found] == [("error", "output_dir")]
    assert asked == [str(tmp_path)]
    found = list(rules.outputs_writable(config(adaptor_output_dir="/w/adaptors/a"), "/w/adaptors/a", "/w/c"))
    assert found[0][1].parameter == "adaptor_output_dir"


# --- the data (after preparation) -------------------------------------------------------------------------

STATS = {"rows_used": 100}


@pytest.mark.parametrize(
    ("overrides", "plan_processes", "expected"),
    [
        ({"batch_size": 4, "gradient_accumulation_steps": 4}, 2, set()),
        ({"batch_size": 16, "gradient_accumulation_steps": 4}, 2, {("warning", "gradient_accumulation_steps")}),
    ],
)
def test_effective_batch_larger_than_the_data_is_a_warning(overrides, plan_processes, expected):
    plan = rules.Plan(device="cpu", gpu_ids=[], num_processes=plan_processes, precision="fp32")
    found = rules.effective_batch_fits_dataset(config(**overrides), plan, STATS)
    assert {(s, p.parameter) for s, p in found} == expected


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"save_steps": 5, "num_train_epochs": 1}, set()),
        # 100 rows / (4 x 1) = 25 batches, / 4 accumulation = 7 steps per epoch.
        ({"save_steps": 8, "num_train_epochs": 1}, {("warning", "save_steps")}),
        ({"save_steps": 8, "num_train_epochs": 2}, set()),
        ({"save_steps": 800, "max_steps": 1000}, set()),
    ],
)
def test_no_checkpoint_before_the_end_is_a_warning(overrides, expected):
    plan = rules.Plan(device="cpu", gpu_ids=[], num_processes=1, precision="fp32")
    p = config(batch_size=4, gradient_accumulation_steps=4, **overrides)
    assert {(s, q.parameter) for s, q in rules.checkpoint_before_the_end(p, plan, STATS)} == expected


def test_planned_steps_counts_epochs_processes_and_accumulation():
    plan = rules.Plan(device="cuda", gpu_ids=[0, 1], num_processes=2, precision="bf16")
    assert rules.planned_steps(config(batch_size=4, gradient_accumulation_steps=2), plan, 100) == 7
    assert rules.planned_steps(config(max_steps=3), plan, 100) == 3


def test_data_warnings_are_collected_and_errors_raised():
    plan = rules.Plan(device="cpu", gpu_ids=[], num_processes=1, precision="fp32")
    warnings = []
    rules.check_data(config(batch_size=512, gradient_accumulation_steps=1), plan, STATS, warnings)
    assert [w.parameter for w in warnings] == ["gradient_accumulation_steps", "save_steps"]


def test_every_rule_has_table_cases():
    covered = {rule for rule, *_ in CONFIG_CASES} | {rule for rule, *_ in MACHINE_CASES}
    covered |= {rules.wandb_key, rules.strategy_packages_installed, rules.enough_disk}
    covered |= {rules.model_is_reachable, rules.model_is_not_an_adapter, rules.sequence_fits_model}
    covered |= {rules.strategy_needs_several_processes, rules.packing_without_flash_attention}
    covered |= {rules.finished_adapter_kept, rules.outputs_writable}
    covered |= {rules.effective_batch_fits_dataset, rules.checkpoint_before_the_end}
    covered |= {rules.chat_template_keeps_answers}
    # In test_data.py, on real prepared datasets:
    covered |= {rules.evaluation_named, rules.rows_with_nothing_to_train}
    assert set(rules.all_rules()) <= covered


@pytest.mark.parametrize(
    ("stats", "expected"),
    [
        ({"rows": 10}, []),
        ({"rows": 10, "reasoning_dropped": 4}, ["in 4 of 10 rows, so that reasoning is not trained"]),
        ({"rows": 10, "open_turns": 10}, ["without a special token in 10 of 10 rows, so the model never learns"]),
    ],
)
def test_chat_templates_that_drop_reasoning_or_never_stop_are_flagged(stats, expected):
    found = [w.line() for _, w in rules.chat_template_keeps_answers(config(), None, stats)]
    assert len(found) == len(expected)
    for line, part in zip(found, expected, strict=True):
        assert line.startswith("formatting_chat_template: the chat template") and part in line


def test_fsdp_or_deepspeed_with_one_process_is_a_warning():
    found = rules.strategy_needs_several_processes(config(distributed_strategy="fsdp", num_processes="1"), TWO_AMPERE)
    assert {(s, p.parameter) for s, p in found} == {("warning", "distributed_strategy")}
    found = rules.strategy_needs_several_processes(config(distributed_strategy="fsdp"), TWO_AMPERE)
    assert not list(found)


def test_rule_messages_name_the_parameter_what_is_wrong_and_the_fix():
    [line] = messages(rules.gpus_exist, config(gpu_ids="0"), FOUR_AMPERE_TWO_VISIBLE)
    assert line.startswith("gpu_ids: GPU 0 does not exist within CUDA_VISIBLE_DEVICES (visible: [2, 3]).")
    assert "Pick ids from the visible GPUs, or auto." in line
    [line] = messages(rules.processes_fit_gpus, config(num_processes="3"), TWO_AMPERE)
    assert line == (
        "num_processes: 3 processes but only 2 GPU(s) selected. Use num_processes=2 or auto (one process per GPU)."
    )


# --- the plan ------------------------------------------------------------------------------------------


def test_plan_on_a_cpu_only_machine_is_one_fp32_process():
    plan = rules.make_plan(config(), CPU_ONLY)
    assert without_speed(plan) == {"device": "cpu", "gpu_ids": [], "num_processes": 1, "precision": "fp32"}


def test_plan_on_cpu_runs_two_processes_when_asked():
    plan = rules.make_plan(config(num_processes="2"), CPU_ONLY)
    assert without_speed(plan) == {"device": "cpu", "gpu_ids": [], "num_processes": 2, "precision": "fp32"}


def test_plan_with_train_device_cpu_ignores_the_gpus():
    plan = rules.make_plan(config(train_device="cpu"), TWO_AMPERE)
    assert without_speed(plan) == {"device": "cpu", "gpu_ids": [], "num_processes": 1, "precision": "fp32"}


def test_plan_on_two_bf16_gpus_is_one_bf16_process_per_gpu():
    plan = rules.make_plan(config(), TWO_AMPERE)
    assert without_speed(plan) == {"device": "cuda", "gpu_ids": [0, 1], "num_processes": 2, "precision": "bf16"}


def test_plan_on_a_pre_ampere_gpu_picks_fp16_under_auto():
    plan = rules.make_plan(config(), ONE_VOLTA)
    assert plan.device == "cuda"
    assert plan.precision == "fp16"


def test_bf16_on_a_pre_ampere_gpu_is_an_error():
    with pytest.raises(InvalidConfig) as caught:
        rules.check(config(precision="bf16"), ONE_VOLTA, [])
    assert [p.parameter for p in caught.value.errors] == ["precision"]
    assert "Ampere" in caught.value.errors[0].message


def test_gpu_ids_one_gives_one_process_on_gpu_one():
    plan = rules.check(config(gpu_ids="1"), TWO_AMPERE, [])
    assert without_speed(plan) == {"device": "cuda", "gpu_ids": [1], "num_processes": 1, "precision": "bf16"}


def test_fewer_processes_than_gpus_uses_the_first_gpus():
    plan = rules.make_plan(config(num_processes="1"), TWO_AMPERE)
    assert plan.gpu_ids == [0]
    assert plan.num_processes == 1


def test_auto_gpu_ids_are_the_visible_ones():
    plan = rules.check(config(), FOUR_AMPERE_TWO_VISIBLE, [])
    assert plan.gpu_ids == [2, 3]
    assert plan.num_processes == 2


def test_gpu_ids_outside_cuda_visible_devices_are_an_error():
    with pytest.raises(InvalidConfig) as caught:
        rules.check(config(gpu_ids="0,1"), FOUR_AMPERE_TWO_VISIBLE, [])
    [found] = caught.value.errors
    assert found.parameter == "gpu_ids"
    assert "within CUDA_VISIBLE_DEVICES" in found.message


def test_num_processes_above_the_gpu_count_is_an_error():
    with pytest.raises(InvalidConfig) as caught:
        rules.check(config(num_processes="3"), TWO_AMPERE, [])
    assert [p.parameter for p in caught.value.errors] == ["num_processes"]


def test_hidden_gpus_mean_the_cpu():
    warnings: list = []
    plan = rules.check(config(), ALL_HIDDEN, warnings)
    assert plan.device == "cpu"
    assert [w.parameter for w in warnings] == ["train_device"]


def test_rank_environment_selects_the_plan_gpus():
    plan = rules.make_plan(config(), FOUR_AMPERE_TWO_VISIBLE)
    assert rules.rank_environment(plan)["CUDA_VISIBLE_DEVICES"] == "2,3"
    plan = rules.make_plan(config(gpu_ids="1"), TWO_AMPERE)
    assert rules.rank_environment(plan)["CUDA_VISIBLE_DEVICES"] == "1"
    assert rules.rank_environment(plan)["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"


def test_rank_environment_hides_every_gpu_on_cpu():
    plan = rules.make_plan(config(train_device="cpu"), TWO_AMPERE)
    assert rules.rank_environment(plan)["CUDA_VISIBLE_DEVICES"] == ""


# --- check() ---------------------------------------------------------------------------------------------


def test_check_raises_with_every_error_at_once():
    p = config(model_name="", max_steps=0, gpu_ids="zero", num_processes="none", precision="fp16")
    warnings: list = []
    with pytest.raises(InvalidConfig) as caught:
        rules.check(p, CPU_ONLY, warnings)
    found = {e.parameter for e in caught.value.errors}
    assert found == {"model_name", "max_steps", "gpu_ids", "num_processes", "precision"}
    assert len(str(caught.value).splitlines()) == len(caught.value.errors)


def test_check_collects_warnings_in_the_list_passed_in():
    earlier = rules.warning("learning_rat", "unknown parameter")[1]
    warnings = [earlier]
    p = config(learning_rate=0.5, training_mode="full", lora_r=64)
    plan = rules.check(p, CPU_ONLY, warnings)
    assert plan.device == "cpu"
    assert [w.parameter for w in warnings] == ["learning_rat", "learning_rate", "lora_r", "train_device"]


def test_check_keeps_warnings_alongside_errors():
    warnings: list = []
    with pytest.raises(InvalidConfig) as caught:
        rules.check(config(learning_rate=0.5, max_steps=0), CPU_ONLY, warnings)
    assert [e.parameter for e in caught.value.errors] == ["max_steps"]
    assert {w.parameter for w in caught.value.warnings} == {"learning_rate", "train_device"}
    assert caught.value.warnings == warnings


def test_check_without_a_machine_runs_only_config_rules():
    # A config can be checked on a laptop: machine rules (fp16 on CPU here) are skipped.
    assert rules.check(config(precision="fp16", gpu_ids="7"), None, []) is None


def test_deepspeed_needs_cuda_gpus():
    found = rules.strategy_packages_installed(config(distributed_strategy="deepspeed_zero2"), CPU_ONLY)
    assert [(s, p.parameter, "CUDA" in p.message) for s, p in found] == [("error", "distributed_strategy", True)]
