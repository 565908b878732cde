"""``pack fleet BUNDLE --inventory hosts.ini --pubkey build.pub --out DIR``: an Ansible playbook and role that
roll one verified bundle out to many offline servers.

Why a generated directory and not an ``ansible/`` directory inside every bundle: a bundle is signed and holds
nothing but what MANIFEST.json lists (the installer refuses unlisted files), and the inventory, the batch size
and the per-host ports are the site's, not the build's. So the playbook is made on the admin side for a bundle
that is already built and signed, can be made again for any bundle (or inventory) without re-signing, and
carries the bundle's hashes from its verified MANIFEST.json.

What is written (everything static is copied from ``packager/fleet/ansible/``):

    ansible.cfg  site.yml  rollback.yml  hosts.ini (the inventory given)
    group_vars/all/llm_bundle.yml      the bundle's facts: name, version, every file's size and sha256, where
                                       it goes on the hosts, the bootstrap Python, the key
    roles/llm_bundle/tasks/*.yml, templates/overrides.json.j2
    roles/llm_bundle/files/bootstrap.sh  the bundle's runtime/*.tar.gz (base64) + its sha256: the targets have
                                       no Python, Ansible's `script` unpacks this one, checked, first
    filter_plugins/llm_fleet.py        the fleet preflight table (a copy of packager/fleet/table.py)
    keys/<name>.pub                    the trusted build key
"""

from __future__ import annotations

import base64
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import yaml

from installer.bundle import MANIFEST_NAME, SIGNATURE_NAME, Bundle, overrides, sha256_file
from installer.bundle.signature import key_fingerprint
from installer.errors import UsageError
from packager.fleet import inventory as inv_mod

STATIC = Path(__file__).with_name("ansible")
FLEET_DIR = "/var/lib/llm-fleet"


@dataclass
class FleetResult:
    out: Path
    bundle: str
    version: str
    hosts: list[str]
    overrides: dict[str, dict] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"out": str(self.out), "bundle": self.bundle, "version": self.version, "hosts": self.hosts,
                "overrides": self.overrides, "files": self.files}


def generate(bundle_dir: Path, inventory: Path, pubkey: Path, out: Path, *, bundle_src: str | None = None
             ) -> FleetResult:
    """Verify the bundle (signature and every hash), check every host's overrides, write the playbook."""
    b = Bundle.load(bundle_dir)
    try:
        key = pubkey.read_bytes()
    except OSError as e:
        raise UsageError(f"--pubkey {pubkey}: cannot read it ({e.strerror or e})") from e
    b.check_signature([key])
    _verify_files(b)
    if b.records is None or b.records.runtime is None:
        raise UsageError(f"{b.root}: the bundle carries no Python runtime (a model-only bundle)",
                         hint="roll out a bundle with an environment: its runtime is the hosts' Python")
    inv = inv_mod.load(inventory)
    hosts = inv.members(inv_mod.GROUP)
    if not hosts:
        raise UsageError(f"--inventory {inventory}: no hosts in the group [{inv_mod.GROUP}]",
                         hint=f"list the servers under [{inv_mod.GROUP}] (or make it a parent with "
                              f"[{inv_mod.GROUP}:children])")
    services = [s.name for s in b.records.services]
    per_host, problems = {}, []
    spanning = [s for s in b.records.services if s.multi_node]
    nodes: dict[str, dict] = {}
    for s in spanning[:1]:  # the hosts' parts in it, from the inventory groups (one such service per bundle)
        nodes, problems = inv_mod.cluster_nodes(inv, hosts, s.name, s.nodes)
    for h in hosts:
        try:
            ov = inv_mod.host_overrides(inv.host_vars(h), services, host=h)
            if h in nodes:
                ov["services"].setdefault(spanning[0].name, {})["node"] = nodes[h]
            overrides.apply(b.manifest, ov, source=f"host {h}")
            per_host[h] = ov
        except UsageError as e:
            problems.append(e.message)
    if problems:
        raise UsageError("the inventory's per-host overrides would be refused by the installer:\n  "
                         + "\n  ".join(problems), hint="fix these host variables (docs/fleet.md)")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "site.yml").is_file():
        raise UsageError(f"--out {out}: exists and is not a playbook pack fleet wrote",
                         hint="choose an empty or new directory")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(STATIC, out, dirs_exist_ok=True)
    shutil.copyfile(inventory, out / "hosts.ini")
    (out / "keys").mkdir(exist_ok=True)
    (out / "keys" / "build.pub").write_bytes(key)
    (out / "filter_plugins").mkdir(exist_ok=True)
    shutil.copyfile(Path(__file__).with_name("table.py"), out / "filter_plugins" / "llm_fleet.py")
    files_dir = out / "roles" / "llm_bundle" / "files"
    files_dir.mkdir(parents=True, exist_ok=True)
    rt = b.artifact(b.records.runtime.artifact)
    py = PurePosixPath(b.records.runtime.python or "bin/python3").as_posix()
    if rt.provided:  # a delta bundle: the hosts' Python is the runtime their earlier install kept
        (files_dir / "bootstrap.sh").write_text(bootstrap_from_installed(rt.sha256, py))
    else:
        (files_dir / "bootstrap.sh").write_text(bootstrap_script(b.path_of(rt).read_bytes(), rt.sha256, py))
    gv = out / "group_vars" / "all"
    gv.mkdir(parents=True, exist_ok=True)
    (gv / "llm_bundle.yml").write_text(group_vars(b, key, py, rt.sha256, bundle_src or str(b.root.resolve())))
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    return FleetResult(out, b.name, b.version, hosts, per_host, written)


