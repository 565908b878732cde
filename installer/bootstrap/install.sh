#!/bin/bash
# install.sh - verify, check and install an LLM serving bundle (llm-pack) on an offline server.
#
# Needs only bash, coreutils, gzip, GNU tar, sha256sum and OpenSSL >= 3.0: no Python, no zstd. It
#   1. reads split volumes in place (SPLIT.json beside it): nothing is joined into a scratch copy;
#   2. checks MANIFEST.json.sig with a trusted ed25519 key (/etc/llm/trusted-keys/*.pub or --pubkey);
#   3. copies install.sh, the installer and the bundle's Python into a private directory (one read of the
#      bundle each; from split volumes each piece is checked against its VOLUME.sha256 too), checks those
#      copies' sha256 against MANIFEST.json, refuses unsafe tar members, and unpacks the private copies only;
#   4. runs the Python installer on that verified Python; it checks MANIFEST.json.sig again itself (with the
#      same keys), checks the server (preflight), verifies and unpacks the environments and models in one
#      pass, straight from the bundle or its volumes, into staging directories kept only when the hash
#      matches, and switches to the new version; then the install's I/O (/proc/PID/io) is printed.
# Nothing from the bundle is executed or extracted before its hash is checked, and what is executed or
# extracted is the byte that was hashed (a private copy), whoever can write the bundle's disk meanwhile.
#
# Run `bash install.sh --help` for the options; the bundle layout is in docs/bundle-format.md.

set -eu
set -o pipefail
umask 022

WORK=""
KEEP_WORK=0

say() { printf '%s\n' "$*" >&2; }

die() {
    printf 'install.sh: error: %s\n' "$1" >&2
    if [ -n "${2:-}" ]; then printf '  hint: %s\n' "$2" >&2; fi
    exit "${3:-1}"
}

# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
    if [ -n "$WORK" ] && [ "$KEEP_WORK" = 0 ]; then
        rm -rf -- "$WORK"
    fi
}

