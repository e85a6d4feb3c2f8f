"""What reads a finished store for someone else: ``export.py`` (the gate every export passes, and the
embedding-reader / faiss layout), ``serving.py`` (vLLM's encoder cache, SGLang's precomputed embeddings, the
embedding validator), ``vllm_client.py`` (the requests that make vLLM serve those entries), ``export_target.py``
(DEST written aside and swapped in whole) and ``viz.py`` (token pictures).
Library entry points for other frameworks live in ``vitok.integrations``."""
