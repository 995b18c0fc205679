"""Shared fixtures: tiny random models of three families, and the real bundled model (session-scoped)."""

from __future__ import annotations

import pytest
import torch

# Tiny configs: Llama-style ``model.layers``, GPT-2 ``transformer.h``, Qwen2 ``model.layers`` (GQA, biases).
TINY_FAMILIES = ("llama", "gpt2", "qwen2")
TINY_HIDDEN = 32
TINY_LAYERS = 3
TINY_VOCAB = 128


def make_tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A seeded random-weight causal LM of ``family`` on CPU, in eval mode."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    common = {"vocab_size": TINY_VOCAB, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if family == "llama":
        config = LlamaConfig(
            hidden_size=TINY_HIDDEN, intermediate_size=64, num_hidden_layers=TINY_LAYERS,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, **common,
        )  # fmt: skip
    elif family == "qwen2":
        config = Qwen2Config(
            hidden_size=TINY_HIDDEN, intermediate_size=64, num_hidden_layers=TINY_LAYERS,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **common,
        )  # fmt: skip
    elif family == "gpt2":
        config = GPT2Config(n_embd=TINY_HIDDEN, n_layer=TINY_LAYERS, n_head=4, n_positions=128, **common)
    else:
        raise ValueError(f"unknown tiny family {family!r}")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def make_word_tokenizer():
    """A word-level fast tokenizer for the tiny models: ``"w0"`` .. ``"w123"`` are ids 4..127, split on
    whitespace; ``<pad>``, ``<s>``, ``</s>``, ``<unk>`` are 0..3. No chat template, no added BOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(TINY_VOCAB - 4)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def layer_path(family: str, i: int) -> str:
    """Dotted path of decoder layer ``i`` in a tiny model of ``family``."""
    return f"transformer.h.{i}" if family == "gpt2" else f"model.layers.{i}"


@pytest.fixture(params=TINY_FAMILIES)
def tiny(request):
    """``(family, model)`` for each tiny family."""
    return request.param, make_tiny_model(request.param)


@pytest.fixture(scope="session")
def real_model():
    """The bundled SmolLM2-135M-Instruct: ``(model, tokenizer)``, loaded once per test session."""
    from traitlens.models import load_model

    return load_model()


@pytest.fixture(scope="session")
def sentiment_acts(real_model):
    """Real activations of the shipped sentiment data at layer 15 (``prompt_last``):
    ``{"train": [pos, neg], "test": [pos, neg]}``, each ``[n, 576]``."""
    from traitlens import load_dataset
    from traitlens.pipeline import collect_activations

    model, tokenizer = real_model
    data = load_dataset("sentiment")
    return {
        split: [collect_activations(model, tokenizer, side, layers=[15])[0] for side in data.examples(split)]
        for split in ("train", "test")
    }
