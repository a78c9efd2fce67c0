"""Load on charrnn-serve over loopback against the in-process runtime, in one run on one machine.

    python benchmarks/serve_benchmark.py [--variant int8] [--clients 1,16,64,256] [--burst] [--json ...]

Starts `charrnn-serve` (a subprocess, --max-batch = the most clients), then for each client count
runs that many concurrent clients, each sending completions one after another, streaming and not.
Clients start spread over one request's time, as independent users arrive (--burst: all at once),
and the figures are those of the steady state: a window of --seconds that opens once every client
has started and a request's time has passed, read from the server's /metrics and /proc. Reports
aggregate characters/s, rows per step, time to first character (for a non-streaming request: until
its whole response), errors, the cores used by the server (all of it, and its event loop: the HTTP
side) and by this client, the ratio to the in-process figure at the same batch size (`model.generate`
for one client, `model.generate_batch(num_samples=clients)` otherwise, measured in this process
before and after each level while the server idles: their mean), the same ratio for the runtime's
Engine alone (the server's batch loop without HTTP, as many engines as the server's: what the
engine itself costs), and the ceiling of the ratio on this machine for one engine: the in-process
figure again while other processes keep busy as many cores as the server's event loop and the
client used.
"""

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx

import charrnn_runtime
from charrnn_runtime.engine import Engine
from charrnn_runtime.engine_pool import EnginePool, cores

ROOT = Path(__file__).resolve().parents[1]
PRIMES = ["ROMEO: ", "JULIET:\n", "First Citizen:\n", "KING RICHARD III:\nNow is the ", ""]


def in_process(model, clients, chars):
    """Characters/s of the runtime itself: one stream for 1 client, generate_batch for more (median of 3)."""
    def once():
        started = time.perf_counter()
        if clients == 1:
            model.generate(PRIMES[0], chars, seed=1)
        else:
            model.generate_batch(PRIMES[0], chars, num_samples=clients, seed=1)
        return clients * chars / (time.perf_counter() - started)
    once()
    return statistics.median(once() for _ in range(3))


