"""`make bench`'s 1B-class section: Llama-3.2-1B's shape with random bf16 weights on all three servers.

Nothing is downloaded but packages. The model is the built-in dummy shape `llama-3.2-1b` (tokenmill's
`core/loader/dummy.py`: 16 layers, hidden 2048, intermediate 8192, 32 heads, 8 KV heads, vocabulary
128,256, the head tied to the embeddings, 1.24 B parameters) in a folder with its `config.json` and Llama
3's own tokenizer, which Meta's `llama-models` package ships as tiktoken ranks: transformers'
`TikTokenConverter` turns it into a `tokenizer.json` (checked token for token against Meta's tiktoken
encoder on the perplexity text), with Llama 3's chat template. So the vocabulary is the config's, every
id a random model samples decodes, and prompts are tokenized as the real model's would be.

- tokenmill and vLLM serve the folder with `--load-format dummy --dtype bfloat16`;
- llama-server serves a bf16 GGUF of the same shape and tokenizer, written once with the `gguf` package
  (`benchmarks/random_gguf.py`): bf16 is what tokenmill runs a dummy model in, so all three read the
  same 2.47 GB of weights a decode step.

The load is the fixed one (streaming chat over `prompts.PROMPTS`, 128 tokens, ignore_eos) at 1, 16 and
64 streams. The report sets batch-1 ITL against the weight-bytes / bandwidth bound: a batch-1 step reads
every weight matrix once (the tied embedding once, as the head), at the read bandwidth `machine.py`
measures. This machine's bandwidth moves with its neighbours (38 to 74 GB/s between runs), so the
bandwidth is probed again just before each server's share of a pass, and each pass's ITL is set against
the bound of its own probe: the "× bound" figure is the median of those per-pass ratios.
"""

from __future__ import annotations

import inspect
import json
import statistics
from pathlib import Path
from typing import Callable

from benchmarks.cache import bench_cache
from benchmarks.servers import ServerSpec

SHAPE = "llama-3.2-1b"
LEVELS = ("1", "16", "64")
SERVED_NAME = "llama-1b-random"
GGUF_PRE_TOKENIZER = "llama-bpe"  # llama.cpp's name for Llama 3's pre-tokenizer
# Llama 3's chat template without the tool-calling branches (a chat turn renders as Meta's does).
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def llama3_tokenizer():
    """Llama 3's tokenizer as a transformers fast tokenizer, from the ranks in Meta's llama-models package."""
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from benchmarks.chat_mix import CORPUS

    meta = MetaTokenizer.get_instance()
    ranks = Path(inspect.getfile(MetaTokenizer)).parent / "tokenizer.model"
    backend = TikTokenConverter(vocab_file=str(ranks), pattern=meta.pat_str,
                                extra_special_tokens=list(meta.special_tokens)).converted()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>",
                                        eos_token="<|eot_id|>", chat_template=LLAMA3_CHAT_TEMPLATE)
    text = CORPUS.read_text()
    if (tokenizer.encode(text, add_special_tokens=False) != meta.encode(text, bos=False, eos=False)
            or tokenizer.convert_tokens_to_ids("<|eot_id|>") != meta.eot_id or len(tokenizer) != meta.n_words):
        raise RuntimeError("the converted Llama 3 tokenizer disagrees with Meta's tiktoken encoder")
    return tokenizer


def model_folder() -> Path:
    """The folder tokenmill and vLLM serve with `--load-format dummy`: config.json and Llama 3's tokenizer."""
    target = bench_cache() / f"{SHAPE}-shape"
    if (target / "config.json").exists():
        return target
    from tokenmill.loader.dummy import BUILTIN_SHAPES

    config = BUILTIN_SHAPES[SHAPE]
    tokenizer = llama3_tokenizer()
    if len(tokenizer) != config["vocab_size"]:
        raise RuntimeError(f"Llama 3's tokenizer has {len(tokenizer)} ids; the {SHAPE} shape {config['vocab_size']}")
    target.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(target)
    # The fields as the hub's config.json has them (rope_theta, rope_scaling), which every transformers
    # version a peer may pin reads; written last: its presence marks the folder complete.
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


