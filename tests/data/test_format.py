"""A prepared directory's manifest.json as a hostile or careless hand would write it: every field
is checked for its type and range, and each mistake is one line naming manifest.json and the key,
never a TypeError from deep in the loader. The files it names stay inside its directory: plain
names, and on disk no symbolic link out of it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from shardutil import make_data

from tessera.data.format import MANIFEST_NAME, DataError, read_manifest
from tessera.data.prepare import prepare_command
from tessera.data.sources import ResolvedShard, prepared_tokenizer, resolve_shards
from tessera.data.tokenizer import find_tokenizer, load_tokenizer, train_bpe

Edit = Callable[[dict], None]


def _set(*path_and_value) -> Edit:
    """An edit setting manifest[k1][k2]... = value (`DELETE` as the value removes the key)."""
    *path, value = path_and_value

    def edit(manifest: dict) -> None:
        for key in path[:-1]:
            manifest = manifest[key]
        if value is DELETE:
            del manifest[path[-1]]
        else:
            manifest[path[-1]] = value

    return edit


DELETE = object()
HF = {"kind": "hf", "vocab_size": 257, "eos_id": 256}

BAD_FIELDS = {
    "dtype not supported": (_set("dtype", "bogus"), "dtype"),
    "dtype not a string": (_set("dtype", 16), "dtype"),
    "version of another format": (_set("version", 2), "version"),
    "version a string": (_set("version", "1"), "version"),
    "total a string": (_set("num_tokens", "x"), "num_tokens"),
    "tokenizer not an object": (_set("tokenizer", "bytes"), "tokenizer"),
    "tokenizer kind unknown": (_set("tokenizer", "kind", "sp"), "tokenizer.kind"),
    "tokenizer key missing": (_set("tokenizer", "vocab_size", DELETE), "tokenizer.vocab_size"),
    "tokenizer key unknown": (_set("tokenizer", "merges", []), "tokenizer.merges"),
    "vocab_size a string": (_set("tokenizer", "vocab_size", "x"), "tokenizer.vocab_size"),
    "vocab_size zero": (_set("tokenizer", "vocab_size", 0), "tokenizer.vocab_size"),
    "vocab_size beyond the dtype": (_set("tokenizer", "vocab_size", 70000),
                                    "tokenizer.vocab_size"),
    "eos_id a float": (_set("tokenizer", "eos_id", 0.5), "tokenizer.eos_id"),
    "eos_id negative": (_set("tokenizer", "eos_id", -1), "tokenizer.eos_id"),
    "eos_id beyond the vocabulary": (_set("tokenizer", "eos_id", 1000), "tokenizer.eos_id"),
    "shards not a list": (_set("shards", "shard-000000.tar"), "shards"),
    "shard not an object": (_set("shards", 0, 7), "shards[0]"),
    "shard key missing": (_set("shards", 1, "sha256", DELETE), "shards[1].sha256"),
    "shard key unknown": (_set("shards", 0, "bytes", 10), "shards[0].bytes"),
    "num_tokens a string": (_set("shards", 0, "num_tokens", "x"), "shards[0].num_tokens"),
    "num_tokens negative": (_set("shards", 0, "num_tokens", -1), "shards[0].num_tokens"),
    "num_tokens a bool": (_set("shards", 0, "num_tokens", True), "shards[0].num_tokens"),
    "num_samples a float": (_set("shards", 1, "num_samples", 1.5), "shards[1].num_samples"),
    "sha256 not hex": (_set("shards", 0, "sha256", "abc"), "shards[0].sha256"),
    "sha256 null": (_set("shards", 0, "sha256", None), "shards[0].sha256"),
    "shard path listed twice": (_set("shards", 1, "path", "shard-000000.tar"), "shards[1].path"),
}

# Names that would reach outside the directory, or into a shell through a pipe: command
HOSTILE_NAMES = ["../../../etc/passwd", "/etc/passwd", "sub/shard.tar", "..", ".hidden",
                 "-rf", "", "a.tar; touch PWNED", "$(id).tar", "manifest.json"]


def edited(directory: Path, edit: Edit) -> Path:
    path = directory / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    return path


def one_line_error(directory: Path) -> str:
    with pytest.raises(DataError) as caught:
        resolve_shards(str(directory))
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("edit, key", BAD_FIELDS.values(), ids=BAD_FIELDS.keys())
def test_a_bad_manifest_field_is_one_line_naming_the_file_and_key(tmp_path, edit, key):
    make_data(tmp_path, num_shards=2)
    path = edited(tmp_path, edit)
    message = one_line_error(tmp_path)
    assert message.startswith(f"{path}: key '{key}' "), message


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_a_shard_path_must_be_a_plain_file_name(tmp_path, name):
    make_data(tmp_path, num_shards=2)
    path = edited(tmp_path, _set("shards", 1, "path", name))
    assert one_line_error(tmp_path).startswith(f"{path}: key 'shards[1].path' must be a plain")


@pytest.mark.parametrize("name", [n for n in HOSTILE_NAMES if n != "manifest.json"])
def test_a_tokenizer_file_must_be_a_plain_file_name(tmp_path, name):
    make_data(tmp_path, num_shards=1)
    path = edited(tmp_path, _set("tokenizer", {**HF, "file": name}))
    assert one_line_error(tmp_path).startswith(f"{path}: key 'tokenizer.file' must be a plain")


def test_a_hostile_shard_name_behind_a_pipe_url_runs_nothing(tmp_path):
    make_data(tmp_path / "data", num_shards=1)
    edited(tmp_path / "data", _set("shards", 0, "path", f"x.tar;touch {tmp_path}/PWNED;"))
    url = f"pipe:cat {tmp_path}/data/manifest.json"
    with pytest.raises(DataError, match=r"manifest.json: key 'shards\[0\].path'"):
        resolve_shards(url)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("text", ["[" * 100_000, b"\xff\xfe{}"], ids=["deep", "utf8"])
def test_an_unparsable_manifest_is_one_line_naming_it(tmp_path, text):
    make_data(tmp_path, num_shards=1)
    path = tmp_path / MANIFEST_NAME
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    assert one_line_error(tmp_path).startswith(f"{path}: ")


def test_shards_linked_anywhere_are_read_as_a_hugging_face_cache_lays_them_out(tmp_path, capsys):
    """snapshots/REV/shard-*.tar -> ../../blobs/SHA (what huggingface_hub downloads): resolved
    and verified as shards; only the tokenizer file (which checkpoints copy) must stay inside."""
    snapshot, blobs = tmp_path / "snapshots" / "rev", tmp_path / "blobs"
    make_data(snapshot, num_shards=2)
    blobs.mkdir()
    for index, shard in enumerate(sorted(snapshot.glob("shard-*.tar"))):
        shard.rename(blobs / f"blob{index}")
        shard.symlink_to(Path("..", "..", "blobs", f"blob{index}"))
    shards = resolve_shards(str(snapshot))
    assert [Path(s.path).name for s in shards] == ["shard-000000.tar", "shard-000001.tar"]
    assert prepare_command(["--verify", str(snapshot)]) == 0, capsys.readouterr().out


def _prepared_shard(directory: Path) -> ResolvedShard:
    return ResolvedShard(str(directory / "shard-000000.tar"), 1, 1, "uint16")


TOKENIZER_READERS = {
    "resolve_shards": lambda directory: resolve_shards(str(directory)),
    "prepared_tokenizer": lambda directory: prepared_tokenizer(_prepared_shard(directory)),
    "load_tokenizer": lambda directory: load_tokenizer(read_manifest(directory).tokenizer,
                                                       directory),
    "find_tokenizer": find_tokenizer,
}


@pytest.mark.parametrize("read", TOKENIZER_READERS.values(), ids=TOKENIZER_READERS.keys())
def test_a_tokenizer_linked_out_of_its_directory_is_never_read(tmp_path, read):
    """What a checkpoint copies into its tokenizer/ folder: never a file from outside the data
    directory, even a valid tokenizer."""
    tokenizer = train_bpe(iter(["some text to learn from"] * 20), 300)
    tokenizer.save(tmp_path)
    make_data(tmp_path / "data", num_shards=1)
    info = {"kind": "hf", "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
            "file": "tokenizer.json"}
    path = edited(tmp_path / "data", _set("tokenizer", info))
    (tmp_path / "data" / "tokenizer.json").symlink_to(tmp_path / "tokenizer.json")
    with pytest.raises(DataError) as caught:
        read(tmp_path / "data")
    message = str(caught.value)
    assert message.startswith(f"{path}: key 'tokenizer.file': "), message
    assert f"leads outside its directory (a link to {tmp_path.resolve()}/tokenizer.json)" in message
