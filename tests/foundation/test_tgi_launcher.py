"""Every flag of TGI's launcher, and the variable of each, is implemented by `tokenmill serve` or refused at
start with a message naming it: none is silently ignored (issue 17, item 4).

The list is TGI's `Args` (tests/foundation/data/tgi_launcher_args.txt, its source noted there). A setting
counts as implemented when giving it changes what `tokenmill serve` parses; as refused when the start-up
check names it.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import pytest

from tests.conftest import run_cli

ARGS_FILE = Path(__file__).parent / "data" / "tgi_launcher_args.txt"
SWITCH = None  # a flag that takes no value

# A valid value of each, unlike tokenmill's default, so an implemented setting shows in what is parsed.
SAMPLES = {
    "model_id": "org/name", "revision": "v1.0", "validation_workers": "3", "sharded": "false", "num_shard": "2",
    "quantize": "int8", "speculate": "2", "dtype": "bfloat16", "kv_cache_dtype": "fp8_e5m2",
    "trust_remote_code": SWITCH, "max_concurrent_requests": "7", "max_best_of": "3", "max_stop_sequences": "5",
    "max_top_n_tokens": "3", "max_input_tokens": "100", "max_input_length": "100", "max_total_tokens": "200",
    "waiting_served_ratio": "1.2", "max_batch_prefill_tokens": "512", "max_batch_total_tokens": "4096",
    "max_waiting_tokens": "5", "max_batch_size": "8", "cuda_graphs": "1,2", "hostname": "127.0.0.1", "port": "8080",
    "prometheus_port": "9001", "shard_uds_path": "/tmp/tgi-server", "master_addr": "10.0.0.2", "master_port": "29600",
    "huggingface_hub_cache": "/tmp/hub-cache", "weights_cache_override": "/tmp/weights",
    "disable_custom_kernels": SWITCH, "cuda_memory_fraction": "0.5", "rope_scaling": "linear", "rope_factor": "2.0",
    "json_output": SWITCH, "otlp_endpoint": "http://127.0.0.1:4317", "otlp_service_name": "my-service",
    "cors_allow_origin": "https://app.example", "api_key": "secret-key", "watermark_gamma": "0.4",
    "watermark_delta": "1.5", "ngrok": SWITCH, "ngrok_authtoken": "ngrok-token", "ngrok_edge": "edge-1",
    "tokenizer_config_path": "/tmp/tokenizer_config.json", "disable_grammar_support": SWITCH, "env": SWITCH,
    "max_client_batch_size": "2", "lora_adapters": "org/adapter-a", "usage_stats": "off", "payload_limit": "1000",
    "enable_prefill_logprobs": SWITCH, "graceful_termination_timeout": "5",
}
# TGI variables that are no launcher flag: LORA and friends aside, what TGI's launcher and shards read.
OTHER_VARIABLES = {"PREFIX_CACHING": "0", "LOG_LEVEL": "DEBUG", "COMPUTE_TYPE": "1-nvidia-a10g", "ATTENTION": "paged",
                   "USE_FLASH_ATTENTION": "false"}


def _tgi_args() -> list[tuple[str, bool]]:
    """(name, has a variable) for each field of TGI's Args."""
    rows = [line.split() for line in ARGS_FILE.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return [(row[0], "flag-only" not in row[1:]) for row in rows]


TGI_ARGS = _tgi_args()
ALL_VARIABLES = [name.upper() for name, has_env in TGI_ARGS if has_env] + list(OTHER_VARIABLES) + [
    "HOSTNAME", "PORT", "HF_TOKEN", "HF_HUB_OFFLINE", "HUGGINGFACE_HUB_CACHE", "MODEL_SERVERS"]


@pytest.fixture
def clean_env(monkeypatch):
    """None of TGI's variables set (HOSTNAME is, in most shells and every container)."""
    for name in ALL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _parse(argv: list[str]) -> argparse.Namespace:
    from tokenmill.cli import parse_args

    return parse_args(argv)


def _refusals(args: argparse.Namespace) -> list[str]:
    from tokenmill.cli import _implemented_options
    from tokenmill.tgi_launcher import refusals

    return refusals(args, os.environ, _implemented_options())


def _changed(args: argparse.Namespace, baseline: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if vars(baseline).get(k, "<absent>") != v}


def test_the_list_is_tgis_whole_args_and_each_has_a_sample() -> None:
    names = [name for name, _ in TGI_ARGS]
    assert len(names) == len(set(names)) == 54
    assert {"model_id", "max_waiting_tokens", "prometheus_port", "graceful_termination_timeout"} <= set(names)
    assert set(names) == set(SAMPLES)


@pytest.mark.parametrize("name", [name for name, _ in TGI_ARGS])
def test_each_tgi_flag_is_implemented_or_refused_naming_it(name, clean_env) -> None:
    flag = "--" + name.replace("_", "-")
    argv = ["serve", flag] + ([] if SAMPLES[name] is SWITCH else [SAMPLES[name]])
    args = _parse(argv)
    refused = _refusals(args)
    if refused:
        assert len(refused) == 1 and refused[0].startswith(f"{flag} is a TGI flag tokenmill does not support: ")
    else:
        assert _changed(args, _parse(["serve"])), f"{flag} {SAMPLES[name]} changes nothing tokenmill parses"


@pytest.mark.parametrize("name", [name.upper() for name, has_env in TGI_ARGS if has_env] + list(OTHER_VARIABLES))
def test_each_tgi_variable_is_implemented_or_refused_naming_it(name, clean_env) -> None:
    baseline = _parse(["serve"])
    value = OTHER_VARIABLES.get(name) or SAMPLES[name.lower()] or "true"
    clean_env.setenv(name, value)
    args = _parse(["serve"])
    refused = _refusals(args)
    if refused:
        assert len(refused) == 1 and refused[0].startswith(f"{name} is set, and it is a TGI setting tokenmill does "
                                                          "not support: ")
    else:
        assert _changed(args, baseline), f"{name}={value} changes nothing tokenmill parses"


@pytest.mark.parametrize(("name", "value"), [("TRUST_REMOTE_CODE", "false"), ("NGROK", "0"),
                                             ("DISABLE_CUSTOM_KERNELS", "no"), ("USE_FLASH_ATTENTION", "true")])
def test_a_refused_switch_set_to_what_tokenmill_does_starts(name, value, clean_env) -> None:
    clean_env.setenv(name, value)
    assert _refusals(_parse(["serve"])) == []


def test_variables_every_shell_has_never_stop_a_start(clean_env) -> None:
    clean_env.setenv("HOSTNAME", "build-host-7")  # bash's and Docker's: the machine's name
    clean_env.setenv("HF_TOKEN", "hf_x")
    clean_env.setenv("HUGGINGFACE_HUB_CACHE", "/data/hub")
    args = _parse(["serve"])
    assert _refusals(args) == []
    assert args.hostname == "0.0.0.0"  # TGI's router cannot parse a name either, and listens on 0.0.0.0
    clean_env.setenv("HOSTNAME", "10.1.2.3")
    clean_env.setenv("PORT", "8080")
    args = _parse(["serve"])
    assert (args.hostname, args.port) == ("10.1.2.3", 8080)
    assert _parse(["serve", "--hostname", "127.0.0.1", "-p", "9000"]).hostname == "127.0.0.1"


def test_legacy_max_input_length_is_max_input_tokens_and_a_contradiction_is_refused(clean_env, capsys) -> None:
    assert _parse(["serve", "--max-input-length", "300"]).max_input_tokens == 300
    with pytest.raises(SystemExit):
        _parse(["serve", "--max-input-length", "300", "--max-input-tokens", "200"])
    assert "contradicts --max-input-tokens 200" in capsys.readouterr().err


def test_cors_origins_come_from_the_variable_unless_flags_give_them(clean_env) -> None:
    clean_env.setenv("CORS_ALLOW_ORIGIN", "https://a.example,https://b.example")
    assert _parse(["serve"]).cors_allow_origin == ["https://a.example", "https://b.example"]
    assert _parse(["serve", "--cors-allow-origin", "https://c.example"]).cors_allow_origin == ["https://c.example"]


def test_the_launcher_forwards_revision_cache_and_service_name_to_its_model_server(clean_env) -> None:
    from tokenmill.cli import _model_server_args, build_parser

    serve = _parse(["serve", "--model-id", "org/name", "--revision", "v2", "--huggingface-hub-cache", "/data/hub",
                    "--otlp-service-name", "svc"])
    child = build_parser().parse_args(["model-server", *_model_server_args(serve)])
    assert (child.model_id, child.revision, child.huggingface_hub_cache, child.otlp_service_name) == (
        "org/name", "v2", "/data/hub", "svc")


def test_refused_settings_stop_the_start_naming_each_before_anything_loads(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ALL_VARIABLES}
    env.update(VALIDATION_WORKERS="3", NGROK_AUTHTOKEN="tok_do_not_print", TRUST_REMOTE_CODE="false")
    result = run_cli("serve", "--rope-factor", "2.0", "--trust-remote-code", "--port", "1", env=env, check=False)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("tokenmill serve: ")]
    assert [re.match(r"tokenmill serve: (\S+)", line).group(1) for line in lines] == [
        "VALIDATION_WORKERS", "--trust-remote-code", "--rope-factor", "NGROK_AUTHTOKEN"]
    assert "tok_do_not_print" not in result.stderr
    assert "model server" not in result.stderr  # refused before anything started


