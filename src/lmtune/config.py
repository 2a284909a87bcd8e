"""Run configuration: frozen dataclass sections, each key declared once with its default and doc.

``RunConfig`` holds the top-level keys (``model``, ``method``, ...) and one frozen section per
component (``cfg.train.lr``, ``cfg.lora.r``, ``cfg.train.distributed.strategy``). A component
receives the section it reads, not the whole run. YAML files nest the keys
(``train: {lr: 1e-3}``), the command line spells them dotted (``train.lr=1e-3``), the Python API
takes sections as keyword dicts (``train={"lr": 1e-3}``); all three meet in ``load_config``,
which validates every value before any model loads. ``lmtune train --keys`` and the README's
key list read the same declarations (``KEYS``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmtune.errors import InputError

Check = Callable[[Any], "str | None"]  # returns a complaint, or None when the value is fine


MAX_MAGNITUDE = 1e9  # far beyond any sensible setting, far below float32's 3.4e38


def key(default: Any, doc: str, check: Check | None = None, choices: tuple[Any, ...] | None = None) -> Any:
    """A config field: its default, one line of doc, and an optional range check or choice list."""
    return field(default=default, metadata={"doc": doc, "check": check, "choices": choices})


def section(cls: type) -> Any:
    """A field holding a whole section, defaulting to the section's defaults."""
    return field(default_factory=cls, metadata={"section": True})


def _positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def _learning_rate(v: Any) -> str | None:
    return None if 0 < v <= 1 else "must be in (0, 1] (an Adam step moves each weight by about lr)"


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must be >= 0"


def _unit_open_right(v: Any) -> str | None:
    return None if 0 <= v < 1 else "must be in [0, 1)"


def _unit(v: Any) -> str | None:
    return None if 0 <= v <= 1 else "must be in [0, 1]"


def _betas(v: Any) -> str | None:
    ok = len(v) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in v)
    return None if ok else "must be two numbers in [0, 1), e.g. [0.9, 0.999]"


def _seed(v: Any) -> str | None:
    return None if 0 <= v < 2**32 else "must be in [0, 2**32)"


def _power_of_two(v: Any) -> str | None:
    return None if v > 0 and (v & (v - 1)) == 0 else "must be a positive power of two (e.g. 64)"


NAMED_CHAT_TEMPLATES = ("chatml", "llama3", "gemma", "phi3")  # defined in lmtune.data.templates


def _chat_template(v: Any) -> str | None:
    if v in ("auto", "none", *NAMED_CHAT_TEMPLATES) or v.endswith(".jinja"):
        return None
    return f"must be auto, none, one of {', '.join(NAMED_CHAT_TEMPLATES)}, or a path to a .jinja file"


@dataclass(frozen=True)
class DataConfig:
    train: str | list[str] | None = key(None, "training data file (JSONL/JSON/CSV/Parquet/TXT); a list: multi-task")
    eval: str | None = key(None, "held-out file for eval_loss and early stopping")
    format: str = key("auto", "record format", choices=("auto", "text", "prompt_completion", "alpaca", "messages",
                                                        "preference", "unpaired_preference", "classification",
                                                        "prompts"))
    retain: str | None = key(None, "held-out pre-training text: its loss before/after = forgetting")
    chat_template: str = key("auto", "instruction data's template: auto (the model's), none (raw), "
                             f"{'|'.join(NAMED_CHAT_TEMPLATES)}, or a .jinja file", _chat_template)


@dataclass(frozen=True)
class LoraConfig:
    r: int = key(8, "adapter rank (higher: more capacity and memory)", _positive)
    alpha: float = key(16.0, "scale numerator: update is (alpha/r)·BA", _positive)
    dropout: float = key(0.0, "dropout on the adapter input", _unit_open_right)
    target_modules: str | list[str] | None = key(
        None, "module names, dotted suffixes, a regex, or 'all-linear' (default: attention q/v, found by name)")
    rslora: bool = key(False, "scale by alpha/sqrt(r) (rank-stabilised LoRA)")
    dora: bool = key(False, "weight-decomposed LoRA (trainable magnitude)")
    init: str = key("default", "B=0 with Kaiming A, or gaussian A", choices=("default", "gaussian"))


