"""Figures and widgets: plots.py (plain functions returning matplotlib Figures), widgets.py (ipywidgets controls
that redraw those figures). Needs the notebooks extra: pip install iteris-lab[notebooks]."""
