"""Tensor: an array, plus what autograd needs to know about it.

A tensor holds ``data`` (a NumPy or CuPy array), ``requires_grad``, the
``grad_fn`` that created it (None for leaves), and after a backward pass its
``grad``. Operators and methods delegate to the op wrappers in ``tinymeta.ops``.
"""

from __future__ import annotations

import functools
import numbers
import weakref

import numpy as np

from tinymeta import backend

DEFAULT_FLOAT = np.dtype(np.float32)

_ndarray = np.ndarray
_new_object = object.__new__

# The version counter [version, viewed] of every tensor whose memory was never aliased nor
# changed in place: shared and read-only (Tensor._bump and share_version replace it).
FRESH = (0, False)


class Tensor:
    __slots__ = (
        "_data",  # the array; read through the ``data`` property
        "grad",
        "requires_grad",
        "grad_fn",
        "generation",
        "name",
        "_vc",
        "_hooks",
        "__weakref__",
    )
    # Make NumPy defer to Tensor in mixed expressions like ``ndarray * tensor``.
    __array_priority__ = 1000

    def __init__(self, data, requires_grad: bool = False, name: str | None = None):
        alias = data if isinstance(data, Tensor) else None
        if alias is not None:
            data = data.data
        # np.asarray also turns NumPy scalars (np.float64(1.0), what 0-d
        # arithmetic returns) into 0-d arrays: a tensor always holds an array.
        if not isinstance(data, np.ndarray) and not _is_cupy(data):
            data = np.asarray(data)
        self._start(data, name)
        if alias is not None:  # Tensor(t) holds t's array: one storage, one counter
            share_version(alias, self, view=False)
            if alias.grad_fn is not None:
                mark_graph_memory(self._vc, alias)
        if requires_grad:
            self.requires_grad_(True)

    @staticmethod
    def _wrap(array):
        """Fast constructor for op outputs (no checks beyond making NumPy scalars 0-d arrays).
        A plain Tensor always; a static method: no bound method is made per call."""
        # 0-d arithmetic and comparisons return NumPy scalars (the type test first: hot path)
        if type(array) is not _ndarray and isinstance(array, np.generic):
            array = np.asarray(array)
        t = _new_object(Tensor)
        # _start(array, None), inlined: every op output passes here
        t._data = array
        t.grad = t.grad_fn = t.name = t._hooks = None
        t._vc = FRESH  # see _bump
        t.generation = 0
        t.requires_grad = False
        return t

    def _start(self, data, name) -> None:
        """A leaf holding ``data``: no gradient, no creator, version 0."""
        self._data = data
        self.grad = None
        self.grad_fn = None
        self.generation = 0
        self.name = name
        self._vc = FRESH
        self._hooks = None
        self.requires_grad = False

    # --- the array ---------------------------------------------------------
    @property
    def data(self):
        """The array (NumPy or CuPy). Assigning another one gives the tensor new memory:
        graphs that saved the old array refuse backward (see _replace_data)."""
        array = self._data
        # Remember which version counter guards the memory handed out, so that
        # ``t.data = u.data`` can give t that counter (see _replace_data). Inlined fast
        # path: the same tensor reading its array again finds its own counter.
        owner = array.base
        entry = _handed_out.get(id(array if owner is None else owner))
        if entry is None or entry[1] is not self._vc:
            vc = self._vc
            if entry is None or type(vc) is not LinkedCounter or entry[1] is not vc.base:
                _remember_counter(self, array)
        return array

    @data.setter
    def data(self, array) -> None:
        self._replace_data(array)

    def _replace_data(self, array) -> None:
        """``t.data = array``: as in PyTorch, any shape, dtype or device, unseen by autograd.

        The tensor's version moves past the old one: graphs that saved it (at an older
        version) refuse backward, while aliases made before (``detach()``, views), which
        keep the old array, keep the old counter and their graphs. A computed tensor's new
        values are no longer its creator's output: the engine lets no gradient reach the
        creator from uses made after the assignment.

        Memory that another tensor handed out (``t.data = u.data``, ``u.data[1:]``,
        ``u.detach().data``) stays guarded by that tensor's counter: ``t`` gets a
        LinkedCounter over it, so an in-place op through ``t``, ``u`` or any alias of
        theirs is seen by the graphs of all of them. Not seen, here as in PyTorch: writes
        made through NumPy itself (``u.data[...] += 1``), and CuPy memory (a counter of
        its own, as for a new array)."""
        if array is self._data:
            return
        array = _checked_replacement(self, array)
        old = self._vc
        shared = counter_handed_out_with(array)
        if shared is None:  # memory no tensor handed out: a counter of its own
            counter = ReplacedCounter([old[0] + 1, False])
        else:
            counter = LinkedCounter(shared, past=old[0])
        counter.replaced_at = counter[0]
        if self.grad_fn is not None:
            counter.replaced_seq = _first_replacement_seq(self, old)
            global graph_data_replaced
            graph_data_replaced = True
        self._data = array
        self._vc = counter

    # --- metadata --------------------------------------------------------
    @property
    def shape(self) -> tuple:
        return self._data.shape

    @property
    def ndim(self) -> int:
        return self._data.ndim

    @property
    def size(self) -> int:
        return self._data.size

    @property
    def dtype(self):
        return self._data.dtype

    @property
    def device(self) -> str:
        return backend.device_of(self._data)

    @property
    def is_leaf(self) -> bool:
        return self.grad_fn is None

    def __len__(self) -> int:
        if self.ndim == 0:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def __iter__(self):
        # Without this Python would iterate through __getitem__, and a 0-d tensor
        # would silently look empty.
        if self.ndim == 0:
            raise TypeError(f"iteration over a 0-d tensor (shape {self.shape})")
        return (self[i] for i in range(self.shape[0]))

    def __repr__(self) -> str:
        body = np.array2string(
            backend.to_numpy(self._data), precision=4, separator=", ", prefix="tensor("
        )  # prefix: continuation rows line up under the first one
        extra = []
        if self.dtype != DEFAULT_FLOAT:
            extra.append(f"dtype={self.dtype}")
        if self.device != "cpu":
            extra.append(f"device='{self.device}'")
        if self.grad_fn is not None:
            extra.append(f"grad_fn={self.grad_fn.op_name()}")
        elif self.requires_grad:
            extra.append("requires_grad=True")
        inner = ", ".join([body] + extra)
        return f"tensor({inner})"

    # --- conversion ------------------------------------------------------
    def numpy(self) -> np.ndarray:
        """The values as a NumPy array (copied to host for cuda tensors)."""
        return backend.to_numpy(self._data)

    def item(self):
        if self.size != 1:
            raise ValueError(f"item(): only a tensor with one element, got shape {self.shape}")
        return self._data.item()

    def __float__(self) -> float:
        return float(self.item())

    def __int__(self) -> int:
        return int(self.item())

    def __bool__(self) -> bool:
        if self.size != 1:
            raise ValueError(
                f"the truth value of a tensor of shape {self.shape} is ambiguous; "
                "use .any() or .all() on .data"
            )
        return bool(self.item())

    def __array__(self, dtype=None, copy=None):
        a = self.numpy()
        return a if dtype is None else a.astype(dtype)

    # --- autograd state ----------------------------------------------------
    def requires_grad_(self, flag: bool = True) -> Tensor:
        if flag and self.dtype.kind not in "fc":
            raise TypeError(
                f"only floating-point tensors can require gradients, got dtype {self.dtype} "
                f"(shape {self.shape}); cast first with .astype(tm.float32)"
            )
        if not flag and not self.is_leaf:
            raise RuntimeError(
                "requires_grad_(False) on a non-leaf tensor: use .detach() to cut the graph"
            )
        self.requires_grad = bool(flag)
        return self

    @property
    def _version(self) -> int:
        """How many in-place changes this tensor's memory has seen, through any alias."""
        return self._vc[0]

    def detach(self) -> Tensor:
        """A tensor sharing the data (and its version counter), cut from the graph."""
        t = Tensor._wrap(self._data)
        share_version(self, t, view=False)
        if self.grad_fn is not None:
            mark_graph_memory(self._vc, self)  # in-place changes through t are refused
        return t

    def register_hook(self, fn):
        """Call ``fn(grad)`` when the gradient w.r.t. this tensor is computed.

        ``fn`` may return a replacement gradient (same shape) or None. Returns
        a handle whose ``remove()`` unregisters the hook.
        """
        if not self.requires_grad:
            raise RuntimeError("register_hook: the tensor does not require grad")
        if self._hooks is None:
            self._hooks = []
        self._hooks.append(fn)
        return _HookHandle(self._hooks, fn)

    def retain_grad(self) -> None:
        """Keep this computed tensor's gradient in ``.grad``, as a leaf keeps its own:
        stored by every ``backward`` (and every ``grad`` call whose walk passes it) after
        the tensor's other hooks, summed out of place across calls, in memory of its own. A
        no-op for a leaf. After an in-place op the tensor keeps retaining (the gradient of
        its new values), while hooks registered before see the old values' gradient, as in
        PyTorch."""
        if not self.requires_grad:
            raise RuntimeError(
                f"retain_grad: the tensor (shape {self.shape}) does not require grad, so no "
                "gradient reaches it"
            )
        if self.grad_fn is None:
            return
        if self._hooks is None:
            self._hooks = []
        if RETAIN_GRAD not in self._hooks:
            self._hooks.append(RETAIN_GRAD)

    @property
    def retains_grad(self) -> bool:
        """Whether ``retain_grad()`` asked a computed tensor to keep its gradient."""
        return self.grad_fn is not None and bool(self._hooks) and RETAIN_GRAD in self._hooks

    # ``t.backward(gradient=None, retain_graph=None, create_graph=False)`` runs
    # tinymeta.autograd.engine.backward; it is attached by tinymeta/ops/methods.py, like the
    # operators, so that this module does not import the engine (which imports Tensor).

    # --- in-place updates (optimizers); they bump the version counter ------
    # The counter ``_vc`` is a list [version, viewed] shared by every tensor over the same
    # memory (views, detach(), from_numpy over one array): a change through any of them
    # bumps the version that the graphs which saved any of them compare at backward.
    # FRESH, one read-only (0, False) for all, stands for a counter not made yet: op
    # outputs, almost all never aliased nor changed in place, skip the allocation.
    def _check_graph_memory(self, op: str) -> None:
        """Refuse an in-place change that no graph records of memory a graph computed.

        A tensor with a ``grad_fn`` (or an alias of one: ``detach()``, a view made under
        ``no_grad``) changed under ``no_grad`` keeps its creator, so gradients through it
        would be those of the values before the change, without a word. Leaves (parameters,
        buffers) stay changeable: their gradient does not depend on their own values."""
        if self.grad_fn is not None or is_graph_memory(self._vc):
            what = (
                f"a tensor computed by {self.grad_fn.op_name()}"
                if self.grad_fn is not None
                else "an alias (detach() or a view made under no_grad) of a computed tensor"
            )
            raise RuntimeError(
                f"{op}: in-place change of {what} (shape {self.shape}) that no graph "
                "records: gradients through it would silently use the values before the "
                "change. Change a copy (y = x.detach() * 1.0), or assign with grad mode on "
                "(x[i] = v is recorded)"
            )

    def _bump(self) -> Tensor:
        if type(self._vc) is tuple:  # FRESH (or a copy of it from pickle)
            self._vc = [1, False]
        else:
            self._vc[0] += 1
        return self

    # In-place arithmetic (add_, sub_, mul_, div_, pow_, copy_, fill_, zero_, +=, -=, ...)
    # lives in tinymeta/ops/inplace.py and is attached by tinymeta.ops.methods: recording a
    # change that must be differentiated takes ops, which this module does not import.

    def __setitem__(self, index, value) -> None:
        from tinymeta.ops.shape import setitem  # recorded when it has to be differentiated

        setitem(self, index, value)

    # Arithmetic operators, methods (t.exp(), t.sum(), ...) and t.T are
    # attached by tinymeta.ops.methods, next to the op wrappers they call.


