"""Shared test settings: small thread count so the suite behaves the same on 2-core CI machines."""
import os
import sys

import torch

# the top-level modules (merge.py, lfq.py, ...) are imported from the repository root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(2)
