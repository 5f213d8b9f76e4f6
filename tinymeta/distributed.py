"""Data parallelism over MPI: a meta-batch spread over processes and machines.

    dist.init()                                  # joins the world of `mpiexec -n R`
    for i in dist.shard(len(tasks)): ...         # this rank's share of the tasks
    dist.all_reduce_grads_(params, op="sum")     # one flat buffer, one all-reduce

A thin layer over mpi4py (the optional extra ``mpi``: ``pip install "tinymeta[mpi]"``).
Launched without ``mpiexec`` (or without mpi4py) a process is a world of one: ``rank() == 0``,
``world_size() == 1``, the reductions leave their tensors as they are, and mpi4py is never
imported. ``import tinymeta`` never imports it either.

Every collective packs its tensors into one flat buffer per dtype (one buffer in the usual
case) and makes one MPI call on it, after one all-reduce of two integers in which the ranks
check that their layouts (shapes and dtypes, hashed) agree: a mismatch raises the same
ValueError on every rank instead of a hang or a silently wrong sum. CuPy arrays travel
through the host (docs/distributed.md says how CUDA-aware MPI or NCCL would skip that copy).

Once a world of more than one is joined, an uncaught exception on any rank prints its
traceback and aborts the whole job (``MPI_Abort``): the other ranks would otherwise wait
forever in their next collective.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
import zlib

import numpy as np

from tinymeta import backend
from tinymeta.grad_mode import no_grad
from tinymeta.tensor import Tensor

OPS = ("mean", "sum")
ABORT_GRACE_S = 0.5  # how long a failing rank waits for its report to be forwarded

# Environment variables that process managers set in the processes they launch: MPICH's and
# Intel MPI's Hydra (PMI_*), Open MPI, MVAPICH. The first one present gives the world size.
_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_LAUNCH_VARIABLES = _SIZE_VARIABLES + ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK")

_comm = None  # mpi4py's COMM_WORLD in a world of more than one, else None
_initialized = False


def _launched_size() -> int | None:
    """The world size a process manager announced, None when not launched by one
    (0 when launched but the size is not in the environment)."""
    if not any(v in os.environ for v in _LAUNCH_VARIABLES):
        return None
    for variable in _SIZE_VARIABLES:
        if variable in os.environ:
            return int(os.environ[variable])
    return 0


def init() -> tuple[int, int]:
    """Join the MPI world when launched by ``mpiexec``; a world of one otherwise.

    Returns ``(rank, world_size)``; calling it again returns the same. Every other function
    of this module calls it on first use, so forgetting it cannot make R processes each
    believe they are alone.
    """
    global _comm, _initialized
    if _initialized:
        return rank(), world_size()
    size = _launched_size()
    if size is not None and size != 1:
        try:
            from mpi4py import MPI
        except ImportError as exc:
            raise ImportError(
                f"tinymeta.distributed: launched by an MPI process manager (world size "
                f"{size or 'unknown'}) but mpi4py is not installed; install the extra: "
                "pip install 'tinymeta[mpi]'"
            ) from exc
        if size > 1 and MPI.COMM_WORLD.Get_size() != size:
            # The classic mismatch: mpiexec of one MPI, mpi4py bound to another; every
            # process would otherwise run the whole job, each believing it is alone.
            raise RuntimeError(
                f"tinymeta.distributed: the launcher started {size} processes but MPI sees a "
                f"world of {MPI.COMM_WORLD.Get_size()}: mpiexec and mpi4py use different MPI "
                f"libraries (mpi4py has {MPI.Get_library_version().splitlines()[0]!r}); use "
                "the mpiexec that comes with the mpich package of the same environment"
            )
        if MPI.COMM_WORLD.Get_size() > 1:
            _comm = MPI.COMM_WORLD
            _install_abort_hook(_comm)
    _initialized = True
    return rank(), world_size()


def _install_abort_hook(comm) -> None:
    """Print an uncaught exception's traceback (naming the rank), then abort every rank."""
    previous = sys.excepthook

    def abort(kind, value, tb):
        header = f"tinymeta.distributed: uncaught exception on rank {comm.Get_rank()}:\n"
        if previous is sys.__excepthook__:  # the report in one write, which the launcher
            sys.stderr.write(header + "".join(traceback.format_exception(kind, value, tb)))
        else:  # forwards whole; a user's hook prints its own way
            sys.stderr.write(header)
            previous(kind, value, tb)
        sys.stderr.flush()
        sys.stdout.flush()
        # The launcher forwards the ranks' output asynchronously, and MPI_Abort has it kill
        # every process: without a pause the end of the traceback could be lost.
        time.sleep(ABORT_GRACE_S)
        comm.Abort(1)

    sys.excepthook = abort


