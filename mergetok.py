"""MergeTok: one encoder-decoder with a continuous (VAE) and a discrete (LFQ) branch, bridged by token merging.

Of the paper (arXiv 2605.30904) we have read its abstract only, and no code of it is public, so this
module is one reading of it. Every choice below is ours, with its reason.

The abstract's claims we build on: a unified tokenizer "jointly optimizes continuous (VAE) and discrete (VQ)
tokenizers within a[n] encoder-decoder architecture"; clustering similar tokens during encoding (token merging)
"provides dual supervision signals: (i) merged-token semantic alignment in the VAE branch ... (ii) group-wise
constraints, promoting intra-group diversity and inter-group exclusivity that stabilize VQ training"; comparisons
are "under matched token budgets".

The model (MergeTokenizer), for an image x:

    the shared encoder = G's (tokenizer.Encoder): CNN -> N tokens t_i -> ToMe attention blocks that merge them into
        K tokens z_k; the source g(i) in [0, K) names the merged group of token i                (merge.py, Eq. (7))
    per-token features   h_i = z_g(i) + (t_i - tbar_g(i)),   tbar_k = mean of t_j over group k
    shared head          h_i -> GroupNorm - SiLU (the encoder's norm_out) -> two projections:
        discrete         u_i = proj_out(.)                          (B, N, d)  the encoder's own projection (G's)
        continuous       (mu_i, log sigma_i^2) = posterior(.)       (B, N, C)  a Gaussian posterior per token
    merging the latents  both branches send the decoder K merged tokens, the group means of the per-token latents:
        discrete         q_k = sign(mean_{i in k} u_i)              LFQ (lfq.py, Eq. (4)): K indices of d bits
        continuous       c_k = mean_{i in k} (mu_i + sigma_i eps_i) (training; eval: mean_{i in k} mu_i)
    one decoder          x_d = Dec(recover(q, source)),  x_c = Dec(recover(W c, source))      (Eq. (11) recovery)

and the losses (MergeTokObjective, the one hook of losses.generator_loss; weights in train_stage1.TrainConfig), on
top of G's (LFQ commitment and entropy on the merged latents, source recovery, the Eq. (10) alignment):

    both reconstructions     L_rec + LPIPS + GAN for x_d and for x_c
    KL                       mean_i KL(N(mu_i, sigma_i^2) || N(0, I))                        small weight (w_kl)
    (i)  semantic alignment  L_sem = mean_i (1 - cos(mu_i, sg(m_g(i)))),  m_k = mean_{i in k} mu_i
    (ii) group constraints   s_ib = sigmoid(4 u_ib / tau),  k_ij = prod_b [s_ib s_jb + (1 - s_ib)(1 - s_jb)],
                             L_intra = mean of k_ij over pairs i != j in one group,
                             L_exc   = mean of k_ij over pairs in different groups of one image

Design choices and their reasons:

 1. The encoder is G's, unchanged (so DINOv2 weight selection, the alignment head and the Source Recovery Model
    carry over), and the ablation G vs MergeTok differs only by what this module adds.
 2. Per-token features h_i = z_g(i) + (t_i - tbar_g(i)). Both signals of the abstract are statements about the N
    tokens inside and across merged groups, so every token needs a feature of its own. Recovering the merged tokens
    (recover(z, source)) gives every member of a group the same feature: L_sem would be 0 and every pair inside a
    group would collide, whatever the weights. h_i keeps each token's own deviation from its group at the input of
    the attention blocks, and its group mean is exactly the encoder's merged token (the deviations average to 0):
    group_mean(h) = z. With K = N (no merging) h = z.
 3. Where the tokens sit relative to merging: both branches decode the K merged tokens, recovered to N with the
    source, as G does. (a) The token budget is K in all three (G, discrete, continuous), the "matched token budget"
    of the abstract, so the ablation compares them at one K. (b) The discrete tokens are exactly what stage 2 reads:
    encode(x, K) gives indices (B, K) and the source (B, N), decode(indices, source) is G's decode, and
    train_stage2.py (extract, MergeAR, sampling) runs unchanged on what the decoder was trained with. The per-token
    latents u_i, mu_i are the tokens "before merging": the losses (i), (ii) and the KL act on them. Not taken:
    decoding N per-token codes (4 times G's bits at K = 64 of N = 256, and stage 2's K merged indices would not be
    what the decoder saw).
 4. The merged latent is the group mean of the per-token latents (each original token weighs 1, what ToMe's
    size-weighted average gives the features): the merged code is the sign of the mean of its members' latents,
    so each member's bits vote; the merged Gaussian latent is the mean of the members' samples.
 5. The continuous branch is sampled per token (the reparameterisation mu + sigma eps on every token) before the
    merge: the KL is per token as the posterior is, and a merged token of n members carries noise of variance
    mean(sigma^2) / n. Evaluation decodes the merged means (no noise). log sigma^2 is clamped to [-30, 20].
 6. One decoder for both branches, with separate input projections: the discrete codes enter as in G (identity),
    the continuous latent through its own Linear(C, d) (W above, initialised to the identity when C = d). The
    discrete path stays G's exactly, so decoding indices needs no branch flag; the continuous latents (Gaussian,
    any scale) and the +-1 codes differ in distribution, and W lets the decoder, whose conv_in and adaptive
    GroupNorm both read the latent, tell them apart (a branch embedding would be W's bias alone). Both branches
    are decoded in one decoder call on the concatenated batch (2B): the decoder has no operation across images.
 7. (ii) acts on the per-token discrete latents u_i with LFQ's own per-bit probability (p(c | u) factorises into
    sigmoid(4 u_b c_b / tau), lfq.py), so k_ij is the probability that tokens i and j draw the same code; tau is
    its own setting (TrainConfig.group_tau = 1, not LFQ's 0.01): at 0.01 a latent of |u| = 0.1 already has bits
    within e^-40 of hard ones and k_ij is 0 or 1 with no gradient except at the decision boundary; at tau = 1 a
    committed latent (|u| ~ 1) has s = 0.982, identical codes collide with k ~ 0.53 and codes one bit apart with
    ~0.02, with gradients. code_collision below computes k_ij in log space.
 8. (i)'s target is the stop-gradient group mean of the posterior means (the default); --sem-target dinov2 pulls a
    learned projection of mu_i toward DINOv2 patch features pooled over the same group (a margin cosine loss, as
    VA-VAE's), for runs with DINOv2 weights.

    python mergetok.py       # parameter counts of both presets and a tiny forward with every loss term
"""
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import losses
from lfq import LFQOutput
from merge import group_mean, recover
from tokenizer import MergeTokConfig, MergeVQTokenizer

