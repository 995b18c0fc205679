"""Does traitlens read every causal-LM family right? A re-runnable check on tiny random-weight models.

For each model type in transformers' ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` a tiny model is built from its
default config, shrunk (hidden 64, 3 layers, 4 heads, vocab 128; sub-configs too), seeded, float32, eval,
with ``attn_implementation`` "eager" and "sdpa". traitlens then reads it through its public entry points:

- ``pair_activations`` at "prompt_last" and "prompt_mean" on plain pairs (one pass per side, right-padded);
- ``pair_activations`` at "response_mean" on pairs whose sides share one prompt (the shared-prompt pass
  where ``_takes_cache(model)`` allows it: prompt into a key/value cache, left-padded, answers on it);
- ``collect_activations`` at "response_mean" on the same answers (one pass per side: separates errors of
  the shared pass from errors of padding) and at "all" on plain texts and prompt-style examples.

The reference is independent of traitlens's batching: each text alone, batch 1, no padding,
``model(input_ids=ids)`` without ``attention_mask`` or ``position_ids`` (the model's own defaults), the
output of each decoder layer read by a plain ``register_forward_hook`` on the paths of
``traitlens.hooks.decoder_layer_paths`` (a tuple or list output unwrapped with ``[0]``), and the positions taken by
hand. Only the token ids come from traitlens (``encode_examples`` of one example, unpadded). A layer that
runs several times in one pass (recurrent-depth models) is read at its last call, and flagged.

Metric: max over layers and rows of ``|got - ref| / |ref|`` (row norms, float64). Above ``TOLERANCE`` the
family is WRONG. Statuses: OK, WRONG, CRASH (traitlens raised where the reference ran), SKIP (the model
cannot be built from a config, or cannot run on text alone: traitlens is not to blame), REF? (the layer
outputs are not ``[1, seq, hidden]``, so no reference can be read; traitlens's outcome is still shown).
Informational columns: ``paths`` (number of decoder-layer paths, and ``!`` when that is not the config's
layer count or a layer runs more than once per pass) and ``hs`` (the largest difference between the hooked
layer outputs and ``output_hidden_states[i + 1]`` over all but the last layer; large values point at a
wrong ``decoder_layer_paths`` or at a model whose hidden states are not its layers' outputs).

Configs: every int field named in ``SIZES`` is shrunk, per-layer lists are cut to 3 layers keeping each kind
of layer, special token ids are moved inside the vocabulary, ``is_decoder=True`` where the config has it,
attention windows are 4 tokens (shorter than the texts, so they bind); ``FIXES`` holds what one family needs
beyond that (sizes that must agree, broken defaults), ``SKIPS`` what cannot run on text alone.

The check can fail: on commit e56dc02 (before RoBERTa-family decoders got their own position numbering)
roberta, xlm-roberta, camembert, data2vec-text, xmod, roberta-prelayernorm and xlm-roberta-xl come out
WRONG at 0.3-1.0 relative on every path, and moshi's shared-prompt pass at 1.1; once GIT's text layers were
found (and before its decoder was required to say it is causal), GIT's shared-prompt pass at 0.025.

``tests/test_families.py`` runs it on every family (eager attention) and fails on any WRONG. For the table
(about 1.5 minutes on 2 cores for all families, eager and sdpa), from the repository root:

    .venv/bin/python tests/families.py [--families llama,gpt2] [--attn eager] [--out runs/families.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for conftest, when run as a script
import traitlens.pipeline as pipeline
from conftest import make_word_tokenizer
from traitlens.dataset import Example, Pair, encode_examples
from traitlens.hooks import _text_config, decoder_layer_paths

# traitlens private names used here (the harness keeps running, with less detail, if they are renamed):
# pipeline._takes_cache (the "shared" column) and pipeline._shared_prompt_pass (counted when taken).
TOLERANCE = 1e-4
SEED = 0
BATCH = 3
TIMEOUT_S = 60  # per family and attention implementation

# ------------------------------------------------------------------------------------------ shrinking

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB, POSITIONS = 64, 3, 4, 2, 16, 64, 128, 128


def _each(names: str, value) -> dict:
    return dict.fromkeys(names.split(), value)


SIZES = {  # config field -> tiny value, applied where the default config holds an int there
    **_each(
        "hidden_size d_model n_embd embed_dim embedding_size embedding_dim emb_dim dim adapter_in_dim "
        "adapter_out_dim adapter_input_size",
        HIDDEN,
    ),
    **_each(
        "num_hidden_layers n_layer n_layers num_layers decoder_layers encoder_layers num_decoder_layers "
        "num_blocks",
        LAYERS,
    ),
    **_each(
        "num_attention_heads n_head n_heads num_heads decoder_attention_heads encoder_attention_heads "
        "swa_num_attention_heads",
        HEADS,
    ),
    **_each(
        "num_key_value_heads num_kv_heads n_kv_heads multi_query_group_num swa_num_key_value_heads", KV_HEADS
    ),
    **_each("head_dim kv_channels attention_head_dim attention_head_size swa_head_dim", HEAD_DIM),
    **_each(
        "intermediate_size ffn_dim decoder_ffn_dim encoder_ffn_dim n_inner d_ff ffn_hidden_size "
        "dim_feedforward",
        FFN,
    ),
    **_each(
        "moe_intermediate_size shared_expert_intermediate_size expert_intermediate_size "
        "moe_shared_expert_intermediate_size shared_intermediate_size expert_ffn_hidden_size "
        "shared_experts_intermediate_size",
        32,
    ),
    **_each("num_experts n_routed_experts num_local_experts moe_num_experts", 4),
    **_each("num_experts_per_tok moe_topk moe_k num_selected_experts", 2),
    **_each("n_group topk_group n_shared_experts num_shared_experts", 1),
    "first_k_dense_replace": 1,  # layer 0 dense, the others mixtures of experts
    **_each("q_lora_rank kv_lora_rank", 16),  # multi-head latent attention
    **_each("qk_rope_head_dim qk_nope_head_dim v_head_dim", 8),
    **_each("state_size ssm_state_size mamba_d_state d_state", 8),  # state-space layers
    **_each("n_groups mamba_n_groups", 1),
    **_each("time_step_rank mamba_dt_rank", 8),
    **_each("mamba_n_heads linear_num_heads linear_num_value_heads", 8),  # 8 heads x 16 = 2 x hidden
    **_each("mamba_d_head linear_head_dim linear_key_head_dim linear_value_head_dim", 16),
    "linear_num_key_heads": 4,
    "mamba_d_ssm": 128,
    **_each("hidden_size_per_layer_input laurel_rank", 16),  # Gemma 3n / 4
    "vocab_size_per_layer_input": VOCAB,
    "rotary_dim": 8,  # GPT-J, CodeGen: at most the head dim
    "vocab_size": VOCAB,
    **_each("max_position_embeddings n_positions n_ctx max_seq_len max_sequence_length", POSITIONS),
    # attention windows shorter than the texts, so that they bind
    **_each("sliding_window sliding_window_size attention_chunk_size window_size", 4),
}
SET_IF_NONE = ("head_dim", "num_key_value_heads")  # defaults that some models cannot take as None
TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
FREE_IDS = range(VOCAB - 1, 103, -1)  # ids 104..127 ("w100".."w123") never occur in the texts
FLAGS = {"is_decoder": True}  # BERT-family layers attend causally only as decoders, as *ForCausalLM expect
LAYER_COUNT_FIELDS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers")

# Per model type: fields set after the generic shrinking (mostly sizes that must agree with each other).
FIXES: dict[str, dict] = {
    "bamba": {"attn_layer_indices": [1]},
    "big_bird": {"attention_type": "original_full"},
    "blt": {"use_cache": False, "encoder_hash_byte_group_vocab": 64, "patching_mode": None,
            "encoder_config": {"hidden_size_global": HIDDEN}, "decoder_config": {"hidden_size_global": HIDDEN}},
    # (its cache is built from the top config, which has no num_hidden_layers; byte-level, no patcher run)
    "cohere_compass_text": {
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
    "dbrx": {"attn_config": {"rope_theta": 1e4, "clip_qkv": 8.0}},  # the default config cannot run: no
    # rope_theta in DbrxAttentionConfig (DbrxAttention reads it), clip_qkv=None refused by torch.clamp
    "deepseek_v2": {"num_experts_per_tok": 2},
    "dory": {"num_hidden_layers": 6, "n_input_layers": 2, "n_recurrent_layers": 2, "n_output_layers": 2,
             "layer_types": ["sliding_attention", "mlp", "full_attention", "mlp", "sliding_attention", "mlp"]},
    "dots3_note": {"text_config": {"head_dim": 16}},  # SWA head_dim = qk_nope_head_dim + qk_rope_head_dim
    "dots3_note_text": {"head_dim": 16},
    "dots1": {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1},
    "falcon_h1": {"mamba_d_ssm": 128},
    "gemma3n_text": {
        "num_hidden_layers": 4, "num_kv_shared_layers": 2, "intermediate_size": [FFN] * 4,
        "layer_types": ["sliding_attention", "full_attention"] * 2, "activation_sparsity_pattern": [0.95, 0.0, 0.0, 0.0]},
    "gpt_neo": {"attention_types": [[["global", "local", "global"], 1]]},
    "granitemoehybrid": {"layer_types": ["linear_attention", "attention", "linear_attention"]},
    "hrm_text": {"num_layers_per_stack": 2, "H_cycles": 2, "L_cycles": 1, "L_bp_cycles": [1], "num_hidden_layers": 8},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1,
              "use_mamba_kernels": False},
    "lfm2_moe": {"layer_types": ["conv", "full_attention", "conv"], "num_dense_layers": 1},
    "longcat_flash": {"zero_expert_num": 2},
    "mamba2": {"num_heads": 8, "head_dim": 16},
    "musicgen": {"decoder": {"num_codebooks": 1}},  # input_ids [batch, seq], not [batch * codebooks, seq]
    "musicgen_melody": {"decoder": {"num_codebooks": 1}},
    "reformer": {"axial_pos_embds_dim": [32, 32], "axial_pos_shape": [8, 16], "feed_forward_size": FFN,
                 "local_attn_chunk_length": 1, "lsh_attn_chunk_length": 1, "num_buckets": 2,
                 "attn_layers": ["local"] * LAYERS},  # LSH attention hashes with random rotations each pass
    # (chunks of one token: Reformer pads a pass to a multiple of the chunk length, so layers see pads)
    "roc_bert": {"pronunciation_embed_dim": 32, "shape_embed_dim": 32, "pronunciation_vocab_size": 64,
                 "shape_vocab_size": 64},
    "xlstm": {"qk_dim_factor": 1.0},  # 0.5 crashes the sequence kernel (matC_old shape) at any size
    "xlm": {"causal": True},  # a causal LM (the CLM checkpoints): otherwise it attends both ways
    "zamba": {"layers_block_type": ["hybrid", "linear_attention", "hybrid"], "attention_hidden_size": 2 * HIDDEN,
              "attention_head_dim": 2 * HIDDEN // HEADS, "use_mamba_kernels": False},
    "zaya": {"num_experts_per_tok": 1},
}  # fmt: skip
_QWEN4 = {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 8,
          "indexer_compress_ratio": 2, "ngram_vocab_size_base": 256, "split_ngram_parts": 4, "hc_lowrank": 8,
          "ple_embed_dim": HIDDEN, "heads_per_ngram": 2, "make_ngram_vocab_size_divisible_by": 8}  # fmt: skip
FIXES["qwen4_exp_text"] = _QWEN4
FIXES["qwen4_exp"] = {"text_config": _QWEN4}
AFTER_BUILD = {"xmod": lambda model: model.set_default_language("en_XX")}
SKIPS: dict[str, str] = {  # model type -> why it is not built
    "gemma4_assistant": "draft model: every layer reuses the main model's keys and values (shared_kv_states)",
    "gemma4_unified_assistant": "draft model: every layer reuses the main model's keys and values (shared_kv_states)",
}


def small_config(model_type: str):
    """The default config of ``model_type``, shrunk: tiny sizes, 3 layers, special token ids below 128."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    fixes = FIXES.get(model_type, {})
    return _shrunk(cls, cls(), fixes, iter(FREE_IDS))


