"""What reads a finished store for someone else: ``export.py`` (embedding-reader / faiss layouts) and ``viz.py``
(token pictures). Library entry points for other frameworks live in ``vitok.integrations``."""
