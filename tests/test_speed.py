"""Speed settings: what `auto` resolves to, the memory estimate behind gradient checkpointing, and that
packed rows stay apart under the attention kernels this machine has.

GPU machines are faked here (a `Machine` with `Gpu` entries, flash-attn/liger reported installed): this CPU
machine has no GPU and neither package. The packing test runs a real model and TRL's real collator.
"""

from __future__ import annotations

import pytest

from plugin_utils import params, planning, speed, validation, worker
from plugin_utils.machine import Gpu, Machine

from .conftest import SAMPLE, plan_of, spec_of
from .model_configs import QWEN2_5_0_5B

GIB = 2**30

LLAMA_7B = {  # Llama-2-7B
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
}


def config(**overrides) -> dict:
    p = params.defaults()
    p.update(model_name="m", dataset_name="d", adaptor_name="a")
    p.update(overrides)
    return p


def gpus(count: int, memory_gib: int = 80, capability: float = 9.0) -> list[Gpu]:
    return [Gpu(i, f"fake-gpu-{i}", memory_gib * 1024, capability) for i in range(count)]


def choose(p, *, device="cuda", gpu_list=None, precision="bf16", installed=(), model_config=None, monkeypatch=None):
    monkeypatch.setattr(speed, "has_package", lambda name: name in installed)
    gpu_list = gpus(2) if gpu_list is None and device == "cuda" else gpu_list or []
    return speed.choose(
        p,
        device=device,
        gpus=gpu_list,
        precision=precision,
        world_size=max(1, len(gpu_list)),
        cpu_count=16,
        processes_here=max(1, len(gpu_list)),
        model_config=model_config,
        ram_bytes=64 * GIB,
    )


# --- what auto resolves to -------------------------------------------------------------------------


def test_on_the_cpu_auto_means_sdpa_no_packing_no_workers_no_tf32(monkeypatch):
    s = choose(config(), device="cpu", precision="fp32", model_config=QWEN2_5_0_5B, monkeypatch=monkeypatch)
    assert (s.attention, s.packing, s.liger, s.tf32, s.dataloader_workers) == ("sdpa", False, False, False, 0)
    assert any("flash-attention not used: on the CPU" in why for why in s.reasons)


def test_on_the_cpu_auto_packs_small_batches_where_the_mask_is_cheap(monkeypatch):
    small = config(batch_size=4, maximum_sequence_length=256)
    s = choose(small, device="cpu", precision="fp32", monkeypatch=monkeypatch)
    assert s.packing
    assert any("mask over the batch's 1024 tokens" in why for why in s.reasons)
    large = config(batch_size=4, maximum_sequence_length=1024)
    s = choose(large, device="cpu", precision="fp32", monkeypatch=monkeypatch)
    assert not s.packing
    assert any("batch of 4096 tokens, slower than padding above 1024" in why for why in s.reasons)


def test_flash_attention_installed_on_ampere_turns_packing_tf32_and_workers_on(monkeypatch):
    s = choose(config(), installed={"flash_attn"}, model_config=QWEN2_5_0_5B, monkeypatch=monkeypatch)
    assert (s.attention, s.packing, s.tf32) == ("flash_attention_2", True, True)
    assert s.dataloader_workers == 2  # 16 CPUs for 2 processes: 2 each, one core left for the rank itself


def test_without_flash_attn_auto_packing_stays_off_and_says_why(monkeypatch):
    s = choose(config(), model_config=QWEN2_5_0_5B, monkeypatch=monkeypatch)
    assert (s.attention, s.packing) == ("sdpa", False)
    assert any("flash-attn is not installed" in why for why in s.reasons)
    assert any(why.startswith("packing: off (without flash-attention") for why in s.reasons)


def test_flash_attention_needs_ampere_and_half_precision(monkeypatch):
    volta = gpus(1, 32, 7.0)
    assert (
        choose(config(), gpu_list=volta, precision="fp16", installed={"flash_attn"}, monkeypatch=monkeypatch).attention
        == "sdpa"
    )
    assert choose(config(), precision="fp32", installed={"flash_attn"}, monkeypatch=monkeypatch).attention == "sdpa"
    assert not choose(config(), gpu_list=volta, precision="fp16", monkeypatch=monkeypatch).tf32


def test_liger_only_when_installed_and_on_cuda(monkeypatch):
    assert choose(config(), installed={"liger_kernel"}, monkeypatch=monkeypatch).liger
    assert not choose(config(), monkeypatch=monkeypatch).liger
    cpu = choose(config(), device="cpu", precision="fp32", installed={"liger_kernel"}, monkeypatch=monkeypatch)
    assert not cpu.liger


