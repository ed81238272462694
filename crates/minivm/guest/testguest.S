# minivm built-in test guest: 64-bit long mode, ring 3, one copy per vCPU.
# Entry registers (set by the VMM):
#   rdi = mailbox (per-vCPU page)   rsi = first data page
#   rdx = number of data pages      rcx = seq table (u64 per page)
#   r8  = vCPU id
# Page layout: [0]=seq [1]=vcpu [2]=index [3..510]=seq+word [511]=sum(0..510)
# Ports: out 0xe1 eax=failures (heartbeat), in 0xe0 -> pages to write now,
#        out 0xe2 eax=index of a page that came back wrong.
# Mailbox: +8 total pages written, +16 failures.
.intel_syntax noprefix
.code64
start:
    mov r12, rdx
    mov r13, rcx
    mov r14, rsi
    mov r15, rdi
    xor r10d, r10d
    xor r11d, r11d
batch:
    mov eax, r11d
    out 0xe1, eax
    in eax, 0xe0
    mov r9d, eax
    test r9, r9
    jz batch
page:
    mov rbx, r10
    shl rbx, 12
    add rbx, r14
    mov rbp, [r13 + r10*8]
    test rbp, rbp
    jz write
    cmp [rbx], rbp
    jne bad
    cmp [rbx + 8], r8
    jne bad
    cmp [rbx + 16], r10
    jne bad
    xor eax, eax
    xor ecx, ecx
sum:
    add rax, [rbx + rcx*8]
    inc ecx
    cmp ecx, 511
    jne sum
    cmp rax, [rbx + 4088]
    je write
bad:
    inc r11
    mov [r15 + 16], r11
    mov eax, r10d
    out 0xe2, eax
write:
    inc rbp
    mov [rbx], rbp
    mov [rbx + 8], r8
    mov [rbx + 16], r10
    mov rax, rbp
    add rax, r8
    add rax, r10
    mov ecx, 3
fill:
    lea rdx, [rbp + rcx]
    mov [rbx + rcx*8], rdx
    add rax, rdx
    inc ecx
    cmp ecx, 511
    jne fill
    mov [rbx + 4088], rax
    mov [r13 + r10*8], rbp
    inc qword ptr [r15 + 8]
    inc r10
    cmp r10, r12
    jne next
    xor r10d, r10d
next:
    dec r9
    jnz page
    jmp batch
