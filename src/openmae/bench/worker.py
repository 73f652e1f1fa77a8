"""Running each engine in its own process, driven over a pipe.

A process per engine gives each engine its own peak memory and allocator state (nothing one
engine leaves behind weighs on the next), while the parent interleaves the engines' repeats.
`LocalWorker` runs the same requests in the calling process (for tests and debugging; memory is
then shared and not reported).
"""

from __future__ import annotations

import multiprocessing
import resource
import sys
import time
import traceback
from typing import Any

import torch

from openmae.bench.engines import BenchEngine, EngineSpec
from openmae.bench.profiling import live_memory_peak, profile_step
from openmae.engine.precision import Precision
from openmae.models import MAEConfig


class EngineError(RuntimeError):
    """An engine failed inside its worker (the message carries the worker's traceback)."""


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident memory.

    On Linux this is `VmHWM` of /proc/self/status: `getrusage`'s maximum would also count the
    parent's memory, which a spawned child inherits between fork and exec.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class EngineServer:
    """Holds one `BenchEngine` and answers requests: build, run, memory, profile, paths."""

    def __init__(self) -> None:
        self.engine: BenchEngine | None = None
        self.idle_rss = peak_rss_bytes()

    def handle(self, command: str, kwargs: dict[str, Any]) -> Any:
        return getattr(self, f"do_{command}")(**kwargs)

    def do_build(
        self,
        spec: EngineSpec,
        config: MAEConfig,
        batch_size: int,
        device: str,
        precision: Precision,
        seed: int,
        fused_optimizer: bool,
    ) -> dict:
        """Build the engine and run its first step; returns that step's loss and duration."""
        device = torch.device(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.engine = BenchEngine(spec, config, batch_size, device, precision, seed, fused_optimizer)
        start = time.perf_counter()
        loss = float(self.engine.step())
        return {"first_loss": loss, "first_step_s": time.perf_counter() - start}

    def do_run(self, steps: int) -> float:
        """Seconds for `steps` training steps, the device synchronised at the end."""
        engine = self._built()
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        synchronize(engine.device)
        return time.perf_counter() - start

    def do_memory(self) -> dict:
        """Peak memory: RSS of this process on CPU (and before building), max allocated on GPU."""
        engine = self._built()
        if engine.device.type == "cuda":
            return {"kind": "max allocated", "peak_bytes": torch.cuda.max_memory_allocated(engine.device)}
        return {"kind": "peak RSS", "peak_bytes": peak_rss_bytes(), "idle_bytes": self.idle_rss}

    def do_profile(self, steps: int) -> dict:
        engine = self._built()
        return profile_step(engine.step, engine.device, steps)

    def do_live_memory(self) -> dict:
        """What one more step holds at its worst above its start, and when (see `live_memory_peak`)."""
        return live_memory_peak(self._built().step)

    def do_paths(self) -> dict[str, str]:
        return self._built().paths()

    def _built(self) -> BenchEngine:
        if self.engine is None:
            raise RuntimeError("build the engine first")
        return self.engine


def serve(conn, threads: int) -> None:
    """Main loop of a worker process: answer `(command, kwargs)` requests until "close"."""
    torch.set_num_threads(threads)
    try:  # every worker carries transformers, so that peak memory compares like with like
        import transformers  # noqa: F401
    except ImportError:
        pass
    server = EngineServer()
    while True:
        command, kwargs = conn.recv()
        if command == "close":
            break
        try:
            conn.send(("ok", server.handle(command, kwargs)))
        except Exception:  # reported to the parent, which marks the engine failed and goes on
            conn.send(("error", traceback.format_exc()))
    conn.close()


class ProcessWorker:
    """An engine in a spawned process with `threads` intra-op threads."""

    def __init__(self, threads: int) -> None:
        context = multiprocessing.get_context("spawn")  # fork would inherit the parent's threads and memory
        self.conn, child = context.Pipe()
        self.process = context.Process(target=serve, args=(child, threads), daemon=True)
        self.process.start()
        child.close()

    def call(self, command: str, **kwargs) -> Any:
        try:
            self.conn.send((command, kwargs))
            status, value = self.conn.recv()
        except (EOFError, OSError) as error:  # the process died, e.g. killed for lack of memory
            raise EngineError(f"worker process ended (exit code {self.process.exitcode})") from error
        if status == "error":
            raise EngineError(value)
        return value

    def close(self) -> None:
        if self.process.is_alive():
            self.conn.send(("close", {}))
            self.process.join(timeout=60)
        if self.process.is_alive():
            self.process.kill()
        self.conn.close()


class LocalWorker:
    """The same requests answered in this process (no isolation, no per-engine memory)."""

    def __init__(self, threads: int) -> None:
        torch.set_num_threads(threads)
        self.server = EngineServer()

    def call(self, command: str, **kwargs) -> Any:
        if command == "memory":
            return {"kind": "shared process", "peak_bytes": None}
        try:
            return self.server.handle(command, kwargs)
        except Exception as error:
            raise EngineError(traceback.format_exc()) from error

    def close(self) -> None:
        self.server.engine = None
