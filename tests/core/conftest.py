import pytest
import timm
import torch

from core.models import resolve_model_spec


@pytest.fixture(scope="session")
def fmnist_spec():
    return resolve_model_spec("fmnist-vit-tiny")


def small_vit(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=28, patch_size=4, in_chans=1, num_classes=10, depth=2, **kwargs
    ).eval()


def small_swin(window_size: int = 7, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "swin_tiny_patch4_window7_224", img_size=56, window_size=window_size, depths=(2, 2), num_heads=(2, 4),
        embed_dim=32, num_classes=10, **kwargs,
    ).eval()


def padded_swin() -> torch.nn.Module:
    """A Swin whose feature maps (14×14, then 7×7) are not whole windows of 4: timm pads each block's
    attention input, after its LayerNorm."""
    return small_swin(window_size=4)
