"""The entry point: importing starts nothing; --check answers quickly with JSON and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

from .conftest import ROOT, base_config, last_json, run_main, write_config


def test_importing_main_starts_nothing_and_imports_no_torch(tmp_path):
    script = "import sys, main; assert 'torch' not in sys.modules; assert 'trl' not in sys.modules; print('ok')"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
    assert not (tmp_path / "tflhome" / "workspace").exists()


def test_check_reports_the_plan_without_torch_or_a_job(tiny_model, tmp_path):
    config = base_config(tiny_model, tmp_path, num_processes=2)
    proc = run_main(["--config", write_config(tmp_path, config), "--check", "--json"])
    assert proc.returncode == 0, proc.stderr
    report = last_json(proc.stdout)
    assert report["ok"] is True and report["errors"] == []
    plan = {k: v for k, v in report["plan"].items() if k != "speed"}
    assert plan == {"device": "cpu", "gpu_ids": [], "num_processes": 2, "precision": "fp32"}
    speed = report["plan"]["speed"]
    assert (speed["attention"], speed["packing"], speed["gradient_checkpointing"]) == ("sdpa", True, False)
    assert any(why.startswith("gradient checkpointing: off (set)") for why in speed["reasons"])
    assert not (tmp_path / "tflhome" / "workspace").exists(), "--check creates no job"
    assert not (tmp_path / "outputs").exists()


def test_check_reports_every_problem_at_once_with_exit_code_2(tiny_model, tmp_path):
    config = base_config(tiny_model, tmp_path, learning_rat=1e-4, max_steps=0, batch_size="many")
    proc = run_main(["--config", write_config(tmp_path, config), "--check", "--json"])
    assert proc.returncode == 2
    report = last_json(proc.stdout)
    assert report["ok"] is False
    by_parameter = {e["parameter"]: e["message"] for e in report["errors"]}
    assert "Did you mean 'learning_rate'?" in by_parameter["learning_rat"]
    assert "batch_size" in by_parameter
    assert "learning_rat: unknown parameter" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_dry_run_previews_the_trained_text(tiny_model, tmp_path):
    config = base_config(tiny_model, tmp_path)
    proc = run_main(["--config", write_config(tmp_path, config), "--dry-run", "--json"])
    assert proc.returncode == 0, proc.stderr
    report = last_json(proc.stdout)
    assert report["dataset"]["format"] == "template"
    assert report["dataset"]["rows"] == 190
    first = report["samples"][0]
    first_row = json.loads((ROOT / "demo" / "sample_data.jsonl").read_text().splitlines()[0])
    assert first["text"] == f"Question: {first_row['prompt']}\nAnswer:{first_row['completion']}"
    assert first["trained_text"] == first_row["completion"] + "<|endoftext|>"
    assert not (tmp_path / "tflhome" / "workspace").exists()


def test_a_bad_adaptor_name_is_reported_with_the_other_problems(tiny_model, tmp_path):
    config = base_config(tiny_model, tmp_path, adaptor_name="../escape", max_steps=0, lora_r="many")
    proc = run_main(["--config", write_config(tmp_path, config), "--check", "--json"])
    assert proc.returncode == 2, proc.stderr
    errors = last_json(proc.stdout)["errors"]
    assert sorted(e["parameter"] for e in errors) == ["adaptor_name", "lora_r", "max_steps"]
    assert "Traceback" not in proc.stderr


def test_a_missing_adaptor_name_is_required(tiny_model, tmp_path):
    config = base_config(tiny_model, tmp_path)
    config.pop("adaptor_name")
    proc = run_main(["--config", write_config(tmp_path, config), "--check", "--json"])
    assert proc.returncode == 2
    assert last_json(proc.stdout)["errors"][0]["parameter"] == "adaptor_name"
