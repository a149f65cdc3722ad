"""Text encoders for preprocessing: any HF ``tokenizer.json``, a sentencepiece ``.model``, or the vendored ltg by name.

All of them expose the same small surface (``encode_many``, ``decode``, ``vocab_size``, ``bos_id``, ``eos_id``), return
ids *without* special tokens (the preprocessor adds ``<s>``/``</s>`` itself, by flag) and are rebuilt inside worker
processes from their ``spec`` string.

Tokenizers with the ltg pipeline (the vendored one and every tokenizer ``train_bpe_tokenizer`` writes) get a fast
path, ``LtgFastEncoder``: the normalizer still runs in the Rust library, but the pre-tokenizer's split runs through
the ``regex`` module (about 6x faster than the Rust library's Oniguruma split here) and every distinct piece is
byte-level-mapped and BPE-encoded once and then served from a bounded dictionary. Ids are identical to the
tokenizer's own ``encode`` (tested on varied Unicode); a document whose pieces do not tile the normalized text
exactly falls back to the library's ``encode``.

Special-token strings inside a text (a literal ``<s>``, e.g. in the regex ``(?P<s>...)``) are handled by
``special_tokens`` (``SPECIAL_TOKEN_MODES``): ``"text"`` (default) encodes them as the characters they are, the same
in every HF encoder (the library's ``encode_special_tokens``); ``"special"`` maps each to its id as the
``tokenizers`` library's plain ``encode`` does (HF tokenizers only; sentencepiece never parses control tokens).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from itertools import chain
from typing import Any

import numpy as np
import tokenizers

from megatron_dual.data.tokenizer import _SPLIT_PATTERN, LTG_TOKENIZER_PATH, _ltg_pipeline

__all__ = [
    "TextEncoder",
    "HFEncoder",
    "LtgFastEncoder",
    "SentencePieceEncoder",
    "load_encoder",
    "resolve_spec",
    "SPECIAL_TOKEN_MODES",
]

SPECIAL_TOKEN_MODES = ("text", "special")  # how special-token strings inside a text are encoded (module docstring)

_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "[CLS]")
_EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "[SEP]")
_CACHE_LIMIT = 1 << 20  # distinct pieces kept by the fast path (bounded memory); cleared when full


class TextEncoder:
    """Interface: ``encode_many(texts) -> list of id lists`` (no special tokens), ``decode(ids)``."""

    spec: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    kind: str

    def encode_many(self, texts: Sequence[str]) -> list[Sequence[int]]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special: bool = True) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, vocab_size={self.vocab_size})"


def resolve_spec(spec: str | os.PathLike) -> tuple[str, str]:
    """-> (kind, path): kind is ``"hf"`` or ``"sentencepiece"``. Raises FileNotFoundError naming the path tried."""
    spec = os.fspath(spec)
    if spec == "ltg":
        return "hf", LTG_TOKENIZER_PATH
    path = os.path.join(spec, "tokenizer.json") if os.path.isdir(spec) else spec
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"tokenizer file not found: {path} (give 'ltg', a tokenizer.json, a directory holding one, "
            f"or a sentencepiece .model)"
        )
    return ("sentencepiece" if path.endswith(".model") else "hf"), path


def _special_id(tok: tokenizers.Tokenizer, names: Sequence[str]) -> int | None:
    for name in names:
        i = tok.token_to_id(name)
        if i is not None:
            return int(i)
    return None


class HFEncoder(TextEncoder):
    """A ``tokenizers`` tokenizer used as-is: ``encode(text, add_special_tokens=False)`` one document at a time."""

    kind = "hf"

    def __init__(self, path: str, spec: str | None = None, special_tokens: str = "text") -> None:
        if special_tokens not in SPECIAL_TOKEN_MODES:
            raise ValueError(f"special_tokens = {special_tokens!r}: must be one of {', '.join(SPECIAL_TOKEN_MODES)}")
        try:
            self.tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # the Rust side raises a bare Exception for malformed JSON
            raise ValueError(f"{path}: not a valid tokenizer.json: {e}") from e
        self.spec = spec or path
        self.path = path
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = _special_id(self.tok, _BOS_NAMES)
        self.eos_id = _special_id(self.tok, _EOS_NAMES)
        self.special_tokens = special_tokens
        # "text": a literal "<s>" in a text is text (the project's convention, see megatron_dual.data.tokenizer);
        # "special": the library's own default, special-token strings become their ids
        self.tok.encode_special_tokens = special_tokens == "text"

    def encode_many(self, texts: Sequence[str]) -> list[Sequence[int]]:
        enc = self.tok.encode
        return [enc(t, add_special_tokens=False).ids for t in texts]

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special: bool = True) -> str:
        return self.tok.decode([int(i) for i in np.asarray(ids).tolist()], skip_special_tokens=skip_special)


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table, the alphabet of the ``ByteLevel`` pre-tokenizer."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return [table[b] for b in range(256)]


_BYTE_CHARS = _bytes_to_unicode()
_BYTE_TRANS = {i: c for i, c in enumerate(_BYTE_CHARS)}  # str.translate over latin-1 decoded bytes
_LTG_SECTIONS: dict[str, Any] | None = None
_LTG_CHECKED: dict[str, bool] = {}


def _ltg_sections() -> dict[str, Any]:
    global _LTG_SECTIONS
    if _LTG_SECTIONS is None:
        t = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>", ignore_merges=True))
        _ltg_pipeline(t)
        d = json.loads(t.to_str())
        _LTG_SECTIONS = {"normalizer": d["normalizer"], "pre_tokenizer": d["pre_tokenizer"]}
    return _LTG_SECTIONS


def _is_ltg_pipeline(path: str) -> bool:
    """True when ``path``'s normalizer and pre-tokenizer are exactly the ltg pipeline, its model a plain byte-level
    BPE and every added token special (so the fast path reproduces ``encode`` exactly)."""
    if path in _LTG_CHECKED:
        return _LTG_CHECKED[path]
    ok = False
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        m = d.get("model") or {}
        want = _ltg_sections()
        ok = (
            d.get("normalizer") == want["normalizer"]
            and d.get("pre_tokenizer") == want["pre_tokenizer"]
            and m.get("type") == "BPE"
            and not m.get("byte_fallback")
            and m.get("dropout") is None
            and not m.get("continuing_subword_prefix")
            and not m.get("end_of_word_suffix")
            and all(t.get("special") for t in d.get("added_tokens", []))
        )
    except (OSError, ValueError):
        ok = False
    _LTG_CHECKED[path] = ok
    return ok


class LtgFastEncoder(HFEncoder):
    """Exact fast path for ltg-pipeline tokenizers (see the module docstring)."""

    kind = "hf-ltg-fast"

    def __init__(self, path: str, spec: str | None = None, special_tokens: str = "text") -> None:
        super().__init__(path, spec, special_tokens)
        import regex  # a dependency; load_encoder falls back to HFEncoder when it is missing

        self._split = regex.compile(_SPLIT_PATTERN).findall
        self._normalize = self.tok.normalizer.normalize_str
        self._model = self.tok.model
        self._cache: dict[str, list[int]] = {}
        self.fallbacks = 0
        self._special_re: re.Pattern[str] | None = None
        self._special_ids: dict[str, int] = {}
        if special_tokens == "special":
            self._init_special()

    def _init_special(self) -> None:
        """The split on special-token strings (leftmost, longest first, as the library's added vocabulary matches).
        Tokens with lstrip / rstrip / single_word / normalized matching are left to the library's ``encode``."""
        added = [t for t in self.tok.get_added_tokens_decoder().values() if t.special]
        if any(t.lstrip or t.rstrip or t.single_word or t.normalized for t in added):
            self._plain = self._library_encode
        self._special_ids = {t.content: int(self.tok.token_to_id(t.content)) for t in added}
        if self._special_ids:
            names = sorted(self._special_ids, key=len, reverse=True)
            self._special_re = re.compile("|".join(map(re.escape, names)))

    def _piece_ids(self, piece: str) -> list[int]:
        ids = [t.id for t in self._model.tokenize(piece.encode("utf-8").decode("latin-1").translate(_BYTE_TRANS))]
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[piece] = ids
        return ids

    def _library_encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_one(self, text: str) -> list[int]:
        if self._special_re is None:
            return self._plain(text)
        out: list[int] = []
        pos = 0
        for m in self._special_re.finditer(text):
            if m.start() > pos:
                out += self._plain(text[pos : m.start()])
            out.append(self._special_ids[m.group()])
            pos = m.end()
        if pos < len(text):
            out += self._plain(text[pos:])
        return out

    def _plain(self, text: str) -> list[int]:
        """Ids of a text holding no special token to match (every character is text)."""
        norm = self._normalize(text)
        pieces = self._split(norm)
        if sum(map(len, pieces)) != len(norm):  # the split did not tile the text: let the library do it
            self.fallbacks += 1
            return self.tok.encode(text, add_special_tokens=False).ids
        get = self._cache.get
        vals = list(map(get, pieces))
        if None in vals:
            vals = [v if v is not None else self._piece_ids(p) for v, p in zip(vals, pieces, strict=True)]
        return list(chain.from_iterable(vals))

    def encode_many(self, texts: Sequence[str]) -> list[Sequence[int]]:
        return [self.encode_one(t) for t in texts]


class SentencePieceEncoder(TextEncoder):
    kind = "sentencepiece"

    def __init__(self, path: str, spec: str | None = None, special_tokens: str = "text") -> None:
        import sentencepiece as spm

        if special_tokens != "text":
            raise ValueError(
                f"{path}: special_tokens = {special_tokens!r} is supported for HF tokenizer.json "
                f"tokenizers only (sentencepiece encodes control-token strings as text)"
            )
        try:
            self.sp = spm.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path}: not a valid sentencepiece model: {e}") from e
        self.spec = spec or path
        self.path = path
        self.vocab_size = int(self.sp.get_piece_size())
        self.bos_id = int(self.sp.bos_id()) if self.sp.bos_id() >= 0 else None
        self.eos_id = int(self.sp.eos_id()) if self.sp.eos_id() >= 0 else None

    def encode_many(self, texts: Sequence[str]) -> list[Sequence[int]]:
        return self.sp.encode(list(texts))

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special: bool = True) -> str:
        ids = [int(i) for i in np.asarray(ids).tolist()]
        if skip_special:
            ids = [i for i in ids if not (self.sp.is_control(i) or self.sp.is_unknown(i))]
        return self.sp.decode(ids)


def load_encoder(spec: str | os.PathLike, fast: bool = True, special_tokens: str = "text") -> TextEncoder:
    """The encoder for ``spec`` (``"ltg"``, a ``tokenizer.json`` or its directory, a sentencepiece ``.model``);
    ``fast`` picks ``LtgFastEncoder`` for ltg-pipeline tokenizers when the ``regex`` module is installed;
    ``special_tokens`` in ``SPECIAL_TOKEN_MODES`` (see the module docstring)."""
    spec = os.fspath(spec)
    kind, path = resolve_spec(spec)
    if kind == "sentencepiece":
        return SentencePieceEncoder(path, spec, special_tokens)
    if fast and _is_ltg_pipeline(path):
        try:
            return LtgFastEncoder(path, spec, special_tokens)
        except ImportError:
            pass
    return HFEncoder(path, spec, special_tokens)
