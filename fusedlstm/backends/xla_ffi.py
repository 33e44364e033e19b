"""XLA FFI handlers written in Python: CPU custom calls over NumPy views.

`register_cpu_target(name, handler)` registers `handler(args, results,
attrs)` as the XLA custom call `name` on the CPU, for `jax.ffi.ffi_call`.
`args` and `results` are NumPy arrays over XLA's own buffers (no copies):
the handler reads `args` and writes every element of `results`. `attrs` maps
the call's keyword attributes (int32 scalars) to Python ints.

The handler is a ctypes callback: XLA calls it on one of its threads,
holding no Python lock; ctypes takes the GIL for the call. A Python exception
becomes an XLA error carrying its message, which JAX raises where the result
is read.

The structs below mirror `xla/ffi/api/c_api.h` by hand, as shipped with jaxlib
`CHECKED_JAX_VERSION` (XLA FFI API `CHECKED_API_VERSION`); `setup.py` pins jax
below the next minor version. Nothing checks that layout at build time, so
every call checks it at run time: the caller's API major version, and the
`struct_size` of every struct read or written (each at least what this module
reads; XLA only appends fields within a major version). A mismatch returns an
XLA error naming the struct and both sizes, before any buffer is touched. Only
a frame too small to hold the API pointer, or an API table without
`XLA_FFI_Error_Create`, cannot be answered with an error: then the process
aborts with a message rather than run on a misread layout.
"""

import ctypes
import os
import sys
import traceback

import jax
import numpy as np

CHECKED_JAX_VERSION = "0.10"  # jax/jaxlib major.minor whose c_api.h these structs mirror
CHECKED_API_VERSION = (0, 3)  # XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR in that c_api.h
_HANDLER_API_VERSION = (0, 1)  # what the handler declares it needs (the metadata answer)

_METADATA_EXTENSION = 1
_STAGE_EXECUTE = 3
_ATTR_SCALAR = 3
_BUFFER_TYPE = 1  # XLA_FFI_ArgType_BUFFER and XLA_FFI_RetType_BUFFER
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
    _require_error_channel(frame)
    try:
        problem = _api_mismatch(frame)
        if problem:
            return _error(frame, problem)
        if _answer_metadata_query(frame):
            return None
        if frame.stage != _STAGE_EXECUTE:
            return None
        problem = _frame_mismatch(frame)
        if problem:
            return _error(frame, problem)
        handler(_arrays(frame.args), _arrays(frame.rets), _scalar_attrs(frame.attrs))
    except Exception:  # noqa: BLE001 -- every error must reach XLA, never unwind through C
        return _error(frame, traceback.format_exc())
    return None


def _end(structure, field):
    """The C `XLA_FFI_STRUCT_SIZE(structure, field)`: bytes up to the end of `field`."""
    descriptor = getattr(structure, field)
    return descriptor.offset + descriptor.size


_FRAME_API_END = _end(_CallFrame, "api")
_API_ERROR_CREATE_END = _end(_Api, "error_create")
# What this module reads of each struct: C's `<name>_STRUCT_SIZE` (up to the end
# of the last field XLA declares, not padded), each struct's last field read here.
_STRUCT_SIZES = {
    "XLA_FFI_CallFrame": _end(_CallFrame, "attrs"),
    "XLA_FFI_Api_Version": _end(_ApiVersion, "minor_version"),
    "XLA_FFI_Args": _end(_Buffers, "buffers"),
    "XLA_FFI_Rets": _end(_Buffers, "buffers"),
    "XLA_FFI_Attrs": _end(_Attrs, "attrs"),
    "XLA_FFI_Buffer": _end(_Buffer, "dims"),
    "XLA_FFI_Extension_Base": _end(_ExtensionBase, "next"),
    "XLA_FFI_Metadata_Extension": _end(_MetadataExtension, "metadata"),
    "XLA_FFI_Metadata": _end(_Metadata, "traits"),
}


def _require_error_channel(frame):
    """Aborts when the frame cannot even carry an error back (see the module docstring)."""
    if (frame.struct_size >= _FRAME_API_END and frame.api
            and frame.api.contents.struct_size >= _API_ERROR_CREATE_END):
        return
    sys.stderr.write(
        "fusedlstm: the XLA FFI call frame or API table is smaller than the layout of "
        f"jax {CHECKED_JAX_VERSION} (XLA_FFI_CallFrame struct_size {frame.struct_size}, "
        f"needs >= {_FRAME_API_END}), so no error can be returned to XLA. Install "
        f"jax=={CHECKED_JAX_VERSION}.* (setup.py pins it) or update "
        "fusedlstm/backends/xla_ffi.py.\n")
    sys.stderr.flush()
    os.abort()


