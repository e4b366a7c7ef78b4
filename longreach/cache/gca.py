"""Chunk memory for GCA models: the chunk keys/values kept off the compute device.

A GCA model encodes every completed chunk of ``chunk_size`` positions into keys/values that
later chunks may retrieve. Only the top-k retrieved chunks are ever needed on the compute
device, so the full memory lives elsewhere:

- ``"cpu"`` (default): host memory, pinned when the model runs on CUDA so the copies of the
  retrieved chunks to the GPU are asynchronous;
- ``"disk:PATH"``: memory-mapped files in a folder of its own inside PATH (removed when the
  memory is closed or garbage-collected), for contexts larger than RAM;
- ``"device"``: on the compute device, keeping autograd history (training uses this).

The landmarks (one vector per chunk, scored by every retrieval) stay on the compute device:
O(n_chunks * hidden), tiny next to the chunk keys/values.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from longreach.cache import LongReachCache
from longreach.cache.base import State, reorder_rows, tensor_bytes

# Chunks per storage block: memory grows block by block, never by reallocating what it holds.
_BLOCK_CHUNKS = 256

_NUMPY_VIEW = {torch.bfloat16: np.int16, torch.float16: np.float16, torch.float32: np.float32,
               torch.float64: np.float64}


def parse_memory(memory: str) -> tuple[str, str | None]:
    """``"cpu"`` / ``"device"`` / ``"disk:PATH"`` -> (kind, path). Raises ValueError."""
    if not isinstance(memory, str):
        raise ValueError(f"memory must be 'cpu', 'device' or 'disk:PATH', got {memory!r}")
    if memory in ("cpu", "device"):
        return memory, None
    if memory.startswith("disk:") and len(memory) > 5:
        return "disk", memory[5:]
    raise ValueError(f"memory must be 'cpu', 'device' or 'disk:PATH', got {memory!r}")


class ChunkMemory:
    """Append-only store of chunk keys/values ``[B, n_chunks, chunk_size, H, D]`` plus the
    per-chunk landmarks ``[B, n_chunks, hidden]`` (always on the compute device).

    ``gather(ids)`` returns the keys/values of the named chunks on the compute device.
    """

    def __init__(self, memory: str = "cpu", *, device: torch.device | str | None = None):
        self.kind, path = parse_memory(memory)
        self.device = torch.device(device) if device is not None else None
        self.path = Path(path) if path is not None else None
        self._own_dir = None
        self.n_chunks = 0
        self._k_blocks: list[torch.Tensor] = []
        self._v_blocks: list[torch.Tensor] = []
        self._landmarks: torch.Tensor | None = None  # capacity-doubling buffer [B, cap, hidden]
        self._device_k: list[torch.Tensor] = []  # kind == "device": the appended pieces
        self._device_v: list[torch.Tensor] = []
        self._shape: tuple | None = None  # (B, chunk_size, H, D)
        self.dtype: torch.dtype | None = None

    # -- writing -------------------------------------------------------------------------
    def append(self, k: torch.Tensor, v: torch.Tensor, landmarks: torch.Tensor) -> None:
        """Add ``n`` chunks: k, v ``[B, n, chunk_size, H, D]``, landmarks ``[B, n, hidden]``."""
        if k.dim() != 5 or k.shape != v.shape or landmarks.shape[:2] != k.shape[:2]:
            raise ValueError(
                f"append expects k, v [B, n, chunk_size, H, D] and landmarks [B, n, hidden], got "
                f"{tuple(k.shape)}, {tuple(v.shape)}, {tuple(landmarks.shape)}"
            )
        n = k.shape[1]
        shape = (k.shape[0], *k.shape[2:])
        if self._shape is None:
            self._shape, self.dtype = shape, k.dtype
            self.device = self.device or k.device
        elif shape != self._shape:
            raise ValueError(f"chunk shape changed from {self._shape} to {shape}")
        if n == 0:
            return
        self._append_landmarks(landmarks)
        if self.kind == "device":
            self._device_k.append(k)
            self._device_v.append(v)
        else:
            self._append_offloaded(k.detach(), v.detach())
        self.n_chunks += n

    def _append_landmarks(self, landmarks: torch.Tensor) -> None:
        if self.kind == "device":  # keep autograd history: plain concatenation
            self._landmarks = landmarks if self._landmarks is None else torch.cat(
                [self._landmarks[:, : self.n_chunks], landmarks], dim=1)
            return
        landmarks = landmarks.detach()
        need = self.n_chunks + landmarks.shape[1]
        if self._landmarks is None or self._landmarks.shape[1] < need:
            cap = max(64, need, 2 * (0 if self._landmarks is None else self._landmarks.shape[1]))
            grown = landmarks.new_empty(landmarks.shape[0], cap, landmarks.shape[2])
            if self._landmarks is not None:
                grown[:, : self.n_chunks] = self._landmarks[:, : self.n_chunks]
            self._landmarks = grown
        self._landmarks[:, self.n_chunks : need] = landmarks

    def _new_block(self) -> tuple[torch.Tensor, torch.Tensor]:
        B, cs, H, D = self._shape
        shape = (B, _BLOCK_CHUNKS, cs, H, D)
        if self.kind == "disk":
            if self._own_dir is None:
                # a folder of its own inside PATH: two memories on one PATH cannot overwrite
                # each other's files, and the folder goes when the memory is closed or
                # collected (an eval that never calls close() leaves nothing behind)
                if self.path is not None:
                    self.path.mkdir(parents=True, exist_ok=True)
                self._own_dir = tempfile.TemporaryDirectory(
                    prefix="longreach-chunks-", dir=self.path)
            folder = Path(self._own_dir.name)
            blocks = []
            for name in ("k", "v"):
                file = folder / f"{name}{len(self._k_blocks):06d}.bin"
                array = np.memmap(file, dtype=_NUMPY_VIEW[self.dtype], mode="w+", shape=shape)
                blocks.append(torch.from_numpy(array).view(self.dtype))
            return blocks[0], blocks[1]
        pin = self.device is not None and self.device.type == "cuda"
        return (torch.empty(shape, dtype=self.dtype, pin_memory=pin),
                torch.empty(shape, dtype=self.dtype, pin_memory=pin))

    def _append_offloaded(self, k: torch.Tensor, v: torch.Tensor) -> None:
        k, v = k.to("cpu"), v.to("cpu")
        done, n = 0, k.shape[1]
        while done < n:
            slot = (self.n_chunks + done) % _BLOCK_CHUNKS
            if slot == 0:
                kb, vb = self._new_block()
                self._k_blocks.append(kb)
                self._v_blocks.append(vb)
            take = min(n - done, _BLOCK_CHUNKS - slot)
            self._k_blocks[-1][:, slot : slot + take] = k[:, done : done + take]
            self._v_blocks[-1][:, slot : slot + take] = v[:, done : done + take]
            done += take

    # -- reading -------------------------------------------------------------------------
    @property
    def landmarks(self) -> torch.Tensor | None:
        """``[B, n_chunks, hidden]`` on the compute device (None before the first chunk)."""
        return None if self._landmarks is None else self._landmarks[:, : self.n_chunks]

    def all_chunks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every chunk as ``[B, n_chunks * chunk_size, H, D]`` (device memory only)."""
        if self.kind != "device":
            raise ValueError("all_chunks is only for device memory; use gather for offloaded memory")
        k = torch.cat(self._device_k, dim=1) if len(self._device_k) > 1 else self._device_k[0]
        v = torch.cat(self._device_v, dim=1) if len(self._device_v) > 1 else self._device_v[0]
        B, n, cs, H, D = k.shape
        return k.reshape(B, n * cs, H, D), v.reshape(B, n * cs, H, D)

    def gather(self, ids: torch.Tensor, *, stream=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of chunks ``ids`` (1-D, ascending, unique) as ``[B, len(ids) * cs, H, D]``
        on the compute device. On CUDA the host-to-device copy is issued on ``stream``."""
        B, cs, H, D = self._shape
        ids_cpu = ids.to("cpu")
        if self.kind == "device":
            k, v = self.all_chunks()
            k = k.view(B, -1, cs, H, D).index_select(1, ids.to(k.device))
            v = v.view(B, -1, cs, H, D).index_select(1, ids.to(v.device))
            return k.reshape(B, -1, H, D), v.reshape(B, -1, H, D)
        pin = self.device.type == "cuda"
        k_host = torch.empty((B, len(ids_cpu), cs, H, D), dtype=self.dtype, pin_memory=pin)
        v_host = torch.empty_like(k_host, pin_memory=pin)
        block = ids_cpu // _BLOCK_CHUNKS
        offset = ids_cpu % _BLOCK_CHUNKS
        for b in torch.unique(block).tolist():
            rows = (block == b).nonzero().squeeze(1)
            k_host[:, rows] = self._k_blocks[b][:, offset[rows]]
            v_host[:, rows] = self._v_blocks[b][:, offset[rows]]
        k_host, v_host = k_host.view(B, -1, H, D), v_host.view(B, -1, H, D)
        if self.device.type == "cpu":
            return k_host, v_host
        if stream is None:
            return (k_host.to(self.device, non_blocking=True), v_host.to(self.device, non_blocking=True))
        with torch.cuda.stream(stream):
            k_dev = k_host.to(self.device, non_blocking=True)
            v_dev = v_host.to(self.device, non_blocking=True)
        return k_dev, v_dev

    # -- accounting ----------------------------------------------------------------------
    def device_nbytes(self) -> int:
        """Bytes this memory keeps on the compute device (landmarks; everything for "device")."""
        total = 0 if self._landmarks is None else self._landmarks.numel() * self._landmarks.element_size()
        if self.kind == "device":
            total += sum(t.numel() * t.element_size() for t in self._device_k + self._device_v)
        return total

    def offloaded_nbytes(self) -> int:
        """Bytes of chunk keys/values held off the compute device (host RAM or disk)."""
        return sum(t.numel() * t.element_size() for t in self._k_blocks + self._v_blocks)

    def reorder(self, beam_idx: torch.Tensor) -> None:
        if self.n_chunks == 0:
            return
        self._landmarks = self._landmarks.index_select(0, beam_idx.to(self._landmarks.device))
        if self.kind == "device":
            self._device_k = [t.index_select(0, beam_idx.to(t.device)) for t in self._device_k]
            self._device_v = [t.index_select(0, beam_idx.to(t.device)) for t in self._device_v]
            return
        idx = beam_idx.to("cpu")
        for blocks in (self._k_blocks, self._v_blocks):
            for block in blocks:
                block.copy_(block.index_select(0, idx))

    def close(self) -> None:
        """Drop the memory (and the files of a disk memory this object created)."""
        self._k_blocks, self._v_blocks, self._device_k, self._device_v = [], [], [], []
        self._landmarks, self.n_chunks = None, 0
        if self._own_dir is not None:
            self._own_dir.cleanup()
            self._own_dir = None


@dataclass
class GCAState(State):
    """Model-level generation state of a GCA model, kept by ``GCACache.memory``.

    memory: the chunk store; pending: lower-stack outputs of the current, incomplete chunk
    (at most chunk_size - 1 positions); queries: per retrieval group, the retrieval query the
    next call starts from; selected: per group, the chunks loaded for the current query chunk
    (reused while decoding inside one chunk). ``chunk_size``, ``hidden_size``,
    ``kv_width`` (key/value heads x head dim) size the memory's growth per token.
    """

    memory: ChunkMemory
    pending: torch.Tensor | None = None
    queries: list = field(default_factory=list)
    selected: list = field(default_factory=list)  # per group: (chunk, k, v, indices, weights)
    copy_stream: object = None  # CUDA side stream for host-to-device copies
    chunk_size: int = 1
    hidden_size: int = 0
    kv_width: int = 0

    def nbytes(self) -> int:
        """Bytes on the compute device: landmarks, the pending chunk, queries, loaded chunks."""
        tensors = [self.pending, *self.queries]
        for sel in self.selected:
            if sel is not None:
                tensors += list(sel[1:])
        return tensor_bytes(*tensors) + self.memory.device_nbytes()

    def bytes_per_token(self, dtype: torch.dtype) -> float:
        # a landmark per chunk stays on the device; chunk keys/values only with memory="device"
        per_chunk = self.hidden_size * dtype.itemsize
        if self.memory.kind == "device":
            per_chunk += 2 * self.chunk_size * self.kv_width * dtype.itemsize
        return per_chunk / self.chunk_size

    def host_bytes_per_token(self, dtype: torch.dtype) -> float:
        """Bytes of host memory (RAM) the chunk store grows by per token: its keys and values
        with memory="cpu"; 0 on the device or on disk (memory-mapped files)."""
        if self.memory.kind != "cpu":
            return 0.0
        return 2 * self.kv_width * dtype.itemsize

    def reorder(self, beam_idx: torch.Tensor) -> None:
        self.memory.reorder(beam_idx)
        self.pending = reorder_rows(self.pending, beam_idx)
        self.queries = [reorder_rows(q, beam_idx) for q in self.queries]
        self.selected = [None] * len(self.selected)


class GCACache(LongReachCache):
    """A GCA model's cache: the per-layer states plus the model-level ``GCAState``."""

    def __init__(self, states: list, memory: GCAState):
        super().__init__(states)
        self.memory = memory

    def all_states(self) -> list[State]:
        return [*super().all_states(), self.memory]
