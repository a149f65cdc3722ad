"""transformers interop: export -> transformers logits (both classes), round trips, hub and reference layouts."""

import dataclasses
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import toy
from safetensors.torch import load_file, save_file
from toy import tiny_model_config

from megatron_dual.config import Config, ModelConfig
from megatron_dual.hf import ConversionError, export_model, import_hf, import_ltg, read_hf_dir, read_ltg_checkpoint
from megatron_dual.hf.names import from_hf_state, to_hf_state
from megatron_dual.inference import load_model, read_checkpoint_config
from megatron_dual.model import AttentionMask, DualTransformer

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
LTG_TOKENIZER = ROOT / "megatron_dual/assets/ltg-tokenizer/tokenizer.json"


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(hidden_size=64, intermediate_size=88, vocab_size=101, rope_theta=160_000.0, norm_eps=1e-7)
    return tiny_model_config(**(base | kw))


def randomised(cfg: ModelConfig, seed: int = 0) -> DualTransformer:
    return toy.randomised(cfg, seed, spread=0.2, gain=1.2)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = randomised(tiny_cfg())
    out = export_model(model, tmp_path_factory.mktemp("hf") / "tiny")
    return model, out


def _hf(cls_name: str, path: Path):
    cls = getattr(transformers, cls_name)
    return cls.from_pretrained(str(path), trust_remote_code=True, dtype=torch.float32).eval()


def test_export_layout_and_config(exported):
    _, out = exported
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "modeling_dlm_llama.py"} <= names
    hf = json.loads((out / "config.json").read_text())
    assert hf["model_type"] == "dlm_llama" and hf["final_norm"] is False and hf["head_bias"] is True
    assert hf["rope_parameters"]["rope_theta"] == 160_000.0 and hf["rms_norm_eps"] == 1e-7
    assert hf["num_key_value_heads"] == 2 and hf["head_dim"] == 16
    tensors = load_file(str(out / "model.safetensors"))
    assert "model.norm.weight" not in tensors and "model.layers.1.mlp.gate_proj.weight" in tensors
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)


