"""`tokenmill env` and `tokenmill conformance` as a user runs them, in subprocesses; engine flags parsed in-process."""

from __future__ import annotations

import json
import re
import os
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import run_cli

ACCELERATORS = ("cuda", "rocm", "xpu", "gaudi", "neuron", "tpu")


def test_env_lists_every_plugin_and_chooses_cpu() -> None:
    report = json.loads(run_cli("env", "--json").stdout)
    plugins = {p["name"]: p for p in report["plugins"]}
    assert {"cpu", *ACCELERATORS} <= set(plugins)
    assert report["chosen"]["name"] == "cpu"
    assert plugins["cpu"]["usable"] and plugins["cpu"]["devices"]
    for name in ACCELERATORS:
        assert not plugins[name]["usable"]
        assert plugins[name]["reason"]
        assert plugins[name]["install"] == f"pip install 'tokenmill[{name}]'"
    assert report["versions"]["torch"].startswith("2.")


def test_env_text_names_the_choice_and_the_reasons() -> None:
    text = run_cli("env").stdout
    assert "Chosen backend: cpu" in text
    assert "pip install 'tokenmill[cuda]'" in text


def test_env_var_forces_a_backend_and_fails_clearly_when_unusable() -> None:
    env = {**os.environ, "TOKENMILL_BACKEND": "cuda"}
    report = json.loads(run_cli("env", "--json", env=env).stdout)
    assert report["chosen"]["name"] is None
    assert "not usable" in report["chosen"]["reason"]


def _write_fake_distribution(root: Path, name: str, module_source: str) -> None:
    """An installed-looking distribution on PYTHONPATH: a module plus its entry point metadata."""
    (root / f"{name}.py").write_text(textwrap.dedent(module_source))
    dist_info = root / f"{name}-0.0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0.1\n")
    (dist_info / "entry_points.txt").write_text(f"[tokenmill.backends]\n{name} = {name}\n")


def test_broken_out_of_tree_plugins_are_refused_and_the_process_survives(tmp_path: Path) -> None:
    _write_fake_distribution(tmp_path, "typo_vendor", """
        from tokenmill import hookimpl
        @hookimpl
        def tokenmill_discover():
            raise RuntimeError("no driver")
        @hookimpl
        def tokenmill_attention(spec):
            return None
    """)
    _write_fake_distribution(tmp_path, "raising_vendor", """
        from tokenmill import hookimpl
        @hookimpl
        def tokenmill_discover():
            raise RuntimeError("driver exploded")
    """)
    _write_fake_distribution(tmp_path, "unimportable_vendor", "import a_module_that_does_not_exist\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = run_cli("env", "--json", env=env)
    plugins = {p["name"]: p for p in json.loads(result.stdout)["plugins"]}
    assert plugins["typo_vendor"]["status"] == "refused at load"
    assert "tokenmill_attention" in plugins["typo_vendor"]["reason"]
    assert "backend plugin 'typo_vendor'" in result.stderr  # the log names the refused plugin
    assert plugins["raising_vendor"]["status"] == "discovery failed"
    assert "driver exploded" in plugins["raising_vendor"]["reason"]
    assert plugins["unimportable_vendor"]["status"] == "refused at load"
    assert json.loads(result.stdout)["chosen"]["name"] == "cpu"


def test_conformance_passes_on_cpu() -> None:
    result = run_cli("conformance", "--backend", "cpu", "-q")
    assert " passed" in result.stdout and "failed" not in result.stdout


def test_conformance_refuses_an_unusable_backend() -> None:
    result = run_cli("conformance", "--backend", "tpu", check=False)
    assert result.returncode != 0
    assert "tpu" in result.stderr and "not usable" in result.stderr


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "tokenmill"
    assert script.exists()


# ---- engine options the GPU backends read, parsed in-process ----------------------------------------

ENGINE_ENV = ("CUDA_MEMORY_FRACTION", "CUDA_GRAPHS", "LOAD_FORMAT")


def _parsed_engine_config(argv: list[str]):
    from tokenmill.cli import _engine_config, build_parser

    return _engine_config(build_parser().parse_args(["model-server", *argv]))


def test_gpu_engine_flags_default_like_tgi(monkeypatch) -> None:
    for name in ENGINE_ENV:
        monkeypatch.delenv(name, raising=False)
    config = _parsed_engine_config([])
    assert (config.memory_fraction, config.graph_batch_sizes, config.load_format) == (1.0, None, "auto")


def test_gpu_engine_flags_and_vllm_alias_parse_into_engine_config(monkeypatch) -> None:
    for name in ENGINE_ENV:
        monkeypatch.delenv(name, raising=False)
    config = _parsed_engine_config(["--cuda-memory-fraction", "0.85", "--cuda-graphs", "8,1,2,4,2",
                                    "--load-format", "dummy", "--model-id", "llama-3-8b"])
    assert (config.memory_fraction, config.graph_batch_sizes, config.load_format) == (0.85, (1, 2, 4, 8), "dummy")
    assert _parsed_engine_config(["--gpu-memory-utilization", "0.6"]).memory_fraction == 0.6
    assert _parsed_engine_config(["--cuda-graphs", "0"]).graph_batch_sizes == ()


def test_gpu_engine_env_vars_parse_and_flags_win(monkeypatch) -> None:
    monkeypatch.setenv("CUDA_MEMORY_FRACTION", "0.5")
    monkeypatch.setenv("CUDA_GRAPHS", "0")
    monkeypatch.setenv("LOAD_FORMAT", "dummy")
    config = _parsed_engine_config([])
    assert (config.memory_fraction, config.graph_batch_sizes, config.load_format) == (0.5, (), "dummy")
    config = _parsed_engine_config(["--cuda-memory-fraction", "0.9", "--cuda-graphs", "1,2"])
    assert (config.memory_fraction, config.graph_batch_sizes) == (0.9, (1, 2))


def test_the_launcher_forwards_gpu_engine_flags_to_its_model_server(monkeypatch) -> None:
    from tokenmill.cli import _engine_config, _model_server_args, build_parser

    for name in ENGINE_ENV:
        monkeypatch.delenv(name, raising=False)
    for graphs in ("1,2,4", "0"):
        serve = build_parser().parse_args(["serve", "--gpu-memory-utilization", "0.7", "--cuda-graphs", graphs,
                                           "--load-format", "dummy", "--model-id", "llama-3-8b"])
        forwarded = _model_server_args(serve)
        child = build_parser().parse_args(["model-server", *forwarded])
        assert _engine_config(child) == _engine_config(serve)


@pytest.mark.parametrize(("argv", "message"), [
    (["--cuda-memory-fraction", "1.5"], "fraction in (0, 1]"),
    (["--cuda-memory-fraction", "0"], "fraction in (0, 1]"),
    (["--cuda-graphs", "1,x"], "batch sizes such as 1,2,4,8"),
    (["--cuda-graphs", "-1"], "batch sizes such as 1,2,4,8"),
    (["--load-format", "npcache"], "choose auto or dummy"),
])
def test_bad_gpu_engine_values_are_refused_with_what_is_allowed(argv, message, capsys, monkeypatch) -> None:
    for name in ENGINE_ENV:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit):
        _parsed_engine_config(argv)
    assert message in capsys.readouterr().err


