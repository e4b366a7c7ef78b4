"""Run configuration: one YAML file per recipe, plus ``dotted.key=value`` overrides.

A recipe has a ``model:`` section (passed to ``longreach.models.config_from_dict``, which picks
the model family from ``model_type`` and validates it),
a ``data:`` and a ``train:`` section (the dataclasses below, whose defaults run), and the
top-level ``name`` and ``seed``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from longreach.train.interventions import check_settings as check_initial_state_settings

COMPILE_SCOPES = ("model", "mixers")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class DataConfig:
    source: str = "builtin"  # a built-in corpus name, a text/JSONL file or a folder
    tokenizer: str = "byte"
    seq_len: int = 256
    val_fraction: float = 0.01
    cache_dir: str | None = None
    text_field: str = "text"  # the field holding the text in JSONL / dataset rows
    synthetic: dict | None = None  # e.g. {task: copy, fraction: 0.1}: mix in synthetic tasks
    workers: int = 0  # processes building synthetic samples ahead of the step (0: in the loop)

    def __post_init__(self) -> None:
        _require(self.seq_len >= 2, "data.seq_len", self.seq_len, "must be >= 2")
        _require(self.synthetic is None or isinstance(self.synthetic, dict), "data.synthetic",
                 self.synthetic, "must be a mapping such as {task: passkey, fraction: 0.1}")
        _require(
            0 <= self.val_fraction < 1, "data.val_fraction", self.val_fraction, "must be in [0, 1)"
        )
        _require(not isinstance(self.workers, bool) and isinstance(self.workers, int)
                 and self.workers >= 0, "data.workers", self.workers, "must be an integer >= 0")

    def synthetic_options(self) -> dict | None:
        """``synthetic`` with ``haystack: source`` replaced by the training corpus itself
        (``source``), so that a recipe's passkey filler follows a ``data.source`` override."""
        if not self.synthetic or self.synthetic.get("haystack") != "source":
            return self.synthetic
        _require(isinstance(self.source, (str, os.PathLike)), "data.synthetic.haystack", "source",
                 f"needs data.source to be one path, not {self.source!r}")
        return {**self.synthetic, "haystack": str(self.source)}


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8  # sequences per device and micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    eval_every: int = 200  # 0 disables the periodic held-out loss (it still runs at the end)
    eval_batches: int = 20
    save_every: int = 500  # 0 disables periodic checkpoints (one is still written at the end)
    keep_last: int = 3
    log_every: int = 10
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False
    # what train.compile compiles: model (the whole training forward) or mixers (each
    # longreach layer's token mixer on its own: custom kernels, such as fla-core's, stay
    # outside the graphs while the glue around them is fused)
    compile_scope: str = "model"
    gradient_checkpointing: bool = False
    fsdp: bool = False
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    out_dir: str | None = None  # default: runs/<name>
    tensorboard: bool = False
    max_time_minutes: float | None = None  # save and stop cleanly after this much wall time
    # initial recurrent states (length generalization): zero, random_noise, fitted_noise,
    # state_passing, tbtt; see longreach.train.interventions
    initial_state: str = "zero"
    initial_state_prob: float = 1.0  # each row gets the chosen initial state with this probability
    initial_state_sigma: float = 1.0  # standard deviation of random_noise states
    # tbtt: each row carries its states over this many batches of consecutive text, then every
    # row jumps to a new random place of the corpus; 0: the corpus cut into batch_size
    # streams, walked from start to end
    tbtt_batches: int = 8
    init_from: str | None = None  # a saved model folder whose weights a fresh run starts from
    # GCA models: the retrieval probe (longreach.train.probe) every this many steps; null:
    # with the held-out loss (eval_every); 0 disables it. Models without gca layers have none
    probe_every: int | None = None
    probe_prompts: int = 32  # passkey prompts of the probe's fixed batch

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every", "keep_last", "probe_prompts"):
            _require(getattr(self, name) >= 1, f"train.{name}", getattr(self, name), "must be >= 1")
        for name in (
            "warmup_steps",
            "eval_every",
            "eval_batches",
            "save_every",
            "weight_decay",
            "grad_clip",
            "tbtt_batches",
        ):
            _require(getattr(self, name) >= 0, f"train.{name}", getattr(self, name), "must be >= 0")
        _require(
            self.probe_every is None or self.probe_every >= 0,
            "train.probe_every",
            self.probe_every,
            "must be >= 0 or null",
        )
        _require(self.compile_scope in COMPILE_SCOPES, "train.compile_scope", self.compile_scope,
                 f"must be one of {COMPILE_SCOPES}")
        _require(self.lr > 0, "train.lr", self.lr, "must be > 0")
        _require(
            0 <= self.min_lr <= self.lr,
            "train.min_lr",
            self.min_lr,
            f"must be in [0, lr={self.lr}]",
        )
        _require(len(self.betas) == 2, "train.betas", self.betas, "must have two values")
        _require(
            self.precision in PRECISIONS,
            "train.precision",
            self.precision,
            f"must be one of {PRECISIONS}",
        )
        _require(
            self.max_time_minutes is None or self.max_time_minutes > 0,
            "train.max_time_minutes",
            self.max_time_minutes,
            "must be > 0 or null",
        )
        check_initial_state_settings(
            self.initial_state, self.initial_state_prob, self.initial_state_sigma
        )


