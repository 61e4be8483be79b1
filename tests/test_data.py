"""Sources, the leak-free split, token packing and the resumable batch order."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath, PureWindowsPath
from pydoc_data.topics import topics

import pytest
import torch

from foundry_kernel.config import DataConfig
from foundry_kernel.data._blocks import (
    IGNORE_INDEX,
    BatchSampler,
    TokenBlocks,
    build_data,
    normalize_whitespace,
    pack_documents,
    split_documents,
)
from foundry_kernel.data._sources import (
    STDLIB_SKIP_DIRS,
    Document,
    collect_docstrings,
    corpus_fingerprint,
    load_documents,
    relative_posix,
    split_glob,
    stdlib_files,
    stdlib_root,
)
from foundry_kernel.data._tokenizer import train_bpe_tokenizer
from foundry_kernel.errors import ConfigError, DataError

N_TOPICS = len(topics)


@pytest.fixture(scope="module")
def tok():
    docs = load_documents(DataConfig(max_documents=30))
    return train_bpe_tokenizer((d.text for d in docs), 384)


@pytest.fixture(scope="module")
def docs_subset() -> list[Document]:
    """All pydoc topics plus the first stdlib modules' docstrings."""
    return load_documents(DataConfig(max_documents=N_TOPICS + 60))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))
    return path


def write_jsonl(path: Path, rows: list[object]) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    return write(path, "\n".join(lines) + "\n")


def cfg(source: str | Path, **kw) -> DataConfig:
    return DataConfig(source=str(source), **kw)


# =========================================================================== built-in sources


def test_python_docs_topics_then_docstrings(docs_subset):
    ids = [d.doc_id for d in docs_subset]
    assert ids[:N_TOPICS] == [f"pydoc:{k}" for k in sorted(topics)]
    docstring_docs = docs_subset[N_TOPICS:]
    assert len(docstring_docs) == 60
    assert all(d.doc_id.startswith("doc:") and d.doc_id.endswith(".py") for d in docstring_docs)
    assert all("\\" not in d.doc_id for d in docs_subset)
    assert all(len(d.text) >= 200 and d.prompt == "" for d in docstring_docs)
    assert len(set(ids)) == len(ids)


def test_builtin_load_is_deterministic(docs_subset):
    again = load_documents(DataConfig(max_documents=N_TOPICS + 60))
    assert again == docs_subset
    assert corpus_fingerprint(again) == corpus_fingerprint(docs_subset)


def test_max_documents_keeps_the_first_n(docs_subset):
    assert load_documents(DataConfig(max_documents=5)) == docs_subset[:5]


def test_python_stdlib_is_source_code():
    docs = load_documents(DataConfig(source="builtin:python-stdlib", max_documents=3))
    assert len(docs) == 3
    assert all(d.doc_id.startswith("src:") for d in docs)
    assert any("import " in d.text or "def " in d.text for d in docs)


def test_stdlib_walk_skips_tests_and_tools():
    files = stdlib_files(str(stdlib_root()))
    assert list(files) == sorted(files)
    assert "json/decoder.py" in files
    for rel in files:
        assert not set(PurePosixPath(rel).parts[:-1]) & STDLIB_SKIP_DIRS, rel


def test_stdlib_walk_on_a_fake_tree(tmp_path):
    for rel in ("b.py", "a/x.py", "a/test/t.py", "idlelib/i.py", "site-packages/s.py", "n.txt"):
        write(tmp_path.joinpath(*rel.split("/")), "x = 1\n")
    assert stdlib_files(str(tmp_path)) == ("a/x.py", "b.py")


def test_docstrings_are_collected_in_source_order():
    src = '''"""Module doc."""
class A:
    """Class doc."""
    def f(self):
        """Method doc."""
if True:
    def g():
        """Nested in if."""
try:
    pass
except ImportError:
    async def h():
        """In a handler."""
x = "not a docstring"
'''
    import ast

    found = collect_docstrings(ast.parse(src))
    assert found == ["Module doc.", "Class doc.", "Method doc.", "Nested in if.", "In a handler."]


# =========================================================================== local files


def test_text_file_and_crlf(tmp_path):
    path = write(tmp_path / "notes.txt", "line one\r\nline two\r\n")
    (doc,) = load_documents(cfg(path))
    assert doc == Document("file:notes.txt", "line one\nline two\n")


