"""The training loop: ``train(run_config, resume=None) -> run folder``.

Reads top to bottom: build (tokenizer, data, model, optimizer), optionally resume from a
checkpoint, then loop over optimizer steps with logging, held-out loss and checkpoints.
Resuming restores weights, optimizer, scheduler, data position and every RNG, so a resumed
run continues exactly where the saved one was.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from torch import nn

from longreach.data import (
    BatchLoader,
    PackedSequences,
    build_token_cache,
    eval_batches,
    load_tokenizer,
    vocab_bound,
)
from longreach.models import LongReachConfig, causal_lm_class, config_from_dict
from longreach.models.compat import enable_checkpointing
from longreach.models.gca.retrieval import find_gca_stack
from longreach.runtime import write_atomic
from longreach.train import checkpoint, distributed
from longreach.train.config import RunConfig
from longreach.train.interventions import InitialStates
from longreach.train.metrics import (
    MetricsLog,
    clear_metrics,
    summary_writer_class,
    truncate_metrics,
)
from longreach.train.probe import RetrievalProbe
from longreach.train.progress import (
    format_record,
    format_retrieval,
    progress_bar,
    quiet_hf_progress,
)
from longreach.train.rng import get_rng_state, seed_everything, set_rng_state
from longreach.train.schedule import build_scheduler
from longreach.train.signals import StopOnSignal

CONFIG = "config.yaml"
FINAL = "final"
SIGNAL, TIME_LIMIT = "signal", "time limit"  # why a run stopped before train.steps
API_RESUME, CLI_RESUME = "resume='latest'", "--resume"  # how messages say "continue the run"
# tokens per optimizer step (seq_len x batch_size x grad_accum) above which a CPU run warns
# up front: even a small model takes minutes per step there
CPU_TOKENS_PER_STEP = 65_536
_quiet_hf_progress = quiet_hf_progress  # the name `longreach.train.finetune` imports


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN or infinite; nothing of that state was saved."""


class StoppedBySignal(Exception):
    """A run stopped on SIGINT / SIGTERM after saving (raised by ``train(..., cli=True)``).

    ``signum`` is the signal, ``exit_code`` the conventional 128 + signum (130, 143) a
    command exits with, ``run_dir`` the run folder, ``step`` the step saved.
    """

    def __init__(self, signum: int, run_dir: Path, step: int):
        self.signum, self.run_dir, self.step = signum, run_dir, step
        self.exit_code = 128 + signum
        super().__init__(
            f"stopped by {signal.Signals(signum).name} at step {step}; saved in {run_dir}"
        )


def train(
    run_config: RunConfig,
    *,
    resume: str | os.PathLike | None = None,
    trainer_class: type[Trainer] | None = None,
    cli: bool = False,
) -> Path:
    """Train as ``run_config`` says and return the run folder.

    ``resume`` is ``"latest"`` (the newest valid checkpoint of this run), a checkpoint
    folder, or a run folder. SIGINT / SIGTERM finish the current step, save and return;
    with ``train.grad_accum > 1`` a signal that arrives while a step's micro-batches run
    stops before that step instead (its partial gradients are discarded: the last completed
    step is saved, so a resumed run redoes the whole step). A second signal aborts at once.
    ``train.max_time_minutes`` stops by wall clock like a signal and also writes ``final/``.
    ``trainer_class`` is a ``Trainer`` subclass that builds another model (see ``finetune``).

    ``cli=True`` is for command lines: messages say ``--resume`` instead of
    ``resume='latest'``, and a signal stop raises ``StoppedBySignal`` once everything is
    saved, so the command can exit with 128 + the signal number.
    """
    existing = checkpoint.list_checkpoints(run_config.out_dir)
    if resume is None and existing:  # starting over would mix two runs' checkpoints and metrics
        raise FileExistsError(
            f"{run_config.out_dir} already holds checkpoints (newest: {existing[-1][1].name}); "
            "resume it (resume='latest' / --resume) or choose another train.out_dir"
        )
    if run_config.train.tensorboard:
        summary_writer_class()  # fail now, not after building everything
    env = distributed.setup(run_config.train.device)
    try:
        trainer = (trainer_class or Trainer)(
            run_config, env, resume_hint=CLI_RESUME if cli else API_RESUME
        )
        if resume is not None:
            trainer.resume(resume)
        else:
            trainer.start_fresh()
        trainer.fit()
    finally:
        distributed.teardown(env)
    if cli and trainer.stopped_by is not None:
        raise StoppedBySignal(trainer.stopped_by, trainer.out_dir, trainer.step)
    return trainer.out_dir


