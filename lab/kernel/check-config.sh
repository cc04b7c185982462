#!/usr/bin/env bash
# Usage: check-config.sh CONFIG FRAGMENT
# Fails (listing every offender) unless each `CONFIG_X=y` line of FRAGMENT reads `CONFIG_X=y` in
# CONFIG and each `# CONFIG_X is not set` line is not `=y`/`=m` there.
set -euo pipefail
config=$1
fragment=$2
[ -r "$config" ] || { echo "lab kernel: no config at $config" >&2; exit 1; }
bad=0
while IFS= read -r line; do
    case "$line" in
    CONFIG_*=y)
        opt=${line%%=*}
        if ! grep -qx "$opt=y" "$config"; then
            echo "lab kernel: $opt is not =y in $config" >&2
            bad=1
        fi
        ;;
    "# CONFIG_"*" is not set")
        opt=${line#\# }
        opt=${opt%% *}
        if grep -qE "^$opt=[ym]" "$config"; then
            echo "lab kernel: $opt must be off in $config" >&2
            bad=1
        fi
        ;;
    esac
done <"$fragment"
exit $bad
