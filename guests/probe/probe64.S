/*
 * A stand-in "kernel" for loader tests: entered through the Linux 64-bit boot protocol (RSI = zero
 * page), it prints the command line and the first bytes of the initramfs it was handed, then powers
 * the VM off. Written for the host's PVM, where ring 0 is emulated: a handful of instructions only.
 */
        .intel_syntax noprefix
        .code64
        .globl _start
_start:
        mov rbx, rsi
        lea rsi, [rip + msg_cmdline]
        call puts
        mov esi, [rbx + 0x228]          /* hdr.cmd_line_ptr */
        call puts
        lea rsi, [rip + msg_initrd]
        call puts
        mov esi, [rbx + 0x218]          /* hdr.ramdisk_image */
        mov ecx, [rbx + 0x21c]          /* hdr.ramdisk_size */
        cmp ecx, 16
        jbe 1f
        mov ecx, 16
1:      test ecx, ecx
        jz 2f
        mov al, [rsi]
        call putc
        inc rsi
        dec ecx
        jmp 1b
2:      mov al, 10
        call putc
        mov al, 0x34                    /* ACPI S5 | SLP_EN */
        mov dx, 0x3c0
        out dx, al
3:      hlt
        jmp 3b

putc:
        mov dx, 0x3f8
        out dx, al
        ret

puts:
        mov al, [rsi]
        test al, al
        jz 1f
        call putc
        inc rsi
        jmp puts
1:      ret

msg_cmdline:    .asciz "PROBE cmdline="
msg_initrd:     .asciz " initrd="
