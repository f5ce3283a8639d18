"""Hostile and careless Hugging Face directories for `tessera convert from-hf`: each refused in
one line naming the file and the key or tensor, before any process starts, and nothing outside
the directory is ever read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny_hf import from_hf_error, small_hf

from tessera.trainer.convert import hf


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return small_hf(tmp_path_factory.mktemp("hf") / "llama")


@pytest.fixture
def source(model_dir, tmp_path) -> Path:
    """A copy of the model directory to spoil."""
    return Path(shutil.copytree(model_dir, tmp_path / "hf"))


def as_pickle(directory: Path) -> Path:
    """The directory's weights moved to pytorch_model.bin (read only with --allow-pickle)."""
    from safetensors.torch import load_file

    torch.save(load_file(directory / hf.SAFETENSORS_FILE), directory / hf.PICKLE_FILE)
    (directory / hf.SAFETENSORS_FILE).unlink()
    return directory


# ---------------------------------------------------------------------------------------------
# Weight indexes: only plain file names inside the directory


OUTSIDE_NAMES = ["../outside.safetensors", "/etc/passwd", "shards/model.safetensors", ".."]


@pytest.mark.parametrize("name", OUTSIDE_NAMES)
def test_a_safetensors_index_naming_a_file_outside_is_refused(source, tmp_path, capsys, name):
    # the weights sit next to the directory, where "../outside.safetensors" would find them
    names = hf.safetensors_header(source / hf.SAFETENSORS_FILE)
    (source / hf.SAFETENSORS_FILE).rename(tmp_path / "outside.safetensors")
    index = {"metadata": {}, "weight_map": {tensor: name for tensor in names}}
    (source / hf.SAFETENSORS_INDEX).write_text(json.dumps(index))
    err = from_hf_error(capsys, source, tmp_path / "out")
    assert f"{hf.SAFETENSORS_INDEX}: weight_map names {name!r}, not a file name inside" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["../outside.bin", "/etc/passwd"])
def test_a_pickle_index_naming_a_file_outside_is_refused(source, tmp_path, capsys, name):
    as_pickle(source)
    (source / hf.PICKLE_FILE).rename(tmp_path / "outside.bin")
    index = {"weight_map": {"model.embed_tokens.weight": name}}
    (source / hf.PICKLE_INDEX).write_text(json.dumps(index))
    err = from_hf_error(capsys, source, tmp_path / "out", "--allow-pickle")
    assert f"{hf.PICKLE_INDEX}: weight_map names {name!r}, not a file name inside" in err


@pytest.mark.parametrize("index", [
    [], {"metadata": {}}, {"weight_map": []}, {"weight_map": {}},
    {"weight_map": {"model.norm.weight": 1}}, {"weight_map": {"model.norm.weight": ["a"]}},
], ids=["list", "no-map", "map-list", "map-empty", "file-int", "file-list"])
def test_a_weight_map_not_of_names_is_refused(source, tmp_path, capsys, index):
    (source / hf.SAFETENSORS_INDEX).write_text(json.dumps(index))
    err = from_hf_error(capsys, source, tmp_path / "out")
    assert err.endswith(f"{source / hf.SAFETENSORS_INDEX}: not a weight index (its weight_map "
                        f"must map tensor names to file names)"), err
