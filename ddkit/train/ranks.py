"""The training loop's collectives: what the ranks agree on, and when.

Every rank makes the same calls in the same order, or the job hangs. Per run, :meth:`Trainer._loop
<ddkit.train.trainer.Trainer>` makes them in this order:

* per epoch: :func:`agree_min` (the epoch's batch count, ``all_reduce(MIN)`` on the device);
* per step boundary, before the step: :func:`agree_stop` (the stop vote: ``all_reduce(MAX)`` of a CPU
  vector, on :func:`stop_group` under NCCL);
* per log line: :func:`mean_over_ranks` (``all_reduce`` of the loss means);
* per checkpoint: :func:`gather_to_main` (``gather_object`` to rank 0), rank 0 writes, then a barrier.

A single process (``env.distributed`` False) makes no collective: each function answers for itself alone.
"""

from __future__ import annotations

from typing import Any


def stop_group(env: Any) -> Any:
    """The process group of the stop vote: a gloo side group when the default one is NCCL (the vote's
    tensor stays on the CPU, so no device sync), else None (the default group). Collective: every rank
    calls it, at set-up."""
    if not env.distributed:
        return None
    import torch.distributed as tdist

    return tdist.new_group(backend="gloo") if tdist.get_backend() == "nccl" else None


def agree_min(n: int, env: Any, device: Any) -> int:
    """The smallest ``n`` over ranks (every rank must run the same number of steps per epoch)."""
    if not env.distributed:
        return n
    import torch
    import torch.distributed as tdist

    t = torch.tensor([n], device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
    return int(t.item())


def agree_stop(signals: list[int], env: Any, group: Any) -> tuple[int, ...]:
    """At a step boundary: the signals any rank has received (``signals``: this rank's, from
    :func:`ddkit.train.request_stop`), sorted, or ``()``.

    ONE collective per step boundary: an ``all_reduce(MAX)`` of a 0/1 vector indexed by signal number
    (a union of the ranks' signals, on CPU; ``group``: :func:`stop_group`). Every rank gets the same answer
    at the same step, so all stop after the same step and write one checkpoint together; steps lost to a
    preemption: none.
    """
    import torch

    flags = torch.zeros(65, dtype=torch.int32)
    for s in signals:
        flags[min(s, 64)] = 1
    if env.distributed:
        import torch.distributed as tdist

        tdist.all_reduce(flags, op=tdist.ReduceOp.MAX, group=group)
    return tuple(int(i) for i in flags.nonzero().flatten())


def mean_over_ranks(vals: Any, env: Any) -> Any:
    """``vals`` (a tensor on the device) averaged over ranks (``all_reduce`` sum / world size)."""
    if not env.distributed:
        return vals
    import torch.distributed as tdist

    tdist.all_reduce(vals)
    return vals / env.world_size


def gather_to_main(obj: Any, env: Any) -> list[Any] | None:
    """Every rank's ``obj`` in rank order on rank 0 (``gather_object``), None on the others; ``[obj]``
    in a single process."""
    if not env.distributed:
        return [obj]
    import torch.distributed as tdist

    ranks = [None] * env.world_size if env.is_main else None
    tdist.gather_object(obj, ranks, dst=0)
    return ranks
