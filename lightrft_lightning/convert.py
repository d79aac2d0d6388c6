"""Checkpoint conversion: DCP -> Hugging Face, DeepSpeed -> Hugging Face, Hugging Face -> DCP, GGUF -> Hugging Face.

    lightrft-lightning convert dcp-to-hf CKPT OUT --config HF_DIR
    lightrft-lightning convert deepspeed-to-hf CKPT_DIR OUT --config HF_DIR [--tag TAG]
    lightrft-lightning convert hf-to-dcp HF_DIR OUT_DIR [--tag TAG]
    lightrft-lightning convert gguf-to-hf GGUF OUT

Every conversion runs in one process without a process group, with the libraries' own readers and
writers: DCP's template-free loader (as ``torch.distributed.checkpoint.format_utils`` uses it) and
``dcp.save``, DeepSpeed's ``zero_to_fp32``, ``transformers``' GGUF dequantization and its
``save_pretrained`` (safetensors).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from lightrft_lightning import checkpoint

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                    "merges.txt", "tokenizer.model", "generation_config.json", "chat_template.jinja")


def _check_config(config_dir: str) -> None:
    if not Path(config_dir, "config.json").is_file():
        raise FileNotFoundError(f"--config {config_dir!r} has no config.json; accepted: a Hugging Face model directory")


def _check_out(out_dir: str) -> None:
    """An output directory must not be an existing file (``save_pretrained`` would skip it silently)."""
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise NotADirectoryError(f"output {out_dir!r} is a file; accepted: a new or existing directory")


def _check_tag(tag: str) -> None:
    if not tag or tag in (".", "..") or "/" in tag or "\\" in tag:
        raise ValueError(f"--tag {tag!r} is invalid; accepted: a non-empty folder name without '/' "
                         "(e.g. global_step10)")


def _hf_skeleton(config_dir: str) -> torch.nn.Module:
    """The causal-LM architecture of ``config_dir`` on the meta device (no memory, no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    _check_config(config_dir)
    config = AutoConfig.from_pretrained(config_dir)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _match_prefix(state: dict[str, torch.Tensor], expected: set[str], source: str) -> dict[str, torch.Tensor]:
    """``state`` renamed to the model's keys: as is, or without one leading ``<name>.`` (a
    LightningModule attribute such as ``actor.``)."""
    prefixes = [""] + sorted({k.split(".", 1)[0] + "." for k in state if "." in k})
    for prefix in prefixes:
        renamed = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if expected <= renamed.keys():
            return {k: renamed[k] for k in expected}
    best = min(prefixes, key=lambda p: len(expected - {k[len(p):] for k in state if k.startswith(p)}))
    missing = sorted(expected - {k[len(best):] for k in state if k.startswith(best)})
    raise KeyError(f"{source} does not hold the weights of this model: missing {missing[:8]}"
                   + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
                   + f"; the checkpoint's keys start with {sorted({k.split('.', 1)[0] for k in state})[:8]}")


def tied_aliases(module: torch.nn.Module) -> set[str]:
    """Parameter names that repeat a parameter named before them (a tied ``lm_head.weight``):
    ``save_pretrained`` with an explicit ``state_dict`` would write those tensors twice."""
    first: dict[int, str] = {}
    aliases = set()
    for name, param in module.named_parameters(remove_duplicate=False):
        if first.setdefault(id(param), name) != name:
            aliases.add(name)
    return aliases


def save_hf(state: dict[str, torch.Tensor], config_dir: str, out_dir: str, source: str) -> None:
    """Write ``state`` as a Hugging Face safetensors directory with ``config_dir``'s config (and
    its tokenizer files, when there are any)."""
    _check_out(out_dir)
    model = _hf_skeleton(config_dir)
    expected = set(model.state_dict().keys())
    weights = _match_prefix({k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, expected, source)
    model.tie_weights()  # a meta skeleton built from the config may not be tied yet
    aliases = tied_aliases(model)
    model.save_pretrained(out_dir, state_dict={k: v.contiguous() for k, v in weights.items() if k not in aliases})
    for name in _TOKENIZER_FILES:
        if Path(config_dir, name).is_file() and not Path(out_dir, name).exists():
            shutil.copy(Path(config_dir, name), Path(out_dir, name))


def dcp_to_hf(ckpt: str, out_dir: str, config_dir: str) -> None:
    """A DCP checkpoint (``save_ckpt``'s ``model`` entry, or a Lightning checkpoint's ``state_dict``)
    to a Hugging Face directory."""
    if not Path(ckpt).is_dir():
        raise FileNotFoundError(f"DCP checkpoint {ckpt!r} is not a directory")
    _check_config(config_dir)
    _check_out(out_dir)
    if not Path(ckpt, checkpoint.METADATA).is_file() and Path(ckpt, checkpoint.LATEST).is_file():
        ckpt = checkpoint.resolve(ckpt)  # a save_dir: follow latest
    state = checkpoint.load_full(ckpt)
    for key in ("model", "state_dict"):
        if isinstance(state.get(key), dict):
            save_hf(_flatten(state[key]), config_dir, out_dir, ckpt)
            return
    raise KeyError(f"DCP checkpoint {ckpt} has neither a 'model' nor a 'state_dict' entry (top-level keys: {sorted(state)})")


def deepspeed_to_hf(ckpt_dir: str, out_dir: str, config_dir: str, tag: Optional[str] = None) -> None:
    """A DeepSpeed checkpoint directory (any ZeRO stage and world size) to a Hugging Face directory,
    merged with DeepSpeed's ``zero_to_fp32``."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from lightrft_lightning.parallel.deepspeed_loading import weights_only_loads

    if not Path(ckpt_dir).is_dir():
        raise FileNotFoundError(f"DeepSpeed checkpoint {ckpt_dir!r} is not a directory")
    _check_config(config_dir)
    _check_out(out_dir)
    if tag is not None:
        _check_tag(tag)
    if tag is None and not Path(ckpt_dir, checkpoint.LATEST).is_file():
        raise FileNotFoundError(f"{ckpt_dir} has no 'latest' file; pass --tag (one of: "
                                f"{sorted(p.name for p in Path(ckpt_dir).iterdir() if p.is_dir())})")
    if tag is not None and not Path(ckpt_dir, tag).is_dir():
        raise FileNotFoundError(f"DeepSpeed checkpoint {Path(ckpt_dir, tag)} does not exist")
    with weights_only_loads():
        state = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
    save_hf(state, config_dir, out_dir, ckpt_dir)


def hf_to_dcp(hf_dir: str, out_dir: str, tag: str = "hf") -> str:
    """A Hugging Face directory to a DCP checkpoint ``out_dir/tag`` in ``save_ckpt``'s layout (``latest``
    names it), ready for ``strategy.load_ckpt(model, out_dir, load_module_only=True)`` with any
    strategy and world size. Returns the checkpoint path."""
    from safetensors.torch import load_file

    if not Path(hf_dir).is_dir():
        raise FileNotFoundError(f"{hf_dir!r} is not a directory; accepted: a Hugging Face model directory")
    _check_out(out_dir)
    _check_tag(tag)
    files = sorted(Path(hf_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{hf_dir!r} has no *.safetensors files; accepted: a Hugging Face model directory")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    extra = {"scheduler": None, "train_state": {"micro_steps": 0, "steps": 0, "skipped_steps": 0}, "client_state": {}}
    return checkpoint.save(out_dir, tag, {"model": state}, extra, max_num=2**62, max_mem=float("inf"), no_dist=True).path


def gguf_to_hf(gguf_file: str, out_dir: str) -> str:
    """A GGUF file (any architecture and quantization ``transformers`` can dequantize) to a Hugging Face
    directory: fp32 safetensors (tied embeddings stay tied), config, tokenizer and chat template.
    Written into a temporary directory renamed when complete. Returns ``out_dir``."""
    import copy

    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = Path(gguf_file)
    if not source.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_file!r} does not exist; accepted: a .gguf file")
    _check_out(out_dir)
    try:
        quantized = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    except (OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{gguf_file} cannot be read as a GGUF causal LM by transformers: {err}") from err
    # save_pretrained refuses a model loaded from GGUF (its quantization_config): rebuild a plain one
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.tie_weights()
    out = Path(out_dir)
    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return str(out)


def _flatten(tree: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightrft-lightning convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("dcp-to-hf", help="DCP checkpoint -> Hugging Face safetensors")
    p.add_argument("ckpt", help="a DCP checkpoint directory (or a save_dir with a latest file)")
    p.add_argument("out", help="output Hugging Face directory")
    p.add_argument("--config", required=True, help="Hugging Face directory with the model's config.json")
    p = sub.add_parser("deepspeed-to-hf", help="DeepSpeed checkpoint -> Hugging Face safetensors")
    p.add_argument("ckpt", help="a DeepSpeed checkpoint directory (holding 'latest' and tag folders)")
    p.add_argument("out", help="output Hugging Face directory")
    p.add_argument("--config", required=True, help="Hugging Face directory with the model's config.json")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the one 'latest' names)")
    p = sub.add_parser("hf-to-dcp", help="Hugging Face safetensors -> DCP checkpoint")
    p.add_argument("hf", help="a Hugging Face model directory")
    p.add_argument("out", help="output checkpoint directory (save_dir)")
    p.add_argument("--tag", default="hf", help="checkpoint tag (default: hf)")
    p = sub.add_parser("gguf-to-hf", help="GGUF file -> Hugging Face safetensors (dequantized, fp32)")
    p.add_argument("gguf", help="a .gguf file")
    p.add_argument("out", help="output Hugging Face directory")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``lightrft-lightning convert``. Returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "dcp-to-hf":
            dcp_to_hf(args.ckpt, args.out, args.config)
        elif args.command == "deepspeed-to-hf":
            deepspeed_to_hf(args.ckpt, args.out, args.config, args.tag)
        elif args.command == "gguf-to-hf":
            gguf_to_hf(args.gguf, args.out)
        else:
            print(hf_to_dcp(args.hf, args.out, args.tag))
            return 0
    except (FileNotFoundError, NotADirectoryError, KeyError, checkpoint.CheckpointError, ValueError) as err:
        print(f"lightrft-lightning convert {args.command}: {err}", file=sys.stderr)
        return 1
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
