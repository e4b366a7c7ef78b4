"""The ``longreach`` command: train, finetune, sweep, generate, tokenizer, corpus, eval, lm-eval,
report, bench, inspect, info, demo (``longreach --help`` lists them; ``python -m longreach`` is the
same).

Building the parser imports no torch, transformers or other heavy package, so ``longreach
--help`` is quick: each command imports what it needs when it runs (``cmd_*``)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
from pathlib import Path

from longreach.bench import add_bench_parser
from longreach.eval.command import add_eval_parser
from longreach.eval.report import add_report_parser
from longreach.runtime import MissingPackageError, resolve_device, versions


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _recipe(name: str) -> Path:
    from longreach.train.config import find_recipe  # the train package: torch

    try:
        return find_recipe(name)
    except FileNotFoundError as err:
        raise SystemExit(str(err)) from None


def _resume_and_overrides(args) -> tuple[str | None, list[str]]:
    """``--resume`` takes an optional PATH, so argparse gives it the override that follows
    it (``--resume train.steps=400``): hand such a value back to the overrides."""
    resume, overrides = args.resume, list(args.overrides)
    if resume not in (None, "latest") and "=" in resume and not Path(resume).exists():
        return "latest", [resume, *overrides]
    return resume, overrides


def _run_training(command: str, run) -> Path | int:
    """``run()``'s run folder, or the exit code of a run that diverged (2, one line) or
    stopped on a signal (128 + signal; saved, and the trainer said "continue with --resume")."""
    from longreach.train import StoppedBySignal, TrainingDiverged

    try:
        return run()
    except TrainingDiverged as err:
        print(f"longreach {command}: error: {err}", file=sys.stderr)
        return 2
    except StoppedBySignal as stop:
        return stop.exit_code


def cmd_train(args) -> int:
    from longreach.train import load_config, train

    resume, overrides = _resume_and_overrides(args)
    if args.init_from:
        overrides.append(f"train.init_from={args.init_from}")
    cfg = load_config(_recipe(args.config), overrides)
    run_dir = _run_training("train", lambda: train(cfg, resume=resume, cli=True))
    if isinstance(run_dir, int):
        return run_dir
    if os.environ.get("RANK", "0") == "0":
        print(f"run saved in {run_dir}")
    return 0


def cmd_finetune(args) -> int:
    from longreach.train.finetune import finetune, load_finetune_config

    resume, overrides = _resume_and_overrides(args)
    cfg = load_finetune_config(
        _recipe(args.config), overrides, model=args.model, attention=args.attention
    )
    run_dir = _run_training("finetune", lambda: finetune(cfg, resume=resume, cli=True))
    if isinstance(run_dir, int):
        return run_dir
    if os.environ.get("RANK", "0") == "0":
        print(f"run saved in {run_dir}; fine-tuned model in {run_dir / 'final'}")
    return 0


def cmd_sweep(args) -> int:
    from longreach.train import sweep

    sets = [*args.set, *args.overrides]
    success = sweep.parse_success(args.success)  # a bad criterion fails before anything runs
    recipe = _recipe(args.config)
    if args.dry_run:
        sweep.print_plan(*sweep.plan_sweep(recipe, args.seeds, args.grid, sets, args.out,
                                           args.resume), sweep.parse_devices(args.devices))
        return 0
    try:
        results = sweep.run_sweep(recipe, args.seeds, args.grid, sets, args.parallel,
                                  args.devices, args.out, args.resume, success)
    except sweep.SweepStopped as stop:
        sweep.print_summary(stop.results, success is not None)
        return stop.exit_code
    sweep.print_summary(results, success is not None)
    return 0 if all(r["status"] == sweep.OK for r in results) else 1


def _add_sweep_parser(sub) -> None:
    p = sub.add_parser(
        "sweep", help="train seeds x settings of a recipe as concurrent processes; one table",
        description="Train every seed of every --grid combination of a recipe, each as its own "
        "`python -m longreach.train` process (at most --parallel at once; small models share a "
        "GPU well), and write OUT/sweep.json, sweep.csv and sweep.md: per run its status, last "
        "losses and probe/ metrics. Exit 0 when every run finished, 1 otherwise; 130/143 when "
        "stopped by a signal (the runs save; continue with --resume). See docs/sweeps.md.")
    p.add_argument("--config", required=True, help="YAML file or recipe name (e.g. gca-tiny)")
    p.add_argument("--seeds", default=None,
                   help="seeds to train, e.g. 0-9, 0,3,5 or 0-2,7 (default: the recipe's seed)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a setting to sweep, e.g. model.gca.top_k=2,4 (repeat for a product)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an override for every run, e.g. train.steps=300 (repeatable)")
    p.add_argument("--parallel", type=int, default=None,
                   help="runs at once (default: 4, or fewer when there are fewer runs)")
    p.add_argument("--devices", default=None,
                   help="devices to spread the runs over, e.g. cuda:0,cuda:1 (default: the recipe's)")
    p.add_argument("--out", default=None, help="sweep folder (default: runs/<recipe name>-sweep)")
    p.add_argument("--resume", action="store_true",
                   help="skip finished runs, continue those with checkpoints, start the rest")
    p.add_argument("--success", default=None, metavar="EXPR",
                   help="success criterion on a run's final metrics, e.g. 'probe/needle_first>=0.9'")
    p.add_argument("--dry-run", action="store_true",
                   help="check every run's settings and list the runs; start nothing")
    p.add_argument("overrides", nargs="*", help="more KEY=VALUE overrides for every run")
    p.set_defaults(func=cmd_sweep)


def load_model_and_tokenizer(model_dir: str, tokenizer: str | None = None, device: str = "auto"):
    """(model, tokenizer) of a saved model folder or a shipped checkpoint name (gca-tiny,
    swa-tiny), with the attention plug-in it was saved with switched on (a `longreach
    finetune --attention cca` result); a broken or missing file is a ValueError naming it."""
    from transformers.utils import logging as hf_logging

    from longreach.integrations import hf
    from longreach.models.loading import load_model_and_tokenizer as load_folder

    hf_logging.disable_progress_bar()  # no weight-loading bar in front of the output
    model, tok = load_folder(model_dir, tokenizer)
    model = hf.enable_from_config(model)
    return model.to(resolve_device(device)).eval(), tok


def cmd_generate(args) -> int:
    import torch
    from transformers import TextStreamer

    model, tok = load_model_and_tokenizer(args.model, args.tokenizer, args.device)
    torch.manual_seed(args.seed)
    ids = torch.tensor([tok.encode(args.prompt, add_special_tokens=False)], device=model.device)
    if ids.shape[1] == 0:
        raise SystemExit("the prompt is empty")
    streamer = None if args.quiet else TextStreamer(tok, skip_special_tokens=True)
    sampling = dict(do_sample=False) if args.greedy else dict(
        do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p
    )
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=args.max_new_tokens, streamer=streamer,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **sampling,
        )
    if args.quiet:
        print(tok.decode(out[0], skip_special_tokens=True))
    return 0


def cmd_tokenizer_train(args) -> int:
    from longreach.data import train_bpe_tokenizer

    tok = train_bpe_tokenizer(args.corpus, args.vocab_size, args.out, min_frequency=args.min_frequency,
                              max_chars=args.max_chars)
    print(f"trained a byte-level BPE with {len(tok)} tokens; saved to {args.out}")
    return 0


def cmd_corpus_build_pycode(args) -> int:
    from longreach.data.pycode import run_from_args

    manifest = run_from_args(args)
    splits = ", ".join(f"{name}: {info['file']} ({info['documents']} documents, "
                       f"{info['bytes'] / 1e6:,.1f} MB)" for name, info in manifest["splits"].items())
    print(f"built a corpus of {len(manifest['packages'])} packages in {args.out}: {splits}")
    return 0


def _add_corpus_parser(sub) -> None:
    from longreach.data.pycode import add_arguments  # the standard library only

    p = sub.add_parser("corpus", help="build corpora from what this machine has (offline)")
    csub = p.add_subparsers(dest="corpus_command", required=True)
    b = csub.add_parser(
        "build-pycode", help="the installed Python packages' source: one long document per package",
        description="Concatenate each installed distribution's .py files (sorted by path, a "
        "'# file: PATH' header before each) into one document, split train / heldout by a hash "
        "of the package name, and write OUT/train.jsonl.gz, OUT/heldout.jsonl.gz and "
        "OUT/manifest.json (per package: version, licence, files, bytes, split, skipped files). "
        "The text stays under its packages' licences: for local training, never redistributed "
        "(docs/data.md).")
    add_arguments(b)
    b.set_defaults(func=cmd_corpus_build_pycode)


def cmd_info(args) -> int:
    import torch

    from longreach.layers import available_mixers
    from longreach.ops.linear_recurrence import fla_version

    info: dict = versions(("triton", "tokenizers", "safetensors", "lm_eval"))
    devices = [f"cpu ({torch.get_num_threads()} threads)"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append(f"cuda:{i} {p.name} ({p.total_memory / 2**30:.0f} GiB)")
    info["devices"] = devices
    info["mixers"] = available_mixers()
    info["attention paths"] = _attention_paths(torch)
    fla = fla_version()
    info["fla-core"] = fla or "not installed"
    info["recurrence path"] = (
        "fla-core chunk_simple_gla / chunk_gla on CUDA, reference elsewhere"
        if fla and torch.cuda.is_available()
        else "reference (pure PyTorch; fla-core's kernels need CUDA and fla-core, the gpu extra)"
    )
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="longreach info", show_header=False)
    for key, value in info.items():
        table.add_row(key, ", ".join(value) if isinstance(value, list) else str(value))
    Console().print(table)
    return 0


def _attention_paths(torch) -> list[str]:
    paths = ["reference (pure PyTorch, any device)", "sdpa"]
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401

        paths.append("flex (CUDA)" if torch.cuda.is_available() else "flex (needs CUDA: not used here)")
    except ImportError:
        pass
    return paths


def cmd_demo(args) -> int:
    from longreach.demo import run_demo

    return run_demo(quick=args.quick, retrain=args.train, out_dir=args.out, device=args.device,
                    train_overrides=args.overrides)


def cmd_inspect_retrieval(args) -> int:
    """What each chunk of a text retrieves in a GCA model: a table, retrieval.png, .json."""
    from rich.console import Console
    from rich.table import Table

    from longreach.eval import retrieval

    if args.rows < 1:
        raise ValueError(f"--rows must be >= 1, got {args.rows}")
    model, tok = load_model_and_tokenizer(args.model, None, args.device)
    stack = retrieval.gca_stack(model, name=args.model)
    if not 0 <= args.group < len(stack.group_starts):
        raise ValueError(f"--group must be in 0..{len(stack.group_starts) - 1}, got {args.group}")
    ids = retrieval.read_text_tokens(args.text, tok, stack, args.max_tokens)
    trace = retrieval.trace_retrieval(model, ids)
    shown = retrieval.retrieval_table(trace, tok, ids, group=args.group, rows=args.rows)
    table = Table(title=f"retrieval of {args.model} over {args.text}: {len(ids):,} tokens, "
                  f"{trace.n_chunks} chunks of {trace.chunk_size}, top-{trace.top_k} "
                  f"(group {args.group}; {len(shown)} query chunks shown)")
    table.add_column("chunk", justify="right")
    table.add_column("text")
    table.add_column("retrieved chunk: weight, text")
    for row in shown:
        got = "\n".join(f"{r['chunk']:>4}: {r['weight']:.2f}  {r['text']}" for r in row["retrieved"])
        table.add_row(str(row["chunk"]), row["text"], got, end_section=True)
    Console(highlight=False).print(table, markup=False)
    source = {"model": args.model, "text": str(args.text), "command": args.command_line}
    everything = retrieval.retrieval_table(trace, tok, ids, group=args.group)
    png, js = retrieval.write_retrieval(trace, everything, args.out, source=source, group=args.group)
    print(f"wrote {png} and {js}")
    return 0


def cmd_inspect_call_sites(args) -> int:
    """Whether a GCA model retrieves a function's definition where the function is called."""
    from longreach.eval import call_sites

    texts = call_sites.read_code_documents(args.corpus, args.documents)
    model, tok = load_model_and_tokenizer(args.model, None, args.device)
    result = call_sites.call_site_retrieval(model, tok, texts, max_tokens=args.max_tokens,
                                            min_distance=args.min_distance)
    source = {"model": args.model, "corpus": str(args.corpus), "command": args.command_line}
    path = call_sites.write_call_sites(result, args.out, source)
    if not result["call_sites"]:
        print(f"no call site {args.min_distance}+ tokens from its definition in the first "
              f"{args.max_tokens} tokens of {len(texts)} document(s)")
    else:
        print(f"{result['call_sites']} call sites in {result['documents']} document(s): the "
              f"defining chunk is in the top-{result['top_k']} for {result['in_topk']:.1%} "
              f"(chance {result['chance_in_topk']:.1%}), first for {result['first']:.1%}; "
              f"median rank {result['median_rank']:g} of {result['median_visible']:g} visible")
    print(f"wrote {path}")
    return 0