def test_glob_absolute_and_relative(tmp_path, monkeypatch):
    write(tmp_path / "data" / "b.md", "bee")
    write(tmp_path / "data" / "sub" / "a.md", "ay")
    write(tmp_path / "data" / "skip.txt", "no")
    docs = load_documents(cfg(tmp_path / "data" / "**" / "*.md"))
    assert [(d.doc_id, d.text) for d in docs] == [("file:b.md", "bee"), ("file:sub/a.md", "ay")]
    monkeypatch.chdir(tmp_path)
    relative = load_documents(cfg("data/**/*.md"))
    assert relative == docs  # ids are relative to the glob's folder: same corpus, same ids


def test_glob_matching_nothing_names_the_pattern(tmp_path):
    pattern = str(tmp_path / "*.nothing")
    with pytest.raises(DataError, match=r"\*\.nothing"):
        load_documents(cfg(pattern))


def test_file_that_is_not_utf8_is_named(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt"):
        load_documents(cfg(bad))


def test_missing_source_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="Accepted") as info:
        load_documents(cfg(tmp_path / "nope.txt"))
    assert info.value.field == "data.source"


def test_plain_folder_is_refused_with_a_hint(tmp_path):
    write(tmp_path / "d" / "a.txt", "x")
    with pytest.raises(ConfigError, match="glob") as info:
        load_documents(cfg(tmp_path / "d"))
    assert info.value.field == "data.source"


def test_unknown_builtin_is_a_config_error():
    bad = DataConfig.model_construct(**{**DataConfig().model_dump(), "source": "builtin:nope"})
    with pytest.raises(ConfigError, match="python-docs") as info:
        load_documents(bad)
    assert info.value.field == "data.source"


def test_windows_paths_become_posix_ids():
    base, rest = split_glob(PureWindowsPath(r"C:\data\**\*.md"))
    assert base == PureWindowsPath(r"C:\data")
    assert rest == "**/*.md"
    assert split_glob(PureWindowsPath(r"*.txt")) == (PureWindowsPath("."), "*.txt")
    path = PureWindowsPath(r"C:\data\sub dir\a.md")
    assert relative_posix(path, base) == "sub dir/a.md"
    assert split_glob(PurePosixPath("/srv/data/*.txt")) == (PurePosixPath("/srv/data"), "*.txt")


# =========================================================================== JSONL


def test_jsonl_plain_text_skips_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "one"}, "", {"text": "two", "x": 1}])
    docs = load_documents(cfg(path))
    assert docs == [Document("file:d.jsonl#1", "one"), Document("file:d.jsonl#3", "two")]


def test_jsonl_prompt_completion(tmp_path):
    rows = [{"q": "Question?", "a": "Answer."}]
    path = write_jsonl(tmp_path / "pc.jsonl", rows)
    (doc,) = load_documents(cfg(path, prompt_field="q", completion_field="a"))
    assert (doc.prompt, doc.text) == ("Question?", "Answer.")


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ("{not json", r"line 2: not valid JSON"),
        ("[1, 2]", r"line 2: expected a JSON object, got list"),
        (
            {"body": "x", "id": 3},
            r"line 2: no field 'text' \(data.text_field\); keys present: "
            r"\['body', 'id'\]",
        ),
        ({"text": 5}, r"line 2: field 'text' \(data.text_field\) must be a string, got int"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, row, expected):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, row])
    with pytest.raises(DataError, match=expected) as info:
        load_documents(cfg(path))
    assert "bad.jsonl" in str(info.value)


def test_jsonl_missing_completion_field(tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"q": "Q", "answer": "A"}])
    with pytest.raises(DataError, match=r"line 1: no field 'a' \(data.completion_field\)"):
        load_documents(cfg(path, prompt_field="q", completion_field="a"))


def test_half_a_prompt_completion_pair_is_a_config_error(tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"q": "Q"}])
    with pytest.raises(ConfigError) as info:
        load_documents(cfg(path, prompt_field="q"))
    assert info.value.field == "data.completion_field"


# =========================================================================== HF datasets


def test_hf_dataset_folder(tmp_path):
    import datasets

    folder = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": ["alpha", "", "beta"], "n": [1, 2, 3]}).save_to_disk(
        str(folder)
    )
    docs = load_documents(cfg(folder))
    assert docs == [Document("hf:ds/train#0", "alpha"), Document("hf:ds/train#2", "beta")]


