"""Read a PyTorch ``torch.save(state_dict)`` file with the standard library and numpy, no torch.

    arrays, wrapper = load_state_dict("maskrcnn_resnet50_fpn_coco.pth")

In: a file in the zip format that ``torch.save`` writes since torch 1.6, holding a state dict or
a training checkpoint dict that holds one under ``"model"`` / ``"state_dict"``.

Out: ``(OrderedDict name -> numpy array, wrapper)``, in the state dict's order: contiguous
native-endian arrays of the tensor's dtype (bfloat16 becomes float32, exactly); ``wrapper`` is
``None`` for a bare state dict, else the key that held it. The pickle is read by a restricted
unpickler that imports and executes nothing (:class:`_StateDictUnpickler`). Anything else is a
:class:`~mxmask.utils.UserError` ``"<path>: not a torch state_dict file (<reason>)"``.
"""
import collections
import io
import os
import pickle
import zipfile

import numpy as np

from ..utils import UserError

__all__ = ["load_state_dict", "STORAGE_DTYPES"]

# torch storage class name -> (numpy dtype of the stored bytes, little-endian; numpy dtype of
# the returned array). bfloat16 is stored as 16-bit patterns and widened to float32.
STORAGE_DTYPES = {
    "FloatStorage": ("<f4", np.float32),
    "HalfStorage": ("<f2", np.float16),
    "BFloat16Storage": ("<u2", np.float32),
    "DoubleStorage": ("<f8", np.float64),
    "LongStorage": ("<i8", np.int64),
    "IntStorage": ("<i4", np.int32),
    "ShortStorage": ("<i2", np.int16),
    "CharStorage": ("i1", np.int8),
    "ByteStorage": ("u1", np.uint8),
    "BoolStorage": ("?", np.bool_),
}
# torch.<dtype> globals that may appear as arguments (newer torch versions), as markers
_TORCH_DTYPE_NAMES = ("float32", "float", "float16", "half", "bfloat16", "float64", "double",
                      "int64", "long", "int32", "int", "int16", "short", "int8", "uint8", "bool")
_REBUILD_FUNCTIONS = ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter",
                      "_rebuild_parameter_with_state")
# the pickle header of torch's legacy (pre-1.6, non-zip) format: protocol 2, then the magic
# number 0x1950a86a20f9469cfc6c as a LONG1
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


class _Refused(Exception):
    """A reason the file is not a readable state dict (becomes the UserError's parenthesis)."""


class _Opaque(object):
    """An object of a class the reader does not load: absorbs whatever the pickle does to it."""
    qualname = "?"

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


def _opaque_class(module, name):
    """A fresh :class:`_Opaque` subclass standing for the global ``module.name``."""
    return type(str(name), (_Opaque,), {"qualname": "%s.%s" % (module, name)})


class _Record(object):
    """Base of the reader's own records: a pickle may not change them (BUILD)."""

    def __setstate__(self, state):
        raise _Refused("the pickle sets the state of a %s" % type(self).__name__.strip("_"))


class _StorageType(_Record):
    """Marker for ``torch.<Name>Storage`` (supported or not)."""

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return "torch." + self.name


class _DType(_Record):
    """Marker for a ``torch.<dtype>`` global."""

    def __init__(self, name):
        self.name = name


class _Storage(_Record):
    """A storage the pickle refers to: read from ``data/<key>`` only when a tensor needs it."""

    def __init__(self, storage_type, key, numel):
        self.storage_type, self.key, self.numel = storage_type, key, numel


