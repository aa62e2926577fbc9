"""Every command line is its typed config: each flag's default is the dataclass field's own (written once), and the
parsed flags build the config the library runs with."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import pytest

from colossal_llama.utils.cli import add_flags, config_from, flag, flag_fields


def _defaults(config_cls) -> dict:
    """The defaults of the flags that have one."""
    return {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
            for f in flag_fields(config_cls) if not f.metadata["required"]}


def _parsed(parser: argparse.ArgumentParser, argv: List[str], config_cls) -> dict:
    args = parser.parse_args(argv)
    return {f.name: getattr(args, f.name) for f in flag_fields(config_cls)}


def test_a_config_dataclass_makes_its_flags():
    @dataclass
    class Config:
        path: str = flag(help="required: no default")
        size: int = flag(3, help="a number", aliases=("--old_size",))
        names: List[str] = flag(["a"], help="one or more")
        words: Optional[List[str]] = flag(None, parse=lambda v: v.split(","), help="comma-separated")
        loud: bool = flag(False, help="a switch")
        bins: int = flag(10, name="num_bins_of_old", help="a flag named apart from its field")
        internal: List[int] = field(default_factory=list)  # not a flag

    parser = argparse.ArgumentParser()
    add_flags(parser, Config)
    assert {a.dest for a in parser._actions} == {"help", "path", "size", "names", "words", "loud", "bins"}
    with pytest.raises(SystemExit):
        parser.parse_args([])  # --path is required
    assert config_from(parser.parse_args(["--path", "p"]), Config, internal=[7]) == Config("p", internal=[7])
    argv = ["--path", "p", "--old_size", "5", "--names", "x", "y", "--words", "u,v", "--loud", "--num_bins_of_old",
            "2"]
    assert config_from(parser.parse_args(argv), Config) == Config("p", 5, ["x", "y"], ["u", "v"], True, 2)
    assert parser.parse_args(["--path", "p", "--loud", "False"]).loud is False


def test_evaluate_flags_default_to_their_configs():
    from colossal_llama.eval.bits_per_char import BpcConfig
    from colossal_llama.eval.cli import build_parser
    from colossal_llama.eval.multiple_choice import MCConfig

    assert _parsed(build_parser(), ["bpc", "--model_path", "m", "--data", "f"], BpcConfig) == _defaults(BpcConfig)
    assert _parsed(build_parser(), ["mc", "--model_path", "m"], MCConfig) == _defaults(MCConfig)
    mc = build_parser().parse_args(["mc", "--model_path", "m", "--subjects", "us foreign policy, marketing ,"])
    assert config_from(mc, MCConfig).subjects == ["us foreign policy", "marketing"]


def test_generation_flags_default_to_the_sampling_config():
    from colossal_llama.eval.web.server import build_parser as web_parser
    from colossal_llama.inference.cli import build_parser, sampling_from_args
    from colossal_llama.inference.generation import SamplingConfig

    for parser in (build_parser(), web_parser()):
        assert sampling_from_args(parser.parse_args(["--model_path", "m"])) == SamplingConfig()
    greedy = sampling_from_args(build_parser().parse_args(["--model_path", "m", "--do_sample", "False"]))
    assert greedy == SamplingConfig(do_sample=False)


def test_prepare_flags_default_to_their_configs(monkeypatch):
    from colossal_llama.dataset import cli
    from colossal_llama.dataset.config import PretrainPrepConfig, SFTPrepConfig

    seen = {}
    monkeypatch.setattr(cli, "_run_cli", lambda prepare, config: seen.update({type(config): config}) or 0)
    base = ["--data_input_dirs", "in", "--tokenizer_dir", "tok", "--data_output_dirs", "out"]
    cli.pretrain_main(base)
    cli.sft_main([*base, "--packing"])
    for config_cls in (PretrainPrepConfig, SFTPrepConfig):
        got = {f.name: getattr(seen[config_cls], f.name) for f in flag_fields(config_cls)}
        assert got == {**_defaults(config_cls), **({"packing": True} if config_cls is SFTPrepConfig else {})}


def test_mining_and_self_replay_flags_default_to_their_configs():
    from colossal_llama.inference.self_replay import ReplayConfig, build_parser
    from colossal_llama.tokenizer.mine_pieces import MineConfig, parse_args

    mined = parse_args(["--output", "o.jsonl", "--corpus", "a", "b"])
    assert {k: getattr(mined, k) for k in _defaults(MineConfig) if k != "corpus"} == \
        {k: v for k, v in _defaults(MineConfig).items() if k != "corpus"}
    assert (mined.output, mined.corpus) == (Path("o.jsonl"), [Path("a"), Path("b")])
    parsed = _parsed(build_parser(), ["--model_path", "m", "--output_dir", "o"], ReplayConfig)
    assert parsed == {**_defaults(ReplayConfig), "model_path": Path("m"), "output_dir": Path("o")}


def test_init_tokenizer_flags_default_to_the_config():
    from colossal_llama.tokenizer.init_tokenizer import InitTokenizerConfig, parse_args

    required = ["--source_tokenizer_dir", "s", "--target_tokenizer_dir", "t", "--expand_tokens_file", "p.jsonl"]
    assert parse_args(required) == InitTokenizerConfig(Path("s"), Path("t"), Path("p.jsonl"))
    cfg = parse_args([*required, "--no_component_chars", "--report_corpus", "a", "b", "--overwrite", "False"])
    assert (cfg.no_component_chars, cfg.report_corpus, cfg.overwrite) == (True, [Path("a"), Path("b")], False)


def test_init_model_flags_keep_the_original_names_and_default_to_the_config():
    from colossal_llama.model.init_model import InitModelConfig, build_parser

    args = build_parser().parse_args(["--source_model_and_tokenizer_path", "s", "--target_tokenizer_path", "t",
                                      "--target_model_path", "m"])
    assert config_from(args, InitModelConfig) == InitModelConfig(Path("s"), Path("t"), Path("m"))
    args = build_parser().parse_args(["--source_model_and_tokenizer_path", "s", "--target_tokenizer_path", "t",
                                      "--target_model_path", "m", "--overwrite", "--pad_vocab_to_multiple_of", "64"])
    assert config_from(args, InitModelConfig) == InitModelConfig(Path("s"), Path("t"), Path("m"), True, 64)


def test_export_model_from_config_and_plot_flags_default_to_their_configs(monkeypatch):
    from colossal_llama.model import from_config, gguf_export
    from colossal_llama.utils import plot_losses

    calls = []
    for module, name in ((gguf_export, "export_gguf_to_hf"), (from_config, "save_llama_from_config")):
        monkeypatch.setattr(module, name, lambda *args: calls.append(args))
        monkeypatch.setattr(module, "check_output_dir", lambda *args, **kwargs: None)
    monkeypatch.setattr(plot_losses, "read_scalars", lambda log_dir: {"train/loss": [(1, 2.0)]})
    monkeypatch.setattr(plot_losses, "plot_scalars", lambda series, output, title: calls.append((output, title))
                        or output)
    assert gguf_export.main(["--gguf_file", "m.gguf", "--output_dir", "o"]) == 0
    assert from_config.main(["--tokenizer_dir", "t", "--output_dir", "o"]) == 0
    assert plot_losses.main(["--log_dir", "runs"]) == 0
    assert calls == [(Path("m.gguf"), Path("o"), gguf_export.DEFAULT_DTYPE), (Path("t"), Path("o"), "small", 0),
                     (Path("runs") / "losses.png", None)]
    assert (_defaults(gguf_export.GgufExportConfig)["dtype"], _defaults(from_config.FromConfigConfig)["shape"]) == \
        ("float32", "small")
