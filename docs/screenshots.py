"""The README's MLflow screenshots, taken from a real store: `python docs/screenshots.py`.

    make demo                                  # the demo sweep: ./mlflow.db and ./mlruns
    .venv/bin/python docs/screenshots.py       # -> docs/img/mlflow_*.png
    .venv/bin/python docs/screenshots.py --tracking-uri sqlite:///path/mlflow.db --experiment demo

It starts `mlflow ui` on 127.0.0.1 on a free port against the store (read only: nothing in it
changes), opens its pages in headless Chromium (Debian's `chromium` package, `apt-get install
chromium`; `--chromium` names another Chromium or Chrome binary) through the DevTools protocol
(aiohttp, which Ray installs), waits for each page to show what it is taken for, and writes:

    docs/img/mlflow_experiment.png        the experiment's training runs, with their metrics
    docs/img/mlflow_run.png               one training run: its datasets, logged model, registered model
    docs/img/mlflow_logged_model.png      that run's logged model: its linked metrics
    docs/img/mlflow_registered_model.png  the registered model of the sweep, one version per sweep run

The run shown is the registered model's latest version's run (the sweep's best), else the
experiment's latest FINISHED run with a logged model. Both processes it starts are stopped at the
end, by their process ids. Exit status 2 when the store, the experiment or Chromium is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT = 1920, 1000
PAGE_TIMEOUT_S = 30.0
SETTLE_S = 3.0  # after the awaited text shows: charts and tables finish drawing


class ShotError(RuntimeError):
    """Something the person can fix: no store, no experiment, no Chromium."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tracking-uri",
        default=f"sqlite:///{REPO / 'mlflow.db'}",
        help="the store (default: the demo's, sqlite:///<checkout>/mlflow.db)",
    )
    parser.add_argument("--experiment", default="demo", help="the experiment (default: demo)")
    parser.add_argument("--out", default=str(REPO / "docs" / "img"), help="where the PNGs go")
    parser.add_argument("--chromium", help="the browser binary (default: chromium on PATH)")
    args = parser.parse_args(argv)
    try:
        pages = plan_pages(args.tracking_uri, args.experiment)
        browser = find_chromium(args.chromium)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with mlflow_ui(args.tracking_uri) as base:
            written = asyncio.run(shoot(browser, base, pages, out))
    except ShotError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


@dataclass
class Page:
    """One screenshot: the UI route, the text the page shows once its data is there, and the
    page's own steps before it is taken (JavaScript run in the page, awaited)."""

    name: str
    route: str
    ready_text: str
    steps: list[str] = field(default_factory=list)
    then_text: str | None = None  # shown once the steps are done


def plan_pages(uri: str, experiment: str) -> list[Page]:
    """The pages to take for the store: the experiment, one run, its logged model, the
    registered model (when a sweep registered one)."""
    from mlflow import MlflowClient

    db = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
    if db is not None and not db.is_file():
        raise ShotError(
            f"no MLflow database at {db}: run `make demo` first, or give --tracking-uri"
        )
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ShotError(f"no experiment {experiment!r} in {uri}: give --experiment")
    eid = found.experiment_id
    runs = [
        r
        for r in client.search_runs([eid], "attributes.status = 'FINISHED'")
        if r.data.tags.get("kind") != "sweep" and r.outputs and r.outputs.model_outputs
    ]
    if not runs:
        raise ShotError(f"experiment {experiment!r} has no FINISHED training run with a model")
    versions = []
    for model in client.search_registered_models():
        versions += client.search_model_versions(f"name = '{model.name}'")
    ours = [v for v in versions if v.run_id in {r.info.run_id for r in runs}]
    latest = max(ours, key=lambda v: int(v.creation_timestamp)) if ours else None
    run = next((r for r in runs if latest and r.info.run_id == latest.run_id), runs[0])
    task = run.data.tags.get("task", "")
    model_id = run.outputs.model_outputs[-1].model_id
    pages = [
        Page(
            "mlflow_experiment.png",
            f"/experiments/{eid}/runs",
            "matching runs",
            [CLOSE_ASSISTANT, COLLAPSE_SIDEBAR, EXPAND_PARENT_RUNS, columns_step(run.data.metrics)],
            then_text=run.info.run_name,
        ),
        Page(
            "mlflow_run.png",
            f"/experiments/{eid}/runs/{run.info.run_id}",
            "Logged models",
            [
                search_step("Search metrics", f"test/{task}/acc"),
                search_step("Search parameters", "adapter.method"),
            ],
        ),
        Page(
            "mlflow_logged_model.png",
            f"/experiments/{eid}/models/{model_id}",
            "About this logged model",
            [search_step("Search metrics", f"test/{task}/")],
        ),
    ]
    if latest is not None:
        pages.append(Page("mlflow_registered_model.png", f"/models/{latest.name}", "Version 1"))
    return pages


