"""Run configuration: dataclasses loaded from YAML with ``--set section.field=value`` overrides.

A config file has up to five sections (every field has a default, so any may be left out)::

    model: {teacher: smollm2-135m-instruct, student_layers: 6}
    data:  {task: instructions, num_train: 256, num_eval: 16}
    agent: {name: gkd, divergence: jsd, beta: 0.5, lmbda: 1.0}
    train: {steps: 100, batch_size: 4, lr: 1.0e-4, save_every: 50, keep_last: 2}
    eval:  {greedy: true, num_samples: 8, reward: auto}

Every field has a docstring and a range check; a bad value fails at load time with the field's
full name (``agent.beta``) and what is allowed. Unknown fields are errors too (typos do not pass
silently), and so are duplicated YAML keys and non-finite floats (``.nan``, ``.inf``).

A reward given as an import path ``module:function`` runs user code, so it is refused unless the run
opts in: ``train.allow_code_rewards: true`` in the file, or ``--allow-code`` on the command line.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


@dataclass
class ModelConfig:
    """Teacher and student models."""

    teacher: str | None = "smollm2-135m-instruct"
    """Teacher: a built-in name (``smollm2-135m-instruct``), a local checkpoint folder or a cached hub id;
    ``self``: a frozen copy of the student as it starts (self-distillation); null: no teacher (SPIN, GRPO)."""
    student: str | None = None
    """Student checkpoint (folder or id); None builds the student from the teacher (``student_layers``)."""
    student_layers: int | list[int] | None = 6
    """With ``student: null``: keep this many evenly spaced teacher layers, or exactly these indices."""
    student_config: dict[str, Any] | None = None
    """With ``student: null``: build a random student from this config dict (``model_type`` required) instead."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype of both models."""
    device: str = "auto"
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA if available)."""
    trust_remote_code: bool = False
    """Allow custom modelling code from checkpoints (off unless you trust the source)."""
    chat_template: bool | None = None
    """Wrap prompts in the tokenizer's chat template: true, false, or null = if the tokenizer has one."""
    teacher_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """Parameter dtype of the teacher alone (``bfloat16`` next to a float32 student halves its memory); null: ``dtype``."""
    lora: dict[str, Any] | None = None
    """Train LoRA adapters instead of the whole student: ``{r, alpha, dropout, target_modules, merge_on_save}``
    (``rl_distill.models.lora.LoraSpec``; needs ``rl-distill[lora]``); null: full fine-tuning. With
    ``teacher: base_of_student`` the teacher is the student's base model with the adapters disabled."""
    teacher_refresh_every: int = 0
    """With ``teacher: self``: copy the student into the teacher again every N steps (0: never), >= 0."""
    cross_tokenizer: str | None = None
    """Distil from a teacher whose tokenizer differs from the student's: ``uld`` (span-aligned Universal Logit
    Distillation, ``agent.name: uld``; rl_distill.cross_tokenizer). null: the tokenizers must match."""

    def __post_init__(self) -> None:
        if self.teacher is not None and not self.teacher:
            raise ConfigError(
                "teacher: must name a model, 'self' (a frozen copy of the student) or null (none)"
            )
        if self.teacher in (None, "self") and self.student is None:
            what = "'self'" if self.teacher == "self" else "null"
            raise ConfigError(
                f"teacher: {what} needs student (a checkpoint with its tokenizer): without a teacher model the "
                "student cannot be built from its layers or its vocabulary"
            )
        if self.teacher_refresh_every < 0:
            raise ConfigError(f"teacher_refresh_every: must be >= 0, got {self.teacher_refresh_every}")
        if self.teacher_refresh_every and self.teacher != "self":
            raise ConfigError(
                "teacher_refresh_every: re-copies the student into the teacher; it needs teacher: self, "
                f"got teacher: {self.teacher!r}"
            )
        self._check_lora()
        self._check_cross_tokenizer()
        if self.student is None and self.student_config is None:
            if self.student_layers is None:
                raise ConfigError("student_layers: needed when student and student_config are null")
            if isinstance(self.student_layers, int) and self.student_layers < 1:
                raise ConfigError(f"student_layers: must be >= 1, got {self.student_layers}")
            if isinstance(self.student_layers, list) and not self.student_layers:
                raise ConfigError("student_layers: the list of layer indices is empty")
        if self.student is not None and self.student_config is not None:
            raise ConfigError(
                "student_config: give either student (a checkpoint) or student_config, not both"
            )
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith(("cuda", "mps"))):
            raise ConfigError(
                f"device: must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {self.device!r}"
            )

    def _check_cross_tokenizer(self) -> None:
        """``cross_tokenizer`` names a known method and has a teacher model and a student checkpoint."""
        if self.cross_tokenizer is None:
            return
        from rl_distill.cross_tokenizer import CROSS_TOKENIZER_METHODS

        if self.cross_tokenizer not in CROSS_TOKENIZER_METHODS:
            raise ConfigError(
                f"cross_tokenizer: must be one of {', '.join(CROSS_TOKENIZER_METHODS)} or null, "
                f"got {self.cross_tokenizer!r}"
            )
        if self.teacher in (None, "self", "base_of_student"):
            raise ConfigError(
                f"cross_tokenizer: needs a teacher model with its own tokenizer, got teacher: {self.teacher!r}"
            )
        if self.student is None:
            raise ConfigError(
                "cross_tokenizer: needs student (a checkpoint with its own tokenizer); a student built from "
                "the teacher shares its tokenizer"
            )
        if self.lora is not None:
            raise ConfigError("cross_tokenizer: is not supported together with model.lora")

    def _check_lora(self) -> None:
        """Parse ``lora`` (``self.lora_spec``) and check ``teacher: base_of_student`` (LoRA self-distillation)."""
        from rl_distill.models.lora import BASE_OF_STUDENT, lora_spec

        self.lora_spec = lora_spec(self.lora)
        if self.teacher != BASE_OF_STUDENT:
            return
        if self.lora is None:
            raise ConfigError(
                f"teacher: {BASE_OF_STUDENT!r} needs model.lora (the adapters train; the teacher is the "
                "student with them disabled)"
            )
        if self.student is None:
            raise ConfigError(
                f"student: model.teacher {BASE_OF_STUDENT!r} needs the student checkpoint whose base model is the teacher"
            )
        if self.teacher_dtype is not None:
            raise ConfigError(
                f"teacher_dtype: model.teacher {BASE_OF_STUDENT!r} shares the student's weights; leave it null"
            )


