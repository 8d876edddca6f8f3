# Shell quoting shared by the launch scripts (sourced, not run).

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
