"""Dynamic batching across concurrent requests: one worker thread per served model.

Requests are admitted into a bounded per-model queue (bound = admitted, unfinished inputs; a full queue
answers 429 at once, so there is never an unbounded backlog). Two kinds of work:

* ``RowsJob``: tokenized inputs of one embedding request. Before every model call the worker looks at a
  window of the oldest queued rows (from as many requests as fit ``gather_batches`` batches' worth of
  tokens), length-sorts it into token-budget batches with :func:`tamis.batching.plan_batches`, and runs
  the batch that holds the oldest row as one ``model.forward(encodings, tasks)`` call (rows of different
  tasks share a batch). Each request's pooled rows are scattered back into its own tensor; the request
  resolves when its last row is done.
* ``CallJob``: a function run alone on the model thread (a late-chunking request, which must stay one
  sequence, or a rerank request). It gets its job, whose :meth:`Job.progress` it calls between model
  batches: a job given up on stops there.

Deadlines and disconnects are enforced on the waiting side: every admitted job has a timer on the event
loop. When its deadline passes (or its client goes away, or the server drains for shutdown), the request
is answered at once (503 with Retry-After, or 499) and the job is given up: unstarted work leaves the queue,
rows not yet batched are skipped, a running call stops at its next batch boundary. Futures are asyncio
futures resolved thread-safely on the loop that submitted them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from tamis.batching import plan_batches
from tamis.server.errors import ApiError, ClientDisconnected, DeadlineExceeded, Overloaded, ShuttingDown
from tamis.server.metrics import Metrics

if TYPE_CHECKING:  # torch is imported when a model runs: `tamis serve` opens its port before torch loads
    import torch

logger = logging.getLogger("tamis.server")


FREE_PADDING_TOKENS = 64  # padding this small costs less than one more model call
RATE_WINDOW_S = 10.0  # Retry-After: the drain rate of the last this many seconds of work
MAX_RETRY_AFTER_S = 60


def grow_batch(
    lengths: Sequence[int], seed: int, max_tokens: int, max_rows: int, max_padding: float
) -> list[int]:
    """Indices of a batch around row ``seed``: rows of nearest length, within budget and padding bound.

    Starting from ``seed`` alone, repeatedly add the next longer or next shorter row (in length order),
    whichever pads less, while ``rows * longest <= max_tokens``, ``rows <= max_rows`` and the padding
    stays within ``max_padding`` of the real tokens (or within ``FREE_PADDING_TOKENS``). On a CPU the cost of a batch is its padded
    tokens, so a batch of similar lengths beats a full budget of mixed ones; with a window of a few
    hundred queued rows, a budget-filling batch of short rows spans a wide length range.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    a = b = order.index(seed)
    top = lengths[seed]
    rows, real = 1, lengths[seed]
    while rows < max_rows:
        best: tuple[int, int, int, int] | None = None  # (waste, padded, real, direction)
        if a > 0:
            n = lengths[order[a - 1]]
            padded = (rows + 1) * n
            best = (padded - real - n, padded, real + n, -1)
        if b < len(order) - 1:
            n = lengths[order[b + 1]]
            padded = (rows + 1) * top
            cand = (padded - real - n, padded, real + n, 1)
            if best is None or cand[0] < best[0] or best[1] > max_tokens:
                best = cand
        if best is None or best[1] > max_tokens or best[0] > max(max_padding * best[2], FREE_PADDING_TOKENS):
            break
        if best[3] < 0:
            a -= 1
            top = lengths[order[a]]
        else:
            b += 1
        rows, real = rows + 1, best[2]
    return sorted(order[a : b + 1])