# ----- what is done in a page before its screenshot (MLflow 3.17's UI) --------------------------
SLEEP = "const sleep = ms => new Promise(r => setTimeout(r, ms));"
CLOSE_ASSISTANT = f"""(async () => {{ {SLEEP}
  const close = document.querySelector('button[aria-label="Close"]');  // the Assistant panel
  if (close) {{ close.click(); await sleep(500); }}
}})()"""
COLLAPSE_SIDEBAR = f"""(async () => {{ {SLEEP}
  const toggle = document.querySelector('button[aria-label="Toggle sidebar"]');
  if (toggle) {{ toggle.click(); await sleep(500); }}
}})()"""
EXPAND_PARENT_RUNS = f"""(async () => {{ {SLEEP}  // a sweep's parent run lists its trials
  for (const b of document.querySelectorAll('button[data-component-id*="runnamecellrenderer"]'))
    b.click();
  await sleep(1000);
}})()"""


def search_step(placeholder: str, text: str) -> str:
    """Type `text` into the page's search box with that placeholder (a React input)."""
    return f"""(async () => {{ {SLEEP}
  const input = document.querySelector('input[placeholder={json.dumps(placeholder)}]');
  if (!input) return;
  const setter = Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set;
  setter.call(input, {json.dumps(text)});
  input.dispatchEvent(new Event('input', {{bubbles: true}}));
  await sleep(800);
}})()"""


def columns_step(metrics: dict[str, float]) -> str:
    """Show a few metric columns in the runs table (its Columns menu): the test accuracy at
    N = 0, NLL and ECE at the largest N, the OOD AUROC by mutual information, val/nll."""
    task_keys = sorted(k for k in metrics if k.startswith("test/") and k.endswith("/acc_n0"))
    if not task_keys:
        return "0"
    prefix = task_keys[0].removesuffix("acc_n0")
    n = max(int(k.rpartition("_n")[2]) for k in metrics if k.startswith(prefix) and "_n" in k)
    wanted = [f"{prefix}acc_n0", f"{prefix}nll_n{n}", f"{prefix}ece_n{n}"]
    wanted += sorted(k for k in metrics if k.startswith("ood/") and k.endswith(f"/auroc_n{n}"))[:1]
    wanted.append("val/nll")
    return f"""(async () => {{ {SLEEP}
  const menu = Array.from(document.querySelectorAll('button')).find(b => b.innerText.trim() === 'Columns');
  menu.click(); await sleep(1000);
  const input = document.querySelector('input[placeholder="Search columns"]');
  const setter = Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set;
  for (const name of {json.dumps(wanted)}) {{
    setter.call(input, name); input.dispatchEvent(new Event('input', {{bubbles: true}}));
    await sleep(600);
    const title = Array.from(document.querySelectorAll('.du-bois-light-tree-title'))
      .find(e => e.textContent.trim() === name);
    const box = title && title.closest('.du-bois-light-tree-treenode')
      .querySelector('.du-bois-light-tree-checkbox');
    if (box) box.click();
    await sleep(300);
  }}
  document.body.dispatchEvent(new KeyboardEvent('keydown', {{key: 'Escape', code: 'Escape', keyCode: 27, bubbles: true}}));
  document.activeElement && document.activeElement.blur();
  document.querySelector('h1, h2') && document.querySelector('h1, h2').click();
  await sleep(1000);
}})()"""


def find_chromium(given: str | None) -> str:
    for name in [given] if given else ["chromium", "chromium-browser", "google-chrome"]:
        path = shutil.which(name) if name else None
        if path:
            return path
    raise ShotError(
        "Chromium not found: install Debian's `chromium` package (apt-get install chromium) or "
        "give --chromium /path/to/chrome"
    )


