"""The noisier student of offline self-training (Noisy Student, Xie et al., CVPR 2020) as a stock nnU-Net trainer.

Self-training works when the student is trained under more noise than the teacher predicted with: it must then
reproduce the teacher's (clean-input) pseudo-labels from harder inputs, which regularises it beyond copying the
teacher. Here the noise is data augmentation; training, loss, schedule and inference are nnU-Net's own.

Compared with ``nnUNetTrainer`` (each value is a class attribute, so a variant is a 2-line subclass):

====================================  ==============================  ==============================
transform                             nnUNetTrainer                   nnUNetTrainerNoisyStudent
====================================  ==============================  ==============================
rotation probability / range          0.2 / +-30 deg 3D (+-180 2D)    0.4 / 1.5x (capped at +-180)
scaling probability / range           0.2 / (0.7, 1.4)                0.4 / (0.6, 1.6)
Gaussian noise p / variance           0.1 / (0, 0.1)                  0.25 / (0, 0.15)
Gaussian blur p / sigma               0.2 / (0.5, 1.0)                0.3 / (0.5, 1.5)
brightness p / multiplier             0.15 / (0.75, 1.25)             0.3 / (0.65, 1.5)
contrast p / range                    0.15 / (0.75, 1.25)             0.3 / (0.65, 1.5)
low resolution p / scale              0.25 / (0.5, 1)                 0.35 / (0.35, 1)
gamma (inverted) p / gamma (plain) p  0.1 / 0.3, gamma (0.7, 1.5)     0.15 / 0.4, gamma (0.6, 1.7)
blank rectangles (cutout)             --                              0.3, 1-5 boxes, 10-33% of the edge
elastic deformation                   --                              -- (``_elastic`` variant: 0.2)
====================================  ==============================  ==============================

Mirroring, masking, the ignore label, regions and deep supervision are handled exactly as in nnU-Net.
With fold ``all`` nnU-Net validates on the training cases; when the preprocessed folder carries a self-training
record (``ssl_split.json``) this trainer validates on the truly labeled cases only, as the numbered folds do.
"""
from __future__ import annotations

import json
import os
from typing import List, Tuple, Union

import numpy as np
import torch
from batchgeneratorsv2.helpers.scalar_type import RandomScalar
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.nnunet.random_binary_operator import ApplyRandomBinaryOperatorTransform
from batchgeneratorsv2.transforms.nnunet.remove_connected_components import \
    RemoveRandomConnectedComponentFromOneHotEncodingTransform
from batchgeneratorsv2.transforms.nnunet.seg_to_onehot import MoveSegAsOneHotToDataTransform
from batchgeneratorsv2.transforms.noise.blank_rectangle import BlankRectangleTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from batchgeneratorsv2.transforms.utils.nnunet_masking import MaskImageTransform
from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform, Convert3DTo2DTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTansform
from batchgeneratorsv2.transforms.utils.seg_to_regions import ConvertSegmentationToRegionsTransform
from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ssl.trainers.budgets import budget_variant

#: the self-training record beside splits_final.json (written by ``nnunet_ssl self-train``)
SELFTRAIN_RECORD = "ssl_split.json"


