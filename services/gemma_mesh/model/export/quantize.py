"""Block-wise 4-bit weight quantization of an exported decoder (``--weights int4``).

Uses ONNX Runtime's ``MatMulNBitsQuantizer``: every MatMul with a constant weight becomes a
``MatMulNBits`` node (symmetric int4, one fp scale per ``block_size`` input rows); activations stay in
the bundle's float dtype. For E4B this takes the decoder's linear weights from ~7.5 GB (fp16) to
~2 GB. The embedding tables (``embed_tokens.onnx``) are not quantized.
"""

from __future__ import annotations

from pathlib import Path

from gemma_mesh.common.logging import get_logger

log = get_logger("export.int4")

INT4_BLOCK_SIZE = 32
# accuracy_level 4: int8 compute of the dequantized blocks on CPU (ORT's fastest CPU path).
INT4_ACCURACY_LEVEL = 4


def quantize_int4(path: Path, *, block_size: int = INT4_BLOCK_SIZE) -> int:
    """Rewrite the graph at ``path`` in place with int4 MatMul weights; returns the number of MatMulNBits nodes."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    path = Path(path)
    external = path.with_suffix(".onnx.data").exists()
    model = onnx.load(str(path), load_external_data=True)
    quantizer = MatMulNBitsQuantizer(
        model, bits=4, block_size=block_size, is_symmetric=True, accuracy_level=INT4_ACCURACY_LEVEL
    )
    quantizer.process()
    if external:
        path.with_suffix(".onnx.data").unlink()
    quantizer.model.save_model_to_file(str(path), use_external_data_format=external)
    count = sum(1 for node in quantizer.model.model.graph.node if node.op_type == "MatMulNBits")
    log.info("int4 weights", graph=path.name, matmul_nbits=count, block_size=block_size)
    return count
