"""Training and testing across processes (``torchrun``), with torch.distributed.

Without torchrun (no ``WORLD_SIZE`` in the environment, or 1) nothing here communicates and
every function is the single-process one.  Under ``torchrun --nproc_per_node=N``:

- every rank draws the same task batch (the samplers are seeded alike) and adapts its own
  contiguous share of the tasks (``share``);
- each rank's outer loss is its tasks' summed query losses over the *global* number of
  tasks, so the sum over ranks is the batch mean, also for uneven shares;
- the gradients of every meta-parameter are flattened in one fixed order (a missing one as
  zeros), all-reduced once and written back (``all_reduce_gradients``): every rank then
  steps identical optimisers;
- Basic (train_original.py) is plain data parallelism in the same way: every rank loads the
  same batch of users and predicts its share of the rows, its loss over the real positions
  of the whole batch, the gradients summed;
- validation and test users are sharded the same way and their predictions gathered;
- each rank draws its own dropout masks (``own_dropout_stream``);
- rank 0 alone prints progress, writes TensorBoard, checkpoints and results.

DistributedDataParallel is not used: its hooks fire on ``.backward()`` through the wrapper's
forward, which a ``functional_call`` / ``torch.func.grad`` inner loop bypasses, and it does
not support double backward.
"""
import datetime
import os
import sys

import torch
import torch.distributed as dist

TIMEOUT_S = 300  # a rank waiting longer than this on the others fails with an error


class PeerFailure(Exception):
    """Another process of the job died or stopped answering during a collective call."""


def _collective(operation, *args, **kwargs):
    """``operation(*args, **kwargs)``, a torch.distributed call; the error of a failed peer
    (a RuntimeError of the backend, or a timeout) becomes a PeerFailure that says so."""
    try:
        return operation(*args, **kwargs)
    except RuntimeError as error:
        detail = str(error).strip().splitlines()[0][:200]
        raise PeerFailure(f"another process of this torchrun job failed or stopped answering ({detail}); "
                          "its own output says why") from None


def start(device):
    """Join the process group when run under torchrun; returns the device of this rank (its
    own GPU on CUDA)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    if not is_main():
        sys.stdout = open(os.devnull, "w")  # rank 0 prints; errors still reach stderr
    return device


def stop():
    if dist.is_initialized():
        dist.destroy_process_group()


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main():
    """Whether this process prints and writes files (rank 0, or the only process)."""
    return rank() == 0


def share(count):
    """This rank's contiguous part [start, stop) of ``count`` items: the first ``count % N``
    ranks take one more."""
    size, extra = divmod(count, world_size())
    start = rank() * size + min(rank(), extra)
    return start, start + size + (rank() < extra)


def all_reduce_gradients(parameters):
    """Sum every parameter's gradient over the ranks in one all-reduce, in the order given
    (the same on every rank). A rank without a gradient for a parameter adds zeros; one that
    no rank reached keeps no gradient, as in a single process (its optimiser skips it)."""
    if world_size() == 1:
        return
    parameters = list(parameters)
    reached = torch.tensor([float(p.grad is not None) for p in parameters])
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in parameters]
                     + [reached.to(parameters[0].device, parameters[0].dtype)])
    _collective(dist.all_reduce, flat)
    offset = 0
    for p, by_any in zip(parameters, flat[-len(parameters):].tolist()):
        p.grad = flat[offset:offset + p.numel()].view_as(p).clone() if by_any else None
        offset += p.numel()


def _collective_device():
    """Where the backend's tensors live: this rank's GPU for NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_over_ranks(value):
    """A float summed over the ranks."""
    if world_size() == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    _collective(dist.all_reduce, total)
    return total.item()


def broadcast_parameters(module):
    """Rank 0's parameters and buffers on every rank."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            _collective(dist.broadcast, tensor.data, src=0)


def own_dropout_stream():
    """Move torch's global generator, which draws the dropout masks, to a stream of this
    rank's own (derived from the current state; rank 0 keeps it). Every rank is seeded
    alike, so without this each process would drop the same units in its share."""
    if rank() > 0:
        torch.manual_seed(int(torch.randint(0, 2 ** 62, ())) + rank())


class _NoWriter:
    """What a rank other than 0 writes to TensorBoard: nothing."""

    def add_scalar(self, *args, **kwargs):
        pass

    def close(self):
        pass


def summary_writer(path, **options):
    """A TensorBoard SummaryWriter on rank 0, a writer of nothing on the others."""
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(path, **options) if is_main() else _NoWriter()


def gather_objects(value):
    """``value`` of every rank, a list in rank order."""
    if world_size() == 1:
        return [value]
    values = [None] * world_size()
    _collective(dist.all_gather_object, values, value)
    return values


def gather(values):
    """``values`` (a CPU tensor, first dimension this rank's share) of every rank,
    concatenated in rank order."""
    if world_size() == 1:
        return values
    return torch.cat(gather_objects(values))


def check_same_parameters(module):
    """An error unless every rank holds the same parameters (a sum of them, compared)."""
    if world_size() == 1:
        return
    total = torch.stack([p.detach().double().sum() for p in module.parameters()]).sum().reshape(1)
    totals = [None] * world_size()
    _collective(dist.all_gather_object, totals, total.cpu())
    if any(not torch.equal(other, totals[0]) for other in totals):
        raise RuntimeError(f"the ranks' parameters differ (sums {[t.item() for t in totals]}): "
                           "the processes have gone out of step")