# ----------------------------------------------------------------------------------------------------------------
# What encode and forward return
# ----------------------------------------------------------------------------------------------------------------


class MergeTokEncoding(NamedTuple):
    """tokenizer.Encoding's fields first (the discrete branch: what stage 2 and evaluate.py read), then the rest."""
    indices: torch.Tensor           # (B, K) int64 LFQ indices of the merged tokens
    source: torch.Tensor            # (B, N) int64 in [0, K): the merged group of original token i
    z_q: torch.Tensor               # (B, K, d) quantized merged tokens in {-1, +1} (straight-through)
    K: int
    cls: torch.Tensor               # (B, D) the encoder's CLS output
    lfq: LFQOutput                  # LFQ's terms on the merged latents
    u: torch.Tensor                 # (B, N, d) per-token discrete latents, before merging ((ii) acts on them)
    mu: torch.Tensor                # (B, N, C) posterior means
    logvar: torch.Tensor            # (B, N, C) posterior log-variances
    latent: torch.Tensor            # (B, K, C) merged continuous latent: group mean of samples (train) / means (eval)


class MergeTokOutput(NamedTuple):
    recon: torch.Tensor             # (B, 3, H, W) the discrete branch's reconstruction (tokenizer.TokenizerOutput's)
    enc: MergeTokEncoding
    recovery_loss: torch.Tensor     # Eq. (9), on the discrete codes
    recon_vae: torch.Tensor         # (B, 3, H, W) the continuous branch's reconstruction
    sem_pred: torch.Tensor          # (B, N, align_dim) projected mu_i for --sem-target dinov2, else None


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------


