"""Run code as if its tensors lived on a GPU, on a machine without one: tensors on "another device" that compute on
the CPU but refuse to be mixed with CPU tensors, as CUDA refuses.

A CPU run cannot see a CPU / CUDA mix: `torch.arange(n)` (created on the default device, the CPU) indexes a CPU
model without complaint, and on cuda:0 the same line raises "expected all tensors to be on the same device". The
`meta` device raises the same error for some ops, but it holds no values (a sampling loop or a picture cannot run on
it), and its kernels accept a CPU index tensor where CUDA's raise. Here a tensor on the other device is a wrapper
(`Elsewhere`) that says `device == OTHER` and holds a CPU tensor; every operation on it is checked, then computed
on the CPU:

  - an operation that mixes it with a CPU tensor of one or more dimensions raises, as on CUDA (CUDA takes CPU
    scalars, 0-d tensors, and CPU index tensors in advanced indexing: so does this);
  - `torch.zeros(..., device=OTHER)`, `t.to(OTHER)`, `module.to(OTHER)` make such tensors, `t.cpu()` / `.to("cpu")`
    plain CPU ones, `item()` / `tolist()` work: a whole sampling loop or training step runs, with the values a
    CPU run gives;
  - a random draw whose generator lives on another device than the tensor it draws raises, as CUDA's "Expected a
    'cuda' device type for generator" does: `torch.Generator(OTHER)` (which torch itself cannot make) gives a CPU
    generator that says it lives on OTHER;
  - `torch.autocast(OTHER.type, ...)` acts as `torch.autocast("cpu", ...)` (the computation is on the CPU), and
    torch.is_autocast_enabled / get_autocast_dtype answer for the CPU;
  - torch.save writes these tensors as CPU tensors.

The other device calls itself `meta`: torch's C++ side needs a device it has a device guard for and no runtime to
initialise (a wrapper claiming `cuda` fails inside advanced indexing on a CPU build). Code under test that asks for
`device.type == "cuda"` takes its CPU branch; what this catches is every tensor created on, or moved to, the wrong
device, and every generator on the wrong device. `with torch.device("meta")` blocks (parameter counting) build
their modules on the CPU while this is active: the tiny presets only.

    with on_other_device():
        model = build_gpt("tiny", ...).to(OTHER)
        generate(model, labels.to(OTHER), 16, generator=torch.Generator(OTHER).manual_seed(0))
"""
import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

OTHER = torch.device("meta")
CPU = torch.device("cpu")
_RealGenerator = torch.Generator
_RealAutocast = torch.autocast
_REAL_AUTOCAST_QUERIES = {"is_autocast_enabled": torch.is_autocast_enabled,
                          "get_autocast_dtype": torch.get_autocast_dtype}

# aten ops that may take tensors of two devices on CUDA: copies between devices, advanced indexing with CPU
# indices, reading a scalar, and metadata-only ops
_MAY_MIX = ("_to_copy", "copy_", "index.", "index_put", "_index_put", "_local_scalar_dense", "detach", "lift_fresh",
            "_has_compatible_shallow_copy_type")


class Elsewhere(torch.Tensor):
    """A tensor on OTHER: a wrapper with OTHER's device that holds its values in a CPU tensor `elem`."""

    @staticmethod
    def __new__(cls, elem):
        if type(elem) is not torch.Tensor or elem.device != CPU:
            raise TypeError(f"Elsewhere wraps a plain CPU tensor, got a {type(elem).__name__} on {elem.device}")
        t = torch.Tensor._make_wrapper_subclass(cls, elem.shape, strides=elem.stride(),
                                                storage_offset=elem.storage_offset(), dtype=elem.dtype,
                                                layout=elem.layout, device=OTHER, requires_grad=elem.requires_grad)
        t.elem = elem
        return t

    def __repr__(self):
        return f"Elsewhere({self.elem!r})"

    def __reduce_ex__(self, protocol):                  # torch.save: a CPU tensor (a checkpoint loads anywhere)
        return self.elem.detach().clone().__reduce_ex__(protocol)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


def _leaves(x):
    """The tensors and other leaves of nested tuples / lists / dicts (op arguments and results; faster than pytree)."""
    if isinstance(x, (tuple, list)):
        return [leaf for item in x for leaf in _leaves(item)]
    if isinstance(x, dict):
        return [leaf for item in x.values() for leaf in _leaves(item)]
    return [x]


def _map(fn, x):
    """fn applied to every leaf of nested tuples / lists / dicts, the nesting kept."""
    if isinstance(x, (tuple, list)):
        items = [_map(fn, item) for item in x]
        return type(x)(*items) if hasattr(x, "_fields") else type(x)(items)       # a namedtuple takes fields
    if isinstance(x, dict):
        return {k: _map(fn, v) for k, v in x.items()}
    return fn(x)


def _is_other(device):
    return device is not None and not isinstance(device, int) and torch.device(device).type == OTHER.type


