#!/bin/bash
# The cachemount Buildkite plugin: what the pre-command and post-command hooks
# do. Configuration comes as BUILDKITE_PLUGIN_CACHEMOUNT_<OPTION> variables
# (arrays as _0, _1, ...); what pre-command found reaches post-command in
# exported CACHEMOUNT_PLUGIN_* variables (the agent carries a hook's exports to
# the later hooks of the job). A cache that cannot be had or saved is a
# warning, never a failed build; a missing binary or a bad option fails the job.
# Like a restore, a mount replaces what the agent left at the paths (`--force`:
# the old content is hidden while mounted).

cm_fail() {
  echo "cachemount plugin: $*" >&2
  exit 1
}

cm_warn() {
  echo "cachemount plugin: warning: $*" >&2
}

# The values of an option that may be a string or an array.
cm_list() {
  local name="BUILDKITE_PLUGIN_CACHEMOUNT_$1" i=0
  if [ -n "${!name:-}" ]; then
    printf '%s\n' "${!name}"
    return
  fi
  while true; do
    local item="${name}_${i}"
    [ -n "${!item+set}" ] || break
    printf '%s\n' "${!item}"
    i=$((i + 1))
  done
}

# One field of the one-line JSON that `cachemount --json` prints (strings
# and numbers; null prints nothing).
cm_field() {
  sed -n "s/.*\"$1\":\"\{0,1\}\([^\",}]*\)\"\{0,1\}[,}].*/\1/p" <<<"$2" | sed 's/^null$//'
}

cm_setup() {
  CM_BIN="${BUILDKITE_PLUGIN_CACHEMOUNT_BINARY:-cachemount}"
  if ! command -v "$CM_BIN" >/dev/null 2>&1; then
    cm_fail "the cachemount binary ($CM_BIN) is not on PATH: install it on the agent (cargo install --locked --git <cachemount repository>, see the README's Install section) or set the plugin's binary option"
  fi
  CM_KEY="${BUILDKITE_PLUGIN_CACHEMOUNT_KEY:-}"
  [ -n "$CM_KEY" ] || cm_fail "set the key option"
  mapfile -t CM_PATHS < <(cm_list PATHS)
  [ ${#CM_PATHS[@]} -gt 0 ] || cm_fail "set the paths option (the paths the cache holds)"
  mapfile -t CM_FALLBACKS < <(cm_list FALLBACK)
  CM_SAVE="${BUILDKITE_PLUGIN_CACHEMOUNT_SAVE:-on-miss}"
  case "$CM_SAVE" in
    always | on-miss | never) ;;
    *) cm_fail "save must be always, on-miss or never (not \"$CM_SAVE\")" ;;
  esac
  case "${BUILDKITE_PLUGIN_CACHEMOUNT_WRITABLE:-false}" in
    true) CM_WRITABLE=true ;;
    false) CM_WRITABLE=false ;;
    *) cm_fail "writable must be true or false" ;;
  esac
  if [ -n "${BUILDKITE_PLUGIN_CACHEMOUNT_STORE:-}" ]; then
    export CACHEMOUNT_STORE="$BUILDKITE_PLUGIN_CACHEMOUNT_STORE"
  fi
}

# What was done with the paths, in words.
cm_how() {
  case "$1" in
    mount) echo "mounted" ;;
    restore) echo "restored" ;;
    *) echo "no cache for" ;;
  esac
}

