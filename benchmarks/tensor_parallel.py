"""`make bench`'s tensor-parallel section: 1 shard against 2 shards on this machine, one core per rank.

The embedded SmolLM2-135M cannot be sharded over 2 ranks: its 9 attention heads only split over 1 or 3
(`tokenmill serve --num-shard 2` refuses it, naming those counts), and 3 ranks on 2 cores would measure
oversubscription. So the section serves SmolLM2's exact shape regrouped into 12 heads of 48 (4 kv
heads): every weight matrix, the KV bytes per token and the FLOPs of a step are SmolLM2's, and it splits
over 2 ranks. Weights are random (`--load-format dummy`, bf16, SmolLM2's tokenizer and chat template):
the timing of a fixed-length ignore_eos run does not depend on them, but they are dense bf16, not the
GGUF's Q4_1 blocks the default server reads, so absolute figures sit above the main table's.

Three configurations alternate within each pass: 1 shard on both cores (what `tokenmill serve` does by
default), 1 shard on one core (the same compute per core as a rank has), and 2 shards pinned one core
per rank. The micro-benchmark `benchmarks/micro/tensor_parallel.py` then times the decode step in
process and the share of it spent in collectives.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.cache import bench_cache
from benchmarks.servers import ServerSpec, free_port

LEVELS = ("1", "16")
# name -> extra `tokenmill serve` flags; the order is the order within a pass.
CONFIGS = {
    "1 shard, 2 cores": [],
    "1 shard, 1 core": ["--num-shard", "1", "--cpu-bind", "0"],
    "2 shards, 1 core each": ["--num-shard", "2", "--cpu-bind", "0|1"],
}
BASELINES = ("1 shard, 2 cores", "1 shard, 1 core")
SHARDED = "2 shards, 1 core each"
HEADS, KV_HEADS = 12, 4  # 12 x 48 = 576 and 4 x 48 = 192: SmolLM2's q and k/v widths


def model_folder() -> Path:
    """A folder `--load-format dummy` reads: SmolLM2's config with 12 heads of 48, and its tokenizer."""
    target = bench_cache() / f"smollm2-shape-{HEADS}x{576 // HEADS}"
    if (target / "config.json").exists():
        return target
    from tokenmill.loader import default_model_path, load_tokenizer
    from tokenmill.loader.gguf_file import GGUFFile
    from tokenmill.loader.gguf_loader import config_from_gguf

    config = config_from_gguf(GGUFFile(default_model_path()))
    hidden, kv_width = config.hidden_size, config.num_key_value_heads * config.hidden_size // config.num_attention_heads
    if hidden % HEADS or kv_width != KV_HEADS * hidden // HEADS:
        raise RuntimeError(f"the embedded model's shape changed (hidden {hidden}, kv width {kv_width}); "
                           f"{HEADS} heads / {KV_HEADS} kv heads no longer keep its matrices")
    config.num_attention_heads, config.num_key_value_heads = HEADS, KV_HEADS
    config.torch_dtype = "bfloat16"
    target.mkdir(parents=True, exist_ok=True)
    load_tokenizer().save_pretrained(target)
    config.save_pretrained(target)  # written last: its presence marks the folder complete
    return target


def server_spec(name: str, folder: Path) -> ServerSpec:
    port = free_port()
    tokenmill = Path(sys.executable).parent / "tokenmill"
    return ServerSpec(
        name=f"tokenmill-tp ({name})",
        command=[str(tokenmill), "serve", "--hostname", "127.0.0.1", "--port", str(port), "--grpc-port",
                 str(free_port()), "--model-id", str(folder), "--load-format", "dummy", "--dtype", "bfloat16",
                 # every run gets its own rendezvous port: a rank of the last run may still hold the default
                 "--master-port", str(free_port()), *CONFIGS[name]],
        model="tokenmill",
        port=port,
    )


def run_pass(run_server) -> dict:
    """One pass: every configuration in turn, each through `run_server(spec, levels)`."""
    folder = model_folder()
    return {name: run_server(server_spec(name, folder), list(LEVELS)) for name in CONFIGS}


def run_micro(passes: int) -> dict | None:
    """The in-process step timing (its own processes: it pins ranks to cores); None if it failed."""
    with tempfile.TemporaryDirectory() as scratch:  # its figures go into the run's own JSON
        path = Path(scratch) / "micro.json"
        command = [sys.executable, "-m", "benchmarks.micro.tensor_parallel", "--passes", str(passes),
                   "--json", str(path)]
        if subprocess.run(command).returncode != 0 or not path.exists():
            print("tensor-parallel micro-benchmark failed; the report goes without it", flush=True)
            return None
        return json.loads(path.read_text())


def summarise(passes: list[dict], median_of_passes) -> dict:
    """Medians per configuration and level across passes, with the raw passes kept."""
    configs = {}
    for name in CONFIGS:
        runs = [p[name] for p in passes if name in p]
        configs[name] = {
            "flags": " ".join(CONFIGS[name]) or "(defaults)",
            "startup_s": median_of_passes([{"v": r["startup_s"]} for r in runs])["v"],
            "peak_rss_gib": max(r["peak_rss_gib"] for r in runs),
            "levels": {lv: median_of_passes([r["levels"][lv] for r in runs]) for lv in runs[0]["levels"]},
            "raw": runs,
        }
    return {"model": f"SmolLM2-135M's shape as {HEADS} heads / {KV_HEADS} kv heads, random bf16 weights",
            "levels": list(LEVELS), "passes": len(passes), "configs": configs}
