import gzip
import json
import os

import numpy as np
import pytest
import torch

from longreach.data import (
    BatchLoader,
    PackedSequences,
    build_token_cache,
    byte_tokenizer,
    eval_batches,
    get_synthetic_task,
    iter_documents,
    register_synthetic_task,
    source_fingerprint,
)
from longreach.data import token_cache as token_cache_module
from longreach.data.synthetic import IGNORE_INDEX
from longreach.data.token_cache import is_held_out

EOS = 257


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def write_jsonl(path, texts, field="text"):
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({field: text, "id": 0}) + "\n")
    return path


def docs(n, prefix="doc"):
    return [f"{prefix} {i}: " + "lorem ipsum " * (i % 5 + 1) for i in range(n)]


def split_documents(tokens, tokenizer):
    """Decode an eos-separated token stream back into its documents."""
    out, start = [], 0
    tokens = np.asarray(tokens)
    for end in np.flatnonzero(tokens == tokenizer.eos_token_id):
        out.append(tokenizer.decode(tokens[start:end].tolist()))
        start = end + 1
    assert start == len(tokens), "stream must end with eos"
    return out


# ---------------------------------------------------------------- corpora


def test_txt_jsonl_and_gz_sources(tmp_path):
    (tmp_path / "a.txt").write_text("first document\n\nwith a blank line\n", encoding="utf-8")
    assert list(iter_documents(tmp_path / "a.txt")) == ["first document\n\nwith a blank line\n"]

    write_jsonl(tmp_path / "b.jsonl", ["one", "", "two 👋"])
    assert list(iter_documents(str(tmp_path / "b.jsonl"))) == ["one", "two 👋"]  # "" skipped

    write_jsonl(tmp_path / "c.jsonl", ["x", "y"], field="content")
    assert list(iter_documents(tmp_path / "c.jsonl", text_field="content")) == ["x", "y"]
    with pytest.raises(ValueError, match=r"c\.jsonl:1: no field 'text'"):
        list(iter_documents(tmp_path / "c.jsonl"))

    with gzip.open(tmp_path / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "zipped"}) + "\n")
    assert list(iter_documents(tmp_path / "d.jsonl.gz")) == ["zipped"]


