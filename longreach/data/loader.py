"""Packing a token stream into fixed-length sequences, and deterministic resumable batches.

Batches are ``{"input_ids": LongTensor[B, T], "labels": LongTensor[B, T]}`` with labels equal
to the inputs for text and -100 where a position is not scored; the model shifts labels
internally (HF convention).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from concurrent.futures import Future, ProcessPoolExecutor

import numpy as np
import torch

from .synthetic import get_synthetic_task

STATE_VERSION = 1
# Mixed into the synthetic-sample seeds so they never coincide with the epoch permutations.
SYNTHETIC_STREAM = 0x5EED


class PackedSequences:
    """Sequence ``i`` is ``tokens[i * seq_len : (i + 1) * seq_len]``.

    Documents are packed back to back (each followed by eos); the tail shorter than
    ``seq_len`` is left out. Nothing is read until a sequence is asked for.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int):
        if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
            raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
        tokens = np.asarray(tokens) if not isinstance(tokens, np.ndarray) else tokens
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be a 1-D array, got shape {tokens.shape}")
        n = len(tokens) // seq_len
        if n == 0:
            raise ValueError(
                f"not enough tokens for one sequence: {len(tokens)} tokens, "
                f"need at least seq_len={seq_len}"
            )
        self.tokens = tokens
        self.seq_len = int(seq_len)
        self._rows = tokens[: n * seq_len].reshape(n, seq_len)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> np.ndarray:
        return np.asarray(self._rows[i], dtype=np.int64)

    def gather(self, indices) -> np.ndarray:
        """Sequences at ``indices`` as an int64 array ``[len(indices), seq_len]``."""
        return np.asarray(self._rows[np.asarray(indices, dtype=np.int64)], dtype=np.int64)


# The synthetic sampler of a worker process, set once by its initializer.
_WORKER_SAMPLER = None


def _init_worker(sampler) -> None:
    global _WORKER_SAMPLER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
    # Ctrl-C and SIGTERM are the training loop's to handle (it saves, then stops us)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _WORKER_SAMPLER = sampler


def _worker_sample(epoch: int, position: int):
    return _WORKER_SAMPLER.slot(epoch, position)


class _SyntheticSampler:
    """The synthetic sample (or None) of slot ``(epoch, position)``: a pure function of the
    slot, so worker processes compute exactly what the loop would."""

    def __init__(self, task, name, options, fraction, seq_len, tokenizer, seed):
        self.task, self.name, self.options = task, name, options
        self.fraction, self.seq_len, self.tokenizer, self.seed = fraction, seq_len, tokenizer, seed

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        seq_len = self.seq_len
        try:
            input_ids, labels = self.task(rng, seq_len, self.tokenizer, **self.options)
        except TypeError as err:
            raise ValueError(
                f"synthetic task {self.name!r} rejected options {self.options}: {err}"
            ) from err
        for name, array in (("input_ids", input_ids), ("labels", labels)):
            if np.shape(array) != (seq_len,):
                raise ValueError(
                    f"synthetic task {self.name!r} returned {name} of shape "
                    f"{np.shape(array)}, expected ({seq_len},)"
                )
        return input_ids, labels

    def slot(self, epoch: int, position: int):
        rng = np.random.default_rng([self.seed, SYNTHETIC_STREAM, epoch, position])
        if rng.random() < self.fraction:
            return self.sample(rng)
        return None

    def is_synthetic(self, epoch: int, position: int) -> bool:
        """Whether ``slot(epoch, position)`` is a sample, without building it."""
        rng = np.random.default_rng([self.seed, SYNTHETIC_STREAM, epoch, position])
        return bool(rng.random() < self.fraction)


def _text_batch(input_ids: np.ndarray) -> dict[str, torch.Tensor]:
    ids = torch.from_numpy(input_ids)
    return {"input_ids": ids, "labels": ids.clone()}


