"""Scale-out: torchrun DDP and FSDP on CPU (gloo), checkpoints across world sizes, fail-fast, SIGTERM
and Ctrl-C, evaluation over every rank.

Real torchrun launches of `mae pretrain | linprobe | finetune | knn` on the debug model and synthetic
images, compared with single-process runs of the same global batch. A launch counts as finished
when every rank printed its DONE marker and wrote what it should: under load, a gloo process now
and then aborts at exit ("terminate called without an active exception") after its work is done;
that abort alone is tolerated, and a launch that hit it before finishing is retried once.
"""

import ast
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import openmae
from openmae import hardware
from openmae.cli import main
from openmae.config import load_config
from openmae.distributed import (
    GlobalBatchNorm,
    GracefulStop,
    ShardedEvalSampler,
    is_sharded,
    resolve_device,
    shard_model,
    use_global_batch_norm,
)
from openmae.models.layers import Block
from openmae.recipes.classify import build_classifier
from openmae.recipes.knn import KnnMonitor
from openmae.recipes.pretrain import PretrainConfig, PretrainTask, pretrain

WORKER = Path(__file__).with_name("dist_worker.py")
GLOO_EXIT_ABORT = "terminate called without an active exception"
# 32 images, global batch 8: 4 steps an epoch, 8 in all.
TINY = [
    "model=mae_vit_debug",
    "data.dataset=synthetic",
    "data.synthetic_size=32",
    "data.num_workers=0",
    "epochs=2",
    "vis_every=0",
    "log_every=1",
    "optim.warmup_epochs=0.5",
    "optim.base_lr=0.01",
    "optim.lr_scaling=linear",
    "device=cpu",
]
# A run far too long to finish, for the tests that interrupt one.
ENDLESS = [*TINY[:2], "data.synthetic_size=64", "data.num_workers=1", "epochs=1000"]
ENDLESS += TINY[5:]
# Classification and k-NN on a random debug encoder (seeded: the same on every rank) and 37 synthetic
# images a split: the shards of each split (19 + 18) differ in length.
CLASSIFY = [
    "checkpoint=none", "model=mae_vit_debug", "data.dataset=synthetic", "data.synthetic_size=37",
    "data.num_workers=0", "device=cpu",
]  # fmt: skip
# Global batch 8: 4 steps an epoch; validation batches of 8.
PROBE = [*CLASSIFY, "epochs=2", "log_every=1", "optim.warmup_epochs=0.5", "eval_batch_size=8"]
# fp32 sums in another order (two half batches, one thread each) move weights by ~1e-6; one step
# moves them by ~1e-4 (the lr), so the tolerance still tells one step from another.
ATOL = 2e-5
# Four more Adam steps from a 2-process checkpoint carry that rounding difference on and can grow it
# (2.3e-5 measured on an AMX Xeon, under 2e-5 on an AMD EPYC): still under the four steps' own 2e-4.
ATOL_FOUR_STEPS_ON = 5e-5


# ------------------------------------------------------------------------------------------------
# Helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(nproc: int, args: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "--max_restarts", "0",
        str(WORKER), *args,
    ]  # fmt: skip


def worker_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def finished_ranks(output: str, code: int = 0) -> set[int]:
    """The ranks whose `mae` returned `code` (130: stopped by Ctrl-C)."""
    done = re.findall(rf"DONE rank=(\d+) code={code}$", output, flags=re.MULTILINE)
    return {int(rank) for rank in done}


@dataclass
class Launch:
    returncode: int
    output: str


