"""`callingbox-exporter backfill`: an organization's past as Prometheus history, and the state to go on from.

For each target: read `GET /v1/calls` down to `--since` (plus the settle window: calls created
a little earlier still end, settle and deliver after it), streamed and sorted on disk by event
time (spill.py), replay it through the counting gate (replay.py), write every series at every
`--step` as OpenMetrics (timeline.py), then the exporter's state at the cut-off T, the moment the
read began. The live exporter started on that state serves the same values and counts every
event after T once. With promtool installed the files become TSDB blocks.

Everything is made in `DIR/.incomplete` and moved into place at the end, the manifest
(`backfill.json`) last: an interrupted run leaves nothing that looks complete, and a rerun starts
afresh. A directory that already holds a state is left alone without `--force`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import aiohttp

from . import __version__
from .api import ApiError, Client, Unauthorized
from .config import Config, Target
from .records import Invalid, decode_record, fields_type
from .replay import Grid, Replay
from .settings import Settings
from .spill import Spill
from .state import StateDB
from .store import Store
from .timeline import Timeline

log = logging.getLogger(__name__)

MANIFEST = "backfill.json"
WORK = ".incomplete"
PARTS = ("openmetrics", "blocks", "state")
ATTEMPTS = 3  # list reads tried before giving up on a target (a 5xx or a reset mid-body)
WHOLE_HISTORY = 1e15  # bytes a backfill's list read may carry: its deadline is the silence timeout alone
MAX_BLOCK = "24h"  # one block per file and day at most: promtool reads each file once per block
INVALID_LOG_LIMIT = 10


class BackfillError(Exception):
    """A one-line reason the backfill cannot go on; `code` is the exit status (2: bad input)."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Options:
    since: float  # seconds of history before the cut-off
    step: float
    output: str
    job: str = "callingbox-exporter"
    instance: str = "localhost:9860"
    force: bool = False
    promtool: str | None = "promtool"  # None: write the OpenMetrics files only


@dataclass
class Outcome:
    """What one target's backfill read and wrote (the manifest's entry)."""

    target: str
    since: float
    until: float
    calls: int = 0
    invalid: int = 0
    versions: int = 0
    after_cutoff: int = 0
    tracked: int = 0
    samples: int = 0
    read_seconds: float = 0.0  # the list read into the spill
    replay_seconds: float = 0.0  # the sort, the replay and the OpenMetrics files
    files: list[str] | None = None
    state: str = ""


def prepare(output: str, force: bool) -> str:
    """The working directory, empty; refuses an output that holds a backfill or a state."""
    held = [part for part in (MANIFEST, "state") if os.path.exists(os.path.join(output, part))]
    if held and not force:
        raise BackfillError(
            f"{output} already holds a backfill ({held[0]}): choose another --output, or --force to replace it"
        )
    # Forced, a backfill is replaced. Otherwise what is left has neither manifest nor state: files
    # and blocks a run left when it was stopped while moving its parts into place (finish), which
    # os.replace could not move a new directory onto.
    for part in (MANIFEST, *PARTS):
        path = os.path.join(output, part)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.unlink(path)
    work = os.path.join(output, WORK)
    shutil.rmtree(work, ignore_errors=True)  # an interrupted run's leftovers
    os.makedirs(work)
    return work


async def read_history(target: Target, spill: Spill, floor: float) -> int:
    """Stream the target's list into `spill` down to created_at `floor`; returns the malformed
    records skipped (each logged, up to a limit). Raises ApiError."""
    keys = tuple(key for key, _ in target.metadata_labels)
    invalid = 0
    async with aiohttp.ClientSession() as session:
        client = Client(session, target.api_url, target.api_key, target.request_timeout)
        async with client.list_calls(fields_type(bool(keys)), WHOLE_HISTORY) as body:
            async for batch in body:
                for obj in batch:
                    record = decode_record(obj, keys)
                    if type(record) is Invalid:
                        invalid += 1
                        if invalid <= INVALID_LOG_LIMIT:
                            log.warning(
                                "invalid record skipped",
                                extra={"org": target.name, "reason": record.reason, "call_id": record.call_id},
                            )
                        continue
                    if record.created_at < floor:
                        return invalid  # newest first: the rest is older still
                    spill.add(record)
    return invalid


