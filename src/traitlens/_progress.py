"""Progress bars on long loops (tqdm, from the pipeline extra), and none where they are off or tqdm is missing."""

from __future__ import annotations


def progress_bar(items, label: bool | str, unit: str):
    """``items`` wrapped in a tqdm bar that disappears when done; ``items`` itself for ``label=False`` or
    without tqdm. ``label``: the bar's description, or ``True`` for none."""
    if not label:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the pipeline extra brings tqdm; without it, no bar
        return items
    return tqdm(items, desc=label if isinstance(label, str) else None, unit=unit, leave=False)