def grow_packed_batch(lengths: Sequence[int], seed: int, max_tokens: int, max_rows: int) -> list[int]:
    """Indices of a batch around row ``seed`` for a model that runs packed (no padding computed): rows of
    nearest length while the *real* tokens stay within ``max_tokens`` and rows within ``max_rows``.

    Padding costs nothing there, so no padding bound applies and a batch fills its budget even when the
    queued lengths are mixed; nearest lengths first still keeps the runs of equal length that packed
    attention processes together few."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    a = b = order.index(seed)
    centre = lengths[seed]
    rows, real = 1, centre
    while rows < max_rows:
        up = lengths[order[a - 1]] if a > 0 else None  # next longer
        down = lengths[order[b + 1]] if b < len(order) - 1 else None  # next shorter
        if up is not None and (down is None or up - centre <= centre - down):
            n, step = up, -1
        elif down is not None:
            n, step = down, 1
        else:
            break
        if real + n > max_tokens:
            break
        if step < 0:
            a -= 1
        else:
            b += 1
        rows, real = rows + 1, real + n
    return sorted(order[a : b + 1])


class JobStopped(Exception):
    """Raised by :meth:`Job.progress` inside a running call whose request was given up on."""


class Job:
    """One request's work on one model."""

    def __init__(self, loop: asyncio.AbstractEventLoop, cost: int, deadline: float):
        self.loop = loop
        self.future: asyncio.Future[Any] = loop.create_future()
        # a dropped job's exception may never be awaited (its handler is gone): retrieve it quietly
        self.future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.cost = cost
        self.admitted = time.monotonic()
        self.since = self.admitted  # when the request arrived (its deadline counts from there)
        self.deadline = deadline
        self.started = False
        self.finished = False
        self.cancelled = False
        self.error: BaseException | None = None
        self.owner: ModelWorker | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.seq = 0  # admission order (set by the worker)
        self.turns = 0  # batches seeded from this job (round-robin across requests: fewest turns goes next)
        self.seeded = False  # whether a batch was ever seeded from this job (among equal turns, new ones first)
        self.fraction_done = 0.0  # of a running call, from its progress(done, total)

    def cancel(self) -> None:
        """Give up on this job because its client went away (call on the event loop)."""
        self.cancelled = True
        if self.owner is not None:
            self.owner.abandon(self, ClientDisconnected(), "disconnect")

    @property
    def dead(self) -> bool:
        return self.cancelled or self.error is not None

    def progress(self, done: int = 0, total: int = 0) -> None:
        """Called by running work between model batches: raises :class:`JobStopped` once given up on."""
        if total > 0:
            self.fraction_done = min(1.0, max(0.0, done / total))
        if self.dead:
            raise JobStopped()


