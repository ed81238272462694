# Idle: prints "IDLE\n" on COM1 from real mode, then halts forever with
# interrupts off. Touches no memory.
.intel_syntax noprefix
.include "common.inc"
.code16
.text
start:
    cli
    xor ax, ax
    mov ds, ax
    mov si, offset BASE + banner
    mov dx, COM1
next:
    lodsb
    test al, al
    jz halt
    out dx, al
    jmp next
halt:
    hlt
    jmp halt
banner:
    .asciz "IDLE\n"
    PARAMS 3
