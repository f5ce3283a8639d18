"""The ten mistakes a user is most likely to make, each answered by one line on stderr that names
the cause and the fix (and no traceback). The README's "When something goes wrong" lists them."""

from __future__ import annotations

import pytest
from training import tiny_config

from tessera.cli import main


def run_cli(capsys, *argv: str) -> str:
    """The one error line of a failed command."""
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"tessera {argv[0]}: error: "), lines[0]
    return lines[0]


def check(line: str, cause: list[str], fix: list[str]) -> None:
    for text in cause + fix:
        assert text in line, f"{text!r} not in: {line}"


def overrides(run_dir, shards, **extra) -> list[str]:
    cfg = {
        "run.dir": str(run_dir),
        "data.shards": str(shards),
        "data.streams": 2,
        "model.seq_len": 32,
        "train.global_batch_size": 8,
        "train.micro_batch_size": 2,
        "train.steps": 1,
        **extra,
    }
    return [f"{k}={v}" for k, v in cfg.items()]


# 1-2: config syntax


def test_1_misspelled_key(capsys):
    line = run_cli(capsys, "train", "train.step=5")
    check(line, ["unknown config key 'train.step'"], ["did you mean 'train.steps'?"])


def test_2_override_without_equals(capsys):
    line = run_cli(capsys, "train", "train.steps", "5")
    check(line, ["'train.steps' is not of the form dotted.key=value"], ["e.g. train.steps=100"])


# 3-5: data


def test_3_no_data(capsys, tmp_path):
    line = run_cli(capsys, "train", f"run.dir={tmp_path}")
    check(line, ["config key 'data.shards': not set"], ["`tessera prepare` output"])


