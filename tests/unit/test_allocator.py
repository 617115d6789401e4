"""train.cpu_allocator: which library is found and preloaded, what the re-executed process really maps, and that a
named allocator that is missing fails before anything loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import typing

import pytest

from tunelab.config.schema import TrainConfig
from tunelab.errors import ConfigError
from tunelab.train.allocator import (
    ALLOCATORS,
    AUTO_ORDER,
    MARKER,
    MIMALLOC_PURGE_DELAY_MS,
    LargestBatchRelease,
    allocator_in_use,
    find_allocator,
    plan_allocator,
)


def fake_libraries(folder, *sonames):
    for soname in sonames:
        (folder / soname).write_bytes(b"")
    return [folder]


def test_schema_choices_are_the_known_allocators():
    choices = set(typing.get_args(TrainConfig.model_fields["cpu_allocator"].annotation))
    assert choices == {"auto", "system", *ALLOCATORS}
    assert set(AUTO_ORDER) == set(ALLOCATORS)


def test_auto_on_a_cpu_machine_takes_the_first_installed_in_order(tmp_path):
    dirs = fake_libraries(tmp_path, "libmimalloc.so.3", "libjemalloc.so.2")
    plan = plan_allocator("auto", environ={}, gpu_present=False, dirs=dirs, system_name="Linux")
    assert plan.name == "jemalloc" and plan.library == str(tmp_path / "libjemalloc.so.2")
    assert plan.env == {"LD_PRELOAD": str(tmp_path / "libjemalloc.so.2"), MARKER: "jemalloc",
                        "MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"}
    (tmp_path / "m").mkdir()
    only_mimalloc = fake_libraries(tmp_path / "m", "libmimalloc.so.3")
    plan = plan_allocator("auto", environ={}, gpu_present=False, dirs=only_mimalloc, system_name="Linux")
    assert plan.name == "mimalloc" and plan.env["MIMALLOC_PURGE_DELAY"] == MIMALLOC_PURGE_DELAY_MS


def test_the_users_environment_wins(tmp_path):
    dirs = fake_libraries(tmp_path, "libjemalloc.so.2")
    plan = plan_allocator("jemalloc", environ={"MALLOC_CONF": "narenas:1", "LD_PRELOAD": "/opt/libfoo.so"},
                          gpu_present=False, dirs=dirs, system_name="Linux")
    assert "MALLOC_CONF" not in plan.env  # the user's own setting is left as it is
    assert plan.env["LD_PRELOAD"] == f"{tmp_path / 'libjemalloc.so.2'}:/opt/libfoo.so"
    kept = plan_allocator("auto", environ={"LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4"}, gpu_present=False,
                          dirs=dirs, system_name="Linux")
    assert kept.library is None and "already names an allocator" in kept.reason


def test_when_auto_leaves_the_system_allocator(tmp_path):
    dirs = fake_libraries(tmp_path, "libjemalloc.so.2")
    on_gpu = plan_allocator("auto", environ={}, gpu_present=True, dirs=dirs, system_name="Linux")
    assert on_gpu.library is None and "GPU" in on_gpu.reason
    none_found = plan_allocator("auto", environ={}, gpu_present=False, dirs=[], system_name="Linux")
    assert none_found.library is None and "cmeel-mimalloc" in none_found.reason
    mac = plan_allocator("auto", environ={}, gpu_present=False, dirs=dirs, system_name="Darwin")
    assert mac.library is None
    assert plan_allocator("system", environ={}, gpu_present=False, dirs=dirs).library is None


def test_a_named_allocator_that_is_missing_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.cpu_allocator: tcmalloc is not installed.*libtcmalloc-minimal4"):
        plan_allocator("tcmalloc", environ={}, gpu_present=False, dirs=[tmp_path], system_name="Linux")
    with pytest.raises(ConfigError, match=r"train\.cpu_allocator: jemalloc .* Linux only"):
        plan_allocator("jemalloc", environ={}, gpu_present=False, dirs=[tmp_path], system_name="Darwin")


def test_allocator_in_use_reads_the_mapped_libraries():
    maps = ("7f0000000000-7f0000001000 r-xp 00000000 08:01 1234 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
            "7f0000002000-7f0000003000 r-xp 00000000 08:01 1235 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n"
            "7ffd00000000-7ffd00001000 rw-p 00000000 00:00 0 [stack]\n")
    assert allocator_in_use(maps) == "jemalloc"
    assert allocator_in_use(maps.replace("libjemalloc.so.2", "libtcmalloc_minimal.so.4")) == "tcmalloc"
    assert allocator_in_use(maps.replace("libjemalloc.so.2", "libm.so.6")) == "system"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="preloading is done on Linux")
def test_reexec_preloads_the_planned_allocator_in_the_same_process():
    """The real thing: a process calls reexec_with_allocator('auto') and comes back as itself (same PID, same
    arguments) with the library mapped and the run's summary line saying so."""
    expected = plan_allocator("auto", environ={k: v for k, v in os.environ.items() if k != MARKER})
    code = ("import json, os, sys\n"
            "pid = os.environ.get('FIRST_PID') or str(os.getpid())\n"
            "os.environ['FIRST_PID'] = pid\n"
            "from tunelab.train.allocator import reexec_with_allocator, describe_allocator\n"
            "reexec_with_allocator('auto')\n"
            "print(json.dumps({'same_pid': pid == str(os.getpid()), 'argv': sys.argv[1:],"
            " 'described': describe_allocator('auto')}))\n")
    env = {k: v for k, v in os.environ.items() if k not in (MARKER, "FIRST_PID")}
    done = subprocess.run([sys.executable, "-c", code, "an-argument"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["same_pid"] and seen["argv"] == ["an-argument"]
    assert seen["described"]["name"] == expected.name
    if expected.library is not None:
        assert seen["described"]["reason"] == "preloaded by tunelab (train.cpu_allocator=auto)"


def test_training_with_a_missing_named_allocator_stops_before_anything_loads(tmp_path, monkeypatch):
    from tunelab.config.load import load_config
    from tunelab.train import allocator
    from tunelab.train.run import run_training

    monkeypatch.setattr(allocator, "library_dirs", lambda: [tmp_path])
    monkeypatch.delenv(MARKER, raising=False)
    config = load_config(None, [f"model.name_or_path={tmp_path / 'no-model'}",
                                f"data.datasets=[{{path: '{tmp_path / 'no-data.jsonl'}'}}]",
                                f"train.output_dir={tmp_path / 'run'}", "train.cpu_allocator=tcmalloc"])
    with pytest.raises(ConfigError, match="train.cpu_allocator: tcmalloc is not installed"):
        run_training(config)
    assert not (tmp_path / "run").exists()


def test_release_comes_only_before_a_new_largest_batch():
    calls = []
    release = LargestBatchRelease(lambda: calls.append(1))
    for tokens in (500, 300, 500, 800, 120, 900, 900):
        release.before_batch(tokens)
    assert release.releases == len(calls) == 3  # 500, 800, 900
    nothing = LargestBatchRelease(None)  # an allocator without a release call (musl's malloc), or a GPU run
    nothing.before_batch(10)
    assert nothing.releases == 0 and nothing.largest == 10


# Fragments the heap as training does (freed blocks between kept ones), then releases. Run in a fresh interpreter
# per allocator, since an allocator is chosen when a process starts.
RELEASE_PROBE = """
import json
from tunelab.train.allocator import LargestBatchRelease, allocator_in_use
def anon_mb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) / 1024
kept, freed = [], []
for size, count in ((100_000, 3000), (1_000_000, 300)):  # mimalloc returns only pages with no kept block in them
    for i in range(count):
        (kept if i % 10 == 0 else freed).append(bytearray(size))
freed.clear()
before = anon_mb()
release = LargestBatchRelease.for_this_process()
release.before_batch(10)
print(json.dumps({"allocator": allocator_in_use(), "released": release.releases, "drop_mb": before - anon_mb()}))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="the allocators are preloaded on Linux")
@pytest.mark.parametrize("name", ["system", *AUTO_ORDER])
def test_the_release_returns_freed_pages_with_the_allocator_serving_the_process(name):
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", MARKER)}
    if name != "system":
        library = find_allocator(name)
        if library is None:
            pytest.skip(f"{name} is not installed here")
        variable, value = ALLOCATORS[name].settings  # tunelab's own setting: freed pages are kept
        env.update({"LD_PRELOAD": library, variable: value})
    probe = subprocess.run([sys.executable, "-c", RELEASE_PROBE], env=env, capture_output=True, text=True,
                           timeout=120)
    assert probe.returncode == 0, probe.stderr
    result = json.loads(probe.stdout.strip().splitlines()[-1])
    assert result["allocator"] == name
    assert result["released"] == 1
    assert result["drop_mb"] > 150, result  # of 540 MB freed in blocks of 100 kB and 1 MB
