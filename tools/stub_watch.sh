#!/usr/bin/env bash
# Log when Triton Python backend stub processes start, exit or turn zombie, until killed:
#   bash tools/stub_watch.sh OUT.log [INTERVAL_S]
# One line per change: time, "+" (new), "-" (gone) or "Z" (zombie), pid, instance name. Used by the
# GPU sweeps to tell a stub that really exited from one the server only declared unhealthy
# (tritonserver 2.51 reports "Stub process '<instance>' is not healthy" when a stub neither
# answers nor refreshes its health flag within 1 s).
set -u
out=$1
interval=${2:-0.2}
declare -A seen=()
while true; do
  declare -A now=()
  while read -r pid stat name; do
    [[ -n $pid ]] || continue
    now[$pid]="$stat $name"
    if [[ -z ${seen[$pid]:-} ]]; then
      echo "$(date +%T.%N | cut -c1-12) + $pid $name" >>"$out"
    elif [[ $stat == Z* && ${seen[$pid]} != Z* ]]; then
      echo "$(date +%T.%N | cut -c1-12) Z $pid $name" >>"$out"
    fi
  done < <(ps -eo pid=,stat=,args= | awk '$3 ~ /triton_python_backend_stub$/ {print $1, $2, $(NF-1)}')
  for pid in "${!seen[@]}"; do
    [[ -n ${now[$pid]:-} ]] || echo "$(date +%T.%N | cut -c1-12) - $pid ${seen[$pid]#* }" >>"$out"
  done
  seen=()
  for pid in "${!now[@]}"; do seen[$pid]=${now[$pid]}; done
  unset now
  sleep "$interval"
done