usage() {
    cat <<'EOF'
Usage: bash install.sh [OPTIONS]

Install (default):
  --pubkey FILE          trust this public key (repeatable); default: ROOT/etc/llm/trusted-keys/*.pub
  --insecure             accept an unsigned bundle or one signed by an unknown key
  --skip-check NAME      skip one preflight check on purpose (repeatable)
  --overrides FILE       per-server service fields (JSON): port, host, gpus, api_key_file, ... (docs/fleet.md)
  --dry-run              verify and print the plan; change nothing
  --enable               enable the llm@ units (start at boot)
  --start                start the llm@ units, wait for /health and one real completion
  --allow-downgrade      install an older version over a newer one
  --volumes DIR...       where the other volumes of a split bundle are (default: beside this one)
  --workdir DIR          private directory for what install.sh runs: the installer and its Python, never the
                         environments or models (default: a new one under $TMPDIR or /var/tmp)
  --root DIR             install into a staging tree (an image); nothing on this system is touched

Other actions (they also work after the bundle's disk is gone, via /usr/local/sbin/llm-install):
  --check                preflight only: PASS/WARN/FAIL table, exit 1 on any FAIL
  --rollback             return to the previous version          [--name BUNDLE] [--dry-run]
  --uninstall            remove everything the installer created [--name BUNDLE] [--dry-run]
  --status               installed versions and instances: version, port, health  [--json]
  --inventory            what this server holds (bundles, environments, models with per-file sha256)
                         [--json]: the input of `pack build --against` for a delta bundle
  --clean                remove what a refused or interrupted install kept (ROOT/var/lib/llm/staging)
  bench NAME [OPTIONS]   benchmark the running instance llm@NAME (vllm bench serve, offline)
                         [--concurrency 1,4,16] [--input-len N] [--output-len N] [--num-prompts N]
                         [--plot FILE.svg] [--builtin] [--json]
  --json                 machine-readable result on stdout (messages go to stderr)
  -h, --help             this text

Examples:
  bash install.sh --pubkey build.pub --enable --start
  bash /media/usb/qwen3-32b-2026.11.21.vol01/install.sh            # split volumes mounted side by side
  llm-install --rollback
  llm-install --inventory --json > server.inventory.json       # carry it out; `pack build --against` it
EOF
}

# ------------------------------------------------------------------ reading MANIFEST.json and SPLIT.json
# A JSON reader in bash alone (no python, jq, sed or awk): json_load FILE reads a JSON document however it is
# laid out (any whitespace, any key order) into JSON[PATH], PATH spelt as installer.bundle.manifest.field_path
# spells it (format_version, bundle.name, artifacts[2].sha256, volume_names[0]), and JSON_KIND[PATH]: string,
# number, boolean, null, object or array (JSON[PATH] of an object or array is its number of entries). A string
# is kept as written between its quotes: escapes are not decoded (no field the bootstrap reads holds one, and
# every path it uses is checked and refuses a backslash). What is not JSON, a raw control character in a string
# and a key given twice are refused, with the reason in JSON_ERROR. The readers (json_value, json_list,
# manifest_artifact) take the FILE too and load it unless it is the one loaded. MANIFEST.json is read only
# after its signature was checked; SPLIT.json (not signed) only says where to look for the volumes, and each
# name it gives is checked before use.

declare -gA JSON=() JSON_KIND=()
JSON_FILE=""
JSON_ERROR=""

# _json_slot: the path of the next value of the innermost open container into `here` (json_load's locals)
_json_slot() {
    if [ "$depth" = 0 ]; then
        here=""
        return 0
    fi
    if [ "${ckind[depth]}" = array ]; then
        here="${cpath[depth]}[${ccount[depth]}]"
        ccount[depth]=$((ccount[depth] + 1))
    elif [ -n "${cpath[depth]}" ]; then
        here=${cpath[depth]}.$key
    elif [ -n "$key" ]; then
        here=$key
    else
        JSON_ERROR="an empty key at the top level"
        return 1
    fi
    if [ -n "${JSON_KIND[$here]+x}" ]; then
        JSON_ERROR="$here is given twice"
        return 1
    fi
}

# _json_done: a value is complete; then a ',' or the end of its container (or of the document) comes
_json_done() {
    if [ "$depth" = 0 ]; then want=end; else want=next; fi
}

json_load() { # FILE -> 0 with JSON/JSON_KIND filled, or 1 with JSON_ERROR
    local -
    set -f
    local LC_ALL=C IFS=$' \t\r\n' file=$1 seg tok str run here="" want=value depth=0 key="" i=0 n size outside=1
    local -a parts=() toks=() ckind=() cpath=() ccount=()
    JSON=()
    JSON_KIND=()
    JSON_FILE=""
    JSON_ERROR=""
    if [ ! -f "$file" ] || [ ! -r "$file" ]; then
        JSON_ERROR="cannot read $file"
        return 1
    fi
    # split at every '"': the pieces are, in turn, text between strings and the inside of a string (a piece
    # ending in an odd number of backslashes is followed by an escaped quote: the string goes on)
    IFS='"' read -r -d '' -a parts <"$file" || true
    n=${#parts[@]}
    # every byte must be in a piece or be one of the n-1 quotes between them: read stops at a NUL byte, and
    # drops the empty piece after a last '"'
    size=$(wc -c <"$file")
    for seg in ${parts[@]+"${parts[@]}"}; do size=$((size - ${#seg})); done
    if [ "$n" -gt 0 ] && [ "$size" != $((n - 1)) ]; then
        JSON_ERROR="a NUL byte, or the document ends inside or just after a string"
        return 1
    fi
    while [ "$i" -lt "$n" ]; do
        if [ "$outside" = 1 ]; then
            seg=${parts[i]}
            tok=${seg//[$' \t\r\n']/}
            if [ "$want:$tok" = colon:: ]; then # the common cases first: a ':' or ',' alone between strings
                want=value outside=0 i=$((i + 1))
                continue
            elif [ "$want:$tok" = next:, ]; then
                if [ "${ckind[depth]}" = object ]; then want=key; else want=value; fi
                outside=0 i=$((i + 1))
                continue
            fi
            for tok in '{' '}' '[' ']' ':' ','; do seg=${seg//"$tok"/" $tok "}; done
            # shellcheck disable=SC2206  # split at JSON whitespace; globbing is off (set -f above)
            toks=($seg)
            for tok in ${toks[@]+"${toks[@]}"}; do
                case "$want:$tok" in
                value:'{' | first:'{' | value:'[' | first:'[')
                    _json_slot || return 1
                    if [ "$tok" = '{' ]; then run=object want=firstkey; else run=array want=first; fi
                    if [ -n "$here" ]; then JSON_KIND[$here]=$run; fi
                    depth=$((depth + 1))
                    ckind[depth]=$run
                    cpath[depth]=$here
                    ccount[depth]=0
                    ;;
                firstkey:'}' | next:'}' | first:']' | next:']')
                    if [ "${ckind[depth]}:$tok" != 'object:}' ] && [ "${ckind[depth]}:$tok" != 'array:]' ]; then
                        JSON_ERROR="'$tok' closes a container it does not belong to"
                        return 1
                    fi
                    if [ -n "${cpath[depth]}" ]; then JSON[${cpath[depth]}]=${ccount[depth]}; fi
                    depth=$((depth - 1))
                    _json_done
                    ;;
                next:,)
                    if [ "${ckind[depth]}" = object ]; then want=key; else want=value; fi
                    ;;
                colon::) want=value ;;
                value:* | first:*)
                    if [[ $tok =~ ^-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?$ ]]; then
                        run=number
                    elif [ "$tok" = true ] || [ "$tok" = false ]; then
                        run=boolean
                    elif [ "$tok" = null ]; then
                        run=null
                    else
                        JSON_ERROR="'${tok:0:40}' is not a JSON value"
                        return 1
                    fi
                    _json_slot || return 1
                    if [ -n "$here" ]; then
                        JSON[$here]=$tok
                        JSON_KIND[$here]=$run
                    fi
                    _json_done
                    ;;
                *)
                    JSON_ERROR="unexpected '${tok:0:40}' (expected: $want)"
                    return 1
                    ;;
                esac
            done
            outside=0
            i=$((i + 1))
            continue
        fi
        str=${parts[i]}
        while [ "${str: -1}" = "\\" ]; do # an odd number of backslashes: an escaped quote, the string goes on
            run=${str##*[!\\]}
            [ $((${#run} % 2)) = 1 ] || break
            i=$((i + 1))
            [ "$i" -lt "$n" ] || break
            str+="\"${parts[i]}"
        done
        if [ $((i + 1)) -ge "$n" ]; then
            JSON_ERROR="a string does not end"
            return 1
        fi
        case "$str" in *[$'\x01'-$'\x1f']*)
            JSON_ERROR="a control character in the string '${str:0:40}'"
            return 1
            ;;
        esac
        case "$want" in
        key | firstkey)
            key=$str
            ccount[depth]=$((ccount[depth] + 1))
            want="colon"
            ;;
        value | first)
            _json_slot || return 1
            if [ -n "$here" ]; then
                JSON[$here]=$str
                JSON_KIND[$here]=string
            fi
            _json_done
            ;;
        *)
            JSON_ERROR="unexpected string '${str:0:40}' (expected: $want)"
            return 1
            ;;
        esac
        outside=1
        i=$((i + 1))
    done
    if [ "$want" != end ]; then
        JSON_ERROR="the document ends early"
        return 1
    fi
    JSON_FILE=$file
}

_json_use() { # FILE: loaded already, or load it now
    [ "$JSON_FILE" = "$1" ] || json_load "$1"
}

# json_value FILE PATH: the string, number, boolean or null at PATH (nothing if absent or not a scalar)
json_value() {
    _json_use "$1" || return 1
    [ -n "$2" ] || return 0
    case "${JSON_KIND[$2]-}" in
    string | number | boolean | null) printf '%s' "${JSON[$2]}" ;;
    esac
}

# json_list FILE PATH: the strings and numbers of the list at PATH, one per line (nothing if any entry is
# something else, or if there is no list there)
json_list() {
    local i=0 n p
    _json_use "$1" || return 1
    [ -n "$2" ] && [ "${JSON_KIND[$2]-}" = array ] || return 0
    n=${JSON[$2]}
    for ((i = 0; i < n; i++)); do
        p="$2[$i]"
        case "${JSON_KIND[$p]-}" in string | number) ;; *) return 1 ;; esac
    done
    for ((i = 0; i < n; i++)); do
        p="$2[$i]"
        printf '%s\n' "${JSON[$p]}"
    done
}

# manifest_artifact FILE PATH: "sha256 size" of the artifacts[] entry of PATH, then " target" when a delta
# bundle leaves that file to the target (artifacts[].provided; status 1: not listed)
manifest_artifact() {
    local want=$2 i n p
    _json_use "$1" || return 1
    [ "${JSON_KIND[artifacts]-}" = array ] || return 1
    n=${JSON[artifacts]}
    for ((i = 0; i < n; i++)); do
        p="artifacts[$i]"
        if [ "${JSON_KIND[$p.path]-}" = string ] && [ "${JSON[$p.path]}" = "$want" ]; then
            if [ -n "${JSON[$p.provided]+x}" ]; then
                printf '%s %s %s\n' "${JSON[$p.sha256]-}" "${JSON[$p.size]-}" "${JSON[$p.provided]}"
            else
                printf '%s %s\n' "${JSON[$p.sha256]-}" "${JSON[$p.size]-}"
            fi
            return 0
        fi
    done
    return 1
}

# json_pieces FILE: SPLIT.json's pieces[] as "file<TAB>name<TAB>volume<TAB>offset<TAB>size" lines (status 1: an
# entry without those fields, or one holding a tab)
json_pieces() {
    local i n p f out=""
    _json_use "$1" || return 1
    [ "${JSON_KIND[pieces]-}" = array ] || return 1
    n=${JSON[pieces]}
    for ((i = 0; i < n; i++)); do
        p="pieces[$i]"
        for f in file name volume offset size; do
            case "${JSON_KIND[$p.$f]-}:$f" in string:file | string:name | number:volume | number:offset | number:size) ;;
            *) return 1 ;;
            esac
            case "${JSON[$p.$f]}" in *$'\t'*) return 1 ;; esac
        done
        out+="${JSON[$p.file]}"$'\t'"${JSON[$p.name]}"$'\t'"${JSON[$p.volume]}"$'\t'"${JSON[$p.offset]}"$'\t'"${JSON[$p.size]}"$'\n'
    done
    printf '%s' "$out"
}

# ------------------------------------------------------------------ checks

safe_relpath() { # a plain relative path: no leading /, no '..', no backslash, no empty parts
    local p=$1
    case "$p" in
    '' | /* | *\\* | ..* | */../* | */.. | *//* | ./* | */./* | */.) return 1 ;;
    esac
    return 0
}