def launch(nproc: int, args: list[str], out_dir: Path | None = None, seeds=(), env=None):
    """Run the worker under torchrun until every rank has finished; retry once after a gloo exit abort.

    `out_dir` is rebuilt from the files `seeds` before each attempt, so a retry starts from the same state.
    """
    for attempt in range(2):
        if out_dir is not None:
            shutil.rmtree(out_dir, ignore_errors=True)
            out_dir.mkdir(parents=True)
            for file in seeds:
                shutil.copy(file, out_dir)
        proc = subprocess.run(
            torchrun_command(nproc, args),
            capture_output=True,
            text=True,
            timeout=300,
            env={**worker_env(), **(env or {})},
        )
        output = proc.stdout + proc.stderr
        all_done = finished_ranks(output) == set(range(nproc))
        if all_done and (proc.returncode == 0 or GLOO_EXIT_ABORT in output):
            return Launch(proc.returncode, output)
        if attempt == 1 or GLOO_EXIT_ABORT not in output:
            done = finished_ranks(output)
            pytest.fail(f"torchrun exited with {proc.returncode}, ranks done {done}:\n{output[-6000:]}")
    raise AssertionError("unreachable")


def start_endless(out_dir: Path) -> subprocess.Popen:
    """A 2-process run that trains until stopped; returns once rank 0 has logged a step."""
    proc = subprocess.Popen(
        torchrun_command(2, ["pretrain", *ENDLESS, "batch_size=4", f"output_dir={out_dir}"]),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=worker_env(),
    )
    return wait_for_training(proc, out_dir)


def wait_for_training(proc: subprocess.Popen, out_dir: Path) -> subprocess.Popen:
    """`proc` once its run has logged a step to `out_dir`; a failed test if it ends or stalls before."""
    metrics = out_dir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and metrics.stat().st_size > 0):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the run did not start training:\n{proc.communicate()[0][-6000:]}")
        time.sleep(0.2)
    return proc


def run_single(out_dir: Path, *overrides: str):
    return pretrain(load_config(PretrainConfig, overrides=[*TINY, f"output_dir={out_dir}", *overrides]))


def checkpoint(out_dir: Path, step: int) -> Path:
    return out_dir / f"checkpoint-{step:08d}.safetensors"


def seed_files(out_dir: Path, step: int) -> list[Path]:
    weights = checkpoint(out_dir, step)
    return [weights, weights.with_name(weights.name.replace(".safetensors", ".state.pt"))]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """Single-process runs with the global batch (8): 8 steps (checkpoints at 4 and 8), and 2 steps."""
    root = tmp_path_factory.mktemp("single")
    full = run_single(root / "full", "batch_size=8")
    assert checkpoint(full.output_dir, 4).exists() and checkpoint(full.output_dir, 8).exists()
    return {"full": full, "step2": run_single(root / "step2", "batch_size=8", "max_steps=2")}


# ------------------------------------------------------------------------------------------------
# In one process


@pytest.mark.parametrize("has_cuda", [True, False])
def test_device_choice_with_and_without_cuda(monkeypatch, has_cuda):
    monkeypatch.setattr(hardware, "cuda_available", lambda: has_cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("cpu") == torch.device("cpu")
    if has_cuda:
        assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
        assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)  # one GPU per rank
        assert resolve_device("cuda:0", local_rank=1) == torch.device("cuda", 0)
    else:
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="no CUDA GPU; use device=cpu"):
            resolve_device("cuda")


def test_sharded_eval_sampler_covers_every_sample_exactly_once():
    for num_samples in (0, 1, 7, 10, 11):
        for world_size in (1, 2, 3, 4):
            shards = [list(ShardedEvalSampler(num_samples, rank, world_size)) for rank in range(world_size)]
            assert sorted(i for shard in shards for i in shard) == list(range(num_samples))
            lengths = [len(ShardedEvalSampler(num_samples, r, world_size)) for r in range(world_size)]
            assert [len(shard) for shard in shards] == lengths
            assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError):
        ShardedEvalSampler(10, rank=2, world_size=2)


