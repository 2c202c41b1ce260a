"""The pipeline's process groups and the messages that travel over them.

Four torch.distributed groups, made without the global default group (so one process can
hold several engines, and user code keeps torch.distributed for itself):

    ctrl_fwd  gloo   task headers (pickled StageTask) stage s -> s + 1; start-up exchange
    ctrl_ret  gloo   one small header per micro-batch, last stage -> stage 0
    data_fwd  gloo on the CPU, NCCL on CUDA   hidden states [tokens, hidden] s -> s + 1
    data_ret  same   the rows to sample, last stage -> stage 0

Forward and return traffic use separate groups: with one NCCL communicator per pair, stage 0's
send of micro-batch j + 1 would queue behind its receive of micro-batch j's result, while the
last stage's send of that result waits for the receive, and two stages would deadlock.

Gloo's blocking waits are the only reliable ones (a timed-out wait closes the connection and
`is_completed` is only set by `wait`), so the engine waits for a worker in a helper thread and
checks meanwhile that every worker still runs. A dead peer closes its sockets, which fails the
pending gloo operations of its neighbours at once.
"""

from __future__ import annotations

import datetime
import pickle
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from longctx.errors import LongctxError

# Gloo timeouts fail a connection for good: workers may sit idle between requests for as long
# as the engine lives, so their waits never time out; the engine's own deadline
# (EngineConfig.pipeline_timeout_s) catches a stage that hangs.
IDLE_TIMEOUT = datetime.timedelta(days=365)
TAG_PIPE = 0  # micro-batch traffic
TAG_SETUP = 1  # start-up exchange (spec, KV capacity)
TAG_REPORT = 2  # stages' busy times

T = TypeVar("T")


class PipelineError(LongctxError):
    """A pipeline stage died, failed or stopped answering; the engine cannot go on."""


class TransportError(PipelineError):
    """A send or receive failed: a peer's connection closed (its process is gone)."""


@dataclass(frozen=True)
class PipelineGroups:
    rank: int
    world_size: int
    ctrl_fwd: dist.ProcessGroup
    ctrl_ret: dist.ProcessGroup
    data_fwd: dist.ProcessGroup
    data_ret: dist.ProcessGroup

    @property
    def is_last(self) -> bool:
        return self.rank == self.world_size - 1


def open_store(init_method: str, rank: int, world_size: int) -> tuple[dist.Store, int, int]:
    """The rendezvous store: file:///path (one host, spawned workers) or env:// (torchrun:
    MASTER_ADDR / MASTER_PORT, RANK, WORLD_SIZE)."""
    return next(dist.rendezvous(init_method, rank=rank, world_size=world_size))


def ctrl_groups(store: dist.Store, rank: int, world_size: int) -> list[dist.ProcessGroup]:
    """The two gloo groups; made first, so the stage spec can travel before the data groups
    (whose backend it names) exist."""
    return [_gloo(store, name, rank, world_size) for name in ("ctrl_fwd", "ctrl_ret")]


def data_groups(
    store: dist.Store, rank: int, world_size: int, device_type: str
) -> list[dist.ProcessGroup]:
    if device_type == "cuda":
        return [_nccl(dist.PrefixStore(name, store), rank, world_size) for name in ("fwd", "ret")]
    return [_gloo(store, name, rank, world_size) for name in ("data_fwd", "data_ret")]


def _gloo(store: dist.Store, name: str, rank: int, world_size: int) -> dist.ProcessGroup:
    return dist.ProcessGroupGloo(dist.PrefixStore(name, store), rank, world_size, IDLE_TIMEOUT)


def _nccl(store: dist.Store, rank: int, world_size: int) -> dist.ProcessGroup:
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = IDLE_TIMEOUT
    return dist.ProcessGroupNCCL(store, rank, world_size, opts)


# --- messages -------------------------------------------------------------------------------
def post_send(group: dist.ProcessGroup, tensor: torch.Tensor, dst: int, tag: int = TAG_PIPE):
    return _io(lambda: group.send([tensor], dst, tag))


def post_recv(group: dist.ProcessGroup, tensor: torch.Tensor, src: int, tag: int = TAG_PIPE):
    return _io(lambda: group.recv([tensor], src, tag))


def wait(work) -> None:
    """Block until work is done (on CUDA, NCCL work only orders the current stream)."""
    _io(work.wait)


def _io(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except RuntimeError as e:  # gloo / NCCL report a lost peer as RuntimeError
        raise TransportError(f"pipeline transport failed: {_first_line(e)}") from None


@dataclass
class Sent:
    """Sends in flight: their buffers must live until they complete."""

    works: list
    buffers: list[torch.Tensor]

    def add(self, group: dist.ProcessGroup, tensor: torch.Tensor, dst: int) -> Sent:
        self.works.append(post_send(group, tensor, dst))
        self.buffers.append(tensor)
        return self

    def wait(self) -> None:
        for w in self.works:
            wait(w)
        self.works.clear()
        self.buffers.clear()


def send_bytes(group: dist.ProcessGroup, payload: bytes, dst: int, tag: int = TAG_PIPE) -> Sent:
    size = torch.tensor([len(payload)], dtype=torch.int64)
    data = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    works = [post_send(group, size, dst, tag), post_send(group, data, dst, tag)]
    return Sent(works, [size, data])


def recv_bytes(
    group: dist.ProcessGroup, src: int, tag: int = TAG_PIPE, waiter: Callable | None = None
) -> bytes:
    """Blocks; waiter(work) replaces wait(work) for the first (possibly long) wait: the
    payload follows its size at once."""
    size = torch.empty(1, dtype=torch.int64)
    (waiter or wait)(post_recv(group, size, src, tag))
    data = torch.empty(int(size.item()), dtype=torch.uint8)
    wait(post_recv(group, data, src, tag))
    return data.numpy().tobytes()


def send_object(group: dist.ProcessGroup, obj: object, dst: int, tag: int = TAG_PIPE) -> Sent:
    return send_bytes(group, pickle.dumps(obj), dst, tag)


def recv_object(
    group: dist.ProcessGroup, src: int, tag: int = TAG_PIPE, waiter: Callable | None = None
) -> object:
    return pickle.loads(recv_bytes(group, src, tag, waiter))


# --- waiting with liveness checks -----------------------------------------------------------
class Watchdog:
    """Runs a blocking call (a gloo wait, a group's start-up) in a helper thread; meanwhile
    calls check(), which raises when a worker is gone, and enforces a deadline."""

    POLL_S = 0.002

    def __init__(self, check: Callable[[], None], timeout_s: float) -> None:
        self.check, self.timeout_s = check, timeout_s

    def wait(self, work, what: str = "an answer") -> None:
        self.run(lambda: wait(work), what)

    def run(self, fn: Callable[[], T], what: str) -> T:
        done = threading.Event()
        out: list = []
        failure: list[BaseException] = []

        def target() -> None:
            try:
                out.append(fn())
            except BaseException as e:  # handed to the waiting thread
                failure.append(e)
            done.set()

        threading.Thread(target=target, daemon=True, name="longctx-pp-wait").start()
        deadline = time.monotonic() + self.timeout_s
        while not done.wait(self.POLL_S):
            self.check()
            if time.monotonic() > deadline:
                raise PipelineError(
                    f"no {what} from the pipeline in {self.timeout_s:g} s "
                    "(pipeline_timeout_s); a stage hangs"
                )
        if failure:
            if isinstance(failure[0], PipelineError):
                raise failure[0]
            raise TransportError(f"pipeline transport failed: {_first_line(failure[0])}")
        return out[0]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"