def in_engine(model, clients, chars, engines, rounds=3):
    """Characters/s of the runtime's Engine (the server's batch loop, no HTTP) with `clients` rows, fed
    rounds × clients requests at once so that a freed row takes the next at once; with `engines` > 1
    as the server's pool: an EnginePool, or below one client per engine, one of its engines (its
    share of the cores)."""
    if clients >= engines > 1:  # (each engine loads the model with its share of the cores)
        engine = EnginePool(model, engines, max_batch=clients, max_waiting=rounds * clients)
    elif engines > 1:
        one = charrnn_runtime.load(variant=model.variant, provider="cpu", threads=max(1, cores() // engines))
        engine = Engine(one, max_batch=clients, max_waiting=rounds * clients)
    else:
        engine = Engine(model, max_batch=clients, max_waiting=rounds * clients)
    with engine:
        engine.submit(PRIMES[0], chars).result()  # warm-up
        started = time.perf_counter()
        requests = [engine.submit(PRIMES[i % len(PRIMES)], chars, seed=i) for i in range(rounds * clients)]
        for request in requests:
            request.result()
        return rounds * clients * chars / (time.perf_counter() - started)


def busy(share, stop, period=0.004):
    """Keep `share` of a core busy, in bursts, until `stop` is set."""
    while not stop.is_set():
        started = time.perf_counter()
        while time.perf_counter() - started < share * period:
            pass
        time.sleep((1 - share) * period)


def in_process_beside(model, clients, chars, cores):
    """in_process() while other processes keep `cores` of the CPU busy: what the batch could do in the
    CPU that the server's HTTP side and the client leave it, with no GIL and no lost overlap (a ceiling)."""
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    burners = [context.Process(target=busy, args=(min(1.0, cores - i), stop)) for i in range(math.ceil(cores))]
    for burner in burners:
        burner.start()
    try:
        return in_process(model, clients, chars)
    finally:
        stop.set()
        for burner in burners:
            burner.join()


class Window:
    """The steady state of one level: from when every client has started (plus one request's time to
    settle) until the deadline, the server's counters (/metrics), its CPU (/proc) and this client's CPU."""

    def __init__(self, url, pid):
        self.url, self.pid, self.start = url, pid, None

    async def sample(self, http):
        async with http.get(f"{self.url}/metrics") as response:
            samples = dict(line.rsplit(" ", 1) for line in (await response.text()).splitlines()
                           if not line.startswith("#"))
        return {"time": time.perf_counter(), "client_cpu": time.process_time(), "server_cpu": cpu_seconds(self.pid),
                **{name: float(samples[name]) for name in (
                    "charrnn_generated_chars_total", "charrnn_batch_rows_count", "charrnn_batch_rows_sum",
                    "charrnn_e2e_request_latency_seconds_count")}}

    def figures(self, end):
        """chars/s, mean batch, the cores used (server, its event loop, this client) in the window, and
        the event loop's CPU per request that ended in it (the HTTP side's cost of one request)."""
        start, wall = self.start, end["time"] - self.start["time"]
        steps = end["charrnn_batch_rows_count"] - start["charrnn_batch_rows_count"]
        ended = end["charrnn_e2e_request_latency_seconds_count"] - start["charrnn_e2e_request_latency_seconds_count"]
        server, loop = ((b - a) / wall for a, b in zip(start["server_cpu"], end["server_cpu"]))
        return {"chars_per_second": (end["charrnn_generated_chars_total"] - start["charrnn_generated_chars_total"]) / wall,
                "mean_batch": (end["charrnn_batch_rows_sum"] - start["charrnn_batch_rows_sum"]) / max(1.0, steps),
                "server_cores": server, "event_loop_cores": loop,
                "event_loop_us_per_request": loop * wall / max(1.0, ended) * 1e6,
                "client_cores": (end["client_cpu"] - start["client_cpu"]) / wall, "window_seconds": wall}


async def load(url, pid, clients, stream, chars, seconds, request_seconds, burst=False):
    """`clients` clients, each sending completions one after another; the window's figures (Window),
    the time to first character of the requests sent in the window, and the errors.

    Clients start spread over one request's time (`request_seconds`), as independent users arrive,
    unless `burst`: then all at once, and their requests stay in step (each round of 256 arrives
    together). The window opens one request's time after the last start and lasts `seconds`; then no
    client sends another request, and those in flight finish outside it.
    aiohttp, not httpx: httpx's connection pool alone added seconds to the p99 at 64 clients here."""
    window, ttfc, errors = Window(url, pid), [], [0]
    ramp = 0.0 if burst else request_seconds
    opens = time.perf_counter() + ramp + request_seconds
    closes = opens + seconds

    async def client(http, c):
        await asyncio.sleep(ramp * c / clients)
        i = 0
        while time.perf_counter() < closes:
            body = {"prompt": PRIMES[(c + i) % len(PRIMES)], "max_tokens": chars, "seed": c * 1000 + i,
                    "stream": stream}
            i += 1
            started, first, text = time.perf_counter(), None, 0
            try:
                async with http.post(f"{url}/v1/completions", json=body) as response:
                    response.raise_for_status()
                    if stream:  # the events split from the bytes as they come: cheaper than a line reader
                        pending = b""
                        async for data in response.content.iter_any():
                            *events, pending = (pending + data).split(b"\n\n")
                            for event in events:
                                if event.startswith(b"data: {"):
                                    piece = json.loads(event[6:])["choices"][0]["text"]
                                    if piece and first is None:
                                        first = time.perf_counter() - started
                                    text += len(piece)
                    else:
                        text = len((await response.json())["choices"][0]["text"])
                        first = time.perf_counter() - started
                if text != chars:
                    raise ValueError(f"{text} chars, asked for {chars}")
                if opens <= started < closes:
                    ttfc.append(first)
            except (aiohttp.ClientError, ValueError) as e:
                errors[0] += 1
                print(f"  error: {e!r}", file=sys.stderr)

    async def measure(http):
        await asyncio.sleep(opens - time.perf_counter())
        window.start = await window.sample(http)
        await asyncio.sleep(closes - time.perf_counter())
        return window.figures(await window.sample(http))

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients + 1), timeout=timeout) as http:
        figures, *_ = await asyncio.gather(measure(http), *(client(http, c) for c in range(clients)))
    return figures, ttfc, errors[0]


def cpu_seconds(pid):
    """(the CPU seconds of the process and its children (the engine's process), its main thread's: the
    event loop's) from /proc."""
    def seconds(stat_path):
        fields = Path(stat_path).read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    children = [int(child) for task in Path(f"/proc/{pid}/task").iterdir()
                for child in (task / "children").read_text().split()]
    return (seconds(f"/proc/{pid}/stat") + sum(cpu_seconds(child)[0] for child in children),
            seconds(f"/proc/{pid}/task/{pid}/stat"))


def percentile(values, q):
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] * 1000 if values else float("nan")


