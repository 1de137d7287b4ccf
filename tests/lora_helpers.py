"""Shared by the format tests: a LoRA that is not the identity, so every comparison tests something."""

import torch


def randomize_lora(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Fill every LoRA tensor with seeded noise (PEFT starts lora_B at zero, which would make outputs equal the base)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model.eval()
