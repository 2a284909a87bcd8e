"""The ``lmtune`` command: parse arguments, then call the library.

Heavy imports (torch, transformers) happen inside the command handlers, so ``lmtune --help``
and argument errors answer at once. Exit status: 0 success, 2 usage or input error (one
readable message, no traceback), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from lmtune.errors import InputError, Interrupted

EXAMPLES = """examples:
  lmtune demo
  lmtune train examples/lora.yaml train.lr=2e-4
  lmtune train data.train=my.jsonl method=lora output_dir=runs/a
  lmtune generate --prompt "where is the"
  lmtune convert --model SmolLM2-135M-Instruct.Q4_1.gguf --out smollm2
  lmtune export --model smollm2 --adapter runs/a/adapter --format ollama --out smollm2-tuned
"""


def cmd_train(args: argparse.Namespace) -> int:
    from lmtune.config import load_config

    config_file, overrides = _split_config_args(args.args)
    cfg = load_config(config_file, overrides)
    # Imported only once the config is valid: lmtune.run pulls in torch and transformers
    # (seconds), and a mistyped key should be answered at once.
    from lmtune.run import run_training

    run_training(cfg, show_example=args.show_example)
    return 0


def _split_config_args(items: list[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG.yaml] [key=value ...]``: the first item without '=' is the config file."""
    config_file = None
    overrides = []
    for item in items:
        if "=" in item:
            overrides.append(item)
        elif config_file is None:
            config_file = item
        else:
            raise InputError(f"'{item}' is neither key=value nor the (single) config file; "
                             f"the config file is already {config_file}")
    return config_file, overrides


