"""The Triton first pass of APOLLO-Mini (trainer_side/apollo_kernels.py) against the torch path.

On CPU machines the kernels run under Triton's interpreter (TRITON_INTERPRET=1, read when Triton
compiles, hence a subprocess); on a CUDA machine they also run compiled. Each compares Apollo with
`use_triton` on and off, step by step, on both matrix orientations and on non-contiguous gradients and
parameters. Bit-exact bf16 agreement is checked only compiled: the interpreter truncates fp32 to bf16.
Run as: .venv/bin/python -m pytest tests/test_apollo_kernels.py -q
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed")

CHECK = textwrap.dedent(
    """
    import sys
    import torch
    from torch import nn
    from trainer_side import apollo_kernels
    from trainer_side.apollo import Apollo, projection

    device = sys.argv[1]
    gen = torch.Generator().manual_seed(0)
    # Tall, wide (more rows than one column program takes), square, tiny, and a transposed view.
    shapes = [(1030, 600), (600, 1104), (64, 64), (1, 3), (3, 1)]
    for dtype in (torch.float32, torch.bfloat16):
        for shape in shapes:
            g = torch.randn(shape, generator=gen).to(device, dtype)
            for grad in (g, g.t().contiguous().t()):
                assert apollo_kernels.fits(grad, 1), (device, grad.shape)
                proj = projection(7, tuple(grad.shape), 1, grad.device)
                r, sq = apollo_kernels.project_rank1(grad, proj)
                gf = grad.float()
                by_row = shape[0] >= shape[1]
                want_r = gf @ proj.t() if by_row else proj.t() @ gf
                want_sq = gf.square().sum(1 if by_row else 0)
                torch.testing.assert_close(r, want_r, rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(sq, want_sq, rtol=1e-4, atol=1e-4)
        # The update kernel with per-row, per-column and one coefficient, with decay, on a strided view.
        for coef_shape in ((1, 1), (shapes[0][0], 1), (1, shapes[0][1])):
            base = torch.randn(shapes[0][0], shapes[0][1] + 3, generator=gen).to(device, dtype)
            p = base[:, 1:-2]
            grad = torch.randn(p.shape, generator=gen).to(device, dtype)
            coef = torch.rand(coef_shape, generator=gen).to(device)
            want = ((p.float() - 0.01 * coef * grad.float()) * (1 - 0.001)).to(dtype)
            assert apollo_kernels.fits_update(p, grad)
            apollo_kernels.apply_update(p, grad, coef, 0.01, 0.001)
            torch.testing.assert_close(p, want)  # the kernel may fuse to an FMA: rounding, not math
            before = p.clone()
            nan_grad = torch.full_like(grad, float("nan"))
            apollo_kernels.apply_update(p, nan_grad, coef, 0.01, 0.001, ok=torch.tensor(False, device=device))
            assert torch.equal(p, before), "a masked-out update must store nothing"
            apollo_kernels.apply_update(p, grad, coef, 0.01, 0.0, ok=torch.tensor(True, device=device))
            assert not torch.equal(p, before)
            assert torch.equal(base[:, :1], base[:, :1]) and base[:, -2:].isfinite().all()
        # The grouped update with a per-matrix mask: a masked-out matrix (NaN gradient) stores nothing.
        group = [torch.randn(s, generator=gen).to(device, dtype) for s in ((64, 64), (32, 48), (48, 32))]
        grads = [torch.randn(t.shape, generator=gen).to(device, dtype) for t in group]
        grads[1].fill_(float("nan"))
        before = [t.clone() for t in group]
        coefs = torch.tensor([0.5, 0.5, 2.0], device=device)
        oks = torch.tensor([True, False, True], device=device)
        apollo_kernels.apply_update_group(group, grads, coefs, [0.01] * 3, [0.001] * 3, oks)
        assert torch.equal(group[1], before[1]), "a masked-out matrix must store nothing"
        for t, b, g, c in ((group[0], before[0], grads[0], 0.5), (group[2], before[2], grads[2], 2.0)):
            want = ((b.float() - 0.01 * c * g.float()) * (1 - 0.001)).to(dtype)
            torch.testing.assert_close(t, want, rtol=3 * 2**-7, atol=1e-2)
        # Whole optimizer steps: grouped kernels (one launch per pass), per-matrix kernels, torch path.
        # One parameter is a strided view, as a parameter bound into a merged vLLM tensor is.
        runs = []
        for use_triton, foreach in ((True, True), (True, False), (False, True)):
            init = torch.Generator().manual_seed(1)
            params = [nn.Parameter(torch.randn(s, generator=init).to(device, dtype)) for s in shapes[:3]]
            params.append(nn.Parameter(torch.randn(40, 32, generator=init).to(device, dtype)[:, 8:24]))
            opt = Apollo([{"params": params, "rank": 1, "scale": 128.0, "scale_type": "tensor"}],
                         lr=1e-2, weight_decay=0.1, use_triton=use_triton, foreach=foreach)
            for step in range(3):
                step_gen = torch.Generator().manual_seed(100 + step)
                for p in params:
                    p.grad = torch.randn(p.shape, generator=step_gen).to(device, dtype)
                opt.step()
            runs.append(params)
        grouped, per_matrix, torch_path = runs
        for a, b in zip(grouped, per_matrix):
            # The same arithmetic in one launch or many; a bf16 rounding may flip where fp32 sums differ.
            if dtype == torch.bfloat16:
                assert (a != b).float().mean() < 1e-3, (a != b).float().mean()
            else:
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        runs = [grouped, torch_path]
        tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 0.0, "atol": 0.0}
        for a, b in zip(*runs):
            # bf16: the fp32 update must round to the same bf16 value almost everywhere. Triton's
            # interpreter truncates fp32 to bf16 where compiled code rounds to nearest: up to one ulp
            # per step there (the fp32 runs above check the math exactly).
            if dtype == torch.bfloat16 and device == "cpu":
                torch.testing.assert_close(a, b, rtol=3 * 2**-7, atol=0.1)
            elif dtype == torch.bfloat16:
                assert (a != b).float().mean() < 1e-3, (a != b).float().mean()
            else:
                torch.testing.assert_close(a, b, **tol)
    assert apollo_kernels.fits_group(grouped, 1), [(p.stride(), p.data_ptr() % 16) for p in grouped]
    print("kernels agree")
    """
)


def run_check(device: str, interpret: bool) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1" if interpret else "0"}
    done = subprocess.run(  # noqa: PLW1510 (the return code is asserted below, with the output)
        [sys.executable, "-c", CHECK, device], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0 and "kernels agree" in done.stdout, done.stdout + done.stderr


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="a CUDA machine runs the compiled kernels (Triton 3.6's interpreter fails there)"
)
def test_kernels_match_the_torch_path_interpreted_on_cpu() -> None:
    run_check("cpu", interpret=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs compiled there)")
def test_kernels_match_the_torch_path_compiled_on_cuda() -> None:
    run_check("cuda", interpret=False)
