"""Time to the first character of a fresh prompt while the batch is busy: cold and cached, by length.

    python benchmarks/prefill_benchmark.py [--variant fp32] [--busy 63] [--lengths 100,500,2000,4000]
        [--pythonpath DIR:DIR]   # a server from another checkout (e.g. an older commit), same API

Starts `charrnn-serve` (a subprocess), keeps `--busy` streaming clients generating long completions,
then for each prompt length sends a prompt never seen before (cold: a stretch of Tiny Shakespeare at
a new offset) and the same prompt again (cached), streaming, and times the first event with text.
Medians of --repeats. Prints a table and writes --json.
"""

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "train" / "data" / "tinyshakespeare.txt"


async def first_char(http, url, prompt):
    """Seconds from sending a streaming completion of `prompt` to its first event with text."""
    started = time.perf_counter()
    body = {"prompt": prompt, "max_tokens": 20, "stream": True, "seed": 1}
    async with http.post(f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.content:
            if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["text"]:
                return time.perf_counter() - started
    raise RuntimeError("no text came")


async def busy(http, url, stop):
    """One client that keeps a row generating until `stop` is set."""
    while not stop.is_set():
        body = {"prompt": "ROMEO: ", "max_tokens": 4000, "stream": True}
        async with http.post(f"{url}/v1/completions", json=body) as response:
            async for _ in response.content:
                if stop.is_set():
                    return


async def measure(url, args, text):
    stop = asyncio.Event()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600),
                                     connector=aiohttp.TCPConnector(limit=0)) as http:
        clients = [asyncio.create_task(busy(http, url, stop)) for _ in range(args.busy)]
        await asyncio.sleep(args.warmup)
        rows, offset = [], 0
        for length in args.lengths:
            cold, cached = [], []
            for _ in range(args.repeats):
                prompt = text[offset:offset + length]
                offset += length
                cold.append(await first_char(http, url, prompt))
                cached.append(await first_char(http, url, prompt))
            rows.append({"prompt_chars": length, "cold_s": statistics.median(cold),
                         "cached_s": statistics.median(cached)})
            print(f"{length:>6,} chars: cold {rows[-1]['cold_s']:.3f} s, again {rows[-1]['cached_s']:.3f} s", flush=True)
        stop.set()
        for client in clients:
            client.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="fp32")
    parser.add_argument("--busy", type=int, default=63, help="clients generating beside the measured one")
    parser.add_argument("--lengths", default="100,500,2000,4000")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds for the busy rows to start")
    parser.add_argument("--pythonpath", default=None, help="PYTHONPATH of the server (another checkout)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    args.lengths = [int(n) for n in args.lengths.split(",")]
    env = {**os.environ, **({"PYTHONPATH": args.pythonpath} if args.pythonpath else {})}
    server = subprocess.Popen([sys.executable, "-m", "charrnn_serve", "--port", "0", "--variant", args.variant,
                               "--max-batch", str(args.busy + 1)], stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = next(found.group(0).removesuffix("/v1") for line in server.stderr
                   if (found := re.search(r"http://\S+:\d+(/v1)?", line)))
        rows = asyncio.run(measure(url, args, CORPUS.read_text(encoding="utf-8")))
    finally:
        server.terminate()
        server.wait(timeout=60)
    result = {"variant": args.variant, "busy_rows": args.busy, "repeats": args.repeats,
              "server_pythonpath": args.pythonpath, "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores", "load_average": os.getloadavg(), "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
