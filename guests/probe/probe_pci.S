/*
 * PCI probe kernel: entered through the Linux 64-bit boot protocol, it scans bus 0 through the
 * 0xCF8/0xCFC configuration mechanism and prints, for each function 0 it finds,
 *     PCI 00:SS.0 VVVV:DDDD class CCSSPP
 *     PCI 00:SS.0 bar N mask XXXXXXXX        (N = 0..5: what the register reads after all-ones)
 * then "PCI scan done" and powers the VM off. The vendor ID comes from a dword read at 0xCFC, the
 * device ID from a word read at 0xCFE and the class bytes from byte reads at 0xCFF/0xCFE/0xCFD, so the
 * narrow data-port paths are exercised too. Written for the host's PVM, where ring 0 is emulated:
 * a few hundred instructions at most.
 */
        .intel_syntax noprefix
        .code64
        .globl _start
_start:
        xor ebx, ebx                    /* slot */
scan:
        mov eax, ebx
        shl eax, 11
        or eax, 0x80000000              /* enable | bus 0 | slot | function 0 | register 0 */
        mov dx, 0xcf8
        out dx, eax
        mov dx, 0xcfc
        in eax, dx
        cmp eax, 0xffffffff
        je next
        mov r12d, eax
        lea rsi, [rip + msg_pci]
        call puts
        call slot_name
        lea rsi, [rip + msg_space]
        call puts
        mov eax, r12d
        and eax, 0xffff
        mov ecx, 4
        call hex
        mov al, ':'
        call putc
        mov dx, 0xcfe                   /* device ID: word read at 0xCFE */
        in ax, dx
        movzx eax, ax
        mov ecx, 4
        call hex
        lea rsi, [rip + msg_class]
        call puts
        mov eax, ebx
        shl eax, 11
        or eax, 0x80000008              /* register 2: revision and class */
        mov dx, 0xcf8
        out dx, eax
        mov dx, 0xcff                   /* base class */
        call byte_hex
        mov dx, 0xcfe                   /* subclass */
        call byte_hex
        mov dx, 0xcfd                   /* programming interface */
        call byte_hex
        mov al, 10
        call putc

        xor r13d, r13d                  /* BAR index */
bar:
        mov eax, ebx
        shl eax, 11
        lea eax, [rax + r13 * 4 + 0x10]
        or eax, 0x80000000
        mov dx, 0xcf8
        out dx, eax
        mov dx, 0xcfc
        in eax, dx
        mov r14d, eax                   /* save */
        mov eax, 0xffffffff
        out dx, eax
        in eax, dx
        mov r15d, eax                   /* size mask */
        mov eax, r14d
        out dx, eax                     /* restore */
        lea rsi, [rip + msg_pci]
        call puts
        call slot_name
        lea rsi, [rip + msg_bar]
        call puts
        mov eax, r13d
        mov ecx, 1
        call hex
        lea rsi, [rip + msg_mask]
        call puts
        mov eax, r15d
        mov ecx, 8
        call hex
        mov al, 10
        call putc
        inc r13d
        cmp r13d, 6
        jb bar
next:
        inc ebx
        cmp ebx, 32
        jb scan
        lea rsi, [rip + msg_done]
        call puts
        mov al, 0x34                    /* ACPI S5 | SLP_EN */
        mov dx, 0x3c0
        out dx, al
1:      hlt
        jmp 1b

/* "00:SS.0" for the slot in ebx */
slot_name:
        lea rsi, [rip + msg_bus]
        call puts
        mov eax, ebx
        mov ecx, 2
        call hex
        lea rsi, [rip + msg_fn]
        jmp puts

/* byte read from port dx, printed as two hex digits */
byte_hex:
        in al, dx
        movzx eax, al
        mov ecx, 2
        jmp hex

        .include "console.S"

msg_pci:        .asciz "PCI "
msg_bus:        .asciz "00:"
msg_fn:         .asciz ".0"
msg_space:      .asciz " "
msg_class:      .asciz " class "
msg_bar:        .asciz " bar "
msg_mask:       .asciz " mask "
msg_done:       .asciz "PCI scan done\n"
