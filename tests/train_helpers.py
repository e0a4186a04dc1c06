"""Shared by the tests that check a model learns: a few full-batch optimizer steps on fixed ids."""

import torch


def train_briefly(model: torch.nn.Module, ids: torch.Tensor, steps: int = 30, lr: float = 3e-3) -> list[float]:
    """AdamW on next-token loss (plus the auxiliary loss) over the same batch; returns each step's loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        output = model(ids[:, :-1], targets=ids[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        (output.loss + output.aux_loss).backward()
        optimizer.step()
        model.update_router_biases()
        losses.append(output.loss.item())
    return losses
