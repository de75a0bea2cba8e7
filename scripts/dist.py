"""`make dist`: the release artifacts of this checkout, named with the workspace version.

    dist/gateguard-<version>.wasm              the filter `make build` produces (wasm-opt'd)
    dist/gateguard-<version>.wasm.sha256       its SHA-256, sha256sum format
    dist/gateguard-<version>-linux-<arch>      the `gateguard` CLI, a plain executable (glibc)
    dist/gateguard-<version>.oci/              OCI image layout, tag <version> (see below)
    dist/gateguard-<version>.oci.tar           the same layout as one file (skopeo's oci-archive)
    dist/gateguard-<version>.digests           the image's digests, for pinning
    dist/SHA256SUMS                            every file above, sha256sum format

The image is the "compat" variant of the Wasm image format that Istio's WasmPlugin
(`url: oci://...`) and Envoy Gateway's EnvoyExtensionPolicy (`code.type: Image`) both fetch:
an ordinary OCI image whose single layer (application/vnd.oci.image.layer.v1.tar+gzip) holds
`plugin.wasm` at its root. Kubernetes can mount it as an image volume, too (one file,
plugin.wasm).

Platforms. The tag points to an image index with two manifests, linux/amd64 and linux/arm64,
that share the one layer and differ only in their config's `architecture`. Both entries could
not point to one manifest: containerd reads the platform to unpack from the image config, not
from the index, and an arm64 node will not unpack an image whose config says amd64. Istio and
Envoy Gateway (go-containerregistry, no platform asked) take the linux/amd64 entry on every
node, so its manifest digest is the one their `sha256` fields check (dist/*.digests).

Reproducible: no timestamps (tar entries at mtime 0, gzip without name or time, no `created`),
JSON with sorted keys. The two manifests are a function of the .wasm and the version only; the
index adds the git revision (annotation org.opencontainers.image.revision, when the checkout
has no uncommitted changes to tracked files). The same inputs give the same digests.

Usage: python3 scripts/dist.py [--out DIR] [--wasm FILE] [--cli FILE] [--revision REV|none]
       [--no-check]
Checks the result with skopeo (installed by `make oci-tools`) unless --no-check.
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WASM = ROOT / "target" / "wasm32-wasip1" / "release" / "gateguard.wasm"
CLI = ROOT / "target" / "release" / "gateguard"

INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"

# The index lists these; the layer is the same for all (Wasm runs anywhere Envoy does).
PLATFORMS = [{"os": "linux", "architecture": "amd64"},
             {"os": "linux", "architecture": "arm64", "variant": "v8"}]

# ELF e_machine → the architecture name in the CLI's file name.
ELF_MACHINES = {0x3E: "x86_64", 0xB7: "aarch64"}


class DistError(Exception):
    pass


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def canonical(obj):
    """JSON bytes that depend only on the value: the digest of a manifest is this text's."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def run(args, **kw):
    try:
        return subprocess.run(args, capture_output=True, text=True, check=True, timeout=300, **kw)
    except FileNotFoundError:
        raise DistError(f"{args[0]} not found")
    except subprocess.CalledProcessError as e:
        raise DistError(f"{' '.join(args)} exited with {e.returncode}: {e.stderr.strip()}")


def workspace_package():
    """Version, licence, description and repository of the filter package, as Cargo sees them
    ([workspace.package] in Cargo.toml: the one place a version is written)."""
    meta = json.loads(run(["cargo", "metadata", "--no-deps", "--format-version", "1",
                           "--manifest-path", str(ROOT / "Cargo.toml")]).stdout)
    packages = {p["name"]: p for p in meta["packages"]}
    if "gateguard" not in packages:
        raise DistError("cargo metadata lists no package named gateguard")
    versions = {p["name"]: p["version"] for p in packages.values()}
    if len(set(versions.values())) != 1:
        raise DistError(f"workspace members disagree on the version: {versions} "
                        "(each should say version.workspace = true)")
    return packages["gateguard"]


def git_revision():
    """HEAD's commit when the checkout has no uncommitted change to a tracked file, else None
    (the artifacts would not be that commit's)."""
    try:
        head = run(["git", "-C", str(ROOT), "rev-parse", "HEAD"]).stdout.strip()
        dirty = run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"]).stdout
    except DistError:
        return None
    return None if dirty.strip() else head


