"""Drafting heads on a backbone, and the model that trains them.

``cptoy.heads.cp``        :class:`CPHeads`: hidden states -> a batched rank-r CP over the next
                          n tokens (the heads, read like nanoGPT's model.py)
``cptoy.heads.mtp``       :class:`MTPModel` = GPT backbone + CP heads: the loss, freezing, its
                          checkpoint format
``cptoy.heads.drafting``  :class:`DraftingHeads` (shared by every drafting head: checks, the
                          shortlist, ``propose``), :class:`DraftStep`, :func:`frequency_shortlist`
``cptoy.heads.fast``      the speed-tuned one-sequence drafting path of CP heads
``cptoy.heads.fused``     the fused, chunked training loss (:class:`FusedCPLogProb`)
"""

from cptoy.heads.cp import CPHeads
from cptoy.heads.drafting import DraftingHeads, DraftStep, frequency_shortlist
from cptoy.heads.fused import FusedCPLogProb, HeadTerms
from cptoy.heads.mtp import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, MTPModel, check_backbone_config
from cptoy.persist import read_torch_file

_FusedCPLogProb = FusedCPLogProb  # the name notebook 03 cites

__all__ = ["CPHeads", "MTPModel", "HeadTerms", "DraftStep", "DraftingHeads", "FusedCPLogProb",
           "frequency_shortlist", "read_torch_file", "check_backbone_config", "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION"]
