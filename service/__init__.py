"""What the API, the worker, the migrations and the CLI share: settings, database engine and sessions,
tables, API keys, the artifact store, request → runnable job, archive handling, the queue contract
and the job lifecycle.

Nothing here imports FastAPI or task code: the API, the worker and the CLI all import it, and it
imports only ``core``. The layering is checked by import-linter (``lint-imports``, in ``make test``).
"""
