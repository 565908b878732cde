"""`pack fleet`: inventory parsing, per-host overrides (checked by the installer's rules before any rollout, and
the role's template agreeing with them under real Ansible), the fleet preflight table, the generated playbook
(real ansible-playbook --syntax-check and --list-tasks/--list-tags), the bootstrap script on a bare directory."""
# ruff: noqa: F811  (pytest fixtures imported from other modules are redefined as parameters)

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from installer.bundle import Bundle
from installer.errors import UsageError
from packager.fleet import inventory, table
from packager.fleet.generate import generate
from tests.conda.fixtures import built_env, conda_channel, env_work, wheel_dir  # noqa: F401
from tests.installer_fixtures import BundleSpec, keys, make_bundle, service, t1_parts, tiny_model  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
ANSIBLE = Path(sys.executable).parent

INI = """# a fleet
[llm_fleet]
gpu1 ansible_host=10.0.0.1 llm_port=8001 llm_gpus=0,1
gpu2 ansible_host=10.0.0.2 llm_host="0.0.0.0" llm_api_key_file=/etc/llm/keys/tiny.key
gpu3 ansible_host=10.0.0.3 llm_overrides='{"services": {"tiny": {"gpu_memory_utilization": 0.8}}}'

[edge]
gpu4 llm_gpus=[2]

[all_gpus:children]
llm_fleet
edge

[llm_fleet:vars]
ansible_user=root
llm_serial=2
"""


def test_inventory_groups_vars_and_children() -> None:
    inv = inventory.parse(INI)
    assert inv.members("llm_fleet") == ["gpu1", "gpu2", "gpu3"]
    assert inv.members("all_gpus") == ["gpu1", "gpu2", "gpu3", "gpu4"]
    hv = inv.host_vars("gpu1")
    assert hv["llm_port"] == 8001 and hv["llm_gpus"] == (0, 1) and hv["ansible_user"] == "root"
    assert inv.host_vars("gpu2")["llm_host"] == "0.0.0.0"
    assert inventory.host_overrides(inv.host_vars("gpu1"), ["tiny"], host="gpu1") == \
        {"services": {"tiny": {"port": 8001, "gpus": [0, 1]}}}
    assert inventory.host_overrides(inv.host_vars("gpu3"), ["tiny"], host="gpu3") == \
        {"services": {"tiny": {"gpu_memory_utilization": 0.8}}}
    assert inventory.host_overrides(inv.host_vars("gpu4"), ["tiny"], host="gpu4") == \
        {"services": {"tiny": {"gpus": [2]}}}


@pytest.mark.parametrize(("text", "words"), [
    ("[llm_fleet\nh1\n", "not a section header"),
    ("[llm_fleet]\nweb[1:3]\n", "host ranges"),
    ("[llm_fleet]\nh1 port\n", "expected key=value"),
    ("[llm_fleet]\nh1 x='open\n", "close the quote"),
    ("[llm_fleet:vars]\nnovalue\n", "expected key=value"),
])
def test_inventory_errors_name_the_line(text: str, words: str) -> None:
    with pytest.raises(UsageError, match=words) as e:
        inventory.parse(text, source="hosts.ini")
    assert "hosts.ini:" in e.value.message


def test_host_overrides_refuse_bad_values() -> None:
    for hv, words in (({"llm_port": "80a"}, "not a whole number"), ({"llm_gpus": "0,x"}, "not a whole number"),
                      ({"llm_overrides": "{nope"}, "not JSON"), ({"llm_port": 1}, "llm_service=NAME")):
        with pytest.raises(UsageError, match=words):
            inventory.host_overrides(hv, ["a", "b"] if "llm_port" in hv and hv["llm_port"] == 1 else ["a"],
                                     host="h")


def _check(status: str, name: str, detail: str, remedy: str = "", subject: str = "") -> dict:
    return {"status": status, "name": name, "detail": detail, "remedy": remedy, "subject": subject}


