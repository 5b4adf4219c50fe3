"""The exporter's whole page, as strict readers read it: simulator → exporter → /metrics.

The story: calls flow from the simulator and end, so the page carries exemplars. Fetched with
the OpenMetrics Accept header, the whole page (not one family at a time) must parse with
prometheus_client's OpenMetrics parser, which rejects what Prometheus may reject: two families
that clash (a counter `x_total` reserves the sample name `x_created`, SPEC §3), an exemplar where
none may stand, a missing `# EOF`. It must carry exemplars and every SPEC §3 family with its
type and labels. The same exporter's text page must pass `promtool check metrics` without a word.
"""

from __future__ import annotations

import subprocess
import urllib.request

from prometheus_client.openmetrics.parser import text_string_to_metric_families
from test_metrics import SPEC_FAMILIES

from helpers import wait_until
from servers import require

KEY = "sk_test_e2e_openmetrics_0123456789"
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def fetch(url: str, accept: str | None = None) -> tuple[str, str]:
    """(Content-Type, body) of the exporter's /metrics."""
    request = urllib.request.Request(url + "/metrics", headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.headers["Content-Type"], response.read().decode()


def has_exemplars(url: str) -> bool:
    """The OpenMetrics page names a call: calls have ended and been counted."""
    return ' # {call_id="' in fetch(url, OPENMETRICS)[1]


def without_samples(url: str) -> list[str]:
    """SPEC families with no sample on the page yet: a family labelled by what happened (an
    error code) has none until a call like that has ended, which may come after the first end."""
    families = {family.name: family for family in text_string_to_metric_families(fetch(url, OPENMETRICS)[1])}
    names = [(name, name.removesuffix("_total") if kind == "counter" else name) for name, kind, _ in SPEC_FAMILIES]
    return [name for name, family in names if family in families and not families[family].samples]


def test_the_whole_openmetrics_page_parses_strictly_and_the_text_page_passes_promtool(stack):
    require("promtool")
    sim, url = stack.simulator(seed=11, rate=20, time_scale=120, webhook_retry_base=0.05, api_key=KEY)
    exporter = stack.exporter(
        {"api_url": url, "poll_interval": "0.5s", "overlap": "10s"}, env={"CALLINGBOX_API_KEY": KEY}
    ).start()
    wait_until(
        lambda: has_exemplars(exporter.url),
        30,
        interval=0.5,
        message=f"exemplars on the OpenMetrics page (log: {exporter.log_path})",
    )
    still: list[str] = []

    def every_family_sampled() -> bool:
        still[:] = without_samples(exporter.url)
        return not still

    try:
        wait_until(every_family_sampled, 30, interval=0.5, message="a sample in every SPEC family")
    except AssertionError as error:
        raise AssertionError(f"{error}; still without one: {still}") from None

    content_type, page = fetch(exporter.url, OPENMETRICS)
    assert content_type.startswith("application/openmetrics-text; version=1.0.0"), content_type
    families = {family.name: family for family in text_string_to_metric_families(page)}  # raises on any flaw

    with_exemplars = [s for family in families.values() for s in family.samples if s.exemplar is not None]
    assert any(s.name == "callingbox_calls_ended_total" for s in with_exemplars), "no exemplar on the calls counter"
    assert all(set(s.exemplar.labels) == {"call_id"} for s in with_exemplars), with_exemplars[:5]

    for name, kind, label_names in SPEC_FAMILIES:
        family_name = name.removesuffix("_total") if kind == "counter" else name
        assert family_name in families, f"{name} is not on the OpenMetrics page"
        family = families[family_name]
        assert family.type == kind, f"{name} is a {family.type}, not a {kind}"
        assert family.samples, f"{name} has no sample"
        assert {frozenset(s.labels) - {"le"} for s in family.samples} == {frozenset(label_names)}, name

    content_type, text = fetch(exporter.url)
    assert content_type.startswith("text/plain; version=0.0.4"), content_type
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout + result.stderr) == (0, ""), result.stdout + result.stderr
