"""AnCo, ACTION's sparse anatomical contrast (spec section 2.8).

Hard pixels (valid, of class ``c``, ``p_c < 0.97``) are pulled toward their class prototype and
pushed from pixels of other classes, which are drawn by prototype similarity. Everything is
"coordinates first": the sampler needs only the C-channel maps ``y``, ``valid`` and ``p``; the
caller's ``embed`` function turns the at most ``|C| (256 + 4096)`` sampled coordinates into
embeddings (``rho(gather_points(F, coords))``), so no full-resolution feature map is built.

Tensor axes: ``y`` and ``valid`` are ``(B, *S)``, ``probs`` is ``(B, C, *S)`` with the class axis 1 and
``S = (H, W)`` or ``(D, H, W)``; coordinates are ``(N, 1 + n)`` long ``[b, i_1, ..., i_n]``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ..distributed import all_reduce_sum
from .point_gather import randint, sample_coords, uniform, unravel

Embed = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class AnCoSample:
    """Coordinates drawn by ``AnCoSampler`` for one step (``C`` = number of classes).

    Attributes:
        pool_coords: ``(P, 1 + n)`` key-pool coordinates, class blocks of ``pool_size`` rows each,
            in increasing class order.
        pool_classes: ``(P,)`` long class of each pool row.
        pool_offsets: ``(C,)`` long first pool row of each class (meaningless for absent classes).
        local_present: ``(C,)`` bool, classes with at least one valid pixel on this rank.
        query_coords: ``(Q, 1 + n)`` hard-query coordinates, ``num_queries`` rows per class with
            hard pixels, in increasing class order.
        query_classes: ``(Q,)`` long.
        valid_count, hard_count: ``(C,)`` long pixel counts on this rank (diagnostics).
        pool_block: rows per class block of the pool (``pool_size``).
        full_shape: the spatial shape ``S``.
    """

    pool_coords: torch.Tensor
    pool_classes: torch.Tensor
    pool_offsets: torch.Tensor
    local_present: torch.Tensor
    query_coords: torch.Tensor
    query_classes: torch.Tensor
    valid_count: torch.Tensor
    hard_count: torch.Tensor
    pool_block: int = 0
    full_shape: Tuple[int, ...] = field(default_factory=tuple)


class AnCoSampler:
    """Draws AnCo's key pool and hard queries from C-channel maps (spec 2.8 steps 1-2).

    Args:
        pool_size: ``M``, pool draws per present class, uniform with replacement (4096).
        num_queries: ``N_q``, hard-query draws per class, uniform with replacement (256).
        hard_threshold: a valid pixel of class ``c`` is hard if ``p_c`` is below this (0.97).
    """

    def __init__(self, pool_size: int = 4096, num_queries: int = 256, hard_threshold: float = 0.97):
        self.pool_size = int(pool_size)
        self.num_queries = int(num_queries)
        self.hard_threshold = float(hard_threshold)

    @torch.no_grad()
    def __call__(self, y: torch.Tensor, valid: torch.Tensor, probs: torch.Tensor,
                 generator: Optional[torch.Generator] = None) -> AnCoSample:
        """Sample pool and queries.

        Args:
            y: ``(B, *S)`` integer labels (GT for labeled, mixed pseudo-labels for unlabeled cases).
            valid: ``(B, *S)`` bool (GT != ignore; confidence >= 0.7).
            probs: ``(B, C, *S)`` student softmax (detached here).
            generator: ``torch.Generator`` of this rank.

        Returns:
            An ``AnCoSample``.
        """
        num_classes = probs.shape[1]
        if y.shape != valid.shape or probs.shape[0] != y.shape[0] or probs.shape[2:] != y.shape[1:]:
            raise ValueError(f"shape mismatch: y {tuple(y.shape)}, valid {tuple(valid.shape)}, "
                             f"probs {tuple(probs.shape)}")
        device = y.device
        valid = valid.to(torch.bool)
        pool_c, pool_k, query_c, query_k = [], [], [], []
        offsets = torch.zeros(num_classes, dtype=torch.long)
        present = torch.zeros(num_classes, dtype=torch.bool)
        valid_count = torch.zeros(num_classes, dtype=torch.long)
        hard_count = torch.zeros(num_classes, dtype=torch.long)
        n_pool = 0
        for c in range(num_classes):
            vc = valid & (y == c)
            nv = int(vc.sum())
            valid_count[c] = nv
            if nv == 0:
                continue
            present[c] = True
            offsets[c] = n_pool
            pool_c.append(sample_coords(vc, self.pool_size, generator))
            pool_k.append(torch.full((self.pool_size,), c, dtype=torch.long, device=device))
            n_pool += self.pool_size
            hard = vc & (probs[:, c] < self.hard_threshold)
            nh = int(hard.sum())
            hard_count[c] = nh
            if nh:
                query_c.append(sample_coords(hard, self.num_queries, generator))
                query_k.append(torch.full((self.num_queries,), c, dtype=torch.long, device=device))
        empty_c = torch.zeros((0, y.ndim), dtype=torch.long, device=device)
        empty_k = torch.zeros((0,), dtype=torch.long, device=device)
        return AnCoSample(
            pool_coords=torch.cat(pool_c) if pool_c else empty_c,
            pool_classes=torch.cat(pool_k) if pool_k else empty_k,
            pool_offsets=offsets.to(device),
            local_present=present.to(device),
            query_coords=torch.cat(query_c) if query_c else empty_c,
            query_classes=torch.cat(query_k) if query_k else empty_k,
            valid_count=valid_count.to(device),
            hard_count=hard_count.to(device),
            pool_block=self.pool_size,
            full_shape=tuple(y.shape[1:]),
        )


def negative_class_probs(prototypes: torch.Tensor, available: torch.Tensor, tau: float) -> torch.Tensor:
    """Class graph for negative sampling: row ``c`` is ``softmax_v(cos(r_c, r_v) / tau)`` over ``v != c``.

    Args:
        prototypes: ``(C, D)`` class prototypes.
        available: ``(C,)`` bool, classes that may serve as negatives (present in the local pool).
        tau: temperature ``tau_an``.

    Returns:
        ``(C, C)`` float32; zero on the diagonal and on unavailable columns. A row with no admissible
        class is all zeros.
    """
    with torch.autocast(device_type=prototypes.device.type, enabled=False):
        p = F.normalize(prototypes.float(), dim=1)
        logits = p @ p.t() / tau
        allowed = available[None, :] & ~torch.eye(len(p), dtype=torch.bool, device=p.device)
        logits = logits.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(logits, dim=1)
        # all -inf rows give nan: such a class has no admissible negative
        return torch.nan_to_num(probs, nan=0.0)


def sample_categorical(probs: torch.Tensor, num: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``num`` draws from the categorical distribution ``probs`` ``(K,)`` -> ``(num,)`` long.

    Inverse-CDF sampling from ``uniform`` draws, so a generator on any device works. Zero-probability
    categories are never returned.
    """
    cdf = torch.cumsum(probs.float(), 0)
    u = uniform((num,), generator, probs.device) * cdf[-1]
    idx = torch.searchsorted(cdf, u, right=True)
    last_positive = int(torch.nonzero(probs > 0).max())
    return idx.clamp(max=last_positive)


