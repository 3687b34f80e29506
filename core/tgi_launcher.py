"""TGI launcher settings with no tokenmill counterpart: accepted where tokenmill already does what they
ask, refused at start otherwise.

TGI's `text-generation-launcher` reads every flag also from the environment variable of its name
upper-cased (`--max-waiting-tokens` and `MAX_WAITING_TOKENS`). A deployment moved from TGI keeps its
flags and its variables, so a setting tokenmill cannot honour must stop the start with a message
naming it, given either way: a server that starts but not as configured costs a day to notice.

The flags tokenmill implements are registered in `tokenmill.cli`, with their variables. The refused
ones are registered too, hidden from `--help`, so that giving one is answered with why instead of
"unrecognized arguments"; a name `tokenmill.cli` implements (now or later) is never refused.
"""

from __future__ import annotations

import argparse
import ipaddress
from dataclasses import dataclass
from typing import Callable, Mapping

FALSEY = ("", "0", "false", "no", "off", "n", "f")  # what clap reads as false for a boolean flag's variable


def _truthy(value: str) -> bool:
    return value.strip().lower() not in FALSEY


def _set(value: str) -> bool:
    return True


def switch(environ: Mapping[str, str], name: str) -> bool:
    """A TGI switch's variable, read as clap reads it: set, and not one of its false words."""
    return name in environ and _truthy(environ[name])


def listen_address(hostname: str | None) -> str:
    """HOSTNAME when it is an IP address. Docker and shells set it to the machine's name, which TGI's router
    cannot parse as an address either and replaces by 0.0.0.0; so does tokenmill."""
    try:
        return str(ipaddress.ip_address(hostname or ""))
    except ValueError:
        return "0.0.0.0"


def quantize_method(text: str) -> str:
    """`--quantize`: a method the backend offers (checked when the engine starts), or one of TGI's values.
    TGI's eetq is tokenmill's int8 (the same scheme: symmetric per-channel int8 weights, any model); its
    gptq, awq and compressed-tensors name the checkpoint's own format (the engine checks that it is); its
    bitsandbytes and marlin / exl2 checkpoints have no counterpart and are refused here, before anything loads."""
    if text in ("marlin", "exl2"):
        raise argparse.ArgumentTypeError(
            f"{text} checkpoints are not read; tokenmill reads GPTQ, AWQ, fp8 and compressed-tensors checkpoints "
            "(no --quantize needed), and quantizes any other as it loads: int8, int4 or fp8, as the backend offers")
    if text.startswith("bitsandbytes"):
        raise argparse.ArgumentTypeError(
            f"tokenmill has no bitsandbytes kernels ({text}); its own load-time methods are int8 (per-channel, "
            "TGI's eetq), int4 (group-wise) and fp8, as the backend offers")
    return {"eetq": "int8"}.get(text, text)


def usage_stats_level(text: str) -> str:
    if text not in ("on", "off", "no-stack"):
        raise argparse.ArgumentTypeError(f"choose on, off or no-stack, got {text!r}")
    return text


def add_accepted_flags(parser: argparse.ArgumentParser, flag: Callable, environ: Mapping[str, str]) -> None:
    """TGI flags accepted because tokenmill already behaves as they ask; each help says how. `flag` is the
    CLI's helper (name, variable, default, type, help)."""
    flag("--waiting-served-ratio", "WAITING_SERVED_RATIO", 0.3, float,
         help="accepted for TGI compatibility; like TGI with chunked prefill, it has no effect")
    flag("--max-waiting-tokens", "MAX_WAITING_TOKENS", 20, int,
         help="accepted for TGI compatibility; like TGI with chunked prefill, it has no effect: waiting "
              "requests join the next step")
    flag("--usage-stats", "USAGE_STATS", "on", usage_stats_level,
         help="accepted for TGI compatibility: tokenmill sends no usage statistics, whatever the value")
    parser.add_argument("--disable-grammar-support", action="store_true",
                        default=switch(environ, "DISABLE_GRAMMAR_SUPPORT"),
                        help="structured output (TGI's `grammar`, `response_format`, vLLM's `structured_outputs` "
                             "and `guided_*`) gets 422 \"grammar is not supported\" [env: DISABLE_GRAMMAR_SUPPORT]")
    parser.add_argument("--enable-prefill-logprobs", action="store_true",
                        default=switch(environ, "ENABLE_PREFILL_LOGPROBS"),
                        help="accepted for TGI compatibility: tokenmill always returns prompt logprobs when "
                             "asked (decoder_input_details) [env: ENABLE_PREFILL_LOGPROBS]")
    parser.add_argument("--json-output", action="store_true", default=argparse.SUPPRESS,
                        help="log one JSON object per line, also accepted before the command [env: JSON_OUTPUT]")
    parser.add_argument("--env", "-e", action="store_true",
                        help="print the backend report of `tokenmill env` at start, then serve (TGI's runtime report)")


