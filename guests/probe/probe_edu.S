/*
 * edu probe kernel: entered through the Linux 64-bit boot protocol (ring 0, identity-mapped low
 * 4 GiB), it finds every QEMU edu device (1234:11e8) on bus 0 through 0xCF8/0xCFC and, for each in
 * slot order, enables memory decode and bus mastering, checks the identification register, and has
 * the device DMA a pattern from guest RAM into its buffer and back into another RAM buffer. It
 * prints one verdict line per device
 *     EDU: dma ok            EDU: dma mismatch at XXXXXXXX      EDU: dma timeout
 *     EDU: no device         EDU: bad id XXXXXXXX
 * (after "EDU: found at 00:SS.0 bar0 XXXXXXXX"). The device-to-RAM DMA asks edu for an interrupt on
 * completion: the probe has enabled its local APIC, an IDT entry for vector 0x40 and the
 * function's MSI capability (address 0xFEE00000 = APIC 0, data 0x40), and after the DMA it prints
 *     EDU: msi ok            EDU: no msi            EDU: no msi capability
 * and goes on to the next device; after the last one (or the first failure) it powers the VM off.
 *
 * The DMA addresses are guest-physical: tern maps guest RAM with IOVA = GPA. QEMU's edu takes at
 * most 4095 bytes per DMA and addresses below 256 MiB, and completes each DMA from a 100 ms timer,
 * so completion is polled on the command register (bit 0 clears). All edu registers are written
 * 32 bits at a time (edu accepts 4-byte accesses everywhere).
 * Meant for the nested lab, where KVM runs guest ring 0 natively.
 *
 * With a command line starting "loop" it runs edu_loop.S instead: the same DMA + MSI round on the
 * first edu, for ever, one line per round (the live-update scenario's guest).
 */
        .intel_syntax noprefix
        .code64

        .set SRC, 0x200000              /* RAM buffer the device reads */
        .set DST, 0x210000              /* RAM buffer the device writes */
        .set LEN, 4000
        .set EDU_BUF, 0x40000           /* device-side buffer address */
        .set EDU_ID, 0x00
        .set DMA_SRC, 0x80
        .set DMA_DST, 0x88
        .set DMA_CNT, 0x90
        .set DMA_CMD, 0x98
        .set IRQ_ACK, 0x64
        .set DMA_IRQ, 0x100             /* edu's interrupt status bit for DMA completion */
        .set VECTOR, 0x40
        .set LAPIC, 0xfee00000

        .globl _start
_start:
        lea rsp, [rip + stack_top]
        mov esi, [rsi + 0x228]          /* boot_params.hdr.cmd_line_ptr */
        test esi, esi
        jz 1f
        cmp dword ptr [rsi], 0x706f6f6c /* "loop" */
        je loop_main
1:      xor ebx, ebx                    /* slot */
        xor r15d, r15d                  /* edu devices that passed */
scan:
        mov eax, ebx
        shl eax, 11
        or eax, 0x80000000              /* enable | bus 0 | slot | function 0 | register 0 */
        mov dx, 0xcf8
        out dx, eax
        mov dx, 0xcfc
        in eax, dx
        cmp eax, 0x11e81234
        je found
next:   inc ebx
        cmp ebx, 32
        jb scan
        test r15d, r15d
        jnz poweroff
        lea rsi, [rip + msg_nodev]
        call puts
        jmp poweroff

found:
        mov eax, ebx                    /* command: memory space + bus master */
        shl eax, 11
        or eax, 0x80000004
        mov dx, 0xcf8
        out dx, eax
        mov dx, 0xcfc
        mov ax, 0x0006
        out dx, ax
        mov eax, ebx                    /* BAR 0 */
        shl eax, 11
        or eax, 0x80000010
        mov dx, 0xcf8
        out dx, eax
        mov dx, 0xcfc
        in eax, dx
        and eax, 0xfffffff0
        mov r12d, eax                   /* r12 = BAR 0 (32-bit memory BAR) */
        lea rsi, [rip + msg_found]
        call puts
        mov eax, ebx
        mov ecx, 2
        call hex
        lea rsi, [rip + msg_bar0]
        call puts
        mov eax, r12d
        mov ecx, 8
        call hex
        mov al, 10
        call putc

        mov eax, [r12 + EDU_ID]
        cmp eax, 0x010000ed
        je 1f
        mov r13d, eax
        lea rsi, [rip + msg_badid]
        call puts
        mov eax, r13d
        mov ecx, 8
        call hex
        mov al, 10
        call putc
        jmp poweroff

1:      call setup_msi
        xor ecx, ecx                    /* pattern into SRC, zeros into DST */
2:      mov eax, ecx
        imul eax, eax, 7
        add eax, 0x5a
        mov [SRC + rcx], al
        mov byte ptr [DST + rcx], 0
        inc ecx
        cmp ecx, LEN
        jb 2b

        mov esi, SRC                    /* RAM -> device */
        mov edi, EDU_BUF
        mov eax, 1
        call dma
        jc timeout
        mov esi, EDU_BUF                /* device -> RAM, interrupt on completion */
        mov edi, DST
        mov eax, 7
        call dma
        jc timeout

        xor ecx, ecx
3:      mov al, [SRC + rcx]
        cmp al, [DST + rcx]
        jne mismatch
        inc ecx
        cmp ecx, LEN
        jb 3b
        lea rsi, [rip + msg_ok]
        call puts
        lea rsi, [rip + msg_nomsicap]
        cmp byte ptr [rip + msi_cap], 0
        je 5f
        mov ecx, 20000000               /* the MSI may trail the status bit a little */