@dataclass(frozen=True)
class QuantConfig:
    block_size: int = key(64, "NF4 block size", _power_of_two)
    double_quant: bool = key(True, "quantize the per-block scales too (QLoRA double quantization)")


@dataclass(frozen=True)
class PromptTuningConfig:
    num_virtual_tokens: int = key(8, "trainable soft-prompt length", _positive)
    init: str = key("random", "random, vocab rows, or text:<words>")


@dataclass(frozen=True)
class FreezeConfig:
    layers: int = key(0, "freeze embeddings and the first N blocks", _non_negative)


@dataclass(frozen=True)
class DistributedConfig:
    strategy: str = key("ddp", "under torchrun: ddp (a full copy per rank) or fsdp (FSDP2, weights sharded)",
                        choices=("ddp", "fsdp"))
    backend: str | None = key(None, "process-group backend (default: nccl on GPU, gloo on CPU)",
                              choices=(None, "gloo", "nccl"))
    timeout: float = key(300.0, "seconds a rank waits for the others before the run stops, naming itself",
                         _positive)
    bucket_mb: float = key(25.0, "ddp: gradient bucket MB, all-reduced during backward (> model: no overlap)",
                           _positive)


@dataclass(frozen=True)
class TrainConfig:
    steps: int | None = key(None, "optimizer steps (default: from epochs)", _positive)
    epochs: float = key(1.0, "passes over data.train when train.steps is unset", _positive)
    lr: float = key(1e-3, "peak learning rate", _learning_rate)
    batch_size: int = key(8, "examples per micro-batch", _positive)
    grad_accum: int = key(1, "micro-batches per optimizer step", _positive)
    max_length: int = key(256, "tokens per example; longer ones are truncated and counted", _positive)
    warmup_steps: int = key(0, "linear warm-up steps", _non_negative)
    schedule: str = key("constant", "learning-rate schedule after warm-up", choices=("constant", "linear", "cosine"))
    weight_decay: float = key(0.0, "AdamW decay on matrices (never on biases and norms)", _non_negative)
    betas: tuple[float, float] = key((0.9, 0.999), "AdamW betas", _betas)
    eps: float = key(1e-8, "AdamW epsilon", _positive)
    clip_grad_norm: float | None = key(1.0, "clip the global gradient norm (0 or null: off)", _non_negative)
    seed: int = key(0, "seed for init, data order, dropout", _seed)
    precision: str = key("fp32", "fp32, or bf16 autocast", choices=("fp32", "bf16"))
    packing: bool = key(False, "sft: pack several examples per row, no attention across them")
    eval_every: int = key(0, "evaluate every N steps (0: only at the end)", _non_negative)
    save_every: int = key(0, "checkpoint every N steps (0: never)", _non_negative)
    log_every: int = key(1, "log every N steps", _positive)
    patience: int = key(0, "early stopping: evals without improvement (0: off)", _non_negative)
    resume: bool = key(False, "continue from the newest good checkpoint in output_dir")
    keep_checkpoints: int = key(2, "how many checkpoints to keep", _positive)
    loss_on: str = key("response", "sft: loss on the response only, or on all tokens", choices=("response", "all"))
    compile: bool = key(False, "torch.compile the model (compile time is reported)")
    gradient_checkpointing: bool = key(False, "keep only each decoder block's input and recompute the block in "
                                       "backward: less activation memory for ~1.3x step time (every method)")
    distributed: DistributedConfig = section(DistributedConfig)


@dataclass(frozen=True)
class DPOConfig:
    beta: float = key(0.1, "strength of the pull toward the reference", _positive)
    loss: str = key("sigmoid", "DPO variant; orpo and simpo use no reference model",
                    choices=("sigmoid", "ipo", "hinge", "robust", "orpo", "simpo"))
    simpo_gamma: float = key(0.5, "SimPO's target reward margin gamma (dpo.loss=simpo only)", _non_negative)
    label_smoothing: float = key(0.0, "robust/cDPO: assumed share of flipped labels", _unit)
    precompute_ref: bool = key(False, "compute reference log-probs once before training")


