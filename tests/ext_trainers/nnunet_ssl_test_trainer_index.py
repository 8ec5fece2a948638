"""Test-only trainers for the SIGKILL / ``--c`` tests in ``tests/test_workflow.py``; never installed.

``tests/test_workflow.py`` puts this folder on ``nnUNet_extTrainer`` (nnU-Net imports the module as a top-level
module, hence the unique name). For every method's ``*_sslTiny`` trainer it defines ``<method>_sslKill``: the
``sslKill`` budget (4 epochs x 4 iterations, a checkpoint after every epoch) plus two switches read from the
environment, so the tests never depend on the machine's speed:

* ``NNUNET_SSL_TEST_SIGKILL_AT=EPOCH:STEP``: the process SIGKILLs itself right before training step ``STEP``
  (0-based) of epoch ``EPOCH``, i.e. after ``STEP`` steps of that epoch changed the weights in memory;
* ``NNUNET_SSL_TEST_RESUME_DUMP=FILE``: after ``--c`` has loaded its checkpoint, the state it resumes from
  (epoch, iteration counter, student, teacher, ``ssl_modules``: heads, thresholds, queues) is saved to ``FILE``.
"""
import os
import signal

import torch

from nnunet_ssl.trainers import all_trainers
from nnunet_ssl.trainers.budgets import budget_variant

KILL_AT = "NNUNET_SSL_TEST_SIGKILL_AT"
RESUME_DUMP = "NNUNET_SSL_TEST_RESUME_DUMP"


class _KillSwitch:
    """Mixin placed before the trainer in the MRO."""

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self._test_step_in_epoch = 0

    def train_step(self, batch: dict) -> dict:
        at = os.environ.get(KILL_AT)
        if at and tuple(map(int, at.split(":"))) == (self.current_epoch, self._test_step_in_epoch):
            os.kill(os.getpid(), signal.SIGKILL)
        self._test_step_in_epoch += 1
        return super().train_step(batch)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        dump = os.environ.get(RESUME_DUMP)
        if dump:
            torch.save({"current_epoch": self.current_epoch, "ssl_iteration": self.ssl_iteration,
                        "student": self.student.state_dict(),
                        "teacher": self.teacher.state_dict() if self.teacher is not None else None,
                        "ssl_modules": self.ssl_modules.state_dict()}, dump)


for _name, _tiny in list(all_trainers().items()):
    if _name.endswith("_sslTiny"):
        _method = _tiny.__mro__[1]
        # the switched class keeps the method's name, so budget_variant names it <method>_sslKill and registers
        # it in this module (where nnU-Net's scan looks it up)
        budget_variant(type(_method.__name__, (_KillSwitch, _method), {"__module__": __name__}), "sslKill", __name__)