def test_hf_dataset_dict_uses_train_split_with_prompt_completion(tmp_path):
    import datasets

    split = {"p": ["P1", "P2"], "c": ["C1", "C2"]}
    dd = datasets.DatasetDict(
        {
            "test": datasets.Dataset.from_dict({"p": ["x"], "c": ["y"]}),
            "train": datasets.Dataset.from_dict(split),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    docs = load_documents(cfg(tmp_path / "dd", prompt_field="p", completion_field="c"))
    assert [(d.prompt, d.text) for d in docs] == [("P1", "C1"), ("P2", "C2")]
    assert docs[0].doc_id == "hf:dd/train#0"


def test_hf_dataset_missing_column_and_ambiguous_splits(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"body": ["x"]}).save_to_disk(str(tmp_path / "one"))
    with pytest.raises(DataError, match=r"no column 'text'.*\['body'\]"):
        load_documents(cfg(tmp_path / "one"))
    two = datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": ["x"]}) for k in ("a", "b")})
    two.save_to_disk(str(tmp_path / "two"))
    with pytest.raises(DataError, match="none is 'train'"):
        load_documents(cfg(tmp_path / "two"))


# =========================================================================== fingerprint


def test_fingerprint_tracks_ids_prompts_and_texts():
    base = [Document("a", "xy"), Document("b", "z")]
    fp = corpus_fingerprint(base)
    assert fp == corpus_fingerprint([Document("a", "xy"), Document("b", "z")])
    assert len(fp) == 64
    assert fp != corpus_fingerprint([Document("a", "x"), Document("b", "yz")])
    assert fp != corpus_fingerprint([Document("a", "y", prompt="x"), Document("b", "z")])
    assert fp != corpus_fingerprint([Document("c", "xy"), Document("b", "z")])
    assert fp != corpus_fingerprint(base[::-1])


# =========================================================================== split


def brute_force_shared(val: list[Document], train: list[Document], size: int) -> set[str]:
    """Independent check: every window of both sides, as plain Python strings."""

    def grams(doc: Document) -> set[str]:
        text = normalize_whitespace(doc.text)
        return {text[i : i + size] for i in range(len(text) - size + 1)}

    val_grams: set[str] = set().union(*(grams(d) for d in val))
    return {g for d in train for g in grams(d) & val_grams}


def test_split_on_python_docs_is_leak_free(docs_subset):
    train, val, report = split_documents(docs_subset, val_fraction=0.1, seed=0, overlap_chars=60)
    assert report.shared_chunks_after == 0
    assert report.shared_chunks_before > 0  # the naive split leaks on pydoc topics
    assert report.n_val_docs == len(val) == round(0.1 * len(docs_subset))
    assert report.n_train_docs == len(train)
    assert report.n_moved == report.n_refilled > 0
    assert report.to_dict()["overlap_chars"] == 60
    assert brute_force_shared(val, train, 60) == set()
    assert {d.doc_id for d in train}.isdisjoint(d.doc_id for d in val)
    assert sorted(train + val, key=docs_subset.index) == docs_subset


def test_split_count_matches_brute_force_on_naive_leak():
    shared = "the same long passage appears in both documents here"  # 52 chars
    docs = [Document(f"d{i}", f"unique text number {i} " * 3) for i in range(10)]
    docs += [Document("x", "intro " + shared), Document("y", shared + " outro")]
    for seed in range(6):
        train, val, report = split_documents(docs, val_fraction=0.2, seed=seed, overlap_chars=40)
        assert brute_force_shared(val, train, 40) == set()
        assert ({"x", "y"} <= {d.doc_id for d in val}) or not ({"x", "y"} & {d.doc_id for d in val})
        assert report.n_groups >= 1


def test_split_sees_through_rewrapping():
    passage = "alpha beta gamma delta epsilon zeta eta theta iota kappa"
    rewrapped = passage.replace(" ", "\n    ", 3)
    docs = [Document("a", passage), Document("b", rewrapped)]
    docs += [Document(f"u{i}", f"filler {i} " * 8) for i in range(8)]
    for seed in range(5):
        _, val, report = split_documents(docs, val_fraction=0.2, seed=seed, overlap_chars=30)
        ids = {d.doc_id for d in val}
        assert ("a" in ids) == ("b" in ids)
        assert report.n_groups == 1


def test_passage_shorter_than_overlap_does_not_tie():
    docs = [Document("a", "x" * 5 + "shared15chars!!" + "y" * 5)]
    docs += [Document("b", "p" * 5 + "shared15chars!!" + "q" * 5)]
    docs += [Document(f"u{i}", f"filler number {i}") for i in range(4)]
    *_, report = split_documents(docs, val_fraction=0.2, seed=0, overlap_chars=16)
    assert report.n_groups == 0


def test_split_is_deterministic_and_seeded(docs_subset):
    a = split_documents(docs_subset, val_fraction=0.1, seed=0, overlap_chars=60)
    b = split_documents(docs_subset, val_fraction=0.1, seed=0, overlap_chars=60)
    c = split_documents(docs_subset, val_fraction=0.1, seed=1, overlap_chars=60)
    assert a == b
    assert {d.doc_id for d in a[1]} != {d.doc_id for d in c[1]}


def test_validation_is_never_empty():
    docs = [Document(f"d{i}", f"document {i}") for i in range(3)]
    _, val, _ = split_documents(docs, val_fraction=0.01, seed=0, overlap_chars=16)
    assert len(val) == 1
    with pytest.raises(DataError, match=r"val_fraction.*max_documents"):
        split_documents(docs[:1], val_fraction=0.1, seed=0, overlap_chars=16)


def test_corpus_that_is_one_group_cannot_be_split():
    common = "every document quotes this same boilerplate sentence in full."
    docs = [Document(f"d{i}", f"{i} {common}") for i in range(5)]
    with pytest.raises(DataError, match="max_documents"):
        split_documents(docs, val_fraction=0.2, seed=0, overlap_chars=30)


def test_small_groups_overshoot_rather_than_leave_validation_empty():
    passages = [
        "alpha beta gamma delta epsilon zeta eta theta",
        "one two three four five six seven eight nine",
        "red orange yellow green blue indigo violet",
    ]
    docs = []
    for i, passage in enumerate(passages):
        docs += [Document(f"p{i}a", "a " + passage), Document(f"p{i}b", passage + " b")]
    train, val, report = split_documents(docs, val_fraction=0.1, seed=0, overlap_chars=30)
    assert len(val) == 2
    assert report.shared_chunks_after == 0
    assert brute_force_shared(val, train, 30) == set()


# =========================================================================== packing


def test_prompt_completion_labels(tmp_path, tok):
    rows = [
        {"p": "Question: what is a list?", "c": " A mutable sequence."},
        {"p": "Q2", "c": " Answer two."},
    ]
    docs = load_documents(
        cfg(write_jsonl(tmp_path / "pc.jsonl", rows), prompt_field="p", completion_field="c")
    )
    blocks = pack_documents(docs, tok, seq_len=64)
    assert blocks.input_ids.shape == (1, 64)
    expected_ids: list[int] = []
    expected_labels: list[int] = []
    for row in rows:
        p = tok.encode(row["p"], add_special_tokens=False)
        c = tok.encode(row["c"], add_special_tokens=False)
        expected_ids += [*p, *c, tok.eos_token_id]
        expected_labels += [IGNORE_INDEX] * len(p) + [*c, tok.eos_token_id]
    n = len(expected_ids)
    assert blocks.input_ids[0, :n].tolist() == expected_ids
    assert blocks.labels[0, :n].tolist() == expected_labels
    assert blocks.attention_mask[0, :n].eq(1).all()
    assert blocks.attention_mask[0, n:].eq(0).all()
    assert blocks.labels[0, n:].eq(IGNORE_INDEX).all()
    assert blocks.input_ids[0, n:].eq(tok.pad_token_id).all()
    loss_positions = [t for t in range(1, n) if expected_labels[t] != IGNORE_INDEX]
    assert blocks.num_loss_tokens() == len(loss_positions)
    decoded = tok.decode(
        [
            i
            for i, lab in zip(expected_ids, expected_labels, strict=True)
            if lab != IGNORE_INDEX and i != tok.eos_token_id
        ]
    )
    assert decoded == " A mutable sequence. Answer two."


def test_blocks_cut_the_stream_and_pad_the_last(tok, docs_subset):
    docs = docs_subset[:5]
    long = pack_documents(docs, tok, seq_len=4096)
    short = pack_documents(docs, tok, seq_len=48)
    n = long.num_tokens()
    assert short.num_tokens() == n
    assert len(short) == -(-n // 48)
    assert torch.equal(short.input_ids.flatten()[:n], long.input_ids.flatten()[:n])
    assert torch.equal(short.labels.flatten()[:n], long.labels.flatten()[:n])
    tail = short.attention_mask[-1]
    assert tail.sum() == n - 48 * (len(short) - 1)
    assert short.labels[-1][tail == 0].eq(IGNORE_INDEX).all()
    assert int((short.input_ids == tok.eos_token_id).sum()) == len(docs)
    # the first label of each block is never a target after the shift
    assert short.num_loss_tokens() == int((short.labels[:, 1:] != IGNORE_INDEX).sum())


def test_token_blocks_refuse_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        TokenBlocks(
            torch.zeros(2, 4, dtype=torch.long),
            torch.zeros(2, 4, dtype=torch.long),
            torch.zeros(2, 5, dtype=torch.long),
        )


def test_build_data_is_deterministic(tok, docs_subset):
    config = DataConfig(seq_len=64, max_documents=len(docs_subset))
    a = build_data(config, tok, seed=0, docs=docs_subset)
    b = build_data(config, tok, seed=0)  # loads the same documents itself
    c = build_data(config, tok, seed=3, docs=docs_subset)
    for blocks_a, blocks_b in ((a.train, b.train), (a.val, b.val)):
        assert torch.equal(blocks_a.input_ids, blocks_b.input_ids)
        assert torch.equal(blocks_a.labels, blocks_b.labels)
        assert torch.equal(blocks_a.attention_mask, blocks_b.attention_mask)
    assert a.report == b.report
    assert a.val_doc_ids != c.val_doc_ids
    report = a.report
    assert report["fingerprint"] == corpus_fingerprint(docs_subset)
    assert report["split"]["shared_chunks_after"] == 0
    assert report["docs"]["val"] == len(a.val_doc_ids) > 0
    assert report["blocks"] == {"train": len(a.train), "val": len(a.val)}
    assert report["tokens"]["train"] == a.train.num_tokens()
    assert report["seq_len"] == 64
    json.dumps(report)


# =========================================================================== batches


def test_sampler_resume_matches_uninterrupted_order():
    ref = BatchSampler(10, 3, seed=7)
    ref_batches = [ref.next_indices().tolist() for _ in range(12)]  # crosses 3 epochs
    first = BatchSampler(10, 3, seed=7)
    for _ in range(5):
        first.next_indices()
    state = json.loads(json.dumps(first.state_dict()))
    resumed = BatchSampler(10, 3, seed=7)
    resumed.load_state_dict(state)
    assert [resumed.next_indices().tolist() for _ in range(7)] == ref_batches[5:]
    assert resumed.epoch == ref.epoch


def test_sampler_epochs_are_permutations():
    """Each epoch visits a fresh permutation in full batches; the partial tail is left out
    (and lands in a later epoch's permutation instead)."""
    sampler = BatchSampler(10, 3, seed=0)
    assert sampler.batches_per_epoch() == 3
    epochs = []
    for _ in range(3):
        seen: list[int] = []
        for _ in range(sampler.batches_per_epoch()):
            idx = sampler.next_indices()
            assert idx.dtype == torch.long and len(idx) == 3
            seen += idx.tolist()
        assert len(set(seen)) == 9 and set(seen) <= set(range(10))
        epochs.append(seen)
    assert epochs[0] != epochs[1]
    assert BatchSampler(10, 3, seed=0).next_indices().tolist() == epochs[0][:3]


def test_sampler_refuses_foreign_state_and_tiny_data():
    sampler = BatchSampler(10, 3, seed=0)
    with pytest.raises(DataError, match="n_blocks"):
        sampler.load_state_dict({"epoch": 0, "pos": 0, "n_blocks": 11})
    sampler.load_state_dict({"epoch": 2, "pos": 3})
    assert sampler.epoch == 2
    with pytest.raises(DataError, match="batch_size"):
        BatchSampler(2, 3, seed=0)


def test_source_with_no_text_is_a_data_error(tmp_path):
    write(tmp_path / "empty.txt", "")
    with pytest.raises(DataError, match="holds no text"):
        load_documents(cfg(tmp_path / "*.txt"))