def _on_device_of(array, value):
    """``value`` (an array, list or scalar) on ``array``'s device, for a write into ``array``.

    NumPy refuses device arrays in ``a[...] = v`` and CuPy refuses host ones (and lists),
    so a copy between devices (loading a checkpoint into a cuda model, say) is made here.
    """
    if type(array) is np.ndarray:
        return backend.to_numpy(value) if _is_cupy(value) else value
    if isinstance(value, (np.ndarray, list, tuple)):
        return backend.move_array(np.asarray(value), "cuda")
    return value


class ReplacedCounter(list):
    """The version counter [version, viewed] of memory a tensor got by ``t.data = array``.

    ``replaced_at``: the version the assignment gave (a graph that saved an older version
    saved the old array). ``replaced_seq``, for a computed tensor only: the recording order
    (Function.seq) at the first assignment since its creator made it; nodes recorded later
    used values that are not the creator's output."""

    __slots__ = ("replaced_at", "replaced_seq")


class LinkedCounter(ReplacedCounter):
    """The counter of a tensor given memory that another tensor handed out (``t.data =
    u.data``): ``base`` is the counter of that memory, shared with ``u`` and its aliases.

    Reads and writes go to ``base``, the version shifted up by ``offset``: enough that the
    version starts past ``t``'s old one (a graph that saved ``t``'s old array must not find
    its version again), while ``base`` itself is left alone (graphs that saved ``u`` stay
    valid). A bump through either tensor moves both."""

    __slots__ = ("base", "offset")

    def __init__(self, base: list, past: int):
        super().__init__()  # its own items stay empty: they are the base's
        self.base = base
        self.offset = max(0, past + 1 - base[0])

    def __getitem__(self, i):
        return self.base[0] + self.offset if i == 0 else self.base[i]

    def __setitem__(self, i, value) -> None:
        self.base[i] = value - self.offset if i == 0 else value

    def __len__(self) -> int:
        return len(self.base)

    def append(self, flag) -> None:
        self.base.append(flag)


