"""The learning-rate schedules (cosine, wsd, constant), their keys' checks, and what a resume may
change of them: never the learning rate without a word."""

from __future__ import annotations

import math

import pytest
from multiproc import run_ranks
from training import losses, tiny_config

from tessera.trainer.config import ConfigError, TrainConfig, validate
from tessera.trainer.optim import ScheduleChangeError, check_schedule_change, lr_at

WSD = dict(lr_schedule="wsd", steps=20, warmup_steps=2, decay_steps=5, lr=1e-3, min_lr=1e-4)


def test_wsd_warms_up_holds_then_decays_linearly_or_by_one_minus_sqrt():
    linear = TrainConfig(**WSD)
    assert [lr_at(i, linear) for i in (0, 1)] == [5e-4, 1e-3]
    assert all(lr_at(i, linear) == 1e-3 for i in range(2, 15))  # stable to step 15 (index 14)
    assert lr_at(15, linear) == pytest.approx(1e-4 + 9e-4 * (1 - 1 / 5))  # the first of 5
    assert lr_at(17, linear) == pytest.approx(1e-4 + 9e-4 * (1 - 3 / 5))
    assert lr_at(19, linear) == pytest.approx(1e-4)  # the run's last step trains at min_lr
    assert lr_at(25, linear) == pytest.approx(1e-4)  # and so does any step past it
    root = TrainConfig(**{**WSD, "decay_shape": "1-sqrt"})
    assert lr_at(17, root) == pytest.approx(1e-4 + 9e-4 * (1 - math.sqrt(3 / 5)))
    assert lr_at(19, root) == pytest.approx(1e-4)


def test_constant_and_cosine():
    constant = TrainConfig(lr_schedule="constant", steps=10, warmup_steps=2, lr=1e-3)
    assert [lr_at(i, constant) for i in (0, 1, 5, 9)] == [5e-4, 1e-3, 1e-3, 1e-3]
    cosine = TrainConfig(steps=12, warmup_steps=2, lr=1e-3, min_lr=1e-4)
    assert lr_at(1, cosine) == 1e-3  # the last warmup step trains at the peak
    assert lr_at(6, cosine) == pytest.approx(1e-4 + 9e-4 * 0.5)  # half way through the decay
    assert lr_at(11, cosine) == pytest.approx(1e-4)  # the run's last step trains at min_lr


@pytest.mark.parametrize("keys, key, words", [
    ({"lr_schedule": "step"}, "train.lr_schedule", "cosine, wsd or constant"),
    ({**WSD, "decay_shape": "cosine"}, "train.decay_shape", "linear or 1-sqrt"),
    ({**WSD, "decay_steps": 0}, "train.decay_steps", "needs the length of its final decay"),
    ({**WSD, "decay_steps": 19}, "train.decay_steps", "larger than train.steps - train.warmup"),
    ({"decay_steps": 5}, "train.decay_steps", "cosine does not use it"),
])
def test_bad_schedule_keys_are_named(tmp_path, keys, key, words):
    cfg = tiny_config(tmp_path, tmp_path, **{f"train.{k}": v for k, v in keys.items()})
    with pytest.raises(ConfigError, match=key) as error:
        validate(cfg)
    assert words in str(error.value) and len(str(error.value).splitlines()) == 1


