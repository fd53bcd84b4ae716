"""The benchmark's child processes, and what can be read off them.

Every actor runs in its own process, never on the benchmark's event loop: the simulator
(`python -m worker simulate --port 0`), the worker (`python -m worker run`) and the bare client
(`python -m worker.bench_client`). A child is reaped with `wait4`, which gives that one child's
CPU time exactly, as the kernel counted it. Its peak RSS from wait4 would include the
benchmark's own (a fork starts from its parent's peak), so the worker runs under
`worker.bench_peak`, which writes the program's own VmHWM as it exits.

The simulator is watched from outside through `GET /__stats`, sampled every few tens of
milliseconds: when an account's count first moves and when it stops tell when the worker sent
its first and last request, to within one sampling interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

from worker.bench_report import BenchError
from worker.simulator import account_label

LANES = (("billpocket", "default"), ("cheqpay", "default"), ("kushki", "default"))
CREDENTIALS: dict[str, dict[str, str]] = {
    "billpocket": {"api_key": "bench-bp-key", "user_token": "bench-bp-user"},
    "cheqpay": {"api_key": "bench-cq-key"},
    "kushki": {"private_merchant_id": "bench-ku-private", "public_merchant_id": "bench-ku-public"},
}
# the credentials that name the simulator's account, in the order the simulator hashes them
LABEL_KEYS = {
    "billpocket": ("api_key", "user_token"),
    "cheqpay": ("api_key",),
    "kushki": ("private_merchant_id",),
}
LISTENING = "linkworker simulator listening on "
POLL_S = 0.02


def lane_labels() -> dict[str, str]:
    """The simulator's account label of each benchmark lane, by provider."""
    return {
        provider: account_label(provider, *(CREDENTIALS[provider][key] for key in keys))
        for provider, keys in LABEL_KEYS.items()
    }


def child_environment() -> dict[str, str]:
    """Ours, without LINKWORKER_* variables, so the generated config alone rules the worker."""
    return {name: value for name, value in os.environ.items() if not name.startswith("LINKWORKER_")}


# --- a child process ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Usage:
    """What a finished child cost: from start to exit, its CPU time and its peak RSS.

    `ended_s` is when it was reaped (perf_counter). `peak_rss_bytes` is known only for
    children started with `measure_peak` (else 0).
    """

    exit_code: int
    wall_s: float
    ended_s: float
    cpu_s: float
    peak_rss_bytes: int


