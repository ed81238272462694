#!/bin/sh
# Runs every cargo-fuzz target for SECONDS each (default 600), one after
# the other, and prints a summary line per target. Needs cargo-fuzz
# (`cargo install cargo-fuzz --locked`); works on stable Rust through
# RUSTC_BOOTSTRAP=1. New coverage lands in work/<target> (not committed);
# crashes in artifacts/<target>/. Exit status 1 if any target crashed.
#
#   fuzz/run.sh            # 10 minutes per target
#   fuzz/run.sh 60 loader  # one target, one minute
set -u
cd "$(dirname "$0")"
secs=${1:-600}
shift 2>/dev/null || true
targets=${*:-"stream_reader loader loader_guard xbzrle_decode decompress control mapped_ram_header"}
export RUSTC_BOOTSTRAP=1
cargo fuzz build || exit 1
status=0
for t in $targets; do
    mkdir -p "work/$t" logs
    log="logs/$t.log"
    cargo fuzz run "$t" "work/$t" "corpus/$t" -- \
        -max_total_time="$secs" -print_final_stats=1 -rss_limit_mb=2048 >"$log" 2>&1
    rc=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1)
    if [ $rc -eq 0 ]; then verdict="clean"; else verdict="FAILED (exit $rc, see fuzz/$log)"; status=1; fi
    echo "$t: ${secs}s, ${runs:-?} runs (${rate:-?}/s), ${cov:-cov: ?}, $verdict"
done
exit $status
