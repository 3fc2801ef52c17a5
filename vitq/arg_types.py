"""argparse value types shared by the engine verbs (``vitq.cli``) and the client verbs
(``vitq.client_cli``); importing them pulls in neither torch nor the service."""

from __future__ import annotations

import argparse


def int_list(text: str) -> list[int]:
    """``"3,4,6"`` → ``[3, 4, 6]``."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def str_list(text: str) -> list[str]:
    """``"isvit, repq"`` → ``["isvit", "repq"]``."""
    return [v.strip() for v in text.split(",") if v.strip()]
