"""Speed settings: what `auto` resolves to, the memory estimate behind gradient checkpointing, and that
packed rows stay apart under the attention kernels this machine has.

GPU machines are faked here (a `Machine` with `Gpu` entries, flash-attn/liger reported installed): this CPU
machine has no GPU and neither package. The packing test runs a real model and TRL's real collator.
"""

from __future__ import annotations

import dataclasses
import sys

import pytest

from plugin_utils import params, planning, speed, validation
from plugin_utils.machine import Gpu, Machine

from .conftest import SAMPLE, params_of, plan_of, spec_of, stats_of
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


def config(**overrides) -> params.Params:
    return params_of(**overrides)


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


# A stand-in for liger-kernel 0.8.5, whose Triton kernels cannot run on this CPU machine: its table of model types
# as liger_kernel/transformers/monkey_patch.py writes it (cut short), and its instance-patching entry point, which
# records what it was asked to do.
LIGER_MONKEY_PATCH = """
CALLS = []


def _apply_liger_kernel_to_instance(model, **kwargs):
    CALLS.append((type(model).__name__, kwargs))


apply_liger_kernel_to_gemma3 = apply_liger_kernel_to_llama = apply_liger_kernel_to_qwen2 = None


MODEL_TYPE_TO_APPLY_LIGER_FN = {
    "gemma3": apply_liger_kernel_to_gemma3,
    "llama": apply_liger_kernel_to_llama,
    "qwen2": apply_liger_kernel_to_qwen2,
}
"""