def test_sft_trainer_disable_hides_an_installed_kernel(monkeypatch):
    monkeypatch.setenv("SFT_TRAINER_DISABLE", "flash_attn, liger_kernel")
    s = choose(config(), installed={"flash_attn", "liger_kernel"}, monkeypatch=monkeypatch)
    assert (s.attention, s.liger) == ("sdpa", False)
    monkeypatch.setenv("SFT_TRAINER_DISABLE", "liger_kernel")
    s = choose(config(), installed={"flash_attn", "liger_kernel"}, monkeypatch=monkeypatch)
    assert (s.attention, s.liger) == ("flash_attention_2", False)


def test_explicit_values_win_over_auto(monkeypatch):
    s = choose(
        config(packing="true", gradient_checkpointing="false"), device="cpu", precision="fp32", monkeypatch=monkeypatch
    )
    assert (s.packing, s.gradient_checkpointing) == (True, False)
    assert "packing: on (set)" in s.reasons and "gradient checkpointing: off (set)" in s.reasons
    s = choose(config(packing="false"), installed={"flash_attn"}, monkeypatch=monkeypatch)
    assert not s.packing


def test_gradient_checkpointing_auto_is_off_when_the_estimate_fits_with_room(monkeypatch):
    p = config(batch_size=4, maximum_sequence_length=2048)
    s = choose(p, model_config=QWEN2_5_0_5B, monkeypatch=monkeypatch)
    assert not s.gradient_checkpointing
    [why] = [w for w in s.reasons if w.startswith("gradient checkpointing")]
    assert "GiB estimated per GPU without it, 80.0 GiB available" in why


def test_gradient_checkpointing_auto_is_on_when_memory_is_short(monkeypatch):
    p = config(batch_size=8, maximum_sequence_length=4096)
    s = choose(p, gpu_list=gpus(2, 24, 8.6), model_config=LLAMA_7B, monkeypatch=monkeypatch)
    assert s.gradient_checkpointing
    assert any("on, since it does not fit" in why for why in s.reasons)


def test_gradient_checkpointing_auto_is_on_when_the_model_size_is_unknown(monkeypatch):
    s = choose(config(), model_config=None, monkeypatch=monkeypatch)
    assert s.gradient_checkpointing
    assert any("size is unknown" in why for why in s.reasons)


def test_the_plan_holds_what_auto_switches_became_and_the_parameters_stay_as_asked(tiny_model):
    p = params.Params(
        config(model_name=tiny_model, dataset_name=str(SAMPLE), train_device="cpu", maximum_sequence_length=256)
    )
    plan = planning.build(p, Machine(cpu_count=2, ram_bytes=8 * GIB))
    assert plan.speed.packing is True and plan.gradient_checkpointing is False  # 4 x 256 tokens per batch
    assert plan.as_dict()["speed"]["gradient_checkpointing"] is False
    assert p["packing"] == p["gradient_checkpointing"] == "auto", "the parameters stay what was asked"
    with pytest.raises(TypeError):
        p["packing"] = True  # frozen


# --- the memory estimate ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "published"),
    [(QWEN2_5_0_5B, 494_032_768), (LLAMA_7B, 6_738_415_616)],
    ids=["qwen2.5-0.5b", "llama-2-7b"],
)
def test_parameter_count_from_config_matches_the_published_size(shape, published):
    assert speed.parameter_count(shape) == pytest.approx(published, rel=0.01)


def test_the_estimate_moves_the_right_way_with_each_setting():
    base = config(batch_size=4, maximum_sequence_length=2048)

    def estimate(p=base, **kw):
        options = {"precision": "bf16", "world_size": 2, "checkpointing": False, **kw}
        return speed.estimate_memory(LLAMA_7B, p, **options)

    plain = estimate()
    assert estimate(checkpointing=True) < plain
    assert estimate(liger=True) < plain
    assert estimate(config(batch_size=4, maximum_sequence_length=1024)) < plain
    assert estimate(config(batch_size=4, maximum_sequence_length=2048, training_mode="qlora")) < plain
    full = config(batch_size=4, maximum_sequence_length=2048, training_mode="full")
    no_dropout = config(batch_size=4, maximum_sequence_length=2048, lora_dropout=0.0)
    # Full training adds gradients and two Adam moments in bf16 for every weight.
    assert estimate(full) - estimate(no_dropout) == pytest.approx(speed.parameter_count(LLAMA_7B) * 6, rel=0.02)
    sharded = config(batch_size=4, maximum_sequence_length=2048, training_mode="full", distributed_strategy="fsdp")
    assert estimate(sharded) < estimate(full)
    assert estimate(precision="fp32") > plain
    assert speed.estimate_memory({"model_type": "x"}, base, precision="bf16", world_size=1, checkpointing=False) is None


