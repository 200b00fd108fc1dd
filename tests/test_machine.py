"""plugin_utils/machine.py: the GPUs as schedulers give them. CUDA_VISIBLE_DEVICES holds
indices, GPU- UUIDs (or a prefix only one GPU has) or MIG- ids; CUDA stops reading it at the first entry that
names no GPU, and -1 hides everything. GPUs are read from NVML (nvidia-ml-py's pynvml), else from nvidia-smi.

No GPU exists on the machine the suite runs on: NVML is a fake `pynvml` module (injected into sys.modules, or a
pynvml.py on PYTHONPATH for main.py in a subprocess) and nvidia-smi a fake script on PATH printing what the real
one prints. Everything after them (the parsing, the plan, the validation, main.py --check) is real.
"""

from __future__ import annotations

import json
import os
import sys
import types

import pytest

from plugin_utils import launch, machine, params, planning, validation

from .conftest import base_config, last_json, run_main, write_config

UUID_0 = "GPU-11111111-aaaa-bbbb-cccc-000000000000"
UUID_1 = "GPU-22222222-aaaa-bbbb-cccc-111111111111"
UUID_2 = "GPU-22223333-aaaa-bbbb-cccc-222222222222"  # shares "GPU-2222" with GPU 1
MIG_A = "MIG-aaaaaaaa-0000-1111-2222-333333333333"
MIG_B = "MIG-bbbbbbbb-0000-1111-2222-444444444444"

# What the fake NVML reports: two whole GPUs and one in MIG mode with two MIG devices (A100 80GB, 1g.10gb).
GPUS = [
    {"name": "NVIDIA A100-SXM4-40GB", "uuid": UUID_0, "memory_mib": 40960, "cc": [8, 0]},
    # Shared with another process (an inference server) that holds half of its memory.
    {"name": "NVIDIA H100 80GB HBM3", "uuid": UUID_1, "memory_mib": 81559, "cc": [9, 0], "free_mib": 40000},
    {
        "name": "NVIDIA A100-SXM4-80GB",
        "uuid": UUID_2,
        "memory_mib": 81920,
        "cc": [8, 0],
        "mig": [
            {"name": "NVIDIA A100-SXM4-80GB MIG 1g.10gb", "uuid": MIG_A, "memory_mib": 9728, "gi": 7, "ci": 0},
            {"name": "NVIDIA A100-SXM4-80GB MIG 1g.10gb", "uuid": MIG_B, "memory_mib": 9728, "gi": 8, "ci": 0},
        ],
    },
]

# A fake of nvidia-ml-py's `pynvml` (the calls machine.py makes, as the real one answers them). GPUS = None: no
# driver, as the real nvmlInit fails without one.
FAKE_PYNVML = '''
"""A fake pynvml: no GPU exists on the machine the tests run on."""
import json
from types import SimpleNamespace

NVML_DEVICE_MIG_ENABLE = 1


class NVMLError(Exception):
    pass


def nvmlInit():
    if GPUS is None:
        raise NVMLError("Driver Not Loaded")


def nvmlShutdown():
    pass


def nvmlDeviceGetCount():
    return len(GPUS)


def nvmlDeviceGetHandleByIndex(index):
    return dict(GPUS[index], cc=GPUS[index]["cc"])


def nvmlDeviceGetMigDeviceHandleByIndex(handle, slot):
    if slot >= len(handle.get("mig", [])):
        raise NVMLError("Not Found")
    return dict(handle["mig"][slot], cc=handle["cc"])


def nvmlDeviceGetCudaComputeCapability(handle):
    return tuple(handle["cc"])


def nvmlDeviceGetName(handle):
    return handle["name"]


def nvmlDeviceGetUUID(handle):
    return handle["uuid"]


def nvmlDeviceGetMemoryInfo(handle):
    total = handle["memory_mib"] * 2**20
    free = handle.get("free_mib", handle["memory_mib"]) * 2**20
    return SimpleNamespace(total=total, free=free, used=total - free)


def nvmlDeviceGetMigMode(handle):
    if "mig" not in handle:
        raise NVMLError("Not Supported")
    return (1, 1)


def nvmlDeviceGetMaxMigDeviceCount(handle):
    return 7


def nvmlDeviceGetGpuInstanceId(handle):
    return handle["gi"]


def nvmlDeviceGetComputeInstanceId(handle):
    return handle["ci"]
'''


def fake_nvml(gpus) -> types.ModuleType:
    module = types.ModuleType("pynvml")
    exec(FAKE_PYNVML, module.__dict__)
    module.GPUS = gpus
    return module