def _add_inspect_parser(sub) -> None:
    p = sub.add_parser("inspect", help="look inside a model (retrieval: what a GCA model reads)")
    isub = p.add_subparsers(dest="inspect_command", required=True)
    r = isub.add_parser(
        "retrieval", help="which earlier chunks each chunk of a text retrieves in a GCA model",
        description="Run a GCA model once over a text file and show, for each query chunk, the "
        "chunks it retrieved and their fusion weights; writes retrieval.png (query chunk x "
        "memory chunk heatmap) and retrieval.json into --out.")
    r.add_argument("--model", required=True,
                   help="GCA model folder or shipped checkpoint name (e.g. gca-tiny)")
    r.add_argument("--text", required=True, help="UTF-8 text file to run the model over")
    r.add_argument("--out", default="runs/inspect-retrieval", help="folder for retrieval.png/.json")
    r.add_argument("--max-tokens", type=int, default=8192,
                   help="inspect the first N tokens of the text (default 8192)")
    r.add_argument("--rows", type=int, default=16,
                   help="query chunks in the printed table, evenly spaced (the json has all)")
    r.add_argument("--group", type=int, default=0, help="retrieval group to show (default 0)")
    r.add_argument("--device", default="auto")
    r.set_defaults(func=cmd_inspect_retrieval)
    c = isub.add_parser(
        "call-sites", help="does a GCA model retrieve a function's definition where it is "
        "called (Python source)",
        description="Run a GCA model over Python source documents and count, over the calls "
        "of functions defined once in the text and called beyond the sliding window, how often "
        "the chunk holding the definition is among the chunks retrieved for the calling chunk "
        "(with chance beside it); writes call_sites.json into --out.")
    c.add_argument("--model", required=True, help="GCA model folder")
    c.add_argument("--corpus", required=True,
                   help="Python source: a corpus (.jsonl[.gz], a folder, ...), e.g. the held-out "
                   "split of longreach corpus build-pycode")
    c.add_argument("--documents", type=int, default=8, help="documents to read (default 8)")
    c.add_argument("--max-tokens", type=int, default=16384,
                   help="tokens of each document the model reads (default 16384)")
    c.add_argument("--min-distance", type=int, default=512,
                   help="leave out calls closer than this many tokens to the definition (the "
                   "sliding window sees those; default 512)")
    c.add_argument("--out", default="runs/inspect-call-sites", help="folder for call_sites.json")
    c.add_argument("--device", default="auto")
    c.set_defaults(func=cmd_inspect_call_sites)


