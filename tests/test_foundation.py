"""The package, the CLI conventions and the tiny-pair fixtures."""

from __future__ import annotations

import subprocess
import sys

import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

import tca
from tca.cli import main


def test_version_and_help():
    runner = CliRunner()
    out = runner.invoke(main, ["--version"])
    assert out.exit_code == 0 and tca.__version__ in out.output
    out = runner.invoke(main, ["--help"])
    assert out.exit_code == 0 and "harvest" in out.output


def test_console_script_runs_from_any_directory(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "tca.cli", "--version"], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert tca.__version__ in proc.stdout


def test_tiny_pair_loads_through_auto_classes(tiny_pair):
    base, target = tiny_pair
    tok = AutoTokenizer.from_pretrained(target)
    text = "<｜begin▁of▁sentence｜><｜User｜>What is 3 + 4?<｜Assistant｜><think>\nWait, 7.\n</think>\n\n7"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.convert_tokens_to_ids("<think>") in ids
    mb = AutoModelForCausalLM.from_pretrained(base)
    mt = AutoModelForCausalLM.from_pretrained(target)
    x = torch.tensor([ids])
    with torch.no_grad():
        lb, lt = mb(x).logits, mt(x).logits
    assert lb.shape == lt.shape == (1, len(ids), len(tok))
    assert not torch.allclose(lb, lt)
