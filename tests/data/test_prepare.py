from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import tarfile
from pathlib import Path

import numpy as np
import pytest
from tokenizers import processors

import tessera.data.prepare as prepare_module
from tessera.data.format import MANIFEST_NAME, DataError, decode_tokens, read_manifest
from tessera.data.prepare import encode_documents, prepare, prepare_command
from tessera.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, train_bpe

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Pack my box with five dozen liquor jugs!",
    "Sphinx of black quartz, judge my vow: naïve café, 日本語, 🎉.",
    "How vexingly quick daft zebras jump\nacross two lines\n",
]


def write_corpus(root: Path) -> list[tuple[str, int, str]]:
    """Input files under ROOT; returns the expected (source, doc index, text) in output order."""
    (root / "b_dir").mkdir(parents=True)
    (root / "a.txt").write_text(SENTENCES[0] * 3)
    (root / "b_dir" / "c.jsonl").write_text(
        "\n".join(json.dumps({"text": s, "id": i}) for i, s in enumerate(SENTENCES))
        + "\n\n"  # a blank line is not a document
        + json.dumps({"text": ""})  # an empty document: skipped, but keeps its index
        + "\n"
        + json.dumps({"text": "after the empty one"})
        + "\n"
    )
    (root / "b_dir" / "d.txt").write_text("")  # empty: skipped
    (root / "b_dir" / "notes.md").write_text("not matched by the default globs")
    (root / "e.txt").write_text("".join(SENTENCES) * 20)
    c = str(root / "b_dir" / "c.jsonl")
    return (
        [(str(root / "a.txt"), 0, SENTENCES[0] * 3)]
        + [(c, i, s) for i, s in enumerate(SENTENCES)]
        + [(c, 5, "after the empty one"), (str(root / "e.txt"), 0, "".join(SENTENCES) * 20)]
    )


def read_samples(output: Path) -> list[tuple[dict, np.ndarray]]:
    """(metadata, tokens) of every sample, in shard order, checking the WebDataset layout."""
    manifest = read_manifest(output)
    samples = []
    for shard in manifest.shards:
        with tarfile.open(output / shard.path) as tar:
            members = tar.getmembers()
            assert len(members) == 2 * shard.num_samples
            for i in range(shard.num_samples):
                meta_member, tokens_member = members[2 * i], members[2 * i + 1]
                assert meta_member.name == f"{i:09d}.json"
                assert tokens_member.name == f"{i:09d}.tokens"
                meta = json.loads(tar.extractfile(meta_member).read())
                tokens = decode_tokens(tar.extractfile(tokens_member).read(), manifest.dtype)
                samples.append((meta, tokens))
    return samples


def expected_tokens(tokenizer, docs: list[tuple[str, int, str]]) -> np.ndarray:
    ids: list[int] = []
    for _source, _index, text in docs:
        ids += tokenizer.encode(text) + [tokenizer.eos_id]
    return np.array(ids)


def check_manifest_matches_files(output: Path) -> None:
    manifest = read_manifest(output)
    samples = read_samples(output)
    assert manifest.num_samples == len(samples)
    assert manifest.num_tokens == sum(t.size for _, t in samples)
    for shard in manifest.shards:
        assert hashlib.sha256((output / shard.path).read_bytes()).hexdigest() == shard.sha256
    assert sorted(p.name for p in output.glob("shard-*")) == [s.path for s in manifest.shards]
    assert not list(output.glob("*.tmp"))


def test_byte_tokenizer_shards_hold_every_document_in_order(tmp_path) -> None:
    docs = write_corpus(tmp_path / "in")
    output = tmp_path / "out"
    logged: list[str] = []
    manifest = prepare([str(tmp_path / "in")], str(output), shard_bytes=200, log=logged.append)

    assert manifest == read_manifest(output)
    assert manifest.tokenizer == ByteTokenizer().info()
    assert manifest.dtype == "uint16"
    assert len(manifest.shards) >= 3
    assert [s.path for s in manifest.shards] == [
        f"shard-{i:06d}.tar" for i in range(len(manifest.shards))
    ]
    samples = read_samples(output)
    assert [(m["source"], m["doc"]) for m, _ in samples] == [(s, i) for s, i, _ in docs]
    all_tokens = np.concatenate([t for _, t in samples])
    np.testing.assert_array_equal(all_tokens, expected_tokens(ByteTokenizer(), docs))
    check_manifest_matches_files(output)
    assert not (output / "tokenizer.json").exists()
    assert sum(line.startswith("wrote shard-") for line in logged) == len(manifest.shards)
    assert "documents/s" in logged[-1] and "tokens/s" in logged[-1]


