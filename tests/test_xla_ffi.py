"""The XLA FFI handler checks the ABI it was written against on every call, and
setup.py's jax pin stays on the version that was checked."""

import ctypes
import os
import re

import numpy as np
import pytest

pytest.importorskip("jax")

from fusedlstm.backends import xla_ffi  # noqa: E402

BACKEND_INDEPENDENT = True  # see conftest.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ERROR = 0x1234  # what the fake XLA_FFI_Error_Create returns


class FakeXla:
    """A call frame as jaxlib 0.10 builds one: one f32[3] argument, one f32[3] result,
    one int32 attribute; `error_create` records the messages."""

    def __init__(self):
        self.messages = []

        def error_create(args):
            self.messages.append(args.contents.message.decode())
            return ERROR

        self._error_create = xla_ffi._ErrorCreate(error_create)
        self.api = xla_ffi._Api(struct_size=192, api_version=xla_ffi._ApiVersion(24, None, 0, 3),
                                error_create=self._error_create)
        self.x = np.arange(3, dtype=np.float32)
        self.y = np.zeros(3, np.float32)
        self.dims = (ctypes.c_int64 * 1)(3)
        self.buffers = [xla_ffi._Buffer(48, None, 11, a.ctypes.data, 1, self.dims)
                        for a in (self.x, self.y)]
        self.types = (ctypes.c_int * 1)(1)
        self.arg_list = (ctypes.POINTER(xla_ffi._Buffer) * 1)(ctypes.pointer(self.buffers[0]))
        self.ret_list = (ctypes.POINTER(xla_ffi._Buffer) * 1)(ctypes.pointer(self.buffers[1]))
        self.value = ctypes.c_int32(2)
        self.scalar = xla_ffi._Scalar(4, ctypes.cast(ctypes.pointer(self.value), ctypes.c_void_p))
        self.name = b"scale"
        self.span = xla_ffi._ByteSpan(ctypes.cast(ctypes.c_char_p(self.name),
                                                  ctypes.POINTER(ctypes.c_char)), len(self.name))
        self.attr_types = (ctypes.c_int * 1)(3)
        self.names = (ctypes.POINTER(xla_ffi._ByteSpan) * 1)(ctypes.pointer(self.span))
        self.attrs = (ctypes.c_void_p * 1)(ctypes.cast(ctypes.pointer(self.scalar),
                                                       ctypes.c_void_p))
        self.frame = xla_ffi._CallFrame(
            struct_size=168, api=ctypes.pointer(self.api), stage=3,
            args=xla_ffi._Buffers(40, None, 1, self.types, self.arg_list),
            rets=xla_ffi._Buffers(40, None, 1, self.types, self.ret_list),
            attrs=xla_ffi._Attrs(48, None, 1, self.attr_types, self.names, self.attrs))
        self.calls = []

    def handler(self, args, results, attrs):
        self.calls.append(attrs)
        results[0][...] = args[0] * attrs["scale"]

    def call(self):
        return xla_ffi._call(self.handler, ctypes.pointer(self.frame))


def test_a_well_formed_frame_runs_the_handler():
    xla = FakeXla()
    assert xla.call() is None
    assert xla.calls == [{"scale": 2}] and xla.messages == []
    np.testing.assert_array_equal(xla.y, [0, 2, 4])


SPOILED = {
    "api_major": (lambda x: setattr(x.api.api_version, "major_version", 1),
                  r"API version 0.x.*Received: 1.3"),
    "api_version_size": (lambda x: setattr(x.api.api_version, "struct_size", 16),
                         r"XLA_FFI_Api_Version struct_size >= 24.*Received: struct_size=16"),
    "call_frame_size": (lambda x: setattr(x.frame, "struct_size", 160),
                        r"XLA_FFI_CallFrame struct_size >= 168.*Received: struct_size=160"),
    "args_size": (lambda x: setattr(x.frame.args, "struct_size", 32),
                  r"XLA_FFI_Args struct_size >= 40"),
    "rets_size": (lambda x: setattr(x.frame.rets, "struct_size", 24),
                  r"XLA_FFI_Rets struct_size >= 40"),
    "attrs_size": (lambda x: setattr(x.frame.attrs, "struct_size", 40),
                   r"XLA_FFI_Attrs struct_size >= 48"),
    "buffer_size": (lambda x: setattr(x.buffers[1], "struct_size", 40),
                    r"XLA_FFI_Rets\[0\]: .*XLA_FFI_Buffer struct_size >= 48"),
    "not_a_buffer": (lambda x: x.types.__setitem__(0, 2), r"only buffers in XLA_FFI_Args"),
}


