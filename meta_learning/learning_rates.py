"""Every optimiser's learning rate as a function of the step, so that a resumed run needs
nothing but its step (and takes new rates from the command line as if it had had them
from the start)."""
import functools
import math

MIN_LSTM_LR = 1e-2  # the end of the LSTM encoder's cosine learning-rate schedule


@functools.cache
def cosine_schedule(start, end, length):
    """The rates of steps 0..length of a cosine from ``start`` to ``end`` over ``length``
    steps, each computed from the one before as torch's CosineAnnealingLR computes it, so
    that they are its numbers to the last bit."""
    rates = [start]
    for step in range(1, length + 1):
        rates.append((1 + math.cos(math.pi * step / length)) / (1 + math.cos(math.pi * (step - 1) / length))
                     * (rates[-1] - end) + end)
    return tuple(rates)


def meta_learning_rates(args, iteration):
    """The rate of each of main.py's optimisers for outer iteration ``iteration`` (1, 2, …):
    θ and the LSTM encoder follow cosines over --num_train_iterations (to --min_outer_lr and
    to 1e-2), the inner rates α, the MLP encoder and the loss network keep theirs."""
    length = args.num_train_iterations
    return {"meta": cosine_schedule(args.outer_lr, args.min_outer_lr, length)[iteration - 1],
            "encoder": cosine_schedule(args.lstm_lr, MIN_LSTM_LR, length)[iteration - 1],
            "inner_lr": args.learn_lr, "task_info": args.task_info_lr, "loss_network": args.loss_lr}


def encoder_rate_of_basic(args, epoch):
    """The rate of Basic's LSTM encoder (--use_learned_loss_baseline) in epoch ``epoch`` (1, 2, …):
    a cosine over --pretrain_epochs from --lstm_lr to 1e-2."""
    return cosine_schedule(args.lstm_lr, MIN_LSTM_LR, args.pretrain_epochs)[epoch - 1]
