"""sglang's bench_serving and `eastwest-bench run` against one `eastwest-bench serve`, same
seed and flags, one rate after another; prints a Markdown table of every figure both write.

    python bench/scripts/side_by_side.py --bench target/debug/eastwest-bench \\
        [--rates 10 50 inf] [--num-prompts 200] [--ttft 20ms] [--out DIR]

Run it with a python that can run bench/scripts/sglang_bench_serving.py (see its header).
The dataset is random-ids with the tokenizer in bench/tests/fixtures/tokenizer, so both tools
send the same prompts, lengths and arrival times.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER = os.path.join(HERE, "..", "tests", "fixtures", "tokenizer")
FIGURES = [
    "completed", "total_input_tokens", "total_output_tokens",
    "total_output_tokens_retokenized", "duration", "request_throughput",
    "output_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
    "mean_itl_ms", "median_itl_ms", "p95_itl_ms", "mean_tpot_ms", "median_tpot_ms",
    "mean_e2e_latency_ms", "median_e2e_latency_ms", "p99_e2e_latency_ms", "concurrency",
    "max_output_tokens_per_s", "max_concurrent_requests",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", required=True, help="the eastwest-bench binary")
    ap.add_argument("--rates", nargs="+", default=["10", "50", "inf"])
    ap.add_argument("--num-prompts", default="200")
    ap.add_argument("--backend", default="sglang-oai")
    ap.add_argument("--ttft", default="20ms", help="serve's time to first token")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="side-by-side-")
    os.makedirs(out, exist_ok=True)
    serve = subprocess.Popen(
        [args.bench, "serve", "--listen", "127.0.0.1:0", "--model", "demo-model",
         "--ttft", args.ttft, "--itl", "7ms", "--seed", "0"],
        stdout=subprocess.PIPE, text=True)
    try:
        line = serve.stdout.readline()
        url = line.strip().rsplit(" ", 1)[-1]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        rows = []
        for rate in args.rates:
            common = [
                "--backend", args.backend, "--base-url", url, "--model", "demo-model",
                "--tokenizer", TOKENIZER, "--dataset-name", "random-ids",
                "--num-prompts", args.num_prompts, "--random-input-len", "64",
                "--random-output-len", "32", "--random-range-ratio", "0.5",
                "--request-rate", rate, "--seed", "42", "--disable-tqdm",
            ]
            results = {}
            for tool, cmd in [
                ("sglang", [sys.executable, os.path.join(HERE, "sglang_bench_serving.py")]),
                ("eastwest", [args.bench, "run"]),
            ]:
                path = os.path.join(out, f"{tool}_{rate}.jsonl")
                if os.path.exists(path):
                    os.remove(path)
                with open(os.path.join(out, f"{tool}_{rate}.log"), "w") as log:
                    subprocess.run(cmd + common + ["--output-file", path], env=env,
                                   stdout=log, stderr=subprocess.STDOUT, check=True)
                with open(path) as f:
                    results[tool] = json.loads(f.readline())
            rows.append((rate, results))
    finally:
        serve.terminate()
        serve.wait()
    print(f"| figure | " + " | ".join(
        f"rate {r}: sglang / eastwest / diff" for r, _ in rows) + " |")
    print("| --- |" + " --- |" * len(rows))
    for key in FIGURES:
        cells = []
        for _, res in rows:
            a, b = res["sglang"][key], res["eastwest"][key]
            diff = (b - a) / a * 100 if a else 0.0
            fmt = "{:.0f}" if isinstance(a, int) else "{:.2f}"
            cells.append(f"{fmt.format(a)} / {fmt.format(b)} / {diff:+.1f} %")
        print(f"| {key} | " + " | ".join(cells) + " |")
    print(f"\n(JSON lines and logs in {out})")


if __name__ == "__main__":
    main()