def _shrunk(cls, default, fixes: dict, free_ids):
    """A new ``cls`` config with the fields of ``default`` shrunk (recursively into sub-configs)."""
    from transformers import PretrainedConfig as PreTrainedConfig  # both spellings in 5.x, this one in 4.x

    names = (
        [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else list(vars(default))
    )
    heterogeneous = _heterogeneous(default)
    if heterogeneous:  # layers with their own sizes (Gemma 4, dots3): made homogeneous
        default.allow_global_per_layer_attribute_access = True
    values = {name: getattr(default, name, None) for name in names}
    depth = next((values[k] for k in LAYER_COUNT_FIELDS if _is_int(values.get(k))), None)
    kwargs = {}
    for name, value in values.items():
        if isinstance(value, PreTrainedConfig):
            kwargs[name] = _shrunk(type(value), value, fixes.get(name, {}), free_ids)
        elif name in FLAGS:
            kwargs[name] = FLAGS[name]
        elif name in TOKENS and (value is None or _is_int(value) or isinstance(value, list)):
            kwargs[name] = TOKENS[name]
        elif name in SIZES and (_is_int(value) or (value is None and name in SET_IF_NONE)):
            kwargs[name] = SIZES[name]
        elif name.endswith(("token_id", "token_index")) and _is_int(value) and value >= VOCAB:
            kwargs[name] = next(free_ids)  # special tokens (image, ...) inside the vocabulary
        elif depth and depth > 1 and _per_layer_value(name, value, depth):
            kwargs[name] = _per_layer(value)
    if _is_int(kwargs.get("qk_rope_head_dim")):  # MLA: keys per head; head_dim is the rotary part
        kwargs.update({k: v for k, v in (("head_dim", 8), ("num_key_value_heads", HEADS)) if k in kwargs})
    if heterogeneous:
        kwargs["per_layer_config"] = None
    kwargs.update({k: v for k, v in fixes.items() if not isinstance(v, dict) or k not in kwargs})
    return cls(**kwargs)


def _heterogeneous(config) -> bool:
    """Whether ``config`` has per-layer overrides (transformers' ``per_layer_config``)."""
    try:
        return bool(getattr(config, "per_layer_config", None))
    except AttributeError:  # a composite config: its text config has them, if any
        return False


def _per_layer_value(name: str, value, depth: int) -> bool:
    """Whether ``value`` holds one entry per layer: a list of ``depth`` entries, or a pattern string."""
    if isinstance(value, str):
        return "pattern" in name and len(value) == depth
    return isinstance(value, (list, tuple)) and len(value) == depth


def _per_layer(value):
    """A per-layer list (or pattern string) cut to ``LAYERS`` entries, in their order, that keep each kind
    of layer: the first entry of each distinct kind, then the earliest others."""
    items = list(value)
    firsts = [items.index(kind) for kind in dict.fromkeys(items)][:LAYERS]
    keep = sorted((firsts + [i for i in range(len(items)) if i not in firsts])[:LAYERS])
    picked = [items[i] for i in keep]
    return "".join(picked) if isinstance(value, str) else type(value)(picked)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def build(model_type: str, attn: str) -> torch.nn.Module:
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = small_config(model_type)
    wanted = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]).config_class
    torch.manual_seed(SEED)
    if isinstance(config, wanted):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    else:  # Musicgen: the causal LM is the composite's decoder
        config = next((sub for sub in vars(config).values() if isinstance(sub, wanted)), config)
        model = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])._from_config(
            config, attn_implementation=attn
        )
    model = model.float().eval()
    AFTER_BUILD.get(model_type, lambda _: None)(model)
    return model


