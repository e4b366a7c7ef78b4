"""Feed a prompt through a model's generation cache in segments, then decode or score.

Only one segment's activations and logits exist at a time, so a model with a bounded cache
(sliding window, recurrent state, a CCA / StreamingLLM plug-in) reads any length in bounded
memory. Every function starts a new cache: a plugged HF model gets its plug-in's
(``longreach.integrations.hf.generation_cache``), a longreach model its ``new_cache()``, any
other model builds its own on the first call.

    answer = greedy_generate(model, prompt_ids, 32, prefill_chunk=4096, eos_token_id=eos)
    tokens = greedy_tokens(model, prompt_ids, prefill_chunk=4096)   # endless; stop when done
    for first, logprobs, greedy in token_logprobs(model, ids): ...   # per segment
    logits = next_token_logits(model, ids)
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator, Sequence

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from longreach.integrations import hf
from longreach.models.compat import cache_kwargs, generate_cache_kwargs, output_cache


def new_generation_cache(model):
    """An empty cache for ``model`` (None: the model builds its own when called)."""
    if hf.plugin_settings(model) is not None:
        return hf.generation_cache(model)
    new_cache = getattr(model, "new_cache", None)
    return new_cache() if callable(new_cache) else None


@functools.cache
def _takes_logits_to_keep(cls) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def forward_segment(model, ids: torch.Tensor, cache, keep: int):
    """One forward pass of ``ids`` [n] through ``cache``; returns (cache, logits of the last
    ``keep`` positions [keep, vocab])."""
    # only the kept positions' logits are computed when the model can skip the others
    extra = {"logits_to_keep": keep} if _takes_logits_to_keep(type(model)) else {}
    with torch.inference_mode():
        out = model(ids[None], **cache_kwargs(model, cache), use_cache=True, **extra)
    return output_cache(out), out.logits[0, -keep:]


def _check(ids: Sequence[int], prefill_chunk: int) -> None:
    if prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    if not len(ids):
        raise ValueError("the input must hold at least one token")


def segment_logits(model, ids: Sequence[int], *, prefill_chunk: int = 4096,
                   keep_from: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
    """Stream ``ids`` through a new cache in ``prefill_chunk``-token segments and yield
    ``(p, logits)`` per segment: ``logits[j]`` [vocab] are the model's outputs at position
    p + j (they predict ids[p + j + 1]), for positions >= ``keep_from`` only."""
    _check(ids, prefill_chunk)
    device = next(model.parameters()).device
    tokens = torch.as_tensor(list(ids), dtype=torch.long, device=device)
    cache = new_generation_cache(model)
    for start in range(0, len(tokens), prefill_chunk):
        end = min(start + prefill_chunk, len(tokens))
        keep = end - max(start, keep_from)
        cache, logits = forward_segment(model, tokens[start:end], cache, max(keep, 1))
        if keep > 0:
            yield end - keep, logits


def next_token_logits(model, ids: Sequence[int], *, prefill_chunk: int = 4096) -> torch.Tensor:
    """The model's logits [vocab] for the token after ``ids``."""
    *_, (_, logits) = segment_logits(model, ids, prefill_chunk=prefill_chunk,
                                     keep_from=len(ids) - 1)
    return logits[-1]


def token_logprobs(model, ids: Sequence[int], *, prefill_chunk: int = 4096,
                   first: int = 1) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield ``(p, logprobs, greedy)`` per segment for positions >= ``first`` (>= 1):
    ``logprobs[j]`` = log q(ids[p + j] | ids[:p + j]) (float32, CPU) and ``greedy[j]``
    whether ids[p + j] is the model's most likely token there (bool, CPU)."""
    first = max(int(first), 1)
    targets = torch.as_tensor(list(ids), dtype=torch.long)
    previous = None  # the outputs before a segment's first position, which predict its first token
    for p, logits in segment_logits(model, ids, prefill_chunk=prefill_chunk, keep_from=first - 1):
        if previous is not None:
            p, logits = p - 1, torch.cat([previous, logits])
        previous, logits = logits[-1:], logits[:-1]  # the last output predicts the next segment
        if not len(logits):
            continue
        with torch.inference_mode():
            target = targets[p + 1 : p + 1 + len(logits)].to(logits.device)
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            picked = logprobs.gather(-1, target[:, None])[:, 0]
            greedy = logits.argmax(-1) == target
        yield p + 1, picked.cpu(), greedy.cpu()


def greedy_tokens(model, prompt_ids: Sequence[int], *,
                  prefill_chunk: int = 4096) -> Iterator[int]:
    """The greedy continuation of ``prompt_ids``, one token at a time, without end: the
    caller stops when it has enough (each token costs one forward pass, made when asked for)."""
    _check(prompt_ids, prefill_chunk)
    device = next(model.parameters()).device
    tokens = torch.as_tensor(list(prompt_ids), dtype=torch.long, device=device)
    cache = new_generation_cache(model)
    for start in range(0, len(tokens), prefill_chunk):
        cache, logits = forward_segment(model, tokens[start : start + prefill_chunk], cache, 1)
    while True:
        token = int(logits[-1].argmax())
        yield token
        cache, logits = forward_segment(model, torch.tensor([token], device=device), cache, 1)


def greedy_generate(model, prompt_ids: Sequence[int], max_new_tokens: int, *,
                    prefill_chunk: int = 4096, eos_token_id: int | None = None,
                    stop=None) -> list[int]:
    """The greedy continuation of ``prompt_ids`` by ``model.generate`` with
    ``prefill_chunk_size=prefill_chunk``: at most ``max_new_tokens`` tokens, up to and including
    ``eos_token_id``, or up to the token after which ``stop(tokens so far)`` is true. It equals
    the first tokens of ``greedy_tokens``: the same segments through the same new cache (a
    plug-in's bounded one is passed in), plain argmax (the checkpoint's own generation settings,
    a repetition penalty say, are left out). A model without ``generate`` runs ``greedy_tokens``."""
    _check(prompt_ids, prefill_chunk)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not callable(getattr(model, "generate", None)):
        tokens: list[int] = []
        for token in greedy_tokens(model, prompt_ids, prefill_chunk=prefill_chunk):
            tokens.append(token)
            if token == eos_token_id or len(tokens) == max_new_tokens or (stop and stop(tokens)):
                break
        return tokens
    device = next(model.parameters()).device
    ids = torch.as_tensor([list(prompt_ids)], dtype=torch.long, device=device)
    config = GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, prefill_chunk_size=prefill_chunk,
        eos_token_id=eos_token_id, pad_token_id=0 if eos_token_id is None else eos_token_id,
    )
    cache = new_generation_cache(model)
    criteria = StoppingCriteriaList([_Stop(stop, ids.shape[1])] if stop else [])
    saved, model.generation_config = model.generation_config, GenerationConfig()
    try:
        with torch.inference_mode():
            out = model.generate(ids, generation_config=config, stopping_criteria=criteria,
                                 attention_mask=torch.ones_like(ids),
                                 **(generate_cache_kwargs(cache) if cache is not None else {}))
    finally:
        model.generation_config = saved
    return out[0, ids.shape[1]:].tolist()


class _Stop(StoppingCriteria):
    """``stop(generated tokens)`` as a generate stopping criterion (batches of one)."""

    def __init__(self, stop, prompt_length: int):
        self.stop, self.prompt_length = stop, prompt_length

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        done = bool(self.stop(input_ids[0, self.prompt_length:].tolist()))
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


__all__ = [
    "forward_segment",
    "greedy_generate",
    "greedy_tokens",
    "new_generation_cache",
    "next_token_logits",
    "segment_logits",
    "token_logprobs",
]
