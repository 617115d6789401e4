"""The serving engine: one base model with its adapters, an admission queue, and the engine that generates.

Admission. :class:`Scheduler` admits at most ``max_concurrency`` requests (and ``max_batch_size`` rows: a request
with ``n`` choices is ``n`` rows) at once and keeps at most ``max_queue`` waiting, strictly first come first served;
past that a request is refused at once (HTTP 429). peft switches adapters by mutating the model, so requests run
together only when they want the same model id: a request for another adapter waits until the running ones finish,
and nothing behind it overtakes it -- the model ids take turns in arrival order.

Generation, two engines:

* :class:`BatchEngine` (``--max-batch-size`` 2 or more, the default): one thread owns the model and decodes every
  admitted row in one batch (:mod:`tunelab.serve.batching`), one forward pass per token for all of them. This is
  continuous batching: an admitted request joins the running batch at the next step, and a row that finishes or
  whose client leaves drops out of it at once.
* :class:`ThreadEngine` (``--max-batch-size 1``): each request runs its own ``generate`` in its own thread, as
  tunelab did before batching; kept to compare against and as a fallback.

A slot is given back when a request's last row has left the model, not when the client leaves: a cancelled row
stops at the next step, and only then may the model be switched to another adapter.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

from tunelab.errors import ConfigError
from tunelab.evaluate.generate import BASE_COLUMN, LoadedModel, SharedBase, eval_columns, stop_token_ids
from tunelab.serve.batching import DecodeBatch, Row, row_generator
from tunelab.serve.generation import Completion, SamplingOptions, TokenStream, generate_stream, place_model

logger = logging.getLogger("tunelab.serve")


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

    @property
    def prompt_learning(self) -> bool:
        """The adapters are prompt-learning ones (one kind per pool): they add virtual tokens, not layers."""
        config = getattr(self.shared.model, "active_peft_config", None)
        return bool(self.shared.adapter_names and config is not None and config.is_prompt_learning)

    def activate(self, model_id: str) -> None:
        """Make ``model_id`` the model that generates. Only called while no generation runs (see Scheduler)."""
        if model_id == self.active or not self.shared.adapter_names:
            self.active = model_id
            return
        model = self.shared.model
        if model_id != self.base_id:
            if not self.prompt_learning:
                model.base_model.enable_adapter_layers()
            model.set_adapter(self.shared.adapter_names[model_id])
        elif not self.prompt_learning:  # prompt learning has no layers to disable: see generation_model
            model.base_model.disable_adapter_layers()
        self.active = model_id

    def generation_model(self) -> Any:
        """The model to generate with for the active id: a prompt-learning adapter's ``PeftModel`` (generation
        adds its virtual tokens), else the transformers model itself (LoRA-type layers live inside it)."""
        model = self.shared.model
        if not self.shared.adapter_names or (self.prompt_learning and self.active != self.base_id):
            return model
        return model.get_base_model()


class QueueFull(Exception):
    """Every generation slot is busy and the waiting line is full."""


@dataclass
class _Waiter:
    key: str
    rows: int
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
    peak_batch_rows: int = 0
    """Most rows decoded in one forward pass so far (batching engine)."""


@dataclass
class Scheduler:
    """FIFO admission: at most ``max_concurrency`` requests and ``max_rows`` rows running, all for one model id at a
    time; ``max_queue`` waiting."""

    max_concurrency: int
    max_queue: int
    activate: Callable[[str], None]
    max_rows: int | None = None
    running: int = 0
    running_rows: int = 0
    active_key: str | None = None
    waiters: deque[_Waiter] = field(default_factory=deque)
    stats: ServeStats = field(default_factory=ServeStats)

    def _can_start(self, key: str, rows: int) -> bool:
        fits = self.max_rows is None or self.running_rows + rows <= self.max_rows
        return fits and self.running < self.max_concurrency and (self.running == 0 or self.active_key == key)

    def _start(self, key: str, rows: int) -> None:
        if self.running == 0 and self.active_key != key:
            self.activate(key)
            self.active_key = key
        self.running += 1
        self.running_rows += rows

    async def acquire(self, key: str, rows: int = 1) -> None:
        """Wait for a slot for ``rows`` rows of model ``key``; raises :class:`QueueFull` at once when the line is
        full."""
        if not self.waiters and self._can_start(key, rows):
            self._start(key, rows)
            return
        if len(self.waiters) >= self.max_queue:
            self.stats.rejected += 1
            raise QueueFull
        waiter = _Waiter(key, rows, asyncio.get_running_loop().create_future())
        self.waiters.append(waiter)
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release(rows)  # the slot was granted just as the client left: hand it on
            else:
                self.waiters.remove(waiter)
                self.stats.left_queue += 1
                self._wake()
            raise

    def release(self, rows: int = 1) -> None:
        self.running -= 1
        self.running_rows -= rows
        self._wake()

    def _wake(self) -> None:
        while self.waiters and self._can_start(self.waiters[0].key, self.waiters[0].rows):
            waiter = self.waiters.popleft()
            self._start(waiter.key, waiter.rows)
            waiter.future.set_result(None)

    @property
    def queued(self) -> int:
        return len(self.waiters)


_END = object()


class Job:
    """One admitted request: ``n`` answers (choices) to one prompt, generated by an engine in another thread.

    The engine reports through :meth:`text_sink` and :meth:`row_done`, from its thread; the event loop reads
    :meth:`events`. The scheduler slot (already acquired) is released when the last choice is done.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, scheduler: Scheduler, model_id: str, loaded: LoadedModel,
        prompt_ids: list[int], options: SamplingOptions, *, n: int = 1, stops: Sequence[str],
        extra_eos: Sequence[str] = (),
    ) -> None:
        self.loop = loop
        self.scheduler = scheduler
        self.model_id = model_id
        self.loaded = loaded
        self.prompt_ids = prompt_ids
        self.options = options
        self.n = n
        self.stops = tuple(stops)
        self.eos_ids = stop_token_ids(loaded, extra_eos)
        self.cancel = threading.Event()
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self.completions: list[Completion | None] = [None] * n
        self.error: BaseException | None = None
        self.finished = asyncio.Event()
        self._left = n

    def token_stream(self, index: int) -> TokenStream:
        """The per-token hook of choice ``index``: its text goes to :meth:`events`."""
        return TokenStream(self.loaded.tokenizer, eos_ids=self.eos_ids, stops=self.stops,
                           max_new_tokens=self.options.max_new_tokens, cancel=self.cancel,
                           on_text=self.text_sink(index))

    def text_sink(self, index: int) -> Callable[[str], None]:
        return lambda text: self._post(self._events.put_nowait, (index, text))

    def row_done(self, index: int, completion: Completion | None, error: BaseException | None) -> None:
        self._post(self._row_done, index, completion, error)

    def _post(self, callback: Callable[..., Any], *args: Any) -> None:
        # RuntimeError: the event loop has closed (server shutting down), so nobody is listening.
        with suppress(RuntimeError):
            self.loop.call_soon_threadsafe(callback, *args)

    def _row_done(self, index: int, completion: Completion | None, error: BaseException | None) -> None:
        self.completions[index] = completion
        if error is not None and self.error is None:
            self.error = error
        self._events.put_nowait((index, None))
        self._left -= 1
        if self._left == 0:
            self._finish()

    def _finish(self) -> None:
        stats = self.scheduler.stats
        if self.error is not None:
            stats.failed += 1
        elif any(c is not None and c.finish_reason == "cancelled" for c in self.completions):
            stats.cancelled += 1
        else:
            stats.completed += 1
        self._events.put_nowait(_END)
        self.finished.set()
        self.scheduler.release(self.n)

    async def events(self) -> AsyncIterator[tuple[int, str | None]]:
        """``(index, text)`` for each piece of choice ``index`` as it is generated, then ``(index, None)`` when
        that choice is over (its completion in :attr:`completions`, or :attr:`error` set); ends after the last."""
        while True:
            event = await self._events.get()
            if event is _END:
                return
            yield event

    async def wait(self) -> list[Completion]:
        await self.finished.wait()
        if self.error is not None:
            raise self.error
        return [c for c in self.completions if c is not None]


