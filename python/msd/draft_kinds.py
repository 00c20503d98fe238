"""The draft kinds msd runs, chosen by a draft checkpoint's ``config.json``.

- :class:`~msd.draft.MSDDraftModel`: MSD's EAGLE-2-style head (the released MSD drafts):
  one decoder layer over ``fc(cat(embedding, feature))``, the feature being the target's last
  hidden state, and the target's own lm_head.
- :class:`~msd.draft_eagle3.Eagle3DraftModel`: the EAGLE-3-style head (SpecForge's layout):
  three target hidden states fused by ``fc``, its own lm_head over a reduced vocabulary.

Both offer what the engine needs: ``fuse_inputs``, ``forward`` (with a cache and a tree mask),
``compute_logits``, ``to_target`` / ``to_draft`` (vocabulary maps), ``feature_layers`` and
``feature_size`` (which target states make the feature), ``head_dim``.
"""

from __future__ import annotations

from msd.draft import MSDDraftModel
from msd.draft_eagle3 import Eagle3DraftModel

DraftModel = MSDDraftModel | Eagle3DraftModel
DRAFT_KINDS = (MSDDraftModel, Eagle3DraftModel)
