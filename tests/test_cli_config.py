"""Every command's options come from its config dataclass (tca.options): one option per field,
the field's default, type and docstring; former flag names still work with one warning."""

from __future__ import annotations

import dataclasses
import logging

import click
import pytest
from click.testing import CliRunner

from tca.adapted.config import RefineConfig
from tca.cli import main
from tca.options import ConfigCommand, _leaves, build_config, field_docs
from tca.train.config import MIN_STEPS, TrainConfig


def _commands(group: click.Group = main, path: tuple[str, ...] = ()):
    for name, cmd in sorted(group.commands.items()):
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, path + (name,))
        else:
            yield path + (name,), cmd


CONFIG_COMMANDS = [(" ".join(p), c) for p, c in _commands() if isinstance(c, ConfigCommand)]
PLAIN_COMMANDS = {" ".join(p) for p, c in _commands() if not isinstance(c, ConfigCommand)}


def test_every_command_but_the_settingless_takes_a_config():
    assert PLAIN_COMMANDS == {"cache info"}, PLAIN_COMMANDS


@pytest.mark.parametrize("path, cmd", CONFIG_COMMANDS, ids=[p for p, _ in CONFIG_COMMANDS])
def test_every_field_is_one_parameter_with_its_default_and_docstring(path, cmd):
    by_name = {p.name: p for p in cmd.params}
    for leaf in _leaves(cmd.config_class):
        param = by_name.pop(leaf.key)
        if isinstance(param, click.Option):
            assert param.help == leaf.doc and leaf.doc, f"{path} --{leaf.key} has no docstring help"
            assert set(leaf.flags) <= set(param.opts) | set(param.secondary_opts)
    own = {name for name in by_name if not name.startswith("old__")}
    assert own <= {"as_json", "index"}, f"{path} has options that are not config fields: {own}"


def _parse(path: str, *argv: str):
    """The config a command line builds, without running the command."""
    cmd = dict(CONFIG_COMMANDS)[path]
    params = dict(cmd.make_context(path, list(argv)).params)
    return build_config(cmd.config_class, params)


def test_defaults_are_the_dataclass_defaults():
    assert _parse("train", "--store", "s", "--out", "run") == TrainConfig(store="s", out="run")
    assert _parse("refine", "--base", "b", "--target", "t", "--data", "d", "--out", "r") == \
        RefineConfig(base="b", target="t", data="d", out="r")
    from tca.cache.harvest import HarvestConfig
    from tca.cache.plan import PlanConfig

    cfg = _parse("harvest", "--base", "b", "--target", "t", "--data", "d.jsonl", "--out", "o")
    assert cfg == HarvestConfig(base="b", target="t", out="o", plan=PlanConfig(data="d.jsonl"))


def test_flags_parse_into_the_fields_types():
    cfg = _parse("train", "--store", "s", "--out", "run", "--l1", "0.1,0.3", "--k", "8,16", "--activation", "topk",
                 "--no-dec-bias", "--resume", "--features", "64", "--epochs", "0.5", "--device", "cpu")
    assert (cfg.l1, cfg.k, cfg.activation, cfg.dec_bias, cfg.resume) == ([0.1, 0.3], [8, 16], "topk", False, True)
    assert (cfg.features, cfg.epochs, cfg.device) == (64, 0.5, "cpu")
    cfg = _parse("harvest", "--base", "b", "--target", "t", "--data", "d", "--out", "o", "--seq-len", "64",
                 "--keep-frac", "0.5", "--storage-options", '{"anon": true}', "--template", "none", "--skip-sinks")
    assert (cfg.plan.seq_len, cfg.plan.keep_frac, cfg.storage_options, cfg.plan.template, cfg.plan.skip_sinks) == \
        (64, 0.5, {"anon": True}, "none", True)


def test_none_reaches_an_optional_field_with_a_default():
    base = ("--adapters", "a", "--base", "b", "--target", "t", "--data", "d")
    assert _parse("eval", *base).max_tokens == 100_000
    assert _parse("eval", *base, "--max-tokens", "none").max_tokens is None
    assert _parse("eval", *base, "--max-tokens", "500").max_tokens == 500


def test_optional_nested_config_is_built_only_when_one_of_its_flags_is_given():
    from tca.cache.cluster import ClusterConfig

    base = ("--store", "s", "--adapters", "a", "--out", "i.duckdb")
    assert _parse("index", *base).cluster is None
    assert _parse("index", *base, "--workers", "3").cluster == ClusterConfig(workers=3)
    assert _parse("index", *base, "--scheduler", "tcp://h:1").cluster == ClusterConfig(scheduler="tcp://h:1")
    assert _parse("index", *base, "--adapters", "b").adapters == ["a", "b"]


def test_words_and_numbers_lists():
    base = ("--adapters", "a", "--base", "b", "--target", "t", "--data", "d", "--index", "i", "--out", "o")
    cfg = _parse("study hesitation", *base, "--words", "Wait, Hmm,", "--clamp-scales", "1,2")
    assert (cfg.words, cfg.clamp_scales) == (["Wait", " Hmm"], [1.0, 2.0])  # a space is part of a BPE token


@pytest.mark.parametrize("argv, old, new", [
    (["train", "--cache", "s", "--out", "run"], "--cache", "--store"),
    (["index", "--cache", "s", "--adapters", "a", "--out", "i.duckdb"], "--cache", "--store"),
    (["build-pair", "--out", "p", "--force"], "--force", "--overwrite"),
])
def test_former_flags_work_with_one_deprecation_line(argv, old, new, caplog):
    cmd = dict(CONFIG_COMMANDS)[argv[0]]
    with caplog.at_level(logging.WARNING, logger="tca"):
        params = dict(cmd.make_context(argv[0], argv[1:]).params)
        cfg = build_config(cmd.config_class, params)
    assert [r.getMessage() for r in caplog.records] == [f"{old} is deprecated; use {new}."]
    field = new[2:].replace("-", "_")
    assert getattr(cfg, field) == (True if old == "--force" else "s")


