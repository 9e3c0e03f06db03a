"""Peer tools, run the way their documentation recommends; shared by the benchmarks."""

import tempfile
import time
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process


class ArrayReader(CalibrationDataReader):
    """Feeds an array to ONNX Runtime's calibrator in batches under the graph's input name."""

    def __init__(self, images: np.ndarray, batch: int = 64, name: str = "input") -> None:
        self.feeds = iter([{name: images[i : i + batch]} for i in range(0, len(images), batch)])

    def get_next(self):
        return next(self.feeds, None)


def ort_quantize_static(source: Path, out: Path, calib: np.ndarray, reduce_range: bool, preprocess: bool = True) -> float:
    """ONNX Runtime's static quantizer (QDQ, per channel, uint8 activations, int8
    weights), optionally after its recommended pre-processing. Returns seconds taken."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if preprocess:
            prepared = Path(tmp) / "pre.onnx"
            quant_pre_process(str(source), str(prepared))
            source = prepared
        quantize_static(
            str(source),
            str(out),
            ArrayReader(calib),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    return time.perf_counter() - start
