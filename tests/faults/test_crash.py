"""R4 crash consistency: the installer killed with SIGKILL at seeded random points of a first install and of
an upgrade (``--root`` staging trees), then checked and re-run.

The kill points are the installer's own durable steps (``LLM_PACK_CRASH_AT=N``: installer/fsutil.py kills
the process with SIGKILL at its Nth write / rename / link swap / fsync'd record), counted first with
``LLM_PACK_CRASH_LOG``. After each kill: the version that was active before (or nothing, for a first install)
or the new one -- never a mix -- is what the units use, it is intact (every file hashes as its MANIFEST says),
the state agrees with the units, and a re-run converges to exactly the tree of an uninterrupted install.
"""
# ruff: noqa: F811  (pytest fixtures imported from other modules are redefined as parameters)

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
from pathlib import Path

import pytest

from installer.deploy.placement import Installer
from tests.conda.fixtures import built_env, conda_channel, env_work, wheel_dir  # noqa: F401
from tests.installer_fixtures import (
    INSTALLER_PKG,
    BundleSpec,
    env_parts,
    keys,  # noqa: F401
    make_bundle,
    run_command,
    service,
    t1_parts,  # noqa: F401
    tiny_model,
    tree_snapshot,
)

pytestmark = pytest.mark.timeout(1500)
POINTS = 30
SEED = 9


