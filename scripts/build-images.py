#!/usr/bin/env python3
"""`make images`: OCI image archives of prism-node (CPU), prism-router and prism-operator, built
from the release binaries without a container daemon and without any `FROM` of a public registry.

Each image is one layer, distroless style: the binaries, the shared libraries `ldd` says they load
(glibc and the dynamic loader, taken from this machine), CA certificates, /etc/passwd and
/etc/group naming the image's user, and a world-writable /tmp. Its config keeps what the
Dockerfiles declare (user, entrypoint, ports), so the operator's generated pods and the chart work
with either build.

Each archive is an OCI image layout in a tar (index.json, oci-layout, blobs/) that also carries
Docker's manifest.json, so all of these load it:
  docker load -i target/images/prism-node.tar
  ctr -n k8s.io images import target/images/prism-node.tar
  skopeo copy oci-archive:target/images/prism-node.tar docker://REGISTRY/prism-node:TAG
  crane push target/images/prism-node.tar REGISTRY/prism-node:TAG

Builds are reproducible: sorted entries, mtime 0, root-owned, gzip without a timestamp.

Usage: python3 scripts/build-images.py [--bin-dir target/release] [--out target/images]
                                       [--registry ghcr.io/prism-dev] [--tag VERSION] [IMAGE...]
"""
import argparse
import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# What each image holds and declares. Mirrors node-image/Dockerfile, router/Dockerfile and
# operator/Dockerfile; operator/tests/images.rs checks these against what the operator renders.
IMAGES = {
    "prism-node": {
        "binaries": ["prism-node"],
        "user": (10001, "prism"),
        "entrypoint": ["/usr/local/bin/prism-node"],
        # Defaults for `docker run`; the operator's pods pass --listen/--grpc-listen as args,
        # which take precedence over these.
        "env": ["PRISM_LISTEN=0.0.0.0:8080", "PRISM_GRPC_LISTEN=0.0.0.0:9090"],
        "ports": [8080, 9090],
        "extra": [],
    },
    "prism-router": {
        "binaries": ["prism-router"],
        "user": (10001, "prism"),
        "entrypoint": ["/usr/local/bin/prism-router"],
        "env": [],
        "ports": [8080],
        "extra": [],
    },
    "prism-operator": {
        "binaries": ["prism-operator", "crdgen"],
        "user": (65532, "nonroot"),
        "entrypoint": ["/usr/local/bin/prism-operator"],
        "env": [],
        "ports": [8080],
        "extra": [("crds", "/crds")],
    },
}
PATH_ENV = "PATH=/usr/local/bin:/usr/bin:/bin"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def workspace_version():
    m = re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "Cargo.toml").read_text(), re.M)
    if not m:
        raise SystemExit("images: no version in Cargo.toml [workspace.package]")
    return m.group(1)


def shared_libraries(binary):
    """Absolute paths of what the dynamic loader maps for `binary` (NEEDED, recursively, and the
    loader itself), from ldd."""
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True)
    if out.returncode != 0:
        if "not a dynamic executable" in out.stdout + out.stderr:
            return []
        raise SystemExit(f"images: ldd {binary} failed: {out.stderr.strip()}")
    libs = []
    for line in out.stdout.splitlines():
        if "not found" in line:
            raise SystemExit(f"images: {binary} needs a library this machine lacks: {line.strip()}")
        m = re.search(r"(/\S+)\s+\(0x", line)
        if m:
            libs.append(m.group(1))
    return libs


class Layer:
    """A deterministic tar of the image's root file system."""

    def __init__(self):
        self.entries = {}  # path in image -> (TarInfo, bytes or None)

    def _dirs(self, path):
        parts = path.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self.entries:
                self.add_dir("/" + d)

    def add_dir(self, path, mode=0o755):
        ti = tarfile.TarInfo(path.strip("/"))
        ti.type, ti.mode = tarfile.DIRTYPE, mode
        self._dirs(path)
        self.entries[path.strip("/")] = (ti, None)

    def add_file(self, path, data, mode=0o644):
        ti = tarfile.TarInfo(path.strip("/"))
        ti.size, ti.mode = len(data), mode
        self._dirs(path)
        self.entries[path.strip("/")] = (ti, data)

    def add_symlink(self, path, target):
        ti = tarfile.TarInfo(path.strip("/"))
        ti.type, ti.linkname = tarfile.SYMTYPE, target
        self._dirs(path)
        self.entries[path.strip("/")] = (ti, None)

    def add_host_file(self, host_path, image_path=None, mode=None):
        """Copies a host file; a symlink chain (libc.so.6 -> libc-2.36.so) is kept as links."""
        image_path = image_path or host_path
        p = Path(host_path)
        if p.is_symlink():
            target = os.readlink(p)
            self.add_symlink(image_path, target)
            resolved = (p.parent / target) if not os.path.isabs(target) else Path(target)
            self.add_host_file(str(resolved), str(Path(image_path).parent / target) if not os.path.isabs(target) else target)
            return
        data = p.read_bytes()
        self.add_file(image_path, data, mode if mode is not None else (p.stat().st_mode & 0o777))

    def tar_bytes(self):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for name in sorted(self.entries):
                ti, data = self.entries[name]
                ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = 0, 0, 0, "", ""
                tf.addfile(ti, io.BytesIO(data) if data is not None else None)
        return buf.getvalue()


def blob(data):
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


