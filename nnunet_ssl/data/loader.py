"""The unlabeled data loader: nnU-Net's own loader with label-dependent sampling switched off."""
from __future__ import annotations

from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader


class nnUNetUnlabeledDataLoader(nnUNetDataLoader):
    """Random patches of unlabeled cases, through the same crop/pad/transform path as labeled ones.

    Unlabeled cases have no class locations, so foreground oversampling and ignore-label-aware
    sampling (both of which read them) are disabled; patches are drawn uniformly like nnU-Net's
    non-oversampled share of a batch.
    """

    def __init__(self, data, batch_size, patch_size, final_patch_size, label_manager, transforms=None):
        super().__init__(data, batch_size, patch_size, final_patch_size, label_manager,
                         oversample_foreground_percent=0.0, transforms=transforms)
        self.has_ignore = False

    def get_bbox(self, data_shape, force_fg, class_locations, overwrite_class=None, verbose=False):
        return super().get_bbox(data_shape, False, None, None, verbose)