class MergeTokenizer(MergeVQTokenizer):
    """G's tokenizer (encoder, LFQ, decoder, Source Recovery Model, alignment head) plus a Gaussian posterior per
    token and the continuous branch's input projection. encode / decode keep MergeVQTokenizer's interface."""
    variants = ("mergetok",)

    def __init__(self, cfg: MergeTokConfig):
        super().__init__(cfg)
        if cfg.sem_target not in ("group", "dinov2"):
            raise ValueError(f"sem_target must be 'group' or 'dinov2', got {cfg.sem_target!r}")
        if cfg.patch_size:
            raise ValueError("MergeTok builds on G's CNN encoder: patch_size must be 0")
        C, d = cfg.vae_channels, cfg.z_channels
        self.posterior = nn.Linear(cfg.embed_dim, 2 * C)                 # h_i -> (mu_i, log sigma_i^2)
        self.vae_in = nn.Linear(C, d)                                     # W: the continuous input projection
        nn.init.trunc_normal_(self.posterior.weight, std=0.02)
        nn.init.zeros_(self.posterior.bias)
        with torch.no_grad():                                            # identity where it can be
            self.vae_in.weight.copy_(torch.eye(d, C))
            self.vae_in.bias.zero_()
        self.sem_proj = nn.Linear(C, cfg.align_dim) if cfg.sem_target == "dinov2" else None

    # ---- encode ---------------------------------------------------------------------------------------------

    def token_latents(self, x, K):
        """Images -> per-token latents u (B, N, d), mu and logvar (B, N, C), the CLS feature, the source (B, N)."""
        tokens, z, cls, source = self.encoder.merge_tokens(x, K)      # (B, N, D), (B, K, D), (B, D), (B, N)
        # h_i = z_g(i) + (t_i - tbar_g(i)): each token's own deviation on top of its merged token
        tbar = group_mean(tokens, source, K)                          # (B, K, D)
        h = recover(z, source) + tokens - recover(tbar, source)       # (B, N, D)
        a = self.encoder.head(h)                                      # (B, N, D): GroupNorm - SiLU
        u = self.encoder.proj_out(a)                                  # (B, N, d): G's projection
        mu, logvar = self.posterior(a).float().chunk(2, dim=-1)       # (B, N, C) each
        return u, mu, logvar.clamp(-30.0, 20.0), cls, source

    def encode(self, x, K=None, generator=None):
        """Images (B, 3, H, W) in [-1, 1] -> MergeTokEncoding: the discrete branch's merged indices and source
        (G's Encoding fields, what stage 2 reads), then the per-token latents and the merged continuous latent.
        In training mode the posterior is sampled with `generator` (on mu's device; None: the global RNG)."""
        self._check_image(x)
        K = self.check_K(self.cfg.K if K is None else K)
        u, mu, logvar, cls, source = self.token_latents(x, K)
        q = self.quantizer(group_mean(u.float(), source, K))          # LFQ of the merged latents (B, K, d), fp32
        if self.training:                                              # (B, N, C)
            sample = mu + (0.5 * logvar).exp() * torch.randn(mu.shape, generator=generator, device=mu.device,
                                                             dtype=mu.dtype)
        else:
            sample = mu
        latent = group_mean(sample, source, K)                         # (B, K, C)
        return MergeTokEncoding(q.indices, source, q.z_q, K, cls, q, u, mu, logvar, latent)

    # ---- decode (decode(indices, source) and decode_codes are MergeVQTokenizer's: the discrete branch) -------

    def decode_latent(self, latent, source):
        """The continuous branch: merged latents (B, K, C) + the source (B, N) -> images (B, 3, H, W)."""
        if source is None:
            raise ValueError("decode_latent needs the source: the Source Recovery Model reads discrete codes only")
        z = self.vae_in(latent.to(self.vae_in.weight.dtype))          # (B, K, d)
        return self.decode_codes(z, source)

    def grid_latent(self, enc):
        """The continuous latent a diffusion generator models (train_stage2.py extract): the merged latents
        recovered to the N grid with the encoder's source (Eq. (11)), (B, C, g, g). Decoding it is decode_latent's
        path: W acts on each token alone, so W then recovery (decode_latent) equals recovery then W (below)."""
        z = recover(enc.latent.float(), enc.source)                    # (B, N, C)
        return z.transpose(1, 2).reshape(len(z), -1, self.cfg.grid, self.cfg.grid)   # (B, C, g, g)

    def decode_grid_latent(self, x):
        """A latent on the N grid (B, C, g, g), generated or from grid_latent -> images (B, 3, H, W): W, then the
        decoder with every position in place (the identity source)."""
        B, N = x.shape[0], self.cfg.num_tokens
        z = self.vae_in(x.flatten(2).transpose(1, 2).to(self.vae_in.weight.dtype))   # (B, N, d)
        return self.decode_codes(z, torch.arange(N, device=x.device).expand(B, N))

    def forward(self, x, K=None, generator=None):
        """The stage-1 forward: both branches decoded with the true source in one decoder call, the recovery loss
        (Eq. 9) on the discrete codes, and (sem_target dinov2) the projection of mu that (i) aligns. generator: the
        posterior noise's (train_stage1 keeps one per rank in its checkpoint)."""
        enc = self.encode(x, K, generator)
        B, g = x.shape[0], self.cfg.grid
        z = torch.cat([enc.z_q.to(self.vae_in.weight.dtype), self.vae_in(enc.latent.to(self.vae_in.weight.dtype))])
        z_full = recover(z, torch.cat([enc.source, enc.source]))       # Eq. (11): (2B, N, d)
        z_full = z_full.transpose(1, 2).reshape(2 * B, -1, g, g)       # (2B, d, g, g)
        recon, recon_vae = self.decoder(z_full).chunk(2)               # (B, 3, H, W) each
        recovery_loss = self.recovery.loss(enc.z_q, enc.source)
        sem_pred = self.sem_proj(enc.mu.to(self.sem_proj.weight.dtype)) if self.sem_proj is not None else None
        return MergeTokOutput(recon, enc, recovery_loss, recon_vae, sem_pred)


