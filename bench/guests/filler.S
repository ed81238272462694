# Filler: fills [1 MiB, END) once with pseudo-random pages, prints "DONE\n"
# on COM1, then halts forever with interrupts off.
# Page i (at 1 MiB + 4096 i) holds 1024 copies of the (i+1)-th output of
# xorshift32 (x ^= x << 13; x ^= x >> 17; x ^= x << 5) started from SEED.
# Ring-0 code is emulated on nested-PVM hosts (thousands of times slower
# than ring 3), so each page is written with one `rep stosd` rather than a
# word-by-word loop: about 95 s per GiB there (first touch included), which
# is why the harness fills 256 MiB by default (--filler-size).
# Ring 3 was tried and is out of reach from a boot sector on these hosts:
# iret to ring 3 without paging is an emulation failure; enabling 32-bit
# paging (4 MiB pages or PAE) shuts the VM down; long mode works and fills
# 1 GiB from ring 3 in seconds, but neither `int` through the guest's IDT
# (with or without an IST stack) nor a call gate gets back to ring 0 to
# print the marker (the VM shuts down), and `out` from ring 3 faults.
.intel_syntax noprefix
.include "common.inc"
.code16
.text
start:
    ENTER_PM pm
.code32
pm:
    FLAT_SEGS
    cld
    mov ebx, [P_END]
    mov eax, [P_SEED]
    mov edi, FIRST
fill:
    mov edx, eax
    shl edx, 13
    xor eax, edx
    mov edx, eax
    shr edx, 17
    xor eax, edx
    mov edx, eax
    shl edx, 5
    xor eax, edx
    mov ecx, 1024
    rep stosd
    cmp edi, ebx
    jb fill
    PUTS BASE + banner
halt:
    hlt
    jmp halt
banner:
    .asciz "DONE\n"
.p2align 3
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff
    .quad 0x00cf92000000ffff
gdt_desc:
    .word 23
    .long BASE + gdt
    PARAMS 2