def _run(func, args, kwargs):
    """One aten op: refuse a device mix, compute on the CPU tensors, wrap the results back onto OTHER."""
    flat = _leaves((args, kwargs))
    onto_other = _is_other(kwargs.get("device"))                 # a factory asked for OTHER
    if not onto_other and not any(isinstance(t, Elsewhere) for t in flat):
        return func(*args, **kwargs)
    name = func.__name__
    if not name.startswith(_MAY_MIX):
        stray = [t for t in flat if isinstance(t, torch.Tensor) and not isinstance(t, Elsewhere) and t.dim() > 0]
        if stray:
            raise RuntimeError(f"{func}: expected all tensors to be on the same device, but found at least two "
                               f"devices, {OTHER} (the other device) and {stray[0].device} (a tensor of shape "
                               f"{tuple(stray[0].shape)})")
    if name.startswith(("index.", "index_put", "_index_put")) and not isinstance(args[0], Elsewhere):
        raise RuntimeError(f"{func}: indices should be either on cpu or on the same device as the indexed tensor "
                           f"(cpu): an index on {OTHER} (the other device)")
    wrappers = {}                                                  # id(elem) -> its wrapper: in-place ops return it

    def unwrap(t):
        if isinstance(t, Elsewhere):
            wrappers[id(t.elem)] = t
            return t.elem
        return t
    if onto_other:
        kwargs = {**kwargs, "device": CPU}
    out = func(*_map(unwrap, args), **_map(unwrap, kwargs))
    to_host = name.startswith("_to_copy") and kwargs.get("device") is not None and torch.device(
        kwargs["device"]) == CPU and not onto_other
    if to_host or name.startswith(("_local_scalar_dense", "equal", "is_same_size", "_has_compatible")):
        return out

    def wrap(t):
        if type(t) is not torch.Tensor:
            return t
        same = wrappers.get(id(t))
        return Elsewhere(t) if same is None else same
    return _map(wrap, out)


class _ToOther(torch.autograd.Function):
    """t.to(OTHER) with its gradient: the copy back to the CPU."""

    @staticmethod
    def forward(ctx, t):
        return Elsewhere(t.detach().clone())

    @staticmethod
    def backward(ctx, grad):
        return grad.elem if isinstance(grad, Elsewhere) else grad


def _move(func, args, kwargs):
    """Tensor.to / Tensor.cuda towards OTHER (None when the call goes elsewhere): torch's own .to would make an
    empty meta tensor."""
    if func is torch.Tensor.to:
        device, dtype, _, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
    else:
        device, dtype = kwargs.get("device", args[1] if len(args) > 1 else None), None
    if not _is_other(device):
        return None
    t = args[0] if dtype is None else args[0].to(dtype=dtype)
    return t if isinstance(t, Elsewhere) else _ToOther.apply(t)


class _Checks(TorchFunctionMode):
    """The Python-level half: factories and .to() towards OTHER, and the generators' devices."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch._has_compatible_shallow_copy_type:      # Module.to: a new parameter, never `.data =`
            return not any(isinstance(a, Elsewhere) for a in args) and func(*args, **kwargs)
        if func is torch.Tensor.tolist and isinstance(args[0], Elsewhere):   # reads the values, as on CUDA
            return args[0].elem.tolist()
        if func in (torch.tensor, torch.as_tensor) and args:       # torch.tensor([t0, t1]) reads each t's value
            args = (_map(lambda t: t.elem if isinstance(t, Elsewhere) else t, args[0]),) + tuple(args[1:])
        if func in (torch.Tensor.to, torch.Tensor.cuda):
            moved = _move(func, args, kwargs)
            if moved is not None:
                return moved
        if func not in (torch.device, torch._C._nn._parse_to) and _is_other(kwargs.get("device")):
            out = func(*args, **{**kwargs, "device": CPU})
            out = _map(lambda t: Elsewhere(t) if type(t) is torch.Tensor else t, out)
        else:
            out = func(*args, **kwargs)
        generator = kwargs.get("generator")
        if generator is not None:
            devices = {t.device for t in _leaves((args, out)) if isinstance(t, torch.Tensor)}
            if any(d != generator.device for d in devices):
                raise RuntimeError(f"{getattr(func, '__name__', func)}: a generator on {generator.device} draws "
                                   f"for tensors on {', '.join(sorted(map(str, devices)))}: expected a "
                                   f"generator on the device it draws on")
        return out


class ClaimingGenerator(_RealGenerator):
    """torch.Generator while on_other_device is active: a CPU generator that reports the device it was asked for."""

    def __new__(cls, device=CPU):
        gen = super().__new__(cls, CPU)
        gen.claimed = torch.device(device)
        return gen

    @property
    def device(self):
        return self.claimed


class _Autocast(_RealAutocast):
    """torch.autocast(OTHER.type, ...) acts on the CPU, where OTHER's values are computed."""

    def __init__(self, device_type, *args, **kwargs):
        super().__init__("cpu" if device_type == OTHER.type else device_type, *args, **kwargs)


def _autocast_query(real):
    """torch.is_autocast_enabled / get_autocast_dtype asked about OTHER answer for the CPU."""
    def query(device_type=None, *args):
        if device_type is None:
            return real()
        return real("cpu" if device_type == OTHER.type else device_type, *args)
    return query


@contextlib.contextmanager
def on_other_device():
    """Inside: OTHER behaves as a GPU (see the module's docstring); outside, nothing changes."""
    torch.Generator, torch.autocast = ClaimingGenerator, _Autocast
    for name, real in _REAL_AUTOCAST_QUERIES.items():
        setattr(torch, name, _autocast_query(real))
    try:
        with _Checks(), _Dispatch():
            yield
    finally:
        torch.Generator, torch.autocast = _RealGenerator, _RealAutocast
        for name, real in _REAL_AUTOCAST_QUERIES.items():
            setattr(torch, name, real)


class _Dispatch(TorchDispatchMode):
    """The aten-level half: also factories that torch's C++ side calls with OTHER's device."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})
