"""The prepared-data cache (plugin_utils/data/keys.py, prepared_cache.py): what its key covers, publication safe
against an identical preparation running at the same moment, and its bounds.

Real preparations of the real tiny model's tokenizer; entries that only take room are plain folders.
"""

from __future__ import annotations

import fcntl
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from plugin_utils import data, params
from plugin_utils.data import keys, prepared_cache
from plugin_utils.errors import InvalidConfig
from tests.conftest import ROOT, SAMPLE, TEMPLATE, prepare_data

KIB = 1024
GIB = 2**30


@pytest.fixture(autouse=True)
def _unbounded_and_released(monkeypatch):
    """The default bounds, and the prepared folders a test's preparations hold released after it, as when a
    run ends."""
    monkeypatch.delenv("SFT_PREPARED_CACHE_KEEP", raising=False)
    monkeypatch.delenv("SFT_PREPARED_CACHE_MAX_GIB", raising=False)
    yield
    release()


def release() -> None:
    """What the end of a run does: the folders its preparations held are no longer in use."""
    while prepared_cache._held:
        os.close(prepared_cache._held.pop())


def make_params(model: str, dataset: str = str(SAMPLE), **overrides) -> params.Params:
    p = params.defaults()
    p = p.replace(model_name=model, dataset_name=dataset, adaptor_name="a", maximum_sequence_length=256)
    p = p.replace(formatting_template=TEMPLATE)
    p = p.replace(**overrides)
    return p


def root() -> Path:
    return Path(prepared_cache.cache_root())


def entries() -> set[str]:
    return {f.name for f in root().iterdir() if f.is_dir()}


def old_entry(name: str, age_s: float, size: int = KIB) -> Path:
    """A prepared folder last used `age_s` ago, taking `size` bytes."""
    folder = root() / name
    folder.mkdir(parents=True)
    (folder / "stats.json").write_text("{}")
    (folder / "data.arrow").write_bytes(b"\0" * size)
    when = time.time() - age_s
    os.utime(folder / "stats.json", (when, when))  # when it was last used
    os.utime(folder, (when, when))
    return folder


def hold(folder: Path) -> int:
    """A shared lock on the folder, as a run reading it holds."""
    fd = os.open(folder / prepared_cache.IN_USE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def prepared_rows(path: str) -> int:
    import datasets

    return len(datasets.load_from_disk(path)["train"])


def tokenizer_copy(model: str, folder: Path) -> Path:
    shutil.copytree(model, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return folder


# --- the key ---------------------------------------------------------------------------------------


def test_the_data_code_is_given_the_data_settings_and_nothing_else_of_the_parameters():
    """The data key covers every parameter the data code reads, by construction: the data code is handed
    DataSettings (whose fields the key hashes, tests/test_params.py holds them to the DATA and CONTENT roles),
    never the whole parameters."""
    code = Path(keys.__file__).parent
    for source in code.glob("*.py"):
        assert "Params" not in source.read_text().replace("DataSettings", ""), source.name
    from plugin_utils.data import encoding

    for function in (data.load, data.prepare, keys.fingerprint, encoding.Encoder.__init__, encoding.build):
        annotations = inspect.signature(function).parameters
        assert any(p.annotation == "DataSettings" for p in annotations.values()), function


def test_changing_any_data_shaping_parameter_changes_the_key(tiny_model):
    def changed(name, value):
        if name in params.switches():
            return "true" if value is params.AUTO else "auto"
        if isinstance(value, bool):
            return not value
        if isinstance(value, (int, float)):
            return value / 2 + 0.25 if isinstance(value, float) else value + 1
        return f"{value}x"

    p = make_params(tiny_model)
    key = keys.fingerprint(p.data)
    assert keys.fingerprint(params.defaults().replace(**p.as_dict()).data) == key
    for name in params.names_in(params.DATA):
        assert keys.fingerprint(p.replace(**{name: changed(name, getattr(p, name))}).data) != key, name
    assert keys.fingerprint(p.replace(learning_rate=1e-5).data) == key, "only what shapes the rows"
    assert keys.cache_key(key, True) != keys.cache_key(key, False), "the loss mode is in the folder's key"


def test_the_data_key_hashes_switches_as_the_words_earlier_versions_hashed():
    """A checkpoint saved by the version before the parameters were typed is resumed only if its data key is the
    same: the settings are hashed as they were then, auto/true/false as words."""
    canonical = params.defaults().replace(completion_only_loss="on").data.canonical()
    assert canonical["completion_only_loss"] == "true"
    assert params.defaults().data.canonical()["completion_only_loss"] == "auto"
    assert set(canonical) == {
        "formatting_template",
        "apply_chat_template",
        "chatml_formatted_column",
        "formatting_chat_template",
        "completion_only_loss",
        "assistant_only_loss",
        "completion_column",
        "maximum_sequence_length",
        "eval_split",
        "seed",
    }


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("added_tokens.json", '{"<extra>": 600}'),
        ("vocab.json", '{"a": 0}'),
        ("merges.txt", "#version: 0.2\na b\n"),
        ("chat_template.json", '{"chat_template": "{{ messages }}"}'),
        ("additional_chat_templates/tool_use.jinja", "{{ tools }}"),
        ("spiece.model", "sentencepiece"),
        ("config.json", None),
    ],
)
def test_every_file_a_tokenizer_may_read_is_in_the_key(tiny_model, tmp_path, name, content):
    model = tokenizer_copy(tiny_model, tmp_path / "model")
    key = keys.fingerprint(make_params(str(model)).data)
    path = model / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(content if content is not None else path.read_text() + "\n")
    changed = keys.fingerprint(make_params(str(model)).data)
    assert changed != key
    (model / "model.safetensors").write_bytes(b"other weights")
    assert keys.fingerprint(make_params(str(model)).data) == changed, "weights are not read"


