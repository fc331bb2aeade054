"""What the engine's device changes (:mod:`kvaas.engine.device`): eager mode, dtype and memory
on a GPU against a CPU, in process and on the printed node command; and a gateway that would
start one in-process engine per worker is refused. The GPU branches are taken by telling the
rules the device is a GPU (this machine has none); the engine arguments are vLLM's own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from kvaas.engine.device import eager, engine_dtype, memory_args
from kvaas.engine.inprocess import InProcessEngine
from kvaas.engine.model_info import ModelInfo
from kvaas.engine.node_command import serve_command
from kvaas.engine.options import EngineOptions

GIB = 1024**3


def _model_dir(tmp_path: Path, dtype: str) -> Path:
    d = tmp_path / f"model-{dtype}"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"dtype": dtype}))
    return d


def test_eager_on_a_cpu_compiled_on_a_gpu_unless_told() -> None:
    assert eager("auto", gpu=False) and not eager("auto", gpu=True)
    assert eager("on", gpu=True) and not eager("off", gpu=False)


def test_auto_runs_a_float32_checkpoint_as_bfloat16_on_a_gpu_only(tmp_path: Path) -> None:
    f32, f16 = _model_dir(tmp_path, "float32"), _model_dir(tmp_path, "float16")
    assert engine_dtype(f32, "auto", gpu=False) == "float32"
    assert engine_dtype(f32, "auto", gpu=True) == "bfloat16"
    assert engine_dtype(f16, "auto", gpu=True) == "float16"
    assert engine_dtype(f32, "float32", gpu=True) == "float32"  # said: kept


def test_memory_is_the_kv_size_unless_a_gpu_fraction_is_set() -> None:
    assert memory_args(2.0, None, gpu=True) == {"kv_cache_memory_bytes": 2 * GIB}
    assert memory_args(2.0, 0.8, gpu=True) == {"gpu_memory_utilization": 0.8}
    assert memory_args(2.0, 0.8, gpu=False) == {"kv_cache_memory_bytes": 2 * GIB}


def test_node_command_follows_the_nodes_device() -> None:
    cpu = serve_command("/m", "tiny", {}, port=8100, options=EngineOptions(kv_cache_gib=2.0)).argv
    assert "--enforce-eager" in cpu
    assert cpu[cpu.index("--kv-cache-memory-bytes") + 1] == str(2 * GIB)
    fraction = EngineOptions(gpu_memory_fraction=0.85, kv_cache_gib=2.0)
    gpu = serve_command("/m", "tiny", {}, port=8100, device="gpu", options=fraction).argv
    assert "--enforce-eager" not in gpu and "--kv-cache-memory-bytes" not in gpu
    assert gpu[gpu.index("--gpu-memory-utilization") + 1] == "0.85"
    on = EngineOptions(eager="on")
    forced = serve_command("/m", "tiny", {}, port=8100, device="gpu", options=on).argv
    assert "--enforce-eager" in forced
    assert forced[forced.index("--kv-cache-memory-bytes") + 1] == str(GIB)


def test_in_process_engine_arguments_on_this_cpu(tmp_path: Path) -> None:
    model = ModelInfo(path=tmp_path, name="tiny", fingerprint="f" * 32, tokenizer=None)
    args = InProcessEngine(model, store={})._args()
    assert args.enforce_eager is True and args.tensor_parallel_size == 1
    two = EngineOptions(eager="off", tensor_parallel_size=2)
    args = InProcessEngine(model, store={}, options=two)._args()
    assert args.enforce_eager is False and args.tensor_parallel_size == 2


def test_serve_refuses_several_workers_each_with_an_in_process_engine(tmp_path: Path) -> None:
    kvaas = Path(sys.executable).with_name("kvaas")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVAAS_")}
    env |= {
        "KVAAS_ENGINE": "inprocess",
        "KVAAS_DATA_DIR": str(tmp_path),
        "KVAAS_ADMIN_TOKEN": "t" * 40,
    }
    r = subprocess.run(
        [str(kvaas), "serve", "--workers", "2", "--port", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert "own in-process engine" in r.stdout and "KVAAS_ENGINE=remote" in r.stdout
