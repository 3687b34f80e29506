"""One prepared run for a lent GPU: conformance, greedy identity with transformers, latency and throughput.

    python -m benchmarks.gpu_check --out DIR                        on the GPU, after gpu_wheels.sh --install
    python -m benchmarks.gpu_check --out DIR --backend cpu --smoke  here: the same flow on tiny shapes

Writes `DIR/gpu_check.json` and `DIR/GPU_REPORT.md` after every measurement, and the children's output
to `DIR/gpu_check.log`. Each heavy step runs in a child process under a time limit carved out of one
overall budget, so a hung kernel or a slow step costs that step only and what was measured stays on
disk. Every step records its own failure and the run goes on.

On the device tool, after `benchmarks/gpu_wheels.sh` ran here, two calls back to back (the machine
stays warm about 30 s between them; if it went back, SmolLM2's steps say so and the rest runs):
    1. carry ["shared-wheels/model-a"], timeout_s 60:  ls -l shared-wheels/model-a
    2. carry ["shared-wheels/wheels", "shared-wheels/model-b"], timeout_s 590:
       set -o pipefail; make gpu-check OUT=$OUT 2>&1 | tee $OUT/make.log
A rerun of some steps only: make gpu-check OUT=$OUT ARGS="--steps llama8b --budget-s 200".
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from benchmarks.gpu_report import Results

ROOT = Path(__file__).resolve().parent.parent
# SmolLM2's config.json, saved by gpu_wheels.sh: its shape, for when the model's wheel did not arrive.
SMOLLM2_SHAPE = ROOT / "shared-wheels" / "wheels" / "smollm2-shape"
LOG_NAME = "gpu_check.log"

# Seconds each step may take on the GPU, each also capped by what is left of --budget-s.
STEP_LIMITS = {"conformance": 150, "tiny": 75, "smollm2": 150, "llama8b": 200}
SMOKE_LIMIT = 300  # generous: the smoke run shares a small CPU with whatever else runs there
STEPS = ("machine", "conformance", "tiny", "smollm2", "llama8b")
SECTIONS = {"tiny": ("identity_tiny",), "smollm2": ("identity_smollm2", "throughput_smollm2"),
            "llama8b": ("decode_latency_8b", "throughput_8b")}


@dataclass(frozen=True)
class Settings:
    out: Path
    backend: str
    smoke: bool
    deadline: float  # epoch seconds: a child starts no new measurement past it


def describe_machine(settings: Settings, record) -> None:
    import torch
    import transformers

    record("python", platform.python_version())
    record("torch", torch.__version__)
    record("cuda (torch build)", torch.version.cuda)
    record("transformers", transformers.__version__)
    try:
        import triton

        record("triton", triton.__version__)
    except ImportError:
        record("triton", "not installed")
    record("cpu cores", os.cpu_count())
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        record("gpu", props.name)
        record("gpu memory GiB", round(props.total_memory / 2**30, 1))
        record("compute capability", f"{props.major}.{props.minor}")
        record("multiprocessors", props.multi_processor_count)
    else:
        record("gpu", "none visible to torch")


def summarise_pytest(output: str) -> dict[str, int]:
    """Counts from pytest's last summary line ("3 failed, 95 passed, 1 skipped in 20.1s")."""
    lines = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    counts: dict[str, int] = {}
    last = lines[-1] if lines else ""
    for number, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed)", last):
        counts["errors" if word.startswith("error") else word] = int(number)
    return counts


def run_conformance(settings: Settings, record, limit: float) -> str:
    # Smoke: the discovery cases alone; the CPU backend's full suite is `make test`'s job.
    args = ["conformance", "--backend", settings.backend, "-q", *(["-k", "discovery"] if settings.smoke else [])]
    command = [sys.executable, "-m", "tokenmill.cli", *args]
    record("command", "tokenmill " + " ".join(args))
    status, output = run_child(command, settings, limit)
    record("exit_code", status)
    for key, value in summarise_pytest(output).items():
        record(key, value)
    if status != 0:
        record("failure_tail", "\n".join(output.splitlines()[-60:]))
    return "ok" if status == 0 else ("timeout" if status == "timeout" else "failed")


def has_errors(value) -> bool:
    """Whether a section holds a recorded failure at any depth (keys ending in "error", skipped levels)."""
    if isinstance(value, dict):
        return any(str(k).endswith("error") or has_errors(v) for k, v in value.items())
    return isinstance(value, str) and value.startswith("skipped")


