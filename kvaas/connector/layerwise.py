"""Layer-wise loads: a step's loads run on a background thread while the forward pass runs.

vLLM calls the worker connector's ``start_load_kv`` before the step's forward pass, then
``wait_for_layer_load(layer)`` as each attention layer starts, and ``wait_for_save`` once the
forward pass is done. With layer-wise loads on, ``start_load_kv`` hands the step's loads to
:class:`LayerwiseLoads` and returns; its thread fetches and decodes the chunks, copies them
into the paged blocks one layer at a time and marks each layer done after its copy, so layer
*i*'s attention waits only for layer *i*'s copy while later layers are still being copied.

Contracts:

- **One step at a time.** :meth:`LayerwiseLoads.start` first waits for the previous step's
  loads (:meth:`~LayerwiseLoads.finish`), so the loader's staging buffers are never used by
  two steps at once, and the step thread never uses them while a step is in flight.
- **Never abandoned.** :meth:`~LayerwiseLoads.wait_layer` and :meth:`~LayerwiseLoads.finish`
  wait without a time limit: a block is never left half written while vLLM computes on it.
  Every layer is marked done when the step's job returns, whether it loaded, fell short or
  raised (the job reports its own failures; an exception escaping it is logged).
- **Results before the step ends.** Whatever the job records (failed blocks, stage times) is
  visible to the step thread once :meth:`~LayerwiseLoads.finish` returns (the job's end
  happens before it), and the connector calls it before vLLM reads those results.
- **Device order on a GPU.** A CUDA kernel has not run when the call that queued it returns,
  so "layer *i* is marked" alone would let attention read blocks whose copy is still queued.
  With :class:`CudaOrder` the job runs on a side stream of its own, which first waits for what
  the step thread had queued when the step started (blocks being reused, the previous step);
  each mark records an event on the side stream after that layer's copy, and the step thread,
  once the mark is set, makes its own stream wait for that event (a wait on the device: the
  thread does not block on it). :meth:`~LayerwiseLoads.finish` does the same for the job's
  end. On a CPU (:class:`HostOrder`) every operation is done when it returns, and the marks
  alone order the layers.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, Protocol

import torch

log = logging.getLogger("kvaas.connector")

#: A step's load job: given ``mark(i)`` (layer ``i`` is copied for every load of the step),
#: it runs the step's loads.
StepJob = Callable[[Callable[[int], None]], None]


class DeviceOrder(Protocol):
    """How work queued by the loads' thread is ordered before the step thread's use of it."""

    def started(self) -> Any:
        """Step thread, as a step's loads start: a fence the loads' work must come after."""

    def running(self, after: Any) -> contextlib.AbstractContextManager[Any]:
        """Loads' thread: the context the job runs in, its work ordered after ``after``."""

    def fence(self) -> Any:
        """Loads' thread: a fence after everything the job has queued so far."""

    def wait(self, fence: Any) -> None:
        """Step thread: order what it queues next after ``fence``."""


class HostOrder:
    """On a CPU every operation is done when its call returns: nothing to order."""

    def started(self) -> Any:
        return None

    def running(self, after: Any) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def fence(self) -> Any:
        return None

    def wait(self, fence: Any) -> None:
        return None


class CudaOrder:  # pragma: no cover - needs a GPU
    """A side stream for the loads and CUDA events between it and the step thread's stream
    (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.side = torch.cuda.Stream(device=device)

    def _event_on(self, stream: Any) -> Any:
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def started(self) -> Any:
        return self._event_on(torch.cuda.current_stream(self.device))

    def running(self, after: Any) -> contextlib.AbstractContextManager[Any]:
        self.side.wait_event(after)
        return torch.cuda.stream(self.side)

    def fence(self) -> Any:
        return self._event_on(self.side)

    def wait(self, fence: Any) -> None:
        if fence is not None:
            torch.cuda.current_stream(self.device).wait_event(fence)


def device_order(device: torch.device) -> DeviceOrder:
    """The ordering the loads into KV tensors on ``device`` need."""
    return CudaOrder(device) if device.type == "cuda" else HostOrder()


class _Step:
    """One step's per-layer marks and fences, and its end."""

    def __init__(self, num_layers: int, order: DeviceOrder) -> None:
        self.order = order
        self.after = order.started()
        self.layers = [threading.Event() for _ in range(num_layers)]
        self.fences: list[Any] = [None] * num_layers
        self.done = threading.Event()
        self.end_fence: Any = None

    def mark(self, layer: int) -> None:
        if not self.layers[layer].is_set():
            self.fences[layer] = self.order.fence()
            self.layers[layer].set()

    def end(self) -> None:
        fence = self.order.fence()
        for i, e in enumerate(self.layers):
            if not e.is_set():
                self.fences[i] = fence
                e.set()
        self.end_fence = fence
        self.done.set()


class LayerwiseLoads:
    """Runs each step's load job on one background thread (started here) and tells the step
    thread when each layer is in place. Its methods are called from the step thread only."""

    def __init__(
        self,
        num_layers: int,
        torch_threads: int | None = None,
        order: DeviceOrder | None = None,
    ) -> None:
        """``order``: how the loads' device work is ordered before the step's (default: a
        CPU's, :class:`HostOrder`; see :func:`device_order`)."""
        if num_layers < 1:
            raise ValueError("no KV layers")
        self.num_layers = num_layers
        self.order = order or HostOrder()
        self._torch_threads = torch_threads or torch.get_num_threads()
        self._jobs: queue.SimpleQueue[tuple[_Step, StepJob] | None] = queue.SimpleQueue()
        self._step: _Step | None = None
        self._thread = threading.Thread(target=self._run, name="kvaas-layerwise", daemon=True)
        self._thread.start()

    @property
    def in_flight(self) -> bool:
        """Whether a step's loads were started and not yet finished."""
        return self._step is not None

    def start(self, job: StepJob) -> None:
        """Run ``job`` in the background (after the previous step's, which is waited for)."""
        self.finish()
        step = _Step(self.num_layers, self.order)
        self._step = step
        self._jobs.put((step, job))

    def wait_layer(self, layer: int) -> None:
        """Return once layer ``layer`` of the current step's loads is in the blocks (at once
        when no step is in flight)."""
        step = self._step
        if step is not None and 0 <= layer < self.num_layers:
            step.layers[layer].wait()
            self.order.wait(step.fences[layer])

    def finish(self) -> None:
        """Return once the current step's job has ended (at once when none is in flight)."""
        step, self._step = self._step, None
        if step is not None:
            step.done.wait()
            self.order.wait(step.end_fence)

    def close(self) -> None:
        """Finish the current step, then stop the thread."""
        self.finish()
        self._jobs.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        # a new thread does not inherit the step thread's intra-op thread count
        if torch.get_num_threads() != self._torch_threads:
            torch.set_num_threads(self._torch_threads)
        while (item := self._jobs.get()) is not None:
            step, job = item
            try:
                with self.order.running(step.after):
                    job(step.mark)
            except BaseException as e:  # the job reports its loads' failures itself
                log.error("layer-wise load step failed: %s", e)
            finally:
                step.end()
