"""Dual-objective Llama (megatron-dual export) for transformers, loaded with ``trust_remote_code=True``.

This file is copied verbatim into every exported directory and imports only torch and transformers.

The trunk is transformers' own ``LlamaModel`` (its weight names, RoPE in the rotate-half convention, SwiGLU as
``down(silu(gate) * up)``, grouped-query attention) with one change: the dual model has **no final norm**, so
``LlamaModel.norm`` is replaced by ``nn.Identity`` (no ``model.norm.weight`` tensor exists). The head's own RMSNorm
takes its place::

    head.norm (RMSNorm, eps = config.head_norm_eps) -> head.proj (Linear h -> h, no bias) -> GELU(tanh)
    -> head.out (Linear h -> vocab, with bias)

Two classes share the weights:

* ``DLMLlamaForCausalLM``: causal attention; logits[:, i] predicts token i + 1 (``generate`` works as usual).
* ``DLMLlamaForMaskedLM``: bidirectional attention (an explicit 4-D mask with ``is_causal = False`` on every
  attention module, so no backend falls back to a causal kernel). The model was trained on masked *next*-token
  prediction (MNTP): logits[:, i] predicts the original token at position i + 1, so the prediction for a
  ``<mask>`` at position j is ``logits[:, j - 1]``. ``labels`` follow the input positions (-100 where nothing is
  predicted) and are shifted inside ``forward`` the same way.

Attention backends: eager and sdpa (the 4-D mask needs one of them; flash-attention takes no 4-D mask).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import GenerationMixin, LlamaConfig
from transformers.modeling_outputs import CausalLMOutputWithPast, MaskedLMOutput
from transformers.models.llama.modeling_llama import LlamaModel, LlamaPreTrainedModel, LlamaRMSNorm

# transformers 5.25 renamed LlamaModel.forward's ``past_key_values`` (and the output field) to ``cache`` and warns on
# the old name; earlier releases only know the old one. The installed LlamaModel's own keyword is used.
CACHE_KEYWORD = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


class DLMLlamaConfig(LlamaConfig):
    """``LlamaConfig`` plus the head's fields: ``head_norm_eps``, ``head_bias`` and ``mask_token_id``."""

    model_type = "dlm_llama"


def _shifted_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits[:, i] against labels[:, i + 1] (-100 ignored)."""
    pred = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    gold = labels[:, 1:].reshape(-1).to(pred.device)
    return nn.functional.cross_entropy(pred, gold, ignore_index=-100)


class DLMLlamaHead(nn.Module):
    """RMSNorm -> Linear(h, h) -> GELU(tanh) -> Linear(h, vocab, bias)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        eps = getattr(config, "head_norm_eps", None) or config.rms_norm_eps
        self.norm = LlamaRMSNorm(config.hidden_size, eps=eps)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.out = nn.Linear(config.hidden_size, config.vocab_size, bias=getattr(config, "head_bias", True))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.out(nn.functional.gelu(self.proj(self.norm(hidden)), approximate="tanh"))


class DLMLlamaPreTrainedModel(LlamaPreTrainedModel):
    config_class = DLMLlamaConfig
    config: DLMLlamaConfig
    base_model_prefix = "model"
    _supports_flash_attn = False
    _supports_flex_attn = False

    def _build(self, config: LlamaConfig) -> None:
        self.model = LlamaModel(config)
        self.model.norm = nn.Identity()  # the dual model has no final norm: the head's RMSNorm replaces it
        self.head = DLMLlamaHead(config)
        self.vocab_size = config.vocab_size

    def get_output_embeddings(self) -> nn.Module:
        return self.head.out


class DLMLlamaForCausalLM(DLMLlamaPreTrainedModel, GenerationMixin):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config)
        self._build(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: object | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs: object,
    ) -> CausalLMOutputWithPast:
        cache = kwargs.pop("cache", None)
        if cache is None:
            cache = past_key_values
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **{CACHE_KEYWORD: cache},
            **kwargs,
        )
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.head(hidden)
        loss = _shifted_loss(logits, labels) if labels is not None else None
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_KEYWORD: getattr(out, CACHE_KEYWORD)})


def bidirectional_mask(
    attention_mask: torch.Tensor | None, batch: int, length: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Additive (B, 1, T, T) mask: every query sees every key that ``attention_mask`` (B, T) keeps."""
    keep = torch.ones(batch, length, dtype=torch.bool, device=device)
    if attention_mask is not None:
        keep = attention_mask.to(device=device).bool()
    blocked = torch.zeros(batch, 1, length, length, dtype=dtype, device=device)
    return blocked.masked_fill(~keep[:, None, None, :], torch.finfo(dtype).min)


class DLMLlamaForMaskedLM(DLMLlamaPreTrainedModel):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config)
        self._build(config)
        for layer in self.model.layers:
            layer.self_attn.is_causal = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs: object,
    ) -> MaskedLMOutput:
        impl = getattr(self.config, "_attn_implementation", "eager") or "eager"
        if impl not in ("eager", "sdpa"):
            raise ValueError(f"DLMLlamaForMaskedLM needs attn_implementation eager or sdpa, not {impl!r}")
        ref = input_ids if input_ids is not None else inputs_embeds
        batch, length = ref.shape[0], ref.shape[1]
        dtype = self.model.embed_tokens.weight.dtype if inputs_embeds is None else inputs_embeds.dtype
        mask = bidirectional_mask(attention_mask, batch, length, dtype, ref.device)
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            **kwargs,
        )
        logits = self.head(out.last_hidden_state)
        loss = _shifted_loss(logits, labels) if labels is not None else None
        return MaskedLMOutput(loss=loss, logits=logits)