def test_causal_lm_logits_equal_ours(exported):
    model, out = exported
    hf = _hf("AutoModelForCausalLM", out)
    assert type(hf).__name__ == "DLMLlamaForCausalLM"
    ids = torch.randint(0, 101, (3, 29), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.logits(ids, AttentionMask("causal"))
        theirs = hf(ids).logits
    assert (ours - theirs).abs().max() < 1e-4
    assert ours.abs().max() > 1.0  # the weights reach the logits: a wrong mapping would show


def test_masked_lm_logits_equal_ours_bidirectional(exported):
    model, out = exported
    for impl in ("sdpa", "eager"):
        hf = transformers.AutoModelForMaskedLM.from_pretrained(
            str(out), trust_remote_code=True, dtype=torch.float32, attn_implementation=impl
        )
        ids = torch.randint(0, 101, (2, 23), generator=torch.Generator().manual_seed(2))
        ids[:, 5] = 4  # a <mask>: MNTP reads its prediction at position 4
        with torch.no_grad():
            ours = model.logits(ids, AttentionMask("bidirectional"))
            theirs = hf(ids).logits
            causal = model.logits(ids, AttentionMask("causal"))
        assert (ours - theirs).abs().max() < 1e-4, impl
        assert (ours - causal).abs().max() > 1e-2  # it really is bidirectional


def test_masked_lm_padding_mask_hides_pads(exported):
    _, out = exported
    hf = _hf("AutoModelForMaskedLM", out)
    ids = torch.randint(5, 101, (1, 12), generator=torch.Generator().manual_seed(3))
    padded = torch.cat([ids, torch.full((1, 4), 3)], dim=1)
    keep = torch.cat([torch.ones(1, 12), torch.zeros(1, 4)], dim=1).long()
    with torch.no_grad():
        alone = hf(ids).logits
        with_pads = hf(padded, attention_mask=keep).logits[:, :12]
        seen_pads = hf(padded).logits[:, :12]
    assert (alone - with_pads).abs().max() < 1e-4
    assert (alone - seen_pads).abs().max() > 1e-3


def test_transformers_generate_equals_ours_greedy(exported):
    from megatron_dual.inference import generate

    model, out = exported
    hf = _hf("AutoModelForCausalLM", out)
    prompt = [1, 17, 33, 8, 90]
    ours = generate(model, [prompt], 12, temperature=0)[0]
    theirs = hf.generate(
        torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=3
    )
    assert theirs[0, len(prompt) :].tolist() == ours


def test_import_export_round_trip_is_bit_exact(exported, tmp_path):
    model, out = exported
    step = import_hf(out, tmp_path / "back")
    with pytest.raises(ValueError, match="empty data.tokenizer"):  # exported without one: named on load
        load_model(str(tmp_path / "back"))
    cfg, state = read_hf_dir(out)
    assert cfg.n_kv_heads == 2 and cfg.rope_theta == 160_000.0 and cfg.norm_eps == 1e-7
    original = model.state_dict()
    assert set(state) == set(original) and all(torch.equal(state[k], original[k]) for k in state)
    saved = load_file(str(step / "model.safetensors"))
    assert all(torch.equal(saved[k], original[k]) for k in original)
    rebuilt = DualTransformer(tiny_cfg())
    rebuilt.load_state_dict(saved)
    out2 = export_model(rebuilt, tmp_path / "again")
    a, b = load_file(str(out / "model.safetensors")), load_file(str(out2 / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "config.json").read_text() == (out2 / "config.json").read_text()


def test_checkpoint_export_and_import_with_tokenizer(tmp_path):
    from megatron_dual.engine.checkpoint import save_checkpoint
    from megatron_dual.hf import export_checkpoint

    cfg = Config()
    cfg.model = tiny_cfg(vocab_size=51200, n_layers=1, hidden_size=32, n_heads=2, n_kv_heads=None, intermediate_size=40)
    cfg.data.seq_len, cfg.data.tokenizer = 32, str(LTG_TOKENIZER)
    model = randomised(cfg.model, seed=5)
    save_checkpoint(tmp_path / "run", 7, model, {}, {}, cfg.to_dict())
    out = export_checkpoint(tmp_path / "run", tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    ours, _, our_tok = load_model(str(tmp_path / "run"))
    text = "The capital of France is Paris."
    assert tok(text)["input_ids"] == our_tok.encode(text)
    assert (tok.mask_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (4, 1, 2, 3)
    assert json.loads((out / "megatron_dual_config.json").read_text())["model"]["vocab_size"] == 51200
    step = import_hf(out, tmp_path / "back")
    back, back_cfg, back_tok = load_model(str(tmp_path / "back"))
    assert back_cfg.data.tokenizer == str((tmp_path / "back" / "tokenizer.json").resolve())
    assert back_tok.encode(text) == our_tok.encode(text) and step.name == "step_00000000"
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), ours.state_dict().values(), strict=True))


def _hub_spelling(state: dict) -> dict:
    """The same tensors under tolerated spellings: no ``model.`` prefix, the head as ``lm_head.`` with the
    reference's leaf names, and an identity final norm."""
    out = {}
    for k, v in state.items():
        if k.startswith("head."):
            leaf = {
                "norm.weight": "pre_norm.weight",
                "proj.weight": "projection.weight",
                "out.weight": "emb2vocab.weight",
                "out.bias": "emb2vocab.bias",
            }[k[5:]]
            out["lm_head." + leaf] = v
        else:
            out[k.removeprefix("model.")] = v
    out["norm.weight"] = torch.ones(64)
    return out


def test_import_tolerates_the_hub_layout(exported, tmp_path):
    model, out = exported
    hub = tmp_path / "hub"
    hub.mkdir()
    hf_cfg = json.loads((out / "config.json").read_text())
    hf_cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    for key in ("rope_parameters", "head_norm_eps", "final_norm", "head_bias", "head_hidden_act"):
        hf_cfg.pop(key)
    (hub / "config.json").write_text(json.dumps(hf_cfg))
    save_file(_hub_spelling(load_file(str(out / "model.safetensors"))), str(hub / "model.safetensors"))
    cfg, state = read_hf_dir(hub)
    assert cfg == dataclasses.replace(model.cfg, fused_ops="auto", attention_backend="auto")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def _ltg_state(cfg: ModelConfig, seed: int) -> dict:
    """A random state dict in the reference code's layout (its names, q/k/v and up/gate as separate tensors)."""
    g = torch.Generator().manual_seed(seed)
    h, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size

    def r(*shape):
        return torch.randn(*shape, generator=g) / shape[-1] ** 0.5

    state = {"embedding.word_embedding.weight": torch.randn(v, h, generator=g)}
    for i in range(cfg.n_layers):
        p = f"encoder.layers.{i}."
        state.update({p + f"attention.qkv_proj.weights.{j}": r(h, h) for j in range(3)})
        state.update({p + f"mlp.up_proj.weights.{j}": r(f, h) for j in range(2)})
        state.update(
            {
                p + "attention.pre_norm.weight": 1 + 0.1 * torch.randn(h, generator=g),
                p + "attention.out_proj.weight": r(h, h),
                p + "mlp.pre_norm.weight": 1 + 0.1 * torch.randn(h),
                p + "mlp.down_proj.weight": r(h, f),
            }
        )
    state.update(
        {
            "classifier.pre_norm.weight": 1 + 0.1 * torch.randn(h),
            "classifier.projection.weight": r(h, h),
            "classifier.emb2vocab.weight": r(v, h),
            "classifier.emb2vocab.bias": 0.1 * torch.randn(v),
        }
    )
    return state


LTG_TINY = {
    "attention_pre_norm_affine": True,
    "classifier_pre_norm_affine": True,
    "d_h": 16,
    "feed_forward_pre_norm_affine": True,
    "hidden_size": 64,
    "intermediate_size": 88,
    "max_sequence_length": 48,
    "norm_eps": 1e-07,
    "num_attention_heads": 4,
    "num_layers": 2,
    "rope_theta": 160000,
    "vocab_size": 101,
    "tie_weights": False,
}


def _hand_mapped(cfg: ModelConfig, s: dict) -> DualTransformer:
    """The reference tensors copied into a DualTransformer module by module."""
    model = DualTransformer(cfg)
    with torch.no_grad():
        model.embed.weight.copy_(s["embedding.word_embedding.weight"])
        for i, block in enumerate(model.layers):
            p = f"encoder.layers.{i}."
            block.attn_norm.weight.copy_(s[p + "attention.pre_norm.weight"])
            q, k, v = (s[p + f"attention.qkv_proj.weights.{j}"] for j in range(3))
            block.attn.qkv.weight.copy_(torch.cat([q, k, v]))
            block.attn.out.weight.copy_(s[p + "attention.out_proj.weight"])
            block.mlp_norm.weight.copy_(s[p + "mlp.pre_norm.weight"])
            up, gate = s[p + "mlp.up_proj.weights.0"], s[p + "mlp.up_proj.weights.1"]
            block.mlp.up.weight.copy_(torch.cat([up, gate]))
            block.mlp.down.weight.copy_(s[p + "mlp.down_proj.weight"])
        model.head.norm.weight.copy_(s["classifier.pre_norm.weight"])
        model.head.proj.weight.copy_(s["classifier.projection.weight"])
        model.head.out.weight.copy_(s["classifier.emb2vocab.weight"])
        model.head.out.bias.copy_(s["classifier.emb2vocab.bias"])
    return model.eval()


def test_import_from_reference_layout_equals_hand_mapping(tmp_path):
    state = _ltg_state(tiny_cfg(n_kv_heads=None), seed=7)
    torch.save({"module." + k: v for k, v in state.items()}, tmp_path / "state_dict.bin")  # a DDP-wrapped save
    cfg, ours = read_ltg_checkpoint(tmp_path, LTG_TINY)
    assert (cfg.n_layers, cfg.hidden_size, cfg.n_heads, cfg.intermediate_size) == (2, 64, 4, 88)
    hand = _hand_mapped(cfg, state)
    assert all(torch.equal(ours[k], v) for k, v in hand.state_dict().items())
    (tmp_path / "large.json").write_text(json.dumps(LTG_TINY))
    step = import_ltg(tmp_path / "state_dict.bin", tmp_path / "large.json", tmp_path / "ckpt")
    imported = DualTransformer(read_checkpoint_config(step).model)
    imported.load_state_dict(load_file(str(step / "model.safetensors")))
    assert read_checkpoint_config(step).data.tokenizer == "ltg"
    ids = torch.randint(0, 101, (2, 17), generator=torch.Generator().manual_seed(4))
    for kind in ("causal", "bidirectional"):
        assert torch.equal(imported.logits(ids, AttentionMask(kind)), hand.logits(ids, AttentionMask(kind)))


def test_reference_layout_without_norm_scales_and_tied(tmp_path):
    state = _ltg_state(tiny_cfg(n_kv_heads=None), seed=8)
    for k in [k for k in state if k.endswith("pre_norm.weight")]:
        del state[k]
    del state["classifier.emb2vocab.weight"]
    flags = {f"{p}_pre_norm_affine": False for p in ("attention", "feed_forward", "classifier")}
    torch.save(state, tmp_path / "state_dict.bin")
    cfg, ours = read_ltg_checkpoint(tmp_path / "state_dict.bin", {**LTG_TINY, **flags, "tie_weights": True})
    assert torch.equal(ours["head.out.weight"], state["embedding.word_embedding.weight"])
    assert torch.equal(ours["layers.1.mlp_norm.weight"], torch.ones(64))


def test_bad_inputs_are_named(exported, tmp_path):
    _, out = exported
    cfg = tiny_cfg()
    good = to_hf_state(randomised(cfg).state_dict(), cfg)
    missing = dict(good)
    del missing["model.layers.1.self_attn.v_proj.weight"]
    with pytest.raises(ConversionError, match=r"missing 1 tensor\(s\): model.layers.1.self_attn.v_proj.weight"):
        from_hf_state(missing, cfg, "x")
    with pytest.raises(ConversionError, match=r"extra 1 tensor\(s\): model.layers.2.mlp.up_proj.weight"):
        from_hf_state({**good, "model.layers.2.mlp.up_proj.weight": torch.zeros(1)}, cfg, "x")
    with pytest.raises(ConversionError, match="final norm 'model.norm.weight' that is not the identity"):
        from_hf_state({**good, "model.norm.weight": torch.full((64,), 2.0)}, cfg, "x")
    with pytest.raises(ConversionError, match=r"'head.proj.weight' has shape \(64, 63\)"):
        from_hf_state({**good, "head.proj.weight": torch.zeros(64, 63)}, cfg, "x")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConversionError, match="model_type 'gpt2' .*GPT2LMHeadModel.* is not a dual Llama"):
        read_hf_dir(gpt2)
    ltg = _ltg_state(tiny_cfg(n_kv_heads=None), seed=9)
    del ltg["encoder.layers.0.mlp.up_proj.weights.1"]
    with pytest.raises(ConversionError, match=r"missing 1 tensor\(s\): encoder.layers.0.mlp.up_proj.weights.1"):
        read_ltg_checkpoint(_save(ltg, tmp_path / "ltg.bin"), LTG_TINY)
    with pytest.raises(ConversionError, match="exists"):
        export_model(randomised(cfg), out)