def test_preflight_table_one_row_per_host_then_the_problems() -> None:
    ok = json.dumps({"ok": True, "checks": [_check("PASS", "glibc", "2.36"), _check("WARN", "gpu", "none")]})
    bad = json.dumps({"ok": False, "checks": [_check("PASS", "glibc", "2.36"),
                                              _check("FAIL", "disk", "/opt/llm: needs 3.6 GiB, 0.4 GiB free",
                                                     "free space on /opt/llm")]})
    results = {"h1": table.parse_check(ok), "h3": table.parse_check(bad),
               "h2": table.parse_check("", "bundle x: ...\nerror: MANIFEST.json.sig: no trusted key", 1),
               "h4": None, "h5": {"ok": False, "checks": [], "error": "", "not_run": "check mode: would copy"}}
    text = table.render(results)
    lines = text.splitlines()
    assert lines[0].split() == ["HOST", "PASS", "WARN", "FAIL", "RESULT", "FIRST", "PROBLEM"]
    assert lines[1].split()[:5] == ["h1", "1", "1", "0", "READY"]
    assert lines[2].split()[:5] == ["h2", "-", "-", "-", "ERROR"] or lines[2].split()[:5] == ["h2", "0", "0", "0",
                                                                                              "ERROR"]
    assert "no trusted key" in lines[2]
    assert lines[3].split()[:5] == ["h3", "1", "0", "1", "REFUSED"] and "FAIL disk" in lines[3]
    assert "NOT RUN" in lines[4]
    assert lines[5].split()[:5] == ["h5", "0", "0", "0", "NOT"] and "check mode: would copy" in lines[5]
    assert "fleet preflight: 1 of 5 host(s) ready" in text
    assert "h3: FAIL disk: /opt/llm: needs 3.6 GiB" in text and "remedy: free space on /opt/llm" in text
    assert table.parse_check("not json", "", 2)["ok"] is False


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, t1_parts, keys) -> Path:
    out = tmp_path_factory.mktemp("fleet-bundle")
    return make_bundle(out, BundleSpec(version="1.0.0", env=t1_parts, models=[tiny_model()],
                                       services=[service()]), keys)


def test_generate_checks_every_host_and_writes_a_playbook_ansible_accepts(tmp_path, bundle, keys) -> None:
    inv = tmp_path / "hosts.ini"
    inv.write_text(INI)
    res = generate(bundle, inv, keys.pub, tmp_path / "fleet")
    assert res.hosts == ["gpu1", "gpu2", "gpu3"]
    assert res.overrides["gpu1"] == {"services": {"tiny": {"port": 8001, "gpus": [0, 1]}}}
    out = tmp_path / "fleet"
    gv = yaml.safe_load((out / "group_vars/all/llm_bundle.yml").read_text())
    b = Bundle.load(bundle)
    listed = {a["path"]: a["sha256"] for a in gv["llm_artifacts"]}
    assert {a.path: a.sha256 for a in b.artifacts}.items() <= listed.items()
    assert {"MANIFEST.json", "MANIFEST.json.sig"} <= set(listed)
    assert gv["ansible_python_interpreter"] == "{{ llm_python }}"
    for args in (["--syntax-check"], ["--list-tasks"], ["--list-tags"]):
        for pb in ("site.yml", "rollback.yml"):
            r = subprocess.run([ANSIBLE / "ansible-playbook", pb, *args], cwd=out, capture_output=True,
                               text=True, check=False, env={"PATH": f"{ANSIBLE}:/usr/bin:/bin",
                                                            "HOME": str(tmp_path), "ANSIBLE_HOME": str(tmp_path)})
            assert r.returncode == 0, r.stdout + r.stderr
    tags = subprocess.run([ANSIBLE / "ansible-playbook", "site.yml", "--list-tags"], cwd=out, capture_output=True,
                          text=True, check=True, env={"PATH": f"{ANSIBLE}:/usr/bin:/bin", "HOME": str(tmp_path),
                                                      "ANSIBLE_HOME": str(tmp_path)}).stdout
    for t in ("copy", "preflight", "install"):
        assert t in tags

    def listed(*args: str) -> str:
        return subprocess.run([ANSIBLE / "ansible-playbook", "site.yml", "--list-tasks", *args], cwd=out,
                              capture_output=True, text=True, check=True,
                              env={"PATH": f"{ANSIBLE}:/usr/bin:/bin", "HOME": str(tmp_path),
                                   "ANSIBLE_HOME": str(tmp_path)}).stdout

    only_install = listed("--tags", "install")  # the install needs the copy and the preflight: they come along
    assert "install | install.sh" in only_install and "preflight | install.sh --check" in only_install
    only_pre = listed("--tags", "copy,preflight")  # carry and check, install nothing
    assert "preflight | the fleet" in only_pre and "install | install.sh" not in only_pre
    assert "bootstrap | unpack" in only_pre  # the bootstrap always runs


def test_the_roles_template_gives_what_pack_fleet_checked(tmp_path, bundle, keys) -> None:
    """The role renders install.sh --overrides from the inventory (Jinja, real Ansible); pack fleet checked
    the same variables in Python: both must agree for every host."""
    inv = tmp_path / "hosts.ini"
    inv.write_text(INI)
    res = generate(bundle, inv, keys.pub, tmp_path / "fleet")
    tpl = "roles/llm_bundle/templates/overrides.json.j2"
    r = subprocess.run([ANSIBLE / "ansible", "llm_fleet", "-m", "ansible.builtin.debug", "-a",
                        f"msg={{{{ lookup('template', '{tpl}') | from_json }}}}", "-o"],
                       cwd=tmp_path / "fleet", capture_output=True, text=True, check=False,
                       env={"PATH": f"{ANSIBLE}:/usr/bin:/bin", "HOME": str(tmp_path), "ANSIBLE_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stdout + r.stderr
    got = {}
    for line in r.stdout.splitlines():  # -o: "HOST | SUCCESS => {json}"
        host, _, doc = line.partition(" | SUCCESS => ")
        got[host] = json.loads(doc)["msg"]
    assert got == res.overrides


def test_generate_refuses_overrides_the_installer_would_refuse(tmp_path, bundle, keys) -> None:
    inv = tmp_path / "hosts.ini"
    inv.write_text("[llm_fleet]\nh1 llm_port=70000\nh2 llm_api_key_file=relative/key\nh3\n")
    r = subprocess.run([sys.executable, "-m", "packager.cli", "fleet", str(bundle), "-i", str(inv), "--pubkey",
                        str(keys.pub), "--out", str(tmp_path / "f")], capture_output=True, text=True, check=False,
                       cwd=ROOT)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "host h1" in r.stderr and "port" in r.stderr and "host h2" in r.stderr and "api_key_file" in r.stderr
    assert not (tmp_path / "f").exists()
    other = tmp_path / "other.pub"
    shutil.copyfile(keys.pub, other)
    inv.write_text("[other]\nh1\n")
    r = subprocess.run([sys.executable, "-m", "packager.cli", "fleet", str(bundle), "-i", str(inv), "--pubkey",
                        str(keys.pub), "--out", str(tmp_path / "f")], capture_output=True, text=True, check=False,
                       cwd=ROOT)
    assert r.returncode == 2 and "no hosts in the group [llm_fleet]" in r.stderr, r.stderr


def test_bootstrap_script_checks_the_runtime_then_unpacks_it(tmp_path, bundle, keys) -> None:
    inv = tmp_path / "hosts.ini"
    inv.write_text("[llm_fleet]\nh1\n")
    generate(bundle, inv, keys.pub, tmp_path / "fleet")
    script = tmp_path / "fleet/roles/llm_bundle/files/bootstrap.sh"
    gv = yaml.safe_load((tmp_path / "fleet/group_vars/all/llm_bundle.yml").read_text())
    py = gv["llm_python"].split("}}/", 1)[1]
    dest = tmp_path / "host" / "python"
    r = subprocess.run(["bash", script, dest], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    out = subprocess.run([dest / py, "-c", "import json, zipfile, sys; print(sys.version_info[:2])"],
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("(3, ")
    again = subprocess.run(["bash", script, dest], capture_output=True, text=True, check=True)
    assert again.stdout.startswith("present:")
    # a damaged payload is refused and nothing is kept
    text = script.read_text()
    i = text.index("<<'LLM_FLEET_PAYLOAD'\n") + 100
    bad = tmp_path / "bad.sh"
    bad.write_text(text[:i] + ("B" if text[i] != "B" else "C") + text[i + 1:])
    dest2 = tmp_path / "host2" / "python"
    r = subprocess.run(["bash", bad, dest2], capture_output=True, text=True, check=False)
    assert r.returncode != 0 and "sha256" in r.stderr and not dest2.exists()
    assert list(dest2.parent.iterdir()) == []


def test_a_delta_bundles_bootstrap_uses_the_runtime_the_host_kept(tmp_path, bundle, keys, t1_parts) -> None:
    """A delta leaves the runtime to the hosts: `pack fleet` writes a bootstrap that copies the one an earlier
    install kept (/opt/llm/runtime/<sha[:16]>) and refuses, naming it, on a host that lacks it."""
    from packager.against import load_against

    delta = make_bundle(tmp_path / "d", BundleSpec(version="1.0.1", env=t1_parts, models=[tiny_model()],
                                                   services=[service()]), keys, against=load_against([bundle]))
    assert Bundle.load(delta).artifact(Bundle.load(delta).records.runtime.artifact).provided == "target"
    inv = tmp_path / "hosts.ini"
    inv.write_text("[llm_fleet]\nh1\n")
    generate(delta, inv, keys.pub, tmp_path / "fleet")
    script = tmp_path / "fleet/roles/llm_bundle/files/bootstrap.sh"
    assert "LLM_FLEET_PAYLOAD" not in script.read_text()  # nothing of the runtime travels
    gv = yaml.safe_load((tmp_path / "fleet/group_vars/all/llm_bundle.yml").read_text())
    py = gv["llm_python"].split("}}/", 1)[1]
    assert all(a["path"] != "runtime/t1.tar.gz" for a in gv["llm_artifacts"])
    host = tmp_path / "host"
    env = {"PATH": "/usr/bin:/bin", "LLM_FLEET_ROOT": str(host)}
    r = subprocess.run(["bash", script, tmp_path / "py"], capture_output=True, text=True, env=env, check=False)
    assert r.returncode == 1 and "leaves the installer runtime" in r.stderr and "install the full bundle" in r.stderr
    # the host as an earlier install of the full bundle left it
    rt_sha = Bundle.load(delta).artifact("runtime/t1.tar.gz").sha256
    kept = host / "opt/llm/runtime" / rt_sha[:16]
    kept.mkdir(parents=True)
    subprocess.run(["tar", "-xzf", t1_parts.runtime, "-C", kept], check=True)
    r = subprocess.run(["bash", script, tmp_path / "py"], capture_output=True, text=True, env=env, check=False)
    assert r.returncode == 0 and "kept by an earlier install" in r.stdout, r.stderr
    out = subprocess.run([tmp_path / "py" / py, "-c", "import sys; print(sys.version_info[0])"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "3"


CLUSTER_INI = """[llm_fleet]
n1 ansible_host=10.0.0.1
n2 ansible_host=10.0.0.2 llm_node_interface=ib0
n3 ansible_host=10.0.0.3 llm_node_address=10.9.0.3

[llm_ray_head]
n1 llm_node_address=10.9.0.1

[llm_ray_workers]
n2
n3
"""


@pytest.fixture(scope="module")
def cluster_bundle(tmp_path_factory, t1_parts, keys) -> Path:
    out = tmp_path_factory.mktemp("fleet-cluster-bundle")
    return make_bundle(out, BundleSpec(name="big", version="1.0.0", env=t1_parts, models=[tiny_model()],
                                       services=[service(nodes=3, pipeline_parallel_size=3)]), keys)


def test_cluster_roles_come_from_the_inventory_groups(tmp_path, cluster_bundle, keys) -> None:
    """A service that spans nodes: [llm_ray_head] is the head, [llm_ray_workers] its workers (head_address from
    the head's llm_node_address); the role's template (real Ansible) gives the same; workers are installed
    before the head."""
    inv = tmp_path / "hosts.ini"
    inv.write_text(CLUSTER_INI)
    res = generate(cluster_bundle, inv, keys.pub, tmp_path / "fleet")
    assert res.overrides == {
        "n1": {"services": {"tiny": {"node": {"role": "head", "address": "10.9.0.1"}}}},
        "n2": {"services": {"tiny": {"node": {"role": "worker", "head_address": "10.9.0.1", "interface": "ib0"}}}},
        "n3": {"services": {"tiny": {"node": {"role": "worker", "head_address": "10.9.0.1",
                                               "address": "10.9.0.3"}}}},
    }
    out = tmp_path / "fleet"
    env = {"PATH": f"{ANSIBLE}:/usr/bin:/bin", "HOME": str(tmp_path), "ANSIBLE_HOME": str(tmp_path)}
    tpl = "roles/llm_bundle/templates/overrides.json.j2"
    r = subprocess.run([ANSIBLE / "ansible", "llm_fleet", "-m", "ansible.builtin.debug", "-a",
                        f"msg={{{{ lookup('template', '{tpl}') | from_json }}}}", "-o"],
                       cwd=out, capture_output=True, text=True, check=False, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    got = {h: json.loads(doc)["msg"] for h, _, doc in (ln.partition(" | SUCCESS => ") for ln in r.stdout.splitlines())}
    assert got == res.overrides
    plays = subprocess.run([ANSIBLE / "ansible-playbook", "site.yml", "--list-hosts"], cwd=out, capture_output=True,
                           text=True, check=True, env=env).stdout
    rolling, head = plays.split("rolling install")[1].split("the Ray head")
    assert "n2" in rolling and "n3" in rolling and "n1" not in rolling and "n1" in head and "n2" not in head
    # a host in neither group, or a cluster of the wrong size, is refused before anything is written
    inv.write_text(CLUSTER_INI.replace("n3\n", ""))
    with pytest.raises(UsageError) as ei:
        generate(cluster_bundle, inv, keys.pub, tmp_path / "fleet2")
    assert "host n3: service tiny spans 3 nodes: put n3 in [llm_ray_head] or [llm_ray_workers]" in ei.value.message
    assert not (tmp_path / "fleet2").exists()