async def read_with_retries(target: Target, spill_path: str, grid: Grid, floor: float) -> tuple[Spill, int]:
    """The history in a spill, the read retried from scratch after a fault (not after a 401/403)."""
    for attempt in range(1, ATTEMPTS + 1):
        spill = Spill(spill_path, grid)
        try:
            return spill, await read_history(target, spill, floor)
        except Unauthorized as error:
            spill.close()
            raise BackfillError(f"target {target.name}: the API rejected the key ({error})") from None
        except ApiError as error:
            spill.close()
            if error.code == "403":
                raise BackfillError(f"target {target.name}: the key has no access to the calls ({error})") from None
            if attempt == ATTEMPTS:
                raise BackfillError(f"target {target.name}: the API read failed {ATTEMPTS} times: {error}", 1) from None
            log.warning("list read failed; reading again", extra={"org": target.name, "error": str(error)})
            await asyncio.sleep(2**attempt)
        except BaseException:
            spill.close()
            raise
    raise AssertionError("unreachable")


class Blocks:
    """TSDB blocks from the OpenMetrics files, one promtool run per file, each started as its file
    is complete: promtool (Go) works on the second core while the replay goes on."""

    def __init__(self, promtool: str, directory: str):
        self.promtool, self.directory = promtool, directory
        os.makedirs(directory, exist_ok=True)
        self.waiting: list[str] = []
        self.running: tuple[str, subprocess.Popen, object] | None = None

    def add(self, path: str) -> None:
        self.waiting.append(path)
        self._advance(block=False)

    def finish(self) -> None:
        """Wait for every file's blocks; raises BackfillError when promtool failed."""
        while self.running is not None or self.waiting:
            self._advance(block=True)

    def _advance(self, block: bool) -> None:
        if self.running is not None:
            path, process, errors = self.running
            if not block and process.poll() is None:
                return
            code = process.wait()
            errors.seek(0)
            problem = errors.read().strip().splitlines()
            errors.close()
            self.running = None
            if code != 0:
                raise BackfillError(f"promtool failed on {path}: {problem[-1] if problem else code}", 1)
        if self.waiting:
            path = self.waiting.pop(0)
            argv = [self.promtool, "tsdb", "create-blocks-from", "openmetrics", f"--max-block-duration={MAX_BLOCK}"]
            errors = tempfile.TemporaryFile("w+")
            process = subprocess.Popen([*argv, "-q", path, self.directory], stdout=subprocess.DEVNULL, stderr=errors)
            self.running = (path, process, errors)


def backfill_target(target: Target, options: Options, work: str, blocks: Blocks | None = None) -> Outcome:
    """One target's history: OpenMetrics files (handed to `blocks` as each is written) and its
    state at the cut-off, in `work`."""
    until = math.floor(time.time() * 1000) / 1000  # the cut-off T: the read starts now
    since = until - options.since
    outcome = Outcome(target.name, since, until)
    settings = Settings.of(target)
    grid = Grid(since, until, options.step)
    spill_path = os.path.join(work, f"spill-{target.name}.sqlite")
    started = time.monotonic()
    spill, outcome.invalid = asyncio.run(read_with_retries(target, spill_path, grid, since - settings.settle_window))
    outcome.read_seconds = round(time.monotonic() - started, 3)
    log.info("history read", extra={"org": target.name, "calls": spill.records, "seconds": outcome.read_seconds})
    try:
        outcome.calls = spill.records
        extra_labels = tuple(label for _, label in target.metadata_labels)
        store = Store(dict(target.buckets), target.max_label_values, extra_labels)
        store.configure_visibility(0.0, target.label_idle)  # no hold: a backfill has no scrapes to wait for
        directory = os.path.join(work, "openmetrics", target.name)
        written = blocks.add if blocks is not None else None
        timeline = Timeline(directory, target.name, _scrape_labels(options), store, written)
        replay = Replay(settings, store, since, until)
        tally = replay.run(spill.ordered(), grid.times(), timeline.sample)
    finally:
        spill.close()
    outcome.files = timeline.close()
    outcome.replay_seconds = round(time.monotonic() - started - outcome.read_seconds, 3)
    outcome.versions, outcome.after_cutoff, outcome.samples = replay.fed, replay.skipped, timeline.samples
    outcome.tracked = len(tally.ledger.calls)
    os.makedirs(os.path.join(work, "state"), exist_ok=True)
    outcome.state = os.path.join(work, "state", f"{target.name}.db")
    db = StateDB(outcome.state, target.name)
    try:
        db.save(tally.ledger, store, tally.schedule.state())
    finally:
        db.close()
    return outcome