class Trainer:
    def __init__(
        self, run_config: RunConfig, env: distributed.DistEnv, *, resume_hint: str = API_RESUME
    ):
        """``resume_hint`` is how messages tell the user to continue this run."""
        self.cfg, self.env = run_config, env
        self.resume_hint = resume_hint
        tc, dc = run_config.train, run_config.data
        self.out_dir = run_config.out_dir.resolve()
        self.device = env.device
        self.started = time.perf_counter()
        self.console = Console(stderr=True, quiet=not env.is_main, soft_wrap=True, highlight=False)

        # same seed on every rank: identical initial weights; the data loader splits the data
        seed_everything(run_config.seed)
        self.tokenizer = load_tokenizer(dc.tokenizer)
        build_model = self.model_builder(self.tokenizer)  # settings checked before tokenizing

        # rank 0 tokenizes first; the others then find the finished cache
        cache = None
        for turn in (True, False):
            if env.is_main == turn:
                cache = build_token_cache(
                    dc.source,
                    self.tokenizer,
                    cache_dir=dc.cache_dir,
                    val_fraction=dc.val_fraction,
                    text_field=dc.text_field,
                    progress=env.is_main,
                )
            distributed.barrier(env)

        model = build_model()
        self.tied = _tied_aliases(model)
        self.initial_states = InitialStates(
            tc.initial_state,
            prob=tc.initial_state_prob,
            sigma=tc.initial_state_sigma,
            reduce=lambda t: distributed.all_reduce_sum(t, env),
        )
        if self.initial_states.active:  # only longreach models have recurrent layers to bind
            self.initial_states.bind(model)
        if self.initial_states.active and tc.gradient_checkpointing:
            # recomputation would re-run the layers on states they already advanced
            raise ValueError(
                f"train.initial_state={tc.initial_state} does not work with "
                "train.gradient_checkpointing=true"
            )
        if tc.gradient_checkpointing:
            enable_checkpointing(model)
        model.to(self.device)
        wrapped = distributed.parallelize(model, env, fsdp=tc.fsdp)
        self.model = model  # the model itself (sharded in place under FSDP): state dicts, saving
        self.optimizer = _build_optimizer(model, tc)
        self.scheduler = build_scheduler(self.optimizer, tc)
        self.train_model = wrapped  # what the loop calls
        if tc.compile and tc.compile_scope == "mixers":
            compile_mixers(model)
        elif tc.compile:
            self.train_model = torch.compile(wrapped)

        self.loader = BatchLoader(
            PackedSequences(cache.train, dc.seq_len),
            tc.batch_size,
            seed=run_config.seed,
            rank=env.rank,
            world_size=env.world_size,
            synthetic=dc.synthetic_options(),
            tokenizer=self.tokenizer,
            stream=tc.initial_state == "tbtt",
            stream_batches=tc.tbtt_batches,
            workers=dc.workers,
        )
        self.val_batches = (
            eval_batches(PackedSequences(cache.val, dc.seq_len), tc.batch_size, tc.eval_batches)
            if tc.eval_batches and len(cache.val) >= dc.seq_len
            else []
        )
        self.probe = self._build_probe(model)  # GCA models only
        precision = (
            tc.precision
            if tc.precision != "auto"
            else ("bf16" if self.device.type == "cuda" else "fp32")
        )
        self.autocast = (
            (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16))
            if precision == "bf16"
            else contextlib.nullcontext
        )
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers (norms, loss) in TF32
        self.tokens_per_step = tc.batch_size * dc.seq_len * tc.grad_accum * env.world_size
        per_process = self.tokens_per_step // env.world_size
        if self.device.type == "cpu" and per_process > CPU_TOKENS_PER_STEP:
            self.warn(
                f"{per_process:,} tokens per optimizer step (data.seq_len x train.batch_size x "
                f"train.grad_accum) on the CPU: expect minutes to hours per step; train on a GPU "
                f"or lower them (a CPU run stays under {CPU_TOKENS_PER_STEP:,})"
            )
        self.step = 0
        self.elapsed_before = 0.0  # wall time of earlier sessions of a resumed run
        self.last_saved: int | None = None
        self.stopped_by: int | None = None  # the signal number a run stopped on

    def model_builder(self, tokenizer) -> Callable[[], nn.Module]:
        """Check the ``model:`` settings now; the returned call builds the model to train."""
        model_config = _model_config(self.cfg, tokenizer)
        return lambda: causal_lm_class(model_config)(model_config)

    # ----------------------------------------------------------------------------- start

    def start_fresh(self) -> None:
        if self.cfg.train.init_from:
            self._load_weights(self.cfg.train.init_from)
        if self.env.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            clear_metrics(self.out_dir)
            self._write_config()
        distributed.barrier(self.env)

    def _load_weights(self, path: str | os.PathLike) -> None:
        """Load a saved model folder's weights (a checkpoint or a ``final/`` folder)."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"model folder not found: {path}")
        weights = checkpoint.read_model_state(path)
        for alias, name in self.tied.items():  # save_pretrained stores tied weights once
            if alias not in weights and name in weights:
                weights[alias] = weights[name]
        try:
            distributed.load_model_state(self.model, weights)
        except RuntimeError as e:
            raise checkpoint.CheckpointError(
                f"the weights in {path} do not fit the configured model (is model: the same?): {e}"
            ) from None

    def check_resume(self, saved: dict | None, path: Path) -> None:
        """Refuse to resume from checkpoint ``path`` (written with config ``saved``).

        The weights themselves are checked when they load; subclasses add what they know.
        """

    def resume(self, resume: str | os.PathLike) -> None:
        path = checkpoint.resolve_resume(resume, self.out_dir)
        state = checkpoint.read_trainer_state(path)
        self.check_resume(state.get("config"), path)
        self._load_weights(path)
        distributed.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # the schedule follows the current config (e.g. more steps); same arithmetic as LambdaLR
        self.scheduler.base_lrs = [self.cfg.train.lr] * len(self.optimizer.param_groups)
        for group, base, fn in zip(
            self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas
        ):
            group["initial_lr"] = base
            group["lr"] = base * fn(self.scheduler.last_epoch)
        self.step = int(state["step"])
        self.elapsed_before = float(state.get("elapsed", 0.0))
        self.last_saved = self.step
        changed = _changed_settings(state.get("config"), self.cfg.to_dict())
        if changed:
            self.warn("resuming with changed settings: " + "; ".join(changed))
        self.loader.load_state_dict(state["data"])  # a global position: any world size
        saved_states = state.get("initial_states")
        if saved_states:  # one per rank; carried states only fit the same world size
            same_world = len(saved_states) == self.env.world_size
            self.initial_states.load_state_dict(
                saved_states[self.env.rank if same_world else 0], carried=same_world
            )
            self.initial_states.to(self.device)
        if len(state["rng"]) == self.env.world_size:
            set_rng_state(state["rng"][self.env.rank], self.device)
        else:
            self.warn(
                f"{path} was written by {len(state['rng'])} processes, this run has "
                f"{self.env.world_size}: the random streams start afresh"
            )
        if self.env.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            truncate_metrics(self.out_dir, self.step)
            self._write_config()
            self.console.print(f"resumed from {path} at step {self.step}")
        distributed.barrier(self.env)

    # ------------------------------------------------------------------------------ loop

    def fit(self) -> None:
        tc = self.cfg.train
        # rank 0 appends one JSON line per log step; kept open for the whole run
        self.metrics = (
            MetricsLog(self.out_dir, tensorboard=tc.tensorboard) if self.env.is_main else None
        )
        try:
            # signals only set a flag until we are done, so the last save cannot be cut short
            with StopOnSignal(announce=self.env.is_main) as signals:
                stop_reason = self._loop(signals)
                if stop_reason == SIGNAL:  # a rank the signal missed was stopped by another
                    self.stopped_by = signals.signum or signal.SIGTERM
                # a signal means "save and leave"; the clock ends the run like its last step
                finished = stop_reason in (None, TIME_LIMIT)
                if finished and self.val_batches:
                    self._log({"step": self.step, "eval_loss": self.evaluate()})
                if finished and self.probe is not None:
                    self._run_probe()
                if finished or self.last_saved != self.step:
                    self.save(final=finished)
            if stop_reason is not None:
                self.console.print(
                    f"stopped at step {self.step}/{tc.steps} "
                    f"({signals.requested or stop_reason}); continue with {self.resume_hint}"
                )
        finally:
            self.loader.close()  # its worker processes, if any
            if self.metrics is not None:
                self.metrics.close()

    def _loop(self, signals: StopOnSignal) -> str | None:
        """Train up to ``train.steps``; return why it stopped early (signal, clock) or None."""
        tc = self.cfg.train
        progress = progress_bar(self.console, total=tc.steps, done=self.step)
        with progress:
            task = progress.tasks[0].id
            last_log_time, last_log_step = time.perf_counter(), self.step
            self.model.train()

            def micro_batch_done(done: int) -> None:
                progress.update(task, micro=f"micro-batch {done}/{tc.grad_accum}")

            while self.step < tc.steps:
                lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
                result = self._train_step(signals, micro_batch_done)
                if result is None:  # a signal during the micro-batches: the step never ran
                    return SIGNAL
                loss, grad_norm, stop = result
                self.step += 1
                if self.step % tc.log_every == 0 or self.step == tc.steps:
                    now = time.perf_counter()
                    tokens_per_s = (
                        (self.step - last_log_step)
                        * self.tokens_per_step
                        / max(now - last_log_time, 1e-9)
                    )
                    self._log(
                        {
                            "step": self.step,
                            "loss": loss,
                            "lr": lr,
                            "grad_norm": grad_norm,
                            "tokens": self.step * self.tokens_per_step,
                            "tokens_per_s": tokens_per_s,
                            "elapsed": self._elapsed(),
                        },
                        echo=not self.console.is_terminal,  # the bar shows it on a terminal
                    )
                    last_log_time, last_log_step = now, self.step
                    progress.update(task, loss=f"{loss:.4f}", tps=f"{tokens_per_s:,.0f}")
                progress.update(task, completed=self.step, micro="")
                if stop:
                    return stop
                if self.step < tc.steps:  # the end of the run evaluates and saves anyway
                    if tc.eval_every and self.step % tc.eval_every == 0 and self.val_batches:
                        self._log({"step": self.step, "eval_loss": self.evaluate()})
                    if self.probe is not None and self._probe_due():
                        self._run_probe(lambda text: progress.update(task, ret=text))
                    if tc.save_every and self.step % tc.save_every == 0:
                        self.save()
        return None

    def _train_step(
        self, signals: StopOnSignal, micro_batch_done: Callable[[int], None]
    ) -> tuple[float, float, str | None] | None:
        """One optimizer step over ``grad_accum`` micro-batches.

        Returns the rank-averaged loss and grad norm, and why to stop after this step (or
        None). The loss is checked before the update, so a NaN never reaches the weights (or a
        checkpoint). The stop flags ride along in the same all-reduce, so every rank stops at
        the same step for the same reason.

        A signal between micro-batches returns None instead: the partial gradients are dropped
        and the data position and RNGs go back to the start of the step, so saving then is
        saving the last completed step (not when initial states are carried: their update
        cannot be undone cheaply, so such a run stops at the end of the step).
        """
        tc = self.cfg.train
        can_abandon = tc.grad_accum > 1 and not self.initial_states.active
        if can_abandon:
            start = self.loader.state_dict(), get_rng_state(self.device)
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(tc.grad_accum):
            if micro and can_abandon and self._all_agree_to_stop(signals):
                self.optimizer.zero_grad(set_to_none=True)
                self.loader.load_state_dict(start[0])
                set_rng_state(start[1], self.device)
                return None
            batch = next(self.loader)
            ids = batch["input_ids"].to(self.device, non_blocking=True)
            labels = batch["labels"].to(self.device, non_blocking=True)
            if self.loader.stream_start:  # new streams: states carried so far do not continue
                self.initial_states.reset()
            elif "state_reset" in batch:  # rows after or of a synthetic sample start afresh
                self.initial_states.reset_rows(batch["state_reset"])
            # None unless train.initial_state asks for initial recurrent states
            cache = self.initial_states.cache_for(self.model, ids.shape[0], self.device)
            extra = {} if cache is None else {"past_key_values": cache}
            if "loss_weights" in batch:  # data.synthetic.loss_weight
                extra["loss_weights"] = batch["loss_weights"].to(self.device, non_blocking=True)
            with distributed.gradient_sync(self.train_model, micro == tc.grad_accum - 1):
                with self.autocast():
                    loss = (
                        self.train_model(input_ids=ids, labels=labels, use_cache=False, **extra)
                        .loss
                        / tc.grad_accum
                    )
                loss.backward()
            self.initial_states.observe(cache)
            loss_sum += loss.detach().float()
            if tc.grad_accum > 1:
                micro_batch_done(micro + 1)
        grad_norm = distributed.clip_grad_norm(self.model.parameters(), tc.grad_clip)
        signalled, out_of_time = signals.requested is not None, self._out_of_time()
        flags = torch.tensor([float(signalled), float(out_of_time)], device=self.device)
        stats = torch.cat([torch.stack([loss_sum, grad_norm.float().to(self.device)]), flags])
        loss, grad_norm, signalled, out_of_time = distributed.all_reduce_sum(
            stats, self.env
        ).tolist()
        loss, grad_norm = loss / self.env.world_size, grad_norm / self.env.world_size
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            last = checkpoint.list_checkpoints(self.out_dir)
            raise TrainingDiverged(
                f"training diverged at step {self.step + 1}: loss {loss}, grad norm {grad_norm}. "
                f"Nothing was saved from this state; the last good checkpoint is "
                f"{last[-1][1] if last else '(none)'}. Try a lower train.lr or a longer warmup."
            )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        stop = SIGNAL if signalled else TIME_LIMIT if out_of_time else None
        return loss, grad_norm, stop

    def _all_agree_to_stop(self, signals: StopOnSignal) -> bool:
        """Whether any rank has a signal (every rank gets the same answer)."""
        signalled = signals.requested is not None
        if not self.env.distributed:
            return signalled
        flag = torch.tensor(float(signalled), device=self.device)
        return distributed.all_reduce_sum(flag, self.env).item() > 0

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean held-out loss over the fixed validation batches, split across ranks.

        Every rank runs the same number of forwards (FSDP needs that); padding slots count 0.
        """
        if not self.val_batches:
            return None
        n, world = len(self.val_batches), self.env.world_size
        totals = torch.zeros(2, device=self.device)
        self.model.eval()
        for j in range(math.ceil(n / world)):
            i = j * world + self.env.rank
            batch = self.val_batches[i if i < n else 0]
            with self.autocast():
                out = self.train_model(
                    input_ids=batch["input_ids"].to(self.device),
                    labels=batch["labels"].to(self.device),
                    use_cache=False,
                )
            weight = float(batch["input_ids"].shape[0]) if i < n else 0.0  # the last may be short
            totals += torch.stack(
                [out.loss.float() * weight, torch.tensor(weight, device=self.device)]
            )
        self.model.train()
        total, count = distributed.all_reduce_sum(totals, self.env).tolist()
        return total / count

    def _build_probe(self, model: nn.Module) -> RetrievalProbe | None:
        """The retrieval probe of a GCA model; None for other models or train.probe_every=0."""
        tc = self.cfg.train
        if tc.probe_every == 0:
            return None
        if find_gca_stack(model) is None:
            if tc.probe_every:
                self.warn("train.probe_every is set, but the model has no gca layers: no probe")
            return None
        try:
            return RetrievalProbe(
                model,
                self.tokenizer,
                self.cfg.data.seq_len,
                n_prompts=tc.probe_prompts,
                seed=self.cfg.seed,
                text_batches=self.val_batches,
                batch_size=tc.batch_size,
                # the training prompts' filler (the built-in corpus unless the recipe names one)
                haystack=(self.cfg.data.synthetic_options() or {}).get("haystack", "builtin"),
            )
        except ValueError as err:  # e.g. sequences too short for a passkey prompt
            self.warn(f"no retrieval probe: {err}")
            return None

    def _probe_due(self) -> bool:
        tc = self.cfg.train
        every = tc.probe_every if tc.probe_every is not None else tc.eval_every
        return bool(every) and self.step % every == 0

    def _run_probe(self, show: Callable[[str], None] | None = None) -> None:
        """Log the probe's metrics (every rank runs it: sharded models forward together)."""
        metrics = self.probe.run(self.model, self.autocast)
        self._log({"step": self.step, **metrics})
        if show is not None:
            show(format_retrieval(metrics))

    # ------------------------------------------------------------------------- checkpoints

    def save(self, *, final: bool = False) -> None:
        """Checkpoint the current step (and with ``final``, write ``final/``). All ranks call."""
        model_state = distributed.full_model_state(self.model)  # collective under FSDP
        if model_state is not None:  # gathered tied weights are separate copies: store one
            for alias in self.tied:
                model_state.pop(alias, None)
        optim_state = distributed.full_optimizer_state(self.model, self.optimizer)
        rng_states = distributed.all_gather_object(get_rng_state(self.device), self.env)
        initial_states = (
            distributed.all_gather_object(self.initial_states.state_dict(), self.env)
            if self.initial_states.active
            else None
        )
        if self.env.is_main:

            def save_model(folder: Path) -> None:
                with quiet_hf_progress():
                    # a copy: save_pretrained empties the dict it is given as it writes
                    state = dict(model_state) if model_state is not None else None
                    self.model.save_pretrained(str(folder), state_dict=state)

            trainer_state = {
                "step": self.step,
                "optimizer": optim_state,
                "scheduler": self.scheduler.state_dict(),
                "rng": rng_states,
                "data": self.loader.state_dict(),  # the same on every rank
                "elapsed": self._elapsed(),
                "config": self.cfg.to_dict(),
            }
            if initial_states is not None:
                trainer_state["initial_states"] = initial_states
            path = checkpoint.checkpoint_path(self.out_dir, self.step)
            checkpoint.remove_stale_temporaries(self.out_dir)
            checkpoint.write_checkpoint(
                path, save_model=save_model, tokenizer=self.tokenizer, trainer_state=trainer_state
            )
            checkpoint.prune_checkpoints(self.out_dir, self.cfg.train.keep_last)
            if final:
                checkpoint.write_checkpoint(
                    self.out_dir / FINAL,
                    save_model=save_model,
                    tokenizer=self.tokenizer,
                    trainer_state=None,
                )
            self.console.print(f"saved {path}" + (f" and {self.out_dir / FINAL}" if final else ""))
        self.last_saved = self.step
        distributed.barrier(self.env)

    # ---------------------------------------------------------------------------- helpers

    def warn(self, message: str) -> None:
        """One ``warning: ...`` line on the console (rank 0), no traceback or source line."""
        self.console.print(f"warning: {message}", markup=False)

    def _log(self, record: dict[str, Any], *, echo: bool = True) -> None:
        """Append a metrics line (rank 0), mirror it to TensorBoard and maybe print it."""
        if not self.env.is_main:
            return
        self.metrics.write(record)
        if echo:
            self.console.print(format_record(record))

    def _elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def _out_of_time(self) -> bool:
        limit = self.cfg.train.max_time_minutes
        return limit is not None and time.perf_counter() - self.started >= limit * 60

    def _write_config(self) -> None:
        write_atomic(self.out_dir / CONFIG, yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))


