"""The pipeline-parallel engine: stage 0 in the engine's process, stages 1 .. N-1 in workers.

The engine keeps up to N micro-batches in the pipeline. Each step it schedules micro-batches
until N are in flight (a prefill's next chunk may follow its previous one at once; a sequence
that samples waits for its token), then completes the oldest: the last stage has sent back the
rows to sample, stage 0 computes their logits and samples. While stage 0 computes micro-batch
j + 1, stage 1 computes j: prefill chunks flow through the stages, and decoding sequences are
spread over N micro-batches so that no stage idles.

With asynchronous scheduling the completed micro-batch's tokens stay on the device while the
next micro-batches are scheduled and launched from them, as on one device.

Prefill chunk lengths: fixed (max_num_batched_tokens) or DCPP (longctx/engine/dcpp.py), equal
modelled cost per chunk so that the stages do not wait on each other's longer chunks.
"""

from __future__ import annotations

import dataclasses
import shutil
import signal
import tempfile
import time
import weakref
from collections import deque
from collections.abc import Collection
from pathlib import Path

import torch
import torch.multiprocessing as mp

from longctx.config import EngineConfig, ModelConfig
from longctx.distributed.comm import (
    TAG_PIPE,
    TAG_REPORT,
    TAG_SETUP,
    PipelineError,
    PipelineGroups,
    Sent,
    TransportError,
    Watchdog,
    ctrl_groups,
    data_groups,
    open_store,
    post_recv,
    recv_object,
    send_object,
    wait,
)
from longctx.distributed.partition import StageWorkload, partition_layers
from longctx.distributed.stage import REPORT, STOP, BusyTime, Stage, StageSpec, StageTask
from longctx.distributed.worker import (
    EXIT_PEER_LOST,
    run_worker,
    stage_device,
    torchrun_rank,
    worker_main,
)
from longctx.engine.dcpp import ChunkCostModel, ChunkPolicy, DCPPChunks, FixedChunks
from longctx.engine.kv_cache import BlockManager
from longctx.engine.llm_engine import InFlight, LLMEngine
from longctx.engine.model_runner import (
    LaunchedStep,
    WeightSource,
    mask_grammars,
    prompt_logprobs,
    sample_request,
    step_inputs,
)
from longctx.engine.outputs import RequestOutput
from longctx.engine.scheduler import ScheduledBatch, Scheduler
from longctx.engine.sequence import Sequence
from longctx.errors import ConfigError
from longctx.layers.sampler import sample
from longctx.loading.checkpoint import Checkpoint
from longctx.structured_output import TokenMasks

JOIN_TIMEOUT_S = 30.0
STARTUP_S = 1800.0
DEATH_GRACE_S = 2.0  # how long a failed send may wait for the dead worker's exit status


def make_engine(checkpoint: Checkpoint, config: EngineConfig) -> LLMEngine:
    """The engine for config: pipeline parallel when pipeline_parallel_size > 1."""
    if config.pipeline_parallel_size > 1:
        return PipelineEngine(checkpoint, config)
    return LLMEngine(checkpoint, config)


@dataclasses.dataclass
class PipelinedStep:
    """A micro-batch launched into the pipeline; finish() turns it into a LaunchedStep."""

    batch: ScheduledBatch
    sampling: tuple[int, ...]  # batch rows that sample a token
    query_starts: tuple[int, ...]
    first_positions: tuple[int, ...]  # each sequence's num_computed_tokens at launch
    return_rows: tuple[int, ...] | None  # flat rows the last stage sends back (None: all)
    sent: Sent


