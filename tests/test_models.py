"""What the bundled model's safetensors cache is keyed by, and the arguments it refuses (the real conversion
and loading are in tests/integration)."""

import re

import pytest

from traitlens.models import _file_identity, load_model


def test_the_cache_key_follows_the_file_content_not_its_path(tmp_path):
    content = bytes(range(256)) * 12_000  # 3 MB: head, middle and tail differ
    a, b = tmp_path / "env_a" / "model.gguf", tmp_path / "env_b" / "model.gguf"
    for path in (a, b):
        path.parent.mkdir()
        path.write_bytes(content)
    assert _file_identity(a) == _file_identity(b)  # two virtual environments share one cache
    assert str(tmp_path) not in str(_file_identity(a))
    b.write_bytes(content[:-1] + b"\x01")  # the last byte differs
    assert _file_identity(a) != _file_identity(b)
    b.write_bytes(content + b"\x00")  # one byte longer
    assert _file_identity(a) != _file_identity(b)


@pytest.mark.parametrize(
    ("kwargs", "shown"),
    [
        ({"revision": "main"}, "revision='main'"),
        ({"subfolder": "other"}, "subfolder='other'"),
        ({"name": "smollm2", "gguf_file": "x.gguf"}, "gguf_file='x.gguf'"),
    ],
)
def test_the_bundled_model_refuses_arguments_that_choose_another_file(kwargs, shown):
    # Refused before anything is read: the bundled model is one file, there is no revision of it.
    with pytest.raises(ValueError, match=rf"bundled model is the one file .*got {re.escape(shown)}"):
        load_model(**kwargs)


def test_a_device_or_folder_that_cannot_work_is_refused_before_loading(tmp_path):
    import torch

    with pytest.raises(
        ValueError, match="'foo' is not one torch knows"
    ):  # was torch's RuntimeError, at .to()
        load_model(device="foo")
    if not torch.cuda.is_available():  # was an AssertionError after the whole load
        with pytest.raises(ValueError, match=r"device 'cuda': this torch .* has no usable cuda device"):
            load_model(device="cuda")
    # a name written as a path: the hub's messages spoke of repo id syntax or tokenizer backends
    with pytest.raises(FileNotFoundError, match="no model folder '/nonexistent/model': it does not exist"):
        load_model("/nonexistent/model")
    with pytest.raises(FileNotFoundError, match=r"holds no config\.json"):
        load_model(str(tmp_path))
