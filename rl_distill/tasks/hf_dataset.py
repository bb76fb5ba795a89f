"""``hf_dataset``: prompts from any ``datasets.load_dataset`` source, offline.

``path`` is a local ``.jsonl``/``.json``/``.parquet``/``.csv`` file (or a folder of them), a folder
written by ``Dataset.save_to_disk``, or a hub id already in the local ``datasets`` cache: nothing is downloaded at run time (the hub is put in offline
mode for the call). Needs the optional extra ``pip install 'rl-distill[data]'`` (``datasets``).

Three row formats (``format``; ``auto`` picks by the columns present):

- ``columns``: a prompt column (``prompt_column``), an optional reference column
  (``reference_column``) and metadata columns (``metadata_columns``; default: every other column),
  passed to rewards as keyword lists;
- ``messages`` (TRL's conversational format): a list of ``{role, content}`` turns. The last turn
  must be the assistant's: it is the reference; every turn before it is the prompt;
- ``prompt_completion`` (TRL's): ``prompt`` and ``completion`` columns, each a string or a list of
  turns (the completion's assistant turn is the reference).

Chat templates: with ``chat_template`` (a model name or folder, e.g. the teacher's) the task renders
*every* prompt through that template with the generation prompt (a plain string as one user turn),
so the prompts of one data set are all formatted alike; they are then already templated, and the
run must set ``model.chat_template: false`` (:func:`check_rendered_prompts` refuses it otherwise).
Without it, prompts stay plain text and the rollout engine applies the chat template as for every
task; a conversational prompt must then be a single user turn (its text), and a longer one (a system
turn, several turns) is an error that says to set ``chat_template``.

``max_prompt_tokens`` (needs ``chat_template`` or ``tokenizer`` to count): prompts longer than it are
skipped and counted (``too_long: skip``, a warning gives the count) or fail the load
(``too_long: fail``). The run still checks every prompt against the context length before any work.

Errors name the source: missing columns (listing the ones found), empty prompts, conversational rows
without a final assistant turn, each with its row numbers.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from rl_distill.tasks.base import Example, TaskData, register_task, split_disjoint

#: Local file suffixes and the ``datasets`` builder that reads them.
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
#: Metadata key marking a prompt already rendered through a chat template.
RENDERED = "chat_rendered"
_MAX_REPORTED = 10


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Hub access off (datasets and huggingface_hub read these flags at call time), no progress bars."""
    import datasets
    import huggingface_hub.constants as hub

    old = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
    bars = not datasets.utils.are_progress_bars_disabled()
    datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    datasets.disable_progress_bars()  # a prompt file is not a download worth a progress bar
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = old
        if bars:
            datasets.enable_progress_bars()