@dataclass(frozen=True)
class PPOConfig:
    reward_model: str | None = key(None, "reward-model folder")
    reward_fn: str | None = key(None, "Python reward function as module:function")
    kl_coef: float = key(0.05, "per-token KL penalty to the reference", _non_negative)
    gamma: float = key(1.0, "GAE discount", _unit)
    lam: float = key(0.95, "GAE lambda", _unit)
    clip_range: float = key(0.2, "policy ratio clip", _positive)
    clip_range_value: float = key(0.2, "value clip", _positive)
    vf_coef: float = key(0.1, "value-loss weight", _non_negative)
    epochs: int = key(4, "PPO epochs per rollout batch", _positive)
    rollout_batch_size: int = key(16, "prompts per rollout", _positive)
    max_new_tokens: int = key(16, "response length cap", _positive)
    temperature: float = key(1.0, "sampling temperature for rollouts", _positive)
    missing_eos_penalty: float = key(1.0, "subtracted from the score of responses without EOS", _non_negative)


@dataclass(frozen=True)
class KTOConfig:
    beta: float = key(0.1, "scale of KTO's implicit reward", _positive)
    desirable_weight: float = key(1.0, "weight of desirable (label true) examples' losses", _positive)
    undesirable_weight: float = key(1.0, "weight of undesirable (label false) examples' losses", _positive)


@dataclass(frozen=True)
class GRPOConfig:
    reward_fns: str | list[str] | None = key(None, "Python reward functions, [module:function, ...]")
    reward_weights: list[float] | None = key(None, "one weight per reward source (default: all 1)")
    reward_model: str | None = key(None, "reward-model folder, scored after the functions")
    num_generations: int = key(4, "completions sampled per prompt (a group)", _positive)
    generation_batch_size: int = key(4, "prompts per generation batch", _positive)
    max_completion_length: int = key(32, "completion length cap (and dr_grpo's normaliser)", _positive)
    temperature: float = key(1.0, "sampling temperature", _positive)
    top_p: float = key(1.0, "nucleus sampling mass (1: off)", _unit)
    top_k: int = key(0, "sample among the k most likely tokens (0: off)", _non_negative)
    num_iterations: int = key(1, "policy passes over each generation batch", _positive)
    epsilon: float = key(0.2, "lower clip of the importance ratio", _positive)
    epsilon_high: float | None = key(None, "upper clip (DAPO clip-higher; default: epsilon)", _positive)
    beta: float = key(0.0, "KL weight to the reference (0: no reference is kept)", _non_negative)
    loss_type: str = key("dapo", "normalisation: per sequence, per token, or constant",
                         choices=("grpo", "dapo", "dr_grpo"))
    scale_rewards: str = key("group", "divide advantages by the group's std, the batch's, or not",
                             choices=("group", "batch", "none"))


@dataclass(frozen=True)
class RewardConfig:
    margin: bool = key(False, "use the data's margin column in the Bradley-Terry loss")
    center_coef: float = key(0.0, "push mean reward toward 0 (reward centring)", _non_negative)


@dataclass(frozen=True)
class ClassifyConfig:
    pool: str | None = key(None, "cls, mean or last (default: cls for encoders, last for causal LMs)",
                           choices=(None, "cls", "mean", "last"))
    tasks: list[str] | None = key(None, "task names for multi-task runs (default: from data)")


@dataclass(frozen=True)
class RegularizeConfig:
    l2_init: float = key(0.0, "λ of the penalty λ·Σ‖θ−θ₀‖² toward the initial weights", _non_negative)
    replay_data: str | None = key(None, "pre-training text mixed into each batch")
    replay_ratio: float = key(0.0, "share of each batch taken from replay_data", _unit_open_right)


