import pytest
import torch
from tests.conftest import TINY_HIDDEN, TINY_LAYERS, layer_path, make_tiny_model

from traitlens import HookManager, list_modules
from traitlens.hooks import StopForward


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_run_and_are_removed_on_exit(tiny):
    family, model = tiny
    calls = []
    with HookManager(model) as hooks:
        handle = hooks.add_forward_hook(layer_path(family, 1), lambda m, a, o: calls.append("fwd"))
        hooks.add_forward_pre_hook(layer_path(family, 0), lambda m, a: calls.append("pre"), name="pre0")
        assert len(hooks) == 2
        assert "pre0 (forward_pre)" in repr(hooks)
        assert _hook_count(model) == 2
        model(torch.tensor([[3, 4, 5]]))
        handle.remove()  # by hand: no longer counted or listed
        assert len(hooks) == 1 and repr(hooks).endswith("1 hook: pre0 (forward_pre))")
        model(torch.tensor([[3, 4, 5]]))
    assert calls == ["pre", "fwd", "pre"]
    assert _hook_count(model) == 0


def test_hooks_removed_after_exception_in_body():
    model = make_tiny_model("llama")
    with pytest.raises(RuntimeError, match="boom"), HookManager(model) as hooks:
        for i in range(TINY_LAYERS):
            hooks.add_forward_hook(f"model.layers.{i}", lambda m, a, o: None)
        assert _hook_count(model) == TINY_LAYERS
        raise RuntimeError("boom")
    assert _hook_count(model) == 0


def test_remove_all_and_reuse():
    model = make_tiny_model("gpt2")
    hooks = HookManager(model)
    hooks.add_forward_hook("transformer.h.0.attn", lambda m, a, o: None)
    hooks.remove_all()
    assert len(hooks) == 0 and _hook_count(model) == 0
    hooks.add_forward_hook("transformer.h.0.mlp", lambda m, a, o: None)
    assert _hook_count(model) == 1
    hooks.remove_all()


def test_forward_pre_hook_can_replace_inputs():
    model = make_tiny_model("llama")
    ids = torch.tensor([[3, 4, 5]])
    with HookManager(model) as hooks:
        hooks.add_forward_pre_hook("model.norm", lambda m, args: (torch.zeros_like(args[0]),))
        logits = model(ids).logits
    # A zero input to the final RMSNorm gives zero hidden states and therefore zero logits.
    assert torch.count_nonzero(logits) == 0


def test_missing_segment_names_it_and_suggests_the_real_path():
    model = make_tiny_model("llama")
    with pytest.raises(ValueError) as err:
        HookManager(model).add_forward_hook("model.layer.1", lambda m, a, o: None)
    message = str(err.value)
    assert "'model.layer.1'" in message and "'layer'" in message
    assert "did you mean 'model.layers.1'?" in message


def test_index_out_of_range_says_how_many_entries():
    model = make_tiny_model("gpt2")
    with pytest.raises(ValueError, match=r"'transformer.h' has 3 entries \(0-2\), got index 7"):
        HookManager(model).add_forward_hook("transformer.h.7", lambda m, a, o: None)


def test_gpt2_path_typo_suggestion():
    model = make_tiny_model("gpt2")
    with pytest.raises(ValueError, match=r"did you mean 'transformer.h.0.mlp'\?"):
        HookManager(model).get_module("transformer.h.0.mpl")


def test_bad_arguments_are_type_errors():
    model = make_tiny_model("llama")
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        HookManager("not a model")
    with pytest.raises(TypeError, match="hook_fn must be callable"):
        HookManager(model).add_forward_hook("model.layers.0", None)
    with pytest.raises(TypeError, match="dotted string"):
        HookManager(model).add_forward_hook(0, lambda m, a, o: None)


def test_list_modules_with_pattern(tiny):
    family, model = tiny
    layers = list_modules(model, r"(layers|h)\.\d+$")
    assert layers == [layer_path(family, i) for i in range(TINY_LAYERS)]
    assert all(name for name in list_modules(model))
    assert HookManager(model).list_modules("mlp") == list_modules(model, "mlp")
    with pytest.raises(ValueError, match=r"pattern '\(' is not a regular expression: missing \)"):
        list_modules(model, "(")


def test_stop_after_ends_the_pass_and_skips_later_modules(tiny):
    from traitlens import ActivationCapture

    family, model = tiny
    capture = ActivationCapture()
    with HookManager(model) as hooks:
        hooks.add_forward_hook(layer_path(family, 0), capture.make_hook("l0"))
        hooks.add_forward_hook(layer_path(family, 2), capture.make_hook("l2"))
        hooks.stop_after(layer_path(family, 0))
        model(torch.tensor([[3, 4, 5]]))
        raise AssertionError("not reached: the pass stopped")  # pragma: no cover
    assert "l0" in capture and "l2" not in capture
    assert _hook_count(model) == 0


