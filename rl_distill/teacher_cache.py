"""An offline cache of the teacher's top-k log-probs on the dataset references (supervised KD without a teacher).

For off-policy data (GKD with ``lmbda = 0``: supervised KD on the references) the teacher's outputs
depend only on the dataset, so they can be computed once: ``rl-distill cache-teacher CONFIG`` runs the
teacher over ``data``'s training references and stores, for every completion token, the teacher's
``k`` largest log-probs and their ids (:meth:`~rl_distill.rollout.RolloutEngine.score` with
``teacher_output="topk"``, at the agent's teacher temperature). Training with ``agent.teacher_cache:
DIR`` then reads them instead of loading the teacher, and the divergence is the top-k one
(:func:`~rl_distill.divergences.topk_divergence`).

Layout of a cache folder::

    manifest.json                 # identity and settings; "complete": true once every shard is written
    shard-00000.safetensors       # examples [0, shard_size), one file per shard_size examples
    shard-00001.safetensors
    .tmp-shard-00002...           # a shard being written (or killed): never read, removed on resume

A shard holds, over its examples' completion tokens concatenated (``N`` tokens): ``offsets``
``(n + 1,)`` int64 (example ``i``'s tokens are ``offsets[i]:offsets[i + 1]``), ``completion_ids``
``(N,)`` int32 (the reference tokens, EOS appended, as training builds them), ``token_logprobs``
``(N,)`` float32 (the teacher's log-prob of each of those tokens), ``topk_ids`` ``(N, k)`` int32 and
``topk_logprobs`` ``(N, k)`` float32 or bfloat16. Its safetensors metadata lists its examples' keys
(:func:`example_key`: a hash of prompt and reference), so a shard describes itself.

Writes are atomic (temporary file, fsync, rename, fsync of the folder; :mod:`rl_distill.checkpoint`).
The build is resumable: a complete shard that matches the examples it should hold is kept, anything
else (a truncated file, a shard of other examples, a leftover temporary) is redone, and the manifest
is marked complete last.

Identity (:func:`cache_identity`): the teacher (its path as configured, a SHA-256 of its
``config.json`` and of every weights file), the tokenizer (a SHA-256 of its vocabulary, special ids and
chat template), the scoring settings (``k``, log-prob dtype, teacher temperature and dtype, teacher
template, whether prompts use the chat template) and the data section. A cache is refused, naming
both sides, when any of them differs from the run that reads it (or resumes building it). A teacher
checkpoint moved to another path but with the same files is the same teacher.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from rl_distill.checkpoint import atomic_write_text, fsync_dir
from rl_distill.rollout import Rollout, RolloutEngine
from rl_distill.tasks import Example

MANIFEST = "manifest.json"
#: Version of the folder layout; a cache of another version is refused.
CACHE_FORMAT = 1
#: ``--dtype`` choices for the stored top-k log-probs.
LOGPROB_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: Teachers that are not a checkpoint on disk, so a cache cannot be matched to them.
_NOT_CACHEABLE = (None, "self", "base_of_student")
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.index.json", "*.h5", "*.msgpack", "*.gguf")


class TeacherCacheError(ValueError):
    """A teacher cache that cannot be used: incomplete, damaged, or built for another teacher/setting."""


# ---------------------------------------------------------------------------------------------
# Identity
# ---------------------------------------------------------------------------------------------
def _sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def teacher_folder(name_or_path: str) -> Path:
    """The local checkpoint folder of a teacher name (built-in name, folder, or hub id in the local HF cache).

    Raises:
        TeacherCacheError: the teacher has no local folder to fingerprint.
    """
    from rl_distill.models.loading import resolve_model_path

    path = Path(resolve_model_path(name_or_path))
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, local_files_only=True))
    except Exception as err:  # noqa: BLE001 - any failure means: not available locally
        raise TeacherCacheError(
            f"model.teacher {name_or_path!r}: no local checkpoint folder to fingerprint ({type(err).__name__})"
        ) from None


def teacher_identity(name_or_path: str) -> dict[str, str]:
    """``{"name", "path", "config_sha256", "weights_sha256"}`` of a teacher checkpoint (reads every weights file).

    ``weights_sha256`` hashes each weights file's name and content, in name order.
    """
    folder = teacher_folder(name_or_path)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    weights = hashlib.sha256()
    files = sorted({p for pattern in _WEIGHT_PATTERNS for p in folder.glob(pattern)})
    for file in files:
        weights.update(f"{file.name}:{_sha256_file(file)}\n".encode())
    return {
        "name": name_or_path,
        "path": str(folder.resolve()),
        "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
        "weights_sha256": weights.hexdigest(),
    }


def tokenizer_identity(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """``{"name", "size", "sha256"}``: a hash of the token-to-id map, EOS/BOS ids and chat template."""
    content = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "eos": tokenizer.eos_token_id,
        "bos": tokenizer.bos_token_id,
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    digest = hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()
    return {"name": str(getattr(tokenizer, "name_or_path", "?")), "size": len(tokenizer), "sha256": digest}


def example_key(example: Example) -> str:
    """The cache key of an example: a hash of its prompt and reference (32 hex digits)."""
    return hashlib.sha256(json.dumps([example.prompt, example.reference]).encode()).hexdigest()[:32]


def scoring_settings(config: Any, use_chat_template: bool, logprob_dtype: str) -> dict[str, Any]:
    """What the cached numbers depend on besides teacher, tokenizer and data (all compared on use)."""
    agent, model = config.agent, config.model
    return {
        "k": agent.teacher_topk,
        "logprob_dtype": logprob_dtype,
        "teacher_temperature": agent.teacher_temp,
        "teacher_template": getattr(agent, "teacher_template", None),
        "chat_template": use_chat_template,
        "teacher_dtype": model.teacher_dtype or model.dtype,
    }


def data_settings(config: Any) -> dict[str, Any]:
    """The ``data`` section, which fixes the training examples (and so the cached references)."""
    d = config.data
    return {
        "task": d.task,
        "num_train": d.num_train,
        "num_eval": d.num_eval,
        "seed": d.seed,
        "options": d.options,
    }


def _short(identity: Mapping[str, Any]) -> str:
    """``'path' (config 1a2b3c4d, weights 5e6f7a8b)`` or ``'name' (N tokens, sha256 ...)``."""
    if "weights_sha256" in identity:
        return (
            f"{identity['name']!r} at {identity['path']!r} (config sha256 {identity['config_sha256'][:12]}, "
            f"weights sha256 {identity['weights_sha256'][:12]})"
        )
    return f"{identity['name']!r} ({identity['size']} tokens, sha256 {identity['sha256'][:12]})"


def compare_identity(
    manifest: Mapping[str, Any],
    expected: Mapping[str, Any],
    folder: Path,
    field: str,
    hint: str = "rebuild it with rl-distill cache-teacher",
) -> None:
    """Refuse a cache whose teacher, tokenizer, scoring settings or data differ from ``expected``, naming both.

    Args:
        manifest: the cache's manifest.
        expected: ``{"teacher", "tokenizer", "scoring", "data"}`` of the run.
        folder: the cache folder (for the message).
        field: the config field or option that names the folder (``agent.teacher_cache``, ``--out``).
        hint: what to do about it, ending the message.

    Raises:
        TeacherCacheError: the first difference, with the cache's value and the run's.
    """
    t_old, t_new = manifest["teacher"], expected["teacher"]
    if (t_old["config_sha256"], t_old["weights_sha256"]) != (t_new["config_sha256"], t_new["weights_sha256"]):
        raise TeacherCacheError(
            f"{field}: the cache at {str(folder)!r} was built for teacher {_short(t_old)}, but model.teacher is "
            f"{_short(t_new)}; {hint}"
        )
    if manifest["tokenizer"]["sha256"] != expected["tokenizer"]["sha256"]:
        raise TeacherCacheError(
            f"{field}: the cache at {str(folder)!r} was built with tokenizer {_short(manifest['tokenizer'])}, but "
            f"this run's tokenizer is {_short(expected['tokenizer'])}; {hint}"
        )
    for section in ("scoring", "data"):
        old, new = manifest[section], expected[section]
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                what = {"k": "agent.teacher_topk", "teacher_temperature": "agent.teacher_temperature"}.get(
                    key, f"{section}.{key}"
                )
                raise TeacherCacheError(
                    f"{field}: the cache at {str(folder)!r} has {what} = {old.get(key)!r}, but this run has "
                    f"{new.get(key)!r}; {hint}"
                )


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    file = folder / MANIFEST
    if not file.is_file():
        return None
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise TeacherCacheError(
            f"{str(file)!r} is not a valid teacher-cache manifest (unreadable JSON)"
        ) from None
    if manifest.get("format") != CACHE_FORMAT:
        raise TeacherCacheError(
            f"{str(file)!r} has cache format {manifest.get('format')!r}; this version reads {CACHE_FORMAT}"
        )
    return manifest


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
class TeacherCache:
    """A complete cache opened for reading (shards memory-mapped, read per example).

    Use :meth:`open`; :meth:`fill` puts the cached signals of a batch of references into a rollout.

    Attributes:
        folder: the cache folder.
        manifest: its parsed ``manifest.json``.
        k: top-k width of the stored signals.
    """

    def __init__(self, folder: Path, manifest: dict[str, Any]) -> None:
        self.folder, self.manifest = folder, manifest
        self.k: int = int(manifest["scoring"]["k"])
        self._shards = [safe_open(str(folder / s["file"]), framework="pt") for s in manifest["shards"]]
        self._offsets = [f.get_tensor("offsets") for f in self._shards]
        self._index: dict[str, tuple[int, int]] = {}
        for s, handle in enumerate(self._shards):
            for row, key in enumerate(json.loads(handle.metadata()["keys"])):
                self._index.setdefault(key, (s, row))

    @classmethod
    def open(cls, folder: str | Path, *, field: str = "agent.teacher_cache") -> TeacherCache:
        """Open a complete cache folder.

        Raises:
            FileNotFoundError: no folder or no manifest.
            TeacherCacheError: an unfinished build, or a missing/damaged shard (naming it).
        """
        from rl_distill.models.loading import CorruptWeightsError, check_safetensors_file

        path = Path(folder).expanduser()
        manifest = _read_manifest(path) if path.is_dir() else None
        if manifest is None:
            raise FileNotFoundError(
                f"{field}: {str(path)!r} holds no teacher cache (no {MANIFEST}); build it with rl-distill cache-teacher"
            )
        if not manifest.get("complete"):
            raise TeacherCacheError(
                f"{field}: the cache at {str(path)!r} is unfinished ({manifest.get('num_examples')} examples "
                "planned); finish it by running rl-distill cache-teacher again with the same config"
            )
        for shard in manifest["shards"]:
            file = path / shard["file"]
            if not file.is_file() or file.stat().st_size != shard["bytes"]:
                raise TeacherCacheError(
                    f"{field}: shard {shard['file']} of the cache at {str(path)!r} is missing or has the wrong "
                    "size; rebuild it with rl-distill cache-teacher"
                )
            try:
                check_safetensors_file(file)
            except CorruptWeightsError as err:
                raise TeacherCacheError(f"{field}: {err}") from None
        return cls(path, manifest)

    def __len__(self) -> int:
        return len(self._index)

    def check_agent(self, config: Any, engine: RolloutEngine) -> None:
        """Refuse a cache whose k, teacher temperature, teacher template or prompt format differ from the agent's.

        Raises:
            TeacherCacheError: naming the field, the cache's value and the agent's.
        """
        scoring = self.manifest["scoring"]
        checks = [
            (
                "agent.teacher_topk",
                scoring["k"],
                config.teacher_topk if config.teacher_topk is not None else self.k,
            ),
            ("agent.teacher_temperature", scoring["teacher_temperature"], config.teacher_temp),
            ("agent.teacher_template", scoring["teacher_template"], config.teacher_template),
            ("model.chat_template", scoring["chat_template"], engine.encoder.use_chat_template),
        ]
        for name, cached, ours in checks:
            if cached != ours:
                raise TeacherCacheError(
                    f"{name}: the teacher cache at {str(self.folder)!r} was built with {cached!r}, this run has "
                    f"{ours!r}; use the cache's setting or rebuild it with rl-distill cache-teacher"
                )
        if self.k > engine.vocab_size:
            raise TeacherCacheError(
                f"agent.teacher_cache: the cache at {str(self.folder)!r} holds k={self.k} > the vocabulary size "
                f"{engine.vocab_size}"
            )

    def lookup(self, example: Example) -> dict[str, Tensor]:
        """The cached signals of one example (``L`` completion tokens, EOS included).

        Returns:
            ``completion_ids`` ``(L,)``, ``token_logprobs`` ``(L,)``, ``topk_ids`` ``(L, k)`` and
            ``topk_logprobs`` ``(L, k)``.

        Raises:
            TeacherCacheError: the example is not in the cache (naming it).
        """
        found = self._index.get(example_key(example))
        if found is None:
            raise TeacherCacheError(
                f"agent.teacher_cache: the example {example.prompt[:60]!r} is not in the cache at "
                f"{str(self.folder)!r}; it was built for other data"
            )
        shard, row = found
        lo, hi = int(self._offsets[shard][row]), int(self._offsets[shard][row + 1])
        handle = self._shards[shard]
        names = ("completion_ids", "token_logprobs", "topk_ids", "topk_logprobs")
        return {name: handle.get_slice(name)[lo:hi] for name in names}

    def fill(self, rollout: Rollout, examples: Sequence[Example]) -> Rollout:
        """Put the cached teacher signals of ``examples`` into a rollout of their references.

        Sets ``teacher_topk_ids``/``teacher_topk_logprobs`` ``(B, T, k)`` and ``teacher_logprobs``
        ``(B, T)`` of a rollout from ``RolloutEngine.from_completions`` on the examples' references.

        Masked positions get id 0 and log-prob 0 (never read). Modifies and returns ``rollout``.

        Raises:
            TeacherCacheError: an example missing from the cache, or cached tokens that differ from the
                rollout's (another tokenizer or reference text).
        """
        bsz, width = rollout.completion_ids.shape
        device = rollout.completion_ids.device
        ids = torch.zeros(bsz, width, self.k, dtype=torch.long, device=device)
        logprobs: Tensor | None = None
        token_lp = torch.zeros(bsz, width, dtype=torch.float32, device=device)
        for i, example in enumerate(examples):
            got = self.lookup(example)
            n = int(rollout.completion_mask[i].sum())
            tokens = rollout.completion_ids[i, :n].cpu()
            if got["completion_ids"].shape[0] != n or not torch.equal(got["completion_ids"].long(), tokens):
                raise TeacherCacheError(
                    f"agent.teacher_cache: the cached tokens of {example.prompt[:60]!r} differ from this run's "
                    f"reference tokens ({got['completion_ids'].shape[0]} vs {n} tokens); rebuild the cache"
                )
            if logprobs is None:
                dtype = got["topk_logprobs"].dtype
                logprobs = torch.zeros(bsz, width, self.k, dtype=dtype, device=device)
            ids[i, :n] = got["topk_ids"].to(device=device, dtype=torch.long)
            logprobs[i, :n] = got["topk_logprobs"].to(device)
            token_lp[i, :n] = got["token_logprobs"].to(device)
        rollout.teacher_topk_ids, rollout.teacher_topk_logprobs = ids, logprobs
        rollout.teacher_logprobs = token_lp
        return rollout


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------
def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _shard_ok(file: Path, keys: list[str], k: int) -> bool:
    """Whether ``file`` is a complete shard of exactly these example keys and this k."""
    from rl_distill.models.loading import CorruptWeightsError, check_safetensors_file

    if not file.is_file():
        return False
    try:
        check_safetensors_file(file)
        with safe_open(str(file), framework="pt") as handle:
            meta = handle.metadata() or {}
            return json.loads(meta.get("keys", "null")) == keys and meta.get("k") == str(k)
    except (CorruptWeightsError, OSError, ValueError, RuntimeError):
        return False


def _score_shard(
    engine: RolloutEngine,
    examples: Sequence[Example],
    k: int,
    temperature: float,
    batch_size: int,
    dtype: torch.dtype,
) -> dict[str, Tensor]:
    """The shard tensors of ``examples``: the teacher's top-k on each reference (EOS appended)."""
    parts: dict[str, list[Tensor]] = {
        "completion_ids": [],
        "token_logprobs": [],
        "topk_ids": [],
        "topk_logprobs": [],
    }
    lengths = []
    for lo in range(0, len(examples), batch_size):
        batch = examples[lo : lo + batch_size]
        rollout = engine.from_completions([ex.prompt for ex in batch], [ex.reference for ex in batch])
        rollout = engine.score(rollout, teacher_output="topk", top_k=k, teacher_temperature=temperature)
        assert rollout.teacher_topk_ids is not None and rollout.teacher_topk_logprobs is not None
        for i in range(len(batch)):
            n = int(rollout.completion_mask[i].sum())
            lengths.append(n)
            parts["completion_ids"].append(rollout.completion_ids[i, :n].to(torch.int32).cpu())
            parts["token_logprobs"].append(rollout.teacher_logprobs[i, :n].float().cpu())
            parts["topk_ids"].append(rollout.teacher_topk_ids[i, :n].to(torch.int32).cpu())
            parts["topk_logprobs"].append(rollout.teacher_topk_logprobs[i, :n].to(dtype).cpu())
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return {"offsets": offsets, **{name: torch.cat(ts).contiguous() for name, ts in parts.items()}}


