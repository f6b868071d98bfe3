#!/usr/bin/env python3
"""Build a tiny OCI image (an OCI image-layout tar, importable with `ctr images import`) from
static binaries on this machine, with no daemon and no registry.

  mkimage.py --name prism.local/e2e/busybox:1 --out busybox.tar [--busybox /bin/busybox]
             [--file SRC:DEST[:MODE]]... [--entrypoint JSON] [--cmd JSON] [--env K=V]...

The root filesystem holds /bin/busybox plus one symlink per applet (`busybox --list`), /etc/passwd,
/etc/group, /tmp, and the --file copies. One uncompressed layer, linux/amd64. The image name is set
with both the containerd (`io.containerd.image.name`) and OCI (`org.opencontainers.image.ref.name`)
annotations, so `ctr -n k8s.io images import` registers it under exactly that name.
"""
import argparse, hashlib, io, json, os, subprocess, tarfile, time

def add_bytes(tf, name, data, mode=0o644):
    ti = tarfile.TarInfo(name); ti.size = len(data); ti.mode = mode; ti.mtime = 0
    tf.addfile(ti, io.BytesIO(data))

def add_dir(tf, name, mode=0o755):
    ti = tarfile.TarInfo(name); ti.type = tarfile.DIRTYPE; ti.mode = mode; ti.mtime = 0
    tf.addfile(ti)

def add_link(tf, name, target):
    ti = tarfile.TarInfo(name); ti.type = tarfile.SYMTYPE; ti.linkname = target; ti.mode = 0o777; ti.mtime = 0
    tf.addfile(ti)

def layer(args):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for d, m in [("bin", 0o755), ("etc", 0o755), ("tmp", 0o1777), ("proc", 0o555), ("sys", 0o555),
                     ("dev", 0o755), ("var", 0o755), ("var/www", 0o755), ("root", 0o700)]:
            add_dir(tf, d, m)
        with open(args.busybox, "rb") as f:
            add_bytes(tf, "bin/busybox", f.read(), 0o755)
        applets = subprocess.run([args.busybox, "--list"], check=True, capture_output=True, text=True).stdout.split()
        for a in sorted(set(applets)):
            if a != "busybox" and "/" not in a:
                add_link(tf, "bin/" + a, "busybox")
        add_bytes(tf, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
        add_bytes(tf, "etc/group", b"root:x:0:\nnogroup:x:65534:\n")
        add_bytes(tf, "var/www/index.html", b"prism real-node e2e\n")
        for spec in args.file:
            parts = spec.split(":")
            src, dest = parts[0], parts[1].lstrip("/")
            mode = int(parts[2], 8) if len(parts) > 2 else (os.stat(src).st_mode & 0o777)
            with open(src, "rb") as f:
                add_bytes(tf, dest, f.read(), mode)
    return buf.getvalue()

def main():
    p = argparse.ArgumentParser()
    p.add_argument("--name", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--busybox", default="/bin/busybox")
    p.add_argument("--file", action="append", default=[])
    p.add_argument("--entrypoint", default=None, help="JSON list")
    p.add_argument("--cmd", default='["/bin/sh"]', help="JSON list")
    p.add_argument("--env", action="append", default=[])
    args = p.parse_args()

    blobs = {}
    def blob(data):
        d = "sha256:" + hashlib.sha256(data).hexdigest(); blobs[d] = data; return d, len(data)

    ldata = layer(args)
    ldig, lsize = blob(ldata)
    cfg = {"config": {"Env": ["PATH=/bin"] + args.env, "Cmd": json.loads(args.cmd), "WorkingDir": "/"},
           "rootfs": {"type": "layers", "diff_ids": [ldig]},
           "architecture": "amd64", "os": "linux", "created": "1970-01-01T00:00:00Z",
           "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "e2e/real-node/mkimage.py"}]}
    if args.entrypoint:
        cfg["config"]["Entrypoint"] = json.loads(args.entrypoint)
    cdig, csize = blob(json.dumps(cfg, sort_keys=True).encode())
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cdig, "size": csize},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ldig, "size": lsize}]}
    mdig, msize = blob(json.dumps(manifest, sort_keys=True).encode())
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mdig, "size": msize,
                            "platform": {"architecture": "amd64", "os": "linux"},
                            "annotations": {"io.containerd.image.name": args.name,
                                            "org.opencontainers.image.ref.name": args.name}}]}
    tmp = args.out + ".tmp"
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as out:
        add_bytes(out, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        add_bytes(out, "index.json", json.dumps(index, sort_keys=True).encode())
        add_dir(out, "blobs"); add_dir(out, "blobs/sha256")
        for d, data in blobs.items():
            add_bytes(out, "blobs/sha256/" + d.split(":", 1)[1], data)
    os.replace(tmp, args.out)
    print(f"{args.name} {mdig} -> {args.out}")

if __name__ == "__main__":
    main()
