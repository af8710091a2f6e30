"""A torch `Dataset` over sample records: reads, checks and transforms each image and its mask; `batches` loads it
in a fixed order.

Example:
    >>> from zsadkit.data import AnomalyDataset, read_mvtec
    >>> dataset = AnomalyDataset(read_mvtec("/data/mvtec"), image_size=518)  # doctest: +SKIP
    >>> item = dataset[0]  # doctest: +SKIP
    >>> item["image"].shape, item["mask"].shape  # doctest: +SKIP
    (torch.Size([3, 518, 518]), torch.Size([518, 518]))
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from zsadkit.data.errors import MaskError
from zsadkit.data.images import check_mask_matches_image, read_image
from zsadkit.data.records import Sample
from zsadkit.data.transforms import ImageTransform, MaskTransform, ResizeMode, image_transform, mask_transform

__all__ = ["AnomalyDataset", "batches"]


class AnomalyDataset(Dataset):
    """Images, masks and labels of a list of records, transformed as the reference code does.

    A dataset name (`Sample.dataset`) either has pixel masks, and then every anomalous record of it must
    list one, or has none at all (image-level only, e.g. HeadCT). `has_mask` in an item says whether the
    returned mask is ground truth: True for every record of a dataset with masks (the all-zero mask of a
    normal image is exact), False for image-level-only datasets.

    Args:
        samples: records with absolute paths (`read_mvtec`, or `read_manifest(path, root=...)`).
        image_size: side S of the square output.
        mask_threshold: binarisation threshold of the resized mask (reference 0.5); None keeps soft masks.
        image_transform_override: a different `ImageTransform` (e.g. resize="shorter_side_crop"); its
            size must be `image_size`.
        mask_transform_override: a different `MaskTransform` (e.g. interpolation="nearest"); its size
            must be `image_size` and it replaces `mask_threshold`.

    Raises:
        ValueError: no samples, a relative path, or an override of another size.
        MaskError: an anomalous record without a mask in a dataset that has masks.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        image_size: int,
        mask_threshold: float | None = 0.5,
        *,
        image_transform_override: ImageTransform | None = None,
        mask_transform_override: MaskTransform | None = None,
    ) -> None:
        self.samples = list(samples)
        if not self.samples:
            raise ValueError("AnomalyDataset: the list of samples is empty")
        for sample in self.samples:
            for path in (sample.image, sample.mask):
                if path is not None and not Path(path).is_absolute():
                    raise ValueError(
                        f"{path}: relative path in a record; resolve records against their data root "
                        "first (Sample.resolve(root) or read_manifest(path, root=root))"
                    )
        datasets_with_masks = {s.dataset for s in self.samples if s.mask is not None}
        for sample in self.samples:
            if sample.label == 1 and sample.mask is None and sample.dataset in datasets_with_masks:
                raise MaskError(
                    f"{sample.image}: anomalous image of dataset {sample.dataset!r} has no mask, but other "
                    "images of that dataset have masks; expected a mask path for every anomalous image"
                )
        self.has_mask = [s.dataset in datasets_with_masks for s in self.samples]
        self.image_size = image_size
        self.image_transform = image_transform_override or image_transform(image_size)
        self.mask_transform = mask_transform_override or mask_transform(image_size, mask_threshold)
        for transform in (self.image_transform, self.mask_transform):
            if transform.size != image_size:
                raise ValueError(
                    f"transform override has size {transform.size}, expected image_size={image_size}"
                )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        """One item: "image" (3, S, S) float32, "mask" (S, S) float32 in {0, 1}, "label", "class_name",
        "has_mask", "image_path", "index"."""
        sample = self.samples[index]
        image = read_image(sample.image)
        if sample.mask is None:
            mask = torch.zeros(self.image_size, self.image_size)
        else:
            mask_image = read_image(sample.mask, what="mask")
            check_mask_matches_image(image, mask_image, sample.image, sample.mask)
            mask = self.mask_transform(mask_image)
        return {
            "image": self.image_transform(image),
            "mask": mask,
            "label": sample.label,
            "class_name": sample.class_name,
            "has_mask": self.has_mask[index],
            "image_path": sample.image,
            "index": index,
        }

    @property
    def classes(self) -> list[str]:
        """Class names in order of first appearance."""
        return list(dict.fromkeys(s.class_name for s in self.samples))


def batches(
    samples: Sequence[Sample],
    image_size: int,
    batch_size: int = 8,
    num_workers: int = 0,
    resize: ResizeMode = "squash",
    pin_memory: bool = False,
) -> DataLoader:
    """A deterministic (unshuffled) loader of `AnomalyDataset` batches of `samples`; `resize` as `image_transform`
    ("shorter_side_crop" for InCTRL's protocol). `num_workers` > 0 decodes in worker processes (two batches ahead
    each) while the model computes; `pin_memory` pins batches for non-blocking copies to a GPU."""
    override = image_transform(image_size, resize=resize) if resize != "squash" else None
    return DataLoader(AnomalyDataset(list(samples), image_size=image_size, image_transform_override=override),
                      batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=False)
