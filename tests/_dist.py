"""The distributed set-up of tests that spawn gloo processes on the CPU (`torch.multiprocessing`),
as Ray Train makes it for its workers: a free port, then in each child the environment of a rank
and the default process group, and at the child's end `leave_gloo_group`. Spawned children import
it as `tests._dist` (the checkout is on their `sys.path`, as on pytest's: pyproject's
`pythonpath`)."""

from __future__ import annotations

import os
import socket
import sys

import torch


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_gloo_group(rank: int, port: int, world: int) -> None:
    """In a spawned child: the rank's environment (DeepSpeed on the CPU accelerator) and the gloo
    process group of `world` ranks on 127.0.0.1:`port`, made first, as Ray Train does."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        DS_ACCELERATOR="cpu",
    )
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)


def leave_gloo_group() -> None:
    """The child's last line: destroy the process groups, then end the process at once, without
    Python's finalisation (exit status 0; a failure before this line still fails the child).

    DeepSpeed's engines keep their gloo groups alive past `destroy_process_group`, so a gloo thread
    may drop its last finished work (and the tensors in it) while Python finalises; freeing a
    tensor takes the GIL, a thread that takes it during finalisation is ended by pthread_exit
    inside a C++ destructor, and that is std::terminate: SIGABRT, "terminate called without an
    active exception". Seen in benchmarks/adapter_cost.py's gloo processes: once in CI, and in 4
    of 54 runs of its 2-rank check here (none of 30 with this exit). gdb's backtrace:
    ProcessGroupGloo::runLoop -> ~AsyncAllreduceWork -> THPVariable_dealloc -> take_gil ->
    PyThread_exit_thread, while the main thread is in Py_FinalizeEx."""
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
