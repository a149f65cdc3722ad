"""Weight names: megatron-dual <-> transformers (Llama trunk + GELU head) <-> the reference training code.

megatron-dual (``DualTransformer.state_dict()``)   transformers export (``modeling_dlm_llama.py``)
``embed.weight``                                    ``model.embed_tokens.weight``
``layers.{i}.attn_norm.weight``                     ``model.layers.{i}.input_layernorm.weight``
``layers.{i}.attn.qkv.weight`` rows [q; k; v]       ``model.layers.{i}.self_attn.{q,k,v}_proj.weight``
``layers.{i}.attn.out.weight``                      ``model.layers.{i}.self_attn.o_proj.weight``
``layers.{i}.mlp_norm.weight``                      ``model.layers.{i}.post_attention_layernorm.weight``
``layers.{i}.mlp.up.weight`` rows [up; gate]        ``model.layers.{i}.mlp.up_proj.weight``, ``...mlp.gate_proj.weight``
``layers.{i}.mlp.down.weight``                      ``model.layers.{i}.mlp.down_proj.weight``
``head.norm.weight``, ``head.proj.weight``,         ``head.norm.weight``, ``head.proj.weight``,
``head.out.weight``, ``head.out.bias``              ``head.out.weight``, ``head.out.bias``
(no final norm)                                     (no ``model.norm.weight``: ``LlamaModel.norm`` is an identity)

No permutation of q/k rows is needed: both models rotate in the rotate-half convention (transformers' Llama
permutes only Meta's original interleaved checkpoints). SwiGLU is ``up * silu(gate)`` in both, so the fused rows
[up; gate] split into ``up_proj`` then ``gate_proj``. GQA: kv head j serves query heads j*r .. j*r + r - 1 in both.

Importing from transformers is tolerant: a trunk key may come with or without the ``model.`` prefix, the head
under ``head.``, ``lm_head.`` or ``classifier.`` with leaves ``norm|pre_norm``, ``proj|projection|dense`` and
``out|emb2vocab|decoder``; a ``model.norm.weight`` of all ones (an identity) is dropped, any other is an error.

The reference code (ltgoslo/dual-language-models, ``model/model.py``): ``embedding.word_embedding.weight``;
``encoder.layers.{i}.attention.{pre_norm.weight, qkv_proj.weights.{0,1,2} (q, k, v), out_proj.weight}``;
``encoder.layers.{i}.mlp.{pre_norm.weight, up_proj.weights.{0,1} (up, gate), down_proj.weight}``;
``classifier.{pre_norm.weight, projection.weight, emb2vocab.weight, emb2vocab.bias}``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from megatron_dual.config import ModelConfig

__all__ = ["ConversionError", "to_hf_state", "from_hf_state", "from_ltg_state", "check_names"]

Tensors = Mapping[str, torch.Tensor]


class ConversionError(ValueError):
    """A checkpoint or directory that cannot be converted; the message names the file and tensor."""


def check_names(state: Tensors, expected: set[str], source: str, optional: frozenset[str] = frozenset()) -> None:
    """ConversionError naming the missing and the extra tensors of ``state`` against ``expected`` (names in
    ``optional`` may be present or absent)."""
    missing = sorted(expected - set(state))
    extra = sorted(set(state) - expected - optional)
    if not missing and not extra:
        return
    parts = [
        f"{what} {len(names)} tensor(s): {', '.join(names[:6])}" + (" ..." if len(names) > 6 else "")
        for what, names in (("missing", missing), ("extra", extra))
        if names
    ]
    raise ConversionError(f"{source}: {'; '.join(parts)}")


def _check_shapes(state: Tensors, shapes: Mapping[str, tuple[int, ...]], source: str) -> None:
    for name, shape in shapes.items():
        got = tuple(state[name].shape)
        if got != tuple(shape):
            raise ConversionError(f"{source}: tensor {name!r} has shape {got}, the config needs {tuple(shape)}")


def _heads(cfg: ModelConfig) -> tuple[int, int]:
    """(key/value heads, head dim) with nulls resolved (``validate`` resolves them in place)."""
    cfg.validate()
    return int(cfg.n_kv_heads), int(cfg.head_dim)


def our_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of ``DualTransformer(cfg).state_dict()`` and its shape."""
    kv, d = _heads(cfg)
    h, v, f = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (v, h)}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        shapes[p + "attn_norm.weight"] = (h,)
        shapes[p + "attn.qkv.weight"] = ((cfg.n_heads + 2 * kv) * d, h)
        shapes[p + "attn.out.weight"] = (h, cfg.n_heads * d)
        shapes[p + "mlp_norm.weight"] = (h,)
        shapes[p + "mlp.up.weight"] = (2 * f, h)
        shapes[p + "mlp.down.weight"] = (h, f)
    shapes.update(
        {"head.norm.weight": (h,), "head.proj.weight": (h, h), "head.out.weight": (v, h), "head.out.bias": (v,)}
    )
    return shapes


