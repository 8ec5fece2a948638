"""The one place that changes nnU-Net's training loop for semi-supervised learning.

A method is a subclass that overrides :meth:`nnUNetTrainerSSL.compute_losses` (and optionally
:meth:`build_method_modules`, :meth:`finalize_metrics`, :meth:`method_state_dict`). Everything else --
the unlabeled loader, the EMA teacher, the ramped unsupervised weight, mixed precision, gradient clipping,
non-finite-step handling, per-epoch SSL logging, checkpoint extras and resume -- lives here, once.
"""
from __future__ import annotations

import os
import sys
from copy import deepcopy
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from batchgenerators.utilities.file_and_folder_operations import join
from torch import autocast, nn
from torch import distributed as dist
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class, nnUNetDatasetBlosc2
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.helpers import dummy_context

from nnunet_ssl.algorithms.ema import EMA
from nnunet_ssl.algorithms.schedules import sigmoid_rampup
from nnunet_ssl.data.loader import nnUNetUnlabeledDataLoader
from nnunet_ssl.data.unlabeled import UnlabeledDataError, check_unlabeled_folder, unlabeled_identifier
from nnunet_ssl.progress import SSLProgressLog

Output = Union[torch.Tensor, List[torch.Tensor]]


class SSLConfigurationError(RuntimeError):
    """A trainer was asked for on a configuration or dataset it does not support."""


