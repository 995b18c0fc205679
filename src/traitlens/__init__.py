"""traitlens: find, test and use trait vectors in transformer language models."""

from traitlens.capture import ActivationCapture, output_tensor
from traitlens.hooks import HookManager, StopForward, decoder_layer_paths, list_modules, resolve_module
from traitlens.models import load_model
from traitlens.positions import POSITION_RULES, last_token_index, select_positions

__version__ = "0.5.0"

__all__ = [
    "POSITION_RULES",
    "ActivationCapture",
    "HookManager",
    "StopForward",
    "__version__",
    "decoder_layer_paths",
    "last_token_index",
    "list_modules",
    "load_model",
    "output_tensor",
    "resolve_module",
    "select_positions",
]