def test_contiguous_shards_concatenate_in_rank_order_to_the_dataset_order():
    for num_samples in (0, 1, 7, 10, 11):
        for world in (1, 2, 3, 4):
            samplers = [ShardedEvalSampler(num_samples, r, world, contiguous=True) for r in range(world)]
            shards = [list(sampler) for sampler in samplers]
            assert [i for shard in shards for i in shard] == list(range(num_samples))
            assert max(map(len, shards)) - min(map(len, shards)) <= 1
            assert [len(shard) for shard in shards] == [len(sampler) for sampler in samplers]


def test_global_batch_norm_keeps_parameters_buffers_and_keys_and_is_batch_norm_in_one_process():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Sequential(torch.nn.BatchNorm1d(6)))
    plain = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Sequential(torch.nn.BatchNorm1d(6)))
    plain.load_state_dict(model.state_dict())
    weight, running_mean, keys = model[1][0].weight, model[1][0].running_mean, list(model.state_dict())
    assert use_global_batch_norm(model) == 1
    norm = model[1][0]
    assert isinstance(norm, GlobalBatchNorm) and norm.weight is weight and norm.running_mean is running_mean
    assert list(model.state_dict()) == keys
    x = torch.randn(8, 4)
    assert torch.allclose(model(x), plain(x)) and torch.allclose(norm.running_var, plain[1][0].running_var)


def test_distributed_does_not_know_the_models():
    # The layers go one way: models know nothing of scale-out, and scale-out nothing of the models.
    package = Path(openmae.distributed.__file__).parent
    imported = set()
    for source in package.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
    ours = {name for name in imported if name.split(".")[0] == "openmae"}
    assert "openmae.distributed.process" in ours  # the scan sees the package's own imports
    assert not {name for name in ours if name.startswith(("openmae.models", "openmae.engine"))}, ours


@pytest.fixture
def one_process_group():
    """A process group of one (gloo, in this process), for what needs one but no peers."""
    torch.distributed.init_process_group("gloo", rank=0, world_size=1, store=torch.distributed.HashStore())
    yield
    torch.distributed.destroy_process_group()


def test_fsdp_gathers_each_transformer_block_of_the_mae_and_the_classifier(one_process_group):
    mae = openmae.create_model("mae_vit_debug")
    classifier = build_classifier(mae, num_classes=3, global_pool="avg", probe=False)
    for model in (mae, classifier):
        blocks = [module for module in model.modules() if isinstance(module, Block)]
        assert len(blocks) == model.config.depth + getattr(model.config, "decoder_depth", 0)
        optimizer = torch.optim.AdamW(model.parameters())
        before = [id(p) for p in model.parameters()]
        assert shard_model(model, optimizer, torch.device("cpu")) is model and is_sharded(model)
        wrapped = [module for module in model.modules() if type(module).__name__.startswith("FSDP")]
        assert wrapped == [model, *blocks]  # each block a unit of its own, the rest in the root's
        params = [p for group in optimizer.param_groups for p in group["params"]]
        assert [id(p) for p in params] == [id(p) for p in model.parameters()] != before  # the shards


def test_graceful_stop_turns_sigterm_into_a_request_and_then_gives_it_back():
    previous = signal.getsignal(signal.SIGTERM)
    with GracefulStop() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)  # would end pytest without the handler
        time.sleep(0.01)  # the handler runs between bytecodes
        assert stop.requested and stop.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == previous


def test_sigterm_in_a_single_process_run_stops_it_with_a_checkpoint(tmp_path, monkeypatch, capsys):
    previous = signal.getsignal(signal.SIGTERM)
    calls = []
    loss_of_batch = PretrainTask.__call__

    def signalled_on_the_second_step(self, model, batch, device):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss_of_batch(self, model, batch, device)

    monkeypatch.setattr(PretrainTask, "__call__", signalled_on_the_second_step)
    result = run_single(tmp_path / "run", "batch_size=8")
    assert result.progress.step == 2  # the step under way is finished, then the run stops
    assert "stopped by SIGTERM at step 2" in capsys.readouterr().out
    weights = checkpoint(tmp_path / "run", 2)
    model = openmae.load_checkpoint(weights)
    assert max_difference(model.state_dict(), load_file(weights)) == 0
    state = torch.load(str(weights).replace(".safetensors", ".state.pt"), weights_only=True)
    assert state["progress"]["step"] == 2 and state["optimizer"]["state"]
    assert signal.getsignal(signal.SIGTERM) == previous  # the usual handling is back after the run