# -------------------------------------------------------------------------------- building


def _model_config(run_config: RunConfig, tokenizer) -> LongReachConfig:
    """The model config of the ``model:`` section (its family from ``model_type``, or GCA when
    it has gca layers), with the tokenizer's vocabulary and special ids."""
    section = dict(run_config.model)
    n_ids = vocab_bound(tokenizer)
    if section.get("vocab_size") is None:
        section["vocab_size"] = n_ids
    elif section["vocab_size"] < n_ids:
        raise ValueError(
            f"model.vocab_size={section['vocab_size']} is smaller than the tokenizer "
            f"{run_config.data.tokenizer!r}, which produces ids up to {n_ids - 1}"
        )
    for key in (
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    ):  # generation stops on the right ids
        section.setdefault(key, getattr(tokenizer, key))
    config = config_from_dict(section)
    limit = config.max_position_embeddings
    if limit is not None and run_config.data.seq_len > limit:
        raise ValueError(
            f"data.seq_len={run_config.data.seq_len} is longer than "
            f"model.max_position_embeddings={limit}"
        )
    return config


def _build_optimizer(model: nn.Module, tc) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only, not on norms, biases or embeddings."""
    embeddings = {
        id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()
    }
    decay, no_decay = [], []
    for p in model.parameters():  # deduplicated: a tied head appears once (as the embedding)
        if p.requires_grad:
            (decay if p.ndim >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": tc.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=tc.lr, betas=tuple(tc.betas))


def compile_mixers(model: torch.nn.Module) -> int:
    """Compile each token mixer of a longreach model in place (``nn.Module.compile``); the
    number compiled. ValueError for a model without longreach layers."""
    mixers = [m.mixer for m in model.modules() if hasattr(m, "mixer") and hasattr(m, "mixer_norm")]
    if not mixers:
        raise ValueError(
            f"train.compile_scope=mixers compiles longreach layers' mixers; "
            f"{type(model).__name__} has none (use train.compile_scope=model)"
        )
    for mixer in mixers:
        mixer.compile()
    return len(mixers)


def _tied_aliases(model: nn.Module) -> dict[str, str]:
    """{state-dict name: name it shares a tensor with}, e.g. lm_head.weight -> embed weight."""
    first: dict[int, str] = {}
    aliases = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in first:
            aliases[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
    return aliases


def _changed_settings(saved: dict | None, current: dict) -> list[str]:
    """``section.key: old -> new`` for each setting that differs from the checkpoint's."""
    if not saved:
        return []
    return [
        f"{section}.{key}: {saved[section].get(key)!r} -> {value!r}"
        for section in ("model", "data", "train")
        for key, value in current[section].items()
        if section in saved and saved[section].get(key) != value and key != "out_dir"
    ]
