"""Tiny models run fastest on one thread (thread start-up costs more than the math)."""

import torch

torch.set_num_threads(1)
