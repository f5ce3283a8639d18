"""Config: YAML + overrides into typed dataclasses; every mistake names its key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tessera.trainer.config import ConfigError, load_config, validate

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo.yaml"


def test_yaml_and_overrides_merge_into_typed_dataclasses():
    cfg = load_config(DEMO, ["train.steps=7", "--parallel.tp=1", "model.rope_theta=500000",
                             "data.shards=[a,b]"])
    assert cfg.train.steps == 7 and cfg.parallel.tp == 1
    assert cfg.model.rope_theta == 500000.0 and isinstance(cfg.model.rope_theta, float)
    assert cfg.data.shards == ["a", "b"]
    assert cfg.model.hidden_size == 128  # from the YAML
    assert cfg.run.seed == 1234


def test_shipped_configs_validate():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path)
        validate(cfg)
    big = load_config(REPO / "configs" / "llama-1b.yaml")
    validate(big, world_size=big.slurm.nodes * big.slurm.tasks_per_node)


@pytest.mark.parametrize("override, expected", [
    ("trian.steps=3", "unknown config key 'trian'; did you mean 'train'?"),
    ("train.setps=3", "unknown config key 'train.setps'; did you mean 'train.steps'?"),
    ("model.hiden_size=3", "did you mean 'model.hidden_size'?"),
])
def test_unknown_key_names_the_nearest_valid_key(override, expected):
    with pytest.raises(ConfigError, match=expected.replace("?", r"\?").replace("(", r"\(")):
        load_config(None, [override])


@pytest.mark.parametrize("override, expected", [
    ("train.steps=abc", "'train.steps' must be int, got str 'abc'"),
    ("train.lr=fast", "'train.lr' must be float"),
    ("model.tie_embeddings=3", "'model.tie_embeddings' must be bool"),
    ("train.steps=2.5", "'train.steps' must be int, got float"),
    ("train=3", "train: expected a mapping"),
])
def test_wrong_type_names_key_and_expected_type(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [override])


def test_malformed_override_and_missing_file():
    with pytest.raises(ConfigError, match="not of the form dotted.key=value"):
        load_config(None, ["train.steps"])
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config("nope.yaml")


def test_a_config_path_that_is_no_file_says_what_it_is(tmp_path):
    with pytest.raises(ConfigError, match="^config file /dev/null is a character device, not a "
                                          "YAML file$"):
        load_config("/dev/null")
    with pytest.raises(ConfigError, match=f"^config file {tmp_path} is a directory, not a YAML "
                                          f"file$"):
        load_config(tmp_path)


def test_an_empty_run_dir_is_called_empty():
    with pytest.raises(ConfigError, match="^config key 'run.dir' is empty; it must be str$"):
        load_config(None, ["run.dir="])  # the shell's run.dir='' (OmegaConf reads null)
    assert load_config(None, ["run.name="]).run.name is None  # null where null is allowed
    with pytest.raises(ConfigError, match="^config key 'run.dir': is empty"):
        validate(load_config(None, ["run.dir=''"]))  # an empty string


def test_interpolations_name_any_key(tmp_path):
    cfg = load_config(None, ["train.min_lr=${train.lr}"])  # train.lr: its default
    assert cfg.train.min_lr == cfg.train.lr == 3e-4
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 0.01\n  min_lr: ${train.lr}\n")
    assert load_config(path, ["train.lr=0.5"]).train.min_lr == 0.5  # after the override
    assert load_config(path).model.hidden_size == 64  # the rest: defaults, as without one
    with pytest.raises(ConfigError, match="^config key 'train.min_lr': cannot resolve it: "
                                          "Interpolation key 'train.nope' not found$"):
        load_config(None, ["train.min_lr=${train.nope}"])


@pytest.mark.parametrize("overrides, world_size, key, text", [
    (["model.num_heads=6"], None, "model.hidden_size", "not divisible by model.num_heads=6"),
    (["model.num_kv_heads=3"], None, "model.num_kv_heads", "does not divide model.num_heads=4"),
    (["parallel.tp=3"], None, "parallel.tp", "does not divide model.num_heads=4"),
    (["model.num_kv_heads=1", "parallel.tp=2"], None, "parallel.tp", "does not divide "
        "model.num_kv_heads=1"),
    (["parallel.zero_stage=4"], None, "parallel.zero_stage", "must be 0, 1, 2 or 3"),
    (["parallel.pp=2", "parallel.zero_stage=2"], None, "parallel.zero_stage", "supports only "
        "stages 0 and 1"),
    (["parallel.pp=2", "parallel.zero_stage=3"], None, "parallel.zero_stage", "supports only "
        "stages 0 and 1"),
    (["parallel.pp=3"], None, "parallel.pp", "exceeds model.num_layers=2"),
    (["parallel.pp=2", "parallel.pipeline_partition=[1,2]"], None, "parallel.pipeline_partition",
     "sums to 3 blocks but model.num_layers=2"),
    (["parallel.pp=2", "parallel.pipeline_partition=[2]"], None, "parallel.pipeline_partition",
     "lists 1 stages but parallel.pp=2"),
    (["parallel.pipeline_partition=balanced"], None, "parallel.pipeline_partition", "must be "
        "parameters, uniform"),
    (["parallel.sequence_parallel=true"], None, "parallel.sequence_parallel", "needs tensor "
        "parallelism"),
    (["train.precision=fp16"], None, "train.precision", "must be fp32 or bf16"),
    (["train.activation_checkpointing=some"], None, "train.activation_checkpointing", "must be "
        "none or full"),
    (["train.global_batch_size=10", "train.micro_batch_size=4"], None, "train.global_batch_size",
     "not divisible by train.micro_batch_size=4"),
    (["train.min_lr=1.0"], None, "train.min_lr", "must lie between 0 and train.lr"),
    (["train.grad_clip=-1"], None, "train.grad_clip", "must be >= 0"),
    (["resilience.max_restarts=-1"], None, "resilience.max_restarts", "must be >= 0"),
    (["resilience.hang_timeout_s=2"], None, "resilience.hang_timeout_s", "2.0 s is too short to "
        "tell a hang from a slow step: at least 5 s"),
    (["resilience.straggler_factor=0.9"], None, "resilience.straggler_factor", "must be above 1"),
    (["resilience.exclude_after=-2"], None, "resilience.exclude_after", "must be >= 0"),
    (["run.seed=-1"], None, "run.seed", "must be >= 0, got -1"),
    (["checkpoint.load_weights_only=true"], None, "checkpoint.load_weights_only", "true needs "
        "checkpoint.load_from"),
    (["model.max_positions=8"], None, "model.max_positions", "8 is below model.seq_len=64"),
    (["parallel.tp=2"], 3, "parallel.tp", "world size 3 is not divisible by tp\\*pp = 2\\*1 = 2"),
    (["train.global_batch_size=8", "train.micro_batch_size=4"], 4, "train.global_batch_size", "not "
        "divisible by train.micro_batch_size\\*dp = 4\\*4"),
])
def test_cross_field_errors_name_the_key(overrides, world_size, key, text):
    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError, match=f"config key '{key}': .*{text}"):
        validate(cfg, world_size)


@pytest.mark.parametrize("override, text", [
    ("model.hidden_size=0", "must be at least 1, got 0"),
    ("model.num_heads=0", "must be at least 1, got 0"),  # before anything divides by it
    ("model.vocab_size=0", "must be at least 1, got 0"),
    ("model.norm_eps=0", "must be a positive number"),
    ("model.rope_theta=-5", "must be a positive number"),
    ("train.lr=-1", "must be a positive number, got -1.0"),  # train.lr, not train.min_lr
    ("train.lr=1e308", "1e\\+308 is above float32's largest number \\(3.403e\\+38\\)"),
    ("train.adam_beta1=1.5", "must lie in \\[0, 1\\), got 1.5"),
    ("train.adam_beta2=1.0", "must lie in \\[0, 1\\)"),
    ("train.adam_eps=0", "must be a positive number"),
    ("train.weight_decay=-0.1", "must be >= 0"),
    ("data.streams=0", "must be at least 1"),
    ("data.shuffle_buffer=-1", "must be >= 0"),
    ("data.max_consecutive_errors=0", "must be at least 1"),
])
def test_numbers_out_of_range_name_the_key(override, text):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"config key '{key}': {text}"):
        validate(load_config(None, [override]))


@pytest.mark.parametrize("yaml_text, text", [
    ("- run\n- model\n", "the top level must be a mapping of sections .*, not a list"),
    ("train: {steps: [\n", "not valid YAML \\(while parsing a flow node; .*line 2, column 1\\)"),
    ("train:\n  steps: 5\n  lr: : 3\n", "not valid YAML \\(mapping values are not allowed"),
    ("hello\n", "the top level must be a mapping of sections \\(run:, model:, train:, "
     "...\\), not the single value 'hello'"),  # not "unknown config key 'hello'"
    ("5\n", "must be a mapping of sections .*, not the single value '5'"),
])
def test_a_config_file_that_is_not_a_mapping_is_one_line(tmp_path, yaml_text, text):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=text) as error:
        load_config(path)
    assert "\n" not in str(error.value)


def test_sequence_parallel_without_cuda_is_a_clear_error(tmp_path, byte_shards):
    from tessera.trainer.train import train

    cfg = load_config(None, ["parallel.tp=2", "parallel.sequence_parallel=true",
                             f"data.shards={byte_shards}", f"run.dir={tmp_path}"])
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="'parallel.sequence_parallel': needs CUDA"):
        train(cfg)
    assert not (tmp_path / "config.yaml").exists()  # nothing started


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tessera", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def test_print_config_prints_the_resolved_config():
    result = run_cli("print-config", "--config", str(DEMO), "train.steps=42",
                     "--model.num_layers=3")
    assert result.returncode == 0, result.stderr
    loaded = __import__("yaml").safe_load(result.stdout)
    assert loaded["train"]["steps"] == 42 and loaded["model"]["num_layers"] == 3
    assert loaded["model"]["hidden_size"] == 128


@pytest.mark.parametrize("args, text", [
    (["train.stepz=3"], "unknown config key 'train.stepz'; did you mean 'train.steps'?"),
    (["model.num_heads=3"], "config key 'model.hidden_size'"),
    (["parallel.tp=3"], "config key 'parallel.tp'"),
])
def test_cli_errors_are_one_line_and_nonzero(args, text):
    result = run_cli("train", "--config", str(DEMO), *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tessera train: error: ") and text in lines[0]


def test_train_refuses_a_layout_the_world_size_does_not_divide():
    result = run_cli("train", "--config", str(DEMO), "launch.nproc_per_node=3")
    assert result.returncode == 2
    assert "world size 3 is not divisible by tp*pp = 2*1 = 2" in result.stderr


def test_a_renamed_key_names_its_new_name_and_old_checkpoints_still_read(tmp_path):
    with pytest.raises(ConfigError, match="config key 'train.eval_steps' is now "
                                          "'train.eval_batches'"):
        load_config(None, ["train.eval_steps=3"])
    saved = tmp_path / "config.yaml"  # a checkpoint's config.yaml from before the rename
    saved.write_text("train:\n  eval_steps: 3\n")
    assert load_config(saved, [], saved=True).train.eval_batches == 3
    with pytest.raises(ConfigError, match="is now 'train.eval_batches'"):
        load_config(saved, [])  # as a user's own config file