# id(array owning some memory) -> (weak reference to it, the version counter of the tensor
# that last handed that memory out through ``Tensor.data``). An entry goes with its array.
_handed_out: dict = {}


def _remember_counter(t: Tensor, array) -> None:
    """Record that ``t`` hands out ``array``: its memory is guarded by ``t``'s counter."""
    if not isinstance(array, np.ndarray):  # CuPy: not tracked (see _replace_data)
        return
    counter = _memory_counter(t)
    owner = _memory_owner(array)
    key = id(owner)
    entry = _handed_out.get(key)
    if entry is not None and entry[0]() is owner:
        if entry[1] is counter:
            return
        ref = entry[0]  # the same memory handed out by a tensor with another counter
    else:
        try:  # the entry goes with the owner (whose id may then be reused)
            ref = weakref.ref(owner, functools.partial(_forget_owner, key))
        except TypeError:  # an ndarray subclass without weak references: not tracked
            return
    _handed_out[key] = (ref, counter)


def _forget_owner(key: int, ref) -> None:
    entry = _handed_out.get(key)
    if entry is not None and entry[0] is ref:  # not a newer owner that took the same id
        del _handed_out[key]


def counter_handed_out_with(array):
    """The counter of the memory ``array`` lies in, if a tensor handed that memory out."""
    if not isinstance(array, np.ndarray):
        return None
    owner = _memory_owner(array)
    entry = _handed_out.get(id(owner))
    if entry is None or entry[0]() is not owner:
        return None
    return entry[1]


