"""Reward modelling: the Bradley–Terry loss against TRL's RewardTrainer, scoring, saving, the objective."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from lmtune.objectives.reward import bradley_terry_loss, last_token_index

B = 5


def _trl_reward_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None,
                     center_coef: float | None):
    """TRL 1.16's ``RewardTrainer.compute_loss`` on given scores (the model is a stand-in)."""
    from trl import RewardTrainer

    scores = torch.cat([chosen, rejected]).unsqueeze(-1)  # (2B, 1) as a sequence-classification head returns

    def model(**kwargs):
        return SimpleNamespace(logits=scores)

    accelerator = SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x)
    trainer = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=accelerator,
                              args=SimpleNamespace(center_rewards_coefficient=center_coef),
                              _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(2 * B, 3, dtype=torch.long), "attention_mask": torch.ones(2 * B, 3)}
    if margin is not None:
        inputs["margin"] = margin
    loss = RewardTrainer.compute_loss(trainer, model, inputs)
    return loss, {k: v[0] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("use_margin", [False, True])
@pytest.mark.parametrize("center_coef", [0.0, 0.01])
def test_bradley_terry_matches_trl_reward_trainer(use_margin, center_coef):
    g = torch.Generator().manual_seed(3)
    chosen = torch.randn(B, generator=g, dtype=torch.float64)
    rejected = torch.randn(B, generator=g, dtype=torch.float64)
    margin = torch.rand(B, generator=g, dtype=torch.float64) if use_margin else None
    trl_loss, trl_metrics = _trl_reward_loss(chosen, rejected, margin, center_coef or None)
    loss, metrics = bradley_terry_loss(chosen, rejected, margin, center_coef)
    assert abs(loss.item() - trl_loss.item()) < 1e-6
    for key in ("accuracy", "margin", "mean_reward", "min_reward", "max_reward"):
        assert abs(metrics[key] - trl_metrics[key]) < 1e-6, key


def test_last_token_index_handles_right_and_left_padding():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 3, 0]
    assert last_token_index(left).tolist() == [3, 3, 3]


PAIRS = [
    {"prompt": "the cat", "chosen": "can run .", "rejected": "is in the cup ."},
    {"prompt": "the dog", "chosen": "can jump .", "rejected": "sat on the tree ."},
    {"prompt": "where is", "chosen": "the red ball ?", "rejected": "my mom ?"},
    {"prompt": "i see", "chosen": "a big dog .", "rejected": "the fish ."},
    {"prompt": "the girl", "chosen": "has a hat .", "rejected": "can see the bird ."},
    {"prompt": "the boy", "chosen": "can see the bird .", "rejected": "is big ."},
]


def write_jsonl(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run(*args: str) -> int:
    from lmtune.cli import main

    return main(["train", *args])


@pytest.fixture(scope="module")
def trained_rm(tmp_path_factory, request):
    """A reward model trained briefly on PAIRS (tiny GPT-2), with held-out accuracy."""
    from conftest import build_model, word_tokenizer
    from lmtune.models.loading import save_model

    root = tmp_path_factory.mktemp("rm")
    tok = word_tokenizer()
    save_model(build_model("gpt2", tok), tok, root / "base")
    data = write_jsonl(root / "pairs.jsonl", PAIRS)
    assert run(f"model={root / 'base'}", "objective=reward", f"data.train={data}", f"data.eval={data}",
               f"output_dir={root / 'rm'}", "train.steps=25", "train.batch_size=6", "train.lr=1e-2") == 0
    return root / "rm"


def test_saved_reward_model_scores_like_transformers_sequence_classification(trained_rm):
    from transformers import AutoModelForSequenceClassification

    from lmtune.data.preference import build_pairs, collate_pairs
    from lmtune.data.readers import Record
    from lmtune.objectives.reward import load_reward_model, reward_scores

    hf = AutoModelForSequenceClassification.from_pretrained(trained_rm).eval()
    ours, tok = load_reward_model(trained_rm)
    pairs, _ = build_pairs([Record(p, "x") for p in PAIRS], tok, 64, add_eos=False)
    batch = collate_pairs(pairs, tok.pad_token_id)  # right-padded, rows of different lengths
    with torch.no_grad():
        expected = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
        got = reward_scores(ours, batch)
    assert torch.allclose(got, expected, atol=1e-5)


def test_left_padding_gives_the_same_scores_as_right_padding(trained_rm):
    from lmtune.objectives.reward import load_reward_model, reward_scores

    model, tok = load_reward_model(trained_rm)
    seqs = [[tok.bos_token_id] + tok("the cat can run", add_special_tokens=False)["input_ids"],
            [tok.bos_token_id] + tok("the dog", add_special_tokens=False)["input_ids"]]
    width = max(map(len, seqs))
    pad = tok.pad_token_id
    right = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    left = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
    right_mask = (torch.arange(width) < torch.tensor([[len(s)] for s in seqs])).long()  # (2, T)
    left_mask = right_mask.flip(-1)
    positions = (left_mask.cumsum(-1) - 1).clamp(min=0)  # real tokens keep their positions
    with torch.no_grad():
        a = reward_scores(model, {"input_ids": right, "attention_mask": right_mask})
        b = reward_scores(model, {"input_ids": left, "attention_mask": left_mask, "position_ids": positions})
    assert torch.allclose(a, b, atol=1e-5)


def test_training_ranks_held_out_pairs(trained_rm):
    import json

    summary = json.loads((trained_rm / "summary.json").read_text())
    assert summary["objective"] == "reward"
    assert summary["pairwise_accuracy_after"] == 1.0 > summary["pairwise_accuracy_before"]
    first = json.loads((trained_rm / "metrics.jsonl").read_text().splitlines()[0])
    assert {"accuracy", "margin", "mean_reward"} <= set(first)


def test_margin_column_enters_the_loss(gpt2_dir, tmp_path):
    import json

    rows = [dict(p, margin=3.0) for p in PAIRS]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "run"
    assert run(f"model={gpt2_dir}", "objective=reward", f"data.train={data}", f"output_dir={out}", "train.steps=1",
               "train.batch_size=6", "reward.margin=true") == 0
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    # -log σ(d - 3) at d ≈ 0 (fresh head) is about 3.05, far above ln 2.
    assert first["loss"] > 2.5


def test_reward_with_prompt_tuning_exits_2(gpt2_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    assert run(f"model={gpt2_dir}", "objective=reward", "method=prompt_tuning", f"data.train={data}",
               f"output_dir={tmp_path / 'run'}") == 2
    assert "method=full or method=freeze or method=lora or method=qlora" in capsys.readouterr().err


def test_a_causal_lm_folder_is_not_a_reward_model(gpt2_dir):
    from lmtune.errors import InputError
    from lmtune.objectives.reward import load_reward_model

    with pytest.raises(InputError, match="is not a reward model"):
        load_reward_model(gpt2_dir)