# What the real `nvidia-smi --query-gpu=index,name,memory.total,compute_cap,uuid,mig.mode.current,memory.free
# --format=csv,noheader,nounits` and `nvidia-smi -L` print for the same GPUs.
SMI_CSV = f"""0, NVIDIA A100-SXM4-40GB, 40960, 8.0, {UUID_0}, Disabled, 40960
1, NVIDIA H100 80GB HBM3, 81559, 9.0, {UUID_1}, [N/A], 40000
2, NVIDIA A100-SXM4-80GB, 81920, 8.0, {UUID_2}, Enabled, [N/A]
"""
SMI_LIST = f"""GPU 0: NVIDIA A100-SXM4-40GB (UUID: {UUID_0})
GPU 1: NVIDIA H100 80GB HBM3 (UUID: {UUID_1})
GPU 2: NVIDIA A100-SXM4-80GB (UUID: {UUID_2})
  MIG 1g.10gb     Device  0: (UUID: {MIG_A})
  MIG 1g.10gb     Device  1: (UUID: {MIG_B})
"""


def fake_nvidia_smi(folder, csv: str = SMI_CSV, listing: str = SMI_LIST, exit_code: int = 0) -> str:
    """A fake nvidia-smi in `folder` (no GPU exists here); exit code 9 is the real one's without a driver."""
    script = folder / "nvidia-smi"
    script.write_text(
        "#!/bin/sh\n# A fake nvidia-smi: no GPU exists on the machine the tests run on.\n"
        f"if [ \"$1\" = \"-L\" ]; then\ncat <<'EOF'\n{listing}EOF\nelse\ncat <<'EOF'\n{csv}EOF\nfi\n"
        f"exit {exit_code}\n"
    )
    script.chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ['PATH']}"  # a PATH that finds it first


@pytest.fixture
def no_nvml(monkeypatch):
    """nvidia-ml-py not installed: importing pynvml fails."""
    monkeypatch.setitem(sys.modules, "pynvml", None)


@pytest.fixture
def driver(monkeypatch):
    """A machine whose NVIDIA driver is loaded (none is, here): NVML is asked."""
    monkeypatch.setattr(machine, "_nvidia_driver_loaded", lambda: True)


@pytest.fixture
def nvml(monkeypatch, driver):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(GPUS))


@pytest.fixture
def smi_only(monkeypatch, tmp_path, no_nvml):
    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path))


def detected(monkeypatch, visible: str | None) -> machine.Machine:
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    return machine.detect()


def usable(found: machine.Machine) -> list[tuple[int, str]]:
    return [(g.index, g.uuid) for g in found.usable_gpus]


# --- where the GPUs come from --------------------------------------------------------------------------------

# What both sources report of the fake machine: (index, name, memory MiB, compute capability, uuid).
THE_GPUS = [
    (0, "NVIDIA A100-SXM4-40GB", 40960, 8.0, UUID_0),
    (1, "NVIDIA H100 80GB HBM3", 81559, 9.0, UUID_1),
    (2, "NVIDIA A100-SXM4-80GB", 81920, 8.0, UUID_2),
]


def test_nvml_reports_each_gpu_with_its_uuid_and_mig_devices(nvml, monkeypatch):
    gpus = detected(monkeypatch, None).gpus
    assert [(g.index, g.name, g.memory_mib, g.compute_capability, g.uuid) for g in gpus] == THE_GPUS
    assert not gpus[0].mig_mode and gpus[2].mig_mode
    # A MIG device is a device of its own: its own memory, its GPU's compute capability.
    [a, b] = gpus[2].mig_devices
    assert (a.uuid, a.memory_mib, a.compute_capability, a.parent_uuid, a.instance) == (MIG_A, 9728, 8.0, UUID_2, "7/0")
    assert b.uuid == MIG_B and b.is_mig


def test_nvidia_smi_is_the_fallback_when_nvml_is_missing(smi_only, monkeypatch):
    gpus = detected(monkeypatch, None).gpus
    assert [(g.index, g.name, g.memory_mib, g.compute_capability, g.uuid) for g in gpus] == THE_GPUS
    # MIG devices from `nvidia-smi -L`, with the nominal memory of their profile.
    assert [(m.uuid, m.memory_mib, m.compute_capability) for m in gpus[2].mig_devices] == [
        (MIG_A, 10000, 8.0),
        (MIG_B, 10000, 8.0),
    ]


@pytest.mark.parametrize("source", ["nvml", "smi_only"])
def test_free_memory_is_read_so_a_shared_gpu_counts_what_is_left(source, request, monkeypatch):
    """The memory budget of gradient_checkpointing=auto is the free memory: an H100 whose
    other process holds half of it has 40000 MiB to give, not 81559."""
    request.getfixturevalue(source)
    gpus = detected(monkeypatch, None).gpus
    assert [g.available_mib for g in gpus[:2]] == [40960, 40000]
    assert gpus[1].memory_mib == 81559