@pytest.mark.parametrize("shards, seconds, said", [
    (2, 41.0, "prepared 1,204 documents, 3,410,220 tokens in 2 shards to out in 41.0 s (29.4 "
              "documents/s, 83.2k tokens/s)"),
    (1, 3725.0, "prepared 1,204 documents, 3,410,220 tokens in 1 shard to out in 1:02:05 (0.3 "
                "documents/s, 915.5 tokens/s)"),
])
def test_the_summary_line_reads_like_the_progress_line(shards, seconds, said) -> None:
    from types import SimpleNamespace

    from tessera.data.prepare import _log_summary

    logged: list[str] = []
    manifest = SimpleNamespace(num_samples=1204, num_tokens=3_410_220, shards=[None] * shards)
    _log_summary(logged.append, manifest, Path("out"), seconds)
    assert logged == [said]


def test_shards_close_once_their_payload_reaches_shard_bytes(tmp_path) -> None:
    (tmp_path / "in").mkdir()
    for i in range(10):
        (tmp_path / "in" / f"{i:02d}.txt").write_text("x" * 9)  # 10 tokens, 20 bytes each
    manifest = prepare([str(tmp_path / "in")], tmp_path / "out", shard_bytes=60, log=lambda _: 0)
    assert [s.num_samples for s in manifest.shards] == [3, 3, 3, 1]
    assert [s.num_tokens for s in manifest.shards] == [30, 30, 30, 10]


def test_inputs_keep_the_given_order_and_files_bypass_the_glob(tmp_path) -> None:
    (tmp_path / "z.md").write_text("zed")
    (tmp_path / "a.txt").write_text("ay")
    sources = [str(tmp_path / "z.md"), str(tmp_path / "a.txt")]
    prepare(sources + sources[:1], tmp_path / "out", log=lambda _: 0)
    assert [m["source"] for m, _ in read_samples(tmp_path / "out")] == sources


def test_glob_option_selects_files_under_directories(tmp_path) -> None:
    write_corpus(tmp_path / "in")
    manifest = prepare([str(tmp_path / "in")], tmp_path / "out", glob="*.md", log=lambda _: 0)
    assert manifest.num_samples == 1
    assert read_samples(tmp_path / "out")[0][0]["source"].endswith("notes.md")


def test_text_field_option(tmp_path) -> None:
    (tmp_path / "d.jsonl").write_text('{"body": "one"}\n{"body": "two"}\n')
    assert (
        prepare_command(
            [str(tmp_path / "d.jsonl"), "--output", str(tmp_path / "out"), "--text-field", "body"]
        )
        == 0
    )
    assert read_manifest(tmp_path / "out").num_tokens == len("one") + len("two") + 2


@pytest.mark.parametrize("tokenizer_kind", ["bytes", "hf"])
def test_two_workers_write_identical_files(tmp_path, monkeypatch, tokenizer_kind) -> None:
    write_corpus(tmp_path / "in")
    monkeypatch.setattr(prepare_module, "BATCH_MAX_DOCS", 2)  # several tasks in flight
    options: dict = {"shard_bytes": 150, "log": lambda _: 0}
    if tokenizer_kind == "hf":
        train_bpe(iter(SENTENCES * 5), 300).save(tmp_path)
        options["tokenizer"] = tmp_path / "tokenizer.json"
    one = prepare([str(tmp_path / "in")], tmp_path / "one", workers=1, **options)
    two = prepare([str(tmp_path / "in")], tmp_path / "two", workers=2, **options)

    assert one == two
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir())
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_train_tokenizer_saves_it_beside_the_shards(tmp_path) -> None:
    docs = write_corpus(tmp_path / "in")
    output = tmp_path / "out"
    assert (
        prepare_command([str(tmp_path / "in"), "--output", str(output), "--train-tokenizer", "300"])
        == 0
    )

    manifest = read_manifest(output)
    assert manifest.tokenizer.kind == "hf"
    assert manifest.tokenizer.file == "tokenizer.json"
    assert (output / "tokenizer.json").is_file()
    tokenizer = load_tokenizer(manifest.tokenizer, output)
    assert manifest.tokenizer.vocab_size == tokenizer.vocab_size
    assert 257 < tokenizer.vocab_size <= 300
    for _, _, text in docs:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    all_tokens = np.concatenate([t for _, t in read_samples(output)])
    np.testing.assert_array_equal(all_tokens, expected_tokens(tokenizer, docs))
    assert all_tokens.size < sum(len(t.encode()) + 1 for _, _, t in docs)  # BPE merged
    check_manifest_matches_files(output)


