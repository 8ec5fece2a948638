"""Every trainer of the package is found by nnU-Net's own lookup, and none shadows an nnU-Net built-in."""
import os
from os.path import join

import nnunetv2
import pytest
from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

from nnunet_ssl.nnunet_ext import TRAINER_DIR
from nnunet_ssl.trainers import all_trainers

TRAINERS = all_trainers()


def test_package_defines_the_core_trainers():
    for name in ("nnUNetTrainerSSL", "nnUNetTrainerMeanTeacher", "nnUNetTrainerMeanTeacher_sslTiny",
                 "nnUNetTrainer_sslTiny"):
        assert name in TRAINERS


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_found_by_nnunet_lookup(name, monkeypatch):
    monkeypatch.setenv("nnUNet_extTrainer", TRAINER_DIR)
    assert recursive_find_trainer_class_by_name(name) is TRAINERS[name]


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_no_collision_with_nnunet_builtins(name):
    builtin = recursive_find_python_class(join(nnunetv2.__path__[0], "training", "nnUNetTrainer"), name,
                                          "nnunetv2.training.nnUNetTrainer")
    assert builtin is None, f"{name} collides with nnU-Net's {builtin}: nnU-Net would silently use its own"


def test_trainer_dir_holds_only_the_index_module():
    mods = [f for f in os.listdir(TRAINER_DIR) if f.endswith(".py") and f != "__init__.py"]
    assert mods == ["nnunet_ssl_trainer_index.py"]


def test_unknown_trainer_gives_nnunet_error(monkeypatch):
    monkeypatch.setenv("nnUNet_extTrainer", TRAINER_DIR)
    with pytest.raises(RuntimeError, match="Could not find requested nnunet trainer nnUNetTrainerDoesNotExist"):
        recursive_find_trainer_class_by_name("nnUNetTrainerDoesNotExist")