def anco_logits_loss(queries: torch.Tensor, prototype: torch.Tensor, pool_emb: torch.Tensor,
                     neg_index: torch.Tensor, tau: float,
                     keys_normalized: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """InfoNCE of one class's queries: positive = prototype, negatives = gathered pool columns.

    ``l_0 = cos(r_q, proto) / tau``, ``l_k = cos(r_q, e_{neg_index[q, k]}) / tau``; the cosine matrix
    ``normalise(R) normalise(E)^T`` is formed once and the negative columns are gathered from it, so
    no ``(N_q, N_neg, D)`` tensor exists. Float32, autocast off.

    Args:
        queries: ``(N_q, D)`` query embeddings (with gradient).
        prototype: ``(D,)`` positive key (detached here).
        pool_emb: ``(P, D)`` pool embeddings (detached here).
        neg_index: ``(N_q, N_neg)`` long rows of ``pool_emb``.
        tau: temperature.
        keys_normalized: ``pool_emb`` is already float32 with unit rows; then one tensor is shared (and
            saved for backward once) by all classes instead of a normalised copy per class.

    Returns:
        ``(loss, cos_pos, cos_neg)``: mean over queries of ``CE(l, 0)``; detached means of the positive
        and negative cosines.
    """
    with torch.autocast(device_type=queries.device.type, enabled=False):
        r = F.normalize(queries.float(), dim=1)
        proto = F.normalize(prototype.detach().float(), dim=0)
        keys = pool_emb.detach() if keys_normalized else F.normalize(pool_emb.detach().float(), dim=1)
        pos = r @ proto
        neg = (r @ keys.t()).gather(1, neg_index)
        logits = torch.cat([pos[:, None], neg], dim=1) / tau
        loss = -torch.log_softmax(logits, dim=1)[:, 0].mean()
    return loss, pos.detach().mean(), neg.detach().mean()


class AnCoLoss:
    """AnCo loss and diagnostics (spec 2.8 steps 3-7), on a sample from ``AnCoSampler``.

    Args:
        num_negatives: negatives per query (512).
        tau: default temperature ``tau_an`` (0.5; ATS overrides it per call).
        proto_exact: prototypes from all valid pixels (in no-grad chunks) instead of the pool.
        exact_chunk: chunk size in points for ``proto_exact``.

    Under DDP the per-class sums and counts of the prototype embeddings are all-reduced, so the
    prototypes and the class set ``|C|`` are global; queries and negatives stay local, and classes
    missing from the local pool are not offered as negatives.
    """

    def __init__(self, num_negatives: int = 512, tau: float = 0.5, proto_exact: bool = False,
                 exact_chunk: int = 65536):
        self.num_negatives = int(num_negatives)
        self.tau = float(tau)
        self.proto_exact = bool(proto_exact)
        self.exact_chunk = int(exact_chunk)

    def __call__(self, sample: AnCoSample, embed: Embed, generator: Optional[torch.Generator] = None,
                 tau: Optional[float] = None, y: Optional[torch.Tensor] = None,
                 valid: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Compute ``L_anco = (1/|C|) sum_{c with queries} mean_q CE(l, 0)``.

        Args:
            sample: from ``AnCoSampler``.
            embed: maps coordinates ``(N, 1 + n)`` to embeddings ``(N, D)``, e.g.
                ``lambda c: rho(gather_points(feats, c, S))``; called once without gradient on the
                pool and once with gradient on the queries.
            generator: ``torch.Generator`` of this rank (negative draws).
            tau: temperature for this step (ATS); default ``self.tau``.
            y, valid: ``(B, *S)`` labels and validity, needed only with ``proto_exact``.

        Returns:
            ``(loss, diagnostics)``. The loss is a scalar (0 when ``|C| < 2``). Diagnostics, detached,
            per class ``(C,)``: ``present`` (in the global class set), ``hard_fraction`` (local
            hard / valid pixels, nan if absent), ``skipped`` (present but no query contributed),
            ``cos_pos`` and ``cos_neg`` (mean query-prototype / query-negative cosine, nan if
            skipped); and ``num_classes`` (``|C|``).
        """
        tau = self.tau if tau is None else float(tau)
        device = sample.pool_coords.device
        num_classes = sample.local_present.numel()

        with torch.no_grad():
            pool_emb = embed(sample.pool_coords).float()
            dim = pool_emb.shape[1]
            if self.proto_exact:
                if y is None or valid is None:
                    raise ValueError("proto_exact needs y and valid")
                sums, counts = self._exact_sums(embed, y, valid, num_classes, dim, device)
            else:
                sums = torch.zeros(num_classes, dim, device=device)
                sums.index_add_(0, sample.pool_classes, pool_emb)
                counts = torch.bincount(sample.pool_classes, minlength=num_classes).float().to(device)
            # one collective, reached by every rank whatever its local classes
            stats = all_reduce_sum(torch.cat([sums, counts[:, None]], dim=1))
            sums, counts = stats[:, :dim], stats[:, dim]
            present = counts > 0
            prototypes = sums / counts.clamp(min=1)[:, None]
        n_present = int(present.sum())

        nan = torch.full((num_classes,), float("nan"), device=device)
        hard_fraction = torch.where(sample.valid_count > 0,
                                    sample.hard_count.float() / sample.valid_count.clamp(min=1).float(), nan)
        diag: Dict[str, torch.Tensor] = {
            "present": present.clone(),
            "hard_fraction": hard_fraction,
            "skipped": present.clone(),
            "cos_pos": nan.clone(),
            "cos_neg": nan.clone(),
            "num_classes": torch.tensor(n_present, device=device),
        }
        if n_present < 2 or sample.query_coords.shape[0] == 0:
            return self._zero(device), diag

        neg_probs = negative_class_probs(prototypes, sample.local_present, tau)
        query_emb = embed(sample.query_coords)
        with torch.autocast(device_type=device.type, enabled=False):
            keys = F.normalize(pool_emb, dim=1)
        loss_sum = torch.zeros((), device=device)
        any_term = False
        for c in torch.unique(sample.query_classes).tolist():
            if not bool(present[c]) or not bool(neg_probs[c].sum() > 0):
                continue
            rows = (sample.query_classes == c).nonzero().squeeze(1)
            n_q = rows.numel()
            neg_index = self.sample_negatives(sample, neg_probs[c], n_q, generator)
            loss_c, cos_pos, cos_neg = anco_logits_loss(query_emb[rows], prototypes[c], keys, neg_index, tau,
                                                        keys_normalized=True)
            loss_sum = loss_sum + loss_c
            any_term = True
            diag["skipped"][c] = False
            diag["cos_pos"][c] = cos_pos
            diag["cos_neg"][c] = cos_neg
        if not any_term:
            return self._zero(device, query_emb), diag
        return loss_sum / n_present, diag

    def sample_negatives(self, sample: AnCoSample, class_probs: torch.Tensor, num_queries: int,
                         generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Pool rows of the negatives of ``num_queries`` queries of one class.

        Args:
            sample: the step's ``AnCoSample`` (its pool layout).
            class_probs: ``(C,)`` negative-class distribution of the query class (a row of
                ``negative_class_probs``; zero for the query's own class).
            num_queries: ``N_q``.
            generator: ``torch.Generator`` of this rank.

        Returns:
            ``(N_q, num_negatives)`` long indices into the pool rows.
        """
        device = sample.pool_coords.device
        total = num_queries * self.num_negatives
        classes = sample_categorical(class_probs, total, generator)
        # each local pool block holds exactly pool_block rows of its class, so offset[v] + a uniform
        # position is a uniform pool row of class v: never one of the query's class
        within = randint(sample.pool_block, (total,), generator, device)
        return (sample.pool_offsets[classes] + within).view(num_queries, self.num_negatives)

    @staticmethod
    def _zero(device: torch.device, query_emb: Optional[torch.Tensor] = None) -> torch.Tensor:
        # with query embeddings at hand, keep rho in the graph (zero gradient rather than None)
        if query_emb is None:
            return torch.zeros((), device=device)
        return query_emb.float().sum() * 0.0

    def _exact_sums(self, embed: Embed, y: torch.Tensor, valid: torch.Tensor, num_classes: int, dim: int,
                    device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        valid = valid.to(torch.bool)
        flat = valid.reshape(-1).nonzero().squeeze(1)
        labels = y.reshape(-1)[flat].long()
        sums = torch.zeros(num_classes, dim, device=device)
        for start in range(0, flat.numel(), self.exact_chunk):
            idx = flat[start:start + self.exact_chunk]
            emb = embed(unravel(idx, valid.shape)).float()
            sums.index_add_(0, labels[start:start + self.exact_chunk], emb)
        counts = torch.bincount(labels, minlength=num_classes).float().to(device)
        return sums, counts