class PipelineRunner:
    """Stage 0 and the link to the others; the ModelRunner's place in a PipelineEngine.

    Takes the ModelRunner's arguments (max_model_len sizes its CUDA graphs; stages run
    eagerly, so it is unused here). One host: stage r runs on cuda:r (or the CPU)."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        model_config: ModelConfig,
        cfg: EngineConfig,
        weights: WeightSource,
        device: torch.device,
        dtype: torch.dtype,
        max_num_batched_tokens: int,
        max_model_len: int,
    ) -> None:
        n = cfg.pipeline_parallel_size
        self.block_size = cfg.block_size
        self.spec = StageSpec(
            model=model_config,
            engine=cfg,
            layers=partition_layers(
                model_config,
                n,
                StageWorkload(max_num_batched_tokens, bytes_per_param=dtype.itemsize),
            ),
            dtype=dtype,
            device_type=device.type,
            max_num_batched_tokens=max_num_batched_tokens,
            weights_path=_weights_path(checkpoint),
            num_threads=max(1, torch.get_num_threads() // n),
        )
        self._procs: list = []
        self._error_dir: str | None = None
        self._closed = False
        self.watchdog = Watchdog(self._check_workers, cfg.pipeline_timeout_s)
        # Start-up loads weights and profiles memory in every stage: only deaths end it early.
        self.startup = Watchdog(self._check_workers, max(cfg.pipeline_timeout_s, STARTUP_S))
        launched = torchrun_rank()
        try:
            init = self._start(launched, n)
            self.device = stage_device(device.type, launched[2] if launched else 0)
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            self.groups = self._connect(init, n)
            self.stage = Stage(self.spec, 0, self.device, weights)
            self.num_blocks = self._agree_on_blocks()
            self.stage.allocate(self.num_blocks)
        except BaseException as e:
            # The workers are still in the start-up exchange: no stop task reaches them.
            failure = self.explain(e) if isinstance(e, TransportError) else e
            self.shutdown(graceful=False)
            if failure is e:
                raise
            raise failure from None
        self.model, self.backend = self.stage.model, self.stage.backend
        self.masks = TokenMasks(model_config.vocab_size, self.device)
        self.kv_dtype = self.stage.kv_dtype

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def num_stages(self) -> int:
        return self.spec.num_stages

    @property
    def kv_caches(self) -> tuple:
        """Not here: each stage process holds its own layers' caches."""
        raise ConfigError(
            "saved KV (--save-kv / --load-kv) reads every layer's cache in one process: it "
            "does not work with pipeline parallelism"
        )

    # --- start-up -----------------------------------------------------------------------
    def _start(self, launched: tuple[int, int, int] | None, n: int) -> str:
        """Spawn the workers (one host) or join torchrun's ranks; returns the init method.
        A torchrun rank other than 0 becomes a worker here and exits when the engine stops."""
        if launched is not None:
            rank, world, local = launched
            if world != n:
                raise ConfigError(
                    f"torchrun started {world} processes but pipeline_parallel_size is {n}"
                )
            if rank != 0:
                run_worker("env://", rank, world, local)
                raise SystemExit(0)
            return "env://"
        self._error_dir = tempfile.mkdtemp(prefix="longctx-pp-")
        init = f"file://{Path(self._error_dir, 'store')}"
        ctx = mp.get_context("spawn")
        for rank in range(1, n):
            p = ctx.Process(
                target=worker_main,
                args=(init, rank, n, self._error_dir),
                daemon=True,
                name=f"longctx-pp-stage{rank}",
            )
            p.start()
            self._procs.append(p)
        return init

    def _connect(self, init: str, n: int) -> PipelineGroups:
        run = self.startup.run
        store, rank, world = run(lambda: open_store(init, 0, n), "rendezvous")
        ctrl_fwd, ctrl_ret = run(lambda: ctrl_groups(store, rank, world), "connection")
        for r in range(1, n):
            self._setup_send(ctrl_fwd, self.spec, r)
        data = run(lambda: data_groups(store, rank, world, self.device.type), "connection")
        return PipelineGroups(rank, world, ctrl_fwd, ctrl_ret, *data)

    def _agree_on_blocks(self) -> int:
        """Every stage sizes its cache from its own memory; all take the smallest count (one
        block table serves every stage)."""
        counts = [self.stage.kv_blocks()]
        for r in range(1, self.num_stages):
            counts.append(
                recv_object(
                    self.groups.ctrl_ret, r, TAG_SETUP, lambda w: self.startup.wait(w, "start-up")
                )
            )
        num_blocks = min(counts)
        for r in range(1, self.num_stages):
            self._setup_send(self.groups.ctrl_fwd, num_blocks, r)
        return num_blocks

    def _setup_send(self, group, obj: object, rank: int) -> None:
        self.startup.run(lambda: send_object(group, obj, rank, TAG_SETUP).wait(), "start-up")

    # --- micro-batches ------------------------------------------------------------------
    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, prev: LaunchedStep | None = None) -> PipelinedStep:
        """Stage 0's part of a micro-batch, sent on to stage 1 without waiting."""
        ids, layout = step_inputs(batch, prev, self.block_size, self.device)
        sampling = tuple(i for i in range(len(batch.seqs)) if batch.samples(i))
        starts = [0]
        for n in batch.num_new_tokens:
            starts.append(starts[-1] + n)
        wants_all = any(s.params.prompt_logprobs is not None for s in batch.seqs)
        rows = None if wants_all else tuple(starts[i + 1] - 1 for i in sampling)
        with self.stage.clock.busy():
            hidden = self.stage.forward(ids, self.stage.backend.prepare(layout, self.device))
        g = self.groups
        sent = _send_task(g, StageTask(layout, rows)).add(g.data_fwd, hidden, 1)
        firsts = tuple(s.num_computed_tokens for s in batch.seqs)
        return PipelinedStep(batch, sampling, tuple(starts), firsts, rows, sent)

    @torch.inference_mode()
    def finish(self, step: PipelinedStep) -> LaunchedStep:
        """Wait for the oldest micro-batch's rows from the last stage; logits and sampling."""
        g, last = self.groups, self.num_stages - 1
        header = torch.empty(1, dtype=torch.int64)
        self.watchdog.wait(post_recv(g.ctrl_ret, header, last), "micro-batch result")
        count = int(header.item())
        hidden = torch.empty(
            count, self.spec.model.hidden_size, dtype=self.spec.dtype, device=self.device
        )
        if count:
            work = post_recv(g.data_ret, hidden, last)
            if self.device.type == "cuda":
                wait(work)  # orders the device stream only
            else:
                self.watchdog.wait(work, "micro-batch rows")
        step.sent.wait()  # stage 1 has long received it
        with self.stage.clock.busy():
            return self._sample(step, hidden)

    def busy_times(self) -> list[BusyTime]:
        """Each stage's compute time since the last call; only between micro-batches."""
        sent = _send_task(self.groups, REPORT)
        times = [self.stage.clock.take()]
        for r in range(1, self.num_stages):
            report = recv_object(
                self.groups.ctrl_ret, r, TAG_REPORT, lambda w: self.watchdog.wait(w, "report")
            )
            assert isinstance(report, BusyTime)
            times.append(report)
        sent.wait()
        return times

    def _sample(self, step: PipelinedStep, hidden: torch.Tensor) -> LaunchedStep:
        batch, sampling = step.batch, step.sampling
        if step.return_rows is None:  # every row came back: prompt logprobs
            prompt_lps = tuple(
                prompt_logprobs(self.model, batch, i, hidden, step.query_starts[i], first)
                for i, first in enumerate(step.first_positions)
            )
            hidden = hidden[[step.query_starts[i + 1] - 1 for i in sampling]]
        else:
            prompt_lps = (None,) * len(batch.seqs)
        sampled = None
        if sampling:
            # Every earlier token of these sequences is on the host by now (their step that
            # made it completed before this one was launched, or in the same engine step).
            seqs = [batch.seqs[i] for i in sampling]
            reqs = [sample_request(s, self.spec.model.vocab_size, self.device) for s in seqs]
            logits = self.model.compute_logits(hidden)
            mask_grammars(self.masks, logits, seqs, [None] * len(seqs))
            sampled = sample(logits, reqs)
        return LaunchedStep(
            batch=batch,
            sampling=sampling,
            device_tokens=sampled.token_ids if sampled is not None else None,
            host=sampled.to_host() if sampled is not None else None,
            prompt_logprobs=prompt_lps,
        )

    # --- liveness and shutdown ----------------------------------------------------------
    def _check_workers(self) -> None:
        """Raise if a worker has exited, naming the cause: a stage that failed or was killed
        rather than one that only lost its neighbour."""
        dead = [(r, p) for r, p in enumerate(self._procs, start=1) if p.exitcode is not None]
        if not dead:
            return
        rank, p = min(dead, key=lambda d: d[1].exitcode == EXIT_PEER_LOST)
        raise PipelineError(
            f"pipeline stage {rank} (pid {p.pid}) {self._death(rank, p.exitcode)}; "
            "the engine has stopped"
        )

    def explain(self, error: TransportError) -> PipelineError:
        """The better error for a failed send or receive: the worker whose death caused it,
        once its process has ended (a moment after its sockets closed)."""
        deadline = time.monotonic() + DEATH_GRACE_S
        while time.monotonic() < deadline:
            try:
                self._check_workers()
            except PipelineError as e:
                return e
            time.sleep(0.02)
        return error

    def _death(self, rank: int, code: int) -> str:
        err = Path(self._error_dir, f"stage{rank}.err") if self._error_dir else None
        if err is not None and err.is_file():
            return f"failed: {err.read_text().strip()}"
        if code < 0:
            return f"was killed by {signal.Signals(-code).name}"
        if code == EXIT_PEER_LOST:
            return "lost its connection to a neighbour stage"
        return f"exited with status {code}"

    def shutdown(self, graceful: bool = True) -> None:
        """Stop the workers (the stop task, then a kill for any that lingers)."""
        if self._closed:
            return
        self._closed = True
        groups = getattr(self, "groups", None)
        if graceful and groups is not None:
            stop = Watchdog(self._check_workers, JOIN_TIMEOUT_S)
            try:
                stop.run(lambda: _send_task(groups, STOP).wait(), "stop")
            except PipelineError:  # a worker is gone or stuck: the kill below ends them all
                pass
        for p in self._procs:
            p.join(JOIN_TIMEOUT_S if graceful else 0)
            if p.exitcode is None:
                p.kill()
                p.join()
        if self._error_dir is not None:
            shutil.rmtree(self._error_dir, ignore_errors=True)


