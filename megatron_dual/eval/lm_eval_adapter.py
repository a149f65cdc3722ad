"""lm-evaluation-harness adapter: a megatron-dual checkpoint as an ``lm_eval.api.model.LM``, in any of the modes.

.. code-block:: python

    import lm_eval
    import megatron_dual.eval.lm_eval_adapter  # registers the model name "megatron-dual"

    lm_eval.simple_evaluate(model="megatron-dual", model_args="checkpoint=runs/470m,mode=prefix", tasks=[...])
    # or with an instance: lm_eval.simple_evaluate(model=MegatronDualLM(checkpoint="runs/470m", mode="mntp"), ...)

Model arguments: ``checkpoint`` (a checkpoint, ``checkpoints/`` or run directory), ``mode`` (causal | prefix |
mntp, as :mod:`megatron_dual.eval.scoring`), ``tokenizer`` (override the checkpoint's), ``device``,
``batch_tokens``, ``mntp_mask`` (rest | single), ``max_gen_toks`` (default 256).

* ``loglikelihood``: (context, continuation) pairs split as the harness does (:func:`~megatron_dual.eval.harness.
  encode_pair`), scored by :class:`~megatron_dual.eval.scoring.Scorer` in the chosen mode, so requests with the
  same context share its KV cache in causal and prefix mode; ``is_greedy`` is the argmax check of every token.
* ``loglikelihood_rolling``: the harness's disjoint rolling windows of max_seq_len tokens (the first conditioned on
  ``<s>``), each window scored in the chosen mode given the tokens before it; the sum over windows (every token
  once). In mntp mode a window is max_seq_len - 1 tokens: its masked tokens and the token before them are inputs.
* ``generate_until``: causal (KV cache) or prefix-LM generation, greedy unless ``do_sample`` (then ``temperature``
  and ``top_p``), cut at the first stop string (``until``) or ``</s>``, one prompt at a time; the prompt is cut
  from the left to leave room for ``max_gen_toks``. In mntp mode it refuses (masked-diffusion generation is
  ``megatron-dual generate``'s).
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from megatron_dual.eval.harness import encode_pair
from megatron_dual.eval.scoring import MODES, Scorer
from megatron_dual.eval.tasks import EvalError

__all__ = ["MegatronDualLM"]


def _count(name: str, value: Any) -> int:
    """A positive integer argument (``--model_args`` gives strings): one EvalError naming it otherwise."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise EvalError(f"MegatronDualLM: {name} = {value!r} is not an integer") from None
    if number < 1:
        raise EvalError(f"MegatronDualLM: {name} = {value!r} must be at least 1")
    return number


@register_model("megatron-dual", "megatron_dual")
class MegatronDualLM(LM):
    """An ``lm_eval`` LM over a :class:`~megatron_dual.model.DualTransformer`; give ``checkpoint`` or both
    ``model`` and ``tokenizer_obj`` (an already loaded model and tokenizer)."""

    def __init__(
        self,
        checkpoint: str | None = None,
        mode: str = "causal",
        tokenizer: str | None = None,
        device: str = "cpu",
        batch_tokens: int | str | None = None,
        mntp_mask: str = "rest",
        max_gen_toks: int | str = 256,
        model: Any = None,
        tokenizer_obj: Any = None,
        **_: Any,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise EvalError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
        self.max_gen_toks = _count("max_gen_toks", max_gen_toks)
        batch_tokens = None if batch_tokens is None else _count("batch_tokens", batch_tokens)
        if model is None:
            if checkpoint is None:
                raise EvalError("MegatronDualLM needs checkpoint=DIR (or model= and tokenizer_obj=)")
            from megatron_dual.inference.loading import load_model

            model, _, tokenizer_obj = load_model(checkpoint, device=device or "cpu", tokenizer=tokenizer)
        elif tokenizer_obj is None:
            raise EvalError("MegatronDualLM(model=...) also needs tokenizer_obj=")
        self.model = model.eval()
        self.tok = tokenizer_obj
        self.mode = mode
        mask_id = getattr(tokenizer_obj, "mask_id", None)
        if mode == "mntp" and mask_id is None:
            raise EvalError("mode mntp needs a tokenizer with a <mask> token")
        self.scorer = Scorer(model, mask_id or 0, batch_tokens=batch_tokens, mntp_mask=mntp_mask)
        self._device = next(model.parameters()).device

    @property
    def max_length(self) -> int:
        return self.model.cfg.max_seq_len

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.tok, *req.args) for req in requests]
        scores = self.scorer.score(pairs, self.mode)
        return [(s.logprob, s.greedy) for s in scores]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        windows: list[tuple[list[int], list[int]]] = []
        owner: list[int] = []
        span = self.max_length - (self.mode == "mntp")  # mntp: the masks are inputs too, one more position
        for i, req in enumerate(requests):
            (text,) = req.args
            ids = self.tok.encode(text, add_bos=False)
            for w in get_rolling_token_windows(ids, self.tok.bos_id, span, context_len=1):
                windows.append(make_disjoint_window(w))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, s in zip(owner, self.scorer.score(windows, self.mode), strict=True):
            totals[i] += s.logprob
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        if self.mode == "mntp":
            raise EvalError(
                "generate_until in mode mntp: use mode=causal or mode=prefix "
                "(masked-diffusion generation is `megatron-dual generate --mode diffusion`)"
            )
        return [self._generate_one(context, dict(kwargs)) for context, kwargs in (req.args for req in requests)]

    def _generate_one(self, context: str, kwargs: dict[str, Any]) -> str:
        from megatron_dual.inference.generate import generate

        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = _count("max_gen_toks", kwargs.pop("max_gen_toks", self.max_gen_toks))
        sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 1.0)) if sample else 0.0
        top_p = float(kwargs.pop("top_p", 1.0))
        max_new = max(1, min(max_new, self.max_length - 1))
        prompt = self.tok.encode(context, add_bos=True)[-(self.max_length - max_new) :]
        new = generate(
            self.model,
            [prompt],
            max_new,
            temperature=temperature,
            top_p=top_p,
            eos_id=getattr(self.tok, "eos_id", None),
            prefix_lm=self.mode == "prefix",
        )[0]
        head = self.tok.decode(prompt, skip_special=True)
        full = self.tok.decode(prompt + new, skip_special=True)
        text = full[len(head) :] if full.startswith(head) else self.tok.decode(new, skip_special=True)
        for stop in until:
            if stop and stop in text:
                text = text[: text.index(stop)]
        return text

    def tok_encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_bos=False)

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tok, "path", type(self.tok).__name__))
