"""Models for tests: shared by test_model.py and test_interop.py."""
import torch

from tinyllama.model import LLM


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    "Weights (norm gains included) far from init, so that every part changes the logits visibly; in eval mode."
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return model.eval()


def randomized(config, seed=0):
    "An LLM of `config` with randomized weights (see `randomize_`)."
    torch.manual_seed(seed)
    return randomize_(LLM(config), seed)