def test_graceful_stop_turns_sigint_into_a_request_and_a_second_one_into_keyboard_interrupt():
    previous = signal.getsignal(signal.SIGINT)
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C
        time.sleep(0.01)
        assert stop.requested and stop.received == signal.SIGINT and stop.received.name == "SIGINT"
        os.kill(os.getpid(), signal.SIGTERM)  # another signal while stopping changes nothing
        time.sleep(0.01)
        assert stop.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C again: stop now
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert signal.getsignal(signal.SIGINT) == previous


def test_sigint_in_a_single_process_run_stops_it_with_a_checkpoint_that_resumes_exactly(
    tmp_path, monkeypatch, capsys, single
):
    previous = signal.getsignal(signal.SIGINT)
    calls = []
    loss_of_batch = PretrainTask.__call__

    def interrupted_on_the_third_step(self, model, batch, device):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends
        return loss_of_batch(self, model, batch, device)

    monkeypatch.setattr(PretrainTask, "__call__", interrupted_on_the_third_step)
    run = tmp_path / "run"
    assert run_single(run, "batch_size=8").progress.step == 3  # the step under way is finished
    out = capsys.readouterr().out
    assert "stopped by SIGINT at step 3" in out and "resume=auto" in out, out
    at_stop = load_file(checkpoint(run, 3))
    assert not checkpoint(run, 8).exists()
    assert signal.getsignal(signal.SIGINT) == previous  # Ctrl-C ends the process again after the run
    monkeypatch.undo()
    resumed = run_single(run, "batch_size=8", "resume=auto")
    assert resumed.progress.step == 8
    full = single["full"]
    assert max_difference(load_file(resumed.weights), load_file(full.weights)) == 0  # bit for bit
    assert max_difference(at_stop, load_file(full.weights)) > 0  # the comparison can fail


@pytest.mark.slow
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_ctrl_c_in_a_terminal_stops_a_run_with_loader_workers_cleanly(tmp_path, start_method):
    # Ctrl-C signals the terminal's whole foreground group: the run and its data-loading workers.
    # Forked workers inherit the run's handlers, spawned ones (the default on macOS) Python's.
    out_dir = tmp_path / "interrupted"
    # Many micro-steps a step: the stop comes while the step still needs batches from the workers.
    args = [*ENDLESS, "batch_size=2", "accum_iter=8", f"output_dir={out_dir}"]
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), "pretrain", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env={**worker_env(), "START_METHOD": start_method},
        start_new_session=True,  # a group of its own, as a shell gives a foreground job
    )  # fmt: skip
    wait_for_training(proc, out_dir)
    os.killpg(proc.pid, signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130 and finished_ranks(output, code=130) == {0}, output[-6000:]  # 128 + SIGINT
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-6000:]
    step = int(re.search(r"stopped by SIGINT at step (\d+)", output).group(1))
    state = torch.load(str(checkpoint(out_dir, step)).replace(".safetensors", ".state.pt"), weights_only=True)
    assert state["progress"]["step"] == step < 1000 * 4  # 64 images, 16 a step


