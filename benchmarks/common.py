"""Shared pieces of the benchmark: environment, fixed inputs, FLOPs, timing summaries.

Every arm runs in a fresh subprocess and reads the same files written once by ``build_fixtures``:
a BPE tokenizer trained here on generated text, instruction/response and preference pairs
pre-tokenized once (same ids and order for every arm), Llama-style models built from configs with
a fixed seed, and one LoRA initialisation that every LoRA arm starts from.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
IGNORE = -100

# The ladder from the protocol. ``ffn`` is the SwiGLU width; embeddings are untied so the output
# head (the part chunked cross-entropy avoids materialising) is real work at V=32000.
LADDER: dict[str, dict[str, int]] = {
    "8m": {"layers": 4, "d": 256, "heads": 4, "ffn": 1536, "vocab": 4096},
    "50m": {"layers": 8, "d": 512, "heads": 8, "ffn": 1376, "vocab": 32000},
    "125m": {"layers": 12, "d": 768, "heads": 12, "ffn": 2048, "vocab": 32000},
}
LORA = {"r": 16, "alpha": 32, "dropout": 0.0,
        "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
OPTIM = {"lr": 2e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "clip": 1.0}
MAX_LEN = 512  # longest example is 500 tokens; packed rows are this long
SEED = 0


def set_thread_env(threads: int) -> dict[str, str]:
    """The same threading environment for every arm (BENCHMARKS.md pitfalls)."""
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
           "DISABLE_MLFLOW_INTEGRATION": "TRUE", "WANDB_DISABLED": "true", "PYTHONUNBUFFERED": "1",
           "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    os.environ.update(env)
    return env


def peak_rss_mb() -> float:
    """Peak resident memory of this process alone: lmtune's own reading (``VmHWM``; ``ru_maxrss``
    would carry the high-water mark of the driver that started the arm)."""
    from lmtune.runlog import peak_rss_mb as own_peak

    return own_peak()


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ---------------------------------------------------------------------------------------------
# Machine and versions


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def machine_info() -> dict[str, Any]:
    """CPU model, cores, the flags that decide bf16 speed, memory, GPU if any."""
    flags = cpu_flags()
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else "?"
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    info = {"cpu": model, "cores": os.cpu_count(), "mem_gb": round(mem_gb, 1),
            "avx512f": "avx512f" in flags, "avx512_vnni": "avx512_vnni" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "load_avg": os.getloadavg(), "python": sys.version.split()[0], "platform": platform.platform()}
    info["bf16_native"] = info["avx512_bf16"] or info["amx_bf16"]
    try:
        import torch
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "tokenizers"):
        try:
            out[name] = __import__(name).__version__
        except Exception as e:  # a missing peer is reported, not fatal
            out[name] = f"unavailable ({type(e).__name__})"
    out["lmtune"] = git_describe()
    return out


def git_describe() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "?"


# ---------------------------------------------------------------------------------------------
# Generated text, tokenizer, data


def _pseudo_words(rng: random.Random, n: int) -> list[str]:
    """``n`` distinct pronounceable words; a Zipf draw over them gives text with a long tail."""
    onsets = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
              "br", "ch", "cl", "dr", "fl", "gr", "pl", "pr", "sh", "sl", "st", "th", "tr"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "ou", "oo", "y"]
    codas = ["", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng", "ck"]
    words: set[str] = set()
    while len(words) < n:
        k = rng.choice([1, 1, 2, 2, 2, 3, 3, 4])
        words.add("".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(k)))
    return sorted(words)


class TextGen:
    """Deterministic pseudo-English: Zipf-distributed words in sentences with punctuation."""

    def __init__(self, seed: int = SEED, n_words: int = 60000):
        self.rng = random.Random(seed)
        self.words = _pseudo_words(self.rng, n_words)
        self.rng.shuffle(self.words)
        weights = [1.0 / (i + 1) ** 1.05 for i in range(n_words)]
        total = sum(weights)
        self.cum = []
        acc = 0.0
        for w in weights:
            acc += w / total
            self.cum.append(acc)

    def words_(self, n: int) -> list[str]:
        import bisect
        return [self.words[min(bisect.bisect_left(self.cum, self.rng.random()), len(self.words) - 1)]
                for _ in range(n)]

    def text(self, n_words: int) -> str:
        out, left = [], n_words
        while left > 0:
            k = min(left, self.rng.randint(4, 16))
            sentence = self.words_(k)
            sentence[0] = sentence[0].capitalize()
            out.append(" ".join(sentence) + self.rng.choice([".", ".", ".", "?", "!", ","]))
            left -= k
        return " ".join(out)


def train_tokenizer(texts: list[str], vocab: int, folder: Path) -> Any:
    """Byte-level BPE trained on ``texts``; <s>=0 (BOS), </s>=1 (EOS), <pad>=2; no automatic specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>", "<pad>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(folder)
    return tok


