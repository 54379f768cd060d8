"""Missing steps in the fused filter: one covariance recursion per mask pattern.

The covariance recursion depends on which steps are observed, not on z. A missing step is a pure
predict, P_{t|t} = P_{t|t-1} = A P_{t-1|t-1} A^T + Q, with gain 0 and no likelihood term; the recursions
run it as an observed step whose W = L^{-1} C P_{t|t-1} is zeroed (so X = K^T = 0, P_{t|t} = P_{t|t-1}),
and their reverse passes take no gradient for that X. Sequences with the same mask row share one
recursion: with parameters shared by the batch, :func:`mask_patterns` finds the distinct rows, the
recursions run once per row (batched over rows) and their outputs are gathered per sequence. The steady
state of a recursion is only looked for after the last missing step of every row (``first``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class MaskPatterns(NamedTuple):
    """The covariance recursions a masked batch needs.

    ``observed``: 0/1 per step in the compute dtype, ``(T,)`` (one recursion for the batch) or ``(G, T)``
    (one per row; G = B where the parameters are batched); None without missing steps. ``group``: ``(B,)``,
    the row of each sequence where rows are shared (None: one row for all, or row b for sequence b).
    ``first``: the step after the last missing step of any row (0: none)."""

    observed: Tensor | None
    group: Tensor | None
    first: int

    @property
    def recursions(self) -> int:
        """How many covariance recursions run: 1, or one per row of ``observed``."""
        return 1 if self.observed is None or self.observed.dim() == 1 else self.observed.shape[0]


def mask_patterns(observed: Tensor | None, shared: bool, dtype: torch.dtype) -> MaskPatterns:
    """The recursions for the mask ``observed`` ``(B, T)`` bool (None: every step observed); ``shared``:
    whether the covariance parameters are shared by the batch (then sequences with one mask row share a
    recursion). One host sync."""
    if observed is None:
        return MaskPatterns(None, None, 0)
    group = None
    if shared:
        rows, group = torch.unique(observed, dim=0, return_inverse=True)
        if rows.shape[0] == 1:
            observed, group = rows[0], None
        elif rows.shape[0] < observed.shape[0]:
            observed = rows
        else:  # every row distinct: row b is sequence b, no gather
            group = None
    missing = (~observed).reshape(-1, observed.shape[-1]).any(0).nonzero()
    first = int(missing[-1]) + 1 if len(missing) else 0
    return MaskPatterns(observed.to(dtype), group, first)
