"""The codes table of stage 2: what `train_stage2.py extract` writes and every other subcommand reads.

One file per split, a dict: for each kept count K the merged indices (rows, K) and the source (rows, N) of every image
(and its mirror image with --flip), the labels, the stage-1 tokenizer it came from and hashes of both, so that a run
refuses codes of another tokenizer (check_codes_fit) and a resume refuses other codes (codes_identity). The raster
models read the N recovered codes of a row, recovered[j] = indices[source[j]] (Eq. (11) on indices: gather_codes);
RandAR on merged tokens reads the K indices and their anchors, the cells they sit at (merged_codes). A MergeTok
tokenizer's file also holds its continuous latents on the N grid and their per-channel statistics, which the DiT reads
normalised (scaled_latents).

    from codes_table import read_codes, gather_codes        # used by train_stage2.py
"""
import os

import torch

import common
from merge import anchors

CODES_ENTRIES = ("indices", "source", "Ks", "K_probs", "labels", "flips", "image_index", "num_classes",
                 "tokenizer", "tokenizer_config")


def read_codes(path):
    """The file `extract` wrote, checked (one-line errors). Memory-mapped: every rank reads the rows it draws from
    the file (through the page cache the ranks of a machine share), and none holds the whole table."""
    table = common.read_checkpoint(path, "codes file", required=CODES_ENTRIES, mmap=True)
    Ks = table["Ks"].tolist()
    if set(table["indices"]) != set(Ks) or set(table["source"]) != set(Ks):
        raise ValueError(f"codes file {path}: its indices / source entries do not match its counts K {Ks}")
    return table


def tokenizer_hash(tok):
    """The identity of a tokenizer's codes: a hash of its weights without the Source Recovery Model's
    (finetune-recovery changes those alone, and the codes still fit)."""
    return common.content_hash([v for k, v in sorted(tok.state_dict().items()) if not k.startswith("recovery.")])


def codes_hash(table):
    """A hash of a codes table's content: its counts K, labels, and indices and source at every K."""
    Ks = table["Ks"].tolist()
    return common.content_hash([table["Ks"], table["labels"], *(table["indices"][K] for K in Ks),
                                *(table["source"][K] for K in Ks)])


def codes_identity(table, path):
    """What a stage-2 checkpoint records of the codes it trains on, and a resume compares (not the path: a moved
    file is the same codes)."""
    return {"path": os.path.abspath(path), "tokenizer": table["tokenizer"],
            "tokenizer_hash": table.get("tokenizer_hash"), "split": table.get("split", "train"),
            "rows": len(table["labels"]), "hash": table.get("codes_hash") or codes_hash(table)}


def check_tokenizer_identity(tok, tok_path, expected_hash, expected_path, what):
    """One line when the tokenizer at tok_path is not the one whose codes `what` holds (its hash differs; files of
    earlier versions carry no hash and pass)."""
    if expected_hash is not None and tokenizer_hash(tok) != expected_hash:
        same = os.path.abspath(tok_path) == os.path.abspath(expected_path)
        raise ValueError(f"tokenizer {tok_path} is not the one {what} came from: "
                         + ("its weights have changed since (a resumed or overwritten stage-1 run?)" if same else
                            f"that was {expected_path}, and the weights differ")
                         + "; decode with the tokenizer the codes were extracted with (or a finetune-recovery "
                           "output of it)")


def check_codes_fit(table, name, path, tok, tok_path):
    """One line when a codes file was not written by this tokenizer: another N or d, or (hashes recorded) other
    weights."""
    N, d = table["source"][int(table["Ks"][0])].shape[1], table["tokenizer_config"]["z_channels"]
    if (N, d) != (tok.cfg.num_tokens, tok.cfg.z_channels):
        raise ValueError(f"{name} {path} holds codes of N={N} tokens of {d} bits, the tokenizer {tok_path} writes "
                         f"N={tok.cfg.num_tokens} of {tok.cfg.z_channels}: codes of another tokenizer")
    check_tokenizer_identity(tok, tok_path, table.get("tokenizer_hash"), table["tokenizer"], f"{name} {path}")


def gather_codes(table, rows, K):
    """Rows (B,) at kept counts K (B,) -> the N recovered codes (B, N) and the source (B, N), int64:
    recovered[j] = indices[source[j]] (Eq. (11) on indices: each original position takes its merged token's code)."""
    B, N = len(rows), table["source"][int(K[0])].shape[1]
    codes, source = torch.empty(B, N, dtype=torch.long), torch.empty(B, N, dtype=torch.long)
    for k in K.unique().tolist():
        m = K == k
        s = table["source"][k][rows[m]].long()                              # (b, N) merged token of each position
        codes[m] = table["indices"][k][rows[m]].long().gather(1, s)          # (b, K) -> (b, N)
        source[m] = s
    return codes, source


def merged_codes(table, rows, K):
    """RandAR's tokens: rows (B,) at one kept count K -> the K merged indices (B, K) in ToMe's output order and
    their anchors (B, K), the cell of the N grid each one is generated at (merge.anchors), int64."""
    return table["indices"][K][rows].long(), anchors(table["source"][K][rows], K)


def check_latents(table, path, K):
    """One line when a codes file holds no continuous latents at K (only `extract` of a MergeTok tokenizer writes
    them)."""
    if "latents" not in table:
        raise ValueError(f"codes file {path} holds no continuous latents: extract them from a mergetok tokenizer "
                         f"(its VAE branch; `train_stage2.py extract` writes them for one)")
    if K not in table["latents"]:
        raise ValueError(f"codes file {path} holds latents at K {sorted(table['latents'])}, not at K={K}")


def latent_statistics(latents):
    """Per-channel mean and standard deviation (C,) of latents (M, C, g, g) over rows and grid positions, float64
    sums: what scales them to zero mean and unit variance for the DiT."""
    x = latents.double().transpose(0, 1).reshape(latents.shape[1], -1)     # (C, M*g*g)
    return x.mean(dim=1).float(), x.std(dim=1).float()


def scaled_latents(table, rows, K, mean, std):
    """Rows (B,) at one K -> their latents (B, C, g, g) normalised per channel: (x - mean) / std, mean and std (C,)
    the statistics of the training latents (a held-out file is scaled by the training file's)."""
    x = table["latents"][K][rows].float()                                    # (B, C, g, g)
    return (x - mean[:, None, None]) / std[:, None, None]