# ----------------------------------------------------------------------------------------------------------------
# MergeTok's losses: the KL, (i) semantic alignment and (ii) the group constraints from k_ij
# ----------------------------------------------------------------------------------------------------------------


def gaussian_kl(mu, logvar):
    """KL(N(mu, diag(sigma^2)) || N(0, I)) per token, summed over its C channels and averaged over the tokens:
    0.5 sum_c (mu_c^2 + sigma_c^2 - 1 - log sigma_c^2). mu, logvar (B, N, C) -> scalar, float32."""
    mu, logvar = mu.float(), logvar.float()
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=-1).mean()


def semantic_alignment(mu, source, K):
    """(i) Merged-token semantic alignment: every token's posterior mean is pulled toward the stop-gradient mean of
    its merged group,

        L_sem = mean_i (1 - cos(mu_i, sg(m_g(i)))),   m_k = mean_{j: g(j) = k} mu_j.

    mu (B, N, C), source (B, N) in [0, K) -> scalar. A token alone in its group is its own mean (cos = 1, adds 0);
    K = N gives 0. float32, autocast off."""
    with torch.autocast(device_type=mu.device.type, enabled=False):
        mu = mu.float()
        target = recover(group_mean(mu.detach(), source, K), source)               # m_g(i), (B, N, C)
        return (1.0 - F.cosine_similarity(mu, target, dim=-1, eps=1e-8)).mean()


def semantic_alignment_dinov2(pred, teacher, source, K, margin=0.5):
    """(i), the DINOv2 reading (--sem-target dinov2): a learned projection of every token's posterior mean,
    pred_i = P mu_i, is pulled toward the DINOv2 patch features pooled over its merged group, with a margin:

        L = mean_i relu(1 - margin - cos(pred_i, sg(f_g(i)))),   f_k = mean_{j: g(j) = k} DINOv2_j

    (VA-VAE's margin cosine loss: pairs already closer than 1 - margin stop pulling). pred, teacher (B, N, D'),
    teacher resampled to the tokenizer's grid (DINOv2.patch_grid) -> scalar, float32."""
    if pred is None:
        raise ValueError("semantic_alignment_dinov2: the model has no projection (build it with sem_target='dinov2')")
    with torch.autocast(device_type=pred.device.type, enabled=False):
        target = recover(group_mean(teacher.detach().float(), source, K), source)  # f_g(i), (B, N, D')
        cos = F.cosine_similarity(pred.float(), target, dim=-1, eps=1e-8)           # (B, N)
        return F.relu(1.0 - margin - cos).mean()