# read_plain FILE: FILE's bytes on stdout, opened with O_NOFOLLOW|O_NONBLOCK: a symlink put in its place fails to
# open, and a FIFO reads as empty instead of blocking (the size check then refuses it)
read_plain() {
    dd if="$1" iflag=nofollow,nonblock bs=1M status=none
}

# fetch_verified BUNDLE MANIFEST PATH DEST: one read of the bundle's PATH into the private DEST, then its size
# and sha256 against MANIFEST.json. Only DEST is used afterwards: whatever happens to the bundle's copy (a disk
# others can write) after this read, what is listed, extracted or run is the byte that was hashed.
fetch_verified() {
    local bundle=$1 manifest=$2 rel=$3 dest=$4 entry want_sha want_size provided size got
    entry=$(manifest_artifact "$manifest" "$rel") || die "$rel is not listed in MANIFEST.json" \
        "the bundle is incomplete or was not built by pack build"
    read -r want_sha want_size provided <<<"$entry"
    [ -z "$provided" ] || die "$rel is not in this bundle: it is a delta bundle that leaves it to the server" \
        "install the full bundle (pack build without --against)"
    if ! [[ $want_sha =~ ^[0-9a-f]{64}$ ]] || ! [[ $want_size =~ ^[0-9]+$ ]]; then
        die "MANIFEST.json: the entry of $rel has no usable sha256 and size" \
            "the bundle was not built by pack build"
    fi
    mkdir -p -- "$(dirname -- "$dest")"
    if [ -n "$FIRST_VOLUME" ]; then # split volumes: from its pieces, each checked against its VOLUME.sha256
        fetch_pieces "$rel" "$dest"
    else
        if [ ! -f "$bundle/$rel" ] || [ -L "$bundle/$rel" ]; then
            die "$rel: not a regular file in the bundle (missing, a symlink or a special file)" \
                "copy the whole bundle directory again"
        fi
        read_plain "$bundle/$rel" >"$dest" || die "cannot copy $rel to the work directory $WORK" \
            "is there enough space there? use --workdir DIR"
    fi
    size=$(wc -c <"$dest")
    size=${size//[[:space:]]/}
    [ "$size" = "$want_size" ] || die "$rel: size mismatch (expected $want_size, got $size)" \
        "the file is corrupt or was modified; copy the bundle again"
    got=$(sha256sum <"$dest")
    got=${got%% *}
    [ "$got" = "$want_sha" ] || die "$rel: sha256 mismatch (expected $want_sha, got $got)" \
        "the file is corrupt or was modified; copy the bundle again"
}

# tar_parts PATH: the parts of PATH without empty and '.' parts, into the global array PARTS
tar_parts() {
    local p
    local -a raw=()
    PARTS=()
    IFS=/ read -r -a raw <<<"$1"
    for p in ${raw[@]+"${raw[@]}"}; do
        case "$p" in '' | .) ;; *) PARTS+=("$p") ;; esac
    done
}

