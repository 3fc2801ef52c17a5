"""Every service process runs with the model hub libraries switched offline.

Why: ``timm_kwargs: {"pretrained": true}`` made the API try the hub for 46.8 s before failing. Hub
weights now come only through ``core.hub_weights`` under the operator's policy (``VITQ_HUB_ACCESS``):
the API reads the model cache at most, and a worker with ``online`` access lifts the switch for its own
download only (``core.hub_weights._network_allowed``). Any other path to the hub (a library reaching for
it on its own) still fails at once instead of waiting on the network.
"""

from __future__ import annotations

import os
import sys

HUB_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def go_offline() -> None:
    """Set the hub's offline switches for this process and its children. An operator who set one of them
    (e.g. ``HF_HUB_OFFLINE=0`` with a local mirror) keeps the value. ``huggingface_hub`` reads the switch
    when it is imported, so an already imported one is switched too."""
    for name in HUB_OFFLINE_VARIABLES:
        os.environ.setdefault(name, "1")
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None and os.environ["HF_HUB_OFFLINE"].strip().upper() in ("1", "ON", "YES", "TRUE"):
        constants.HF_HUB_OFFLINE = True