@dataclass(frozen=True)
class RunConfig:
    """One run: top-level keys and a section per component."""

    model: str | None = key(None, "local Hugging Face model folder (default: the shipped model)")
    method: str = key("full", "what trains", choices=("full", "freeze", "lora", "qlora", "prompt_tuning"))
    objective: str | None = key(None, "loss (default: from the data format)",
                                choices=(None, "lm", "sft", "dpo", "kto", "reward", "ppo", "grpo", "classify"))
    output_dir: str | None = key(None, "where the run writes (required)")
    trust_remote_code: bool = key(False, "run code shipped inside a model folder (off: never unless asked)")
    data: DataConfig = section(DataConfig)
    lora: LoraConfig = section(LoraConfig)
    quant: QuantConfig = section(QuantConfig)
    prompt_tuning: PromptTuningConfig = section(PromptTuningConfig)
    freeze: FreezeConfig = section(FreezeConfig)
    train: TrainConfig = section(TrainConfig)
    dpo: DPOConfig = section(DPOConfig)
    ppo: PPOConfig = section(PPOConfig)
    kto: KTOConfig = section(KTOConfig)
    grpo: GRPOConfig = section(GRPOConfig)
    reward: RewardConfig = section(RewardConfig)
    classify: ClassifyConfig = section(ClassifyConfig)
    regularize: RegularizeConfig = section(RegularizeConfig)

    def get(self, dotted: str) -> Any:
        """The value of a dotted key (``cfg.get("train.lr")``)."""
        value: Any = self
        for part in dotted.split("."):
            value = getattr(value, part)
        return value

    def replace(self, values: dict[str, Any]) -> RunConfig:
        """A copy with dotted keys set (values already validated, e.g. a resolved objective)."""
        return _build({**self.flat(), **values})

    def flat(self) -> dict[str, Any]:
        """Every key as ``{dotted: value}`` (what run records and summaries store)."""
        return {name: self.get(name) for name in KEYS}


@dataclass(frozen=True)
class Key:
    """One declared key: where it lives and how its values are checked."""

    name: str
    default: Any
    kinds: tuple[type, ...]
    doc: str
    check: Check | None
    choices: tuple[Any, ...] | None


def _kinds(hint: Any) -> tuple[type, ...]:
    """The runtime types a type hint accepts (``str | list[str] | None`` -> str, list, NoneType)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return tuple(k for arg in typing.get_args(hint) for k in _kinds(arg))
    origin = typing.get_origin(hint) or hint
    if origin is tuple:
        return (list, tuple)
    if origin is float:
        return (int, float)
    return (type(None),) if hint is None or hint is type(None) else (origin,)


def _declare(cls: type, prefix: str = "") -> dict[str, Key]:
    hints = typing.get_type_hints(cls)
    keys: dict[str, Key] = {}
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        if f.metadata.get("section"):
            keys.update(_declare(hints[f.name], name + "."))
        else:
            keys[name] = Key(name, f.default, _kinds(hints[f.name]), f.metadata["doc"], f.metadata["check"],
                             f.metadata["choices"])
    return keys


KEYS: dict[str, Key] = _declare(RunConfig)


def _build(flat: dict[str, Any], cls: type = RunConfig, prefix: str = "") -> Any:
    """Nested frozen sections from already-checked dotted values."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        values[f.name] = _build(flat, hints[f.name], name + ".") if f.metadata.get("section") else flat[name]
    return cls(**values)


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and name not in KEYS:  # a nested mapping is a section: no key takes a dict
            flat.update(_flatten(v, name + "."))
        else:
            flat[name] = v
    return flat


def _suggest(name: str) -> str:
    near = difflib.get_close_matches(name, list(KEYS), n=3, cutoff=0.5)
    if not near:
        head = name.split(".")[0]
        near = [k for k in KEYS if k.startswith(head + ".")][:6]
    return f" Did you mean: {', '.join(near)}?" if near else ""


def parse_value(text: str) -> Any:
    """Parse the right-hand side of ``key=value`` the way YAML would (``1e-3``, ``true``, ``[a, b]``)."""
    import yaml

    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             list: "a list", tuple: "a list", type(None): "null"}
    return " or ".join(dict.fromkeys(names[k] for k in kinds))


