import subprocess
import sys

import traitlens


def test_import_needs_only_torch():
    code = (
        "import sys, traitlens; heavy = ('sklearn', 'scipy', 'transformers', 'safetensors', 'matplotlib', 'gguf');"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_seed_public_names_exist():
    seed_names = [
        "HookManager", "ActivationCapture", "MeanDifferenceMethod", "ICAMethod", "ProbeMethod", "GradientMethod",
        "PCADiffMethod", "RandomBaselineMethod", "get_method", "mean_difference", "compute_derivative",
        "compute_second_derivative", "projection", "cosine_similarity", "normalize_vectors", "magnitude",
        "radial_velocity", "angular_velocity", "pca_reduce", "attention_entropy",
    ]  # fmt: skip
    for name in seed_names:
        assert name in traitlens.__all__ and getattr(traitlens, name) is not None
    assert all(hasattr(traitlens, name) for name in traitlens.__all__)