def start_server(variant, max_batch, spin, engine_process, threads, engines, log):
    """charrnn-serve on a free loopback port, its stderr to `log`; (process, base url) once it answers."""
    server = subprocess.Popen([sys.executable, "-m", "charrnn_serve", "--variant", variant, "--port", "0",
                               "--max-batch", str(max_batch), "--spin" if spin else "--no-spin",
                               "--engine-process" if engine_process else "--engine-in-process",
                               *(["--engines", str(engines)] if engines else []),
                               *(["--threads", str(threads)] if threads else [])],
                              stderr=log)
    for _ in range(600):
        found = re.search(r"http://\S+:\d+", Path(log.name).read_text())
        try:
            if found and httpx.get(f"{found.group(0)}/health").status_code == 200:
                return server, found.group(0)
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"charrnn-serve did not come up: {Path(log.name).read_text()}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="int8", choices=["fp32", "int8"])
    parser.add_argument("--clients", default="1,16,64,256")
    parser.add_argument("--no-spin", dest="spin", action="store_false",
                        help="the server's idle onnxruntime threads sleep (charrnn-serve --no-spin)")
    parser.add_argument("--engine-in-process", dest="engine_process", action="store_false",
                        help="the server's batch loop in its HTTP process (charrnn-serve --engine-in-process)")
    parser.add_argument("--threads", type=int, default=None,
                        help="the server's onnxruntime threads (charrnn-serve --threads); "
                             "the in-process figures use all cores")
    parser.add_argument("--engines", type=int, default=None,
                        help="the server's engines (charrnn-serve --engines; default: the server's default)")
    parser.add_argument("--chars", type=int, default=256, help="max_tokens of every request")
    parser.add_argument("--seconds", type=float, default=20, help="the measured window of each level")
    parser.add_argument("--burst", action="store_true",
                        help="all clients start at once (their requests stay in step), not spread over a request's time")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "serve_results.json"))
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]

    model = charrnn_runtime.load(variant=args.variant, provider="cpu")
    log = tempfile.NamedTemporaryFile("w", prefix="charrnn-serve-", suffix=".log", delete=False)
    server, url = start_server(args.variant, max(levels), args.spin, args.engine_process, args.threads, args.engines, log)
    engines = int(float(re.search(r"^charrnn_engines (\S+)$", httpx.get(f"{url}/metrics").text, re.M).group(1)))
    print(f"charrnn-serve at {url}: {engines} engine(s)", file=sys.stderr)
    rows = []
    try:
        asyncio.run(load(url, server.pid, 4, True, args.chars, 1, 0.1))  # warm-up: first steps, connections
        for clients in levels:
            before = in_process(model, clients, args.chars)  # around the level: this machine's speed drifts
            engine = in_engine(model, clients, args.chars, engines)
            request_seconds = args.chars * clients / before
            level = []
            for stream in (False, True):
                figures, ttfc, errors = asyncio.run(load(url, server.pid, clients, stream, args.chars, args.seconds,
                                                         request_seconds, args.burst))
                busy_cores = figures["event_loop_cores"] + figures["client_cores"]
                level.append({"clients": clients, "stream": stream, **figures, "busy_cores": busy_cores,
                              "ttfc_p50_ms": percentile(ttfc, 0.5), "ttfc_p99_ms": percentile(ttfc, 0.99),
                              "requests": len(ttfc), "errors": errors})
            after = in_process(model, clients, args.chars)
            baseline = (before + after) / 2
            for row in level:
                ceiling = in_process_beside(model, clients, args.chars, row.pop("busy_cores"))
                row.update(in_process_chars_per_second=baseline, in_process_before_after=[before, after],
                           engine_chars_per_second=engine, engine_ratio=engine / baseline,
                           ratio=row["chars_per_second"] / baseline, ceiling_ratio=ceiling / baseline)
                print(f"{clients} clients, streaming {row['stream']}: {row['chars_per_second']:,.0f} chars/s "
                      f"({row['ratio']:.0%}), {row['errors']} errors", file=sys.stderr)
            rows += level
    finally:
        server.terminate()
        server.wait(timeout=60)
        print(f"server log: {log.name}", file=sys.stderr)
    print_table(rows)
    with open(args.json, "w") as f:
        json.dump({"variant": args.variant, "spin": args.spin, "engine_process": args.engine_process,
                   "threads": args.threads, "engines": engines, "burst": args.burst, "chars_per_request": args.chars,
                   "window_seconds": args.seconds, "machine": platform.platform(), "cpus": os.cpu_count(),
                   "load_average": os.getloadavg(), "rows": rows}, f, indent=2)


def print_table(rows):
    print("| clients | streaming | chars/s | in-process chars/s | ratio | engine alone | ceiling | mean batch "
          "| TTFC p50 ms | TTFC p99 ms | requests | errors | server CPU | event loop CPU | event loop µs/request "
          "| client CPU |")
    print("|---:|:---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['clients']} | {'yes' if r['stream'] else 'no'} | {r['chars_per_second']:,.0f} | "
              f"{r['in_process_chars_per_second']:,.0f} | {r['ratio']:.0%} | {r['engine_ratio']:.0%} | "
              f"{r['ceiling_ratio']:.0%} | {r['mean_batch']:.1f} | "
              f"{r['ttfc_p50_ms']:.1f} | {r['ttfc_p99_ms']:.1f} | {r['requests']} | {r['errors']} | "
              f"{r['server_cores']:.0%} | {r['event_loop_cores']:.0%} | {r['event_loop_us_per_request']:,.0f} | "
              f"{r['client_cores']:.0%} |")


if __name__ == "__main__":
    main()
