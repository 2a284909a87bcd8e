"""lmtune compile / extract-links: logits equal the rank-K SVD of the graph's matrix, errors agree, links round-trip.

The oracle for the matrix and its SVD is numpy, computed here from the links directly; the
model's logits come from ``transformers``' own forward pass on the folder lmtune wrote.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SENTENCES, write_lines
from lmtune.cli import main
from lmtune.compile.graph import Link, merge_links, read_links, write_links
from lmtune.errors import InputError

WORDS = ["ant", "bee", "cat", "dog", "egg", "fox", "gnu", "hen", "owl", "pig", "rat", "yak", ".", "?"]
SMOOTHING = 0.05


def random_links(seed: int = 0, n: int = 70) -> list[Link]:
    rng = random.Random(seed)
    nodes = WORDS + ["<bos>"]
    pairs = {(rng.choice(nodes), rng.choice(nodes)) for _ in range(n)}
    return [Link(s, t, round(rng.uniform(0.5, 5.0), 3)) for s, t in sorted(pairs)]


def oracle_matrix(links: list[Link], vocab: dict[str, int], smoothing: float = SMOOTHING) -> np.ndarray:
    """Centred log-probabilities, written independently of lmtune.compile.matrix."""
    v = len(vocab)
    w = np.zeros((v, v))
    for link in links:
        w[vocab[link.source], vocab[link.target]] += link.weight
    p = np.full((v, v), 1.0 / v)
    for i in range(v):
        if w[i].sum() > 0:
            p[i] = (1 - smoothing) * w[i] / w[i].sum() + smoothing / v
    logp = np.log(p)
    return logp - logp.mean(axis=1, keepdims=True)


def truncated(m: np.ndarray, k: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(m)
    return (u[:, :k] * s[:k]) @ vt[:k]


def load_plain(folder: Path):
    """The folder through plain transformers, no lmtune code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    vocab = dict(tok.get_vocab())
    vocab["<bos>"] = tok.bos_token_id
    return model.eval(), tok, vocab