@pytest.mark.parametrize(("value", "message"), [
    ("marlin", "marlin checkpoints are not read"),
    ("exl2", "exl2 checkpoints are not read"),
    ("bitsandbytes-nf4", "tokenmill has no bitsandbytes kernels (bitsandbytes-nf4)"),
])
def test_tgi_quantize_values_without_a_counterpart_are_refused_as_flag_or_variable(value, message, clean_env,
                                                                                   capsys) -> None:
    with pytest.raises(SystemExit):
        _parse(["serve", "--quantize", value])
    assert message in capsys.readouterr().err
    clean_env.setenv("QUANTIZE", value)
    with pytest.raises(SystemExit):
        _parse(["serve"])
    assert "--quantize" in capsys.readouterr().err


def test_kv_cache_dtype_takes_vllm_values_and_alias_as_flag_or_variable(clean_env, capsys) -> None:
    assert _parse(["serve", "--kv-cache-dtype", "fp8"]).kv_cache_dtype == "fp8_e4m3"  # vLLM's alias
    clean_env.setenv("KV_CACHE_DTYPE", "int8")
    assert _parse(["serve"]).kv_cache_dtype == "int8"
    with pytest.raises(SystemExit):
        _parse(["serve", "--kv-cache-dtype", "fp4"])
    assert "auto, bfloat16, fp8_e4m3, fp8_e5m2, int8" in capsys.readouterr().err


def test_tgi_quantize_values_with_a_counterpart_and_dtypes_parse(clean_env, capsys) -> None:
    assert _parse(["serve", "--quantize", "eetq"]).quantize == "int8"  # the same per-channel int8 scheme
    assert _parse(["serve", "--quantize", "fp8", "--dtype", "float16"]).quantize == "fp8"
    with pytest.raises(SystemExit):
        _parse(["serve", "--dtype", "float8"])
    assert "choose auto, float32, bfloat16, float16" in capsys.readouterr().err