def coerce(spec: Key, value: Any, where: str) -> Any:
    """``value`` checked against ``spec``: type, finiteness, choices and range.

    Raises:
        InputError: naming the key, where it was set, and what it must be.
    """
    kinds, name = spec.kinds, spec.name
    # YAML reads 1e-3 as a string; accept numbers written that way.
    if isinstance(value, str) and (int in kinds or float in kinds):
        try:
            value = float(value) if float in kinds or not value.lstrip("-").isdigit() else int(value)
        except ValueError:
            pass
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and bool not in kinds:
        raise InputError(f"{where}: '{name}' must be {_kind_name(kinds)}, got {value!r}")
    if not isinstance(value, kinds):
        raise InputError(f"{where}: '{name}' must be {_kind_name(kinds)}, got {value!r} ({type(value).__name__})")
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"{where}: '{name}' must be a finite number, got {value!r}")
    if isinstance(value, float) and abs(value) > MAX_MAGNITUDE:  # would overflow float32 inside torch
        raise InputError(f"{where}: '{name}' must be at most {MAX_MAGNITUDE:g} in magnitude, got {value!r}")
    if spec.choices is not None and value not in spec.choices:
        options = ", ".join(str(c) for c in spec.choices if c is not None)
        raise InputError(f"{where}: '{name}' must be one of {options}; got {value!r}")
    if spec.check is not None and value is not None:
        complaint = spec.check(value)
        if complaint:
            raise InputError(f"{where}: '{name}' {complaint}; got {value!r}")
    if isinstance(value, list) and tuple in kinds:
        value = tuple(value)  # frozen sections hold tuples, so a config can be hashed and compared
    return value


def load_config(path: str | Path | RunConfig | None = None, overrides: list[str] | dict[str, Any] | None = None,
                base: dict[str, Any] | None = None, **keys: Any) -> RunConfig:
    """Build a validated run configuration.

    Layers apply in order, later ones winning: the declared defaults, ``base``, the YAML file
    (or an existing ``RunConfig``), ``overrides``, then ``keys``.

    Args:
        path: a YAML file with nested or dotted keys, or a ``RunConfig`` to start from.
        overrides: ``["train.lr=1e-4", ...]`` from the command line, or a dict of dotted keys.
        base: dotted keys applied before the file (commands with defaults of their own).
        **keys: top-level keys and sections as dicts, as the Python API takes them:
            ``method="lora", lora={"r": 16}, train={"lr": 2e-4}``.

    Returns:
        The frozen ``RunConfig``.

    Raises:
        InputError: unreadable YAML, an unknown key (with the nearest valid keys), or a value
            of the wrong type or out of range (naming the key and where it was set).
    """
    layers: list[tuple[str, dict[str, Any]]] = []
    if base:
        layers.append(("defaults", dict(base)))
    if isinstance(path, RunConfig):
        layers.append(("config", path.flat()))
    elif path is not None:
        layers.append((str(path), _read_yaml(Path(path))))
    if overrides:
        where = "overrides" if isinstance(overrides, dict) else "command line"
        layers.append((where, dict(overrides) if isinstance(overrides, dict) else _parse_overrides(overrides)))
    if keys:
        layers.append(("arguments", {k: v for k, v in keys.items() if v is not None}))
    flat = {name: spec.default for name, spec in KEYS.items()}
    for where, values in layers:
        for name, value in _flatten(values).items():
            if name not in KEYS:
                raise InputError(f"{where}: unknown config key '{name}'.{_suggest(name)}")
            flat[name] = coerce(KEYS[name], value, where)
    return _build(flat)


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
        name, _, text = item.partition("=")
        out[name.strip()] = parse_value(text)
    return out


def describe_keys() -> str:
    """Every key with its default and description, for ``lmtune train --keys`` and the README."""
    width = max(len(k) for k in KEYS)
    return "\n".join(f"{k:<{width}}  {_show(spec.default):<12}  {spec.doc}" for k, spec in KEYS.items())


def _show(default: Any) -> str:
    return repr(list(default)) if isinstance(default, tuple) else repr(default)