def elf_arch(path):
    head = path.read_bytes()[:20]
    if len(head) < 20 or head[:4] != b"\x7fELF" or head[5] != 1:
        raise DistError(f"--cli: {path} is not a little-endian ELF executable")
    machine = int.from_bytes(head[18:20], "little")
    if machine not in ELF_MACHINES:
        raise DistError(f"--cli: {path}: ELF machine {machine:#x} has no release name (x86_64 and aarch64 have)")
    return ELF_MACHINES[machine]


def layer_bytes(wasm):
    """tar+gzip with one entry, plugin.wasm, owned by root, mode 0644, at time 0; then the
    (compressed, uncompressed) bytes."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("plugin.wasm")
        info.size, info.mtime, info.mode = len(wasm), 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        tar.addfile(info, io.BytesIO(wasm))
    packed = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=packed, mtime=0, compresslevel=9) as gz:
        gz.write(raw.getvalue())
    return packed.getvalue(), raw.getvalue()


def oci_annotations(package, version, revision):
    notes = {
        "org.opencontainers.image.title": "gateguard",
        "org.opencontainers.image.description": "gateguard proxy-wasm filter for Envoy "
                                                "(Wasm image, compat variant: /plugin.wasm)",
        "org.opencontainers.image.version": version,
    }
    if package.get("license"):
        notes["org.opencontainers.image.licenses"] = package["license"]
    if package.get("repository"):
        notes["org.opencontainers.image.source"] = package["repository"]
    if revision:
        notes["org.opencontainers.image.revision"] = revision
    return notes


def build_image(wasm, package, version, revision):
    """The blobs of the image (digest → bytes) and the index's digest and size, plus the
    per-platform manifest digests."""
    blobs = {}

    def put(data):
        digest = "sha256:" + sha256(data)
        blobs[digest] = data
        return {"digest": digest, "size": len(data)}

    compressed, tar = layer_bytes(wasm)
    layer = {"mediaType": LAYER, **put(compressed)}
    common = oci_annotations(package, version, None)
    manifests = []
    for platform in PLATFORMS:
        config = {**platform,
                  "config": {"Labels": common},
                  "rootfs": {"type": "layers", "diff_ids": ["sha256:" + sha256(tar)]}}
        manifest = {"schemaVersion": 2, "mediaType": MANIFEST,
                    "config": {"mediaType": CONFIG, **put(canonical(config))},
                    "layers": [layer], "annotations": common}
        manifests.append({"mediaType": MANIFEST, **put(canonical(manifest)), "platform": platform})
    index = {"schemaVersion": 2, "mediaType": INDEX, "manifests": manifests,
             "annotations": oci_annotations(package, version, revision)}
    return blobs, {"mediaType": INDEX, **put(canonical(index))}, manifests, layer


def write_layout(path, blobs, index_desc, tag):
    path.mkdir()
    (path / "oci-layout").write_bytes(canonical({"imageLayoutVersion": "1.0.0"}))
    top = {"schemaVersion": 2, "mediaType": INDEX,
           "manifests": [{**index_desc, "annotations": {REF_NAME: tag}}]}
    (path / "index.json").write_bytes(canonical(top))
    store = path / "blobs" / "sha256"
    store.mkdir(parents=True)
    for digest, data in sorted(blobs.items()):
        (store / digest.split(":", 1)[1]).write_bytes(data)


def write_archive(layout, out):
    """The layout as a tar (oci-archive): sorted entries, root-owned, time 0."""
    with tarfile.open(out, "w", format=tarfile.USTAR_FORMAT) as tar:
        for p in sorted(layout.rglob("*"), key=lambda p: p.relative_to(layout).as_posix()):
            info = tarfile.TarInfo(p.relative_to(layout).as_posix() + ("/" if p.is_dir() else ""))
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if p.is_dir():
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                data = p.read_bytes()
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))


def check_with_skopeo(layout, archive, tag, index_digest):
    """skopeo reads back what was written: the layout and the archive both resolve the tag to
    our index, and each platform to an image with one layer."""
    if not shutil.which("skopeo"):
        raise DistError("skopeo not found: run `make oci-tools` (or pass --no-check)")
    for ref in (f"oci:{layout}:{tag}", f"oci-archive:{archive}:{tag}"):
        raw = run(["skopeo", "inspect", "--raw", ref]).stdout.encode()
        if "sha256:" + sha256(raw) != index_digest:
            raise DistError(f"skopeo reads another index from {ref}")
        for platform in PLATFORMS:
            seen = json.loads(run(["skopeo", "--override-os", platform["os"], "--override-arch",
                                   platform["architecture"], "inspect", ref]).stdout)
            if seen.get("Architecture") != platform["architecture"] or len(seen.get("Layers", [])) != 1:
                raise DistError(f"skopeo inspect {ref} for {platform}: {seen}")


def clear(out):
    """Removes what an earlier run left in `out` (any version), nothing else."""
    for p in out.iterdir():
        if p.name.startswith("gateguard-") or p.name == "SHA256SUMS":
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "dist")
    ap.add_argument("--wasm", type=Path, default=WASM)
    ap.add_argument("--cli", type=Path, default=CLI)
    ap.add_argument("--revision", help="git revision for the index annotation "
                    "(default: HEAD when no tracked file is modified; 'none' for no annotation)")
    ap.add_argument("--no-check", action="store_true", help="do not read the image back with skopeo")
    args = ap.parse_args(argv)

    for name, path, make in (("--wasm", args.wasm, "make build"), ("--cli", args.cli, "make cli")):
        if not path.is_file():
            raise DistError(f"{name}: {path} does not exist (run `{make}`)")
    wasm = args.wasm.read_bytes()
    if wasm[:4] != b"\0asm":
        raise DistError(f"--wasm: {args.wasm} is not a WebAssembly module (no \\0asm header)")
    cli_name_arch = elf_arch(args.cli)

    package = workspace_package()
    version = package["version"]
    revision = git_revision() if args.revision is None else (None if args.revision == "none" else args.revision)

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    clear(out)
    stem = f"gateguard-{version}"

    (out / f"{stem}.wasm").write_bytes(wasm)
    (out / f"{stem}.wasm.sha256").write_text(f"{sha256(wasm)}  {stem}.wasm\n")

    cli = out / f"{stem}-linux-{cli_name_arch}"
    shutil.copyfile(args.cli, cli)
    cli.chmod(0o755)

    blobs, index_desc, manifests, layer = build_image(wasm, package, version, revision)
    layout, archive = out / f"{stem}.oci", out / f"{stem}.oci.tar"
    with tempfile.TemporaryDirectory(dir=out, prefix=".oci-") as tmp:
        write_layout(Path(tmp) / "layout", blobs, index_desc, version)
        write_archive(Path(tmp) / "layout", archive)
        os.replace(Path(tmp) / "layout", layout)

    lines = [f"index        {index_desc['digest']}  (tag {version})"]
    for m in manifests:
        p = m["platform"]
        lines.append(f"{p['os']}/{p['architecture']:<6} {m['digest']}")
    lines += [f"layer        {layer['digest']}  ({LAYER})",
              f"plugin.wasm  sha256:{sha256(wasm)}",
              f"revision     {revision or 'unknown (uncommitted changes, or not a git checkout)'}"]
    (out / f"{stem}.digests").write_text(
        "# Istio WasmPlugin `sha256` and Envoy Gateway `image.sha256` check the linux/amd64\n"
        "# manifest digest (both resolve the tag's index to linux/amd64); pin a URL with it too.\n"
        + "\n".join(lines) + "\n")

    files = sorted(p.name for p in out.iterdir() if p.is_file() and p.name.startswith("gateguard-"))
    (out / "SHA256SUMS").write_text(
        "".join(f"{sha256((out / name).read_bytes())}  {name}\n" for name in files))

    if not args.no_check:
        check_with_skopeo(layout, archive, version, index_desc["digest"])

    rel = os.path.relpath(out)
    print(f"gateguard {version} → {rel}/")
    for name in files + ["SHA256SUMS", f"{stem}.oci/"]:
        print(f"  {name}")
    print("\n".join("  " + line for line in lines))
    print(f"push: skopeo copy --all --preserve-digests oci:{rel}/{stem}.oci:{version} docker://REGISTRY/gateguard:{version}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DistError as e:
        print(f"dist: {e}", file=sys.stderr)
        sys.exit(1)