def _verify_files(b: Bundle) -> None:
    from installer.errors import IntegrityError

    extra = b.unlisted_files()
    if extra:
        raise UsageError(f"{b.root}: file(s) not listed in {MANIFEST_NAME}: {', '.join(extra[:5])}",
                         hint="roll out the bundle as pack build wrote it (pack verify)")
    for a in b.artifacts:
        p = b.path_of(a)
        digest, size = sha256_file(p)
        if digest != a.sha256 or size != a.size:
            raise IntegrityError(a.path, expected=a.sha256, actual=digest)


def group_vars(b: Bundle, key: bytes, py: str, rt_sha: str, src: str) -> str:
    arts = [{"path": a.path, "size": a.size, "sha256": a.sha256} for a in b.artifacts]
    for name, data in ((MANIFEST_NAME, b.manifest_bytes), (SIGNATURE_NAME, b.signature or b"")):
        if name == SIGNATURE_NAME and b.signature is None:
            continue
        import hashlib

        arts.append({"path": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    dirs = sorted({str(PurePosixPath(a["path"]).parent) for a in arts} - {"."})
    all_dirs = sorted({str(p) for d in dirs for p in [PurePosixPath(d), *PurePosixPath(d).parents]} - {"."})
    doc = {
        "llm_bundle_name": b.name,
        "llm_bundle_version": b.version,
        "llm_bundle_services": [s.name for s in b.records.services] if b.records else [],
        # the service that spans nodes: each host's part comes from [llm_ray_head] / [llm_ray_workers]
        "llm_cluster_service": next((s.name for s in b.records.services if s.multi_node), "") if b.records else "",
        "llm_bundle_src": src,
        "llm_fleet_dir": FLEET_DIR,
        "llm_bundle_dest": "{{ llm_fleet_dir }}/bundles/" + f"{b.name}-{b.version}",
        "llm_python_dir": "{{ llm_fleet_dir }}/python/" + rt_sha[:16],
        "llm_python": "{{ llm_python_dir }}/" + py,
        "ansible_python_interpreter": "{{ llm_python }}",
        "llm_pubkey_src": "{{ playbook_dir }}/keys/build.pub",
        "llm_pubkey": "{{ llm_fleet_dir }}/keys/" + key_fingerprint(key) + ".pub",
        "llm_overrides_file": "{{ llm_fleet_dir }}/overrides/" + f"{b.name}.json",
        "llm_preflight_policy": "stop",
        "llm_health_timeout": 900,
        "llm_enable": True,
        "llm_artifact_dirs": all_dirs,
        "llm_artifacts": arts,
    }
    head = ("# written by `pack fleet` from the verified MANIFEST.json of "
            f"{b.name} {b.version}; host variables override the settings (llm_preflight_policy: stop|skip, "
            "llm_health_timeout, llm_enable, llm_fleet_dir); -e llm_serial=N sets the batch size\n")
    return head + yaml.safe_dump(doc, sort_keys=False, width=120)


def bootstrap_from_installed(sha256: str, py: str) -> str:
    """The bootstrap of a delta bundle (it leaves the runtime to the hosts): a copy of the runtime an earlier
    install verified and kept under /opt/llm/runtime/<sha256[:16]> (named by that archive's sha256), or a
    clear refusal on a host that lacks it (``LLM_FLEET_ROOT`` prefixes the path, for tests)."""
    return f"""#!/bin/bash
# written by `pack fleet` for a delta bundle: the hosts' Python is the installer runtime an earlier install kept.
# usage: bootstrap.sh DIR
set -euo pipefail
dest=$1
py={json.dumps(py)}
kept="${{LLM_FLEET_ROOT:-}}/opt/llm/runtime/{sha256[:16]}"
if [ -x "$dest/$py" ]; then echo "present: $dest/$py"; exit 0; fi
if [ -L "$kept" ] || [ ! -x "$kept/$py" ]; then
    echo "error: this delta bundle leaves the installer runtime {sha256[:16]} to the host, and $kept is not" \
        "there: install the full bundle on this host first (pack fleet of the bundle built without --against)" >&2
    exit 1
fi
mkdir -p -- "$(dirname -- "$dest")"
tmp=$(mktemp -d "$(dirname -- "$dest")/.boot.XXXXXX")
trap 'rm -rf -- "$tmp"' EXIT
cp -a -- "$kept" "$tmp/rt"
"$tmp/rt/$py" -I -c 'import json, zipfile, hashlib'
mv -T -- "$tmp/rt" "$dest"
echo "installed: $dest/$py (the runtime kept by an earlier install)"
"""


def bootstrap_script(runtime: bytes, sha256: str, py: str) -> str:
    """A bash script (bash, coreutils, tar, gzip) that unpacks the runtime into DIR after checking its sha256."""
    payload = base64.encodebytes(runtime).decode("ascii")
    return f"""#!/bin/bash
# written by `pack fleet`: the bundle's Python runtime for Ansible on a host that has no Python.
# usage: bootstrap.sh DIR   (the runtime's sha256 is MANIFEST.json's; nothing is kept unless it matches)
set -euo pipefail
dest=$1
want={sha256}
py={json.dumps(py)}
if [ -x "$dest/$py" ]; then echo "present: $dest/$py"; exit 0; fi
mkdir -p -- "$(dirname -- "$dest")"
tmp=$(mktemp -d "$(dirname -- "$dest")/.boot.XXXXXX")
trap 'rm -rf -- "$tmp"' EXIT
base64 -d >"$tmp/runtime.tar.gz" <<'LLM_FLEET_PAYLOAD'
{payload}LLM_FLEET_PAYLOAD
got=$(sha256sum "$tmp/runtime.tar.gz" | cut -d' ' -f1)
if [ "$got" != "$want" ]; then
    echo "error: the runtime's sha256 is $got, MANIFEST.json lists $want: regenerate the playbook (pack fleet)" >&2
    exit 1
fi
mkdir "$tmp/rt"
tar -xzf "$tmp/runtime.tar.gz" -C "$tmp/rt" --no-same-owner
if ! "$tmp/rt/$py" -I -c 'import json, zipfile, hashlib'; then
    echo "error: the bundle's Python does not run here (architecture, glibc?)" >&2
    exit 1
fi
chmod 755 "$tmp/rt"
mv -T -- "$tmp/rt" "$dest"
echo "installed: $dest/$py"
"""