def _memory_owner(array: np.ndarray) -> np.ndarray:
    """The array that owns ``array``'s memory (NumPy collapses chains of views, except
    over memory an ndarray borrowed from another object, such as np.frombuffer's)."""
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array


def _memory_counter(t: Tensor) -> list:
    """The counter of ``t``'s memory, made shareable (a list, not FRESH) and marked as
    leaf or graph memory: handing the array out makes an alias, as ``detach()`` does."""
    counter = _materialized_counter(t)
    if type(counter) is LinkedCounter:
        counter = counter.base
    if t.grad_fn is not None:
        mark_graph_memory(counter, t)
    elif len(counter) == 2:
        counter.append(False)  # a leaf's memory: see mark_graph_memory
    return counter


# Set once a computed tensor's .data is assigned: the engine then checks the uses of
# replaced values (engine._check_not_replaced); until then it costs nothing.
graph_data_replaced = False


def _checked_replacement(t: Tensor, array):
    """``array`` as a tensor's new data, refused where a tensor could not hold it."""
    if isinstance(array, np.generic):
        array = np.asarray(array)
    if not isinstance(array, np.ndarray) and not _is_cupy(array):
        hint = " (assign other.data to take its array)" if isinstance(array, Tensor) else ""
        raise TypeError(
            f"Tensor.data = value: expected an array (numpy.ndarray or cupy.ndarray) for a "
            f"tensor of shape {t.shape}, got {type(array).__name__}{hint}"
        )
    if t.requires_grad and array.dtype.kind not in "fc":
        raise TypeError(
            f"Tensor.data = value: the tensor (shape {t.shape}, {t.dtype}) requires grad, "
            f"which only floating-point arrays can; got dtype {array.dtype} (shape "
            f"{array.shape})"
        )
    return array


