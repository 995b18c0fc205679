"""Progress bars on long loops (tqdm, from the pipeline extra), and none where they are off or tqdm is missing."""

from __future__ import annotations


def progress_bar(items, show: bool | str | None, unit: str):
    """``items`` wrapped in a tqdm bar that disappears when done, or ``items`` itself without tqdm.

    ``show``: ``True`` for a bar, ``False`` for none, ``None`` for a bar only where a person sees it (a
    terminal or a notebook; not a log file or a pipe), or a string: a bar with that label."""
    if show is False:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the pipeline extra brings tqdm; without it, no bar
        return items
    desc = show if isinstance(show, str) else None
    return tqdm(items, desc=desc, unit=unit, leave=False, disable=None if show is None else False)
