"""The deployment recipes in deploy/ (docs/deploy.md), checked offline: every Kubernetes object
against its schema (core kinds with the packaged `kubernetes-validate`, Istio's and Envoy
Gateway's kinds against their CRDs' schemas kept in tests/schemas/), the Container Apps YAML
against the Microsoft.App ARM schema, every embedded policy through `gateguard validate`, every
embedded Envoy configuration through `envoy --mode validate` with the in-container paths pointed
at this checkout's files, and the recipes up to date with `deploy/generate.py`. Nothing here
was applied to a live cluster or Azure environment."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from envoy_harness import CLI, ENVOY, ROOT, WASM

DEPLOY = ROOT / "deploy"
SCHEMAS = ROOT / "tests" / "schemas"
KUBERNETES_VERSION = "1.35.0"  # the first with image volumes on by default
WASM_IN_CONTAINER = "/etc/gateguard/plugin.wasm"
ECDS_IN_CONTAINER = "/etc/envoy/filter"
CRDS = {
    ("extensions.istio.io/v1alpha1", "WasmPlugin"): "wasmplugin-v1alpha1.json",
    ("networking.istio.io/v1", "ServiceEntry"): "serviceentry-v1.json",
    ("networking.istio.io/v1", "DestinationRule"): "destinationrule-v1.json",
    ("gateway.envoyproxy.io/v1alpha1", "EnvoyExtensionPolicy"): "envoyextensionpolicy-v1alpha1.json",
    ("gateway.envoyproxy.io/v1alpha1", "EnvoyPatchPolicy"): "envoypatchpolicy-v1alpha1.json",
}
KUBERNETES_MANIFESTS = ["kubernetes-sidecar.yaml", "istio-wasmplugin.yaml", "envoy-gateway-extensionpolicy.yaml"]
ACA_APP = DEPLOY / "azure-container-apps" / "containerapp.yaml"


def strict(schema):
    """`schema` refusing unknown fields, as the API server does under kubectl's default
    server-side field validation (Strict) and as a typo deserves: every object schema with
    properties and no x-kubernetes-preserve-unknown-fields gets additionalProperties false."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
    walk(schema)
    return schema


