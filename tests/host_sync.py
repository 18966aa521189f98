"""A recorder of the operations that make the host wait for the device, for tests that show a
step of the plugin has none.

On a GPU these ops block the CPU until the device catches up: ``nonzero`` (and what calls it:
boolean-mask indexing, ``masked_select``, ``unique``), reading a scalar (``item``,
``_local_scalar_dense``, ``bool()`` of a tensor), ``repeat_interleave`` without ``output_size``,
and copies of device tensors to the host. The ops are recorded with a ``TorchDispatchMode``, so
the test runs on CPU. A CPU tensor copied "to the host" is no op at all, so copies are caught at
the Python level instead: ``numpy()``, ``tolist()``, ``cpu()`` and ``to("cpu")`` of a tensor that
an op inside the recorder produced (device data on a GPU) are recorded too; on a GPU a
``_to_copy`` / ``copy_`` from a device tensor into a CPU one is also caught where it happens.
``torch.tensor(data, device=...)`` is recorded as well: on a GPU it uploads from pageable host
memory and waits for the copy.

    with HostSyncRecorder() as rec:
        runner.step(...)
    assert not rec.syncs, rec.syncs
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakTensorKeyDictionary

# ops that read device values back to the host whatever their arguments
_SYNC_OPS = {"nonzero", "nonzero_numpy", "argwhere", "_local_scalar_dense", "item", "is_nonzero", "masked_select",
             "_unique", "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive", "equal",
             "bincount", "histc", "allclose"}
_INDEX_OPS = {"index", "index_put", "index_put_", "_index_put_impl_", "_unsafe_index", "_unsafe_index_put"}
# ``torch.as_tensor`` of data the step was given (and a ``to`` that returns its input): not computed
_WRAPPING_OPS = {"lift_fresh", "lift_fresh_copy", "lift"}
_HOST_METHODS = ("numpy", "tolist", "cpu", "to")


def _is_mask(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)


def _targets_cpu(args, kwargs) -> bool:
    """Whether ``Tensor.to(*args, **kwargs)`` names the CPU as its device."""
    try:
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
    except Exception:  # noqa: BLE001 - not a form this parser knows: not a device move
        return False
    return device is not None and torch.device(device).type == "cpu"


class HostSyncRecorder(TorchDispatchMode):
    """Records, in ``syncs``, every op run inside it that would wait for the device on a GPU, as
    ``(op, why)`` pairs."""

    def __init__(self):
        super().__init__()
        self.syncs: list[tuple[str, str]] = []
        self.ops = 0
        self._computed = WeakTensorKeyDictionary()  # tensors produced by ops inside the recorder
        self._saved = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.ops += 1
        if name in _SYNC_OPS:
            self.syncs.append((str(func), "reads device values on the host"))
        elif name in _INDEX_OPS and any(_is_mask(i) for i in (args[1] if len(args) > 1 else ()) or ()):
            self.syncs.append((str(func), "boolean-mask indexing (a nonzero)"))
        elif name == "repeat_interleave" and isinstance(args[0], torch.Tensor) and args[0].dim() \
                and kwargs.get("output_size") is None and (len(args) < 4 or args[3] is None):
            self.syncs.append((str(func), "repeat_interleave without output_size"))
        elif name in ("_to_copy", "copy_"):
            src = args[1] if name == "copy_" else args[0]
            dst_cpu = (args[0].device.type == "cpu") if name == "copy_" else \
                torch.device(kwargs.get("device") or src.device).type == "cpu"
            if src.device.type not in ("cpu", "meta") and dst_cpu:
                self.syncs.append((str(func), "a device tensor copied to the host"))
        out = func(*args, **kwargs)
        if name in _WRAPPING_OPS or (name == "to" and out is args[0]):
            return out
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self._computed[t] = True
        return out

    def _host_copy(self, method: str, original):
        recorder = self

        def wrapper(tensor, *args, **kwargs):
            if tensor in recorder._computed and (method != "to" or _targets_cpu(args, kwargs)):
                recorder.syncs.append((f"Tensor.{method}", "a tensor computed in the step copied to the host"))
            return original(tensor, *args, **kwargs)

        return wrapper

    def _blocking_upload(self, original):
        recorder = self

        def wrapper(data, *args, **kwargs):
            if kwargs.get("device") is not None:
                recorder.syncs.append(("torch.tensor(device=...)", "a synchronous upload from pageable memory"))
            return original(data, *args, **kwargs)

        return wrapper

    def __enter__(self):
        for method in _HOST_METHODS:
            self._saved[method] = getattr(torch.Tensor, method)
            setattr(torch.Tensor, method, self._host_copy(method, self._saved[method]))
        self._saved["torch.tensor"] = torch.tensor
        torch.tensor = self._blocking_upload(torch.tensor)
        return super().__enter__()

    def __exit__(self, *exc):
        torch.tensor = self._saved.pop("torch.tensor")
        for method, original in self._saved.items():
            setattr(torch.Tensor, method, original)
        self._saved.clear()
        return super().__exit__(*exc)