def _save(state: dict, path: Path) -> Path:
    torch.save(state, path)
    return path


def _tool():
    spec = importlib.util.spec_from_file_location("convert_checkpoint_tool", ROOT / "tools/convert_checkpoint.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_convert_tool_modes_and_one_line_errors(exported, tmp_path):
    model, out = exported
    tool = _tool()
    assert tool.main([str(out), str(tmp_path / "ck"), "--from", "hf"]) == 0
    with pytest.raises(SystemExit, match="error: .*ck exists"):
        tool.main([str(out), str(tmp_path / "ck"), "--from", "hf"])
    ck = load_file(str(tmp_path / "ck" / "step_00000000" / "model.safetensors"))
    assert all(torch.equal(ck[k], v) for k, v in model.state_dict().items())
    (tmp_path / "large.json").write_text(json.dumps(LTG_TINY))
    _save(_ltg_state(tiny_cfg(n_kv_heads=None), seed=3), tmp_path / "state_dict.bin")
    assert (
        tool.main(
            [
                str(tmp_path / "state_dict.bin"),
                str(tmp_path / "ltg"),
                "--from",
                "ltg",
                "--ltg-config",
                str(tmp_path / "large.json"),
            ]
        )
        == 0
    )
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools/convert_checkpoint.py"),
            str(tmp_path / "gpt2"),
            str(tmp_path / "x"),
            "--from",
            "hf",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and "gpt2" in proc.stderr


def test_a_failed_forced_conversion_keeps_the_old_destination(exported, tmp_path, monkeypatch):
    from megatron_dual.engine import checkpoint as checkpoint_mod

    _, out = exported
    tool = _tool()
    good = tmp_path / "good"
    assert tool.main([str(out), str(good), "--from", "hf"]) == 0
    step = good / "step_00000000"
    before = {p.relative_to(good): p.read_bytes() for p in good.rglob("*") if p.is_file()}
    bad_step = tmp_path / "bad" / "step_00000000"
    shutil.copytree(step, bad_step)
    (bad_step / "model.safetensors").write_bytes((step / "model.safetensors").read_bytes()[:100])  # truncated
    with pytest.raises(SystemExit, match="error: .*bad.*model.safetensors"):
        tool.main([str(bad_step), str(step), "--tp", "1", "--force"])

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_mod, "save_checkpoint", disk_full)
    with pytest.raises(SystemExit, match="No space left"):
        tool.main([str(out), str(good), "--from", "hf", "--force"])
    monkeypatch.undo()
    assert {p.relative_to(good): p.read_bytes() for p in good.rglob("*") if p.is_file()} == before
    assert not list(tmp_path.glob("**/.tmp_*"))
    assert tool.main([str(out), str(good), "--from", "hf", "--force"]) == 0  # a good source replaces it
    assert tool.main([str(step), str(tmp_path / "tp1"), "--tp", "1"]) == 0
    assert tool.main([str(tmp_path / "tp1"), str(step), "--tp", "1", "--force"]) == 0
    assert read_checkpoint_config(step).data.tokenizer == ""


