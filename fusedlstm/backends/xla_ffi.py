"""XLA FFI handlers written in Python: CPU custom calls over NumPy views.

`register_cpu_target(name, handler)` registers `handler(args, results,
attrs)` as the XLA custom call `name` on the CPU, for `jax.ffi.ffi_call`.
`args` and `results` are NumPy arrays over XLA's own buffers (no copies):
the handler reads `args` and writes every element of `results`. `attrs` maps
the call's keyword attributes (int32 scalars) to Python ints.

The handler is a ctypes callback (the layout below is `xla/ffi/api/c_api.h`,
API version 0.1): XLA calls it on one of its threads, holding no Python
lock; ctypes takes the GIL for the call. A Python exception becomes an XLA
error carrying its message, which JAX raises where the result is read.
"""

import ctypes
import traceback

import jax
import numpy as np

_METADATA_EXTENSION = 1
_STAGE_EXECUTE = 3
_ATTR_SCALAR = 3
_ERROR_INTERNAL = 13
_DTYPES = {1: np.bool_, 4: np.int32, 11: np.float32}  # XLA_FFI_DataType codes


class _ExtensionBase(ctypes.Structure):
    pass


_ExtensionBase._fields_ = [
    ("struct_size", ctypes.c_size_t),
    ("type", ctypes.c_int),
    ("next", ctypes.POINTER(_ExtensionBase)),
]


class _ApiVersion(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", ctypes.c_void_p),
        ("major_version", ctypes.c_int),
        ("minor_version", ctypes.c_int),
    ]


class _Metadata(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("api_version", _ApiVersion),
        ("traits", ctypes.c_uint32),
    ]


class _MetadataExtension(ctypes.Structure):
    _fields_ = [("extension_base", _ExtensionBase), ("metadata", ctypes.POINTER(_Metadata))]


class _Buffer(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", ctypes.c_void_p),
        ("dtype", ctypes.c_int),
        ("data", ctypes.c_void_p),
        ("rank", ctypes.c_int64),
        ("dims", ctypes.POINTER(ctypes.c_int64)),
    ]


class _Buffers(ctypes.Structure):
    """`XLA_FFI_Args` and `XLA_FFI_Rets` share this layout."""

    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", ctypes.c_void_p),
        ("size", ctypes.c_int64),
        ("types", ctypes.POINTER(ctypes.c_int)),
        ("buffers", ctypes.POINTER(ctypes.POINTER(_Buffer))),
    ]


class _ByteSpan(ctypes.Structure):
    _fields_ = [("ptr", ctypes.POINTER(ctypes.c_char)), ("len", ctypes.c_size_t)]


class _Scalar(ctypes.Structure):
    _fields_ = [("dtype", ctypes.c_int), ("value", ctypes.c_void_p)]


class _Attrs(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", ctypes.c_void_p),
        ("size", ctypes.c_int64),
        ("types", ctypes.POINTER(ctypes.c_int)),
        ("names", ctypes.POINTER(ctypes.POINTER(_ByteSpan))),
        ("attrs", ctypes.POINTER(ctypes.c_void_p)),
    ]


class _ErrorCreateArgs(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", ctypes.c_void_p),
        ("message", ctypes.c_char_p),
        ("errc", ctypes.c_int),
    ]


_ErrorCreate = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(_ErrorCreateArgs))


class _Api(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", ctypes.c_void_p),
        ("api_version", _ApiVersion),
        ("internal_api", ctypes.c_void_p),
        ("error_create", _ErrorCreate),
    ]


class _CallFrame(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", ctypes.POINTER(_ExtensionBase)),
        ("api", ctypes.POINTER(_Api)),
        ("ctx", ctypes.c_void_p),
        ("stage", ctypes.c_int),
        ("args", _Buffers),
        ("rets", _Buffers),
        ("attrs", _Attrs),
        ("future", ctypes.c_void_p),
    ]


_Handler = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(_CallFrame))

# XLA keeps the handlers' addresses: their ctypes callbacks must live as long.
_REGISTERED = {}


def register_cpu_target(name, handler):
    """Registers `handler(args, results, attrs)` as the CPU custom call `name`.

    Registering the same name again is a no-op.
    """
    if name in _REGISTERED:
        return
    callback = _Handler(lambda frame: _call(handler, frame))
    _REGISTERED[name] = callback
    address = ctypes.cast(callback, ctypes.c_void_p).value
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(address), platform="cpu")


def _call(handler, frame_pointer):
    frame = frame_pointer.contents
    if _answer_metadata_query(frame):
        return None
    if frame.stage != _STAGE_EXECUTE:
        return None
    try:
        handler(_arrays(frame.args), _arrays(frame.rets), _scalar_attrs(frame.attrs))
    except Exception:  # noqa: BLE001 -- every error must reach XLA, never unwind through C
        return _error(frame, traceback.format_exc())
    return None


def _answer_metadata_query(frame):
    """Answers XLA's registration-time question for the API version; True if asked."""
    extension = frame.extension_start
    while extension:
        if extension.contents.type == _METADATA_EXTENSION:
            metadata = ctypes.cast(extension, ctypes.POINTER(_MetadataExtension)).contents
            metadata.metadata.contents.api_version.major_version = 0
            metadata.metadata.contents.api_version.minor_version = 1
            metadata.metadata.contents.traits = 0
            return True
        extension = extension.contents.next
    return False


def _arrays(buffers):
    return [_as_numpy(buffers.buffers[i].contents) for i in range(buffers.size)]


def _as_numpy(buffer):
    """A writable NumPy view of one XLA buffer (dense, row-major)."""
    dtype = np.dtype(_DTYPES[buffer.dtype])
    shape = tuple(buffer.dims[d] for d in range(buffer.rank))
    size = int(np.prod(shape, dtype=np.int64))
    if size == 0:
        return np.empty(shape, dtype)
    memory = (ctypes.c_char * (size * dtype.itemsize)).from_address(buffer.data)
    return np.frombuffer(memory, dtype).reshape(shape)


def _scalar_attrs(attrs):
    values = {}
    for i in range(attrs.size):
        if attrs.types[i] != _ATTR_SCALAR:
            raise ValueError(f"Expected only scalar attributes. Received type {attrs.types[i]}")
        span = attrs.names[i].contents
        scalar = ctypes.cast(attrs.attrs[i], ctypes.POINTER(_Scalar)).contents
        if scalar.dtype != 4:
            raise ValueError(f"Expected int32 attributes. Received dtype code {scalar.dtype}")
        values[ctypes.string_at(span.ptr, span.len).decode()] = ctypes.cast(
            scalar.value, ctypes.POINTER(ctypes.c_int32)).contents.value
    return values


def _error(frame, message):
    args = _ErrorCreateArgs(ctypes.sizeof(_ErrorCreateArgs), None,
                            message.encode("utf-8", "replace"), _ERROR_INTERNAL)
    return frame.api.contents.error_create(ctypes.byref(args))
