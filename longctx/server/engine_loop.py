"""The engine on its own thread, with an asyncio face.

    event loop (HTTP handlers)              engine thread
    ---------------------------             ------------------------------------------
    open([EngineRequest]) --- add ---->     commands queue --> engine.add_request
    OutputStream.__aexit__ -- abort -->                    --> engine.abort (blocks freed)
                                            while work: engine.step()
    asyncio.Queue per stream <------------- call_soon_threadsafe(put outputs / errors)

Continuous batching is the engine's: it batches whatever is queued. This thread only adds and
aborts requests between steps, so the event loop never waits for a forward pass. A failure is
contained: a request that cannot be added gets its own error, and a step that raises fails the
requests it was running (EngineStepError) while the loop goes on serving the rest.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from longctx.engine.llm_engine import LLMEngine
from longctx.engine.outputs import RequestOutput
from longctx.sampling_params import SamplingParams
from longctx.server.metrics import EngineStats, ServerMetrics

log = logging.getLogger(__name__)

IDLE_POLL_S = 0.5  # how long the idle thread sleeps between checks for stop


class EngineStepError(RuntimeError):
    """engine.step() raised while this request was running."""


class EngineStopped(RuntimeError):
    """The server shut down before this request finished."""


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    share_prompt_with: str | None = None  # another request's id: reuse its prefill (n > 1)


@dataclass
class _Tracked:
    """A request the thread serves: where its updates go and its timing for metrics."""

    request: EngineRequest
    loop: asyncio.AbstractEventLoop
    sink: asyncio.Queue
    num_tokens: int = 0
    last_token_time: float | None = None


class EngineLoop:
    def __init__(self, engine: LLMEngine, metrics: ServerMetrics | None = None) -> None:
        self.engine = engine
        self.metrics = metrics or ServerMetrics()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._tracked: dict[str, _Tracked] = {}  # engine thread only
        self._stats = EngineStats(blocks_total=engine.scheduler.blocks.num_blocks)
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        # OpenMP thread counts are per thread: the engine thread would not inherit a
        # torch.set_num_threads made on the main thread (it would use every core).
        self._torch_threads = torch.get_num_threads()
        self._stop_lock = threading.Lock()  # no add may slip in after the final drain
        # Requests accepted but not yet in the engine (being tokenized, or queued while the
        # engine thread is in a step): the waiting gauge counts them from admission.
        self._unadmitted = 0
        self._unadmitted_tokens = 0  # prompt tokens of those already tokenized
        self._unadmitted_lock = threading.Lock()

    # --- lifecycle (any thread) ---------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="longctx-engine", daemon=True)
            self._thread.start()

    def stop_soon(self) -> None:
        """Ask the thread to stop (from any thread, a signal handler included): a step under
        way unwinds at its next layer, and every open stream gets EngineStopped."""
        if self._thread is not None:
            self.engine.abort_signal.abort_everything()
            self._commands.put(("stop", None))

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            self.stop_soon()
            self._thread.join(timeout)
            self._thread = None

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> EngineStats:
        stats = self._stats
        return dataclasses.replace(
            stats,
            waiting=stats.waiting + self._unadmitted,
            queued_prompt_tokens=self._unadmitted_tokens,
        )

    @contextmanager
    def admitting(self) -> Iterator[None]:
        """Count a request as waiting while it is prepared (tokenized) for open()."""
        self._count_unadmitted(1)
        try:
            yield
        finally:
            self._count_unadmitted(-1)

    def _count_unadmitted(self, n: int, tokens: int = 0) -> None:
        with self._unadmitted_lock:
            self._unadmitted += n
            self._unadmitted_tokens += tokens

    # --- requests (event loop) ----------------------------------------------------------------
    def open(self, requests: list[EngineRequest]) -> OutputStream:
        """Queue the requests; their outputs arrive on the returned stream, which aborts the
        unfinished ones when closed (use it as `async with`)."""
        sink: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        with self._stop_lock:
            if self._thread is None or self._stopped.is_set():
                raise EngineStopped("the engine is not running")
            self._count_unadmitted(len(requests), sum(len(r.prompt_token_ids) for r in requests))
            for req in requests:
                self._commands.put(("add", _Tracked(req, loop, sink)))
        return OutputStream(self, [r.request_id for r in requests], sink)

    def abort(self, request_ids: list[str]) -> None:
        """Abort now: the mark unwinds a prefill step of these requests between two layers;
        the command then frees their blocks on the engine thread."""
        for rid in request_ids:
            self.engine.abort_signal.abort(rid)
            self._commands.put(("abort", rid))

    # --- the thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_num_threads(self._torch_threads)
        # The gauges show what a step runs while it runs (a prefill chunk may take seconds).
        self.engine.after_schedule = self._publish_stats
        try:
            while self._handle_commands(block=not self.engine.has_unfinished()):
                if self.engine.has_unfinished():
                    self._step()
                self._publish_stats()
        finally:
            with self._stop_lock:
                self._stopped.set()
            self._fail_all(lambda: EngineStopped("the server is shutting down"))
            self._refuse_queued()
            self.engine.abort_signal.reset()  # the engine may serve again (offline, a new loop)
            self.engine.after_schedule = None
            self._publish_stats()

    def _handle_commands(self, block: bool) -> bool:
        """Apply queued adds and aborts (waiting for one if block); False once asked to stop."""
        while (command := self._next_command(block)) is not None:
            block = False
            kind, arg = command
            if kind == "stop":
                return False
            if kind == "add":
                self._add(arg)
            else:
                self._abort(arg)
        return True

    def _next_command(self, block: bool) -> tuple[str, object] | None:
        try:
            return self._commands.get(timeout=IDLE_POLL_S) if block else self._commands.get_nowait()
        except queue.Empty:
            return None

    def _add(self, tracked: _Tracked) -> None:
        req = tracked.request
        self._count_unadmitted(-1, -len(req.prompt_token_ids))
        try:
            self.engine.add_request(
                req.prompt,
                req.params,
                request_id=req.request_id,
                prompt_token_ids=req.prompt_token_ids,
                share_prompt_with=req.share_prompt_with,
            )
        except Exception as e:  # a LongctxError (or a bug) is this request's alone
            self._deliver({tracked.loop: [(tracked.sink, req.request_id, e)]})
            self._record_done(tracked, "error")
            return
        self._tracked[req.request_id] = tracked

    def _abort(self, request_id: str) -> None:
        tracked = self._tracked.pop(request_id, None)
        if tracked is not None:
            self.engine.abort(request_id)
            self._record_done(tracked, "abort")
        else:  # finished meanwhile (or refused): only the mark is left
            self.engine.abort_signal.clear(request_id)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:
            log.exception("engine step failed; failing the requests it was running")
            self._fail_running(e)
            return
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            tracked = self._tracked.get(out.request_id)
            if tracked is None:
                continue
            self._record_tokens(tracked, out)
            batches.setdefault(tracked.loop, []).append((tracked.sink, out.request_id, out))
            if out.finished:
                del self._tracked[out.request_id]
                self._record_done(tracked, out.finish_reason or "stop")
        self._deliver(batches)

    def _fail_running(self, cause: Exception) -> None:
        victims = [rid for rid in self._suspects() if rid in self._tracked] or list(self._tracked)
        if isinstance(cause, torch.OutOfMemoryError):
            message = "the engine ran out of device memory while running this request"
        else:
            message = "internal error while running this request; see the server log"
        self._fail(victims, lambda: EngineStepError(message))

    def _suspects(self) -> list[str]:
        """Whom a failed step fails. A launch that raised (out of memory in a prefill chunk,
        say) changed no sequence: fail its prefilling requests, or its whole batch if it had
        none, and the others retry. A failure while reading a step back may have left any
        running request half-updated: fail them all. If none is known (the failure came
        before admission), the caller fails every request rather than the same step forever."""
        batch = self.engine.failed_batch
        if batch is None:
            return [s.request_id for s in self.engine.scheduler.running]
        prefilling = [
            s.request_id
            for s, n in zip(batch.seqs, batch.num_new_tokens)
            if s.num_computed_tokens < s.num_prompt_tokens
        ]
        return prefilling or [s.request_id for s in batch.seqs]

    def _fail_all(self, error: Callable[[], Exception]) -> None:
        self._fail(list(self._tracked), error)

    def _refuse_queued(self) -> None:
        """Answer the adds that raced with the stop (open() refuses any later ones)."""
        while (command := self._next_command(block=False)) is not None:
            kind, tracked = command
            if kind == "add":
                self._count_unadmitted(-1, -len(tracked.request.prompt_token_ids))
                error = EngineStopped("the server is shutting down")
                self._deliver({tracked.loop: [(tracked.sink, tracked.request.request_id, error)]})

    def _fail(self, request_ids: list[str], error: Callable[[], Exception]) -> None:
        """Abort the requests and raise a fresh error(), one each, in their streams."""
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for rid in request_ids:
            tracked = self._tracked.pop(rid)
            try:
                self.engine.abort(rid)
            except Exception:
                log.exception("abort of %s failed", rid)
            batches.setdefault(tracked.loop, []).append((tracked.sink, rid, error()))
            self._record_done(tracked, "error")
        self._deliver(batches)

    @staticmethod
    def _deliver(batches: dict[asyncio.AbstractEventLoop, list]) -> None:
        # One wake-up of each event loop per step, however many requests it serves.
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that event loop is closed: nobody is listening
                pass

    # --- metrics (engine thread) ----------------------------------------------------------------
    def _record_tokens(self, tracked: _Tracked, out: RequestOutput) -> None:
        new = len(out.token_ids) - tracked.num_tokens
        if new <= 0:
            return
        now = time.monotonic()
        if tracked.last_token_time is None:
            self.metrics.first_token(now - tracked.request.arrival_time)
            if new > 1:
                self.metrics.later_tokens(0.0, new - 1)
        else:
            self.metrics.later_tokens((now - tracked.last_token_time) / new, new)
        tracked.num_tokens = len(out.token_ids)
        tracked.last_token_time = now

    def _record_done(self, tracked: _Tracked, reason: str) -> None:
        req = tracked.request
        self.metrics.request_done(
            reason,
            len(req.prompt_token_ids),
            tracked.num_tokens,
            time.monotonic() - req.arrival_time,
        )

    def _publish_stats(self) -> None:
        self._stats = engine_stats(self.engine)


def engine_stats(engine: LLMEngine) -> EngineStats:
    """Read on the engine thread (the scheduler is not thread-safe), published whole."""
    sched = engine.scheduler
    prefill = {
        seq.request_id: (min(seq.num_computed_tokens, seq.num_prompt_tokens), seq.num_prompt_tokens)
        for seq in (*sched.running, *sched.waiting)
        if seq.num_computed_tokens < seq.num_prompt_tokens
    }
    return EngineStats(
        waiting=len(sched.waiting),
        running=len(sched.running),
        blocks_used=sched.blocks.num_blocks - sched.blocks.num_free,
        blocks_total=sched.blocks.num_blocks,
        prefill=prefill,
        prefix_cache=sched.blocks.stats(),
        preemptions=sched.num_preemptions,
    )


def _put_all(items: list[tuple[asyncio.Queue, str, RequestOutput | Exception]]) -> None:
    for sink, rid, item in items:
        sink.put_nowait((rid, item))


class OutputStream:
    """The outputs of one HTTP request's engine requests, in the order steps produce them.

    Iterating yields RequestOutputs (consecutive updates of a request that queued up while the
    client was slow are merged into one) and raises a request's error; it ends when every
    request has finished. Leaving `async with` aborts whatever has not finished.
    """

    def __init__(self, loop: EngineLoop, request_ids: list[str], sink: asyncio.Queue) -> None:
        self._loop = loop
        self.request_ids = request_ids
        self._sink = sink
        self._pending = set(request_ids)

    async def __aenter__(self) -> OutputStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Abort the unfinished requests (idempotent)."""
        if self._pending:
            self._loop.abort(sorted(self._pending))
            self._pending.clear()

    @property
    def finished(self) -> bool:
        return not self._pending

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        while self._pending:
            rid, item = await self._sink.get()
            if isinstance(item, Exception):
                self._pending.discard(rid)
                raise item
            for out in self._merge_ready(item):
                if out.finished:
                    self._pending.discard(out.request_id)
                yield out

    def _merge_ready(self, first: RequestOutput) -> list[RequestOutput]:
        """first plus whatever is already queued, one merged output per request."""
        merged: dict[str, RequestOutput] = {first.request_id: first}
        while not self._sink.empty():
            rid, item = self._sink.get_nowait()
            if isinstance(item, Exception):
                self._sink.put_nowait((rid, item))  # raised on the next turn
                break
            before = merged.get(rid)
            merged[rid] = item if before is None else _merge(before, item)
        return list(merged.values())

    async def final_outputs(self) -> dict[str, RequestOutput]:
        """Run every request to the end; the last output of each."""
        final: dict[str, RequestOutput] = {}
        async for out in self:
            if out.finished:
                final[out.request_id] = out
        return final


def _merge(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    return dataclasses.replace(later, new_text=earlier.new_text + later.new_text)