def _qkv_sizes(cfg: ModelConfig) -> list[int]:
    kv, d = _heads(cfg)
    return [cfg.n_heads * d, kv * d, kv * d]


def to_hf_state(state: Tensors, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> transformers names (fused q/k/v and up/gate split, contiguous copies)."""
    check_names(state, set(our_shapes(cfg)), "model state")
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": state["embed.weight"]}
    for i in range(cfg.n_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        q, k, v = state[src + "attn.qkv.weight"].split(_qkv_sizes(cfg), dim=0)
        up, gate = state[src + "mlp.up.weight"].chunk(2, dim=0)
        out.update(
            {
                dst + "input_layernorm.weight": state[src + "attn_norm.weight"],
                dst + "self_attn.q_proj.weight": q,
                dst + "self_attn.k_proj.weight": k,
                dst + "self_attn.v_proj.weight": v,
                dst + "self_attn.o_proj.weight": state[src + "attn.out.weight"],
                dst + "post_attention_layernorm.weight": state[src + "mlp_norm.weight"],
                dst + "mlp.gate_proj.weight": gate,
                dst + "mlp.up_proj.weight": up,
                dst + "mlp.down_proj.weight": state[src + "mlp.down.weight"],
            }
        )
    for leaf in ("norm.weight", "proj.weight", "out.weight", "out.bias"):
        out["head." + leaf] = state["head." + leaf]
    return {k: t.detach().contiguous().clone() for k, t in out.items()}


_HEAD_PREFIXES = ("head.", "lm_head.", "classifier.")
_HEAD_LEAVES = {
    "norm.weight": "norm.weight",
    "pre_norm.weight": "norm.weight",
    "proj.weight": "proj.weight",
    "projection.weight": "proj.weight",
    "dense.weight": "proj.weight",
    "out.weight": "out.weight",
    "emb2vocab.weight": "out.weight",
    "decoder.weight": "out.weight",
    "out.bias": "out.bias",
    "emb2vocab.bias": "out.bias",
    "decoder.bias": "out.bias",
}


def _canonical_hf_name(name: str) -> str:
    """Tolerated spellings -> the names this package exports."""
    for prefix in _HEAD_PREFIXES:
        if name.startswith(prefix) and name[len(prefix) :] in _HEAD_LEAVES:
            return "head." + _HEAD_LEAVES[name[len(prefix) :]]
    if name.startswith(("layers.", "embed_tokens.", "norm.")):
        return "model." + name
    return name


def _canonical_hf_state(state: Tensors, source: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        key = _canonical_hf_name(name)
        if key in out:
            raise ConversionError(f"{source}: tensors {name!r} and another both map to {key!r}")
        out[key] = tensor
    final = out.pop("model.norm.weight", None)
    if final is not None and not bool((final == 1).all()):
        raise ConversionError(
            f"{source}: has a final norm 'model.norm.weight' that is not the identity; the dual architecture has "
            "no final norm (its head's RMSNorm replaces it), so this is another model"
        )
    return out


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    kv, d = _heads(cfg)
    h, f = cfg.hidden_size, cfg.intermediate_size
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (cfg.n_heads * d, h),
                p + "self_attn.k_proj.weight": (kv * d, h),
                p + "self_attn.v_proj.weight": (kv * d, h),
                p + "self_attn.o_proj.weight": (h, cfg.n_heads * d),
                p + "mlp.gate_proj.weight": (f, h),
                p + "mlp.up_proj.weight": (f, h),
                p + "mlp.down_proj.weight": (h, f),
            }
        )
    shapes.update(
        {
            "head.norm.weight": (h,),
            "head.proj.weight": (h, h),
            "head.out.weight": (cfg.vocab_size, h),
            "head.out.bias": (cfg.vocab_size,),
        }
    )
    return shapes


def from_hf_state(state: Tensors, cfg: ModelConfig, source: str = "transformers state") -> dict[str, torch.Tensor]:
    """transformers names (tolerant spellings) -> our state dict; missing/extra tensors and bad shapes named."""
    hf = _canonical_hf_state(state, source)
    shapes = hf_shapes(cfg)
    check_names(hf, set(shapes), source)
    _check_shapes(hf, shapes, source)
    out: dict[str, torch.Tensor] = {"embed.weight": hf["model.embed_tokens.weight"]}
    for i in range(cfg.n_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        attn = [hf[src + f"self_attn.{n}_proj.weight"] for n in ("q", "k", "v")]
        out.update(
            {
                dst + "attn_norm.weight": hf[src + "input_layernorm.weight"],
                dst + "attn.qkv.weight": torch.cat(attn, dim=0),
                dst + "attn.out.weight": hf[src + "self_attn.o_proj.weight"],
                dst + "mlp_norm.weight": hf[src + "post_attention_layernorm.weight"],
                dst + "mlp.up.weight": torch.cat([hf[src + "mlp.up_proj.weight"], hf[src + "mlp.gate_proj.weight"]]),
                dst + "mlp.down.weight": hf[src + "mlp.down_proj.weight"],
            }
        )
    for leaf in ("norm.weight", "proj.weight", "out.weight", "out.bias"):
        out["head." + leaf] = hf["head." + leaf]
    return {k: t.contiguous() for k, t in out.items()}


_WRAPPER_PREFIX = re.compile(r"^(module\.|_orig_mod\.)+")


def _ltg_norm(state: dict[str, torch.Tensor], name: str, cfg: ModelConfig, affine: bool) -> torch.Tensor:
    """A pre-norm weight; a norm trained without a learnable scale (``*_pre_norm_affine: false``) is all ones."""
    if affine or name in state:
        return state.pop(name)
    return torch.ones(cfg.hidden_size)


def from_ltg_state(
    state: Tensors,
    cfg: ModelConfig,
    affine: Mapping[str, bool] | None = None,
    tied: bool = False,
    source: str = "reference state dict",
) -> dict[str, torch.Tensor]:
    """The reference training code's ``model.state_dict()`` -> ours. ``affine``: the reference config's
    ``attention/feed_forward/classifier_pre_norm_affine`` flags (default all True); ``tied``: its ``tie_weights``
    (``classifier.emb2vocab.weight`` may then be absent and is the embedding)."""
    flags = {"attention": True, "feed_forward": True, "classifier": True, **(affine or {})}
    rest = {_WRAPPER_PREFIX.sub("", k): v for k, v in state.items()}
    if tied and "classifier.emb2vocab.weight" not in rest and "embedding.word_embedding.weight" in rest:
        rest["classifier.emb2vocab.weight"] = rest["embedding.word_embedding.weight"]
    every_norm = frozenset(_ltg_names(cfg, {"attention": True, "feed_forward": True, "classifier": True}))
    check_names(rest, set(_ltg_names(cfg, flags)), source, optional=every_norm)
    out: dict[str, torch.Tensor] = {"embed.weight": rest.pop("embedding.word_embedding.weight")}
    for i in range(cfg.n_layers):
        src, dst = f"encoder.layers.{i}.", f"layers.{i}."
        out[dst + "attn_norm.weight"] = _ltg_norm(rest, src + "attention.pre_norm.weight", cfg, flags["attention"])
        out[dst + "attn.qkv.weight"] = torch.cat([rest.pop(src + f"attention.qkv_proj.weights.{j}") for j in range(3)])
        out[dst + "attn.out.weight"] = rest.pop(src + "attention.out_proj.weight")
        out[dst + "mlp_norm.weight"] = _ltg_norm(rest, src + "mlp.pre_norm.weight", cfg, flags["feed_forward"])
        out[dst + "mlp.up.weight"] = torch.cat([rest.pop(src + f"mlp.up_proj.weights.{j}") for j in range(2)])
        out[dst + "mlp.down.weight"] = rest.pop(src + "mlp.down_proj.weight")
    out["head.norm.weight"] = _ltg_norm(rest, "classifier.pre_norm.weight", cfg, flags["classifier"])
    out["head.proj.weight"] = rest.pop("classifier.projection.weight")
    out["head.out.weight"] = rest.pop("classifier.emb2vocab.weight")
    out["head.out.bias"] = rest.pop("classifier.emb2vocab.bias")
    out = {k: t.contiguous() for k, t in out.items()}
    _check_shapes(out, our_shapes(cfg), source + " (after mapping to megatron-dual names)")
    return out


def _ltg_names(cfg: ModelConfig, flags: Mapping[str, bool]) -> list[str]:
    names = ["embedding.word_embedding.weight"]
    for i in range(cfg.n_layers):
        p = f"encoder.layers.{i}."
        names += [p + f"attention.qkv_proj.weights.{j}" for j in range(3)]
        names += [p + "attention.out_proj.weight", p + "mlp.down_proj.weight"]
        names += [p + f"mlp.up_proj.weights.{j}" for j in range(2)]
        names += [p + "attention.pre_norm.weight"] if flags["attention"] else []
        names += [p + "mlp.pre_norm.weight"] if flags["feed_forward"] else []
    names += ["classifier.projection.weight", "classifier.emb2vocab.weight", "classifier.emb2vocab.bias"]
    names += ["classifier.pre_norm.weight"] if flags["classifier"] else []
    return names