class _Tensor(_Record):
    """What ``_rebuild_tensor_v2`` records: a strided view of a storage."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def _int_tuple(value, what):
    """``value`` as a tuple of ints, or _Refused naming the tensor field ``what``."""
    if not isinstance(value, (tuple, list)) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise _Refused("a tensor's %s is %r, not a tuple of integers" % (what, value))
    return tuple(value)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    """``torch._utils._rebuild_tensor(_v2)``: record the view, read nothing yet."""
    if not isinstance(storage, _Storage):
        raise _Refused("a tensor's storage is %s, not a storage record" % type(storage).__name__)
    if not isinstance(storage_offset, int):
        raise _Refused("a tensor's storage offset is %r" % (storage_offset,))
    size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(size) != len(stride):
        raise _Refused("a tensor has size %s but stride %s" % (size, stride))
    return _Tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *unused):
    """``torch._utils._rebuild_parameter(_with_state)``: a Parameter is its tensor here."""
    if not isinstance(data, _Tensor):
        raise _Refused("a parameter's data is %s, not a tensor" % type(data).__name__)
    return data


class _StateDictUnpickler(pickle.Unpickler):
    """The restricted unpickler of ``data.pkl``.

    The pickle refers to storages by persistent ids ``('storage', <torch.FloatStorage class>,
    key, location, numel)`` and rebuilds tensors with ``torch._utils._rebuild_tensor_v2(storage,
    offset, size, stride, requires_grad, hooks[, metadata])``. ``find_class`` resolves only
    ``collections.OrderedDict`` and the tensor rebuild functions (re-implemented here, they only
    record storage, offset, size and stride); storage classes and ``torch.<dtype>`` names become
    inert markers. Any other global (an ``argparse.Namespace`` of a checkpoint's ``args``, a
    whole pickled ``nn.Module``) becomes an inert placeholder that only records its name:
    nothing is imported or executed, and the file is refused if such an object is where the
    state dict should be.
    """

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name in _REBUILD_FUNCTIONS:
            return _rebuild_parameter if "parameter" in name else _rebuild_tensor
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name)
        if module == "torch" and name in _TORCH_DTYPE_NAMES:
            return _DType(name)
        return _opaque_class(module, name)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _Refused("unknown persistent id %.60r" % (pid,))
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise _Refused("storage of type %s" % getattr(storage_type, "qualname",
                                                           type(storage_type).__name__))
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise _Refused("bad storage record %.60r" % (pid,))
        return _Storage(storage_type, key, numel)


def _is_state_dict(obj):
    """A non-empty dict of str -> tensor record."""
    return (isinstance(obj, dict) and len(obj) > 0
            and all(isinstance(k, str) for k in obj)
            and all(isinstance(v, _Tensor) for v in obj.values()))


def _describe(obj):
    """``obj`` in a few words, for a refusal's reason."""
    if isinstance(obj, _Opaque):
        return "a pickled %s object" % obj.qualname
    if isinstance(obj, _Tensor):
        return "a single tensor"
    return "a %s" % type(obj).__name__


def _choose_state_dict(obj):
    """The state dict inside the unpickled object -> (dict, wrapper key or None)."""
    if _is_state_dict(obj):
        return obj, None
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if key in obj and _is_state_dict(obj[key]):
                return obj[key], key
        for key in ("model", "state_dict"):
            if key in obj:
                raise _Refused("its %r entry is %s, not a name -> tensor dict"
                               % (key, _describe(obj[key])))
        bad = [k for k, v in obj.items() if not isinstance(v, _Tensor)]
        if not obj:
            raise _Refused("an empty dict")
        if any(not isinstance(k, str) for k in obj):
            raise _Refused("a dict with non-string keys")
        if len(bad) < len(obj):
            raise _Refused("entries that are not tensors: %s"
                           % ", ".join("%s (%s)" % (k, _describe(obj[k])) for k in bad[:3]))
        raise _Refused("a dict without tensors and without a 'model' or 'state_dict' entry "
                       "(keys: %s)" % ", ".join(map(str, list(obj)[:6])))
    hint = "; save model.state_dict() instead" if isinstance(obj, _Opaque) else ""
    raise _Refused("holds %s, not a state_dict%s" % (_describe(obj), hint))


def _materialize(tensor, read_blob, big_endian):
    """A recorded view -> a contiguous numpy array (bounds checked against the storage)."""
    storage = tensor.storage
    name = storage.storage_type.name
    if name not in STORAGE_DTYPES:
        raise _Refused("unsupported tensor type torch.%s" % name)
    stored, result = STORAGE_DTYPES[name]
    dtype = np.dtype(stored)
    if big_endian:
        dtype = dtype.newbyteorder(">")
    blob = read_blob(storage.key)
    if len(blob) < storage.numel * dtype.itemsize:
        raise _Refused("storage data/%s holds %d bytes, expected %d (truncated?)"
                       % (storage.key, len(blob), storage.numel * dtype.itemsize))
    flat = np.frombuffer(blob, dtype=dtype, count=storage.numel)
    size, stride, offset = tensor.size, tensor.stride, tensor.offset
    if any(s < 0 for s in size) or any(s < 0 for s in stride) or offset < 0:
        raise _Refused("negative size, stride or offset (%s, %s, %d)" % (size, stride, offset))
    if 0 in size:
        values = np.zeros(size, dtype=dtype)
    else:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.numel:
            raise _Refused("a tensor of size %s, stride %s, offset %d reaches past its storage "
                           "of %d elements" % (size, stride, offset, storage.numel))
        values = np.lib.stride_tricks.as_strided(
            flat[offset:], shape=size, strides=[s * dtype.itemsize for s in stride],
            writeable=False)
    if name == "BFloat16Storage":            # the high half of a float32
        return (values.astype(np.uint32) << 16).view(np.float32)
    return np.array(values, dtype=result, order="C")        # a copy that owns its memory


