"""Tiny saved models and configs for trainer, checkpoint, CLI and Accelerate tests."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from rl_distill.models import char_tokenizer, tiny_llama

ROOT = Path(__file__).resolve().parents[1]


def save_tiny_model(path, *, num_layers=2, sharpen=1.0, max_positions=512, chars=None, seed=0):
    """A tiny Llama plus character tokenizer saved with save_pretrained; ``sharpen`` scales the LM head.

    A sharper teacher (sharpen > 1) gives divergences and gradients far from zero, so that runs
    compared across processes are not dominated by float noise.
    """
    tok = char_tokenizer(chars) if chars is not None else char_tokenizer()
    model = tiny_llama(
        len(tok), hidden_size=32, num_layers=num_layers, seed=seed, max_position_embeddings=max_positions
    )
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)


def tiny_config(teacher_dir, output_dir, *, agent=None, train=None, data=None, eval=None, model=None):
    """A config dict for a seconds-long CPU run on compact arithmetic (16 train / 4 eval prompts)."""
    return {
        "model": {"teacher": str(teacher_dir), "student_layers": 1, "device": "cpu", **(model or {})},
        "data": {
            "task": "arithmetic",
            "num_train": 16,
            "num_eval": 4,
            "options": {"compact": True},
            **(data or {}),
        },
        "agent": {**_agent_defaults((agent or {}).get("name", "gkd")), **(agent or {})},
        "train": {"steps": 3, "batch_size": 2, "lr": 1e-3, "output_dir": str(output_dir), **(train or {})},
        "eval": {"num_samples": 2, **(eval or {})},
    }


def _agent_defaults(name):
    if name == "gkd":
        return {"name": "gkd", "divergence": "jsd", "beta": 0.5, "max_new_tokens": 6}
    return {"name": name, "max_new_tokens": 6}


def write_yaml(path, cfg):
    Path(path).write_text(yaml.safe_dump(cfg))
    return Path(path)


def subprocess_env():
    """Environment for child processes: one thread, this repo's tests importable, no GPU."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def cli_command(*args):
    return [sys.executable, "-m", "rl_distill.cli", *map(str, args)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def final_weights(run_dir):
    return load_file(str(Path(run_dir) / "final" / "model.safetensors"))


#: What a worker's stderr shows when the C++ runtime aborts it in gloo's teardown (SIGABRT).
GLOO_TEARDOWN_ABORT = "terminate called without an active exception"


def run_launcher(cmd, *, env, timeout, clean=(), attempts=4):
    """Run a multi-process launch; retry only a gloo teardown abort, in fresh processes.

    Seen on loaded CI machines (twice in a row once): a worker aborted by the C++ runtime in gloo's
    teardown, after its work. That failure, and only that one, is retried (up to ``attempts`` runs in
    all), with the ``clean`` folders (the run's outputs) removed first so that the retry starts as
    the first run did; any other failure is returned at once for the caller's assertion.
    """
    for _ in range(attempts):
        for folder in clean:
            shutil.rmtree(folder, ignore_errors=True)
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if run.returncode == 0 or GLOO_TEARDOWN_ABORT not in run.stderr:
            return run
    return run
