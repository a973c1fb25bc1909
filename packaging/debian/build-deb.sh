#!/bin/sh
# Build dist/keyd_<version>-1_<arch>.deb from this checkout: `make deb` runs it.
#
# The package holds a private virtualenv at /opt/keyd/venv with keyd and the exact dependency
# versions pip resolves now (wheels from PyPI, or the local index pip is configured with), built
# with the Debian python3 it will run on (/usr/bin/python3 here; Depends: pins its minor version,
# since uvloop, httptools and cryptography are compiled for it). Nothing of keyd's is hard-coded:
# the wheel is built from pyproject.toml and pip installs what it declares. See docs/deploy.md.
#
# Usage: build-deb.sh OUTDIR [PIP]   (PIP: a pip >= 22.3 to run with --python; default: python3 -m pip)
set -eu

outdir=$(realpath "${1:?usage: build-deb.sh OUTDIR [PIP]}")
pip=${2:-}
here=$(cd "$(dirname "$0")" && pwd)
src=$(cd "$here/../.." && pwd)
python=${DEB_PYTHON:-/usr/bin/python3}

command -v dpkg-deb >/dev/null || { echo "build-deb: dpkg-deb is missing (apt-get install dpkg)" >&2; exit 1; }
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    { echo "build-deb: $python is not Python 3.11 or newer" >&2; exit 1; }
"$python" -c 'import venv' 2>/dev/null ||
    { echo "build-deb: $python has no venv module (apt-get install python3-venv)" >&2; exit 1; }
[ -n "$pip" ] || pip="$python -m pip"

version=$("$python" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$src/pyproject.toml")
pyver=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
pynext=$("$python" -c 'import sys; print("%d.%d" % (sys.version_info[0], sys.version_info[1] + 1))')
arch=$(dpkg --print-architecture)
debversion="$version-1"

work=$(mktemp -d /tmp/keyd-deb.XXXXXX)
trap 'rm -rf "$work"' EXIT
root="$work/root"
venv="$root/opt/keyd/venv"

# 1. keyd's wheel, built from a copy of what pyproject.toml builds from (no build/ or egg-info
#    lands in the checkout).
mkdir -p "$work/src" "$work/wheels"
cp -a "$src/pyproject.toml" "$src/README.md" "$src/keyd" "$work/src/"
find "$work/src" -name __pycache__ -prune -exec rm -rf {} +
$pip wheel --quiet --no-deps --wheel-dir "$work/wheels" "$work/src"

# 2. The private virtualenv, at its final path inside the staging root. No pip inside: nothing
#    gets installed into it after the build. Console scripts get their final interpreter path.
"$python" -m venv --without-pip "$venv"
$pip --python "$venv/bin/python" install --quiet --no-compile --no-warn-script-location \
    --disable-pip-version-check "$work"/wheels/keyd-*.whl
"$venv/bin/python" -c 'import keyd.cli, keyd.daemon.wiring' # every import `keyd run` needs resolves
for script in "$venv"/bin/*; do
    [ -L "$script" ] && continue
    if head -c 2 "$script" | grep -q '^#!'; then
        sed -i "1s|^#!$root|#!|" "$script"
    fi
done
rm -f "$venv"/bin/activate* "$venv"/bin/Activate.ps1
# Byte-compile with the installed paths in the code objects (tracebacks name /opt/keyd/...); the
# tree is read-only to keyd (ProtectSystem=strict), so it could not write these itself.
"$venv/bin/python" -m compileall -q -j 0 -s "$root" -p / "$venv/lib" >/dev/null
# The venv's home is the system interpreter, as on the target.
grep -q "^home = $(dirname "$python")\$" "$venv/pyvenv.cfg"
sed -i "s|$root||g" "$venv/pyvenv.cfg"
find "$venv" -name direct_url.json -delete

# 3. The rest of the file system.
install -d "$root/usr/bin" "$root/lib/systemd/system" "$root/usr/lib/sysusers.d" \
    "$root/etc/keyd" "$root/etc/logrotate.d" "$root/usr/share/doc/keyd/examples"
ln -s /opt/keyd/venv/bin/keyd "$root/usr/bin/keyd"
install -m 0644 "$src/deploy/systemd/keyd.service" "$src/deploy/systemd/keyd.socket" "$root/lib/systemd/system/"
grep -q '^ExecStart=/usr/bin/keyd ' "$root/lib/systemd/system/keyd.service" ||
    { echo "build-deb: keyd.service's ExecStart= is not /usr/bin/keyd" >&2; exit 1; }
install -m 0644 "$here/keyd.sysusers" "$root/usr/lib/sysusers.d/keyd.conf"
install -m 0644 "$here/keyd.logrotate" "$root/etc/logrotate.d/keyd"
# /etc/keyd/config.toml: config.example.toml (every option, commented) with the credential paths
# that keyd.service's LoadCredential= provides, the audit log in LogsDirectory= (logrotated) and the
# example grants commented out (packaged-config.sh).
sh "$here/packaged-config.sh" "$src/config.example.toml" >"$root/etc/keyd/config.toml"
[ "$(grep -c -e 'CREDENTIALS_DIRECTORY}/\(role\|secret\)-id"$' -e '^file = "/var/log/keyd/audit.log"$' \
    "$root/etc/keyd/config.toml")" = 3 ] ||
    { echo "build-deb: config.example.toml no longer has role_id_file, secret_id_file and audit.file as expected" >&2; exit 1; }
sed -i '1i # keyd configuration (installed by the keyd package; dpkg keeps your changes on upgrade).\n# Check it with: keyd check-config -c /etc/keyd/config.toml\n' "$root/etc/keyd/config.toml"
chmod 0644 "$root/etc/keyd/config.toml"
doc="$root/usr/share/doc/keyd"
install -m 0644 "$src/README.md" "$doc/README.md"
install -m 0644 "$src/docs/deploy.md" "$doc/deploy.md"
install -m 0644 "$src/config.example.toml" "$src/deploy/vault/keyd-policy.hcl" \
    "$src/deploy/vault/operator-policy.hcl" "$doc/examples/"
install -m 0644 "$here/copyright" "$doc/copyright"
printf 'keyd (%s) unstable; urgency=medium\n\n  * Built from the keyd checkout (%s).\n\n -- keyd maintainers <keyd@localhost>  %s\n' \
    "$debversion" "$(git -C "$src" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    "$(date -R -d "@${SOURCE_DATE_EPOCH:-$(date +%s)}")" | gzip -9n >"$doc/changelog.Debian.gz"

# 4. Control files.
install -d "$root/DEBIAN"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
sed -e "s|@VERSION@|$debversion|" -e "s|@ARCH@|$arch|" -e "s|@SIZE@|$size|" \
    -e "s|@PYVER@|$pyver|" -e "s|@PYNEXT@|$pynext|" "$here/control" >"$root/DEBIAN/control"
install -m 0644 "$here/conffiles" "$root/DEBIAN/conffiles"
install -m 0755 "$here/postinst" "$here/prerm" "$here/postrm" "$root/DEBIAN/"
(cd "$root" && find . \( -path ./DEBIAN -o -path ./etc \) -prune -o -type f -print0 | sed -z 's|^\./||' | sort -z |
    xargs -0 md5sum >DEBIAN/md5sums)
while read -r conffile; do
    [ -f "$root$conffile" ] || { echo "build-deb: conffile $conffile is not in the package" >&2; exit 1; }
done <"$root/DEBIAN/conffiles"

mkdir -p "$outdir"
deb="$outdir/keyd_${debversion}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "$deb"
