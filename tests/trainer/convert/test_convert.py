"""Checkpoint conversion on real engines and checkpoints of real training runs (gloo, CPU).

- to-hf: transformers' LlamaForCausalLM on the export against our model at the layout that
  trained it (tp=1, tp=2, pp=2, tp=2 x pp=2, ZeRO-3; GQA; tied and untied; vocabulary 257, not
  divisible by tp): mean KL of the next-token distributions below 1e-9, 20 greedy tokens equal.
- from-hf: a random LlamaForCausalLM saved with save_pretrained, imported at tp=2 x pp=2 and
  loaded the way `tessera train checkpoint.load_from=OUT checkpoint.load_weights_only=true` does.
- ours -> HF -> ours: every tensor bitwise equal.
- reshard: a (tp=2, dp=2, ZeRO-1) checkpoint after 5 of 10 steps, resharded to (tp=1, pp=2) and
  to one process, continues with the losses of the original layout; weights, fp32 masters and
  Adam moments come through bitwise; so they do through ZeRO-3 (dp=4), BF16_Optimizer (bf16,
  pp=2) and the unfused bf16 optimizer (one process).
Runs are grouped by world size (one spawned process group each): 4, then 2, then 1 ranks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from hfcheck import (
    NEW_TOKENS,
    PROMPT,
    assert_hf_matches,
    layout_predictions,
)
from multiproc import run_ranks
from tiny_hf import from_hf_error, small_hf
from training import losses, tiny_config, train_each

from tessera.trainer.checkpoint import CheckpointError
from tessera.trainer.config import ConfigError, load_config
from tessera.trainer.convert import (
    convert_command,
    from_hf,
    from_hf_config,
    hf,
    reshard,
    reshard_config,
    to_hf,
)
from tessera.trainer.convert.reader import KINDS, CheckpointReader

TRAIN_STEPS = 16  # for the to-hf sources: enough that greedy continuations are not trivial

# to-hf sources: name -> (world size, overrides)
EXPORTS = {
    "tp1": (1, {}),
    "tp2-tied": (2, {"parallel.tp": 2, "model.tie_embeddings": True}),
    "pp2-tied": (2, {"parallel.pp": 2, "model.tie_embeddings": True}),
    "dp2-zero3": (2, {"parallel.zero_stage": 3}),
    "tp2-pp2": (4, {"parallel.tp": 2, "parallel.pp": 2}),
}


# ---------------------------------------------------------------------------------------------
# Rank bodies


def train_and_predict(configs: list) -> list:
    rows = train_each(configs)
    return [(r, layout_predictions(cfg)) for r, cfg in zip(rows, configs)]


def reshard_in_rank(source: Path, out: Path, overrides: list[str]) -> None:
    """Collective: reshard `source` (a checkpoint written inside this process group) to `out`."""
    reshard(source, reshard_config(CheckpointReader(source), out, overrides))


def four_ranks(exports: list, source, import_job: tuple, round_trip: tuple, zero3: Path) -> dict:
    hf_dir, import_cfg, import_load_cfg = import_job
    export_dir, round_trip_dir = round_trip
    (source_rows,) = train_each([source])
    reshard_in_rank(Path(source.run.dir), zero3, ["parallel.tp=1", "parallel.zero_stage=3"])
    exported = train_and_predict(exports)
    from_hf(hf_dir, import_cfg)
    imported = layout_predictions(import_load_cfg)
    if dist.get_rank() == 0:  # ours -> HF (files only) -> ours at the same layout
        to_hf(exports[-1].run.dir, export_dir)
    dist.barrier()
    round_trip_cfg = from_hf_config(
        hf.HFCheckpoint(export_dir),
        round_trip_dir,
        ["parallel.tp=2", "parallel.pp=2", "model.seq_len=32"],
    )
    from_hf(export_dir, round_trip_cfg)
    return {"source": source_rows, "exported": exported, "imported": imported}


def two_ranks(exports: list, resharded, wrong_layout, formats: tuple) -> dict:
    from tessera.trainer.train import train

    exported = train_and_predict(exports)
    zero3_run, bf16_out = formats  # dp=2 ZeRO-3 fp32 -> pp=2 bf16 (DeepSpeed's BF16_Optimizer)
    reshard_in_rank(
        zero3_run, bf16_out, ["parallel.pp=2", "parallel.zero_stage=0", "train.precision=bf16"]
    )
    source, cfg = resharded
    reshard(source, cfg)
    (continued,) = train_each([load_config(Path(cfg.run.dir) / "config.yaml")])
    try:
        train(wrong_layout)
        message = None
    except CheckpointError as e:
        message = str(e)
    return {"exported": exported, "continued": continued, "wrong_layout": message}


def one_rank(exports: list, resharded, formats: tuple) -> dict:
    exported = train_and_predict(exports)
    bf16_run, unfused_out = formats  # -> one process, bf16 (DeepSpeed's FP16_UnfusedOptimizer)
    reshard_in_rank(bf16_run, unfused_out, ["parallel.pp=1"])
    source, cfg = resharded
    reshard(source, cfg)
    (continued,) = train_each([load_config(Path(cfg.run.dir) / "config.yaml")])
    return {"exported": exported, "continued": continued}


# ---------------------------------------------------------------------------------------------
# Fixtures: three process groups, run once for the module


def export_config(base: Path, shards: Path, name: str):
    return tiny_config(base / name, shards, **{"train.steps": TRAIN_STEPS, **EXPORTS[name][1]})


def exports_of(world: int, base: Path, shards: Path) -> list:
    return [export_config(base, shards, n) for n, (w, _) in EXPORTS.items() if w == world]


@pytest.fixture(scope="module")
def random_hf(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A random tied GQA LlamaForCausalLM (norms perturbed too), nothing downloaded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=257,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 5e5},
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=256,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    directory = tmp_path_factory.mktemp("random-hf") / "llama"
    model.save_pretrained(directory)
    return directory, model


@pytest.fixture(scope="module")
def world4(tmp_path_factory, byte_shards, random_hf) -> dict:
    base = tmp_path_factory.mktemp("convert4")
    source = tiny_config(
        base / "source",
        byte_shards,
        **{"parallel.tp": 2, "parallel.zero_stage": 1, "checkpoint.interval": 5},
    )
    hf_dir, _ = random_hf
    import_cfg = from_hf_config(
        hf.HFCheckpoint(hf_dir),
        base / "imported",
        ["parallel.tp=2", "parallel.pp=2", "model.seq_len=32"],
    )
    import_load_cfg = load_config(
        None,
        [
            "run.dir=" + str(base / "import-run"),
            "parallel.tp=2",
            "parallel.pp=2",
            f"checkpoint.load_from={base / 'imported'}",
            "checkpoint.load_weights_only=true",
        ],
    )
    import_load_cfg.model = import_cfg.model
    round_trip = (base / "tp2-pp2-hf", base / "round-trip")
    result = run_ranks(
        4,
        four_ranks,
        exports_of(4, base, byte_shards),
        source,
        (hf_dir, import_cfg, import_load_cfg),
        round_trip,
        base / "dp4-zero3",
    )[0]
    return {**result, "base": base, "exports": exports_of(4, base, byte_shards)}


def resharded_config(source_run: Path, out: Path, overrides: list[str]):
    reader = CheckpointReader(source_run / "checkpoints" / "step-00000005")
    return str(reader.directory), reshard_config(reader, out, overrides)


@pytest.fixture(scope="module")
def world2(world4, tmp_path_factory, byte_shards) -> dict:
    base = tmp_path_factory.mktemp("convert2")
    source_run = world4["base"] / "source"
    resharded = resharded_config(
        source_run, base / "tp1-pp2", ["parallel.tp=1", "parallel.pp=2", "parallel.zero_stage=0"]
    )
    wrong_layout = load_config(source_run / "config.yaml", ["parallel.tp=1", "parallel.pp=2"])
    formats = (base / "dp2-zero3", base / "pp2-bf16")
    exports = exports_of(2, base, byte_shards)
    result = run_ranks(2, two_ranks, exports, resharded, wrong_layout, formats)[0]
    return {
        **result,
        "base": base,
        "exports": exports_of(2, base, byte_shards),
        "resharded": resharded,
    }


@pytest.fixture(scope="module")
def world1(world4, world2, tmp_path_factory, byte_shards) -> dict:
    base = tmp_path_factory.mktemp("convert1")
    resharded = resharded_config(
        world4["base"] / "source", base / "one-process", ["parallel.tp=1", "parallel.zero_stage=0"]
    )
    formats = (world2["base"] / "pp2-bf16", base / "one-process-bf16")
    result = run_ranks(1, one_rank, exports_of(1, base, byte_shards), resharded, formats)[0]
    return {
        **result,
        "base": base,
        "exports": exports_of(1, base, byte_shards),
        "resharded": resharded,
    }


# ---------------------------------------------------------------------------------------------
# Helpers on the test side


def all_exports(world1, world2, world4) -> dict:
    found = {}
    for world in (world1, world2, world4):
        for cfg, (_, prediction) in zip(world["exports"], world["exported"]):
            found[Path(cfg.run.dir).name] = (cfg, prediction)
    return found


# ---------------------------------------------------------------------------------------------
# Tests


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXPORTS))
def test_to_hf_matches_our_model_at_its_layout(name, world1, world2, world4, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg, prediction = all_exports(world1, world2, world4)[name]
    to_hf(cfg.run.dir, tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert (
        model.config.vocab_size == 257
        and model.config.tie_word_embeddings == cfg.model.tie_embeddings
    )
    assert model.config.num_key_value_heads == 2
    assert_hf_matches(model, prediction, name)


@pytest.mark.slow
def test_export_files_shards_dtype_and_tokenizer(world2, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tessera.cli import main
    from tessera.data.tokenizer import ByteTokenizer

    cfg = world2["exports"][0]  # tp=2, tied
    out = tmp_path / "sharded"
    assert (
        main(
            [
                "convert",
                "to-hf",
                str(Path(cfg.run.dir) / "checkpoints"),
                str(out),
                "--max-shard-size",
                "60KB",
                "--dtype",
                "bf16",
            ]
        )
        == 0
    )
    index = json.loads((out / hf.SAFETENSORS_INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and all((out / f).is_file() for f in files)
    assert "lm_head.weight" not in index["weight_map"]  # tied
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 256
    model = AutoModelForCausalLM.from_pretrained(out)
    reader = CheckpointReader(cfg.run.dir)
    assert torch.equal(
        model.model.embed_tokens.weight, reader.tensor("embed.weight").to(torch.bfloat16)
    )
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = "Grüße, the model reads tokens\n"
    assert tokenizer.encode(text, add_special_tokens=False) == ByteTokenizer().encode(text)
    assert tokenizer.decode(ByteTokenizer().encode(text)) == text
    assert tokenizer.eos_token_id == 256
    assert main(["convert", "to-hf", str(cfg.run.dir), str(out)]) == 2
    assert "not empty" in capsys.readouterr().err


@pytest.mark.slow
def test_a_failed_export_leaves_nothing_and_touches_no_other_directory(world1, tmp_path,
                                                                        monkeypatch):
    """An export is written beside OUT and renamed when whole: one that fails halfway leaves no
    OUT and no partial directory, and a directory of the user's named OUT.tmp is not its own."""
    from tessera.trainer.convert.reader import CheckpointReader

    users = tmp_path / "hf.tmp"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    read, calls = CheckpointReader.tensor, []

    def fail_at_the_second(self, name):
        calls.append(name)
        if len(calls) == 2:
            raise OSError(f"disk full while writing {name}")
        return read(self, name)

    monkeypatch.setattr(CheckpointReader, "tensor", fail_at_the_second)
    with pytest.raises(OSError, match="disk full"):
        to_hf(world1["exports"][0].run.dir, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf.tmp"]
    assert (users / "notes.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match=f"output {tmp_path}/hf.tmp/notes.txt/hf: cannot be "
                                          f"written \\(.*: {tmp_path}/hf.tmp/notes.txt\\)"):
        to_hf(world1["exports"][0].run.dir, users / "notes.txt" / "hf")


@pytest.mark.slow
def test_to_hf_with_a_trained_bpe_tokenizer(world1, tmp_path, monkeypatch):
    import importlib

    from transformers import AutoTokenizer

    from tessera.data.tokenizer import train_bpe

    bpe = train_bpe(["the model reads tokens from shards"] * 20, vocab_size=257)
    bpe.save(tmp_path)
    with monkeypatch.context() as patched:  # as for an import without a tokenizer: --tokenizer
        load_module = importlib.import_module("tessera.trainer.checkpoint.load")
        patched.setattr(load_module, "carried_tokenizer", lambda directory: None)
        to_hf(world1["exports"][0].run.dir, tmp_path / "hf",
              tokenizer=str(tmp_path / "tokenizer.json"))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    umask = os.umask(0o022)  # readable by the others, as a shared cluster's exports are
    try:
        to_hf(world1["exports"][0].run.dir, tmp_path / "shared")
    finally:
        os.umask(umask)
    assert {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "shared").iterdir()
            if p.suffix in (".safetensors", ".json")} == dict.fromkeys(
        ["model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
         "tokenizer_config.json", "special_tokens_map.json"], 0o644)
    assert (tmp_path / "shared").stat().st_mode & 0o777 == 0o755
    text = "the model reads"
    assert tokenizer.encode(text, add_special_tokens=False) == bpe.encode(text)
    assert tokenizer.eos_token_id == bpe.eos_id


