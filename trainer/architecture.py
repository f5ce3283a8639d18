"""The model's architecture, in one place that initialization, the pipeline, checkpoints,
conversion, generation and metrics all read:

- the layer list [embedding, blocks..., final norm, output] and, per layer, which full
  ("canonical") tensors each local parameter is cut from (`layer_parts`); a layer module's
  `canonical_parts` is its entry here
- the Hugging Face names of the canonical tensors, and config.json in both directions, through
  the families (tessera.trainer.families)
- the rotary embedding's frequencies, scaled as each `rope_scaling` type does
- the FLOPs per token, and the fields a checkpoint compares with the config it is loaded into

The options (q/k/v biases, q/k norms, head size, RoPE scaling, sliding window) are model keys,
each off by default; a family is the set of them that one Hugging Face architecture has.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

from tessera.data.format import is_count, short_repr
from tessera.parallel.parts import Part, padded_vocab_size
from tessera.trainer.families import FAMILIES, Family

if TYPE_CHECKING:  # the config module imports this one; torch is for the rotary tables alone
    import torch

    from tessera.trainer.config import ModelConfig

# Model fields that change the tensors or what they mean: a checkpoint must match them.
ARCHITECTURE_FIELDS = (
    "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_size",
    "tie_embeddings", "head_dim", "qkv_bias", "qk_norm", "rope_scaling", "sliding_window",
)
# rope_scaling: each type's keys (beyond `type`) and whether each is required
ROPE_SCALING_KEYS: dict[str, dict[str, bool]] = {
    "linear": {"factor": True},
    "llama3": {"factor": True, "low_freq_factor": True, "high_freq_factor": True,
               "original_max_position_embeddings": True},
    "yarn": {"factor": True, "original_max_position_embeddings": True, "beta_fast": False,
             "beta_slow": False, "attention_factor": False, "mscale": False,
             "mscale_all_dim": False, "truncate": False},
}


# ---------------------------------------------------------------------------------------------
# The layer list and the canonical tensors


def embedding_parts(cfg: ModelConfig, padded_vocab: int) -> dict[str, list[Part]]:
    shape = (cfg.vocab_size, cfg.hidden_size)
    return {"embed.weight": [Part("embed.weight", shape, 0, padded_vocab)]}


def block_parts(cfg: ModelConfig, index: int) -> dict[str, list[Part]]:
    """One transformer block's local parameters: the fused q/k/v and gate/up projections are
    cut from several full tensors each (tensor-parallel slices side by side)."""
    p, hidden, ffn = f"layers.{index}.", cfg.hidden_size, cfg.ffn_hidden_size
    q_rows, kv_rows = cfg.num_heads * cfg.head_size, cfg.num_kv_heads * cfg.head_size
    parts = {
        "attn_norm.weight": [Part(p + "attn_norm.weight", (hidden,), None, init="ones")],
        "qkv.weight": [Part(p + "q.weight", (q_rows, hidden), 0),
                       Part(p + "k.weight", (kv_rows, hidden), 0),
                       Part(p + "v.weight", (kv_rows, hidden), 0)],
        "o.weight": [Part(p + "o.weight", (hidden, q_rows), 1)],
        "mlp_norm.weight": [Part(p + "mlp_norm.weight", (hidden,), None, init="ones")],
        "gate_up.weight": [Part(p + "gate.weight", (ffn, hidden), 0),
                           Part(p + "up.weight", (ffn, hidden), 0)],
        "down.weight": [Part(p + "down.weight", (hidden, ffn), 1)],
    }
    if cfg.qkv_bias:
        parts["qkv.bias"] = [Part(p + "q.bias", (q_rows,), 0, init="zeros"),
                             Part(p + "k.bias", (kv_rows,), 0, init="zeros"),
                             Part(p + "v.bias", (kv_rows,), 0, init="zeros")]
    if cfg.qk_norm:  # one weight per head size, shared by every head (and every rank)
        parts["q_norm.weight"] = [Part(p + "q_norm.weight", (cfg.head_size,), None, init="ones")]
        parts["k_norm.weight"] = [Part(p + "k_norm.weight", (cfg.head_size,), None, init="ones")]
    return parts


def final_norm_parts(cfg: ModelConfig) -> dict[str, list[Part]]:
    return {"final_norm.weight": [Part("final_norm.weight", (cfg.hidden_size,), None,
                                       init="ones")]}


def output_parts(cfg: ModelConfig, padded_vocab: int) -> dict[str, list[Part]]:
    shape = (cfg.vocab_size, cfg.hidden_size)
    return {"head.weight": [Part("head.weight", shape, 0, padded_vocab)]}


def layer_parts(cfg: ModelConfig, tp: int) -> list[dict[str, list[Part]]]:
    """The layers [embedding, blocks..., final norm, output] as DeepSpeed's pipeline lists
    them (pp > 1; one module holds them all at pp = 1), each with its parameters' parts. With
    tied embeddings the output is the embedding again."""
    padded = padded_vocab_size(cfg.vocab_size, tp)
    last = embedding_parts(cfg, padded) if cfg.tie_embeddings else output_parts(cfg, padded)
    return [embedding_parts(cfg, padded), *(block_parts(cfg, i) for i in range(cfg.num_layers)),
            final_norm_parts(cfg), last]


def canonical_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor and its full shape, in layer order."""
    return {part.name: tuple(part.shape) for layer in layer_parts(cfg, 1)
            for parts in layer.values() for part in parts}