class RowsJob(Job):
    """Rows of one embedding request: given tokenized, or tokenized on the model thread by ``prepare``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, n: int, tasks: Sequence[str | None], deadline: float,
                 encodings: Sequence[Any] | None = None, prepare: Callable[[], Sequence[Any]] | None = None,
                 external: bool = False):
        super().__init__(loop, n, deadline)
        if len(tasks) != n or (encodings is not None and len(encodings) != n):
            raise ValueError("one task and one encoding per row are required")
        if not external and (encodings is None) == (prepare is None):
            raise ValueError("give either encodings or prepare")
        # external: admitted before its rows are tokenized elsewhere (the thread pool), which then calls
        # ModelWorker.provide; until then the worker passes it by
        self.external = external
        self.chars = 0  # characters counted in ModelWorker.tokenizing_chars until provided
        self.encodings: list[Any] | None = list(encodings) if encodings is not None else None
        self.prepare = prepare
        self.tasks = list(tasks)
        self.n = n
        self.pending: list[int] = list(range(self.n))  # rows not yet taken into a batch, in order
        self.done = 0  # rows computed or skipped
        self.out: torch.Tensor | None = None


class CallJob(Job):
    def __init__(self, loop: asyncio.AbstractEventLoop, fn: Callable[[Job], Any], cost: int, deadline: float):
        super().__init__(loop, cost, deadline)
        self.fn = fn


class ModelWorker:
    """The queue and thread of one served model."""

    def __init__(
        self,
        name: str,
        model: Any,
        metrics: Metrics | None = None,
        *,
        kind: str = "embedding",
        max_batch_tokens: int = 16384,
        max_batch_size: int = 256,
        gather_batches: int = 4,
        max_queued_inputs: int = 16384,
        max_padding: float | None = 0.1,
        max_tokenizing_chars: int = 16 * 1024 * 1024,
        on_idle: Callable[[], Any] | None = None,
    ):
        self.name = name
        self.kind = kind
        self.labels = (name, kind)
        self.model = model
        self.metrics = metrics or Metrics()
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.gather_batches = gather_batches
        self.max_queued_inputs = max_queued_inputs
        self.max_padding = max_padding
        self.max_tokenizing_chars = max_tokenizing_chars
        self.on_idle = on_idle  # called on the worker thread when its queue has run empty after work
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._pending_inputs = 0
        self._pending_jobs = 0
        self._rate = 0.0  # inputs per second of model time, moving average (Retry-After before any drain)
        self.clock: Callable[[], float] = time.monotonic  # of the drain rate (a test may step it)
        self._done_log: deque[tuple[float, int, float]] = deque()  # (end, inputs, busy seconds), recent
        self._last_end = 0.0
        self._busy_since = 0.0
        self._seq = 0
        self.tokenizing_chars = 0  # characters of admitted requests being tokenized in the thread pool
        self._live: set[Job] = set()  # admitted, not finished
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._draining = False
        self.forward_calls = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        with self._cond:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name=f"tamis-worker-{self.name}", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the thread (waiting ``timeout`` for a running model call; the thread is a daemon) and
        answer whatever is still admitted with 503."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cond:
            for job in list(self._live):
                job.error = job.error or ShuttingDown()
                if isinstance(job, RowsJob):
                    job.done, job.pending = job.n, []
                self._finish_locked(job)
            self._queue.clear()

    def drain(self, at: float) -> None:
        """Stop admitting; answer every admitted request still unfinished at ``at`` (monotonic) with 503.

        Called on the event loop when the server is asked to shut down: what finishes before ``at`` is
        answered normally, the rest gets :class:`ShuttingDown` at ``at`` (its work is given up).
        """
        with self._cond:
            self._draining = True
            live = list(self._live)
        for job in live:
            if job.deadline > at:
                job.deadline = at
                self._arm(job, at - time.monotonic(), self._on_drained)

    @property
    def pending_inputs(self) -> int:
        return self._pending_inputs

    @property
    def pending_jobs(self) -> int:
        return self._pending_jobs

    # ------------------------------------------------------------------ admission (event loop side)
    def drain_rate(self) -> float:
        """Inputs per second the queue has drained at lately: inputs finished over the worker's busy time
        (idle gaps excluded) in the last :data:`RATE_WINDOW_S`; before that, the model-time average."""
        with self._cond:
            n = sum(x[1] for x in self._done_log)
            busy = sum(x[2] for x in self._done_log)
        return n / busy if n and busy > 0 else self._rate

    def remaining_inputs(self) -> float:
        """Admitted inputs not yet computed: rows still to run, and the unfinished part of calls."""
        with self._cond:
            total = 0.0
            for job in self._live:
                if isinstance(job, RowsJob):
                    total += job.n - job.done
                else:
                    total += job.cost * (1.0 - job.fraction_done)
            return total

    def retry_after(self) -> int:
        """Seconds until the queue has drained, at the measured rate (1 to :data:`MAX_RETRY_AFTER_S`)."""
        rate = self.drain_rate()
        if rate <= 0:
            return 1
        return int(min(MAX_RETRY_AFTER_S, max(1, math.ceil(self.remaining_inputs() / rate))))

    def check_capacity(self, cost: int) -> None:
        """Raise :class:`Overloaded` when ``cost`` more inputs would exceed the queue bound.

        A request always fits an empty queue, so even one larger than the bound is served eventually.
        """
        if self._pending_inputs > 0 and self._pending_inputs + cost > self.max_queued_inputs:
            self.metrics.rejected.labels(*self.labels, "overload").inc()
            raise Overloaded(
                f"model {self.name!r} is overloaded: {self._pending_inputs} inputs queued, this request adds "
                f"{cost}, the bound is {self.max_queued_inputs}; retry after the Retry-After delay",
                self.retry_after(),
            )

    def _admit(self, job: Job) -> Job:
        with self._cond:
            if self._stopping or self._draining:
                raise ShuttingDown()
            self.check_capacity(job.cost)
            job.owner = self
            self._seq += 1
            job.seq = self._seq
            # a new request joins the current round: it goes before jobs that have had more turns
            job.turns = min((j.turns for j in self._queue if isinstance(j, RowsJob)), default=0)
            self._queue.append(job)
            self._live.add(job)
            self._pending_inputs += job.cost
            self._pending_jobs += 1
            self._update_gauges()
            self._cond.notify()
        self._arm(job, job.deadline - time.monotonic(), self._on_deadline)
        job.future.add_done_callback(lambda _: job.timer.cancel() if job.timer is not None else None)
        if self._thread is None or not self._thread.is_alive():
            self.start()
        return job

    # ------------------------------------------------------------------ giving up (event loop side)
    def _arm(self, job: Job, delay: float, callback: Callable[[Job], None]) -> None:
        if job.timer is not None:
            job.timer.cancel()
        job.timer = job.loop.call_later(max(0.0, delay), callback, job)

    def _on_deadline(self, job: Job) -> None:
        waited = time.monotonic() - job.since
        self.abandon(job, DeadlineExceeded(waited, self.retry_after(), started=job.started), "deadline")

    def _on_drained(self, job: Job) -> None:
        self.abandon(job, ShuttingDown(), "shutdown")

    def abandon(self, job: Job, exc: ApiError, reason: str) -> None:
        """Answer ``job`` with ``exc`` now (event loop) and give up its work: unstarted work leaves the
        queue at once, a running call stops at its next :meth:`Job.progress`."""
        if not job.future.done():
            job.future.set_exception(exc)
        with self._cond:
            if job.finished:
                return
            self.metrics.dropped.labels(*self.labels, reason).inc()
            if job.error is None:
                job.error = exc
            if isinstance(job, RowsJob):
                job.done += len(job.pending)  # rows not yet in a batch are skipped
                job.pending = []
                if job.done >= job.n:
                    self._finish_locked(job)
            elif not job.started:
                self._finish_locked(job)
            if job.finished:
                try:
                    self._queue.remove(job)
                except ValueError:
                    pass
            self._cond.notify()

    def submit_rows(self, encodings: Sequence[Any], tasks: Sequence[str | None], timeout_s: float) -> RowsJob:
        """Queue tokenized rows (one task per row); the future gives their pooled tensor [n, dim]."""
        job = RowsJob(asyncio.get_running_loop(), len(encodings), tasks, time.monotonic() + timeout_s,
                      encodings=encodings)
        return self._admit_rows(job)

    def submit_texts(self, n: int, prepare: Callable[[], Sequence[Any]], tasks: Sequence[str | None],
                     timeout_s: float) -> RowsJob:
        """Queue ``n`` rows that ``prepare()`` tokenizes on the model thread, between model calls.

        On a CPU the model's threads own every core while it runs; tokenizing on the same thread keeps
        that work from competing with them (the same order of work as an offline ``embed``).
        Exceptions of ``prepare`` (too long, unknown task) fail the request.
        """
        job = RowsJob(asyncio.get_running_loop(), n, tasks, time.monotonic() + timeout_s, prepare=prepare)
        return self._admit_rows(job)

    def submit_external(self, n: int, tasks: Sequence[str | None], timeout_s: float, chars: int = 0) -> RowsJob:
        """Admit ``n`` rows now, before they are tokenized (in the thread pool, then :meth:`provide`).

        Admission at once puts the request under the queue bound (429), its deadline and its client's
        disconnect while it is being tokenized; ``chars`` counts against :attr:`max_tokenizing_chars` (429
        when other requests are already tokenizing that much), released by :meth:`provide`.
        """
        job = RowsJob(asyncio.get_running_loop(), n, tasks, time.monotonic() + timeout_s, external=True)
        job.chars = chars
        with self._cond:
            if chars and self.tokenizing_chars and self.tokenizing_chars + chars > self.max_tokenizing_chars:
                self.metrics.rejected.labels(*self.labels, "overload").inc()
                raise Overloaded(
                    f"model {self.name!r} is overloaded: requests of {self.tokenizing_chars} characters are being "
                    f"tokenized, this one adds {chars}, the bound is {self.max_tokenizing_chars}; retry after the "
                    "Retry-After delay", self.retry_after())
            self._admit(job)
            self.tokenizing_chars += chars
        return job

    def provide(self, job: RowsJob, encodings: Sequence[Any] | None, error: BaseException | None = None) -> None:
        """The tokenized rows of an external job (or why it could not be tokenized): it may now run."""
        with self._cond:
            self.tokenizing_chars -= job.chars
            job.chars = 0
            if error is None and encodings is not None and len(encodings) != job.n:
                error = RuntimeError(f"tokenize returned {len(encodings)} encodings for {job.n} inputs")
            if error is not None:
                job.error = job.error or error
                job.done, job.pending = job.n, []
                self._finish_locked(job)
            else:
                job.encodings = list(encodings or [])
            job.external = False
            self._cond.notify()

    def _admit_rows(self, job: RowsJob) -> RowsJob:
        if job.n == 0:
            import torch

            job.encodings = []
            job.future.set_result(torch.empty(0, 0))
            return job
        self._admit(job)
        return job

    def submit_call(self, fn: Callable[[Job], Any], cost: int, timeout_s: float) -> CallJob:
        """Queue ``fn(job)`` to run alone on the model thread; it should call ``job.progress()`` between
        model batches so that it stops when the request is given up on."""
        job = CallJob(asyncio.get_running_loop(), fn, max(1, int(cost)), time.monotonic() + timeout_s)
        self._admit(job)
        return job

    # ------------------------------------------------------------------ worker thread
    def _update_gauges(self) -> None:
        self.metrics.queue_depth.labels(*self.labels).set(self._pending_inputs)
        self.metrics.queue_requests.labels(*self.labels).set(self._pending_jobs)

    def _resolve(self, job: Job, result: Any = None, exc: BaseException | None = None) -> None:
        fut = job.future

        def settle() -> None:
            if fut.done():
                return
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(result)

        try:
            job.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def _finish_locked(self, job: Job, result: Any = None) -> None:
        if job.finished:
            return
        job.finished = True
        self._live.discard(job)
        self._pending_inputs -= job.cost
        self._pending_jobs -= 1
        self._update_gauges()
        if job.error is not None:
            self._resolve(job, exc=job.error)
        elif job.cancelled:
            self._resolve(job, exc=ClientDisconnected())
        else:
            self._resolve(job, result)

    def _drop_dead_locked(self) -> None:
        keep: deque[Job] = deque()
        for job in self._queue:
            if job.dead:
                if isinstance(job, RowsJob):
                    job.done += len(job.pending)  # rows never taken are skipped
                    job.pending = []
                    if job.done >= job.n:
                        self._finish_locked(job)
                else:
                    self._finish_locked(job)
                continue
            keep.append(job)
        self._queue = keep

    def _runs_packed(self, tasks: Sequence[str | None]) -> bool:
        """Whether the model computes this window's rows packed (:meth:`tamis.Embedder.runs_packed`), so
        batches are planned on real tokens rather than padded ones."""
        runs_packed = getattr(self.model, "runs_packed", None)
        return bool(runs_packed(tasks)) if callable(runs_packed) else False

    def _ready_rows_locked(self) -> list[RowsJob]:
        """Queued row jobs that can be batched now (tokenized; before the first queued call, which keeps its
        place in line), in turn order: fewest turns first, then those never served, then arrival."""
        jobs: list[RowsJob] = []
        for job in self._queue:
            if not isinstance(job, RowsJob):
                break
            if job.encodings is not None and job.pending and not job.dead:
                jobs.append(job)
        jobs.sort(key=lambda j: (j.turns, j.seeded, j.seq))
        return jobs

    def _next_batch_locked(self) -> list[tuple[RowsJob, int]]:
        """One batch, planned over a window of queued rows, shared fairly between requests.

        Requests take turns (round-robin): the batch is seeded by the oldest pending row of the request
        with the fewest turns so far (a new request joins the current round), so a small request waits for
        at most one batch per other active request, whatever the size of the others. The window holds
        rows of the queued requests taken one by one from each in turn order, up to ``gather_batches``
        batches' worth; the batch is built around the seed row from the window's rows of nearest length
        (any request's): for a model that runs packed (:func:`grow_packed_batch`) up to the token budget in
        real tokens; otherwise (:func:`grow_batch`) within the budget of :func:`plan_batches` plus a bound
        on padding, or, with ``max_padding=None``, it is the :func:`plan_batches` batch that holds the seed.
        The rest stay queued and are planned again with whatever arrives meanwhile.
        """
        token_budget = self.max_batch_tokens * self.gather_batches
        row_budget = self.max_batch_size * self.gather_batches
        jobs = self._ready_rows_locked()
        if not jobs:
            return []
        window: list[tuple[RowsJob, int]] = []
        tokens = 0
        cursors = [0] * len(jobs)
        full = False
        while not full:
            added = False
            for k, job in enumerate(jobs):
                if cursors[k] >= len(job.pending):
                    continue
                r = job.pending[cursors[k]]
                n_tok = len(job.encodings[r])  # type: ignore[index]
                if window and (tokens + n_tok > token_budget or len(window) >= row_budget):
                    full = True
                    break
                window.append((job, r))
                tokens += n_tok
                cursors[k] += 1
                added = True
            if not added:
                break
        lengths = [len(j.encodings[r]) for j, r in window]  # type: ignore[index]
        if self._runs_packed([j.tasks[r] for j, r in window]):
            chosen = grow_packed_batch(lengths, 0, self.max_batch_tokens, self.max_batch_size)
        elif self.max_padding is None:
            chosen = sorted(next(b for b in plan_batches(lengths, self.max_batch_tokens, self.max_batch_size)
                                 if 0 in b))
        else:
            chosen = grow_batch(lengths, 0, self.max_batch_tokens, self.max_batch_size, self.max_padding)
        batch = [window[i] for i in chosen]
        jobs[0].turns += 1
        jobs[0].seeded = True
        taken: dict[int, set[int]] = {}
        now = time.monotonic()
        for job, r in batch:
            taken.setdefault(id(job), set()).add(r)
            if not job.started:
                job.started = True
                self.metrics.queue_wait.labels(*self.labels).observe(now - job.admitted)
        for job, _ in batch:
            rows = taken.pop(id(job), None)
            if rows:
                job.pending = [r for r in job.pending if r not in rows]
        self._queue = deque(j for j in self._queue
                            if not (isinstance(j, RowsJob) and j.encodings is not None and not j.pending))
        return batch

    def _run(self) -> None:
        worked = False
        while True:
            call: CallJob | None = None
            unprepared: list[RowsJob] = []
            batch: list[tuple[RowsJob, int]] = []
            if worked and self.on_idle is not None and not self._queue:
                worked = False
                try:  # the queue ran empty: e.g. hand freed memory back (tamis.server.memory.trim)
                    self.on_idle()
                except Exception:  # pragma: no cover - a hook's failure must not stop the worker
                    logger.exception("worker %s: idle hook failed", self.name)
            with self._cond:
                if not self._queue and not self._stopping:
                    while not self._queue and not self._stopping:
                        self._cond.wait()
                    self._busy_since = self.clock()  # idle until now: not part of the drain rate
                if self._stopping:
                    return
                self._drop_dead_locked()
                if not self._queue:
                    continue
                head = self._queue[0]
                if isinstance(head, CallJob):
                    call = self._queue.popleft()
                    call.started = True
                    self.metrics.queue_wait.labels(*self.labels).observe(time.monotonic() - call.admitted)
                else:
                    unprepared = self._unprepared_locked()
                    if not unprepared:
                        batch = self._next_batch_locked()
                        if not batch:  # what is queued is still being tokenized elsewhere: wait for it
                            self._cond.wait(1.0)
                            self._busy_since = self.clock()
                            continue
            worked = True
            try:
                if call is not None:
                    self._run_call(call)
                elif unprepared:
                    self._prepare(unprepared)
                else:
                    self._run_batch(batch)
            except BaseException as exc:  # pragma: no cover - a bug in the worker itself
                logger.exception("worker %s failed outside the model call; failing the jobs involved", self.name)
                jobs: list[Job] = [call] if call is not None else list({id(j): j for j, _ in batch}.values())
                with self._cond:
                    for job in jobs:
                        job.error = job.error or exc
                        if isinstance(job, RowsJob):
                            job.done, job.pending = job.n, []
                        self._finish_locked(job)

    def _unprepared_locked(self) -> list[RowsJob]:
        """Queued row jobs to tokenize on this thread, in order, up to the planning window's row budget
        (counting only their rows: a big queued request does not keep a small one from its turn)."""
        out: list[RowsJob] = []
        rows = 0
        for job in self._queue:
            if not isinstance(job, RowsJob) or rows >= self.max_batch_size * self.gather_batches:
                break
            if job.encodings is None and job.prepare is not None and not job.dead:
                rows += job.n
                out.append(job)
        return out

    def _prepare(self, jobs: list[RowsJob]) -> None:
        for job in jobs:
            if job.dead or job.prepare is None:
                continue
            try:
                encodings = list(job.prepare())
                if len(encodings) != job.n:
                    raise RuntimeError(f"tokenize returned {len(encodings)} encodings for {job.n} inputs")
                job.encodings = encodings
            except BaseException as exc:
                job.error = exc
            job.prepare = None

    def _note_rate(self, n: int, seconds: float) -> None:
        if seconds > 0:
            r = n / seconds
            self._rate = r if self._rate <= 0 else 0.8 * self._rate + 0.2 * r
        end = self.clock()
        busy = end - max(self._busy_since, self._last_end)
        self._last_end = end
        with self._cond:
            self._done_log.append((end, n, max(0.0, busy)))
            while len(self._done_log) > 1 and end - self._done_log[0][0] > RATE_WINDOW_S:
                self._done_log.popleft()

    def _run_call(self, job: CallJob) -> None:
        if job.dead:
            with self._cond:
                self._finish_locked(job)
            return
        t0 = time.perf_counter()
        try:
            result = job.fn(job)
        except BaseException as exc:  # JobStopped keeps the reason the job was given up for
            job.error = job.error or exc
            result = None
        dt = time.perf_counter() - t0
        self.metrics.forward_seconds.labels(*self.labels).observe(dt)
        self._note_rate(job.cost, dt)
        with self._cond:
            self._finish_locked(job, result)

    def _row_done_locked(self, job: RowsJob) -> None:
        job.done += 1
        if job.done >= job.n:
            self._finish_locked(job, job.out)

    def _run_batch(self, rows: list[tuple[RowsJob, int]]) -> None:
        live = [(j, r) for j, r in rows if not j.dead]
        if len(live) < len(rows):
            with self._cond:
                for job, _ in rows:
                    if job.dead:
                        self._row_done_locked(job)
        if not live:
            return
        encodings = [job.encodings[r] for job, r in live]
        tasks = [job.tasks[r] for job, r in live]
        t0 = time.perf_counter()
        try:
            out = self.model.forward(encodings, tasks)
            error = None
        except BaseException as exc:
            out, error = None, exc
        dt = time.perf_counter() - t0
        self.forward_calls += 1
        width = max(len(e) for e in encodings)
        m = self.metrics
        m.forward_seconds.labels(*self.labels).observe(dt)
        m.batch_size.labels(*self.labels).observe(len(live))
        m.batch_tokens.labels(*self.labels).observe(len(live) * width)
        m.batch_requests.labels(*self.labels).observe(len({id(j) for j, _ in live}))
        self._note_rate(len(live), dt)
        with self._cond:
            for k, (job, r) in enumerate(live):
                if error is not None:
                    job.error = job.error or error
                elif not job.dead:
                    assert out is not None
                    if job.out is None:
                        import torch

                        job.out = torch.empty(job.n, out.shape[-1], dtype=torch.float32)
                    job.out[r] = out[k]
                self._row_done_locked(job)


async def _watch_disconnect(receive: Callable[[], Awaitable[dict[str, Any]]], job: Job) -> None:
    while True:
        message = await receive()
        if message.get("type") == "http.disconnect":
            job.cancel()
            return
        await asyncio.sleep(0.05)  # an unexpected extra body message: keep listening, never spin


async def wait_for(job: Job, receive: Callable[[], Awaitable[dict[str, Any]]] | None = None) -> Any:
    """Await a job; when ``receive`` (the ASGI receive of the request) reports a disconnect, drop it.

    The job's deadline (and a shutdown drain) resolve its future on time whatever the worker is doing.
    """
    watcher = asyncio.ensure_future(_watch_disconnect(receive, job)) if receive is not None else None
    try:
        return await job.future
    except asyncio.CancelledError:
        job.cancel()
        raise
    finally:
        if watcher is not None:
            watcher.cancel()
