"""What to run when a CUDA GPU is lent (under 10 minutes on one A100-class GPU).

    bash benchmarks/gpu_check.sh                       # on the GPU machine
    python benchmarks/gpu_check.py --cpu-fallback      # the same checks on the CPU at test sizes, seconds

1. parity: openmae against HF ViTMAE with the same weights and masks on the GPU (loss, predictions and
   gradients in fp32), every attention path of `openmae.accel` against plain SDPA, bf16 against fp32;
2. runs: bf16 and fp16 pretraining that stops and resumes, against the same run uninterrupted;
3. compile: a pretraining run with `compile=true` against the eager one;
4. speed: `mae bench` for ViT-B/16 at batch 128 and ViT-L/16 at batch 64 (the paper's decoder) against HF
   eager and SDPA, bf16 and fp32: images/s, share of the measured matmul peak (MFU), peak memory.

Each check prints one line, PASS or FAIL with its numbers; the summary goes to `--out`/gpu_check.md.
With `--cpu-fallback` (or on a machine without CUDA) every check runs on the CPU on the debug model, and
fp16 (which needs a GPU) and the full-size speed table are reported as skipped: the test suite runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from openmae import hardware
from openmae.accel import AccelConfig, Acceleration
from openmae.accel.attention import KERNELS
from openmae.cli import main as mae
from openmae.config import load_config
from openmae.interop import export_hf
from openmae.models import create_model
from openmae.recipes.pretrain import PretrainConfig, pretrain


class Checks:
    """Collects one line per check and whether it passed."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def record(self, name: str, ok: bool | None, detail: str) -> None:
        status = "SKIP" if ok is None else "PASS" if ok else "FAIL"
        self.rows.append({"check": name, "status": status, "detail": detail})
        print(f"[{status}] {name}: {detail}", flush=True)

    @property
    def failed(self) -> bool:
        return any(row["status"] == "FAIL" for row in self.rows)


def parity(checks: Checks, device: torch.device, model_name: str) -> None:
    from transformers import ViTMAEForPreTraining

    torch.manual_seed(0)
    ours = create_model(model_name).to(device)
    hf_config, state = export_hf(ours)
    theirs = ViTMAEForPreTraining(hf_config).to(device)
    theirs.load_state_dict(state)
    C, (H, W) = ours.config.in_chans, ours.config.img_size
    images = torch.randn(4, C, H, W, device=device)
    noise = torch.rand(4, ours.num_patches, device=device)
    a, b = ours(images, noise=noise), theirs(pixel_values=images, noise=noise)
    loss_error = abs(float(a.loss - b.loss)) / float(b.loss)
    pred_error = float((a.pred - b.logits).norm() / b.logits.norm())
    checks.record("parity: openmae = HF ViTMAE (fp32)", loss_error < 1e-4 and pred_error < 1e-4,
                  f"loss rel. error {loss_error:.1e}, prediction rel. error {pred_error:.1e}")  # fmt: skip
    reference = loss_and_grads(ours, images, noise, "fp32", device)
    for path in KERNELS:
        accel = Acceleration(AccelConfig(attention=path, cache=False), device, "fp32")
        accel.install(ours)
        loss, grads = loss_and_grads(ours, images, noise, "fp32", device)
        error = float((grads - reference[1]).norm() / reference[1].norm())
        checks.record(
            f"parity: attention path {path} (fp32)", error < 1e-4, f"gradient rel. error {error:.1e}"
        )
    accel.install(ours)  # leave a kernel in place; bf16 below uses the measured ones
    bf16_loss, _ = loss_and_grads(ours, images, noise, "bf16", device)
    error = abs(float(bf16_loss - reference[0])) / float(reference[0])
    checks.record("parity: bf16 autocast against fp32", error < 2e-2, f"loss rel. error {error:.1e}")


def loss_and_grads(model, images, noise, precision: str, device: torch.device):
    model.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = model(images, noise=noise).loss
    loss.backward()
    grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
    return loss.detach().float(), grads