def test_a_bad_env_value_is_reported_like_a_bad_flag(capsys, monkeypatch) -> None:
    monkeypatch.setenv("CUDA_GRAPHS", "all")
    with pytest.raises(SystemExit):
        _parsed_engine_config([])
    assert "--cuda-graphs" in capsys.readouterr().err


# ---- tensor-parallel flags ------------------------------------------------------------------------

SHARD_ENV = ("NUM_SHARD", "SHARDED", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_SHARDS", "CPU_BIND",
             "RENDEZVOUS_TIMEOUT")


@pytest.fixture
def no_shard_env(monkeypatch):
    for name in SHARD_ENV + ENGINE_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_cpu_bind_parses_one_core_list_per_rank() -> None:
    from tokenmill.cli import cpu_sets

    assert cpu_sets("0-15|16-31") == (tuple(range(16)), tuple(range(16, 32)))
    assert cpu_sets("0,2-3, 8|1") == ((0, 2, 3, 8), (1,))
    assert cpu_sets("5") == ((5,),)


@pytest.mark.parametrize("text", ["", "0-3|", "a-b", "3-1", "-1", "0,,1"])
def test_bad_cpu_bind_is_refused_with_an_example(text, capsys, no_shard_env) -> None:
    with pytest.raises(SystemExit):
        _parsed_engine_config(["--cpu-bind", text])
    assert "such as 0-15|16-31" in capsys.readouterr().err


def test_shard_flags_default_to_one_rank(no_shard_env) -> None:
    config = _parsed_engine_config([])
    assert (config.num_shard, config.rank, config.local_shards, config.node_rank) == (1, 0, None, 0)
    assert (config.master_addr, config.master_port, config.rendezvous_timeout_s, config.cpu_bind) == (
        "127.0.0.1", 29500, 120.0, ())


