"""MNTP fill-mask: predict the token behind each ``<mask>`` with bidirectional attention.

The model was trained on masked diffusion written as masked *next*-token prediction: the hidden state at position i
predicts the original token at i + 1. So the prediction for a ``<mask>`` at position j is read from the logits at
position j - 1 (``logits[:, j - 1]``), never from position j itself. A mask at position 0 has nothing before it
and is an error (with the ltg tokenizer position 0 is ``<s>``, so this only happens with ``add_bos=False``).

Fill-mask is one forward pass: each mask's distribution given every other mask still masked. Iterative infilling,
where later masks see the tokens already chosen, is :func:`.diffusion.diffusion_infill` (``generate --mode diffusion``
with ``<mask>`` in the prompt); with one greedy step it puts this module's most probable non-special token at each
mask.

Tokenisation choice (see :func:`encode_with_masks`): the text is split on the literal ``<mask>``, the whitespace
around each mask is dropped, each piece is encoded on its own (``<s>`` only on the first) and the pieces are joined
with the mask id. Encoding the whole text does not work: the project's tokenizer
(:mod:`megatron_dual.data.tokenizer`) deliberately encodes literal special-token strings as ordinary text
(``encode_special_tokens = True``, so documents never gain a stray mask), and even the raw ltg ``tokenizer.json``,
which does turn ``<mask>`` into the single id 4, normalises the text on each side of it separately, prepending a
space to each segment: ``"of <mask> is"`` becomes ``of, Ġ, <mask>, Ġ, Ġis``, two stand-alone space tokens that
never occur in training inputs, where a mask replaces a whole token such as ``ĠFrance`` (leading space included).
Piecewise encoding gives ``of, <mask>, Ġis``: exactly the training-time sequence of "The capital of France is
Paris" with ``ĠFrance`` masked, for any tokenizer. One mask stands for one token.
Known limit: a piece glued to a mask (``"<mask>."``) is encoded as a fresh text, so with the ltg tokenizer's
prepended space it reads ``Ġ.`` rather than ``.``; write the mask as a separate word where that matters.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_dual.model.attention import AttentionMask
from megatron_dual.model.transformer import DualTransformer

__all__ = ["MASK_TEXT", "encode_with_masks", "mask_distributions", "fill_mask_ids", "fill_mask"]

MASK_TEXT = "<mask>"


def encode_with_masks(tokenizer: Any, text: str, add_bos: bool = True) -> list[int]:
    """Token ids of ``text`` with every literal ``<mask>`` as one mask id (see the module docstring for why)."""
    pieces = text.split(MASK_TEXT)
    if len(pieces) == 1:
        raise ValueError(f"fill-mask: the text has no {MASK_TEXT} token: {text!r}")
    mask_id = tokenizer.mask_id
    ids: list[int] = []
    last = len(pieces) - 1
    for i, piece in enumerate(pieces):
        if i > 0:
            ids.append(mask_id)
        stripped = piece
        if i < last:
            stripped = stripped.rstrip()  # the space before a mask belongs to the masked token
        if i > 0:
            stripped = stripped.lstrip()  # the tokenizer's own word boundary handles the space after it
        first = i == 0
        if stripped:
            ids.extend(tokenizer.encode(stripped, add_bos=first and add_bos))
        elif first and add_bos:
            ids.append(tokenizer.bos_id)
    return ids


@torch.no_grad()
def mask_distributions(
    model: DualTransformer, input_ids: torch.Tensor, mask_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """For a single sequence ((T,) or (1, T)): the mask positions j (n,) and the predicted distributions (n, V),
    softmax of the bidirectional logits at j - 1."""
    ids = input_ids
    if ids.dim() == 2:
        if ids.shape[0] != 1:
            raise ValueError(f"fill-mask takes one sequence, (T,) or (1, T); got shape {tuple(ids.shape)}")
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"fill-mask takes one sequence, (T,) or (1, T); got shape {tuple(input_ids.shape)}")
    positions = (ids == mask_id).nonzero().flatten()
    if positions.numel() == 0:
        raise ValueError(f"fill-mask: the input has no mask token (id {mask_id})")
    if int(positions[0]) == 0:
        raise ValueError(
            "fill-mask: a mask at position 0 cannot be predicted (MNTP reads the prediction for position j at "
            "j - 1); start the input with <s>"
        )
    if ids.numel() > model.cfg.max_seq_len:
        raise ValueError(f"fill-mask: {ids.numel()} tokens exceed model.max_seq_len = {model.cfg.max_seq_len}")
    device = next(model.parameters()).device
    ids = ids.to(device)
    was_training = model.training
    model.eval()
    try:
        hidden = model(ids[None], AttentionMask("bidirectional"))
        logits = model.head(hidden[0, positions.to(device) - 1]).float()  # only the rows we need
    finally:
        model.train(was_training)
    return positions, logits.softmax(dim=-1)


def fill_mask_ids(
    model: DualTransformer, input_ids: torch.Tensor, mask_id: int, top_k: int = 5
) -> list[list[tuple[int, float]]]:
    """Per mask (in order of position): the ``top_k`` most probable (token id, probability) pairs."""
    if top_k < 1:
        raise ValueError(f"top_k = {top_k} must be >= 1")
    _, probs = mask_distributions(model, input_ids, mask_id)
    values, indices = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    return [
        [(int(i), float(v)) for i, v in zip(row_i.tolist(), row_v.tolist(), strict=True)]
        for row_i, row_v in zip(indices, values, strict=True)
    ]


def fill_mask(
    model: DualTransformer, tokenizer: Any, text: str, top_k: int = 5, add_bos: bool = True
) -> list[list[tuple[str, float]]]:
    """Per ``<mask>`` in ``text``: the ``top_k`` most probable (token string, probability) pairs.

    The token string is ``tokenizer.decode([id], skip_special=False)`` (a word-initial token decodes without its
    leading space).
    """
    ids = encode_with_masks(tokenizer, text, add_bos=add_bos)
    preds = fill_mask_ids(model, torch.tensor(ids, dtype=torch.long), tokenizer.mask_id, top_k=top_k)
    return [[(tokenizer.decode([i], skip_special=False), p) for i, p in row] for row in preds]