cachemount_pre_command() {
  cm_setup
  local args=(--key "$CM_KEY") f out rc mode
  for f in "${CM_FALLBACKS[@]}"; do args+=(--fallback "$f"); done
  mode=restore
  if [ -e "${CACHEMOUNT_DEV_FUSE:-/dev/fuse}" ]; then mode=mount; fi
  rc=0
  if [ "$mode" = mount ]; then
    local mount_args=("${args[@]}" --force)
    if [ "$CM_WRITABLE" = true ]; then mount_args+=(--writable); fi
    out=$("$CM_BIN" --json --quiet mount "${mount_args[@]}" "${CM_PATHS[@]}") || rc=$?
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 3 ]; then
      cm_warn "mount failed (exit $rc): restoring instead"
      mode=restore
      rc=0
    fi
  fi
  if [ "$mode" = restore ]; then
    out=$("$CM_BIN" --json --quiet restore "${args[@]}" "${CM_PATHS[@]}") || rc=$?
  fi
  local hit
  hit=$(cm_field hit "$out")
  if [ "$rc" -eq 3 ] || [ -z "$hit" ]; then
    [ "$rc" -eq 3 ] || cm_warn "$mode failed (exit $rc): the command runs without the cache"
    hit=miss
    mode=none
  fi
  export CACHEMOUNT_PLUGIN_MODE="$mode"
  export CACHEMOUNT_PLUGIN_HIT="$hit"
  export CACHEMOUNT_PLUGIN_MATCHED_KEY
  CACHEMOUNT_PLUGIN_MATCHED_KEY=$(cm_field matched_key "$out")
  echo "--- :package: cachemount: $hit for $CM_KEY${CACHEMOUNT_PLUGIN_MATCHED_KEY:+ (matched $CACHEMOUNT_PLUGIN_MATCHED_KEY)}, $(cm_how "$mode") ${CM_PATHS[*]}"
}

cachemount_post_command() {
  cm_setup
  local mode="${CACHEMOUNT_PLUGIN_MODE:-none}" hit="${CACHEMOUNT_PLUGIN_HIT:-miss}"
  local matched="${CACHEMOUNT_PLUGIN_MATCHED_KEY:-}" status="${BUILDKITE_COMMAND_EXIT_STATUS:-1}"
  local read_bytes=0 requests=0 p out saved="not saved" style=info
  if [ "$mode" = mount ]; then
    for p in "${CM_PATHS[@]}"; do
      if out=$("$CM_BIN" --json stats "$p" 2>/dev/null); then
        local b r
        b=$(cm_field bytes_fetched "$out")
        r=$(cm_field requests "$out")
        read_bytes=$((read_bytes + ${b:-0}))
        requests=$((requests + ${r:-0}))
      fi
    done
  fi
  local want_save=false
  if [ "$status" != 0 ]; then
    saved="not saved: the command failed (exit $status)"
    style=warning
  elif [ "$CM_SAVE" = never ]; then
    saved="not saved (save: never)"
  elif [ "$CM_SAVE" = on-miss ] && [ "$hit" = exact ]; then
    saved="not saved: the key hit exactly"
  elif [ "$mode" = mount ] && [ "$CM_WRITABLE" = false ]; then
    saved="not saved: a read-only mount cannot change (set writable: true to update a fallback hit)"
  else
    want_save=true
  fi
  if $want_save; then
    if out=$("$CM_BIN" --json --quiet save --key "$CM_KEY" "${CM_PATHS[@]}"); then
      saved="saved as $CM_KEY: $(cm_field archive_size "$out") bytes archive, $(cm_field bytes_uploaded "$out") bytes uploaded"
    else
      saved="save failed (see the log above)"
      style=warning
    fi
  fi
  if [ "$mode" = mount ]; then
    for p in "${CM_PATHS[@]}"; do
      "$CM_BIN" umount "$p" || "$CM_BIN" umount --lazy "$p" || cm_warn "cannot unmount $p"
    done
  fi
  local summary
  summary="**cachemount** \`$CM_KEY\`: **$hit**${matched:+ (matched \`$matched\`)}, $(cm_how "$mode") ${CM_PATHS[*]}"
  if [ "$mode" = mount ]; then
    summary+="; read $read_bytes bytes in $requests requests"
  fi
  summary+="; $saved"
  echo "$summary"
  if command -v buildkite-agent >/dev/null 2>&1; then
    buildkite-agent annotate --style "$style" --context "cachemount-$CM_KEY" "$summary" ||
      cm_warn "cannot annotate the build"
  fi
}
