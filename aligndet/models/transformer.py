"""DETR's encoder-decoder transformer (Carion et al., ECCV 2020, §3.2 and
appendix A.3, Fig. 10), written around ``nn.MultiheadAttention``.

    encoder layer (post-norm):  x = norm1(x + attn(q=x+pos, k=x+pos, v=x));  x = norm2(x + ffn(x))
    decoder layer (post-norm):  t = norm1(t + attn(q=t+qpos, k=t+qpos, v=t))
                                t = norm2(t + attn(q=t+qpos, k=memory+pos, v=memory))
                                t = norm3(t + ffn(t))

The positional encodings enter the queries and keys of every attention, at
every layer, and never the values (Fig. 10): the spatial encoding ``pos`` for
the image features, the learned object queries ``qpos`` for the decoder. The
decoder's input ``t`` starts at zeros, so the object queries are all that
tells the slots apart. One LayerNorm after the decoder normalises the output
of every decoder layer, which feed the auxiliary losses (§3.2, "Auxiliary
decoding losses"). The encoder has no final norm (post-norm layers end in one).

Tensors are batch-first: image features [B, HW, d], queries [B, Q, d];
``key_padding_mask`` [B, HW] is True at padded pixels, which no query attends to.
"""
import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TransformerEncoderLayer(nn.Module):
    """Self-attention over the image features, then the FFN; post-norm."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)  # the FFN: linear1 -> ReLU -> dropout -> linear2
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, src: Tensor, pos: Tensor, key_padding_mask: Tensor) -> Tensor:
        """src, pos [B, HW, d]; key_padding_mask [B, HW] -> [B, HW, d]."""
        q = k = src + pos
        attended = self.self_attn(q, k, value=src, key_padding_mask=key_padding_mask, need_weights=False)[0]
        src = self.norm1(src + self.dropout1(attended))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout2(ffn))


class TransformerDecoderLayer(nn.Module):
    """Self-attention among the object queries, cross-attention to the image
    features (``multihead_attn``), then the FFN; post-norm."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)  # the FFN: linear1 -> ReLU -> dropout -> linear2
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout1, self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor,
                memory_key_padding_mask: Tensor) -> Tensor:
        """tgt, query_pos [B, Q, d]; memory, pos [B, HW, d]; mask [B, HW] -> [B, Q, d]."""
        q = k = tgt + query_pos
        attended = self.self_attn(q, k, value=tgt, need_weights=False)[0]
        tgt = self.norm1(tgt + self.dropout1(attended))
        attended = self.multihead_attn(tgt + query_pos, memory + pos, value=memory,
                                       key_padding_mask=memory_key_padding_mask, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(attended))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(ffn))


class TransformerEncoder(nn.Module):
    def __init__(self, layer: TransformerEncoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))

    def forward(self, src: Tensor, pos: Tensor, key_padding_mask: Tensor) -> Tensor:
        for layer in self.layers:
            src = layer(src, pos, key_padding_mask)
        return src


class TransformerDecoder(nn.Module):
    """Decoder layers and the one LayerNorm shared by all their outputs.

    return_intermediate: return every layer's normalised output, stacked
    [L, B, Q, d] (for the auxiliary losses); otherwise the last one, [1, B, Q, d].
    """

    def __init__(self, layer: TransformerDecoderLayer, num_layers: int, d_model: int,
                 return_intermediate: bool = True):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"the decoder needs at least one layer, got {num_layers}")
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.return_intermediate = return_intermediate

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor,
                memory_key_padding_mask: Tensor) -> Tensor:
        outputs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, pos, query_pos, memory_key_padding_mask)
            if self.return_intermediate:
                outputs.append(self.norm(tgt))
        return torch.stack(outputs) if self.return_intermediate else self.norm(tgt)[None]


class Transformer(nn.Module):
    """Encoder over the image features, decoder over the object queries.

    Args:
        d_model: width of every token (DETR's hidden_dim).
        nhead: attention heads; d_model must be divisible by it.
        dim_feedforward: hidden width of the FFNs.
        return_intermediate: see ``TransformerDecoder``.
    """

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6, num_decoder_layers: int = 6,
                 dim_feedforward: int = 2048, dropout: float = 0.1, return_intermediate: bool = True):
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"d_model ({d_model}) must be divisible by nhead ({nhead})")
        self.encoder = TransformerEncoder(TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout),
                                          num_encoder_layers)
        self.decoder = TransformerDecoder(TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout),
                                          num_decoder_layers, d_model, return_intermediate)
        self.d_model = d_model
        # Xavier-uniform on every matrix, as the paper initialises the transformer (appendix A.3).
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor, pos: Tensor):
        """src [B, d, H, W] (projected features); mask [B, H, W] True = padding;
        query_embed [Q, d] (learned object queries); pos [B, d, H, W].

        Returns (decoder outputs [L, B, Q, d], memory [B, d, H, W]).
        """
        b, d, h, w = src.shape
        src = src.flatten(2).transpose(1, 2)                        # [B, HW, d]
        pos = pos.flatten(2).transpose(1, 2)                        # [B, HW, d]
        mask = mask.flatten(1)                                      # [B, HW]
        query_pos = query_embed[None].expand(b, -1, -1)            # [B, Q, d]
        memory = self.encoder(src, pos, mask)
        hs = self.decoder(torch.zeros_like(query_pos), memory, pos, query_pos, mask)
        return hs, memory.transpose(1, 2).reshape(b, d, h, w)