def _scrape_labels(options: Options) -> dict[str, str]:
    return {"job": options.job, "instance": options.instance}


def blocks_command(output: str) -> str:
    """The promtool commands to build the blocks where promtool was not found."""
    return (
        f"for f in {output}/openmetrics/*/*.om; do promtool tsdb create-blocks-from openmetrics"
        f' --max-block-duration={MAX_BLOCK} "$f" {output}/blocks; done'
    )


def finish(
    output: str, work: str, outcomes: list[Outcome], options: Options, blocks_built: bool, blocks_wait: float = 0.0
) -> dict:
    """Move everything into place, the manifest last; returns the manifest."""
    for part in PARTS:
        if os.path.exists(os.path.join(work, part)):
            os.replace(os.path.join(work, part), os.path.join(output, part))

    def placed(path: str) -> str:
        return os.path.join(output, os.path.relpath(path, work))

    manifest = {
        "version": __version__,
        "step_seconds": options.step,
        "labels": _scrape_labels(options),
        "blocks": os.path.join(output, "blocks") if blocks_built else None,
        "blocks_wait_seconds": blocks_wait,  # promtool's work left after the last replay
        "targets": [
            {
                **{k: v for k, v in vars(o).items() if k not in ("files", "state")},
                "files": [placed(f) for f in o.files or ()],
                "state": placed(o.state),
            }
            for o in outcomes
        ],
    }
    with open(os.path.join(work, MANIFEST), "w") as out:
        json.dump(manifest, out, indent=2)
        out.flush()
        os.fsync(out.fileno())
    os.replace(os.path.join(work, MANIFEST), os.path.join(output, MANIFEST))
    shutil.rmtree(work, ignore_errors=True)
    return manifest


def run(cfg: Config, options: Options) -> int:
    """The whole backfill; prints what was written and what to do next."""
    if cfg.demo:
        raise BackfillError("backfill reads a real API: give --config.file, not --demo")
    output = os.path.abspath(options.output)
    work = prepare(output, options.force)
    promtool = shutil.which(options.promtool) if options.promtool else None
    blocks = Blocks(promtool, os.path.join(work, "blocks")) if promtool else None
    outcomes = [backfill_target(target, options, work, blocks) for target in cfg.targets]
    started = time.monotonic()
    if blocks is not None:
        blocks.finish()  # what promtool has left to do once the last replay is done
    finish(output, work, outcomes, options, promtool is not None, round(time.monotonic() - started, 3))
    for o in outcomes:
        print(
            f"{o.target}: {o.calls} calls ({o.invalid} malformed, skipped), {o.samples} samples from"
            f" {_iso(o.since)} to {_iso(o.until)}; state at the cut-off: {output}/state/{o.target}.db"
            f" ({o.tracked} calls tracked)"
        )
    if promtool:
        print(f"TSDB blocks: {output}/blocks: move them into Prometheus' data directory")
    else:
        print(f"promtool not found; build the TSDB blocks with:\n  {blocks_command(output)}")
    print("then copy each state file to its target's state_file and start the exporter (docs/runbook.md, Day one)")
    print("and, once Prometheus serves the blocks, the recording rules over the same range:")
    print(f"  {rules_command(outcomes)}")
    return 0


def rules_command(outcomes: list[Outcome]) -> str:
    """deploy/prometheus/backfill_rules.py over the backfilled range, to the last cut-off."""
    since, until = min(o.since for o in outcomes), max(o.until for o in outcomes)
    return (
        f"python3 deploy/prometheus/backfill_rules.py --start {math.floor(since)} --end {math.ceil(until)}"
        " --url http://localhost:9090 --data-dir PROMETHEUS_DATA_DIR --run"
        " deploy/prometheus/callingbox-recording.rules.yml"
    )


def _iso(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def main(cfg: Config, options: Options) -> int:
    """Run, turning a BackfillError into one line and its exit status."""
    try:
        return run(cfg, options)
    except BackfillError as error:
        print(f"callingbox-exporter: backfill: {error}", file=sys.stderr)
        return error.code
    except OSError as error:
        print(f"callingbox-exporter: backfill: {error}", file=sys.stderr)
        return 2