def test_parquet_source(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = [f"row {i}" for i in range(2500)]  # several read batches
    pq.write_table(pa.table({"text": texts, "n": list(range(2500))}), tmp_path / "t.parquet")
    assert list(iter_documents(tmp_path / "t.parquet")) == texts
    with pytest.raises(ValueError, match="no column 'body'"):
        list(iter_documents(tmp_path / "t.parquet", text_field="body"))


def test_folder_glob_and_list_sources(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("B")
    (tmp_path / "a.txt").write_text("A")
    write_jsonl(tmp_path / "sub" / "c.jsonl", ["C1", "C2"])
    (tmp_path / "notes.md").write_text("not a corpus file")  # unsupported: skipped in folders
    (tmp_path / ".hidden.txt").write_text("hidden")
    assert list(iter_documents(tmp_path)) == ["A", "B", "C1", "C2"]
    assert list(iter_documents(str(tmp_path / "*.txt"))) == ["A", "B"]
    assert list(iter_documents(str(tmp_path / "**" / "*.jsonl"))) == ["C1", "C2"]
    both = [tmp_path / "sub" / "c.jsonl", str(tmp_path / "a.txt")]
    assert list(iter_documents(both)) == ["C1", "C2", "A"]


def test_saved_hf_dataset_source(tmp_path):
    datasets = pytest.importorskip("datasets")
    train = datasets.Dataset.from_dict({"text": ["t1", "t2", "t3"], "label": [0, 1, 0]})
    train.save_to_disk(str(tmp_path / "ds"))
    assert list(iter_documents(tmp_path / "ds")) == ["t1", "t2", "t3"]

    valid = datasets.Dataset.from_dict({"text": ["v1"]})
    datasets.DatasetDict({"train": train, "validation": valid}).save_to_disk(str(tmp_path / "dd"))
    assert list(iter_documents(tmp_path / "dd")) == ["t1", "t2", "t3"]

    datasets.DatasetDict({"validation": valid}).save_to_disk(str(tmp_path / "nt"))
    with pytest.raises(ValueError, match=r"no 'train' split \(splits: \['validation'\]\)"):
        list(iter_documents(tmp_path / "nt"))


def test_builtin_corpus_is_large_english_text():
    documents = list(iter_documents("builtin"))
    assert len(documents) == 1189  # chapters of the King James Bible
    assert sum(len(d.encode("utf-8")) for d in documents) > 3_000_000
    assert documents[0].startswith("Genesis 1\n\n1 In the beginning God created the heaven")


def test_source_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        iter_documents(tmp_path / "missing.jsonl")
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unsupported extension"):
        iter_documents(tmp_path / "data.csv")
    with pytest.raises(ValueError, match="matches no files"):
        iter_documents(str(tmp_path / "*.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no supported files"):
        iter_documents(tmp_path / "empty")
    write_jsonl(tmp_path / "blank.jsonl", ["", ""])
    with pytest.raises(ValueError, match=r"blank\.jsonl.*no \(non-empty\) documents"):
        list(iter_documents(tmp_path / "blank.jsonl"))
    with pytest.raises(ValueError, match="empty list"):
        iter_documents([])


def test_source_fingerprint_tracks_files(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", ["one"])
    first = source_fingerprint(path)
    assert source_fingerprint(str(path)) == first
    write_jsonl(path, ["one changed"])
    assert source_fingerprint(path) != first
    before_add = source_fingerprint(tmp_path)
    write_jsonl(tmp_path / "b.jsonl", ["two"])
    assert source_fingerprint(tmp_path) != before_add


# ---------------------------------------------------------------- token cache


def test_cache_builds_then_reuses_without_tokenizing(tmp_path, tok, monkeypatch):
    source = write_jsonl(tmp_path / "c.jsonl", docs(50))
    first = build_token_cache(source, tok, cache_dir=tmp_path / "cache", progress=False)
    assert not first.hit
    assert first.train.dtype == np.uint16 and not first.train.flags.writeable
    assert isinstance(first.train, np.memmap)
    assert {p.name for p in first.path.iterdir()} == {"train.bin", "val.bin", "meta.json"}
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.path.name]  # no temp left

    def must_not_run(*args, **kwargs):
        raise AssertionError("a cache hit must not read or tokenize the corpus")

    monkeypatch.setattr(token_cache_module, "plain_text_encoder", must_not_run)
    monkeypatch.setattr(token_cache_module, "iter_documents", must_not_run)
    second = build_token_cache(source, tok, cache_dir=tmp_path / "cache", progress=False)
    assert second.hit and second.path == first.path
    np.testing.assert_array_equal(second.train, first.train)
    np.testing.assert_array_equal(second.val, first.val)


def test_cache_default_dir_from_env(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("LONGREACH_CACHE", str(tmp_path / "env-cache"))
    cache = build_token_cache(write_jsonl(tmp_path / "c.jsonl", docs(3)), tok, progress=False)
    assert cache.path.parent == tmp_path / "env-cache"


def test_cache_key_changes_with_file_and_settings(tmp_path, tok):
    source = write_jsonl(tmp_path / "c.jsonl", docs(20))
    cache_dir = tmp_path / "cache"
    a = build_token_cache(source, tok, cache_dir=cache_dir, progress=False)
    b = build_token_cache(source, tok, cache_dir=cache_dir, val_fraction=0.2, progress=False)
    assert b.path != a.path and not b.hit
    write_jsonl(source, docs(20, prefix="changed"))
    os.utime(source, ns=(1, 1))  # a different mtime even on coarse-clock filesystems
    c = build_token_cache(source, tok, cache_dir=cache_dir, progress=False)
    assert c.path != a.path and not c.hit
    assert split_documents(c.train, tok)[0].startswith("changed 0")


def test_val_split_is_deterministic_disjoint_and_complete(tmp_path, tok):
    texts = docs(40)
    source = write_jsonl(tmp_path / "c.jsonl", texts)
    cache = build_token_cache(
        source, tok, cache_dir=tmp_path / "cache", val_fraction=0.1, progress=False
    )
    train_docs = split_documents(cache.train, tok)
    val_docs = split_documents(cache.val, tok)
    # Every 10th document, starting from the second, is held out.
    assert val_docs == [texts[i] for i in range(40) if i % 10 == 1]
    assert train_docs == [texts[i] for i in range(40) if i % 10 != 1]
    assert cache.meta["n_val_documents"] == 4 and cache.meta["split_by"] == "documents"

    two = build_token_cache(
        write_jsonl(tmp_path / "two.jsonl", ["first", "second"]),
        tok,
        cache_dir=tmp_path / "cache",
        val_fraction=0.01,
        progress=False,
    )
    assert split_documents(two.val, tok) == ["second"]  # at least one held-out document


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.3, 0.5, 0.9])
def test_held_out_share_follows_val_fraction(fraction):
    held = [is_held_out(i, fraction) for i in range(2000)]
    assert not held[0] and held[1]
    assert abs(sum(held) / 2000 - fraction) < 0.002
    assert not any(is_held_out(i, 0.0) for i in range(100))


def test_single_document_is_split_by_tokens(tmp_path, tok):
    text = "a single long document " * 50
    (tmp_path / "one.txt").write_text(text)
    cache = build_token_cache(
        tmp_path / "one.txt", tok, cache_dir=tmp_path / "c", val_fraction=0.1, progress=False
    )
    stream = np.concatenate([cache.train, cache.val])
    np.testing.assert_array_equal(stream, list(text.encode()) + [EOS])
    assert len(cache.val) == round(len(stream) * 0.1)
    assert cache.meta["split_by"] == "tokens"


def test_long_documents_are_encoded_in_pieces(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(token_cache_module, "ENCODE_PIECE_CHARS", 30)
    monkeypatch.setattr(token_cache_module, "BATCH_CHARS", 50)  # pieces of a document span batches
    texts = ["".join(f"line {i} of doc {d}\n" for i in range(12)) for d in range(5)] + ["short"]
    cache = build_token_cache(
        write_jsonl(tmp_path / "long.jsonl", texts), tok, cache_dir=tmp_path / "c",
        val_fraction=0.2, progress=False,
    )
    assert split_documents(cache.train, tok) == [texts[i] for i in (0, 2, 3, 4, 5)]
    assert split_documents(cache.val, tok) == [texts[1]]
    assert cache.meta["n_documents"] == 6 and cache.meta["n_val_documents"] == 1


def test_builtin_cache_with_byte_tokenizer(tmp_path, tok):
    cache = build_token_cache("builtin", tok, cache_dir=tmp_path, progress=False)
    assert len(cache.train) > 3_000_000 and cache.meta["n_val_documents"] == 12
    assert tok.decode(cache.train[:9].tolist()) == "Genesis 1"
    assert cache.train[-1] == EOS and cache.val[-1] == EOS


def test_literal_special_token_text_is_not_a_separator(tmp_path, tok):
    source = write_jsonl(tmp_path / "c.jsonl", ["a<eos>b"])
    cache = build_token_cache(
        source, tok, cache_dir=tmp_path / "c", val_fraction=0.0, progress=False
    )
    np.testing.assert_array_equal(cache.train, list(b"a<eos>b") + [EOS])


def test_cache_errors(tmp_path, tok):
    empty = write_jsonl(tmp_path / "empty.jsonl", [""])
    with pytest.raises(ValueError, match="empty.jsonl"):
        build_token_cache(empty, tok, cache_dir=tmp_path / "c", progress=False)
    assert not any((tmp_path / "c").iterdir())  # the failed build left nothing behind
    with pytest.raises(ValueError, match="val_fraction"):
        build_token_cache(tmp_path, tok, cache_dir=tmp_path / "c", val_fraction=1.0)


# ---------------------------------------------------------------- packing and batches


def test_packed_sequences():
    tokens = np.arange(103, dtype=np.uint16)
    seqs = PackedSequences(tokens, 10)
    assert len(seqs) == 10 and seqs.seq_len == 10
    np.testing.assert_array_equal(seqs[3], np.arange(30, 40))
    assert seqs[3].dtype == np.int64
    np.testing.assert_array_equal(seqs.gather([9, 0]), [np.arange(90, 100), np.arange(0, 10)])
    with pytest.raises(ValueError, match="7 tokens, need at least seq_len=10"):
        PackedSequences(np.arange(7), 10)
    with pytest.raises(ValueError, match="seq_len"):
        PackedSequences(tokens, 0)


def take(loader, n):
    return [next(loader) for _ in range(n)]


def assert_same_batches(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])


def row_ids(batch, seq_len):
    # With tokens = arange, a row's first token identifies its sequence index.
    return (batch["input_ids"][:, 0] // seq_len).tolist()


def test_loader_epochs_are_seeded_permutations():
    seqs = PackedSequences(np.arange(32 * 8), 8)
    loader = BatchLoader(seqs, 4, seed=3)
    batches = take(loader, 16)  # two epochs of 8 steps
    for b in batches:
        assert b["input_ids"].dtype == torch.long and b["input_ids"].shape == (4, 8)
        assert torch.equal(b["labels"], b["input_ids"])
    epoch0 = [i for b in batches[:8] for i in row_ids(b, 8)]
    epoch1 = [i for b in batches[8:] for i in row_ids(b, 8)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(32))
    assert epoch0 == np.random.default_rng([3, 0]).permutation(32).tolist()
    assert epoch0 != epoch1
    assert_same_batches(batches, take(BatchLoader(seqs, 4, seed=3), 16))
    other = take(BatchLoader(seqs, 4, seed=4), 1)[0]
    assert not torch.equal(other["input_ids"], batches[0]["input_ids"])


def test_loader_resume_matches_uninterrupted_run(tok):
    seqs = PackedSequences(np.arange(10 * 64) % 250, 64)  # 10 sequences: steps cross epochs
    synthetic = {"task": "copy", "fraction": 0.5, "max_length": 10}
    original = BatchLoader(seqs, 3, seed=1, synthetic=synthetic, tokenizer=tok)
    take(original, 5)
    state = json.loads(json.dumps(original.state_dict()))
    expected = take(original, 6)
    resumed = BatchLoader(seqs, 3, seed=1, synthetic=synthetic, tokenizer=tok)
    resumed.load_state_dict(state)
    assert_same_batches(take(resumed, 6), expected)

    with pytest.raises(ValueError, match="seed"):
        BatchLoader(seqs, 3, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="num_sequences"):
        BatchLoader(PackedSequences(np.arange(11 * 64), 64), 3, seed=1).load_state_dict(state)


def test_ranks_split_the_global_batch():
    seqs = PackedSequences(np.arange(64 * 4), 4)
    single = take(BatchLoader(seqs, 8, seed=5), 12)
    ranks = [take(BatchLoader(seqs, 4, seed=5, rank=r, world_size=2), 12) for r in range(2)]
    for step in range(12):
        r0, r1 = row_ids(ranks[0][step], 4), row_ids(ranks[1][step], 4)
        assert not set(r0) & set(r1)
        assert r0 + r1 == row_ids(single[step], 4)
    with pytest.raises(ValueError, match="rank"):
        BatchLoader(seqs, 4, rank=2, world_size=2)


def test_synthetic_mixture_fraction_and_determinism(tok):
    seqs = PackedSequences(np.arange(256 * 48) % 250, 48)
    synthetic = {"task": "copy", "fraction": 0.3, "min_length": 4, "max_length": 12}
    batches = take(BatchLoader(seqs, 16, seed=0, synthetic=synthetic, tokenizer=tok), 100)
    is_synthetic = torch.cat([(b["labels"] == IGNORE_INDEX).any(dim=1) for b in batches])
    assert 0.25 < is_synthetic.float().mean().item() < 0.35
    again = take(BatchLoader(seqs, 16, seed=0, synthetic=synthetic, tokenizer=tok), 100)
    assert_same_batches(batches, again)
    # The same global slots are replaced whatever the number of ranks.
    halves = [
        take(
            BatchLoader(seqs, 8, seed=0, rank=r, world_size=2, synthetic=synthetic, tokenizer=tok),
            3,
        )
        for r in range(2)
    ]
    for step in range(3):
        joined = torch.cat([halves[0][step]["input_ids"], halves[1][step]["input_ids"]])
        assert torch.equal(joined, batches[step]["input_ids"])
    none = take(BatchLoader(seqs, 16, synthetic={**synthetic, "fraction": 0.0}, tokenizer=tok), 5)
    assert all(torch.equal(b["labels"], b["input_ids"]) for b in none)


def test_worker_processes_give_the_same_batches(tok):
    seqs = PackedSequences(np.arange(40 * 48) % 250, 48)
    synthetic = {"task": "copy", "fraction": 0.4, "min_length": 4, "max_length": 12}
    serial = take(BatchLoader(seqs, 6, seed=2, synthetic=synthetic, tokenizer=tok), 12)
    loader = BatchLoader(seqs, 6, seed=2, synthetic=synthetic, tokenizer=tok, workers=2)
    try:
        assert_same_batches(take(loader, 5), serial[:5])
        assert loader._pending  # later batches' samples are being built ahead
        state = loader.state_dict()
        assert_same_batches(take(loader, 7), serial[5:])
        loader.load_state_dict(state)  # back in time (a step that was abandoned): still exact
        assert_same_batches(take(loader, 7), serial[5:])
    finally:
        loader.close()
    assert loader._pool is None and not loader._pending
    with pytest.raises(ValueError, match="workers"):
        BatchLoader(seqs, 6, workers=-1)


def test_copy_task_labels(tok):
    copy = get_synthetic_task("copy")
    rng = np.random.default_rng(0)
    for _ in range(20):
        input_ids, labels = copy(rng, 64, tok, min_length=5, max_length=20)
        assert input_ids.shape == labels.shape == (64,) and input_ids.dtype == np.int64
        scored = np.flatnonzero(labels != IGNORE_INDEX)
        assert len(scored) and np.all(np.diff(scored) == 1)  # one contiguous repeat
        np.testing.assert_array_equal(labels[scored], input_ids[scored])
        text = tok.decode(input_ids[: scored[-1] + 1].tolist())
        original, repeat = text.split("\nRepeat: ")
        assert original == repeat == tok.decode(labels[scored].tolist())
        assert 5 <= len(original) <= 20 and original.isalnum()
        assert input_ids[scored[-1] + 1] == EOS
        assert np.all(input_ids[scored[-1] + 2 :] == tok.pad_token_id)
    # Too long for seq_len: the string is cut so that both copies fit.
    input_ids, labels = copy(rng, 24, tok, min_length=50, max_length=50)
    assert (labels != IGNORE_INDEX).sum() == (24 - len("\nRepeat: ") - 1) // 2
    with pytest.raises(ValueError, match="too short"):
        copy(rng, 8, tok)


def test_custom_task_registration_and_errors(tok):
    @register_synthetic_task("test_constant")
    def constant(rng, seq_len, tokenizer, *, value=7):
        return np.full(seq_len, value, np.int64), np.full(seq_len, value, np.int64)

    assert get_synthetic_task("test_constant") is constant
    seqs = PackedSequences(np.arange(40), 8)
    batch = next(
        BatchLoader(
            seqs, 2, synthetic={"task": "test_constant", "fraction": 1.0, "value": 3}, tokenizer=tok
        )
    )
    assert torch.all(batch["input_ids"] == 3)

    with pytest.raises(ValueError, match=r"unknown synthetic task 'nope'.*'copy'"):
        get_synthetic_task("nope")
    with pytest.raises(ValueError, match="unknown synthetic task"):
        BatchLoader(seqs, 2, synthetic={"task": "nope", "fraction": 0.1}, tokenizer=tok)
    with pytest.raises(ValueError, match="already registered"):
        register_synthetic_task("copy")(constant)
    with pytest.raises(ValueError, match="rejected options"):
        BatchLoader(
            seqs, 2, synthetic={"task": "copy", "fraction": 0.1, "colour": 1}, tokenizer=tok
        )
    with pytest.raises(ValueError, match="needs the tokenizer"):
        BatchLoader(seqs, 2, synthetic={"task": "copy", "fraction": 0.1})
    with pytest.raises(ValueError, match="'task' and 'fraction'"):
        BatchLoader(seqs, 2, synthetic={"task": "copy"}, tokenizer=tok)


def test_eval_batches_are_the_first_sequences_in_order():
    seqs = PackedSequences(np.arange(10 * 4), 4)
    batches = eval_batches(seqs, 3, 2)
    assert [row_ids(b, 4) for b in batches] == [[0, 1, 2], [3, 4, 5]]
    assert torch.equal(batches[0]["labels"], batches[0]["input_ids"])
    short = eval_batches(seqs, 4, 5)  # only 10 sequences: the last batch is partial
    assert [row_ids(b, 4) for b in short] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_synthetic_loss_weight_marks_synthetic_rows(tok):
    seqs = PackedSequences(np.arange(256 * 48) % 250, 48)
    synthetic = {"task": "copy", "fraction": 0.5, "min_length": 4, "max_length": 12}
    plain = take(BatchLoader(seqs, 16, seed=0, synthetic=synthetic, tokenizer=tok), 5)
    assert all("loss_weights" not in b for b in plain)  # weight 1: batches as before
    weighted = take(
        BatchLoader(seqs, 16, seed=0, synthetic={**synthetic, "loss_weight": 8}, tokenizer=tok), 5
    )
    for a, b in zip(plain, weighted):
        assert torch.equal(a["input_ids"], b["input_ids"])  # same data, only weights added
        rows = (b["labels"] == IGNORE_INDEX).any(dim=1)
        expected = torch.where(rows, 8.0, 1.0)[:, None].expand_as(b["loss_weights"])
        assert torch.equal(b["loss_weights"], expected)
    for bad in (0, -1, "x", True):
        with pytest.raises(ValueError, match="loss_weight"):
            BatchLoader(seqs, 4, synthetic={**synthetic, "loss_weight": bad}, tokenizer=tok)


def test_fast_encode_matches_the_tokenizer(tok, tmp_path):
    from longreach.data.synthetic import _byte_layout, encode

    texts = ["", "plain text.", "h\u00e9llo\n\u4e2d\u6587 \U0001f600", " lead and trail "]
    assert _byte_layout(tok) is not None  # the byte tokenizer takes the fast path
    for text in texts:
        for special in (True, False):
            assert encode(tok, text, add_special_tokens=special) == tok.encode(
                text, add_special_tokens=special)

    class Shifted:  # not byte-level: ids are bytes + 1, so the tokenizer itself is asked
        def encode(self, text, add_special_tokens=True):
            return [b + 1 for b in text.encode("utf-8")]

    shifted = Shifted()
    assert _byte_layout(shifted) is None
    assert encode(shifted, "ab") == [98, 99]
