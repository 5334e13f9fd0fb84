"""A minimal, plain-torch training loop for SHiRA adapters (the demo and examples use
it; transformers.Trainer or accelerate work on a ShiraModel just as well)."""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from tqdm.auto import tqdm

from shira_export.tuner.model import ShiraModel


def train_adapter(
    model: ShiraModel,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    steps: int = 100,
    lr: float = 1e-2,
    progress: bool = True,
    desc: str = "train",
) -> list[float]:
    """AdamW on the active adapter's trainable parameters; returns the loss per step."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: is the active adapter in inference mode?")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    batches = list(batches)
    model.train()
    losses: list[float] = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        batch = batches[step % len(batches)]
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses
