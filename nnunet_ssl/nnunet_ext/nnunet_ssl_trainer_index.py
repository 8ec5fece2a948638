"""Index for nnU-Net's external-trainer scan: every trainer of ``nnunet_ssl.trainers`` by name."""
from nnunet_ssl.trainers import all_trainers as _all_trainers

globals().update(_all_trainers())
