"""Bad input raises the right exception, names the problem and the fix, and loses nothing."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from peft_loraone import _native, engine
from peft_loraone.engine import lora_one


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


class DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [
        ("version", DLPackVersion),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", ctypes.c_void_p),
        ("flags", ctypes.c_uint64),
        ("dl_tensor", DLTensor),
    ]


_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


def hand_capsule(device_type: int = 1, *, versioned: bool = False, major: int = 1, shape=(8, 6)):
    """A DLPack capsule built by hand over a float32 buffer (no deleter), plus what keeps it alive."""
    buf = (ctypes.c_float * (shape[0] * shape[1]))(*np.linspace(-1, 1, shape[0] * shape[1]))
    shp = (ctypes.c_int64 * 2)(*shape)
    t = DLTensor(ctypes.cast(buf, ctypes.c_void_p), DLDevice(device_type, 0), 2, DLDataType(2, 32, 1), shp, None, 0)
    if versioned:
        managed = DLManagedTensorVersioned(DLPackVersion(major, 0), None, None, 0, t)
        cap = _capsule_new(ctypes.addressof(managed), b"dltensor_versioned", None)
    else:
        managed = DLManagedTensor(t, None, None)
        cap = _capsule_new(ctypes.addressof(managed), b"dltensor", None)
    return cap, (buf, shp, managed)


def test_hand_capsule_on_cpu_is_accepted():
    cap, keep = hand_capsule(1)
    b, a = torch.empty(8, 2), torch.empty(2, 6)
    f = lora_one(cap, 2, out_b=b, out_a=a)
    g = torch.from_numpy(np.frombuffer(keep[0], dtype=np.float32).reshape(8, 6).copy())
    u, s, vh = torch.linalg.svd(-g.double())
    want = (u[:, :2] * s[:2]) @ vh[:2] / (128 * s[0])
    assert torch.linalg.norm(b.double() @ a.double() - want) <= 1e-4 * torch.linalg.norm(want)
    assert f.B is b


@pytest.mark.parametrize("versioned", [False, True])
def test_cuda_capsule_is_refused(versioned):
    cap, keep = hand_capsule(2, versioned=versioned)
    b, a = torch.zeros(8, 2), torch.zeros(2, 6)
    with pytest.raises(engine.UnsupportedDeviceError, match=r"(?i)cuda.*\.cpu\(\)"):
        lora_one(cap, 2, out_b=b, out_a=a)
    assert not b.any() and not a.any()


def test_unknown_major_version_is_refused():
    cap, keep = hand_capsule(1, versioned=True, major=7)
    with pytest.raises(ValueError, match="version"):
        lora_one(cap, 2, out_b=torch.zeros(8, 2), out_a=torch.zeros(2, 6))


def test_consumed_capsule_is_refused():
    t = torch.randn(6, 4)
    cap = t.__dlpack__()
    torch.from_dlpack(cap)  # consumes and renames it
    with pytest.raises(ValueError, match="used"):
        lora_one(cap, 2, out_b=torch.zeros(6, 2), out_a=torch.zeros(2, 4))


@pytest.mark.parametrize("shape", [(12,), (2, 3, 4)])
def test_wrong_ndim(shape):
    with pytest.raises(ValueError, match="2-D"):
        lora_one(torch.randn(shape), 1)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8])
def test_integer_dtype(dtype):
    with pytest.raises(TypeError, match=r"(?i)int.*float"):
        lora_one(torch.ones(6, 4, dtype=dtype), 2)


def test_integer_numpy_dtype():
    with pytest.raises(TypeError, match="int64"):
        lora_one(np.ones((6, 4), dtype=np.int64), 2)


@pytest.mark.parametrize("rank", [0, -1, 5, 100])
def test_bad_rank(rank):
    with pytest.raises(ValueError, match="rank"):
        lora_one(torch.randn(6, 4), rank)


def test_lora_ga_needs_two_r():
    with pytest.raises(ValueError, match="rank"):
        engine.lora_ga(torch.randn(6, 4), 3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_keeps_outputs(bad):
    g = torch.randn(10, 8)
    g[3, 5] = bad
    b, a = torch.full((10, 2), 7.0), torch.full((2, 8), 7.0)
    with pytest.raises(ValueError, match=r"(?i)row 3, col(umn)? 5.*(nan|inf)"):
        lora_one(g, 2, out_b=b, out_a=a)
    assert (b == 7).all() and (a == 7).all()


def test_zero_gradient():
    b = torch.full((10, 2), 7.0)
    with pytest.raises(engine.ZeroGradientError, match="zero"):
        lora_one(torch.zeros(10, 8), 2, out_b=b)
    assert (b == 7).all()
    assert issubclass(engine.ZeroGradientError, ValueError)


def test_output_wrong_shape():
    with pytest.raises(ValueError, match=r"(?i)shape|out_b"):
        lora_one(torch.randn(10, 8), 2, out_b=torch.empty(10, 3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int32])
def test_output_wrong_dtype(dtype):
    with pytest.raises(TypeError, match=r"out_b.*float32 or float64"):
        lora_one(torch.randn(10, 8), 2, out_b=torch.empty(10, 2, dtype=dtype))


def test_output_read_only():
    out = np.zeros((10, 2), dtype=np.float32)
    out.flags.writeable = False
    with pytest.raises(ValueError, match=r"(?i)read-only"):
        lora_one(np.random.default_rng(0).standard_normal((10, 8)), 2, out_b=out)
    assert not out.any()


def test_cuda_tensor_like_is_refused_before_export():
    class FakeCuda:
        device = torch.device("cuda", 0)

        def __dlpack__(self, **kw):  # never reached
            raise AssertionError

    with pytest.raises(engine.UnsupportedDeviceError, match=r"cuda:0.*\.cpu\(\)"):
        lora_one(FakeCuda(), 2)


def test_not_a_tensor():
    with pytest.raises(ValueError, match="DLPack"):
        lora_one([[1.0, 2.0]], 1)


def test_bad_gamma():
    with pytest.raises(ValueError, match="gamma"):
        lora_one(torch.randn(6, 4), 2, gamma=0.0)


def test_panic_comes_back_as_exception():
    with pytest.raises(engine.EngineInternalError, match="panic"):
        _native.force_panic("boom")
    assert issubclass(engine.EngineInternalError, RuntimeError)


def test_panic_inside_computation_sync_and_async():
    from peft_loraone.engine import _Call

    def call():
        return _Call(
            _native.METHOD_PANIC, torch.randn(6, 4), 2, 1.0, out_b=None, out_a=None, dtype=None,
            oversampling=None, power_iters=None, tol=None, seed=0, scaling=None, name="grad",
        )

    pending = call()  # keeps the borrowed tensors alive during the call
    with pytest.raises(engine.EngineInternalError, match="panic"):
        _native.compute(*pending.args)
    job = engine.Job(call())
    with pytest.raises(engine.EngineInternalError, match="panic"):
        job.result()
    # The interpreter and the engine still work afterwards.
    assert lora_one(torch.randn(6, 4), 2).B.shape == (6, 2)