class nnUNetTrainerNoisyStudent(nnUNetTrainer):
    """nnU-Net with stronger spatial and intensity augmentation: the noisier student of self-training."""

    # spatial
    rotation_scale = 1.5
    p_rotation = 0.4
    p_scaling = 0.4
    scaling = (0.6, 1.6)
    p_elastic_deform = 0.0
    # intensity
    p_noise, noise_variance = 0.25, (0, 0.15)
    p_blur, blur_sigma = 0.3, (0.5, 1.5)
    p_brightness, brightness = 0.3, (0.65, 1.5)
    p_contrast, contrast = 0.3, (0.65, 1.5)
    p_lowres, lowres_scale = 0.35, (0.35, 1)
    p_gamma_inverted, p_gamma, gamma = 0.15, 0.4, (0.6, 1.7)
    # occlusion
    p_blank_rectangle = 0.3
    num_blank_rectangles = (1, 6)  # numpy randint: 1..5

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        """nnU-Net's choice, with the rotation range widened by ``rotation_scale`` (capped at +-180 degrees)."""
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        lo, hi = rotation
        rotation = (max(-np.pi, lo * self.rotation_scale), min(np.pi, hi * self.rotation_scale))
        patch_size = self.configuration_manager.patch_size
        dim = len(patch_size)
        # the larger rotation needs a larger initial crop, else the corners of the patch fall outside the data;
        # nnU-Net's estimate rotates one corner only and is not monotonic in the angle, so never go below its own
        # crop. The scale range stays nnU-Net's (0.85, 1.25): zooming out further is padded, as in nnU-Net
        initial_patch_size = np.maximum(
            np.asarray(initial_patch_size),
            get_patch_size(patch_size[-dim:], rotation, rotation, rotation, (0.85, 1.25)))
        if dummy_2d:
            initial_patch_size[0] = patch_size[0]
        self.print_to_log_file(f"noisy student: rotation range {np.degrees(rotation[0]):.0f}.."
                               f"{np.degrees(rotation[1]):.0f} deg, initial patch size "
                               f"{[int(i) for i in initial_patch_size]}")
        return rotation, dummy_2d, initial_patch_size, mirror_axes

    @classmethod
    def get_training_transforms(
            cls,
            patch_size: Union[np.ndarray, Tuple[int]],
            rotation_for_DA: RandomScalar,
            deep_supervision_scales: Union[List, Tuple, None],
            mirror_axes: Tuple[int, ...],
            do_dummy_2d_data_aug: bool,
            use_mask_for_norm: List[bool] = None,
            is_cascaded: bool = False,
            foreground_labels: Union[Tuple[int, ...], List[int]] = None,
            regions: List[Union[List[int], Tuple[int, ...], int]] = None,
            ignore_label: int = None,
    ) -> BasicTransform:
        """nnU-Net's training pipeline, transform for transform, with the class's stronger parameters (+ cutout).

        A classmethod (nnU-Net's is a staticmethod with the same arguments) so that variants change class
        attributes instead of copying the pipeline; ``self.get_training_transforms(...)`` calls it unchanged.
        """
        transforms = []
        if do_dummy_2d_data_aug:
            ignore_axes = (0,)
            transforms.append(Convert3DTo2DTransform())
            patch_size_spatial = patch_size[1:]
        else:
            patch_size_spatial = patch_size
            ignore_axes = None
        transforms.append(SpatialTransform(
            patch_size_spatial, patch_center_dist_from_border=0, random_crop=False,
            p_elastic_deform=cls.p_elastic_deform,
            p_rotation=cls.p_rotation, rotation=rotation_for_DA,
            p_scaling=cls.p_scaling, scaling=cls.scaling, p_synchronize_scaling_across_axes=1,
            bg_style_seg_sampling=False, border_mode_seg="constant", padding_value_seg=-1,
        ))
        if do_dummy_2d_data_aug:
            transforms.append(Convert2DTo3DTransform())

        transforms.append(RandomTransform(GaussianNoiseTransform(
            noise_variance=cls.noise_variance, p_per_channel=1, synchronize_channels=True),
            apply_probability=cls.p_noise))
        transforms.append(RandomTransform(GaussianBlurTransform(
            blur_sigma=cls.blur_sigma, synchronize_channels=False, synchronize_axes=False, p_per_channel=0.5,
            benchmark=True), apply_probability=cls.p_blur))
        transforms.append(RandomTransform(MultiplicativeBrightnessTransform(
            multiplier_range=BGContrast(cls.brightness), synchronize_channels=False, p_per_channel=1),
            apply_probability=cls.p_brightness))
        transforms.append(RandomTransform(ContrastTransform(
            contrast_range=BGContrast(cls.contrast), preserve_range=True, synchronize_channels=False,
            p_per_channel=1), apply_probability=cls.p_contrast))
        transforms.append(RandomTransform(SimulateLowResolutionTransform(
            scale=cls.lowres_scale, synchronize_channels=False, synchronize_axes=True, ignore_axes=ignore_axes,
            allowed_channels=None, p_per_channel=0.5), apply_probability=cls.p_lowres))
        transforms.append(RandomTransform(GammaTransform(
            gamma=BGContrast(cls.gamma), p_invert_image=1, synchronize_channels=False, p_per_channel=1,
            p_retain_stats=1), apply_probability=cls.p_gamma_inverted))
        transforms.append(RandomTransform(GammaTransform(
            gamma=BGContrast(cls.gamma), p_invert_image=0, synchronize_channels=False, p_per_channel=1,
            p_retain_stats=1), apply_probability=cls.p_gamma))
        if mirror_axes is not None and len(mirror_axes) > 0:
            transforms.append(MirrorTransform(allowed_axes=mirror_axes))
        if cls.p_blank_rectangle > 0:
            # occlusion as in nnU-Net's DA5: boxes of 10..33% of each patch edge filled with the patch mean
            sizes = [[max(1, int(p) // 10), max(max(1, int(p) // 10) + 1, int(p) // 3)] for p in patch_size]
            transforms.append(RandomTransform(BlankRectangleTransform(
                rectangle_size=sizes, rectangle_value=torch.mean, num_rectangles=cls.num_blank_rectangles,
                force_square=False, p_per_channel=0.5), apply_probability=cls.p_blank_rectangle))

        if use_mask_for_norm is not None and any(use_mask_for_norm):
            transforms.append(MaskImageTransform(
                apply_to_channels=[i for i in range(len(use_mask_for_norm)) if use_mask_for_norm[i]],
                channel_idx_in_seg=0, set_outside_to=0))
        transforms.append(RemoveLabelTansform(-1, 0))
        if is_cascaded:
            assert foreground_labels is not None, "We need foreground_labels for cascade augmentations"
            transforms.append(MoveSegAsOneHotToDataTransform(
                source_channel_idx=1, all_labels=foreground_labels, remove_channel_from_source=True))
            transforms.append(RandomTransform(ApplyRandomBinaryOperatorTransform(
                channel_idx=list(range(-len(foreground_labels), 0)), strel_size=(1, 8), p_per_label=0.5),
                apply_probability=0.4))
            transforms.append(RandomTransform(RemoveRandomConnectedComponentFromOneHotEncodingTransform(
                channel_idx=list(range(-len(foreground_labels), 0)), fill_with_other_class_p=0,
                dont_do_if_covers_more_than_x_percent=0.15, p_per_label=0.5), apply_probability=0.2))
        if regions is not None:
            # the ignore label must also be converted
            transforms.append(ConvertSegmentationToRegionsTransform(
                regions=list(regions) + [ignore_label] if ignore_label is not None else regions, channel_in_seg=0))
        if deep_supervision_scales is not None:
            transforms.append(DownsampleSegForDSTransform(ds_scales=deep_supervision_scales))
        return ComposeTransforms(transforms)

    def do_split(self):
        """nnU-Net's split; for fold ``all`` the pseudo-labeled cases leave the validation set (they stay in training).

        Numbered folds need nothing here: ``self-train`` writes splits_final.json with truly labeled validation
        cases only.
        """
        tr_keys, val_keys = super().do_split()
        record = os.path.join(self.preprocessed_dataset_folder_base, SELFTRAIN_RECORD)
        if self.fold == "all" and os.path.isfile(record):
            with open(record) as f:
                pseudo = set(json.load(f).get("pseudo_labeled", []))
            val_keys = [k for k in val_keys if k not in pseudo]
            self.print_to_log_file(f"fold 'all': validating on the {len(val_keys)} truly labeled case(s) only")
        return tr_keys, val_keys


class nnUNetTrainerNoisyStudent_elastic(nnUNetTrainerNoisyStudent):
    """Noisy student plus elastic deformation (off in nnU-Net v2 for speed; costly on CPU)."""
    p_elastic_deform = 0.2


nnUNetTrainerNoisyStudent_sslTiny = budget_variant(nnUNetTrainerNoisyStudent, "sslTiny")
nnUNetTrainerNoisyStudent_sslDemo = budget_variant(nnUNetTrainerNoisyStudent, "sslDemo")