# ------------------------------------------------------------------------------------------------
# Under torchrun


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_matches_one_process_and_its_checkpoint_resumes_in_one_process(tmp_path, single):
    # Two processes over half batches (4 + 4) against one over the whole batch (8).
    ddp = tmp_path / "ddp"
    knn = ["knn_every=1", "knn_images=13"]  # at the end of epoch 1 (step 4): shards of 7 and 6 images
    args = ["pretrain", *TINY, *knn, "batch_size=4", "max_steps=4", f"output_dir={ddp}"]
    out = launch(2, args, ddp, env={"CHECK_COLLECTIVES": "1"}).output
    assert "effective batch 8 / 256" in out and out.count("effective batch") == 1, out  # rank 1 is quiet
    full = single["full"]
    two, one = load_file(checkpoint(ddp, 4)), load_file(checkpoint(full.output_dir, 4))
    assert (difference := max_difference(two, one)) < ATOL, difference
    assert max_difference(two, load_file(full.weights)) > 4 * ATOL_FOUR_STEPS_ON  # the tolerances can fail
    # The k-NN monitor, sharded over the ranks, logged what one process measures on those weights.
    logged = [json.loads(line) for line in (ddp / "metrics.jsonl").read_text().splitlines()]
    logged = next(r for r in logged if "knn_top1" in r)
    cfg = load_config(PretrainConfig, overrides=[*TINY, *knn])
    model = openmae.load_checkpoint(checkpoint(ddp, 4))
    monitor = KnnMonitor.from_config(cfg, model.config.img_size, model.config.in_chans)
    alone = monitor(model, epoch=0, last=False, device=torch.device("cpu"))
    assert alone == pytest.approx({k: logged[k] for k in alone}, abs=1e-9)
    # The 2-process checkpoint continues in one process exactly as the uninterrupted run went on.
    resumed = run_single(ddp, "batch_size=8", "resume=auto")
    assert resumed.progress.step == 8
    difference = max_difference(load_file(resumed.weights), load_file(full.weights))
    assert difference < ATOL_FOUR_STEPS_ON, difference
    # The evaluation helpers, on the same process group: every sample counted once, rows kept whole.
    results = [json.loads(path.read_text()) for path in sorted(ddp.glob("collectives-rank*.json"))]
    assert sorted(r["rank"] for r in results) == [0, 1]
    for r in results:
        assert r["sums"] == [55.0, 11.0]  # sum and count of 0..10
        assert r["rows"][:6] == [[i, 10 * i] for i in range(0, 11, 2)]  # rank 0's shard, then rank 1's
        assert sorted(r["rows"]) == [[i, 10 * i] for i in range(11)]


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp_resumes_a_one_process_checkpoint_and_writes_one_that_loads_anywhere(tmp_path, single):
    fsdp = tmp_path / "fsdp"
    # 2 processes x 2 images x 2 micro-steps: the global batch of 8 again, gradients reduced per micro-step.
    tiny = [arg for arg in TINY if not arg.startswith("vis_every=")]  # the command line gives a key once
    args = [*tiny, "batch_size=2", "accum_iter=2", "max_steps=6", "resume=auto", f"output_dir={fsdp}"]
    args += ["fsdp=true", "activation_checkpointing=true", "vis_every=1", "eval_images=8"]  # + evaluation
    # From step 2 of a single-process run, past the end of epoch 1 (evaluation, a checkpoint) to step 6.
    full = single["full"]
    out = launch(2, ["pretrain", *args], fsdp, seed_files(single["step2"].output_dir, 2)).output
    assert "resumed from" in out and "masked_mse" in (fsdp / "metrics.jsonl").read_text()
    # Written from shards, a checkpoint reads into a plain single-process model: the same weights.
    plain = openmae.load_checkpoint(checkpoint(fsdp, 4))
    assert type(plain) is openmae.MaskedAutoencoder
    assert max_difference(plain.state_dict(), load_file(checkpoint(full.output_dir, 4))) < ATOL
    assert max_difference(plain.state_dict(), load_file(full.weights)) > 10 * ATOL
    # With its optimizer state, one process finishes the run as the uninterrupted one did.
    resumed = run_single(fsdp, "batch_size=8", "resume=auto")
    assert resumed.progress.step == 8
    assert max_difference(load_file(resumed.weights), load_file(full.weights)) < ATOL


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_to_torchrun_stops_every_rank_with_a_loadable_checkpoint(tmp_path, sig):
    out_dir = tmp_path / "preempted"
    proc = start_endless(out_dir)
    signalled = time.monotonic()
    proc.send_signal(sig)  # as a scheduler (or Ctrl-C) does; torchrun forwards it to the ranks
    output = proc.communicate(timeout=120)[0]
    assert time.monotonic() - signalled < 60, output[-4000:]  # a step, a checkpoint and the exit
    code = 130 if sig == signal.SIGINT else 0  # Ctrl-C exits as shells report it; SIGTERM is a requeue
    assert finished_ranks(output, code) == {0, 1}, output[-6000:]  # both ranks returned normally
    match = re.search(rf"stopped by {sig.name} at step (\d+)", output)
    assert match, output[-6000:]
    step = int(match.group(1))
    weights = checkpoint(out_dir, step)
    model = openmae.load_checkpoint(weights)
    assert max_difference(model.state_dict(), load_file(weights)) == 0
    state = torch.load(str(weights).replace(".safetensors", ".state.pt"), weights_only=True)
    assert state["progress"]["step"] == step < 1000 * 8


