"""Tokenizers: the vendored ltg 51,200-token byte-level BPE, any compatible ``tokenizer.json``, and training new ones.

Every tokenizer this project uses has the same 16 special tokens at ids 0..15 (``SPECIAL_TOKENS``); the objectives
rely on that layout (ids below ``N_SPECIAL`` are never masked, ``<mask>`` = 4, every document starts with ``<s>`` = 1).

Literal special-token strings inside a text (``"<s>"``, ``"<mask>"``) are encoded as ordinary text, so a document
never gains a stray document boundary or mask; the only ``<s>`` is the one ``encode`` puts first.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers

__all__ = [
    "SPECIAL_TOKENS",
    "N_SPECIAL",
    "LTG_TOKENIZER_PATH",
    "Tokenizer",
    "load_tokenizer",
    "train_bpe_tokenizer",
    "save_tokenizer",
    "iter_training_texts",
]

SPECIAL_TOKENS: list[str] = ["<unk>", "<s>", "</s>", "<pad>", "<mask>"] + [f"<special_{i}>" for i in range(11)]
N_SPECIAL = 16
assert len(SPECIAL_TOKENS) == N_SPECIAL

LTG_TOKENIZER_PATH = str(Path(__file__).resolve().parent.parent / "assets" / "ltg-tokenizer" / "tokenizer.json")

# The ltg pre-tokenizer's split pattern (letters with their case run, single digits, punctuation runs, newlines).
_SPLIT_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"| ?\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class Tokenizer:
    """A ``tokenizers.Tokenizer`` with the project's special-token layout checked and named."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, path: str = "<memory>") -> None:
        _check_specials(tokenizer, path)
        self._tok = tokenizer
        self._tok.encode_special_tokens = True  # literal "<s>" in text is text (see the module docstring)
        self.path = path
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.unk_id, self.bos_id, self.eos_id, self.pad_id, self.mask_id = 0, 1, 2, 3, 4
        self.n_special = N_SPECIAL
        self._check_bos_post_processor()

    def _check_bos_post_processor(self) -> None:
        ids = self._tok.encode("a", add_special_tokens=True).ids
        plain = self._tok.encode("a", add_special_tokens=False).ids
        if ids != [self.bos_id] + plain:
            raise ValueError(
                f"{self.path}: the tokenizer's post-processor must prepend exactly one <s> (id {self.bos_id}); "
                f"'a' encodes as {ids} with special tokens and {plain} without"
            )

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._tok

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_bos`` exactly one ``<s>`` first, otherwise none."""
        return self._tok.encode(text, add_special_tokens=add_bos).ids

    def encode_batch(self, texts: list[str], add_bos: bool = True) -> list[list[int]]:
        """``encode`` over a list (parallel inside the Rust library)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_bos)]

    def decode(self, ids: Iterable[int] | Any, skip_special: bool = True) -> str:
        """Text of ``ids`` (a list, numpy array or 1-D tensor); special tokens dropped when ``skip_special``."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(path={self.path!r}, vocab_size={self.vocab_size})"


def _check_specials(tok: tokenizers.Tokenizer, path: str) -> None:
    for i, want in enumerate(SPECIAL_TOKENS):
        got = tok.id_to_token(i)
        if got != want:
            raise ValueError(
                f"{path}: id {i} is {got!r} but this project needs {want!r} there "
                f"(ids 0..{N_SPECIAL - 1} must be {', '.join(SPECIAL_TOKENS[:5])}, <special_0>..<special_10>)"
            )


def load_tokenizer(spec: str | os.PathLike) -> Tokenizer:
    """``"ltg"`` -> the vendored tokenizer; otherwise a ``tokenizer.json`` path or a directory holding one.

    Raises FileNotFoundError naming the path tried, ValueError when ids 0..15 are not ``SPECIAL_TOKENS`` or the file
    is not a tokenizer.
    """
    spec = os.fspath(spec)
    if spec == "ltg":
        path = LTG_TOKENIZER_PATH
    else:
        path = os.path.join(spec, "tokenizer.json") if os.path.isdir(spec) else spec
    if not os.path.isfile(path):
        hint = " (give 'ltg', a tokenizer.json file, or a directory holding one)" if spec != "ltg" else ""
        raise FileNotFoundError(f"tokenizer file not found: {path}{hint}")
    try:
        tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # the Rust side raises a bare Exception for malformed JSON
        raise ValueError(f"{path}: not a valid tokenizer.json: {e}") from e
    return Tokenizer(tok, path)


def _ltg_pipeline(tok: tokenizers.Tokenizer) -> None:
    """Install the ltg normalizer / pre-tokenizer / decoder / ``<s>`` post-processor on ``tok``."""
    tok.normalizer = normalizers.Sequence(
        [
            normalizers.Prepend(" "),
            normalizers.NFC(),
            normalizers.Replace(Regex("\n"), "\n "),
            normalizers.Replace(Regex(" *\n"), "\n"),
        ]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True),
            decoders.Strip(" ", 1, 0),
            decoders.Replace("\n ", "\n"),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", SPECIAL_TOKENS.index("<s>"))]
    )


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE with the ltg pipeline and ``SPECIAL_TOKENS`` at ids 0..15, streaming ``texts``.

    ``vocab_size`` counts the 16 specials and the 256 byte symbols, so it must exceed 272.
    """
    floor = N_SPECIAL + 256
    if vocab_size <= floor:
        raise ValueError(f"vocab_size = {vocab_size}: must exceed {floor} (16 special tokens + 256 byte symbols)")
    if min_frequency < 1:
        raise ValueError(f"min_frequency = {min_frequency}: must be >= 1")
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", ignore_merges=True))
    _ltg_pipeline(tok)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok)