# --- parameters and rules --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        *[(True, "true"), ("on", "true"), ("YES", "true"), (1, "true")],
        *[(False, "false"), ("off", "false"), ("0", "false"), ("auto", "auto"), (" Auto ", "auto")],
    ],
)
def test_auto_switches_take_every_boolean_spelling(raw, expected):
    values = params.read({"packing": raw, "gradient_checkpointing": raw}, headless=False).params
    assert values["packing"] == values["gradient_checkpointing"] == expected


def test_an_auto_switch_rejects_other_values_naming_the_choices():
    errors = params.read({"packing": "maybe"}, headless=False).errors
    [line] = [e.line() for e in errors if e.parameter == "packing"]
    assert "'maybe' is not one of auto, true, false" in line


def test_packing_forced_on_without_flash_attention_is_a_warning_where_it_is_likely_slower():
    big = config(packing="true", train_device="cpu", batch_size=8, maximum_sequence_length=1024)
    found = list(validation.packing_without_flash_attention(big, Machine()))
    assert [(severity, p.parameter) for severity, p in found] == [("warning", "packing")]
    assert "(8192 tokens)" in found[0][1].line()
    small = config(packing="true", train_device="cpu", batch_size=4, maximum_sequence_length=128)
    assert not list(validation.packing_without_flash_attention(small, Machine()))
    on_gpu = config(packing="true", batch_size=4, maximum_sequence_length=128)
    assert list(validation.packing_without_flash_attention(on_gpu, Machine(gpus=gpus(1))))
    assert not list(validation.packing_without_flash_attention(config(packing="auto"), Machine()))


def test_planned_steps_count_packs_when_packing():
    stats = {"rows_used": 1000, "total_tokens": 1000 * 100, "eval_rows": 0}
    p = config(batch_size=4, maximum_sequence_length=1000, save_steps=100, num_train_epochs=1, packing="true")
    p["gradient_accumulation_steps"] = 1
    plan = planning.build(p, Machine())
    # 100k tokens fill about 100 packs of 1000 tokens: 25 steps, so save_steps=100 never saves.
    assert [f[1].parameter for f in validation.checkpoint_before_the_end(p, plan, stats)] == ["save_steps"]
    p["packing"] = "false"  # 250 steps unpacked: a checkpoint at 100 and 200
    assert not list(validation.checkpoint_before_the_end(p, planning.build(p, Machine()), stats))


# --- the worker gets them --------------------------------------------------------------------------


def test_the_worker_passes_the_speed_settings_to_trl(tmp_path):
    chosen = speed.Speed(packing=True, gradient_checkpointing=False, dataloader_workers=2)
    args = worker._sft_config(spec_of(str(tmp_path), plan=plan_of(speed=chosen)))
    assert args.packing and args.padding_free is False  # TRL turns padding-free on itself for BFD packing
    assert args.packing_strategy == "bfd"
    assert not args.activation_checkpointing
    assert args.dataloader_num_workers == 2 and args.dataloader_persistent_workers
    assert not args.use_liger_kernel and args.tf32 is None


# --- packed rows stay apart ------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_padding_free_rows_give_the_loss_of_separate_rows(tiny_model, attention):
    # TRL's own collator in padding-free mode flattens a BFD pack into one row with restarting position ids;
    # transformers must keep the rows apart. The loss of the pack must equal the token-weighted loss of the
    # rows run one by one, the way SFTTrainer calls the model (use_cache=False).
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attention).eval()
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(5, 300, (n,), generator=generator).tolist() for n in (11, 7, 16)]
    labels = [[-100] * 3 + row[3:] for row in rows]  # a masked prompt, like completion-only rows
    flat = [token for row in rows for token in row]
    pack = {"input_ids": flat, "labels": [t for row in labels for t in row], "seq_lengths": [len(r) for r in rows]}
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)([pack])
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        separate = [model(input_ids=torch.tensor([r]), use_cache=False).logits for r in rows]
    assert torch.allclose(packed, torch.cat(separate, dim=1), atol=1e-5)


def test_a_model_that_cannot_use_flash_attention_falls_back_to_sdpa(tiny_model, capfd):
    # Here flash-attn is not installed, so transformers refuses flash_attention_2 just as it does for an
    # architecture without support: the worker loads the model with SDPA and says so.
    chosen = speed.Speed(attention="flash_attention_2")
    model = worker._load_model(spec_of(str(tiny_model), {"model_name": tiny_model}, plan_of(speed=chosen)))
    assert model.config._attn_implementation == "sdpa"
    assert "flash-attention is not usable for this model" in capfd.readouterr().err