def test_shard_env_vars_parse_like_tgi_and_flags_win(no_shard_env) -> None:
    no_shard_env.setenv("NUM_SHARD", "4")
    no_shard_env.setenv("MASTER_ADDR", "10.0.0.7")
    no_shard_env.setenv("MASTER_PORT", "29999")
    no_shard_env.setenv("LOCAL_SHARDS", "2")
    no_shard_env.setenv("NODE_RANK", "1")
    no_shard_env.setenv("CPU_BIND", "0-7|8-15")
    config = _parsed_engine_config([])
    assert (config.num_shard, config.local_shards, config.node_rank, config.rank, config.local_rank) == (4, 2, 1, 2, 0)
    assert (config.master_addr, config.master_port) == ("10.0.0.7", 29999)
    assert config.cpu_bind == (tuple(range(8)), tuple(range(8, 16)))
    config = _parsed_engine_config(["--num-shard", "2", "--local-shards", "2", "--node-rank", "0",
                                    "--master-port", "29600", "--rendezvous-timeout", "5"])
    assert (config.num_shard, config.local_shards, config.rank, config.master_port) == (2, None, 0, 29600)
    assert config.rendezvous_timeout_s == 5.0


@pytest.mark.parametrize(("argv", "message"), [
    (["--num-shard", "4", "--local-shards", "3"], "must divide --num-shard 4"),
    (["--num-shard", "4", "--local-shards", "2", "--node-rank", "2"], "--node-rank must be in 0..1"),
    (["--num-shard", "2", "--cpu-bind", "0-3"], "1 core lists for 2 ranks"),
    (["--num-shard", "2", "--sharded", "false"], "--sharded false contradicts --num-shard 2"),
    (["--sharded", "true"], "--sharded true needs at least 2 devices; backend 'cpu' has 1"),
])
def test_inconsistent_shard_flags_are_refused_saying_what_fits(argv, message, no_shard_env) -> None:
    from tokenmill.errors import ValidationError

    with pytest.raises(ValidationError, match=re.escape(message)):
        _parsed_engine_config(["--backend", "cpu", *argv])


def test_sharded_alone_means_one_rank_per_device_and_false_means_one(no_shard_env) -> None:
    assert _parsed_engine_config(["--sharded", "false"]).num_shard == 1
    assert _parsed_engine_config(["--sharded", "true", "--num-shard", "3"]).num_shard == 3


def test_the_launcher_forwards_the_kv_cache_dtype_to_its_model_server(monkeypatch) -> None:
    from tokenmill.cli import _engine_config, _model_server_args, build_parser

    monkeypatch.delenv("KV_CACHE_DTYPE", raising=False)
    serve = build_parser().parse_args(["serve", "--kv-cache-dtype", "fp8"])
    child = build_parser().parse_args(["model-server", *_model_server_args(serve)])
    assert _engine_config(child) == _engine_config(serve)
    assert _engine_config(child).kv_cache_dtype == "fp8_e4m3"


def test_the_launcher_forwards_shard_flags_to_its_model_server(no_shard_env) -> None:
    from tokenmill.cli import _engine_config, _model_server_args, build_parser

    serve = build_parser().parse_args(["serve", "--num-shard", "2", "--cpu-bind", "0-1|2,3", "--master-port", "29700",
                                       "--master-addr", "10.1.1.1", "--rendezvous-timeout", "9", "--sharded", "true"])
    child = build_parser().parse_args(["model-server", *_model_server_args(serve)])
    assert _engine_config(child) == _engine_config(serve)


def test_a_rank_gets_its_engine_config_exactly(no_shard_env) -> None:
    from tokenmill.shard import config_from_json, config_to_json

    config = _parsed_engine_config(["--num-shard", "2", "--cpu-bind", "0|1", "--cuda-graphs", "1,2",
                                    "--model-id", "/models/x"])
    assert config_from_json(config_to_json(config)) == config


def test_the_rank_subcommand_is_not_offered_to_users() -> None:
    from tokenmill.cli import build_parser

    assert "shard-worker" not in build_parser().format_help()


def test_routing_defaults_to_prefix_and_is_set_by_flag_or_variable(capsys, monkeypatch) -> None:
    from tokenmill.cli import build_parser

    for name in ("ROUTING", "ROUTING_MAX_IMBALANCE"):
        monkeypatch.delenv(name, raising=False)
    args = build_parser().parse_args(["serve"])
    assert (args.routing, args.routing_max_imbalance) == ("prefix", 4)
    monkeypatch.setenv("ROUTING", "least-loaded")
    assert build_parser().parse_args(["serve"]).routing == "least-loaded"
    args = build_parser().parse_args(["serve", "--routing", "prefix", "--routing-max-imbalance", "0"])
    assert (args.routing, args.routing_max_imbalance) == ("prefix", 0)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--routing", "round-robin"])
    assert "choose prefix, least-loaded" in capsys.readouterr().err