@contextlib.contextmanager
def mlflow_ui(uri: str) -> Iterator[str]:
    """`mlflow ui` on 127.0.0.1 on a free port against `uri`; yields its base URL."""
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.update({"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"})
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow_bin)] if mlflow_bin.is_file() else [sys.executable, "-m", "mlflow"]
    command += ["ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)]
    command += ["--workers", "1"]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        base = f"http://127.0.0.1:{port}"
        try:
            wait_for(lambda: http_ok(f"{base}/health"), 90, "mlflow ui", proc, log)
            yield base
        finally:
            stop(proc)


async def shoot(browser: str, base: str, pages: list[Page], out: Path) -> list[Path]:
    """Open each page in one headless Chromium tab and write its screenshot."""
    import aiohttp

    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.Popen(
            [
                browser,
                "--headless=new",
                "--no-sandbox",  # root in a container has no user namespace for the sandbox
                "--disable-gpu",
                "--hide-scrollbars",
                "--no-first-run",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile}",  # never the home folder's profile
                f"--window-size={WIDTH},{HEIGHT}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # its crash reports and settings (XDG folders) go to the profile, not the home folder
            env={
                **os.environ,
                "HOME": profile,
                "XDG_CONFIG_HOME": profile,
                "XDG_CACHE_HOME": profile,
            },
            start_new_session=True,
        )
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            wait_for(port_file.is_file, 30, "Chromium's DevTools port", proc)
            port = port_file.read_text().split()[0]
            targets = json.loads(
                urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list").read()
            )
            ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(ws_url, max_msg_size=0) as ws:
                    tab = DevTools(ws)
                    await tab.call(
                        "Emulation.setDeviceMetricsOverride",
                        width=WIDTH,
                        height=HEIGHT,
                        deviceScaleFactor=1,
                        mobile=False,
                    )
                    written = []
                    for page in pages:
                        await tab.call("Page.navigate", url=f"{base}/#{page.route}")
                        text = page.ready_text
                        shown = await tab.wait_for_text(text, PAGE_TIMEOUT_S)
                        if shown:
                            await asyncio.sleep(SETTLE_S)
                            for step in page.steps:
                                await tab.call(
                                    "Runtime.evaluate", expression=step, awaitPromise=True
                                )
                            if page.then_text is not None:
                                text = page.then_text
                                shown = await tab.wait_for_text(text, PAGE_TIMEOUT_S)
                            await asyncio.sleep(SETTLE_S)
                        shot = await tab.call("Page.captureScreenshot", format="png")
                        path = out / page.name
                        if not shown:  # kept aside for a look, never in place of a good one
                            path = Path(tempfile.gettempdir()) / f"failed_{page.name}"
                        path.write_bytes(base64.b64decode(shot["data"]))
                        if not shown:
                            raise ShotError(
                                f"{page.name}: the page did not show {text!r} within "
                                f"{PAGE_TIMEOUT_S:g} s; what it showed: {path}"
                            )
                        written.append(path)
            return written
        finally:
            stop(proc)


class DevTools:
    """The Chrome DevTools protocol over one page's websocket: a call waits for its own answer."""

    def __init__(self, ws) -> None:
        self.ws, self.next_id = ws, 0

    async def call(self, method: str, **params) -> dict:
        self.next_id += 1
        await self.ws.send_str(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads((await self.ws.receive()).data)
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise ShotError(f"Chromium refused {method}: {message['error']}")
                return message.get("result", {})

    async def wait_for_text(self, text: str, timeout: float) -> bool:
        """True once the page's text holds `text`, False after `timeout` seconds."""
        expression = f"!!document.body && document.body.innerText.includes({json.dumps(text)})"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            answer = await self.call("Runtime.evaluate", expression=expression)
            if answer.get("result", {}).get("value"):
                return True
            await asyncio.sleep(0.5)
        return False


def wait_for(ready, timeout: float, what: str, proc: subprocess.Popen, log=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.3)
    tail = ""
    if log is not None:
        log.seek(0)
        tail = log.read().decode(errors="replace")[-2000:]
    raise ShotError(f"{what} did not start within {timeout:g} s (exit {proc.poll()}) {tail}")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return answer.status == 200
    except (urllib.error.URLError, OSError):
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    """Stop a process this script started, with the processes of its own session (its workers)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
