"""Hostile and careless Hugging Face directories for `tessera convert from-hf`: each refused in
one line naming the file and the key or tensor, before any process starts, and nothing outside
the directory is ever read."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
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


# ---------------------------------------------------------------------------------------------
# safetensors headers: checked entry by entry, as the safetensors library will read them


NORM = "model.norm.weight"  # 16 float32 values: 64 bytes
NORMS = ("model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight")


def rewrite_header(path: Path, change, extra: bytes = b"") -> None:
    """The file with its header replaced by change(header), its tensors' bytes kept (and
    `extra` bytes after them)."""
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.dumps(change(json.loads(data[8 : 8 + length]))).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + data[8 + length :] + extra)


def norm_entry(**fields):
    """A header with model.norm.weight's entry changed: a field None is dropped."""
    def change(header: dict) -> dict:
        entry = {k: v for k, v in {**header[NORM], **fields}.items() if v is not None}
        return {**header, NORM: entry}
    return change


def same_offsets(header: dict) -> dict:
    """Two tensors of one size on the same bytes."""
    first, second = NORMS
    return {**header, second: {**header[second], "data_offsets": header[first]["data_offsets"]}}


HEADERS = {
    "header-list": (lambda h: list(h), "not a safetensors file (its header is not a JSON object)"),
    "entry-string": (lambda h: {**h, NORM: "F32"},
                     f"tensor {NORM}: its header entry 'F32' is not a JSON object"),
    "no-offsets": (norm_entry(data_offsets=None),
                   f"tensor {NORM}: data_offsets None is not [begin, end]"),
    "offsets-string": (norm_entry(data_offsets="0:64"),
                       f"tensor {NORM}: data_offsets '0:64' is not [begin, end]"),
    "shape-string": (norm_entry(shape="16"), f"tensor {NORM}: shape '16' is not a list of sizes"),
    "shape-larger": (norm_entry(shape=[32]), "span 64 bytes, its dtype F32 and shape [32] 128"),
    "dtype-smaller": (norm_entry(dtype="F16"), "span 64 bytes, its dtype F16 and shape [16] 32"),
    "dtype-list": (norm_entry(dtype=["F32"]), f"tensor {NORM} has dtype ['F32'], not a float"),
    "overlapping": (same_offsets, "not where the tensor before it ends"),
    "metadata-int": (lambda h: {**h, "__metadata__": {"format": 1}},
                     "__metadata__ is not a mapping of strings"),
}


@pytest.mark.parametrize("case", list(HEADERS))
def test_a_bad_safetensors_header_is_named_by_file_and_tensor(source, tmp_path, capsys, case):
    change, message = HEADERS[case]
    rewrite_header(source / hf.SAFETENSORS_FILE, change)
    err = from_hf_error(capsys, source, tmp_path / "out")
    assert f"{source / hf.SAFETENSORS_FILE}: " in err and message in err, err


def test_bytes_after_the_last_tensor_are_refused(source, tmp_path, capsys):
    rewrite_header(source / hf.SAFETENSORS_FILE, lambda h: h, extra=bytes(8))
    err = from_hf_error(capsys, source, tmp_path / "out")
    assert f"{hf.SAFETENSORS_FILE}: 8 bytes after its last tensor" in err


# ---------------------------------------------------------------------------------------------
# Pickle weights (--allow-pickle): a state dict or nothing


@pytest.mark.parametrize("contents, message", [
    ([torch.zeros(2)], "holds a list, not a state dict"),
    ({"a": 1}, "entry 'a' is a int, not a tensor"),
    ({NORM: "weights"}, f"entry '{NORM}' is a str, not a tensor"),
    ({1: torch.zeros(2)}, "a name 1 that is not a string: not a state dict"),
], ids=["list", "int-value", "str-value", "int-name"])
def test_a_pickle_that_is_not_a_state_dict_is_refused(source, tmp_path, capsys, contents,
                                                      message):
    as_pickle(source)
    torch.save(contents, source / hf.PICKLE_FILE)
    err = from_hf_error(capsys, source, tmp_path / "out", "--allow-pickle")
    assert f"{source / hf.PICKLE_FILE}: {message}" in err, err


# ---------------------------------------------------------------------------------------------
# config.json: every value read with its type checked, refused under its own key


