"""The ``vitok`` command: a thin Typer layer (``app.py``) over the library, and the progress bar
(``progress.py``). Nothing in the library imports this package."""
