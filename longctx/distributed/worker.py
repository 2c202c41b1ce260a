"""A pipeline stage process (ranks 1 .. N-1): build its stage, then serve micro-batches.

    stage 0 (engine) --task, hidden--> stage 1 --task, hidden--> ... --> stage N-1
          ^                                                                  |
          +------------------ header, rows to sample (normed) ---------------+

A worker needs nothing from its command line: the StageSpec comes from stage 0 over the
control group, so spawned workers (one host) and torchrun ranks (several hosts) run the same
code. It exits when told to stop, or when a neighbour's connection closes (its process died).
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
from collections import deque
from pathlib import Path

import torch

from longctx.distributed.comm import (
    TAG_REPORT,
    TAG_SETUP,
    PipelineGroups,
    Sent,
    TransportError,
    ctrl_groups,
    data_groups,
    open_store,
    post_recv,
    post_send,
    recv_bytes,
    recv_object,
    send_bytes,
    send_object,
    wait,
)
from longctx.distributed.stage import Stage, StageSpec, StageTask
from longctx.loading.checkpoint import load_checkpoint

log = logging.getLogger(__name__)

EXIT_PEER_LOST = 3  # exit status of a worker whose neighbour died first


def stage_device(device_type: str, local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if device_type == "cuda" else torch.device("cpu")


def worker_main(init_method: str, rank: int, world_size: int, error_dir: str | None) -> None:
    """Entry point of a spawned worker; a failure is written to error_dir/stage<rank>.err (one
    line, for the engine's message) before the process exits with status 1."""
    try:
        run_worker(init_method, rank, world_size, rank)
    except TransportError as e:  # a neighbour died: the engine names that one
        log.info("pipeline stage %d: %s", rank, e)
        sys.exit(EXIT_PEER_LOST)
    except Exception as e:
        line = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        if error_dir is not None:
            Path(error_dir, f"stage{rank}.err").write_text(line)
        log.exception("pipeline stage %d failed", rank)
        sys.exit(1)
    # Stopped: nothing left to clean up that the OS does not, and the interpreter's own
    # teardown (torch, gloo threads) takes seconds the engine would wait for.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_worker(init_method: str, rank: int, world_size: int, local_rank: int) -> None:
    store, rank, world_size = open_store(init_method, rank, world_size)
    ctrl_fwd, ctrl_ret = ctrl_groups(store, rank, world_size)
    spec = recv_object(ctrl_fwd, 0, TAG_SETUP)
    assert isinstance(spec, StageSpec)
    torch.set_num_threads(spec.num_threads)
    device = stage_device(spec.device_type, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    groups = PipelineGroups(
        rank, world_size, ctrl_fwd, ctrl_ret, *data_groups(store, rank, world_size, device.type)
    )
    weights = load_checkpoint(spec.weights_path).weights if spec.weights_path else None
    stage = Stage(spec, rank, device, weights)
    send_object(ctrl_ret, stage.kv_blocks(), 0, TAG_SETUP).wait()
    stage.allocate(recv_object(ctrl_fwd, 0, TAG_SETUP))
    serve(stage, groups)


@torch.inference_mode()
def serve(stage: Stage, groups: PipelineGroups) -> None:
    """Receive, compute, pass on, one micro-batch after another, until the stop task."""
    prev, nxt = groups.rank - 1, groups.rank + 1
    in_flight: deque[Sent] = deque()  # sends the next stage (or stage 0) has not taken yet
    pacer = Pacer(stage.device)
    while True:
        raw = recv_bytes(groups.ctrl_fwd, prev)
        task = pickle.loads(raw)
        assert isinstance(task, StageTask)
        if task.control is not None:
            if not groups.is_last:
                in_flight.append(send_bytes(groups.ctrl_fwd, raw, nxt))
            if task.control == "stop":
                for sent in in_flight:
                    sent.wait()
                return
            in_flight.append(send_object(groups.ctrl_ret, stage.clock.take(), 0, TAG_REPORT))
            continue
        x = torch.empty(
            task.layout.num_tokens, stage.hidden_size, dtype=stage.spec.dtype, device=stage.device
        )
        wait(post_recv(groups.data_fwd, x, prev))
        with stage.clock.busy():
            hidden = stage.forward(x, stage.backend.prepare(task.layout, stage.device))
            if groups.is_last:
                hidden = stage.final(hidden, task.return_rows)
        if groups.is_last:
            pacer.step()
            in_flight.append(_send_back(groups, hidden))
        else:
            in_flight.append(
                send_bytes(groups.ctrl_fwd, raw, nxt).add(groups.data_fwd, hidden, nxt)
            )
        while len(in_flight) > 1:
            in_flight.popleft().wait()


class Pacer:
    """Keeps the last stage's host at most one micro-batch ahead of its device.

    Its answer is what ends a micro-batch's time in flight for the engine, whose window of N
    micro-batches then bounds the device work queued in the whole pipeline, and with it the
    hidden states waiting to be sent (a host that ran ahead would queue a whole prompt's)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._pending: torch.cuda.Event | None = None

    def step(self) -> None:
        """Call after queueing a micro-batch: waits for the one before it."""
        if not self.cuda:
            return  # the CPU computes synchronously
        event = torch.cuda.Event()
        event.record()
        if self._pending is not None:
            self._pending.synchronize()
        self._pending = event


def _send_back(groups: PipelineGroups, rows: torch.Tensor) -> Sent:
    rows = rows.contiguous()
    header = torch.tensor([rows.shape[0]], dtype=torch.int64)
    sent = Sent([post_send(groups.ctrl_ret, header, 0)], [header])
    return sent.add(groups.data_ret, rows, 0) if rows.shape[0] else sent


def torchrun_rank() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when launched by torchrun, else None."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and "LOCAL_RANK" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
