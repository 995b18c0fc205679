"""What the bundled model's safetensors cache is keyed by (the real conversion is in tests/integration)."""

from traitlens.models import _file_identity


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