def is_initialized() -> bool:
    """Whether ``init()`` has run (explicitly or through a first call of this module)."""
    return _initialized


def rank() -> int:
    """This process's index in the world, 0 to ``world_size() - 1``."""
    if not _initialized:
        init()
    return 0 if _comm is None else _comm.Get_rank()


def world_size() -> int:
    """How many processes share the work (1 when not launched by ``mpiexec``)."""
    if not _initialized:
        init()
    return 1 if _comm is None else _comm.Get_size()


def shard(n: int) -> np.ndarray:
    """This rank's indices of ``n`` items, as ``numpy.array_split`` gives them: the first
    ``n % world_size()`` ranks get one item more than the others (some may get none)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"shard: n must be an int >= 0, got {n!r}")
    return np.array_split(np.arange(n), world_size())[rank()]


def barrier() -> None:
    """Wait until every rank has reached this call."""
    if world_size() > 1:
        _comm.Barrier()


def broadcast_(tensors, root: int = 0) -> None:
    """In place: every rank's tensors get ``root``'s values (one flat buffer per dtype)."""
    tensors = _as_list(tensors, "broadcast_")
    size = world_size()
    if not 0 <= root < size:
        raise ValueError(f"broadcast_: root must be a rank in [0, {size}), got {root}")
    _check_devices(tensors, "broadcast_")
    if size == 1:
        return
    _check_layout(tensors, "broadcast_")
    for group in _by_dtype(tensors):
        flat = _pack([tensors[i].data for i in group]) if rank() == root else None
        if flat is None:
            flat = np.empty(sum(tensors[i].size for i in group), tensors[group[0]].dtype)
        _comm.Bcast(flat, root=root)
        _write_back(tensors, group, flat)


def all_reduce_(tensors, op: str = "mean") -> None:
    """In place on the tensors' arrays: the sum (``op="sum"``) or the mean (``"mean"``) over
    the ranks of each tensor, in one flat buffer per dtype."""
    _check_op(op, "all_reduce_")
    tensors = _as_list(tensors, "all_reduce_")
    _check_devices(tensors, "all_reduce_")
    _check_mean_dtypes(tensors, op, "all_reduce_")
    if world_size() == 1:
        return
    _check_layout(tensors, "all_reduce_")
    for group in _by_dtype(tensors):
        flat = _sum(_pack([tensors[i].data for i in group]))
        if op == "mean":
            flat /= world_size()
        _write_back(tensors, group, flat)


def all_reduce_grads_(params, op: str = "mean") -> None:
    """``all_reduce_`` on each parameter's ``.grad``, in one flat buffer.

    A parameter whose ``.grad`` is None on every rank is skipped (it stays None everywhere).
    One that has a gradient on some ranks only counts as zeros on the others and afterwards
    has the reduced gradient on every rank: the buffer holds every parameter (None as zeros)
    and, at its end, one flag per parameter, so that the ranks learn from the same reduction
    which parameters had a gradient anywhere. ``.grad`` is replaced by a tensor viewing the
    reduced values (a gradient array can be a read-only broadcast view, or shared by two
    parameters, so it is not written into).
    """
    _check_op(op, "all_reduce_grads_")
    params = _as_list(params, "all_reduce_grads_")
    grads = [p.grad for p in params]
    _check_devices([g for g in grads if g is not None], "all_reduce_grads_")
    for i, (p, g) in enumerate(zip(params, grads)):
        if g is not None and (g.shape != p.shape or g.dtype != p.dtype):
            raise ValueError(
                f"all_reduce_grads_: parameter {i} has shape {p.shape} and dtype {p.dtype}, "
                f"its .grad has shape {g.shape} and dtype {g.dtype}"
            )
    _check_mean_dtypes(params, op, "all_reduce_grads_")
    if world_size() == 1:
        return
    _check_layout(params, "all_reduce_grads_")
    device = next((g.device for g in grads if g is not None), "cpu")
    for group in _by_dtype(params):
        dtype = params[group[0]].dtype
        arrays = [
            grads[i].data if grads[i] is not None else np.zeros(params[i].shape, dtype)
            for i in group
        ]
        flags = np.array([grads[i] is not None for i in group], dtype)
        flat = _sum(_pack([*arrays, flags]))
        data, counts = flat[: -len(group)], flat[-len(group) :]
        if op == "mean":
            data /= world_size()
        data = backend.move_array(data, device)
        offset = 0
        for i, count in zip(group, counts):
            n = params[i].size
            if count > 0:
                params[i].grad = Tensor(data[offset : offset + n].reshape(params[i].shape))
            offset += n


# ----------------------------------------------------------------------------- helpers


def _check_op(op: str, name: str) -> None:
    if op not in OPS:
        raise ValueError(f"{name}: op must be one of {OPS}, got {op!r}")


def _as_list(tensors, name: str) -> list:
    """A tensor, a sequence of tensors or a dict of them (its values), as a list."""
    if isinstance(tensors, Tensor):
        return [tensors]
    if isinstance(tensors, dict):
        tensors = list(tensors.values())
    tensors = list(tensors)
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: item {i} is a {type(t).__name__}, expected a Tensor")
    return tensors


def _check_devices(tensors: list, name: str) -> None:
    devices = sorted({t.device for t in tensors})
    if len(devices) > 1:
        raise ValueError(
            f"{name}: tensors on mixed devices {devices}: move them to one device first "
            "(they travel in one buffer)"
        )


def _check_mean_dtypes(tensors: list, op: str, name: str) -> None:
    if op != "mean":
        return
    for i, t in enumerate(tensors):
        if not np.issubdtype(t.dtype, np.inexact):
            raise TypeError(f'{name}: op="mean" needs floating tensors; item {i} is {t.dtype}')


def _check_layout(tensors: list, name: str) -> None:
    """One all-reduce of two integers: the ranks check that they hold tensors of the same
    shapes and dtypes (hashed), so that their buffers line up; raises on every rank if not."""
    layout = [(tuple(t.shape), t.dtype.str) for t in tensors]
    digest = zlib.crc32(repr(layout).encode())
    # The largest of h and of -h: the largest and the smallest hash, equal iff all agree.
    extremes = np.empty(2, np.int64)
    _comm.Allreduce(np.array([digest, -digest], np.int64), extremes, op=_mpi().MAX)
    if extremes[0] != -extremes[1]:
        raise ValueError(
            f"{name}: the ranks hold different tensors (their number, shapes or dtypes "
            f"differ); rank {rank()} holds {len(layout)}: "
            f"{[(shape, np.dtype(dtype).name) for shape, dtype in layout]}"
        )


def _mpi():
    from mpi4py import MPI

    return MPI


def _by_dtype(tensors: list) -> list:
    """Indices of the tensors grouped by dtype, groups in order of first appearance."""
    groups: dict = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    return list(groups.values())


def _pack(arrays: list) -> np.ndarray:
    """One contiguous host buffer holding the arrays one after the other. Device arrays are
    joined on their device first, so that the buffer crosses to the host in one copy."""
    device = next((a for a in arrays if backend.is_cupy_array(a)), None)
    if device is not None:
        xp = backend.get_array_module(device)
        return backend.to_numpy(xp.concatenate([xp.asarray(a).reshape(-1) for a in arrays]))
    flat = np.empty(sum(a.size for a in arrays), arrays[0].dtype)
    offset = 0
    for a in arrays:
        flat[offset : offset + a.size] = backend.to_numpy(a).reshape(-1)
        offset += a.size
    return flat


def _sum(flat: np.ndarray) -> np.ndarray:
    """The elementwise sum over the ranks, in place (the one MPI call of a reduction)."""
    _comm.Allreduce(_mpi().IN_PLACE, flat, op=_mpi().SUM)
    return flat


def _write_back(tensors: list, group: list, flat: np.ndarray) -> None:
    offset = 0
    with no_grad():
        for i in group:
            t = tensors[i]
            t.copy_(flat[offset : offset + t.size].reshape(t.shape))
            offset += t.size
