"""LoRA's default targets come from module names; PEFT's own default-target table is the oracle.

Models are built from ``transformers`` configs on the meta device (module names only, no
weights), so thirty architectures cost about a second.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from lmtune.errors import InputError
from lmtune.methods.targets import resolve_targets

ONE_LAYER = dict(num_hidden_layers=1, n_layer=1, num_layers=1, n_layers=1, num_decoder_layers=1, encoder_layers=1,
                 decoder_layers=1)
EXTRA = {"gpt_neo": {"attention_types": [[["global"], 1]]}}

# Architectures PEFT's table lists, where its default is query + value or the fused projection.
IN_PEFT = ["gpt2", "gpt_bigcode", "bloom", "opt", "gptj", "gpt_neox", "gpt_neo", "bert", "roberta", "xlm-roberta",
           "electra", "deberta-v2", "deberta", "layoutlm", "llama", "falcon", "codegen", "mistral", "stablelm",
           "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3", "t5", "mt5", "bart", "mpt", "rwkv"]
# PEFT's table has no entry (PEFT asks for target_modules); lmtune still finds the attention.
NOT_IN_PEFT = {"phi3": {"qkv_proj"}, "qwen2_moe": {"q_proj", "v_proj"}, "olmo2": {"q_proj", "v_proj"},
               "granite": {"q_proj", "v_proj"}, "starcoder2": {"q_proj", "v_proj"}, "cohere": {"q_proj", "v_proj"},
               "distilbert": {"q_lin", "v_lin"}, "mixtral": {"q_proj", "v_proj"}}
# Not compared: PEFT's entries for phi (adds fc1, fc2) and nemotron_h (adds k_proj, o_proj) are
# deliberate extras beyond the attention's q/v, which lmtune does not copy.


def meta_model(model_type: str) -> torch.nn.Module:
    """A model of ``model_type`` with one block, on the meta device."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = AutoConfig.for_model(model_type, **ONE_LAYER, **EXTRA.get(model_type, {}))
    for cls in (AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModel):
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return cls.from_config(config)
        except ValueError:  # no class of this kind for the architecture
            continue
    raise AssertionError(f"no model class for {model_type}")


def peft_default_targets(model: torch.nn.Module) -> set[str]:
    """Full names of the layers PEFT's ``LoraConfig()`` (no target_modules) adapts."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=2))
    return {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}


@pytest.mark.parametrize("model_type", IN_PEFT)
def test_default_targets_equal_peft_where_peft_has_an_entry(model_type):
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    assert model_type in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    ours = set(resolve_targets(meta_model(model_type), None))
    assert ours and ours == peft_default_targets(meta_model(model_type))


@pytest.mark.parametrize("model_type", sorted(NOT_IN_PEFT))
def test_default_targets_find_the_attention_of_architectures_peft_does_not_list(model_type):
    model = meta_model(model_type)
    names = resolve_targets(model, None)
    assert {n.rsplit(".", 1)[1] for n in names} == NOT_IN_PEFT[model_type]
    assert all("attn" in n or "attention" in n for n in names), names  # inside the attention blocks


def test_no_attention_names_is_an_error_listing_the_linear_modules():
    model = torch.nn.Sequential()
    model.add_module("up", torch.nn.Linear(4, 8))
    model.add_module("down", torch.nn.Linear(8, 4))
    with pytest.raises(InputError, match=r"lora.target_modules is not set.*Linear modules in this model: up, down"):
        resolve_targets(model, None)
