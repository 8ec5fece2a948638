"""Mean Teacher (Tarvainen & Valpola, NeurIPS 2017) as an nnU-Net trainer.

The student sees the unlabeled batch with clipped Gaussian input noise; the EMA teacher sees the clean
(weak) view; their softmax outputs are pulled together with an MSE consistency loss, weighted by
``lambda_max`` = 0.1 with a sigmoid ramp-up over the first ``rampup_fraction`` of the iteration budget.
"""
from __future__ import annotations


from nnunet_ssl.algorithms.losses.consistency import softmax_mse
from nnunet_ssl.algorithms.perturb import clipped_gaussian_noise
from nnunet_ssl.trainers.budgets import budget_variant
from nnunet_ssl.trainers.nnUNetTrainerSSL import nnUNetTrainerSSL


class nnUNetTrainerMeanTeacher(nnUNetTrainerSSL):
    """Mean Teacher: softmax-MSE consistency between the student (noisy input) and its EMA teacher (clean input)."""

    lambda_max = 0.1
    rampup_fraction = 0.6
    ema_decay = 0.99
    noise_std = 0.1
    noise_clip = 0.2

    def compute_losses(self, data, target, unlabeled):
        teacher = self.teacher_logits(unlabeled)
        student_u_in = clipped_gaussian_noise(unlabeled, self.noise_std, self.noise_clip)
        out_l, out_u = self.forward_parts(self.network, data, student_u_in)
        sup = self.loss(out_l, target)
        unsup = softmax_mse(self.full_res(out_u), teacher)
        return sup, unsup, {}


class nnUNetTrainerMeanTeacher_ema0999(nnUNetTrainerMeanTeacher):
    """Mean Teacher with EMA decay 0.999 instead of 0.99: a slower, smoother teacher."""

    ema_decay = 0.999


class nnUNetTrainerMeanTeacher_exportTeacher(nnUNetTrainerMeanTeacher):
    """Mean Teacher that exports (and finally validates) the EMA teacher instead of the student."""

    export_teacher = True


nnUNetTrainerMeanTeacher_sslTiny = budget_variant(nnUNetTrainerMeanTeacher, "sslTiny")
nnUNetTrainerMeanTeacher_sslDemo = budget_variant(nnUNetTrainerMeanTeacher, "sslDemo")
