"""Causal and prefix modes through ``mode=``: KV cache equals recomputation (GQA, padded batches), stop strings,
and the ``generate --mode`` command line."""

import pytest
import torch
from toy import randomised, tiny_model_config

from megatron_dual import cli
from megatron_dual.config import Config
from megatron_dual.inference import generate, generate_text
from megatron_dual.model import AttentionMask, DualTransformer


@pytest.fixture(scope="module")
def model() -> DualTransformer:
    return randomised(tiny_model_config())


def recompute(model: DualTransformer, prompt: list[int], n: int, mode: str) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        if mode == "prefix":
            mask = AttentionMask("prefix", prefix_len=torch.tensor([len(prompt)]))
        else:
            mask = AttentionMask("causal")
        seq.append(int(model.logits(torch.tensor([seq]), mask)[0, -1].argmax()))
    return seq[len(prompt) :]


@pytest.mark.parametrize("mode", ["causal", "prefix"])
def test_kv_cache_equals_recomputation_batched(model, mode):
    prompts = [[1, 9, 30, 2, 61, 7], [1, 44], [1, 5, 5, 80]]
    got = generate(model, prompts, 12, temperature=0, mode=mode)
    assert got == [recompute(model, p, 12, mode) for p in prompts]
    assert got != generate(model, prompts, 12, temperature=0, mode="prefix" if mode == "causal" else "causal")


def test_mode_is_checked(model):
    with pytest.raises(ValueError, match="mode = 'diffusion'; allowed: causal, prefix"):
        generate(model, [[1]], 2, mode="diffusion")


class WordTokenizer:
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<mask>"] + [f"<special_{i}>" for i in range(11)]

    def __init__(self) -> None:
        self.itos = self.specials + [f"w{i}" for i in range(97 - 16)]
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.unk_id, self.bos_id, self.eos_id, self.pad_id, self.mask_id = range(5)
        self.vocab_size = len(self.itos)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return ([self.bos_id] if add_bos else []) + [self.stoi.get(w, 0) for w in text.split()]

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return " ".join(self.itos[i] for i in ids if not (skip_special and i < 16))


def test_stop_strings_cut_each_row(model):
    tok = WordTokenizer()
    prompts = ["w1 w2 w3", "w10"]
    full = generate_text(model, tok, prompts, max_new_tokens=10, temperature=0, eos_id=None)
    words = full[0].split()
    stop = words[3]  # a word the first row produces: it stops there, the text ends before it
    cut = generate_text(model, tok, prompts, stop=[stop], max_new_tokens=10, temperature=0, eos_id=None)
    assert cut[0] == full[0][: full[0].find(stop)]
    assert cut[1] == (full[1][: full[1].find(stop)] if stop in full[1] else full[1])
    ids = generate(
        model, [tok.encode(p) for p in prompts], 10, temperature=0, stop=lambda row, new: row == 0 and len(new) == 2
    )
    assert len(ids[0]) == 2 and len(ids[1]) == 10


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from megatron_dual.data.tokenizer import save_tokenizer, train_bpe_tokenizer
    from megatron_dual.engine.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("gen")
    texts = ["the history of the union is the history of its people and their work"] * 20
    tok_path = save_tokenizer(train_bpe_tokenizer(texts, vocab_size=300, min_frequency=1), root / "tok")
    cfg = Config()
    cfg.model = tiny_model_config(vocab_size=320)
    cfg.data.seq_len, cfg.data.tokenizer = 32, tok_path
    save_checkpoint(root / "run", 1, randomised(cfg.model, seed=2), {}, {}, cfg.to_dict())
    return root / "run"


def test_cli_generate_modes(checkpoint, capsys):
    base = ["generate", "--checkpoint", str(checkpoint), "--prompt", "the history of", "--max-new-tokens", "8"]
    outs = {}
    for mode in ("causal", "prefix", "diffusion"):
        assert cli.main(base + ["--mode", mode, "--temperature", "0"]) == 0
        outs[mode] = capsys.readouterr().out
        assert outs[mode].startswith("the history of")
    assert len(set(outs.values())) == 3
    assert cli.main(base + ["--prefix-lm", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == outs["prefix"]
    args = ["--mode", "diffusion", "--steps", "4", "--block-length", "4", "--remasking", "random", "--seed", "1"]
    assert cli.main(base + args) == 0
    first = capsys.readouterr().out
    assert cli.main(base + args) == 0
    assert capsys.readouterr().out == first


def test_cli_generate_errors_are_one_line(checkpoint, capsys):
    base = ["generate", "--checkpoint", str(checkpoint), "--prompt", "the history of"]
    assert cli.main(base + ["--mode", "diffusion", "--max-new-tokens", "47"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: diffusion: prompt length") and "exceeds model.max_seq_len = 48" in err
    assert err.count("\n") == 1
    assert cli.main(base + ["--mode", "diffusion", "--stop", "x"]) == 2
    assert "--stop applies to the causal modes" in capsys.readouterr().err


def test_cli_diffusion_infills_prompt_masks(checkpoint, capsys):
    from megatron_dual.inference import DiffusionConfig, diffusion_infill, encode_with_masks, load_model

    text = "the history of <mask> union is the <mask> <mask> its people"
    base = ["generate", "--checkpoint", str(checkpoint), "--mode", "diffusion", "--temperature", "0"]
    assert cli.main(base + ["--prompt", text]) == 0  # --max-new-tokens defaults to 0 for a prompt with <mask>
    out = capsys.readouterr().out
    model, _, tok = load_model(checkpoint)
    ids = encode_with_masks(tok, text)
    filled = diffusion_infill(model, [ids], DiffusionConfig())[0]
    assert out == tok.decode(filled) + "\n" and len(filled) == len(ids) and tok.mask_id not in filled
    assert out.startswith("the history of") and "<mask>" not in out
    assert cli.main(base + ["--prompt", text, "--new-tokens", "0", "--steps", "3"]) == 0
    three = capsys.readouterr().out
    assert cli.main(base + ["--prompt", text, "--prompt", "the history", "--new-tokens", "4", "--steps", "3"]) == 0
    two = capsys.readouterr().out.splitlines()
    # the appended span follows row 0's filled masks; the mask-free row is continued
    assert len(two) == 2 and len(two[0]) > len(three.rstrip("\n")) and two[1].startswith("the history")


def test_cli_diffusion_with_nothing_to_fill_is_one_line_error(checkpoint, capsys):
    base = ["generate", "--checkpoint", str(checkpoint), "--mode", "diffusion", "--prompt", "the history of"]
    assert cli.main(base + ["--new-tokens", "0"]) == 2
    err = capsys.readouterr().err
    assert err == "error: diffusion: prompt 0 has no <mask> (id 4) and length = 0: nothing to fill\n"


def test_cli_stop_strings_take_backslash_escapes():
    """A shell passes ``--stop "\\n"`` as a backslash and an n: the README's command must stop at a newline."""
    parser = cli.build_parser()
    args = parser.parse_args(
        ["generate", "--checkpoint", "x", "--prompt", "p", "--stop", "\\n", "--stop", "a\\tb\\\\n\\q"]
    )
    assert args.stop == ["\n", "a\tb\\n\\q"]  # an escaped backslash stays one; an unknown escape stays as written