@pytest.mark.distributed
@pytest.mark.slow
def test_a_killed_rank_makes_the_job_fail_fast_with_a_clear_message(tmp_path):
    out_dir = tmp_path / "killed"
    proc = start_endless(out_dir)
    killed = time.monotonic()
    os.kill(int((out_dir / "pid-rank1").read_text()), signal.SIGKILL)  # e.g. the OOM killer
    output = proc.communicate(timeout=120)[0]
    assert time.monotonic() - killed < 60, output[-4000:]
    assert proc.returncode != 0
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s+exitcode\s*:\s*-9", output), output[-6000:]
    assert "rank 0: lost contact with the other processes of the job" in output, output[-6000:]


@pytest.mark.distributed
@pytest.mark.slow
def test_linprobe_on_cached_features_under_torchrun_scores_as_one_process(tmp_path):
    # Each rank encodes its shard of both splits; the training features are gathered (in dataset
    # order), the validation hits and losses summed; the probe's BatchNorm sees the global batch.
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["linprobe", *PROBE, "batch_size=8", f"output_dir={one}"]) == 0
    launch(2, ["linprobe", *PROBE, "batch_size=4", f"output_dir={two}"], two)
    alone, ranks = (json.loads((out / "results.json").read_text()) for out in (one, two))
    for which in ("final", "best"):
        assert ranks[which]["count"] == alone[which]["count"] == 37
        assert ranks[which]["epoch"] == alone[which]["epoch"]
        assert ranks[which]["top1"] == pytest.approx(alone[which]["top1"], abs=1e-9)
        assert ranks[which]["top5"] == pytest.approx(alone[which]["top5"], abs=1e-9)
        assert ranks[which]["loss"] == pytest.approx(alone[which]["loss"], abs=1e-5)
    assert abs(alone["final"]["loss"] - alone["best"]["loss"]) > 1e-4  # the tolerance tells epochs apart
    weights = load_file(two / "model.safetensors"), load_file(one / "model.safetensors")
    assert max_difference(*weights) < ATOL


@pytest.mark.distributed
@pytest.mark.slow
def test_finetune_under_torchrun_scores_every_validation_image_once_and_rank_0_alone_speaks(tmp_path):
    out = tmp_path / "ft"
    args = ["finetune", *CLASSIFY, "epochs=1", "batch_size=4", "eval_batch_size=8", f"output_dir={out}"]
    output = launch(2, args, out).output
    # Rank 0's first and last lines, nothing from rank 1.
    assert output.count("finetune: ") == 3, output[-6000:]  # lr, parameters, result
    assert output.count("trainable parameters") == 1 and output.count("finetune: val top-1") == 1
    results = json.loads((out / "results.json").read_text())
    assert results["final"]["count"] == 37 and results["final"]["epoch"] == 1  # 19 + 18 images, once each
    assert (out / "model.safetensors").exists() and (out / "best.safetensors").exists()