def _target_lengths(rng: random.Random, n: int) -> list[int]:
    """Log-uniform totals in [20, 500]: many short examples, a long tail (mean ~150)."""
    return [int(math.exp(rng.uniform(math.log(20), math.log(500)))) for _ in range(n)]


def make_pairs(n: int, tokens_per_word: float, seed: int = SEED) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """``n`` instruction/response records and ``n`` preference records (prompt, chosen, rejected).

    Word counts aim at log-uniform token totals in [20, 500] for a tokenizer that spends
    ``tokens_per_word`` tokens per word; records outside the range are dropped after tokenizing.
    """
    gen, rng = TextGen(seed), random.Random(seed + 1)
    sft, pref = [], []
    for total in _target_lengths(rng, n):
        words = max(4, int((total - 2) / tokens_per_word))
        p = max(2, int(words * rng.uniform(0.15, 0.5)))
        sft.append({"prompt": gen.text(p), "completion": gen.text(max(2, words - p))})
    for total in _target_lengths(rng, n):
        words = max(4, int((total - 2) / tokens_per_word))
        p = max(2, int(words * rng.uniform(0.2, 0.5)))
        c = max(2, int((words - p) / 1.2))  # the longer completion stays near the target
        pref.append({"prompt": gen.text(p), "chosen": gen.text(c),
                     "rejected": gen.text(max(2, int(c * rng.uniform(0.6, 1.4))))})
    return sft, pref


def sft_ids(tok: Any, prompt: str, completion: str) -> dict[str, list[int]]:
    """BOS + prompt, then " " + completion + EOS carrying loss (lmtune's prompt_completion framing).

    Position 0 never carries a label. The fixtures keep only records of 20-500 tokens, so
    nothing is truncated here.
    """
    head = [tok.bos_token_id] + tok.encode(prompt, add_special_tokens=False)
    tail = tok.encode(" " + completion, add_special_tokens=False) + [tok.eos_token_id]
    return {"input_ids": head + tail, "labels": [IGNORE] * len(head) + tail}


def pref_ids(tok: Any, prompt: str, chosen: str, rejected: str) -> dict[str, list[int]]:
    """Prompt ids (with BOS) and completion ids (leading space, EOS) for one preference pair."""
    return {"prompt_ids": [tok.bos_token_id] + tok.encode(prompt, add_special_tokens=False),
            "chosen_ids": tok.encode(" " + chosen, add_special_tokens=False) + [tok.eos_token_id],
            "rejected_ids": tok.encode(" " + rejected, add_special_tokens=False) + [tok.eos_token_id]}


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """lmtune's data order (``lmtune.data.batching.epoch_order``), so peers see the same batches."""
    import torch
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def ordered(items: list[Any], epochs: int, seed: int = SEED) -> list[Any]:
    """``items`` in lmtune's order for ``epochs`` passes, for samplers that read sequentially."""
    return [items[i] for e in range(epochs) for i in epoch_order(len(items), seed, e)]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------
# Models


def llama_config(rung: str, tok: Any) -> Any:
    from transformers import LlamaConfig

    a = LADDER[rung]
    return LlamaConfig(vocab_size=a["vocab"], hidden_size=a["d"], intermediate_size=a["ffn"],
                       num_hidden_layers=a["layers"], num_attention_heads=a["heads"],
                       num_key_value_heads=a["heads"], max_position_embeddings=1024, rms_norm_eps=1e-5,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       tie_word_embeddings=False, attention_dropout=0.0, use_cache=False)


def build_model_folder(rung: str, tok: Any, folder: Path) -> None:
    """A random Llama from the ladder, seeded, saved as safetensors with its tokenizer."""
    import torch
    from transformers import LlamaForCausalLM

    from lmtune.models.loading import save_model

    torch.manual_seed(SEED)
    model = LlamaForCausalLM(llama_config(rung, tok))
    save_model(model, tok, folder, {"benchmark_rung": rung})


def param_count(rung: str) -> int:
    a = LADDER[rung]
    d, f, layers, v = a["d"], a["ffn"], a["layers"], a["vocab"]
    return 2 * v * d + layers * (4 * d * d + 3 * d * f + 2 * d) + d


def lora_params(rung: str) -> int:
    a = LADDER[rung]
    d, f, r = a["d"], a["ffn"], LORA["r"]
    per_layer = 4 * r * (d + d) + 2 * r * (d + f) + r * (f + d)  # q,k,v,o; gate,up; down
    return a["layers"] * per_layer


# ---------------------------------------------------------------------------------------------
# FLOPs and throughput


