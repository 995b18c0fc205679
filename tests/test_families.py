"""Every causal-LM family of the installed transformers, as a tiny random-weight model, read, steered and
monitored by traitlens as plain hooks on each text's own forward pass or generation do (the harnesses and
their references: ``families.py``, ``families_steering.py``)."""

import logging
import warnings

import families
import families_steering
from conftest import make_word_tokenizer


def _every_family(run) -> dict[str, dict]:
    """``run(model_type, tokenizer)`` for every causal-LM model type, each within ``families.TIMEOUT_S``."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    logging.getLogger("transformers").setLevel(logging.ERROR)
    tokenizer, results = make_word_tokenizer(), {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for family in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            results[family] = families.timed(lambda family=family: run(family, tokenizer), {"family": family})
    stuck = {
        f: r["reason"] for f, r in results.items() if r.get("reason", "").startswith(("timeout", "harness"))
    }
    assert not stuck, f"the harness itself failed or timed out: {stuck}"
    return results


def test_every_causal_lm_family_reads_what_each_text_alone_computes():
    results = _every_family(lambda family, tokenizer: families.run_family(family, "eager", tokenizer))
    wrong = {f: r["paths"] for f, r in results.items() if r["status"] == "WRONG"}
    assert not wrong, f"misread (relative error per path): {wrong}"
    ok = {f for f, r in results.items() if r["status"] == "OK"}
    shared = {f for f in ok if results[f].get("shared_calls")}
    assert len(ok) >= 150 and len(shared) >= 90, (len(ok), len(shared))  # 183 and 114 on transformers 5.24
    assert {"llama", "gpt2", "qwen2", "mistral", "gemma2", "gemma3", "moshi"} <= shared
    # right with one pass per side: they would misread a cached prompt (or do not say they would not)
    assert {"roberta", "xlm-roberta", "git", "trocr", "mamba", "xlstm"} <= ok - shared


def test_every_causal_lm_family_is_steered_and_monitored_as_plain_hooks_do():
    results = _every_family(families_steering.run_family)
    wrong = {f: r["checks"] for f, r in results.items() if r["status"] == "WRONG"}
    assert not wrong, f"steered or scored otherwise than the reference: {wrong}"
    ok = {f for f, r in results.items() if r["status"] == "OK"}
    assert len(ok) >= 150, len(ok)  # 170 on transformers 5.24
    # the tracker hooks the model itself (OPT's and BART's causal LMs call their decoder directly); Mamba's
    # cache cannot say its length; GPT-1 has no cache and re-feeds the sequence
    assert {"llama", "gpt2", "gemma3", "opt", "bart", "whisper", "mamba", "mamba2", "bamba", "mpt"} <= ok
    # where traitlens cannot follow, it says so
    said = {f: " ".join(str(c.get("crash", "")) for c in r["checks"].values()) for f, r in results.items()}
    assert "does not say how many positions it holds" in said["reformer"]  # steering during its generate
    assert "takes none by the names it knows" in said["openai-gpt"]  # generate_with_projections
    assert "ran more than once in one forward pass" in said["dory"]  # token_projections
