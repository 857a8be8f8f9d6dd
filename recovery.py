"""The Source Recovery Model: predict the source matrix from the K quantized merged tokens (paper Sec. 3.2).

Stage 2 generates K merged tokens but no source matrix, and the decoder needs the N original positions. This
model predicts, for every original position j, which merged token holds it. Each merged token k comes with its
anchor a_k, the first original position it holds (merge.anchors): the place in the image that Sec. 4.2's RandAR
generates it at ("its original position in raster order", Eq. (13)).

    queries  Q0 = P (N, D)  -- the learnable recovery queries: one position embedding per original position
    centres  E = LN(W_e z_q + P[a])  (B, K, D)  -- each quantized merged token at its anchor's position
    Q1 = CrossAttentionBlock(Q0, E); Q = SelfAttentionBlock^2(Q1)                      (Table A2: 2 layers)
    logits[b, j, k] = <W_q Q[b, j], W_k E[b, k]> / sqrt(D)   -- the merged tokens act as cluster centres   Eq. (8)
                      (-inf where a_k > j: a position belongs to a token anchored at or before it)
    loss = cross-entropy(logits[b, j, :], source[b, j])                                                   Eq. (9)

The source is merge.py's index map (B, N): source[b, j] = the merged token holding original position j (the
column-wise argmax of the paper's K x N source matrix). The predicted source is the argmax of the logits, with
every anchor's own position given to its token (a_k is held by k by definition): the same (B, N) map, usable
wherever the true source is. Any K <= N works, in any order of the K tokens: the model reads (code, anchor) pairs.
Token recovery itself, Eq. (11)'s gather of the merged tokens to the N positions by a source, is merge.recover.

The anchors are our addition (the paper is silent, the authors' release ships an untrained stub): without a
position, two merged tokens with the same code are indistinguishable cluster centres, and a token's place in the
image is left to be guessed from its code. Table A2's size: width 384, 8 heads, FFN 1536, about 6-7M.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from merge import anchors as anchors_of
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
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, dim))  # P: the queries, and the anchors' positions
        self.norm_in = nn.LayerNorm(dim, eps=1e-6)
        self.cross = CrossAttentionBlock(dim, num_heads, ffn)
        self.blocks = nn.ModuleList([Block(dim, num_heads, ffn / dim) for _ in range(depth)])
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim, bias=False)  # a key bias shifts a row of logits: softmax-invariant
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def check(self, z_q, anchors):
        B, K, _ = z_q.shape
        if K > self.num_tokens:
            raise ValueError(f"got {K} merged tokens, more than the N={self.num_tokens} original positions")
        if anchors.shape != (B, K) or anchors.dtype not in (torch.int16, torch.int32, torch.int64):
            raise ValueError(f"anchors must be (B, K) = ({B}, {K}) integer positions, got {anchors.dtype} "
                             f"{tuple(anchors.shape)}")
        return anchors.long()

    def logits(self, z_q, anchors):
        """(B, K, d) quantized merged tokens at anchors (B, K) -> (B, N, K) scores of each original position against
        each token; -inf where the token's anchor lies after the position."""
        anchors = self.check(z_q, anchors)
        B = z_q.shape[0]
        P = self.pos_embed.expand(B, -1, -1)                                            # (B, N, D)
        at = P.gather(1, anchors[..., None].expand(-1, -1, P.shape[-1]))                # (B, K, D) P[a_k]
        e = self.norm_in(self.embed(z_q) + at)                                          # (B, K, D)
        q = self.cross(P, e)                                                            # (B, N, D)
        for block in self.blocks:
            q = block(q)
        scale = 1.0 / math.sqrt(q.shape[-1])
        logits = (self.to_q(q) @ self.to_k(e).transpose(1, 2)) * scale                  # Eq. (8): (B, N, K)
        j = torch.arange(self.num_tokens, device=z_q.device)
        after = anchors[:, None, :] > j[None, :, None]                                  # (B, N, K) a_k > j
        return logits.float().masked_fill(after, float("-inf"))

    def loss(self, z_q, source):
        """Eq. (9): mean cross-entropy of the merged token of every original position, source (B, N)."""
        logits = self.logits(z_q, anchors_of(source, z_q.shape[1]))                     # (B, N, K)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), source.reshape(-1).long())  # (B*N, K) vs (B*N,)

    @torch.no_grad()
    def predict_source(self, z_q, anchors):
        """The predicted source: the most likely merged token of every original position, and each anchor's own
        position given to its token; (B, N) int64."""
        source = self.logits(z_q, anchors).argmax(dim=-1)                               # (B, N)
        K = z_q.shape[1]
        return source.scatter(1, anchors.long(), torch.arange(K, device=z_q.device).expand(z_q.shape[0], K))

    @torch.no_grad()
    def accuracy(self, z_q, source):
        """Fraction of original positions whose merged token is predicted right (anchors from the true source)."""
        predicted = self.predict_source(z_q, anchors_of(source, z_q.shape[1]))
        return (predicted == source).float().mean().item()
