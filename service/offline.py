"""The service runs offline: the model hub libraries are told so in every service process.

Why: ``timm_kwargs: {"pretrained": true}`` made the API try the hub for 46.8 s before failing. The
service refuses ``pretrained`` at once (``service.job_inputs.refuse_pretrained``); this makes any other
path to the hub fail at once too, instead of waiting on the network.
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