# ------------------------------------------------------------------------------------------------ data


def words(n: int, start: int) -> str:
    """``n`` distinct words from "w0".."w99" (ids 4..103), from ``start`` on."""
    return " ".join(f"w{(start + 7 * i) % 100}" for i in range(n))


# plain pairs: texts of different lengths (5 pairs: two batches of 3, right-padded)
PLAIN = [
    Pair(words(a, 3 * k), words(b, 50 + 3 * k), "train")
    for k, (a, b) in enumerate([(5, 3), (8, 6), (2, 9), (7, 7), (4, 11)])
]
# prompt-style pairs: one prompt for both sides, answers of different lengths (the shared-prompt pass)
SHARED = [
    Pair(words(a, 20 + k), words(b, 60 + k), "train", prompt=words(q, 5 * k))
    for k, (q, a, b) in enumerate([(6, 3, 6), (2, 5, 1), (9, 2, 4), (4, 7, 3), (7, 1, 8)])
]
# texts of one side for position "all": plain texts and prompt-style examples, one with a system prompt
MIXED = [
    words(6, 11),
    Example(prompt=words(5, 30), response=words(4, 70)),
    words(2, 41),
    Example(prompt=words(3, 2), response=words(6, 80), system=words(2, 90)),
    Example(prompt=words(8, 17), response=words(1, 9)),
]


