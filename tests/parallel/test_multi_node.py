"""Two "nodes" on one machine: `ernie45 serve --nnodes 2 --node-rank 1` runs rank 1 only, `--node-rank 0` runs rank 0
(the engine core) and the OpenAI server; they meet at --master-port on loopback. The server's greedy completion
equals one in-process TP=1 engine's, and stopping node 0 stops node 1."""

from __future__ import annotations

import subprocess
import sys

import openai

from ernie45 import LLM, SamplingParams

from ..server.conftest import ServerProcess, free_port
from .test_tensor_parallel import ENGINE


def test_two_nodes_serve_through_the_openai_server(tiny_dense_checkpoint, tmp_path):
    prompt = list(range(3, 30))
    expected = LLM(str(tiny_dense_checkpoint), **ENGINE).generate(
        {"prompt_token_ids": prompt}, SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)[0]
    port = str(free_port())
    parallel = ["--tensor-parallel-size", "2", "--nnodes", "2", "--master-port", port,
                *(f"--{k.replace('_', '-')}={v}" for k, v in ENGINE.items())]
    node1 = subprocess.Popen([sys.executable, "-m", "ernie45.cli.main", "serve", str(tiny_dense_checkpoint),
                              "--node-rank", "1", *parallel], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    server = None
    try:
        server = ServerProcess(tiny_dense_checkpoint, tmp_path / "node0.log", "--node-rank", "0", *parallel)
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
        got = client.completions.create(model="tiny-ernie", prompt=prompt, max_tokens=8, temperature=0)
        assert got.choices[0].text == expected.outputs[0].text
    finally:
        if server is not None:
            server.stop()
        try:
            code = node1.wait(30)  # node 0's engine sent "stop" to rank 1
        finally:
            if node1.poll() is None:
                node1.kill()
    assert code == 0