def _archive_root(zf):
    """The folder holding ``data.pkl`` (torch names it after the file)."""
    names = zf.namelist()
    pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if not pickles:
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            raise _Refused("a TorchScript archive (torch.jit.save), not a torch.save file")
        raise _Refused("a zip archive without <folder>/data.pkl")
    if len(pickles) > 1:
        raise _Refused("a zip archive with several data.pkl: %s" % ", ".join(pickles[:3]))
    root = pickles[0][:-len("data.pkl")]
    if root + "constants.pkl" in names:
        raise _Refused("a TorchScript archive (torch.jit.save), not a torch.save file")
    return root


def _read(path):
    """The body of :func:`load_state_dict`; raises _Refused (or anything a malformed file
    makes the zip, pickle or numpy code raise)."""
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(len(_LEGACY_MAGIC))
        if head == _LEGACY_MAGIC:
            raise _Refused("torch's legacy pre-1.6 format; re-save it with torch >= 1.6: "
                           "torch.save(torch.load(f), f2)")
        if head[:1] == b"\x80":
            raise _Refused("a plain pickle, not torch's zip format")
        raise _Refused("not a zip archive")
    with zipfile.ZipFile(path) as zf:
        root = _archive_root(zf)
        names = set(zf.namelist())
        byteorder = zf.read(root + "byteorder").strip() if root + "byteorder" in names \
            else b"little"
        if byteorder not in (b"little", b"big"):
            raise _Refused("unknown byteorder %.20r" % byteorder)
        obj = _StateDictUnpickler(io.BytesIO(zf.read(root + "data.pkl"))).load()
        state, wrapper = _choose_state_dict(obj)
        last = {}            # the storage read last: views of one storage are usually adjacent

        def read_blob(key):
            if key not in last:
                member = root + "data/" + key
                if member not in names:
                    raise _Refused("the storage record %s is missing" % member)
                last.clear()
                last[key] = zf.read(member)
            return last[key]

        arrays = collections.OrderedDict(
            (name, _materialize(t, read_blob, byteorder == b"big")) for name, t in state.items())
    return arrays, wrapper


def load_state_dict(path):
    """Read a ``torch.save`` file holding a state dict (or a checkpoint dict wrapping one).

    The zip archive holds one folder ``<root>/`` with ``data.pkl`` (a protocol-2 pickle of the
    object, read by :class:`_StateDictUnpickler`), ``data/<key>`` (one raw blob per storage),
    ``byteorder`` (``little`` or ``big``; little when absent) and ``version``. Tensor data is
    read only for the chosen state dict, each view checked against its storage's size.

    Args:
        path: the ``.pth`` / ``.pt`` file.

    Returns:
        ``(arrays, wrapper)``: an OrderedDict ``name -> numpy array`` (contiguous, native
        endian, of the tensor's dtype: float32, float16, float64, int64, int32, int16, int8,
        uint8, bool; bfloat16 becomes float32, exactly) and ``None``, or the key (``"model"``
        or ``"state_dict"``) under which a checkpoint dict (as torchvision's reference
        scripts save) holds the state dict.

    Raises:
        UserError: one line, ``"<path>: not a torch state_dict file (<reason>)"`` (not a zip,
        a legacy pre-1.6 torch file, a TorchScript archive, truncated data, out-of-range
        strides, no state dict inside), or ``not found`` / ``is a folder``.
    """
    if not os.path.exists(path):
        raise UserError("%s: torch file not found" % path)
    if not os.path.isfile(path):
        raise UserError("%s: is a folder, expected a .pth file" % path)
    try:
        return _read(path)
    except _Refused as e:
        reason = str(e)
    except Exception as e:    # malformed input of any kind: zip, pickle or numpy errors
        reason = "%s: %s" % (type(e).__name__, str(e).strip().splitlines()[0] if str(e).strip()
                             else "")
        reason = reason.rstrip(": ")
    raise UserError("%s: not a torch state_dict file (%s)" % (path, reason[:300]))
