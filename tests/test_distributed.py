"""The Ray backend's argument checks and its error without Ray (the cluster runs are in
tests/integration/test_distributed_ray.py)."""

import sys

import pytest

from traitlens.cli import main
from traitlens.distributed import RAY_MISSING, RayCluster, require_ray


def test_without_ray_the_cli_says_how_to_install_it(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` raise ImportError
    with pytest.raises(ImportError, match="pip install 'traitlens\\[ray\\]'"):
        require_ray()
    assert main(["extract", "--trait", "sentiment", "--backend", "ray", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"traitlens extract: error: {RAY_MISSING}\n"  # one line, no traceback
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("field", "value"), [("workers", 0), ("shard_size", 0), ("shard_size", 2.5), ("retries", -1)]
)
def test_cluster_settings_are_checked(field, value):
    with pytest.raises(ValueError, match=field):
        RayCluster(**{field: value})
