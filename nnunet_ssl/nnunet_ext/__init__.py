"""The folder nnU-Net scans through ``nnUNet_extTrainer`` (``export nnUNet_extTrainer=$(nnunet_ssl trainer-dir)``).

nnU-Net imports every module here as a *top-level* module and drops it from ``sys.modules`` afterwards,
so the folder holds one small index module with a unique name that re-exports the real classes.
"""
import os

TRAINER_DIR = os.path.dirname(os.path.abspath(__file__))