MISTRAL = {"model_type": "mistral", "architectures": ["MistralForCausalLM"]}
YARN = {"rope_type": "yarn", "rope_theta": 1e4}
# name -> (keys changed, what follows "config.json: " in the error)
CONFIGS = {
    "heads-zero": ({"num_attention_heads": 0}, "num_attention_heads=0: must be an integer >= 1"),
    "rope-scaling-string": ({"rope_scaling": "linear"},
                            "rope_scaling='linear': must be an object (or null)"),
    "rope-scaling-list": ({"rope_scaling": ["linear"]},
                          "rope_scaling=['linear']: must be an object (or null)"),
    "rope-parameters-string": ({"rope_parameters": "default"},
                               "rope_parameters='default': must be an object (or null)"),
    "rope-theta-string": ({"rope_parameters": None, "rope_theta": "big"},
                          "rope_theta='big': must be a number > 0"),
    "rope-theta-inside": ({"rope_parameters": {"rope_type": "default", "rope_theta": "big"}},
                          "rope_parameters.rope_theta='big': must be a number > 0"),
    "rope-type-list": ({"rope_parameters": {"rope_type": ["yarn"]}},
                       "rope_parameters.rope_type=['yarn'] is not supported"),
    "rope-legacy-type": ({"rope_scaling": {"type": "dynamic", "factor": 2.0}},
                         "rope_scaling.type='dynamic' is not supported"),
    "yarn-original-zero": ({"rope_parameters": {**YARN, "original_max_position_embeddings": 0}},
                           "rope_parameters.original_max_position_embeddings=0: must be a number"),
    "eps-string": ({"rms_norm_eps": "x"}, "rms_norm_eps='x': must be a number > 0"),
    "eps-zero": ({"rms_norm_eps": 0}, "rms_norm_eps=0: must be a number > 0"),
    "positions-string": ({"max_position_embeddings": "x"},
                         "max_position_embeddings='x': must be an integer >= 1"),
    "positions-negative": ({"max_position_embeddings": -5},
                           "max_position_embeddings=-5: must be an integer >= 1"),
    "model-type-list": ({"model_type": ["llama"]}, "model_type=['llama'] is not one Tessera"),
    "architectures-string": ({"architectures": "LlamaForCausalLM"},
                             "architectures='LlamaForCausalLM': must be a list of class names"),
    "kv-heads-string": ({"num_key_value_heads": "2"},
                        "num_key_value_heads='2': must be an integer >= 1"),
    "kv-heads-not-dividing": ({"num_key_value_heads": 3},
                              "num_key_value_heads=3 does not divide num_attention_heads=2"),
    "head-dim-string": ({"head_dim": "16"}, "head_dim='16': must be an integer >= 1"),
    "head-dim-odd": ({"head_dim": 7}, "a head size of 7 (head_dim, or hidden_size"),
    "hidden-not-dividing": ({"head_dim": None, "num_attention_heads": 3},
                            "hidden_size=16 is not divisible by num_attention_heads=3"),
    "tie-string": ({"tie_word_embeddings": "false"},
                   "tie_word_embeddings='false': must be true or false"),
    "layers-absurd": ({"num_hidden_layers": 10**9},
                      "num_hidden_layers=1000000000: more than 10000"),
    "layers-float": ({"num_hidden_layers": 1e9}, "num_hidden_layers=1000000000.0: must be an"),
    "vocab-missing": ({"vocab_size": None}, "vocab_size is missing"),
    "sliding-window-string": ({**MISTRAL, "sliding_window": "x"},
                              "sliding_window='x': must be an integer >= 1"),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_a_bad_config_value_is_named_by_its_key(source, tmp_path, capsys, case):
    changes, message = CONFIGS[case]
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, **changes}))
    err = from_hf_error(capsys, source, tmp_path / "out")
    assert f"{source / 'config.json'}: {message}" in err, err


# ---------------------------------------------------------------------------------------------
# A directory without tokenizer.json: imported, with a note; the import then says it has none


def tessera(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tessera", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def test_an_import_without_a_tokenizer_says_so_and_prepare_names_it(model_dir, tmp_path):
    out = tmp_path / "imported"
    done = tessera(tmp_path, "convert", "from-hf", str(model_dir), str(out), "model.seq_len=16")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"tessera: note: {model_dir} has no tokenizer.json, so the import carries no " \
           f"tokenizer: give tessera prepare, generate and convert to-hf --tokenizer a " \
           f"tokenizer.json" in done.stdout.splitlines()
    (tmp_path / "docs.jsonl").write_text('{"text": "some text"}\n')
    done = tessera(tmp_path, "prepare", str(tmp_path / "docs.jsonl"), "--output",
                   str(tmp_path / "prepared"), "--tokenizer", str(out))
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    step = out / "checkpoints" / "step-00000000"
    assert f"{step} is a Tessera checkpoint that carries no tokenizer" in done.stderr
    assert "pass --tokenizer a tokenizer.json" in done.stderr


@pytest.mark.parametrize("text, message", [
    ("[" * 100_000, "unreadable (maximum recursion depth exceeded"),
    ("[]", "not a model config (a JSON object)"),
], ids=["nested-deep", "list"])
def test_a_config_json_that_is_no_object_is_refused(source, tmp_path, capsys, text, message):
    (source / "config.json").write_text(text)
    err = from_hf_error(capsys, source, tmp_path / "out")
    assert f"{source / 'config.json'}: {message}" in err, err


@pytest.mark.parametrize("file", [hf.SAFETENSORS_INDEX, hf.SAFETENSORS_FILE])
def test_deeply_nested_json_in_weight_files_is_refused(source, tmp_path, capsys, file):
    text = ("[" * 100_000).encode()
    if file == hf.SAFETENSORS_FILE:
        text = struct.pack("<Q", len(text)) + text
    (source / file).write_bytes(text)
    err = from_hf_error(capsys, source, tmp_path / "out")
    assert f"{source / file}: not a " in err and "maximum recursion depth" in err, err
