#!/usr/bin/env bash
# Fresh-machine check: the README's two commands, exactly as the README states them, in a new
# virtualenv on a clean copy of the repository, with ../shared beside it as the tests expect.
#
#   tools/fresh_check.sh                 # the committed HEAD
#   tools/fresh_check.sh --ref v0.1      # another commit, branch or tag
#   tools/fresh_check.sh --worktree      # the working tree as it is (tracked + untracked, not ignored)
#   tools/fresh_check.sh --lowest        # every requirement pinned to its lower bound (>=X becomes ==X)
#
# CI reuses the packages its machine already has, so it cannot tell whether a new user's
# `pip install` (other torch/torchvision versions) still passes: this script can. It prints the
# torch and torchvision it resolved and exits 1 when either README command fails (2: bad usage).
# Everything (clone, venv of ~5.5 GB, pip's and pytest's temporary files) lives in one temporary
# folder that is removed at the end unless --keep; pip's download cache is the user's own.
set -euo pipefail

usage() {
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
    echo "options: --ref REF | --worktree, --lowest, --keep (leave the folder for inspection), --python PY (python3)"
}

ref=HEAD worktree=0 lowest=0 keep=0 python=python3
while [ $# -gt 0 ]; do
    case "$1" in
        --ref) [ $# -ge 2 ] || { usage >&2; exit 2; }; ref=$2; shift ;;
        --worktree) worktree=1 ;;
        --lowest) lowest=1 ;;
        --keep) keep=1 ;;
        --python) [ $# -ge 2 ] || { usage >&2; exit 2; }; python=$2; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "fresh_check: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
shared="$repo/../shared"  # where tests/conftest.py looks for the real data samples

# The README's first ```bash block holds the two commands: install + train, install + test.
mapfile -t commands < <(awk '/^```bash$/ && !seen {inside = 1; seen = 1; next} inside && /^```/ {exit}
                             inside && NF' "$repo/README.md")
if [ "${#commands[@]}" -ne 2 ]; then
    echo "fresh_check: README.md's first \`\`\`bash block should hold two commands, found ${#commands[@]}" >&2
    exit 2
fi

free_kb=$(df -Pk "${TMPDIR:-/tmp}" | awk 'NR == 2 {print $4}')
if [ "$free_kb" -lt $((10 * 1024 * 1024)) ]; then
    echo "fresh_check: less than 10 GB free under ${TMPDIR:-/tmp} (the venv alone takes ~5.5 GB)" >&2
    exit 2
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/fresh_check.XXXXXX")
cleanup() {
    if [ "$keep" = 1 ]; then echo "fresh_check: kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
mkdir -p "$work/tmp"

if [ "$worktree" = 1 ]; then
    # Tracked and untracked files that git does not ignore; a tracked file deleted in the work
    # tree is left out, as a commit of the tree would leave it out.
    mkdir "$work/main"
    (cd "$repo" && git ls-files -co --exclude-standard -z |
        while IFS= read -r -d '' f; do [ -e "$f" ] || [ -L "$f" ] && printf '%s\0' "$f"; done |
        tar --null -T - -cf -) | tar -xf - -C "$work/main"
    what="the working tree of $repo"
else
    commit=$(git -C "$repo" rev-parse --verify "$ref^{commit}")
    git clone -q --no-checkout "$repo" "$work/main"
    git -C "$work/main" checkout -q --detach "$commit"
    what="$ref ($(git -C "$repo" log -1 --format='%h %s' "$commit")) of $repo"
fi
if [ -d "$shared" ]; then
    ln -s "$(cd "$shared" && pwd -P)" "$work/shared"
else
    echo "fresh_check: no shared folder at $shared; the tests that need its data will skip"
fi

if [ "$lowest" = 1 ]; then
    # Exact pins replace the machine's own constraint file (pip reads PIP_CONSTRAINT over its
    # config), so nothing above the lower bounds can be chosen.
    sed -nE 's/^[[:space:]]*([A-Za-z0-9_.-]+)[[:space:]]*>=[[:space:]]*([^[:space:],;#]+).*/\1==\2/p' \
        "$work/main/requirements.txt" "$work/main/requirements-dev.txt" > "$work/lowest.txt"
    export PIP_CONSTRAINT="$work/lowest.txt"
fi

echo "fresh_check: $what"
echo "fresh_check: in $work/main, $("$python" --version 2>&1) venv${PIP_CONSTRAINT:+, constraints:}"
[ "$lowest" = 1 ] && sed 's/^/    /' "$work/lowest.txt"
"$python" -m venv "$work/venv"
# shellcheck disable=SC1091
source "$work/venv/bin/activate"
export TMPDIR="$work/tmp"  # pip's builds and pytest's tmp_path folders go away with the rest

status=0
results=()
for i in 0 1; do
    echo "fresh_check: \$ ${commands[$i]}"
    start=$SECONDS
    if (cd "$work/main" && bash -c "${commands[$i]}"); then code=0; else code=$?; status=1; fi
    results+=("command $((i + 1)): exit $code in $((SECONDS - start)) s: ${commands[$i]}")
    if [ "$i" = 0 ]; then
        versions=$(python -c 'import torch, torchvision; print(f"torch {torch.__version__}, torchvision {torchvision.__version__}")' 2>&1 | tail -n 1) || true
        echo "fresh_check: resolved $versions"
    fi
done

echo "fresh_check: summary for $what"
echo "fresh_check: resolved $versions"
printf 'fresh_check: %s\n' "${results[@]}"
exit "$status"
