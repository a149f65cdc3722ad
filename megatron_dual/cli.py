"""``megatron-dual`` console script: train, generate, fill-mask, eval, info."""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

import torch

from megatron_dual.config import ConfigError, add_config_args, load_config

_DEFAULT_NEW_TOKENS = 64  # generate's --max-new-tokens unless diffusion infills prompts with <mask>


def _model_info(cfg: Any) -> dict[str, Any]:
    """Shape, parameter counts, FLOPs per token and tokens per step of ``cfg`` (a meta-device model)."""
    from megatron_dual.model.flops import flops_per_token
    from megatron_dual.model.padding import round_up
    from megatron_dual.model.transformer import DualTransformer, param_counts

    with torch.device("meta"):
        counts = param_counts(DualTransformer(cfg.model))
    m, seq = cfg.model, cfg.data.seq_len
    return {
        "preset": cfg.preset or "(custom)",
        "layers": m.n_layers,
        "hidden": m.hidden_size,
        "heads": m.n_heads,
        "kv_heads": m.n_kv_heads,
        "head_dim": m.head_dim,
        "intermediate": m.intermediate_size,
        "vocab": m.vocab_size,
        "seq_len": seq,
        "intermediate_executed": round_up(m.intermediate_size, m.pad_intermediate_to),
        "params_total": counts["total"],
        "params_non_embedding": counts["non_embedding"],
        "params_per_layer": counts["per_layer"],
        "params_embedding": counts["embedding"],
        "params_head": counts["head"],
        "train_flops_per_token_causal": flops_per_token(m, seq, causal=True)["train"],
        "train_flops_per_token_bidirectional": flops_per_token(m, seq, causal=False)["train"],
        "tokens_per_step": cfg.train.micro_batch_size * cfg.train.grad_accum * seq,
    }


def _objective_info(cfg: Any, schedule: Any) -> dict[str, Any]:
    from megatron_dual.objectives import realised_segments

    segments = realised_segments(schedule, cfg.objective.recipe)
    return {
        "recipe": cfg.objective.recipe,
        "alpha_nominal": str(segments[0]["alpha"]),
        "alpha_effective": str(segments[0]["effective"]),
        "alpha_nominal_last": str(segments[-1]["alpha"]),
        "alpha_effective_last": str(segments[-1]["effective"]),
        "objective_slots": {o: schedule.counts(0).get(o, 0) for o in schedule.objectives},
    }


def _print_info(cfg: Any, info: dict[str, Any], schedule: Any) -> None:
    from megatron_dual.objectives import describe_objective

    m, seq = cfg.model, info["seq_len"]
    print(
        f"{info['preset']}: {m.n_layers} layers, hidden {m.hidden_size}, {m.n_heads} heads x {m.head_dim} "
        f"({m.n_kv_heads} kv), SwiGLU {m.intermediate_size}, vocab {m.vocab_size}, context {m.max_seq_len}"
    )
    if info["intermediate_executed"] != m.intermediate_size:
        print(
            f"  MLP executed   {info['intermediate_executed']} wide (model.pad_intermediate_to = "
            f"{m.pad_intermediate_to}: zero units; parameters, FLOPs and checkpoints at {m.intermediate_size})"
        )
    total, non_emb = info["params_total"], info["params_non_embedding"]
    print(f"  parameters     total {total:>15,}  ({total / 1e6:.1f}M)")
    print(f"                 non-embedding {non_emb:>7,}  ({non_emb / 1e6:.1f}M)")
    print(f"                 per layer {info['params_per_layer']:>11,}")
    print(f"                 embedding {info['params_embedding']:>11,}   head {info['params_head']:,}")
    print(
        f"  FLOPs/token    training (fwd+bwd) at seq {seq}: causal "
        f"{info['train_flops_per_token_causal'] / 1e9:.3f} GFLOP, "
        f"bidirectional {info['train_flops_per_token_bidirectional'] / 1e9:.3f} GFLOP"
    )
    print(
        f"  tokens/step    {info['tokens_per_step']:,} per data-parallel rank "
        f"({cfg.train.micro_batch_size} x {cfg.train.grad_accum} slots x {seq})"
    )
    lines = describe_objective(cfg.objective, schedule)
    print(f"  objective      {lines[0]} (one rank; slots = dp x train.grad_accum)")
    for line in lines[1:]:
        print(f"               {line}")