@dataclass(frozen=True)
class Refused:
    """A TGI setting tokenmill does not support: `flag` None for a variable TGI reads without a flag."""

    env: str
    why: str
    flag: str | None = None
    takes_value: bool = True  # False: a switch (`--trust-remote-code`)
    refuse_if: Callable[[str], bool] = _set  # given the variable's text; switches are refused when true

    @classmethod
    def option(cls, flag: str, why: str, switch: bool = False) -> "Refused":
        env = flag.lstrip("-").replace("-", "_").upper()
        return cls(env, why, flag, not switch, _truthy if switch else _set)


REFUSED: tuple[Refused, ...] = (
    Refused.option("--validation-workers", "tokenmill tokenizes on the router's event loop; there is no pool of "
                                           "validation workers to size"),
    Refused.option("--trust-remote-code", "tokenmill runs only its own model implementations and never executes "
                                          "code from a model repository", switch=True),
    Refused.option("--prometheus-port", "tokenmill serves /metrics on the HTTP port (--port) only: scrape it "
                                        "there"),
    Refused.option("--shard-uds-path", "the launcher names its model server's socket itself"),
    Refused.option("--weights-cache-override", "give the folder that holds the weights as --model-id instead"),
    Refused.option("--disable-custom-kernels", "tokenmill's kernels come from its backend plugin and cannot be "
                                               "switched off; choose another backend with --backend", switch=True),
    Refused.option("--rope-scaling", "the RoPE scaling is read from the model's config.json (rope_scaling: "
                                     "linear or llama3) and cannot be overridden at start yet"),
    Refused.option("--rope-factor", "the RoPE scaling is read from the model's config.json (rope_scaling: "
                                    "linear or llama3) and cannot be overridden at start yet"),
    Refused.option("--ngrok", "tokenmill opens no ngrok tunnel; expose the port with your own", switch=True),
    Refused.option("--ngrok-authtoken", "tokenmill opens no ngrok tunnel; expose the port with your own"),
    Refused.option("--ngrok-edge", "tokenmill opens no ngrok tunnel; expose the port with your own"),
    Refused.option("--tokenizer-config-path", "the chat template is read from the model's own tokenizer files and "
                                              "cannot be replaced at start yet"),
    # Variables TGI's launcher or shards read that are no flag of its launcher.
    Refused("COMPUTE_TYPE", "tokenmill sets the x-compute-type header itself, to '<model servers>-<backend>'"),
    Refused("ATTENTION", "the backend plugin chooses the attention kernel"),
    Refused("USE_FLASH_ATTENTION", "the backend plugin chooses the attention kernel",
            refuse_if=lambda value: not _truthy(value)),
)


def add_refused_flags(parser: argparse.ArgumentParser) -> None:
    """Register REFUSED's flags on `parser`, hidden, except those it already implements."""
    known = set(parser._option_string_actions)  # noqa: SLF001 - argparse offers no public view of its options
    for item in REFUSED:
        if item.flag and item.flag not in known:
            parser.add_argument(item.flag, dest=_dest(item), default=None, help=argparse.SUPPRESS,
                                **({"metavar": "VALUE"} if item.takes_value else {"action": "store_const",
                                                                                  "const": "true"}))


def refusals(args: argparse.Namespace, environ: Mapping[str, str], implemented: set[str]) -> list[str]:
    """One message for each refused flag given in `args` or variable set in `environ`; `implemented`: the
    option strings `tokenmill serve` knows, which are never refused."""
    messages = []
    for item in REFUSED:
        if item.flag in implemented:
            continue
        given = getattr(args, _dest(item), None) if item.flag else None
        if given is not None:
            messages.append(f"{item.flag} is a TGI flag tokenmill does not support: {item.why}; remove it")
        elif item.env in environ and item.refuse_if(environ[item.env]):
            # The value is left out: it may be a secret (NGROK_AUTHTOKEN).
            messages.append(f"{item.env} is set, and it is a TGI setting tokenmill does not support: {item.why}; "
                            "unset it")
    return messages


def _dest(item: Refused) -> str:
    return f"refused_{item.env.lower()}"
