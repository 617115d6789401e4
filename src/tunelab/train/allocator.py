"""``train.cpu_allocator``: the malloc that serves the training process's host memory.

Why tunelab picks one: on a CPU, most of a training run's peak memory is not tensors but glibc's heap
fragmentation. Activations of the same shapes are freed and re-made layer after layer, small long-lived objects
(autograd nodes, saved inputs) land in the holes, and the next large tensor no longer fits, so the heap grows:
measured in tunelab's first step, at most 357 MB were in use in a 1.2 GB heap, and TRL's step shows the same
(bench/RESULTS.md, "Where the training process's memory goes"). jemalloc and mimalloc keep size classes apart and
do not fragment that way. glibc's own cure, a low ``M_MMAP_THRESHOLD``, hands every large tensor back to the kernel
and faults it in again: 20–30% slower.

An allocator cannot be swapped inside a running process (every library already bound ``malloc``), so
``tunelab train`` re-executes itself once, before torch is imported, with ``LD_PRELOAD`` naming the library:
what PyTorch's own CPU launcher (``python -m torch.backends.xeon.run_cpu``) and Intel's ``ipexrun`` do. Nothing
here is a re-implementation of an allocator; this module only finds one and hands it to the dynamic linker.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from tunelab.errors import ConfigError

# The environment variable the re-executed process finds, so that it neither loops nor forgets what was asked.
MARKER = "TUNELAB_CPU_ALLOCATOR"


# mimalloc's purge delay, in ms: 11.6 days, so never within a run. Not -1 ("never purge"): with -1 freed pages are
# not even scheduled for purging, and mi_collect(true) then has nothing to return (measured: 1,872 MB stayed
# 1,872); with a delay they are scheduled, and the forced collect of LargestBatchRelease returns them (to 682 MB).
MIMALLOC_PURGE_DELAY_MS = "1000000000"


@dataclass(frozen=True)
class Allocator:
    sonames: tuple[str, ...]
    """File names the library is installed under (versioned first: Debian ships no unversioned name without -dev)."""
    settings: tuple[str, str]
    """One environment variable and value, applied unless the user set that variable: keep freed pages for reuse
    instead of returning them to the kernel after a delay. Returning them costs speed, since the next steps fault
    them in again: on the peer bench's full fine-tuning, jemalloc with a 1 s decay gave 11% fewer tokens per
    CPU-second and with none 29% fewer, for a peak RSS 180–210 MB lower (1,455 / 1,429 instead of 1,637 MB).
    :class:`LargestBatchRelease` gets part of that lower peak without the cost."""
    install: str


ALLOCATORS: dict[str, Allocator] = {
    "jemalloc": Allocator(("libjemalloc.so.2", "libjemalloc.so"),
                          ("MALLOC_CONF", "dirty_decay_ms:-1,muzzy_decay_ms:-1"),
                          "apt install libjemalloc2, or conda install -c conda-forge jemalloc"),
    "mimalloc": Allocator(("libmimalloc.so.3", "libmimalloc.so.2", "libmimalloc.so"),
                          ("MIMALLOC_PURGE_DELAY", MIMALLOC_PURGE_DELAY_MS),
                          "pip install cmeel-mimalloc (tunelab's own install brings it on Linux x86_64 and aarch64), "
                          "or apt install libmimalloc3"),
    "tcmalloc": Allocator(("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so",
                           "libtcmalloc.so"), ("TCMALLOC_RELEASE_RATE", "0"),
                          "apt install libtcmalloc-minimal4, or conda install -c conda-forge gperftools"),
}
# ``auto`` takes the first one found, in the order measured on the peer bench (bench/RESULTS.md, "Allocator").
AUTO_ORDER = ("jemalloc", "mimalloc", "tcmalloc")
# pip packages that ship allocator libraries, and the folder inside them: cmeel-mimalloc brings one without a system
# package manager (a C library in a wheel, made for CMake users; tunelab only needs its .so). A base dependency on
# Linux x86_64/aarch64, so that a plain ``pip install tunelab`` trains with a lean heap on a CPU; its cost is a .pth
# file that appends one folder to sys.path at each Python start (0.3 ms).
WHEEL_LIBRARY_DIRS = {"cmeel-mimalloc": "cmeel.prefix/lib"}


@dataclass(frozen=True)
class AllocatorPlan:
    name: str
    """``system`` or a key of :data:`ALLOCATORS`."""
    reason: str
    library: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    """What the re-executed process gets on top of the current environment."""


def library_dirs() -> list[Path]:
    """Where an allocator library may be: the active environment's ``lib`` (conda, venv), the pip packages that
    ship one, then the system's folders."""
    prefixes = [os.environ.get("CONDA_PREFIX"), os.environ.get("VIRTUAL_ENV"), sys.prefix]
    dirs = [Path(p) / "lib" for p in prefixes if p]
    for distribution, inner in WHEEL_LIBRARY_DIRS.items():
        with contextlib.suppress(metadata.PackageNotFoundError):
            dirs.append(Path(str(metadata.distribution(distribution).locate_file(inner))))
    machine = platform.machine()
    dirs += [Path(d) for d in (f"/usr/lib/{machine}-linux-gnu", f"/lib/{machine}-linux-gnu", "/usr/local/lib",
                               "/usr/local/lib64", "/usr/lib64", "/usr/lib")]
    return dirs


