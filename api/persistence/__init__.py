"""Persistence shared by the API and the worker: settings, database, tables, artifact storage.

Nothing here imports FastAPI or Celery, so both processes (and the CLI) can use it.
"""