@pytest.fixture
def liger_stand_in(monkeypatch, tmp_path):
    package = tmp_path / "liger_kernel" / "transformers"
    package.mkdir(parents=True)
    (tmp_path / "liger_kernel" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("from .monkey_patch import _apply_liger_kernel_to_instance\n")
    (package / "monkey_patch.py").write_text(LIGER_MONKEY_PATCH)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("liger_kernel", "liger_kernel.transformers", "liger_kernel.transformers.monkey_patch"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return tmp_path


def test_liger_is_on_only_for_a_model_type_it_has_kernels_for(monkeypatch, liger_stand_in):
    """liger-kernel applies nothing, silently, to a model type missing from its table, while the plan said "on".
    Its table is read from the installed package's source, never imported (which needs torch and Triton)."""
    assert speed.liger_model_types() == {"gemma3", "llama", "qwen2"}
    on = choose(config(), installed={"liger_kernel"}, model_config=QWEN2_5_0_5B, monkeypatch=monkeypatch)
    assert on.liger
    assert "liger kernels: on (installed; fused RMSNorm, RoPE and SwiGLU for qwen2)" in on.reasons
    gpt2 = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "vocab_size": 50257}
    off = choose(config(), installed={"liger_kernel"}, model_config=gpt2, monkeypatch=monkeypatch)
    assert not off.liger
    assert "liger kernels: off (liger-kernel has no kernels for model_type gpt2)" in off.reasons


def test_the_worker_applies_liger_itself_instead_of_trls_deprecated_switch(
    tiny_model, tmp_path, liger_stand_in, worker
):
    """TRL 1.16 deprecates use_liger_kernel (a FutureWarning in every rank's log, gone in TRL 2): the worker patches
    the loaded model with liger's own instance function, its cross-entropy kernels off (TRL's fused LM head computes
    the loss), and TRL's switch stays off."""
    spec = spec_of(str(tmp_path), plan=plan_of(speed=speed.Speed(liger=True)), model_name=tiny_model)
    assert worker._sft_config(spec).use_liger_kernel is False
    model = worker._load_model(spec)
    from liger_kernel.transformers import monkey_patch

    [(patched, kwargs)] = monkey_patch.CALLS
    assert patched == type(model).__name__ == "LlamaForCausalLM"
    assert kwargs == {
        "rope": True,
        "rms_norm": True,
        "swiglu": True,
        "cross_entropy": False,
        "fused_linear_cross_entropy": False,
    }


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
    assert "GiB estimated per GPU without it, 80.0 GiB free" in why


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
    p = config(model_name=tiny_model, dataset_name=str(SAMPLE), train_device="cpu", maximum_sequence_length=256)
    plan = planning.build(p, Machine(cpu_count=2, ram_bytes=8 * GIB))
    assert plan.speed.packing is True and plan.gradient_checkpointing is False  # 4 x 256 tokens per batch
    assert plan.as_dict()["speed"]["gradient_checkpointing"] is False
    assert p.packing is p.gradient_checkpointing is params.AUTO, "the parameters stay what was asked"
    assert p.as_dict()["packing"] == "auto"
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.packing = True


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
        options = {"precision": "bf16", "world_size": 2, "checkpointing": False, "device": "cuda", **kw}
        return speed.estimate_memory(LLAMA_7B, p, **options)

    plain = estimate()
    assert estimate(checkpointing=True) < plain
    assert estimate(config(batch_size=4, maximum_sequence_length=1024)) < plain
    assert estimate(config(batch_size=4, maximum_sequence_length=2048, training_mode="qlora")) < plain
    assert estimate(config(batch_size=4, maximum_sequence_length=2048, lora_target_modules="q_proj,v_proj")) < plain
    full = config(batch_size=4, maximum_sequence_length=2048, training_mode="full")
    no_dropout = config(batch_size=4, maximum_sequence_length=2048, lora_dropout=0.0)
    # Full training under DDP: fp32 weights, gradients and two Adam moments (16), the bf16 copy autocast keeps (2)
    # and DDP's gradient buckets (4), against LoRA's frozen bf16 weights (2).
    assert estimate(full) - estimate(no_dropout) == pytest.approx(speed.parameter_count(LLAMA_7B) * 20, rel=0.02)
    sharded = config(batch_size=4, maximum_sequence_length=2048, training_mode="full", distributed_strategy="fsdp")
    assert estimate(sharded) < estimate(full)
    assert estimate(precision="fp32") > plain
    options = {"precision": "bf16", "world_size": 1, "checkpointing": False, "device": "cuda"}
    assert speed.estimate_memory({"model_type": "x"}, base, **options) is None


def test_the_logits_are_counted_as_trls_chunked_lm_head_builds_them(monkeypatch):
    """TRL 1.16 never builds the (tokens x vocabulary) logits: its fused LM head projects 4096 tokens onto 32768
    vocabulary entries at a time. Counting full logits put 23 GiB of 56 GiB on Qwen2.5-0.5B at 8 x 2048, which turned
    gradient checkpointing on (56.4 x 1.5 > 0.85 x 80 GiB) where it is not needed (about 20-30% slower)."""
    p = config(batch_size=8, maximum_sequence_length=2048)
    options = {"precision": "bf16", "world_size": 1, "checkpointing": False}
    needed = speed.estimate_memory(QWEN2_5_0_5B, p, **options, device="cuda")
    assert 30 * GIB < needed < 36 * GIB
    tokens = 8 * 2048
    logits = speed.logits_memory(speed._shape(QWEN2_5_0_5B), tokens, 2, "cuda")
    assert logits == 4096 * 32768 * 2 + tokens * (4 * 896 + 32)  # one bf16 tile, the fp32 hidden-state gradient
    assert logits < 0.5 * GIB  # full logits with their fp32 copies: 18.5 GiB
    # Without Triton, on the CPU, torch folds each tile through fp32 temporaries of its size: 8.4 to 8.8 measured.
    cpu = speed.logits_memory(speed._shape(QWEN2_5_0_5B), tokens, 4, "cpu")
    assert cpu == 4096 * 32768 * 4 * 9 + tokens * (4 * 896 + 32)
    s = choose(p, gpu_list=gpus(1), model_config=QWEN2_5_0_5B, monkeypatch=monkeypatch)
    assert not s.gradient_checkpointing


@pytest.mark.parametrize(
    ("strategy", "world", "expected"),
    [
        ("ddp", 1, 18),  # fp32 weights, gradients, moments; autocast's bf16 copy
        ("ddp", 2, 22),  # and DDP's gradient buckets
        ("fsdp", 4, 4),  # accelerate upcasts trainable weights to fp32: 16, sharded
        ("deepspeed_zero2", 4, 7),  # bf16 weights and gradients, fp32 master and moments sharded
        ("deepspeed_zero3", 4, 4),  # all of it sharded
    ],
)
def test_full_fine_tuning_counts_what_each_strategy_keeps_per_parameter(strategy, world, expected):
    """Full fine-tuning was counted at 8 bytes a parameter (bf16 weights, gradients and moments) under every
    strategy, half the real figure, so auto switched checkpointing off for runs that then ran out of memory."""
    assert speed.full_training_bytes(strategy, 2, world) == expected
    p = config(training_mode="full", distributed_strategy=strategy, batch_size=1, maximum_sequence_length=2048)
    lora = config(distributed_strategy=strategy, batch_size=1, maximum_sequence_length=2048, lora_dropout=0.0)
    options = {"precision": "bf16", "world_size": world, "checkpointing": True, "device": "cuda"}
    extra = speed.estimate_memory(LLAMA_7B, p, **options) - speed.estimate_memory(LLAMA_7B, lora, **options)
    base = 2 / (world if strategy in ("fsdp", "deepspeed_zero3") else 1)  # LoRA's frozen bf16 weights
    assert extra == pytest.approx(speed.parameter_count(LLAMA_7B) * (expected - base), rel=0.02)


def test_full_fine_tuning_under_ddp_keeps_fp32_weights_that_autocast_computes_in_half_precision():
    """bf16 weights lose every update below their resolution, and fp16 weights make the loss scaler raise
    "Attempting to unscale FP16 gradients": full fine-tuning under ddp (or one process) loads fp32 weights, as TRL
    does by default. FSDP and DeepSpeed keep fp32 master weights of their own; LoRA's adapters are fp32 already."""
    for precision in ("bf16", "fp16"):
        assert speed.weights_precision("full", "ddp", precision) == "fp32"
        assert speed.weights_precision("lora", "ddp", precision) == precision
        assert speed.weights_precision("qlora", "ddp", precision) == precision
        assert speed.weights_precision("full", "fsdp", precision) == precision
        assert speed.weights_precision("full", "deepspeed_zero3", precision) == precision
    plan = planning.build(config(training_mode="full", precision="bf16", train_device="cpu"), Machine())
    assert (plan.precision, plan.weights_precision) == ("bf16", "fp32")
    assert any(why.startswith("weights: fp32, computed in bf16") for why in plan.reasons)


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
    typed = {"true": True, "false": False, "auto": params.AUTO}[expected]
    assert values.packing is values.gradient_checkpointing is typed
    assert values.as_dict()["packing"] == values.as_dict()["gradient_checkpointing"] == expected


def test_an_auto_switch_rejects_other_values_naming_the_choices():
    errors = params.read({"packing": "maybe"}, headless=False).errors
    [line] = [e.line() for e in errors if e.parameter == "packing"]
    assert "'maybe' is not one of auto, true, false" in line


def test_packing_forced_on_without_flash_attention_is_a_warning_where_it_is_likely_slower():
    big = config(packing="true", train_device="cpu", batch_size=8, maximum_sequence_length=1024)
    found = list(validation.packing_without_flash_attention(big, planning.build(big, Machine())))
    assert [(severity, p.parameter) for severity, p in found] == [("warning", "packing")]
    assert "(8192 tokens)" in found[0][1].line()
    small = config(packing="true", train_device="cpu", batch_size=4, maximum_sequence_length=128)
    assert not list(validation.packing_without_flash_attention(small, planning.build(small, Machine())))
    on_gpu = config(packing="true", batch_size=4, maximum_sequence_length=128)
    assert list(validation.packing_without_flash_attention(on_gpu, planning.build(on_gpu, Machine(gpus=gpus(1)))))
    assert not list(
        validation.packing_without_flash_attention(config(packing="auto"), planning.build(config(), Machine()))
    )


def test_planned_steps_count_packs_when_packing():
    stats = stats_of(rows_used=1000, total_tokens=1000 * 100, eval_rows=0)
    p = config(
        batch_size=4,
        maximum_sequence_length=1000,
        save_steps=100,
        num_train_epochs=1,
        packing="true",
        gradient_accumulation_steps=1,
    )
    plan = planning.build(p, Machine())
    # 100k tokens fill about 100 packs of 1000 tokens: 25 steps, so save_steps=100 never saves.
    assert [f[1].parameter for f in validation.checkpoint_before_the_end(p, plan, stats)] == ["save_steps"]
    p = p.replace(packing="false")  # 250 steps unpacked: a checkpoint at 100 and 200
    assert not list(validation.checkpoint_before_the_end(p, planning.build(p, Machine()), stats))


# --- the worker gets them --------------------------------------------------------------------------


def test_the_worker_passes_the_speed_settings_to_trl(tmp_path, worker):
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


def test_a_model_that_cannot_use_flash_attention_falls_back_to_sdpa(tiny_model, capfd, worker):
    # Here flash-attn is not installed, so transformers refuses flash_attention_2 just as it does for an
    # architecture without support: the worker loads the model with SDPA and says so.
    chosen = speed.Speed(attention="flash_attention_2")
    model = worker._load_model(spec_of(str(tiny_model), {"model_name": tiny_model}, plan_of(speed=chosen)))
    assert model.config._attn_implementation == "sdpa"
    assert "flash-attention is not usable for this model" in capfd.readouterr().err