def build_image(name, spec, bin_dir, ref, out):
    layer = Layer()
    for b in spec["binaries"]:
        path = bin_dir / b
        if not path.is_file():
            raise SystemExit(f"images: {path} missing: run `cargo build --release --workspace --bins` first")
        layer.add_host_file(str(path), f"/usr/local/bin/{b}", 0o755)
        for lib in shared_libraries(path):
            layer.add_host_file(lib)
    uid, user = spec["user"]
    # The image's own user, and 65532 (nonroot), the uid the operator's restricted pods run as.
    users = {0: "root", uid: user, 65532: "nonroot"}
    layer.add_file("/etc/passwd", "".join(
        f"{n}:x:{u}:{u}:{n}:{'/root' if u == 0 else '/nonexistent'}:/sbin/nologin\n" for u, n in sorted(users.items())).encode())
    layer.add_file("/etc/group", "".join(f"{n}:x:{u}:\n" for u, n in sorted(users.items())).encode())
    # hf:// and oci:// model fetches go over HTTPS.
    if Path(CA_BUNDLE).is_file():
        layer.add_host_file(CA_BUNDLE, CA_BUNDLE, 0o644)
    layer.add_dir("/tmp", 0o1777)
    for src, dest in spec["extra"]:
        for f in sorted((ROOT / src).rglob("*")):
            if f.is_file():
                layer.add_file(f"{dest}/{f.relative_to(ROOT / src)}", f.read_bytes(), 0o644)

    raw = layer.tar_bytes()
    diff_id = "sha256:" + hashlib.sha256(raw).hexdigest()
    gz = io.BytesIO()
    with gzip.GzipFile(fileobj=gz, mode="wb", compresslevel=6, mtime=0) as g:
        g.write(raw)
    layer_digest, layer_data = blob(gz.getvalue())

    version = ref.rsplit(":", 1)[1]
    labels = {
        "org.opencontainers.image.title": name,
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.source": "https://github.com/prism-dev/prism",
        "org.opencontainers.image.description": f"{name}, built by scripts/build-images.py from the release binaries",
    }
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "User": str(uid),
            "Entrypoint": spec["entrypoint"],
            "Env": [PATH_ENV] + spec["env"],
            "ExposedPorts": {f"{p}/tcp": {} for p in spec["ports"]},
            "WorkingDir": "/",
            "Labels": labels,
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "scripts/build-images.py"}],
    }
    config_digest, config_data = blob(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": len(config_data)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": len(layer_data)}],
        "annotations": {"org.opencontainers.image.title": name, "org.opencontainers.image.version": version},
    }
    manifest_digest, manifest_data = blob(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode())
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": len(manifest_data),
            "platform": {"architecture": "amd64", "os": "linux"},
            # containerd's import reads the full name; OCI tools read the tag.
            "annotations": {"io.containerd.image.name": ref, "org.opencontainers.image.ref.name": version},
        }],
    }
    docker_manifest = [{
        "Config": f"blobs/sha256/{config_digest[7:]}",
        "RepoTags": [ref],
        "Layers": [f"blobs/sha256/{layer_digest[7:]}"],
    }]
    files = {
        "oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
        "index.json": json.dumps(index, indent=1).encode(),
        "manifest.json": json.dumps(docker_manifest, indent=1).encode(),
        f"blobs/sha256/{config_digest[7:]}": config_data,
        f"blobs/sha256/{manifest_digest[7:]}": manifest_data,
        f"blobs/sha256/{layer_digest[7:]}": layer_data,
    }
    dest = out / f"{name}.tar"
    tmp = dest.with_suffix(".tar.tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
        for d in ("blobs", "blobs/sha256"):
            ti = tarfile.TarInfo(d); ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 0
            tf.addfile(ti)
        for path in sorted(files):
            ti = tarfile.TarInfo(path); ti.size, ti.mode, ti.mtime = len(files[path]), 0o644, 0
            tf.addfile(ti, io.BytesIO(files[path]))
    tmp.replace(dest)
    return dest, len(raw), manifest_digest


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    ap.add_argument("--bin-dir", type=Path, default=target / "release")
    ap.add_argument("--out", type=Path, default=target / "images")
    # The operator's and the chart's default references are ghcr.io/prism-dev/NAME:VERSION, so
    # images built with the defaults are the ones a default install asks for.
    ap.add_argument("--registry", default=os.environ.get("PRISM_IMAGE_REGISTRY", "ghcr.io/prism-dev"))
    ap.add_argument("--tag", default=os.environ.get("PRISM_IMAGE_TAG") or workspace_version())
    ap.add_argument("images", nargs="*", metavar="IMAGE", help=f"default: all of {', '.join(IMAGES)}")
    a = ap.parse_args()
    unknown = [i for i in a.images if i not in IMAGES]
    if unknown:
        ap.error(f"unknown image {', '.join(unknown)}; known: {', '.join(IMAGES)}")
    a.out.mkdir(parents=True, exist_ok=True)
    for name in a.images or IMAGES:
        ref = f"{a.registry.rstrip('/')}/{name}:{a.tag}"
        dest, size, digest = build_image(name, IMAGES[name], a.bin_dir, ref, a.out)
        print(f"images: {ref} -> {dest} ({size / 1048576:.0f} MiB unpacked, {dest.stat().st_size / 1048576:.0f} MiB archive, {digest[:19]})")


if __name__ == "__main__":
    main()