def sequence_flops(rung: str, length: int, loss_tokens: int, passes: float = 2.0, ref_passes: float = 0.0) -> float:
    """Model FLOPs of LoRA training on one sequence (frozen base: no weight gradients).

    Forward matmuls 2·N per token; backward needs input gradients only (another 2·N), plus the
    adapters' full 6·N_lora. The output head runs only where a loss is needed (that is the useful
    work; materialising logits elsewhere is overhead). Attention scores/values: causal, 2·L·ℓ²·d
    forward, twice that backward. ``passes`` counts forward+input-gradient (2.0 for training);
    ``ref_passes`` adds gradient-free forwards (1.0 for a DPO reference).
    """
    a = LADDER[rung]
    d, layers = a["d"], a["layers"]
    body = layers * (4 * d * d + 3 * d * a["ffn"])
    head = d * a["vocab"]
    attn_fwd = 2 * layers * length * length * d
    fwd = 2 * body * length + 2 * head * loss_tokens + attn_fwd
    lora = 3 * passes * lora_params(rung) * length  # 6·N_lora per trained token
    return passes * fwd + lora + ref_passes * fwd


def window_rates(steps: list[dict[str, float]], warmup: int, window: int, clock: str = "seconds") -> list[float]:
    """Loss tokens per second (``clock="cpu_seconds"``: per CPU-second) of consecutive windows after warm-up."""
    rest = steps[warmup:]
    rates = []
    for start in range(0, len(rest) - window + 1, window):
        chunk = rest[start:start + window]
        secs = sum(s.get(clock, 0.0) for s in chunk)
        if secs > 0:
            rates.append(sum(s["tokens"] for s in chunk) / secs)
    return rates


def median(xs: list[float]) -> float | None:
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else 0.5 * (xs[mid - 1] + xs[mid])


class StepClock:
    """Wall time between consecutive step ends; the first interval starts at ``start()``."""

    def __init__(self) -> None:
        self.last: float | None = None
        self.last_cpu = 0.0
        self.steps: list[dict[str, float]] = []

    def start(self) -> None:
        self.last, self.last_cpu = time.perf_counter(), time.process_time()

    def tick(self, tokens: int, loss: float | None) -> None:
        import torch

        if torch.cuda.is_available():  # kernels run asynchronously: a step ends when the GPU is done
            torch.cuda.synchronize()
        now, cpu = time.perf_counter(), time.process_time()
        # CPU seconds of all this process's threads: on a shared machine they grow with the work
        # done, not with the time spent waiting for a core (a cross-check on the wall-clock rates).
        self.steps.append({"seconds": now - (self.last if self.last is not None else now), "tokens": int(tokens),
                           "loss": None if loss is None else float(loss), "cpu_seconds": cpu - self.last_cpu})
        self.last, self.last_cpu = now, cpu


def flops_per_loss_token(work: Path, rung: str, n_steps: int, bs: int, dpo_bs: int) -> dict[str, float]:
    """Model FLOPs per loss-carrying token over the batches the same-batch arms see.

    Packed arms see the same examples in other groupings; per-segment attention keeps their
    useful FLOPs per token the same, so one ratio per objective serves every arm.
    """
    sft = ordered(read_json(work / f"sft-{rung}.json")["examples"], epochs=2)[:max(1, n_steps * bs)]
    flops = tokens = 0.0
    for e in sft:
        n = sum(x != IGNORE for x in e["labels"][1:])
        flops += sequence_flops(rung, len(e["input_ids"]), n)
        tokens += n
    out = {"sft": flops / max(tokens, 1)}
    pairs = ordered(read_json(work / f"pref-{rung}.json")["examples"], epochs=2)[:max(1, n_steps * dpo_bs)]
    live = ref = tokens = 0.0
    for p in pairs:
        for comp in (p["chosen_ids"], p["rejected_ids"]):
            length = len(p["prompt_ids"]) + len(comp)
            live += sequence_flops(rung, length, len(comp))
            ref += sequence_flops(rung, length, len(comp), passes=0.0, ref_passes=1.0)
            tokens += len(comp)
    out["dpo"] = (live + ref) / max(tokens, 1)  # policy fwd+bwd and the reference forward, each step
    out["dpo_precomputed"] = live / max(tokens, 1)  # reference log-probs computed before the timed window
    return out


def quick_mm_peak(precision: str) -> float:
    """Best ``torch.mm`` FLOP/s of a few square products in this process, for this arm's MFU.

    Measured inside each arm (before and after training) so that, on a shared machine, an arm's
    MFU is relative to the speed the machine gave *that* arm.
    """
    import torch

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    n = 4096 if cuda else 1024
    a, b = torch.randn(n, n, device=dev).to(dtype), torch.randn(n, n, device=dev).to(dtype)
    best = 0.0
    for _ in range(8 if cuda else 5):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.mm(a, b)
        if cuda:
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best