@pytest.mark.distributed
@pytest.mark.slow
def test_knn_under_torchrun_equals_one_process(tmp_path):
    args = ["knn", *CLASSIFY, "batch_size=8", "k=5"]
    assert main([*args, f"output={tmp_path / 'one.json'}"]) == 0
    out = tmp_path / "two"
    output = launch(2, [*args, f"output={out / 'knn.json'}"], out).output
    assert output.count("k-NN top-1") == 1, output[-6000:]  # rank 0 alone says it
    alone, ranks = (json.loads(path.read_text()) for path in (tmp_path / "one.json", out / "knn.json"))
    assert ranks == pytest.approx(alone, abs=1e-9)


def recorded_samples(out_dir: Path, rank: int) -> list[tuple[list[int], list[int]]]:
    """`(labels, seeds)` of every micro-batch rank `rank` trained on (see dist_worker's RECORD_SAMPLES)."""
    lines = (out_dir / f"samples-rank{rank}.jsonl").read_text().splitlines()
    return [(record["labels"], record["seeds"]) for record in map(json.loads, lines)]


@pytest.mark.distributed
@pytest.mark.slow
def test_webdataset_pretraining_under_torchrun_sees_every_image_once_an_epoch_and_resumes_exactly(tmp_path):
    # 24 photos-like JPEGs, one a class (the label is the image's id), in 5 shards written by `mae shards`.
    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    for i in range(24):
        (src / f"c{i:02d}").mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(src / f"c{i:02d}" / "x.jpg")
    assert main(["shards", str(src), str(tmp_path / "shards" / "train-%03d.tar"), "--max-count", "5"]) == 0
    # 2 ranks x 3 images, 2 loader workers each: 4 steps an epoch, 8 in all.
    args = ["pretrain", *[a for a in TINY if not a.startswith("data.")], "batch_size=3"]
    args += ["data.dataset=webdataset", f"data.path={tmp_path / 'shards'}", "data.num_workers=2"]
    args += ["data.shuffle_buffer=4"]
    record = {"RECORD_SAMPLES": "1"}
    full, stopped, resumed = (tmp_path / name for name in ("full", "stopped", "resumed"))
    launch(2, [*args, f"output_dir={full}"], full, env=record)
    ranks = [recorded_samples(full, rank) for rank in range(2)]
    assert [len(batches) for batches in ranks] == [8, 8]
    for epoch in range(2):
        labels = [
            label for batches in ranks for ids, _ in batches[4 * epoch : 4 * epoch + 4] for label in ids
        ]
        assert sorted(labels) == list(range(24)), labels  # every image once, over both ranks
    first_epoch = [ids for batches in ranks for ids, _ in batches[:4]]
    assert first_epoch != [ids for batches in ranks for ids, _ in batches[4:]]  # reshuffled
    # Stopped at step 5 (in epoch 2), then resumed: the remaining micro-batches are the same ones.
    launch(2, [*args, "max_steps=5", f"output_dir={stopped}"], stopped, env=record)
    launch(2, [*args, "resume=auto", f"output_dir={resumed}"], resumed, seed_files(stopped, 5), env=record)
    for rank in range(2):
        assert recorded_samples(stopped, rank) == ranks[rank][:5]
        assert recorded_samples(resumed, rank) == ranks[rank][5:]
    weights = load_file(resumed / "model.safetensors"), load_file(full / "model.safetensors")
    assert max_difference(*weights) < ATOL
    # The tolerance can fail: the last 3 steps (at the cosine's tail) moved the weights by ~2e-4.
    assert max_difference(load_file(checkpoint(stopped, 5)), weights[1]) > 5 * ATOL
