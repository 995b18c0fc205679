"""A model dispatched with accelerate (some layers on CPU, some offloaded to disk, embeddings and LM head
included) gives the same captured activations, steered logits and token projections as the undispatched
model. On this CPU-only machine disk offload is the split available: offloaded weights sit on ``meta`` and
are loaded for each forward pass by accelerate's hooks."""

from __future__ import annotations

import pytest
import torch
from accelerate import dispatch_model

from traitlens import ActivationCapture, HookManager, TraitVector, load_dataset, load_model
from traitlens.hooks import input_device
from traitlens.monitor import generate_with_projections, token_projections
from traitlens.pipeline import collect_activations
from traitlens.steering import steer

pytestmark = pytest.mark.integration

LAYERS = [3, 12, 25]  # on CPU, on disk, on CPU


@pytest.fixture(scope="module")
def dispatched(tmp_path_factory):
    model, tokenizer = load_model()
    device_map = {
        "model.embed_tokens": "disk",
        "model.rotary_emb": "cpu",
        "model.norm": "cpu",
        "lm_head": "disk",
    }
    device_map |= {f"model.layers.{i}": "disk" if 8 <= i < 20 else "cpu" for i in range(30)}
    model = dispatch_model(model, device_map=device_map, offload_dir=tmp_path_factory.mktemp("offload"))
    return model, tokenizer


def test_the_split_is_real(dispatched):
    model, _ = dispatched
    assert model.model.embed_tokens.weight.device.type == "meta"  # next(model.parameters()) is on meta
    assert model.model.layers[12].mlp.down_proj.weight.device.type == "meta"
    assert model.model.layers[3].mlp.down_proj.weight.device.type == "cpu"
    assert input_device(model) == torch.device("cpu")


def test_captured_activations_are_the_same(real_model, dispatched):
    texts = [p.pos_example for p in load_dataset("sentiment").test[:6]]
    expected = collect_activations(*real_model, texts, layers=LAYERS, position="prompt_mean")
    got = collect_activations(*dispatched, texts, layers=LAYERS, position="prompt_mean")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    enc = real_model[1](texts[:2], return_tensors="pt", padding=True)
    captured = []
    for model in (real_model[0], dispatched[0]):
        capture = ActivationCapture()
        with torch.no_grad(), HookManager(model) as hooks:
            for layer in LAYERS:
                hooks.add_forward_hook(f"model.layers.{layer}", capture.make_hook(str(layer)))
            model(**enc)
        captured.append([capture.get(str(layer)) for layer in LAYERS])
    for a, b in zip(*captured, strict=True):
        assert a.device.type == "cpu"
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_steered_logits_and_projections_are_the_same(real_model, dispatched):
    tokenizer = real_model[1]
    enc = tokenizer(["The weather today is", "I think the movie was"], return_tensors="pt", padding=True)
    torch.manual_seed(0)
    vectors = {layer: torch.randn(576) for layer in LAYERS}  # one per layer: CPU and offloaded layers
    logits = []
    for model in (real_model[0], dispatched[0]):
        with torch.no_grad():
            plain = model(**enc).logits
            with steer(model, vectors, coeff=4.0):
                steered = model(**enc).logits
            with steer(model, vectors[12], layer=12, op="ablate"):
                ablated = model(**enc).logits
        logits.append((plain, steered, ablated))
    for a, b in zip(*logits, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert (logits[0][1] - logits[0][0]).abs().max() > 1.0  # the steering does something

    vector = TraitVector(
        vector=vectors[12], model="smollm2", module="model.layers.12", position="all", method="mean_diff"
    )
    text = load_dataset("sentiment").test[0].pos_example
    a = token_projections(*real_model, vector, text)
    b = token_projections(*dispatched, vector, text)
    assert a.tokens == b.tokens
    torch.testing.assert_close(b.scores, a.scores, rtol=1e-5, atol=1e-4)
    a = generate_with_projections(*real_model, vector, "Tell me about cats.", max_new_tokens=5)
    b = generate_with_projections(*dispatched, vector, "Tell me about cats.", max_new_tokens=5)
    assert a.tokens == b.tokens
    torch.testing.assert_close(b.scores, a.scores, rtol=1e-4, atol=1e-3)