def _log_collision(bits_i, bits_j):
    """log k_ij for rows i against columns j: bits (log s, log (1 - s)), each (B, I, d) and (B, J, d) -> (B, I, J)."""
    both_pos = bits_i[0][:, :, None, :] + bits_j[0][:, None, :, :]                # (B, I, J, d)
    both_neg = bits_i[1][:, :, None, :] + bits_j[1][:, None, :, :]                # (B, I, J, d)
    return torch.logaddexp(both_pos, both_neg).sum(dim=-1)                         # (B, I, J)


def _soft_bits(u, tau):
    """log s and log (1 - s) of the soft bits s = sigmoid(4 u / tau): (B, N, d) each, float32."""
    a = 4.0 * u.float() / tau                                                       # bit logits (B, N, d)
    return F.logsigmoid(a), F.logsigmoid(-a)


def code_collision(u, tau):
    """The probability that two tokens draw the same code, for every pair of tokens of an image: (B, N, d) -> (B, N, N).

    LFQ's code distribution factorises over bits (lfq.py): p(c | u_i) = prod_b p_ib(c_b) with
    p_ib(+1) = s_ib = sigmoid(4 u_ib / tau), p_ib(-1) = 1 - s_ib. Two tokens draw their codes independently, so

        k_ij = P(c_i = c_j) = sum_c p(c | u_i) p(c | u_j) = prod_b sum_{c_b in +-1} p_ib(c_b) p_jb(c_b)
             = prod_b [s_ib s_jb + (1 - s_ib)(1 - s_jb)]

    (the sum over 2^d codes of a product of per-bit factors is the product of per-bit sums): O(N^2 d), no code is
    ever enumerated. In log space, with log s = logsigmoid(a) and log(1 - s) = logsigmoid(-a), a = 4 u / tau,

        log k_ij = sum_b logaddexp(log s_ib + log s_jb, log(1 - s_ib) + log(1 - s_jb)),

    nothing underflows as tau -> 0 and no 1 - s loses its digits (hard bits: log k = 0 for equal codes, about
    -min(|a_ib|, |a_jb|) per differing bit). float32, autocast off. Memory: two (B, N, N, d) tables - the losses
    (group_constraints) never build them whole, they take k_ij a block of rows at a time.
    """
    with torch.autocast(device_type=u.device.type, enabled=False):
        bits = _soft_bits(u, tau)
        return _log_collision(bits, bits).exp()                                     # (B, N, N)


# The collision tables of one block of rows, (B, rows, N, d), hold at most this many elements (64 MB in float32).
# At the paper's sizes (32 images per GPU, N = 1024, d = 18) the whole table would be 2.4 GB, and forward and
# backward keep several of them (about 7 GB and 10-15 GB); in blocks of 28 rows each block's tables are recomputed
# in the backward pass (activation checkpointing), so the loss needs about COLLISION_TABLES blocks at any time.
COLLISION_CHUNK_ELEMENTS = 2 ** 24
COLLISION_TABLES = 6                 # tables of one block alive at once (2 sums and the logaddexp, their gradients)


