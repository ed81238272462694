# Filler: fills [1 MiB, END) once with pseudo-random pages, prints "DONE\n"
# on COM1, then halts forever with interrupts off.
# Page i (at 1 MiB + 4096 i) holds 1024 copies of the (i+1)-th output of
# xorshift32 (x ^= x << 13; x ^= x >> 17; x ^= x << 5) started from SEED.
# Ring-0 code is emulated on nested-PVM hosts (thousands of times slower
# than ring 3), so each page is written with one `rep stosd` rather than a
# word-by-word loop. A ring-3 fill was tried: enabling paging from 32-bit
# guest code (which ring 3 needs there) shuts the VM down on these hosts.
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