def test_the_hub_revision_of_a_hub_model_is_in_the_key(tiny_model, tmp_path, monkeypatch):
    from huggingface_hub import constants

    hub = tmp_path / "hub"
    repo = hub / "models--org--tiny"
    first, second = "a" * 40, "b" * 40
    for commit in (first, second):
        tokenizer_copy(tiny_model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))

    def key_at(commit: str) -> str:
        (repo / "refs" / "main").write_text(commit)
        return keys.fingerprint(make_params("org/tiny").data)

    assert key_at(first) != key_at(second), "the same files at another commit are another tokenizer"
    assert keys.tokenizer_folder("org/tiny") == (repo / "snapshots" / second, second)
    assert key_at(first) == key_at(first)
    before = key_at(first)
    (repo / "snapshots" / first / "special_tokens_map.json").write_text("{}")
    assert key_at(first) != before


def test_a_new_library_or_data_code_version_prepares_again_and_a_checkpoint_stays_resumable(
    tiny_model, tmp_path, monkeypatch
):
    from importlib import metadata

    p = make_params(tiny_model)
    first = prepare_data(p)
    assert prepare_data(p).cached

    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "99.0" if name == "tokenizers" else real(name))
    upgraded = prepare_data(p)
    assert not upgraded.cached and upgraded.path != first.path
    assert upgraded.key == first.key, "the data key, which a resumed run compares, is the same"

    sources = tmp_path / "code"
    sources.mkdir()
    for path in keys.SHAPING_SOURCES:
        shutil.copy(path, sources / path.name)
    (sources / "chat.py").write_text((sources / "chat.py").read_text() + "\n# changed\n")
    monkeypatch.setattr(keys, "SHAPING_SOURCES", tuple(sources / path.name for path in keys.SHAPING_SOURCES))
    edited = prepare_data(p)
    assert not edited.cached and edited.path not in (first.path, upgraded.path)


def test_only_the_code_that_shapes_the_rows_is_in_the_folders_key():
    """An edit to the cache itself, the orchestration, the keys or the workspace lookup keeps every user's
    prepared data: those modules are not hashed. The modules that decide the rows' bytes are."""
    hashed = {path.relative_to(Path(keys.__file__).parent.parent).as_posix() for path in keys.SHAPING_SOURCES}
    assert hashed == {
        "data/loading.py",
        "data/formats.py",
        "data/encoding.py",
        "rowformats.py",
        "chat.py",
        "templates.py",
    }
    assert all(path.is_file() for path in keys.SHAPING_SOURCES)
    assert set(keys.toolchain()) >= {"encoding.py", "chat.py", "transformers", "tokenizers"}


