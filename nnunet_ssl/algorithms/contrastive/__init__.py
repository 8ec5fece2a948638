"""Contrastive building blocks of ACTION / ACTION++ (specs/action.md sections 2 and 5).

Pure torch (+ scipy for the Hungarian assignment); nothing here imports nnU-Net.
"""
from .anco import AnCoLoss, AnCoSample, AnCoSampler, anco_logits_loss, negative_class_probs, sample_categorical
from .distillation import flatten_windows, pooled_grid, similarity_kl, window_embeddings, windows_from_grid
from .heads import (ChannelMLP, DenseRepresentationHead2d, GlobalHead, GlobalPredictor, MLP, PointHead,
                    WindowHead, WindowPredictor, global_pool)
from .memory_bank import FIFOQueue
from .point_gather import FeatureCapture, gather_points, sample_coords
from .saacl import (CentreAssigner, class_centres, hungarian_assignment, saacl_loss, sample_class_points,
                    simplex_centres, uniformity_energy)

__all__ = [
    "AnCoLoss", "AnCoSample", "AnCoSampler", "anco_logits_loss", "negative_class_probs", "sample_categorical",
    "flatten_windows", "pooled_grid", "similarity_kl", "window_embeddings", "windows_from_grid",
    "ChannelMLP", "DenseRepresentationHead2d", "GlobalHead", "GlobalPredictor", "MLP", "PointHead",
    "WindowHead", "WindowPredictor", "global_pool",
    "FIFOQueue",
    "FeatureCapture", "gather_points", "sample_coords",
    "CentreAssigner", "class_centres", "hungarian_assignment", "saacl_loss", "sample_class_points",
    "simplex_centres", "uniformity_energy",
]
