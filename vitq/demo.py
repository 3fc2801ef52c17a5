"""`make demo`: the main job end to end through the REST API of the embedded default.

Starts `vitq serve` (data under ./.vitq-demo), submits a W4A4 quick-preset job for the bundled
`fmnist-vit-tiny` with Fashion-MNIST calibration and test sets, shows progress, downloads the
artifacts, prints the accuracy table and where the files are, and stops the server.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from vitq.client import Client, VitqApiError
from vitq.processes import free_port
from vitq.progress import JobProgress


def _wait_ready(client: Client, server: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"vitq serve exited with {server.returncode}")
        if client.health():
            return
        time.sleep(0.5)
    raise TimeoutError("vitq serve did not start")


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _pct(value: float | None) -> str:
    return f"{100 * value:6.2f}%" if isinstance(value, int | float) else "   n/a "


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitq.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=".vitq-demo")
    parser.add_argument("--model", default="fmnist-vit-tiny")
    parser.add_argument("--w-bits", type=int, default=4)
    parser.add_argument("--a-bits", type=int, default=4)
    parser.add_argument("--method", default="isvit")
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--calibration", default="fashion-mnist:train:1024")
    parser.add_argument("--evaluation", default="fashion-mnist:test")
    args = parser.parse_args(argv)

    data_dir = Path(args.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, VITQ_DATA_DIR=str(data_dir))
    log_path = data_dir / "serve.log"
    print(f"starting `vitq serve` on {url} (data in {data_dir}, log {log_path})", flush=True)
    with open(log_path, "ab") as log:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vitq.server_cli",
                "serve",
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        client = Client(url, api_key=None, timeout=120)
        _wait_ready(client, server)
        key = (data_dir / "local-api-key").read_text().strip()
        client = Client(url, api_key=key, timeout=120)
        body = {
            "model": args.model,
            "w_bits": args.w_bits,
            "a_bits": args.a_bits,
            "method": args.method,
            "preset": args.preset,
            "calibration": args.calibration,
            "evaluation": args.evaluation,
        }
        print(f"POST {url}/v1/jobs {body}", flush=True)
        job = client.submit_job(**body)
        print(f"job {job['id']} queued", flush=True)
        with JobProgress(job["id"], stream=sys.stdout) as show:  # one live bar; plain lines in a log
            job = client.wait(job["id"], poll=1.0, on_progress=show)
        if job["status"] != "succeeded":
            print(f"job {job['id']} {job['status']}: {job['error']}", file=sys.stderr)
            return 1
        out = data_dir / "results" / job["id"]
        files = client.download_artifacts(job["id"], out)
        result = job["result"]
        print()
        print(f"{args.model}  W{args.w_bits}A{args.a_bits}  {args.method}  preset {args.preset}")
        print(f"evaluated on {result['n_eval']} images ({args.evaluation})")
        print("            top-1     top-5")
        print(f"  FP      {_pct(result['fp_top1'])}  {_pct(result['fp_top5'])}")
        print(f"  W{args.w_bits}A{args.a_bits}    {_pct(result['quant_top1'])}  {_pct(result['quant_top5'])}")
        if isinstance(result.get("agreement"), int | float):
            print(f"  prediction agreement with FP: {_pct(result['agreement'])}")
        if isinstance(result.get("seconds"), int | float):
            print(f"  quantization job: {result['seconds']:.0f} s")
        print()
        print("artifacts (sha256-checked):")
        for path in files:
            print(f"  {path}")
        print(f"the API key of this demo server is in {data_dir / 'local-api-key'}")
        return 0
    except (VitqApiError, RuntimeError, TimeoutError) as exc:
        print(f"demo failed: {exc} (server log: {log_path})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: stopping the server (an unfinished job is re-queued when it next starts)")
        return 130
    finally:
        _stop(server)
        print("server stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())