class Child:
    """A `python ARGS` child with its output in files under `workdir`, reaped with wait4.

    With `measure_peak`, ARGS are the `linkworker` command's, run under worker.bench_peak.
    """

    def __init__(
        self, name: str, args: Sequence[str], workdir: Path, *, measure_peak: bool = False
    ) -> None:
        self.name = name
        self.stdout_path = workdir / f"{name}.stdout"
        self.stderr_path = workdir / f"{name}.stderr"
        self.peak_path = workdir / f"{name}.peak" if measure_peak else None
        if self.peak_path is not None:
            args = ["-m", "worker.bench_peak", str(self.peak_path), *args]
        self.started = time.perf_counter()
        self.usage: Usage | None = None
        with self.stdout_path.open("wb") as stdout, self.stderr_path.open("wb") as stderr:
            # the command is this interpreter and words chosen here, never outside input
            self.process = subprocess.Popen(  # noqa: S603
                [sys.executable, *args], stdout=stdout, stderr=stderr, env=child_environment()
            )

    @property
    def running(self) -> bool:
        return self.usage is None

    def signal(self, signum: int = signal.SIGTERM) -> None:
        """Send `signum`, unless the child was already reaped (its pid may be reused)."""
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signum)

    async def wait(self, timeout_s: float) -> Usage:
        """Reap the child (killing it after `timeout_s`) and return what it cost."""
        if self.usage is not None:
            return self.usage
        reaping = asyncio.ensure_future(asyncio.to_thread(os.wait4, self.process.pid, 0))
        try:
            _, status, usage = await asyncio.wait_for(asyncio.shield(reaping), timeout_s)
        except TimeoutError:
            self.process.kill()
            _, status, usage = await reaping
            self._reaped(status, usage)
            raise BenchError(
                f"{self.name} did not finish within {timeout_s:.0f} s (log: {self.stderr_path})"
            ) from None
        return self._reaped(status, usage)

    def _reaped(self, status: int, usage: Any) -> Usage:
        exit_code = os.waitstatus_to_exitcode(status)
        self.process.returncode = exit_code  # reaped here, so Popen must not wait for it again
        ended_s = time.perf_counter()
        self.usage = Usage(
            exit_code=exit_code,
            wall_s=ended_s - self.started,
            ended_s=ended_s,
            cpu_s=usage.ru_utime + usage.ru_stime,
            peak_rss_bytes=self._peak_rss_bytes(),
        )
        return self.usage

    def _peak_rss_bytes(self) -> int:
        """The VmHWM worker.bench_peak wrote at exit (0 if it could not: killed, or no /proc)."""
        if self.peak_path is None or not self.peak_path.exists():
            return 0
        words = self.peak_path.read_text(encoding="ascii").split()  # "VmHWM:", "1234", "kB"
        return int(words[1]) * 1024 if len(words) == 3 else 0

    async def stop(self, timeout_s: float = 30) -> Usage:
        """SIGTERM, then reap."""
        self.signal(signal.SIGTERM)
        return await self.wait(timeout_s)

    async def close(self) -> None:
        """Kill and reap the child if it still runs (after a failure elsewhere)."""
        if self.running:
            self.signal(signal.SIGKILL)
            await self.wait(10)

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr_tail(self, chars: int = 2000) -> str:
        return self.stderr_path.read_text(errors="replace")[-chars:]

    def check(self, usage: Usage) -> Usage:
        """`usage`, or a BenchError with the end of the child's log if it failed."""
        if usage.exit_code != 0:
            raise BenchError(
                f"{self.name} exited with {usage.exit_code}; the end of its log:\n"
                + self.stderr_tail()
            )
        if self.peak_path is not None and usage.peak_rss_bytes <= 0:
            raise BenchError(f"{self.name} left no peak RSS in {self.peak_path}")
        return usage

    async def wait_for_output(self, needle: str, *, stream: str, timeout_s: float) -> str:
        """The first line of stdout or stderr containing `needle`, polled from its file."""
        path = self.stdout_path if stream == "stdout" else self.stderr_path
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in path.read_text(errors="replace").splitlines():
                if needle in line:
                    return line
            if self.process.poll() is not None:
                break
            await asyncio.sleep(POLL_S)
        raise BenchError(
            f"{self.name} did not print {needle!r} within {timeout_s:.0f} s; "
            f"the end of its log:\n{self.stderr_tail()}"
        )

    async def __aenter__(self) -> Child:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


# --- the simulator ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def simulator_process(
    workdir: Path, *, latency_ms: float = 0, rate_per_s: float | None = None
) -> AsyncIterator[str]:
    """Run `linkworker simulate --port 0` in its own process; yields its base URL."""
    args = ["-m", "worker", "simulate", "--port", "0", "--latency-ms", str(latency_ms)]
    if rate_per_s is not None:
        args += ["--rate-per-s", str(rate_per_s)]
    async with Child("simulator", args, workdir) as child:
        line = await child.wait_for_output(LISTENING, stream="stdout", timeout_s=30)
        yield line.split(LISTENING, 1)[1].strip()
        await child.stop()


async def run_bare_client(
    workdir: Path, url: str, requests: int, concurrency: int, timeout_s: float
) -> dict[str, float]:
    """Run the bare client against `url`; its figures (see worker.bench_client)."""
    args = ["-m", "worker.bench_client", url, str(requests), str(concurrency)]
    async with Child("bare_client", args, workdir) as child:
        child.check(await child.wait(timeout_s))
        figures: dict[str, float] = json.loads(child.stdout())
    if figures["ok"] != requests:
        raise BenchError(f"the bare client got {figures['ok']} of {requests} links created")
    return figures


# --- the worker ---------------------------------------------------------------------------------