def save_tokenizer(tok: Tokenizer | tokenizers.Tokenizer, path: str | os.PathLike) -> str:
    """Write ``tok`` as JSON; ``path`` is a ``.json`` file or a directory (then ``<path>/tokenizer.json``).

    Written to a temporary name and renamed, so a reader never sees half a file. Returns the file's path.
    """
    backend = tok.backend if isinstance(tok, Tokenizer) else tok
    path = os.fspath(path)
    if not path.endswith(".json"):
        path = os.path.join(path, "tokenizer.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(backend.to_str(pretty=False))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def _jsonl_texts(path: str, json_key: str) -> Iterator[str]:
    """The non-empty string ``json_key`` values of a ``.jsonl`` file; any other line is skipped."""
    with open(path, "rb") as f:
        for raw in f:
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                continue
            value = obj.get(json_key) if isinstance(obj, dict) else None
            if isinstance(value, str) and value:
                yield value


def _text_chunks(path: str, chunk_chars: int) -> Iterator[str]:
    """A text file in line-aligned chunks of at least ``chunk_chars`` characters (the last may be shorter)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        buf: list[str] = []
        size = 0
        for line in f:
            buf.append(line)
            size += len(line)
            if size >= chunk_chars:
                yield "".join(buf)
                buf, size = [], 0
        if buf:
            yield "".join(buf)


def iter_training_texts(paths: Sequence[str], json_key: str = "text", chunk_chars: int = 1 << 20) -> Iterator[str]:
    """Stream texts for tokenizer training: ``.jsonl`` lines' ``json_key`` values, ``.txt`` files in line-aligned
    chunks of about ``chunk_chars`` characters. Lines that are not valid UTF-8 JSON objects with a string value are
    skipped. Missing files raise FileNotFoundError before anything is read."""
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"input file not found: {p}")
    for p in paths:
        if p.endswith(".jsonl") or p.endswith(".json"):
            yield from _jsonl_texts(p, json_key)
        else:
            yield from _text_chunks(p, chunk_chars)
