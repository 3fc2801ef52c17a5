"""The model checks the API runs (``service.job_inputs.check_buildable``, ``core.models.check_checkpoint_fits``):
parameter counts from the meta device that equal a full build, bounded time whatever the depth, and an
uploaded checkpoint checked from its header in bounded memory (measured in a fresh process)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from core.errors import CheckpointError, ModelSpecError
from core.models import check_checkpoint_fits, count_parameters, resolve_model_spec
from service.job_inputs import check_buildable
from tests.helpers import REPO


def _meta_count(name: str, kwargs: dict) -> int:
    import timm

    with torch.device("meta"):
        return sum(p.numel() for p in timm.create_model(name, **kwargs).parameters())


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("vit_tiny_patch16_224", {"depth": 9}),
        ("vit_tiny_patch16_224", {"depth": 13, "embed_dim": 96, "num_heads": 3, "img_size": 28, "patch_size": 4}),
        ("deit_small_patch16_224", {"depth": 6, "num_classes": 10}),
        ("swin_tiny_patch4_window7_224", {"depths": [3, 5, 7, 1]}),
    ],
)
def test_the_extrapolated_count_equals_a_full_build(name, kwargs):
    assert count_parameters(resolve_model_spec({"timm_name": name, "timm_kwargs": kwargs})) == _meta_count(name, kwargs)


def test_the_count_costs_the_same_at_any_depth():
    spec = resolve_model_spec({"timm_name": "vit_tiny_patch16_224", "timm_kwargs": {"depth": 128}})
    started = time.process_time()
    counted = check_buildable(spec, max_parameters=10**9)
    spent = time.process_time() - started
    full_started = time.process_time()
    assert counted == _meta_count("vit_tiny_patch16_224", {"depth": 128})
    assert spent < 1.0 and spent < (time.process_time() - full_started) / 4, spent  # the full build: ~2.7 s
    with pytest.raises(ModelSpecError, match="limit is 1,000,000"):
        check_buildable(spec, max_parameters=1_000_000)


def _zero_safetensors(path, name: str, kwargs: dict, dtype: str = "F32") -> None:
    """A safetensors file for the architecture, written in chunks (no tensor in memory)."""
    import timm

    with torch.device("meta"):
        state = timm.create_model(name, **kwargs).state_dict()
    header, offset = {}, 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * 4
        header[key] = {"dtype": dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        chunk = bytes(8 << 20)
        left = offset
        while left:
            f.write(chunk[: min(left, len(chunk))])
            left -= min(left, len(chunk))


PEAK_OF_A_MODEL_CHECK = r"""
import json, resource, sys
from pathlib import Path
from core.models import check_checkpoint_fits, resolve_model_spec
spec = resolve_model_spec({"timm_name": sys.argv[2], "timm_kwargs": json.loads(sys.argv[3])})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
count = check_checkpoint_fits(spec, Path(sys.argv[1]))
print(json.dumps({"count": count, "grown_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}))
"""


def test_a_large_checkpoint_is_checked_in_bounded_memory(tmp_path):
    kwargs = {"num_classes": 10}
    path = tmp_path / "vit_base.safetensors"
    _zero_safetensors(path, "vit_base_patch16_224", kwargs)
    assert path.stat().st_size > 300 * 2**20
    measured = subprocess.run(
        [sys.executable, "-c", PEAK_OF_A_MODEL_CHECK, str(path), "vit_base_patch16_224", json.dumps(kwargs)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert measured.returncode == 0, measured.stderr[-2000:]
    result = json.loads(measured.stdout)
    assert result["count"] == _meta_count("vit_base_patch16_224", kwargs)
    # Loading it (the check before) took the file's size at least twice: 330 MiB and up.
    assert result["grown_mib"] < 64, f"checking a {path.stat().st_size >> 20} MiB checkpoint took {result}"


def test_a_checkpoint_with_the_wrong_dtype_or_nan_is_refused(tmp_path):
    kwargs = {"img_size": 8, "patch_size": 4, "in_chans": 1, "num_classes": 2, "depth": 1, "embed_dim": 16,
              "num_heads": 2}
    spec = resolve_model_spec({"timm_name": "vit_tiny_patch16_224", "timm_kwargs": kwargs})
    import timm

    state = timm.create_model("vit_tiny_patch16_224", **kwargs).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "ok.safetensors"))
    assert check_checkpoint_fits(spec, tmp_path / "ok.safetensors") == math.fsum(v.numel() for v in state.values())
    save_file({k: (v * 1000).to(torch.int64) for k, v in state.items()}, str(tmp_path / "int.safetensors"))
    with pytest.raises(ModelSpecError, match="dtype mismatch: .*I64 vs model F32"):
        check_checkpoint_fits(spec, tmp_path / "int.safetensors")
    poisoned = {k: v.clone() for k, v in state.items()}
    poisoned["head.bias"][1] = float("inf")
    save_file(poisoned, str(tmp_path / "inf.safetensors"))
    with pytest.raises(CheckpointError, match="NaN or infinite values, e.g. in head.bias"):
        check_checkpoint_fits(spec, tmp_path / "inf.safetensors")