def cmd_info(args: argparse.Namespace) -> int:
    from megatron_dual.objectives import schedule_from_config

    cfg = load_config(args.config, args.overrides, preset=args.preset)
    schedule = schedule_from_config(
        cfg.objective, 1, cfg.train.grad_accum, cfg.train.steps, cfg.data.epoch_repetitions()
    )
    info = _model_info(cfg) | _objective_info(cfg, schedule)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_info(cfg, info, schedule)
    return 0


def _diffusion_lines(args: argparse.Namespace, model: Any, cfg: Any, tok: Any, g: torch.Generator) -> list[str]:
    """``generate --mode diffusion``: prompt + filled span per prompt, or, where any prompt has a ``<mask>``,
    each prompt with its masks filled (infilling) and the span after it."""
    from megatron_dual.inference.diffusion import DiffusionConfig, infill_text
    from megatron_dual.inference.fill_mask import MASK_TEXT
    from megatron_dual.inference.generate import diffusion_text

    infill = any(MASK_TEXT in p for p in args.prompt)
    new_tokens = args.max_new_tokens
    if new_tokens is None:
        new_tokens = 0 if infill else _DEFAULT_NEW_TOKENS
    dcfg = DiffusionConfig(
        length=new_tokens,
        steps=args.steps,
        block_length=args.block_length,
        remasking=args.remasking,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        mask_id=tok.mask_id,
        n_special=cfg.objective.n_special,
    )
    if infill:
        return infill_text(model, tok, args.prompt, dcfg, generator=g)
    outs = diffusion_text(model, tok, args.prompt, dcfg, generator=g)
    bold = sys.stdout.isatty()
    return [f"{p}\033[1m{o}\033[0m" if bold else f"{p}{o}" for p, o in zip(args.prompt, outs, strict=True)]


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def stop_string(text: str) -> str:
    """``--stop``'s value with ``\\n``, ``\\t``, ``\\r`` and ``\\\\`` turned into the characters (a shell passes
    ``"\\n"`` as a backslash and an n); any other backslash is kept as written."""
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(0)), text)


def cmd_generate(args: argparse.Namespace) -> int:
    from megatron_dual.inference.generate import generate_text
    from megatron_dual.inference.loading import load_model

    mode = "prefix" if args.prefix_lm else args.mode
    if mode == "diffusion" and args.stop:
        raise ValueError("--stop applies to the causal modes (causal, prefix), not to diffusion")
    model, cfg, tok = load_model(args.checkpoint, device=args.device, tokenizer=args.tokenizer)
    g = torch.Generator(device=args.device).manual_seed(args.seed)
    if mode == "diffusion":
        for line in _diffusion_lines(args, model, cfg, tok, g):
            print(line)
        return 0
    outs = generate_text(
        model,
        tok,
        args.prompt,
        stop=args.stop,
        max_new_tokens=_DEFAULT_NEW_TOKENS if args.max_new_tokens is None else args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        generator=g,
        mode=mode,
    )
    for prompt, out in zip(args.prompt, outs, strict=True):
        print(f"{prompt}\033[1m{out}\033[0m" if sys.stdout.isatty() else f"{prompt}{out}")
    return 0