def test_nvidia_smi_is_the_fallback_when_nvml_fails(monkeypatch, tmp_path, driver):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(None))
    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path))
    assert [g.uuid for g in detected(monkeypatch, None).gpus] == [UUID_0, UUID_1, UUID_2]


@pytest.mark.parametrize("smi", ["fails", "absent"])
def test_no_driver_means_no_gpus_and_no_error(monkeypatch, tmp_path, smi, driver):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(None))  # NVML cannot start without a driver
    if smi == "fails":
        monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path, csv="NVIDIA-SMI has failed\n", exit_code=9))
    else:
        monkeypatch.setenv("PATH", str(tmp_path))
    found = detected(monkeypatch, "0")
    assert found.gpus == [] and found.usable_gpus == []


def test_the_real_nvml_here_finds_no_driver(monkeypatch, tmp_path, driver):
    """nvidia-ml-py is installed; this machine has no NVIDIA driver, so NVML gives up and nothing breaks (asked
    as it would be where the driver's files exist)."""
    monkeypatch.delitem(sys.modules, "pynvml", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert machine._query_nvml() is None
    assert machine.detect_gpus() == []


def test_without_the_drivers_files_nvml_is_never_imported(monkeypatch, tmp_path):
    """No /dev/nvidiactl, /dev/dxg or /proc/driver/nvidia (this machine): no NVIDIA driver is loaded, and NVML
    (about 30 ms to import and fail to start, most of a --check here) is not asked; nvidia-smi still is."""
    assert not any(os.path.exists(path) for path in machine.DRIVER_FILES), "this test needs a machine without one"
    assert not machine._nvidia_driver_loaded()
    (tmp_path / "smi").mkdir()
    with_smi = fake_nvidia_smi(tmp_path / "smi")
    monkeypatch.delitem(sys.modules, "pynvml", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert machine.detect_gpus() == [] and "pynvml" not in sys.modules
    monkeypatch.setenv("PATH", with_smi)
    assert [g.uuid for g in machine.detect_gpus()] == [UUID_0, UUID_1, UUID_2]


# --- CUDA_VISIBLE_DEVICES, as CUDA reads it ---------------------------------------------------------------------


@pytest.mark.parametrize("source", ["nvml", "smi_only"])
@pytest.mark.parametrize(
    ("visible", "expected", "unknown"),
    [
        (None, [(0, UUID_0), (1, UUID_1), (2, MIG_A)], ""),  # a GPU in MIG mode: its first MIG device
        ("1,0", [(1, UUID_1), (0, UUID_0)], ""),  # indices, in the order given
        (UUID_1, [(1, UUID_1)], ""),  # a full UUID
        ("GPU-1111", [(0, UUID_0)], ""),  # a prefix only one GPU has
        (f"GPU-1111,{UUID_1}", [(0, UUID_0), (1, UUID_1)], ""),
        ("GPU-2222", [], "GPU-2222"),  # a prefix two GPUs have names neither
        (MIG_B, [(2, MIG_B)], ""),
        (f"{MIG_B},{MIG_A}", [(2, MIG_B)], ""),  # one MIG device per process
        (f"0,{MIG_A}", [(0, UUID_0), (2, MIG_A)], ""),
        ("0,7,1", [(0, UUID_0)], "7"),  # CUDA stops at an entry that names no GPU
        ("GPU-deadbeef", [], "GPU-deadbeef"),
        ("1,-1,0", [(1, UUID_1)], ""),  # -1 hides the rest on purpose
        ("-1", [], ""),
        ("", [], ""),
    ],
)
def test_cuda_visible_devices_entries(request, monkeypatch, source, visible, expected, unknown):
    request.getfixturevalue(source)
    found = detected(monkeypatch, visible)
    assert usable(found) == expected
    assert found.unknown_visible == unknown


def test_the_older_mig_name_is_understood(nvml, monkeypatch):
    found = detected(monkeypatch, f"MIG-{UUID_2}/8/0")
    assert usable(found) == [(2, MIG_B)]


# --- what the ranks are given ------------------------------------------------------------------------------------


def run_params(**overrides) -> params.Params:
    raw = {"model_name": "/models/none", "dataset_name": "/data/rows.jsonl", "adaptor_name": "a"}
    return params.defaults().replace(**raw, **overrides)


@pytest.mark.parametrize(
    ("visible", "gpu_ids", "ranks_see"),
    [
        (None, "auto", f"0,1,{MIG_A}"),  # unset: indices as nvidia-smi numbers GPUs; a MIG device by its id
        ("1", "auto", "1"),
        (UUID_1, "auto", UUID_1),  # a UUID stays that UUID, never an index that may mean another GPU
        (f"GPU-1111,{UUID_1}", "auto", f"GPU-1111,{UUID_1}"),
        (f"GPU-1111,{UUID_1}", "1", UUID_1),  # gpu_ids picks by nvidia-smi index within them
        (MIG_A, "auto", MIG_A),
    ],
)
def test_the_ranks_see_the_planned_gpus_by_the_names_this_process_was_given(
    nvml, monkeypatch, visible, gpu_ids, ranks_see
):
    plan = planning.build(run_params(gpu_ids=gpu_ids), detected(monkeypatch, visible))
    assert plan.device == "cuda"
    assert plan.cuda_visible_devices == ranks_see
    assert launch.rank_env(plan)["CUDA_VISIBLE_DEVICES"] == ranks_see


def test_a_mig_device_is_planned_with_its_own_memory(nvml, monkeypatch):
    plan = planning.build(run_params(), detected(monkeypatch, MIG_A))
    assert (plan.device, plan.gpu_ids, plan.num_processes, plan.precision) == ("cuda", (2,), 1, "bf16")
    assert "MIG 1g.10gb" in plan.reasons[0] and MIG_A in plan.reasons[0]


# --- an entry that names no GPU is an error, not a quiet run on the CPU -------------------------------------------


@pytest.mark.parametrize(
    ("visible", "train_device", "expected"),
    [
        ("GPU-deadbeef", "auto", "'GPU-deadbeef' names no GPU here"),
        ("0,9", "auto", "'9' names no GPU here"),
        ("GPU-2222", "cuda", "'GPU-2222' names no GPU here (or, as a prefix, more than one)"),
        ("GPU-deadbeef", "cpu", None),  # the CPU needs no GPU
        (UUID_1, "auto", None),
        ("-1", "auto", None),
    ],
)
def test_an_unknown_cuda_visible_devices_entry_is_an_error(nvml, monkeypatch, visible, train_device, expected):
    found = detected(monkeypatch, visible)
    p = run_params(train_device=train_device)
    lines = [f.line() for _, f in validation.cuda_visible_devices_name_gpus(p, found)]
    if expected is None:
        assert lines == []
    else:
        [line] = lines
        assert line.startswith(f"CUDA_VISIBLE_DEVICES: {expected}")
        assert "nvidia-smi -L" in line


def test_without_any_gpu_found_cuda_visible_devices_is_not_judged(monkeypatch, no_nvml, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    found = detected(monkeypatch, "GPU-deadbeef")
    assert list(validation.cuda_visible_devices_name_gpus(run_params(), found)) == []


# --- end to end: main.py --check in a subprocess ---------------------------------------------------------------


@pytest.mark.parametrize("source", ["nvidia-smi", "nvml"])
def test_check_plans_the_gpu_a_uuid_names(tiny_model, tmp_path, source):
    """CUDA_VISIBLE_DEVICES=GPU-<uuid>, as SLURM or a container sets it: the plan trains on that GPU."""
    fakes = tmp_path / "fakes"
    fakes.mkdir()
    # NVML: GPUs from the fake pynvml.py; nvidia-smi: the fake script, and a pynvml.py whose nvmlInit fails as the
    # real one does without a driver library.
    (fakes / "pynvml.py").write_text(FAKE_PYNVML + f"\nGPUS = {json.dumps(GPUS) if source == 'nvml' else None}\n")
    path = fake_nvidia_smi(fakes)
    if source == "nvml":
        # Only NVML answers, as on a machine whose driver is loaded: its control device exists (a fake one here,
        # seen by the process alone) and no nvidia-smi is installed.
        (fakes / "sitecustomize.py").write_text(
            "import os.path\n_exists = os.path.exists\nos.path.exists = lambda p: p == '/dev/nvidiactl' or _exists(p)\n"
        )
        (fakes / "nvidia-smi").unlink()
        path = os.environ["PATH"]
    env = {
        "PATH": path,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(fakes), os.environ.get("PYTHONPATH")])),
        "CUDA_VISIBLE_DEVICES": UUID_1,
    }
    config = base_config(tiny_model, tmp_path, train_device="auto", num_processes="auto")
    proc = run_main(["--config", write_config(tmp_path, config), "--check", "--json"], env=env)
    assert proc.returncode == 0, proc.stderr
    plan = last_json(proc.stdout)["plan"]
    assert (plan["device"], plan["gpu_ids"], plan["num_processes"], plan["precision"]) == ("cuda", [1], 1, "bf16")
    assert plan["visible_devices"] == [UUID_1]
    assert plan["reasons"][0].startswith("device: GPU 1 (NVIDIA H100 80GB HBM3)")
