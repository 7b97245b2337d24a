"""Data parallelism: DDP (gloo, two CPU processes), DataParallel and torch.func.functional_call
with fusedrnn modules give torch.nn's results.  fusedrnn has no distributed code of its own: its
parameters are ordinary Parameters and its backward produces ordinary gradients, which DDP's
hooks all-reduce."""

import datetime
import os
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fusedrnn
from tolerances import assert_close

BACKENDS = ["reference", "triton", "cpp"]
F64 = torch.float64


def _runnable_backends():
    return [b for b in BACKENDS if fusedrnn.available_backends()[b] is None]


class Tagger(nn.Module):
    """A sequence tagger as the models that use RNNs are built: RNN stack + per-step linear."""

    def __init__(self, backend):
        super().__init__()
        self.rnn = fusedrnn.LSTM(3, 4, num_layers=2, bidirectional=True, backend=backend)
        self.gru = fusedrnn.GRU(8, 3, backend=backend)
        self.head = nn.Linear(3, 2)

    def forward(self, x, lengths):
        packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
        y, _ = self.rnn(packed)
        y, _ = self.gru(y)
        return self.head(y.data)


def _batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, 3, generator=g, dtype=F64)
    lengths = torch.tensor([5, 2, 4, 3])
    return x, lengths


def _model(backend):
    torch.manual_seed(0)
    return Tagger(backend).double()


def _ddp_worker(rank, world_size, init_file, out_file, backends):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    try:
        x, lengths = _batch()
        shard = slice(rank * 2, rank * 2 + 2)  # each process takes two of the four sequences
        grads = {}
        for backend in backends:
            model = nn.parallel.DistributedDataParallel(_model(backend))
            model(x[:, shard], lengths[shard]).square().mean().backward()
            grads[backend] = [p.grad.clone() for p in model.parameters()]
        if rank == 0:
            torch.save(grads, out_file)
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_match_one_process():
    """One DDP step on two gloo CPU processes (half the batch each) gives the gradients of one
    process on the whole batch (the mean of the two halves' means: equal halves)."""
    backends = _runnable_backends()
    with tempfile.TemporaryDirectory() as tmp:
        init_file, out_file = os.path.join(tmp, "init"), os.path.join(tmp, "grads.pt")
        # spawn, not fork: forking a process that has run threads (OpenMP, the suite before this
        # test) can deadlock the children; spawn re-imports torch in each worker instead
        workers = mp.spawn(_ddp_worker, args=(2, init_file, out_file, backends), nprocs=2, join=False)
        deadline = time.monotonic() + 300
        while not workers.join(timeout=2):  # raises if a worker failed
            if time.monotonic() > deadline:
                for process in workers.processes:
                    process.kill()
                pytest.fail("the DDP workers did not finish within 300 s")
        ddp_grads = torch.load(out_file)
    x, lengths = _batch()
    for backend in backends:
        model = _model(backend)
        halves = [model(x[:, s], lengths[s]).square().mean() for s in (slice(0, 2), slice(2, 4))]
        (sum(halves) / 2).backward()
        assert_close(ddp_grads[backend], [p.grad for p in model.parameters()], F64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_data_parallel_and_functional_call(backend):
    if fusedrnn.available_backends()[backend] is not None:
        pytest.skip(fusedrnn.available_backends()[backend])
    x, lengths = _batch()
    model = _model(backend)
    expected = model(x, lengths)
    # DataParallel without GPUs calls the module itself; with GPUs it replicates it per device
    assert_close([nn.DataParallel(model)(x, lengths)], [expected], F64)
    # functional_call with other parameters equals a module holding those parameters
    params = {n: p.detach() * 1.5 for n, p in model.named_parameters()}
    other = _model(backend)
    with torch.no_grad():
        for n, p in other.named_parameters():
            p.copy_(params[n])
    assert_close([torch.func.functional_call(model, params, (x, lengths))], [other(x, lengths)], F64)
