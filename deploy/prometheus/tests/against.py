#!/usr/bin/env python3
"""Run promtool rule tests against the rule files of another commit, one test group at a time.

Proves that a case catches what it was written for: run against the rules from before the fix,
it must fail. Each test group runs on its own, against the two rule files as they were at
COMMIT (git show), with `group_eval_order` cut to the groups those files have; the output
names every assertion that fails there.

    python3 deploy/prometheus/tests/against.py 41f30d9 deploy/prometheus/tests/hours.test.yml [GROUP-NAME ...]
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[3]
RULES = ("deploy/prometheus/callingbox-recording.rules.yml", "deploy/prometheus/callingbox-alerts.rules.yml")


def main(commit: str, test_file: str, *names: str) -> int:
    document = yaml.safe_load(Path(test_file).read_text())
    with tempfile.TemporaryDirectory() as tmp:
        rule_files, groups = [], set()
        for path in RULES:
            text = subprocess.run(
                ["git", "show", f"{commit}:{path}"], cwd=ROOT, capture_output=True, text=True, check=True
            ).stdout
            target = Path(tmp) / Path(path).name
            target.write_text(text)
            rule_files.append(str(target))
            groups |= {group["name"] for group in yaml.safe_load(text)["groups"]}
        failed_groups = 0
        for test in document["tests"]:
            if names and test["name"] not in names:
                continue
            single = dict(document, rule_files=rule_files, tests=[test])
            if "group_eval_order" in single:
                single["group_eval_order"] = [g for g in single["group_eval_order"] if g in groups]
            path = Path(tmp) / "single.test.yml"
            path.write_text(yaml.safe_dump(single, sort_keys=False, allow_unicode=True))
            result = subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True)
            failures = [
                line.strip()
                for line in (result.stdout + result.stderr).splitlines()
                if line.strip().startswith(("alertname:", "expr:"))
            ]
            failed_groups += bool(result.returncode)
            print(f"{'FAILS' if result.returncode else 'passes'} against {commit}: {test['name']}")
            for line in failures:
                print(f"    {line}")
        return 0 if failed_groups else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
