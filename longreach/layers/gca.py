"""The GCA layer (grouped cross-chunk attention with causal retrieval, Hu et al., ICML 2025):
sliding-window attention plus a read of the chunks the model retrieved for it.

The retrieval itself (chunk encoder, landmarks, top-k selection, chunk memory, the stream
layout) is model-level and lives in ``longreach.models.gca``; this layer receives its result
as a ``GCARetrieval`` and turns it into the GCA output with ``read``, which the GCA block adds
to the MLP input, not to the residual stream, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from longreach.layers.attention import Attention, AttentionOptions
from longreach.ops.gca import gca_attention, gca_decode


@dataclass
class GCARetrieval:
    """What the GCA layers of one retrieval group read in one forward call.

    k, v: ``[B, M, H, D]`` chunk memory the indices point into; indices, weights:
    ``[B, n_query_chunks, 1, K]`` for the query chunks the call's positions fall in; lead: how
    many positions of the first query chunk precede the call (the op's chunks start there).
    """

    k: torch.Tensor
    v: torch.Tensor
    indices: torch.Tensor
    weights: torch.Tensor
    lead: int
    chunk_size: int
    ready: object = None  # CUDA event: the copy of k, v to the device has finished


@dataclass(frozen=True)
class GCALayerOptions(AttentionOptions):
    """Options of a GCA layer's sliding window (GCA's own settings are model-level)."""

    window: int | None = 512
    position: str = "alibi"


class GCAMixer(Attention):
    """Sliding-window attention (``forward``, the mixer contract) plus ``read``, the GCA
    attention over the retrieved chunks."""

    Options = GCALayerOptions

    def __init__(self, config, layer_idx: int, options: GCALayerOptions):
        super().__init__(config, layer_idx, options)
        width = self.num_heads * self.head_dim
        self.gca_q_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.gca_o_proj = nn.Linear(width, config.hidden_size, bias=False)

    def read(self, x: torch.Tensor, retrieval: GCARetrieval) -> torch.Tensor:
        """GCA output ``[B, T, hidden]`` of the (normed) layer input ``x`` over the chunks of
        ``retrieval``."""
        b, t, _ = x.shape
        q = self.gca_q_proj(x).view(b, t, self.num_heads, self.head_dim)
        if retrieval.ready is not None:  # the retrieved chunks were copied on a side stream
            current = torch.cuda.current_stream(x.device)
            current.wait_event(retrieval.ready)
            retrieval.k.record_stream(current)
            retrieval.v.record_stream(current)
        args = (retrieval.k, retrieval.v, retrieval.indices, retrieval.weights)
        if retrieval.indices.shape[1] == 1 and not (torch.is_grad_enabled() and q.requires_grad):
            # decoding inside one chunk: the few new queries against that chunk's retrieval
            o = gca_decode(q, *args, chunk_size=retrieval.chunk_size)
        else:
            # the op counts query chunks from row 0: pad the front to the chunk's start
            q = F.pad(q, (0, 0, 0, 0, retrieval.lead, 0))
            o = gca_attention(q, *args, chunk_size=retrieval.chunk_size)[:, retrieval.lead :]
        return self.gca_o_proj(o.reshape(b, t, self.num_heads * self.head_dim))
