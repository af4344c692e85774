"""What the tests that compare against torch share: torch modules made non-trivial."""

import torch


def randomize_bn(module, seed: int = 0):
    """Non-trivial BatchNorm: random scale, shift and running statistics (eval mode uses them), and
    a batch count that a converter must drop. Returns the module in eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) + 0.5
            m.bias.data = torch.randn(n, generator=g) * 0.1
            m.running_mean = torch.randn(n, generator=g) * 0.5
            m.running_var = torch.rand(n, generator=g) * 2 + 0.25
            m.num_batches_tracked.fill_(1234)
    return module.eval()
