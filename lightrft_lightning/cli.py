"""The ``lightrft-lightning`` console script: LightningCLI (``fit``, ``validate``) over the RLHF modules.

``lightrft-lightning fit --config examples/grpo_tiny_fake.yaml`` builds everything from YAML: the
algorithm (``model.class_path``), the prompts (``data``), and the trainer with a strategy by registered
name (``lightrft_fake``, ``lightrft_fsdp``, ``lightrft_deepspeed``) or ``class_path``, and callbacks by
``class_path``. Other subcommands (``convert``) live in their own modules and are dispatched by name.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Optional

from lightning.pytorch.cli import LightningCLI

import lightrft_lightning  # noqa: F401  (registers the strategies by name)
from lightrft_lightning.algorithms.module import RLModule
from lightrft_lightning.data import PromptDataModule

# subcommands that are not LightningCLI's: name -> "module:function" taking the remaining argv and
# returning the exit status; and what each does, for --help
COMMANDS = {"convert": "lightrft_lightning.convert:main", "serve": "lightrft_lightning.serve:main"}
COMMAND_HELP = {"convert": "convert checkpoints and models (dcp-to-hf, deepspeed-to-hf, hf-to-dcp, gguf-to-hf)",
                "serve": "start a vLLM server for VLLMServerEngine (dev mode, weight transfer, 127.0.0.1)"}


class LightRFTCLI(LightningCLI):
    """LightningCLI restricted to ``fit`` and ``validate``, with any ``RLModule`` subclass as the model
    and :class:`~lightrft_lightning.data.PromptDataModule` as the data."""

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        others = "; ".join(f"{name}: {COMMAND_HELP[name]} ({name} --help)" for name in COMMANDS)
        kwargs.setdefault("parser_kwargs", {}).setdefault(
            "description", f"LightningCLI over the RLHF modules (fit, validate). Other subcommands: {others}")
        super().__init__(RLModule, PromptDataModule, subclass_mode_model=True, args=args, run=run, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
                "validate": {"model", "dataloaders", "datamodule"}}


def main(argv: Optional[list[str]] = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in COMMANDS:
        module, _, fn = COMMANDS[args[0]].partition(":")
        try:
            command = getattr(importlib.import_module(module), fn)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
            sys.exit(f"lightrft-lightning {args[0]}: not available in this version ({module} is missing)")
        sys.exit(command(args[1:]))  # the command's return value is the exit status
    LightRFTCLI(args=argv)  # None: LightningCLI reads sys.argv itself


if __name__ == "__main__":
    main()
