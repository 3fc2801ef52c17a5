"""vitq REST API (FastAPI). ``api.persistence`` is shared with the worker and imports no web code."""
