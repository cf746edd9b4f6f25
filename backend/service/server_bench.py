"""Latency of the HTTP backend: health calls, job submission, and a job through the server versus the CLI.

    python -m backend.service.server_bench RASTER --model MODEL [--classes water --classes road] [--bbox ...]

(`farslip bench --server` calls `bench_server`). It starts a real `farslip serve` on a free
port with a throw-away state directory, so the measured path is the one the QGIS plugin uses.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

DEFAULT_CLASSES = ["water", "field", "road", "building"]


def _start_server(state_dir: Path, device: str) -> tuple[subprocess.Popen, dict, float]:
    connection_file = state_dir / "conn.json"
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "backend.service.cli", "serve", "--port", "0", "--state-dir", str(state_dir),
         "--connection-file", str(connection_file), "--device", device],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"farslip serve exited with {process.returncode}; see {state_dir}/logs")
        try:
            info = json.loads(connection_file.read_text())
            if info.get("pid") == process.pid:
                return process, info, time.perf_counter() - started
        except (OSError, ValueError):
            pass
        if time.perf_counter() - started > 120:
            process.kill()
            raise RuntimeError("farslip serve did not start within 120 s")
        time.sleep(0.01)


def _summary(seconds: list[float]) -> dict:
    ordered = sorted(seconds)
    return {"n": len(ordered), "median_ms": round(statistics.median(ordered) * 1000, 2),
            "p95_ms": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] * 1000, 2),
            "min_ms": round(ordered[0] * 1000, 2)}


def _run_job(client: httpx.Client, body: dict) -> tuple[float, float, dict]:
    """(submission latency, submit-to-done seconds, final job) for one job, polling every 10 ms."""
    t0 = time.perf_counter()
    response = client.post("/v1/segment", json=body)
    submitted = time.perf_counter() - t0
    response.raise_for_status()
    job_id = response.json()["job_id"]
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] not in ("queued", "running"):
            return submitted, time.perf_counter() - t0, job
        time.sleep(0.01)


def bench_server(raster: str | Path, model: str | None = None, class_lines: list[str] | None = None,
                 bbox: list[float] | None = None, repeats: int = 50, jobs: int = 3,
                 device: str = "cpu") -> dict:
    """Measure the backend on `raster`; returns the numbers (seconds or milliseconds, as named)."""
    raster = str(Path(raster).expanduser().resolve())
    class_lines = class_lines or DEFAULT_CLASSES
    results: dict = {"raster": raster, "model": model, "device": device, "bbox": bbox}
    with tempfile.TemporaryDirectory(prefix="farslip-bench-") as scratch:
        scratch_dir = Path(scratch)
        state_dir, out_dir = scratch_dir / "state", scratch_dir / "out"
        out_dir.mkdir()
        process, info, startup_s = _start_server(state_dir, device)
        results["server_startup_s"] = round(startup_s, 3)
        try:
            headers = {"Authorization": f"Bearer {info['token']}"}
            with httpx.Client(base_url=info["url"], headers=headers, timeout=600) as client:
                client.get("/v1/health")
                health = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    client.get("/v1/health").raise_for_status()
                    health.append(time.perf_counter() - t0)
                results["health_keepalive"] = _summary(health)
                fresh = []
                for _ in range(min(repeats, 20)):
                    t0 = time.perf_counter()
                    httpx.get(info["url"] + "/v1/health", headers=headers).raise_for_status()
                    fresh.append(time.perf_counter() - t0)
                results["health_new_connection"] = _summary(fresh)

                def body(name: str) -> dict:
                    return {"raster": raster, "class_lines": class_lines, "model": model, "bbox": bbox,
                            "out": str(out_dir / f"{name}.gpkg")}

                submit_s, cold_s, cold_job = _run_job(client, body("cold"))
                if cold_job["state"] != "done":
                    raise RuntimeError(f"the benchmark job failed: {cold_job['error'] or cold_job['message']}")
                results["server_job_cold_s"] = round(cold_s, 3)
                submissions, warm, engine = [submit_s], [], []
                for i in range(jobs):
                    submit_s, total_s, job = _run_job(client, body(f"warm{i}"))
                    submissions.append(submit_s)
                    warm.append(total_s)
                    engine.append(job["result"]["timings"]["total_s"])
                results["job_submission"] = _summary(submissions)
                results["server_job_warm_s"] = round(statistics.median(warm), 3)
                results["server_engine_s"] = round(statistics.median(engine), 3)
                results["server_overhead_s"] = round(statistics.median(warm) - statistics.median(engine), 3)
        finally:
            process.terminate()
            process.wait(60)

        cli_out = out_dir / "cli.gpkg"
        command = [sys.executable, "-m", "backend.service.cli", "segment", raster, "--out", str(cli_out),
                   "--device", device, "--quiet"]
        command += [arg for line in class_lines for arg in ("-c", line)]
        if model:
            command += ["--model", model]
        if bbox:
            command += ["--bbox", *map(str, bbox)]
        t0 = time.perf_counter()
        run = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ))
        cli_s = time.perf_counter() - t0
        if run.returncode != 0:
            raise RuntimeError(f"farslip segment failed: {run.stderr.strip()}")
        report = json.loads(cli_out.with_suffix(".report.json").read_text())
        results["cli_wall_s"] = round(cli_s, 3)
        results["cli_engine_s"] = report["timings"]["total_s"]
        results["cli_overhead_s"] = round(cli_s - report["timings"]["total_s"], 3)
        results["server_vs_cli_s"] = round(results["server_job_warm_s"] - cli_s, 3)
    return results


def format_results(results: dict) -> str:
    lines = [
        f"raster {results['raster']}  model {results['model'] or 'default'}  device {results['device']}",
        f"server startup (process start -> connection file): {results['server_startup_s']:.2f} s",
        "GET /v1/health, keep-alive:      median {median_ms} ms, p95 {p95_ms} ms (n={n})".format(
            **results["health_keepalive"]),
        "GET /v1/health, new connection:  median {median_ms} ms, p95 {p95_ms} ms (n={n})".format(
            **results["health_new_connection"]),
        "POST /v1/segment (submission):   median {median_ms} ms, p95 {p95_ms} ms (n={n})".format(
            **results["job_submission"]),
        f"job through the server, first (loads the model): {results['server_job_cold_s']:.2f} s",
        f"job through the server, model loaded: {results['server_job_warm_s']:.2f} s "
        f"(engine {results['server_engine_s']:.2f} s, server overhead {results['server_overhead_s']:.2f} s)",
        f"same job with `farslip segment`: {results['cli_wall_s']:.2f} s "
        f"(engine {results['cli_engine_s']:.2f} s, process start + imports + model load "
        f"{results['cli_overhead_s']:.2f} s)",
        f"server (warm) minus CLI: {results['server_vs_cli_s']:+.2f} s per job",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("raster")
    parser.add_argument("--model")
    parser.add_argument("--classes", "-c", action="append")
    parser.add_argument("--bbox", nargs=4, type=float)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--jobs", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    arguments = parser.parse_args(argv)
    results = bench_server(arguments.raster, arguments.model, arguments.classes, arguments.bbox,
                           arguments.repeats, arguments.jobs, arguments.device)
    print(json.dumps(results, indent=2) if arguments.json else format_results(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