def test_what_a_resume_may_change():
    stable = TrainConfig(**WSD)
    # extending wsd in its stable phase, or a cooldown that starts after the checkpoint: exact
    check_schedule_change(stable, TrainConfig(**{**WSD, "steps": 40}), step=10)
    check_schedule_change(stable, TrainConfig(**{**WSD, "steps": 15, "decay_steps": 5}), step=10)
    # extending once the decay has started changes the learning rate: refused, both shown
    with pytest.raises(ScheduleChangeError, match=r"train.steps 20 -> 40\): the new one does "
                       r"not continue the saved one, which trained step 17 at 0.00064 where "
                       r"the new one gives 0.001"):
        check_schedule_change(stable, TrainConfig(**{**WSD, "steps": 40}), step=17)
    # cosine, extended: refused; allowed on request
    cosine = TrainConfig(steps=20, warmup_steps=2, lr=1e-3, min_lr=1e-4)
    longer = TrainConfig(steps=30, warmup_steps=2, lr=1e-3, min_lr=1e-4)
    with pytest.raises(ScheduleChangeError, match="train.allow_schedule_change=true"):
        check_schedule_change(cosine, longer, step=19)
    check_schedule_change(cosine, TrainConfig(**{**vars(longer), "allow_schedule_change": True}),
                          step=19)
    # a new peak in the stable phase is a change too
    with pytest.raises(ScheduleChangeError, match="train.lr 0.001 -> 0.002"):
        check_schedule_change(stable, TrainConfig(**{**WSD, "lr": 2e-3}), step=10)


def train_or_refuse(configs) -> list:
    """Rank body: train each config; a refused resume gives its message instead of rows."""
    import torch.distributed as dist
    from training import read_metrics

    from tessera.trainer.train import train

    results = []
    for cfg in configs:
        try:
            train(cfg)
        except ScheduleChangeError as e:
            results.append(str(e))
            continue
        results.append(read_metrics(cfg.run.dir) if dist.get_rank() == 0 else None)
    return results


def test_logged_learning_rate_follows_the_schedule_across_resumes(tmp_path, byte_shards):
    """A wsd run of 8 steps continued from its step-4 checkpoint in new run directories, as the
    README's commands do: extended to 12 steps (in its stable phase: every logged learning rate
    is the 12-step schedule's, the losses those of a straight 12-step run), and cooled down over
    steps 5-7. A cosine run extended after 4 steps is refused (its checkpoint stays), then
    allowed."""
    wsd = {"train.lr_schedule": "wsd", "train.decay_steps": 3, "train.warmup_steps": 2,
           "checkpoint.interval": 4, "checkpoint.keep_last": 2}
    step_4 = tmp_path / "wsd" / "checkpoints" / "step-00000004"

    def config(name: str, **keys):
        return tiny_config(tmp_path / name, byte_shards, **{**wsd, **keys})

    cosine = {"train.lr_schedule": "cosine", "train.decay_steps": 0}
    configs = {
        "straight": config("straight", **{"train.steps": 12}),
        "wsd": config("wsd", **{"train.steps": 8}),
        "extended": config("extended", **{"train.steps": 12, "checkpoint.load_from": step_4}),
        "cooldown": config("cooldown", **{"train.steps": 7, "checkpoint.load_from": step_4}),
        "cosine": config("cosine", **cosine, **{"train.steps": 4}),
        "refused": config("cosine", **cosine, **{"train.steps": 12}),
        "allowed": config("cosine", **cosine,
                          **{"train.steps": 12, "train.allow_schedule_change": "true"}),
    }
    runs = dict(zip(configs, run_ranks(1, train_or_refuse, list(configs.values()))[0]))

    def assert_follows(name: str, first_step: int) -> None:
        rows, schedule = runs[name], configs[name].train
        assert [r["step"] for r in rows][-1] == schedule.steps, name
        resumed = [r for r in rows if r["step"] > first_step]
        expected = [lr_at(r["step"] - 1, schedule) for r in resumed]
        assert [r["lr"] for r in resumed] == pytest.approx(expected, rel=1e-12), name

    assert_follows("extended", 4)
    assert losses(runs["extended"]) == losses(runs["straight"])[4:]
    assert_follows("cooldown", 4)
    assert runs["cooldown"][-1]["lr"] == pytest.approx(configs["cooldown"].train.min_lr)
    assert "trained step 4 at" in runs["refused"]
    assert "train.steps 4 -> 12" in runs["refused"]
    assert_follows("allowed", 4)
