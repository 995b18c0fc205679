"""The bundled model: the safetensors cache reproduces the GGUF file exactly, and loading is offline."""

import pytest
import torch

from traitlens import models

pytestmark = pytest.mark.integration


def test_cold_cache_then_warm_cache_give_the_gguf_model(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("TRAITLENS_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cold, tokenizer = models.load_model()  # converts the GGUF file and writes the cache
    assert (tmp_path / "smollm2-135m-instruct-v1" / "model.safetensors").is_file()
    stamp = (tmp_path / "smollm2-135m-instruct-v1" / "source.json").read_text()
    assert str(models.bundled_gguf_path().parent) not in stamp  # valid for any environment with this file
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    warm, _ = models.load_model()  # reads the cache
    gguf = models.bundled_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ids = tokenizer("The weather today is lovely", return_tensors="pt")
    with torch.no_grad():
        expected = reference(**ids).logits
        for model in (cold, warm):
            assert torch.equal(model(**ids).logits, expected)
    assert warm.config._name_or_path == models.BUNDLED_ID
