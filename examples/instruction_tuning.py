"""Exact match of a model's greedy answers on the shipped held-out instructions.

    python examples/instruction_tuning.py                    # the shipped model, before tuning
    lmtune train examples/sft.yaml
    python examples/instruction_tuning.py --model runs/sft   # after

The prompt is fed exactly as objective=sft trains it (BOS + prompt), generation is greedy and
stops at EOS, which the tuned model learned to emit because EOS carried loss.
"""

from __future__ import annotations

import argparse

from lmtune.assets.corpora import data_path
from lmtune.data.readers import read_records
from lmtune.generate import generate_text
from lmtune.metrics import exact_match
from lmtune.models.loading import load_model_and_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: the shipped model)")
    parser.add_argument("--show", type=int, default=3, help="print this many answers")
    args = parser.parse_args()
    model, tok, folder = load_model_and_tokenizer(args.model)
    records = read_records(data_path("instructions_eval.jsonl"))
    preds = [generate_text(model, tok, r.fields["prompt"], max_new_tokens=24).strip() for r in records]
    refs = [r.fields["completion"] for r in records]
    strict = sum(p == r for p, r in zip(preds, refs)) / len(refs)
    for r, p in list(zip(records, preds))[:args.show]:
        print(f"  {r.fields['prompt']!r} -> {p!r} (want {r.fields['completion']!r})")
    print(f"{folder}: exact match {strict:.3f} (strict), {exact_match(preds, refs):.3f} (SQuAD-normalised) "
          f"on {len(refs)} held-out instructions")


if __name__ == "__main__":
    main()
