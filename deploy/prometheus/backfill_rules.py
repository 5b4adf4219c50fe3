#!/usr/bin/env python3
"""Backfill the recording rules over history, layer by layer, with `promtool tsdb create-blocks-from rules`.

promtool evaluates each rule by range queries against a running Prometheus, so a rule that reads
another recorded series finds nothing until that series' blocks are loaded there. This splits the
rule files into layers (layer 1 reads raw series only, layer k reads series recorded in layers
below k), writes one rule file per layer, and prints the commands (or, with --run, runs them):
promtool, move the blocks into the Prometheus data directory, wait until Prometheus has loaded
them (it rereads its data directory once a minute; 2.42 has no API to make it), next layer.

    python3 deploy/prometheus/backfill_rules.py --start 35d --end 1767225600 \\
        --url http://localhost:9090 --data-dir /var/lib/prometheus/metrics2 --run \\
        deploy/prometheus/callingbox-recording.rules.yml

docs/runbook.md, "Day one: history for dashboards and baselines", gives the whole sequence.
Standard library and PyYAML only: it runs wherever promtool does.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # rule_layers.py lives beside this script
from rule_layers import (  # noqa: E402
    layers,
    load_rules,
    names_in,
    needed_for,
    self_reading,
    write_layers,
)

# What the tests and the runbook's readers use of the layering, from here as from rule_layers.py.
__all__ = ["layers", "load_rules", "names_in", "needed_for", "self_reading", "write_layers"]

_DURATION = re.compile(r"(?:(\d+)(ms|s|m|h|d|w|y))+")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def parse_time(text: str, end: float | None = None) -> int:
    """Unix seconds from RFC 3339 or Unix seconds; for --start also a duration before `end` (35d)."""
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return int(float(text))
    if end is not None and _DURATION.fullmatch(text):
        return int(end - seconds(text))
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither RFC 3339 nor Unix seconds") from None
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no time zone (add Z or +00:00)")
    return int(moment.timestamp())


def seconds(duration: str) -> float:
    return sum(int(n) * _SECONDS[unit] for n, unit in re.findall(r"(\d+)(ms|s|m|h|d|w|y)", duration))


def block_seconds(options, rule_file: Path) -> int:
    """The chunk promtool queries and writes at a time for this file (promtool_command)."""
    groups = yaml.safe_load(rule_file.read_text())["groups"]
    step = min(seconds(g.get("interval", options.eval_interval)) for g in groups)
    return 18 * 3600 if step >= 6 else 2 * 3600


def promtool_command(
    options, rule_file: Path, output_dir: Path, start: int | None = None, end: int | None = None
) -> list[str]:
    """The promtool call for one layer, run in the layer's directory. promtool queries one block
    (2 h) at a time. Blocks of up to a day (18 h: the flag is hidden, but 2.42 has it) make it 12
    times faster, and keep its range queries below Prometheus' 11 000 points per series for steps
    of 6 s and more; for a shorter step, it keeps its 2 h."""
    groups = yaml.safe_load(rule_file.read_text())["groups"]
    step = min(seconds(g.get("interval", options.eval_interval)) for g in groups)
    first, last = options.start if start is None else start, options.end if end is None else end
    # From the start of promtool's chunk: a first chunk shorter than the group's interval holds no
    # evaluation, and promtool 2.42 then stops the rule there, writing nothing for it at all.
    first -= first % block_seconds(options, rule_file)
    flags = {"start": first, "end": last, "url": options.url, "eval-interval": options.eval_interval}
    flags |= {"max-block-duration": "24h"} if step >= 6 else {}
    flags |= {"output-dir": output_dir.resolve()}
    subcommand = ["tsdb", "create-blocks-from", "rules"]
    return [*shlex.split(options.promtool), *subcommand, *(f"--{k}={v}" for k, v in flags.items()), rule_file.name]


def blocks_in(directory: Path) -> list[Path]:
    """The finished blocks promtool wrote (a block is a directory with meta.json; the ones still
    being written are named <ulid>.tmp-for-creation)."""
    return sorted(p for p in directory.iterdir() if (p / "meta.json").is_file() and "." not in p.name)


def names_of_block(block: Path) -> set[str]:
    """The strings of a block's index symbol table (every label name and value, metric names too):
    enough to know which recorded series a block holds without a TSDB reader.
    Layout: magic (4 bytes), version (1), symbols: length (4), count (4), uvarint-prefixed strings."""
    data = (block / "index").read_bytes()
    count, offset, found = int.from_bytes(data[9:13], "big"), 13, set()
    for _ in range(count):
        length = shift = 0
        while True:
            byte = data[offset]
            offset += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        found.add(data[offset : offset + length].decode())
        offset += length
    return found


def first_times(blocks: list[Path], names: set[str]) -> dict[str, tuple[int, int]]:
    """Per recorded name the blocks hold, the [min, max] (ms) of the earliest block holding it: a
    range far behind the live head, so data there can only have come from these blocks."""
    first: dict[str, tuple[int, int]] = {}
    for block in blocks:
        meta = json.loads((block / "meta.json").read_text())
        span = (meta["minTime"], meta["maxTime"] - 1)
        for name in names_of_block(block) & names:
            if name not in first or span < first[name]:
                first[name] = span
    return first


def move_blocks(blocks: list[Path], data_dir: Path) -> None:
    """Each block in one rename where possible: Prometheus never sees half a block. Across file
    systems, copy under a name it ignores, then rename."""
    for block in blocks:
        try:
            block.rename(data_dir / block.name)
        except OSError:
            staging = data_dir / f"{block.name}.tmp-for-backfill"
            shutil.copytree(block, staging)
            staging.rename(data_dir / block.name)
            shutil.rmtree(block)


def has_series(url: str, name: str, low: int, high: int) -> bool:
    query = urllib.parse.urlencode({"match[]": name, "start": low / 1000, "end": high / 1000})
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/api/v1/series?{query}", timeout=30) as response:
            return bool(json.loads(response.read())["data"])
    except OSError:  # not up (yet), e.g. restarting
        return False


def missing(url: str, expected: dict[str, tuple[int, int]]) -> set[str]:
    """The expected names Prometheus does not return yet over the range of their first block."""
    return {name for name, (low, high) in expected.items() if not has_series(url, name, low, high)}


def wait_loaded(url: str, expected: dict[str, tuple[int, int]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while absent := missing(url, expected):
        if time.monotonic() > deadline:
            raise SystemExit(
                f"backfill_rules: after {timeout:.0f}s Prometheus at {url} still has no data for "
                f"{', '.join(sorted(absent))}: are the blocks in its --storage.tsdb.path (--data-dir)? "
                "Its log says why it skipped a block."
            )
        time.sleep(2)


def recorded_in(rule_file: Path) -> list[str]:
    return sorted({r["record"] for g in yaml.safe_load(rule_file.read_text())["groups"] for r in g["rules"]})


def data_times(url: str, expr: str, start: int, end: int) -> list[float]:
    """The instants in [start, end], 5 minutes apart, at which `expr` has a value. Within 5
    minutes of each evaluation of a group, however far apart (every 15 minutes, say) and wherever
    its evaluations fall; in one query of at most 11 000 points (38 days), else a few."""
    times: set[float] = set()
    span = 300 * 10_000
    for low in range(start, end + 1, span):
        query = urllib.parse.urlencode({"query": expr, "start": low, "end": min(low + span, end), "step": 300})
        with urllib.request.urlopen(f"{url.rstrip('/')}/api/v1/query_range?{query}", timeout=300) as response:
            times.update(float(t) for s in json.loads(response.read())["data"]["result"] for t, _ in s["values"])
    return sorted(times)


def stretches(times: list[float], start: int, end: int, chunk: int) -> list[tuple[int, int]]:
    """[first, last] of each run of promtool's chunks (aligned to `chunk` seconds) that all hold a
    value: promtool 2.42 stops a rule at a chunk without one, so each run is backfilled on its own."""
    full = sorted({int(t) // chunk for t in times})
    runs: list[tuple[int, int]] = []
    for k in full:
        if runs and k == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], k)
        else:
            runs.append((k, k))
    return [(max(start, a * chunk), min(end, (b + 1) * chunk - 1)) for a, b in runs]


def by_stretch(url: str, rule_file: Path, start: int, end: int, chunk: int) -> dict[tuple[int, int], Path]:
    """The layer's rules split by the stretches of time each has values in, a file per stretch
    (the same file name, in a directory of its own: the evaluation offsets stay the layer's)."""
    document = yaml.safe_load(rule_file.read_text())
    buckets: dict[tuple[int, int], dict[str, dict]] = {}
    for group in document["groups"]:
        for rule in group["rules"]:
            for stretch in stretches(data_times(url, rule["expr"], start, end), start, end, chunk):
                groups = buckets.setdefault(stretch, {})
                fresh = {k: v for k, v in group.items() if k != "rules"} | {"rules": []}
                groups.setdefault(group["name"], fresh)["rules"].append(rule)
    files = {}
    for (low, high), groups in sorted(buckets.items()):
        path = rule_file.parent / f"from-{low}-to-{high}" / rule_file.name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump({"groups": list(groups.values())}, sort_keys=False, width=200))
        files[low, high] = path
    return files