def test_a_destination_holding_the_source_is_refused(exported, tmp_path):
    _, out = exported
    tool = _tool()
    hf_copy = tmp_path / "hf"
    shutil.copytree(out, hf_copy)
    assert tool.main([str(hf_copy), str(tmp_path / "run" / "checkpoints"), "--from", "hf"]) == 0
    run, step = tmp_path / "run", tmp_path / "run" / "checkpoints" / "step_00000000"
    for args in (
        [str(hf_copy), str(hf_copy), "--from", "hf"],
        [str(hf_copy), str(tmp_path), "--from", "hf"],
        [str(run), str(run), "--to", "hf"],
        [str(run), str(tmp_path), "--to", "hf"],
        [str(step), str(run), "--tp", "1"],
    ):
        with pytest.raises(SystemExit, match="error: destination .* is or holds the source"):
            tool.main([*args, "--force"])
    assert (hf_copy / "model.safetensors").is_file() and (step / "model.safetensors").is_file()
    (step / "deepspeed").mkdir()  # the DeepSpeed form goes through its own path: refused there too, before reading
    for dst in (run, step):
        with pytest.raises(SystemExit, match="error: destination .* is or holds the source"):
            tool.main([str(step), str(dst), "--tp", "1", "--force"])
    assert (step / "model.safetensors").is_file() and (step / "deepspeed").is_dir()


