"""Release artifacts (`make dist`, scripts/dist.py): versioned files and checksums, an OCI image
of the filter that a registry takes and gives back unchanged, that Istio and Envoy Gateway can
read (their fetch steps, done here over the registry's HTTP API), whose plugin.wasm runs in
Envoy, and whose digests depend only on what went in. Also: the CLI and the filter say the
version Cargo.toml gives.

The registry is Debian's docker-registry on 127.0.0.1; skopeo pushes and pulls. `make test`
installs both (`make oci-tools`); without them the registry tests skip, saying so."""

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tomllib
import urllib.request
from pathlib import Path

import pytest

from conftest import start_envoy
from envoy_harness import CLI, ROOT, WASM, compose, filter_config, free_port, gateway, wait_for
from envoy_harness import request as http_request

DIST = ROOT / "scripts" / "dist.py"
REGISTRY = Path("/usr/bin/docker-registry")
INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
VERSION = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["package"]["version"]

needs_oci_tools = pytest.mark.skipif(
    not (shutil.which("skopeo") and REGISTRY.exists()),
    reason="skopeo or docker-registry is not installed and could not be: `make oci-tools` "
           "installs them (Debian packages skopeo, docker-registry)")


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def run(*args, timeout=120):
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{args} exited with {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def dist(out, *args, wasm=WASM, check=None):
    """Runs scripts/dist.py into `out`; it reads the image back with skopeo when there is one."""
    if check is None:
        check = bool(shutil.which("skopeo"))
    run(sys.executable, DIST, "--out", out, "--wasm", wasm, *args, *([] if check else ["--no-check"]))
    return out


def digests(out):
    """The .digests file as {name: digest}."""
    lines = (out / f"gateguard-{VERSION}.digests").read_text().splitlines()
    return {l.split()[0]: l.split()[1] for l in lines if l and not l.startswith("#")}


def plugin_from_layer(blob):
    """plugin.wasm from a compat-variant layer, the way the fetchers read it: the gzip'd tar's
    entry whose base name is plugin.wasm."""
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["plugin.wasm"], members
        assert members[0].isreg() and members[0].mode == 0o644
        return tar.extractfile(members[0]).read()


# ---- version ----------------------------------------------------------------------------------

def test_cli_version_is_the_workspace_version():
    assert run(CLI, "--version").strip() == f"gateguard {VERSION}"


# ---- artifacts ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return dist(tmp_path_factory.mktemp("dist"), "--revision", "0123abc")


def test_artifacts_are_named_with_the_version_and_checksummed(built):
    stem = f"gateguard-{VERSION}"
    wasm = (built / f"{stem}.wasm").read_bytes()
    assert wasm == WASM.read_bytes()
    assert (built / f"{stem}.wasm.sha256").read_text() == f"{sha256(wasm)}  {stem}.wasm\n"
    cli = built / f"{stem}-linux-x86_64"
    assert cli.read_bytes() == CLI.read_bytes() and cli.stat().st_mode & 0o111
    assert run(cli, "--version").strip() == f"gateguard {VERSION}"
    files = sorted(p.name for p in built.iterdir() if p.is_file() and p.name != "SHA256SUMS")
    assert files == sorted([f"{stem}.wasm", f"{stem}.wasm.sha256", f"{stem}-linux-x86_64",
                            f"{stem}.oci.tar", f"{stem}.digests"])
    # sha256sum itself checks the file, as a user would.
    r = subprocess.run(["sha256sum", "-c", "--strict", "SHA256SUMS"], cwd=built,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(l.split("  ")[1] for l in (built / "SHA256SUMS").read_text().splitlines()) == files


def test_layout_holds_one_layer_with_plugin_wasm_for_amd64_and_arm64(built):
    layout = built / f"gateguard-{VERSION}.oci"
    blob = lambda d: (layout / "blobs" / "sha256" / d.split(":")[1]).read_bytes()  # noqa: E731
    top = json.loads((layout / "index.json").read_text())
    [entry] = top["manifests"]
    assert entry["mediaType"] == INDEX
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == VERSION
    index = json.loads(blob(entry["digest"]))
    assert index["annotations"]["org.opencontainers.image.version"] == VERSION
    assert index["annotations"]["org.opencontainers.image.revision"] == "0123abc"
    platforms = [(m["platform"]["os"], m["platform"]["architecture"]) for m in index["manifests"]]
    assert platforms == [("linux", "amd64"), ("linux", "arm64")]
    layers = set()
    for m in index["manifests"]:
        manifest = json.loads(blob(m["digest"]))
        assert manifest["mediaType"] == MANIFEST and manifest["config"]["mediaType"] == CONFIG
        assert [l["mediaType"] for l in manifest["layers"]] == [LAYER]
        config = json.loads(blob(manifest["config"]["digest"]))
        # containerd unpacks (image volumes) by the config's platform, not the index's.
        assert (config["os"], config["architecture"]) == (m["platform"]["os"], m["platform"]["architecture"])
        assert "created" not in config
        layer = manifest["layers"][0]["digest"]
        assert config["rootfs"]["diff_ids"] == ["sha256:" + sha256(gzip.decompress(blob(layer)))]
        layers.add(layer)
    [layer] = layers
    assert plugin_from_layer(blob(layer)) == WASM.read_bytes()


def test_same_wasm_same_digests_and_a_changed_wasm_changes_them(built, tmp_path):
    again = dist(tmp_path / "again", "--revision", "0123abc", check=False)
    assert (again / "SHA256SUMS").read_text() == (built / "SHA256SUMS").read_text()
    assert digests(again) == digests(built)

    # Another commit with the same .wasm: the platform images (what Istio pins) stay, the
    # index (which names the revision) changes.
    other = digests(dist(tmp_path / "other", "--revision", "4567def", check=False))
    first = digests(built)
    assert (other["linux/amd64"], other["linux/arm64"], other["layer"]) == \
           (first["linux/amd64"], first["linux/arm64"], first["layer"])
    assert other["index"] != first["index"]

    # One byte more in the module (a custom section): every image digest changes.
    custom = b"\x00" + bytes([6]) + b"\x01x" + b"abcd"
    changed_wasm = tmp_path / "changed.wasm"
    changed_wasm.write_bytes(WASM.read_bytes() + custom)
    changed = digests(dist(tmp_path / "changed", "--revision", "0123abc", wasm=changed_wasm, check=False))
    for name in ("index", "linux/amd64", "linux/arm64", "layer", "plugin.wasm"):
        assert changed[name] != first[name], name


def test_dist_refuses_what_is_not_a_wasm_module(tmp_path):
    bogus = tmp_path / "bogus.wasm"
    bogus.write_text("not wasm")
    r = subprocess.run([sys.executable, str(DIST), "--out", str(tmp_path / "out"), "--wasm", str(bogus),
                        "--no-check"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.startswith("dist: --wasm: ") and "not a WebAssembly module" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


# ---- through a registry -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Debian's docker-registry on 127.0.0.1, storing in a temporary directory."""
    if not (shutil.which("skopeo") and REGISTRY.exists()):
        pytest.skip("skopeo or docker-registry is not installed and could not be: `make oci-tools` "
                    "installs them (Debian packages skopeo, docker-registry)")
    d = tmp_path_factory.mktemp("registry")
    port = free_port()
    (d / "config.yml").write_text(
        "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
        f"    rootdirectory: {d / 'storage'}\nhttp:\n  addr: 127.0.0.1:{port}\n"
        "  secret: gateguard-test-only\n")
    log = open(d / "registry.log", "wb")
    proc = subprocess.Popen([str(REGISTRY), "serve", str(d / "config.yml")], stdout=log, stderr=subprocess.STDOUT)

    def ready():
        assert proc.poll() is None, f"docker-registry exited:\n{(d / 'registry.log').read_text()}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        assert wait_for(ready, timeout=20), f"docker-registry not ready:\n{(d / 'registry.log').read_text()}"
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def pushed(built, registry):
    image = f"{registry}/gateguard:{VERSION}"
    run("skopeo", "copy", "--all", "--preserve-digests", "--dest-tls-verify=false",
        f"oci:{built}/gateguard-{VERSION}.oci:{VERSION}", f"docker://{image}")
    return image


def registry_get(registry, path, accept):
    req = urllib.request.Request(f"http://{registry}/v2/{path}", headers={"Accept": accept})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.headers.get("Content-Type"), r.read()


def fetch_like_istio(registry, repository, tag):
    """What Istio's and Envoy Gateway's image fetchers (go-containerregistry, no platform
    asked) do with `oci://registry/repository:tag`: an index resolves to its linux/amd64 entry;
    a manifest that is not Docker's is read as the compat variant, its last layer being
    application/vnd.oci.image.layer.v1.tar+gzip with plugin.wasm inside. Returns (the digest
    they compare `sha256` with, the module)."""
    accept = ",".join([INDEX, MANIFEST, "application/vnd.docker.distribution.manifest.v2+json",
                       "application/vnd.docker.distribution.manifest.list.v2+json"])
    kind, body = registry_get(registry, f"{repository}/manifests/{tag}", accept)
    if kind == INDEX:
        entry = next(m for m in json.loads(body)["manifests"]
                     if (m["platform"]["os"], m["platform"]["architecture"]) == ("linux", "amd64"))
        kind, body = registry_get(registry, f"{repository}/manifests/{entry['digest']}", accept)
    assert kind == MANIFEST, kind
    layer = json.loads(body)["layers"][-1]
    assert layer["mediaType"] == LAYER
    _, blob = registry_get(registry, f"{repository}/blobs/{layer['digest']}", "*/*")
    return "sha256:" + sha256(body), plugin_from_layer(blob)


@needs_oci_tools
def test_registry_gives_back_the_image_unchanged(built, registry, pushed):
    first = digests(built)
    raw = run("skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{pushed}").encode()
    assert "sha256:" + sha256(raw) == first["index"]
    index = json.loads(raw)
    assert index["mediaType"] == INDEX
    for m in index["manifests"]:
        manifest = json.loads(run("skopeo", "inspect", "--raw", "--tls-verify=false",
                                  f"docker://{registry}/gateguard@{m['digest']}"))
        assert manifest["mediaType"] == MANIFEST
        assert [l["mediaType"] for l in manifest["layers"]] == [LAYER]
        assert manifest["layers"][0]["digest"] == first["layer"]
    # The platform a node asks for: skopeo resolves the index as containerd would.
    for arch in ("amd64", "arm64"):
        seen = json.loads(run("skopeo", "--override-arch", arch, "inspect", "--tls-verify=false",
                              f"docker://{pushed}"))
        assert seen["Architecture"] == arch and seen["Os"] == "linux"
        assert seen["Layers"] == [first["layer"]]
        assert seen["Labels"]["org.opencontainers.image.version"] == VERSION


@needs_oci_tools
def test_istio_and_envoy_gateway_fetch_steps_get_the_module(built, registry, pushed):
    digest, module = fetch_like_istio(registry, "gateguard", VERSION)
    assert module == WASM.read_bytes()
    # The digest their `sha256` field is compared with is the one dist wrote down for it.
    assert digest == digests(built)["linux/amd64"]
    # Pinned by that digest, the URL leads to the same module.
    assert fetch_like_istio(registry, "gateguard", digest) == (digest, module)


@pytest.fixture(scope="module")
def pulled(pushed, tmp_path_factory):
    """The image pulled back with skopeo into an OCI layout, and the plugin.wasm in it."""
    d = tmp_path_factory.mktemp("pulled")
    run("skopeo", "copy", "--all", "--src-tls-verify=false", f"docker://{pushed}", f"oci:{d / 'layout'}:{VERSION}")
    layout = d / "layout"
    blob = lambda digest: (layout / "blobs" / "sha256" / digest.split(":")[1]).read_bytes()  # noqa: E731
    [entry] = json.loads((layout / "index.json").read_text())["manifests"]
    index = json.loads(blob(entry["digest"]))
    amd64 = next(m for m in index["manifests"] if m["platform"]["architecture"] == "amd64")
    [layer] = json.loads(blob(amd64["digest"]))["layers"]
    module = d / "plugin.wasm"
    module.write_bytes(plugin_from_layer(blob(layer["digest"])))
    return module


@needs_oci_tools
def test_pulled_plugin_is_the_built_module(pulled, built):
    assert sha256(pulled.read_bytes()) == sha256(WASM.read_bytes())
    assert "sha256:" + sha256(pulled.read_bytes()) == digests(built)["plugin.wasm"]


def start_gateway(request, upstream, module=None):
    port, admin = free_port(), free_port()
    config = compose([gateway("gw", port, {"apis": [{"name": "a", "path_prefix": "/a"}]}, upstream)], admin)
    if module:
        filter_config(config, "gw")["vm_config"]["code"]["local"]["filename"] = str(module)
    envoy = start_envoy(request, config)
    envoy.port = port
    return envoy


def assert_serves_and_says_its_version(envoy):
    assert wait_for(lambda: http_request(envoy.port, "GET", "/a/x").status == 200, timeout=10)
    r = http_request(envoy.port, "GET", "/elsewhere")
    assert r.status == 404 and r.json() == {"statusCode": 404, "message": "Resource not found"}
    # Once per Envoy, however many workers (start_envoy runs two), at info level.
    started = [l for l in envoy.log_text().splitlines() if f"gateguard {VERSION} starting" in l]
    assert len(started) == 1, envoy.log_text()[-4000:]
    assert "[info]" in started[0], started


def test_filter_logs_its_version_once_at_start(request, echo_upstream):
    assert_serves_and_says_its_version(start_gateway(request, echo_upstream))


@needs_oci_tools
def test_pulled_plugin_runs_in_envoy(request, pulled, echo_upstream):
    assert_serves_and_says_its_version(start_gateway(request, echo_upstream, pulled))