def run(options, rule_files: list[Path], log=print, load: Callable[[], None] | None = None) -> None:
    """Each layer in turn: promtool over each stretch of time a rule has values in, move the blocks into
    the data directory, wait until Prometheus serves them. `load` makes Prometheus load them now
    (a restart); without it, its own rereading of the data directory, once a minute, does."""
    start, end = options.start, options.end  # Unix seconds (parse_args)
    for number, rule_file in enumerate(rule_files, 1):
        names = set(recorded_in(rule_file))
        output = options.work_dir / f"blocks-{number}"
        shutil.rmtree(output, ignore_errors=True)
        started = time.monotonic()
        blocks: list[Path] = []
        chunk = block_seconds(options, rule_file)
        for (low, high), part in by_stretch(options.url, rule_file, start, end, chunk).items():
            into = output / part.parent.name
            command = promtool_command(options, part, into, low, high)
            result = subprocess.run(command, cwd=part.parent, capture_output=True, text=True)
            if result.returncode != 0:
                raise SystemExit(f"backfill_rules: promtool failed on layer {number}:\n{result.stderr[-4000:]}")
            blocks += blocks_in(into) if into.exists() else []
        expected = first_times(blocks, names)
        if blocks and options.move_command:
            for directory in sorted({block.parent for block in blocks}):
                subprocess.run(options.move_command.format(blocks=shlex.quote(str(directory))), shell=True, check=True)
        elif blocks:
            move_blocks(blocks, options.data_dir)
        promtool_s = time.monotonic() - started
        if load is not None:
            load()
        elif options.restart_command:
            subprocess.run(options.restart_command, shell=True, check=True)
        wait_loaded(options.url, expected, options.timeout)
        log(
            f"layer {number}/{len(rule_files)}: {len(names)} names, {len(blocks)} blocks "
            f"({len(expected)} names with data), promtool {promtool_s:.1f}s, "
            f"loaded after {time.monotonic() - started - promtool_s:.1f}s"
        )


