"""Matplotlib figures for the report and dose-response plots, made outside pyplot."""

from __future__ import annotations


def figure(figsize: tuple[float, float], layout: str = "tight"):
    """A matplotlib ``Figure`` on the Agg canvas, made outside pyplot: the caller's backend (a notebook's
    inline one, say) and pyplot's list of open figures stay as they were."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout=layout)
    FigureCanvasAgg(fig)
    return fig
