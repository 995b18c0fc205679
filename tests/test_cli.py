"""Command-line argument parsing, without a model (the commands run on the real model in integration)."""

from __future__ import annotations

import argparse

import pytest

from traitlens.cli import _parse_layers


def test_layer_lists_and_ranges():
    assert _parse_layers("12") == [12]
    assert _parse_layers("5,10-12") == [5, 10, 11, 12]
    with pytest.raises(argparse.ArgumentTypeError, match=r"layer range '5-3' is empty: give it as 3-5"):
        _parse_layers("5-3")
    with pytest.raises(argparse.ArgumentTypeError, match=r"layers must look like '12' or '5,10-20', got 'a'"):
        _parse_layers("a")
