"""`pack`: build, verify, inspect, sign and split air-gapped LLM serving bundles.

Thin commands: parse, call the library, print text or --json. Errors the user can fix print one clear
message (what, where, how to fix) and exit non-zero; a traceback means a bug (set LLM_PACK_DEBUG=1 to see
one for any error).
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import sys
from pathlib import Path

import click

from installer.errors import LlmPackError
from installer.sizes import human_size
from packager import __version__

EPILOG = """\b
Typical flow:
  pack keygen --out keys/build            # once: keys/build.key (secret), keys/build.pub
  pack build manifests/qwen3-32b.yaml --key keys/build.key --out out/
  pack verify out/qwen3-32b-2026.11.21 --pubkey keys/build.pub
  pack split out/qwen3-32b-2026.11.21 --size 3.9G     # FAT32 USB disks
Then on the server: ./install.sh --pubkey build.pub   (see README.md)
"""


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LlmPackError as e:
            if os.environ.get("LLM_PACK_DEBUG"):
                raise
            click.secho(f"error: {e}", fg="red", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.secho("interrupted: nothing was left half-written (the output path holds a complete bundle or "
                        "none); re-run to resume: verified downloads in the content store are reused", err=True)
            ctx.exit(130)
        except OSError as e:  # disk full, permission denied, a path that is not there: not a bug, no traceback
            if os.environ.get("LLM_PACK_DEBUG"):
                raise
            click.secho(f"error: {os_error_message(e)}", fg="red", err=True)
            ctx.exit(OS_ERROR_EXIT)


OS_ERROR_EXIT = 74  # EX_IOERR (sysexits.h)
_OS_HINTS = {
    errno.ENOSPC: "free space on the filesystem holding it (`df -h {where}`), or point --out/--store/"
                  "LLM_PACK_WORK at a bigger one; nothing half-written was kept, re-run afterwards",
    errno.EDQUOT: "your disk quota is used up there: free space or write elsewhere, then re-run",
    errno.EACCES: "you may not write/read there: check its owner and mode (`ls -ld {where}`), or choose "
                  "another path",
    errno.EPERM: "the operation is not permitted there (immutable file, protected_hardlinks, a mount "
                 "option?): check `lsattr -d {where}`, or choose another path",
    errno.EROFS: "that filesystem is mounted read-only: choose a writable path (--out, --store)",
    errno.ENOENT: "check the path (a directory on the way may be missing)",
    errno.ENOTDIR: "a part of that path is a file, not a directory: choose another path or move the file away",
    errno.EISDIR: "that path is a directory where a file was expected: choose another path",
    errno.EEXIST: "something is already there: move it away or choose another path",
    errno.EMFILE: "too many open files: raise the limit (`ulimit -n`) or use fewer --jobs",
    errno.EIO: "the device reported an I/O error: check the disk (`dmesg`), then re-run",
}


def os_error_message(e: OSError) -> str:
    """One line with what failed, where, and how to fix it (for an OSError that reached the CLI)."""
    where = " -> ".join(os.fspath(f) for f in (e.filename, e.filename2) if f is not None)
    what = e.strerror or str(e)
    text = f"{what}: {where}" if where else what
    hint = _OS_HINTS.get(e.errno or 0, "check the path and the filesystem, then re-run")
    return f"{text}\n  hint: {hint.format(where=shlex.quote(os.fspath(e.filename)) if e.filename else '.')}"


@click.group(cls=_Group, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pack")
def main() -> None:
    """Package vLLM environments and models into a signed bundle for an offline GPU server."""


def _emit(obj: dict, as_json: bool, text: str) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True) if as_json else text)


@main.command()
@click.argument("manifest", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("out"), show_default=True,
              help="Directory the bundle is written into (as OUT/<name>-<version>/).")
@click.option("--key", type=click.Path(path_type=Path), help="ed25519 private key from `pack keygen` to sign with.")
@click.option("--store", type=click.Path(path_type=Path),
              help="Content store for downloads, reused between builds [default: ~/.cache/llm-pack/store].")
@click.option("--jobs", "-j", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Parallel downloads / hashing threads.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.option("--against", "against", multiple=True, type=click.Path(path_type=Path),
              help="Build a delta: leave out every environment, model file and runtime this server inventory "
                   "(`llm-install --inventory --json`) or earlier bundle (directory or MANIFEST.json) holds. "
                   "Repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (logs go to stderr).")
def build(manifest: Path, out_dir: Path, key: Path | None, store: Path | None, jobs: int, no_progress: bool,
          against: tuple[Path, ...], as_json: bool) -> None:
    """Build a bundle from MANIFEST (YAML).

    Models are pinned to exact commits and every file is checked against the sha256 the hub lists;
    environments are solved for the target's CUDA and glibc, not this host's. Re-running after an
    interruption resumes: files already in the content store are not fetched again.

    \b
    Delta bundles (ship only what changed):
      llm-install --inventory --json > site-a.json        # on the server; carry the file out
      pack build m.yaml --key k.key --against site-a.json # the full signed MANIFEST, fewer files
    The installer takes what the delta leaves out from the server's installed copies (hashing them) and
    refuses, before changing anything, a server that lacks one.
    """
    from packager.build import BuildOptions
    from packager.build import build as do_build

    def log(msg: str) -> None:
        if msg:
            click.echo(msg, err=as_json)

    res = do_build(BuildOptions(manifest=manifest, out_dir=out_dir, key=key, store=store, jobs=jobs,
                                progress=not no_progress and not as_json, against=against), log=log)
    delta = (f"; delta: {res.provided} artifacts ({human_size(res.provided_size)}) left to the target"
             if res.provided else "")
    _emit(res.to_dict(), as_json,
          f"bundle {res.bundle_dir} ({human_size(res.size)}, {res.artifacts} artifacts, "
          f"{'signed by ' + res.signed_by if res.signed_by else 'UNSIGNED'}{delta}) in {res.seconds:.1f}s")


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--pubkey", "pubkeys", multiple=True, type=click.Path(path_type=Path),
              help="Trusted public key (.pub from `pack keygen`); repeat for several.")
@click.option("--insecure", is_flag=True, help="Skip the signature check (hashes are still checked).")
@click.option("--jobs", "-j", type=click.IntRange(1, 64), default=None, help="Hashing threads [default: cores].")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def verify(bundle: Path, pubkeys: tuple[Path, ...], insecure: bool, jobs: int | None, as_json: bool) -> None:
    """Check BUNDLE's signature and the size and sha256 of every file.

    Exit 0 if everything holds; otherwise non-zero, naming the first failing artifact. Works on the
    bundle directory (not on split volumes: install.sh reassembles those itself).
    """
    import time

    from installer.bundle import Bundle
    from installer.errors import UsageError
    from packager.signing import read_pubkeys

    t = time.monotonic()
    b = Bundle.load(bundle)
    if insecure:
        signer = None
    elif not pubkeys:
        raise UsageError("no --pubkey given", hint="pass the .pub file from `pack keygen`, or --insecure to check "
                                                   "hashes only")
    else:
        signer = b.check_signature(read_pubkeys(list(pubkeys)))
    b.check_files(jobs=jobs)
    secs = time.monotonic() - t
    size = b.total_size()
    delta = (f"; a delta: {len(b.provided)} artifacts ({human_size(b.provided_size())}) are left to the target "
             "(`pack inspect` lists them)" if b.provided else "")
    _emit({"ok": True, "bundle": str(b.root), "signed_by": signer, "artifacts": len(b.artifacts), "size": size,
           "provided": len(b.provided), "provided_size": b.provided_size(),
           "seconds": round(secs, 2)}, as_json,
          f"OK {b.root}: signature {'by ' + signer if signer else 'NOT CHECKED (--insecure)'}, "
          f"{len(b.artifacts)} artifacts, {human_size(size)} verified in {secs:.1f}s "
          f"({size / max(secs, 1e-9) / 1e6:.0f} MB/s){delta}")


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON (stable keys, for scripts).")
def inspect(bundle: Path, as_json: bool) -> None:
    """Show what BUNDLE contains and what it needs from the target server (no hashing; see verify)."""
    from packager.inspect import describe, render

    info = describe(bundle)
    _emit(info, as_json, render(info))


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the inventory JSON (the form `pack build --against` "
              "and `pack diff` read).")
def inventory(bundle: Path, as_json: bool) -> None:
    """What BUNDLE holds, in the inventory form a server prints with `llm-install --inventory`.

    `pack build --against BUNDLE` reads a bundle directly; this shows what it would leave out.
    """
    from installer.bundle.inventory import render
    from packager.against import read_source

    inv, _ = read_source(bundle)
    _emit(inv, as_json, render(inv))


@main.command()
@click.option("--out", "prefix", required=True, type=click.Path(path_type=Path),
              help="Writes PREFIX.key (secret, mode 0600) and PREFIX.pub.")
@click.option("--force", is_flag=True, help="Replace existing key files.")
def keygen(prefix: Path, force: bool) -> None:
    """Create an ed25519 signing key pair.

    Keep PREFIX.key on the build host; copy PREFIX.pub to each server's /etc/llm/trusted-keys/. A server
    can check a bundle with OpenSSL alone:
    openssl pkeyutl -verify -pubin -inkey PREFIX.pub -rawin -in MANIFEST.json -sigfile MANIFEST.json.sig
    """
    from packager.signing import keygen as do_keygen

    key, pub, fp = do_keygen(prefix, force=force)
    click.echo(f"wrote {key} (secret, mode 0600) and {pub}\nfingerprint {fp}")


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--size", default="3.9G", show_default=True,
              help="Largest volume, e.g. 3.9G (FAT32), 700M, 25G. No single piece exceeds 4 GiB - 1.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path),
              help="Where to write the volumes [default: beside the bundle].")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def split(bundle: Path, size: str, out_dir: Path | None, as_json: bool) -> None:
    """Cut BUNDLE into volumes for removable media, each with its own VOLUME.sha256.

    Copy each volume directory to its own disk. On the server, run install.sh from the first volume with
    the others mounted beside it (or pass --volumes): it reassembles the bundle and verifies it itself.
    """
    from installer.bundle import Bundle
    from packager.split import parse_size, split_bundle

    b = Bundle.load(bundle)
    limit = parse_size(size)
    vols = split_bundle(b.root, out_dir or b.root.parent, limit)
    info = {"bundle": str(b.root), "max_size": limit,
            "volumes": [{"path": str(v), "size": _dir_size(v)} for v in vols]}
    lines = [f"{len(vols)} volume(s) of at most {size} ({human_size(limit)}):"] + \
        [f"  {v['path']}  {human_size(v['size'])}" for v in info["volumes"]]
    _emit(info, as_json, "\n".join(lines))


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--inventory", "-i", required=True, type=click.Path(path_type=Path),
              help="Ansible INI inventory; the servers are the group [llm_fleet].")
@click.option("--pubkey", required=True, type=click.Path(path_type=Path),
              help="The build's public key: the bundle is verified with it, and the hosts trust it.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("fleet"), show_default=True,
              help="Where to write the playbook (ansible.cfg, site.yml, rollback.yml, roles/, group_vars/).")
@click.option("--bundle-src", help="The bundle's path on the admin host, if not where it is now.")
@click.option("--with-ansible", is_flag=True,
              help="Also download ansible-core wheels (this host needs PyPI) for an offline admin host.")
@click.option("--ansible-python", metavar="X.Y", help="The admin host's Python for --with-ansible [default: this one].")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def fleet(bundle: Path, inventory: Path, pubkey: Path, out_dir: Path, bundle_src: str | None, with_ansible: bool,
          ansible_python: str | None, as_json: bool) -> None:
    """Write an Ansible playbook that rolls BUNDLE out to the servers of an inventory.

    Copies the bundle to each host once (checked against MANIFEST.json's sha256), runs install.sh --check
    everywhere and prints one preflight table, then installs in rolling batches with the post-start check
    as the gate. Per-host ports, GPUs and key files come from inventory variables (docs/fleet.md).
    """
    from packager.fleet.generate import generate

    res = generate(bundle, inventory, pubkey, out_dir, bundle_src=bundle_src)
    info = res.to_dict()
    if with_ansible:
        from packager.fleet.wheels import download

        wheels = download(out_dir, python_version=ansible_python, log=lambda m: click.echo(m, err=True))
        info["wheels"] = [w.name for w in wheels]
    lines = [f"fleet playbook for {res.bundle} {res.version} -> {res.out} ({len(res.hosts)} host(s): "
             f"{', '.join(res.hosts)})"]
    lines += [f"  {h}: overrides {json.dumps(o['services'], sort_keys=True)}" for h, o in res.overrides.items()
              if o["services"]]
    if with_ansible:
        lines.append(f"  ansible-core: {len(info['wheels'])} wheels in {out_dir / 'wheels'}; on the admin host: "
                     f"bash {out_dir / 'install-ansible.sh'}")
    lines.append(f"then: cd {res.out} && ansible-playbook site.yml   (--check for a dry run)")
    _emit(info, as_json, "\n".join(lines))


@main.command()
def schema() -> None:
    """Print the manifest's JSON Schema (for editors: yaml-language-server, VS Code)."""
    from packager.manifest import schema_json

    click.echo(schema_json(), nl=False)


@main.command(name="validate")
@click.argument("manifest", type=click.Path(path_type=Path))
def validate(manifest: Path) -> None:
    """Check MANIFEST without downloading or building anything."""
    from packager.manifest import load_manifest

    m = load_manifest(manifest)
    click.echo(f"OK {manifest}: bundle {m.bundle.name} {m.bundle.version}, {len(m.environments)} environment(s), "
               f"{sum(x.adapter_of is None for x in m.models)} model(s), "
               + (f"{n} adapter(s), " if (n := sum(x.adapter_of is not None for x in m.models)) else "")
               + f"{len(m.services)} service(s)")


@main.command(name="diff")
@click.argument("a", metavar="A", type=click.Path(path_type=Path))
@click.argument("b", metavar="B", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON (stable keys, docs/bundle-format.md).")
@click.option("--exit-code", is_flag=True, help="Exit 1 when A and B differ (as `git diff --exit-code`).")
def diff_cmd(a: Path, b: Path, as_json: bool, exit_code: bool) -> None:
    """What changed from A to B: models, environments, services, sizes and the delta's size.

    A and B: each a bundle directory (or split volume 1), a MANIFEST.json or an inventory JSON
    (`llm-install --inventory --json`, `pack inventory BUNDLE --json`).
    """
    from packager.diff import diff_paths
    from packager.diff_render import render

    d = diff_paths(a, b)
    _emit(d, as_json, render(d))
    if exit_code and not d["identical"]:
        sys.exit(1)


@main.command(name="sbom")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--out", "out_file", type=click.Path(path_type=Path), metavar="FILE",
              help="Write it to FILE instead of stdout.")
@click.option("--pubkey", "pubkeys", multiple=True, type=click.Path(path_type=Path),
              help="Also check the bundle's signature with this key (repeatable).")
def sbom_cmd(bundle: Path, out_file: Path | None, pubkeys: tuple[Path, ...]) -> None:
    """Print BUNDLE's CycloneDX 1.6 SBOM (sbom.cdx.json), checked against the sha256 MANIFEST.json lists."""
    from packager.sbom import read_bundle_sbom
    from packager.signing import read_pubkeys

    data = read_bundle_sbom(bundle, read_pubkeys(list(pubkeys)) if pubkeys else None)
    if out_file is None:
        click.echo(data.decode("utf-8"), nl=False)
        return
    tmp = out_file.with_name(f".{out_file.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, out_file)
    click.echo(f"wrote {out_file} ({human_size(len(data))})", err=True)


def _dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