def _size_mismatch(name, struct_size):
    """A message when `struct_size` is smaller than what this module reads of `name`."""
    needed = _STRUCT_SIZES[name]
    if struct_size < needed:
        return (f"fusedlstm's XLA FFI handler expected {name} struct_size >= {needed} "
                f"(the layout of jax {CHECKED_JAX_VERSION}, XLA FFI API "
                f"{CHECKED_API_VERSION[0]}.{CHECKED_API_VERSION[1]}). Received: struct_size="
                f"{struct_size}. This jax is not supported: install jax=="
                f"{CHECKED_JAX_VERSION}.* (setup.py pins it).")
    return None


def _api_mismatch(frame):
    """A message when the caller's API version or frame layout is not the one mirrored here."""
    problem = _size_mismatch("XLA_FFI_CallFrame", frame.struct_size)
    if problem:
        return problem
    version = frame.api.contents.api_version
    problem = _size_mismatch("XLA_FFI_Api_Version", version.struct_size)
    if problem:
        return problem
    if (version.major_version != CHECKED_API_VERSION[0]
            or version.minor_version < _HANDLER_API_VERSION[1]):
        return (f"fusedlstm's XLA FFI handler expected XLA FFI API version "
                f"{CHECKED_API_VERSION[0]}.x with x >= {_HANDLER_API_VERSION[1]} (checked "
                f"against {CHECKED_API_VERSION[0]}.{CHECKED_API_VERSION[1]}, jax "
                f"{CHECKED_JAX_VERSION}). Received: {version.major_version}."
                f"{version.minor_version}. Install jax=={CHECKED_JAX_VERSION}.*.")
    return None


def _frame_mismatch(frame):
    """A message when an argument, result or attribute struct is smaller than read here."""
    for name, buffers in (("XLA_FFI_Args", frame.args), ("XLA_FFI_Rets", frame.rets)):
        problem = _size_mismatch(name, buffers.struct_size)
        if problem:
            return problem
        for i in range(buffers.size):
            if buffers.types[i] != _BUFFER_TYPE:
                return (f"fusedlstm's XLA FFI handler expected only buffers in {name}. "
                        f"Received: type code {buffers.types[i]} at position {i}")
            problem = _size_mismatch("XLA_FFI_Buffer", buffers.buffers[i].contents.struct_size)
            if problem:
                return f"{name}[{i}]: {problem}"
    return _size_mismatch("XLA_FFI_Attrs", frame.attrs.struct_size)


def _answer_metadata_query(frame):
    """Answers XLA's registration-time question for the API version; True if asked.

    Raises:
        ValueError: the extension or metadata struct is smaller than written here.
    """
    extension = frame.extension_start
    while extension:
        base = extension.contents
        problem = _size_mismatch("XLA_FFI_Extension_Base", base.struct_size)
        if problem:
            raise ValueError(problem)
        if base.type == _METADATA_EXTENSION:
            problem = _size_mismatch("XLA_FFI_Metadata_Extension", base.struct_size)
            metadata = ctypes.cast(extension, ctypes.POINTER(_MetadataExtension)).contents
            problem = problem or _size_mismatch("XLA_FFI_Metadata",
                                                metadata.metadata.contents.struct_size)
            problem = problem or _size_mismatch(
                "XLA_FFI_Api_Version", metadata.metadata.contents.api_version.struct_size)
            if problem:
                raise ValueError(problem)
            metadata.metadata.contents.api_version.major_version = _HANDLER_API_VERSION[0]
            metadata.metadata.contents.api_version.minor_version = _HANDLER_API_VERSION[1]
            metadata.metadata.contents.traits = 0
            return True
        extension = base.next
    return False


def _arrays(buffers):
    return [_as_numpy(buffers.buffers[i].contents) for i in range(buffers.size)]


# Views made so far, by (address, dtype code, shape): XLA hands the same buffers
# to call after call, and a view costs microseconds to make. A view is looked up
# only for a buffer XLA is passing now, so it always covers live memory.
_VIEWS = {}
_MAX_VIEWS = 4096


def _as_numpy(buffer):
    """A writable NumPy view of one XLA buffer (dense, row-major)."""
    shape = tuple(buffer.dims[d] for d in range(buffer.rank))
    key = (buffer.data, buffer.dtype, shape)
    view = _VIEWS.get(key)
    if view is None:
        view = _new_view(buffer.data, np.dtype(_DTYPES[buffer.dtype]), shape)
        if len(_VIEWS) >= _MAX_VIEWS:
            _VIEWS.clear()
        _VIEWS[key] = view
    return view


def _new_view(address, dtype, shape):
    size = int(np.prod(shape, dtype=np.int64))
    if size == 0:
        return np.empty(shape, dtype)
    memory = (ctypes.c_char * (size * dtype.itemsize)).from_address(address)
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