# check_tar ARCHIVE: the member rules of installer/unpack/members.py's check_member, in the same order with the same
# reasons (tests/faults/test_archives.py runs one table of hostile archives against both):
#   no absolute path, no '..', no path through a symlink the archive made; a symlink's target is relative,
#   '..' only leads it and does not climb above the destination; a hard link's target is a plain path inside
#   the archive and not through (or to) a symlink; no device nodes, fifos or other special files; no
#   setuid/setgid bits. Names tar cannot print plainly (quotes, backslashes, control characters) are refused.
check_tar() {
    local archive=$1 line re type perms name target ups i prefix n list
    local -a parts=() tparts=()
    local -A links=()
    list=$(mktemp "${WORK:-${TMPDIR:-/tmp}}/members.XXXXXX")
    # --absolute-names: list names as stored (GNU tar would otherwise strip leading / and ../ and hide them)
    LC_ALL=C tar --quoting-style=c --numeric-owner --absolute-names -tvzf "$archive" >"$list" 2>"$list.err" ||
        die "$archive: not a readable tar.gz archive ($(head -c 300 "$list.err"))" \
            "its hash matches MANIFEST.json, so it was built broken; rebuild the bundle"
    re='^([^[:space:]])([-rwxsStT]{9})[[:space:]]+[^[:space:]]+[[:space:]]+[0-9,[:space:]]+[[:space:]][0-9-]+[[:space:]]+[0-9:]+[[:space:]]+"([^"\\]*)"( (->|link to) "([^"\\]*)")?$'
    while IFS= read -r line; do
        [[ $line =~ $re ]] || die "$archive: cannot check the member line: $line" \
            "the archive has unusual names (quotes, backslashes, control characters); do not install it"
        type=${BASH_REMATCH[1]} perms=${BASH_REMATCH[2]} name=${BASH_REMATCH[3]} target=${BASH_REMATCH[6]}
        case "$name" in /*) die "$archive: refusing member '$name': absolute path" ;; esac
        tar_parts "$name"
        parts=(${PARTS[@]+"${PARTS[@]}"})
        for i in ${parts[@]+"${parts[@]}"}; do
            [ "$i" != .. ] || die "$archive: refusing member '$name': '..' in the path"
        done
        if [ "${#parts[@]}" = 0 ]; then
            [ "$type" = d ] || die "$archive: refusing member '$name': empty member name"
            continue
        fi
        case "$type" in
        - | C | d | l | h) ;;
        c | b) die "$archive: refusing member '$name': device node" ;;
        p) die "$archive: refusing member '$name': fifo" ;;
        *) die "$archive: refusing member '$name': special file (tar type $type)" ;;
        esac
        case "${perms:2:1}${perms:5:1}" in
        *[sS]*) die "$archive: refusing member '$name': setuid/setgid bit" ;;
        esac
        prefix=""
        for ((i = 0; i < ${#parts[@]} - 1; i++)); do
            prefix=${prefix:+$prefix/}${parts[i]}
            [ -z "${links[$prefix]+x}" ] || die "$archive: refusing member '$name': path goes through the symlink '$prefix'"
        done
        if [ "$type" = l ]; then
            case "$target" in /*) die "$archive: refusing member '$name': symlink to an absolute path ($target)" ;; esac
            tar_parts "$target"
            tparts=(${PARTS[@]+"${PARTS[@]}"})
            n=${#tparts[@]}
            ups=0
            while [ "$ups" -lt "$n" ] && [ "${tparts[ups]}" = .. ]; do ups=$((ups + 1)); done
            for ((i = ups; i < n; i++)); do
                [ "${tparts[i]}" != .. ] || die "$archive: refusing member '$name': symlink target with '..' inside it ($target)"
            done
            [ "$ups" -le $((${#parts[@]} - 1)) ] || die "$archive: refusing member '$name': symlink leaves the destination ($target)"
            [ "$n" -gt 0 ] || die "$archive: refusing member '$name': symlink to its own directory ('$target')"
            prefix=""
            for i in "${parts[@]}"; do prefix=${prefix:+$prefix/}$i; done
            links[$prefix]=1
        elif [ "$type" = h ]; then
            tar_parts "$target"
            tparts=(${PARTS[@]+"${PARTS[@]}"})
            case "$target" in /*) tparts=() ;; esac
            for i in ${tparts[@]+"${tparts[@]}"}; do [ "$i" != .. ] || tparts=(); done
            [ "${#tparts[@]}" -gt 0 ] || die "$archive: refusing member '$name': hard link outside the archive ($target)"
            prefix=""
            for ((i = 0; i < ${#tparts[@]}; i++)); do
                prefix=${prefix:+$prefix/}${tparts[i]}
                [ -z "${links[$prefix]+x}" ] || die "$archive: refusing member '$name': hard link through a symlink ($target)"
            done
        fi
    done <"$list"
    rm -f -- "$list" "$list.err"
}

extract_tar() { # ARCHIVE DEST (after check_tar)
    mkdir -p -- "$2"
    tar -xzf "$1" -C "$2" --no-same-owner --no-same-permissions
}

key_fingerprint() { # the same as installer.bundle.key_fingerprint: sha256 of the DER key, 16 hex
    local fp
    fp=$(openssl pkey -pubin -in "$1" -outform DER 2>/dev/null | sha256sum) || return 1
    printf 'sha256:%s\n' "${fp:0:16}"
}

# trusted_keys: the keys to check the signature with (--pubkey, else ROOT/etc/llm/trusted-keys/*.pub), copied
# into WORK/keys; the Python installer checks the signature again with exactly these copies
trusted_keys() {
    local key i=0
    local -a found=()
    if [ "${#PUBKEYS[@]}" = 0 ] && [ -d "$ROOT/etc/llm/trusted-keys" ]; then
        for key in "$ROOT"/etc/llm/trusted-keys/*.pub; do
            if [ -f "$key" ]; then found+=("$key"); fi
        done
    else
        found=(${PUBKEYS[@]+"${PUBKEYS[@]}"})
    fi
    PUBKEYS=()
    mkdir -p -- "$WORK/keys"
    for key in ${found[@]+"${found[@]}"}; do
        if [ ! -f "$key" ] || [ ! -r "$key" ]; then
            die "cannot read the public key $key" "pass the .pub written by pack keygen"
        fi
        i=$((i + 1))
        cp -- "$key" "$WORK/keys/$i.pub"
        PUBKEYS+=("$WORK/keys/$i.pub")
    done
}

verify_signature() { # DIR (holding MANIFEST.json and .sig) -> prints the fingerprint or "insecure"
    local dir=$1 key fp tried=() ver
    ver=$(openssl version 2>/dev/null) || die "openssl is not installed" "install the openssl package"
    case "$ver" in
    "OpenSSL 0."* | "OpenSSL 1."*) die "$ver cannot check ed25519 signatures of raw files (needs OpenSSL >= 3.0)" \
        "install OpenSSL 3, or accept the bundle unchecked with --insecure" ;;
    esac
    if [ ! -f "$dir/MANIFEST.json.sig" ]; then
        if [ "$INSECURE" = 1 ]; then
            say "WARNING: the bundle is not signed; installing it anyway (--insecure)"
            echo insecure
            return 0
        fi
        die "the bundle is not signed (no MANIFEST.json.sig)" \
            "build it with \`pack build --key KEY\`, or accept it explicitly with --insecure"
    fi
    for key in ${PUBKEYS[@]+"${PUBKEYS[@]}"}; do
        [ -r "$key" ] || die "cannot read the public key $key"
        fp=$(key_fingerprint "$key") || die "$key is not a PEM public key" "pass the .pub written by pack keygen"
        tried+=("$fp")
        if openssl pkeyutl -verify -pubin -inkey "$key" -rawin -in "$dir/MANIFEST.json" \
            -sigfile "$dir/MANIFEST.json.sig" >/dev/null 2>&1; then
            echo "$fp"
            return 0
        fi
    done
    if [ "$INSECURE" = 1 ]; then
        say "WARNING: MANIFEST.json.sig does not match a trusted key; installing anyway (--insecure)"
        echo insecure
        return 0
    fi
    if [ "${#tried[@]}" = 0 ]; then
        die "no trusted public key to check the signature with" \
            "place the build host's .pub in $ROOT/etc/llm/trusted-keys/ or pass --pubkey FILE"
    fi
    die "MANIFEST.json.sig does not match MANIFEST.json for any trusted key (${tried[*]})" \
        "the manifest was modified after signing, or it was signed by a key you do not trust"
}

# ------------------------------------------------------------------ split volumes
# A split bundle is read in place, never joined: install.sh copies into WORK only what it runs or unpacks itself
# (MANIFEST.json and its .sig, SPLIT.json, install.sh, the installer and runtime archives), each piece checked
# against its volume's VOLUME.sha256 on the way and the whole copy against MANIFEST.json; the Python installer
# reads the environments and models straight from their pieces (their sha256 in MANIFEST.json covers every byte).

declare -gA PIECES=() VOLUME_AT=() VOLUME_SUMS=() VOLUME_READ=()
VOLUME_NAMES=()
FIRST_VOLUME=""

# split_load FIRST_VOLUME: one read of SPLIT.json into WORK/verified (checked against volume 1's VOLUME.sha256);
# the volume names, and each artifact's pieces into PIECES[path] ("volume<TAB>name<TAB>size" lines, in order).
# SPLIT.json is not signed: it only says where to look, and every name it gives is checked before use.
split_load() {
    local first=$1 info=$WORK/verified/SPLIT.json n name file vol off size pos p pieces
    local -A reach=()
    FIRST_VOLUME=$first
    mkdir -p -- "$WORK/verified"
    if [ ! -f "$first/SPLIT.json" ] || [ -L "$first/SPLIT.json" ] || ! read_plain "$first/SPLIT.json" >"$info"; then
        die "$first/SPLIT.json: not a regular file" "copy the first volume again"
    fi
    json_load "$info" || die "$first/SPLIT.json: not valid JSON ($JSON_ERROR)" "copy the first volume again"
    n=$(json_value "$info" volumes)
    if ! [[ $n =~ ^[0-9]+$ ]] || [ "$n" -lt 1 ]; then
        die "$first/SPLIT.json: no volume count" "copy the first volume again"
    fi
    mapfile -t VOLUME_NAMES < <(json_list "$info" volume_names)
    [ "${#VOLUME_NAMES[@]}" = "$n" ] || die "$first/SPLIT.json: volume list does not match the count"
    for name in "${VOLUME_NAMES[@]}"; do
        if ! [[ $name =~ ^[A-Za-z0-9][A-Za-z0-9._+-]*$ ]]; then
            die "$first/SPLIT.json: unsafe volume name '$name'" "the volumes were not written by pack split"
        fi
    done
    pieces=$(json_pieces "$info") || die "$first/SPLIT.json: a malformed pieces entry" \
        "the volumes were not written by pack split"
    while IFS=$'\t' read -r file name vol off size; do
        [ -n "$file$name" ] || continue
        for p in "$file" "$name"; do
            safe_relpath "$p" || die "$first/SPLIT.json: unsafe piece name '$p'" "the volumes were not written by pack split"
        done
        if [ "$name" != "$file" ] && ! [[ ${name#"$file"} =~ ^\.part[0-9]{4}$ ]]; then
            die "$first/SPLIT.json: '$name' is not a piece of '$file'" "the volumes were not written by pack split"
        fi
        if ! [[ $vol =~ ^[0-9]+$ && $off =~ ^[0-9]+$ && $size =~ ^[0-9]+$ ]] || [ "$vol" -lt 1 ] || [ "$vol" -gt "$n" ]; then
            die "$first/SPLIT.json: piece '$name' has no usable volume, offset and size" \
                "the volumes were not written by pack split"
        fi
        pos=${reach[$file]-0}
        [ "$off" = "$pos" ] || die "$first/SPLIT.json: the pieces of '$file' do not follow each other" \
            "the volumes were not written by pack split"
        reach[$file]=$((pos + size))
        PIECES[$file]+="$vol"$'\t'"$name"$'\t'"$size"$'\n'
    done <<<"$pieces"
    VOLUME_AT[1]=$first
    volume_check_copy 1 SPLIT.json "$info"
}

# volume_dir N: the directory of volume N into VOLUME (beside volume 1, or in/at a --volumes DIR); on a terminal
# the operator is asked to mount a missing one, else install.sh stops naming it
volume_dir() {
    local i=$1 name=${VOLUME_NAMES[$1 - 1]} d answer
    while [ -z "${VOLUME_AT[$i]-}" ]; do
        for d in "$(dirname -- "$FIRST_VOLUME")/$name" ${VOLUME_DIRS[@]+"${VOLUME_DIRS[@]}"}; do
            if [ "$(basename -- "$d")" != "$name" ]; then d=$d/$name; fi
            if [ -f "$d/VOLUME.sha256" ] && [ ! -L "$d/VOLUME.sha256" ]; then
                VOLUME_AT[$i]=$d
                break
            fi
        done
        [ -z "${VOLUME_AT[$i]-}" ] || break
        if [ -t 0 ] && [ -t 2 ]; then
            printf '\nvolume %s of %s (%s) is needed now: mount it as %s\n  press Enter when it is mounted (q to stop): ' \
                "$i" "${#VOLUME_NAMES[@]}" "$name" "$(dirname -- "$FIRST_VOLUME")/$name" >&2
            if read -r answer && [ "$answer" != q ]; then continue; fi
        fi
        die "volume $i of ${#VOLUME_NAMES[@]} ($name) not found" \
            "mount it beside $FIRST_VOLUME, or pass the directory holding it with --volumes DIR; then run the same command again"
    done
    VOLUME=${VOLUME_AT[$i]}
    [ -n "${VOLUME_READ[$i]-}" ] || say "volume $i/${#VOLUME_NAMES[@]}: $VOLUME"
    VOLUME_READ[$i]=1
}

# volume_sum N NAME: NAME's sha256 in volume N's VOLUME.sha256 into SUM (the file is read once per volume)
volume_sum() {
    local i=$1 line want name
    volume_dir "$i"
    if [ -z "${VOLUME_SUMS[$i:]+x}" ]; then
        [ -f "$VOLUME/VOLUME.sha256" ] || die "volume $i ($VOLUME): no VOLUME.sha256" "copy that volume again"
        VOLUME_SUMS[$i:]=1
        while IFS= read -r line; do
            want=${line%%  *}
            name=${line#*  }
            if ! [[ $want =~ ^[0-9a-f]{64}$ ]] || ! safe_relpath "$name"; then
                die "volume $i ($VOLUME): bad line in VOLUME.sha256"
            fi
            VOLUME_SUMS[$i:$name]=$want
        done < <(read_plain "$VOLUME/VOLUME.sha256")
    fi
    SUM=${VOLUME_SUMS[$i:$2]-}
    [ -n "$SUM" ] || die "volume $i ($VOLUME): $2 is not listed in its VOLUME.sha256" "copy that volume again"
}

# volume_check_copy N NAME COPY: the private COPY of volume N's file NAME is the one its VOLUME.sha256 lists
volume_check_copy() {
    local got
    volume_sum "$1" "$2"
    got=$(sha256sum <"$3")
    [ "${got%% *}" = "$SUM" ] || die "volume $1 ($VOLUME): $2 is corrupted (sha256 mismatch)" \
        "this disk's copy is damaged: copy volume $1 again from the build host"
}

# volume_plain N NAME: NAME is a regular file under volume N, reached through no symlink (into PIECE)
volume_plain() {
    local p=$VOLUME rest=$2 part
    while [ -n "$rest" ]; do
        part=${rest%%/*}
        if [ "$part" = "$rest" ]; then rest=""; else rest=${rest#*/}; fi
        p=$p/$part
        [ ! -L "$p" ] || die "volume $1 ($VOLUME): $2: ${p#"$VOLUME"/} is a symlink" "copy that volume again"
    done
    [ -f "$p" ] || die "volume $1 ($VOLUME): $2 is missing" "copy that volume again"
    PIECE=$p
}

