"""Write files in ``torch.save``'s zip format without torch, for the tests of the torch reader.

In: an object made of dicts, OrderedDicts, lists, tuples, numbers, strings and tensors, where a
tensor is a numpy array (saved contiguous, with its own storage) or a :class:`View` of a
:class:`Storage` (several views may share one storage: non-contiguous tensors, offsets).

Out: :func:`save` writes ``<root>/data.pkl`` (pickle protocol 2, through pickle's Python
pickler so that globals are written as GLOBAL opcodes without importing torch), the records
``.format_version``, ``.storage_alignment``, ``byteorder``, ``data/<key>`` per storage,
``version`` and ``.data/serialization_id``, stored uncompressed with every record's data at a
multiple of 64 bytes, in torch's order. ``data.pkl`` is byte for byte what torch 2.x writes for
the same object (``tests/test_convert_torchvision.py`` compares it with a real torch file);
the zip's framing differs in details the readers ignore (torch writes data descriptors and
zip64 end records, and a random serialization id).

What torch pickles for a tensor: ``torch._utils._rebuild_tensor_v2`` reduced with ``(storage,
offset, size, stride, False, OrderedDict())``, the storage being the persistent id
``('storage', torch.<Type>Storage, key, 'cpu', numel)``; ``parameter=True`` wraps it as
``torch._utils._rebuild_parameter(tensor, True, OrderedDict())`` as an ``nn.Parameter`` is.
"""
import collections
import io
import pickle
import struct
import zipfile

import numpy as np

# numpy dtype -> torch storage class name
STORAGE_NAMES = {
    np.dtype(np.float32): "FloatStorage", np.dtype(np.float16): "HalfStorage",
    np.dtype(np.float64): "DoubleStorage", np.dtype(np.int64): "LongStorage",
    np.dtype(np.int32): "IntStorage", np.dtype(np.int16): "ShortStorage",
    np.dtype(np.int8): "CharStorage", np.dtype(np.uint8): "ByteStorage",
    np.dtype(np.bool_): "BoolStorage",
}


class _GlobalMeta(type):
    """Metaclass of the stand-ins for torch globals: pickle's Python pickler sends classes to
    ``save_global``, which :class:`_Pickler` writes as a GLOBAL opcode of the given name."""


def torch_global(module, name):
    """A stand-in object that pickles as the global ``module.name``."""
    return _GlobalMeta(name, (object,), {"torch_module": module, "torch_name": name})


REBUILD_TENSOR = torch_global("torch._utils", "_rebuild_tensor_v2")
REBUILD_PARAMETER = torch_global("torch._utils", "_rebuild_parameter")
_STORAGE_TYPES = {}


def storage_type(name):
    if name not in _STORAGE_TYPES:
        _STORAGE_TYPES[name] = torch_global("torch", name)
    return _STORAGE_TYPES[name]


class Storage(object):
    """A 1-D storage: ``data`` a 1-D numpy array; ``type_name`` its torch storage class (taken
    from the dtype, or e.g. ``"BFloat16Storage"`` with uint16 bit patterns)."""

    def __init__(self, data, type_name=None):
        self.data = np.ascontiguousarray(data).reshape(-1)
        self.type_name = type_name or STORAGE_NAMES[self.data.dtype]


class View(object):
    """A tensor: ``size``/``stride`` (in elements) at ``offset`` into ``storage``."""

    def __init__(self, storage, offset, size, stride, parameter=False):
        self.storage, self.offset = storage, offset
        self.size, self.stride = tuple(size), tuple(stride)
        self.parameter = parameter

    def __reduce__(self):
        # fresh size / stride tuples, as torch builds them per tensor (pickle memoizes by
        # identity: a shared tuple object would be written as a memo reference)
        size, stride = tuple(int(n) for n in self.size), tuple(int(n) for n in self.stride)
        tensor = (REBUILD_TENSOR, (self.storage, self.offset, size, stride, False,
                                   collections.OrderedDict()))
        if self.parameter:
            return (REBUILD_PARAMETER, (_Reduced(tensor), True, collections.OrderedDict()))
        return tensor


class _Reduced(object):
    def __init__(self, rv):
        self.rv = rv

    def __reduce__(self):
        return self.rv


def as_view(array):
    """A numpy array -> a contiguous View on its own storage."""
    array = np.asarray(array)
    stride, step = [], 1
    for n in reversed(array.shape):
        stride.insert(0, step)
        step *= n
    return View(Storage(array), 0, array.shape, stride)


class _Pickler(pickle._Pickler):
    """Python pickler: stand-in globals as GLOBAL opcodes, storages as persistent ids."""

    def __init__(self, file, storages):
        super(_Pickler, self).__init__(file, protocol=2)
        self.storages = storages          # id(Storage) -> (key, Storage), in first-use order

    def persistent_id(self, obj):
        if not isinstance(obj, Storage):
            return None
        key, _ = self.storages.setdefault(id(obj), (str(len(self.storages)), obj))
        return ("storage", storage_type(obj.type_name), key, "cpu", obj.data.size)

    def save_global(self, obj, name=None):
        if isinstance(obj, _GlobalMeta):
            self.write(pickle.GLOBAL + obj.torch_module.encode() + b"\n"
                       + obj.torch_name.encode() + b"\n")
            self.memoize(obj)
            return
        super(_Pickler, self).save_global(obj, name)

    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, np.ndarray):
            obj = as_view(obj)
        super(_Pickler, self).save(obj, save_persistent_id)


def pickle_bytes(obj):
    """``(data.pkl bytes, [(key, Storage), ...])`` of ``obj`` as torch.save pickles it."""
    buf, storages = io.BytesIO(), collections.OrderedDict()
    _Pickler(buf, storages).dump(obj)
    return buf.getvalue(), list(storages.values())


def _aligned_record(zf, name, data, alignment=64):
    """Add a stored record whose data starts at a multiple of ``alignment`` (torch's padding:
    an extra field ``FB`` of ``Z`` bytes in the local header)."""
    info = zipfile.ZipInfo(name, date_time=(1980, 0, 0, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    start = zf.fp.tell() + 30 + len(name.encode())
    pad = (-(start + 4)) % alignment
    info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
    zf.writestr(info, data)


def save(obj, path, root=None, byteorder="little", serialization_id="0" * 40):
    """Write ``obj`` to ``path`` as ``torch.save(obj, path)`` would (module docstring).

    Args:
        obj: the object (dicts of numpy arrays / Views, nested containers).
        path: output file.
        root: the archive's folder name (torch uses the file name without extension).
        byteorder: ``"little"``, ``"big"`` (storage bytes are swapped) or None (no record).
        serialization_id: the 40 characters of ``.data/serialization_id``.

    Returns:
        the ``data.pkl`` bytes.
    """
    import os
    root = root or os.path.splitext(os.path.basename(path))[0]
    data, storages = pickle_bytes(obj)
    with zipfile.ZipFile(path, "w") as zf:
        _aligned_record(zf, root + "/data.pkl", data)
        _aligned_record(zf, root + "/.format_version", b"1")
        _aligned_record(zf, root + "/.storage_alignment", b"64")
        if byteorder is not None:
            _aligned_record(zf, root + "/byteorder", byteorder.encode())
        for key, storage in storages:
            values = storage.data
            if byteorder == "big":
                values = values.astype(values.dtype.newbyteorder(">"))
            _aligned_record(zf, "%s/data/%s" % (root, key), values.tobytes())
        _aligned_record(zf, root + "/version", b"3\n")
        _aligned_record(zf, root + "/.data/serialization_id", serialization_id.encode())
    return data
