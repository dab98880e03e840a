"""MAML++ inner-loop optimizer: learning per-layer per-step learning rates (LSLR)."""
import torch
import torch.nn as nn


def _key(name):
    return name.replace(".", "-")  # ParameterDict keys cannot contain "."; parameter names never contain "-"


class LSLRGradientDescentLearningRule(nn.Module):
    """Gradient descent with one learning rate per parameter tensor and inner step.

    ``param_names``: the names of the adapted parameters (an iterable of names, or a dict
    whose keys are the names). The rates start at ``init_learning_rate`` and are learned in
    the outer loop when ``use_learnable_learning_rates``; they are saved by ``state_dict()``.
    """

    def __init__(self, param_names, num_inner_steps, init_learning_rate, use_learnable_learning_rates):
        super().__init__()
        self.names = list(param_names)
        self.rates = nn.ParameterDict({
            _key(name): nn.Parameter(torch.full((num_inner_steps,), float(init_learning_rate)),
                                     requires_grad=use_learnable_learning_rates)
            for name in self.names})

    def update_params(self, params, grads, step):
        """New dict {name: param - rate[name, step] * grad}; nothing is changed in place."""
        return {name: param - self.rates[_key(name)][step] * grads[name] for name, param in params.items()}

    def rates_tensor(self):  # [num_params, num_inner_steps], rows in the order of ``names``
        return torch.stack([self.rates[_key(name)] for name in self.names])