# --- publication -----------------------------------------------------------------------------------

# Prepares the data given as JSON, stopping after the rows are built until every process has built them,
# so that all publish at the same moment; prints where the prepared folder is and what is in it.
PREPARE_AT_ONCE = """
import json, os, sys, time
from pathlib import Path

sys.path.insert(0, sys.argv[1])
import datasets
import importlib
from tests.conftest import prepare_data

# The module (plugin_utils.data.prepare is also the name of its function, which the package exports).
preparation = importlib.import_module("plugin_utils.data.prepare")

gate, me, p = Path(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])

def all_at(step):
    (gate / f"{step}-{me}").touch()
    deadline = time.time() + 120
    while len(list(gate.glob(f"{step}-*"))) < 2 and time.time() < deadline:
        time.sleep(0.005)

build = preparation.build

def build_then_wait(*args, **kwargs):
    stats = build(*args, **kwargs)
    all_at("built")
    return stats

preparation.build = build_then_wait
prepared = prepare_data(p)
inode = os.stat(prepared.path).st_ino
all_at("prepared")
rows = datasets.load_from_disk(prepared.path)["train"]["input_ids"]
print(json.dumps({"path": prepared.path, "inode": inode, "now": os.stat(prepared.path).st_ino, "rows": len(rows)}))
"""


def test_two_identical_preparations_at_the_same_moment_share_one_published_folder(tiny_model, tmp_path):
    gate = tmp_path / "gate"
    gate.mkdir()
    p = json.dumps(make_params(tiny_model).as_dict())
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", PREPARE_AT_ONCE, str(ROOT), str(gate), me, p],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for me in ("a", "b")
    ]
    results = []
    for run in runs:
        out, err = run.communicate(timeout=180)
        assert run.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert len(list(gate.glob("built-*"))) == 2, "both built the rows and published at the same moment"
    first, second = results
    assert first["path"] == second["path"]
    for result in results:
        assert result["inode"] == result["now"], "a published folder is never replaced under its reader"
        assert result["rows"] > 0
    assert entries() == {Path(first["path"]).name}, "one folder, nothing left in staging"
    assert (Path(first["path"]) / "stats.json").is_file()


# --- bounds ----------------------------------------------------------------------------------------


def test_only_the_most_recently_used_entries_are_kept(tiny_model, monkeypatch):
    monkeypatch.setenv("SFT_PREPARED_CACHE_KEEP", "2")
    for age in (300, 200, 100):
        old_entry(f"old-{age}", age)
    prepared = prepare_data(make_params(tiny_model))
    assert entries() == {Path(prepared.path).name, "old-100"}


def test_entries_beyond_the_size_bound_are_removed_oldest_first(tiny_model, monkeypatch):
    monkeypatch.setenv("SFT_PREPARED_CACHE_MAX_GIB", str(2048 * KIB / GIB))
    for age in (300, 200, 100):
        old_entry(f"old-{age}", age, size=900 * KIB)
    prepared = prepare_data(make_params(tiny_model))
    assert prepared_cache._size(Path(prepared.path)) < 200 * KIB
    assert entries() == {Path(prepared.path).name, "old-100", "old-200"}


def test_a_cache_hit_counts_as_a_use(tiny_model, monkeypatch):
    first = prepare_data(make_params(tiny_model))
    release()
    other = prepare_data(make_params(tiny_model, formatting_template="Q: {{ prompt }}\nA:{{ completion }}"))
    release()
    time.sleep(0.02)
    assert prepare_data(make_params(tiny_model)).cached
    release()
    monkeypatch.setenv("SFT_PREPARED_CACHE_KEEP", "2")
    third = prepare_data(make_params(tiny_model, maximum_sequence_length=64))
    assert entries() == {Path(first.path).name, Path(third.path).name}
    assert not Path(other.path).exists()