def build_parser() -> argparse.ArgumentParser:
    from longreach.runtime import __version__

    parser = argparse.ArgumentParser(prog="longreach", description=__doc__)
    parser.add_argument("--version", action="version", version=f"longreach {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a YAML recipe")
    p.add_argument("--config", required=True,
                   help="YAML file or recipe name (e.g. tiny-swa; the shipped ones are in longreach/configs)")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from the latest checkpoint of the run (or from PATH)")
    p.add_argument("--init-from", metavar="DIR", default=None,
                   help="start a fresh run from the weights of a saved model folder (e.g. runs/x/final)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.steps=300")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("finetune", help="fine-tune a local HF causal LM with CCA (or another) attention")
    p.add_argument("--model", required=True, help="local Hugging Face model folder (weights + tokenizer)")
    p.add_argument("--attention", default=None,
                   help="cca, streaming, lm-infinite or full (default: the config's, cca)")
    p.add_argument("--config", default="cca-finetune",
                   help="YAML file or recipe name (the shipped ones are in longreach/configs)")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from the latest checkpoint of the run (or from PATH)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.steps=300")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("generate", help="generate text from a saved model folder")
    p.add_argument("--model", required=True,
                   help="folder written by save_pretrained (e.g. runs/tiny-swa/final) or a shipped "
                   "checkpoint name (gca-tiny, swa-tiny); a folder of that name wins")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, help="tokenizer folder or 'byte' (default: the model folder's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true", help="print the text at the end instead of streaming it")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = tsub.add_parser("train", help="train a byte-level BPE on a corpus and save it in HF format")
    t.add_argument("--corpus", default="builtin", help="'builtin', a file, folder, glob or saved HF dataset")
    t.add_argument("--vocab-size", type=int, default=8192)
    t.add_argument("--min-frequency", type=int, default=2)
    t.add_argument("--max-chars", type=_positive_int, default=None, metavar="N",
                   help="train on the first N characters of the corpus (default: all of it)")
    t.add_argument("--out", required=True)
    t.set_defaults(func=cmd_tokenizer_train)

    _add_corpus_parser(sub)

    p = sub.add_parser("info", help="versions, devices and available kernels")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "demo", help="length generalization: tiny GCA vs sliding-window models on passkey at 1x-1000x "
        "their training length",
        description="Evaluate the shipped tiny GCA and sliding-window models (trained at 512 tokens) on "
        "passkey retrieval at 512 tokens to 1000x that; prints a side-by-side table and writes a heatmap. "
        "About 5 minutes on an idle 2-core CPU (--quick: under 3); it prints its estimate at the start.")
    p.add_argument("--quick", action="store_true",
                   help="fewer samples (under 3 minutes on an idle 2-core CPU)")
    p.add_argument("--train", action="store_true",
                   help="retrain both models from scratch with their recipes first, in two stages each "
                   "(H200: under 25 min; 2-core CPU: about 4 hours)")
    p.add_argument("--out", default="runs/demo", help="output folder (replaced if the demo made it)")
    p.add_argument("--device", default="auto")
    p.add_argument("overrides", nargs="*", help="with --train: dotted.key=value overrides for the recipes")
    p.set_defaults(func=cmd_demo)

    _add_sweep_parser(sub)
    add_bench_parser(sub)
    add_eval_parser(sub)
    add_report_parser(sub)
    _add_inspect_parser(sub)
    # listed here for --help; main() hands everything after `lm-eval` to lm-eval's own parser
    sub.add_parser("lm-eval", add_help=False,
                   help="lm-evaluation-harness with the longreach model registered: every lm-eval "
                   "argument, --model longreach by default (see docs/evaluation.md)")
    return parser


