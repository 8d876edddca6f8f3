# Helpers shared by the launch scripts (sourced, not run): shell quoting and argument checks.

# Quote one word for a POSIX shell: plain words stay as they are; others go in single quotes,
# or in double quotes when they hold single quotes but nothing a double-quoted string expands.
q() {
  if [[ -n "$1" && "$1" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then printf '%s' "$1"
  elif [[ "$1" != *"'"* ]]; then printf "'%s'" "$1"
  elif [[ "$1" != *[\$\`\"\\!]* ]]; then printf '"%s"' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
# Quote every argument and join them with spaces.
qa() { local out="" w; for w in "$@"; do out+="${out:+ }$(q "$w")"; done; printf '%s' "$out"; }

# Check the MODULE argument (each script defines die_usage): `check_module "$@"`.
check_module() {
  [[ $# -ge 1 ]] || die_usage "MODULE is required (e.g. cat_jax.train)"
  [[ "$1" =~ ^[A-Za-z_][A-Za-z0-9_.]*$ ]] || die_usage "MODULE must be a Python module name, got '$1'"
}
