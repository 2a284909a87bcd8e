"""Padding and last-token lookup: the one helper every collate function and head uses."""

import torch

from lmtune.data.batching import last_token_index, pad_batch, pad_rows
from lmtune.data.examples import IGNORE
from lmtune.data.packing import collate_packed


def test_right_padding_keeps_each_row_and_marks_it():
    values, mask = pad_rows([[5, 6], [7], [8, 9, 10]], value=0)
    assert values.tolist() == [[5, 6, 0], [7, 0, 0], [8, 9, 10]]
    assert mask.tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1]]
    assert values.dtype == mask.dtype == torch.long


def test_left_padding_puts_the_rows_at_the_end():
    values, mask = pad_rows([[5, 6], [7], [8, 9, 10]], value=-1, left=True)
    assert values.tolist() == [[-1, 5, 6], [-1, -1, 7], [8, 9, 10]]
    assert mask.tolist() == [[0, 1, 1], [0, 0, 1], [1, 1, 1]]


def test_min_width_lets_empty_rows_stack():
    values, mask = pad_rows([[], []], value=3, min_width=1)
    assert values.tolist() == [[3], [3]] and mask.tolist() == [[0], [0]]


def test_last_token_index_is_the_last_real_position_for_either_padding():
    _, right = pad_rows([[1, 2], [3], [4, 5, 6]], 0)
    _, left = pad_rows([[1, 2], [3], [4, 5, 6]], 0, left=True)
    assert last_token_index(right).tolist() == [1, 0, 2]
    assert last_token_index(left).tolist() == [2, 2, 2]


def test_pad_batch_labels_padding_as_ignored_even_when_pad_equals_eos():
    batch = pad_batch([{"input_ids": [1, 2, 0], "labels": [IGNORE, 2, 0]},
                       {"input_ids": [1], "labels": [IGNORE]}], pad_id=0)
    assert batch["labels"].tolist() == [[IGNORE, 2, 0], [IGNORE, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["num_loss_tokens"] == 2


def test_packed_padding_is_a_segment_of_its_own():
    rows = [{"input_ids": [1, 2, 3], "labels": [IGNORE, 2, 3], "position_ids": [0, 1, 0]},
            {"input_ids": [4], "labels": [IGNORE], "position_ids": [0]}]
    batch = collate_packed(rows, pad_id=9)
    assert batch["position_ids"].tolist() == [[0, 1, 0], [0, 0, 1]]
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
