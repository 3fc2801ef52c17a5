"""A tqdm bar driven by core's progress events."""

from __future__ import annotations

from typing import Any

from tqdm import tqdm


class ProgressBar:
    """Shows overall optimisation steps (``done``/``total_steps``) with the current stage and unit."""

    def __init__(self, desc: str = "quantize", disable: bool = False) -> None:
        self.bar = tqdm(total=0, desc=desc, unit="step", disable=disable, dynamic_ncols=True)

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("total_steps") and self.bar.total != event["total_steps"]:
            self.bar.total = event["total_steps"]
        if event.get("done") is not None and event["done"] > self.bar.n:
            self.bar.update(event["done"] - self.bar.n)
        label = event["stage"] + (f" {event['unit']}" if event.get("unit") else "")
        postfix = {"at": label}
        if event.get("loss") is not None:
            postfix["loss"] = f"{event['loss']:.4g}"
        self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        self.bar.close()
