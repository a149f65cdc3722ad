"""The lm-evaluation-harness adapter: simple_evaluate on a local task, and each request type against the scorer."""

import json
import math

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from megatron_dual.eval.harness import encode_pair  # noqa: E402
from megatron_dual.eval.lm_eval_adapter import MegatronDualLM  # noqa: E402
from megatron_dual.eval.scoring import Scorer  # noqa: E402
from megatron_dual.inference.generate import generate  # noqa: E402
from megatron_dual.model import AttentionMask  # noqa: E402

DOCS = [
    {"context": "the cat sat on", "choices": [" the mat", " a log is red"], "label": 0},
    {"context": "Question: where is Paris Answer:", "choices": [" France", " the dog", " blue"], "label": 0},
    {"context": "the dog ran", "choices": [" on a mat", " yes"], "label": 1},
]


def instance(kind, args, i=0):
    return Instance(request_type=kind, doc={}, arguments=args, idx=i)


def write_task(tmp_path):
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        'target_delimiter: ""\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )


@pytest.mark.parametrize("mode", ["causal", "mntp"])
def test_simple_evaluate_on_a_local_task(tmp_path, monkeypatch, model, tok, mode):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    write_task(tmp_path)
    from lm_eval.tasks import TaskManager

    lm = MegatronDualLM(model=model, tokenizer_obj=tok, mode=mode)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=["tiny_mc"],
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        log_samples=False,
        bootstrap_iters=0,
    )
    got = out["results"]["tiny_mc"]["acc,none"]
    scorer = Scorer(model, tok.mask_id)
    hits = []
    for d in DOCS:
        scores = scorer.score([encode_pair(tok, d["context"], c) for c in d["choices"]], mode)
        lps = [s.logprob for s in scores]
        hits.append(float(lps.index(max(lps)) == d["label"]))
    assert got == pytest.approx(sum(hits) / len(hits))


def test_loglikelihood_matches_the_scorer_in_each_mode(model, tok):
    reqs = [instance("loglikelihood", (d["context"], c)) for d in DOCS for c in d["choices"]]
    reqs.append(instance("loglikelihood", ("", "the cat")))  # an empty context is conditioned on <s>
    for mode in ("causal", "prefix", "mntp"):
        got = MegatronDualLM(model=model, tokenizer_obj=tok, mode=mode).loglikelihood(reqs)
        want = Scorer(model, tok.mask_id).score([encode_pair(tok, *r.args) for r in reqs], mode)
        assert [g[0] for g in got] == pytest.approx([w.logprob for w in want], abs=1e-5)
        assert [g[1] for g in got] == [w.greedy for w in want]
    assert encode_pair(tok, "", "the cat") == ([tok.bos_id], tok.encode("the cat", add_bos=False))


def test_loglikelihood_rolling_sums_disjoint_windows(model, tok):
    lm = MegatronDualLM(model=model, tokenizer_obj=tok, mode="causal")
    short = "the cat sat on the mat"
    words = ("the cat sat on a mat and the dog ran " * 10).strip()  # 100 tokens > max_seq_len 64: two windows
    got = lm.loglikelihood_rolling(
        [instance("loglikelihood_rolling", (short,)), instance("loglikelihood_rolling", (words,))]
    )
    scorer = Scorer(model, tok.mask_id)
    ids = tok.encode(short, add_bos=False)
    assert got[0] == pytest.approx(scorer.score([([tok.bos_id], ids)], "causal")[0].logprob, abs=1e-4)
    ids = tok.encode(words, add_bos=False)
    first = scorer.score([([tok.bos_id], ids[:64])], "causal")[0].logprob
    second = scorer.score([(ids[:64], ids[64:])], "causal")[0].logprob  # context cut to fit the window
    assert got[1] == pytest.approx(first + second, abs=1e-3)
    assert math.isfinite(got[1]) and got[1] < got[0]


def _logprobs(model, seq):
    with torch.no_grad():
        return model.logits(torch.tensor([seq]), AttentionMask("causal"))[0].log_softmax(-1)


def test_loglikelihood_rolling_counts_every_token_once(model, tok):
    lm = MegatronDualLM(model=model, tokenizer_obj=tok, mode="causal")
    words = ("the cat sat on a mat and the dog ran " * 10).strip()  # 100 tokens, windows of 64
    got = lm.loglikelihood_rolling([instance("loglikelihood_rolling", (words,))])[0]
    ids = tok.encode(words, add_bos=False)
    first = _logprobs(model, [tok.bos_id] + ids[:63])  # predicts ids[0:64]
    second = _logprobs(model, ids[35:99])  # row i predicts ids[36 + i]
    want = sum(float(first[j, ids[j]]) for j in range(64))
    want += sum(float(second[j - 36, ids[j]]) for j in range(64, 100))
    assert got == pytest.approx(want, abs=1e-3)


def test_generate_until_is_greedy_generation_cut_at_the_stop_string(model, tok):
    lm = MegatronDualLM(model=model, tokenizer_obj=tok, mode="prefix")
    prompt = "the cat sat on"
    ids = tok.encode(prompt)
    new = generate(model, [ids], 8, temperature=0, eos_id=tok.eos_id, prefix_lm=True)[0]
    full = tok.decode(ids + new)[len(tok.decode(ids)) :]
    stop = full.split()[2]
    out = lm.generate_until([instance("generate_until", (prompt, {"until": [stop], "max_gen_toks": 8}))])
    assert out == [full[: full.index(stop)]]
    with pytest.raises(ValueError, match="generate_until in mode mntp"):
        MegatronDualLM(model=model, tokenizer_obj=tok, mode="mntp").generate_until(
            [instance("generate_until", (prompt, {"until": ["x"]}))]
        )


def test_bad_model_args(model, tok):
    with pytest.raises(ValueError, match="unknown mode 'bidi'; known: causal, prefix, mntp"):
        MegatronDualLM(model=model, tokenizer_obj=tok, mode="bidi")
    with pytest.raises(ValueError, match="needs checkpoint"):
        MegatronDualLM()
    for name, value, says in [
        ("batch_tokens", "abc", "batch_tokens = 'abc' is not an integer"),
        ("max_gen_toks", "abc", "max_gen_toks = 'abc' is not an integer"),
        ("max_gen_toks", "0", "max_gen_toks = '0' must be at least 1"),
    ]:
        with pytest.raises(ValueError, match=f"^MegatronDualLM: {says}$"):  # checked before a checkpoint is read
            MegatronDualLM(checkpoint="/nonexistent", **{name: value})
    lm = MegatronDualLM(model=model, tokenizer_obj=tok, batch_tokens="4096", max_gen_toks="8")
    assert (lm.max_gen_toks, lm.scorer.batch_tokens) == (8, 4096)