def print_commands(options, rule_files: list[Path], out=sys.stdout) -> None:
    """The same steps as --run, as shell commands: the runbook shows these."""
    print(
        "# promtool 2.42 stops a rule at a chunk of time without a value (the 7-day sums in the first"
        " day of history): --run backfills each stretch of time a rule has values in on its own",
        file=out,
    )
    for number, rule_file in enumerate(rule_files, 1):
        output = options.work_dir / f"blocks-{number}"
        names = recorded_in(rule_file)
        print(f"# layer {number} of {len(rule_files)}: {len(names)} recorded names", file=out)
        command = shlex.join(promtool_command(options, rule_file, output))
        print(f"(cd {shlex.quote(str(rule_file.parent))} && {command})", file=out)
        if options.move_command:
            print(options.move_command.format(blocks=shlex.quote(str(output))), file=out)
        else:
            print(f"mv {shlex.quote(str(output))}/* {shlex.quote(str(options.data_dir))}/", file=out)
        # The series API reads the index only; up to --end, nothing but the moved blocks holds them.
        match = shlex.quote('match[]={__name__=~"' + "|".join(names) + '"}')
        url = shlex.quote(f"{options.url.rstrip('/')}/api/v1/series")
        print("# Prometheus rereads its data directory once a minute: wait until it serves the layer", file=out)
        print(
            f"until curl -fsG {url} --data-urlencode {match} -d start={options.start} -d end={options.end} "
            "| grep -q __name__; do sleep 5; done",
            file=out,
        )


FLAGS = (  # flag, help, argparse settings (the help of --end: promtool's own default is 3 h ago)
    ("--end", "last evaluation: the backfill's cut-off, when the live exporter took over", {"required": True}),
    ("--start", "first evaluation, or a duration before --end (35d)", {"required": True}),
    ("--url", "the Prometheus holding the raw series", {"default": "http://localhost:9090"}),
    ("--data-dir", "its --storage.tsdb.path: where --run moves the blocks", {"type": Path}),
    ("--work-dir", "layer files and blocks", {"type": Path, "default": Path("rules-backfill")}),
    ("--eval-interval", "for groups without `interval:`: Prometheus' evaluation_interval", {"default": "1m"}),
    ("--promtool", "the promtool command", {"default": "promtool"}),
    ("--move-command", "shell command moving the blocks in {blocks} into the data directory", {}),
    ("--restart-command", "shell command restarting Prometheus (default: wait for its reread)", {}),
    ("--only", "backfill only this recorded series and what it reads (repeatable)", {"action": "append"}),
    ("--timeout", "seconds to wait for each layer to load", {"type": float, "default": 300}),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("rule_files", nargs="+", type=Path, help="rule files (alerting rules are ignored)")
    for flag, text, settings in FLAGS:
        parser.add_argument(flag, help=text, **settings)
    parser.add_argument("--run", action="store_true", help="run the layers instead of printing the commands")
    options = parser.parse_args(argv)
    try:
        options.end = parse_time(options.end)
        options.start = parse_time(options.start, end=options.end)
    except argparse.ArgumentTypeError as error:
        parser.error(str(error))
    if options.start >= options.end:
        parser.error("--start must be before --end")
    if options.run and options.data_dir is None and options.move_command is None:
        parser.error("--run needs --data-dir (Prometheus' --storage.tsdb.path) or --move-command")
    options.data_dir = options.data_dir or Path("/prometheus")
    return options


def main(argv: list[str] | None = None) -> None:
    options = parse_args(argv)
    rules = load_rules(options.rule_files)
    rules = needed_for(rules, options.only) if options.only else rules
    grouped = layers(rules)
    for name in self_reading(rules):
        print(f"# note: {name} reads its own past; its backfilled values lack that part", file=sys.stderr)
    paths = write_layers(grouped, options.work_dir)
    if options.run:
        run(options, paths, log=lambda line: print(line, file=sys.stderr))
    else:
        print_commands(options, paths)


if __name__ == "__main__":
    main()
