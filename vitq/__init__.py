"""vitq: the command line (``vitq``), benchmarks and the Python client of the service."""