# fetch_pieces REL DEST: one read of each piece of REL, in order, into the private DEST, each piece hashed on the
# way against its volume's VOLUME.sha256 (fetch_verified then checks DEST against MANIFEST.json)
fetch_pieces() {
    local rel=$1 dest=$2 vol name size got
    if [ -z "${PIECES[$rel]+x}" ] && [ "$rel" = install.sh ]; then
        PIECES[$rel]="1"$'\t'"install.sh"$'\t'"?"$'\n' # whole on volume 1, beside SPLIT.json
    fi
    [ -n "${PIECES[$rel]-}" ] || die "$rel is on no volume (SPLIT.json)" "the volumes were not written by pack split"
    : >"$dest"
    while IFS=$'\t' read -r vol name size; do
        [ -n "$vol" ] || continue
        volume_sum "$vol" "$name"
        volume_plain "$vol" "$name"
        got=$(read_plain "$PIECE" | tee -a -- "$dest" | sha256sum) || die "volume $vol: cannot copy $name to $dest" \
            "is there enough space in the work directory ($WORK)? use --workdir DIR"
        [ "${got%% *}" = "$SUM" ] || die "volume $vol ($VOLUME): $name is corrupted (sha256 mismatch)" \
            "this disk's copy is damaged: copy volume $vol again from the build host"
    done <<<"${PIECES[$rel]}"
}