def test_a_former_and_a_current_flag_together_are_refused():
    res = CliRunner().invoke(main, ["train", "--cache", "a", "--store", "b", "--out", "run"])
    assert res.exit_code == 2 and "--cache and --store are the same option; give only --store." in res.output


def test_bad_values_exit_2_with_one_sentence():
    runner = CliRunner()
    res = runner.invoke(main, ["train", "--store", "s", "--out", "run", "--l1", "0.1,abc"])
    assert res.exit_code == 2 and res.output.strip().splitlines() == [
        "error: --l1 '0.1,abc' is not a comma list of positive float values, e.g. --l1 0.001,0.003."]
    res = runner.invoke(main, ["train", "--store", "s", "--out", "run", "--k", "-3"])
    assert res.exit_code == 2 and "--k '-3' is not a comma list of positive int values" in res.output
    res = runner.invoke(main, ["refine", "--base", "b", "--target", "t", "--data", "d", "--out", "r",
                               "--activation", "jumprelu"])
    assert res.exit_code == 2 and "'jumprelu' is not one of 'relu', 'topk'" in res.output
    res = runner.invoke(main, ["train", "--out", "run"])
    assert res.exit_code == 2 and "Missing option '--store'" in res.output
    res = runner.invoke(main, ["harvest", "--base", "b", "--target", "t", "--data", "d", "--out", "o",
                               "--storage-options", "[1]"])
    assert res.exit_code == 2 and "--storage-options must be a JSON object" in res.output


def test_help_is_the_field_docstring():
    docs = field_docs(TrainConfig)
    assert docs["holdout_frac"] == "Fraction of documents held out for evaluation."
    assert docs["features"].startswith(
        "Features per adapter; None: the paper's 8192 at width 3584 scaled to the store's width (the power")
    assert docs["resume"] == "Continue the run in --out from its checkpoint."
    assert f"as many whole passes as make {MIN_STEPS} steps" in docs["epochs"]
    assert field_docs(RefineConfig)["activation"] == "With --from-zero: relu or topk."
    text = CliRunner().invoke(main, ["train", "--help"], terminal_width=200).output
    assert "--dec-bias / --no-dec-bias" in text and "[default: 0.5]" in text and "--l1 FLOAT,..." in text
    assert "--cache" not in text  # former names work but are not advertised


def test_every_config_field_has_a_docstring():
    for path, cmd in CONFIG_COMMANDS:
        for leaf in _leaves(cmd.config_class):
            assert leaf.doc, f"{cmd.config_class.__name__}.{leaf.key} ({path}) has no docstring"
            assert dataclasses.is_dataclass(cmd.config_class)


def test_every_numeric_setting_declares_its_range():
    import typing

    for path, cmd in CONFIG_COMMANDS:
        cls = cmd.config_class
        for leaf in _leaves(cls):
            hint = str(leaf.hint)
            if ("int" in hint or "float" in hint) and "Literal" not in hint:
                assert "range" in leaf.field.metadata, f"{path}: --{leaf.key} declares no range"
        assert typing.get_type_hints(cls)


@pytest.mark.parametrize("argv, sentence", [
    (["train", "--store", "s", "--out", "r", "--features", "0"], "--features must be a positive integer; got 0."),
    (["train", "--store", "s", "--out", "r", "--batch", "0"], "--batch must be a positive integer; got 0."),
    (["train", "--store", "s", "--out", "r", "--lr", "0"], "--lr must be positive; got 0.0."),
    (["train", "--store", "s", "--out", "r", "--lr", "-1"], "--lr must be positive; got -1.0."),
    (["train", "--store", "s", "--out", "r", "--tokens", "-100"], "--tokens must be a positive integer; got -100."),
    (["train", "--store", "s", "--out", "r", "--epochs", "-1"], "--epochs must be positive; got -1.0."),
    (["train", "--store", "s", "--out", "r", "--holdout-frac", "1"],
     "--holdout-frac must be a fraction strictly between 0 and 1; got 1.0."),
    (["harvest", "--base", "b", "--target", "t", "--data", "d", "--out", "o", "--block-rows", "0"],
     "--block-rows must be a positive integer; got 0."),
    (["harvest", "--base", "b", "--target", "t", "--data", "d", "--out", "o", "--keep-frac", "0"],
     "--keep-frac must be a fraction in (0, 1]; got 0.0."),
    (["top", "i.duckdb", "--", "-1", "3"], "--layer must be at least 0; got -1."),
])
def test_out_of_range_settings_are_one_sentence(argv, sentence, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative outputs, were a refusal to come too late, land here
    res = CliRunner().invoke(main, argv)
    assert res.exit_code == 2 and res.output.strip().splitlines() == [f"error: {sentence}"], res.output


def test_the_python_api_refuses_the_same_values():
    from tca import TcaError

    with pytest.raises(TcaError, match="--features must be a positive integer; got 0"):
        TrainConfig(store="s", out="r", features=0)
    with pytest.raises(TcaError, match=r"--l1 must be positive; got -0.5"):
        TrainConfig(store="s", out="r", l1=[0.5, -0.5])
    assert TrainConfig(store="s", out="r", features=None).features is None  # None: the scaled default
