/*
 * A stand-in "kernel" for the PVH loader test: an ELF whose XEN_ELFNOTE_PHYS32_ENTRY note names a
 * 32-bit entry point, entered in protected mode with EBX = hvm_start_info. Prints the command line
 * and the first bytes of module 0 (the initramfs), then powers the VM off.
 */
        .intel_syntax noprefix
        .section .note.pvh, "a", @note
        .balign 4
        .long 4                         /* name size: "Xen\0" */
        .long 4                         /* desc size */
        .long 18                        /* XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz "Xen"
        .long _start

        .text
        .code32
        .globl _start
_start:
        lea esi, [msg_cmdline]
        call puts
        mov esi, [ebx + 24]             /* cmdline_paddr (low half) */
        call puts
        lea esi, [msg_initrd]
        call puts
        mov edi, [ebx + 16]             /* modlist_paddr (low half) */
        mov esi, [edi]                  /* modlist[0].paddr */
        mov ecx, 16
1:      mov al, [esi]
        call putc
        inc esi
        dec ecx
        jnz 1b
        mov al, 10
        call putc
        mov al, 0x34
        mov dx, 0x3c0
        out dx, al
2:      hlt
        jmp 2b

putc:
        mov dx, 0x3f8
        out dx, al
        ret

puts:
        mov al, [esi]
        test al, al
        jz 1f
        call putc
        inc esi
        jmp puts
1:      ret

msg_cmdline:    .asciz "PROBE cmdline="
msg_initrd:     .asciz " initrd="
