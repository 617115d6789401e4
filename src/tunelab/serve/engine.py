"""The serving engine: one base model with its adapters, an admission queue, and generation jobs in threads.

Concurrency model. Each admitted request runs :func:`generate_stream` in its own thread (PyTorch releases the GIL
in its kernels, so several generations share the CPU or GPU). :class:`Scheduler` admits at most
``max_concurrency`` at once and keeps at most ``max_queue`` waiting, strictly first come first served; past that a
request is refused at once (HTTP 429). peft switches adapters by mutating the model, so requests run together only
when they want the same model id: a request for another adapter waits until the running ones finish, and nothing
behind it overtakes it. This is queueing, not batching: for many concurrent users on a GPU, vLLM's continuous
batching (``tunelab serve --engine vllm``) is the tool.

A slot is given back when the generation thread ends, not when the client leaves: a cancelled generation stops
at its next token, and only then may the model be switched to another adapter.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

from tunelab.errors import ConfigError
from tunelab.evaluate.generate import BASE_COLUMN, LoadedModel, SharedBase, eval_columns, stop_token_ids
from tunelab.serve.generation import Completion, SamplingOptions, generate_stream, place_model


class ModelPool:
    """The served model ids: the base (``base_id``) and one per adapter, all on one copy of the base weights."""

    def __init__(
        self, model_path: str, adapters: Sequence[str], *, base_id: str | None = None, template: str | None = None,
        dtype: str = "auto", device: str = "auto",
    ) -> None:
        columns = eval_columns(adapters, base=True)
        self.base_id = base_id or model_path
        names = [c.name for c in columns if c.adapter is not None]
        if self.base_id in names:
            raise ConfigError(f"--adapter {self.base_id}=...: that name is the base model's id; choose another, or "
                              "set --served-model-name")
        self.shared = SharedBase(model_path, columns, template=template, dtype=dtype)  # type: ignore[arg-type]
        self.shared.model = place_model(self.shared.model, device)
        for loaded in self.shared.columns.values():
            loaded.model = self.shared.model
        self.active: str | None = None

    @property
    def ids(self) -> list[str]:
        return [self.base_id, *(name for name in self.shared.columns if name != BASE_COLUMN)]

    def column(self, model_id: str) -> LoadedModel | None:
        if model_id == self.base_id:
            return self.shared.columns[BASE_COLUMN]
        return self.shared.columns.get(model_id) if model_id != BASE_COLUMN else None

    @property
    def context_length(self) -> int | None:
        return getattr(self.shared.model.config, "max_position_embeddings", None)

    def activate(self, model_id: str) -> None:
        """Make ``model_id`` the model that generates. Only called while no generation runs (see Scheduler)."""
        if model_id == self.active or not self.shared.adapter_names:
            self.active = model_id
            return
        model = self.shared.model
        if model_id == self.base_id:
            model.base_model.disable_adapter_layers()
        else:
            model.base_model.enable_adapter_layers()
            model.set_adapter(self.shared.adapter_names[model_id])
        self.active = model_id


class QueueFull(Exception):
    """Every generation slot is busy and the waiting line is full."""


@dataclass
class _Waiter:
    key: str
    future: asyncio.Future[None]


@dataclass
class ServeStats:
    completed: int = 0
    cancelled: int = 0
    """Generations stopped early because their client went away."""
    left_queue: int = 0
    """Requests whose client went away while they waited for a slot."""
    rejected: int = 0
    """Requests refused with 429 (queue full)."""
    failed: int = 0


@dataclass
class Scheduler:
    """FIFO admission: at most ``max_concurrency`` running, all for one model id at a time; ``max_queue`` waiting."""

    max_concurrency: int
    max_queue: int
    activate: Callable[[str], None]
    running: int = 0
    active_key: str | None = None
    waiters: deque[_Waiter] = field(default_factory=deque)
    stats: ServeStats = field(default_factory=ServeStats)

    def _can_start(self, key: str) -> bool:
        return self.running < self.max_concurrency and (self.running == 0 or self.active_key == key)

    def _start(self, key: str) -> None:
        if self.running == 0 and self.active_key != key:
            self.activate(key)
            self.active_key = key
        self.running += 1

    async def acquire(self, key: str) -> None:
        """Wait for a slot for model ``key``; raises :class:`QueueFull` at once when the line is full."""
        if not self.waiters and self._can_start(key):
            self._start(key)
            return
        if len(self.waiters) >= self.max_queue:
            self.stats.rejected += 1
            raise QueueFull
        waiter = _Waiter(key, asyncio.get_running_loop().create_future())
        self.waiters.append(waiter)
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release()  # the slot was granted just as the client left: hand it on
            else:
                self.waiters.remove(waiter)
                self.stats.left_queue += 1
                self._wake()
            raise

    def release(self) -> None:
        self.running -= 1
        self._wake()

    def _wake(self) -> None:
        while self.waiters and self._can_start(self.waiters[0].key):
            waiter = self.waiters.popleft()
            self._start(waiter.key)
            waiter.future.set_result(None)

    @property
    def queued(self) -> int:
        return len(self.waiters)


_END = object()


class Job:
    """One generation in a thread, its text pieces handed to the event loop through an asyncio queue."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, scheduler: Scheduler, loaded: LoadedModel, prompt_ids: list[int],
        options: SamplingOptions, *, stops: Sequence[str], extra_eos: Sequence[str] = (),
    ) -> None:
        self.loop = loop
        self.scheduler = scheduler
        self.loaded = loaded
        self.prompt_ids = prompt_ids
        self.options = options
        self.stops = tuple(stops)
        self.eos_ids = stop_token_ids(loaded, extra_eos)
        self.cancel = threading.Event()
        self.pieces: asyncio.Queue[Any] = asyncio.Queue()
        self.completion: Completion | None = None
        self.error: BaseException | None = None
        self.finished = asyncio.Event()

    def start(self) -> None:
        """Run in a new thread; the scheduler slot (already acquired) is released when the thread ends."""
        threading.Thread(target=self._run, name="tunelab-generate", daemon=True).start()

    def _run(self) -> None:
        completion = error = None
        try:
            completion = generate_stream(
                self.loaded.model, self.loaded.tokenizer, self.prompt_ids, self.options, eos_ids=self.eos_ids,
                stops=self.stops, cancel=self.cancel, on_text=lambda text: self._post(self.pieces.put_nowait, text))
        except Exception as exc:  # reported to the client as a server error, never as a traceback
            error = exc
        self._post(self._finish, completion, error)

    def _post(self, callback: Callable[..., Any], *args: Any) -> None:
        # RuntimeError: the event loop has closed (server shutting down), so nobody is listening.
        with suppress(RuntimeError):
            self.loop.call_soon_threadsafe(callback, *args)

    def _finish(self, completion: Completion | None, error: BaseException | None) -> None:
        self.completion, self.error = completion, error
        stats = self.scheduler.stats
        if error is not None:
            stats.failed += 1
        elif completion is not None and completion.finish_reason == "cancelled":
            stats.cancelled += 1
        else:
            stats.completed += 1
        self.pieces.put_nowait(_END)
        self.finished.set()
        self.scheduler.release()

    async def text(self) -> AsyncIterator[str]:
        """The answer's pieces as they are generated; ends when the generation does."""
        while True:
            piece = await self.pieces.get()
            if piece is _END:
                return
            yield piece

    async def wait(self) -> Completion:
        await self.finished.wait()
        if self.error is not None:
            raise self.error
        assert self.completion is not None
        return self.completion