# ---------------------------------------------------------------------------------------------
# FLOPs


def non_embedding_params(cfg: ModelConfig) -> int:
    """N of the 6N + 12·L·a·T rule: every parameter but the input embedding. The output
    projection counts (a matrix multiply) whether or not it shares the embedding's weights."""
    shapes = canonical_shapes(cfg)
    total = sum(math.prod(shape) for name, shape in shapes.items() if name != "embed.weight")
    return total + (cfg.vocab_size * cfg.hidden_size if cfg.tie_embeddings else 0)


def flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs (forward + backward) per token: 6N, plus 12·L·a·T for attention's scores
    and values, a = heads x head size, T the tokens a query sees (the window, if shorter)."""
    attended = min(cfg.seq_len, cfg.sliding_window or cfg.seq_len)
    attention_width = cfg.num_heads * cfg.head_size
    return 6.0 * non_embedding_params(cfg) + 12.0 * cfg.num_layers * attention_width * attended


# ---------------------------------------------------------------------------------------------
# The rotary embedding


def rope_frequencies(cfg: ModelConfig, device: torch.device | str = "cpu"
                     ) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [head_size / 2], the factor cos and sin are scaled by), as
    transformers computes them for the same rope type (an imported model sees what it saw)."""
    import torch  # lazy: the config checks read this module and stay without torch

    dim = cfg.head_size
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv_freq = 1.0 / (cfg.rope_theta**exponents)
    scaling = cfg.rope_scaling or {}
    match scaling.get("type"):
        case None:
            return inv_freq, 1.0
        case "linear":
            return inv_freq / scaling["factor"], 1.0
        case "llama3":
            return _llama3_frequencies(inv_freq, scaling), 1.0
        case "yarn":
            return _yarn_frequencies(cfg, scaling, device)
    raise AssertionError(f"rope_scaling type {scaling.get('type')!r} passed validation")


def _llama3_frequencies(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama 3.1's: long wavelengths divided by `factor`, short ones kept, a smooth blend."""
    import torch  # lazy: the config checks read this module and stay without torch

    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_context = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_context / high) * ~(wavelen > old_context / low)
    return torch.where(medium, smoothed, scaled)


