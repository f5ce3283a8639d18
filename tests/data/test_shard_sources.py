"""Shards named by URL (webdataset's gopen, `pipe:` included) and shards written by GNU tar."""

from __future__ import annotations

import functools
import hashlib
import http.server
import shutil
import subprocess
import threading

import numpy as np
import pytest
import torch
from shardutil import assert_steps_equal, make_data, make_loader, random_docs, take_steps

from tessera.data.format import (
    DataError,
    Manifest,
    ShardInfo,
    TokenizerInfo,
    encode_tokens,
    write_manifest,
)
from tessera.data.sources import resolve_shards


@pytest.fixture
def data(tmp_path):
    make_data(tmp_path, num_shards=4)
    return tmp_path


def test_pipe_and_file_urls_read_like_local_paths(data):
    expected = take_steps(make_loader(data), 12)
    specs = [
        f"pipe:cat {data}/manifest.json",  # the manifest: every shard it lists
        f"pipe:cat {data}/shard-{{000000..000003}}.tar",  # brace-expanded shard commands
        f"file://{data}/shard-{{000000..000003}}.tar",
        [f"pipe:cat {data}/shard-00000{i}.tar" for i in range(4)],
    ]
    for spec in specs:
        assert_steps_equal(take_steps(make_loader(spec), 12), expected)
    shards = resolve_shards(f"pipe:cat {data}/shard-{{000001,000003}}.tar")
    assert [s.path for s in shards] == [
        f"pipe:cat {data}/shard-000001.tar",
        f"pipe:cat {data}/shard-000003.tar",
    ]
    assert [s.num_tokens for s in shards] == [s.num_tokens for s in resolve_shards(data)][1::2]


def test_url_errors_name_the_url(data):
    with pytest.raises(DataError, match="cannot find the shard or manifest file name"):
        resolve_shards(f"pipe:cat {data}/notes.json")
    with pytest.raises(DataError, match="elsewhere/manifest.json.*cannot read the manifest"):
        resolve_shards(f"pipe:cat {data}/elsewhere/manifest.json 2>/dev/null")
    with pytest.raises(DataError, match="manifest.json: cannot read the manifest"):
        resolve_shards(f"pipe:cat {data}/nothing/shard-000000.tar")
    with pytest.raises(DataError, match="shard-000009.tar is not listed"):
        resolve_shards(f"pipe:cat {data}/shard-000009.tar")


def test_a_file_that_is_not_a_shard_is_named_as_such(data, tmp_path_factory):
    """Not "not listed in <its folder's>/manifest.json": the file itself is the mistake."""
    (data / "notes.txt").write_text("hello")
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "config.yaml"  # no manifest beside it
    elsewhere.write_text("run: {}")
    for path in (data / "notes.txt", elsewhere):
        with pytest.raises(DataError) as error:
            resolve_shards(str(path))
        assert str(error.value) == (f"{path}: not a shard (.tar) of a directory written by "
                                    f"`tessera prepare` (data.shards); give that directory, or "
                                    f"its shards")
    (data / "shard-000009.tar").write_bytes(b"")  # a .tar beside the manifest, not in it
    with pytest.raises(DataError, match="shard-000009.tar: shard is not listed in"):
        resolve_shards(str(data / "shard-000009.tar"))


@pytest.fixture
def http_root(data):
    """`data` served over HTTP on a free local port (webdataset opens http:// with curl)."""
    handler = functools.partial(QuietHandler, directory=str(data))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset reads http:// with curl")
def test_http_urls_stream_like_local_paths(data, http_root):
    expected = take_steps(make_loader(data), 12)
    for spec in (f"{http_root}/manifest.json", f"{http_root}/shard-{{000000..000003}}.tar"):
        assert_steps_equal(take_steps(make_loader(spec), 12), expected)
    (data / "shard-000002.tar").unlink()  # listed in the manifest, gone from the server
    with pytest.raises(DataError, match="shard-000002.tar: shard is missing"):
        take_steps(make_loader(f"{http_root}/manifest.json"), 12)


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar")
def test_a_shard_written_by_gnu_tar_is_read(tmp_path):
    version = subprocess.run(["tar", "--version"], check=False, capture_output=True, text=True)
    if "GNU tar" not in version.stdout:
        pytest.skip("needs GNU tar")
    docs = random_docs(np.random.default_rng(5), 400)
    # A directory name long enough for GNU long-name records ("././@LongLink")
    subdir = "d" * 110
    (tmp_path / "members" / subdir).mkdir(parents=True)
    for index, doc in enumerate(docs):
        (tmp_path / "members" / subdir / f"{index:09d}.tokens").write_bytes(
            encode_tokens(doc, "uint16")
        )
        (tmp_path / "members" / subdir / f"{index:09d}.json").write_text(f'{{"doc": {index}}}')
    out = tmp_path / "data"
    out.mkdir()
    shard = out / "shard-000000.tar"
    subprocess.run(
        ["tar", "--format=gnu", "-cf", str(shard), "-C", str(tmp_path / "members"), subdir],
        check=True,
    )
    data = shard.read_bytes()
    assert data[257:265] == b"ustar  \x00" and b"././@LongLink" in data  # GNU, not our writer
    tokens = np.concatenate(docs)
    tokenizer = TokenizerInfo(kind="bytes", vocab_size=1000, eos_id=0)
    info = ShardInfo(shard.name, len(tokens), len(docs), hashlib.sha256(data).hexdigest())
    write_manifest(out, Manifest(tokenizer, "uint16", (info,)))

    loader = make_loader(
        out, num_streams=1, global_batch_size=1, micro_batch_size=1, shuffle=False, shuffle_buffer=0
    )
    got = torch.cat(take_steps(loader, len(tokens) // 9)).flatten().numpy()
    assert loader.skipped_samples == 0
    # GNU tar stores the directory in its own order: the documents in that order, read by
    # Python's tarfile independently of the loader
    in_tar_order = tar_order_tokens(shard)
    assert len(in_tar_order) == len(tokens)
    np.testing.assert_array_equal(got, in_tar_order[: len(got)])


def tar_order_tokens(path) -> np.ndarray:
    import tarfile

    with tarfile.open(path) as tar:
        parts = [
            np.frombuffer(tar.extractfile(m).read(), dtype="<u2")
            for m in tar.getmembers()
            if m.isreg() and m.name.endswith(".tokens")
        ]
    return np.concatenate(parts).astype(np.int64)
