"""The retrieval probe: is a GCA model learning to retrieve while it trains?

``RetrievalProbe`` holds a fixed batch of passkey prompts at the training length (needle depths
spread over [0, 1]) whose last position predicts the key's first digit, and a fixed batch of
held-out text. ``run()`` does a few no-grad forwards in eval mode and returns:

- ``probe/needle_in_topk``: how often the chunk serving that position retrieved a chunk holding
  key tokens (a "needle chunk");
- ``probe/needle_first``: how often its highest-weighted retrieved chunk is a needle chunk;
- ``probe/needle_weight``: the mean fusion weight on needle chunks;
- ``probe/answer_acc``: teacher-forced accuracy of the key's first digit;
- on the held-out text, ``probe/weight_entropy``: the mean entropy of the fusion weights over
  the retrieved chunks, divided by its maximum (1 = uniform, 0 = one chunk takes all), and
  ``probe/distance_<range>``: the share of retrieved chunks at each distance (query chunk -
  memory chunk; 2 is the nearest a query can read) in power-of-two buckets, and
  ``probe/landmark_cosine``: the mean cosine between two landmarks (near 1: the landmarks have
  collapsed onto one direction, and retrieval hardly depends on the query).

The needle metrics count the prompts where some needle chunk is retrievable (at least two
chunks before the query chunk: nearer ones are the sliding window's); with several retrieval
groups, each group's retrieval counts once. The probe keeps no state between calls, so
checkpoints and resuming do not involve it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from longreach.data.synthetic import (
    INSTRUCTION,
    NEEDLE,
    QUESTION,
    build_prompt,
    get_haystack,
    random_digits,
)
from longreach.models.gca.retrieval import find_gca_stack, record_retrieval

# distance buckets (first, last) of probe/distance_<name>; None = no upper end
DISTANCE_BUCKETS = ((2, 2), (3, 4), (5, 8), (9, 16), (17, 32), (33, None))


def bucket_name(first: int, last: int | None) -> str:
    if last is None:
        return f"probe/distance_{first}+"
    return f"probe/distance_{first}" if first == last else f"probe/distance_{first}-{last}"


def key_token_positions(tokenizer, prompt: str, key: str, needle: str) -> tuple[list[int], list[int]]:
    """(the prompt's token ids, the positions of tokens that hold characters of ``key`` inside
    the first ``needle`` of ``prompt``). Uses the tokenizer's character offsets (exact for the
    byte tokenizer); tokenizers without offsets map characters by encoding prefixes."""
    at = prompt.find(needle)
    if at < 0:
        raise ValueError(f"the needle {needle!r} is not in the prompt")
    spans, start = [], needle.find(key)
    while start >= 0:
        spans.append((at + start, at + start + len(key)))
        start = needle.find(key, start + len(key))
    try:
        enc = tokenizer(prompt, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    except (NotImplementedError, KeyError, TypeError):
        ids = tokenizer.encode(prompt)
        ends = [len(tokenizer.encode(prompt[:b])) for _, b in spans]
        starts = [len(tokenizer.encode(prompt[:a])) for a, _ in spans]
        return ids, sorted({p for a, b in zip(starts, ends) for p in range(max(a - 1, 0), b)})
    positions = [i for i, (s, e) in enumerate(offsets)
                 if e > s and any(s < b and e > a for a, b in spans)]
    return ids, positions


class RetrievalProbe:
    """Retrieval metrics of a GCA model on fixed prompts (see the module docstring).

    ``text_batches``: batches with ``input_ids`` of plain held-out text (the first is used).
    ``batch_size``: prompts per forward. Raises ValueError when ``model`` has no gca layers or
    ``seq_len`` is too short for a passkey prompt and a retrievable needle.

    The fixed batch: ``input_ids`` ``[n_prompts, seq_len]`` (left-padded or cut at the front to
    exactly ``seq_len``), ``answers`` (the token of each key's first digit), ``keys``,
    ``needle_positions`` (the token positions of the key's characters), ``needle_chunks``
    (the chunks holding them), ``query_chunk`` (the chunk serving the last position) and
    ``eligible`` (whether some needle chunk is retrievable from there).
    """

    def __init__(self, model: nn.Module, tokenizer, seq_len: int, *, n_prompts: int = 32,
                 seed: int = 0, text_batches=(), batch_size: int = 8, haystack: str = "builtin"):
        stack = find_gca_stack(model)
        if stack is None:
            raise ValueError(f"{type(model).__name__} has no gca layers: there is no retrieval to probe")
        if n_prompts < 1:
            raise ValueError(f"the retrieval probe needs n_prompts >= 1, got {n_prompts}")
        self.stack, self.batch_size = stack, max(1, int(batch_size))
        self.seq_len = int(seq_len)
        if self.seq_len < 2 * stack.text_per_chunk + 1:
            raise ValueError(
                f"seq_len={seq_len} is too short for the retrieval probe: no chunk retrieves "
                f"before {2 * stack.text_per_chunk + 1} tokens"
            )
        self.query_chunk = int(stack.chunk_answering(self.seq_len - 1))
        depths = [i / (n_prompts - 1) if n_prompts > 1 else 0.5 for i in range(n_prompts)]
        prompts, answers, needles, self.keys, self.needle_positions = [], [], [], [], []
        for i, depth in enumerate(depths):
            rng = np.random.default_rng(np.random.SeedSequence([int(seed), self.seq_len, i]))
            ids, answer, positions = self._prompt(rng, tokenizer, get_haystack(haystack, tokenizer), depth)
            self.needle_positions.append(positions)
            prompts.append(ids)
            answers.append(answer)
            needles.append({int(stack.chunk_of_token(p)) for p in positions})
        self.input_ids = torch.tensor(prompts, dtype=torch.long)
        self.answers = torch.tensor(answers, dtype=torch.long)
        self.needle_chunks = needles
        # prompts whose needle the query chunk can retrieve (not only read in its window)
        self.eligible = [any(c <= self.query_chunk - 2 for c in n) for n in needles]
        if not any(self.eligible):
            raise ValueError(
                f"seq_len={seq_len} is too short for the retrieval probe: no needle lies two "
                f"chunks ({2 * stack.chunk_size} positions) before the question"
            )
        self.text = [b["input_ids"] for b in list(text_batches)[:1]]

    def _prompt(self, rng, tokenizer, haystack, depth: float) -> tuple[list[int], int, list[int]]:
        """(ids of exactly seq_len tokens ending where the key's first digit comes next, that
        digit's token id, the positions of the key's tokens)."""
        key = random_digits(rng, 5)
        self.keys.append(key)
        answer = tokenizer.encode(" " + key, add_special_tokens=False)
        # the answer tokens before the one with the first digit (" " for the byte tokenizer)
        lead = next(j for j in range(len(answer)) if key[0] in tokenizer.decode(answer[: j + 1]))
        needle = NEEDLE.format(key=key)
        try:
            prompt, _ = build_prompt(rng, tokenizer, haystack, self.seq_len - lead, prefix=INSTRUCTION,
                                     inserts=[(depth, needle)], suffix=QUESTION)
        except ValueError as err:
            raise ValueError(f"seq_len={self.seq_len} is too short for the retrieval probe: {err}") from None
        ids, positions = key_token_positions(tokenizer, prompt, key, needle)
        ids = ids + answer[:lead]
        shift = self.seq_len - len(ids)  # build_prompt is within 1%: pad or cut at the front
        if shift > 0:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            ids = [pad] * shift + ids
        else:
            ids = ids[-shift:]
        positions = [p + shift for p in positions if p + shift >= 0]
        return ids, answer[lead], positions

    @torch.no_grad()
    def run(self, model: nn.Module, autocast: Callable[[], contextlib.AbstractContextManager]
            = contextlib.nullcontext) -> dict[str, float]:
        """The probe's metrics for ``model`` now (eval mode, no gradients; the mode is
        restored). ``autocast`` is the trainer's precision context."""
        was_training = model.training
        model.eval()
        try:
            metrics = self._needle_metrics(model, autocast)
            if self.text:
                metrics.update(self._text_metrics(model, autocast))
        finally:
            model.train(was_training)
        return metrics

    def _forward(self, model, ids, autocast):
        device = next(model.parameters()).device
        with record_retrieval(model, scores=False) as records, autocast():
            logits = model(input_ids=ids.to(device), use_cache=False, logits_to_keep=1).logits
        return logits[:, -1].float(), records

    def _needle_metrics(self, model, autocast) -> dict[str, float]:
        q = self.query_chunk
        hits = firsts = weight = trials = correct = 0.0
        for start in range(0, len(self.input_ids), self.batch_size):
            ids = self.input_ids[start : start + self.batch_size]
            logits, records = self._forward(model, ids, autocast)
            correct += (logits.argmax(-1).cpu() == self.answers[start : start + len(ids)]).sum().item()
            for r in records:
                row = q - r.c_lo
                if not 0 <= row < r.indices.shape[1]:
                    continue
                for b in range(len(ids)):
                    i = start + b
                    if not self.eligible[i]:
                        continue
                    idx, w = r.indices[b, row], r.weights[b, row]
                    is_needle = torch.tensor([int(j) in self.needle_chunks[i] for j in idx])
                    trials += 1
                    hits += float(is_needle.any())
                    firsts += float(is_needle[int(w.argmax())] and idx[int(w.argmax())] >= 0)
                    weight += float(w[is_needle].sum())
        metrics = {"probe/answer_acc": correct / len(self.input_ids)}
        if trials:
            metrics.update({"probe/needle_in_topk": hits / trials, "probe/needle_first": firsts / trials,
                            "probe/needle_weight": weight / trials})
        return metrics

    def _text_metrics(self, model, autocast) -> dict[str, float]:
        entropy, rows = 0.0, 0
        cosines = []
        counts = torch.zeros(len(DISTANCE_BUCKETS))
        for batch in self.text:
            for start in range(0, len(batch), self.batch_size):
                _, records = self._forward(model, batch[start : start + self.batch_size], autocast)
                for r in records:
                    if r.landmark_cosine is not None:
                        cosines.append(r.landmark_cosine)
                    valid = r.indices >= 0
                    n = valid.sum(-1)
                    w = r.weights.clamp_min(1e-12)
                    h = -(torch.where(valid, w * w.log(), torch.zeros_like(w))).sum(-1)
                    many = n >= 2
                    entropy += float((h[many] / n[many].float().log()).sum())
                    rows += int(many.sum())
                    served = torch.arange(r.c_lo, r.c_lo + r.indices.shape[1])[None, :, None]
                    distance = (served - r.indices)[valid]
                    for k, (lo, hi) in enumerate(DISTANCE_BUCKETS):
                        inside = distance >= lo if hi is None else (distance >= lo) & (distance <= hi)
                        counts[k] += int(inside.sum())
        metrics = {}
        if rows:
            metrics["probe/weight_entropy"] = min(1.0, entropy / rows)
        if cosines:
            metrics["probe/landmark_cosine"] = float(np.mean(cosines))
        total = float(counts.sum())
        if total:
            for (lo, hi), c in zip(DISTANCE_BUCKETS, counts.tolist()):
                metrics[bucket_name(lo, hi)] = c / total
        return {k: v for k, v in metrics.items() if math.isfinite(v)}
