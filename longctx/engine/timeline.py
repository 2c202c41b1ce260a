"""Device-side timing of engine steps: how long the GPU sits idle between two steps.

The runner records a CUDA event when it starts queueing a step's work and one after the last
kernel of the step. Idle gap t = (start of step t+1) - (end of step t) as the GPU saw them: with
synchronous scheduling it is the host's scheduling, input building and detokenization; with
asynchronous scheduling the next step is queued before the current one ends, so it shrinks to
the launch latency.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class GpuTimeline:
    marks: list[tuple[torch.cuda.Event, torch.cuda.Event | None]] = field(default_factory=list)

    def begin(self) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self.marks.append((event, None))

    def end(self) -> None:
        start, _ = self.marks[-1]
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self.marks[-1] = (start, event)

    def summary(self, skip: int = 0) -> dict[str, float]:
        """Mean busy and idle milliseconds per step over the recorded steps after the first
        `skip` (waits for them)."""
        torch.cuda.synchronize()
        done = [(s, e) for s, e in self.marks[skip:] if e is not None]
        busy = [s.elapsed_time(e) for s, e in done]
        idle = [max(0.0, done[i][1].elapsed_time(done[i + 1][0])) for i in range(len(done) - 1)]
        return {
            "steps": float(len(done)),
            "busy_ms": sum(busy) / max(len(busy), 1),
            "idle_ms": sum(idle) / max(len(idle), 1),
        }
