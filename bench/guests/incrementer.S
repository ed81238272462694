# Incrementer: 32-bit protected mode, ring 0. Zeroes the first byte of every
# 4 KiB page of [1 MiB, END), writes 0 to the pass counter (u32 at 0x7e00),
# prints "INC\n", then forever: increments the first byte of each page in
# order, increments the pass counter, and prints '.' every N passes.
# Invariant at any pause, with P = the pass counter: the page bytes read
# P+1 for the pages before the writer and P from it on (mod 256); a pass
# that just ended but was not counted yet reads P+1 everywhere. A ',' marks
# the end of every 16 MiB of a pass (and of its last, shorter, chunk).
.set MARK, 0x1000000
.intel_syntax noprefix
.include "common.inc"
.code16
.text
start:
    ENTER_PM pm
.code32
pm:
    FLAT_SEGS
    mov ecx, [P_END]
    mov ebx, FIRST
zero:
    mov byte ptr [ebx], 0
    add ebx, 4096
    cmp ebx, ecx
    jb zero
    mov dword ptr [0x7e00], 0
    PUTS BASE + banner
    mov dx, COM1
    mov edi, [P_N]
outer:
    mov ebx, FIRST
chunk:
    # The pass goes in chunks of MARK bytes, a ',' after each: how far a
    # pass got is visible on the serial port without an extra instruction
    # per page (the harness times the guest's speed with them).
    lea esi, [ebx + MARK]
    cmp esi, ecx
    jbe pass
    mov esi, ecx
pass:
    inc byte ptr [ebx]
    add ebx, 4096
    cmp ebx, esi
    jb pass
    mov al, ','
    out dx, al
    cmp ebx, ecx
    jb chunk
    inc dword ptr [0x7e00]
    dec edi
    jnz outer
    mov edi, [P_N]
    mov al, '.'
    out dx, al
    jmp outer
banner:
    .asciz "INC\n"
.p2align 3
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff
    .quad 0x00cf92000000ffff
gdt_desc:
    .word 23
    .long BASE + gdt
    PARAMS 1