4:      lea rsi, [rip + msg_msi]
        cmp dword ptr [rip + msi_count], 0
        jne 5f
        pause
        dec ecx
        jnz 4b
        lea rsi, [rip + msg_nomsi]
5:      call puts
        inc r15d
        mov dword ptr [rip + msi_count], 0
        jmp next

mismatch:
        mov r13d, ecx
        lea rsi, [rip + msg_mismatch]
        call puts
        mov eax, r13d
        mov ecx, 8
        call hex
        mov al, 10
        call putc
        jmp poweroff

timeout:
        lea rsi, [rip + msg_timeout]
        call puts

poweroff:
        mov al, 0x34                    /* ACPI S5 | SLP_EN */
        mov dx, 0x3c0
        out dx, al
1:      hlt
        jmp 1b

/* One edu DMA of LEN bytes: esi = source, edi = destination, eax = command (bit 0 run, bit 1
   device->RAM). Polls until the device clears bit 0; CF set on timeout. */
dma:
        mov [r12 + DMA_SRC], esi
        mov dword ptr [r12 + DMA_SRC + 4], 0
        mov [r12 + DMA_DST], edi
        mov dword ptr [r12 + DMA_DST + 4], 0
        mov dword ptr [r12 + DMA_CNT], LEN
        mov [r12 + DMA_CMD], eax
        mov ecx, 2000000                /* each poll is a trapped MMIO read: many seconds */
1:      test dword ptr [r12 + DMA_CMD], 1
        jz 2f
        pause
        dec ecx
        jnz 1b
        stc
        ret
2:      clc
        ret

/* Local APIC on, IDT gate for VECTOR, the function's MSI capability programmed and enabled,
   interrupts on. Leaves msi_cap 0 when the function has no MSI capability. */
setup_msi:
        lea rax, [rip + msi_handler]
        lea rdi, [rip + idt + VECTOR * 16]
        mov [rdi], ax
        mov cx, cs
        mov [rdi + 2], cx
        mov word ptr [rdi + 4], 0x8e00  /* present, ring 0, 64-bit interrupt gate */
        shr rax, 16
        mov [rdi + 6], ax
        shr rax, 16
        mov [rdi + 8], eax
        mov dword ptr [rdi + 12], 0
        lea rax, [rip + idt]
        mov [rip + idtr_base], rax
        lidt [rip + idtr]
        mov eax, LAPIC
        mov dword ptr [rax + 0xf0], 0x1ff       /* spurious vector 0xff, APIC software enable */
        mov dword ptr [rax + 0x80], 0           /* TPR 0 */

        mov eax, 0x06                   /* status: capability list? */
        call cfg_read
        test eax, 0x100000
        jz 3f
        mov eax, 0x34
        call cfg_read
        and eax, 0xfc
1:      test eax, eax
        jz 3f
        mov r13d, eax
        call cfg_read
        cmp al, 0x05                    /* MSI */
        je 2f
        shr eax, 8
        and eax, 0xfc
        jmp 1b
2:      mov [rip + msi_cap], r13b
        mov r14d, eax                   /* r14 = header dword: control in the top half */
        lea eax, [r13 + 4]
        mov ecx, LAPIC                  /* address: APIC ID 0, physical */
        call cfg_write32
        lea eax, [r13 + 8]              /* 32-bit capability: data right after the address */
        test r14d, 0x800000             /* 64-bit address capable */
        jz 4f
        xor ecx, ecx
        call cfg_write32
        lea eax, [r13 + 12]
4:      mov ecx, VECTOR                 /* data: fixed delivery, edge, VECTOR */
        call cfg_write32
        mov eax, r13d                   /* control: enable, one message (MME 0) */
        mov ecx, r14d
        and ecx, 0xff8fffff
        or ecx, 0x10000
        call cfg_write32
        sti
3:      ret

msi_handler:
        push rax
        lock inc dword ptr [rip + msi_count]
        mov dword ptr [r12 + IRQ_ACK], DMA_IRQ
        mov eax, LAPIC
        mov dword ptr [rax + 0xb0], 0   /* EOI */
        pop rax
        iretq

/* Configuration dword at offset eax of the edu function (slot in ebx) -> eax. */
cfg_read:
        push rdx
        and eax, 0xfc
        mov edx, ebx
        shl edx, 11
        or eax, edx
        or eax, 0x80000000
        mov dx, 0xcf8
        out dx, eax
        mov dx, 0xcfc
        in eax, dx
        pop rdx
        ret

/* Writes dword ecx at configuration offset eax of the edu function. */
cfg_write32:
        push rdx
        and eax, 0xfc
        mov edx, ebx
        shl edx, 11
        or eax, edx
        or eax, 0x80000000
        mov dx, 0xcf8
        out dx, eax
        mov eax, ecx
        mov dx, 0xcfc
        out dx, eax
        pop rdx
        ret

        .include "console.S"
        .include "edu_loop.S"

msg_nodev:      .asciz "EDU: no device\n"
msg_found:      .asciz "EDU: found at 00:"
msg_bar0:       .asciz ".0 bar0 "
msg_badid:      .asciz "EDU: bad id "
msg_ok:         .asciz "EDU: dma ok\n"
msg_mismatch:   .asciz "EDU: dma mismatch at "
msg_timeout:    .asciz "EDU: dma timeout\n"
msg_msi:        .asciz "EDU: msi ok\n"
msg_nomsi:      .asciz "EDU: no msi\n"
msg_nomsicap:   .asciz "EDU: no msi capability\n"

        .balign 8
msi_count:      .long 0
msi_cap:        .byte 0
idtr:           .word 256 * 16 - 1
idtr_base:      .quad 0
        .balign 16
idt:    .skip 256 * 16

        .balign 16
stack:  .skip 4096
stack_top:
