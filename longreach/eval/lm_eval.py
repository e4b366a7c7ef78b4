"""lm-evaluation-harness model ``"longreach"``: any local longreach or HF causal LM folder,
optionally with a longreach attention plug-in, behind lm-eval's ``LM`` interface.

    import lm_eval
    import longreach.eval.lm_eval  # registers the model

    lm_eval.simple_evaluate(
        model="longreach",
        model_args="pretrained=runs/tiny/final,attention=cca,group_size=16,window=1024",
        tasks=["niah_single_1"], metadata={"max_seq_lengths": [4096]},
    )

Model args: ``pretrained`` (a local folder; nothing is downloaded), ``tokenizer`` (a local
folder, default: the model folder), ``attention`` (``full``, ``cca``, ``streaming``,
``lm-infinite``) with ``group_size`` / ``window`` / ``sinks``, ``device``, ``dtype``,
``prefill_chunk`` (prompt tokens per forward pass), ``max_gen_toks`` (default 256),
``max_length`` (default none: the whole input streams through the model's cache, so a
model with a bounded cache reads any length; a number truncates contexts from the left and
windows ``loglikelihood_rolling`` as lm-eval's HF model does) and ``force`` (skip the
KV-cache memory check).

Requests run one at a time (padded batches would break bounded caches); every prompt is fed
in ``prefill_chunk``-token segments through the model's own cache, as ``longreach eval``
does. Generation is greedy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as err:  # the optional `eval` extra
    raise ImportError(
        "longreach.eval.lm_eval needs lm-evaluation-harness: "
        "pip install 'longreach[eval]' (or pip install lm-eval)"
    ) from err


from longreach.data import load_tokenizer
from longreach.eval.attention import attention_settings, check_attention_model
from longreach.eval.runner import check_memory, load_model
from longreach.eval.stream import greedy_tokens, token_logprobs

MODEL_NAME = "longreach"


@register_model(MODEL_NAME)
class LongReachLM(LM):
    """lm-eval ``LM`` over a local model folder (see the module docstring for the args)."""

    def __init__(
        self,
        pretrained: str,
        tokenizer: str | None = None,
        attention: str = "full",
        group_size: int | None = None,
        window: int | None = None,
        sinks: int | None = None,
        device: str | None = "auto",
        dtype: str = "auto",
        prefill_chunk: int = 4096,
        max_gen_toks: int = 256,
        max_length: int | None = None,
        force: bool = False,
        batch_size: int | str | None = 1,
        max_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if not pretrained:
            raise ValueError("the longreach lm-eval model needs pretrained=<local model folder>")
        if not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be a positive integer, got {prefill_chunk!r}")
        if not isinstance(max_gen_toks, int) or max_gen_toks < 1:
            raise ValueError(f"max_gen_toks must be a positive integer, got {max_gen_toks!r}")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
            raise ValueError(f"max_length must be an integer >= 2 or unset, got {max_length!r}")
        self.settings = attention_settings(attention, group_size=group_size, window=window,
                                           sinks=sinks)
        path = Path(str(pretrained)).expanduser()
        if not (path / "config.json").is_file():
            raise ValueError(f"pretrained={pretrained}: not a local model folder (no config.json)")
        check_attention_model(path, self.settings)
        self.model, self.tokenizer = load_model(path, device or "auto", dtype, self.settings)
        if tokenizer is not None:
            self.tokenizer = load_tokenizer(tokenizer)
        self._tokenizer_name = str(tokenizer or path)
        self._device = next(self.model.parameters()).device
        self.prefill_chunk, self.max_gen_toks = prefill_chunk, max_gen_toks
        self._max_length, self.force = max_length, bool(force)

    # ------------------------------------------------------------ what lm-eval reads

    @property
    def tokenizer_name(self) -> str:
        return self._tokenizer_name

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The token a context-free string is conditioned on (BOS, else EOS)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int | None:
        return self._max_length

    # ------------------------------------------------------------ the three request types

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        results = []
        for request in requests:
            context, continuation = request.args
            context_ids, continuation_ids = self._encode_pair(context, continuation)
            ids = context_ids + continuation_ids
            if self._max_length is not None:
                ids = ids[-(self._max_length + 1) :]
            result = self._score(ids, len(continuation_ids))
            self.cache_hook.add_partial("loglikelihood", (context, continuation), result)
            results.append(result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        results = []
        for request in requests:
            (text,) = request.args
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            if self._max_length is None:
                total = self._score([self.prefix_token_id, *ids], len(ids))[0] if ids else 0.0
            else:
                windows = map(make_disjoint_window, get_rolling_token_windows(
                    token_list=ids, prefix_token=self.prefix_token_id,
                    max_seq_len=self._max_length, context_len=1,
                ))
                total = sum(self._score([*context, *target], len(target))[0]
                            for context, target in windows)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            results.append(total)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results = []
        for request in requests:
            context, gen_kwargs = request.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
            if gen_kwargs.get("do_sample") and gen_kwargs.get("temperature", 1.0) != 0:
                raise ValueError("the longreach lm-eval model generates greedily only: "
                                 "use do_sample=False (or temperature=0)")
            ids = self.tokenizer.encode(context) or [self.prefix_token_id]
            if self._max_length is not None:
                ids = ids[-max(self._max_length - max_new, 1) :]
            text = self._generate(ids, max_new, until)
            self.cache_hook.add_partial("generate_until", (context, {"until": until}), text)
            results.append(text)
        return results

    # ------------------------------------------------------------ the work

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # spaces at the end of the context belong to the continuation (lm-eval's convention)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            return [self.prefix_token_id], self.tokenizer.encode(continuation,
                                                                 add_special_tokens=False)
        context_ids = self.tokenizer.encode(context)
        whole = self.tokenizer.encode(context + continuation)
        if whole[: len(context_ids)] == context_ids:
            return context_ids, whole[len(context_ids) :]
        return context_ids, self.tokenizer.encode(continuation, add_special_tokens=False)

    def _score(self, ids: list[int], n_target: int) -> tuple[float, bool]:
        """Log-probability of the last ``n_target`` tokens of ``ids`` given the others, and
        whether greedy decoding would produce them."""
        if n_target < 1:
            return 0.0, True
        if n_target >= len(ids):
            raise ValueError("a scored continuation needs at least one context token before it")
        check_memory(self.model, len(ids), self._device, self.force)
        total, greedy = 0.0, True
        for _, logprobs, matches in token_logprobs(self.model, ids, prefill_chunk=self.prefill_chunk,
                                                   first=len(ids) - n_target):
            total += float(logprobs.sum())
            greedy = greedy and bool(matches.all())
        return total, greedy

    def _generate(self, ids: list[int], max_new: int, until: list[str]) -> str:
        check_memory(self.model, len(ids) + max_new, self._device, self.force)
        generated: list[int] = []
        text = ""
        for token in greedy_tokens(self.model, ids, prefill_chunk=self.prefill_chunk):
            if token == self.tokenizer.eos_token_id:
                break
            generated.append(token)
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            if any(stop and stop in text for stop in until) or len(generated) == max_new:
                break
        cuts = [text.index(stop) for stop in until if stop and stop in text]
        return text[: min(cuts)] if cuts else text


def model_args(**kwargs: Any) -> str:
    """``model_args(pretrained="m", attention="cca")`` -> ``"pretrained=m,attention=cca"``."""
    return ",".join(f"{k}={v}" for k, v in kwargs.items() if v is not None)


__all__ = ["MODEL_NAME", "LongReachLM", "model_args"]