@pytest.mark.slow
def test_from_hf_at_tp2_pp2_matches_transformers(world4, random_hf):
    _, model = random_hf
    assert_hf_matches(model, world4["imported"], "random HF Llama imported at tp=2 x pp=2")
    greedy = world4["imported"]["ids"][0, len(PROMPT) : len(PROMPT) + NEW_TOKENS]
    assert len(set(greedy.tolist())) > 1, "a random model's greedy tokens should vary"
    manifest = json.loads(
        (
            world4["base"] / "imported" / "checkpoints" / "step-00000000" / "manifest.json"
        ).read_text()
    )
    assert manifest["layout"]["tp"] == 2 and manifest["layout"]["pp"] == 2


@pytest.mark.slow
def test_ours_to_hf_to_ours_is_bitwise(world4):
    ours = CheckpointReader(world4["exports"][0].run.dir)
    back = CheckpointReader(world4["base"] / "round-trip")
    assert back.tp == 2 and back.pp == 2 and back.names() == ours.names()
    for name in ours.names():
        assert torch.equal(ours.tensor(name), back.tensor(name)), name


@pytest.mark.slow
@pytest.mark.parametrize("target", ["tp1-pp2", "one-process"])
def test_reshard_continues_like_the_original_layout(target, world1, world2, world4):
    continued = {"tp1-pp2": world2, "one-process": world1}[target]
    source_dir, cfg = continued["resharded"]
    before = CheckpointReader(source_dir)
    after = CheckpointReader(Path(cfg.run.dir) / "checkpoints" / "step-00000005")
    assert (before.tp, before.dp, before.zero_stage) == (2, 2, 1)
    assert after.tp == 1 and after.manifest["step"] == 5
    for name in before.names():  # weights, fp32 masters, both Adam moments: none reset
        for kind in KINDS:
            assert torch.equal(before.tensor(name, kind), after.tensor(name, kind)), (name, kind)
    assert after.adam_step() == before.adam_step() == 5
    assert (
        after.state["train"] == before.state["train"]
        and after.state["data"] == before.state["data"]
    )
    original = [row for row in world4["source"] if row["step"] > 5]
    rows = continued["continued"]
    assert [r["step"] for r in rows] == [6, 7, 8, 9, 10]
    assert [r["lr"] for r in rows] == pytest.approx([r["lr"] for r in original], rel=1e-12)
    assert losses(rows) == pytest.approx(losses(original), rel=1e-4)