def cmd_pretrain(args: argparse.Namespace) -> int:
    from lmtune.pretrain import pretrain

    pretrain(args.corpus, args.out, args.overrides)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    if args.classify:
        from lmtune.models.heads import classify_text

        for label, prob in classify_text(args.model, args.adapter, args.prompt, task=args.task):
            print(f"{label}\t{prob:.4f}")
        return 0
    from lmtune.generate import generate_text
    from lmtune.methods.adapters import load_with_adapter

    # With an adapter: the adapter's tokenizer, with the chat tokens training added, if any.
    model, tokenizer, _ = load_with_adapter(args.model, args.adapter)
    text = generate_text(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                         chat=args.chat)
    print(text)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from lmtune.evaluate import run_eval

    results = run_eval(model=args.model, adapter=args.adapter, data=args.data, metrics=args.metrics,
                       shots=args.shots, shots_file=args.shots_file, max_new_tokens=args.max_new_tokens,
                       chat=not args.no_chat)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for k, v in results.items():
            print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from lmtune.methods.adapters import merge_command

    out = merge_command(model=args.model, adapter=args.adapter, out=args.out)
    print(f"merged {args.adapter} into {args.model or 'the shipped model'}; wrote {out}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from lmtune.export.command import convert_command

    convert_command(model=args.model, out=args.out, dtype=args.dtype)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from lmtune.export.command import export_command

    export_command(model=args.model, out=args.out, fmt=args.format, adapter=args.adapter, dtype=args.dtype)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from lmtune.footprint import run_inspect

    report = run_inspect(model=args.model, overrides=args.overrides)
    print(json.dumps(report, indent=2) if args.json else report["text"])
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lmtune.demo import run_demo

    run_demo(args.out, steps=args.steps)
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from lmtune.compile.commands import compile_model

    given = {"rank": args.rank} if args.rank is not None else {}  # else the library's default
    compile_model(args.graph, out=args.out, from_corpus=args.from_corpus, vocab=args.vocab, **given,
                  **_compile_keys(args.overrides))
    return 0


def _compile_keys(items: list[str]) -> dict[str, Any]:
    """``smoothing=0.1 n_layer=4 ...`` for ``lmtune compile``, typed; unknown keys named."""
    types = {"smoothing": float, "seed": int, "n_layer": int, "n_head": int, "n_positions": int, "n_embd": int}
    keys: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or key not in types:
            raise InputError(f"'{item}': lmtune compile takes key=value with key one of {', '.join(types)}")
        try:
            keys[key] = types[key](value)
        except ValueError:
            raise InputError(f"'{item}': {key} must be {'a number' if types[key] is float else 'an integer'}") from None
    return keys


def cmd_extract_links(args: argparse.Namespace) -> int:
    from lmtune.compile.commands import extract_to_files

    extract_to_files(args.model, args.out, top=args.top, min_prob=args.min_prob, graph=args.graph, data=args.data,
                     merge_into=args.merge_into)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmtune", description="Fine-tune language models.",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    from lmtune import __version__

    parser.add_argument("--version", action="version", version=f"lmtune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    model_help = "local model folder or .gguf file (default: the shipped model)"

    p = sub.add_parser("demo", help="pre-training vs fine-tuning vs LoRA on the shipped model, end to end")
    p.add_argument("--out", default="lmtune-demo", help="output folder (default: lmtune-demo)")
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps per arm (default: 300)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="one training run",
                       description="Train from a YAML config and/or key=value overrides of its dotted keys. "
                                   "Keys and defaults: lmtune train --keys")
    p.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [key=value]")
    p.add_argument("--keys", action="store_true", help="list every config key with its default")
    p.add_argument("--show-example", action="store_true",
                   help="objective=sft: print the first training example, tokens coloured by whether they carry loss")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("pretrain", help="word tokenizer + small GPT from scratch, with the same loop")
    p.add_argument("--corpus", required=True, help="text file, one sentence per line")
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("eval", help="perplexity, exact match, F1, BLEU, ROUGE, accuracy, AUC")
    p.add_argument("--model", help=model_help)
    p.add_argument("--adapter", help="adapter folder to apply")
    p.add_argument("--data", required=True, help="evaluation data file")
    p.add_argument("--metrics", default="perplexity", help="comma-separated (default: perplexity)")
    p.add_argument("--shots", type=int, default=0, help="few-shot: examples placed in each prompt")
    p.add_argument("--shots-file", help="where few-shot examples come from (default: --data)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--no-chat", action="store_true",
                   help="raw prompts: do not render prompt/completion data with the model's chat template")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="sample text from a model (and adapter)")
    p.add_argument("--model", help=model_help)
    p.add_argument("--adapter", help="adapter folder to apply without merging")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template, stop at end of turn")
    p.add_argument("--classify", action="store_true",
                   help="classify the prompt with a saved objective=classify model: each label and its probability")
    p.add_argument("--task", help="with --classify on a multi-task model: which task's head (default: the first)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("merge", help="fold an adapter into the base weights")
    p.add_argument("--model", help=model_help)
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("convert", help="a GGUF file -> a plain transformers folder (safetensors + tokenizer)")
    p.add_argument("--model", required=True, help="a .gguf file, or a folder holding one")
    p.add_argument("--out", required=True, help="the new folder")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype the GGUF tensors are dequantized to (default: float32)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export", help="write a model (adapter merged) as GGUF for llama.cpp, or for Ollama")
    p.add_argument("--model", help=model_help)
    p.add_argument("--adapter", help="adapter folder to merge in first")
    p.add_argument("--format", default="gguf", choices=["gguf", "ollama"],
                   help="gguf: one .gguf file; ollama: a folder with model.gguf and a Modelfile (default: gguf)")
    p.add_argument("--out", required=True, help="the .gguf file (gguf) or a new folder (ollama)")
    p.add_argument("--dtype", default="f16", choices=["f32", "f16", "bf16", "q8_0"],
                   help="tensor type of the matrices (norms stay f32; default: f16)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("inspect", help="parameters and training memory per method")
    p.add_argument("--model", help=model_help)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("compile", help="weights compiled from a link graph (rank-K SVD), no training",
                       description="Compile a graph of weighted links between tokens (or a corpus's bigrams) into a "
                                   "GPT-2 folder whose logits are the best rank-K approximation of the graph's "
                                   "centred next-token log-probabilities. Keys: smoothing (0.05), seed (0), "
                                   "n_layer (2), n_head (4), n_positions (64), n_embd (rank+2 rounded up).")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--graph", help="link file: TSV or JSONL of source, target, weight")
    source.add_argument("--from-corpus", help="text file whose bigram counts are the links")
    p.add_argument("--out", required=True, help="new model folder")
    p.add_argument("--rank", type=int, help="singular components kept (default: 48)")
    p.add_argument("--vocab", help="model folder whose tokenizer to use (default: words of the graph)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("extract-links", help="a model's strongest next-token links that the graph lacks")
    p.add_argument("--model", required=True, help="model folder (compiled, fine-tuned, ...)")
    p.add_argument("--out", help="where the new links go (TSV or JSONL; weight = the model's probability)")
    p.add_argument("--top", type=int, default=100, help="at most this many links (default: 100)")
    p.add_argument("--min-prob", type=float, default=0.05, help="probability threshold (default: 0.05)")
    p.add_argument("--graph", help="the input graph (default: MODEL/links.tsv of a compiled model)")
    p.add_argument("--data", help="text to average the associations over (default: one probe per token)")
    p.add_argument("--merge-into", help="link file to add the new links to (rewritten atomically)")
    p.set_defaults(func=cmd_extract_links)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "train" and args.keys:
        from lmtune.config import describe_keys

        print(describe_keys())
        return 0
    from lmtune.env import set_process_defaults

    set_process_defaults()  # the command owns its process: offline, quiet libraries (lmtune.env)
    handler: Callable[[argparse.Namespace], int] = args.func
    try:
        return handler(args)
    except InputError as e:
        print(f"lmtune: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:  # a checkpoint was saved; the message says how to continue
        print(f"lmtune: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("lmtune: interrupted", file=sys.stderr)
        return 130


def entry() -> Any:
    sys.exit(main())