def write_worker_config(
    path: Path,
    *,
    database_url: str,
    base_url: str,
    rate_per_s: float,
    max_in_flight: int,
    rate_headroom: float = 0.01,
    **worker_keys: object,
) -> Path:
    """A TOML configuration with the three benchmark lanes at the simulator."""
    top = {"database_url": database_url, "worker_id": "bench", "log_format": "json"}
    lines = [f"{key} = {_toml(value)}" for key, value in {**top, **worker_keys}.items()]
    limits = {
        "base_url": base_url,
        "rate_per_s": rate_per_s,
        "max_in_flight": max_in_flight,
        "rate_headroom": rate_headroom,
    }
    for provider, _ in LANES:
        lines.append(f"[providers.{provider}]")
        section = {**limits, **CREDENTIALS[provider]}
        lines += [f"{key} = {_toml(value)}" for key, value in section.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(float(value)) if isinstance(value, float) else str(value)
    return json.dumps(str(value))  # a JSON string is a TOML basic string


def start_worker(config: Path, workdir: Path, *, drain: bool, name: str = "worker") -> Child:
    """`linkworker run [--drain] --config CONFIG` in its own process."""
    args = ["run", "--config", str(config)]
    return Child(name, [*args, "--drain"] if drain else args, workdir, measure_peak=True)


# --- watching the simulator ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    """One reading of /__stats: when (perf_counter seconds) and requests per account."""

    at_s: float
    requests: dict[str, int]

    def count(self, labels: Iterable[str]) -> int:
        return sum(self.requests.get(label, 0) for label in labels)


async def fetch_stats(session: aiohttp.ClientSession, base_url: str) -> dict[str, Any]:
    """The simulator's /__stats document."""
    async with session.get(base_url + "/__stats") as response:
        response.raise_for_status()
        document: dict[str, Any] = await response.json()
        return document


class StatsPoller:
    """Samples /__stats every `interval_s` while in its `async with` block."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, interval_s: float) -> None:
        self.session = session
        self.base_url = base_url
        self.interval_s = interval_s
        self.samples: list[Sample] = []
        self._task: asyncio.Task[None] | None = None

    async def sample(self) -> None:
        stats = await fetch_stats(self.session, self.base_url)
        requests = {label: account["requests"] for label, account in stats["accounts"].items()}
        self.samples.append(Sample(time.perf_counter(), requests))

    async def _poll(self) -> None:
        while True:
            await self.sample()
            await asyncio.sleep(self.interval_s)

    async def __aenter__(self) -> StatsPoller:
        await self.sample()
        self._task = asyncio.create_task(self._poll())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if exc is None:
            await self.sample()


@dataclass(frozen=True, slots=True)
class Activity:
    """When some accounts were busy, as seen by sampling.

    `first_s` and `last_s` are the samples that first showed a request and first showed the
    final count: each is at most one interval after the real event. `steady_per_s` is the rate
    between the first sample with a request and the last sample before the final count: the
    pace the accounts held once started, without the start-up and the last partial interval.
    """

    requests: int
    first_s: float
    last_s: float
    steady_per_s: float

    @property
    def span_s(self) -> float:
        return self.last_s - self.first_s

    @property
    def overall_per_s(self) -> float:
        return self.requests / self.span_s if self.span_s > 0 else 0.0


def activity(samples: Sequence[Sample], labels: Iterable[str]) -> Activity:
    """The Activity of the accounts named by `labels` over the sampled period."""
    names = list(labels)
    counts = [sample.count(names) for sample in samples]
    base, final = counts[0], counts[-1]
    if final <= base:
        raise BenchError(f"the simulator saw no request from accounts {names}")
    first = next(index for index, count in enumerate(counts) if count > base)
    done = next(index for index, count in enumerate(counts) if count == final)
    last_busy = done - 1
    if last_busy > first:
        moved = counts[last_busy] - counts[first]
        steady = moved / (samples[last_busy].at_s - samples[first].at_s)
    else:  # everything happened within about one interval: the lower bound
        steady = (final - base) / (samples[done].at_s - samples[first - 1].at_s)
    return Activity(final - base, samples[first].at_s, samples[done].at_s, steady)