def gguf_path(folder: Path) -> Path:
    """llama-server's model: the same shape and tokenizer as a random bf16 GGUF (written once, ~2.5 GB)."""
    path = bench_cache() / f"{SHAPE}-shape-bf16.gguf"
    if path.exists():
        return path
    from transformers import AutoConfig

    from benchmarks.random_gguf import write_random_gguf

    print(f"writing {path.name} (random bf16 weights, about a minute)", flush=True)
    return write_random_gguf(AutoConfig.from_pretrained(folder), folder, path, GGUF_PRE_TOKENIZER)


def decode_weight_bytes(folder: Path) -> int:
    """Bytes of weights a batch-1 bf16 decode step reads: every parameter once (the tied head included)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    return 2 * sum(p.numel() for p in model.parameters())


def _named(spec: ServerSpec) -> ServerSpec:
    """The spec under a name of its own (its log file), beside the main model's."""
    spec.name = f"{spec.name} ({SHAPE})"
    return spec


def tokenmill_spec(folder: Path) -> ServerSpec:
    from benchmarks.specs import tokenmill_spec as default_spec

    spec = _named(default_spec())
    spec.command += ["--model-id", str(folder), "--load-format", "dummy", "--dtype", "bfloat16"]
    return spec


def run_pass(servers: list[str], levels: list[str], run_server: Callable[[ServerSpec, list[str]], dict],
             run_llama_server: Callable[[Callable[[int], ServerSpec], list[str]], dict],
             probe_bandwidth_gbs: Callable[[], float] | None = None) -> dict:
    """One pass: each selected server in turn at `levels` (concurrencies; `LEVELS` by default), with the read
    bandwidth probed just before each (`read_bandwidth_gbs` in its entry) when `probe_bandwidth_gbs` is given."""
    from benchmarks.specs import llama_server_spec, vllm_spec

    folder = model_folder()
    results = {}
    for name in servers:
        bandwidth_gbs = probe_bandwidth_gbs() if probe_bandwidth_gbs else None
        if name == "tokenmill":
            results[name] = run_server(tokenmill_spec(folder), levels)
        elif name == "vllm":
            results[name] = run_server(vllm_spec(folder, served_name=SERVED_NAME, extra=["--load-format", "dummy"]),
                                       levels)
        elif name == "llama-server":
            gguf = gguf_path(folder)
            results[name] = run_llama_server(lambda slots: _named(llama_server_spec(gguf, slots)), levels)
        if bandwidth_gbs is not None and results.get(name):
            results[name]["read_bandwidth_gbs"] = round(bandwidth_gbs, 1)
    return results


def summarise(passes: list[dict], median_of_passes, bandwidth_gbs: float, weight_bytes: int) -> dict:
    """Medians per server and level across passes, and the batch-1 bound: `weight_bytes` (a decode step's,
    `decode_weight_bytes`) over the read bandwidth. Where the passes carry their own probes the bandwidth
    is their median and each server's `itl_over_bound` the median of its per-pass ratios; `bandwidth_gbs`
    (the run's one probe) stands in where they do not."""
    probes = [r["read_bandwidth_gbs"] for p in passes for r in p.values() if r and "read_bandwidth_gbs" in r]
    if probes:
        bandwidth_gbs = statistics.median(probes)
    servers = {}
    for name in passes[0]:
        runs = [p[name] for p in passes if p.get(name)]
        ratios = [r["levels"]["1"]["itl_p50_s"] * r.get("read_bandwidth_gbs", bandwidth_gbs) * 1e9 / weight_bytes
                  for r in runs if (r["levels"].get("1") or {}).get("itl_p50_s")]
        servers[name] = {
            "startup_s": statistics.median(r["startup_s"] for r in runs),
            "peak_rss_gib": max(r["peak_rss_gib"] for r in runs),
            "levels": {lv: median_of_passes([r["levels"][lv] for r in runs]) for lv in runs[0]["levels"]},
            "itl_over_bound": statistics.median(ratios) if ratios else None,
        }
    levels = list(next(iter(servers.values()))["levels"]) if servers else []
    return {"shape": SHAPE, "passes": len(passes), "levels": levels, "decode_weight_bytes": weight_bytes,
            "read_bandwidth_gbs": bandwidth_gbs, "bandwidth_probes_gbs": probes,
            "bound_itl_s": weight_bytes / (bandwidth_gbs * 1e9), "servers": servers, "raw": passes}


