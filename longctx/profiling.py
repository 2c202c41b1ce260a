"""Where a forward pass spends its time, by named phase, on the device and on the host.

`with timer.phase("estimate"): ...` records a CUDA event pair around the work the block queues
(device time: from the first of its kernels starting to the last ending, idle gaps inside
included, which is what a host that cannot keep up costs) and the host seconds the block took
to queue it. Events are read only in `summary()`, so timing adds no synchronisation; it adds
about two event records per phase. On the CPU the device time is the host time.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class PhaseTotal:
    calls: int
    device_ms: float
    host_ms: float


@dataclass
class PhaseTimer:
    device: torch.device
    _events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = field(default_factory=list)
    _host: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    _calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        cuda = self.device.type == "cuda"
        if cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._host[name] += time.perf_counter() - t0
            self._calls[name] += 1
            if cuda:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self._events.append((name, start, end))

    def summary(self) -> dict[str, PhaseTotal]:
        """Totals per phase (waits for the device)."""
        device_ms: dict[str, float] = defaultdict(float)
        if self._events:
            torch.cuda.synchronize(self.device)
            for name, start, end in self._events:
                device_ms[name] += start.elapsed_time(end)
        else:
            device_ms = {k: v * 1e3 for k, v in self._host.items()}
        return {
            name: PhaseTotal(self._calls[name], device_ms[name], self._host[name] * 1e3)
            for name in self._calls
        }

    def reset(self) -> None:
        self._events.clear()
        self._host.clear()
        self._calls.clear()


@contextmanager
def maybe_phase(timer: PhaseTimer | None, name: str) -> Iterator[None]:
    """timer.phase(name), or nothing when no timer is set."""
    if timer is None:
        yield
    else:
        with timer.phase(name):
            yield
