"""haflow's helper on a real host: one request (JSON on stdin) -> one answer (JSON on stdout).

The SSH host (hosts/ssh.py) sends this file's source with every request (`python3 -c`), so a
host never runs a stale copy and nothing is installed for it. It uses the standard library
only (Python >= 3.11, what preflight demands). One request does a whole step on the host:
gather its facts, make a set of files and folders so (or say what would change, with diffs),
report the state of a set of systemd units, or copy a folder. That keeps a no-op deploy at a
few round trips per host.
"""

import base64
import difflib
import grp
import hashlib
import io
import json
import os
import platform
import pwd
import shutil
import socket
import subprocess
import sys
import tarfile


def facts(req):
    """What preflight judges: the OS, init, architecture, Python, addresses, listeners, clock, disk."""
    osr = {}
    try:
        with open("/etc/os-release") as f:
            for line in f:
                k, _, v = line.strip().partition("=")
                if k:
                    osr[k] = v.strip('"')
    except OSError:
        pass
    try:
        init = os.path.basename(os.readlink("/proc/1/exe"))
    except OSError:
        init = open("/proc/1/comm").read().strip()
    virt = subprocess.run(["systemd-detect-virt", "--container"], capture_output=True, text=True).stdout.strip()
    ntp = subprocess.run(["timedatectl", "show", "-p", "NTPSynchronized", "--value"], capture_output=True, text=True)
    disk_path = req.get("disk_path", "/var/lib")
    while not os.path.exists(disk_path):
        disk_path = os.path.dirname(disk_path)
    st = os.statvfs(disk_path)
    addrs = json.loads(subprocess.run(["ip", "-j", "-4", "addr"], capture_output=True, text=True).stdout or "[]")
    return {
        "os_id": osr.get("ID", ""), "os_version": osr.get("VERSION_ID", ""), "os_name": osr.get("PRETTY_NAME", ""),
        "codename": osr.get("VERSION_CODENAME", ""),
        "init": init, "container": virt if virt and virt != "none" else None,
        "arch": platform.machine(), "python": "%d.%d" % sys.version_info[:2],
        "ntp_synchronized": ntp.stdout.strip() == "yes",
        "time": __import__("time").time(),
        "disk_free_bytes": st.f_bavail * st.f_frsize,
        "addresses": sorted(a["local"] for i in addrs for a in i.get("addr_info", []) if a.get("family") == "inet"),
        "listening": sorted(_listening()),
    }


def _listening():
    out = set()
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        parts = line.split()
        if parts[3] != "0A":  # LISTEN
            continue
        hexaddr, hexport = parts[1].split(":")
        addr = socket.inet_ntoa(bytes.fromhex(hexaddr)[::-1])
        out.add("%s:%d" % (addr, int(hexport, 16)))
    return out


def _ids(owner):
    pw = pwd.getpwnam(owner or "root")
    return pw.pw_uid, pw.pw_gid


def _dir_change(d):
    try:
        st = os.stat(d["path"])
    except FileNotFoundError:
        return "create"
    uid, gid = _ids(d.get("owner"))
    if st.st_mode & 0o7777 != d["mode"]:
        return "mode"
    if (st.st_uid, st.st_gid) != (uid, gid):
        return "owner"
    return None


def _file_change(f, content):
    try:
        st = os.stat(f["path"])
        with open(f["path"], "rb") as fh:
            have = fh.read()
    except FileNotFoundError:
        return "create", b""
    if have != content:
        return "update", have
    if st.st_mode & 0o7777 != f["mode"]:
        return "mode", have
    if (st.st_uid, st.st_gid) != _ids(f.get("owner")):
        return "owner", have
    return None, have


def _diff(path, old, new, secret):
    if secret:
        return "--- %s\n+++ %s\n(content holds secrets: not shown)\n" % (path, path)
    try:
        a, b = old.decode().splitlines(keepends=True), new.decode().splitlines(keepends=True)
    except UnicodeDecodeError:
        return "(binary)\n"
    return "".join(difflib.unified_diff(a, b, path, path))


def apply(req):
    """Make folders and files as asked (or with dry_run, say what would change and how)."""
    dry = req.get("dry_run", False)
    changes = []
    for d in req.get("dirs", []):
        what = _dir_change(d)
        if what:
            changes.append({"path": d["path"], "what": what, "kind": "dir"})
            if not dry:
                os.makedirs(d["path"], exist_ok=True)
                os.chmod(d["path"], d["mode"])
                os.chown(d["path"], *_ids(d.get("owner")))
    for f in req.get("files", []):
        content = base64.b64decode(f["content"])
        what, old = _file_change(f, content)
        if not what:
            continue
        change = {"path": f["path"], "what": what, "kind": "file"}
        if req.get("diff"):
            change["diff"] = _diff(f["path"], old, content, f["mode"] & 0o077 == 0)
        changes.append(change)
        if not dry:
            _write(f["path"], content, f["mode"], _ids(f.get("owner")))
    return {"changes": changes}


def _write(path, content, mode, ids):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), ".%s.haflow-tmp" % os.path.basename(path))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, content)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chown(tmp, *ids)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


UNIT_PROPS = ["ActiveState", "SubState", "InvocationID", "MainPID", "ExecMainStartTimestamp", "NeedDaemonReload",
              "LoadState", "UnitFileState"]


