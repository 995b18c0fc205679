"""The bundled model: the safetensors cache reproduces the GGUF file exactly, loading is offline, and
from_pretrained arguments (attention, dtype, device_map) reach it with its weights in ordinary memory."""

import json
from pathlib import Path

import pytest
import torch

from traitlens import models

pytestmark = pytest.mark.integration


def test_cold_cache_then_warm_cache_give_the_gguf_model(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("TRAITLENS_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cold, tokenizer = models.load_model()  # converts the GGUF file and writes the cache
    folder = models.bundled_cache_folder()
    assert folder.parent == tmp_path and folder.name.startswith("smollm2-135m-instruct-v1-transformers")
    assert (folder / "model.safetensors").is_file()
    stamp = (folder / "source.json").read_text()
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


def _file_mapped(model, path) -> list[str]:
    """Names of the tensors of ``model`` whose memory lies in a mapping of the file ``path``
    (``/proc/self/maps``: one line per mapping, ``start-end perms offset dev inode path``)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(Path(path).resolve()):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return [n for n, t in tensors if t.device.type == "cpu" and any(a <= t.data_ptr() < b for a, b in ranges)]


def test_from_pretrained_arguments_reach_the_bundled_model():
    model, _ = models.load_model(attn_implementation="eager", device_map={"": "meta"}, use_cache=False)
    assert model.config._attn_implementation == "eager"
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert model.config.use_cache is False
    assert model.config._name_or_path == models.BUNDLED_ID
    # a quantization config of the caller's own is passed on, not dropped with the file's GGUF one
    seen = {}
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.update(kwargs)
        return original(cls, *args, **{k: v for k, v in kwargs.items() if k != "quantization_config"})

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
        models.load_model(quantization_config={"quant_method": "mine"}, torch_dtype=torch.bfloat16)
    assert seen["quantization_config"] == {"quant_method": "mine"} and seen["dtype"] == torch.bfloat16
    cached = json.loads((models.bundled_cache_folder() / "config.json").read_text())
    assert "quantization_config" not in cached  # the GGUF one is gone: dropped when the cache is written


def test_bundled_weights_are_in_memory_also_with_a_device_map(real_model):
    from transformers import AutoModelForCausalLM

    weights = models.bundled_cache_folder() / "model.safetensors"
    mapped = AutoModelForCausalLM.from_pretrained(weights.parent, dtype=torch.float32)
    assert _file_mapped(mapped, weights)  # transformers maps the file: the check below can fail
    model, tokenizer = models.load_model(device_map={"": "cpu"})
    assert _file_mapped(real_model[0], weights) == []
    assert _file_mapped(model, weights) == []
    ids = tokenizer("The weather today is lovely", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, real_model[0](**ids).logits)


def test_dtype_and_disk_offload_of_the_bundled_model(real_model, tmp_path):
    reference = real_model[0]
    bf16, _ = models.load_model(dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16
    assert models.load_model(dtype="auto")[0].dtype == torch.float32  # as for a hub id (was refused)
    for (name, a), b in zip(reference.state_dict().items(), bf16.state_dict().values(), strict=True):
        assert torch.equal(a.to(torch.bfloat16), b), name
    # Not GGUF-quantized (the cache is plain float32), so accelerate may offload layers to disk.
    device_map = {name: "cpu" for name in ("model.embed_tokens", "model.rotary_emb", "model.norm", "lm_head")}
    device_map |= {f"model.layers.{i}": "disk" if i >= 20 else "cpu" for i in range(30)}
    offloaded, tokenizer = models.load_model(device_map=device_map, offload_folder=str(tmp_path))
    assert offloaded.model.layers[25].mlp.down_proj.weight.device.type == "meta"
    assert offloaded.model.layers[3].mlp.down_proj.weight.device.type == "cpu"
    ids = tokenizer("The weather today is lovely", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(offloaded(**ids).logits, reference(**ids).logits, rtol=1e-5, atol=1e-5)
