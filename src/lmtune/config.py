"""Run configuration: dotted keys with documented defaults, YAML files, key=value overrides.

A config is a flat dict of dotted keys (``train.lr``); YAML files nest them
(``train: {lr: 1e-3}``). Every key is declared once in ``KEYS`` with its default, its
type and a one-line description, so validation, error messages and the README all
read from the same table. The whole config is validated before any model loads.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmtune.errors import InputError


@dataclass(frozen=True)
class Key:
    """One configuration key: its default, accepted type and check."""

    default: Any
    kind: type | tuple[type, ...]
    doc: str
    check: Callable[[Any], str | None] | None = None  # returns a complaint or None
    choices: tuple[Any, ...] | None = None


def _positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must be >= 0"


def _unit_interval_open_right(v: Any) -> str | None:
    return None if 0 <= v < 1 else "must be in [0, 1)"


def _unit_interval(v: Any) -> str | None:
    return None if 0 <= v <= 1 else "must be in [0, 1]"


def _betas(v: Any) -> str | None:
    ok = len(v) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in v)
    return None if ok else "must be two numbers in [0, 1), e.g. [0.9, 0.999]"


def _seed(v: Any) -> str | None:
    return None if 0 <= v < 2**32 else "must be in [0, 2**32)"


def _power_of_two(v: Any) -> str | None:
    return None if v > 0 and (v & (v - 1)) == 0 else "must be a positive power of two (e.g. 64)"


NUM = (int, float)
OPT_STR = (str, type(None))
OPT_INT = (int, type(None))

KEYS: dict[str, Key] = {
    "model": Key(None, OPT_STR, "local Hugging Face model folder (default: the shipped model)"),
    "method": Key("full", str, "what trains", choices=("full", "freeze", "lora", "qlora", "prompt_tuning")),
    "objective": Key(None, OPT_STR, "loss (default: from the data format)",
                     choices=(None, "lm", "sft", "dpo", "kto", "reward", "ppo", "grpo", "classify")),
    "output_dir": Key(None, OPT_STR, "where the run writes (required)"),
    "trust_remote_code": Key(False, bool, "run code shipped inside a model folder (off: never unless asked)"),
    "data.train": Key(None, (str, list, type(None)), "training data file (JSONL/JSON/CSV/Parquet/TXT)"),
    "data.eval": Key(None, OPT_STR, "held-out file for eval_loss and early stopping"),
    "data.format": Key("auto", str, "record format",
                       choices=("auto", "text", "prompt_completion", "alpaca", "messages",
                                "preference", "unpaired_preference", "classification", "prompts")),
    "data.retain": Key(None, OPT_STR, "held-out pre-training text: its loss before/after = forgetting"),
    "lora.r": Key(8, int, "adapter rank (higher: more capacity and memory)", _positive),
    "lora.alpha": Key(16.0, NUM, "scale numerator: update is (alpha/r)·BA", _positive),
    "lora.dropout": Key(0.0, NUM, "dropout on the adapter input", _unit_interval_open_right),
    "lora.target_modules": Key(None, (str, list, type(None)),
                               "module names, dotted suffixes, a regex, or 'all-linear' (default: per architecture)"),
    "lora.rslora": Key(False, bool, "scale by alpha/sqrt(r) (rank-stabilised LoRA)"),
    "lora.dora": Key(False, bool, "weight-decomposed LoRA (trainable magnitude)"),
    "lora.init": Key("default", str, "B=0 with Kaiming A, or gaussian A", choices=("default", "gaussian")),
    "quant.block_size": Key(64, int, "NF4 block size", _power_of_two),
    "quant.double_quant": Key(True, bool, "quantize the per-block scales too (QLoRA double quantization)"),
    "prompt_tuning.num_virtual_tokens": Key(8, int, "trainable soft-prompt length", _positive),
    "prompt_tuning.init": Key("random", str, "random, vocab rows, or text:<words>"),
    "freeze.layers": Key(0, int, "freeze embeddings and the first N blocks", _non_negative),
    "train.steps": Key(None, OPT_INT, "optimizer steps (default: from epochs)", _positive),
    "train.epochs": Key(1.0, NUM, "passes over data.train when train.steps is unset", _positive),
    "train.lr": Key(1e-3, NUM, "peak learning rate", _positive),
    "train.batch_size": Key(8, int, "examples per micro-batch", _positive),
    "train.grad_accum": Key(1, int, "micro-batches per optimizer step", _positive),
    "train.max_length": Key(256, int, "tokens per example; longer ones are truncated and counted", _positive),
    "train.warmup_steps": Key(0, int, "linear warm-up steps", _non_negative),
    "train.schedule": Key("constant", str, "learning-rate schedule after warm-up",
                          choices=("constant", "linear", "cosine")),
    "train.weight_decay": Key(0.0, NUM, "AdamW decay on matrices (never on biases and norms)", _non_negative),
    "train.betas": Key([0.9, 0.999], (list, tuple), "AdamW betas", _betas),
    "train.eps": Key(1e-8, NUM, "AdamW epsilon", _positive),
    "train.clip_grad_norm": Key(1.0, (int, float, type(None)), "clip the global gradient norm (null: off)",
                                _non_negative),
    "train.seed": Key(0, int, "seed for init, data order, dropout", _seed),
    "train.precision": Key("fp32", str, "fp32, or bf16 autocast", choices=("fp32", "bf16")),
    "train.packing": Key(False, bool, "pack several examples per row, no attention across them"),
    "train.eval_every": Key(0, int, "evaluate every N steps (0: only at the end)", _non_negative),
    "train.save_every": Key(0, int, "checkpoint every N steps (0: never)", _non_negative),
    "train.log_every": Key(1, int, "log every N steps", _positive),
    "train.patience": Key(0, int, "early stopping: evals without improvement (0: off)", _non_negative),
    "train.resume": Key(False, bool, "continue from the newest good checkpoint in output_dir"),
    "train.keep_checkpoints": Key(2, int, "how many checkpoints to keep", _positive),
    "train.loss_on": Key("response", str, "SFT loss on the response only, or on all tokens",
                         choices=("response", "all")),
    "train.compile": Key(False, bool, "torch.compile the model (compile time is reported)"),
    "train.distributed.strategy": Key("ddp", str, "under torchrun", choices=("ddp", "fsdp")),
    "train.distributed.backend": Key(None, OPT_STR, "process-group backend (default: nccl on GPU, gloo on CPU)"),
    "dpo.beta": Key(0.1, NUM, "strength of the pull toward the reference", _positive),
    "dpo.loss": Key("sigmoid", str, "DPO variant; orpo and simpo use no reference model",
                    choices=("sigmoid", "ipo", "hinge", "robust", "orpo", "simpo")),
    "dpo.simpo_gamma": Key(0.5, NUM, "SimPO's target reward margin gamma", _non_negative),
    "dpo.label_smoothing": Key(0.0, NUM, "robust/cDPO: assumed share of flipped labels", _unit_interval),
    "dpo.precompute_ref": Key(False, bool, "compute reference log-probs once before training"),
    "ppo.reward_model": Key(None, OPT_STR, "reward-model folder"),
    "ppo.reward_fn": Key(None, OPT_STR, "Python reward function as module:function"),
    "ppo.kl_coef": Key(0.05, NUM, "per-token KL penalty to the reference", _non_negative),
    "ppo.gamma": Key(1.0, NUM, "GAE discount", _unit_interval),
    "ppo.lam": Key(0.95, NUM, "GAE lambda", _unit_interval),
    "ppo.clip_range": Key(0.2, NUM, "policy ratio clip", _positive),
    "ppo.clip_range_value": Key(0.2, NUM, "value clip", _positive),
    "ppo.vf_coef": Key(0.1, NUM, "value-loss weight", _non_negative),
    "ppo.epochs": Key(4, int, "PPO epochs per rollout batch", _positive),
    "ppo.rollout_batch_size": Key(16, int, "prompts per rollout", _positive),
    "ppo.max_new_tokens": Key(16, int, "response length cap", _positive),
    "ppo.temperature": Key(1.0, NUM, "sampling temperature for rollouts", _positive),
    "ppo.missing_eos_penalty": Key(1.0, NUM, "subtracted from the score of responses without EOS", _non_negative),
    "kto.beta": Key(0.1, NUM, "scale of KTO's implicit reward", _positive),
    "kto.desirable_weight": Key(1.0, NUM, "weight of desirable (label true) examples' losses", _positive),
    "kto.undesirable_weight": Key(1.0, NUM, "weight of undesirable (label false) examples' losses", _positive),
    "grpo.reward_fns": Key(None, (str, list, type(None)), "Python reward functions, [module:function, ...]"),
    "grpo.reward_weights": Key(None, (list, type(None)), "one weight per reward source (default: all 1)"),
    "grpo.reward_model": Key(None, OPT_STR, "reward-model folder, scored after the functions"),
    "grpo.num_generations": Key(4, int, "completions sampled per prompt (a group)", _positive),
    "grpo.generation_batch_size": Key(4, int, "prompts per generation batch", _positive),
    "grpo.max_completion_length": Key(32, int, "completion length cap (and dr_grpo's normaliser)", _positive),
    "grpo.temperature": Key(1.0, NUM, "sampling temperature", _positive),
    "grpo.top_p": Key(1.0, NUM, "nucleus sampling mass (1: off)", _unit_interval),
    "grpo.top_k": Key(0, int, "sample among the k most likely tokens (0: off)", _non_negative),
    "grpo.num_iterations": Key(1, int, "policy passes over each generation batch", _positive),
    "grpo.epsilon": Key(0.2, NUM, "lower clip of the importance ratio", _positive),
    "grpo.epsilon_high": Key(None, (int, float, type(None)), "upper clip (DAPO clip-higher; default: epsilon)",
                             _positive),
    "grpo.beta": Key(0.0, NUM, "KL weight to the reference (0: no reference is kept)", _non_negative),
    "grpo.loss_type": Key("dapo", str, "normalisation: per sequence, per token, or constant",
                          choices=("grpo", "dapo", "dr_grpo")),
    "grpo.scale_rewards": Key("group", str, "divide advantages by the group's std, the batch's, or not",
                              choices=("group", "batch", "none")),
    "reward.margin": Key(False, bool, "use the data's margin column in the Bradley-Terry loss"),
    "reward.center_coef": Key(0.0, NUM, "push mean reward toward 0 (reward centring)", _non_negative),
    "classify.pool": Key(None, OPT_STR, "cls, mean or last (default: cls for encoders, last for causal LMs)",
                         choices=(None, "cls", "mean", "last")),
    "classify.tasks": Key(None, (list, type(None)), "task names for multi-task runs (default: from data)"),
    "regularize.l2_init": Key(0.0, NUM, "λ of the penalty λ·Σ‖θ−θ₀‖² toward the initial weights", _non_negative),
    "regularize.replay_data": Key(None, OPT_STR, "pre-training text mixed into each batch"),
    "regularize.replay_ratio": Key(0.0, NUM, "share of each batch taken from replay_data", _unit_interval_open_right),
}


class Config(dict):
    """A flat mapping of dotted keys to validated values (``cfg["train.lr"]``)."""

    def section(self, prefix: str) -> dict[str, Any]:
        """The keys under ``prefix.`` without the prefix (``cfg.section("lora")["r"]``)."""
        cut = len(prefix) + 1
        return {k[cut:]: v for k, v in self.items() if k.startswith(prefix + ".")}


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        # A nested mapping is a section unless the key itself is a leaf (none take dicts).
        if isinstance(v, dict) and key not in KEYS:
            flat.update(_flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


def _suggest(key: str) -> str:
    near = difflib.get_close_matches(key, list(KEYS), n=3, cutoff=0.5)
    if not near:
        section = key.split(".")[0]
        near = [k for k in KEYS if k.startswith(section + ".")][:6]
    return f" Did you mean: {', '.join(near)}?" if near else ""


def parse_value(text: str) -> Any:
    """Parse the right-hand side of ``key=value`` the way YAML would (``1e-3``, ``true``, ``[a, b]``)."""
    import yaml

    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def _coerce(key: str, value: Any, spec: Key, where: str) -> Any:
    kinds = spec.kind if isinstance(spec.kind, tuple) else (spec.kind,)
    # YAML reads 1e-3 as a string; accept numbers written that way.
    if isinstance(value, str) and (int in kinds or float in kinds):
        try:
            value = float(value) if float in kinds or not value.lstrip("-").isdigit() else int(value)
        except ValueError:
            pass
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and bool not in kinds:
        raise InputError(f"{where}: '{key}' must be {_kind_name(kinds)}, got {value!r}")
    if not isinstance(value, kinds):
        raise InputError(f"{where}: '{key}' must be {_kind_name(kinds)}, got {value!r} ({type(value).__name__})")
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"{where}: '{key}' must be a finite number, got {value!r}")
    if spec.choices is not None and value not in spec.choices:
        options = ", ".join(str(c) for c in spec.choices if c is not None)
        raise InputError(f"{where}: '{key}' must be one of {options}; got {value!r}")
    if spec.check is not None and value is not None:
        complaint = spec.check(value)
        if complaint:
            raise InputError(f"{where}: '{key}' {complaint}; got {value!r}")
    return value


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             list: "a list", tuple: "a list", type(None): "null"}
    return " or ".join(dict.fromkeys(names[k] for k in kinds))


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None,
                base: dict[str, Any] | None = None) -> Config:
    """Build a validated config from defaults, an optional base dict, a YAML file and overrides.

    Args:
        path: YAML file with nested or dotted keys.
        overrides: ``["train.lr=1e-4", ...]`` from the command line, or a dict of dotted keys.
        base: dotted keys applied before the file (used by commands with their own defaults).

    Returns:
        The validated ``Config`` with every key present.

    Raises:
        InputError: unreadable YAML, an unknown key (with the nearest valid keys), or a value
            of the wrong type or out of range (naming the key and where it was set).
    """
    cfg = Config({k: spec.default for k, spec in KEYS.items()})
    layers: list[tuple[str, dict[str, Any]]] = []
    if base:
        layers.append(("defaults", dict(base)))
    if path is not None:
        layers.append((str(path), _read_yaml(Path(path))))
    if overrides:
        if isinstance(overrides, dict):
            layers.append(("overrides", dict(overrides)))
        else:
            layers.append(("command line", _parse_overrides(overrides)))
    for where, values in layers:
        for key, value in _flatten(values).items():
            if key not in KEYS:
                raise InputError(f"{where}: unknown config key '{key}'.{_suggest(key)}")
            cfg[key] = _coerce(key, value, KEYS[key], where)
    return cfg


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise InputError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"{path}: a config file must be a mapping of keys to values, got {type(data).__name__}")
    return data


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise InputError(f"'{item}' is not key=value (e.g. train.lr=1e-4)")
        key, _, text = item.partition("=")
        out[key.strip()] = parse_value(text)
    return out


def describe_keys() -> str:
    """Every key with its default and description, for ``lmtune train --help`` and the README."""
    width = max(len(k) for k in KEYS)
    return "\n".join(f"{k:<{width}}  {spec.default!r:<12}  {spec.doc}" for k, spec in KEYS.items())
