"""Aborting a step from another thread, between two layers of its forward pass.

A prefill chunk of a long prompt runs for seconds (tens of seconds at 32K tokens of a 7B model);
a request cancelled meanwhile must not hold the engine until the chunk ends. Whoever aborts a
request (the server's event loop) marks it here at once; the model runner, between layers of a
step that prefills, asks whether any request of its batch is marked and if so unwinds the step
with StepAborted. The question is a set lookup on the host: no device synchronisation.

On a device that runs ahead of the host (CUDA), the layers already queued when the mark is seen
still run: the check bounds the abort to the work queued, not to one layer.
"""

from __future__ import annotations

from collections.abc import Collection


class StepAborted(Exception):
    """The step was abandoned because a request in it was aborted; nothing of it was kept."""


class AbortSignal:
    """Request ids aborted since the step began, or everything (shutdown). Marks are set from
    any thread; set operations on str keys are atomic under the GIL."""

    def __init__(self) -> None:
        self._ids: set[str] = set()
        self._everything = False

    def abort(self, request_id: str) -> None:
        self._ids.add(request_id)

    def abort_everything(self) -> None:
        self._everything = True

    def clear(self, request_id: str) -> None:
        """The engine has dropped the request: forget its mark."""
        self._ids.discard(request_id)

    def reset(self) -> None:
        self._ids.clear()
        self._everything = False

    def check(self, request_ids: Collection[str]) -> None:
        """Raise StepAborted if any of request_ids (the running batch) is marked."""
        if self._everything or (self._ids and not self._ids.isdisjoint(request_ids)):
            raise StepAborted