@pytest.mark.slow
def test_reshard_through_every_optimizer_format_is_bitwise(world1, world2, world4):
    """ZeRO-1 -> ZeRO-3 (dp=4); ZeRO-3 -> BF16_Optimizer (bf16, pp=2); BF16_Optimizer -> the
    unfused bf16 optimizer (one process): weights, fp32 masters, moments all bitwise."""

    def has_file(prefix: str):
        return lambda reader: any(p.name.startswith(prefix) for p in reader.directory.iterdir())

    hops = [
        (
            world4["base"] / "source",
            world4["base"] / "dp4-zero3",
            has_file("zero_pp_rank_3_mp_rank_00_optim_states"),
        ),
        (
            world2["base"] / "dp2-zero3",
            world2["base"] / "pp2-bf16",
            has_file("bf16_zero_pp_rank_0_mp_rank_01_optim_states"),
        ),
        (
            world2["base"] / "pp2-bf16",
            world1["base"] / "one-process-bf16",
            lambda reader: "fp32_groups" in reader.model_states()["optimizer"],
        ),
    ]
    for source, target, written_as_expected in hops:
        before, after = CheckpointReader(source), CheckpointReader(target)
        assert written_as_expected(after), target
        assert after.adam_step() == before.adam_step() > 0
        for name in before.names():
            for kind in KINDS:
                same = torch.equal(before.tensor(name, kind), after.tensor(name, kind))
                assert same, (source.name, target.name, name, kind)


