"""Vocabulary compaction, as the original's dynamic pipeline does it (docs/original.md section 4).

Every token id that occurs in the data is marked; compact ids are assigned in increasing full-id order. The
classifier then computes logits only for those CV ids (its weight is ``W[ids]``), so the softmax normalizes
over the active tokens only and the reported loss is a *compacted* cross-entropy, not the full-vocabulary
one. The input embedding still uses the full table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class VocabCompaction:
    ids: torch.Tensor  # [CV] int64: full id of each compact id, increasing
    full_to_compact: torch.Tensor  # [V] int64: compact id, or -1 for tokens absent from the data

    @classmethod
    def from_tokens(cls, tokens: np.ndarray, vocab_size: int) -> VocabCompaction:
        present = np.zeros(vocab_size, dtype=bool)
        present[np.asarray(tokens, dtype=np.int64)] = True
        ids = np.flatnonzero(present)
        mapping = np.full(vocab_size, -1, dtype=np.int64)
        mapping[ids] = np.arange(len(ids))
        return cls(torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mapping))

    @property
    def size(self) -> int:
        return int(self.ids.numel())

    def map_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """Full ids -> compact ids; raises if a target was not seen when the compaction was built."""
        out = self.full_to_compact.to(targets.device)[targets]
        if bool((out < 0).any()):
            raise ValueError("a target token is outside the compacted vocabulary")
        return out


def compacted(
    w: torch.Tensor, targets: torch.Tensor, compaction: VocabCompaction | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The classifier weight and targets a pipeline uses: as given, or restricted to the active tokens."""
    if compaction is None:
        return w, targets
    return w.index_select(0, compaction.ids.to(w.device)), compaction.map_targets(targets)
