"""Every causal-LM family of the installed transformers, as a tiny random-weight model, read by traitlens as
each text's own forward pass reads it (the harness and its reference: ``families.py``)."""

import logging
import signal
import warnings

import families
from conftest import make_word_tokenizer


def test_every_causal_lm_family_reads_what_each_text_alone_computes():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    logging.getLogger("transformers").setLevel(logging.ERROR)
    tokenizer, results = make_word_tokenizer(), {}
    previous = signal.signal(signal.SIGALRM, families._alarm)
    try:
        for family in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            signal.alarm(families.TIMEOUT_S)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                results[family] = families.run_family(family, "eager", tokenizer)
            signal.alarm(0)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    wrong = {f: r["paths"] for f, r in results.items() if r["status"] == "WRONG"}
    assert not wrong, f"misread (relative error per path): {wrong}"
    ok = {f for f, r in results.items() if r["status"] == "OK"}
    shared = {f for f in ok if results[f].get("shared_calls")}
    assert len(ok) >= 150 and len(shared) >= 90, (len(ok), len(shared))  # 183 and 111 on transformers 5.24
    assert {"llama", "gpt2", "qwen2", "mistral", "gemma2", "gemma3", "moshi"} <= shared
    # right with one pass per side: they would misread a cached prompt (or do not say they would not)
    assert {"roberta", "xlm-roberta", "git", "trocr", "mamba", "xlstm"} <= ok - shared
