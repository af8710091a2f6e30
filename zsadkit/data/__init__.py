"""Data: sample records and manifests, the MVTec-layout reader, transforms, the torch dataset, and the
synthetic datasets of the smoke profile."""

from zsadkit.data.dataset import AnomalyDataset, batches
from zsadkit.data.errors import DataError, ImageReadError, LayoutError, MaskError
from zsadkit.data.images import IMAGE_EXTENSIONS, read_image, visible_entries
from zsadkit.data.mvtec import read_mvtec
from zsadkit.data.records import (
    MANIFEST_COLUMNS,
    SPLITS,
    Sample,
    read_manifest,
    samples_fingerprint,
    write_manifest,
)
from zsadkit.data.synthetic import (
    AUX_DATASET,
    DEFECTS,
    SYNTHETIC_CLASSES,
    TARGET_DATASET,
    SyntheticConfig,
    make_synthetic,
)
from zsadkit.data.transforms import OPENAI_MEAN, OPENAI_STD, image_transform, mask_transform

__all__ = [
    "AUX_DATASET",
    "TARGET_DATASET",
    "DEFECTS",
    "IMAGE_EXTENSIONS",
    "MANIFEST_COLUMNS",
    "OPENAI_MEAN",
    "OPENAI_STD",
    "SPLITS",
    "SYNTHETIC_CLASSES",
    "AnomalyDataset",
    "batches",
    "DataError",
    "ImageReadError",
    "LayoutError",
    "MaskError",
    "Sample",
    "SyntheticConfig",
    "image_transform",
    "make_synthetic",
    "mask_transform",
    "read_image",
    "read_manifest",
    "read_mvtec",
    "samples_fingerprint",
    "visible_entries",
    "write_manifest",
]
