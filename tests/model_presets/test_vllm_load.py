"""vLLM (the CPU package here) loads the built tiny model offline and agrees with transformers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from kvaas.model_presets import resolve_model

pytestmark = [pytest.mark.engine, pytest.mark.slow]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return resolve_model("tiny", tmp_path_factory.mktemp("models"))


def test_vllm_greedy_matches_transformers(tiny_dir: Path) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    prompt = "import os\nimport sys\n\n\ndef read_config(path):\n    with open(path) as f:\n"
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :].tolist()

    llm = LLM(
        model=str(tiny_dir),
        dtype="float32",
        max_model_len=4096,
        max_num_batched_tokens=1024,
        enforce_eager=True,
        seed=0,
    )
    try:
        out = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0))[0]
    finally:
        del llm
    got = list(out.outputs[0].token_ids)
    assert list(out.prompt_token_ids) == ids[0].tolist()  # same tokenizer, BOS included
    assert got == ref, (tok.decode(got), tok.decode(ref))
