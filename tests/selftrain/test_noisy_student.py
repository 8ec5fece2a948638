"""The noisy-student trainer: nnU-Net's pipeline with stronger spatial and intensity augmentation."""
import numpy as np
import pytest
import torch
from batchgeneratorsv2.transforms.noise.blank_rectangle import BlankRectangleTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ssl.trainers.nnUNetTrainerNoisyStudent import (nnUNetTrainerNoisyStudent,
                                                           nnUNetTrainerNoisyStudent_elastic,
                                                           nnUNetTrainerNoisyStudent_sslDemo,
                                                           nnUNetTrainerNoisyStudent_sslTiny)

from ..conftest import make_trainer


def _pipeline(trainer):
    trainer.print_to_log_file = lambda *a, **k: None
    rotation, dummy_2d, initial, mirror = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    patch = trainer.configuration_manager.patch_size
    pipe = trainer.get_training_transforms(patch, rotation, None, mirror, dummy_2d,
                                           use_mask_for_norm=trainer.configuration_manager.use_mask_for_norm,
                                           foreground_labels=[1, 2], ignore_label=3)
    return rotation, initial, pipe


def _random_probabilities(pipe) -> dict:
    """inner transform class name -> apply probabilities, in pipeline order."""
    out = {}
    for t in pipe.transforms:
        if isinstance(t, RandomTransform):
            out.setdefault(type(t.transform).__name__, []).append(t.apply_probability)
    return out


@pytest.mark.parametrize("configuration", ["2d", "3d_fullres"])
def test_augmentation_is_stronger_than_nnunets(dataset3d, configuration):
    rot_s, init_s, stock = _pipeline(make_trainer(nnUNetTrainer, dataset3d, configuration))
    rot_n, init_n, noisy = _pipeline(make_trainer(nnUNetTrainerNoisyStudent, dataset3d, configuration))
    assert rot_n[1] >= rot_s[1] and rot_n[1] <= np.pi and rot_n[0] == -rot_n[1]
    assert all(n >= s for n, s in zip(init_n, init_s))  # a wider rotation needs a larger initial crop
    sp_s = next(t for t in stock.transforms if isinstance(t, SpatialTransform))
    sp_n = next(t for t in noisy.transforms if isinstance(t, SpatialTransform))
    assert sp_n.p_rotation > sp_s.p_rotation and sp_n.p_scaling > sp_s.p_scaling
    assert sp_n.scaling[0] < sp_s.scaling[0] and sp_n.scaling[1] > sp_s.scaling[1]
    ps, pn = _random_probabilities(stock), _random_probabilities(noisy)
    assert set(ps) <= set(pn)
    for name, probs in ps.items():
        assert all(b > a for a, b in zip(probs, pn[name])), name
    assert "BlankRectangleTransform" in pn and "BlankRectangleTransform" not in ps


def test_pipeline_runs_and_keeps_the_ignore_label(dataset3d):
    torch.manual_seed(0)
    np.random.seed(0)
    tr = make_trainer(nnUNetTrainerNoisyStudent, dataset3d, "3d_fullres")
    _, initial, pipe = _pipeline(tr)
    patch = tuple(tr.configuration_manager.patch_size)
    image = torch.randn(1, *initial)
    seg = torch.randint(0, 4, (1, *initial), dtype=torch.int16)  # 3 = ignore
    for _ in range(3):
        out = pipe(**{"image": image.clone(), "segmentation": seg.clone()})
        assert tuple(out["image"].shape) == (1, *patch) and tuple(out["segmentation"].shape) == (1, *patch)
        assert set(torch.unique(out["segmentation"]).tolist()) <= {0, 1, 2, 3}
        assert torch.isfinite(out["image"]).all()


def test_variants():
    assert nnUNetTrainerNoisyStudent_elastic.p_elastic_deform > 0 == nnUNetTrainerNoisyStudent.p_elastic_deform
    assert issubclass(nnUNetTrainerNoisyStudent_sslTiny, nnUNetTrainerNoisyStudent)
    assert issubclass(nnUNetTrainerNoisyStudent_sslDemo, nnUNetTrainerNoisyStudent)
    blank = [t for t in nnUNetTrainerNoisyStudent.get_training_transforms(
        (16, 40, 40), (-0.5, 0.5), None, (0, 1, 2), False).transforms
        if isinstance(t, RandomTransform) and isinstance(t.transform, BlankRectangleTransform)]
    assert len(blank) == 1 and blank[0].apply_probability == nnUNetTrainerNoisyStudent.p_blank_rectangle


def test_budget_variant_sets_the_tiny_budget(dataset3d):
    tr = make_trainer(nnUNetTrainerNoisyStudent_sslTiny, dataset3d, "3d_fullres")
    assert (tr.num_epochs, tr.num_iterations_per_epoch) == (2, 3)