def collision_rows(B, N, d, chunk_elements=COLLISION_CHUNK_ELEMENTS):
    """Rows i of k_ij taken at once: the (B, rows, N, d) tables stay within chunk_elements (at least one row)."""
    return max(1, min(N, chunk_elements // max(1, B * N * d)))


def collision_memory(B, N, d, chunk_elements=COLLISION_CHUNK_ELEMENTS):
    """Bytes group_constraints needs at most (B images of N tokens, d bits): COLLISION_TABLES float32 tables of
    one block of rows. For the memory estimate of train_stage1.py."""
    return COLLISION_TABLES * 4 * B * collision_rows(B, N, d, chunk_elements) * N * d


def _block_pair_sums(log_s, log_not_s, source, start, rows):
    """Sums of k_ij over rows i = start .. start + rows - 1 against all N columns: (sum over pairs i != j in one
    group, sum over pairs in different groups), float32 0-dim tensors. log_s, log_not_s (B, N, d), source (B, N)."""
    stop = min(start + rows, log_s.shape[1])
    k = _log_collision((log_s[:, start:stop], log_not_s[:, start:stop]), (log_s, log_not_s)).exp()   # (B, I, N)
    same = source[:, start:stop, None] == source[:, None, :]                        # (B, I, N) one group
    i = torch.arange(start, stop, device=source.device)
    other = i[:, None] != torch.arange(source.shape[1], device=source.device)[None, :]   # (I, N) i != j
    return (k * (same & other)).sum(), (k * ~same).sum()


def group_constraints(u, source, tau, chunk_elements=COLLISION_CHUNK_ELEMENTS):
    """(ii) Group-wise constraints on the discrete branch, from k_ij (code_collision) and the merge groups g(i):

        L_intra = mean of k_ij over ordered pairs i != j with g(i) = g(j)     intra-group diversity: members of a
                  group may share most bits, not all
        L_exc   = mean of k_ij over ordered pairs with g(i) != g(j)           inter-group exclusivity: different
                  groups should not draw the same code

    Pairs are taken inside each image and pooled over the batch (this process's share under torchrun). A batch
    without such pairs (every group a single token, or a single group) gives 0 for that term.
    u (B, N, d) per-token latents, source (B, N) -> (L_intra, L_exc), float32 scalars.

    Memory: k_ij is summed a block of rows at a time (collision_rows: the block's (B, rows, N, d) tables within
    chunk_elements); with more than one block and gradients on, each block is recomputed in the backward pass
    (torch.utils.checkpoint) instead of kept, so no (B, N, N, d) table is ever whole.
    """
    if source.shape != u.shape[:2]:
        raise ValueError(f"group_constraints: source {tuple(source.shape)} does not fit latents {tuple(u.shape)}")
    B, N, d = u.shape
    with torch.autocast(device_type=u.device.type, enabled=False):
        bits = _soft_bits(u, tau)                                                   # 2 x (B, N, d)
        rows = collision_rows(B, N, d, chunk_elements)
        recompute = rows < N and torch.is_grad_enabled() and u.requires_grad
        sums = []
        for start in range(0, N, rows):
            args = (bits[0], bits[1], source, start, rows)
            sums.append(checkpoint(_block_pair_sums, *args, use_reentrant=False) if recompute
                        else _block_pair_sums(*args))
        intra_sum, inter_sum = (torch.stack(t).sum() for t in zip(*sums))
    sizes = torch.zeros(B, N, dtype=torch.long, device=u.device).scatter_add_(1, source, torch.ones_like(source))
    same_pairs = sizes.pow(2).sum()                                     # ordered pairs in one group, i = j too
    intra_pairs, inter_pairs = same_pairs - B * N, B * N * N - same_pairs
    return intra_sum / intra_pairs.clamp_min(1), inter_sum / inter_pairs.clamp_min(1)


# ----------------------------------------------------------------------------------------------------------------
# MergeTok's part of the stage-1 step (train_stage1.py)
# ----------------------------------------------------------------------------------------------------------------


class MergeTokObjective:
    """What MergeTok adds to MergeVQ's stage-1 objective (losses.generator_loss), in one object: train_stage1.setup
    builds it for --variant mergetok (None for G, G+R and R) and the step hands it to generator_loss as `extra`,
    which calls it once, after MergeVQ's own terms. With x_c = out.recon_vae, the continuous reconstruction:

        nll   = w_recon L_rec(x_c) + w_perceptual LPIPS(x_c)        joins MergeVQ's "nll" (the adaptive GAN weight's)
        total = nll + w_kl KL + w_sem L_sem + w_intra L_intra + w_exc L_exc                       joins the total
        x_c   the discriminator judges it beside x_d = out.recon (generator_loss's L_G; fakes(out) for its own step)

    Every term is returned by name, unweighted (recon_vae, perceptual_vae with LPIPS, kl, sem, intra, exc). A term
    whose weight is 0 is still computed, without a graph, so a run with it switched off logs what it would be.
    cfg: train_stage1.TrainConfig (w_recon, w_perceptual, recon_loss, w_kl, w_sem, w_intra, w_exc, group_tau,
    sem_margin, align_size); tok_cfg: the MergeTokConfig; teacher: the frozen DINOv2 whose patch features (i)
    aligns to with sem_target 'dinov2' (unused with 'group')."""

    def __init__(self, cfg, tok_cfg, teacher=None):
        self.cfg, self.tok_cfg, self.teacher = cfg, tok_cfg, teacher

    def fakes(self, out):
        """The reconstruction the discriminator judges beside out.recon: the continuous branch's, (B, 3, H, W)."""
        return out.recon_vae

    def sem_teacher(self, x):
        """(i)'s target for sem_target 'dinov2': the teacher's patch features of the whole image on the token grid
        (B, N, 768), float32 and without a graph (autocast off); None for 'group'."""
        if self.tok_cfg.sem_target != "dinov2":
            return None
        if self.teacher is None:
            raise ValueError("sem_target 'dinov2' needs the DINOv2 teacher: pass --dinov2-weights PATH (or download)")
        with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
            view = losses.dinov2_preprocess(x, size=self.cfg.align_size)
            return self.teacher.patch_grid(view, self.tok_cfg.grid).float()               # (B, N, 768)

    def __call__(self, x, out, lpips=None):
        """x: images; out: the MergeTokOutput of the step; lpips: the perceptual metric or None (term dropped).
        Returns (terms, nll, total, x_c) as above, x_c in float32."""
        cfg, enc, recon_vae = self.cfg, out.enc, out.recon_vae.float()
        terms = {"recon_vae": F.mse_loss(recon_vae, x) if cfg.recon_loss == "l2" else F.l1_loss(recon_vae, x)}
        if lpips is not None:
            terms["perceptual_vae"] = lpips(recon_vae, x).mean()
        sem_teacher = self.sem_teacher(x)
        terms["kl"] = gaussian_kl(enc.mu, enc.logvar)
        grad = torch.is_grad_enabled()
        with torch.set_grad_enabled(grad and cfg.w_sem > 0):                                          # (i)
            if sem_teacher is None:
                terms["sem"] = semantic_alignment(enc.mu, enc.source, enc.K)
            else:
                terms["sem"] = semantic_alignment_dinov2(out.sem_pred, sem_teacher, enc.source, enc.K,
                                                         cfg.sem_margin)
        with torch.set_grad_enabled(grad and (cfg.w_intra > 0 or cfg.w_exc > 0)):                     # (ii)
            terms["intra"], terms["exc"] = group_constraints(enc.u, enc.source, cfg.group_tau)
        nll = cfg.w_recon * terms["recon_vae"] + cfg.w_perceptual * terms.get("perceptual_vae", 0.0)
        total = (nll + cfg.w_kl * terms["kl"] + cfg.w_sem * terms["sem"] + cfg.w_intra * terms["intra"]
                 + cfg.w_exc * terms["exc"])
        return terms, nll, total, recon_vae


if __name__ == "__main__":
    from tokenizer import build_tokenizer, count_parameters
    with torch.device("meta"):
        paper = build_tokenizer("mergetok")
    print(f"paper mergetok: encoder {count_parameters(paper.encoder) / 1e6:.2f}M, decoder "
          f"{count_parameters(paper.decoder) / 1e6:.2f}M, continuous head + input projection "
          f"{(count_parameters(paper.posterior) + count_parameters(paper.vae_in)) / 1e3:.1f}K")
    torch.manual_seed(0)
    tok = build_tokenizer("mergetok", "tiny")
    S = tok.cfg.image_size
    x = torch.rand(2, 3, S, S) * 2 - 1
    out = tok(x)
    print("tiny: indices", tuple(out.enc.indices.shape), "source", tuple(out.enc.source.shape), "u",
          tuple(out.enc.u.shape), "mu", tuple(out.enc.mu.shape), "latent", tuple(out.enc.latent.shape),
          "recon", tuple(out.recon.shape), "recon_vae", tuple(out.recon_vae.shape))
