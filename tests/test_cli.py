"""The ``lightrft-lightning`` CLI: example YAMLs run a few steps; bad YAML keys give jsonargparse's error.

The 2-rank examples (FSDP, DeepSpeed) run in tests/test_grpo.py against the one-process example.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import yaml

from lightrft_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the examples name their data relative to the repository root


@pytest.mark.parametrize("name", ["grpo_tiny_fake", "ppo_tiny_fake"])
def test_example_yaml_fits_a_few_steps(name, tmp_path):
    main(["fit", "--config", f"examples/{name}.yaml", "--trainer.max_steps=2", "--trainer.num_sanity_val_steps=1",
          f"--trainer.logger.init_args.save_dir={tmp_path}", f"--trainer.default_root_dir={tmp_path}"])
    run_dir = next((tmp_path / name).iterdir())
    with open(run_dir / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("reward")]
    assert [int(r["step"]) for r in rows] == [0, 1]
    assert all(0.0 <= float(r["reward"]) <= 1.0 for r in rows)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["class_path"].endswith("GRPO" if name.startswith("grpo") else "PPO")
    assert (run_dir / "checkpoints").is_dir()


def test_validate_subcommand_reports_greedy_reward(tmp_path, capsys):
    main(["validate", "--config", "examples/grpo_tiny_fake.yaml", f"--trainer.logger.init_args.save_dir={tmp_path}",
          "--trainer.callbacks=[]"])
    assert "val/reward" in capsys.readouterr().out


def test_a_wrong_key_gives_jsonargparse_error(tmp_path, capsys):
    config = yaml.safe_load((EXAMPLES / "grpo_tiny_fake.yaml").read_text())
    config["model"]["init_args"]["n_sample_per_prompt"] = 4  # typo
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(bad)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "n_sample_per_prompt" in err


def test_a_bad_value_names_the_field_before_training():
    with pytest.raises(ValueError, match="GRPO.kl_estimator='k9' is invalid; accepted: k1, k2, k3"):
        main(["fit", "--config", "examples/grpo_tiny_fake.yaml", "--model.init_args.kl_estimator=k9"])


def test_every_example_parses_including_the_gpu_one(capsys):
    paths = sorted(EXAMPLES.glob("*.yaml"))
    assert {p.stem for p in paths} >= {"grpo_tiny_fake", "grpo_tiny_fsdp", "grpo_tiny_deepspeed", "ppo_tiny_fake",
                                       "grpo_gpu_vllm"}
    for path in paths:
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", str(path), "--print_config"])
        assert exit_info.value.code in (0, None), path.name
        assert "class_path: lightrft_lightning.algorithms." in capsys.readouterr().out, path.name


def test_only_fit_and_validate_and_other_commands_are_dispatched(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        main(["test", "--config", "examples/grpo_tiny_fake.yaml"])
    assert "{fit,validate}" in capsys.readouterr().err
    import lightrft_lightning.cli as cli

    calls = []
    monkeypatch.setitem(cli.COMMANDS, "convert", "tests.test_cli:_record")
    monkeypatch.setattr(sys.modules[__name__], "_record", calls.append, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "--from", "dcp"])
    assert calls == [["--from", "dcp"]] and not exit_info.value.code
    monkeypatch.setitem(cli.COMMANDS, "convert", "lightrft_lightning.no_such_module:main")
    with pytest.raises(SystemExit, match="not available in this version"):
        main(["convert"])


def test_console_script_help_lists_convert_without_warnings():
    import subprocess

    done = subprocess.run([str(Path(sys.executable).parent / "lightrft-lightning"), "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "{fit,validate}" in done.stdout and "convert" in done.stdout
    assert "args parameter" not in done.stderr  # LightningCLI's warning about args and sys.argv both given
