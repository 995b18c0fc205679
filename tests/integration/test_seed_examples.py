"""The seed README's (traitlens v0.4) examples, adapted only in the model name, on the real model."""

import pytest
import torch

from traitlens import (
    ActivationCapture,
    HookManager,
    MeanDifferenceMethod,
    ProbeMethod,
    compute_derivative,
    compute_second_derivative,
    get_method,
    load_model,
)

pytestmark = pytest.mark.integration


def test_basic_activation_capture_with_generate(real_model):
    model, tokenizer = real_model  # the seed: AutoModelForCausalLM.from_pretrained("your-model")
    capture = ActivationCapture()
    with HookManager(model) as hooks:
        hooks.add_forward_hook("model.layers.12", capture.make_hook("layer_12"))
        inputs = tokenizer("Hello world", return_tensors="pt")
        outputs = model.generate(**inputs, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    activations = capture.get("layer_12")  # [batch, seq_len, hidden_dim]
    prompt_len = inputs["input_ids"].shape[1]
    assert outputs.shape == (1, prompt_len + 10)
    assert activations.shape == (1, prompt_len + 10 - 1, 576)
    # The positions match one forward pass over the generated sequence (minus the last, never-fed token).
    with torch.no_grad():
        hidden = model(outputs[:, :-1], output_hidden_states=True).hidden_states[13]
    torch.testing.assert_close(activations, hidden, rtol=1e-3, atol=1e-3)


def test_extract_trait_vectors_example():
    pos_acts = torch.randn(100, 2304)  # [n_examples, hidden_dim]
    neg_acts = torch.randn(100, 2304)
    method = MeanDifferenceMethod()
    result = method.extract(pos_acts, neg_acts)
    assert result["vector"].shape == (2304,)
    method = ProbeMethod()
    result = method.extract(pos_acts, neg_acts)
    assert result["vector"].shape == (2304,) and 0 <= result["train_acc"] <= 1
    result = method.extract(pos_acts, neg_acts, penalty="l1")
    sparse_vector = result["vector"]
    assert (sparse_vector.abs() < 1e-6).float().mean() > 0.5  # many exact zeros
    for name in ("ica", "probe", "gradient", "mean_diff", "pca_diff", "random_baseline"):
        assert get_method(name).extract(pos_acts, neg_acts)["vector"].shape == (2304,)


def test_temporal_dynamics_example(real_model):
    model, tokenizer = real_model
    capture = ActivationCapture()
    with HookManager(model) as hooks:
        hooks.add_forward_hook("model.layers.12", capture.make_hook("layer_12"))
        with torch.no_grad():
            model(**tokenizer("I was unsure at first, but now I am certain it works.", return_tensors="pt"))
    per_token_activations = list(capture.get("layer_12")[0])
    trajectory = torch.stack(per_token_activations)  # [seq_len, hidden_dim]
    velocity = compute_derivative(trajectory)
    acceleration = compute_second_derivative(trajectory)
    assert velocity.shape == (len(trajectory) - 1, 576)
    assert acceleration.shape == (len(trajectory) - 2, 576)
    threshold = acceleration.norm(dim=-1).median()
    commitment = (acceleration.norm(dim=-1) < threshold).nonzero()[0]
    assert commitment.numel() == 1
    # the numbers themselves: finite differences of the trajectory, as torch computes them
    torch.testing.assert_close(velocity, trajectory.diff(dim=0))
    torch.testing.assert_close(acceleration, trajectory.diff(n=2, dim=0))


def test_hook_multiple_locations_example(real_model):
    model, tokenizer = real_model
    inputs = tokenizer("Hello world", return_tensors="pt")
    locations = {
        "residual": "model.layers.12",
        "attention": "model.layers.12.self_attn.o_proj",
        "mlp": "model.layers.12.mlp.down_proj",
    }
    capture = ActivationCapture()
    with HookManager(model) as hooks:
        for name, path in locations.items():
            hooks.add_forward_hook(path, capture.make_hook(name))
        with torch.no_grad():
            model(**inputs)
    seq = inputs["input_ids"].shape[1]
    for name in locations:
        assert capture.get(name).shape == (1, seq, 576)


def test_bundled_model_is_the_real_trained_model(real_model):
    model, tokenizer = real_model
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        top = model(**ids).logits[0, -1].argmax()
    assert tokenizer.decode(top).strip() == "Paris"
    assert load_model.__module__ == "traitlens.models"