def test_4_shards_point_at_raw_text(capsys, tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("some text")
    line = run_cli(capsys, "train", f"data.shards={tmp_path / 'corpus'}")
    check(line, ["manifest.json: no manifest"], ["written by `tessera prepare`"])


def test_5_validation_shards_are_training_shards(capsys, tmp_path, byte_shards):
    line = run_cli(
        capsys,
        "train",
        *overrides(
            tmp_path, byte_shards, **{"data.valid_shards": f"{byte_shards}/shard-000000.tar"}
        ),
    )
    check(
        line,
        ["data.valid_shards:", "is also training data"],
        ["prepare held-out text into its own directory", "data.valid_shards="],
    )


# 6-7: launch and layout


@pytest.fixture
def not_launched(monkeypatch):
    """A plain shell: no launcher variables (an earlier in-process run may have set them)."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


def test_6_ranks_do_not_fit_the_layout(capsys, tmp_path, byte_shards, not_launched):
    argv = overrides(tmp_path, byte_shards, **{"launch.nproc_per_node": 3, "parallel.tp": 2})
    assert main(["train", *argv]) == 2
    out = capsys.readouterr().out
    assert "tessera: starting 3 ranks (tp=2 pp=1) for" in out  # no dp=1 before the error
    line = run_cli(capsys, "train", *argv)
    check(
        line,
        ["world size 3 is not divisible by tp*pp = 2*1 = 2"],
        ["run a multiple of 2 ranks", "launch.nproc_per_node"],
    )


def test_7_global_batch_does_not_split_over_ranks(capsys, tmp_path, byte_shards, not_launched):
    line = run_cli(
        capsys,
        "train",
        *overrides(
            tmp_path,
            byte_shards,
            **{
                "launch.nproc_per_node": 2,
                "train.global_batch_size": 4,
                "train.micro_batch_size": 4,
            },
        ),
    )
    check(
        line,
        ["'train.global_batch_size': 4 is not divisible by train.micro_batch_size*dp = 4*2"],
        ["make it a multiple of 8"],
    )


# 8: model against data


def test_8_vocabulary_smaller_than_the_tokenizer(capsys, tmp_path, byte_shards):
    line = run_cli(capsys, "train", *overrides(tmp_path, byte_shards, **{"model.vocab_size": 100}))
    check(
        line,
        ["'model.vocab_size': 100 is smaller than the data's tokenizer vocabulary (257)"],
        ["set it to at least 257, or to null"],
    )


# 9: resume


@pytest.mark.slow
def test_9_resume_at_another_layout(capsys, tmp_path, byte_shards):
    from tessera.trainer.train import train

    train(tiny_config(tmp_path, byte_shards, **{"train.steps": 1}))
    capsys.readouterr()
    line = run_cli(
        capsys,
        "train",
        *overrides(
            tmp_path,
            byte_shards,
            **{
                "train.steps": 2,
                "model.num_kv_heads": 2,
                "run.seed": 3,
                "train.lr": 3e-3,
                "train.min_lr": 3e-4,
                "train.warmup_steps": 2,
                "checkpoint.interval": 0,
                "parallel.zero_stage": 1,
            },
        ),
    )
    check(
        line,
        ["saved at another parallel layout (parallel.zero_stage: checkpoint 0, now 1)"],
        ["tessera convert reshard"],
    )


# 10: samples


def test_10_generate_from_a_directory_without_checkpoints(capsys, tmp_path):
    line = run_cli(capsys, "generate", str(tmp_path), "--prompt", "hello")
    check(
        line,
        ["holds no committed checkpoint"],
        ["give a step directory", "tessera checkpoint list RUN_DIR"],
    )


def test_6b_torchrun_rank_count_that_does_not_fit(capsys, tmp_path, byte_shards, monkeypatch):
    """`torchrun --nproc_per_node=1 -m tessera train parallel.tp=2`: the same one line, before
    any process group exists."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    line = run_cli(capsys, "train", *overrides(tmp_path, byte_shards, **{"parallel.tp": 2}))
    check(line, ["world size 1 is not divisible by tp*pp = 2*1 = 2"], ["run a multiple of 2 ranks"])


@pytest.mark.parametrize("env, words", [
    ({"RANK": "abc"}, "environment variable RANK='abc' is not a rank"),
    ({"WORLD_SIZE": "0"}, "environment variable WORLD_SIZE='0' is not a number of processes"),
    ({"LOCAL_RANK": "-1"}, "environment variable LOCAL_RANK='-1' is not a local rank"),
    ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR is not set"),  # left over from torchrun
])
def test_6c_stray_launcher_variables(capsys, tmp_path, byte_shards, not_launched, monkeypatch,
                                     env, words):
    """Variables left in a shell, not a torch or DeepSpeed traceback: one line naming them."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    line = run_cli(capsys, "train", *overrides(tmp_path, byte_shards))
    check(line, [words], ["torchrun sets", "unset"])


@pytest.mark.parametrize("argv", [["status"], ["checkpoint", "list"], ["checkpoint", "inspect"],
                                  ["convert", "to-hf"], ["convert", "reshard"]])
def test_each_commands_help_shows_its_usage(capsys, argv):
    try:
        code = main([*argv, "--help"])
    except SystemExit as e:  # argparse's --help
        code = e.code
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("usage:") and "usage: usage:" not in out


def test_a_mistake_found_by_the_ranks_is_said_once_and_named_by_the_launcher(
        tmp_path, byte_shards):
    """`model.vocab_size` below the data's vocabulary is found by each rank once it reads the
    data: rank 0 says so, rank 1, which met the same, leaves it to rank 0, and the launcher adds
    one line naming rank 0 (not torch's agent's glog lines, nor "failed" as if it had crashed)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    argv = overrides(tmp_path, byte_shards, **{"model.vocab_size": 100,
                                               "launch.nproc_per_node": 2})
    done = subprocess.run([sys.executable, "-m", "tessera", "train", *argv], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 2, done.stderr
    assert lines[0].startswith("tessera train: error: config key 'model.vocab_size': 100 is "
                               "smaller"), done.stderr
    assert lines[1] == "tessera: stopped by rank 0's error above", done.stderr


def test_the_launchers_line_for_each_way_a_rank_ends():
    from tessera.launch.local import how_ranks_ended

    assert how_ranks_ended(1, 2) == "stopped by rank 1's error above"
    assert how_ranks_ended(0, 75) is None  # stopped and saved: rank 0 said "run again"
    assert how_ranks_ended(3, -9) == ("rank 3 was killed by SIGKILL (by the out-of-memory "
                                      "killer where `dmesg` says so); its output is above")
    assert how_ranks_ended(3, -40) == "rank 3 was killed by signal 40; its output is above"
    assert how_ranks_ended(0, 1) == "rank 0 failed with exit code 1; its output is above"


def test_the_launcher_names_the_rank_that_said_the_error():
    from tessera.launch.local import failure_to_name

    # rank 1 met rank 0's error and said nothing; torch's agent reaped it first
    assert failure_to_name({0: 2, 1: 2}, first_reaped=1) == 0
    # rank 2 alone failed on its own data; the others left after it (exit 1)
    assert failure_to_name({0: 1, 1: 1, 2: 2}, first_reaped=0) == 2
    # a crash: the first failure torch saw, not the peers that left after it
    assert failure_to_name({0: 1, 3: -11}, first_reaped=3) == 3


def test_a_second_config_file_is_refused_not_dropped(capsys):
    with pytest.raises(SystemExit) as leaving:
        main(["print-config", "--config", "configs/demo.yaml", "--config", "configs/llama-1b.yaml"])
    assert leaving.value.code == 2
    assert "--config given 2 times (configs/demo.yaml, configs/llama-1b.yaml)" in \
        capsys.readouterr().err