def all_logits(model, vocab_size: int, length: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of random sequences (every position, so position embeddings are exercised)."""
    ids = torch.randint(0, vocab_size, (vocab_size, length), generator=torch.Generator().manual_seed(seed))
    ids[:, 2] = torch.arange(vocab_size)  # every token appears at least once
    with torch.no_grad():
        return ids, model(input_ids=ids).logits.double()  # (V, T), (V, T, V)


@pytest.fixture(scope="module")
def graph_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("graph") / "links.tsv"
    write_links(path, random_links())
    return path


@pytest.fixture(scope="module")
def rank5(graph_file, tmp_path_factory) -> Path:
    import lmtune.compile

    out = tmp_path_factory.mktemp("c") / "rank5"
    lmtune.compile(graph_file, out=out, rank=5, smoothing=SMOOTHING, quiet=True)
    return out


def test_logits_equal_rank_k_svd_through_transformers_forward(rank5, graph_file):
    model, _, vocab = load_plain(rank5)
    target = truncated(oracle_matrix(read_links(graph_file), vocab), 5)  # (V, V)
    ids, logits = all_logits(model, len(vocab))
    # Exactly M_K, no per-row constant: the compiled matrix is already row-centred.
    assert np.abs(logits.numpy() - target[ids.numpy()]).max() < 1e-5


def test_full_rank_reproduces_the_graph_distribution(graph_file, tmp_path):
    import lmtune.compile

    links = read_links(graph_file)
    out = tmp_path / "full"
    compiled = lmtune.compile(graph_file, out=out, rank=len(WORDS) + 1, quiet=True)
    model, _, vocab = load_plain(out)
    ids, logits = all_logits(model, len(vocab))
    m = oracle_matrix(links, vocab)
    assert np.abs(logits.numpy() - m[ids.numpy()]).max() < 1e-5
    # Softmax ignores a per-row constant, so log_softmax(logits) is log P itself.
    v = len(vocab)
    w = np.zeros((v, v))
    for link in links:
        w[vocab[link.source], vocab[link.target]] += link.weight
    rows = w.sum(1) > 0
    logp = np.log((1 - SMOOTHING) * w[rows] / w[rows].sum(1, keepdims=True) + SMOOTHING / v)
    got = {int(i): torch.log_softmax(row, -1).numpy() for i, row in zip(ids[:, 2], logits[:, 2])}
    assert np.abs(np.stack([got[i] for i in np.flatnonzero(rows)]) - logp).max() < 1e-5
    assert compiled.report["residual_frobenius"] < 1e-9


def test_reported_errors_agree_and_equal_discarded_singular_values(rank5, graph_file):
    report = json.loads((rank5 / "compile.json").read_text())
    model, _, vocab = load_plain(rank5)
    m = oracle_matrix(read_links(graph_file), vocab)
    s = np.linalg.svd(m, compute_uv=False)
    discarded = float(np.sqrt((s[5:] ** 2).sum()))
    assert report["residual_frobenius"] == pytest.approx(discarded, rel=1e-9)
    assert report["discarded_singular_values_root"] == pytest.approx(discarded, rel=1e-9)
    # ... and it is the distance of the model's own logits from the graph's matrix.
    ids = torch.arange(len(vocab)).unsqueeze(1)  # (V, 1): one row per token
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, 0].double().numpy()
    assert np.linalg.norm(logits - m) == pytest.approx(discarded, rel=1e-5)


def test_report_names_links_that_dominate_top_components(rank5, graph_file):
    report = json.loads((rank5 / "compile.json").read_text())
    known = {(link.source, link.target) for link in read_links(graph_file)}
    assert len(report["components"]) == 5
    for comp in report["components"]:
        assert comp["links"] and all((s, t) in known and c > 0 for s, t, c in comp["links"])


def test_compiled_folder_is_a_plain_transformers_model_with_the_graph_vocabulary(rank5):
    model, tok, vocab = load_plain(rank5)
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert sorted(w for w in vocab if w != "<bos>") == sorted(WORDS)
    assert tok("cat dog .", add_special_tokens=False)["input_ids"] == [vocab["cat"], vocab["dog"], vocab["."]]
    block = model.transformer.h[0]
    assert not block.attn.c_proj.weight.any() and not block.mlp.c_proj.weight.any()


def test_from_corpus_counts_bigrams_framed_by_bos(tmp_path):
    import lmtune.compile

    corpus = write_lines(tmp_path / "c.txt", SENTENCES)
    compiled = lmtune.compile(from_corpus=corpus, out=tmp_path / "m", rank=4, quiet=True)
    counts: dict[tuple[str, str], float] = {}
    for line in SENTENCES:
        words = ["<bos>", *line.split(), "<bos>"]
        for a, b in zip(words[:-1], words[1:]):
            counts[(a, b)] = counts.get((a, b), 0) + 1
    got = {(link.source, link.target): link.weight for link in read_links(tmp_path / "m" / "links.tsv")}
    assert got == counts
    assert compiled.report["links"] == len(counts)


def test_extract_finds_the_link_the_graph_lacks_with_its_probability(graph_file, tmp_path):
    import lmtune.compile

    links = read_links(graph_file)
    v = len(WORDS) + 1
    out = tmp_path / "full"
    lmtune.compile(links, out=out, rank=v, quiet=True)
    _, _, vocab = load_plain(out)
    m = oracle_matrix(links, vocab)
    p = np.exp(m) / np.exp(m).sum(1, keepdims=True)  # the graph's smoothed next-token probabilities
    strongest = max(links, key=lambda link: p[vocab[link.source], vocab[link.target]])
    partial = tmp_path / "partial.jsonl"
    write_links(partial, [link for link in links if link != strongest])
    text = write_lines(tmp_path / "text.txt", [f"{strongest.source} {strongest.target}".replace("<bos>", "").strip()])
    for data in (None, text):  # a compiled model's association is context-free: probes and text agree
        found = lmtune.compile.extract_links(out, tmp_path / f"new{data is None}.tsv", top=1, min_prob=0.01,
                                       graph=partial, data=data, quiet=True)
        assert [(f.source, f.target) for f in found] == [(strongest.source, strongest.target)]
        assert found[0].weight == pytest.approx(p[vocab[strongest.source], vocab[strongest.target]], abs=1e-5)


def test_extracted_links_round_trip_through_both_formats(rank5, tmp_path):
    import lmtune.compile

    found = lmtune.compile.extract_links(rank5, tmp_path / "a.tsv", top=20, min_prob=0.001, quiet=True)
    assert found
    for name in ("a.tsv", "b.jsonl"):
        write_links(tmp_path / name, found)
        back = read_links(tmp_path / name)
        assert [(b.source, b.target, b.weight) for b in back] == [(f.source, f.target, f.weight) for f in found]


def test_merge_scales_probabilities_by_the_source_out_weight():
    graph = [Link("cat", "runs", 3.0), Link("cat", ".", 1.0), Link("dog", "runs", 2.0)]
    merged, added = merge_links(graph, [Link("cat", "sits", 0.5), Link("cat", "runs", 0.9), Link("owl", ".", 0.5)])
    assert [(a.source, a.target, a.weight) for a in added] == [("cat", "sits", 2.0), ("owl", ".", 1.5)]
    assert len(merged) == 5 and merged[:3] == graph  # existing links unchanged, not added to


def test_extract_links_cli_merges_into_the_graph_file(rank5, graph_file, tmp_path):
    target = tmp_path / "g.tsv"
    target.write_text(graph_file.read_text())
    code = main(["extract-links", "--model", str(rank5), "--out", str(tmp_path / "new.tsv"), "--top", "3",
                 "--min-prob", "0.001", "--merge-into", str(target)])
    assert code == 0
    new = read_links(tmp_path / "new.tsv")
    assert len(new) == 3
    assert len(read_links(target)) == len(read_links(graph_file)) + 3


@pytest.mark.parametrize("content, message", [
    ("cat\tdog\t-1\n", "line 1: weight '-1' must be a positive"),
    ("source\ttarget\tweight\ncat\tdog\t1\ncat\tdog\n", "line 3: expected 3 tab-separated fields"),
    ("# only a comment\n\n", "the graph is empty"),
    ("cat\tdog\tlots\n", "line 1: weight must be a number"),
    ("New York\tdog\t1\n", "line 1: source 'New York' contains whitespace"),
])
def test_bad_link_files_name_the_line(tmp_path, content, message):
    path = tmp_path / "bad.tsv"
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        read_links(path)


def test_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"source": "cat", "target": "dog", "weight": 1}\n{"source": "cat", "weight": 1}\n')
    with pytest.raises(InputError, match=r"bad.jsonl line 2: missing field\(s\) target"):
        read_links(path)


def _compile_fails(args: list[str], out: Path, capsys) -> str:
    assert main(["compile", *args, "--out", str(out)]) == 2
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))  # nothing half-written
    return capsys.readouterr().err


def test_unknown_token_in_a_given_vocabulary_names_the_line(tmp_path, capsys):
    from lmtune.models.loading import shipped_model_dir

    graph = tmp_path / "g.tsv"
    graph.write_text("the\tcat\t2\ncat\txylophone\t1\n")
    err = _compile_fails(["--graph", str(graph), "--vocab", str(shipped_model_dir())], tmp_path / "o", capsys)
    assert "g.tsv line 2: token 'xylophone' is not in the vocabulary of" in err


def test_rank_larger_than_the_vocabulary_names_the_value(graph_file, tmp_path, capsys):
    err = _compile_fails(["--graph", str(graph_file), "--rank", "99"], tmp_path / "o", capsys)
    assert "rank=99 must be between 1 and the vocabulary size 15" in err


def test_negative_weight_and_unknown_key_exit_2(tmp_path, capsys):
    graph = tmp_path / "g.tsv"
    graph.write_text("the\tcat\t2\ncat\t.\t-0.5\n")
    assert "g.tsv line 2: weight '-0.5'" in _compile_fails(["--graph", str(graph)], tmp_path / "o", capsys)
    graph.write_text("the\tcat\t2\n")
    assert "key one of smoothing" in _compile_fails(["--graph", str(graph), "lr=3"], tmp_path / "o", capsys)
    assert "smoothing=0.0 must be in (0, 1]" in _compile_fails(["--graph", str(graph), "smoothing=0"],
                                                                  tmp_path / "o", capsys)


def test_compile_never_writes_over_an_existing_folder(rank5, graph_file, capsys):
    before = sorted(p.name for p in rank5.iterdir())
    assert main(["compile", "--graph", str(graph_file), "--out", str(rank5)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in rank5.iterdir()) == before


def test_a_compiled_model_fine_tunes_like_any_other(rank5, tmp_path):
    text = write_lines(tmp_path / "t.txt", ["cat dog .", "ant bee ?", "owl hen pig ."] * 4)
    run = tmp_path / "run"
    assert main(["train", f"model={rank5}", f"data.train={text}", f"output_dir={run}", "train.steps=3",
                 "train.batch_size=4", "train.lr=1e-2"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3
    model, _, _ = load_plain(run)
    assert model.transformer.h[0].attn.c_proj.weight.any()  # the zeroed branches started learning