def _send_task(groups: PipelineGroups, task: StageTask) -> Sent:
    return send_object(groups.ctrl_fwd, task, 1, TAG_PIPE)


def _weights_path(checkpoint: Checkpoint) -> str | None:
    """Where the workers load the weights from: the checkpoint's own path (None: random)."""
    if checkpoint.weights is None:
        return None
    if not Path(checkpoint.source).exists():
        raise ConfigError(
            "pipeline parallelism needs a checkpoint on disk (each stage process loads its "
            f"layers itself); {checkpoint.source!r} is not a path"
        )
    return checkpoint.source


class PipelineScheduler(Scheduler):
    """Schedules one micro-batch at a time: sequences whose token is being computed are held
    back, each micro-batch takes at most its share of the sequences, and prefill chunks
    follow the chunk policy."""

    def __init__(
        self, blocks: BlockManager, max_num_seqs: int, max_batched: int, chunks: ChunkPolicy
    ) -> None:
        super().__init__(blocks, max_num_seqs, max_batched)
        self.chunks = chunks
        self._held: Collection[str] = ()
        self._room = max_num_seqs

    def schedule_micro_batch(self, held: Collection[str], max_seqs: int) -> ScheduledBatch | None:
        self._held, self._room = held, max_seqs
        try:
            return self.schedule()
        finally:
            self._held, self._room = (), self.max_num_seqs

    def _chunk(self, seq: Sequence, start: int, budget: int) -> int:
        if seq.request_id in self._held or self._room <= 0:
            return 0
        n = super()._chunk(seq, start, budget)
        if n > 1:  # a prefill (or a recomputation) chunk
            n = min(n, self.chunks.next_chunk(start, seq.num_tokens))
        self._room -= 1
        return n