def run(root: Path, bundle: Path, keys, *, crash_at: int = 0, log: Path | None = None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_PACK_CRASH")}
    if crash_at:
        env["LLM_PACK_CRASH_AT"] = str(crash_at)
    if log is not None:
        env["LLM_PACK_CRASH_LOG"] = str(log)
    return run_command(
        [sys.executable, "-m", "installer", "install", "--bundle", bundle, "--root", root, "--pubkey", keys.pub],
        check=False, timeout=300, env=env, cwd=INSTALLER_PKG.parent,
    )


@pytest.fixture(scope="module")
def crash_bundles(tmp_path_factory, t1_parts, built_env, keys):
    out = tmp_path_factory.mktemp("crash-bundles")
    t2 = env_parts(built_env, tmp_path_factory.mktemp("t2parts"), salt="v2")
    v1 = make_bundle(out, BundleSpec(version="1.0.0", env=t1_parts, models=[tiny_model(commit="1" * 40)],
                                     services=[service()]), keys)
    v2 = make_bundle(
        out,
        BundleSpec(
            version="2.0.0",
            env=t2,  # a new environment, a new model commit, one more instance, one served by repo id
            models=[tiny_model(commit="2" * 40), tiny_model("hfm", commit="a" * 40)],
            services=[service(), service("hfsvc", model="hfm", port=18432, serve_by="repo_id")],
        ),
        keys,
    )
    return {"v1": v1, "v2": v2}


def manifest(bundle: Path) -> dict:
    return json.loads((bundle / "MANIFEST.json").read_text())


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def serving(root: Path, name: str = "demo") -> str | None:
    """The bundle id the units use: the line's switch link (every instance's env file goes through it)."""
    link = root / "etc/llm/lines" / name
    return Path(os.readlink(link)).name if link.is_symlink() else None


def check_consistent(root: Path, bundles: dict, allowed: set[str | None]) -> str | None:
    """The units, the state and the files agree on one version in ``allowed`` (a bundle key or None);
    that version is complete. Returns the key of the version found."""
    bid = serving(root)
    sp = root / "var/lib/llm/state.json"
    raw = json.loads(sp.read_text()) if sp.exists() else {"lines": {}, "bundles": {}}
    envs = sorted((root / "etc/llm").glob("*.env")) if (root / "etc/llm").is_dir() else []
    resolving = [p for p in envs if p.exists()]
    if bid is None:
        assert None in allowed, "nothing is active although a version was"
        assert not resolving, f"an instance is configured without an active version: {resolving}"
        assert not raw["lines"], "the state names an active version the units do not use"
        return None
    rec = raw["bundles"].get(bid)
    assert rec and rec["status"] == "installed", f"the units use {bid}, which the state does not record"
    key = next(k for k, b in bundles.items() if rec["version"] == manifest(b)["bundle"]["version"])
    assert key in allowed, f"{key} active, expected one of {allowed}"
    # the state as the installer reads it (its `active` follows the switch link) agrees with the units
    line = Installer(root, lambda s: None).state["lines"]["demo"]
    assert line["active"] == bid
    m = manifest(bundles[key])
    names = {s["name"] for s in m["services"]}
    assert {p.stem for p in resolving} == names, "instances configured != the active version's"
    from installer.service import parse_env_file

    for p in resolving:
        e = parse_env_file(p.read_text())
        assert e["LLM_BUNDLE_VERSION"] == m["bundle"]["version"]
        assert (root / e["LLM_PYTHON"].lstrip("/")).exists()
        drop = root / f"etc/systemd/system/llm@{p.stem}.service.d/devices.conf"
        assert drop.resolve().is_file()
    for env in m["environments"]:
        d = root / rec["envs"][env["name"]].lstrip("/")
        assert (d / ".llm-installed.json").is_file() and (d / "bin/python").exists()
    for model in m["models"]:
        d = root / rec["models"][model["name"]].lstrip("/")
        for f in model["files"]:
            assert _sha(d / f["path"]) == f["sha256"], f"{d / f['path']} is not what the MANIFEST lists"
    assert (root / "etc/systemd/system/llm@.service").is_file() and (root / "opt/llm/bin/llm-serve").is_file()
    return key


def comparable(root: Path) -> dict:
    """The tree without what legitimately differs between runs (timestamps and tokens in the state)."""
    snap = tree_snapshot(root)
    snap.pop("var/lib/llm/state.json", None)
    return snap


def state_shape(root: Path) -> dict:
    s = json.loads((root / "var/lib/llm/state.json").read_text())
    for rec in s["bundles"].values():
        rec.pop("installed_at", None)
        rec.pop("txn", None)
    s["dirs"] = sorted(s["dirs"])
    for line in s["lines"].values():
        line["unit_files"] = sorted(line["unit_files"])
    for obj in s["objects"].values():
        obj["users"] = sorted(obj["users"])
    return s


@pytest.mark.parametrize("scenario", ["first-install", "upgrade"])
def test_kill_9_at_random_points_then_rerun_converges(tmp_path, crash_bundles, keys, scenario):
    b = crash_bundles
    base = tmp_path / "base"
    (base / "etc").mkdir(parents=True)
    (base / "etc/hostname").write_text("server\n")
    if scenario == "upgrade":
        assert run(base, b["v1"], keys).returncode == 0
    before_key = check_consistent(base, b, {None, "v1"})
    target = "v1" if scenario == "first-install" else "v2"

    # the reference: the same install, uninterrupted; and how many durable steps it takes
    ref = tmp_path / "ref"
    shutil.copytree(base, ref, symlinks=True)
    log = tmp_path / "points.log"
    r = run(ref, b[target], keys, log=log)
    assert r.returncode == 0, r.stderr
    total = len(log.read_text().splitlines())
    ref_tree, ref_state = comparable(ref), state_shape(ref)
    # seeded random points over the whole install, plus always the last five (commit, switch, state, prune)
    points = sorted(
        set(random.Random(f"{SEED}-{scenario}").sample(range(1, total + 1), min(POINTS, total)))
        | set(range(max(1, total - 4), total + 1))
    )

    tried = converged = 0
    outcomes: dict[str | None, int] = {}
    for n in points:
        root = tmp_path / f"p{n}"
        shutil.copytree(base, root, symlinks=True)
        r = run(root, b[target], keys, crash_at=n)
        assert r.returncode == -9, f"point {n}/{total}: expected a SIGKILL, got {r.returncode}\n{r.stderr}"
        tried += 1
        found = check_consistent(root, b, {before_key, target})
        outcomes[found] = outcomes.get(found, 0) + 1
        r = run(root, b[target], keys)
        assert r.returncode == 0, f"re-run after a kill at point {n}: {r.stderr}"
        assert check_consistent(root, b, {target}) == target
        assert comparable(root) == ref_tree, f"point {n}: the re-run left a different tree"
        assert state_shape(root) == ref_state, f"point {n}: the re-run left a different state"
        converged += 1
        shutil.rmtree(root)
    print(f"R4 {scenario}: {total} durable steps; points tried {tried} / converged {converged}; "
          f"state right after the kill: {outcomes}")
    assert tried >= POINTS or tried == total
    assert converged == tried


@pytest.mark.slow
def test_switch_and_rollback_in_real_systemd(crash_bundles, keys, tmp_path):
    """In a booted, network-less systemd: the installer's units reach the active version through the one
    switch link (env file and drop-ins are symlinks, which systemd follows), an upgrade and a rollback each
    flip every instance at once, and an instance the older version lacks is gone after the rollback."""
    from devkit.nspawn import Container
    from devkit.nspawn.rootfs import ensure_rootfs
    from tests.nspawn.fixtures import require_nspawn

    require_nspawn()
    import zstandard  # the bundle's runtime brings it; here the host's copy stands in

    hostpy = Path(sys.base_prefix)
    env = {"LD_LIBRARY_PATH": "/opt/hostpy/lib", "PYTHONPATH": "/opt/src:/opt/zstd",
           "PYTHONDONTWRITEBYTECODE": "1"}
    binds = [(hostpy, "/opt/hostpy", True), (INSTALLER_PKG, "/opt/src/installer", True),
             (Path(zstandard.__file__).parent, "/opt/zstd/zstandard", True),
             (crash_bundles["v1"].parent, "/media/usb", True), (keys.pub.parent, "/keys", True)]

    def installer(c, *args):
        return c.run(["/opt/hostpy/bin/python3", "-m", "installer", *args], env=env, timeout=300).stdout

    def version(c, inst: str) -> str:
        from installer.service import parse_env_file

        return parse_env_file(c.run(["cat", f"/etc/llm/{inst}.env"]).stdout)["LLM_BUNDLE_VERSION"]

    with Container(ensure_rootfs(), binds=binds, name="llm-switch-test") as c:
        pub = f"/keys/{keys.pub.name}"
        installer(c, "install", "--bundle", f"/media/usb/{crash_bundles['v1'].name}", "--pubkey", pub)
        assert version(c, "tiny") == "1.0.0"
        drop = "/etc/systemd/system/llm@tiny.service.d/devices.conf"
        assert drop in c.show("llm@tiny.service", "DropInPaths")
        assert c.show("llm@tiny.service", "PrivateDevices") == "yes"
        installer(c, "install", "--bundle", f"/media/usb/{crash_bundles['v2'].name}", "--pubkey", pub)
        assert version(c, "tiny") == version(c, "hfsvc") == "2.0.0"
        assert "/opt/llm/hf-cache/demo-2.0.0-" in c.run(["cat", "/etc/llm/hfsvc.env"]).stdout
        assert c.show("llm@hfsvc.service", "LoadState") == "loaded"
        out = installer(c, "rollback")
        assert "2.0.0 -> 1.0.0" in out
        assert version(c, "tiny") == "1.0.0"
        assert c.run(["test", "-e", "/etc/llm/hfsvc.env"], check=False).returncode != 0
        # a new version that does not come up (this test env has no vLLM): switched back at once, and said
        r = c.run(["/opt/hostpy/bin/python3", "-m", "installer", "install", "--bundle",
                   f"/media/usb/{crash_bundles['v2'].name}", "--pubkey", pub, "--start", "--health-timeout", "20"],
                  env=env, timeout=300, check=False)
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert "failed its check after the switch" in r.stderr and "1.0.0" in r.stderr, r.stderr
        assert "rolling back to 1.0.0" in r.stdout
        assert version(c, "tiny") == "1.0.0"
        assert c.run(["test", "-e", "/etc/llm/hfsvc.env"], check=False).returncode != 0
        assert c.run(["test", "-e", "/opt/llm/models/hfm"], check=False).returncode != 0, "v2's files dropped"
        print(f"health rollback said: {r.stderr.strip().splitlines()[0]}")
        installer(c, "uninstall")
        left = c.run(["bash", "-c", "ls /opt/llm /etc/llm/lines /var/lib/llm 2>&1; true"]).stdout
        assert "No such file" in left and "demo" not in left, left
    print("R4 real systemd: install, upgrade, rollback, uninstall through the switch link")
