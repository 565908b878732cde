"""``python -m installer install|check|rollback|uninstall|status|inventory`` (argparse: the target has the stdlib only).

``install.sh`` verifies the signature and the bootstrap's hashes, unpacks the bundle's Python, and runs this
with ``--bundle DIR --manifest PRIVATE_COPY --pubkey KEY...`` (``--insecure`` only when the operator gave it).
For split volumes ``--bundle`` is volume 1 (and ``--volumes DIR...`` where the others are): every artifact is
read in place from its pieces, never joined into a copy.
``install`` and ``check`` always verify MANIFEST.json.sig themselves, with ``--pubkey`` or the trusted keys
under ``--root``: nothing on the command line can say "already verified", so running ``python -m installer``
by hand never installs from an unverified manifest; ``--insecure`` is the only way to skip the check.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from installer.bundle import MANIFEST_NAME, TRUSTED_KEYS, Bundle, overrides
from installer.deploy import install as activate
from installer.deploy import layout, lifecycle
from installer.deploy.installed import preflight_manifest
from installer.deploy.medium import attach_volumes, is_split, terminal_prompt
from installer.deploy.plan import quick_check
from installer.errors import LlmPackError, SignatureError, UsageError
from installer.unpack import DEFAULT_WORKERS


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--root",
        type=Path,
        default=Path("/"),
        help="install into this staging tree instead of the running system (nothing is started)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument(
        "--lock-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long to wait for another installer to finish (default 60)",
    )


def _bundle_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", type=Path, required=True, help="the bundle directory")
    p.add_argument(
        "--manifest",
        type=Path,
        help="a private copy of MANIFEST.json with its MANIFEST.json.sig beside it (install.sh passes it); "
        "its signature is checked like the bundle's",
    )
    p.add_argument(
        "--pubkey",
        action="append",
        type=Path,
        default=[],
        metavar="FILE",
        help="trusted public key (PEM); default: <root>/etc/llm/trusted-keys/*.pub",
    )
    p.add_argument("--insecure", action="store_true", help="accept an unsigned bundle or an unknown key")
    p.add_argument(
        "--volumes",
        nargs="+",
        action="extend",
        type=Path,
        default=[],
        metavar="DIR",
        help="split volumes: where the others are (each DIR a volume, or the directory holding it); default: "
        "beside --bundle, the first volume",
    )
    p.add_argument(
        "--overrides",
        type=Path,
        metavar="FILE",
        help="per-server service fields (JSON: {\"services\": {NAME: {\"port\": 8001, ...}}}); host, port, "
        "gpus, api_key_file, tensor_parallel_size, gpu_memory_utilization, max_model_len; checked by the "
        "MANIFEST service rules",
    )
    p.add_argument(
        "--skip-check",
        action="append",
        default=[],
        metavar="NAME",
        help="skip one preflight check on purpose (repeatable, or comma-separated)",
    )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="llm-install", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("install", help="verify, check, unpack and activate a bundle")
    _common(p)
    _bundle_args(p)
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    p.add_argument("--enable", action="store_true", help="enable the llm@ units (start at boot)")
    p.add_argument("--start", action="store_true", help="start the llm@ units and wait until they answer")
    p.add_argument("--allow-downgrade", action="store_true", help="install an older version over a newer one")
    p.add_argument("--bootstrap", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--health-timeout", type=float, default=900.0, metavar="SECONDS")
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help=argparse.SUPPRESS)
    p = sub.add_parser("check", help="preflight only: is this server ready for the bundle?")
    _common(p)
    _bundle_args(p)
    for name, text in (
        ("rollback", "return to the previous version"),
        ("uninstall", "remove everything the installer created"),
    ):
        p = sub.add_parser(name, help=text)
        _common(p)
        p.add_argument("--name", help="which bundle (when several are installed)")
        p.add_argument("--dry-run", action="store_true", help="say what would happen, change nothing")
    p = sub.add_parser("status", help="installed versions and instances: version, port, health")
    _common(p)
    p = sub.add_parser("inventory", help="what this server holds: bundles, environments (content and archive "
                       "sha256), models (commit, per-file sha256): the input of `pack build --against`")
    _common(p)
    p = sub.add_parser("clean", help="remove what a refused or interrupted install kept in its staging tree")
    _common(p)
    p = sub.add_parser("bench", help="benchmark an installed, running instance (vllm bench serve, offline)")
    _common(p)
    p.add_argument("name", help="the instance (llm@NAME)")
    p.add_argument("--concurrency", default="1,4,16", help="concurrency levels, comma-separated (default 1,4,16)")
    p.add_argument("--input-len", type=int, default=128, metavar="N", help="prompt tokens per request (128)")
    p.add_argument("--output-len", type=int, default=64, metavar="N", help="output tokens per request (64)")
    p.add_argument("--num-prompts", type=int, metavar="N", help="requests per level (default 4 x concurrency, >= 8)")
    p.add_argument("--plot", type=Path, metavar="FILE.svg", help="draw the curve (.svg; .png needs matplotlib)")
    p.add_argument("--builtin", action="store_true", help="use the built-in client, not `vllm bench serve`")
    return ap


def delta_check(root: Path, bundle: Bundle):
    """The preflight row of a delta bundle: is what it leaves to this server here?"""
    from installer.deploy.delta import check_delta
    from installer.deploy.placement import Installer
    from installer.preflight import CheckResult
    from installer.sizes import human_size

    try:
        check_delta(Installer(Path(root), lambda s: None), bundle)
    except LlmPackError as e:
        return CheckResult("delta", "FAIL", e.message, e.hint or "")
    return CheckResult("delta", "PASS", f"{len(bundle.provided)} artifacts ({human_size(bundle.provided_size())}) "
                       "the delta leaves to this server are installed here")


def trusted_keys(root: Path, pubkeys: list[Path]) -> list[bytes]:
    if pubkeys:
        return [_read_key(p) for p in pubkeys]
    d = Path(root) / TRUSTED_KEYS
    return [_read_key(p) for p in sorted(d.glob("*.pub"))] if d.is_dir() else []


def _read_key(p: Path) -> bytes:
    try:
        return p.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read the public key {p}: {e.strerror or e}") from e


def load_bundle(args: argparse.Namespace) -> tuple[Bundle, str]:
    """The bundle with its verified manifest, and who signed it (a key fingerprint, or "insecure").

    The signature is always checked here, on the manifest that is used (the private copy when ``--manifest``
    is given); only ``--insecure`` turns a failed check into a warning.
    """
    if args.manifest is not None:
        if args.manifest.name != MANIFEST_NAME:
            raise UsageError(f"--manifest must name a file called {MANIFEST_NAME}")
        verified = Bundle.load(args.manifest.parent)
    else:
        verified = Bundle.load(args.bundle)
    try:
        signed_by = verified.check_signature(trusted_keys(args.root, args.pubkey))
    except SignatureError as e:
        if not args.insecure:
            raise
        print(f"warning: --insecure: installing without a valid signature ({e.message})", file=sys.stderr)
        signed_by = "insecure"
    split = is_split(args.bundle) or (args.manifest is not None and is_split(args.manifest.parent))
    if args.volumes and not split:
        raise UsageError(f"--volumes: {args.bundle} is not the first volume of a split bundle (no SPLIT.json)")
    if args.manifest is not None:
        mpath = args.bundle / MANIFEST_NAME
        if mpath.exists() and mpath.read_bytes() != verified.manifest_bytes:
            raise SignatureError(
                f"{mpath} changed after it was verified",
                hint="something is modifying the bundle while it is installed; copy it again",
            )
        verified = activate.with_bundle_root(verified, args.bundle)
    if split:  # read in place from the volumes; SPLIT.json: install.sh's copy beside the manifest, or volume 1's
        info_dir = args.manifest.parent if args.manifest is not None else args.bundle
        verified = attach_volumes(verified, args.bundle, info_dir, args.volumes, terminal_prompt())
    if args.overrides is not None:
        verified = with_overrides(verified, overrides.load(args.overrides), source=f"--overrides {args.overrides}")
    return verified, signed_by


def with_overrides(bundle: Bundle, ov: dict, *, source: str) -> Bundle:
    """The bundle with per-server service overrides merged (and validated); unchanged when they are empty."""
    import dataclasses

    merged, records = overrides.apply(bundle.manifest, ov, source=source)
    if records is None:
        return bundle
    return dataclasses.replace(bundle, manifest=merged, records=records, overrides=ov)


def check_owned_ports(root: Path) -> dict[int, str]:
    """Ports held by installed instances (their own port is no conflict for an upgrade, as in `install`)."""
    from installer.deploy.installed import owned_ports
    from installer.deploy.placement import Installer

    try:
        return owned_ports(Installer(Path(root), lambda s: None))
    except LlmPackError:
        return {}


def check_bootstrap(d: Path, bundle: Bundle) -> Path:
    """install.sh's private work directory (``--bootstrap``), whose unpacked runtime and installer are kept
    on the target: accepted only as install.sh makes it (a directory of this user, closed to others, holding
    the archives it unpacked as ``verified/<artifact>`` with the sha256 of the verified manifest)."""
    import os
    import stat

    from installer.bundle import sha256_file

    def refuse(why: str) -> UsageError:
        return UsageError(f"--bootstrap {d}: {why}",
                          hint="--bootstrap is install.sh's own hand-over; run `bash install.sh` (or leave it out)")

    try:
        st = d.lstat()
    except OSError as e:
        raise refuse(e.strerror or str(e)) from e
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise refuse("not a private directory of this user (mode 0700, as install.sh creates it)")
    m = bundle.manifest
    rels = [(m.get("installer") or {}).get("artifact"), (m.get("runtime") or {}).get("artifact")]
    for rel in (r for r in rels if r):
        art = bundle.artifact(rel)
        if art.provided:  # a delta: install.sh ran the runtime kept here (the installer checks it is in use)
            continue
        p = d / "verified" / Path(*rel.split("/"))
        if p.is_symlink() or not p.is_file():
            raise refuse(f"{rel} is not there")
        digest, size = sha256_file(p)
        if digest != art.sha256 or size != art.size:
            raise refuse(f"{rel} is not the one MANIFEST.json lists (sha256 {digest})")
    return d


def _spoofed_handover(argv: list[str]) -> None:
    """Older install.sh versions passed ``--signature-verified-by``; it is refused by name, never trusted."""
    for a in argv:
        if a == "--" or not a.startswith("--sig"):
            continue
        if "--signature-verified-by".startswith(a.split("=", 1)[0]):
            raise UsageError(
                "--signature-verified-by is not accepted: the installer checks MANIFEST.json.sig itself",
                hint="trust the build key with --pubkey FILE (or ROOT/etc/llm/trusted-keys/), or install an "
                "unsigned bundle explicitly with --insecure",
            )


def os_error_message(e: OSError) -> str:
    """An OSError as a one-paragraph message: what failed, where, how to fix it (no traceback)."""
    import errno

    where = " and ".join(str(f) for f in (e.filename, e.filename2) if f is not None) or "(no path given)"
    what = e.strerror or str(e)
    hints = {
        errno.ENOSPC: "free space on the file system holding it (df -h), or use a larger disk; then run the "
        "same command again",
        errno.EDQUOT: "the disk quota is exhausted: free space or raise the quota, then run the same command again",
        errno.EACCES: "run the installer as root (sudo), or fix the owner/mode of that path",
        errno.EPERM: "run the installer as root (sudo); an immutable file (chattr +i) also causes this",
        errno.EROFS: "the file system is mounted read-only: remount it read-write or pick another --root",
        errno.ENOENT: "the path does not exist (a removed disk, or a file deleted during the install); "
        "mount or copy it again and run the same command again",
        errno.EEXIST: "a file is in the way where a directory is needed: move it away, or pick another --root",
        errno.ENOTDIR: "a file is in the way where a directory is needed: move it away, or pick another --root",
        errno.EIO: "the disk returned an I/O error (failing or removed medium): copy the bundle to a healthy "
        "disk and run the same command again",
    }
    hint = hints.get(e.errno or 0, "check that path, then run the same command again")
    return f"{what}: {where}\n  hint: {hint}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        _spoofed_handover(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    args = build_parser().parse_args(argv)
    out = sys.stderr if args.json else sys.stdout

    def say(text: str) -> None:
        print(text, file=out, flush=True)

    try:
        result = _run(args, say)
    except LlmPackError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        print(f"error: {os_error_message(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: the previous version (if any) is still active", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result, indent=1, sort_keys=True, default=str))
    return int(result.pop("_exit", 0)) if isinstance(result, dict) else 0


def _run(args: argparse.Namespace, say) -> dict:
    root = args.root
    if args.command == "status":
        s = lifecycle.status(root)
        if not args.json:
            say(lifecycle.format_status(s))
        return s
    if args.command == "inventory":
        from installer.bundle.inventory import render
        from installer.deploy.inventory import server_inventory

        inv = server_inventory(root)
        if not args.json:
            say(render(inv))
        return inv
    if args.command == "rollback":
        return lifecycle.rollback(
            root, args.name, dry_run=args.dry_run, lock_timeout=args.lock_timeout, say=say
        )
    if args.command == "clean":
        return lifecycle.clean(root, lock_timeout=args.lock_timeout, say=say)
    if args.command == "bench":
        return _bench(args, say)
    if args.command == "uninstall":
        return lifecycle.uninstall(
            root, args.name, dry_run=args.dry_run, lock_timeout=args.lock_timeout, say=say
        )
    bundle, signed_by = load_bundle(args)
    how = "NOT checked (--insecure)" if signed_by == "insecure" else f"verified with key {signed_by}"
    say(f"bundle {bundle.name} {bundle.version}: signature {how}")
    if args.command == "check":
        from installer import preflight

        quick_check(bundle)
        results = preflight.run_preflight(
            preflight_manifest(root, bundle.manifest),
            root=root,
            skip=args.skip_check,
            owned_ports=check_owned_ports(root),
            install_dir=Path(root) / layout.INSTALL_DIR.lstrip("/"),
        )
        if bundle.provided:
            results.append(delta_check(root, bundle))
        if not args.json:
            say(preflight.render_table(results))
        failed = any(r.status == "FAIL" for r in results)
        return {"checks": [r.to_dict() for r in results], "ok": not failed, "_exit": 1 if failed else 0}
    opts = activate.InstallOptions(
        root=root,
        signed_by=signed_by,
        dry_run=args.dry_run,
        allow_downgrade=args.allow_downgrade,
        enable=args.enable,
        start=args.start,
        skip_checks=tuple(args.skip_check),
        lock_timeout=args.lock_timeout,
        bootstrap=check_bootstrap(args.bootstrap, bundle) if args.bootstrap is not None else None,
        health_timeout=args.health_timeout,
        workers=args.workers,
        json=args.json,
    )
    return activate.install(bundle, opts, say=say)


def _bench(args: argparse.Namespace, say) -> dict:
    from installer.bench import report
    from installer.bench.run import BenchOptions, bench, parse_concurrency

    for flag, v in (("--input-len", args.input_len), ("--output-len", args.output_len),
                    ("--num-prompts", args.num_prompts)):
        if v is not None and not 1 <= v <= 1_000_000:
            raise UsageError(f"{flag} {v}: expected a positive number")
    opts = BenchOptions(concurrency=parse_concurrency(args.concurrency), input_len=args.input_len,
                        output_len=args.output_len, num_prompts=args.num_prompts, plot=args.plot,
                        builtin=args.builtin)
    doc = bench(args.root, args.name, opts, say=say)
    if not args.json:
        print(f"llm@{doc['instance']} ({doc['model']}), {doc['input_len']} -> {doc['output_len']} tokens per "
              f"request, measured by {doc['tool']}")
        print(report.format_table(doc["rows"]))
        print(f"saved: {doc['saved']}" + (f"; plot: {doc['plot']}" if doc.get("plot") else ""))
    return doc


if __name__ == "__main__":
    sys.exit(main())