class BatchLoader:
    """An endless, deterministic, resumable stream of batches over ``sequences``.

    Epoch ``e`` visits the sequences in the order ``np.random.default_rng([seed, e])
    .permutation(n)``. Each step takes the next ``batch_size * world_size`` indices of that
    stream (a step may run across an epoch boundary; nothing is dropped) and rank ``r`` keeps
    slice ``[r * batch_size, (r + 1) * batch_size)``.

    ``synthetic={"task": name, "fraction": f, **options}`` replaces each slot by a sample of
    that task with probability ``f``; the draw and the sample come from an rng seeded by
    (seed, epoch, position in the epoch), so they do not depend on world size or on resumes.
    ``loss_weight: w`` there makes each labelled token of a synthetic sample count ``w``
    times in the loss (text tokens count 1): batches then carry ``loss_weights`` ``[B, T]``.

    ``workers=n`` builds the synthetic samples of the next few batches in ``n`` background
    processes (prompt building is tokenizer-bound and can outlast a GPU step); the batches
    are identical to ``workers=0``. Call ``close()`` (or let the loader be collected) to stop
    them.

    ``stream=True`` (truncated backpropagation through time): row ``b`` of batch ``i + 1``
    continues row ``b`` of batch ``i``; ``stream_start`` tells whether the last batch began
    new streams (carried states must reset). With ``stream_batches=k`` (> 0) every row reads
    ``k`` consecutive pieces of ``seq_len`` tokens from a random place of the token array,
    then all rows jump to new random places (drawn from (seed, segment, row): resumable, the
    same for any world size at one global batch size), so the streams cover the whole corpus.
    With ``stream_batches=0`` the token array is cut into ``batch_size * world_size``
    contiguous streams walked from start to end, each epoch again from their starts (a short
    run then sees only the beginnings of those streams).
    A ``synthetic`` task in stream mode replaces a row's piece by a sample (the stream goes
    on past it); such batches carry ``state_reset`` ``[B]`` (bool): rows whose carried state
    does not lead into this batch's row (a sample now, or in the batch before).
    """

    def __init__(
        self,
        sequences: PackedSequences,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        synthetic: dict | None = None,
        tokenizer=None,
        stream: bool = False,
        stream_batches: int = 0,
        workers: int = 0,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
            )
        self.sequences = sequences
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.epoch = 0
        self.position = 0  # index into the current epoch's permutation
        self._permutation_cache: tuple[int, np.ndarray] | None = None
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ValueError(f"workers must be an integer >= 0, got {workers!r}")
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None
        self._pending: dict[tuple[int, int], Future] = {}
        self._setup_synthetic(synthetic, tokenizer)
        self.stream = bool(stream)
        self.stream_start = False
        if isinstance(stream_batches, bool) or not isinstance(stream_batches, int) \
                or stream_batches < 0:
            raise ValueError(f"stream_batches must be an integer >= 0, got {stream_batches!r}")
        self.stream_batches = stream_batches
        if self.stream and stream_batches:
            need = stream_batches * sequences.seq_len
            if len(sequences.tokens) < need:
                raise ValueError(
                    f"stream_batches={stream_batches} needs at least {need} tokens "
                    f"(stream_batches * seq_len), got {len(sequences.tokens)}"
                )
            self.stream_chunks = stream_batches
        elif self.stream:
            rows = self.global_batch_size
            # chunks per stream: each of the `rows` streams holds this many seq_len pieces
            self.stream_chunks = len(sequences.tokens) // (rows * sequences.seq_len)
            if self.stream_chunks < 1:
                raise ValueError(
                    f"stream=True needs at least {rows * sequences.seq_len} tokens "
                    f"(batch_size * world_size * seq_len), got {len(sequences.tokens)}"
                )

    def _setup_synthetic(self, synthetic: dict | None, tokenizer) -> None:
        self.synthetic_task = None
        self.synthetic_fraction = 0.0
        self.synthetic_options: dict = {}
        self.synthetic_weight = 1.0
        self.tokenizer = tokenizer
        if not synthetic:
            return
        options = dict(synthetic)
        if "task" not in options or "fraction" not in options:
            raise ValueError(f"synthetic needs 'task' and 'fraction' keys, got {sorted(options)}")
        name = options.pop("task")
        fraction = float(options.pop("fraction"))
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"synthetic fraction must be in [0, 1], got {fraction}")
        weight = options.pop("loss_weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ValueError(f"synthetic loss_weight must be a number > 0, got {weight!r}")
        self.synthetic_weight = float(weight)
        task = get_synthetic_task(name)
        if tokenizer is None:
            raise ValueError(f"synthetic task {name!r} needs the tokenizer (pass tokenizer=...)")
        self.synthetic_task, self.synthetic_fraction = task, fraction
        self.synthetic_name, self.synthetic_options = name, options
        self._sampler = _SyntheticSampler(
            task, name, options, fraction, self.sequences.seq_len, tokenizer, self.seed
        )
        # One trial sample now, so bad options fail here rather than mid-training (and, with
        # workers, the haystack is loaded once before the processes fork from this one).
        self._sampler.sample(np.random.default_rng(0))

    def _synthetic_slot(self, epoch: int, position: int):
        """The synthetic sample of a slot (None: text), from a worker where one was asked."""
        if self.workers == 0:
            return self._sampler.slot(epoch, position)
        future = self._pending.pop((epoch, position), None)
        if future is None:
            if not self._sampler.is_synthetic(epoch, position):
                return None  # a text slot: no round trip to a worker
            future = self._submit(epoch, position)
        return future.result()

    def _mix(self, input_ids: np.ndarray, keys: list[tuple[int, int]]):
        """The batch of ``input_ids`` with the synthetic samples of slots ``keys`` (one per
        row) in their rows, and which rows they are ([B] bool)."""
        labels = input_ids.copy()
        weighted = self.synthetic_weight != 1.0
        weights = np.ones(input_ids.shape, dtype=np.float32) if weighted else None
        synthetic = np.zeros(len(keys), dtype=bool)
        if self.synthetic_task is not None and self.synthetic_fraction > 0:
            for row, key in enumerate(keys):
                sample = self._synthetic_slot(*key)
                if sample is not None:
                    input_ids[row], labels[row] = sample
                    synthetic[row] = True
                    if weighted:
                        weights[row] = self.synthetic_weight
            self._prefetch()
        batch = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels)}
        if weighted:
            batch["loss_weights"] = torch.from_numpy(weights)
        return batch, synthetic

    def _submit(self, epoch: int, position: int) -> Future:
        if self._pool is None:
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            self._pool = ProcessPoolExecutor(
                self.workers, mp_context=context, initializer=_init_worker,
                initargs=(self._sampler,),
            )
        return self._pool.submit(_worker_sample, epoch, position)

    def _prefetch(self) -> None:
        """Queue the synthetic samples of this rank's slots of the next few batches."""
        if self.workers == 0 or self.synthetic_task is None or self.synthetic_fraction <= 0:
            return
        per_batch = max(1.0, self.batch_size * self.synthetic_fraction)
        ahead = max(2, int(np.ceil(2 * self.workers / per_batch)))
        epoch, position = self.epoch, self.position
        for _ in range(ahead):
            if self.stream:
                keys = self._stream_keys(epoch, position)
                position += 1
                if position == self.stream_chunks:
                    epoch, position = epoch + 1, 0
            else:
                slots, epoch, position = self._walk(epoch, position)
                keys = slots[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
            for key in keys:  # text slots need no worker
                if key not in self._pending and self._sampler.is_synthetic(*key):
                    self._pending[key] = self._submit(*key)

    def close(self) -> None:
        """Stop the worker processes (a later batch starts them again)."""
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to stop
            pass

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._permutation_cache is None or self._permutation_cache[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.sequences))
            self._permutation_cache = (epoch, order)
        return self._permutation_cache[1]

    def _walk(self, epoch: int, position: int) -> tuple[list[tuple[int, int]], int, int]:
        """(epoch, position) of each slot of the global batch that starts there, and where
        the batch after it starts (a batch may run across an epoch boundary)."""
        slots, n = [], len(self.sequences)
        while len(slots) < self.global_batch_size:
            take = min(self.global_batch_size - len(slots), n - position)
            slots.extend((epoch, pos) for pos in range(position, position + take))
            position += take
            if position == n:
                epoch, position = epoch + 1, 0
        return slots, epoch, position

    def _next_slots(self) -> list[tuple[int, int, int]]:
        """(epoch, position, sequence index) of each slot of the next global batch."""
        slots, self.epoch, self.position = self._walk(self.epoch, self.position)
        return [(epoch, pos, int(self._permutation(epoch)[pos])) for epoch, pos in slots]

    def __iter__(self):
        return self

    def _stream_keys(self, epoch: int, position: int) -> list[tuple[int, int]]:
        """The synthetic-slot keys of this rank's rows of stream batch (epoch, position)."""
        rows = range(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        return [(epoch, position * self.global_batch_size + r) for r in rows]

    def _next_stream_batch(self) -> dict[str, torch.Tensor]:
        seq_len, chunks = self.sequences.seq_len, self.stream_chunks
        epoch, position = self.epoch, self.position
        self.stream_start = self.position == 0
        rows = np.arange(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        tokens = self.sequences.tokens
        if self.stream_batches:  # segment `epoch` of every row: k pieces from a random place
            span = len(tokens) - chunks * seq_len + 1
            origins = np.array([np.random.default_rng([self.seed, self.epoch, int(r)])
                                .integers(span) for r in rows], dtype=np.int64)
            starts = origins + self.position * seq_len
        else:
            starts = (rows * chunks + self.position) * seq_len
        input_ids = np.stack([np.asarray(tokens[s : s + seq_len], dtype=np.int64) for s in starts])
        self.position += 1
        if self.position == chunks:
            self.epoch, self.position = self.epoch + 1, 0
        if self.synthetic_task is None or self.synthetic_fraction <= 0:
            return _text_batch(input_ids)
        batch, reset = self._mix(input_ids, self._stream_keys(epoch, position))
        if position:  # a row after a sample does not continue the text its states read
            reset |= [self._sampler.is_synthetic(*key)
                      for key in self._stream_keys(epoch, position - 1)]
        batch["state_reset"] = torch.from_numpy(reset)
        return batch

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.stream:
            return self._next_stream_batch()
        slots = self._next_slots()
        mine = slots[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        input_ids = self.sequences.gather([index for _, _, index in mine])
        return self._mix(input_ids, [(epoch, pos) for epoch, pos, _ in mine])[0]

    def state_dict(self) -> dict:
        """A small JSON-able position in the stream; see ``load_state_dict``."""
        state = {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_sequences": len(self.sequences),
        }
        if self.stream:  # position counts chunks of streams that depend on the global batch
            state.update(stream=True, streams=self.global_batch_size,
                         stream_batches=self.stream_batches)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the loader that saved ``state`` would have continued.

        The seed and number of sequences must match (else it would be another stream); the
        batch size and world size may change, since the position counts sequences. In stream
        mode the global batch size must match, since it fixes the streams.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported loader state version {state.get('version')!r}")
        if bool(state.get("stream", False)) != self.stream:
            raise ValueError(
                f"loader state was saved with stream={bool(state.get('stream', False))}, "
                f"this loader has stream={self.stream}"
            )
        if self.stream:
            if state["streams"] != self.global_batch_size:
                raise ValueError(
                    f"loader state was saved with {state['streams']} streams (batch_size * "
                    f"world_size), this loader has {self.global_batch_size}"
                )
            if state.get("stream_batches", 0) != self.stream_batches:
                raise ValueError(
                    f"loader state was saved with stream_batches="
                    f"{state.get('stream_batches', 0)}, this loader has {self.stream_batches}"
                )
            if not 0 <= state["position"] < self.stream_chunks:
                raise ValueError(f"loader state position out of range: {state}")
        for key, mine in (("seed", self.seed), ("num_sequences", len(self.sequences))):
            if state[key] != mine:
                raise ValueError(
                    f"loader state was saved with {key}={state[key]}, this loader has {mine}"
                )
        if not 0 <= state["position"] < len(self.sequences) or state["epoch"] < 0:
            raise ValueError(f"loader state position out of range: {state}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        # queued samples stay valid (a slot's sample depends on the slot alone); drop those
        # this loader will not reach again so they do not pile up
        for key in [k for k in self._pending if k < (self.epoch, self.position)]:
            self._pending.pop(key).cancel()


def eval_batches(
    sequences: PackedSequences, batch_size: int, n_batches: int
) -> list[dict[str, torch.Tensor]]:
    """The first ``n_batches`` batches of ``sequences`` in order, for held-out loss.

    With fewer than ``n_batches * batch_size`` sequences it returns as many batches as there
    are, the last possibly smaller.
    """
    if batch_size < 1 or n_batches < 1:
        raise ValueError(f"batch_size and n_batches must be >= 1, got {batch_size}, {n_batches}")
    count = min(len(sequences), batch_size * n_batches)
    return [
        _text_batch(sequences.gather(np.arange(start, min(start + batch_size, count))))
        for start in range(0, count, batch_size)
    ]
