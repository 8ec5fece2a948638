"""ACTION (You et al., IPMI 2023) and ACTION++ (You et al., MICCAI 2023) as nnU-Net trainers.

Specification: ``specs/action.md``. A student and its EMA teacher train in three consecutive stages, each a
fraction of the epoch budget (``stage_fractions``); the stage is a pure function of ``current_epoch``:

* **i** global contrastive distillation: the student *encoder* (strong view) matches the teacher's sharp
  similarity distribution over a queue of past teacher image embeddings (``KL(p_t || p_s)``);
* **ii** + local distillation of window embeddings of the full-resolution logits, plus nnU-Net's supervised loss;
* **iii** fine-tuning: supervised loss + confidence-weighted pseudo-label CE on CutMix-ed unlabeled images
  + AnCo (sparse anatomical contrast on multi-level decoder features). ACTION++ adds SAACL (supervised
  contrast with Hungarian-assigned class centres) and the ATS cosine schedule of every temperature.

The network stays nnU-Net's own (``network_weights`` is a stock network, so ``nnUNetv2_predict`` works);
decoder features are read through forward hooks (``FeatureCapture``) on the unwrapped student, and only at
sampled voxels (``gather_points``), so the full-resolution feature concatenation is never built. Heads,
predictors, queues and centres live in ``self.ssl_modules`` and are optimised as extra parameter groups of
nnU-Net's SGD: ``[network, g, q, h_l, r_l, rho]``, the same layout in every stage.

Memory (spec section 3): teacher forwards run first under no_grad and keep only embeddings, uint8 pseudo-labels
and fp16 confidences; one student forward on cat(labeled, unlabeled); contrastive losses against a bank (local
KL, SAACL) run in activation-checkpointed row chunks (``contrastive_chunk_elements``), so their
``rows x bank`` logit matrices never exist all at once; the no-grad AnCo key pool is embedded in chunks.

Choices the spec leaves open (see the report in ``benchmarks/results/action_memory.md`` for numbers):
stage boundaries round halves up (``round(f * E)``); in stage ii the labeled images are strongly augmented too, so
one forward serves the supervised loss and the distillation of all images; ``saacl_sampling='hard'`` thresholds the
*teacher's* class probability (points must be known before the teacher forward gathers them); the queues are
snapshotted before the loss, because the losses keep the bank for backward and enqueueing writes it in place.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import distributed as dist
from torch import nn

from nnunet_ssl.algorithms.augment import StrongView
from nnunet_ssl.algorithms.contrastive.anco import AnCoLoss, AnCoSampler
from nnunet_ssl.algorithms.contrastive.distillation import pooled_grid, similarity_kl, windows_from_grid
from nnunet_ssl.algorithms.contrastive.heads import (DenseRepresentationHead2d, GlobalHead, GlobalPredictor,
                                                     PointHead, WindowHead, WindowPredictor)
from nnunet_ssl.algorithms.contrastive.memory_bank import FIFOQueue
from nnunet_ssl.algorithms.contrastive.point_gather import FeatureCapture, gather_points
from nnunet_ssl.algorithms.contrastive.saacl import CentreAssigner, saacl_loss, sample_class_points
from nnunet_ssl.algorithms.distributed import average_gradients, is_distributed
from nnunet_ssl.algorithms.losses.pseudo_label import confidence_weighted_ce, confidence_weights
from nnunet_ssl.algorithms.mixing import ClassMix, CutMix
from nnunet_ssl.algorithms.row_chunks import checkpointed_row_mean, rows_per_chunk
from nnunet_ssl.algorithms.schedules import StagewisePolyLR, cosine_cycle, epoch_stage, stage_boundaries
from nnunet_ssl.algorithms.seeding import step_seed
from nnunet_ssl.algorithms.step_metrics import StepMetrics, epoch_values
from nnunet_ssl.algorithms.unet_features import feature_channels, feature_modules
from nnunet_ssl.trainers.budgets import budget_variant
from nnunet_ssl.trainers.nnUNetTrainerSSL import SSLConfigurationError, nnUNetTrainerSSL

Embed = Callable[[torch.Tensor], torch.Tensor]


class nnUNetTrainerACTION(nnUNetTrainerSSL):
    """ACTION: global and local contrastive distillation (stages i-ii), then pseudo-label CE + AnCo (stage iii).

    Hyperparameters are class attributes (spec section 2.9 defaults); variants are subclasses.
    """

    # ---- base-class knobs: every weight lives in the returned unsupervised term, no ramp-up (spec 2.7)
    lambda_max = 1.0
    rampup_fraction = 0.0
    ema_decay = 0.99              # m, constant (spec 2.2)
    ema_warmup = False
    # ---- stages (spec 4)
    num_stages = 3
    stage_fractions: Tuple[float, float, float] = (0.25, 0.25, 0.5)
    lr_schedule = "per_stage"     # or 'global' (nnU-Net's single poly schedule)
    # ---- heads
    head_activation = True        # ReLU between head layers (the released code has none)
    global_dim_2d = 512           # d_g
    global_dim_3d = 128
    anco_dim_2d = 512             # D
    anco_dim_3d = 128
    anco_head_mode = "point"      # 'point': rho on gathered points; 'dense' (2D only): the code's 3x3 conv head
    # ---- distillation (spec 2.4, 2.5)
    global_queue_size = 36        # K_g, images
    local_queue_images = 36       # K_l, images (K_l * N_w rows)
    tau_s = 0.1
    tau_t = 0.01
    window_cells_2d = 8           # P
    window_cells_3d = 4
    # contrastive losses against a bank run in activation-checkpointed row chunks of at most this many logits
    # (rows x bank columns): 2^20 fp32 logits = 4 MB per temporary, e.g. 84 rows against the 3D local bank
    contrastive_chunk_elements = 2 ** 20
    # ---- fine-tuning (spec 2.6 - 2.8)
    sup_weight = 1.0              # lambda_sup
    pl_weight = 1.0               # lambda_u
    pl_threshold = 0.97           # theta_s
    valid_threshold = 0.7         # theta_w (AnCo validity of pseudo-labels)
    mix_mode = "cutmix"           # or 'classmix'
    cutmix_area = 0.5
    strong_p = 0.5
    anco_weight = 0.01            # lambda_an
    anco_queries = 256            # N_q per class
    anco_pool = 4096              # M per class
    anco_negatives = 512
    anco_hard_threshold = 0.97
    tau_an = 0.5
    anco_proto_exact = False
    embed_chunk_points = 2048     # points per chunk when embedding the no-grad key pool
    # ---- ACTION++ (spec 5); off in ACTION
    use_saacl = False
    saacl_weight = 0.01           # lambda_sa
    saacl_lambda_a = 0.2
    saacl_points = 256            # per class present
    saacl_queue = 12288
    saacl_sampling = "uniform"    # or 'hard' (teacher p_c < saacl_hard_threshold)
    saacl_hard_threshold = 0.7
    saacl_centroid_momentum = 0.9
    assign_cost = "dot"           # or 'l2' (the paper's unsquared distances)
    tau_sa = 0.1                  # fixed tau_sa when ATS is off
    use_ats = False
    ats_cycles = 1
    ats_tau_s = (0.1, 1.0)        # (tau-, tau+) per temperature
    ats_tau_t = (0.01, 1.0)
    ats_tau_an = (0.1, 1.0)
    ats_tau_sa = (0.1, 1.0)
    # ---- sampling RNG: seeded per (seed, rank, epoch, step), so resumes need no RNG state
    sampling_seed = 12345

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_classes = self.label_manager.num_segmentation_heads
        self.ndim = len(self.configuration_manager.patch_size)
        if self.anco_head_mode not in ("point", "dense"):
            raise SSLConfigurationError(f"anco_head_mode must be 'point' or 'dense', got {self.anco_head_mode!r}")
        if self.anco_head_mode == "dense" and self.ndim != 2:
            raise SSLConfigurationError("anco_head_mode='dense' materialises the full-resolution feature map and is "
                                        "2D only; use 'point' for 3D configurations.")
        for attr, allowed in (("lr_schedule", ("per_stage", "global")), ("mix_mode", ("cutmix", "classmix")),
                              ("saacl_sampling", ("uniform", "hard")), ("assign_cost", ("dot", "l2"))):
            if getattr(self, attr) not in allowed:
                raise SSLConfigurationError(f"{attr} must be one of {allowed}, got {getattr(self, attr)!r}")
        self.capture: Optional[FeatureCapture] = None
        self.teacher_capture: Optional[FeatureCapture] = None
        self.generator = torch.Generator()
        self._ddp_min_images: Dict[int, int] = {}
        self._step_in_epoch = 0
        self.strong_view = StrongView(p=self.strong_p)
        self.mixer = CutMix(self.cutmix_area) if self.mix_mode == "cutmix" else ClassMix()
        self.anco_sampler = AnCoSampler(self.anco_pool, self.anco_queries, self.anco_hard_threshold)
        self.anco_loss = AnCoLoss(self.anco_negatives, self.tau_an, self.anco_proto_exact)

    # ------------------------------------------------------------------ stages
    def stage_bounds(self) -> Tuple[int, int]:
        """``(E_1, E_2)``: first epochs of stages ii and iii, ``round(f * E)`` rounding halves up."""
        return stage_boundaries(self.stage_fractions, self.num_epochs)

    def stage_of_epoch(self, epoch: int) -> int:
        """1, 2 or 3: the stage of 0-based ``epoch``; a pure function of the epoch (resumable anywhere)."""
        return epoch_stage(epoch, self.stage_bounds())

    @property
    def stage(self) -> int:
        return self.stage_of_epoch(self.current_epoch)

    def stage_span(self, stage: int) -> Tuple[int, int]:
        """``[start, end)`` epochs of ``stage``."""
        b = (0, *self.stage_bounds(), self.num_epochs)
        return b[stage - 1], b[stage]

    def trainable(self, stage: int) -> Dict[str, bool]:
        """Which parts get gradient in ``stage`` (spec 4): ``encoder``, ``decoder`` and the student heads."""
        return {"encoder": True, "decoder": stage >= 2, "g": stage <= 2, "q": stage <= 2,
                "h_l": stage == 2, "r_l": stage == 2, "rho": stage == 3}

    def apply_stage(self, epoch: int) -> None:
        """Set ``requires_grad`` for ``epoch``'s stage and run the boundary actions if ``epoch`` is E_1 or E_2.

        Boundary actions are idempotent (running them twice equals running them once): clear the optimizer
        state (momentum), and at E_2 copy the student (network and heads) into the teacher and reset
        ``_best_ema`` so that ``checkpoint_best`` comes from stage iii.
        """
        stage = self.stage_of_epoch(epoch)
        on = self.trainable(stage)
        for name, p in self.student.named_parameters():
            p.requires_grad_(on["encoder"] if name.startswith("encoder.") else on["decoder"])
        for name in ("g", "q", "h_l", "r_l", "rho"):
            for p in self.ssl_modules[name].parameters():
                p.requires_grad_(on[name])
        e1, e2 = self.stage_bounds()
        if epoch in (e1, e2):
            self.optimizer.state.clear()
        if epoch == e2:
            with torch.no_grad():
                self.teacher.load_state_dict(self.student.state_dict())
                for t_name, s_name in self.teacher_heads():
                    self.ssl_modules[t_name].load_state_dict(self.ssl_modules[s_name].state_dict())
            self._best_ema = None

    def stage_progress(self) -> Tuple[int, int]:
        """``(t, T_s)``: iterations since the current stage began and the stage length in iterations (ATS)."""
        start, end = self.stage_span(self.stage)
        n = self.num_iterations_per_epoch
        return (self.current_epoch - start) * n + self._step_in_epoch, max((end - start) * n, 1)

    def temperature(self, name: str) -> float:
        """Temperature ``name`` in {'tau_s', 'tau_t', 'tau_an', 'tau_sa'} now: fixed, or ATS (spec 5.2)."""
        if not self.use_ats:
            return float(getattr(self, name))
        low, high = getattr(self, f"ats_{name}")
        t, total = self.stage_progress()
        return cosine_cycle(t, total, low, high, self.ats_cycles)

    # ------------------------------------------------------------------ modules
    def _do_i_compile(self) -> bool:
        # hooks store tensors and stage switches flip requires_grad: both defeat torch.compile
        return False

    def initialize(self):
        super().initialize()
        if self.lr_schedule == "per_stage":
            self.lr_scheduler = StagewisePolyLR(self.optimizer, self.initial_lr,
                                                lambda: (0, *self.stage_bounds(), self.num_epochs))

    def teacher_heads(self) -> List[Tuple[str, str]]:
        """(teacher head, student head) pairs kept as EMA copies."""
        pairs = [("g_teacher", "g"), ("h_l_teacher", "h_l")]
        if self.use_saacl:
            pairs.append(("rho_teacher", "rho"))
        return pairs

    def build_method_modules(self) -> None:
        """Heads (student + EMA teacher copies), queues and (ACTION++) centres; hooks; optimizer groups."""
        net = self.student
        n, c = self.ndim, self.num_classes
        chans = feature_channels(net)
        d_g = self.global_dim_2d if n == 2 else self.global_dim_3d
        d_rho = self.anco_dim_2d if n == 2 else self.anco_dim_3d
        cells = self.window_cells()
        act = self.head_activation
        m = self.ssl_modules
        m["g"] = GlobalHead(chans[0], d_g, act)
        m["q"] = GlobalPredictor(d_g, act)
        m["h_l"] = WindowHead(c, act)
        m["r_l"] = WindowPredictor(c, act)
        m["rho"] = (DenseRepresentationHead2d if self.anco_head_mode == "dense" else PointHead)(sum(chans), d_rho,
                                                                                               act)
        for t_name, s_name in self.teacher_heads():
            m[t_name] = self.make_frozen_copy(m[s_name])
        m["queue_glob"] = FIFOQueue(self.global_queue_size, d_g)
        m["queue_loc"] = FIFOQueue(self.local_queue_images * 7 ** n, c * cells ** n)
        if self.use_saacl:
            m["queue_saacl"] = FIFOQueue(self.saacl_queue, d_rho, with_labels=True)
            m["centres"] = CentreAssigner(c, d_rho, self.saacl_centroid_momentum, self.assign_cost)
        m.to(self.device)
        if is_distributed():
            # heads are initialised from each rank's own RNG: start every rank from rank 0's (DDP does the same
            # for the network); the state_dict tensors share storage with the parameters and buffers
            for t in m.state_dict().values():
                dist.broadcast(t, src=0)
        # fixed group layout [network, g, q, h_l, r_l, rho]: inactive groups keep grad=None, so SGD skips them
        for name in ("g", "q", "h_l", "r_l", "rho"):
            self.optimizer.add_param_group({"params": list(m[name].parameters())})
        # hooks go on the unwrapped student *after* the teacher was deep-copied (a deepcopy copies hooks)
        self.capture = FeatureCapture(feature_modules(net))
        if self.use_saacl:
            self.teacher_capture = FeatureCapture(feature_modules(self.teacher))
            self.teacher_capture.active = False
        # hooks record only inside compute_losses (validation / inference forwards keep nothing)
        self.capture.active = False

    def action_config(self) -> dict:
        """Hyperparameters a resume must not change (stored in the checkpoint, asserted on load)."""
        keys = ("stage_fractions", "lr_schedule", "head_activation", "global_dim_2d", "global_dim_3d", "anco_dim_2d",
                "anco_dim_3d", "anco_head_mode", "global_queue_size", "local_queue_images", "tau_s", "tau_t",
                "window_cells_2d", "window_cells_3d", "sup_weight", "pl_weight", "pl_threshold", "valid_threshold",
                "mix_mode", "anco_weight", "tau_an", "use_saacl", "saacl_weight", "saacl_lambda_a", "saacl_queue",
                "tau_sa", "use_ats", "ats_cycles", "ats_tau_s", "ats_tau_t", "ats_tau_an", "ats_tau_sa")
        cfg = {k: getattr(self, k) for k in keys}
        cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
        cfg["num_epochs"] = self.num_epochs
        return cfg

    def method_state_dict(self) -> dict:
        return {"action_config": self.action_config()}

    def load_method_state_dict(self, state: dict) -> None:
        stored = state.get("action_config")
        if stored is None:
            return
        now = self.action_config()
        diff = {k: (stored.get(k), now.get(k)) for k in set(stored) | set(now) if stored.get(k) != now.get(k)}
        if diff:
            raise SSLConfigurationError(f"{self.__class__.__name__}: the checkpoint was trained with other ACTION "
                                        f"settings (stored, now): {diff}. Resume with the same trainer.")

    # ------------------------------------------------------------------ loop hooks
    def on_train_epoch_start(self):
        self.apply_stage(self.current_epoch)
        self._step_in_epoch = 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        super().on_train_epoch_start()

    def train_step(self, batch: dict) -> dict:
        try:
            return super().train_step(batch)
        finally:
            self._step_in_epoch += 1

    def before_optimizer_step(self) -> None:
        """DDP: average the gradients of everything outside the DDP wrapper with one flattened all_reduce.

        That is the student heads and, in stage i, the encoder (called unwrapped). A parameter whose gradient is
        None on this rank (e.g. rho when AnCo returned 0 early) contributes zeros; it is stepped only if some rank
        produced a gradient, so all ranks apply identical updates.
        """
        if not is_distributed():
            return
        params = [p for name in ("g", "q", "h_l", "r_l", "rho") for p in self.ssl_modules[name].parameters()
                  if p.requires_grad]
        if self.stage == 1:
            params += [p for p in self.student.encoder.parameters() if p.requires_grad]
        average_gradients(params)

    def after_optimizer_step(self) -> None:
        """One EMA update per step: the teacher network (base class) and the teacher heads."""
        super().after_optimizer_step()
        for t_name, s_name in self.teacher_heads():
            self.ema.update(self.ssl_modules[t_name], self.ssl_modules[s_name], self.ssl_iteration)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def first(output, n: int):
        """The first ``n`` cases of a (possibly deep-supervised) output: views, no copy."""
        return [o[:n] for o in output] if isinstance(output, (list, tuple)) else output[:n]

    def _seed_generator(self) -> torch.Generator:
        rank = self.local_rank if self.is_ddp else 0
        return self.generator.manual_seed(step_seed(self.sampling_seed, rank, self.current_epoch,
                                                    self._step_in_epoch))

    def chunk_rows(self, columns: int) -> int:
        """Rows per checkpointed chunk of a contrastive loss with ``columns`` logits per row."""
        return rows_per_chunk(self.contrastive_chunk_elements, columns)

    def _enqueue_images(self, queue: FIFOQueue, rows: torch.Tensor, images: int) -> None:
        """Enqueue ``rows`` ``(images * G, D)`` (``G`` rows per image) as whole images.

        Under DDP every rank must all-gather the same number of rows, but nnU-Net's per-rank batch sizes can
        differ by one: every rank enqueues the smallest per-rank image count (one all_reduce, then cached).
        """
        group = rows.shape[0] // images
        if is_distributed():
            if images not in self._ddp_min_images:
                n = torch.tensor([images], device=rows.device)
                dist.all_reduce(n, op=dist.ReduceOp.MIN)
                self._ddp_min_images[images] = int(n)
            images = self._ddp_min_images[images]
        queue.enqueue(rows[:images * group], group_size=group)

    def embedder(self, head: nn.Module, feats: Sequence[torch.Tensor], shape: Sequence[int]) -> Embed:
        """``coords (N, 1 + n) -> (N, D)``: ``head`` on the multi-level features ``feats`` read at ``coords``.

        'point' mode interpolates each level only at the points (``gather_points``); 'dense' mode (2D) builds the
        released code's full-resolution concatenation ``(B, C_cat, H, W)`` once and indexes the head's output.
        """
        if self.anco_head_mode == "point":
            def embed(coords: torch.Tensor) -> torch.Tensor:
                if torch.is_grad_enabled() or coords.shape[0] <= self.embed_chunk_points:
                    return head(gather_points(feats, coords, shape))
                # the no-grad key pool (|C| * 4096 points): chunks keep the (N, C_cat) gather transient small
                return torch.cat([head(gather_points(feats, c, shape))
                                  for c in coords.split(self.embed_chunk_points)])
            return embed
        cat = torch.cat([F.interpolate(f, size=tuple(shape), mode="bilinear", align_corners=False) for f in feats], 1)
        dense = head(cat)
        return lambda c: dense[c[:, 0], :, c[:, 1], c[:, 2]]

    def window_cells(self) -> int:
        """``P``, pooled cells per window axis."""
        return self.window_cells_2d if self.ndim == 2 else self.window_cells_3d

    @torch.no_grad()
    def teacher_global(self, u_t: torch.Tensor) -> torch.Tensor:
        """Teacher bottleneck ``(B, C_b, *S_b)`` -> ``z_t = normalise(g_T(u_t))`` ``(B, d_g)`` float32."""
        return F.normalize(self.ssl_modules["g_teacher"](u_t).float(), dim=1)

    @torch.no_grad()
    def teacher_windows(self, z_t: torch.Tensor) -> torch.Tensor:
        """Teacher full-resolution logits ``(B, C, *S)`` -> window embeddings ``(B * 7^n, C * P^n)`` float32."""
        cells = self.window_cells()
        return windows_from_grid(self.ssl_modules["h_l_teacher"](pooled_grid(z_t, cells)), cells)

    def _global_distillation(self, u_s: torch.Tensor, z_t: torch.Tensor, log: StepMetrics) -> torch.Tensor:
        """L_glob of the student bottleneck ``u_s`` ``(B, C_b, *S_b)`` against the global queue, with teacher
        targets ``z_t`` ``(B, d_g)``; then enqueue ``z_t`` (spec 2.4)."""
        m = self.ssl_modules
        z_s = F.normalize(m["q"](m["g"](u_s)).float(), dim=1)
        queue = m["queue_glob"]
        tau_s, tau_t = self.temperature("tau_s"), self.temperature("tau_t")
        # the loss saves the anchors for backward and the enqueue below writes the bank in place: use a snapshot
        loss, st = similarity_kl(z_s, z_t, queue.data.clone(), queue.valid_mask(), tau_s, tau_t, return_stats=True)
        self._enqueue_images(queue, z_t, z_t.shape[0])
        log.mean("loss_glob", loss.detach())
        log.mean("w_glob", 1.0)
        log.mean("tau_s", tau_s)
        log.mean("tau_t", tau_t)
        log.mean("queue_fill_glob", queue.fill_fraction)
        log.finite_mean("glob_entropy_t", st["entropy_t"])
        log.finite_mean("glob_entropy_s", st["entropy_s"])
        return loss

    def _local_distillation(self, z_s: torch.Tensor, w_t: torch.Tensor, log: StepMetrics) -> torch.Tensor:
        """L_loc of the student's full-resolution logits ``z_s`` ``(B, C, *S)`` against the local queue, with
        teacher window embeddings ``w_t`` ``(B * 7^n, C * P^n)`` (spec 2.5); then enqueue ``w_t``.

        The heads run on the pooled ``4P``-cell grid, so only C-channel pooled logits are ever processed.
        """
        m = self.ssl_modules
        cells = self.window_cells()
        n_w = 7 ** self.ndim
        w_s = windows_from_grid(m["r_l"](m["h_l"](pooled_grid(z_s, cells))), cells)
        queue = m["queue_loc"]
        bank, valid = queue.data.clone(), queue.valid_mask()
        tau_s, tau_t = self.temperature("tau_s"), self.temperature("tau_t")
        loss, st = checkpointed_row_mean(
            lambda s_rows, t_rows: similarity_kl(s_rows, t_rows, bank, valid, tau_s, tau_t, return_stats=True),
            (w_s, w_t), self.chunk_rows(bank.shape[0]))
        self._enqueue_images(queue, w_t, w_t.shape[0] // n_w)
        log.mean("loss_loc", loss.detach())
        log.mean("w_loc", 1.0)
        log.mean("queue_fill_loc", queue.fill_fraction)
        log.finite_mean("loc_entropy_t", st["entropy_t"])
        log.finite_mean("loc_entropy_s", st["entropy_s"])
        return loss

    # ------------------------------------------------------------------ the three stages
    def compute_losses(self, data, target, unlabeled):
        gen = self._seed_generator()
        log = StepMetrics()
        stage = self.stage
        self.capture.active = True
        try:
            if stage == 1:
                sup, unsup = self._stage_i(data, unlabeled, gen, log)
            elif stage == 2:
                sup, unsup = self._stage_ii(data, target, unlabeled, gen, log)
            else:
                sup, unsup = self._stage_iii(data, target, unlabeled, gen, log)
        finally:
            # autograd keeps what backward needs; the store must not outlive the step
            self.capture.active = False
            self.capture.clear()
            if self.teacher_capture is not None:
                self.teacher_capture.active = False
                self.teacher_capture.clear()
        log.mean("loss_total", (sup.detach() + unsup.detach()).float())
        return sup, unsup, log.floats()

    def _stage_i(self, data, unlabeled, gen, log):
        """Stage i: encoders only. Teacher on the weak view, student encoder (unwrapped) on the strong view."""
        x = torch.cat([data, unlabeled], 0)
        with torch.no_grad():
            z_t = self.teacher_global(self.teacher.encoder(x)[-1])
        u_s = self.student.encoder(self.strong_view(x, gen))[-1]
        loss = self._global_distillation(u_s, z_t, log)
        return torch.zeros((), device=self.device), loss

    def _stage_ii(self, data, target, unlabeled, gen, log):
        """Stage ii: supervised loss + global + local distillation; one student forward on all strong views.

        The labeled images are strongly augmented too (spatially identical, intensity only), so the one forward
        serves both the supervised loss and the distillation of all images.
        """
        b_l = data.shape[0]
        x = torch.cat([data, unlabeled], 0)
        with torch.no_grad():  # the teacher keeps only its (B, d_g) and window embeddings
            skips = self.teacher.encoder(x)
            z_t = self.teacher_global(skips[-1])
            w_t = self.teacher_windows(self.teacher.decoder(skips))
            del skips
        out = self.network(self.strong_view(x, gen))
        sup = self.loss(self.first(out, b_l), target)
        loss_glob = self._global_distillation(self.capture.features()[0], z_t, log)
        loss_loc = self._local_distillation(self.full_res(out), w_t, log)
        log.mean("loss_sup", sup.detach())
        log.mean("w_sup", self.sup_weight)
        return self.sup_weight * sup, loss_glob + loss_loc

    def _stage_iii(self, data, target, unlabeled, gen, log):
        """Stage iii: supervised + confidence-weighted pseudo-label CE on mixed images + AnCo (+ SAACL).

        The teacher runs first under no_grad and keeps only uint8 labels, fp16 confidences and (ACTION++) the
        teacher embeddings of the SAACL points, so its activations are gone before the student's exist.
        """
        b_l = data.shape[0]
        shape = tuple(data.shape[2:])
        gt_full = target[0] if isinstance(target, (list, tuple)) else target
        gt = gt_full[:, 0].long()
        if self.label_manager.has_ignore_label:
            valid_l = gt != self.label_manager.ignore_label
            gt = torch.where(valid_l, gt, torch.zeros_like(gt))
        else:
            valid_l = torch.ones_like(gt, dtype=torch.bool)

        sa_coords = sa_labels = t_emb = None
        with torch.no_grad():
            if self.use_saacl:
                if self.saacl_sampling == "uniform":  # drawn from the GT before the teacher forward (spec 3.6)
                    sa_coords, sa_labels = sample_class_points(gt, valid_l, self.num_classes, self.saacl_points, gen)
                self.teacher_capture.active = True
                logits_t = self.teacher(torch.cat([data, unlabeled], 0))
                self.teacher_capture.active = False
                if self.saacl_sampling == "hard":
                    p_l = torch.softmax(logits_t[:b_l].float(), 1)
                    sa_coords, sa_labels = sample_class_points(gt, valid_l, self.num_classes, self.saacl_points, gen,
                                                               probs=p_l, hard_threshold=self.saacl_hard_threshold)
                    del p_l
                t_emb = self.embedder(self.ssl_modules["rho_teacher"], self.teacher_capture.features(),
                                      shape)(sa_coords)
                self.teacher_capture.clear()
                logits_t = logits_t[b_l:]
            else:
                logits_t = self.teacher(unlabeled)
            conf, y_hat = torch.softmax(logits_t.float(), 1).max(1)
            y_hat, conf = y_hat.to(torch.uint8), conf.half()
            del logits_t
            mix = self.mixer(unlabeled, y_hat, conf, gen)
            x_u = self.strong_view(mix.image, gen)
            del y_hat, conf

        out = self.network(torch.cat([data, x_u], 0))
        sup = self.loss(self.first(out, b_l), target)
        z = self.full_res(out)
        loss_pl = confidence_weighted_ce(z[b_l:], mix.labels, mix.confidence, self.pl_threshold)

        # AnCo: coordinates first (C-channel maps), then features only at those points
        feats = self.capture.features()
        with torch.no_grad():
            y = torch.cat([gt, mix.labels.long()], 0)
            valid = torch.cat([valid_l, mix.confidence.float() >= self.valid_threshold], 0)
            probs = torch.softmax(z.detach().float(), 1)
            sample = self.anco_sampler(y, valid, probs, gen)
            del probs
        embed = self.embedder(self.ssl_modules["rho"], feats, shape)
        tau_an = self.temperature("tau_an")
        loss_anco, diag = self.anco_loss(sample, embed, gen, tau=tau_an, y=y, valid=valid)
        unsup = self.pl_weight * loss_pl + self.anco_weight * loss_anco

        log.mean("loss_sup", sup.detach())
        log.mean("w_sup", self.sup_weight)
        log.mean("loss_unsup", loss_pl.detach())
        log.mean("w_unsup", self.pl_weight)
        log.mean("loss_anco", loss_anco.detach())
        log.mean("w_anco", self.anco_weight)
        log.mean("tau_an", tau_an)
        self._log_pseudo_labels(mix, log)
        self._log_anco(diag, log)

        if self.use_saacl:
            unsup = unsup + self.saacl_weight * self._saacl(embed, sa_coords, sa_labels, t_emb, log)
        return self.sup_weight * sup, unsup

    def _saacl(self, embed: Embed, coords: torch.Tensor, labels: torch.Tensor, t_emb: torch.Tensor,
               log: StepMetrics) -> torch.Tensor:
        """SAACL on the labeled points ``coords (N, 1 + n)`` (spec 5.1): centroid EMA + Hungarian, loss, enqueue."""
        m = self.ssl_modules
        queue, centres = m["queue_saacl"], m["centres"]
        s_emb = embed(coords)
        changes = centres.update(s_emb, labels)
        if changes:
            self.print_to_log_file(f"SAACL assignment pi changed: {centres.perm.tolist()}", also_print_to_console=False)
        tau_sa = self.temperature("tau_sa")
        bank, bank_labels, valid = queue.data.clone(), queue.labels.clone(), queue.valid_mask()
        loss, st = checkpointed_row_mean(
            lambda s_rows, t_rows, y_rows: saacl_loss(s_rows, t_rows, y_rows, bank, bank_labels, valid,
                                                      centres.centres, centres.perm, tau_sa, self.saacl_lambda_a),
            (s_emb, t_emb, labels), self.chunk_rows(bank.shape[0] + self.num_classes + 1))
        # DDP ranks must all-gather equal row counts: pad to 256 C rows with label -1 (masked)
        queue.enqueue(t_emb, labels, pad_to=self.saacl_points * self.num_classes if is_distributed() else None)
        log.mean("loss_saacl", loss.detach())
        log.mean("loss_saacl_centre", st["centre"])
        log.mean("w_saacl", self.saacl_weight)
        log.mean("tau_sa", tau_sa)
        log.mean("queue_fill_saacl", queue.fill_fraction)
        log.total("saacl_perm_changes", float(changes))
        log.finite_mean("saacl_alignment", centres.alignment())
        return loss

    def _log_pseudo_labels(self, mix, log: StepMetrics) -> None:
        log.mean("pl_weight", confidence_weights(mix.confidence, self.pl_threshold).mean())
        log.mean("pl_conf_frac", (mix.confidence.float() >= self.valid_threshold).float().mean())
        log.mean("mix_skipped", float(mix.skipped))
        hist = torch.bincount(mix.labels.reshape(-1).long(), minlength=self.num_classes).float()
        hist = hist / hist.sum().clamp(min=1)
        for c in range(self.num_classes):
            log.mean(f"pl_class_frac_c{c}", hist[c])

    def _log_anco(self, diag: Dict[str, torch.Tensor], log: StepMetrics) -> None:
        present = diag["present"].float()
        skipped = diag["skipped"].float()
        log.mean("anco_num_classes", diag["num_classes"])
        log.finite_mean("anco_hard_frac", diag["hard_fraction"])
        log.finite_mean("anco_cos_pos", diag["cos_pos"])
        log.finite_mean("anco_cos_neg", diag["cos_neg"])
        for c in range(self.num_classes):
            log.mean(f"anco_present_c{c}", present[c])
            log.ratio(f"anco_skipped_c{c}", skipped[c], present[c])

    # ------------------------------------------------------------------ logging
    def metric_keys(self) -> List[str]:
        """Every per-epoch key this trainer logs (NaN in epochs where the term is inactive)."""
        per_class = ("pl_class_frac", "anco_present", "anco_hard_frac", "anco_skipped", "anco_cos_pos",
                     "anco_cos_neg")
        keys = ["action_stage", "lr", "gpu_mem_peak_gb", "loss_total", "loss_sup", "w_sup", "loss_glob", "w_glob",
                "loss_loc", "w_loc", "loss_unsup", "w_unsup", "loss_anco", "w_anco", "tau_s", "tau_t", "tau_an",
                "queue_fill_glob", "queue_fill_loc", "glob_entropy_t", "glob_entropy_s", "loc_entropy_t",
                "loc_entropy_s", "pl_weight", "pl_conf_frac", "mix_skipped", "anco_num_classes"]
        keys += [f"{k}_c{c}" for k in per_class for c in range(self.num_classes)]
        if self.use_saacl:
            keys += ["loss_saacl", "loss_saacl_centre", "w_saacl", "tau_sa", "queue_fill_saacl", "saacl_perm_changes",
                     "saacl_alignment"]
        return keys

    def finalize_metrics(self, sums: Dict[str, float], steps: int) -> Dict[str, float]:
        """Epoch sums -> values: means, ratios of sums, totals; every key of :meth:`metric_keys` present."""
        out = {k: float("nan") for k in self.metric_keys()}
        out.update(epoch_values(sums, steps, dist.get_world_size() if self.is_ddp else 1))
        out["action_stage"] = float(self.stage)
        out["lr"] = float(self.optimizer.param_groups[0]["lr"])
        if self.device.type == "cuda":
            out["gpu_mem_peak_gb"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        return out

    def summary_keys(self) -> Sequence[str]:
        return ("action_stage", "loss_sup", "loss_glob", "loss_loc", "loss_unsup", "loss_anco", "loss_saacl",
                "pl_weight")

    def plot_groups(self) -> Dict[str, List[str]]:
        c = range(self.num_classes)
        groups = {
            "ACTION losses (unweighted)": ["loss_total", "loss_sup", "loss_glob", "loss_loc", "loss_unsup",
                                           "loss_anco", "loss_saacl", "loss_saacl_centre"],
            "loss weights": ["w_sup", "w_glob", "w_loc", "w_unsup", "w_anco", "w_saacl"],
            "stage and learning rate": ["action_stage", "lr"],
            "temperatures": ["tau_s", "tau_t", "tau_an", "tau_sa"],
            "queue fill": ["queue_fill_glob", "queue_fill_loc", "queue_fill_saacl"],
            "distillation entropies": ["glob_entropy_t", "glob_entropy_s", "loc_entropy_t", "loc_entropy_s"],
            "pseudo-labels": ["pl_weight", "pl_conf_frac", "mix_skipped"] + [f"pl_class_frac_c{k}" for k in c],
            "AnCo classes": ["anco_num_classes"] + [f"anco_present_c{k}" for k in c]
            + [f"anco_skipped_c{k}" for k in c] + [f"anco_hard_frac_c{k}" for k in c],
            "AnCo cosines": [f"anco_cos_pos_c{k}" for k in c] + [f"anco_cos_neg_c{k}" for k in c],
            "memory": ["gpu_mem_peak_gb"],
        }
        if self.use_saacl:
            groups["SAACL assignment"] = ["saacl_perm_changes", "saacl_alignment"]
        return groups


class nnUNetTrainerACTIONPlusPlus(nnUNetTrainerACTION):
    """ACTION++: ACTION + SAACL (supervised contrast with Hungarian-assigned class centres) + ATS temperatures."""

    use_saacl = True
    use_ats = True
    anco_dim_2d = 128  # D = d = 128 in both dimensions (the ACTION++ paper)
    anco_dim_3d = 128


class nnUNetTrainerACTION_noPretrain(nnUNetTrainerACTION):
    """Stage iii only (no distillation pre-training)."""

    stage_fractions = (0.0, 0.0, 1.0)


class nnUNetTrainerACTIONPlusPlus_noPretrain(nnUNetTrainerACTIONPlusPlus):
    stage_fractions = (0.0, 0.0, 1.0)


class nnUNetTrainerACTION_exportTeacher(nnUNetTrainerACTION):
    """Exports (and finally validates) the EMA teacher instead of the student."""

    export_teacher = True


class nnUNetTrainerACTIONPlusPlus_exportTeacher(nnUNetTrainerACTIONPlusPlus):
    export_teacher = True


nnUNetTrainerACTION_sslTiny = budget_variant(nnUNetTrainerACTION, "sslTiny")
nnUNetTrainerACTION_sslDemo = budget_variant(nnUNetTrainerACTION, "sslDemo")
nnUNetTrainerACTIONPlusPlus_sslTiny = budget_variant(nnUNetTrainerACTIONPlusPlus, "sslTiny")
nnUNetTrainerACTIONPlusPlus_sslDemo = budget_variant(nnUNetTrainerACTIONPlusPlus, "sslDemo")