# io_summary: the I/O of this install, install.sh and every process it ran (a reaped child's counts are added to
# its parent's /proc/PID/io): bytes read from and written to storage, and through read(2)/write(2)
io_summary() {
    local k v rb=0 wb=0 rc=0 wc=0
    [ -r "/proc/$$/io" ] || return 0
    while read -r k v; do
        case "$k" in read_bytes:) rb=$v ;; write_bytes:) wb=$v ;; rchar:) rc=$v ;; wchar:) wc=$v ;; esac
    done <"/proc/$$/io"
    say "I/O of this install (install.sh and every process it ran, /proc/$$/io): $(mb "$rb") read from storage," \
        "$(mb "$wb") written (read_bytes $rb, write_bytes $wb, rchar $rc, wchar $wc)"
}

mb() { printf '%d.%d MB' $(($1 / 1000000)) $((($1 % 1000000) / 100000)); }

# ------------------------------------------------------------------ the installed copy (no bundle needed)

installed_python() { # ROOT -> python of the runtime an earlier install kept
    local rt=$1/opt/llm/runtime/current f
    for f in "$rt"/bin/python3.[0-9]*; do
        case "$(basename -- "$f")" in python3.[0-9] | python3.[0-9][0-9]) ;; *) continue ;; esac
        if [ -x "$f" ]; then
            printf '%s\n' "$f"
            return 0
        fi
    done
    return 1
}