def runs(checks: Checks, device: torch.device, model_name: str, folder: Path, with_compile: bool) -> None:
    base = [f"model={model_name}", "data.dataset=synthetic", "data.synthetic_size=64", "batch_size=8",
            "epochs=1", "vis_every=0", "data.num_workers=0", f"device={device.type}",
            "optim.warmup_epochs=0.1"]  # fmt: skip

    def run(name: str, *extra: str):
        return pretrain(load_config(PretrainConfig, overrides=[*base, f"output_dir={folder / name}", *extra]))

    if device.type != "cuda":
        checks.record("runs: fp16 pretraining with resume", None, "fp16 needs a CUDA GPU")
    for precision in ["bf16", "fp16"] if device.type == "cuda" else ["bf16"]:
        straight = run(f"{precision}-straight", f"precision={precision}")
        run(f"{precision}-split", f"precision={precision}", "max_steps=4")
        resumed = run(f"{precision}-split", f"precision={precision}", "resume=auto")
        error = weight_error(straight.weights, resumed.weights)
        exact = device.type == "cpu"  # GPU kernels need not be bitwise reproducible
        ok = (error == 0 if exact else error < 1e-3) and resumed.progress.step == straight.progress.step
        detail = f"{resumed.progress.step} steps; max weight difference {error:.2e} to the uninterrupted run"
        checks.record(f"runs: {precision} pretraining stopped at step 4 and resumed", ok, detail)
    if not with_compile:
        checks.record("compile: torch.compile on and off", None, "skipped (--no-compile)")
        return
    started = time.perf_counter()
    error = weight_error(
        run("eager", "max_steps=3").weights, run("compiled", "max_steps=3", "compile=true").weights
    )
    detail = f"max weight difference after 3 steps {error:.2e} ({time.perf_counter() - started:.0f} s)"
    checks.record("compile: torch.compile on and off", error < 1e-3, detail)


def weight_error(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    first, second = load_file(a), load_file(b)
    return max(float((first[k].float() - second[k].float()).abs().max()) for k in first)


def speed(checks: Checks, device: torch.device, out: Path, full: bool) -> None:
    if full:
        argv = ["bench", "--configs", "base", "large", "--precisions", "bf16", "fp32", "--peers",
                "hf_eager", "hf_sdpa", "--device", device.type, "--repeats", "3", "--no-profile",
                "--out", str(out)]  # fmt: skip
    else:
        checks.record(
            "speed: ViT-B batch 128 / ViT-L batch 64 against HF", None, "needs a GPU; a debug-size table"
        )
        argv = ["bench", "--model", "mae_vit_debug", "--batch", "2", "--precisions", "bf16", "--peers",
                "hf_eager", "--steps", "1", "--warmup", "1", "--repeats", "1", "--in-process", "--no-profile",
                "--peak-size", "128", "--device", device.type, "--out", str(out)]  # fmt: skip
    code = mae(argv)
    records = [json.loads(line) for line in (out / "pretrain_speed.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    failed = [r["engine"] for r in steps if r.get("error")]
    summary = ", ".join(
        f"{r['config']} {r['precision']} {r['engine']} {r['images_per_s']:.3g} img/s"
        for r in steps
        if not r.get("error")
    )
    checks.record(
        "speed: mae bench table", code == 0 and not failed and bool(steps), summary or f"failed: {failed}"
    )


def write_summary(checks: Checks, out: Path, device: torch.device) -> Path:
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else hardware.describe_cpu()
    header = f"Device: {device} ({where}); torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M')}"
    lines = ["# GPU check", "", header, "", "| check | status | detail |", "|---|---|---|"]
    lines += [f"| {r['check']} | {r['status']} | {r['detail']} |" for r in checks.rows]
    if (out / "pretrain_speed.md").exists():
        lines += ["", "The speed table: [pretrain_speed.md](pretrain_speed.md)."]
    path = out / "gpu_check.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument(
        "--cpu-fallback", action="store_true", help="run every check on the CPU at test sizes"
    )
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile check")
    parser.add_argument("--out", default="benchmarks/results/gpu", help="folder for the results")
    args = parser.parse_args(argv)
    on_gpu = hardware.cuda_available() and not args.cpu_fallback
    if not on_gpu and not args.cpu_fallback:
        print("no CUDA GPU here: running the CPU fallback at test sizes (--cpu-fallback)", flush=True)
    device = torch.device("cuda" if on_gpu else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checks = Checks()
    model_name = "mae_vit_base_patch16" if on_gpu else "mae_vit_debug"
    parity(checks, device, model_name)
    with tempfile.TemporaryDirectory(prefix="openmae-gpu-check-") as tmp:
        runs(checks, device, "mae_vit_tiny_patch4_32" if on_gpu else "mae_vit_debug", Path(tmp),
             with_compile=not args.no_compile)  # fmt: skip
    speed(checks, device, out, full=on_gpu)
    print(f"wrote {write_summary(checks, out, device)}")
    return 1 if checks.failed else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
