"""Tiny models run fastest on one thread (thread start-up costs more than the math)."""

import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parent))
