# Incrementer: 32-bit protected mode, ring 0. Zeroes the first byte of every
# 4 KiB page of [1 MiB, END), writes 0 to the pass counter (u32 at 0x7e00),
# prints "INC\n", then forever: increments the first byte of each page in
# order, increments the pass counter, and prints '.' every N passes.
# Invariant at any pause, with P = the pass counter: the page bytes read
# P+1 for the pages before the writer and P from it on (mod 256); a pass
# that just ended but was not counted yet reads P+1 everywhere.
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
pass:
    inc byte ptr [ebx]
    add ebx, 4096
    cmp ebx, ecx
    jb pass
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