def load_rows(
    path: str, *, name: str | None = None, split: str = "train", cache_dir: str | None = None
) -> list[dict[str, Any]]:
    """The rows of a local file/folder or a cached hub data set, as dicts.

    Raises:
        ImportError: ``datasets`` is not installed.
        FileNotFoundError: a local path that does not exist, or a hub id that is not cached.
        ValueError: an unreadable file or an unknown split.
    """
    try:
        import datasets
    except ImportError:
        raise ImportError(
            "the hf_dataset task needs the datasets package: pip install 'rl-distill[data]'"
        ) from None
    local = Path(path).expanduser()
    looks_local = path.startswith(("/", "./", "../", "~")) or local.suffix in BUILDERS or local.exists()
    if looks_local and not local.exists():
        raise FileNotFoundError(f"hf_dataset: no such file or folder {path!r}")
    if looks_local and local.is_file() and local.suffix not in BUILDERS:
        raise ValueError(f"hf_dataset: {path!r}: unsupported file type; use one of {', '.join(BUILDERS)}")
    if (
        looks_local
        and local.is_dir()
        and ((local / "state.json").is_file() or (local / "dataset_dict.json").is_file())
    ):
        return _rows_from_disk(datasets, local, split)  # a folder written by Dataset.save_to_disk
    if looks_local and local.is_file():
        args: tuple[str, ...] = (BUILDERS[local.suffix],)
        kwargs: dict[str, Any] = {"data_files": str(local)}
    else:
        args, kwargs = (str(local) if looks_local else path,), {"name": name}
    try:
        with _offline(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = datasets.load_dataset(*args, split=split, cache_dir=cache_dir, **kwargs)
    except (ConnectionError, FileNotFoundError, OSError) as err:
        if looks_local:
            raise ValueError(
                f"hf_dataset: cannot read {path!r}: {' '.join(str(err).split())[:300]}"
            ) from None
        raise FileNotFoundError(
            f"hf_dataset: {path!r} is neither a local file nor a data set in the Hugging Face cache "
            "(nothing is downloaded at run time; download it beforehand or give a local file)"
        ) from None
    except ValueError as err:  # unknown split, bad config name, unparsable file
        raise ValueError(
            f"hf_dataset: cannot load {path!r} (split {split!r}): {' '.join(str(err).split())[:300]}"
        ) from None
    except Exception as err:  # noqa: BLE001 - datasets raises its own DatasetGenerationError on bad files
        raise ValueError(
            f"hf_dataset: cannot read {path!r}: {type(err).__name__}: {' '.join(str(err).split())[:300]}"
        ) from None
    return [dict(row) for row in data]


def _rows_from_disk(datasets: Any, folder: Path, split: str) -> list[dict[str, Any]]:
    """Rows of a ``save_to_disk`` folder (a ``Dataset``, or a ``DatasetDict`` and its ``split``)."""
    data = datasets.load_from_disk(str(folder))
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ValueError(f"hf_dataset: {str(folder)!r} has splits {sorted(data)}, not {split!r}")
        data = data[split]
    return [dict(row) for row in data]


def _text_of(turn: Any) -> str | None:
    content = turn.get("content") if isinstance(turn, dict) else None
    return content if isinstance(content, str) else None


def _check_turns(value: Any, column: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"'{column}' must be a non-empty list of {{role, content}} turns")
    for turn in value:
        if not isinstance(turn, dict) or "role" not in turn or _text_of(turn) is None:
            raise ValueError(f"'{column}' has a turn without a string 'role' and 'content': {turn!r}"[:200])
    return value


class PromptRenderer:
    """Turns a prompt (a string or a list of turns) into the prompt string, and counts tokens.

    Args:
        tokenizer: the tokenizer whose chat template renders every prompt (None: prompts stay plain
            text and only single-user-turn conversations are accepted); it also counts tokens.
    """

    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer

    def prompt(self, turns: str | list[dict[str, Any]]) -> tuple[str, bool]:
        """``(text, rendered)``: through the template when there is one, else the single user turn's text."""
        if isinstance(turns, str):
            turns = [{"role": "user", "content": turns}]
        if self.tokenizer is None:
            if len(turns) == 1 and turns[0]["role"] == "user":
                return turns[0]["content"], False
            roles = [t["role"] for t in turns]
            raise ValueError(
                f"a prompt of turns {roles} needs a chat template: set data.options.chat_template to the "
                "model whose template renders it (e.g. the teacher) and model.chat_template: false"
            )
        text = self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        return text, True

    def count(self, prompt: str, rendered: bool) -> int:
        """Tokens of a prompt as the engine will encode it (through the template when not rendered)."""
        tok = self.tokenizer
        if rendered or getattr(tok, "chat_template", None) is None:
            return len(tok(prompt, add_special_tokens=True)["input_ids"])
        ids = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        return len(ids if isinstance(ids, list) else ids["input_ids"])


def _detect_format(columns: Sequence[str], prompt_column: str) -> str:
    if "messages" in columns:
        return "messages"
    if "prompt" in columns and "completion" in columns:
        return "prompt_completion"
    return "columns"


def rows_to_examples(
    rows: Sequence[dict[str, Any]],
    *,
    source: str,
    format: str = "auto",
    prompt_column: str = "prompt",
    reference_column: str | None = None,
    metadata_columns: Sequence[str] | None = None,
    renderer: PromptRenderer | None = None,
) -> list[Example]:
    """Validate rows and build examples (module docstring); every bad row is reported.

    Raises:
        ValueError: missing columns (the found ones listed), empty prompts, conversational rows
            whose last turn is not the assistant's, each with its row number.
    """
    renderer = renderer or PromptRenderer(None)
    if not rows:
        raise ValueError(f"hf_dataset: {source!r} has no rows")
    found = list(rows[0])
    fmt = _detect_format(found, prompt_column) if format == "auto" else format
    needed = {"messages": ["messages"], "prompt_completion": ["prompt", "completion"]}.get(
        fmt, [prompt_column] + ([reference_column] if reference_column else [])
    )
    needed += list(metadata_columns or [])
    missing = [c for c in needed if c not in found]
    if missing:
        raise ValueError(
            f"hf_dataset: {source!r} has no column(s) {missing} (format {fmt!r}); its columns: {', '.join(found)}"
        )
    used = set(needed) | ({"reference"} if fmt == "columns" and reference_column is None else set())
    meta_cols = (
        list(metadata_columns) if metadata_columns is not None else [c for c in found if c not in used]
    )
    examples, errors = [], []
    for i, row in enumerate(rows):
        try:
            prompt, reference, rendered = _parse_row(row, fmt, prompt_column, reference_column, renderer)
        except ValueError as err:
            errors.append(f"row {i}: {err}")
            continue
        metadata = {c: row[c] for c in meta_cols}
        if rendered:
            metadata[RENDERED] = True
        examples.append(Example(prompt=prompt, reference=reference, metadata=metadata))
    if errors:
        shown = "\n  ".join(errors[:_MAX_REPORTED])
        more = f"\n  ... and {len(errors) - _MAX_REPORTED} more" if len(errors) > _MAX_REPORTED else ""
        raise ValueError(f"hf_dataset: {len(errors)} bad row(s) in {source!r}:\n  {shown}{more}")
    return examples


def _parse_row(
    row: dict[str, Any], fmt: str, prompt_column: str, reference_column: str | None, renderer: PromptRenderer
) -> tuple[str, str | None, bool]:
    """``(prompt, reference, rendered)`` of one row; ``ValueError`` without the row number."""
    if fmt == "messages":
        turns = _check_turns(row["messages"], "messages")
        if turns[-1]["role"] != "assistant":
            what = (
                "no assistant turn"
                if all(t["role"] != "assistant" for t in turns)
                else "a last turn that is not the assistant's"
            )
            raise ValueError(
                f"'messages' has {what} (roles {[t['role'] for t in turns]}); the last turn must be the assistant's reply"
            )
        if len(turns) < 2:
            raise ValueError("'messages' has only the assistant turn, no prompt")
        prompt, rendered = renderer.prompt(turns[:-1])
        reference = turns[-1]["content"]
    elif fmt == "prompt_completion":
        raw_prompt, completion = row["prompt"], row["completion"]
        if isinstance(raw_prompt, list):
            prompt, rendered = renderer.prompt(_check_turns(raw_prompt, "prompt"))
        elif isinstance(raw_prompt, str):
            prompt, rendered = renderer.prompt(raw_prompt) if raw_prompt.strip() else (raw_prompt, False)
        else:
            raise ValueError(f"'prompt' must be a string or a list of turns, got {type(raw_prompt).__name__}")
        if isinstance(completion, list):
            turns = _check_turns(completion, "completion")
            if turns[-1]["role"] != "assistant":
                raise ValueError(
                    f"'completion' must end with an assistant turn, got roles {[t['role'] for t in turns]}"
                )
            reference = turns[-1]["content"]
        elif isinstance(completion, str) or completion is None:
            reference = completion
        else:
            raise ValueError(
                f"'completion' must be a string or a list of turns, got {type(completion).__name__}"
            )
    else:
        prompt, rendered = row[prompt_column], False
        if prompt is not None and not isinstance(prompt, str):
            raise ValueError(f"'{prompt_column}' must be a string, got {type(prompt).__name__}")
        if prompt and prompt.strip():
            prompt, rendered = renderer.prompt(prompt)
        column = reference_column or ("reference" if "reference" in row else None)
        reference = row[column] if column else None
        if reference is not None and not isinstance(reference, str):
            raise ValueError(f"'{column}' must be a string or null, got {type(reference).__name__}")
    if prompt is None or not prompt.strip():
        raise ValueError("empty prompt")
    return prompt, reference, rendered


def check_rendered_prompts(task: TaskData, use_chat_template: bool) -> None:
    """Refuse prompts rendered through a chat template when the engine would template them again.

    Raises:
        ValueError: naming ``model.chat_template``.
    """
    if use_chat_template and any(ex.metadata.get(RENDERED) for ex in [*task.train, *task.eval]):
        raise ValueError(
            "model.chat_template: the hf_dataset prompts were rendered through a chat template "
            "(data.options.chat_template); set model.chat_template: false so they are not wrapped twice"
        )


@register_task("hf_dataset")
def make_hf_dataset(
    *,
    path: str | None = None,
    name: str | None = None,
    split: str = "train",
    format: Literal["auto", "columns", "messages", "prompt_completion"] = "auto",
    prompt_column: str = "prompt",
    reference_column: str | None = None,
    metadata_columns: list[str] | None = None,
    chat_template: str | None = None,
    tokenizer: str | None = None,
    max_prompt_tokens: int | None = None,
    too_long: Literal["skip", "fail"] = "skip",
    cache_dir: str | None = None,
    seed: int = 0,
    num_train: int = 256,
    num_eval: int = 32,
) -> TaskData:
    """Deterministic disjoint train/eval split of a ``datasets`` source (module docstring).

    Args:
        path: local file or folder, or a cached hub id.
        name: the hub data set's configuration name.
        split: split (slicing allowed: ``train[:1000]``); local files have ``train``.
        format: ``auto``, ``columns``, ``messages`` or ``prompt_completion``.
        prompt_column: the prompt column (format ``columns``).
        reference_column: the reference column (``columns``; default ``reference`` when present).
        metadata_columns: columns kept as metadata (default: every column not used otherwise).
        chat_template: model name or folder whose chat template renders every prompt (then set
            ``model.chat_template: false``); None: plain prompts, templated by the engine.
        tokenizer: model name or folder that counts prompt tokens (default: ``chat_template``'s).
        max_prompt_tokens: longest allowed prompt in tokens (None: no limit here).
        too_long: ``skip`` (and count) or ``fail`` on prompts over ``max_prompt_tokens``.
        cache_dir: the ``datasets`` cache folder (default: its own).
        seed: seed of the shuffle before the split.
        num_train: training examples.
        num_eval: held-out examples.

    Raises:
        ValueError: a bad option, source, row, or too few distinct prompts.
    """
    if path is None:
        raise ValueError("options.path: the hf_dataset task needs a local file/folder or a cached hub id")
    if format not in ("auto", "columns", "messages", "prompt_completion"):
        raise ValueError(
            f"options.format: must be auto, columns, messages or prompt_completion, got {format!r}"
        )
    if too_long not in ("skip", "fail"):
        raise ValueError(f"options.too_long: must be 'skip' or 'fail', got {too_long!r}")
    if max_prompt_tokens is not None and max_prompt_tokens < 1:
        raise ValueError(f"options.max_prompt_tokens: must be >= 1, got {max_prompt_tokens}")
    counter_name = tokenizer or chat_template
    if max_prompt_tokens is not None and counter_name is None:
        raise ValueError(
            "options.max_prompt_tokens: needs options.tokenizer (or chat_template) to count tokens"
        )
    from rl_distill.models.loading import load_tokenizer

    template_tok = load_tokenizer(chat_template) if chat_template else None
    if template_tok is not None and getattr(template_tok, "chat_template", None) is None:
        raise ValueError(f"options.chat_template: the tokenizer of {chat_template!r} has no chat template")
    count_tok = (
        load_tokenizer(counter_name) if counter_name and counter_name != chat_template else template_tok
    )
    rows = load_rows(path, name=name, split=split, cache_dir=cache_dir)
    examples = rows_to_examples(
        rows,
        source=path,
        format=format,
        prompt_column=prompt_column,
        reference_column=reference_column,
        metadata_columns=metadata_columns,
        renderer=PromptRenderer(template_tok),
    )
    if max_prompt_tokens is not None:
        counter = PromptRenderer(count_tok)
        lengths = [counter.count(ex.prompt, bool(ex.metadata.get(RENDERED))) for ex in examples]
        over = [i for i, n in enumerate(lengths) if n > max_prompt_tokens]
        if over and too_long == "fail":
            listed = ", ".join(f"row {i} ({lengths[i]} tokens)" for i in over[:_MAX_REPORTED])
            raise ValueError(
                f"hf_dataset: {len(over)} prompt(s) of {path!r} exceed max_prompt_tokens={max_prompt_tokens}: "
                f"{listed}; set data.options.too_long: skip to drop them"
            )
        if over:
            warnings.warn(
                f"hf_dataset: skipped {len(over)} of {len(examples)} prompt(s) of {path!r} longer than "
                f"max_prompt_tokens={max_prompt_tokens}",
                stacklevel=2,
            )
            dropped = set(over)
            examples = [ex for i, ex in enumerate(examples) if i not in dropped]
    distinct = len({ex.prompt for ex in examples})
    if distinct < len(examples):
        warnings.warn(
            f"hf_dataset: {len(examples) - distinct} repeated prompt(s) of {path!r} dropped", stacklevel=2
        )
    return split_disjoint(examples, num_train, num_eval, seed, "hf_dataset")