def units(req):
    """State of systemd units; for each, whether a file it reads changed after it started."""
    names = list(req["units"])
    if req.get("glob"):  # every installed unit of a pattern (a cluster's), by its file
        import fnmatch
        names += [n for n in sorted(os.listdir(req["unit_dir"])) if fnmatch.fnmatch(n, req["glob"]) and n not in names]
    out = {}
    if names:
        r = subprocess.run(["systemctl", "show", "--timestamp=unix", "-p", ",".join(UNIT_PROPS), "--", *names],
                           capture_output=True, text=True)
        blocks = r.stdout.strip("\n").split("\n\n")
        for name, block in zip(names, blocks):
            props = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
            started = props.get("ExecMainStartTimestamp", "").lstrip("@")
            started = float(started) if started.replace(".", "").isdigit() else None
            newest = max((os.stat(p).st_mtime for p in req.get("paths", {}).get(name, []) if os.path.exists(p)), default=0)
            out[name] = {"active": props.get("ActiveState"), "sub": props.get("SubState"),
                         "invocation": props.get("InvocationID") or None, "main_pid": int(props.get("MainPID") or 0),
                         "started": started, "loaded": props.get("LoadState"), "enabled": props.get("UnitFileState"),
                         "changed_since_start": bool(started and newest > started)}
    return {"units": out}


def tree_checksum(req):
    """sha256 over sorted relative paths and contents (haflow.fsutil.tree_checksum, the same)."""
    folder = req["path"]
    if not os.path.isdir(folder):
        return {"checksum": None}
    files = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        linked = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        for name in [f for f in filenames if not f.endswith(".pyc")] + linked:
            path = os.path.join(dirpath, name)
            files[os.path.relpath(path, folder)] = path
    h = hashlib.sha256()
    for rel in sorted(files, key=lambda r: r.split(os.sep)):
        p = files[rel]
        body = b"link:" + os.readlink(p).encode() if os.path.islink(p) else open(p, "rb").read()
        h.update(rel.encode() + b"\0" + body + b"\0")
    return {"checksum": h.hexdigest()}


def put_tree(req):
    """Unpack a folder next to `dest` under its version's name, then switch the `dest` link to
    it in one rename (readers see the old tree or the new one); older versions are removed."""
    link, version = req["dest"], req["version"]
    parent, name = os.path.dirname(link), os.path.basename(link)
    target = os.path.join(parent, "%s.%s" % (name, version))
    if os.path.islink(link) and os.readlink(link) == os.path.basename(target) and os.path.isdir(target):
        return {"changed": False}
    ids = _ids(req.get("owner"))
    os.makedirs(parent, exist_ok=True)
    if not os.path.isdir(target):
        tmp = os.path.join(parent, ".%s.tmp" % os.path.basename(target))
        shutil.rmtree(tmp, ignore_errors=True)
        with tarfile.open(fileobj=io.BytesIO(base64.b64decode(req["tar"]))) as tar:
            try:
                tar.extractall(tmp, filter="tar")
            except TypeError:  # Python < 3.11.4 has no filters; the archive is haflow's own
                tar.extractall(tmp)
        for dirpath, dirnames, filenames in os.walk(tmp):
            for n in [dirpath, *(os.path.join(dirpath, x) for x in dirnames + filenames)]:
                os.lchown(n, *ids)
        os.replace(tmp, target)
    new_link = os.path.join(parent, ".%s.link" % name)
    if os.path.lexists(new_link):
        os.unlink(new_link)
    os.symlink(os.path.basename(target), new_link)
    os.lchown(new_link, *ids)
    if os.path.isdir(link) and not os.path.islink(link):
        shutil.rmtree(link)
    os.replace(new_link, link)
    for old in os.listdir(parent):
        full = os.path.join(parent, old)
        if old.startswith(name + ".") and full != target and os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full, ignore_errors=True)
    return {"changed": True}


def user_exists(name):
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def group_exists(name):
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def accounts(req):
    return {"users": {u: user_exists(u) for u in req.get("users", [])},
            "groups": {g: group_exists(g) for g in req.get("groups", [])}}


def run(req):
    """A one-shot command as `user` (None: root), its environment given here rather than on a
    command line (it may hold passwords)."""
    user = req.get("user")
    kwargs = {}
    if user and user != "root":
        pw = pwd.getpwnam(user)
        kwargs = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
    try:
        r = subprocess.run(req["argv"], env=req["env"], cwd=req.get("cwd") or "/", capture_output=True, text=True,
                           timeout=req.get("timeout", 600), **kwargs)
    except subprocess.TimeoutExpired:
        return {"rc": 124, "output": "timed out after %ss" % req.get("timeout", 600)}
    return {"rc": r.returncode, "output": r.stdout + r.stderr}


def packages(req):
    """Installed packages (dpkg), and the systemd units a set of packages ships."""
    r = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${db:Status-Status}\n"], capture_output=True, text=True)
    installed = sorted(line.split()[0] for line in r.stdout.splitlines() if line.endswith(" installed"))
    shipped = {}
    for pkg in req.get("units_of", []):
        files = subprocess.run(["dpkg", "-L", pkg], capture_output=True, text=True).stdout.splitlines()
        shipped[pkg] = sorted(os.path.basename(f) for f in files
                              if "/systemd/system/" in f and f.endswith((".service", ".socket")) and "@" not in f
                              and os.path.dirname(f).endswith("/systemd/system"))
    return {"installed": installed, "units": shipped}


def listdir(req):
    path = req["path"]
    return {"files": sorted(os.listdir(path)) if os.path.isdir(path) else None,
            "markers": {m: open(m).read() if os.path.exists(m) else None for m in req.get("markers", [])}}


VERBS = {"run": run, "packages": packages, "listdir": listdir, "facts": facts, "apply": apply, "units": units, "tree_checksum": tree_checksum, "put_tree": put_tree,
         "accounts": accounts}

if __name__ == "__main__":
    request = json.loads(sys.stdin.read() or "{}")
    try:
        answer = VERBS[request["verb"]](request)
    except Exception as e:  # one line back to the caller, which names the host and the step
        answer = {"error": "%s: %s" % (type(e).__name__, e)}
    sys.stdout.write(json.dumps(answer))
