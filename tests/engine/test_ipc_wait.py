"""vLLM's shared-memory queue readers do not spin on a CPU engine (``kvaas.engine.ipc_wait``).

vLLM polls a queue in a ``sched_yield`` loop for a second after each read; the plugin caps that
window (0 on a CPU platform unless ``KVAAS_ENGINE_IPC_SPIN_SECONDS`` says otherwise). Checked
on vLLM's own ``SpinCondition`` over real zmq sockets, and on the shared engine's processes:
after a request, its worker sleeps instead of burning a core.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
import zmq
from vllm.distributed.device_communicators.shm_broadcast import SpinCondition
from vllm.utils.network_utils import get_open_zmq_ipc_path

from kvaas.engine import ipc_wait

from .conftest import Gateway


@pytest.mark.parametrize(
    ("raw", "cpu", "want"),
    [
        (None, True, 0.0),
        ("", True, 0.0),
        ("  ", False, None),
        (None, False, None),
        ("0.25", False, 0.25),
        ("1", True, 1.0),
        ("0", False, 0.0),
    ],
)
def test_the_window_comes_from_the_environment_with_a_cpu_default(
    raw: str | None, cpu: bool, want: float | None
) -> None:
    assert ipc_wait.spin_window(raw, cpu) == want


@pytest.mark.parametrize("raw", ["-1", "inf", "nan", "soon"])
def test_a_bad_window_is_refused(raw: str) -> None:
    with pytest.raises(ValueError):
        ipc_wait.spin_window(raw, cpu=True)


@contextlib.contextmanager
def _queue_pair(ours: bool) -> Iterator[tuple[SpinCondition, SpinCondition]]:
    """A writer's and a reader's ``SpinCondition`` on one real zmq socket pair, waiting the
    way ``ours`` says (this module's wait with no spin, or vLLM's own) while in the block."""
    original = SpinCondition.wait
    vllms = getattr(original, "__wrapped__", original)
    ctx = zmq.Context()
    address = get_open_zmq_ipc_path()
    writer = SpinCondition(is_reader=False, context=ctx, notify_address=address)
    reader = SpinCondition(is_reader=True, context=ctx, notify_address=address)
    try:
        SpinCondition.wait = ipc_wait.capped_wait(vllms, 0.0) if ours else vllms  # type: ignore[method-assign]
        yield writer, reader
    finally:
        SpinCondition.wait = original  # type: ignore[method-assign]
        for sock in (
            reader.local_notify_socket,
            reader.read_cancel_socket,
            reader.write_cancel_socket,
            writer.local_notify_socket,
        ):
            sock.close(linger=0)
        ctx.term()


def _notify_until_queued(writer: SpinCondition, reader: SpinCondition) -> None:
    """Notify until a notification is queued on ``reader``'s socket (a zmq subscription takes
    a moment to connect)."""
    deadline = time.monotonic() + 10
    while not reader.local_notify_socket.poll(0):
        assert time.monotonic() < deadline, "no notification reached the reader"
        writer.notify()
        time.sleep(0.01)


@pytest.mark.parametrize("ours", [True, False])
def test_a_reader_that_just_read_sleeps_on_the_socket_only_when_capped(ours: bool) -> None:
    """vLLM's reader, having just read, yields and returns without looking at its socket; ours
    (no spin) waits on the socket and takes the queued notification."""
    with _queue_pair(ours) as (writer, reader):
        _notify_until_queued(writer, reader)
        reader.record_read()  # it has just read: inside vLLM's one-second window
        reader.wait(timeout_ms=5000)
        assert bool(reader.local_notify_socket.poll(0)) is (not ours)


@pytest.mark.parametrize("ours", [True, False])
def test_a_sleeping_reader_looks_again_without_a_signal(ours: bool) -> None:
    """A write whose signal was lost: vLLM's reader sleeps on until its timeout (5 s in vLLM's
    read loop; indefinitely here), ours returns within its poll bound to look at the buffer."""
    with _queue_pair(ours) as (_writer, reader):
        reader.last_read = time.monotonic() - 10  # idle: past any spin window
        waiter = threading.Thread(target=reader.wait, kwargs={"timeout_ms": None}, daemon=True)
        waiter.start()
        waiter.join(timeout=2.0)  # the bound after 10 s idle: 50 ms
        returned = not waiter.is_alive()
        reader.cancel()  # wake vLLM's, which would sleep for ever
        waiter.join(timeout=10)
        assert returned is ours


def test_the_poll_bound_grows_with_idle_time_within_limits() -> None:
    assert ipc_wait.poll_bound_ms(0.0) == 1
    assert ipc_wait.poll_bound_ms(0.2) == 10
    assert ipc_wait.poll_bound_ms(60.0) == 50


def _worker_processes(g: Gateway) -> list[psutil.Process]:
    llm: Any = g.app.state.engine._llm
    cores = [psutil.Process(p.pid) for p in llm.engine_core.resources.engine_manager.processes]
    workers = [c for core in cores for c in core.children(recursive=True)]
    assert workers, "the engine core started no worker process"
    return workers


def _cpu_s(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        t = p.cpu_times()
        total += t.user + t.system
    return total


async def test_the_engines_worker_sleeps_between_requests(gateway: Gateway) -> None:
    """Right after a request, vLLM's worker would spin on its queue for a second (a core's
    worth of CPU); with the plugin installed in its process it sleeps."""
    workers = _worker_processes(gateway)
    body = {"model": "tiny", "prompt": [5, 6, 7, 8], "max_tokens": 2}
    r = await gateway.client.post("/v1/completions", json=body, headers=gateway.auth())
    assert r.status_code == 200, r.text
    before = _cpu_s(workers)
    await asyncio.sleep(0.8)
    used = _cpu_s(workers) - before
    # vLLM's own window spends most of these 0.8 s on a core (0.5-0.8 s measured); a
    # sleeping worker next to nothing
    assert used < 0.25, f"the engine's workers used {used:.2f} s of CPU while idle"


def test_a_set_window_reaches_a_remote_nodes_environment() -> None:
    from kvaas.engine.node_command import serve_command
    from kvaas.engine.options import EngineOptions

    assert ipc_wait.SPIN_ENV not in serve_command("/m", "tiny", {}, port=8100).env
    node = serve_command("/m", "tiny", {}, port=8100, options=EngineOptions(ipc_spin_s=0.002))
    assert float(node.env[ipc_wait.SPIN_ENV]) == 0.002
    assert ipc_wait.SPIN_ENV not in " ".join(node.argv)
