#!/bin/sh
# Assembles the harness guests into 512-byte boot sectors (needs binutils).
# The .bin files are checked in; run this after editing a .S file:
#   sh bench/guests/build.sh
set -eu
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for g in incrementer filler idle; do
    as --32 -o "$tmp/$g.o" "$g.S"
    ld -m elf_i386 -Ttext=0 -e 0 --oformat binary -o "$g.bin" "$tmp/$g.o"
    size=$(wc -c < "$g.bin")
    [ "$size" -eq 512 ] || { echo "$g.bin is $size bytes, not 512" >&2; exit 1; }
done
echo "built incrementer.bin filler.bin idle.bin"