def test_run_stops_the_pass_not_the_block_so_one_manager_serves_a_loop(tiny):
    from traitlens import ActivationCapture

    family, model = tiny
    capture, rows = ActivationCapture(positions=-1), []
    with HookManager(model) as hooks:
        hooks.add_forward_hook(layer_path(family, 0), capture.make_hook("l0"))
        hooks.stop_after(layer_path(family, 0))
        for ids in ([[3, 4, 5]], [[6, 7]], [[8]]):  # with model(...) the first batch ended the block
            assert hooks.run(torch.tensor(ids)) is None
            rows.append(capture.get("l0"))
            capture.clear()
    assert [r.shape for r in rows] == [(1, TINY_HIDDEN)] * 3
    with HookManager(model) as hooks:  # a pass that is not stopped returns the model's output
        assert torch.equal(hooks.run(torch.tensor([[3, 4]])).logits, model(torch.tensor([[3, 4]])).logits)
    with HookManager(model) as outer:  # another manager's stop is not run's to swallow
        outer.stop_after(layer_path(family, 0))
        with pytest.raises(StopForward), HookManager(model) as inner:
            inner.run(torch.tensor([[3, 4]]))
    assert _hook_count(model) == 0


def test_a_stop_goes_to_the_manager_that_set_it_through_managers_opened_inside(tiny):
    from traitlens.steering import residual_norms

    family, model = tiny
    reached = []
    with HookManager(model) as outer:
        outer.stop_after(layer_path(family, 0))
        with HookManager(model) as inner:  # its block swallowed the outer stop, and the outer went on
            inner.add_forward_hook(layer_path(family, 1), lambda *args: None)
            model(torch.tensor([[3, 4, 5]]))
            reached.append("inner")  # pragma: no cover
        reached.append("outer")  # pragma: no cover
    assert reached == [] and _hook_count(model) == 0

    class Words:  # one id per word, no pad token
        chat_template = None

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [3 + len(word) for word in text.split()]}

    with HookManager(model) as outer:  # traitlens's own managers let it through too: no wrong numbers
        outer.stop_after(layer_path(family, 0))
        residual_norms(model, Words(), ["a bb ccc", "dd e"], 1, batch_size=1)
        reached.append("after residual_norms")  # pragma: no cover
    assert reached == []


def test_decoder_layer_paths(tiny):
    from traitlens import decoder_layer_paths

    family, model = tiny
    assert decoder_layer_paths(model) == [layer_path(family, i) for i in range(TINY_LAYERS)]
    with pytest.raises(ValueError, match="cannot find the decoder layers"):
        decoder_layer_paths(torch.nn.Linear(2, 2))


def test_decoder_layer_paths_of_multimodal_and_encoder_decoder_models_are_the_text_decoders():
    """A vision tower's or an encoder's layers come first in the module tree, and may be more."""
    import transformers as tf

    from traitlens import decoder_layer_paths

    text = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=4, vocab_size=128)  # fmt: skip
    vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                 num_attention_heads=4, image_size=32, patch_size=8)  # fmt: skip
    llava = tf.LlavaForConditionalGeneration(tf.LlavaConfig(vision_config=vision, text_config=text))
    assert decoder_layer_paths(llava) == ["model.language_model.layers.0", "model.language_model.layers.1"]
    sizes = dict(encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64)
    config = tf.BartConfig(vocab_size=128, d_model=32, encoder_layers=3, decoder_layers=2, **sizes)
    bart = tf.BartForConditionalGeneration(config)
    assert decoder_layer_paths(bart) == ["model.decoder.layers.0", "model.decoder.layers.1"]
    t5 = tf.T5ForConditionalGeneration(  # a deep encoder, a shallow decoder (t5-efficient-*-dl2)
        tf.T5Config(
            vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=4, num_decoder_layers=2
        )
    )
    assert decoder_layer_paths(t5) == ["decoder.block.0", "decoder.block.1"]


def test_decoder_layer_paths_leave_out_towers_and_refuse_to_guess_between_equal_lists():
    import transformers as tf

    from traitlens import decoder_layer_paths

    def stack(n):
        return torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(n))

    class Git(torch.nn.Module):  # GIT names its text decoder "encoder", beside an image encoder
        config = tf.PretrainedConfig(num_hidden_layers=3)

        def __init__(self):
            super().__init__()
            self.image_encoder = torch.nn.Module()
            self.image_encoder.layers = stack(3)
            self.encoder = torch.nn.Module()
            self.encoder.layer = stack(3)
            self.audio_tower = torch.nn.Module()
            self.audio_tower.layers = stack(3)

    assert decoder_layer_paths(Git()) == ["encoder.layer.0", "encoder.layer.1", "encoder.layer.2"]
    xlm = tf.XLMWithLMHeadModel(tf.XLMConfig(vocab_size=128, emb_dim=32, n_layers=2, n_heads=4, causal=True))
    with pytest.raises(
        ValueError, match=r"'transformer.attentions', 'transformer.layer_norm1', .* all have 2"
    ):
        decoder_layer_paths(xlm)


def test_make_hook_itself_is_refused_when_added():
    from traitlens import ActivationCapture

    with pytest.raises(TypeError, match=r"pass the hook it makes, capture.make_hook\('name'\)"):
        HookManager(make_tiny_model("llama")).add_forward_hook(
            "model.layers.0", ActivationCapture().make_hook
        )
