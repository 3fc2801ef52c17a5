"""Print which top-level packages each top-level package imports (the layering `lint-imports` checks).

    .venv/bin/python scripts/import_graph.py
"""

import sys
from pathlib import Path

import grimp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, installed or not

PACKAGES = ["core", "service", "api", "worker", "migrations", "vitq", "loadtest"]

graph = grimp.build_graph(*PACKAGES)
for importer in PACKAGES:
    imported = [p for p in PACKAGES if p != importer and graph.direct_import_exists(
        importer=importer, imported=p, as_packages=True)]
    print(f"{importer:<11} imports {', '.join(imported) or 'none of them'}")