def schema_errors(doc):
    """Why `doc` (one Kubernetes object) does not match its kind's schema; [] when it does."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in CRDS:
        schema = json.loads((SCHEMAS / CRDS[key]).read_text())
        # The API server checks these against the CRD itself; some CRDs' schemas omit them.
        schema["properties"]["apiVersion"] = {"const": key[0]}
        schema["properties"]["kind"] = {"const": key[1]}
        schema = strict(schema)
        # metadata is the API server's ObjectMeta, not the CRD's: name it at least.
        errors = [] if doc.get("metadata", {}).get("name") else ["metadata.name missing"]
        body = {k: v for k, v in doc.items() if k != "metadata"}
        schema["properties"].pop("metadata", None)
        validator = jsonschema.Draft7Validator(schema)
        return errors + [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                         for e in validator.iter_errors(body)]
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(map(str, e.path))}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"no schema for {key}: {e}"]
    return []


def leaf_errors(error):
    """The innermost reasons of a oneOf/anyOf error (the ARM schema nests them)."""
    if not error.context:
        yield error
    for inner in error.context:
        yield from leaf_errors(inner)


def aca_errors(doc):
    schema = json.loads((SCHEMAS / "containerapp-properties-2025-07-01.json").read_text())
    # The generated ARM schema says integer for a container's cpu, whose own description says
    # "e.g. 0.5"; the REST API's is a double (ARM templates work around it with json('0.5')).
    cpu = schema["definitions"]["ContainerResources"]["properties"]["cpu"]["oneOf"]
    assert cpu[0] == {"type": "integer"}, "schema updated: check this correction is still needed"
    cpu[0] = {"type": "number"}
    validator = jsonschema.Draft4Validator(strict(schema))
    errors = []
    for e in validator.iter_errors(doc.get("properties", {})):
        # Every ARM value may also be an "[expression]" string: that alternative explains nothing.
        reasons = [leaf for leaf in leaf_errors(e) if "expression" not in str(list(leaf.schema_path))]
        for leaf in reasons or [e]:
            errors.append(f"properties.{'.'.join(map(str, leaf.absolute_path))}: {leaf.message}")
    return errors


def documents(name):
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def find(docs, kind, name=None):
    return next(d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name))


# Schemas


@pytest.mark.parametrize("name", KUBERNETES_MANIFESTS)
def test_every_object_matches_its_schema(name):
    docs = documents(name)
    assert docs
    for doc in docs:
        assert schema_errors(doc) == [], f"{name}: {doc['kind']} {doc['metadata']['name']}"


def test_every_recipe_in_deploy_is_checked():
    known = set(KUBERNETES_MANIFESTS) | {"envoy.compose.yaml", "azure-container-apps/envoy.yaml",
                                          "azure-container-apps/containerapp.yaml"}
    found = {str(p.relative_to(DEPLOY)) for p in DEPLOY.rglob("*.yaml") if "templates" not in p.parts}
    assert found <= known, f"not checked by this file: {sorted(found - known)}"


def test_the_container_app_matches_the_arm_schema():
    doc = yaml.safe_load(ACA_APP.read_text())
    assert doc["type"] == "Microsoft.App/containerApps"
    assert aca_errors(doc) == []


BROKEN = [
    # (manifest, kind, change, what the error names)
    ("kubernetes-sidecar.yaml", "Deployment",
     lambda d: d["spec"]["template"]["spec"]["containers"][1].__setitem__("imagePullPolice", "Always"),
     "imagePullPolice"),
    ("kubernetes-sidecar.yaml", "Deployment", lambda d: d["spec"].__setitem__("replicas", "two"), "two"),
    ("kubernetes-sidecar.yaml", "Deployment",
     lambda d: d["spec"]["template"]["spec"]["volumes"][2]["image"].pop("reference") and
     d["spec"]["template"]["spec"]["volumes"][2]["image"].__setitem__("ref", "x"), "ref"),
    ("istio-wasmplugin.yaml", "WasmPlugin", lambda d: d["spec"].__setitem__("phase", "BEFORE_AUTHN"),
     "BEFORE_AUTHN"),
    ("istio-wasmplugin.yaml", "WasmPlugin", lambda d: d["spec"].__setitem__("sha256", "sha256:abc"),
     "sha256:abc"),
    ("istio-wasmplugin.yaml", "ServiceEntry", lambda d: d["spec"].__setitem__("resolutin", "DNS"),
     "resolutin"),
    ("envoy-gateway-extensionpolicy.yaml", "EnvoyExtensionPolicy",
     lambda d: d["spec"]["wasm"][0]["code"].__setitem__("type", "OCI"), "OCI"),
    ("envoy-gateway-extensionpolicy.yaml", "EnvoyExtensionPolicy",
     lambda d: d["spec"]["wasm"][0].__setitem__("failOpen", "no"), "no"),
    ("envoy-gateway-extensionpolicy.yaml", "EnvoyPatchPolicy",
     lambda d: d["spec"]["jsonPatches"][0]["operation"].__setitem__("op", "insert"), "insert"),
]


@pytest.mark.parametrize("name,kind,change,named", BROKEN, ids=[f"{b[1]}-{b[3]}" for b in BROKEN])
def test_a_broken_manifest_is_refused(name, kind, change, named):
    doc = copy.deepcopy(find(documents(name), kind))
    change(doc)
    errors = schema_errors(doc)
    assert errors and named in " ".join(errors), errors


def test_a_broken_container_app_is_refused():
    doc = yaml.safe_load(ACA_APP.read_text())
    broken = copy.deepcopy(doc)
    broken["properties"]["configuration"]["ingress"]["clientCertificateMode"] = "required"
    assert "required" in " ".join(aca_errors(broken))
    broken = copy.deepcopy(doc)
    broken["properties"]["template"]["containers"][0]["env"][0]["secretRefs"] = "x"
    assert "secretRefs" in " ".join(aca_errors(broken))


def test_an_unknown_kind_is_not_waved_through():
    assert schema_errors({"apiVersion": "example.com/v1", "kind": "Gadget", "metadata": {"name": "g"}})


# The recipes are what deploy/generate.py writes from the policies and templates


def test_the_recipes_are_up_to_date():
    r = subprocess.run([sys.executable, "deploy/generate.py", "--check"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


# Embedded policies


def gateguard_validate(policy, tmp_path, name):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(policy))
    r = subprocess.run([str(CLI), "validate", str(path)], capture_output=True, text=True,
                       env={**os.environ, "CONFIG_APP_KEY": "k"}, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def sidecar_filter_file():
    return yaml.safe_load(find(documents("kubernetes-sidecar.yaml"), "ConfigMap", "gateguard-filter")
                          ["data"]["gateguard-filter.yaml"])


def embedded_policies():
    filter_config = sidecar_filter_file()["resources"][0]["typed_config"]["config"]
    aca = yaml.safe_load((DEPLOY / "azure-container-apps" / "envoy.yaml").read_text())
    aca_wasm = aca["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]["http_filters"][1]["typed_config"]["config"]
    return {
        "kubernetes": json.loads(filter_config["configuration"]["value"]),
        "istio": find(documents("istio-wasmplugin.yaml"), "WasmPlugin")["spec"]["pluginConfig"],
        "envoy-gateway": find(documents("envoy-gateway-extensionpolicy.yaml"),
                              "EnvoyExtensionPolicy")["spec"]["wasm"][0]["config"],
        "azure-container-apps": json.loads(aca_wasm["configuration"]["value"]),
    }


@pytest.mark.parametrize("name", ["kubernetes", "istio", "envoy-gateway", "azure-container-apps"])
def test_each_embedded_policy_is_valid_and_is_the_sample(name, tmp_path):
    policy = embedded_policies()[name]
    assert policy == json.loads((DEPLOY / "policies" / f"{name}.json").read_text())
    gateguard_validate(policy, tmp_path, name)


# Embedded Envoy configurations, with the container's paths pointed at this checkout


def envoy_validate(config_text, tmp_path, name):
    path = tmp_path / f"{name}.yaml"
    path.write_text(config_text)
    r = subprocess.run([ENVOY, "--mode", "validate", "-c", str(path), "-l", "warning"],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "CONFIG_APP_KEY": "k"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def test_the_sidecar_envoy_configuration_is_valid(tmp_path):
    docs = documents("kubernetes-sidecar.yaml")
    envoy_yaml = find(docs, "ConfigMap", "gateguard-envoy")["data"]["envoy.yaml"]
    assert WASM_IN_CONTAINER not in envoy_yaml and ECDS_IN_CONTAINER in envoy_yaml
    ecds = tmp_path / "filter"
    ecds.mkdir()
    filter_text = find(docs, "ConfigMap", "gateguard-filter")["data"]["gateguard-filter.yaml"]
    (ecds / "gateguard-filter.yaml").write_text(filter_text.replace(WASM_IN_CONTAINER, str(WASM)))
    envoy_validate(envoy_yaml.replace(ECDS_IN_CONTAINER, str(ecds)), tmp_path, "sidecar")


def test_the_sidecar_filter_file_is_a_valid_filter(tmp_path):
    """--mode validate does not read ECDS files: put the file's filter in the listener instead."""
    config = yaml.safe_load(find(documents("kubernetes-sidecar.yaml"), "ConfigMap",
                                 "gateguard-envoy")["data"]["envoy.yaml"])
    resource = sidecar_filter_file()["resources"][0]
    assert resource["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"] == WASM_IN_CONTAINER
    filters = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]["http_filters"]
    slot = next(i for i, f in enumerate(filters) if f["name"] == "gateguard")
    filters[slot] = {"name": "envoy.filters.http.wasm", "typed_config": resource["typed_config"]}
    text = yaml.safe_dump(config).replace(WASM_IN_CONTAINER, str(WASM))
    envoy_validate(text, tmp_path, "sidecar-filter")