def cmd_fill_mask(args: argparse.Namespace) -> int:
    from megatron_dual.inference.fill_mask import fill_mask
    from megatron_dual.inference.loading import load_model

    model, _, tok = load_model(args.checkpoint, device=args.device, tokenizer=args.tokenizer)
    for text in args.text:
        preds = fill_mask(model, tok, text, top_k=args.top_k)
        print(text)
        for i, cands in enumerate(preds):
            shown = ", ".join(f"{t!r} {p:.3f}" for t, p in cands)
            print(f"  <mask> #{i + 1}: {shown}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from megatron_dual.eval.harness import run_cli

    return run_cli(args)


def cmd_train(args: argparse.Namespace) -> int:
    from megatron_dual.train import run

    return run(args)


def _inference_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint dir, or a run dir / checkpoints dir (latest)")
    p.add_argument("--tokenizer", help="override the tokenizer recorded in the checkpoint's config")
    p.add_argument("--device", default="cpu")


def _generate_args(g: argparse.ArgumentParser) -> None:
    """The ``generate`` subcommand's arguments."""
    _inference_args(g)
    g.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable: one batch)")
    g.add_argument(
        "--mode",
        choices=["causal", "prefix", "diffusion"],
        default="causal",
        help="causal; prefix (prompt attended bidirectionally); diffusion (unmask an appended span of masks "
        "and any <mask> in the prompt)",
    )
    g.add_argument(
        "--max-new-tokens",
        "--new-tokens",
        type=int,
        default=None,
        help=f"tokens to generate (diffusion: masks appended; default {_DEFAULT_NEW_TOKENS}, but 0 when a diffusion "
        "prompt has <mask>: fill only the prompt's masks)",
    )
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--stop",
        action="append",
        default=[],
        type=stop_string,
        help="stop string (causal modes; repeatable); \\n, \\t, \\r and \\\\ in it are a newline, tab, carriage "
        "return and backslash, so --stop '\\n' stops at a newline",
    )
    g.add_argument("--steps", type=int, default=0, help="diffusion: unmasking steps (default: one per mask)")
    g.add_argument(
        "--block-length",
        type=int,
        default=0,
        help="diffusion: semi-autoregressive block length, in masks (default: all masks in one block)",
    )
    g.add_argument(
        "--remasking",
        choices=["confidence", "random"],
        default="confidence",
        help="diffusion: keep the most confident predictions (low-confidence remasking) or random ones",
    )
    g.add_argument("--prefix-lm", action="store_true", help="same as --mode prefix")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-dual", description="dual-objective (AR + masked diffusion) LM stack")
    sub = p.add_subparsers(dest="command", required=True)

    from megatron_dual.train import add_train_args

    t = sub.add_parser("train", help="train a model")
    add_train_args(t)
    t.set_defaults(func=cmd_train)

    i = sub.add_parser("info", help="parameter counts and FLOPs per token of a preset/config")
    add_config_args(i)
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)

    g = sub.add_parser("generate", help="generation: causal (KV cache), prefix-LM, or masked diffusion")
    _generate_args(g)
    g.set_defaults(func=cmd_generate)

    f = sub.add_parser(
        "fill-mask",
        help="MNTP fill-mask: one forward, the top-k predictions for each <mask> (read at the position before); "
        "iterative infilling is generate --mode diffusion",
    )
    _inference_args(f)
    f.add_argument("--text", action="append", required=True, help="text with one or more <mask> (repeatable)")
    f.add_argument("--top-k", type=int, default=5)
    f.set_defaults(func=cmd_fill_mask)

    from megatron_dual.eval.harness import add_eval_args

    e = sub.add_parser("eval", help="zero-shot multiple-choice scores in causal / prefix-LM / MNTP mode")
    _inference_args(e)
    add_eval_args(e)
    e.set_defaults(func=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_dual.engine.checkpoint import CheckpointError
    from megatron_dual.parallel.resharding import ReshardError

    try:
        return args.func(args)
    except (ConfigError, CheckpointError, ReshardError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)  # e.g. a corrupt model.safetensors given to generate / eval
        return 2
    except ModuleNotFoundError as e:  # the checkout run from PYTHONPATH on an image without one of its packages
        print(f"error: {e} (pip install -e . installs what megatron-dual needs)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