def run_child(command: list[str], settings: Settings, limit: float) -> tuple[int | str, str]:
    """Run `command` in its own session under `limit` seconds; its output goes to the log and is returned."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(settings.out / LOG_NAME, "a") as log:
        log.write(f"\n$ {' '.join(command)}\n")
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=max(1.0, limit))
        status: int | str = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: Triton and inductor compile in workers
        output, _ = proc.communicate()
        status = "timeout"
    with open(settings.out / LOG_NAME, "a") as log:
        log.write(output or "")
    return status, output or ""


# ---- the children: one process per model, so a model's load is shared by the steps that use it -------


def child_tiny(settings: Settings, results: Results) -> None:
    from benchmarks.gpu_identity import identity_tiny

    identity_tiny(settings.backend, settings.smoke, results.recorder("identity_tiny"))


def _smollm2_source(reference):
    """The engine's (model_id, load_format), the model's config, and how to get transformers' bf16 model.

    The embedded GGUF when installed (transformers' model is identity's reference, or built the same
    way); otherwise SmolLM2's shape with random weights on both sides, so the numbers still come.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from benchmarks.gpu_identity import smollm2_reference
    from tokenmill.loader import ModelNotFoundError, default_model_path, load_checkpoint

    try:
        default_model_path()
    except ModelNotFoundError:
        config = AutoConfig.from_pretrained(str(SMOLLM2_SHAPE))

        def random_model(device):
            with torch.device(device):
                return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()

        return str(SMOLLM2_SHAPE), "dummy", config, random_model
    if reference is None:
        checkpoint = load_checkpoint(None, torch.float32, progress=False)
        reference = smollm2_reference(checkpoint)
    return None, "auto", reference.config, lambda device: reference.to(device, torch.bfloat16)


def child_smollm2(settings: Settings, results: Results) -> None:
    from benchmarks.gpu_identity import identity_smollm2_bfloat16, identity_smollm2_float32
    from benchmarks.gpu_throughput import Workload, cache_bytes, throughput
    from tokenmill.engine import EngineConfig

    identity = results.recorder("identity_smollm2")
    reference = None
    try:
        reference, prompts, expected = identity_smollm2_float32(settings.backend, settings.smoke, identity)
    except Exception as exc:  # the benchmark below still runs, on random weights if the model is absent
        identity("error", f"{type(exc).__name__}: {exc}")

    def bf16_identity(engine) -> None:
        """On the benchmark's bf16 engine: one SmolLM2 load fewer."""
        if reference is None:
            return
        try:
            identity_smollm2_bfloat16(engine, reference, prompts, expected, identity)
        except Exception as exc:  # the float32 results above stand on their own
            identity("bfloat16_error", f"{type(exc).__name__}: {exc}")

    record = results.recorder("throughput_smollm2")
    model_id, load_format, config, hf_model = _smollm2_source(reference)
    record("weights", "the embedded GGUF" if load_format == "auto" else "random, SmolLM2's shape (model absent)")
    work = Workload((1, 4), 16, 8, 256) if settings.smoke else Workload((1, 16, 64, 256), 128, 128, 8192)
    throughput(EngineConfig(model_id=model_id, load_format=load_format, dtype="bfloat16", backend=settings.backend,
                            kv_cache_bytes=cache_bytes(config, work), max_num_seqs=max(work.levels),
                            max_num_batched_tokens=work.max_num_batched_tokens, progress=False),
               hf_model, work, settings.deadline, record, first=bf16_identity)


def child_llama8b(settings: Settings, results: Results) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks.gpu_throughput import Workload, cache_bytes, copy_bandwidth, decode_latency, throughput
    from tokenmill.engine import EngineConfig
    from tokenmill.loader.dummy import dummy_config

    latency_record = results.recorder("decode_latency_8b")
    bandwidth = copy_bandwidth(torch.device("cuda", torch.cuda.current_device()))
    latency_record("measured copy bandwidth TB/s (read+write)", round(bandwidth / 1e12, 3))
    config = dummy_config("llama-3-8b")[0]
    work = Workload((1, 16, 64, 256), 128, 128, 8192)

    def latency(engine) -> None:
        try:
            weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
            latency_record("weights GB", round(weights / 1e9, 3))
            latency_record("bound ms at measured bandwidth", round(1e3 * weights / bandwidth, 3))
            latency_record("bound ms at 4.3 TB/s", round(1e3 * weights / 4.3e12, 3))
            decode_latency(engine, 128, 64, latency_record)
            median = results.load()["decode_latency_8b"]["inter_token_ms_median"]
            latency_record("median / bound (measured bandwidth)", round(median / (1e3 * weights / bandwidth), 2))
        except Exception as exc:  # throughput still runs on the same engine
            latency_record("error", f"{type(exc).__name__}: {exc}")

    def random_model(device):
        with torch.device(device):
            return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()

    throughput(EngineConfig(model_id="llama-3-8b", load_format="dummy", dtype="bfloat16", backend=settings.backend,
                            kv_cache_bytes=cache_bytes(config, work), max_num_seqs=max(work.levels),
                            max_num_batched_tokens=work.max_num_batched_tokens, progress=False),
               random_model, work, settings.deadline, results.recorder("throughput_8b"), first=latency)


