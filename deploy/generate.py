#!/usr/bin/env python3
"""Writes the recipes in deploy/ from deploy/policies/*.json, deploy/templates/ and
`gateguard render`, so that every policy and Envoy configuration they embed is real output of
this checkout's CLI. Run it after changing a policy, a template or render:

    .venv/bin/python deploy/generate.py            # rewrite the recipes
    .venv/bin/python deploy/generate.py --check    # exit 1 if any is stale (tests do this)

Needs target/release/gateguard (`make cli`) and PyYAML (requirements-dev.txt).
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent
ROOT = DEPLOY.parent
CLI = ROOT / "target" / "release" / "gateguard"

# Where the files are inside the Envoy container, in every recipe that runs its own Envoy.
WASM_IN_CONTAINER = "/etc/gateguard/plugin.wasm"
ECDS_IN_CONTAINER = "/etc/envoy/filter"
HEALTH_PATH = "/healthz"


def render(policy, *options, ecds_dir=None):
    """`gateguard render` of deploy/policies/`policy`: envoy.yaml's text, and with `ecds_dir`
    the ECDS file too."""
    args = [str(CLI), "render", "--policy", f"deploy/policies/{policy}", *options]
    r = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=ROOT)
    if r.returncode != 0:
        sys.exit(f"gateguard render {' '.join(options)} failed:\n{r.stderr}")
    return r.stdout


def indent(text, spaces):
    pad = " " * spaces
    return "\n".join(pad + line if line else "" for line in text.rstrip("\n").split("\n"))


def policy_yaml(policy, spaces):
    """The policy document as a YAML mapping (what pluginConfig and config hold)."""
    doc = json.loads((DEPLOY / "policies" / policy).read_text())
    return indent(yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, width=100), spaces)


def fill(template, **values):
    text = (DEPLOY / "templates" / template).read_text()
    for name, value in values.items():
        marker = "{{" + name + "}}"
        if marker not in text:
            sys.exit(f"deploy/templates/{template}: no {marker}")
        text = text.replace(marker, value)
    return text


def container_options(upstream="127.0.0.1:8081"):
    return ["--wasm", WASM_IN_CONTAINER, "--listen", "0.0.0.0:8080", "--admin", "127.0.0.1:9901",
            "--upstream", upstream, "--health-path", HEALTH_PATH, "--access-log", "/dev/stdout"]


def kubernetes_sidecar():
    with tempfile.TemporaryDirectory(prefix="gateguard-deploy-") as d:
        envoy = render("kubernetes.json", *container_options(), "--ecds-dir", d,
                       "--ecds-envoy-dir", ECDS_IN_CONTAINER)
        filter_file = (Path(d) / "gateguard-filter.yaml").read_text()
    return fill("kubernetes-sidecar.yaml", ENVOY_YAML=indent(envoy, 4), FILTER_YAML=indent(filter_file, 4))


def istio():
    return fill("istio-wasmplugin.yaml", POLICY=policy_yaml("istio.json", 4))


def envoy_gateway():
    config = yaml.safe_load(render("envoy-gateway.json", "--format", "yaml"))
    cluster = next(c for c in config["static_resources"]["clusters"] if c["name"] == "jwks_entra")
    cluster_text = yaml.safe_dump(cluster, sort_keys=False, default_flow_style=False, width=100)
    return fill("envoy-gateway-extensionpolicy.yaml", POLICY=policy_yaml("envoy-gateway.json", 8),
                JWKS_CLUSTER=indent(cluster_text, 10))


def azure_container_apps():
    return render("azure-container-apps.json", *container_options())


OUTPUTS = {
    "kubernetes-sidecar.yaml": kubernetes_sidecar,
    "istio-wasmplugin.yaml": istio,
    "envoy-gateway-extensionpolicy.yaml": envoy_gateway,
    "azure-container-apps/envoy.yaml": azure_container_apps,
}


def main(argv):
    check = "--check" in argv
    stale = []
    for name, make in OUTPUTS.items():
        text = make()
        path = DEPLOY / name
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(f"deploy/{name}")
        else:
            path.write_text(text)
    if stale:
        print("stale (run .venv/bin/python deploy/generate.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