def _write_shard(file: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """Write a shard atomically: temporary sibling, fsync, rename, fsync of the folder."""
    tmp = file.with_name(f".tmp-{file.name}-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, file)
    fsync_dir(file.parent)


def build_teacher_cache(
    config: Any,
    out: str | Path | None = None,
    *,
    shard_size: int = 256,
    batch_size: int = 8,
    logprob_dtype: str = "float32",
    log: Callable[[str], None] | None = print,
) -> Path:
    """Run the teacher over the training references and write (or finish) the cache: ``rl-distill cache-teacher``.

    Args:
        config: a run :class:`~rl_distill.config.Config` (GKD agent with ``teacher_topk`` set).
        out: the cache folder; default ``agent.teacher_cache``.
        shard_size: examples per shard file (>= 1).
        batch_size: references per teacher forward (>= 1).
        logprob_dtype: ``float32`` or ``bfloat16`` for the stored top-k log-probs.
        log: where progress lines go (None: silent).

    Returns:
        The cache folder.

    Raises:
        ConfigError: no ``agent.teacher_topk``, no folder, a teacher that is not a checkpoint, or
            examples without references.
        TeacherCacheError: ``out`` holds a cache for another teacher, tokenizer, setting or data.
    """
    from rl_distill.config import ConfigError
    from rl_distill.distributed import resolve_device
    from rl_distill.models import load_causal_lm, load_tokenizer
    from rl_distill.rollout.prompts import PromptEncoder
    from rl_distill.tasks import load_task

    agent, mc, dc = config.agent, config.model, config.data
    k = getattr(agent, "teacher_topk", None)
    if k is None:
        raise ConfigError(
            "agent.teacher_topk: the cache stores the teacher's top-k; set k, e.g. --set agent.teacher_topk=32"
        )
    folder_spec = out if out is not None else getattr(agent, "teacher_cache", None)
    if folder_spec is None:
        raise ConfigError("agent.teacher_cache: no cache folder; set it or pass --out DIR")
    if mc.teacher in _NOT_CACHEABLE:
        raise ConfigError(
            f"model.teacher: {mc.teacher!r} is not a checkpoint; the cache needs a named teacher"
        )
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard size and batch size must be >= 1, got {shard_size} and {batch_size}")
    if logprob_dtype not in LOGPROB_DTYPES:
        raise ValueError(f"log-prob dtype must be one of {', '.join(LOGPROB_DTYPES)}, got {logprob_dtype!r}")
    folder = Path(folder_spec).expanduser()
    field = "--out" if out is not None else "agent.teacher_cache"
    say = log or (lambda _: None)

    task = load_task(dc.task, seed=dc.seed, num_train=dc.num_train, num_eval=dc.num_eval, **dc.options)
    examples = list(task.train)
    missing = [ex.prompt for ex in examples if ex.reference is None]
    if missing:
        raise ConfigError(
            f"data.task: the cache scores the dataset references, but {len(missing)} training example(s) have "
            f"none (first: {missing[0][:60]!r})"
        )
    tokenizer = load_tokenizer(mc.teacher, trust_remote_code=mc.trust_remote_code)
    use_chat = PromptEncoder(tokenizer, chat_template=mc.chat_template).use_chat_template
    expected = {
        "teacher": teacher_identity(mc.teacher),
        "tokenizer": tokenizer_identity(tokenizer),
        "scoring": scoring_settings(config, use_chat, logprob_dtype),
        "data": data_settings(config),
    }
    num_shards = (len(examples) + shard_size - 1) // shard_size
    plan = {"format": CACHE_FORMAT, **expected, "num_examples": len(examples), "shard_size": shard_size}
    old = _read_manifest(folder) if folder.is_dir() else None
    if old is not None:
        compare_identity(
            old, expected, folder, field, hint="choose another folder, or delete this one to rebuild it"
        )
        if (old["num_examples"], old["shard_size"]) != (len(examples), shard_size):
            raise TeacherCacheError(
                f"{field}: the cache at {str(folder)!r} is laid out as {old['num_examples']} examples in shards of "
                f"{old['shard_size']}; this run asks for {len(examples)} in shards of {shard_size}"
            )
        if old.get("complete"):
            say(f"teacher cache at {folder} is complete ({len(examples)} examples); nothing to do")
            return folder
    elif folder.is_dir() and any(p for p in folder.iterdir() if not p.name.startswith(".tmp-")):
        raise TeacherCacheError(
            f"{field}: {str(folder)!r} is not empty and holds no teacher cache; choose another folder"
        )
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".tmp-*"):  # shards whose write was killed
        stale.unlink()
    atomic_write_text(folder / MANIFEST, json.dumps({**plan, "complete": False}, indent=2) + "\n")

    keys = [example_key(ex) for ex in examples]
    todo = [
        s for s in range(num_shards)
        if not _shard_ok(folder / _shard_name(s), keys[s * shard_size : (s + 1) * shard_size], k)
    ]  # fmt: skip
    say(f"teacher cache at {folder}: {num_shards - len(todo)} of {num_shards} shard(s) already complete")
    if todo:
        teacher = load_causal_lm(
            mc.teacher, dtype=mc.teacher_dtype or mc.dtype, device=resolve_device(mc.device),
            trust_remote_code=mc.trust_remote_code,
        ).eval()  # fmt: skip
        engine = RolloutEngine(
            teacher, teacher, tokenizer, chat_template=mc.chat_template, **config.train.engine_options()
        )
        template = getattr(agent, "teacher_template", None)
        if template:
            engine.set_teacher_template(template, [*task.train, *task.eval])
        dtype = LOGPROB_DTYPES[logprob_dtype]
        for s in todo:
            part = examples[s * shard_size : (s + 1) * shard_size]
            tensors = _score_shard(engine, part, k, agent.teacher_temp, batch_size, dtype)
            meta = {
                "keys": json.dumps(keys[s * shard_size : (s + 1) * shard_size]),
                "k": str(k),
                "first": str(s * shard_size),
            }
            _write_shard(folder / _shard_name(s), tensors, meta)
            say(f"  shard {s + 1}/{num_shards}: {len(part)} examples, {int(tensors['offsets'][-1])} tokens")
    shards = []
    for s in range(num_shards):
        file = folder / _shard_name(s)
        with safe_open(str(file), framework="pt") as handle:
            tokens = int(handle.get_tensor("offsets")[-1])
        count = min(shard_size, len(examples) - s * shard_size)
        shards.append({"file": file.name, "examples": count, "tokens": tokens, "bytes": file.stat().st_size})
    manifest = {
        **plan,
        "complete": True,
        "num_tokens": sum(s["tokens"] for s in shards),
        "bytes": sum(s["bytes"] for s in shards),
        "shards": shards,
    }
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    say(f"teacher cache complete: {folder} ({len(examples)} examples, {manifest['num_tokens']} tokens, "
        f"{manifest['bytes'] / 2**20:.1f} MiB)")  # fmt: skip
    return folder


def check_cache_for_run(config: Any, tokenizer: PreTrainedTokenizerBase) -> TeacherCache:
    """Open ``agent.teacher_cache``, refusing it unless it matches the run (the teacher is not loaded).

    The cache must have been built for ``model.teacher`` (its files are fingerprinted), this tokenizer,
    these scoring settings and this data.

    Raises:
        FileNotFoundError, TeacherCacheError: no cache, or a mismatch naming both sides.
    """
    from rl_distill.rollout.prompts import PromptEncoder

    cache = TeacherCache.open(config.agent.teacher_cache)
    use_chat = PromptEncoder(tokenizer, chat_template=config.model.chat_template).use_chat_template
    scoring = scoring_settings(config, use_chat, cache.manifest["scoring"]["logprob_dtype"])
    if config.agent.teacher_topk is None:  # the cache's k is used
        scoring["k"] = cache.k
    scoring["teacher_dtype"] = cache.manifest["scoring"][
        "teacher_dtype"
    ]  # no teacher forward here: any dtype
    expected = {
        "teacher": teacher_identity(config.model.teacher),
        "tokenizer": tokenizer_identity(tokenizer),
        "scoring": scoring,
        "data": data_settings(config),
    }
    compare_identity(cache.manifest, expected, cache.folder, "agent.teacher_cache")
    return cache
