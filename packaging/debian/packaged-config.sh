#!/bin/sh
# The /etc/keyd/config.toml the Debian package ships, printed from config.example.toml ($1):
# the credential paths keyd.service's LoadCredential= provides, the audit log in LogsDirectory=,
# and the example [[grant]] tables commented out (a fresh install grants nothing beyond the
# default: user tokens for callers that can open the socket; the README's grants are examples for
# users and units this host may not have, and a www-data grant with a rate meant for one app).
set -eu
src=$1
sed -e 's|^role_id_file = "/etc/keyd/role-id"|role_id_file = "${CREDENTIALS_DIRECTORY}/role-id"|' \
    -e 's|^secret_id_file = "/etc/keyd/secret-id"|secret_id_file = "${CREDENTIALS_DIRECTORY}/secret-id"|' \
    -e 's|^file = ""$|file = "/var/log/keyd/audit.log"|' "$src" |
awk '
    /^\[\[grant\]\]/ { if (!shown) { print "# Example grants (commented out): uncomment and adapt them for your callers."; shown = 1 }
                       grant = 1 }
    /^\[/ && !/^\[\[grant\]\]/ { grant = 0 }
    grant && !/^#/ && !/^$/ { print "# " $0; next }
    { print }
'