class ThreadEngine:
    """``--max-batch-size 1``: each request runs :func:`generate_stream` in its own thread (PyTorch releases the
    GIL in its kernels, so several generations share the CPU or GPU), one ``generate`` per request."""

    def __init__(self, pool: ModelPool) -> None:
        self.pool = pool

    def admitted(self, model_id: str) -> None:
        """The scheduler admits a request while none runs for another model id: switch the adapter now."""
        self.pool.activate(model_id)

    def start(self, job: Job) -> None:
        model = self.pool.generation_model()
        threading.Thread(target=self._run, args=(job, model), name="tunelab-generate", daemon=True).start()

    @staticmethod
    def _run(job: Job, model: Any) -> None:
        completion = error = None
        try:
            completion = generate_stream(
                model, job.loaded.tokenizer, job.prompt_ids, job.options, eos_ids=job.eos_ids, stops=job.stops,
                cancel=job.cancel, on_text=job.text_sink(0))
        except Exception as exc:  # reported to the client as a server error, never as a traceback
            error = exc
        job.row_done(0, completion, error)


class BatchEngine:
    """One decoding thread for all requests: admitted rows join the running batch at the next step.

    The thread is the only one that touches the model, so it also switches adapters: rows for another model id
    than the batch's wait in the inbox until the batch is empty (the scheduler never admits them earlier anyway).
    """

    def __init__(self, pool: ModelPool, stats: ServeStats) -> None:
        self.pool = pool
        self.stats = stats
        self.inbox: deque[tuple[str, Row]] = deque()
        self.ready = threading.Condition()
        self.device = next(pool.shared.model.parameters()).device
        threading.Thread(target=self._run, name="tunelab-batch", daemon=True).start()

    def admitted(self, model_id: str) -> None:
        """Nothing to do on the event loop: the decoding thread activates the model id when it starts a batch."""

    def start(self, job: Job) -> None:
        rows = []
        for index in range(job.n):
            seed = None if job.options.seed is None else job.options.seed + index  # n choices, n different answers
            generator = row_generator(seed, self.device) if job.options.temperature > 0 else None
            rows.append(Row(list(job.prompt_ids), job.options, job.token_stream(index), tuple(job.eos_ids),
                            on_done=_reporter(job, index), generator=generator))
        with self.ready:
            self.inbox.extend((job.model_id, row) for row in rows)
            self.ready.notify()

    def _run(self) -> None:
        batch: DecodeBatch | None = None
        key: str | None = None
        while True:
            with self.ready:
                while not self.inbox and (batch is None or not batch.rows):
                    self.ready.wait()
                if batch is None or not batch.rows:
                    key = self.inbox[0][0]
                joining = [row for row_key, row in self.inbox if row_key == key]
                self.inbox = deque(item for item in self.inbox if item[0] != key)
            try:
                if joining and (batch is None or not batch.rows):
                    assert key is not None
                    self.pool.activate(key)
                    batch = DecodeBatch(self.pool.generation_model())
                if joining:
                    assert batch is not None
                    batch.add(joining)
                    self.stats.peak_batch_rows = max(self.stats.peak_batch_rows, len(batch.rows))
                if batch is not None and batch.rows:
                    batch.step()
            except Exception as exc:  # every row in flight fails; the thread goes on with the next requests
                logger.exception("batched generation failed")
                for row in [*joining, *(batch.clear() if batch is not None else [])]:
                    row.report(exc)


def build_engine(
    pool: ModelPool, *, max_concurrency: int, max_queue: int, max_batch_size: int
) -> tuple[BatchEngine | ThreadEngine, Scheduler]:
    """The engine for ``--max-batch-size`` and the scheduler in front of it."""
    stats = ServeStats()
    if max_batch_size > 1:
        batch = BatchEngine(pool, stats)
        return batch, Scheduler(max_concurrency, max_queue, batch.admitted, max_rows=max_batch_size, stats=stats)
    # Threads run one row each (the server refuses n > 1), so only --max-concurrency limits them.
    threads = ThreadEngine(pool)
    return threads, Scheduler(max_concurrency, max_queue, threads.admitted, stats=stats)


def _reporter(job: Job, index: int) -> Callable[[Completion | None, BaseException | None], None]:
    return lambda completion, error: job.row_done(index, completion, error)
