"""The checkpoints people continue from, in and out: Llama 3.x (llama3 RoPE), Qwen2.5 (q/k/v
biases), Qwen3 (q/k norms, a head size of its own) and Mistral (sliding window). Each a tiny
random model that transformers builds offline from a config shaped like a published one.

For each: from-hf at tp=2 x pp=2 gives transformers' logits (KL below 1e-9) and greedy
tokens; to-hf gives back every tensor bitwise, as the same architecture, which transformers
loads; 3 training steps at two layouts agree within 1e-5.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from hfcheck import KL_BOUND, assert_hf_matches, layout_predictions, mean_kl
from multiproc import run_ranks
from training import losses, tiny_config, train_each

from tessera.trainer.config import load_config
from tessera.trainer.convert import from_hf, from_hf_config, hf, to_hf

COMMON = dict(vocab_size=257, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
              rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=256)
# name -> (model_type, config keys shaped like the published model's, how it is saved)
FAMILIES = {
    "llama-3.2": ("llama", {  # Llama-3.2-1B: llama3 RoPE, factor 32, theta 500000, tied
        "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                            "rope_theta": 500000.0}}, {"dtype": torch.float32}),
    "qwen2.5": ("qwen2", {  # Qwen2.5-0.5B: q/k/v biases, theta 1e6, tied; sharded, bf16
        "tie_word_embeddings": True, "rope_parameters": {"rope_type": "default",
                                                         "rope_theta": 1e6}},
                {"dtype": torch.bfloat16, "max_shard_size": "60KB"}),
    "qwen3": ("qwen3", {  # Qwen3-0.6B: q/k norms, head_dim 128 with hidden 1024 / 16 heads
        "tie_word_embeddings": True, "head_dim": 32,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}, {"dtype": torch.float16}),
    "mistral": ("mistral", {  # Mistral-7B-v0.1: a sliding window (here 16 of a 32-token window)
        "tie_word_embeddings": False, "sliding_window": 16,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}, {"dtype": torch.float32}),
}
LAYOUTS = {"tp2-pp2": {"parallel.tp": 2, "parallel.pp": 2},
           "dp2-tp2-zero1": {"parallel.tp": 2, "parallel.zero_stage": 1}}


def save_random_model(directory: Path, model_type: str, keys: dict, saving: dict) -> Path:
    """A random model (norms and biases perturbed too, so that they count), saved with the byte
    tokenizer's tokenizer.json beside it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **COMMON, **keys))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model.to(saving["dtype"]).save_pretrained(directory, max_shard_size=saving.get(
        "max_shard_size", "5GB"))
    (directory / "tokenizer.json").write_text(hf.byte_tokenizer_json())
    return directory


def reference_model(directory: Path):
    """The saved model as transformers loads it, in fp32 (the rounded weights we import)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def import_export_train(cases: dict) -> dict | None:
    """Rank body (4 ranks): per family, import at tp=2 x pp=2 and predict; export the import
    (rank 0); train 3 steps at each layout."""
    results = {}
    for name, (hf_dir, import_cfg, load_cfg, export_dir, train_cfgs) in cases.items():
        from_hf(hf_dir, import_cfg)
        prediction = layout_predictions(load_cfg)
        if dist.get_rank() == 0:
            to_hf(import_cfg.run.dir, export_dir)
        dist.barrier()
        results[name] = (prediction, train_each(train_cfgs))
    return results if dist.get_rank() == 0 else None


@pytest.fixture(scope="module")
def families(tmp_path_factory, byte_shards) -> dict:
    base = tmp_path_factory.mktemp("families")
    cases = {}
    for name, (model_type, keys, saving) in FAMILIES.items():
        hf_dir = save_random_model(base / name / "hf", model_type, keys, saving)
        import_cfg = from_hf_config(hf.HFCheckpoint(hf_dir), base / name / "imported",
                                    ["parallel.tp=2", "parallel.pp=2"])
        load_cfg = load_config(None, [f"run.dir={base / name / 'load'}", "parallel.tp=2",
                                      "parallel.pp=2", f"checkpoint.load_from={base / name}"
                                      "/imported", "checkpoint.load_weights_only=true"])
        load_cfg.model = import_cfg.model
        model = {f"model.{k}": v for k, v in vars(import_cfg.model).items() if v is not None}
        model["model.rope_scaling"] = json.dumps(import_cfg.model.rope_scaling)
        train_cfgs = [tiny_config(base / name / layout, byte_shards, **model, **overrides,
                                  **{"train.steps": 3, "train.grad_clip": 0})
                      for layout, overrides in LAYOUTS.items()]
        cases[name] = (hf_dir, import_cfg, load_cfg, base / name / "exported", train_cfgs)
    results = run_ranks(4, import_export_train, cases, timeout_s=900)[0]
    return {name: (cases[name], results[name]) for name in cases}


@pytest.mark.parametrize("name", FAMILIES)
def test_from_hf_at_tp2_pp2_matches_transformers(families, name):
    (hf_dir, import_cfg, *_), (prediction, _) = families[name]
    assert import_cfg.model.family == FAMILIES[name][0]
    assert_hf_matches(reference_model(hf_dir), prediction, name)


@pytest.mark.parametrize("name", FAMILIES)
def test_to_hf_writes_the_same_architecture_and_every_tensor_back(families, name):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    (hf_dir, _, _, export_dir, _), (prediction, _) = families[name]
    source = json.loads((hf_dir / "config.json").read_text())
    exported = json.loads((export_dir / "config.json").read_text())
    for key in ("model_type", "architectures", "head_dim", "tie_word_embeddings",
                "sliding_window", "rope_parameters"):
        assert exported.get(key) == source.get(key), key
    original = {}
    for path in hf_dir.glob("*.safetensors"):
        original.update(load_file(path))
    written = {}
    for path in export_dir.glob("*.safetensors"):
        written.update(load_file(path))
    assert sorted(written) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(written[key], tensor.float()), key  # fp32 export of the same values
    reloaded = reference_model(export_dir)
    with torch.no_grad():
        kl = mean_kl(reference_model(hf_dir)(prediction["ids"]).logits,
                     reloaded(prediction["ids"]).logits)
    assert kl < KL_BOUND, f"{name}: mean KL {kl:.3e} after the round trip"
    assert AutoTokenizer.from_pretrained(export_dir).decode([104, 105]) == "hi"


@pytest.mark.parametrize("name", FAMILIES)
def test_three_steps_agree_at_two_layouts(families, name):
    _, (_, (first, second)) = families[name]
    assert losses(second) == pytest.approx(losses(first), rel=1e-5)