def test_padded_mlp_exports_at_the_logical_width(exported, tmp_path):
    model, out = exported
    padded = DualTransformer(dataclasses.replace(model.cfg, pad_intermediate_to=64)).eval()
    padded.load_state_dict(model.state_dict())
    again = export_model(padded, tmp_path / "padded")
    a, b = load_file(str(out / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((again / "config.json").read_text())["intermediate_size"] == 88


def test_config_fields_that_are_not_numbers_are_named():
    """A null, a word, a bool or 2.5 where config.json needs an integer is one ConversionError naming the file, the
    field and the value (it was a TypeError traceback, or an int() message naming neither); numeric strings and
    defaults for absent or null optional fields still work."""
    from megatron_dual.config import ModelConfig
    from megatron_dual.hf.hf_config import from_hf_config, from_ltg_config, to_hf_config

    good = to_hf_config(ModelConfig(n_layers=2, hidden_size=64, n_heads=4, intermediate_size=96, vocab_size=80))
    assert from_hf_config(good).n_layers == 2
    assert (
        from_hf_config(good | {"num_key_value_heads": None, "head_dim": None, "num_hidden_layers": "2"}).n_layers == 2
    )
    for key, value, says in [
        ("num_hidden_layers", None, "c.json: num_hidden_layers is null"),
        ("hidden_size", "big", "c.json: hidden_size = 'big' is not an integer"),
        ("intermediate_size", 95.5, "c.json: intermediate_size = 95.5 is not an integer"),
        ("vocab_size", True, "c.json: vocab_size = True is not an integer"),
        ("rms_norm_eps", [1e-6], r"c.json: rms_norm_eps = \[1e-06\] is not a number"),
        ("rope_theta", "x", "c.json: rope_theta = 'x' is not a number"),
    ]:
        with pytest.raises(ConversionError, match=f"^{says}$"):
            from_hf_config(good | {key: value}, source="c.json")
    with pytest.raises(ConversionError, match="^c.json: missing field 'vocab_size'$"):
        from_hf_config({k: v for k, v in good.items() if k != "vocab_size"}, source="c.json")
    ltg = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 96, "vocab_size": 80}
    assert from_ltg_config(ltg).hidden_size == 64
    with pytest.raises(ConversionError, match="^large.json: d_h = 'sixteen' is not an integer$"):
        from_ltg_config(ltg | {"d_h": "sixteen"}, source="large.json")


def test_an_unwritable_destination_is_named(exported, tmp_path):
    """A destination under a file is one line naming it (it named the hidden temporary folder beside it)."""
    _, out = exported
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match=f"^error: cannot write {tmp_path}/file/run: Not a directory$"):
        _tool().main([str(out), str(tmp_path / "file" / "run"), "--from", "hf"])
    step = tmp_path / "ok" / "step_00000000"
    assert _tool().main([str(out), str(tmp_path / "ok"), "--from", "hf"]) == 0
    with pytest.raises(SystemExit, match=f"^error: cannot write {tmp_path}/file/tp: Not a directory$"):
        _tool().main([str(step), str(tmp_path / "file" / "tp"), "--tp", "1"])
    with pytest.raises(ConversionError, match="^cannot write .*/file/hf: Not a directory$"):
        export_model(exported[0], tmp_path / "file" / "hf")
