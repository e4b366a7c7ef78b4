"""GCA's model-level parts: the chunk encoder, causal top-k chunk selection, and ``GCAStack``
(landmarks, the stream layout, retrieval groups, the chunk memory they read).

The token stream is cut into chunks of ``chunk_size`` positions. Each completed chunk is
encoded once (``ChunkEncoder``) into keys/values shared by every GCA layer and a landmark
vector. Chunk c-1's retrieval query scores the landmarks of chunks 0..c-2; the top-k chunks
serve the tokens of chunk c (chunk c-1 itself is covered by the sliding window). Each
retrieved chunk gets its own softmax, and the per-chunk outputs are fused with softmax
weights over the retrieval scores, so the language-modelling loss trains the retriever.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from longreach.cache.gca import ChunkMemory, GCAState
from longreach.layers.blocks import RMSNorm, SwiGLU
from longreach.layers.gca import GCARetrieval
from longreach.layers.projections import Projections


class _EncoderLayer(nn.Module):
    """Pre-norm bidirectional transformer layer over one chunk (RoPE positions 0..L-1)."""

    def __init__(self, config):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Projections(config, position="rope", rope_theta=None)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(x.shape[1], device=x.device)
        q, k, v = self.attn.project(self.attn_norm(x), positions)
        groups = q.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + self.attn.merge(o.transpose(1, 2))
        return x + self.mlp(self.mlp_norm(x))


class ChunkEncoder(nn.Module):
    """Chunk hidden states ``[B, n, cs, hidden]`` -> keys, values ``[B, n, cs, H, D]`` (shared
    by every GCA layer) and landmarks ``[B, n, hidden]``."""

    def __init__(self, config, settings: dict):
        super().__init__()
        self.landmark = settings["landmark"]
        self.in_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.layers = nn.ModuleList(_EncoderLayer(config) for _ in range(settings["encoder_layers"]))
        self.out_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.num_kv_heads, self.head_dim = config.num_key_value_heads, config.head_dim
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.cls = nn.Embedding(1, config.hidden_size) if self.landmark == "cls" else None

    def forward(self, h: torch.Tensor):
        B, n, cs, hidden = h.shape
        x = self.in_norm(h.reshape(B * n, cs, hidden))
        if self.cls is not None:
            x = torch.cat([x, self.cls.weight.to(x.dtype).expand(B * n, 1, hidden)], dim=1)
        for layer in self.layers:
            x = layer(x)
        x = self.out_norm(x)
        if self.landmark == "cls":
            landmarks, x = x[:, cs], x[:, :cs]
        elif self.landmark == "mean":
            landmarks = x.mean(dim=1)
        else:
            landmarks = x[:, cs - 1]
        k = self.k_proj(x).view(B, n, cs, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, n, cs, self.num_kv_heads, self.head_dim)
        if self.landmark == "token":
            # the landmark slot's key/value are zero: a sink every chunk's softmax can park on
            keep = (torch.arange(cs, device=h.device) != cs - 1).to(k.dtype)
            k, v = k * keep[:, None, None], v * keep[:, None, None]
        return k, v, landmarks.reshape(B, n, hidden)



def chunk_scores(queries: torch.Tensor, landmarks: torch.Tensor, first_chunk: int) -> torch.Tensor:
    """Retrieval scores ``[B, nq, N]`` of query rows for chunks ``first_chunk ..`` (see
    ``select_chunks``): s_ij = q_i . l_j / sqrt(hidden), -inf where chunk j is not visible."""
    nq, hidden = queries.shape[1:]
    scores = torch.einsum("bqd,bnd->bqn", queries.float(), landmarks.float()) / math.sqrt(hidden)
    serves = torch.arange(first_chunk, first_chunk + nq, device=queries.device)
    visible = torch.arange(landmarks.shape[1], device=queries.device)[None, :] <= (serves[:, None] - 2)
    return scores.masked_fill(~visible, float("-inf"))


def select_chunks(queries: torch.Tensor, landmarks: torch.Tensor, first_chunk: int, top_k: int,
                  *, gumbel: bool, gumbel_scale: float = 1.0):
    """Causal top-k retrieval for query chunks ``first_chunk .. first_chunk + nq - 1``.

    queries ``[B, nq, hidden]``: row r is the query of chunk first_chunk + r - 1 (the chunk
    before the one it serves); landmarks ``[B, N, hidden]``. Query chunk c may pick memory
    chunks 0..c-2 only. Returns indices (-1 = empty) and fusion weights ``[B, nq, 1, K]``:
    softmax over the selected scores without noise (Gumbel noise, times ``gumbel_scale``,
    only steers the selection).
    """
    k = min(top_k, landmarks.shape[1])
    scores = chunk_scores(queries, landmarks, first_chunk)
    pick = scores
    if gumbel and gumbel_scale > 0:
        noise = -torch.log(-torch.log(torch.rand_like(scores).clamp(1e-10, 1.0 - 1e-7)))
        pick = scores.detach() + gumbel_scale * noise
    idx = pick.topk(k, dim=-1).indices
    chosen = scores.gather(-1, idx)
    valid = torch.isfinite(chosen)
    weights = torch.softmax(chosen.masked_fill(~valid, float("-inf")), dim=-1)
    weights = torch.where(valid, weights, torch.zeros_like(weights))  # all-empty rows: 0, not NaN
    indices = torch.where(valid, idx, torch.full_like(idx, -1))
    return indices[:, :, None, :], weights[:, :, None, :]


@dataclass
class RetrievalRecord:
    """One selection ``GCAStack.retrieve`` made while its ``trace`` was set (CPU tensors).

    Row r serves chunk ``c_lo + r``. ``indices`` ``[B, nq, K]`` are global chunk numbers of the
    stream (-1 = empty slot), in the order of the top-k; ``weights`` ``[B, nq, K]`` the fusion
    weights; ``scores`` ``[B, nq, N]`` the scores of every chunk in memory (-inf where not
    visible), or None when the trace was asked for without scores. ``landmark_cosine``: the
    mean cosine similarity between two different landmarks in memory (over the batch), a
    measure of their collapse onto one direction (1: all alike; retrieval then hardly depends
    on the query), or None with fewer than two chunks.
    """

    group: int
    c_lo: int
    indices: torch.Tensor
    weights: torch.Tensor
    scores: torch.Tensor | None = None
    landmark_cosine: float | None = None


def mean_pairwise_cosine(vectors: torch.Tensor) -> float | None:
    """Mean cosine between distinct rows of ``vectors`` ``[B, N, d]`` (over the batch), in
    O(B N d): |sum of unit vectors|^2 = N + sum over ordered pairs of their cosines."""
    n = vectors.shape[1]
    if n < 2:
        return None
    unit = torch.nn.functional.normalize(vectors.detach().float(), dim=-1)
    total = unit.sum(dim=1).pow(2).sum(dim=-1)  # [B]
    return float(((total - n) / (n * (n - 1))).mean())


def find_gca_stack(model: nn.Module) -> GCAStack | None:
    """The ``GCAStack`` of a model (a GCA model has one), or None for a model without gca
    layers."""
    return next((m for m in model.modules() if isinstance(m, GCAStack)), None)


@contextlib.contextmanager
def record_retrieval(model: nn.Module, *, scores: bool = True):
    """Record every chunk selection of ``model``'s GCA stack inside the block; yields the list
    of ``RetrievalRecord`` it fills. Outside the block nothing is recorded (no cost)."""
    stack = find_gca_stack(model)
    if stack is None:
        raise ValueError(f"{type(model).__name__} has no GCA stack: it has no gca layers to record")
    records: list[RetrievalRecord] = []
    stack.trace, stack.trace_scores = records, scores
    try:
        yield records
    finally:
        stack.trace = None


class GCAStack(nn.Module):
    """Model-level GCA parts: the landmark token, the chunk encoder, one query norm per
    retrieval group, and the bookkeeping of the token stream.

    With ``landmark="token"`` the model inserts a landmark after every ``chunk_size - 1`` text
    tokens; users never see it: their tokens go in, one output per token comes out (a chunk's
    last text token is answered from its landmark, which has read the whole chunk).

    ``trace``: a list to append a ``RetrievalRecord`` to for every selection (see
    ``record_retrieval``); None (the default) records nothing.
    """

    trace: list | None = None
    trace_scores: bool = True

    def __init__(self, config, settings: dict, gca_layers: list[int]):
        super().__init__()
        self.settings = settings
        self.chunk_size = settings["chunk_size"]
        self.slot = 1 if settings["landmark"] == "token" else 0
        self.text_per_chunk = self.chunk_size - self.slot
        self.first_layer = gca_layers[0]
        n_groups = settings["retrieval_groups"]
        if n_groups > len(gca_layers):
            raise ValueError(f"gca.retrieval_groups ({n_groups}) exceeds the number of gca layers "
                             f"({len(gca_layers)})")
        # contiguous groups of near-equal size; the first layer of each group retrieves
        bounds = [round(i * len(gca_layers) / n_groups) for i in range(n_groups + 1)]
        self.group_starts = [gca_layers[b] for b in bounds[:-1]]
        self.hidden_size = config.hidden_size
        self.landmark_embedding = nn.Embedding(1, config.hidden_size) if self.slot else None
        self.encoder = ChunkEncoder(config, settings)
        self.query_norms = nn.ModuleList(RMSNorm(config.hidden_size, config.rms_norm_eps)
                                         for _ in range(n_groups))

    def new_state(self, memory: str | None = None, device=None) -> GCAState:
        mem = ChunkMemory(memory or self.settings["memory"], device=device)
        n = len(self.group_starts)
        enc = self.encoder
        return GCAState(memory=mem, queries=[None] * n, selected=[None] * n,
                        chunk_size=self.chunk_size, hidden_size=self.hidden_size,
                        kv_width=enc.num_kv_heads * enc.head_dim)

    # -- stream layout ---------------------------------------------------------------------
    def stream_start(self, text_seen: int) -> int:
        return text_seen + (text_seen // self.text_per_chunk if self.slot else 0)

    def chunk_of_token(self, n):
        """The chunk holding text token ``n`` (an int or a tensor of positions)."""
        return self.stream_start(n) // self.chunk_size

    def chunk_answering(self, n):
        """The chunk of the stream position whose output predicts the token after text token
        ``n`` (a chunk's last text token is answered from its landmark, in the same chunk)."""
        return (n + ((n + 1) // self.text_per_chunk if self.slot else 0)) // self.chunk_size

    def build_stream(self, embeds: torch.Tensor, text_seen: int):
        """Text embeddings ``[B, T, hidden]`` -> (stream ``[B, S, hidden]``, stream start,
        indices of the S positions whose outputs answer the T text tokens)."""
        B, T, hidden = embeds.shape
        s0 = self.stream_start(text_seen)
        n = torch.arange(text_seen, text_seen + T, device=embeds.device)
        if not self.slot:
            return embeds, s0, n - s0
        tpc = self.text_per_chunk
        text_pos = n + n // tpc - s0
        landmarks = torch.arange(text_seen // tpc, (text_seen + T) // tpc, device=embeds.device)
        S = T + landmarks.numel()
        stream = embeds.new_empty(B, S, hidden)
        stream[:, text_pos] = embeds
        if landmarks.numel():
            lm = self.landmark_embedding.weight.to(embeds.dtype)
            stream[:, (landmarks + 1) * self.chunk_size - 1 - s0] = lm.expand(B, landmarks.numel(), hidden)
        answer = n + (n + 1) // tpc - s0
        return stream, s0, answer

    # -- memory ----------------------------------------------------------------------------
    def encode(self, state: GCAState, hidden: torch.Tensor, s0: int) -> None:
        """Encode every chunk the positions ``s0 .. s0+S-1`` complete and append it to memory;
        keep the incomplete chunk's lower-stack outputs for later."""
        cs = self.chunk_size
        full = hidden if state.pending is None else torch.cat([state.pending, hidden], dim=1)
        n_new = (s0 + hidden.shape[1]) // cs - s0 // cs
        if n_new:
            B, _, width = full.shape
            k, v, landmarks = self.encoder(full[:, : n_new * cs].reshape(B, n_new, cs, width))
            state.memory.append(k, v, landmarks)
        rest = full[:, n_new * cs :]
        state.pending = rest if rest.shape[1] else None

    def retrieve(self, group: int, state: GCAState, h: torch.Tensor, s0: int, *, training: bool):
        """Retrieval for group ``group`` from its first layer's input ``h`` ``[B, S, hidden]``.
        Returns a GCARetrieval, or None when no chunk can be retrieved yet."""
        cs, S = self.chunk_size, h.shape[1]
        c_lo, c_hi = s0 // cs, (s0 + S - 1) // cs
        norm = self.query_norms[group]
        # queries of chunks c_lo-1 .. c_hi-1: the first from an earlier call, the rest from h
        local = torch.arange(c_lo, c_hi, device=h.device) * cs + cs - 1 - s0
        fresh = norm(h[:, local]) if local.numel() else h.new_zeros(h.shape[0], 0, h.shape[2])
        before = state.queries[group]
        if before is None:
            before = h.new_zeros(h.shape[0], 1, h.shape[2])
        queries = torch.cat([before.to(h.dtype), fresh], dim=1)
        # keep the query the next call starts from: chunk c_hi's if this call completes it
        if (s0 + S) % cs == 0:
            state.queries[group] = norm(h[:, -1:])
        else:
            state.queries[group] = queries[:, -1:]
        memory = state.memory
        if memory.n_chunks == 0 or c_hi < 2:
            return None
        lead = s0 - c_lo * cs
        reuse = state.selected[group]
        if memory.kind != "device" and c_lo == c_hi and reuse is not None and reuse[0] == c_lo:
            return GCARetrieval(*reuse[1:], lead=lead, chunk_size=cs)  # same chunk: already loaded
        indices, weights = select_chunks(queries, memory.landmarks, c_lo, self.settings["top_k"],
                                         gumbel=training and self.settings["gumbel"],
                                         gumbel_scale=self.settings["gumbel_scale"])
        if self.trace is not None:
            self._record(group, c_lo, queries, memory.landmarks, indices, weights)
        if memory.kind == "device":
            k, v = memory.all_chunks()
            return GCARetrieval(k, v, indices, weights, lead=lead, chunk_size=cs)
        # offloaded memory: copy only the chosen chunks, and point the indices at the copies
        chosen = indices[indices >= 0].unique()
        if chosen.numel() == 0:
            return None
        stream = None
        if memory.device.type == "cuda":
            # copy on a side stream: the window attention of this layer runs meanwhile
            if state.copy_stream is None:
                state.copy_stream = torch.cuda.Stream(device=memory.device)
            stream = state.copy_stream
        k, v = memory.gather(chosen, stream=stream)
        ready = stream.record_event() if stream is not None else None
        remapped = torch.where(indices >= 0, torch.searchsorted(chosen, indices.clamp_min(0)), -1)
        if c_lo == c_hi:
            state.selected[group] = (c_lo, k, v, remapped, weights)
        return GCARetrieval(k, v, remapped, weights, lead=lead, chunk_size=cs, ready=ready)

    def _record(self, group, c_lo, queries, landmarks, indices, weights) -> None:
        scores = chunk_scores(queries, landmarks, c_lo).detach().cpu() if self.trace_scores else None
        self.trace.append(RetrievalRecord(group, c_lo, indices[:, :, 0].detach().cpu(),
                                          weights[:, :, 0].detach().float().cpu(), scores,
                                          mean_pairwise_cosine(landmarks)))