class PipelineEngine(LLMEngine):
    """LLMEngine whose steps keep up to pipeline_parallel_size micro-batches in flight."""

    def __init__(self, checkpoint: Checkpoint, config: EngineConfig) -> None:
        super().__init__(checkpoint, config)
        self.depth = config.pipeline_parallel_size
        self.scheduler = PipelineScheduler(
            self.scheduler.blocks,
            config.max_num_seqs,
            self.max_num_batched_tokens,
            self._chunk_policy(config),
        )
        self._queue: deque[InFlight] = deque()
        self._failure: BaseException | None = None
        self._finalizer = weakref.finalize(self, self.runner.shutdown)

    def _new_runner(self, *args) -> PipelineRunner:
        return PipelineRunner(self.checkpoint, *args)

    def _chunk_policy(self, config: EngineConfig) -> ChunkPolicy:
        if config.pipeline_chunking == "fixed":
            return FixedChunks(self.max_num_batched_tokens)
        cost = ChunkCostModel.of(self.model_config, config.sparse)
        return DCPPChunks(cost, self.max_num_batched_tokens, self.block_size)

    def close(self) -> None:
        """Stop the worker processes (also done when the engine is collected or at exit)."""
        self._finalizer()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._queue)

    @property
    def micro_batches_in_flight(self) -> int:
        return len(self._queue)

    def busy_times(self) -> list[BusyTime]:
        """Each stage's compute time since the last call (for bubble fractions)."""
        if self._queue:
            raise RuntimeError("busy_times() needs an idle pipeline")
        return self.runner.busy_times()

    def step(self) -> list[RequestOutput]:
        if self._failure is not None:
            raise PipelineError(f"the pipeline engine stopped earlier: {self._failure}")
        try:
            self._fill(None)
            if not self._queue:
                return []
            oldest = self._queue.popleft()
            done = InFlight(self.runner.finish(oldest.step), oldest.starts)
            if self.async_scheduling:  # launch from its tokens before the host has them
                self._fill(done)
            return self._complete(done)
        except BaseException as e:
            # Micro-batches whose results will never be read leave the stages out of step
            # with the engine: it cannot go on.
            failure = self.runner.explain(e) if isinstance(e, TransportError) else e
            self._failure = failure
            for step in self._queue:
                self._drop(step)
            self._queue.clear()
            self.runner.shutdown(graceful=False)
            if failure is e:
                raise
            raise failure from None

    def _fill(self, prev: InFlight | None) -> None:
        while len(self._queue) < self.depth:
            held = {f.step.batch.seqs[i].request_id for f in self._queue for i in f.step.sampling}
            waiting = len(self.scheduler.running) + len(self.scheduler.waiting)
            batch = self.scheduler.schedule_micro_batch(held, max(1, -(-waiting // self.depth)))
            if batch is None:
                return
            self._queue.append(self._launch(batch, prev))
