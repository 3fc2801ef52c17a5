"""vitq REST API (FastAPI). What it shares with the worker lives in ``service``; it never imports ``worker``."""
