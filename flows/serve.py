"""``make prefect``: a local Prefect server (SQLite, 127.0.0.1) plus the served deployments.

    python -m flows.serve [--port 4200] [--no-server]

Starts ``prefect server start --host 127.0.0.1`` with PREFECT_HOME in the project (.prefect/,
analytics off), waits until it is healthy, then serves the flow "imagen" as the deployment
"cascade-train" and the flow "imagen-sample" as "sample" (flows/sample.py) until interrupted
(Ctrl-C), and stops the server. In another shell::

    export PREFECT_API_URL=http://127.0.0.1:4200/api
    .venv/bin/prefect deployment run imagen/cascade-train --watch
    .venv/bin/prefect deployment run imagen/cascade-train \\
        --param overrides='{"stages.base64.trainer.max_steps": 50}'
    .venv/bin/prefect deployment run imagen-sample/sample \\
        --param prompts='["a red circle"]' --param negative='["blurry"]'

``--no-server`` serves against the server already named by $PREFECT_API_URL.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]
DEPLOYMENT = "cascade-train"


def prefect_env(port: int, home: Path | None = None) -> dict[str, str]:
    """The settings both the server and the flow runner need."""
    return {
        "PREFECT_HOME": str(home or PROJECT_DIR / ".prefect"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_UI_ENABLED": os.environ.get("PREFECT_UI_ENABLED", "true"),
        "DO_NOT_TRACK": "1",
    }


def wait_healthy(api_url: str, timeout: float = 90.0, proc: subprocess.Popen | None = None) -> None:
    """Poll ``<api>/health`` until it answers true; raise after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the Prefect server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as r:
                if r.read().strip() == b"true":
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the Prefect server at {api_url} was not healthy within {timeout:.0f} s")


def start_server(port: int, env: dict[str, str]) -> subprocess.Popen:
    """``prefect server start`` on 127.0.0.1:port in its own process group."""
    Path(env["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    prefect = Path(sys.executable).parent / "prefect"
    cmd = [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    return subprocess.Popen(cmd, env={**os.environ, **env}, start_new_session=True)


def stop(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM the process group ``proc`` leads, SIGKILL it after ``timeout`` seconds."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.serve", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--port", type=int, default=4200)
    parser.add_argument(
        "--no-server", action="store_true", help="use the server named by $PREFECT_API_URL"
    )
    args = parser.parse_args(argv)

    server = None
    if not args.no_server:
        env = prefect_env(
            args.port, Path(os.environ["PREFECT_HOME"]) if os.environ.get("PREFECT_HOME") else None
        )
        os.environ.update(env)
        server = start_server(args.port, env)
    # SIGTERM (e.g. from a supervisor) stops serving the same way Ctrl-C does
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        if server is not None:
            wait_healthy(os.environ["PREFECT_API_URL"], proc=server)
            print(
                f"Prefect server: {os.environ['PREFECT_API_URL'].removesuffix('/api')}", flush=True
            )
        from prefect import serve

        from flows.cascade import imagen_flow
        from flows.sample import DEPLOYMENT as SAMPLE
        from flows.sample import sample_flow

        os.chdir(PROJECT_DIR)
        serve(
            imagen_flow.to_deployment(DEPLOYMENT, description="The Imagen cascade through DVC"),
            sample_flow.to_deployment(SAMPLE, description="Prompts -> images (imagen sample)"),
        )
    except KeyboardInterrupt:
        pass
    finally:
        if server is not None:
            stop(server)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
