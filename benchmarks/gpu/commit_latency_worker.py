"""Worker side of bench_commit_latency.py: the copy route's receiving end, inside vLLM's worker.

`weightshare serve ... --worker-extension-cls commit_latency_worker.CopyRouteWorkerExtension` (with this
folder on PYTHONPATH) gives each worker weightshare's own extension (export, layout: unchanged, by
inheritance) plus `bench_copy_load_weights`, which the benchmark calls through vLLM's
`/collective_rpc` (VLLM_SERVER_DEV_MODE=1): it opens the trainer's copy of the weights (CUDA IPC
handles, or a shared-memory file on a CPU) and pushes it with vLLM's own `model.load_weights(...)`,
as TRL's worker extension does. A separate module because vLLM imports the extension by name in its
worker, and importing it pulls weightshare's worker-side set-up, which the benchmark process must not run.
"""

from __future__ import annotations

import base64
import importlib.util
import os
import pickle
import sys
import time
import types

from inference_side.worker_extension import WeightShareWorkerExtension

WEIGHT_TRANSFER_ENV = "BENCH_COMMIT_LATENCY_WEIGHT_TRANSFER"  # set by the benchmark when it enables the API


def preimport_ipc_weight_transfer() -> str:
    """Import vLLM's IPC weight-transfer engine now, with stand-ins for `ray`/`requests` if absent.

    vLLM 0.26.0's vllm/distributed/weight_transfer/ipc_engine.py imports `ray` and `requests` at module
    top but uses them only for its trainer-side 'ray'/'http' senders, never in the worker's receive
    path. The GPU machine's slim vLLM bundle has no ray (shared/device/vllm026-deps.txt), and the engine
    is created during model load: without this, `--weight-transfer-config '{"backend":"ipc"}'` would
    stop the engine from starting. The stand-ins live in sys.modules only during this import.
    """
    missing = [m for m in ("ray", "requests") if m not in sys.modules and importlib.util.find_spec(m) is None]
    for name in missing:
        sys.modules[name] = types.ModuleType(name)
    try:
        import vllm.distributed.weight_transfer.ipc_engine  # noqa: F401 - cached for the factory's lazy import
    finally:
        for name in missing:
            sys.modules.pop(name, None)
    return f"stand-ins for {missing}" if missing else "no stand-ins needed"


if os.environ.get(WEIGHT_TRANSFER_ENV) == "ipc":
    print(f"commit_latency_worker: vLLM IPC weight-transfer engine imported ({preimport_ipc_weight_transfer()})",
          file=sys.stderr, flush=True)


class CopyRouteWorkerExtension(WeightShareWorkerExtension):
    """weightshare's worker extension plus the copy route's `load_weights` entry point."""

    def bench_copy_load_weights(self, payload_b64: str) -> dict:
        """Open the trainer's weight copy described by `payload_b64` and load it with `model.load_weights`.

        Payload (pickled, base64; the benchmark's own loopback call): {"kind": "cuda", "tensors":
        [(hf_name, reduce_tensor args)]} or {"kind": "shm", "path", "size", "tensors": [(hf_name,
        byte_offset, shape, dtype name)]}. Returns timings and counts.
        """
        import torch

        t0 = time.perf_counter()
        spec = pickle.loads(base64.b64decode(payload_b64))
        model = self.model_runner.get_model()
        if spec["kind"] == "cuda":
            from torch.multiprocessing.reductions import rebuild_cuda_tensor

            device = next(model.parameters()).device.index
            weights = []
            for name, args in spec["tensors"]:
                args = list(args)
                args[6] = device  # the receiver's index of the same GPU, as vLLM's IPC engine does
                weights.append((name, rebuild_cuda_tensor(*args)))
        else:
            from weightshare import shm

            cached = getattr(self, "_bench_copy_file", None)
            if cached is None or cached[0] != spec["path"]:
                cached = (spec["path"], shm.open_file(spec["path"], spec["size"]))
                self._bench_copy_file = cached
            buffer = cached[1]
            weights = [
                (name, shm.view_tensor(buffer, offset, shape, shm.contiguous_strides(shape), getattr(torch, dtype)))
                for name, offset, shape, dtype in spec["tensors"]
            ]
        t1 = time.perf_counter()
        loaded = model.load_weights(iter(weights))  # vLLM's own loader: names, merging, dtype, as from a checkpoint
        if spec["kind"] == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        del weights
        return {"open_s": t1 - t0, "load_weights_s": t2 - t1, "tensors": len(spec["tensors"]),
                "engine_params_loaded": len(loaded) if loaded is not None else -1}
