"""traitlens: find, test and use trait vectors in transformer language models."""

from traitlens.models import load_model

__version__ = "0.5.0"

__all__ = ["__version__", "load_model"]