def _cell(value, scale: float = 1.0, digits: int = 1) -> str:
    return "–" if value is None else f"{value * scale:.{digits}f}"


def _probes_sentence(probes: list[float]) -> str:
    if not probes:
        return ""
    return (f" That bandwidth is the median of {len(probes)} probes, one before each server's share of a pass "
            f"({min(probes)} to {max(probes)} GB/s); \"× bound\" is the median of each pass's ITL over its own "
            "probe's bound.")


def report_lines(section: dict) -> list[str]:
    bound = section["bound_itl_s"]
    lines = ["## 1B-class model: Llama-3.2-1B's shape, random bf16 weights", "",
             f"`{section['shape']}` (`benchmarks/llama_1b.py`): 16 layers, hidden 2048, 32 heads / 8 KV heads, "
             "vocabulary 128,256 (Llama 3's tokenizer from Meta's `llama-models` package), tied head. tokenmill and "
             "vLLM: `--load-format dummy --dtype bfloat16`; llama-server: a random bf16 GGUF of the same shape. "
             f"Streaming chat, 128 output tokens, ignore_eos; medians of {section['passes']} pass(es). Batch-1 bound: "
             f"{section['decode_weight_bytes'] / 1e9:.2f} GB of weights a step at {section['read_bandwidth_gbs']} "
             f"GB/s = {1000 * bound:.1f} ms.{_probes_sentence(section.get('bandwidth_probes_gbs') or [])}", "",
             "| server | c=1 ITL p50 (ms) | × bound | " + " | ".join(f"c={lv} tok/s" for lv in section["levels"])
             + " | c=64 TTFT p99 (s) | start-up (s) | peak RSS (GiB) |",
             "|---|---|---|" + "---|" * len(section["levels"]) + "---|---|---|"]
    for name, entry in section["servers"].items():
        levels = entry["levels"]
        itl = (levels.get("1") or {}).get("itl_p50_s")
        throughput = " | ".join(_cell((levels.get(lv) or {}).get("output_tok_s")) for lv in section["levels"])
        over_bound = entry.get("itl_over_bound") or (itl / bound if itl else None)
        lines.append(f"| {name} | {_cell(itl, 1000)} | {_cell(over_bound, digits=2)}× | "
                     f"{throughput} | {_cell((levels.get('64') or {}).get('ttft_p99_s'), digits=2)} | "
                     f"{_cell(entry['startup_s'])} | {_cell(entry['peak_rss_gib'], digits=2)} |")
    ours = section["servers"].get("tokenmill", {}).get("levels", {})
    ratios = []
    for peer, level, key, label in (("llama-server", "1", "itl_p50_s", "c=1 ITL p50"),
                                    ("vllm", "64", "output_tok_s", "c=64 tok/s"),
                                    ("llama-server", "64", "output_tok_s", "c=64 tok/s")):
        mine = (ours.get(level) or {}).get(key)
        theirs = (section["servers"].get(peer, {}).get("levels", {}).get(level) or {}).get(key)
        if mine and theirs:
            ratios.append(f"{label} tokenmill / {peer}: {mine / theirs:.2f}×")
    lines += ["", ("Ratios: " + "; ".join(ratios) + ".") if ratios else "No peer ran: no ratios.", ""]
    return lines
