"""Datasets (Fashion-MNIST by default, MNIST IDX, CIFAR-10 binary, npz) and calibration streams."""

from deepshrink.data.calibration import CalibrationSet
from deepshrink.data.datasets import DataBundle, ImageSet, augment_batch, iterate_batches, load_data

__all__ = ["CalibrationSet", "DataBundle", "ImageSet", "augment_batch", "iterate_batches", "load_data"]