class nnUNetTrainerSSL(nnUNetTrainer):
    """Base class of every semi-supervised trainer. Not a method by itself: subclasses define the loss.

    Hyperparameters are class attributes (nnU-Net fixes ``__init__``'s signature); a variant is a two-line
    subclass. Schedules are fractions of the total iteration budget ``num_epochs * num_iterations_per_epoch``.
    """

    # unlabeled batch size = round(ratio * labeled batch size), per DDP rank
    unlabeled_batch_ratio: float = 1.0
    # unsupervised weight lambda(t) = lambda_max * sigmoid_rampup(t, T, rampup_fraction)
    lambda_max: float = 1.0
    rampup_fraction: float = 0.0
    # EMA teacher
    use_teacher: bool = True
    ema_decay: float = 0.99
    ema_warmup: bool = True
    ema_buffer_policy: str = "copy"
    # which weights become 'network_weights' (what nnUNetv2_predict uses) and what the final validation scores
    export_teacher: bool = False
    # consecutive non-finite losses tolerated before training stops
    max_nonfinite_streak: int = 20
    # region-based (sigmoid) label definitions: argmax/softmax-based methods cannot use them
    supports_regions: bool = False
    # nnU-Net's gradient clipping norm, applied per optimised network
    grad_clip: float = 12.0

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_ddp and device.type == "cpu":
            # nnU-Net assumes DDP means CUDA and switches to cuda:rank; keep a CPU process group (gloo) on CPU
            self.device = device
            self.grad_scaler = None
        if self.is_cascaded:
            raise SSLConfigurationError(
                f"{self.__class__.__name__} does not support the cascade ('{configuration}' uses predictions of "
                f"'{self.configuration_manager.previous_stage_name}'); unlabeled cases have no previous-stage "
                f"predictions. Use 2d, 3d_fullres or 3d_lowres.")
        if self.label_manager.has_regions and not self.supports_regions:
            raise SSLConfigurationError(
                f"{self.__class__.__name__} needs softmax outputs (argmax pseudo-labels / class probabilities); "
                f"region-based label definitions (dataset.json 'regions_class_order', sigmoid outputs) are not "
                f"supported. Train with plain integer labels.")
        self.teacher: Optional[nn.Module] = None
        self.ssl_modules = nn.ModuleDict()  # heads, second networks, queues: never inside self.network
        self.extra_optimizers: List[Tuple[torch.optim.Optimizer, object, nn.Module]] = []  # (opt, sched, module)
        self.ssl_iteration = 0
        self.nonfinite_total = 0
        self._nonfinite_streak = 0
        self.ssl_log = SSLProgressLog()
        self._epoch_sums: Dict[str, float] = {}
        self._epoch_steps = 0
        self.dataloader_unlabeled = None
        self.ema = EMA(self.ema_decay, self.ema_warmup, self.ema_buffer_policy)
        self.unlabeled_folder = join(self.preprocessed_dataset_folder_base,
                                     unlabeled_identifier(self.configuration_manager.data_identifier)) \
            if self.preprocessed_dataset_folder_base is not None else None

    # ------------------------------------------------------------------ networks
    @property
    def student(self) -> nn.Module:
        """``self.network`` without its DDP and ``torch.compile`` wrappers (shares the parameters)."""
        mod = self.network.module if self.is_ddp else self.network
        return mod._orig_mod if isinstance(mod, OptimizedModule) else mod

    def initialize(self):
        if self.is_ddp and self.device.type == "cpu":
            # nnU-Net wraps DDP with device_ids=[rank], which only exists for GPUs: build unwrapped, then wrap
            # for CPU (gloo) with nnU-Net's per-rank batch size and DDP-aware Dice.
            self.is_ddp = False
            super().initialize()
            self.is_ddp = True
            self._set_batch_size_and_oversample()
            self.network = DDP(self.network)
            self.loss = self._build_loss()
        else:
            super().initialize()
        self.build_ssl_modules()

    def build_ssl_modules(self) -> None:
        """Teacher plus whatever the method adds; called once, right after nnU-Net's ``initialize``."""
        if self.use_teacher:
            self.teacher = self.make_frozen_copy(self.student)
        self.build_method_modules()
        self.ssl_modules.to(self.device)

    def build_method_modules(self) -> None:
        """Hook: create heads, second networks (+ ``self.extra_optimizers``), thresholds in ``self.ssl_modules``."""

    def method_generator(self, seed: Optional[int]) -> torch.Generator:
        """A CPU generator for a method's own random draws (boxes, strong views): ``seed``, or one drawn from torch's
        RNG when None (set by nnU-Net's seeding), offset by the DDP rank so that every rank draws its own."""
        seed = seed if seed is not None else int(torch.randint(0, 2 ** 62, (1,)))
        return torch.Generator().manual_seed(seed + 7919 * self.local_rank)

    def build_loss_with_ignore_label(self, ignore_label: int) -> nn.Module:
        """nnU-Net's own loss (Dice + CE, deep-supervision weights, DDP batch Dice, compile) with ``ignore_label`` as
        its ignore label, for losses restricted to regions by marking the rest ignored.

        nnU-Net's ``_build_loss`` reads the label manager's ignore label and takes no argument, so it is swapped
        for the call and restored (the one place this package touches the label manager's private state)."""
        lm = self.label_manager
        saved, lm._ignore_label = lm._ignore_label, ignore_label
        try:
            return self._build_loss()
        finally:
            lm._ignore_label = saved

    @staticmethod
    def make_frozen_copy(net: nn.Module) -> nn.Module:
        """A gradient-free copy in eval mode with deep supervision off (only full resolution is needed)."""
        t = deepcopy(net)
        for p in t.parameters():
            p.requires_grad_(False)
        if hasattr(t, "decoder") and hasattr(t.decoder, "deep_supervision"):
            t.decoder.deep_supervision = False
        return t.eval()

    # ------------------------------------------------------------------ data
    def do_split(self):
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        if len(self.dataset_class.get_identifiers(self.preprocessed_dataset_folder)) == 0:
            raise UnlabeledDataError(
                f"No labeled case in {self.preprocessed_dataset_folder}: SSL still needs labeled cases. Add some to "
                f"imagesTr/labelsTr and run nnUNetv2_plan_and_preprocess again.")
        tr_keys, val_keys = super().do_split()
        if len(tr_keys) == 0:
            raise UnlabeledDataError(
                f"Fold {self.fold} has no labeled training case ({self.preprocessed_dataset_folder}). "
                f"SSL still needs labeled cases: add some to imagesTr/labelsTr.")
        return tr_keys, val_keys

    def get_dataloaders(self):
        dl_tr, dl_val = super().get_dataloaders()
        self.dataloader_unlabeled = self.get_unlabeled_dataloader()
        return dl_tr, dl_val

    @property
    def unlabeled_batch_size(self) -> int:
        return max(1, int(round(self.batch_size * self.unlabeled_batch_ratio)))

    def get_unlabeled_dataloader(self):
        """nnU-Net's augmentation pipeline (same patch size, spatial and intensity transforms) on unlabeled cases.

        The loader's output is the *weak* view; methods derive strong views from it on the device, so weak
        and strong views share the sampled spatial transform by construction.
        """
        manifest = check_unlabeled_folder(self.unlabeled_folder, self.plans_manager.plans, self.configuration_name,
                                          self.plans_manager.plans_name,
                                          dataset_id_hint=self.plans_manager.dataset_name)
        # preprocess-unlabeled always writes nnU-Net 2.8's blosc2 format (like nnU-Net's own preprocessor)
        dataset_u = nnUNetDatasetBlosc2(self.unlabeled_folder, manifest["cases"])
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        transforms = self.get_training_transforms(
            self.configuration_manager.patch_size, rotation, None, mirror_axes, dummy_2d,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=False,
            foreground_labels=self.label_manager.foreground_labels, regions=None, ignore_label=None)
        dl = nnUNetUnlabeledDataLoader(dataset_u, self.unlabeled_batch_size, initial_patch_size,
                                       self.configuration_manager.patch_size, self.label_manager,
                                       transforms=transforms)
        n_proc = get_allowed_n_proc_DA()
        if n_proc == 0:
            gen = SingleThreadedAugmenter(dl, None)
        else:
            gen = NonDetMultiThreadedAugmenter(dl, None, num_processes=n_proc, num_cached=max(6, n_proc // 2),
                                               seeds=None, pin_memory=self.device.type == "cuda", wait_time=0.002)
        _ = next(gen)
        self.print_to_log_file(f"Unlabeled pool: {len(manifest['cases'])} cases from {self.unlabeled_folder}, "
                               f"batch size {self.unlabeled_batch_size}")
        return gen

    def on_train_end(self):
        super().on_train_end()
        if isinstance(self.dataloader_unlabeled, NonDetMultiThreadedAugmenter):
            old_stdout = sys.stdout
            with open(os.devnull, "w") as f:
                sys.stdout = f
                self.dataloader_unlabeled._finish()
                sys.stdout = old_stdout

    def exported_module(self) -> nn.Module:
        """The (unwrapped) network written as ``network_weights``: what ``nnUNetv2_predict`` uses and what the
        final validation scores. Default: the student, or the EMA teacher when ``export_teacher``."""
        return self.teacher if (self.export_teacher and self.teacher is not None) else self.student

    def perform_actual_validation(self, save_probabilities: bool = False):
        exported = self.exported_module()
        if exported is self.student:
            return super().perform_actual_validation(save_probabilities)
        # score the exported network (also after `--val`, where the student was restored into self.network)
        student_state = {k: v.detach().clone() for k, v in self.student.state_dict().items()}
        self.student.load_state_dict(exported.state_dict())
        try:
            return super().perform_actual_validation(save_probabilities)
        finally:
            self.student.load_state_dict(student_state)

    # ------------------------------------------------------------------ schedule
    @property
    def total_iterations(self) -> int:
        return self.num_epochs * self.num_iterations_per_epoch

    def unsup_weight(self, t: Optional[int] = None) -> float:
        """lambda(t) at global iteration ``t`` (default: the current one)."""
        t = self.ssl_iteration if t is None else t
        return self.lambda_max * sigmoid_rampup(t, self.total_iterations, self.rampup_fraction)

    # ------------------------------------------------------------------ forward helpers
    def forward_parts(self, net: nn.Module, *parts: torch.Tensor) -> List[Output]:
        """One forward of ``net`` on ``cat(parts)`` (one pass, so DDP sees one graph), split back per part."""
        sizes = [p.shape[0] for p in parts]
        out = net(torch.cat(parts, 0) if len(parts) > 1 else parts[0])
        if isinstance(out, (list, tuple)):
            per_scale = [o.split(sizes, 0) for o in out]
            return [[s[i] for s in per_scale] for i in range(len(parts))]
        return list(out.split(sizes, 0))

    @staticmethod
    def ds_loss(loss: nn.Module, output: Output, targets: List[torch.Tensor]) -> torch.Tensor:
        """``loss`` (nnU-Net's, deep-supervision wrapped or not) on ``output`` against ``targets`` (one per DS scale,
        full resolution first): all scales if the network returned a list, else the full-resolution target."""
        return loss(output, targets) if isinstance(output, (list, tuple)) else loss(output, targets[0])

    @staticmethod
    def full_res(output: Output) -> torch.Tensor:
        """Full-resolution logits of a (possibly deep-supervised) output."""
        return output[0] if isinstance(output, (list, tuple)) else output

    @torch.no_grad()
    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.full_res(self.teacher(x))

    # ------------------------------------------------------------------ the step
    def compute_losses(self, data: torch.Tensor, target: Output, unlabeled: torch.Tensor
                       ) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, float]]:
        """Method hook. Returns ``(sup_loss, unsup_loss, metrics)``; runs under autocast on CUDA.

        ``metrics`` are per-step floats that are summed over the epoch; :meth:`finalize_metrics` turns the
        sums into logged values (default: means). Counts (for ratios) should be returned as counts.
        """
        raise NotImplementedError

    def optimization_groups(self) -> List[Tuple[torch.optim.Optimizer, List[nn.Parameter]]]:
        """(optimizer, parameters to clip) pairs stepped every iteration."""
        groups = [(self.optimizer, [p for g in self.optimizer.param_groups for p in g["params"]])]
        for opt, _, _ in self.extra_optimizers:
            groups.append((opt, [p for g in opt.param_groups for p in g["params"]]))
        return groups

    def before_optimizer_step(self) -> None:
        """Hook after backward, before unscale/clip (e.g. all-reduce gradients of modules outside DDP)."""

    def after_optimizer_step(self) -> None:
        """Hook after the optimizer step; default: the EMA teacher update."""
        if self.teacher is not None:
            self.ema.update(self.teacher, self.student, self.ssl_iteration)

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        unlabeled = next(self.dataloader_unlabeled)["data"].to(self.device, non_blocking=True)
        lam = self.unsup_weight()
        groups = self.optimization_groups()
        for opt, _ in groups:
            opt.zero_grad(set_to_none=True)
        # autocast only on CUDA, as nnU-Net: CPU autocast is slow and mps rejects it
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            sup, unsup, metrics = self.compute_losses(data, target, unlabeled)
        total = sup + lam * unsup
        if not bool(torch.isfinite(total)):
            return self._skip_nonfinite(sup, unsup)
        self._nonfinite_streak = 0
        if self.grad_scaler is not None:
            self.grad_scaler.scale(total).backward()
            self.before_optimizer_step()
            for opt, params in groups:
                self.grad_scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
            for opt, _ in groups:
                self.grad_scaler.step(opt)
            self.grad_scaler.update()
        else:
            total.backward()
            self.before_optimizer_step()
            for opt, params in groups:
                torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
                opt.step()
        self.after_optimizer_step()
        self.ssl_iteration += 1
        self._accumulate({"sup_loss": float(sup.detach()), "unsup_loss": float(unsup.detach()), "lambda": lam,
                          **metrics})
        return {"loss": total.detach().cpu().numpy()}

    def _skip_nonfinite(self, sup: torch.Tensor, unsup: torch.Tensor) -> dict:
        """Skip a step whose loss is NaN/inf; stop after ``max_nonfinite_streak`` in a row."""
        for opt, _ in self.optimization_groups():
            opt.zero_grad(set_to_none=True)
        self.nonfinite_total += 1
        self._nonfinite_streak += 1
        self.ssl_iteration += 1  # keep schedules aligned with the iteration budget
        self.print_to_log_file(f"WARNING: non-finite loss (sup={float(sup.detach())}, unsup={float(unsup.detach())}) "
                               f"at iteration {self.ssl_iteration - 1}; step skipped "
                               f"({self._nonfinite_streak} in a row, {self.nonfinite_total} in total).")
        if self._nonfinite_streak >= self.max_nonfinite_streak:
            raise FloatingPointError(
                f"{self._nonfinite_streak} consecutive non-finite losses: training stopped. The last good "
                f"checkpoint in {self.output_folder} is intact; lower the learning rate or lambda_max, check the "
                f"data for NaN/inf, then resume with --c.")
        return {"loss": np.array(np.nan, dtype=np.float32)}

    # ------------------------------------------------------------------ epoch bookkeeping
    def _accumulate(self, metrics: Dict[str, float]) -> None:
        for k, v in metrics.items():
            self._epoch_sums[k] = self._epoch_sums.get(k, 0.0) + float(v)
        self._epoch_steps += 1

    def finalize_metrics(self, sums: Dict[str, float], steps: int) -> Dict[str, float]:
        """Epoch sums -> logged values. Default: per-step means. Override for count-based ratios."""
        return {k: v / max(steps, 1) for k, v in sums.items()}

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        for _, sched, module in self.extra_optimizers:
            module.train()
            sched.step(self.current_epoch)
        self._epoch_sums, self._epoch_steps = {}, 0

    def on_train_epoch_end(self, train_outputs: List[dict]):
        finite = [o for o in train_outputs if np.all(np.isfinite(o["loss"]))]
        super().on_train_epoch_end(finite if finite else train_outputs)
        keys = sorted(self._epoch_sums)
        vec = torch.tensor([self._epoch_sums[k] for k in keys] + [float(self._epoch_steps)], dtype=torch.float64)
        if self.is_ddp:
            vec = vec.to(self.device)
            dist.all_reduce(vec)  # counts and sums over ranks; every rank runs the same method, same keys
            vec = vec.cpu()
        sums = dict(zip(keys, vec[:-1].tolist()))
        metrics = self.finalize_metrics(sums, int(vec[-1]))
        metrics["nonfinite_steps_total"] = float(self.nonfinite_total)
        self.ssl_log.log_epoch(self.current_epoch, metrics)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k in self.summary_keys())
        self.print_to_log_file(f"SSL: {shown}")

    def summary_keys(self) -> Sequence[str]:
        """Metrics printed in the one-line epoch summary of the training log."""
        return ("sup_loss", "unsup_loss", "lambda")

    def plot_groups(self) -> Dict[str, List[str]]:
        """Panels of ``progress_ssl.png``: title -> metric keys."""
        return {"losses": ["sup_loss", "unsup_loss"], "unsupervised weight": ["lambda"]}

    def on_epoch_end(self):
        epoch = self.current_epoch
        super().on_epoch_end()
        if self.local_rank == 0:
            self.ssl_log.write_jsonl(join(self.output_folder, "ssl_progress.jsonl"))
            try:
                self.ssl_log.plot(join(self.output_folder, "progress_ssl.png"), self.plot_groups())
            except Exception as e:  # a plotting failure must never stop a training
                self.print_to_log_file(f"WARNING: could not plot progress_ssl.png for epoch {epoch}: {e}")

    # ------------------------------------------------------------------ checkpoints
    def method_state_dict(self) -> dict:
        """Hook: method state that is not a module (e.g. a stage, counters)."""
        return {}

    def load_method_state_dict(self, state: dict) -> None:
        """Hook: inverse of :meth:`method_state_dict`."""

    def ssl_state_dict(self) -> dict:
        state = {
            "ssl_iteration": self.ssl_iteration,
            "nonfinite_total": self.nonfinite_total,
            "ssl_modules": self.ssl_modules.state_dict(),
            "extra_optimizers": [opt.state_dict() for opt, _, _ in self.extra_optimizers],
            "ssl_log": self.ssl_log.state_dict(),
            "method_state": self.method_state_dict(),
        }
        if self.teacher is not None:
            state["teacher_weights"] = self.teacher.state_dict()
        if self.exported_module() is not self.student:
            state["student_weights"] = self.student.state_dict()  # network_weights holds another network
        return state

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint keys unchanged, plus ``ssl_state``; written atomically (temp file + rename)."""
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        checkpoint = {
            "network_weights": self.exported_module().state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": self.logger.get_checkpoint(),
            "_best_ema": self._best_ema,
            "current_epoch": self.current_epoch + 1,
            "init_args": self.my_init_kwargs,
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
            "ssl_state": self.ssl_state_dict(),
        }
        tmp = f"{filename}.tmp-{os.getpid()}"
        torch.save(checkpoint, tmp)
        os.replace(tmp, filename)

    def load_checkpoint(self, filename_or_checkpoint: Union[dict, str]) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        checkpoint = filename_or_checkpoint if isinstance(filename_or_checkpoint, dict) else \
            torch.load(filename_or_checkpoint, map_location=self.device, weights_only=False)
        state = checkpoint.get("ssl_state")
        if state is None:
            # e.g. fine-tuning from a stock nnU-Net checkpoint: start the teacher from the loaded student
            self.print_to_log_file("Checkpoint has no SSL state; the teacher starts from the loaded weights.")
            if self.teacher is not None:
                self.teacher.load_state_dict(self.student.state_dict())
            return
        if "student_weights" in state:
            self.student.load_state_dict(state["student_weights"])
        if self.teacher is not None:
            self.teacher.load_state_dict(state["teacher_weights"])
        self.ssl_modules.load_state_dict(state["ssl_modules"])
        for (opt, _, _), opt_state in zip(self.extra_optimizers, state["extra_optimizers"]):
            opt.load_state_dict(opt_state)
        self.ssl_iteration = int(state["ssl_iteration"])
        self.nonfinite_total = int(state["nonfinite_total"])
        self.ssl_log.load_state_dict(state["ssl_log"])
        self.ssl_log.truncate(self.current_epoch)
        self.load_method_state_dict(state.get("method_state", {}))
