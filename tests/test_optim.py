"""Every method's optimizers are the fused Adam of ``methods.base.adam``, whose steps are the
default Adam's."""

import pytest
import torch
from test_ddp import CASES, OTHERS

from lightning_protos.methods.base import adam


def optimizers(configured) -> list[torch.optim.Optimizer]:
    """The optimizers in what ``configure_optimizers`` returned: one, a list, or (list, schedulers)."""
    if isinstance(configured, torch.optim.Optimizer):
        return [configured]
    return list(configured[0] if isinstance(configured, tuple) else configured)


@pytest.mark.parametrize("name", [*CASES, *OTHERS])
def test_every_method_steps_with_fused_adam(name):
    make, _, _ = {**CASES, **OTHERS}[name]
    opts = optimizers(make().configure_optimizers())
    assert opts
    for opt in opts:
        assert isinstance(opt, torch.optim.Adam)
        assert opt.defaults["fused"] is True


def test_fused_adam_takes_the_default_adams_steps():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(20, 7), torch.nn.Linear(20, 7)
    b.load_state_dict(a.state_dict())
    start = a.weight.detach().clone()
    opt_a, opt_b = adam(a.parameters(), 1e-2, eps=1e-6), torch.optim.Adam(b.parameters(), lr=1e-2, eps=1e-6)
    for _ in range(5):
        x = torch.randn(16, 20)
        for net, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            net(x).pow(2).sum().backward()
            opt.step()
    assert (a.weight - start).abs().max() > 1e-2  # five steps of lr 1e-2 moved it
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