@pytest.mark.slow
def test_training_at_another_layout_names_the_reshard_command(world2):
    message = world2["wrong_layout"]
    assert message is not None and "tessera convert reshard" in message
    assert "parallel.tp" in message


# ---------------------------------------------------------------------------------------------
# Bad input: one-line errors naming the file or tensor, before any process starts


def test_bad_hf_directories(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "out"
    other = small_hf(tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(
        json.dumps({**config, "model_type": "gemma", "architectures": ["GemmaForCausalLM"]})
    )
    assert "model_type='gemma' is not one Tessera trains" in from_hf_error(capsys, other, out)

    remote = small_hf(tmp_path / "remote")
    config = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "x.Y"}}))
    assert "auto_map=" in from_hf_error(capsys, remote, out)
    (remote / "config.json").write_text(json.dumps({**config, "trust_remote_code": True}))
    assert "trust_remote_code=" in from_hf_error(capsys, remote, out)

    # a tokenizer of 257 tokens (the byte tokenizer's) beside a model of 40
    too_big = small_hf(tmp_path / "too_big")
    (too_big / "tokenizer.json").write_text(hf.byte_tokenizer_json())
    err = from_hf_error(capsys, too_big, out)
    assert "too_big/tokenizer.json: 257 tokens" in err and "vocab_size 40" in err

    missing = small_hf(tmp_path / "missing")
    tensors = load_file(missing / "model.safetensors")
    del tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, missing / "model.safetensors", metadata={"format": "pt"})
    assert "model.layers.0.mlp.up_proj.weight is missing" in from_hf_error(capsys, missing, out)

    shape = small_hf(tmp_path / "shape")
    config = json.loads((shape / "config.json").read_text())
    (shape / "config.json").write_text(json.dumps({**config, "intermediate_size": 32}))
    err = from_hf_error(capsys, shape, out)
    assert "mlp.gate_proj.weight has shape [24, 16]" in err and "[32, 16]" in err

    truncated = small_hf(tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[:-100])
    assert "model.safetensors: truncated" in from_hf_error(capsys, truncated, out)

    pickled = small_hf(tmp_path / "pickled")
    torch.save(load_file(pickled / "model.safetensors"), pickled / hf.PICKLE_FILE)
    (pickled / "model.safetensors").unlink()
    assert "--allow-pickle" in from_hf_error(capsys, pickled, out)

    scaled = small_hf(tmp_path / "scaled")
    config = json.loads((scaled / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}
    (scaled / "config.json").write_text(json.dumps(config))
    assert "rope_parameters.rope_type='dynamic' is not supported" in \
        from_hf_error(capsys, scaled, out)

    assert "model.hidden_size" in from_hf_error(
        capsys, small_hf(tmp_path / "ok"), out, "model.hidden_size=32"
    )
    assert not out.exists()


def test_allow_pickle_reads_a_clean_bin_and_the_default_refuses_it(tmp_path):
    import shutil

    from safetensors.torch import load_file

    clean = small_hf(tmp_path / "safetensors")
    pickled = Path(shutil.copytree(clean, tmp_path / "pickled"))  # the same weights, as .bin
    torch.save(load_file(pickled / "model.safetensors"), pickled / hf.PICKLE_FILE)
    (pickled / "model.safetensors").unlink()
    with pytest.raises(hf.HFError, match="--allow-pickle"):
        hf.HFCheckpoint(pickled)
    reference, loaded = hf.HFCheckpoint(clean), hf.HFCheckpoint(pickled, allow_pickle=True)
    assert {k: v.shape for k, v in loaded.tensors.items()} == \
        {k: v.shape for k, v in reference.tensors.items()}
    names = ["embed.weight", "final_norm.weight", "layers.0.q.weight", "layers.0.down.weight"]
    for name in names:
        assert torch.equal(loaded.tensor(name), reference.tensor(name)), name


@pytest.mark.slow
def test_reshard_refuses_to_change_the_model_or_data(world4, tmp_path, capsys):
    source = str(world4["base"] / "source")
    for override in ("model.hidden_size=128", "train.global_batch_size=16", "data.streams=4"):
        assert convert_command(["reshard", source, str(tmp_path / "out"), override]) == 2
        assert "a reshard keeps the model, schedule and data" in capsys.readouterr().err
    assert convert_command(["to-hf", str(tmp_path), str(tmp_path / "hf")]) == 2
    assert "no committed checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_vocabulary_padding_is_cropped(world4):
    reader = CheckpointReader(world4["base"] / "source")
    assert reader.tp == 2 and reader.tensor("embed.weight").shape == (257, 64)
