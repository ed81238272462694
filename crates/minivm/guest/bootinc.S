# minivm boot-sector incrementer: loaded at 0x7c00 in real mode, enters
# 32-bit protected mode (ring 0, flat segments) and increments the first byte
# of every page in [FIRST, END) in order, forever. END is the dword at
# offset 0x1f8 of the sector (patched by the VMM); FIRST = 1 MiB.
# After each pass: dword at 0x7e00 += 1 and '.' on the serial port 0x3f8.
.intel_syntax noprefix
.code16
.section .text
start:
    cli
    xor ax, ax
    mov ds, ax
    mov ss, ax
    in al, 0x92
    or al, 2
    out 0x92, al
    lgdt [0x7c00 + gdt_desc]
    mov eax, cr0
    or eax, 1
    mov cr0, eax
    jmp 0x08:0x7c00 + pm
.code32
pm:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov esp, 0x7c00
    mov dx, 0x3f8
    mov al, 'O'
    out dx, al
    mov al, 'K'
    out dx, al
    mov al, 10
    out dx, al
    mov ecx, [0x7c00 + 0x1f8]
outer:
    mov ebx, 0x100000
pass:
    inc byte ptr [ebx]
    add ebx, 4096
    cmp ebx, ecx
    jb pass
    inc dword ptr [0x7e00]
    mov al, '.'
    out dx, al
    jmp outer
.p2align 3
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff
    .quad 0x00cf92000000ffff
gdt_desc:
    .word 23
    .long 0x7c00 + gdt