def cmd_lm_eval(argv: list[str]) -> int:
    try:  # lm-eval is the optional `eval` extra: imported only for this command
        from longreach.eval.lm_eval import main as lm_eval_main
    except ImportError as err:
        print(f"longreach lm-eval: error: {err}", file=sys.stderr)
        return 2
    return lm_eval_main(argv)


@contextlib.contextmanager
def _autotune_from_env():
    """LONGREACH_AUTOTUNE=first: Triton's autotuned kernels (fla-core's) take their first valid
    config on the first call of each shape instead of timing every one (minutes per shape on
    a fresh machine); full or unset: Triton's autotuning as usual (longreach.ops.backend)."""
    mode = os.environ.get("LONGREACH_AUTOTUNE", "")
    if mode in ("", "full"):
        yield
        return
    if mode != "first":
        raise ValueError(f"LONGREACH_AUTOTUNE={mode!r}: use first or full")
    try:
        import triton  # noqa: F401
    except ImportError:  # no Triton: nothing autotunes
        yield
        return
    from longreach.ops.backend import autotune_override

    with autotune_override(mode):
        yield


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm-eval"]:  # before argparse, which would read lm-eval's options as ours
        return cmd_lm_eval(argv[1:])
    args = build_parser().parse_args(argv)
    # the command as typed, recorded in result summaries
    args.command_line = shlex.join(["longreach", *argv])
    try:
        with _autotune_from_env():
            return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, MissingPackageError) as err:
        # errors the user can fix: one line naming the problem, no traceback
        print(f"longreach {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"longreach {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
