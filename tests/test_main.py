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
    plan = report["plan"]
    assert (plan["device"], plan["gpu_ids"], plan["num_processes"], plan["precision"]) == ("cpu", [], 2, "fp32")
    assert plan["world_size"] == 2 and plan["completion_only"] is None  # the loss mode needs the data's format
    assert [why.split(":")[0] for why in plan["reasons"][:4]] == ["device", "processes", "precision", "strategy"]
    speed = report["plan"]["speed"]
    assert (speed["attention"], speed["packing"], speed["gradient_checkpointing"]) == ("sdpa", True, False)
    assert any(why.startswith("gradient checkpointing: off (set)") for why in speed["reasons"])
    assert not (tmp_path / "tflhome" / "workspace").exists(), "--check creates no job"
    assert not (tmp_path / "outputs").exists()


CHECK_AND_LIST_IMPORTS = """
import sys, main
try:
    main.main(["--config", sys.argv[1], "--check"])
except SystemExit as exc:
    assert not exc.code, exc.code
heavy = ("torch", "transformers", "trl", "datasets", "tokenizers", "jinja2", "asyncio", "lab", "psutil", "pynvml")
heavy += ("PIL", "tensorboardX", "trackio", "wandb")
print(" ".join(name for name in heavy if name in sys.modules))
"""


def test_check_imports_no_library_it_does_not_use(tiny_model, tmp_path):
    """--check answers in a fraction of a second because it imports what it checks with and nothing else: no ML
    library, no data code, no lab SDK, no NVML without an NVIDIA driver (none here), and Jinja only to parse a
    template that has more than text and `{{ column }}` outputs; the trackers report_to names are looked up, never
    imported."""
    config = base_config(tiny_model, tmp_path)  # "Question: {{ prompt }}\nAnswer:{{ completion }}"
    config["report_to"] = "tensorboard,trackio,wandb"
    untemplated = {k: v for k, v in config.items() if k != "formatting_template"}
    tagged = {**config, "formatting_template": "{% if prompt %}Q: {{ prompt }}{% endif %}\nA: {{ completion }}"}
    imported = {}
    for name, given in (("plain", config), ("tagged", tagged), ("none", untemplated)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(given))
        proc = subprocess.run(
            [sys.executable, "-c", CHECK_AND_LIST_IMPORTS, str(path)], capture_output=True, text=True, cwd=str(ROOT)
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        imported[name] = proc.stdout.split()
    assert imported == {"plain": [], "tagged": ["jinja2"], "none": []}


def test_check_reports_every_problem_at_once_with_exit_code_2(tiny_model, tmp_path):
    config = base_config(
        tiny_model, tmp_path, learning_rat=1e-4, max_steps=0, batch_size="many", dataset_name="/nonexistent/train.jsonl"
    )
    proc = run_main(["--config", write_config(tmp_path, config), "--check", "--json"])
    assert proc.returncode == 2
    report = last_json(proc.stdout)
    assert report["ok"] is False
    by_parameter = {e["parameter"]: e["message"] for e in report["errors"]}
    assert "Did you mean 'learning_rate'?" in by_parameter["learning_rat"]
    assert "batch_size" in by_parameter
    # A local path that cannot exist is refused without reading any data.
    assert by_parameter["dataset_name"].startswith("/nonexistent/train.jsonl does not exist.")
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
    assert "".join(first["trained_tokens"]).replace("Ġ", " ") == first_row["completion"] + "<|endoftext|>"
    assert report["dataset"]["eval_rows"] == 0
    assert not (tmp_path / "tflhome" / "workspace").exists()


def test_a_bad_row_deep_in_the_data_is_exit_2_naming_it(tiny_model, tmp_path):
    rows = [json.loads(line) for line in (ROOT / "demo" / "sample_data.jsonl").read_text().splitlines()]
    rows[150]["completion"] = 42
    data_file = tmp_path / "rows.jsonl"
    data_file.write_text("\n".join(json.dumps({**r, "completion": str(r["completion"])}) for r in rows[:150]))
    with data_file.open("a") as handle:
        handle.write("\n" + json.dumps({"prompt": "p", "completion": None}))
    config = base_config(tiny_model, tmp_path, dataset_name=str(data_file), formatting_template="")
    proc = run_main(["--config", write_config(tmp_path, config), "--dry-run", "--json"])
    assert proc.returncode == 2, proc.stderr
    assert last_json(proc.stdout)["errors"] == [
        {
            "parameter": "dataset_name",
            "message": "row 151, column 'completion' is empty (null). Give every row a completion, or remove the row.",
        }
    ]
    assert "Traceback" not in proc.stderr and "training failed" not in proc.stderr


def test_check_refuses_a_chat_template_that_is_not_jinja(tiny_model, tmp_path):
    config = base_config(tiny_model, tmp_path, formatting_chat_template="{% for m in messages %}{{ m.content }")
    proc = run_main(["--config", write_config(tmp_path, config), "--check", "--json"])
    assert proc.returncode == 2
    [error] = last_json(proc.stdout)["errors"]
    assert error["parameter"] == "formatting_chat_template" and error["message"].startswith("is not valid Jinja")


def test_an_unexpected_failure_logs_its_real_traceback(caplog):
    from plugin_utils import cli

    try:
        {}["missing"]
    except KeyError as exc:
        caught = exc
    from plugin_utils.host import NullSink

    assert cli.conclude(NullSink(), False, None, caught) == 1  # reported after the except block ended, as main() does
    err = caplog.text
    assert "Traceback (most recent call last)" in err and "KeyError: 'missing'" in err
    assert "NoneType: None" not in err


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


def test_a_mistyped_flag_is_refused_with_the_flag_it_resembles_and_trains_nothing(tiny_model, tmp_path):
    # Unknown flags were once ignored, so `--dry_run` started a real training run.
    config = write_config(tmp_path, base_config(tiny_model, tmp_path))
    proc = run_main(["--config", config, "--dry_run", "--chek", "--preview=2", "extra", "--json"])
    assert proc.returncode == 2, proc.stderr
    errors = {e["parameter"]: e["message"] for e in last_json(proc.stdout)["errors"]}
    assert errors == {
        "--dry_run": "unknown flag. Did you mean --dry-run?",
        "--chek": "unknown flag. Did you mean --check?",
        "extra": "unexpected argument. Give parameters in the --config file or with --set.",
    }
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "tflhome" / "workspace").exists()


def test_the_harness_may_pass_flags_of_its_own():
    from plugin_utils import cli

    args = cli.parse(["--plugin_dir", "/p", "--input_file", "/f.json", "--experiment_name", "e", "--job_id", "7"])
    cli.check_flags(args)  # TransformerLab's harness: its flags are taken, others ignored
    assert (args.input_file, args.unknown) == ("/f.json", ["--job_id", "7"])
