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
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

import torch

log = logging.getLogger("kvaas.connector")

#: A step's load job: given ``mark(i)`` (layer ``i`` is copied for every load of the step),
#: it runs the step's loads.
StepJob = Callable[[Callable[[int], None]], None]


class _Step:
    """One step's per-layer events and its end."""

    def __init__(self, num_layers: int) -> None:
        self.layers = [threading.Event() for _ in range(num_layers)]
        self.done = threading.Event()

    def mark(self, layer: int) -> None:
        self.layers[layer].set()

    def end(self) -> None:
        for e in self.layers:
            e.set()
        self.done.set()


class LayerwiseLoads:
    """Runs each step's load job on one background thread (started here) and tells the step
    thread when each layer is in place. Its methods are called from the step thread only."""

    def __init__(self, num_layers: int, torch_threads: int | None = None) -> None:
        if num_layers < 1:
            raise ValueError("no KV layers")
        self.num_layers = num_layers
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
        step = _Step(self.num_layers)
        self._step = step
        self._jobs.put((step, job))

    def wait_layer(self, layer: int) -> None:
        """Return once layer ``layer`` of the current step's loads is in the blocks (at once
        when no step is in flight)."""
        step = self._step
        if step is not None and 0 <= layer < self.num_layers:
            step.layers[layer].wait()

    def finish(self) -> None:
        """Return once the current step's job has ended (at once when none is in flight)."""
        step, self._step = self._step, None
        if step is not None:
            step.done.wait()

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
                job(step.mark)
            except BaseException as e:  # the job reports its loads' failures itself
                log.error("layer-wise load step failed: %s", e)
            finally:
                step.end()
