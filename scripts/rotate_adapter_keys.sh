#!/usr/bin/env bash
# Rotate the key-encryption key of adaptloop's encryption at rest, for cron.
#
#   scripts/rotate_adapter_keys.sh [--keyring PATH] [--retire]
#
# Adds a new key to the keyring, re-wraps every user's data key under it
# (no adapter or dataset is re-encrypted) and says what it did. With
# --retire it then removes the keys that wrap nothing any more. Settings come
# from ADAPTLOOP_CONFIG / config/adapter_retrain.yaml as for every command;
# --keyring defaults to storage.encryption.keyring. A rotation killed midway
# loses nothing: run the script again. Exit status: adaptloop's (0 = done).
#
# Example crontab line (monthly, 03:00):
#   0 3 1 * * cd /srv/adaptloop && scripts/rotate_adapter_keys.sh --retire >> /var/log/adaptloop-keys.log 2>&1
set -euo pipefail

ADAPTLOOP="${ADAPTLOOP:-adaptloop}"
keyring=()
retire=0
while [ $# -gt 0 ]; do
    case "$1" in
        --keyring) keyring=(--keyring "$2"); shift 2 ;;
        --retire) retire=1; shift ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) rotating adaptloop's key-encryption key"
"$ADAPTLOOP" keys rotate "${keyring[@]}"
if [ "$retire" = 1 ]; then
    # `keys list` prints "<id>  old      wraps 0 data key(s)" for keys nothing depends on.
    "$ADAPTLOOP" keys list "${keyring[@]}" | awk '$2 == "old" && $4 == 0 {print $1}' | while read -r key; do
        "$ADAPTLOOP" keys retire "$key" "${keyring[@]}"
    done
fi
"$ADAPTLOOP" keys list "${keyring[@]}"