def _yarn_frequencies(cfg: ModelConfig, s: dict, device: torch.device | str
                      ) -> tuple[torch.Tensor, float]:
    """YaRN: interpolated below a wavelength band, extrapolated above it, linear inside; cos
    and sin scaled by 0.1·ln(factor) + 1 unless given."""
    import torch  # lazy: the config checks read this module and stay without torch

    dim, base, factor = cfg.head_size, cfg.rope_theta, s["factor"]

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attention_factor = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:
        old = s["original_max_position_embeddings"]
        return dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(s.get("beta_fast") or 32), correction_dim(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolate = (1 - ramp).to(device)
    pos_freqs = base ** (torch.arange(0, dim, 2, device=device).float() / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(attention_factor)


# ---------------------------------------------------------------------------------------------
# The options' checks and the family of an export


def model_problems(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(key, what is wrong) for each architecture option a config gets wrong."""
    problems = []
    if cfg.head_dim is not None and (cfg.head_dim < 2 or cfg.head_dim % 2):
        problems.append(("model.head_dim", f"must be an even number >= 2, got {cfg.head_dim}"))
    if cfg.sliding_window is not None and cfg.sliding_window < 1:
        problems.append(("model.sliding_window",
                         f"must be at least 1 (or null: no window), got {cfg.sliding_window}"))
    if cfg.rope_scaling is not None:
        problem = _rope_scaling_problem(cfg.rope_scaling)
        if problem:
            problems.append(("model.rope_scaling", problem))
    if cfg.family is not None:
        if cfg.family not in FAMILIES:
            problems.append(("model.family", f"{cfg.family!r} is not one of "
                                             f"{', '.join(FAMILIES)} (or null)"))
        else:
            problem = _family_problem(FAMILIES[cfg.family], cfg)
            if problem:
                problems.append(("model.family", problem))
    return problems


def _rope_scaling_problem(scaling: Any) -> str | None:
    if not isinstance(scaling, dict) or scaling.get("type") not in ROPE_SCALING_KEYS:
        kind = scaling.get("type") if isinstance(scaling, dict) else scaling
        return (f"type {kind!r} is not supported; give null or a mapping with type "
                f"{' | '.join(ROPE_SCALING_KEYS)}")
    keys = ROPE_SCALING_KEYS[scaling["type"]]
    unknown = sorted(set(scaling) - set(keys) - {"type"})
    if unknown:
        return f"{scaling['type']} takes {', '.join(keys)}, not {', '.join(unknown)}"
    for key, required in keys.items():
        value = scaling.get(key)
        if value is None and not required:
            continue
        if key == "truncate":
            if not isinstance(value, bool):
                return f"truncate must be true or false, got {value!r}"
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            return f"{scaling['type']} needs {key} > 0, got {value!r}"
    return None


def _family_problem(family: Family, cfg: ModelConfig) -> str | None:
    """Why `family` cannot express this model, or None."""
    if cfg.qkv_bias != family.qkv_bias:
        return (f"{family.name} {'always has' if family.qkv_bias else 'has no'} q/k/v biases "
                f"but model.qkv_bias={str(cfg.qkv_bias).lower()}")
    if cfg.qk_norm != family.qk_norm:
        return (f"{family.name} {'always has' if family.qk_norm else 'has no'} q/k norms "
                f"but model.qk_norm={str(cfg.qk_norm).lower()}")
    if cfg.sliding_window is not None and not family.has_sliding_window:
        return f"{family.name} has no sliding window (mistral has)"
    return None


def export_family(cfg: ModelConfig) -> Family:
    """model.family, or the one family the options make: q/k/v biases are Qwen2's, q/k norms
    Qwen3's, a sliding window Mistral's, none of them Llama's."""
    if cfg.family is not None:
        return FAMILIES[cfg.family]
    implied = [name for name, present in (("qwen2", cfg.qkv_bias), ("qwen3", cfg.qk_norm),
                                          ("mistral", cfg.sliding_window is not None)) if present]
    if len(implied) > 1:
        raise ValueError(f"no Hugging Face family has all of {', '.join(implied)}'s options "
                         f"(model.qkv_bias, model.qk_norm, model.sliding_window)")
    return FAMILIES[implied[0] if implied else "llama"]


# ---------------------------------------------------------------------------------------------
# Hugging Face names and config.json


_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "q.weight": "self_attn.q_proj.weight", "k.weight": "self_attn.k_proj.weight",
    "v.weight": "self_attn.v_proj.weight", "o.weight": "self_attn.o_proj.weight",
    "q.bias": "self_attn.q_proj.bias", "k.bias": "self_attn.k_proj.bias",
    "v.bias": "self_attn.v_proj.bias",
    "q_norm.weight": "self_attn.q_norm.weight", "k_norm.weight": "self_attn.k_norm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "gate.weight": "mlp.gate_proj.weight", "up.weight": "mlp.up_proj.weight",
    "down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "final_norm.weight": "model.norm.weight",
    "head.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(\w+\.(?:weight|bias))$")


def hf_name(name: str) -> str:
    """A canonical tensor name -> its name in the state dict of every family we train."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _LAYER_RE.match(name)
    assert match and match[2] in _LAYER_NAMES, f"no Hugging Face name for {name}"
    return f"model.layers.{match[1]}.{_LAYER_NAMES[match[2]]}"


class HFConfigError(ValueError):
    """A config.json Tessera cannot train; the message names the key and value."""


# More layers than this in a config.json is refused before anything is built per layer: the
# deepest published models have about 130 (Llama 3.1 405B: 126).
MAX_LAYERS_FROM_HF = 10_000
_REQUIRED = object()


class ConfigKeys:
    """The values of a config.json object, each checked for its type as it is read: a wrong
    one is an HFConfigError naming the key (after `prefix`: 'rope_parameters.' for the keys
    inside that object). A null value is a missing one."""

    def __init__(self, raw: dict, prefix: str = "") -> None:
        self.raw, self.prefix = raw, prefix

    def size(self, key: str, default: Any = _REQUIRED, most: int | None = None) -> Any:
        """An integer >= 1 (and <= `most`)."""
        value = self.raw.get(key)
        if value is None:
            return self._default(key, default)
        if not is_count(value, least=1):
            self._refuse(key, "must be an integer >= 1")
        if most is not None and value > most:
            self._refuse(key, f"more than {most} (Tessera's limit for an import)")
        return value

    def number(self, key: str, default: Any = _REQUIRED) -> Any:
        """A finite number > 0, as a float."""
        value = self.raw.get(key)
        if value is None:
            return self._default(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not math.isfinite(value) or value <= 0:
            self._refuse(key, "must be a number > 0")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        """true or false (not a string such as "false", which bool() reads as True)."""
        value = self.raw.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            self._refuse(key, "must be true or false")
        return value

    def mapping(self, key: str) -> dict | None:
        """A JSON object, or None."""
        value = self.raw.get(key)
        if value is not None and not isinstance(value, dict):
            self._refuse(key, "must be an object (or null)")
        return value

    def _default(self, key: str, default: Any) -> Any:
        if default is _REQUIRED:
            raise HFConfigError(f"{self.prefix}{key} is missing")
        return default

    def _refuse(self, key: str, problem: str) -> None:
        raise HFConfigError(f"{self.prefix}{key}={short_repr(self.raw[key])}: {problem}")


def model_fields_from_hf(raw: dict, max_seq_len: int) -> dict[str, Any]:
    """The model section (ModelConfig's fields) of a Hugging Face config.json, every value read
    through ConfigKeys (its type checked, the key named when wrong)."""
    family = _family_from_hf(raw)
    keys = ConfigKeys(raw)
    _refuse_unless(raw, "hidden_act", "silu", "silu")
    _refuse_unless(raw, "mlp_bias", False, False)
    if family.attention_bias_key:
        _refuse_unless(raw, "attention_bias", False, False)
    if family.layered_sliding_window_key:
        _refuse_unless(raw, "use_sliding_window", False, False)
    hidden, heads = keys.size("hidden_size"), keys.size("num_attention_heads")
    kv_heads, head_dim = keys.size("num_key_value_heads", heads), keys.size("head_dim", None)
    _check_heads(hidden, heads, kv_heads, head_dim)
    max_positions = keys.size("max_position_embeddings", max_seq_len)
    rope = _rope_parameters(keys)
    return {
        "vocab_size": keys.size("vocab_size"),
        "hidden_size": hidden,
        "num_layers": keys.size("num_hidden_layers", most=MAX_LAYERS_FROM_HF),
        "num_heads": heads,
        "num_kv_heads": kv_heads,
        "ffn_hidden_size": keys.size("intermediate_size"),
        "seq_len": min(max_positions, max_seq_len),
        "rope_theta": rope.number("rope_theta", keys.number("rope_theta", 1e4)),
        "norm_eps": keys.number("rms_norm_eps", 1e-6),
        "tie_embeddings": keys.flag("tie_word_embeddings", False),
        "head_dim": None if head_dim is None or head_dim * heads == hidden else head_dim,
        "qkv_bias": family.qkv_bias,
        "qk_norm": family.qk_norm,
        "rope_scaling": _rope_scaling_from_hf(rope, max_positions),
        "sliding_window": keys.size("sliding_window", None) if family.has_sliding_window
        else None,
        "family": family.name,
        "max_positions": max_positions,
    }


def _family_from_hf(raw: dict) -> Family:
    """The family of model_type, refused for remote code or another architecture."""
    for key in ("auto_map", "trust_remote_code"):
        if key in raw:
            raise HFConfigError(f"{key}={short_repr(raw[key])}: a model that needs its own code "
                                f"is refused (Tessera never runs code from a model directory)")
    model_type = raw.get("model_type")
    family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise HFConfigError(f"model_type={short_repr(model_type)} is not one Tessera trains "
                            f"({', '.join(FAMILIES)})")
    architectures = raw.get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise HFConfigError(f"architectures={short_repr(architectures)}: must be a list of "
                            f"class names")
    if architectures and family.architecture not in architectures:
        raise HFConfigError(f"architectures={architectures} with model_type={family.name!r}: "
                            f"only {family.architecture} is trained")
    return family


def _check_heads(hidden: int, heads: int, kv_heads: int, head_dim: int | None) -> None:
    """The attention heads' counts and size, named by config.json's keys (the model section's
    checks would name Tessera's, which the user never set)."""
    if head_dim is None and hidden % heads:
        raise HFConfigError(f"hidden_size={hidden} is not divisible by num_attention_heads="
                            f"{heads}, and there is no head_dim")
    if heads % kv_heads:
        raise HFConfigError(f"num_key_value_heads={kv_heads} does not divide "
                            f"num_attention_heads={heads}")
    head_size = head_dim or hidden // heads
    if head_size % 2:
        raise HFConfigError(f"a head size of {head_size} (head_dim, or hidden_size / "
                            f"num_attention_heads): rotary embeddings need an even one")


def _refuse_unless(raw: dict, key: str, default: Any, supported: Any) -> None:
    value = raw.get(key, default)
    if value != supported:
        raise HFConfigError(f"{key}={short_repr(value)} is not supported (Tessera's models need "
                            f"{supported!r})")


def _rope_parameters(keys: ConfigKeys) -> ConfigKeys:
    # As transformers reads it: a legacy `rope_scaling` replaces `rope_parameters` whole.
    scaling, parameters = keys.mapping("rope_scaling"), keys.mapping("rope_parameters")
    if scaling:
        return ConfigKeys(scaling, "rope_scaling.")
    return ConfigKeys(parameters or {}, "rope_parameters.")


def _rope_scaling_from_hf(rope: ConfigKeys, max_positions: int) -> dict | None:
    kind_key = "rope_type" if "rope_type" in rope.raw else "type"  # "type": before 4.45
    kind = rope.raw.get(kind_key, "default")
    if kind == "default":
        return None
    if not isinstance(kind, str) or kind not in ROPE_SCALING_KEYS:
        raise HFConfigError(f"{rope.prefix}{kind_key}={short_repr(kind)} is not supported "
                            f"(Tessera reads default, {', '.join(ROPE_SCALING_KEYS)})")
    scaling = {"type": kind, **{key: rope.raw[key] for key in ROPE_SCALING_KEYS[kind]
                                if rope.raw.get(key) is not None}}
    if kind == "yarn" and "factor" not in scaling:  # transformers derives it
        scaling["factor"] = max_positions / rope.number("original_max_position_embeddings")
    problem = _rope_scaling_problem(scaling)
    if problem:
        raise HFConfigError(f"{rope.prefix.rstrip('.')}: {problem}")
    return scaling


def hf_config_fields(cfg: ModelConfig, eos_id: int | None) -> tuple[Family, dict[str, Any]]:
    """The family of an export and the keyword arguments of its transformers config class."""
    family = export_family(cfg)
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        scaling = {k: v for k, v in cfg.rope_scaling.items() if k != "type"}
        rope = {**rope, **scaling, "rope_type": cfg.rope_scaling["type"]}
    fields = {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_positions or cfg.seq_len,
        "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": rope, "bos_token_id": None, "eos_token_id": eos_id,
        "pad_token_id": None, "architectures": [family.architecture],
    }
    if family.head_dim_key or cfg.head_dim is not None:
        fields["head_dim"] = cfg.head_size
    if family.attention_bias_key:
        fields["attention_bias"] = False
    if family.name == "llama":
        fields["mlp_bias"] = False
    if family.has_sliding_window:
        fields["sliding_window"] = cfg.sliding_window
    if family.layered_sliding_window_key:
        fields["use_sliding_window"] = False
    return family, fields