run_python() { # PYTHON INSTALLER_DIR ARGS...: the installer on a verified Python, isolated (-I)
    local py=$1 dir=$2 rc=0
    shift 2
    "$py" -I -c 'import sys; sys.path.insert(0, sys.argv.pop(1)); from installer.cli import main; sys.exit(main())' \
        "$dir" "$@" || rc=$?
    return "$rc"
}

main() {
    local action=install bundle="" workdir="" script_dir manifest fp py rt_art rt_py rt_sha inst_art key entry provided rc=0
    local -a pass=()
    PUBKEYS=()
    VOLUME_DIRS=()
    INSECURE=0
    ROOT=/
    while [ $# -gt 0 ]; do
        case "$1" in
        -h | --help) usage; exit 0 ;;
        --pubkey) [ $# -ge 2 ] || die "--pubkey needs a FILE" "" 2; PUBKEYS+=("$2"); shift ;;
        --insecure) INSECURE=1 ;;
        --check) action=check ;;
        --rollback) action=rollback ;;
        --uninstall) action=uninstall ;;
        --status) action=status ;;
        --inventory) action=inventory ;;
        --clean) action=clean ;;
        bench)
            action=bench
            shift
            while [ $# -gt 0 ]; do
                case "$1" in
                --root) [ $# -ge 2 ] || die "--root needs a DIR" "" 2; ROOT=$2; shift ;;
                *) pass+=("$1") ;;
                esac
                shift
            done
            break
            ;;
        --root) [ $# -ge 2 ] || die "--root needs a DIR" "" 2; ROOT=$2; shift ;;
        --workdir) [ $# -ge 2 ] || die "--workdir needs a DIR" "" 2; workdir=$2; shift ;;
        --bundle) [ $# -ge 2 ] || die "--bundle needs a DIR" "" 2; bundle=$2; shift ;;
        --volumes)
            shift
            while [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; do VOLUME_DIRS+=("$1"); shift; done
            continue
            ;;
        --skip-check | --name | --lock-timeout | --health-timeout | --overrides)
            [ $# -ge 2 ] || die "$1 needs a value" "" 2
            pass+=("$1" "$2")
            shift
            ;;
        --dry-run | --enable | --start | --allow-downgrade | --json) pass+=("$1") ;;
        *) die "unknown option: $1" "see bash install.sh --help" 2 ;;
        esac
        shift
    done
    if [ "$ROOT" != / ]; then
        mkdir -p -- "$ROOT"
        ROOT=$(cd -- "$ROOT" && pwd -P)
    fi
    script_dir=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
    bundle=${bundle:-$script_dir}
    bundle=$(cd -- "$bundle" && pwd -P) || die "no such bundle directory: $bundle"

    # rollback, uninstall, status: the runtime and installer an earlier install kept
    if [ "$action" != install ] && [ "$action" != check ]; then
        if py=$(installed_python "$ROOT") && [ -d "$ROOT/opt/llm/installer/current/installer" ]; then
            run_python "$py" "$ROOT/opt/llm/installer/current" "$action" --root "$ROOT" \
                ${pass[@]+"${pass[@]}"} || rc=$?
            exit "$rc"
        fi
        if [ ! -f "$bundle/MANIFEST.json" ] && [ ! -f "$bundle/SPLIT.json" ]; then
            if [ "$action" = status ]; then
                say "nothing is installed under $ROOT"
                exit 0
            fi
            die "nothing is installed under $ROOT (no $ROOT/opt/llm/runtime/current)" \
                "there is nothing to $action"
        fi
    fi

    if [ -n "$workdir" ]; then
        mkdir -p -- "$workdir"
        WORK=$(mktemp -d "$workdir/llm-install.XXXXXX")
    else
        WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/llm-install.XXXXXX")
    fi
    chmod 700 "$WORK"
    trap cleanup EXIT
    trap 'exit 130' INT TERM

    if [ -f "$bundle/SPLIT.json" ]; then
        say "split volumes: each artifact is read in place from its pieces (nothing is joined)"
        split_load "$bundle"
    fi
    [ -f "$bundle/MANIFEST.json" ] || die "$bundle: no MANIFEST.json: not a bundle" \
        "run the install.sh inside the bundle directory (or the first volume of a split bundle)"

    # 1. the signature, on a private copy (the bundle may sit on a disk others can write)
    mkdir -p -- "$WORK/verified"
    read_plain "$bundle/MANIFEST.json" >"$WORK/verified/MANIFEST.json" ||
        die "$bundle/MANIFEST.json: cannot read it (a symlink or a special file?)" "copy the bundle again"
    if [ -n "$FIRST_VOLUME" ]; then volume_check_copy 1 MANIFEST.json "$WORK/verified/MANIFEST.json"; fi
    if [ -f "$bundle/MANIFEST.json.sig" ]; then
        read_plain "$bundle/MANIFEST.json.sig" >"$WORK/verified/MANIFEST.json.sig" ||
            die "$bundle/MANIFEST.json.sig: cannot read it (a symlink or a special file?)" "copy the bundle again"
        if [ -n "$FIRST_VOLUME" ]; then volume_check_copy 1 MANIFEST.json.sig "$WORK/verified/MANIFEST.json.sig"; fi
    fi
    trusted_keys
    fp=$(verify_signature "$WORK/verified")
    manifest=$WORK/verified/MANIFEST.json
    json_load "$manifest" || die "MANIFEST.json: not valid JSON ($JSON_ERROR)" \
        "the bundle was built broken: rebuild it with pack build"
    [ "$(json_value "$manifest" format_version)" = 1 ] || die "unsupported bundle format (MANIFEST.json)" \
        "use the install.sh that came with the bundle"
    say "bundle $(json_value "$manifest" bundle.name) $(json_value "$manifest" bundle.version):" \
        "signature $([ "$fp" = insecure ] && echo 'NOT checked (--insecure)' || echo "verified with key $fp")"

    # 2. the bootstrap's own files: one read of each into WORK, then the hash, the member check and the
    #    extraction of that private copy (never the bundle's copy again)
    if manifest_artifact "$manifest" install.sh >/dev/null; then
        fetch_verified "$bundle" "$manifest" install.sh "$WORK/install.sh"
    fi
    inst_art=$(json_value "$manifest" installer.artifact)
    safe_relpath "$inst_art" || die "MANIFEST.json names no usable installer archive"
    fetch_verified "$bundle" "$manifest" "$inst_art" "$WORK/verified/$inst_art"
    check_tar "$WORK/verified/$inst_art"
    extract_tar "$WORK/verified/$inst_art" "$WORK/installer"
    [ -f "$WORK/installer/installer/cli.py" ] || die "$inst_art does not hold the installer package"

    rt_art=$(json_value "$manifest" runtime.artifact)
    if [ -n "$rt_art" ]; then
        rt_py=$(json_value "$manifest" runtime.python)
        safe_relpath "$rt_art" || die "MANIFEST.json names an unusable runtime archive"
        [[ $rt_py =~ ^bin/python3(\.[0-9]+)?$ ]] || die "MANIFEST.json names an unusable runtime python: $rt_py"
        entry=$(manifest_artifact "$manifest" "$rt_art") || die "$rt_art is not listed in MANIFEST.json" \
            "the bundle is incomplete or was not built by pack build"
        read -r rt_sha _ provided <<<"$entry"
        if [ "$provided" = target ]; then
            # a delta bundle: the runtime an earlier install verified and kept, named by that archive's sha256
            [[ $rt_sha =~ ^[0-9a-f]{64}$ ]] || die "MANIFEST.json: the entry of $rt_art has no usable sha256"
            py=${ROOT%/}/opt/llm/runtime/${rt_sha:0:16}/$rt_py
            if [ ! -x "$py" ] || [ -L "${ROOT%/}/opt/llm/runtime/${rt_sha:0:16}" ]; then
                die "this delta bundle needs the installer runtime ${rt_sha:0:16} installed here (it was built against an install that has it), and ${ROOT%/}/opt/llm/runtime/${rt_sha:0:16} is not there" \
                    "install the full bundle (pack build without --against), or the bundle this delta was built against first (pack inspect shows it)"
            fi
            say "delta bundle: using the installer runtime an earlier install verified: $py"
        else
            fetch_verified "$bundle" "$manifest" "$rt_art" "$WORK/verified/$rt_art"
            check_tar "$WORK/verified/$rt_art"
            extract_tar "$WORK/verified/$rt_art" "$WORK/runtime"
            py=$WORK/runtime/$rt_py
        fi
    else
        py=$(installed_python "$ROOT") || die "this bundle carries no Python and none was installed before" \
            "install a bundle with an environment first (it brings the installer's Python), then this one"
        say "using the installer runtime of an earlier install: $py"
    fi
    "$py" -I -c 'import zstandard, hashlib, tarfile' >/dev/null 2>&1 || die "the installer's Python ($py) does not run here" \
        "is this server's architecture/glibc what the bundle targets? see MANIFEST.json target"

    # 3. the Python installer does the rest
    #    (it checks MANIFEST.json.sig again itself, with the same keys: nothing on its command line says "verified")
    if [ "$action" != install ] && [ "$action" != check ]; then # nothing installed yet: the bundle's installer
        run_python "$py" "$WORK/installer" "$action" --root "$ROOT" ${pass[@]+"${pass[@]}"} || rc=$?
        exit "$rc"
    fi
    if [ "$action" = install ]; then pass+=(--bootstrap "$WORK"); fi
    for key in ${PUBKEYS[@]+"${PUBKEYS[@]}"}; do pass+=(--pubkey "$key"); done
    if [ "$INSECURE" = 1 ]; then pass+=(--insecure); fi
    #    split volumes: --bundle is volume 1 (the others beside it or under --volumes), read in place
    if [ -n "$FIRST_VOLUME" ] && [ "${#VOLUME_DIRS[@]}" -gt 0 ]; then pass+=(--volumes "${VOLUME_DIRS[@]}"); fi
    run_python "$py" "$WORK/installer" "$action" --bundle "$bundle" --manifest "$manifest" \
        --root "$ROOT" ${pass[@]+"${pass[@]}"} || rc=$?
    if [ "$action" = install ] && [ "$rc" = 0 ]; then io_summary; fi
    exit "$rc"
}

# sourced (tests call the functions), main is not run
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    main "$@"
fi
