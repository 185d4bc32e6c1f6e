"""Box helpers that torchvision.ops does not provide (conversions use torchvision.ops.box_convert)."""
import torch


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """logit(x) with x clipped to [0, 1] and both odds terms clamped at `eps` (official RT-DETR helper)."""
    x = x.clip(min=0.0, max=1.0)
    return torch.log(x.clip(min=eps) / (1 - x).clip(min=eps))