@pytest.mark.parametrize("case", sorted(SPOILED))
def test_a_mismatch_returns_an_xla_error_and_touches_nothing(case):
    xla = FakeXla()
    spoil, message = SPOILED[case]
    spoil(xla)
    assert xla.call() == ERROR
    assert xla.calls == [] and not xla.y.any()
    assert len(xla.messages) == 1 and re.search(message, xla.messages[0]), xla.messages


def metadata_query(xla, metadata_size):
    metadata = xla_ffi._Metadata(metadata_size, xla_ffi._ApiVersion(24, None, 0, 0), 7)
    extension = xla_ffi._MetadataExtension(xla_ffi._ExtensionBase(32, 1, None),
                                           ctypes.pointer(metadata))
    xla.frame.extension_start = ctypes.cast(ctypes.pointer(extension),
                                            ctypes.POINTER(xla_ffi._ExtensionBase))
    return xla.call(), metadata, extension


def test_the_metadata_query_is_answered_and_checked():
    xla = FakeXla()
    result, metadata, _ = metadata_query(xla, 36)
    assert result is None and xla.calls == []
    assert (metadata.api_version.major_version, metadata.api_version.minor_version,
            metadata.traits) == (0, 1, 0)
    xla = FakeXla()
    result, metadata, _ = metadata_query(xla, 32)
    assert result == ERROR and metadata.traits == 7
    assert "XLA_FFI_Metadata struct_size >= 36" in xla.messages[0]


def test_struct_sizes_are_those_of_c_api_h():
    """The sizes XLA passes (C's *_STRUCT_SIZE: up to the end of the last field)."""
    assert xla_ffi._STRUCT_SIZES == {
        "XLA_FFI_CallFrame": 168, "XLA_FFI_Api_Version": 24, "XLA_FFI_Args": 40,
        "XLA_FFI_Rets": 40, "XLA_FFI_Attrs": 48, "XLA_FFI_Buffer": 48,
        "XLA_FFI_Extension_Base": 24, "XLA_FFI_Metadata_Extension": 32,
        "XLA_FFI_Metadata": 36}


def next_minor(version):
    major, minor = (int(part) for part in version.split(".")[:2])
    return f"{major}.{minor + 1}"


def test_setup_pins_jax_below_the_next_minor_of_the_checked_version():
    """Lifting the pin needs xla_ffi.py re-checked against the new c_api.h (and
    CHECKED_JAX_VERSION moved with it): this fails until both agree."""
    with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as file:
        setup = file.read()
    requirement = re.search(r'"jax":\s*\["jax([^"]*)"\]', setup)
    assert requirement, "setup.py has no jax extra"
    specifiers = dict(re.findall(r"(>=|<)\s*([\d.]+)", requirement.group(1)))
    assert specifiers.get(">=") == xla_ffi.CHECKED_JAX_VERSION
    assert specifiers.get("<") == next_minor(xla_ffi.CHECKED_JAX_VERSION)


def test_installed_jaxlib_is_the_checked_one():
    import jax
    import jaxlib

    assert ".".join(jax.__version__.split(".")[:2]) == xla_ffi.CHECKED_JAX_VERSION
    header = os.path.join(os.path.dirname(jaxlib.__file__), "include", "xla", "ffi", "api",
                          "c_api.h")
    if not os.path.exists(header):
        pytest.skip("this jaxlib ships no c_api.h")
    with open(header, encoding="utf-8") as file:
        text = file.read()
    version = tuple(int(re.search(rf"#define XLA_FFI_API_{part} (\d+)", text).group(1))
                    for part in ("MAJOR", "MINOR"))
    assert version == xla_ffi.CHECKED_API_VERSION
