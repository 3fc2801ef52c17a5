"""Numbers the service writes or returns are finite or null: one sanitiser for every report and result.

Why: a measured figure can be undefined. A model whose logits are constant (an uploaded checkpoint with
a zeroed head) has no signal, so its logit SQNR, ``10·log10(signal / noise)``, is ``-inf``; a diverged
reconstruction has a NaN loss. Python's ``json`` writes those as ``-Infinity``/``NaN``, which is not JSON
(RFC 8259): report.json could not be parsed, and PostgreSQL refused the job's success write (its JSON
columns reject them), so a finished job was re-queued and ran three times. Undefined is written as
``null``, the same in the files, the database and the API.
"""

from __future__ import annotations

import math
from typing import Any


def finite_json(value: Any) -> Any:
    """A copy of ``value`` (dicts, lists, tuples, scalars) with every NaN or ±infinite float replaced by
    ``None``; tuples become lists, as JSON has them. Recursive: reports nest a handful of levels."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_json(inner) for key, inner in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(inner) for inner in value]
    return value