@dataclass
class RunConfig:
    name: str = "run"
    seed: int = 0
    model: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def out_dir(self) -> Path:
        return Path(self.train.out_dir) if self.train.out_dir else Path("runs") / self.name

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (YAML-safe: lists, no tuples) that ``from_dict`` reads back."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        if not isinstance(raw, dict):
            raise ValueError(f"a run config must be a mapping, got {type(raw).__name__}")
        unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(
                f"unknown top-level key(s) {unknown}; valid keys: name, seed, model, data, train"
            )
        model = raw.get("model") or {}
        if not isinstance(model, dict):
            raise ValueError(f"'model' must be a mapping, got {type(model).__name__}")
        return cls(
            name=str(raw.get("name", "run")),
            seed=_coerce(raw.get("seed", 0), int, "seed"),
            model=_floats_from_strings(model),
            data=_build_section(DataConfig, raw.get("data"), "data"),
            train=_build_section(TrainConfig, raw.get("train"), "train"),
        )


RECIPES = Path(__file__).resolve().parents[1] / "configs"  # shipped with the package


def find_recipe(name_or_path: str | Path) -> Path:
    """A config file path, or a recipe name (``tiny-swa`` -> the shipped tiny-swa.yaml).

    A name is looked up in ``./configs`` first (your own recipes), then in the recipes
    shipped inside the package (``longreach/configs``), so it resolves from any folder and
    in any install. A missing ``configs/NAME.yaml`` (the recipes' place in checkouts before
    they moved into the package) is the shipped recipe NAME.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    folders = (Path.cwd() / "configs", RECIPES)
    for folder in folders:
        for candidate in (folder / path, folder / f"{path}.yaml"):
            if candidate.is_file():
                return candidate
    if path.parent.name == "configs" and (RECIPES / path.name).is_file():
        return RECIPES / path.name
    raise FileNotFoundError(
        f"config {str(name_or_path)!r} not found (not a file, not a recipe in ./configs or "
        f"the shipped ones: {', '.join(available_recipes()) or 'none'})"
    )


def available_recipes() -> list[str]:
    """Names of the recipes ``find_recipe`` knows: ./configs and the shipped ones."""
    folders = (Path.cwd() / "configs", RECIPES)
    return sorted({p.stem for d in folders if d.is_dir() for p in d.glob("*.yaml")})


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a recipe YAML (``None``: all defaults) and apply ``dotted.key=value`` overrides.

    Values are parsed as YAML, so ``train.steps=300``, ``model.mixers=[full,swa]`` and
    ``data.synthetic={task: copy, fraction: 0.1}`` work. Raises ``FileNotFoundError`` for a
    missing file and ``ValueError`` for bad YAML, a malformed override or an unknown key.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"cannot parse {path} as YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError(
                f"{path} must hold a mapping at the top level, got {type(raw).__name__}"
            )
    for item in overrides:
        _apply_override(raw, item)
    return RunConfig.from_dict(raw)


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*", key):
        raise ValueError(
            f"malformed override {item!r}; expected dotted.key=value, e.g. train.steps=300"
        )
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise ValueError(f"cannot parse the value of override {item!r} as YAML: {e}") from None
    *parents, last = key.split(".")
    node = raw
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parents[: i + 1])
            raise ValueError(f"override {item!r}: {where} is not a mapping")
        node = child
    node[last] = value


def _build_section(cls, raw: Any, section: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"'{section}' must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown {section} key(s) {', '.join(f'{section}.{k}' for k in unknown)}; "
            f"valid keys: {', '.join(valid)}"
        )
    values = {k: _coerce(v, hints[k], f"{section}.{k}") for k, v in raw.items()}
    return cls(**values)


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Check ``value`` against a field's type hint, converting where YAML is loose.

    PyYAML reads ``3e-4`` (no dot) as a string, and users write ``1`` for a float: both are
    accepted for float fields.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a numeric run name or device index
    elif origin is tuple:
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_coerce(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    elif hint is dict or origin is dict:
        if isinstance(value, dict):
            return value
    else:  # pragma: no cover - a field type this function does not know yet
        return value
    raise ValueError(f"{name} must be {_describe(hint)}, got {value!r}")


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        return f"a list of {len(typing.get_args(hint))} numbers"
    if hint is dict or typing.get_origin(hint) is dict:
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, str(hint)
    )


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _floats_from_strings(node: Any) -> Any:
    """Turn strings such as ``1e-5`` (which PyYAML leaves as strings) into floats."""
    if isinstance(node, dict):
        return {k: _floats_from_strings(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_floats_from_strings(v) for v in node]
    if isinstance(node, str) and _FLOAT_RE.fullmatch(node.strip()):
        return float(node)
    return node


def _plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _plain(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_plain(v) for v in node]
    return node


def _require(ok: bool, name: str, value: Any, why: str) -> None:
    if not ok:
        raise ValueError(f"{name} {why}, got {value!r}")
