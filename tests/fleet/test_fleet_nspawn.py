"""A fleet rollout with real Ansible: three systemd-nspawn targets (no Python, sshd, a private bridge inside a
network namespace the test creates), ansible-core installed offline from the wheels `pack fleet --with-ansible`
wrote, the real vLLM CPU build serving on every host.

One sequence, few vLLM starts (each ~65-90 s here): the small-disk host h3 fails the preflight (policy stop:
nothing installed anywhere; policy skip: h1 and h2 installed, h3 left unchanged) -> h3 fixed, the rollout
finishes, all three answer a completion -> a second run changes nothing -> a dry run of the upgrade changes
nothing -> the upgrade to 1.0.1 in batches of one: h1 upgraded, h2's post-start check fails (a 1 s health
timeout for that host), h2 is back on 1.0.0 and the rollout stops before h3 -> rollback.yml on h1.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest

from tests.fleet.bundles import ensure_fleet_bundles
from tests.fleet.rig import PORTS, SMALL_DISK_HOST, fleet_rig
from tests.nspawn.fixtures import require_nspawn

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


def _unchanged(fleet, host: str) -> None:
    c = fleet.containers[host]
    assert c.run(["test", "-e", "/etc/llm"], check=False).returncode != 0, f"{host}: /etc/llm was created"
    assert c.run(["test", "-e", "/var/lib/llm"], check=False).returncode != 0, f"{host}: /var/lib/llm created"
    assert c.run(["ls", "-A", "/opt/llm"], check=False).stdout.strip() == "", f"{host}: /opt/llm written"
    assert c.run(["systemctl", "list-units", "--no-legend", "llm@*"]).stdout.strip() == ""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    require_nspawn()
    t0 = time.monotonic()
    bundles = ensure_fleet_bundles()
    t_bundles = time.monotonic() - t0
    work = Path(tmp_path_factory.mktemp("fleet"))
    with fleet_rig(work) as f:
        f.bundles = bundles
        f.timings = {"bundles (cached)": t_bundles, "rig": time.monotonic() - t0 - t_bundles}
        yield f
        print("\nfleet timings:", {k: round(v, 1) for k, v in f.timings.items()})
        for r in f.runs:
            print(f"  ansible-playbook {' '.join(r.args)}: {r.seconds:.1f} s rc={r.rc}")
    shutil.rmtree(work, ignore_errors=True)


def test_offline_ansible_then_rollout_upgrade_failure_and_rollback(fleet) -> None:
    f = fleet
    # -- the admin host: pack fleet writes the playbook and the ansible-core wheels; install them offline
    inv = f.inventory(f.work / "hosts.ini")
    t = time.monotonic()
    r = f.pack("fleet", f.bundles.v1, "--inventory", inv, "--pubkey", f.bundles.pub, "--out", f.work / "v1",
               "--with-ansible")
    assert r.returncode == 0, r.stderr
    assert "h1: overrides" in r.stdout and '"port": 8001' in r.stdout
    wheels = sorted(p.name for p in (f.work / "v1" / "wheels").glob("*.whl"))
    assert any(w.startswith("ansible_core-") for w in wheels), wheels
    # the offline install: inside the admin namespace, where nothing but the targets can be reached
    venv_python = Path(os.path.realpath(os.sys.executable))
    inst = f.in_admin(["env", f"PATH={venv_python.parent}:/usr/bin:/bin", "bash",
                       str(f.work / "v1" / "install-ansible.sh"), str(venv_python)], timeout=600)
    assert inst.returncode == 0, inst.stdout + inst.stderr
    f.ansible_bin = f.work / "v1" / ".ansible" / "bin"
    assert (f.ansible_bin / "ansible-playbook").is_file()
    f.timings["pack fleet + offline ansible install"] = time.monotonic() - t
    nothing = f.in_admin(["curl", "-s", "-m", "3", "http://1.1.1.1/"])
    assert nothing.returncode != 0, "the admin namespace must reach nothing but the targets"

    # -- 1. policy stop: h3's disk is too small -> the rollout stops before any install, everywhere
    run = f.playbook(f.work / "v1", "site.yml", "-e", "llm_preflight_policy=stop")
    table = run.preflight_table()
    print("\nfailed-host preflight (policy stop):\n" + table)
    assert run.rc != 0 and "rollout stopped before any install" in run.out
    assert f"{SMALL_DISK_HOST}" in table and "REFUSED" in table and "FAIL disk" in table, run.out[-4000:]
    assert "fleet preflight: 2 of 3 host(s) ready" in table
    for h in ("h1", "h2", "h3"):
        _unchanged(f, h)
    f.timings["1. preflight, policy stop"] = run.seconds

    # -- 2. policy skip: h1 and h2 installed in batches of one, h3 reported and left unchanged
    run = f.playbook(f.work / "v1", "site.yml", "-e", "llm_preflight_policy=skip")
    assert run.rc == 0, run.out[-6000:]
    print("\nfailed-host preflight (policy skip):\n" + run.preflight_table())
    _unchanged(f, SMALL_DISK_HOST)
    for h in ("h1", "h2"):
        assert f.active(h) == "1.0.0"
    f.timings["2. rollout h1+h2 (h3 refused)"] = run.seconds

    # -- 3. h3 gets its disk: the same playbook finishes the rollout; h1 and h2 change nothing
    f.containers[SMALL_DISK_HOST].run(["umount", "/opt/llm"])
    run = f.playbook(f.work / "v1", "site.yml")
    assert run.rc == 0, run.out[-6000:]
    recap = run.recap()
    assert recap["h1"]["changed"] == 0 and recap["h2"]["changed"] == 0 and recap["h3"]["changed"] > 0, recap
    f.timings["3. rollout h3"] = run.seconds
    for h in ("h1", "h2", "h3"):
        chat = f.completion(h)
        assert chat["model"] == "tiny" and chat["usage"]["completion_tokens"] > 0
        st = f.status(h)
        assert st["instances"][0]["port"] == PORTS[h] and st["instances"][0]["health"] == "healthy"

    # -- 4. idempotent: a second run reports nothing changed on any host
    run = f.playbook(f.work / "v1", "site.yml")
    assert run.rc == 0 and all(v["changed"] == 0 for v in run.recap().values()), run.recap()
    assert set(run.recap()) >= {"h1", "h2", "h3"}
    f.timings["4. second run (changed=0)"] = run.seconds

    # -- 5. the upgrade: a dry run first (--check changes nothing)
    inv2 = f.inventory(f.work / "hosts-v2.ini", extra={"h2": "llm_health_timeout=1"})
    r = f.pack("fleet", f.bundles.v2, "--inventory", inv2, "--pubkey", f.bundles.pub, "--out", f.work / "v2")
    assert r.returncode == 0, r.stderr
    shutil.copytree(f.work / "v1" / ".ansible", f.work / "v2" / ".ansible", symlinks=True)
    run = f.playbook(f.work / "v2", "site.yml", "--check")
    assert run.rc == 0, run.out[-6000:]
    assert all(f.active(h) == "1.0.0" for h in ("h1", "h2", "h3"))
    for h in ("h1", "h2", "h3"):
        assert f.containers[h].run(["test", "-e", "/var/lib/llm-fleet/bundles/tiny-demo-1.0.1"],
                                   check=False).returncode != 0, f"{h}: --check copied the bundle"
    f.timings["5. upgrade --check"] = run.seconds

    # -- 6. the upgrade in batches of one: h1 upgraded; h2 fails its post-start check -> back on 1.0.0 and
    #       the rollout stops; h3 is not touched
    run = f.playbook(f.work / "v2", "site.yml")
    print("\nupgrade with a failing host:\n" + run.out[-3000:])
    assert run.rc != 0
    assert re.search(r"h2: install of tiny-demo 1\.0\.1\s+failed", run.out), run.out[-4000:]
    assert f.active("h1") == "1.0.1" and f.active("h2") == "1.0.0" and f.active("h3") == "1.0.0"
    assert "install | install.sh" not in _tasks_on(run.out, "h3")
    f.timings["6. upgrade (h1 ok, h2 fails -> stop)"] = run.seconds
    f.completion("h1")

    # -- 7. rollback.yml on h1 (--limit): back to 1.0.0, serving
    run = f.playbook(f.work / "v2", "rollback.yml", "--limit", "h1")
    assert run.rc == 0, run.out[-4000:]
    assert f.active("h1") == "1.0.0"
    f.completion("h1")
    f.timings["7. rollback h1"] = run.seconds


def _tasks_on(out: str, host: str) -> str:
    """The names of the tasks that reported a result for ``host`` (changed/ok/failed lines)."""
    tasks, current = [], ""
    for line in out.splitlines():
        if line.startswith("TASK ["):
            current = line
        elif line.startswith(("ok: [", "changed: [", "failed: [", "fatal: [")) and f"[{host}]" in line:
            tasks.append(current)
    return "\n".join(tasks)
