"""lm-evaluation-harness model ``"longreach"``: any local longreach or HF causal LM folder,
optionally with a longreach attention plug-in, behind lm-eval's ``LM`` interface.

    import lm_eval
    import longreach.eval.lm_eval  # registers the model

    lm_eval.simple_evaluate(
        model="longreach",
        model_args="pretrained=runs/tiny/final,attention=cca,group_size=16,window=1024",
        tasks=["niah_single_1"], metadata={"max_seq_lengths": [4096]},
    )

Model args: ``pretrained`` (a local folder or a shipped checkpoint's name such as
``gca-tiny``; nothing is downloaded), ``tokenizer`` (a local folder, default: the model
folder), ``attention`` (``full``: the folder's own, with the plug-in settings it was saved
with if any; ``cca``, ``streaming``, ``lm-infinite``) with ``group_size`` / ``window`` /
``sinks``, ``device`` (wins over lm-eval's ``--device``; default ``auto``: CUDA when there is
one, else CPU), ``dtype``,
``prefill_chunk`` (prompt tokens per forward pass), ``max_gen_toks`` (default 256),
``max_length`` (default none: the whole input streams through the model's cache, so a
model with a bounded cache reads any length; a number truncates contexts from the left and
windows ``loglikelihood_rolling`` as lm-eval's HF model does) and ``force`` (skip the
KV-cache memory check).

From the command line, ``longreach lm-eval ...`` or ``python -m longreach.eval.lm_eval ...``
runs lm-eval's own CLI with this model registered: every lm-eval argument, ``--model
longreach`` when no model is named.

Requests run one at a time (padded batches would break bounded caches); every prompt is fed
in ``prefill_chunk``-token segments through the model's own cache, as ``longreach eval``
does. Generation is greedy.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    # `python -m longreach.eval.lm_eval`: run the package's copy of this module, so the class
    # registered is longreach.eval.lm_eval.LongReachLM (lm-eval refuses a second one named alike)
    try:
        from longreach.eval.lm_eval import main
    except ImportError as err:
        print(f"longreach lm-eval: error: {err}", file=sys.stderr)
        sys.exit(2)
    sys.exit(main())

from pathlib import Path
from typing import Any

import yaml

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import (
        get_rolling_token_windows,
        make_disjoint_window,
        simple_parse_args_string,
    )
except ImportError as err:  # the optional `eval` extra
    raise ImportError(
        "longreach.eval.lm_eval needs lm-evaluation-harness: "
        "pip install 'longreach[eval]' (or pip install lm-eval)"
    ) from err


from longreach.eval.attention import attention_settings, check_attention_model
from longreach.eval.runner import check_memory, load_model
from longreach.eval.stream import greedy_generate, token_logprobs
from longreach.models.loading import check_model_folder

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
        # a local folder or a shipped checkpoint's name (gca-tiny); a broken file is named
        path = check_model_folder(Path(str(pretrained)).expanduser())
        check_attention_model(path, self.settings)
        self.model, self.tokenizer = load_model(path, device or "auto", dtype, self.settings,
                                                tokenizer)
        self._tokenizer_name = str(tokenizer or path)
        self._device = next(self.model.parameters()).device
        self.prefill_chunk, self.max_gen_toks = prefill_chunk, max_gen_toks
        self._max_length, self.force = max_length, bool(force)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """As lm-eval's, but a key of the model args (``device=cpu``) wins over the same key
        from lm-eval's options (``--device``), where lm-eval would pass the keyword twice."""
        extra = {k: v for k, v in (additional_config or {}).items()
                 if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

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
        eos = self.tokenizer.eos_token_id

        def text_of(tokens: list[int]) -> str:
            return self.tokenizer.decode([t for t in tokens if t != eos], skip_special_tokens=True)

        # the `until` strings are matched in the decoded text, as lm-eval's HF model does, by
        # this adapter's own criterion: generate's stop_strings needs an HF tokenizer's vocabulary
        generated = greedy_generate(self.model, ids, max_new, prefill_chunk=self.prefill_chunk,
                                    eos_token_id=eos,
                                    stop=lambda tokens: any(s and s in text_of(tokens) for s in until))
        text = text_of(generated)
        cuts = [text.index(stop) for stop in until if stop and stop in text]
        return text[: min(cuts)] if cuts else text


def lm_eval_argv(argv: list[str]) -> list[str]:
    """lm-eval command-line arguments with longreach's defaults added: ``--model longreach``
    when no model is named (on the command line or in a ``--config`` YAML), and for the longreach
    model ``--device auto`` (CUDA when there is one, else CPU) when no device is given, where
    lm-eval's own default is ``cuda:0``. ``ls``, ``validate`` and help run unchanged."""
    argv = list(argv)
    if (not argv or argv == ["run"] or argv[0] in ("ls", "validate")
            or "-h" in argv or "--help" in argv):
        return argv
    config_file = _option(argv, "--config", "-C")
    config = yaml.safe_load(Path(config_file).read_text()) if config_file else None
    config = config if isinstance(config, dict) else {}
    extra = []
    model = _option(argv, "--model", "-M") or config.get("model")
    if model is None:
        model = MODEL_NAME
        extra += ["--model", MODEL_NAME]
    if model == MODEL_NAME and _option(argv, "--device") is None and "device" not in config:
        extra += ["--device", "auto"]
    return argv + extra


def _option(argv: list[str], *names: str) -> str | None:
    """The value of option ``names`` in ``argv`` (``--name value`` or ``--name=value``), None
    when it is not there."""
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name:
                return argv[i + 1] if i + 1 < len(argv) else ""
            if arg.startswith(name + "="):
                return arg[len(name) + 1 :]
    return None


def main(argv: list[str] | None = None) -> int:
    """lm-eval's command line (``lm_eval ...``) with the longreach model registered and the
    defaults of ``lm_eval_argv``; returns the exit status (2 with a one-line message for a
    ``ValueError`` or ``FileNotFoundError``: an unknown task, a missing folder, no CUDA)."""
    from lm_eval.__main__ import cli_evaluate

    argv = lm_eval_argv(sys.argv[1:] if argv is None else argv)
    # lm-eval's entry point reads sys.argv (every 0.4.x version does)
    saved, sys.argv = sys.argv, ["lm-eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as exit:  # argparse errors and --help
        if isinstance(exit.code, str):
            print(exit.code, file=sys.stderr)
            return 1
        return exit.code or 0
    except (ValueError, FileNotFoundError) as err:
        print(f"longreach lm-eval: error: {err}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved
    return 0


def model_args(**kwargs: Any) -> str:
    """``model_args(pretrained="m", attention="cca")`` -> ``"pretrained=m,attention=cca"``."""
    return ",".join(f"{k}={v}" for k, v in kwargs.items() if v is not None)


__all__ = ["MODEL_NAME", "LongReachLM", "lm_eval_argv", "main", "model_args"]
