/*
 * mtty probe kernel: entered through the Linux 64-bit boot protocol, it finds the kernel's mtty
 * sample mdev (4348:3253, a 16550-like UART per I/O BAR whose transmitter loops back into its own
 * receive FIFO) on bus 0 through 0xCF8/0xCFC, enables I/O decode, and for each UART BAR (0 and, on
 * mtty-2, 1) sends a message through the transmit register and reads it back from the receive
 * register, watching the line status. It prints
 *     MTTY: found at 00:SS.0
 *     MTTY: port N at XXXX sent 10 received 10 "tern-mtty0"     (per port)
 *     MTTY: uart ok          MTTY: uart mismatch at port N      MTTY: no device
 * and powers the VM off. Meant for the nested lab (ring 0 runs natively there).
 */
        .intel_syntax noprefix
        .code64

        .set MSG_LEN, 10

        .globl _start
_start:
        lea rsp, [rip + stack_top]
        xor ebx, ebx                    /* slot */
scan:
        mov eax, ebx
        shl eax, 11
        or eax, 0x80000000
        mov dx, 0xcf8
        out dx, eax
        mov dx, 0xcfc
        in eax, dx
        cmp eax, 0x32534348
        je found
        inc ebx
        cmp ebx, 32
        jb scan
        lea rsi, [rip + msg_nodev]
        call puts
        jmp poweroff

found:
        lea rsi, [rip + msg_found]
        call puts
        mov eax, ebx
        mov ecx, 2
        call hex
        lea rsi, [rip + msg_fn]
        call puts
        mov eax, ebx                    /* command: I/O space */
        shl eax, 11
        or eax, 0x80000004
        mov dx, 0xcf8
        out dx, eax
        mov dx, 0xcfc
        mov ax, 0x0001
        out dx, ax

        xor r13d, r13d                  /* port (= BAR index) */
        xor r15d, r15d                  /* ports checked */
port:
        mov eax, ebx
        shl eax, 11
        lea eax, [rax + r13 * 4 + 0x10]
        or eax, 0x80000000
        mov dx, 0xcf8
        out dx, eax
        mov dx, 0xcfc
        in eax, dx
        test eax, 1                     /* an I/O BAR? */
        jz next_port
        and eax, 0xfffc
        jz next_port
        mov r12d, eax                   /* r12 = UART base port */

        lea edx, [r12 + 2]              /* FCR: FIFO on, both FIFOs cleared */
        mov al, 0x07
        out dx, al
        lea edx, [r12 + 3]              /* LCR: 8N1, DLAB off */
        mov al, 0x03
        out dx, al
        /* message "tern-mttyN" into msg_buf, N = port */
        lea rsi, [rip + msg_text]
        lea rdi, [rip + msg_buf]
        mov ecx, MSG_LEN - 1
        rep movsb
        lea eax, [r13 + '0']
        mov [rdi], al
        xor ecx, ecx                    /* send */
1:      lea rsi, [rip + msg_buf]
        mov al, [rsi + rcx]
        mov edx, r12d
        out dx, al
        inc ecx
        cmp ecx, MSG_LEN
        jb 1b
        xor r14d, r14d                  /* receive while the line status says data is ready */
2:      lea edx, [r12 + 5]
        in al, dx
        test al, 1
        jz 3f
        mov edx, r12d
        in al, dx
        lea rdi, [rip + rx_buf]
        mov [rdi + r14], al
        inc r14d
        cmp r14d, 32
        jb 2b
3:      lea rsi, [rip + msg_port]
        call puts
        mov eax, r13d
        mov ecx, 1
        call hex
        lea rsi, [rip + msg_at]
        call puts
        mov eax, r12d
        mov ecx, 4
        call hex
        lea rsi, [rip + msg_sent]
        call puts
        mov eax, r14d
        mov ecx, 2
        call hex
        lea rsi, [rip + msg_quote]
        call puts
        xor ecx, ecx
4:      cmp ecx, r14d
        jae 5f
        lea rsi, [rip + rx_buf]
        mov al, [rsi + rcx]
        call putc
        inc ecx
        jmp 4b
5:      mov al, '"'
        call putc
        mov al, 10
        call putc
        cmp r14d, MSG_LEN               /* exactly what was sent, in order */
        jne mismatch
        xor ecx, ecx
6:      lea rsi, [rip + rx_buf]
        mov al, [rsi + rcx]
        lea rsi, [rip + msg_buf]
        cmp al, [rsi + rcx]
        jne mismatch
        inc ecx
        cmp ecx, MSG_LEN
        jb 6b
        inc r15d
next_port:
        inc r13d
        cmp r13d, 2
        jb port
        test r15d, r15d
        jz noport
        lea rsi, [rip + msg_ok]
        call puts
        jmp poweroff

noport:
        lea rsi, [rip + msg_noport]
        call puts
        jmp poweroff

mismatch:
        lea rsi, [rip + msg_mismatch]
        call puts
        mov eax, r13d
        mov ecx, 1
        call hex
        mov al, 10
        call putc

poweroff:
        mov al, 0x34                    /* ACPI S5 | SLP_EN */
        mov dx, 0x3c0
        out dx, al
1:      hlt
        jmp 1b

        .include "console.S"

msg_nodev:      .asciz "MTTY: no device\n"
msg_found:      .asciz "MTTY: found at 00:"
msg_fn:         .asciz ".0\n"
msg_port:       .asciz "MTTY: port "
msg_at:         .asciz " at "
msg_sent:       .asciz " sent 0a received "
msg_quote:      .asciz " \""
msg_ok:         .asciz "MTTY: uart ok\n"
msg_noport:     .asciz "MTTY: no uart BAR\n"
msg_mismatch:   .asciz "MTTY: uart mismatch at port "
msg_text:       .ascii "tern-mtty"

        .balign 16
msg_buf:        .skip 16
rx_buf:         .skip 32
stack:          .skip 4096
stack_top:
