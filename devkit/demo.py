"""`./build.sh demo`: the whole air-gapped journey on this machine, with the built-in tiny model.

Generates a tiny Qwen2 model, builds a conda environment with the real vLLM CPU build, signs and splits
a bundle, installs it with install.sh into a systemd-nspawn container that has no network, starts
`llm@tiny` and prints a real chat completion, then stops and uninstalls it. With ``--full`` it goes on as
the end-to-end test does: kill -9 of vLLM's engine (systemd restarts it), an upgrade to a second version
and a rollback (three more vLLM starts: minutes on a small machine). Needs root (systemd-nspawn) and the demo
tooling (`pip install .[demo]`: the demo's conda channel and target image are built by devkit/).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="build.sh demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("LLM_PACK_DEMO_DIR", "/var/tmp/llm-pack-demo")),
                    help="working directory (kept: a second run reuses the environment and the target image)")
    ap.add_argument("--keep-container", action="store_true", help="keep the container's tree for inspection")
    ap.add_argument("--full", action="store_true",
                    help="after the first completion also kill -9 the engine, upgrade to 1.0.1 and roll back "
                         "(several more minutes)")
    ap.add_argument("--no-pause", action="store_true",
                    help="do not stop while the server answers (default: pause when run from a terminal)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("build.sh demo: needs root (it boots a systemd container with systemd-nspawn)", file=sys.stderr)
        return 2
    from devkit.journey import run_journey

    def pause(res, leader: int) -> None:
        if args.no_pause or not sys.stdin.isatty():
            return
        chat = res.completion["chat"]
        print(f"\nllm@tiny is serving inside the network-less container. Completion: "
              f"{json.dumps(chat['choices'][0]['message']['content'])}")
        print(f"Try it yourself from another terminal:\n  nsenter -t {leader} -a {res.curl}")
        print(f"  nsenter -t {leader} -a systemctl status llm@tiny")
        rest = "kill -9, upgrade, rollback, uninstall" if args.full else "stop, uninstall"
        input(f"Press Enter to continue ({rest}, shut the container down)... ")

    res = run_journey(args.work, via_hub=False, keep_container=args.keep_container, while_serving=pause,
                      full=args.full)
    chat = res.completion["chat"]
    print("\n" + res.table())
    print(f"\nbundle: {res.bundle_size / 1e6:.0f} MB in {len(res.volumes)} volumes "
          f"({', '.join(n for n, _ in res.volumes)})")
    print("served models:", [m["id"] for m in res.completion["models"]["data"]])
    print("completion:", json.dumps(chat["choices"][0]["message"]["content"]),
          f"({chat['usage']['completion_tokens']} tokens; the demo model has random weights, so it babbles)")
    print(f"\nthe request, as run inside the target:\n  {res.curl}")
    if args.full:
        print(f"upgrade -> rollback: active version {' -> '.join(res.versions)}; uninstall left "
              f"{len(res.leftover)} changed path(s) behind")
    else:
        print(f"uninstall left {len(res.leftover)} changed path(s) behind; `./build.sh demo --full` also shows "
              "kill -9 recovery, an upgrade and a rollback")
    print(f"\nfiles are in {args.work}: keys/, out/ (the bundle), usb/ (the volumes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