def test_tokenizer_option_uses_a_saved_tokenizer(tmp_path) -> None:
    docs = write_corpus(tmp_path / "in")
    (tmp_path / "tok").mkdir()
    saved = train_bpe(iter(SENTENCES * 5), 280).save(tmp_path / "tok")
    output = tmp_path / "out"
    assert (
        prepare_command([str(tmp_path / "in"), "--output", str(output), "--tokenizer", str(saved)])
        == 0
    )

    manifest = read_manifest(output)
    tokenizer = HFTokenizer.from_file(saved)
    assert manifest.tokenizer == tokenizer.info()
    assert (output / "tokenizer.json").is_file()
    all_tokens = np.concatenate([t for _, t in read_samples(output)])
    np.testing.assert_array_equal(all_tokens, expected_tokens(tokenizer, docs))


def test_stale_temporary_files_are_removed(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("text")
    output = tmp_path / "out"
    output.mkdir()
    (output / "shard-000000.tar.tmp").write_bytes(b"half written")
    prepare([str(tmp_path / "a.txt")], output, log=lambda _: 0)
    assert sorted(p.name for p in output.iterdir()) == [MANIFEST_NAME, "shard-000000.tar"]
    check_manifest_matches_files(output)


def test_an_output_folder_holding_files_prepare_did_not_write_is_refused(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("text")
    output = tmp_path / "out"
    output.mkdir()
    (output / "shard-000000.tar").write_bytes(b"a user's own shard")
    with pytest.raises(DataError, match="--output holds files tessera prepare did not write "
                                        "\\(shard-000000.tar\\); choose a new or empty"):
        prepare([str(tmp_path / "a.txt")], output, log=lambda _: 0)
    assert (output / "shard-000000.tar").read_bytes() == b"a user's own shard"


def test_an_error_mid_run_leaves_no_temporary_shard(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(prepare_module, "BATCH_MAX_DOCS", 1)  # a shard is open at the error
    (tmp_path / "a.txt").write_text("a good document")
    (tmp_path / "b.jsonl").write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    output = tmp_path / "out"
    with pytest.raises(DataError, match="b.jsonl:2: no 'text' field"):
        prepare([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")], output, log=lambda _: 0)
    assert list(output.iterdir()) == []


def test_tokenizer_and_train_tokenizer_are_exclusive(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(DataError, match="not both"):
        prepare(
            [str(tmp_path / "a.txt")],
            tmp_path / "out",
            tokenizer="t.json",
            train_tokenizer_vocab=300,
        )


def _bad_missing_input(tmp: Path) -> tuple[list[str], str]:
    return [str(tmp / "missing.txt")], "missing.txt"


def _bad_empty_directory(tmp: Path) -> tuple[list[str], str]:
    (tmp / "empty_dir").mkdir()
    return [str(tmp / "empty_dir")], "empty_dir"


def _bad_glob_matches_nothing(tmp: Path) -> tuple[list[str], str]:
    (tmp / "docs").mkdir()
    (tmp / "docs" / "readme.md").write_text("hello")
    return [str(tmp / "docs"), "--glob", "*.rst"], "docs"


def _bad_empty_input(tmp: Path) -> tuple[list[str], str]:
    (tmp / "blank.txt").write_text("")
    (tmp / "blank.jsonl").write_text('{"text": ""}\n\n')
    return [str(tmp / "blank.txt"), str(tmp / "blank.jsonl")], "empty input"


def _bad_utf8_text(tmp: Path) -> tuple[list[str], str]:
    (tmp / "latin1.txt").write_bytes(b"ok " + "café".encode("latin-1"))
    return [str(tmp / "latin1.txt")], "latin1.txt: not valid UTF-8 at byte offset 6"


def _bad_utf8_jsonl(tmp: Path) -> tuple[list[str], str]:
    (tmp / "bad.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    return [str(tmp / "bad.jsonl")], "bad.jsonl: not valid UTF-8 at byte offset 30"


def _bad_utf8_while_training(tmp: Path) -> tuple[list[str], str]:
    (tmp / "latin1.txt").write_bytes("café".encode("latin-1"))
    return [str(tmp / "latin1.txt"), "--train-tokenizer", "300"], "latin1.txt: not valid UTF-8"


def _bad_json_line(tmp: Path) -> tuple[list[str], str]:
    (tmp / "broken.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    return [str(tmp / "broken.jsonl")], "broken.jsonl:2: invalid JSON"


def _bad_missing_field(tmp: Path) -> tuple[list[str], str]:
    (tmp / "fields.jsonl").write_text('{"text": "fine"}\n\n{"content": "no text"}\n')
    return [str(tmp / "fields.jsonl")], "fields.jsonl:3: no 'text' field"


def _bad_missing_tokenizer(tmp: Path) -> tuple[list[str], str]:
    (tmp / "a.txt").write_text("text")
    return [str(tmp / "a.txt"), "--tokenizer", str(tmp / "no_tok.json")], "no_tok.json"


def _bad_unparsable_tokenizer(tmp: Path) -> tuple[list[str], str]:
    (tmp / "a.txt").write_text("text")
    (tmp / "garbage.json").write_text("not json at all")
    return [str(tmp / "a.txt"), "--tokenizer", str(tmp / "garbage.json")], "garbage.json"


def _bad_output_is_a_file(tmp: Path) -> tuple[list[str], str]:
    (tmp / "a.txt").write_text("text")
    (tmp / "out").write_text("I am a file")
    return [str(tmp / "a.txt")], "out: --output exists and is not a directory"


BAD_INPUTS = [
    _bad_missing_input,
    _bad_empty_directory,
    _bad_glob_matches_nothing,
    _bad_empty_input,
    _bad_utf8_text,
    _bad_utf8_jsonl,
    _bad_utf8_while_training,
    _bad_json_line,
    _bad_missing_field,
    _bad_missing_tokenizer,
    _bad_unparsable_tokenizer,
    _bad_output_is_a_file,
]


@pytest.mark.parametrize("make_bad_input", BAD_INPUTS, ids=lambda f: f.__name__[5:])
def test_bad_input_is_a_one_line_error(tmp_path, capsys, make_bad_input) -> None:
    args, expected_in_message = make_bad_input(tmp_path)
    output = tmp_path / "out"
    rc = prepare_command(args + ["--output", str(output)])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("tessera prepare: error: ")
    assert expected_in_message in err
    assert not (output / MANIFEST_NAME).exists()
    if output.is_dir():
        assert not list(output.glob("*.tmp"))


def test_an_already_prepared_output_is_refused(tmp_path, capsys) -> None:
    (tmp_path / "a.txt").write_text("text")
    args = [str(tmp_path / "a.txt"), "--output", str(tmp_path / "out")]
    assert prepare_command(args) == 0
    before = (tmp_path / "out" / MANIFEST_NAME).read_bytes()
    capsys.readouterr()
    assert prepare_command(args) == 2
    err = capsys.readouterr().err
    assert ("out: already prepared (its manifest.json is written), so nothing was done; to "
            "prepare it again, remove it or choose another --output") in err
    assert (tmp_path / "out" / MANIFEST_NAME).read_bytes() == before


def test_usage_errors_return_non_zero(capsys) -> None:
    assert prepare_command([]) == 2
    assert (
        prepare_command(["x.txt", "--output", "o", "--tokenizer", "t", "--train-tokenizer", "300"])
        == 2
    )
    assert prepare_command(["x.txt", "--output", "o", "--shard-bytes", "0"]) == 2
    assert "usage: tessera prepare" in capsys.readouterr().err


def test_shard_bytes_accepts_binary_suffixes() -> None:
    parse = prepare_module._byte_size
    assert parse("1048576") == 2**20
    assert parse("64M") == parse("64MiB") == 64 * 2**20
    assert parse("2k") == 2048


# ---------------------------------------------------------------------------------------------
# Compressed JSON lines and parquet inputs


def write_compressed_inputs(root: Path) -> list[str]:
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    root.mkdir(parents=True)
    lines = "".join(json.dumps({"text": s}) + "\n" for s in SENTENCES).encode()
    (root / "a.jsonl").write_bytes(lines)
    (root / "b.jsonl.gz").write_bytes(gzip.compress(lines))
    (root / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    table = pa.table({"id": list(range(5)), "text": SENTENCES[:2] + [None] + SENTENCES[2:]})
    pq.write_table(table, root / "d.parquet", row_group_size=2)
    return SENTENCES * 3 + SENTENCES


def test_gzip_zstd_and_parquet_inputs(tmp_path) -> None:
    texts = write_compressed_inputs(tmp_path / "in")
    manifest = prepare([str(tmp_path / "in")], tmp_path / "out", log=lambda _: 0)
    samples = read_samples(tmp_path / "out")
    assert [m["source"].rsplit("/", 1)[-1] for m, _ in samples] == (
        ["a.jsonl"] * 4 + ["b.jsonl.gz"] * 4 + ["c.jsonl.zst"] * 4 + ["d.parquet"] * 4
    )
    # the parquet null is no document but keeps its row index
    assert [m["doc"] for m, _ in samples[12:]] == [0, 1, 3, 4]
    tokenizer = ByteTokenizer()
    for (_, tokens), text in zip(samples, texts):
        assert tokenizer.decode(tokens[:-1]) == text
    assert manifest.num_samples == 16


def _bad_gzip(tmp: Path) -> tuple[list[str], str]:
    (tmp / "broken.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00not really gzip")
    return [str(tmp / "broken.jsonl.gz")], "broken.jsonl.gz: corrupt compressed data"


def _bad_zstd(tmp: Path) -> tuple[list[str], str]:
    (tmp / "broken.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd garbage")
    return [str(tmp / "broken.jsonl.zst")], "broken.jsonl.zst: corrupt compressed data"


def _bad_parquet_column(tmp: Path) -> tuple[list[str], str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp / "t.parquet")
    return [str(tmp / "t.parquet")], "t.parquet: no column 'text' (columns: body)"


def _bad_parquet_type(tmp: Path) -> tuple[list[str], str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2]}), tmp / "n.parquet")
    return [str(tmp / "n.parquet")], "n.parquet: column 'text' is int64, not a string"


def _bad_parquet_file(tmp: Path) -> tuple[list[str], str]:
    (tmp / "fake.parquet").write_bytes(b"PAR1 not parquet")
    return [str(tmp / "fake.parquet")], "fake.parquet: not a readable parquet file"


@pytest.mark.parametrize(
    "make_bad_input",
    [_bad_gzip, _bad_zstd, _bad_parquet_column, _bad_parquet_type, _bad_parquet_file],
    ids=lambda f: f.__name__[5:],
)
def test_bad_compressed_or_parquet_input_is_a_one_line_error(tmp_path, capsys, make_bad_input):
    test_bad_input_is_a_one_line_error(tmp_path, capsys, make_bad_input)


# ---------------------------------------------------------------------------------------------
# Progress, resume after an interruption, --verify


def test_progress_line_shows_rates_and_eta(tmp_path) -> None:
    write_corpus(tmp_path / "in")
    lines: list[str] = []
    prepare(
        [str(tmp_path / "in")],
        tmp_path / "out",
        log=lambda _: 0,
        progress=lines.append,
        progress_interval_s=0,
    )
    assert len(lines) >= 5
    for line in lines[:-1]:
        assert line.startswith("prepare ") and "documents (" in line and "tokens (" in line
        assert "ETA" in line
    assert lines[-1].startswith("prepare  100.0%") and "9 documents" in lines[-1]
    assert " in 0:" in lines[-1]  # the final line: how long it took


class Interrupt(KeyboardInterrupt):
    pass


def interrupt_after(num_shards: int):
    seen = []

    def log(line: str) -> None:
        seen.append(line)
        if sum(s.startswith("wrote shard-") for s in seen) == num_shards:
            raise Interrupt

    return log, seen


@pytest.mark.parametrize("workers", [1, 2])
def test_an_interrupted_run_continues_after_its_finished_shards(tmp_path, monkeypatch, workers):
    write_corpus(tmp_path / "in")
    (tmp_path / "in" / "many.jsonl").write_text(
        "".join(json.dumps({"text": f"{i}: {SENTENCES[i % 4]}"}) + "\n" for i in range(40))
    )
    monkeypatch.setattr(prepare_module, "BATCH_MAX_DOCS", 1)
    options = {"shard_bytes": 150, "workers": workers, "train_tokenizer_vocab": 300}
    prepare([str(tmp_path / "in")], tmp_path / "straight", log=lambda _: 0, **options)

    straight = read_manifest(tmp_path / "straight")
    assert len(straight.shards) >= 4
    log, _ = interrupt_after(2)
    with pytest.raises(Interrupt):
        prepare([str(tmp_path / "in")], tmp_path / "out", log=log, **options)
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()
    assert (tmp_path / "out" / prepare_module.JOURNAL_NAME).is_file()

    encoded: list[int] = []
    original = prepare_module.encode_documents
    monkeypatch.setattr(
        prepare_module,
        "encode_documents",
        lambda tok, texts, dtype: encoded.append(len(texts)) or original(tok, texts, dtype),
    )
    logged: list[str] = []
    prepare([str(tmp_path / "in")], tmp_path / "out", log=logged.append, **options)
    assert "resuming an interrupted run: 2 shards already finished" in logged
    assert any("reusing the tokenizer" in line for line in logged)
    if workers == 1:  # the documents of the 2 finished shards were not tokenized again
        assert 0 < sum(encoded) < straight.num_samples
    names = sorted(p.name for p in (tmp_path / "straight").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "out").iterdir())
    for name in names:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes()


def test_a_killed_worker_stops_the_run_with_a_clear_error_and_keeps_finished_shards(
    tmp_path, monkeypatch
):
    write_corpus(tmp_path / "in")
    (tmp_path / "in" / "many.jsonl").write_text(
        "".join(json.dumps({"text": f"{i}: {SENTENCES[i % 4]}"}) + "\n" for i in range(40))
    )
    monkeypatch.setattr(prepare_module, "BATCH_MAX_DOCS", 1)
    options = {"shard_bytes": 150, "workers": 2}
    prepare([str(tmp_path / "in")], tmp_path / "straight", log=lambda _: 0, **options)

    written = []

    def kill_a_worker_after_two_shards(line: str) -> None:
        written.append(line.startswith("wrote shard-"))
        if sum(written) == 2 and written[-1]:
            os.kill(multiprocessing.active_children()[0].pid, signal.SIGKILL)  # the OOM killer

    with pytest.raises(DataError, match="tokenizer worker process died"):
        prepare([str(tmp_path / "in")], tmp_path / "out", log=kill_a_worker_after_two_shards,
                **options)
    assert (tmp_path / "out" / "shard-000001.tar").is_file()
    assert not list((tmp_path / "out").glob("*.tmp"))

    prepare([str(tmp_path / "in")], tmp_path / "out", log=lambda _: 0, **options)  # continues
    names = sorted(p.name for p in (tmp_path / "straight").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "out").iterdir())
    for name in names:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes()


def test_changed_inputs_after_an_interruption_are_refused(tmp_path, capsys) -> None:
    write_corpus(tmp_path / "in")
    log, _ = interrupt_after(1)
    with pytest.raises(Interrupt):
        prepare([str(tmp_path / "in")], tmp_path / "out", shard_bytes=150, log=log)
    (tmp_path / "in" / "a.txt").write_text("changed")
    args = [str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--shard-bytes", "150"]
    assert prepare_command(args) == 2
    err = capsys.readouterr().err
    assert "holds an interrupted run of other inputs or options" in err
    assert "a.txt changed" in err
    assert prepare_command(args[:3] + ["--shard-bytes", "300"]) == 2
    assert "shard_bytes was 150, now 300" in capsys.readouterr().err


def test_verify_checks_every_shard(tmp_path, capsys) -> None:
    write_corpus(tmp_path / "in")
    out = tmp_path / "out"
    manifest = prepare([str(tmp_path / "in")], out, shard_bytes=150, log=lambda _: 0)
    assert prepare_command(["--verify", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"{len(manifest.shards)} shards checked: all match the manifest" in said

    first, second, third = (out / s.path for s in manifest.shards[:3])
    data = bytearray(first.read_bytes())
    data[1024 + 512 + 2] ^= 0x01  # the low byte of a token: another valid id, same size
    first.write_bytes(bytes(data))
    second.write_bytes(second.read_bytes()[:700])
    third.unlink()
    assert prepare_command(["--verify", str(out)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("shard-000000.tar: BAD: sha256 differs from the manifest")
    assert "shard-000001.tar: BAD: truncated in member" in lines[1]
    assert lines[2].endswith("shard-000002.tar: BAD: missing")
    assert lines[-1].startswith(f"3 of {len(manifest.shards)} shards do not match")


def test_verify_usage_errors(tmp_path, capsys) -> None:
    assert prepare_command(["--verify", str(tmp_path)]) == 2
    assert "no manifest" in capsys.readouterr().err
    assert prepare_command(["x.txt", "--verify", str(tmp_path)]) == 2
    assert prepare_command(["x.txt"]) == 2
    assert "give INPUT files and --output DIR" in capsys.readouterr().err


def framed_tokenizer(directory: Path, single: str) -> HFTokenizer:
    """A BPE with Llama 3's special tokens, the post-processor template `single`, and a
    tokenizer_config.json naming <|end_of_text|> as EOS (a Hugging Face model directory)."""
    raw = train_bpe(iter(SENTENCES * 5), 300).tokenizer
    raw.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
    specials = [(t, raw.token_to_id(t)) for t in ("<|begin_of_text|>", "<|end_of_text|>")]
    raw.post_processor = processors.TemplateProcessing(single=single, special_tokens=specials)
    directory.mkdir(parents=True, exist_ok=True)
    raw.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text('{"eos_token": "<|end_of_text|>"}')
    return HFTokenizer.from_file(directory / "tokenizer.json")


@pytest.mark.parametrize("workers", [1, 2])
def test_documents_are_framed_as_the_tokenizers_model_was_trained(tmp_path, workers) -> None:
    """Llama 3's framing: the post-processor's BOS, the text, the configured EOS (not the
    trained BPE's <|endoftext|>); the vocabulary counts the added special tokens."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("".join(json.dumps({"text": s}) + "\n"
                                                     for s in SENTENCES))
    tokenizer = framed_tokenizer(tmp_path / "model", "<|begin_of_text|> $A")
    bos, eos = (tokenizer.tokenizer.token_to_id(t)
                for t in ("<|begin_of_text|>", "<|end_of_text|>"))
    assert tokenizer.eos_id == eos and tokenizer.vocab_size == 302
    manifest = prepare([str(tmp_path / "in")], tmp_path / "out", tokenizer=tmp_path / "model",
                       workers=workers, log=lambda _: 0)
    assert (manifest.tokenizer.vocab_size, manifest.tokenizer.eos_id) == (302, eos)
    plain = [tokenizer.tokenizer.encode(s, add_special_tokens=False).ids for s in SENTENCES]
    assert [t.tolist() for _, t in read_samples(tmp_path / "out")] == [
        [bos, *ids, eos] for ids in plain]


def test_a_post_processor_that_ends_with_eos_gets_no_second_one(tmp_path) -> None:
    tokenizer = framed_tokenizer(tmp_path / "model", "<|begin_of_text|> $A <|end_of_text|>")
    (tokens,) = encode_documents(tokenizer, ["hello"], "uint16")
    ids = tokenizer.tokenizer.encode("hello", add_special_tokens=False).ids
    bos = tokenizer.tokenizer.token_to_id("<|begin_of_text|>")
    assert tokens.tolist() == [bos, *ids, tokenizer.eos_id]


def test_a_folder_that_matches_no_glob_names_its_files_and_the_option(tmp_path) -> None:
    """A folder of source files (the README's first try on a new machine) is named with what it
    holds and the --glob that reads it."""
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    for name in ("a.py", "b.py", "pkg/c.py", "pkg/d.md"):
        (tmp_path / "src" / name).write_text("print(1)\n")
    with pytest.raises(DataError, match=r"src: no input files matching '\*.txt'.*; it holds "
                                        r"a.py, b.py, pkg/c.py and 1 more: add --glob '\*.md' "
                                        r"--glob '\*.py' to read them as text"):
        prepare([str(tmp_path / "src")], tmp_path / "out", log=lambda _: 0)
    manifest = prepare([str(tmp_path / "src")], tmp_path / "out", glob=["*.py", "*.md"],
                       log=lambda _: 0)
    assert sum(s.num_samples for s in manifest.shards) == 4
