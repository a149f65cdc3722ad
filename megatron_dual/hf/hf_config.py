"""``config.json`` of an exported directory (a ``LlamaConfig`` plus the head's fields) and the reference code's
``configs/*.json``, to and from :class:`ModelConfig`.

Fields written beside Llama's: ``head_norm_eps`` (the head RMSNorm's eps, equal to ``rms_norm_eps`` here),
``head_bias`` (true: the output projection has a bias), ``head_hidden_act`` (``gelu_pytorch_tanh``),
``final_norm`` (false), ``mask_token_id`` (4). RoPE theta is written both as ``rope_theta`` (transformers 4.x) and
inside ``rope_parameters`` (5.x).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from megatron_dual.config import ModelConfig
from megatron_dual.hf.names import ConversionError

__all__ = ["MODEL_TYPE", "ARCHITECTURES", "to_hf_config", "from_hf_config", "from_ltg_config", "ltg_flags"]

MODEL_TYPE = "dlm_llama"
ARCHITECTURES = ("DLMLlamaForCausalLM", "DLMLlamaForMaskedLM")
MODELING_FILE = "modeling_dlm_llama.py"
_ACCEPTED_TYPES = (MODEL_TYPE, "llama")  # "llama": a hub layout that follows transformers' Llama names


def to_hf_config(cfg: ModelConfig, special: Mapping[str, int] | None = None) -> dict[str, Any]:
    """The ``config.json`` dict for ``cfg``; ``special``: bos/eos/pad/mask token ids (ltg layout by default)."""
    ids = {"bos": 1, "eos": 2, "pad": 3, "mask": 4, **(special or {})}
    cfg.validate()  # resolves null n_kv_heads / head_dim
    module = MODELING_FILE.removesuffix(".py")
    return {
        "architectures": [ARCHITECTURES[0]],
        "model_type": MODEL_TYPE,
        "auto_map": {
            "AutoConfig": f"{module}.DLMLlamaConfig",
            "AutoModel": f"{module}.DLMLlamaForCausalLM",
            "AutoModelForCausalLM": f"{module}.DLMLlamaForCausalLM",
            "AutoModelForMaskedLM": f"{module}.DLMLlamaForMaskedLM",
        },
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["pad"],
        "mask_token_id": ids["mask"],
        "head_norm_eps": cfg.norm_eps,
        "head_bias": True,
        "head_hidden_act": "gelu_pytorch_tanh",
        "final_norm": False,
        "torch_dtype": "float32",
        "use_cache": True,
    }


_REQUIRED = object()


def _number(conf: Mapping[str, Any], key: str, kind: type, source: str, default: Any = _REQUIRED) -> Any:
    """``conf[key]`` as ``kind`` (int or float); absent or null gives ``default`` where there is one. Anything else
    that is not such a number (a string that is not one, a bool, a list, 2.5 for an integer) is one
    ConversionError naming the file, the field and the value."""
    value = conf.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ConversionError(f"{source}: missing field {key!r}" if key not in conf else f"{source}: {key} is null")
        return default
    try:
        number = float(value) if not isinstance(value, bool) else float("nan")
    except (TypeError, ValueError):
        number = float("nan")
    if number != number or (kind is int and not number.is_integer()):
        what = "an integer" if kind is int else "a number"
        raise ConversionError(f"{source}: {key} = {value!r} is not {what}")
    return kind(number)


def _rope_theta(hf: Mapping[str, Any], source: str) -> float:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default")) if isinstance(params, Mapping) else "default"
    if kind != "default":
        raise ConversionError(f"{source}: rope type {kind!r} is not supported (the dual model uses plain RoPE)")
    if hf.get("rope_theta") is not None:
        return _number(hf, "rope_theta", float, source)
    if isinstance(params, Mapping) and params.get("rope_theta") is not None:
        return _number(params, "rope_theta", float, f"{source}: rope_parameters")
    raise ConversionError(f"{source}: no rope_theta (nor rope_parameters.rope_theta)")


def _check_architecture(hf: Mapping[str, Any], source: str) -> None:
    kind = hf.get("model_type")
    if kind not in _ACCEPTED_TYPES:
        archs = ", ".join(hf.get("architectures") or []) or "none given"
        raise ConversionError(
            f"{source}: model_type {kind!r} (architectures: {archs}) is not a dual Llama; expected one of "
            f"{', '.join(map(repr, _ACCEPTED_TYPES))}"
        )
    for key, want in (
        ("hidden_act", "silu"),
        ("attention_bias", False),
        ("mlp_bias", False),
        ("tie_word_embeddings", False),
        ("final_norm", False),
        ("head_hidden_act", "gelu_pytorch_tanh"),
    ):
        got = hf.get(key, want)
        if got != want:
            raise ConversionError(f"{source}: {key} = {got!r}, the dual architecture needs {want!r}")


def from_hf_config(hf: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """ModelConfig of an exported (or hub) ``config.json``; ConversionError for another architecture."""
    _check_architecture(hf, source)
    heads = _number(hf, "num_attention_heads", int, source)
    hidden = _number(hf, "hidden_size", int, source)
    eps = _number(hf, "rms_norm_eps", float, source, 1e-6)
    head_eps = _number(hf, "head_norm_eps", float, source, eps)
    cfg = ModelConfig(
        n_layers=_number(hf, "num_hidden_layers", int, source),
        hidden_size=hidden,
        n_heads=heads,
        n_kv_heads=_number(hf, "num_key_value_heads", int, source, heads) or heads,
        head_dim=_number(hf, "head_dim", int, source, 0) or (hidden // heads if heads else 0),
        intermediate_size=_number(hf, "intermediate_size", int, source),
        vocab_size=_number(hf, "vocab_size", int, source),
        max_seq_len=_number(hf, "max_position_embeddings", int, source, 2048),
        rope_theta=_rope_theta(hf, source),
        norm_eps=eps,
    )
    _validated(cfg, source)
    if head_eps != eps:
        raise ConversionError(
            f"{source}: head_norm_eps {head_eps} differs from rms_norm_eps {eps}; this model "
            "uses one eps for every RMSNorm"
        )
    return cfg


def _validated(cfg: ModelConfig, source: str) -> ModelConfig:
    try:
        cfg.validate()
    except ValueError as e:
        raise ConversionError(f"{source}: {e}") from None
    return cfg


_LTG_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")


def ltg_flags(ltg: Mapping[str, Any]) -> dict[str, bool]:
    """Which pre-norms of the reference model carry a learnable scale."""
    return {
        part: bool(ltg.get(f"{part}_pre_norm_affine", True)) for part in ("attention", "feed_forward", "classifier")
    }


def from_ltg_config(ltg: Mapping[str, Any], source: str = "reference config") -> ModelConfig:
    """ModelConfig of the reference code's config json (e.g. ``configs/large.json``)."""
    missing = [k for k in _LTG_FIELDS if k not in ltg]
    if missing:
        raise ConversionError(
            f"{source}: missing field(s) {', '.join(missing)} (a reference-code config has "
            f"{', '.join(_LTG_FIELDS)}, d_h, rope_theta, norm_eps, max_sequence_length)"
        )
    heads = _number(ltg, "num_attention_heads", int, source)
    hidden = _number(ltg, "hidden_size", int, source)
    d_h = _number(ltg, "d_h", int, source, hidden // heads if heads else 0)
    cfg = ModelConfig(
        n_layers=_number(ltg, "num_layers", int, source),
        hidden_size=hidden,
        n_heads=heads,
        head_dim=None if d_h * heads == hidden else d_h,
        intermediate_size=_number(ltg, "intermediate_size", int, source),
        vocab_size=_number(ltg, "vocab_size", int, source),
        max_seq_len=_number(ltg, "max_sequence_length", int, source, 2048),
        rope_theta=_number(ltg, "rope_theta", float, source, 10_000.0),
        norm_eps=_number(ltg, "norm_eps", float, source, 1e-5),
    )
    return _validated(cfg, source)
