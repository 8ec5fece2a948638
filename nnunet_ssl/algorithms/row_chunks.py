"""Row-separable losses against a large bank, in activation-checkpointed chunks of rows.

Contrastive losses compare ``N`` rows (embeddings) with a bank of ``K`` entries and build ``(N, K)`` logit
matrices several times over (logits, softmax, log-softmax, their gradients). With plain chunking every chunk's
matrices stay saved for backward, so the peak is the same as without chunks; :func:`checkpointed_row_mean`
keeps only each chunk's inputs and recomputes its matrices in backward, so the extra memory is one chunk's.
"""
from __future__ import annotations

from typing import Callable, Dict, Sequence, Tuple

import torch
from torch.utils.checkpoint import checkpoint

RowLoss = Callable[..., Tuple[torch.Tensor, Dict[str, torch.Tensor]]]


def rows_per_chunk(max_elements: int, columns: int) -> int:
    """Rows per chunk so that one ``(rows, columns)`` logit matrix holds at most ``max_elements`` (at least 1)."""
    return max(1, max_elements // max(columns, 1))


def checkpointed_row_mean(fn: RowLoss, rows: Sequence[torch.Tensor], chunk: int
                          ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Mean over rows of a row-separable loss, computed one activation-checkpointed chunk of rows at a time.

    Args:
        fn: ``fn(*row_chunks) -> (mean loss over the chunk's rows, {name: mean statistic over them})``; the
            loss must be a mean of per-row terms (so chunk means weighted by chunk size give the full mean).
        rows: tensors sharing the row axis 0, ``(N, ...)`` each (e.g. student ``(N, D)``, teacher ``(N, D)``,
            labels ``(N,)``).
        chunk: rows per chunk (> 0).

    Returns:
        ``(loss, stats)``: the 0-dim loss, differentiable w.r.t. ``rows``, and ``{name: 0-dim detached mean}``,
        both row-weighted means over all ``N`` rows. ``fn(*rows)`` itself, unchunked, when ``N <= chunk``.
    """
    n = rows[0].shape[0]
    if n <= chunk:
        return fn(*rows)
    total, stats = None, {}
    for start in range(0, n, chunk):
        part = [r[start:start + chunk] for r in rows]
        loss, st = checkpoint(fn, *part, use_reentrant=False)
        w = part[0].shape[0] / n
        total = loss * w if total is None else total + loss * w
        for k, v in st.items():
            stats[k] = stats.get(k, 0.0) + v.detach() * w
    return total, stats
