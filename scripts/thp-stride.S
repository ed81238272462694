# Page-stride writer for scripts/thp-after.py, long mode ring 3
# (minivm --flat, load 0x1000; the script patches end_addr):
# forever increments the first byte of every 4 KiB page of [2 MiB, END)
# and prints '.' on COM1 after each pass. One byte per page: the cost is
# the address translation, not the data (a TLB-bound guest).
.intel_syntax noprefix
.code64
start:
    mov dx, 0x3f8
    mov rcx, [rip + end_addr]
outer:
    mov rbx, 0x200000
pass:
    inc byte ptr [rbx]
    add rbx, 4096
    cmp rbx, rcx
    jb pass
    mov al, '.'
    out dx, al
    jmp outer
.p2align 3
end_addr:
    .quad 0x20000000
