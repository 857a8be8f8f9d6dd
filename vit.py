"""ViT building blocks shared by the tokenizer's encoder and decoder, the Source Recovery Model and the DINOv2 teacher.

One attention implementation for all of them: the fused qkv projection, the head split, scaled dot-product
attention (with an optional additive bias: ToMe's proportional attention, Eq. (14)) and the output projection.
Key names follow DINOv2 (`attn.qkv`, `attn.proj`, `ls1.gamma`, `mlp.fc1`, ...), so that DINOv2's published
weights load into the teacher key for key and its weight selection maps onto the encoder (Appendix A.1).

    from vit import Attention, Block      # python -c "import vit" builds nothing; the tests exercise every part
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def split_heads(x, num_heads):
    """(B, T, D) -> (B, H, T, D/H)."""
    B, T, D = x.shape
    return x.reshape(B, T, num_heads, D // num_heads).transpose(1, 2)          # (B, H, T, D/H)


def merge_heads(x):
    """(B, H, T, D/H) -> (B, T, D)."""
    B, H, T, Dh = x.shape
    return x.transpose(1, 2).reshape(B, T, H * Dh)                           # (B, T, D)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection.

    forward(x, bias=None, return_keys=False): x (B, T, D); bias an additive logit bias broadcastable to
    (B, H, T, T) (ToMe: log size of every key, Eq. (14)). With return_keys, also the keys averaged over heads
    (B, T, D/H): ToMe's matching metric.
    """

    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x, bias=None, return_keys=False):
        q, k, v = (split_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))   # 3 x (B, H, T, D/H)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype))
        out = self.proj(merge_heads(out))                                    # (B, T, D)
        return (out, k.mean(dim=1)) if return_keys else out                  # keys (B, T, D/H)


class CrossAttention(nn.Module):
    """Queries (B, Tq, D) attend to a context (B, Tk, D): separate q and kv projections, same head split."""

    def __init__(self, dim, num_heads):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context):
        q = split_heads(self.q(x), self.num_heads)                           # (B, H, Tq, D/H)
        k, v = (split_heads(t, self.num_heads) for t in self.kv(context).chunk(2, dim=-1))  # 2 x (B, H, Tk, D/H)
        return self.proj(merge_heads(F.scaled_dot_product_attention(q, k, v)))   # (B, Tq, D)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim, init_values=1.0):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm ViT block with LayerScale: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))). `mlp`: the FFN
    class, called as mlp(dim, hidden) (the tokenizer's decoder passes its MixFFN)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, init_values=1.0, mlp=Mlp):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, init_values)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """A p x p stride-p convolution: (B, 3, H, W) -> (B, (H/p)(W/p), D)."""

    def __init__(self, patch_size, in_chans, embed_dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        x = self.proj(x)                                                     # (B, D, h, w)
        return x.flatten(2).transpose(1, 2)                                  # (B, h*w, D)