def _first_replacement_seq(t: Tensor, old_counter) -> int:
    """The replacement's place in the recording order; an earlier replacement since the
    creator recorded ``t`` stands (nodes recorded after it used replaced values already)."""
    earlier = getattr(old_counter, "replaced_seq", None)
    if earlier is not None and earlier > t.grad_fn.seq:
        return earlier
    from tinymeta.function import _next_seq  # (function imports this module)

    return _next_seq()


def swap_array(t: Tensor, array) -> None:
    """Let ``t`` hold ``array``, another view of the very values it holds (tinymeta.capture
    swaps traced views in and out): the memory stays, and so does its version."""
    t._data = array


def share_version(base: Tensor, alias: Tensor, view: bool) -> None:
    """Give ``alias`` (a tensor over ``base``'s memory) ``base``'s version counter.

    ``view``: the alias is a view made by a differentiable op (indexing, reshape,
    transpose, ...), which autograd does not link back to the base; an assignment
    ``x[i] = v`` that has to be differentiated refuses such memory (see ops.shape.setitem).
    """
    counter = _materialized_counter(base)
    if len(counter) == 2 and base.grad_fn is None:
        counter.append(False)  # a leaf's memory: see mark_graph_memory
    alias._vc = counter
    if view:
        counter[1] = True


def _materialized_counter(t: Tensor) -> list:
    """``t``'s version counter, a list of its own in place of FRESH, ready to be shared."""
    counter = t._vc
    if type(counter) is tuple:  # FRESH (or a copy of it from pickle)
        counter = t._vc = [0, False]
    return counter


def mark_graph_memory(counter: list, computed: Tensor) -> None:
    """Mark a shared version counter as that of memory a graph computed (``computed``'s):
    an alias outside the graph (``detach()``, a view made under ``no_grad``) may not change
    it in place while a computed tensor over it is alive. A leaf's memory (marked False by
    share_version) stays changeable through any alias.

    The mark holds weak references: once every computed tensor it names is gone, no later
    op can use their values or creators, and the memory is the alias's alone. So
    ``p.to("cuda").detach().requires_grad_()`` makes a parameter an optimizer may change
    (the transfer's output is a temporary), while ``y.detach()`` of a live ``y`` may not
    be. Graphs that saved the values keep them guarded by the version counter. A computed
    view keeps its base alive (a creator holds its inputs), so the base's reference
    stands for its views too."""
    if len(counter) == 2:
        counter.append(_ComputedOwners([weakref.ref(computed)]))
        return
    refs = counter[2]
    if refs is False or any(r() is computed for r in refs):
        return
    refs[:] = [r for r in refs if r() is not None]  # the list stays as short as the living
    refs.append(weakref.ref(computed))


class _ComputedOwners(list):
    """The weak references of a graph-memory mark. A copy (pickle, deepcopy) holds memory of
    its own, which no computed tensor holds: it starts with none."""

    def __reduce__(self):
        return (_ComputedOwners, ())

    def __deepcopy__(self, memo):
        return _ComputedOwners()


def is_graph_memory(counter) -> bool:
    """Whether ``counter`` guards memory that a computed tensor still alive holds."""
    return len(counter) > 2 and counter[2] is not False and any(r() is not None for r in counter[2])