def find_allocator(name: str, dirs: list[Path] | None = None) -> str | None:
    """The path of allocator ``name``'s shared library in ``dirs`` (default :func:`library_dirs`), or None."""
    for directory in library_dirs() if dirs is None else dirs:
        for soname in ALLOCATORS[name].sonames:
            if (directory / soname).is_file():
                return str(directory / soname)
    return None


def gpu_device_present() -> bool:
    """A CUDA or ROCm device node, without importing torch (this runs before torch may be imported). A training
    run on such a machine keeps its tensors on the GPU, so ``auto`` leaves its host allocator alone."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    return any(Path(node).exists() for node in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd"))


def plan_allocator(choice: str, *, environ: dict[str, str] | None = None, gpu_present: bool | None = None,
                   dirs: list[Path] | None = None, system_name: str | None = None) -> AllocatorPlan:
    """What ``train.cpu_allocator=choice`` means on this machine. Raises ConfigError when a named allocator is not
    installed (before anything loads), with how to install it."""
    environ = dict(os.environ) if environ is None else environ
    system_name = system_name or platform.system()
    preloaded = environ.get("LD_PRELOAD", "")
    if choice == "system":
        return AllocatorPlan("system", "train.cpu_allocator=system")
    if system_name != "Linux":
        if choice == "auto":
            return AllocatorPlan("system", f"auto: the system allocator ({system_name}: tunelab preloads one on Linux)")
        raise ConfigError(f"train.cpu_allocator: {choice} is preloaded with LD_PRELOAD, which tunelab does on Linux "
                          f"only; this is {system_name}. Use auto or system")
    if any(allocator_of(item) for item in preloaded.split(":") if item):
        return AllocatorPlan("system", f"{choice}: LD_PRELOAD already names an allocator ({preloaded}); kept")
    if choice == "auto":
        if gpu_device_present() if gpu_present is None else gpu_present:
            return AllocatorPlan("system", "auto: the system allocator (a GPU is present; tensors live on it)")
        found = next(((name, path) for name in AUTO_ORDER if (path := find_allocator(name, dirs))), None)
        if found is None:
            return AllocatorPlan("system", "auto: the system allocator (no jemalloc, mimalloc or tcmalloc found; "
                                 "apt install libjemalloc2 or pip install cmeel-mimalloc for a lower peak RSS)")
        name, path = found
        reason = "auto: a CPU run, so the allocator that keeps its peak memory lowest"
    else:
        path = find_allocator(choice, dirs)
        if path is None:
            raise ConfigError(f"train.cpu_allocator: {choice} is not installed here (looked for "
                              f"{', '.join(ALLOCATORS[choice].sonames)}); {ALLOCATORS[choice].install}. "
                              f"Or use auto or system")
        name, reason = choice, f"train.cpu_allocator={choice}"
    variable, value = ALLOCATORS[name].settings
    env = {"LD_PRELOAD": ":".join(p for p in (path, preloaded) if p), MARKER: name}
    if variable not in environ:
        env[variable] = value
    return AllocatorPlan(name, reason, library=path, env=env)


def reexec_with_allocator(choice: str) -> None:
    """Run this process's command line again, same interpreter and flags, with the allocator ``choice`` plans; or
    return when there is nothing to do (``system``, none found, or this process is the re-executed one). The PID
    stays, so a launcher (torchrun, a shell's job control) and its signals still reach the run.

    Called by the commands that train, before torch is imported; never from inside a library call, since
    ``os.execv`` replaces the whole process."""
    if os.environ.get(MARKER):
        return
    plan = plan_allocator(choice)
    if plan.library is None:
        return
    os.environ.update(plan.env)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def allocator_in_use(maps: str | None = None) -> str:
    """Which allocator serves this process: a key of :data:`ALLOCATORS` when its library is mapped (however it was
    preloaded), else ``system``. Read from ``/proc/self/maps`` rather than trusted from the environment: a preload
    the dynamic linker refused (wrong architecture, missing file) leaves glibc in charge."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return "system"
    return next((name for line in maps.splitlines() if "/" in line if (name := allocator_of(line.split()[-1]))),
                "system")


def allocator_of(library: str) -> str | None:
    """The key of :data:`ALLOCATORS` a library path or file name belongs to (``libtcmalloc_minimal.so.4`` ->
    ``tcmalloc``), or None."""
    filename = Path(library).name
    return next((name for name in ALLOCATORS if filename.startswith(f"lib{name}")), None)


def describe_allocator(choice: str) -> dict[str, str]:
    """For summary.json and the run's printout: what serves host memory in this process, and why."""
    in_use = allocator_in_use()
    asked = os.environ.get(MARKER)
    if in_use != "system":
        why = (f"preloaded by tunelab (train.cpu_allocator={choice})" if asked == in_use
               else "preloaded by the caller (LD_PRELOAD)")
        return {"name": in_use, "reason": why}
    if asked:
        return {"name": "system", "reason": f"{asked} was preloaded, but the dynamic linker did not map it"}
    plan = plan_allocator(choice)
    if plan.library is None:
        return {"name": "system", "reason": plan.reason}
    return {"name": "system", "reason": f"{plan.name} was found but not preloaded: tunelab's commands preload it at "
            "start, and this process was started another way (a Python call)"}


def _release_call(name: str) -> Callable[[], None] | None:
    """The call that hands the freed pages of allocator ``name`` (as :func:`allocator_in_use` names it) back to the
    kernel, bound from this process's own symbols; None where there is none. mimalloc's ``mi_collect(true)``
    returns the pages scheduled for purging, which needs a purge delay that is long, not off
    (:data:`MIMALLOC_PURGE_DELAY_MS`)."""
    try:
        process = ctypes.CDLL(None)
    except OSError:
        return None
    if name == "jemalloc" and hasattr(process, "mallctl"):
        # MALLCTL_ARENAS_ALL (4096 in jemalloc 5): every arena's unused dirty and muzzy pages.
        return lambda: process.mallctl(b"arena.4096.purge", None, None, None, ctypes.c_size_t(0))
    if name == "mimalloc" and hasattr(process, "mi_collect"):
        return lambda: process.mi_collect(ctypes.c_bool(True))
    if name == "tcmalloc" and hasattr(process, "MallocExtension_ReleaseFreeMemory"):
        return lambda: process.MallocExtension_ReleaseFreeMemory()
    if name == "system" and hasattr(process, "malloc_trim"):  # glibc's; musl has none
        return lambda: process.malloc_trim(ctypes.c_size_t(0))
    return None


class LargestBatchRelease:
    """``train.cpu_release_memory``: before a batch with more tokens than any before it, hand the allocator's freed
    pages back to the kernel.

    Why: the allocators tunelab preloads keep freed pages for reuse (returning them at once costs speed: jemalloc
    with a 1 s decay made full fine-tuning 11% slower on the peer bench, with no delay 29%). Each batch frees
    tensors whose sizes follow its token count, so after a few batches the kept pages are holes of the smaller
    batches' sizes; a batch larger than all of them does not fit in the holes and maps new pages on top. That is
    where a run's peak RSS is set. Released just before, the largest batch lays out its tensors in fresh pages and
    the peak is that batch's own (peer bench, full fine-tuning: 1,555 instead of 1,636 MB with jemalloc). A new
    largest batch comes a few times a run (twice in that 30-step run), so what the next steps fault in again is
    negligible. Nothing here allocates: it only calls the allocator's own release function."""

    def __init__(self, release: Callable[[], None] | None) -> None:
        self.release = release
        self.largest = 0
        self.releases = 0

    @classmethod
    def for_this_process(cls) -> LargestBatchRelease:
        return cls(_release_call(allocator_in_use()))

    def before_batch(self, tokens: int) -> None:
        if tokens > self.largest and self.release is not None:
            self.release()
            self.releases += 1
        self.largest = max(self.largest, tokens)