def test_the_container_app_envoy_configuration_is_valid(tmp_path):
    text = (DEPLOY / "azure-container-apps" / "envoy.yaml").read_text()
    assert WASM_IN_CONTAINER in text
    envoy_validate(text.replace(WASM_IN_CONTAINER, str(WASM)), tmp_path, "aca")


def test_the_envoy_gateway_jwks_cluster_is_valid(tmp_path):
    patch = find(documents("envoy-gateway-extensionpolicy.yaml"), "EnvoyPatchPolicy")
    cluster = patch["spec"]["jsonPatches"][0]["operation"]["value"]
    envoy_validate(yaml.safe_dump({"static_resources": {"clusters": [cluster]}}), tmp_path, "eg-cluster")


# The pieces of each recipe agree with each other


def test_the_sidecar_pieces_fit_together():
    docs = documents("kubernetes-sidecar.yaml")
    pod = find(docs, "Deployment")["spec"]["template"]["spec"]
    envoy = next(c for c in pod["containers"] if c["name"] == "gateguard")
    config = yaml.safe_load(find(docs, "ConfigMap", "gateguard-envoy")["data"]["envoy.yaml"])
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    health = manager["http_filters"][0]
    assert health["name"] == "envoy.filters.http.health_check"
    path = health["typed_config"]["headers"][0]["string_match"]["exact"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert envoy[probe]["httpGet"]["path"] == path
        assert envoy[probe]["httpGet"]["port"] == "http"
    port = next(p for p in envoy["ports"] if p["name"] == "http")["containerPort"]
    assert config["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] == port
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    mounts = {m["name"]: m["mountPath"] for m in envoy["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["wasm"]["image"]["reference"].startswith("registry.example.com/gateguard")
    assert f"{mounts['wasm']}/plugin.wasm" == WASM_IN_CONTAINER
    assert mounts["filter-config"] == ECDS_IN_CONTAINER
    assert envoy["args"][envoy["args"].index("-c") + 1] == f"{mounts['envoy-config']}/envoy.yaml"
    watched = health and manager["http_filters"][1]["config_discovery"]["config_source"]["path_config_source"]
    assert watched["watched_directory"]["path"] == ECDS_IN_CONTAINER
    env_keys = sidecar_filter_file()["resources"][0]["typed_config"]["config"]["vm_config"][
        "environment_variables"]["host_env_keys"]
    assert {e["name"] for e in envoy["env"] if "secretKeyRef" in e.get("valueFrom", {})} >= set(env_keys)
    assert pod["securityContext"]["runAsNonRoot"] is True
    for container in pod["containers"]:
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["resources"]["requests"]


def test_istio_fetches_keys_through_the_service_entry_cluster():
    docs = documents("istio-wasmplugin.yaml")
    entry = find(docs, "ServiceEntry")["spec"]
    rule = find(docs, "DestinationRule")["spec"]
    host, port = entry["hosts"][0], entry["ports"][0]["number"]
    jwks = find(docs, "WasmPlugin")["spec"]["pluginConfig"]["apis"][0]["jwt"]["jwks"]
    assert jwks["cluster"] == f"outbound|{port}||{host}"
    assert jwks["uri"].startswith(f"https://{host}/")
    assert rule["host"] == host and rule["trafficPolicy"]["tls"]["mode"] == "SIMPLE"


def test_envoy_gateway_fetches_keys_through_the_patched_cluster():
    docs = documents("envoy-gateway-extensionpolicy.yaml")
    patch = find(docs, "EnvoyPatchPolicy")["spec"]["jsonPatches"][0]
    jwks = find(docs, "EnvoyExtensionPolicy")["spec"]["wasm"][0]["config"]["apis"][0]["jwt"]["jwks"]
    assert patch["name"] == patch["operation"]["value"]["name"] == jwks["cluster"]


def test_the_container_app_image_holds_what_its_envoy_configuration_names():
    dockerfile = (DEPLOY / "azure-container-apps" / "Dockerfile").read_text()
    assert f"COPY --from=filter /plugin.wasm {WASM_IN_CONTAINER}" in dockerfile
    assert "COPY envoy.yaml /etc/envoy/envoy.yaml" in dockerfile
    app = yaml.safe_load(ACA_APP.read_text())["properties"]
    gateway = app["template"]["containers"][0]
    config = yaml.safe_load((DEPLOY / "azure-container-apps" / "envoy.yaml").read_text())
    listener = config["static_resources"]["listeners"][0]
    assert listener["address"]["socket_address"]["port_value"] == app["configuration"]["ingress"]["targetPort"]
    health = listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][0]
    path = health["typed_config"]["headers"][0]["string_match"]["exact"]
    assert {p["httpGet"]["path"] for p in gateway["probes"]} == {path}
    assert {e["name"] for e in gateway["env"] if "secretRef" in e} >= {"CONFIG_APP_KEY"}
    assert app["configuration"]["ingress"]["clientCertificateMode"] == "require"
