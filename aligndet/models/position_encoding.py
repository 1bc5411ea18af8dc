"""Sine positional encoding of a feature map, for DETR's transformer
(Carion et al., ECCV 2020, §3.2 and appendix A.4).

Every pixel of the map gets ``2 * num_pos_feats`` channels: ``num_pos_feats``
for its row y, then ``num_pos_feats`` for its column x. A coordinate ``c`` is
normalised to (0, 2*pi] over the image's *valid* extent and encoded as

    [sin(c / T^(0/n)), cos(c / T^(0/n)), sin(c / T^(2/n)), cos(c / T^(2/n)), ...],  T = temperature, n = num_pos_feats

The coordinates count the valid (unpadded) pixels from the top-left corner
(a cumulative sum over the padding mask), so an image zero-padded on the right
and bottom in a batch gets, in its valid region, exactly the encodings it gets
on its own.
"""
import math

import torch
from torch import Tensor, nn


class PositionEmbeddingSine(nn.Module):
    """mask [B, H, W] bool (True = padding) -> positional encoding [B, 2 * num_pos_feats, H, W].

    Args:
        num_pos_feats: channels per axis; DETR uses hidden_dim / 2 (128 at 256).
        temperature: the base T of the wavelengths.
        scale: the normalised coordinates run up to this value (2*pi).
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, scale: float = 2 * math.pi,
                 eps: float = 1e-6):
        super().__init__()
        if num_pos_feats % 2:
            raise ValueError(f"num_pos_feats must be even (sin / cos pairs), got {num_pos_feats}")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.scale = scale
        self.eps = eps

    def forward(self, mask: Tensor) -> Tensor:
        valid = ~mask
        y = valid.cumsum(1, dtype=torch.float32)                    # [B, H, W]: 1..h in valid rows
        x = valid.cumsum(2, dtype=torch.float32)
        # Divide by the valid height / width (the last row / column of the cumulative sum).
        y = y / (y[:, -1:, :] + self.eps) * self.scale
        x = x / (x[:, :, -1:] + self.eps) * self.scale
        k = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        wavelengths = self.temperature ** (2 * torch.div(k, 2, rounding_mode="floor") / self.num_pos_feats)
        return torch.cat([self._encode(y, wavelengths), self._encode(x, wavelengths)], 3).permute(0, 3, 1, 2)

    @staticmethod
    def _encode(coord: Tensor, wavelengths: Tensor) -> Tensor:
        """[B, H, W] -> [B, H, W, n]: sin on even channels, cos on odd ones, interleaved."""
        angles = coord[..., None] / wavelengths                     # [B, H, W, n]
        return torch.stack([angles[..., 0::2].sin(), angles[..., 1::2].cos()], 4).flatten(3)