def token_ids(tokenizer, example) -> tuple[list[int], int]:
    """The ids of one example as traitlens builds them (unpadded), and the number of prompt tokens."""
    enc = encode_examples(tokenizer, [example])
    return enc.input_ids[0].tolist(), int(enc.prompt_mask[0].sum())


# ------------------------------------------------------------------------------------------- reference


class Reference:
    """Each text alone through the model, every decoder layer's output read by a plain forward hook."""

    def __init__(self, model, tokenizer, paths):
        self.model, self.tokenizer, self.paths = model, tokenizer, paths
        self.calls: set[int] = set()  # how many times a layer ran in one pass (1 expected)
        self._cache: dict[tuple, torch.Tensor] = {}

    def outputs(self, ids: list[int]) -> torch.Tensor:
        """``[layer, seq, hidden]`` float64: the output of every decoder layer for ``ids`` alone."""
        key = tuple(ids)
        if key not in self._cache:
            seen: dict[str, list] = {p: [] for p in self.paths}
            handles = [
                self.model.get_submodule(p).register_forward_hook(
                    lambda _m, _a, out, p=p: seen[p].append(out[0] if isinstance(out, (tuple, list)) else out)
                )
                for p in self.paths
            ]
            try:
                with torch.no_grad():
                    self.model(input_ids=torch.tensor([ids]))
            finally:
                for h in handles:
                    h.remove()
            self.calls.update(len(v) for v in seen.values())
            outs = [v[-1] if v else None for v in seen.values()]
            bad = next((o for o in outs if not _is_rows(o, len(ids))), "none")
            if bad != "none":
                shape = "no call" if bad is None else tuple(bad.shape) if torch.is_tensor(bad) else type(bad)
                raise RefShapeError(f"layer output {shape}, not [1, {len(ids)}, hidden]")
            self._cache[key] = torch.stack([o[0].double() for o in outs])
        return self._cache[key]

    def rows(self, example, position: str) -> torch.Tensor:
        """``[layer, k, hidden]`` at ``position`` for one example (k = 1, or every token for "all")."""
        ids, n_prompt = token_ids(self.tokenizer, example)
        out = self.outputs(ids)
        if position == "prompt_last":
            return out[:, n_prompt - 1 : n_prompt]
        if position == "prompt_mean":  # the first token left out, unless it is the whole prompt
            return out[:, min(1, n_prompt - 1) : n_prompt].mean(1, keepdim=True)
        if position == "response_mean":
            return out[:, n_prompt:].mean(1, keepdim=True)
        return out  # "all"

    def batch(self, examples, position: str) -> torch.Tensor:
        return torch.cat([self.rows(e, position) for e in examples], dim=1)