CHILDREN = {"tiny": child_tiny, "smollm2": child_smollm2, "llama8b": child_llama8b}


def run_as_child(settings: Settings, name: str) -> int:
    results = Results(settings.out)
    try:
        CHILDREN[name](settings, results)
        return 0
    except Exception:
        results.update(SECTIONS[name][-1], "error", traceback.format_exc(limit=6)[-3000:])
        traceback.print_exc()
        return 1


# ---- the parent --------------------------------------------------------------------------------------


def run_all(settings: Settings, budget_s: float, chosen: set[str]) -> dict:
    results = Results(settings.out)
    for stale in (results.path, settings.out / LOG_NAME):  # a report mixing two runs would mislead
        stale.unlink(missing_ok=True)
    results.update("run", "mode", "smoke" if settings.smoke else "full")
    results.update("run", "backend", settings.backend)
    end = time.time() + budget_s
    steps = results.recorder("steps")

    def step(name: str, action, skip: str | None = None) -> None:
        if name not in chosen:
            return
        if skip:
            steps(name, {"status": "skipped", "seconds": 0, "note": skip})
            return
        limit = min(SMOKE_LIMIT if settings.smoke else STEP_LIMITS.get(name, 60), end - time.time())
        if limit < 10:
            steps(name, {"status": "skipped", "seconds": 0, "note": "out of budget"})
            return
        start = time.time()
        try:
            status = action(limit)
        except Exception as exc:
            status = f"error: {type(exc).__name__}: {exc}"
        steps(name, {"status": status, "seconds": round(time.time() - start, 1)})
        print(f"gpu_check: {name}: {status} ({time.time() - start:.0f} s)", flush=True)

    def machine(limit: float) -> str:
        describe_machine(settings, results.recorder("machine"))
        return "ok"

    def child(name: str):
        def action(limit: float) -> str:
            # The child stops starting measurements a margin before it would be killed.
            margin = max(5.0, 0.15 * limit)
            command = [sys.executable, "-m", "benchmarks.gpu_check", "--out", str(settings.out), "--backend",
                       settings.backend, "--child", name, "--deadline", str(time.time() + limit - margin),
                       *(["--smoke"] if settings.smoke else [])]
            status, _ = run_child(command, settings, limit)
            if status == "timeout":
                return "timeout"
            data = results.load()
            if status != 0 or any(has_errors(data.get(section)) for section in SECTIONS[name]):
                return "failed (see its sections)"
            return "ok"
        return action

    step("machine", machine)
    step("conformance", lambda limit: run_conformance(settings, results.recorder("conformance"), limit))
    step("tiny", child("tiny"))
    step("smollm2", child("smollm2"))
    step("llama8b", child("llama8b"), skip="smoke mode: no 8B shape" if settings.smoke else None)
    return results.load()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json, GPU_REPORT.md, the log")
    parser.add_argument("--backend", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, two concurrency levels, no 8B shape")
    parser.add_argument("--budget-s", type=float, default=480, help="the whole run's time (default 480)")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = Settings(args.out, args.backend, args.smoke, args.deadline)
    if args.child:
        return run_as_child(settings, args.child)
    chosen = set(args.steps.split(","))
    if chosen - set(STEPS):
        parser.error(f"unknown steps {sorted(chosen - set(STEPS))}; choose from {','.join(STEPS)}")
    data = run_all(settings, args.budget_s, chosen)
    print(f"gpu_check: wrote {args.out / 'gpu_check.json'} and {args.out / 'GPU_REPORT.md'}")
    return 0 if all(s.get("status") in ("ok", "skipped") for s in data.get("steps", {}).values()) else 1


if __name__ == "__main__":
    sys.exit(main())