def clear_grad(t: Tensor, set_to_none: bool = True) -> None:
    """``zero_grad`` for one tensor: ``t.grad = None``, or zeros written into ``.grad``'s own
    memory, as PyTorch does (a reference taken before sees them; the version moves, so a graph
    that saved the old ``.grad`` refuses its backward). A ``.grad`` that a graph computed
    (``backward(create_graph=True)``), or a read-only one, gets zeros of its own instead
    (PyTorch detaches it first)."""
    g = t.grad
    if g is None or set_to_none:
        t.grad = None
        return
    a = g._data
    if g.grad_fn is None and not is_graph_memory(g._vc) and getattr(a.flags, "writeable", True):
        a[...] = 0  # CuPy arrays have no writeable flag
        g._bump()
    else:
        t.grad = Tensor._wrap(backend.get_array_module(a).zeros_like(a))


def _index_arrays(index):
    """Replace tensors inside an index by their arrays."""
    if isinstance(index, Tensor):
        return index.data
    if isinstance(index, tuple):
        return tuple(i.data if isinstance(i, Tensor) else i for i in index)
    return index


class _RetainGrad:
    """The marker ``retain_grad()`` puts among a tensor's hooks: the engine stores the
    gradient in ``.grad`` once the other hooks have run (engine._run_hooks)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "RETAIN_GRAD"


RETAIN_GRAD = _RetainGrad()


class _HookHandle:
    def __init__(self, hooks: list, fn):
        self._hooks, self._fn = hooks, fn

    def remove(self) -> None:
        if self._fn in self._hooks:
            self._hooks.remove(self._fn)


def _is_cupy(obj) -> bool:
    return backend.is_cupy_array(obj) and backend.cupy_or_none() is not None


# --- turning op arguments into tensors ----------------------------------------


def scalar_dtype(value, like_dtype):
    """The dtype a Python scalar takes next to a tensor of ``like_dtype``.

    As in PyTorch, a Python number never widens a tensor: 2.0 * float32 stays
    float32; a float next to an integer tensor gives the default float dtype.
    """
    if isinstance(value, bool):
        return like_dtype if like_dtype is not None else np.dtype(np.bool_)
    if isinstance(value, numbers.Integral):
        return like_dtype if like_dtype is not None else np.dtype(np.int64)
    if like_dtype is not None and like_dtype.kind in "fc":
        return like_dtype
    return DEFAULT_FLOAT


def as_tensor_like(values, op: str) -> list:
    """Tensors for an op's inputs: scalars take the dtype and device of the tensors."""
    # The hot path of every op: all inputs are already host tensors.
    for v in values:
        if not isinstance(v, Tensor) or type(v._data) is not np.ndarray:
            break
    else:
        return values
    ref = None
    for v in values:
        if isinstance(v, Tensor):
            if ref is None:
                ref = v
            elif v.device != ref.device:
                raise RuntimeError(
                    f"{op}: inputs are on different devices: {ref.device} (shape {ref.shape}) "
                    f"and {v.device} (shape {v.shape}); move them with .to(device)"
                )
    out = []
    for v in values:
        if isinstance(v, Tensor):
            out.append(v)
            continue
        if isinstance(v, numbers.Number):
            dtype = scalar_dtype(v, ref.dtype if ref is not None else None)
            xp = np if ref is None else backend.get_array_module(ref.data)
            out.append(Tensor._wrap(xp.asarray(v, dtype=dtype)))
        else:
            array = np.asarray(v) if isinstance(v, (list, tuple)) else v
            if ref is not None and ref.device != "cpu":
                array = backend.move_array(array, ref.device)
            elif ref is not None and not isinstance(array, np.ndarray):
                raise RuntimeError(f"{op}: a {type(v).__name__} cannot be mixed with cpu tensors")
            if isinstance(v, (list, tuple)) and array.dtype == np.float64:
                array = array.astype(DEFAULT_FLOAT)
            out.append(Tensor._wrap(array))
    return out


def as_input(x, op: str, name: str = "x") -> Tensor:
    """A function's tensor argument: a Tensor as it is, an array (NumPy or CuPy) wrapped in one
    that does not require grad; anything else refused, naming the function and argument."""
    if isinstance(x, Tensor):
        return x
    if isinstance(x, np.ndarray) or hasattr(x, "__cuda_array_interface__"):
        return Tensor(x)
    raise TypeError(f"{op}: {name} must be a Tensor or an array, got {type(x).__name__}")


def constant(array) -> Tensor:
    """A tensor that never requires grad (masks, signs: values backward rules treat as fixed)."""
    return Tensor._wrap(array)
