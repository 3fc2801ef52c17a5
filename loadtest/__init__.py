"""The load benchmark, apart from the ``vitq`` CLI: ``vitq-loadtest`` (or ``python -m loadtest``).

``load`` (concurrent idempotent submits + polling), ``drain`` (a queue of quick jobs, watched in
``/metrics``), ``connection`` (a minimal keep-alive HTTP client), ``server_latency`` (the API's own
histogram), ``topology`` (the production processes started on this machine), ``cli`` (the command).
Results and method: ``docs/load.md``.
"""
