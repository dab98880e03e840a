"""LSLR: per-parameter, per-step inner learning rates."""
import pytest
import torch
import torch.nn as nn
from torch.func import functional_call, grad, vmap

from inner_loop_optimizers import LSLRGradientDescentLearningRule, _key


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()


def distinct_rates(rule):
    """Give every (parameter, step) its own rate, so a mix-up shows."""
    with torch.no_grad():
        for i, rates in enumerate(rule.rates[_key(name)] for name in rule.names):
            rates.copy_(0.01 * (i + 1) + 0.1 * torch.arange(len(rates), dtype=torch.float64))


def test_one_rate_per_parameter_and_step():
    params = dict(small_net().named_parameters())
    rule = LSLRGradientDescentLearningRule(params, num_inner_steps=3, init_learning_rate=1e-3,
                                           use_learnable_learning_rates=True)
    assert rule.names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert rule.rates_tensor().shape == (4, 3)
    assert torch.equal(rule.rates_tensor(), torch.full((4, 3), 1e-3))
    assert all(rate.requires_grad for rate in rule.parameters())
    assert len(list(rule.parameters())) == 4
    by_names = LSLRGradientDescentLearningRule(iter(params), 3, 1e-3, True)  # names alone work too
    assert list(by_names.state_dict()) == list(rule.state_dict())


@pytest.mark.parametrize("step", [0, 2])
def test_update_moves_each_parameter_by_rate_times_grad(step):
    params = {n: p.detach().clone() for n, p in small_net().named_parameters()}
    originals = {n: p.clone() for n, p in params.items()}
    grads = {n: torch.randn_like(p) for n, p in params.items()}
    rule = LSLRGradientDescentLearningRule(params, 3, 1e-3, True).double()
    distinct_rates(rule)
    updated = rule.update_params(params, grads, step)
    assert updated is not params
    for i, name in enumerate(params):
        rate = 0.01 * (i + 1) + 0.1 * step
        torch.testing.assert_close(updated[name], originals[name] - rate * grads[name], rtol=0, atol=1e-15)
        assert torch.equal(params[name], originals[name])  # nothing changed in place


def test_learnable_rates_receive_their_gradient():
    params = {n: p.detach().clone() for n, p in small_net().named_parameters()}
    grads = {n: torch.randn_like(p) for n, p in params.items()}
    rule = LSLRGradientDescentLearningRule(params, 3, 1e-3, True).double()
    updated = rule.update_params(params, grads, step=1)
    weights = {n: torch.randn_like(p) for n, p in params.items()}
    sum(((updated[n] * weights[n]).sum() for n in params)).backward()
    for name, rates in ((name, rule.rates[_key(name)]) for name in rule.names):
        # d/d rate of sum(w * (p - rate * g)) = -sum(w * g), at step 1 only
        expected = torch.tensor([0.0, -(weights[name] * grads[name]).sum().item(), 0.0], dtype=torch.float64)
        torch.testing.assert_close(rates.grad, expected)


def test_fixed_rates_receive_no_gradient():
    net = small_net()
    params = {n: p.detach().clone().requires_grad_() for n, p in net.named_parameters()}
    grads = {n: torch.randn_like(p) for n, p in params.items()}
    rule = LSLRGradientDescentLearningRule(params, 3, 1e-3, use_learnable_learning_rates=False).double()
    assert not any(rate.requires_grad for rate in rule.parameters())
    updated = rule.update_params(params, grads, step=0)
    sum(p.sum() for p in updated.values()).backward()
    assert all(rate.grad is None for rate in rule.parameters())
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in params.values())


def test_state_dict_round_trip():
    params = dict(small_net().named_parameters())
    rule = LSLRGradientDescentLearningRule(params, 3, 1e-3, True)
    distinct_rates(rule)
    restored = LSLRGradientDescentLearningRule(params, 3, 5.0, True)
    restored.load_state_dict(rule.state_dict())
    assert torch.equal(restored.rates_tensor(), rule.rates_tensor())
    assert all(key.count(".") == 1 for key in rule.state_dict())  # "rates.<name with '-'>"


def test_inner_loop_under_vmap_matches_loop_and_trains_the_rates():
    net = small_net()
    params = {n: p.detach().clone().requires_grad_() for n, p in net.named_parameters()}
    rule = LSLRGradientDescentLearningRule(params, 2, 0.3, True).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 3, dtype=torch.float64, generator=g)
    y = torch.randn(3, 5, 1, dtype=torch.float64, generator=g)

    def loss(p, x, y):
        return ((functional_call(net, p, (x,)) - y) ** 2).mean()

    def adapted_loss(p, x, y):
        for step in range(2):
            p = rule.update_params(p, grad(loss)(p, x, y), step)
        return loss(p, x, y)

    vmapped = vmap(adapted_loss, in_dims=(None, 0, 0))(params, x, y)
    looped = torch.stack([adapted_loss(params, x[i], y[i]) for i in range(3)])
    torch.testing.assert_close(vmapped, looped, rtol=1e-10, atol=1e-12)
    inputs = [*params.values(), *rule.parameters()]
    vmapped_grads = torch.autograd.grad(vmapped.sum(), inputs)
    looped_grads = torch.autograd.grad(looped.sum(), inputs)
    for a, b in zip(vmapped_grads, looped_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    rate_grads = torch.stack(looped_grads[len(params):])  # [num_params, num_steps]
    assert (rate_grads.abs() > 1e-6).all()
