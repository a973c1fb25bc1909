# The operator's policy: exactly what `keyd vault setup` needs for config.example.toml (AppRole at
# auth/approle, policy and role "keyd", the key at secret/talkjs/live), including --store-key,
# --new-secret-id and --wrap-ttl (sys/wrapping/lookup needs no token). The test suite runs each
# documented step with a token holding only this policy, and checks that every block is needed.
#
#   bao policy write keyd-operator deploy/vault/operator-policy.hcl    (or: vault policy write ...)
#   bao token create -policy=keyd-operator -no-default-policy -ttl=1h  (a token for one setup run)
#
# With another auth mount (vault.auth.mount), --role, --policy or app path, change the names below.
# What it does not allow: reading or writing any other secret, other policies or roles, sys/ beyond
# the AppRole mount, creating tokens. Without --store-key the last block can go; once AppRole is
# enabled, the sys/auth/approle block can go too.

# Is AppRole enabled? (GET sys/auth), and enable it if not (needs sudo, as `bao auth enable` does).
path "sys/auth" {
  capabilities = ["read"]
}
path "sys/auth/approle" {
  capabilities = ["create", "update", "sudo"]
}

# keyd's own policy, generated from the config: read it to compare, write it when it differs.
path "sys/policy/keyd" {
  capabilities = ["read", "create", "update"]
}

# keyd's AppRole role, its role_id, and its secret_ids (issue, and look up whether the one in
# /etc/keyd/secret-id is still valid).
path "auth/approle/role/keyd" {
  capabilities = ["read", "create", "update"]
}
path "auth/approle/role/keyd/role-id" {
  capabilities = ["read"]
}
path "auth/approle/role/keyd/secret-id" {
  capabilities = ["update"]
}
path "auth/approle/role/keyd/secret-id/lookup" {
  capabilities = ["update"]
}

# --store-key default: read the current version (to keep the secret's other fields and write with
# check-and-set) and write the new one.
path "secret/data/talkjs/live" {
  capabilities = ["read", "create", "update"]
}