class RefShapeError(Exception):
    """The decoder layers' outputs are not ``[1, seq, hidden]``: no reference can be read from them."""


def _is_rows(out, seq: int) -> bool:
    return torch.is_tensor(out) and out.ndim == 3 and out.shape[:2] == (1, seq)


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max over layers and rows of ``|got - ref| / |ref|`` (row norms; inf for a shape mismatch or NaN)."""
    if tuple(got.shape) != tuple(ref.shape):
        raise ValueError(f"traitlens gave shape {tuple(got.shape)}, the reference {tuple(ref.shape)}")
    err = (got.double() - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)
    return float("inf") if not torch.isfinite(err).all() else float(err.max())


# ------------------------------------------------------------------------------------------------ checks


def check_paths(model, tokenizer, paths) -> dict:
    """What the decoder-layer paths are: their number, the config's layer count, and the largest
    relative difference between hooked outputs and ``output_hidden_states[i + 1]`` (all but the last)."""
    config = _text_config(model)
    expected = next(
        (getattr(config, k) for k in LAYER_COUNT_FIELDS if _is_int(getattr(config, k, None))), None
    )
    info = {"n_paths": len(paths), "config_layers": expected, "first_path": paths[0] if paths else None}
    ids, _ = token_ids(tokenizer, MIXED[0])
    try:
        with torch.no_grad():
            states = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        ref = Reference(model, tokenizer, paths).outputs(ids)
        k = min(len(paths), len(states) - 1) - 1
        info["hs"] = max(
            (relative_error(states[i + 1][0:1].double(), ref[i : i + 1]) for i in range(k)), default=None
        )
    except Exception as err:  # informational only
        info["hs"] = None
        info["hs_error"] = _short(err)
    return info


def run_family(model_type: str, attn: str, tokenizer) -> dict:
    """Build the tiny model and compare every traitlens path with the reference."""
    result = {"family": model_type, "attn": attn, "paths": {}, "errors": {}}
    if model_type in SKIPS:
        return {**result, "status": "SKIP", "reason": SKIPS[model_type]}
    start = time.perf_counter()
    try:
        model = build(model_type, attn)
    except Exception as err:
        reason = (
            "no such attention implementation" if "does not support an attention" in str(err) else "build"
        )
        return {**result, "status": "SKIP", "reason": f"{reason}: {_short(err)}"}
    result["class"] = type(model).__name__
    text = _text_config(model)
    result["config"] = {
        k: getattr(text, k) for k in ("hidden_size", "sliding_window", "layer_types", "is_decoder")
        if getattr(text, k, None) is not None
    }  # fmt: skip
    result["params"] = sum(p.numel() for p in model.parameters())
    try:
        paths = decoder_layer_paths(model)
    except Exception as err:
        return {**result, "status": "CRASH", "reason": f"decoder_layer_paths: {_short(err)}"}
    ref = Reference(model, tokenizer, paths)
    try:  # can the model run on text alone at all?
        ref.outputs(token_ids(tokenizer, MIXED[0])[0])
    except RefShapeError as err:
        result["ref_problem"] = str(err)
    except Exception as err:
        return {**result, "status": "SKIP", "reason": f"forward on text alone: {_short(err)}"}
    result.update(check_paths(model, tokenizer, paths))
    result["takes_cache"] = _safe(lambda: pipeline._takes_cache(model))
    layers = list(range(len(paths)))
    plain = ([p.pos_example for p in PLAIN], [p.neg_example for p in PLAIN])
    shared = ([p.pos_example for p in SHARED], [p.neg_example for p in SHARED])
    cases = {  # path name -> (traitlens call, reference examples per output, position)
        "prompt_last": (
            lambda: pipeline.pair_activations(model, tokenizer, PLAIN, layers=layers, position="prompt_last",
                                              batch_size=BATCH), plain, "prompt_last"),
        "prompt_mean": (
            lambda: pipeline.pair_activations(model, tokenizer, PLAIN, layers=layers, position="prompt_mean",
                                              batch_size=BATCH), plain, "prompt_mean"),
        "response_mean": (
            lambda: pipeline.pair_activations(model, tokenizer, SHARED, layers=layers,
                                              position="response_mean", batch_size=BATCH),
            shared, "response_mean"),
        "resp_1pass": (
            lambda: (pipeline.collect_activations(model, tokenizer, shared[0], layers=layers,
                                                  position="response_mean", batch_size=BATCH),),
            shared[:1], "response_mean"),
        "all": (
            lambda: (pipeline.collect_activations(model, tokenizer, MIXED, layers=layers, position="all",
                                                  batch_size=BATCH),),
            (MIXED,), "all"),
    }  # fmt: skip
    calls = []
    original = getattr(pipeline, "_shared_prompt_pass", None)
    if original is not None:
        pipeline._shared_prompt_pass = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        for name, (call, sides, position) in cases.items():
            before = len(calls)
            try:
                got = call()
            except Exception as err:
                result["errors"][name] = _short(err)
                continue
            if name == "response_mean" and original is not None:
                result["shared_calls"] = len(calls) - before
            if "ref_problem" in result:  # no reference: traitlens gave rows that nobody checks
                result.setdefault("unchecked", []).append(name)
                continue
            try:
                result["paths"][name] = max(
                    relative_error(g, ref.batch(s, position)) for g, s in zip(got, sides, strict=True)
                )
            except Exception as err:
                result["errors"][name] = f"reference: {_short(err)}"
    finally:
        if original is not None:
            pipeline._shared_prompt_pass = original
    result["ref_calls_per_pass"] = sorted(ref.calls)
    result["seconds"] = round(time.perf_counter() - start, 2)
    result["status"] = _status(result)
    return result


def _status(result: dict) -> str:
    if "ref_problem" in result:
        return "REF?"
    if any(not v <= TOLERANCE for v in result["paths"].values()):
        return "WRONG"  # before CRASH: wrong numbers on one path are worse than an error on another
    if result["errors"]:
        return "CRASH"
    return "OK"


def _safe(fn):
    try:
        return fn()
    except Exception as err:
        return f"error: {_short(err)}"


def _short(err: BaseException) -> str:
    """``Type: first line of the message`` (where it was raised, for a bare ``assert``)."""
    lines = str(err).strip().splitlines()
    if lines:
        return f"{type(err).__name__}: {lines[0][:200]}"
    frame = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
    where = f" at {Path(frame.filename).name}:{frame.lineno} ({frame.line})" if frame else ""
    return f"{type(err).__name__}{where}"


class FamilyTimeout(Exception):
    pass


def _alarm(_signum, _frame):
    raise FamilyTimeout(f"took more than {TIMEOUT_S} s")


def timed(run, blank: dict) -> dict:
    """``run()`` within ``TIMEOUT_S`` seconds. A timeout comes back as ``blank`` with status SKIP, an error
    of the harness itself as CRASH, so that one family cannot stop a table (the test checks that none did)."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(TIMEOUT_S)
    try:
        return run()
    except FamilyTimeout as err:
        return {**blank, "status": "SKIP", "reason": f"timeout: {err}"}
    except Exception as err:  # a bug of this script, or something unexpected: keep going
        return {**blank, "status": "CRASH", "reason": f"harness: {_short(err)}",
                "traceback": traceback.format_exc(limit=-3)}  # fmt: skip
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def script_families(parser: argparse.ArgumentParser, spec: str | None) -> list[str]:
    """For the scripts: transformers' logging and warnings quieted, 2 threads, and the model types of
    ``spec`` (comma-separated; default: every causal-LM type), refused through ``parser`` when one is none."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    names = spec.split(",") if spec else list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    unknown = [f for f in names if f not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES]
    if unknown:
        parser.error(f"not causal-LM model types: {unknown}")
    return names


def write_results(
    results: list[dict], elapsed: float, statuses: tuple[str, ...], unit: str, out: str
) -> None:
    """Print the count of each status and the families of each but OK and SKIP; write the JSON to ``out``."""
    import transformers

    counts = {s: sum(r["status"] == s for r in results) for s in statuses}
    print(f"\n{len(results)} {unit} in {elapsed:.0f} s: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    for status in statuses:
        bad = sorted({r["family"] for r in results if r["status"] == status})
        if bad and status not in ("OK", "SKIP"):
            print(f"{status}: {', '.join(bad)}")
    about = {"transformers": transformers.__version__, "torch": torch.__version__, "tolerance": TOLERANCE}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    summary = {**about, "seconds": round(elapsed, 1), "counts": counts, "results": results}
    Path(out).write_text(json.dumps(summary, indent=1, default=str))
    print(f"written {out}")


# ------------------------------------------------------------------------------------------------- report

COLUMNS = ("prompt_last", "prompt_mean", "response_mean", "resp_1pass", "all")


def row(r: dict) -> str:
    shared = {True: "y", False: "n"}.get(r.get("takes_cache"), "?")
    if r.get("shared_calls"):
        shared += f"({r['shared_calls']})"
    n_paths = r.get("n_paths")
    paths = "" if n_paths is None else str(n_paths)
    if n_paths is not None and (n_paths != r.get("config_layers") or r.get("ref_calls_per_pass", [1]) != [1]):
        paths += "!"
    cells = []
    for c in COLUMNS:
        if c in r["paths"]:
            cells.append(f"{r['paths'][c]:.1e}")
        elif c in r["errors"]:
            cells.append("error")
        else:
            cells.append("-")
    hs = r.get("hs")
    hs = "-" if hs is None else f"{hs:.0e}"
    note = r.get("reason") or r.get("ref_problem") or next(iter(r["errors"].values()), "")
    if r.get("unchecked"):
        note = f"traitlens read {'/'.join(r['unchecked'])} without error; " + note
    if r.get("ref_calls_per_pass", [1]) != [1]:
        note = f"layers run {r['ref_calls_per_pass']} times a pass; " + note
    return (
        f"{r['family']:<26} {r['attn']:<5} {shared:<6} {paths:<4} {hs:>6} "
        + " ".join(f"{c:>9}" for c in cells)
        + f"  {r['status']:<5} {note[:90]}"
    )


def header() -> str:
    names = ("p_last", "p_mean", "r_mean", "r_1pass", "all")
    return (
        f"{'family':<26} {'attn':<5} {'shared':<6} {'path':<4} {'hs':>6} "
        + " ".join(f"{n:>9}" for n in names)
        + "  status note"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", help="comma-separated model types (default: all causal-LM types)")
    parser.add_argument("--attn", default="eager,sdpa", help="attention implementations (default eager,sdpa)")
    parser.add_argument("--out", default="runs/families.json", help="JSON file (default runs/families.json)")
    args = parser.parse_args()
    families = script_families(parser, args.families)
    tokenizer = make_word_tokenizer()
    results = []
    start = time.perf_counter()
    print(header(), flush=True)
    for family in families:
        for attn in args.attn.split(","):
            blank = {"family": family, "attn": attn, "paths": {}, "errors": {}}
            r = timed(lambda family=family, attn=attn: run_family(family, attn, tokenizer), blank)
            results.append(r)
            print(row(r), flush=True)
            if attn == "eager" and r["status"] == "SKIP" and r.get("reason", "").startswith("build"):
                break  # if eager cannot be built, neither can sdpa
    write_results(
        results, time.perf_counter() - start, ("OK", "WRONG", "CRASH", "REF?", "SKIP"), "runs", args.out
    )


if __name__ == "__main__":
    main()