def test_entries_in_use_and_the_one_just_prepared_are_never_removed(tiny_model, monkeypatch):
    monkeypatch.setenv("SFT_PREPARED_CACHE_KEEP", "1")
    monkeypatch.setenv("SFT_PREPARED_CACHE_MAX_GIB", "1e-9")
    in_use = old_entry("in-use", 300)
    old_entry("unused", 200)
    fd = hold(in_use)
    try:
        prepared = prepare_data(make_params(tiny_model))
    finally:
        os.close(fd)
    assert entries() == {Path(prepared.path).name, "in-use"}
    assert prepared_rows(prepared.path) > 0


def test_staging_folders_of_preparations_that_died_are_removed(tiny_model):
    dead = old_entry(f"a{prepared_cache.STAGING}1-x", prepared_cache.STALE_STAGING_S + 60)
    running = old_entry(f"b{prepared_cache.STAGING}2-y", prepared_cache.STALE_STAGING_S + 60)
    starting = old_entry(f"c{prepared_cache.STAGING}3-z", 1)
    fd = hold(running)
    try:
        prepared = prepare_data(make_params(tiny_model))
    finally:
        os.close(fd)
    assert not dead.exists()
    assert entries() == {Path(prepared.path).name, running.name, starting.name}


def test_two_evictors_at_once_both_finish_and_keep_the_bound():
    using = old_entry("using", 0)
    for age in range(1, 31):
        old_entry(f"old-{age:02d}", age)
    bounds = prepared_cache.CacheBounds(entries=5, bytes=GIB)
    start, failures = threading.Barrier(2), []

    def evict():
        start.wait()
        try:
            prepared_cache.PreparedCache(root(), bounds).evict(using.name)
        except Exception as exc:
            failures.append(exc)

    threads = [threading.Thread(target=evict) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not failures
    assert entries() == {"using", "old-01", "old-02", "old-03", "old-04"}


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SFT_PREPARED_CACHE_KEEP", "abc"),
        ("SFT_PREPARED_CACHE_KEEP", "0"),
        ("SFT_PREPARED_CACHE_KEEP", "2.5"),
        ("SFT_PREPARED_CACHE_MAX_GIB", "-1"),
        ("SFT_PREPARED_CACHE_MAX_GIB", "nan"),
        ("SFT_PREPARED_CACHE_MAX_GIB", "lots"),
    ],
)
def test_a_bad_bound_is_an_error_naming_its_variable_before_anything_is_prepared(
    tiny_model, monkeypatch, variable, value
):
    monkeypatch.setenv(variable, value)
    with pytest.raises(InvalidConfig) as raised:
        prepare_data(make_params(tiny_model))
    [error] = raised.value.errors
    assert error.parameter == variable and repr(value) in error.message and "\n" not in error.line()
    assert not root().exists() or entries() == set()


STOPPED_WHILE_STAGING = """
import os, signal, sys, time
from pathlib import Path

sys.path.insert(0, sys.argv[1])
from plugin_utils.data import prepared_cache


class Stop(BaseException):
    pass


def on_signal(signum, frame):
    raise Stop()


real_mkdir = os.mkdir


def slow_mkdir(path, *args, **kwargs):
    real_mkdir(path, *args, **kwargs)
    if prepared_cache.STAGING in os.fspath(path):
        time.sleep(30)  # the stop comes here: the folder made, nothing yet holding it


os.mkdir = slow_mkdir
signal.signal(signal.SIGTERM, on_signal)
cache = prepared_cache.PreparedCache(Path(sys.argv[2]), prepared_cache.cache_bounds())
try:
    with cache.building("key") as staging:
        time.sleep(30)
except Stop:
    sys.exit(3)
"""


def test_a_stop_the_moment_the_staging_folder_is_made_removes_it(tmp_path):
    """The main process's stop handler raises wherever it lands: also just after the staging folder is made,
    before the code that removes it on the way out holds it (a SIGTERM sent as the folder appears, as a busy
    machine can time it). Slowed down there on purpose so the stop lands in that window every time."""
    root = tmp_path / "prepared"
    proc = subprocess.Popen([sys.executable, "-c", STOPPED_WHILE_STAGING, str(ROOT), str(root)])
    try:
        deadline = time.time() + 30
        while not list(root.glob(f"*{prepared_cache.STAGING}*")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert list(root.glob(f"*{prepared_cache.STAGING}*")), "the staging folder was made"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 3
    finally:
        proc.kill()
    assert not list(root.iterdir()), "nothing is left in the cache"