@dataclass
class DataConfig:
    """Prompt source."""

    task: str = "instructions"
    """Task name (see ``rl_distill.tasks.available_tasks()``)."""
    num_train: int = 256
    """Training prompts."""
    num_eval: int = 16
    """Held-out prompts for evaluation."""
    seed: int = 0
    """Seed of the train/eval split."""
    options: dict[str, Any] = field(default_factory=dict)
    """Task-specific options (e.g. ``path`` for ``jsonl``)."""

    def __post_init__(self) -> None:
        from rl_distill.tasks import available_tasks

        if self.task not in available_tasks():
            raise ConfigError(
                f"task: unknown task {self.task!r}; choose one of {', '.join(available_tasks())}"
            )
        for name in ("num_train", "num_eval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        self._check_options()

    def _check_options(self) -> None:
        """Every option is one the task's factory takes (its keyword arguments) and finite."""
        from rl_distill.tasks import task_options
        from rl_distill.tasks.base import SPLIT_ARGUMENTS

        allowed = task_options(self.task)
        for key, value in self.options.items():
            if key in SPLIT_ARGUMENTS:
                raise ConfigError(f"options.{key}: not a task option; set data.{key} instead")
            if allowed is not None and key not in allowed:
                accepts = f"accepts {', '.join(allowed)}" if allowed else "takes no options"
                raise ConfigError(f"options.{key}: unknown option; task {self.task!r} {accepts}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"options.{key}: must be finite, got {value}")


@dataclass
class TrainConfig:
    """The training loop."""

    steps: int = 100
    """Optimizer steps."""
    batch_size: int = 4
    """Prompts per step (per process under Accelerate)."""
    lr: float = 1e-4
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up steps (then ``lr_schedule``)."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """After warm-up: constant, or decay to 0 at ``steps`` (linear or cosine)."""
    max_grad_norm: float = 1.0
    """Gradient-norm clipping (0 disables)."""
    seed: int = 0
    """Seed for initialisation, sampling and batching (set once, at the start)."""
    eval_every: int = 0
    """Evaluate every N steps (0: only before and after training)."""
    eval_batch_size: int = 8
    """Prompts per evaluation batch."""
    eval_seed: int = 1234
    """Seed of the evaluation sampler (same stream before and after training)."""
    output_dir: str = "runs/rl_distill"
    """Folder for logs, checkpoints and the final model (``~`` is expanded; must not be an existing file)."""
    save_final: bool = True
    """Save the final student with ``save_pretrained`` (plus tokenizer) to ``output_dir/final``."""
    tensorboard: bool = True
    """Write TensorBoard event files next to ``metrics.jsonl``."""
    threads: int = 0
    """``torch.set_num_threads`` (0: leave PyTorch's default)."""
    save_every: int = 0
    """Write a resumable checkpoint to ``output_dir/checkpoints/step-N`` every N steps (0: never)."""
    keep_last: int = 2
    """Keep only the newest K checkpoints (older ones are deleted after a new one is complete)."""
    max_consecutive_skips: int = 10
    """Abort (after writing a checkpoint) when this many steps in a row had a non-finite loss or gradient."""
    overwrite: bool = False
    """A fresh run into an ``output_dir`` holding another run moves that run aside (else it is refused)."""
    allow_code_rewards: bool = False
    """Allow rewards given as ``module:function`` (they import and run that code); the CLI's ``--allow-code``."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast precision of each training step (``bf16``, ``fp16`` with a loss scaler): float32 master weights,
    float32 divergences; distinct from ``model.dtype``. A precision the device cannot run fails at start."""
    grad_accum_steps: int = 1
    """Micro-batches of each step's gradient pass (1..batch_size): the same update as the whole batch, less memory."""
    gradient_checkpointing: bool = False
    """Recompute the student's activations in its backward pass (less memory); sampling keeps the KV cache."""
    few_row_products: bool = True
    """Decode with the few-row products of ``rl_distill/rollout/skinny_head.py`` (output head at 2-8 rows,
    decoder layers at 2-4 rows; float32 on CPU only, equal to ``F.linear`` to float32 rounding). False: the
    models' own ``F.linear`` in every product (what Hugging Face ``generate`` computes)."""
    teacher_prefix_cache: bool = True
    """Reuse the teacher's KV cache of the prompt prefix every row shares (``rl_distill/rollout/prefix_cache.py``;
    equal to float32 rounding). False: every scoring forward starts from the first token."""
    sparse_embedding_grad: bool = True
    """With tied student embeddings, embed through a sparse-gradient lookup in the gradient forward (less peak
    memory in backward, the same gradient to rounding). False: the model's own dense-gradient lookup."""
    dense_head_input: bool = True
    """Hand the output head a densely strided copy of the hidden states it keeps when scoring, training and
    prefilling (``rl_distill/rollout/skinny_head.py``: on CPU ``F.linear`` on Hugging Face's ``logits_to_keep``
    slice is many times slower, above all in bfloat16). False: the model's own strided slice."""
    packed_weights: bool = True
    """Decode frozen models (teacher sampling, the environment's incremental teacher) with oneDNN-packed weights
    on CPU (``rl_distill/rollout/packed.py``: 1-16 rows, fp32 and bf16, equal to ``F.linear`` to rounding; packed
    once, costing the weights' bytes again; the trained student is never packed). False: the few-row products."""
    fused_decode_step: bool = True
    """Decode Llama-family models on CPU outside autocast with the fused one-token step of
    ``rl_distill/rollout/fused_step.py`` (fused packed q/k/v and gate/up products, float32 ones in a native kernel
    compiled on first use, a lean attention step; equal to the model's ``forward`` to rounding): the environment's
    teacher and teacher sampling (packed once), the trained student's sampling (packed anew per ``generate`` of
    16+ tokens). Needs ``packed_weights``. False: the models' ``forward``."""
    curriculum: dict[str, Any] | None = None
    """Draw batches by difficulty instead of the uniform shuffle (null): ``{mode: easy_to_hard | frontier,
    difficulty: prompt_length | reference_length | <metadata field>, ...}`` plus any
    ``rl_distill.curriculum.CurriculumConfig`` field; deterministic under ``seed``, resumed exactly."""

    def engine_options(self) -> dict[str, bool]:
        """The :class:`~rl_distill.rollout.RolloutEngine` keyword arguments of the fast-path switches."""
        return {
            "skinny_head": self.few_row_products,
            "skinny_layers": self.few_row_products,
            "teacher_prefix_cache": self.teacher_prefix_cache,
            "sparse_embedding_grad": self.sparse_embedding_grad,
            "dense_head_input": self.dense_head_input,
            "packed_weights": self.packed_weights,
            "fused_step": self.fused_decode_step,
        }

    def __post_init__(self) -> None:
        for name in (
            "steps",
            "batch_size",
            "eval_batch_size",
            "keep_last",
            "max_consecutive_skips",
            "grad_accum_steps",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "threads", "save_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay: must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm < 0:
            raise ConfigError(f"max_grad_norm: must be >= 0 (0 disables clipping), got {self.max_grad_norm}")
        if self.grad_accum_steps > self.batch_size:
            raise ConfigError(
                f"grad_accum_steps: must be <= train.batch_size ({self.batch_size}), got {self.grad_accum_steps}"
            )
        self.curriculum_config = curriculum_config(self.curriculum)
        out = Path(self.output_dir).expanduser()
        self.output_dir = str(out)
        # The first part of the path that exists must be a folder, or nothing can be written below it.
        existing = next((p for p in (out, *out.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            where = "is" if existing == out else f"is inside {str(existing)!r}, which is"
            raise ConfigError(f"output_dir: {str(out)!r} {where} an existing file, not a folder")


def curriculum_config(spec: dict[str, Any] | None) -> Any:
    """A :class:`~rl_distill.curriculum.CurriculumConfig` from ``train.curriculum`` (None when off).

    Whether ``difficulty`` exists in the task's examples is checked when the run is built.

    Raises:
        ConfigError: ``curriculum.<key>: ...`` for an unknown key, a wrong type or a value out of range.
    """
    from rl_distill.curriculum import CurriculumConfig

    return None if spec is None else build_dataclass(CurriculumConfig, spec, "curriculum")


#: The reward evaluation uses for a task when ``eval.reward`` is ``auto`` and the agent has none.
TASK_EVAL_REWARDS: dict[str, str] = {"arithmetic": "exact_match", "factual_summary": "factual_consistency"}


@dataclass
class EvalConfig:
    """Held-out evaluation (its schedule, batch size and seed are ``train.eval_*``)."""

    sampled: bool = True
    """Evaluate on completions sampled at the agent's temperature (keys ``eval/...``)."""
    greedy: bool = False
    """Also evaluate on greedy completions (temperature 0; keys ``eval/greedy/...``)."""
    num_samples: int = 8
    """Completions written to ``output_dir/samples.jsonl`` per evaluation and decoding (0: none)."""
    max_new_tokens: int | None = None
    """Completion budget at evaluation; None: the agent's ``max_new_tokens``."""
    reward: str | dict[str, Any] | None = "auto"
    """Reward averaged into ``eval/<name>`` (``exact_match`` = verifier accuracy): a name, ``module:function``,
    a spec dict (see ``rl_distill.rewards.registry``), null for none, or ``auto``: the agent's reward if it
    has one, else the task's (``arithmetic``: exact_match, ``factual_summary``: factual_consistency)."""

    def __post_init__(self) -> None:
        if not (self.sampled or self.greedy):
            raise ConfigError("sampled: at least one of sampled and greedy must be true")
        if self.num_samples < 0:
            raise ConfigError(f"num_samples: must be >= 0, got {self.num_samples}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens: must be >= 1 or null, got {self.max_new_tokens}")
        check_reward_spec(self.reward, "reward", allow_auto=True)


def check_reward_spec(spec: Any, field_name: str, *, allow_auto: bool = False) -> None:
    """Validate a reward spec's shape and built-in name at load time (nothing is constructed).

    Raises:
        ConfigError: naming ``field_name`` and the accepted values.
    """
    from rl_distill.rewards.registry import available_rewards

    allowed = ", ".join([*(["auto"] if allow_auto else []), *available_rewards()])
    if spec is None or (allow_auto and spec == "auto"):
        return
    if isinstance(spec, dict):
        if "weighted_sum" not in spec and "name" not in spec:
            raise ConfigError(
                f"{field_name}: a reward spec dict needs 'name' or 'weighted_sum', got {sorted(spec)}"
            )
        if "name" in spec:
            check_reward_spec(spec["name"], field_name)
        return
    if not isinstance(spec, str) or not spec:
        raise ConfigError(
            f"{field_name}: expected a reward name, 'module:function' or a spec dict, got {spec!r}"
        )
    if ":" not in spec and spec not in available_rewards():
        raise ConfigError(
            f"{field_name}: unknown reward {spec!r}; choose one of {allowed}, null, or 'module:function'"
        )


def code_rewards(spec: Any, field_name: str) -> list[tuple[str, str]]:
    """The ``module:function`` rewards inside a reward spec, as ``(field, path)`` pairs.

    Looks into spec dicts (``name``) and ``weighted_sum`` lists, e.g.
    ``("agent.reward.weighted_sum[1].name", "my_pkg.rewards:score")``.
    """
    if isinstance(spec, str):
        return [(field_name, spec)] if ":" in spec else []
    if not isinstance(spec, dict):
        return []
    found = code_rewards(spec.get("name"), f"{field_name}.name")
    terms = spec.get("weighted_sum")
    for i, term in enumerate(terms if isinstance(terms, list) else []):
        found += code_rewards(term, f"{field_name}.weighted_sum[{i}]")
    return found


def check_code_allowed(config: Config) -> None:
    """Refuse ``module:function`` rewards unless the run opted in (``train.allow_code_rewards``).

    Raises:
        ConfigError: naming the field that holds the import path and how to opt in.
    """
    if config.train.allow_code_rewards:
        return
    found = code_rewards(config.agent.reward, "agent.reward")
    found += code_rewards(config.eval.reward, "eval.reward")
    if found:
        where, path = found[0]
        raise ConfigError(
            f"{where}: {path!r} would import and run user code; allow it with --allow-code "
            "or train.allow_code_rewards: true in the config"
        )


@dataclass
class Config:
    """A whole run: model, data, agent, training loop and evaluation."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Teacher and student."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompts."""
    agent: Any = None
    """The agent's config dataclass (chosen by ``agent.name``; default on-policy GKD)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Loop settings."""
    agent_name: str = "gkd"
    """Registry name of the agent (from ``agent.name`` in YAML)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation options."""

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (what ``load_config`` accepts back)."""
        agent = dataclasses.asdict(self.agent) if self.agent is not None else {}
        return {
            "model": dataclasses.asdict(self.model),
            "data": dataclasses.asdict(self.data),
            "agent": {"name": self.agent_name, **agent},
            "train": dataclasses.asdict(self.train),
            "eval": dataclasses.asdict(self.eval),
        }


# ---------------------------------------------------------------------------------------------
# Building dataclasses from dicts, with type checks and field-named errors.
# ---------------------------------------------------------------------------------------------
def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(tp))
    if origin is Literal:
        return value in typing.get_args(tp)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        return isinstance(value, list) and all(_type_ok(v, arg) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _describe_type(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def build_dataclass(cls: type, values: dict[str, Any] | None, section: str) -> Any:
    """Instantiate dataclass ``cls`` from ``values``, naming ``section.field`` in every error.

    Raises:
        ConfigError: unknown field, wrong type, or a range check failing in ``__post_init__``.
    """
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"{section}.{unknown[0]}: unknown field; {section} accepts {', '.join(sorted(known))}"
        )
    for name, value in values.items():
        tp = hints[name]
        accepts = typing.get_args(tp) or (tp,)
        if isinstance(value, int) and not isinstance(value, bool) and float in accepts and int not in accepts:
            values[name] = value = float(value)  # YAML reads "1" as int; the field is a float
        if not _type_ok(value, tp):
            raise ConfigError(f"{section}.{name}: expected {_describe_type(tp)}, got {value!r}")
        # A float value (or list of them) passed the type check, so the field accepts floats.
        if any(
            isinstance(v, float) and not math.isfinite(v)
            for v in (value if isinstance(value, list) else [value])
        ):
            raise ConfigError(f"{section}.{name}: must be finite, got {value}")
    try:
        return cls(**values)
    except ConfigError as err:
        raise ConfigError(f"{section}.{err}") from None
    except ValueError as err:
        msg = str(err)
        # "beta must be ...", "alpha: value ..." and "reject.loop_repeats: ..." all start with a field.
        name = re.split(r"[ .:]", msg, maxsplit=1)[0]
        raise ConfigError(f"{section}.{msg}" if name in known else f"{section}: {msg}") from None


SECTIONS = ("model", "data", "agent", "train", "eval")


def config_from_dict(raw: dict[str, Any], *, allow_code: bool = True) -> Config:
    """Validate a nested dict into a :class:`Config`.

    Args:
        raw: sections ``model``, ``data``, ``agent``, ``train``, ``eval`` (any may be missing).
        allow_code: accept ``module:function`` rewards without ``train.allow_code_rewards`` (a dict
            built in Python is trusted like the code that built it; :func:`load_config` passes False).
    """
    from rl_distill.agents import AGENTS

    if not isinstance(raw, dict):
        raise ConfigError(
            f"a config must be a mapping with sections {'/'.join(SECTIONS)}, got {type(raw).__name__}"
        )
    unknown = sorted(set(raw) - set(SECTIONS), key=str)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section; expected {', '.join(SECTIONS)}")
    for section in SECTIONS:
        if raw.get(section) is not None and not isinstance(raw[section], dict):
            raise ConfigError(f"{section}: must be a mapping, got {raw[section]!r}")
    agent_raw = dict(raw.get("agent") or {})
    agent_name = agent_raw.pop("name", "gkd")
    if agent_name not in AGENTS:
        raise ConfigError(
            f"agent.name: unknown agent {agent_name!r}; choose one of {', '.join(sorted(AGENTS))}"
        )
    _, agent_cls = AGENTS[agent_name]
    agent = build_dataclass(agent_cls, agent_raw, "agent")
    if isinstance(agent.reward, str | dict):
        check_reward_spec(agent.reward, "agent.reward")
    config = Config(
        model=build_dataclass(ModelConfig, raw.get("model"), "model"),
        data=build_dataclass(DataConfig, raw.get("data"), "data"),
        agent=agent,
        train=build_dataclass(TrainConfig, raw.get("train"), "train"),
        agent_name=agent_name,
        eval=build_dataclass(EvalConfig, raw.get("eval"), "eval"),
    )
    check_teacher_needed(config)
    check_cross_tokenizer(config)
    if not allow_code:
        check_code_allowed(config)
    return config


def check_cross_tokenizer(config: Config) -> None:
    """``model.cross_tokenizer`` and ``agent.name: uld`` go together.

    Raises:
        ConfigError: naming ``model.cross_tokenizer`` or ``agent.name``.
    """
    method, name = config.model.cross_tokenizer, config.agent_name
    if method is not None and name != method:
        raise ConfigError(
            f"model.cross_tokenizer: {method!r} trains with agent.name: {method}, got agent.name: {name!r} "
            "(the other agents compare token ids, which differ between the tokenizers)"
        )
    if method is None and name == "uld":
        raise ConfigError(
            "agent.name: 'uld' distils from a teacher with another tokenizer: set model.cross_tokenizer: uld"
        )


def check_teacher_needed(config: Config) -> None:
    """An agent that scores with a teacher needs one; a teacher template needs a teacher to read it.

    Raises:
        ConfigError: naming ``model.teacher`` or ``agent.teacher_template``.
    """
    agent, name = config.agent, config.agent_name
    needs = agent.needs_teacher
    if config.model.teacher is None and needs:
        raise ConfigError(
            f"model.teacher: null (no teacher), but agent {name!r} with these settings scores with a teacher "
            "(its divergence or rewards); name a teacher, use teacher: self, or an agent without one (spin, grpo)"
        )
    template = getattr(agent, "teacher_template", None)
    if template and (config.model.teacher is None or not needs):
        why = (
            "there is no teacher (model.teacher: null)"
            if config.model.teacher is None
            else f"agent {name!r} with these settings never scores with the teacher"
        )
        raise ConfigError(f"agent.teacher_template: {why} to read it")
    cache = getattr(agent, "teacher_cache", None)  # rl_distill.teacher_cache: matched to model.teacher
    if cache is not None and config.model.teacher in (None, "self", "base_of_student"):
        raise ConfigError(
            f"agent.teacher_cache: model.teacher must name the teacher checkpoint the cache was built from, "
            f"got {config.model.teacher!r}"
        )
    if cache is not None and getattr(config.model, "cross_tokenizer", None) is not None:
        raise ConfigError(
            "agent.teacher_cache: the cache holds top-k ids of the student's own tokenizer; it cannot be used "
            "with model.cross_tokenizer"
        )


def _takes_mapping(section: str, name: str, raw: dict[str, Any]) -> bool:
    """Whether field ``section.name`` can hold a mapping (True when unknown: validation names it later)."""
    from rl_distill.agents import AGENTS

    classes = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig}
    if section == "agent":
        agent_raw = raw.get("agent")
        agent_name = agent_raw.get("name", "gkd") if isinstance(agent_raw, dict) else "gkd"
        classes["agent"] = AGENTS[agent_name][1] if agent_name in AGENTS else None
    cls = classes.get(section)
    tp = typing.get_type_hints(cls).get(name) if cls is not None else None
    return tp is None or _type_ok({}, tp)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.field=value`` strings (values parsed as YAML: ``0.5``, ``true``, ``[1, 2]``).

    Longer paths set a key inside a mapping field: ``data.options.path=prompts.jsonl``.

    Raises:
        ConfigError: naming the override: no ``=``, invalid YAML, or a path through a non-mapping.
    """
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise ConfigError(f"override {item!r}: expected section.field=value, e.g. agent.beta=0.5")
        try:
            value = load_yaml(text) if text.strip() else None
        except DuplicateKeyError as err:
            raise ConfigError(f"override {item!r}: {err}") from None
        except yaml.YAMLError as err:
            raise ConfigError(
                f"override {item!r}: the value is not valid YAML: {yaml_problem(err)}"
            ) from None
        node = raw
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            where = ".".join(parts[: depth + 1])
            if child is None and (depth != 1 or _takes_mapping(parts[0], part, raw)):
                child = node[part] = {}
            if not isinstance(child, dict):
                what = "not a mapping field" if child is None else f"{child!r}, not a mapping"
                raise ConfigError(
                    f"override {item!r}: {where} is {what}, so it has no {parts[depth + 1]!r} inside"
                )
            node = child
        node[parts[-1]] = value
    return raw


class DuplicateKeyError(yaml.YAMLError):
    """A YAML mapping gives the same key twice (PyYAML would silently keep the last value)."""


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key repeated in one mapping, at any depth."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        """``SafeLoader.construct_mapping``, after checking that no key is given twice."""
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base`: keys written next to it replace the merged ones on purpose
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = lines.get(key)
            except TypeError:  # an unhashable key: SafeLoader reports it below
                continue
            if first is not None:
                where = f"lines {first} and {line}" if first != line else f"line {line}, twice"
                raise DuplicateKeyError(f"duplicate key {key!r} on {where}")
            lines[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """Parse YAML text safely, refusing duplicated keys (:class:`DuplicateKeyError`)."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error on one line: the problem and where it is."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or getattr(err, "context", None)
    if problem and mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(err).split())


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The raw sections of a YAML config file (not yet validated).

    Raises:
        FileNotFoundError: the file does not exist.
        ConfigError: naming the file: unreadable, not UTF-8, invalid YAML, a duplicated key, or a
            top level that is not a mapping.
    """
    p, name = Path(path), str(path)
    if p.is_dir():
        raise ConfigError(f"config file {name!r} is a folder, not a YAML file")
    if not p.is_file():
        raise FileNotFoundError(f"config file {name!r} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = err.object[: err.start].count(b"\n") + 1
        bad = err.object[err.start]
        raise ConfigError(
            f"config file {name!r} is not UTF-8 text (byte 0x{bad:02x} on line {line})"
        ) from None
    except OSError as err:
        raise ConfigError(f"config file {name!r} cannot be read: {err.strerror or err}") from None
    try:
        raw = load_yaml(text)
    except DuplicateKeyError as err:
        raise ConfigError(f"config file {name!r}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {name!r} is not valid YAML: {yaml_problem(err)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"config file {name!r}: the top level must be a mapping of sections ({', '.join(SECTIONS)}), "
            f"got a {type(raw).__name__}"
        )
    return raw


def load_config(
    path: str | Path | None, overrides: list[str] | None = None, *, allow_code: bool = False
) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply overrides.

    Args:
        path: the YAML file, or None for the defaults.
        overrides: ``section.field=value`` strings, applied in order.
        allow_code: accept ``module:function`` rewards even without ``train.allow_code_rewards``.

    Raises:
        FileNotFoundError: the file does not exist.
        ConfigError: invalid YAML or invalid values (the message names the file, field or override).
    """
    raw = read_config_file(path) if path is not None else {}
    return config_from_dict(apply_overrides(raw, overrides or []), allow_code=allow_code)
