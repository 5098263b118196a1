"""``Tensor`` protobuf <-> numpy, with the size checks a server needs before trusting raw bytes."""

from __future__ import annotations

import numpy as np

from gemma_mesh.common.errors import InvalidRequest
from gemma_mesh.proto.v1 import common_pb2

_TO_NUMPY = {
    common_pb2.FLOAT32: np.dtype("<f4"),
    common_pb2.FLOAT16: np.dtype("<f2"),
    common_pb2.INT64: np.dtype("<i8"),
    common_pb2.INT32: np.dtype("<i4"),
}
_FROM_NUMPY = {dtype.newbyteorder("="): code for code, dtype in _TO_NUMPY.items()}


def to_tensor_pb(array: np.ndarray) -> common_pb2.Tensor:
    """Encode ``array`` (float32, float16, int64 or int32) as little-endian C-order bytes.

    Raises:
        ValueError: an unsupported dtype.
    """
    arr = np.ascontiguousarray(array)
    code = _FROM_NUMPY.get(arr.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"cannot send dtype {arr.dtype} as a Tensor")
    return common_pb2.Tensor(
        shape=list(arr.shape), dtype=code, data=arr.astype(_TO_NUMPY[code], copy=False).tobytes()
    )


def from_tensor_pb(tensor: common_pb2.Tensor, *, param: str = "tensor") -> np.ndarray:
    """Decode a ``Tensor`` (zero-copy, read-only view of the message's bytes).

    Raises:
        InvalidRequest: unknown dtype, negative dimensions, or a byte count that does not match the shape.
    """
    dtype = _TO_NUMPY.get(tensor.dtype)
    if dtype is None:
        raise InvalidRequest(f"{param}: unsupported dtype {common_pb2.DType.Name(tensor.dtype)}", param=param)
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise InvalidRequest(f"{param}: negative dimension in shape {shape}", param=param)
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if expected != len(tensor.data):
        raise InvalidRequest(
            f"{param}: shape {shape} of {dtype.name} needs {expected} bytes, got {len(tensor.data)}",
            param=param,
        )
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
