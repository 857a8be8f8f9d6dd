"""The Source Recovery Model: predict the source matrix from the K quantized merged tokens (paper Sec. 3.2).

Stage 2 generates K merged tokens but no source matrix, and the decoder needs the N original positions. This
model predicts, for every original position j, which merged token holds it:

    queries  Q0 (N, D)  -- one learnable query per original position
    keys     E = LN(W_e z_q + slot_k)  (B, K, D)  -- the quantized merged tokens (slot_k: embedding of slot k)
    Q1 = CrossAttentionBlock(Q0, E); Q = SelfAttentionBlock^2(Q1)                      (Table A2: 2 layers)
    logits[b, j, k] = <W_q Q[b, j], W_k E[b, k]> / sqrt(D)   -- the merged tokens act as cluster centres   Eq. (8)
    loss = cross-entropy(logits[b, j, :], source[b, j])                                                   Eq. (9)

The source is merge.py's index map (B, N): source[b, j] = the merged token holding original position j (the
column-wise argmax of the paper's K x N source matrix). The predicted source is the argmax of the logits, the same
(B, N) map, usable wherever the true source is. Any K <= N works: the model attends to whatever merged tokens it
is given.

The slot embedding is our addition (the paper is silent, the authors' release ships an untrained stub): two
merged tokens with the same 18-bit code would otherwise be indistinguishable cluster centres, while their slot
in ToMe's output order still tells them apart. Table A2's size: width 384, 8 heads, FFN 1536, about 6-7M.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from vit import Block, CrossAttention, Mlp


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention (queries attend to a context) followed by an MLP, both residual."""

    def __init__(self, dim, num_heads, ffn):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim, eps=1e-6)
        self.norm_kv = nn.LayerNorm(dim, eps=1e-6)
        self.attn = CrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, ffn)

    def forward(self, q, context):
        q = q + self.attn(self.norm_q(q), self.norm_kv(context))                        # (B, N, D)
        return q + self.mlp(self.norm2(q))


class SourceRecovery(nn.Module):
    def __init__(self, num_tokens, z_dim=18, dim=384, depth=2, num_heads=8, ffn=1536):
        super().__init__()
        self.num_tokens = num_tokens                                    # N
        self.embed = nn.Linear(z_dim, dim)
        self.slot_embed = nn.Parameter(torch.zeros(1, num_tokens, dim))  # slot k of the merged sequence (k < K <= N)
        self.norm_in = nn.LayerNorm(dim, eps=1e-6)
        self.queries = nn.Parameter(torch.zeros(1, num_tokens, dim))    # one per original position
        self.cross = CrossAttentionBlock(dim, num_heads, ffn)
        self.blocks = nn.ModuleList([Block(dim, num_heads, ffn / dim) for _ in range(depth)])
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim, bias=False)  # a key bias shifts a row of logits: softmax-invariant
        nn.init.trunc_normal_(self.queries, std=0.02)
        nn.init.trunc_normal_(self.slot_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def logits(self, z_q):
        """(B, K, d) quantized merged tokens -> (B, N, K) scores of each original position against each token."""
        B, K, _ = z_q.shape
        if K > self.num_tokens:
            raise ValueError(f"got {K} merged tokens, more than the N={self.num_tokens} original positions")
        e = self.norm_in(self.embed(z_q) + self.slot_embed[:, :K])                      # (B, K, D)
        q = self.cross(self.queries.expand(B, -1, -1), e)                               # (B, N, D)
        for block in self.blocks:
            q = block(q)
        scale = 1.0 / math.sqrt(q.shape[-1])
        return (self.to_q(q) @ self.to_k(e).transpose(1, 2)) * scale                    # Eq. (8): (B, N, K)

    def loss(self, z_q, source):
        """Eq. (9): mean cross-entropy of the merged token of every original position, source (B, N)."""
        logits = self.logits(z_q).float()                                               # (B, N, K)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), source.reshape(-1))  # (B*N, K) vs (B*N,)

    @torch.no_grad()
    def predict_source(self, z_q):
        """The predicted source: the most likely merged token of every original position, (B, N) int64."""
        return self.logits(z_q).argmax(dim=-1)                                          # (B, N)

    @torch.no_grad()
    def accuracy(self, z_q, source):
        """Fraction of original positions whose merged token is predicted right."""
        return (self.predict_source(z_q) == source).float().mean().item()
