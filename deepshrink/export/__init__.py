"""ONNX export and ONNX Runtime execution."""

from deepshrink.export.onnx import ExportError, export_onnx, onnx_bytes, ort_session, run_ort, verify_onnx

__all__ = ["ExportError", "export_onnx", "onnx_bytes", "ort_session", "run_ort", "verify_onnx"]
