"""Learning rates as a function of the step: the numbers of torch's schedulers, to the bit."""
import math

import pytest
import torch

from meta_learning.learning_rates import MIN_LSTM_LR, cosine_schedule, encoder_rate_of_basic, meta_learning_rates
from options import parse_args


@pytest.mark.parametrize("length", [1, 7, 3000])
def test_the_cosine_schedule_is_torchs_to_the_bit(length):
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=length, eta_min=1e-4)
    torchs = [optimizer.param_groups[0]["lr"]]
    for _ in range(length):
        optimizer.step()
        scheduler.step()
        torchs.append(optimizer.param_groups[0]["lr"])
    assert cosine_schedule(1e-3, 1e-4, length) == tuple(torchs)
    assert cosine_schedule(1e-3, 1e-4, length)[-1] == pytest.approx(1e-4)


def test_each_optimiser_gets_its_rate_of_the_iteration():
    args = parse_args(["--num_train_iterations=10", "--outer_lr=0.5", "--min_outer_lr=0.1", "--lstm_lr=0.2",
                       "--learn_lr=0.3", "--task_info_lr=0.4", "--loss_lr=0.6"])
    first, middle = meta_learning_rates(args, 1), meta_learning_rates(args, 6)
    assert first == {"meta": 0.5, "encoder": 0.2, "inner_lr": 0.3, "task_info": 0.4, "loss_network": 0.6}
    assert middle["meta"] == pytest.approx(0.1 + 0.4 * (1 + math.cos(math.pi * 5 / 10)) / 2)
    assert middle["encoder"] == pytest.approx(MIN_LSTM_LR + (0.2 - MIN_LSTM_LR) / 2)
    assert middle["inner_lr"] == 0.3
    basic = parse_args(["--pretrain_epochs=4", "--lstm_lr=0.2"])
    assert [encoder_rate_of_basic(basic, epoch) for epoch in (1, 5)] == [0.2, pytest.approx(MIN_LSTM_LR)]
