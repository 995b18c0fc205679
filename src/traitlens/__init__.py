"""traitlens: find, test and use trait vectors in transformer language models.

The core (hooks, capture, positions, compute, methods, metrics) needs only torch at import. Everything else
(datasets, pipeline, vectors on disk, monitoring, steering, reports, CLI) is built from those primitives.
"""

__version__ = "0.5.1"

from traitlens.capture import ActivationCapture, output_tensor
from traitlens.compute import (
    angular_velocity,
    attention_entropy,
    compute_derivative,
    compute_second_derivative,
    cosine_similarity,
    magnitude,
    mean_difference,
    normalize_vectors,
    pca_reduce,
    projection,
    radial_velocity,
)
from traitlens.dataset import ContrastiveDataset, DatasetError, Example, available_datasets, load_dataset
from traitlens.hooks import HookManager, StopForward, decoder_layer_paths, list_modules, resolve_module
from traitlens.methods import (
    METHODS,
    ExtractionMethod,
    GradientMethod,
    ICAMethod,
    MeanDifferenceMethod,
    PCADiffMethod,
    ProbeMethod,
    RandomBaselineMethod,
    get_method,
)
from traitlens.metrics import cross_trait_accuracy, evaluate_vector
from traitlens.models import load_model
from traitlens.positions import POSITION_RULES, last_token_index, select_positions
from traitlens.vector import TraitVector, load_vector, save_vector

__all__ = [
    "METHODS",
    "POSITION_RULES",
    "ActivationCapture",
    "ContrastiveDataset",
    "DatasetError",
    "Example",
    "ExtractionMethod",
    "GradientMethod",
    "HookManager",
    "ICAMethod",
    "MeanDifferenceMethod",
    "PCADiffMethod",
    "ProbeMethod",
    "RandomBaselineMethod",
    "StopForward",
    "TraitVector",
    "__version__",
    "angular_velocity",
    "attention_entropy",
    "available_datasets",
    "compute_derivative",
    "compute_second_derivative",
    "cosine_similarity",
    "cross_trait_accuracy",
    "decoder_layer_paths",
    "evaluate_vector",
    "get_method",
    "last_token_index",
    "list_modules",
    "load_dataset",
    "load_model",
    "load_vector",
    "magnitude",
    "mean_difference",
    "normalize_vectors",
    "output_tensor",
    "pca_reduce",
    "projection",
    "radial_velocity",
    "resolve_module",
    "save_vector",
    "select_positions",
]
