"""Load on charrnn-serve over loopback against the in-process runtime, in one run on one machine.

    python benchmarks/serve_benchmark.py [--variant int8] [--clients 1,16,64,256] [--json benchmarks/serve_results.json]

Starts `charrnn-serve` (a subprocess, --max-batch = the most clients), then for each client count
runs that many concurrent clients, each sending completions one after another, streaming and not,
until --requests-per-client each or --seconds per level (bounded). Reports aggregate characters/s,
time to first character (for a non-streaming request: until its whole response), errors, the cores
used by the server (all of it, and its event loop: the HTTP side) and by this client, the
ratio to the in-process figure at the same batch size: `model.generate` for one client,
`model.generate_batch(num_samples=clients)` otherwise, measured in this process just before each level
(while the server idles), and the ceiling of that ratio on this machine: the in-process figure again
while other processes keep busy as many cores as the server's event loop and the client used.
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


async def load(url, clients, stream, chars, requests_per_client, seconds):
    """Aggregate chars/s, time-to-first-character list, error count and the cores this client used.

    aiohttp, not httpx: httpx's connection pool alone added seconds to the p99 at 64 clients here."""
    deadline = time.perf_counter() + seconds
    ttfc, generated, errors = [], [0], [0]

    async def client(http, c):
        for i in range(requests_per_client):
            if time.perf_counter() > deadline:
                return
            body = {"prompt": PRIMES[(c + i) % len(PRIMES)], "max_tokens": chars, "seed": c * 1000 + i,
                    "stream": stream}
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
                ttfc.append(first)
                generated[0] += text
            except (aiohttp.ClientError, ValueError) as e:
                errors[0] += 1
                print(f"  error: {e!r}", file=sys.stderr)

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients), timeout=timeout) as http:
        started, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(client(http, c) for c in range(clients)))
        wall = time.perf_counter() - started
    return generated[0] / wall, ttfc, errors[0], (time.process_time() - cpu) / wall


def steps(url):
    """(steps, rows stepped) so far, from the server's /metrics."""
    samples = dict(line.rsplit(" ", 1) for line in httpx.get(f"{url}/metrics").text.splitlines()
                   if not line.startswith("#"))
    return float(samples["charrnn_batch_rows_count"]), float(samples["charrnn_batch_rows_sum"])


def cpu_seconds(pid):
    """(the process's CPU seconds, its main thread's: the event loop's) from /proc."""
    def seconds(stat_path):
        fields = Path(stat_path).read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return seconds(f"/proc/{pid}/stat"), seconds(f"/proc/{pid}/task/{pid}/stat")


def percentile(values, q):
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] * 1000 if values else float("nan")


def start_server(variant, max_batch, spin, log):
    """charrnn-serve on a free loopback port, its stderr to `log`; (process, base url) once it answers."""
    server = subprocess.Popen([sys.executable, "-m", "charrnn_serve", "--variant", variant, "--port", "0",
                               "--max-batch", str(max_batch), "--spin" if spin else "--no-spin"], stderr=log)
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
    parser.add_argument("--chars", type=int, default=256, help="max_tokens of every request")
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=30, help="per level: no new requests after this")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "serve_results.json"))
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]

    model = charrnn_runtime.load(variant=args.variant, provider="cpu")
    log = tempfile.NamedTemporaryFile("w", prefix="charrnn-serve-", suffix=".log", delete=False)
    server, url = start_server(args.variant, max(levels), args.spin, log)
    rows = []
    try:
        asyncio.run(load(url, 4, True, args.chars, 2, args.seconds))  # warm-up: first steps, connections
        for clients in levels:
            baseline = in_process(model, clients, args.chars)  # just before: this machine's load drifts
            for stream in (False, True):
                before, cpu_before, started = steps(url), cpu_seconds(server.pid), time.perf_counter()
                rate, ttfc, errors, client_cores = asyncio.run(load(url, clients, stream, args.chars,
                                                      max(args.requests_per_client, 20 // clients), args.seconds))
                after, cpu_after, wall = steps(url), cpu_seconds(server.pid), time.perf_counter() - started
                server_cores, loop_cores = ((b - a) / wall for a, b in zip(cpu_before, cpu_after))
                ceiling = in_process_beside(model, clients, args.chars, loop_cores + client_cores)
                rows.append({"clients": clients, "stream": stream, "chars_per_second": rate,
                             "mean_batch": (after[1] - before[1]) / max(1.0, after[0] - before[0]),
                             "in_process_chars_per_second": baseline, "ratio": rate / baseline,
                             "ceiling_ratio": ceiling / baseline,
                             "ttfc_p50_ms": percentile(ttfc, 0.5), "ttfc_p99_ms": percentile(ttfc, 0.99),
                             "requests": len(ttfc), "errors": errors, "client_cores": client_cores,
                             "server_cores": server_cores, "event_loop_cores": loop_cores})
                print(f"{clients} clients, streaming {stream}: {rate:,.0f} chars/s ({rate / baseline:.0%}), "
                      f"{errors} errors", file=sys.stderr)
    finally:
        server.terminate()
        server.wait(timeout=60)
        print(f"server log: {log.name}", file=sys.stderr)
    print_table(rows)
    with open(args.json, "w") as f:
        json.dump({"variant": args.variant, "spin": args.spin, "chars_per_request": args.chars, "machine": platform.platform(),
                   "cpus": os.cpu_count(), "load_average": os.getloadavg(), "rows": rows}, f, indent=2)


def print_table(rows):
    print("| clients | streaming | chars/s | in-process chars/s | ratio | ceiling | mean batch | TTFC p50 ms | TTFC p99 ms "
          "| requests | errors | server CPU | event loop CPU | client CPU |")
    print("|---:|:---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['clients']} | {'yes' if r['stream'] else 'no'} | {r['chars_per_second']:,.0f} | "
              f"{r['in_process_chars_per_second']:,.0f} | {r['ratio']:.0%} | {r['ceiling_ratio']:.0%} | {r['mean_batch']:.1f} | "
              f"{r['ttfc_p50_ms']:.1f} | {r['ttfc_p99_ms']:.1f} | {r['requests']} | {r['errors']} | "
              f"{r['server_cores']:.0%} | {r['event_loop_cores']:.0%} | {r['client_cores']:.0%} |")


if __name__ == "__main__":
    main()
