"""`tca train` and `tca refine` take their options from the config dataclasses (`config_options`)."""

from __future__ import annotations

import dataclasses

import click
import pytest
from click.testing import CliRunner

from tca.adapted.config import RefineConfig
from tca.cli import main, refine_cmd, train_cmd
from tca.train.config import MIN_STEPS, TrainConfig

REQUIRED = {
    train_cmd: ["--cache", "store", "--out", "run"],
    refine_cmd: ["--base", "b", "--target", "t", "--data", "d.jsonl", "--out", "run"],
}


def _config(cmd: click.Command, *flags: str):
    """The config a command would build from its required flags and ``flags``."""
    params = dict(cmd.make_context(cmd.name, [*REQUIRED[cmd], *flags]).params)
    assert params.pop("as_json") is False
    return (TrainConfig if cmd is train_cmd else RefineConfig)(**params)


def _option(cmd: click.Command, name: str) -> click.Option:
    return next(p for p in cmd.params if p.name == name)


@pytest.mark.parametrize("cmd, cls", [(train_cmd, TrainConfig), (refine_cmd, RefineConfig)])
def test_every_field_is_an_option_named_after_it(cmd, cls):
    fields = [f.name for f in dataclasses.fields(cls)]
    assert [p.name for p in cmd.params] == [*fields, "as_json"]
    for name in fields:
        assert "--" + name.replace("_", "-") in _option(cmd, name).opts


def test_defaults_are_the_dataclass_defaults():
    assert _config(train_cmd) == TrainConfig(cache="store", out="run")
    assert _config(refine_cmd) == RefineConfig(base="b", target="t", data="d.jsonl", out="run")
    for cmd, flags in REQUIRED.items():
        required = {p.opts[0] for p in cmd.params if p.required}
        assert required == set(flags[::2])


def test_flags_parse_into_the_fields_types():
    cfg = _config(train_cmd, "--l1", "0.1,0.3", "--k", "8,16", "--activation", "topk", "--no-dec-bias", "--resume",
                  "--features", "64", "--epochs", "0.5", "--eval-every", "7", "--device", "cpu")
    assert (cfg.l1, cfg.k, cfg.activation, cfg.dec_bias, cfg.resume) == ([0.1, 0.3], [8, 16], "topk", False, True)
    assert (cfg.features, cfg.epochs, cfg.eval_every, cfg.device) == (64, 0.5, 7, "cpu")
    assert _config(train_cmd, "--dec-bias").dec_bias is True
    cfg = _config(refine_cmd, "--from-zero", "--no-checkpointing", "--l1", "0.4", "--dtype", "bfloat16", "--k", "4")
    assert (cfg.from_zero, cfg.checkpointing, cfg.l1, cfg.dtype, cfg.k) == (True, False, 0.4, "bfloat16", 4)


def test_bad_values_exit_2():
    runner = CliRunner()
    res = runner.invoke(main, ["train", *REQUIRED[train_cmd], "--l1", "0.1,abc"])
    assert res.exit_code == 2 and res.output.strip().splitlines() == [
        "error: --l1 '0.1,abc' is not a comma list of positive float values, e.g. --l1 0.001,0.003."]
    res = runner.invoke(main, ["train", *REQUIRED[train_cmd], "--k", "-3"])
    assert res.exit_code == 2 and "--k '-3' is not a comma list of positive int values" in res.output
    res = runner.invoke(main, ["refine", *REQUIRED[refine_cmd], "--activation", "jumprelu"])
    assert res.exit_code == 2 and "'jumprelu' is not one of 'relu', 'topk'" in res.output
    res = runner.invoke(main, ["train", "--out", "run"])
    assert res.exit_code == 2 and "Missing option '--cache'" in res.output


def test_help_is_the_field_docstring():
    assert _option(train_cmd, "holdout_frac").help == "Fraction of documents held out for evaluation."
    # a docstring of several lines reads as one paragraph
    assert _option(train_cmd, "features").help.startswith(
        "Features per adapter; None: the paper's 8192 at width 3584 scaled to the store's width (the power")
    # ``name`` of a field reads as its flag, of a constant as its value
    assert _option(train_cmd, "resume").help == "Continue the run in --out from its checkpoint."
    assert f"as many whole passes as make {MIN_STEPS} steps" in _option(train_cmd, "epochs").help
    assert _option(refine_cmd, "activation").help == "With --from-zero: relu or topk."
    text = CliRunner().invoke(main, ["train", "--help"], terminal_width=200).output
    assert "--dec-bias / --no-dec-bias" in text and "[default: 0.5]" in text and "--l1 FLOAT,..." in text
