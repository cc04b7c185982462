/*
 * tern's built-in demo guest: a self-checking memory workload and tern's migration oracle.
 *
 * tern enters `entry64` on every vCPU in 64-bit mode at CPL 0, with identity paging (user-accessible),
 * the GDT/IDT/TSS it built from this file's header, RDI = parameter block GPA, RSI = vCPU index and RSP =
 * this vCPU's kernel stack. The ring-0 part only drops to ring 3 and serves four gates: on PVM hosts
 * guest ring 0 is emulated and slow while ring 3 runs natively, and PVM neither honours IOPL for ring-3
 * port I/O nor accepts `int N` from ring 3, and ring-0 port I/O fails after SYSCALL, while exception
 * delivery through the IDT works. So ring 3 enters ring 0 with UD2 (#UD) as a call gate: rax = service
 * (SYS_PRINT with rsi = buffer and r8 = length, SYS_POWER_OFF, SYS_PARK, SYS_DEVICE_CHECK with
 * rdi = parameter block); the #UD handler serves it and returns past the UD2. A #UD from ring 0, or
 * not at a UD2, is still reported as a fault.
 *
 * Each vCPU owns a contiguous partition of the working set. Page p at generation g holds 512 qwords
 * (p*K1 ^ g*K2) + j*K3; generation 0 means "never written" and the page must be all zeroes. The
 * generation table (u32 per page) lives in guest memory too, so after a migration the destination's
 * copy of the table says what every page must contain: a page lost in transit shows as CORRUPT.
 * The owner vCPU is the only writer and verifier of its pages, so table and page never disagree from
 * the guest's own point of view, whatever instant the VM is paused at.
 *
 * Passed-through device check (SYS_DEVICE_CHECK, vCPU 0 only, serial lock held): the first call scans
 * PCI bus 0 (0xCF8/0xCFC) for the kernel's mtty sample (4348:3253, a 16550-like UART per I/O BAR whose
 * transmitter loops back into its receive FIFO) and remembers up to MAX_MTTY of them in the P_DEV
 * block; with none found (every host without passthrough) D_STATE says so and ring 3 never calls the
 * gate again. On each device's BAR0 UART it enables I/O decode and programs FCR (FIFO on, cleared), LCR
 * MTTY_LCR, IER MTTY_IER, MCR MTTY_MCR, SCR = sequence 1 (low byte) and sends the sequence's two bytes
 * (mtty_pattern: sequence and a per-boot nonce), which stay pending in the RX FIFO:
 *     MTTY: device N at 00:SS.0 port XXXX programmed
 * Every later call (one per progress line) reads LCR, IER, MCR, SCR and LSR back, drains the RX FIFO,
 * and wants exactly the programmed values, SCR = sequence, data ready and the sequence's two bytes;
 * then it writes SCR = sequence + 1 and sends that sequence's two bytes. Every 16th sequence prints
 *     MTTY: device N ok seq S
 * and a mismatch prints (hex, rx = the bytes drained, "none" or up to 4 then "+")
 *     MTTY: device N LOST lcr=XX ier=XX mcr=XX scr=XX lsr=XX rx=... want scr=XX rx=XXXX
 * once, then reprograms the device with the next sequence and goes on checking. The oracle's state
 * (scan result, ports, sequences, nonce) lives in guest RAM, not in the device, so it migrates with the
 * guest: a destination whose device did not receive the source's UART state says LOST at its first
 * check.
 *
 * The parameter block layout is mirrored in vmm/src/demo/setup.rs; keep both in sync.
 */
        .intel_syntax noprefix
        .code64
        .text

        .set P_MAGIC,        0x00
        .set P_NCPUS,        0x08
        .set P_WS_BASE,      0x10
        .set P_GEN_TABLE,    0x18
        .set P_EXIT_TICKS,   0x20
        .set P_TSC_HZ,       0x28
        .set P_LOCK,         0x30
        .set P_CORRUPT,      0x38
        .set P_LINE_LEN,     0x40
        .set P_LINE,         0x48      /* console line buffer, up to P_SLOTS */
        .set LINE_MAX,       0xb0
        .set P_SLOTS,        0x100
        .set SLOT_SIZE,      0x80

        .set S_VERIFIED,     0x00
        .set S_PASSES,       0x08
        .set S_WRITTEN,      0x10
        .set S_START,        0x18
        .set S_USTACK,       0x20
        .set S_FIRST,        0x28
        .set S_COUNT,        0x30
        .set S_TPW,          0x38
        .set S_VCUR,         0x40
        .set S_WCUR,         0x48
        .set S_NEXTW,        0x50
        .set S_NEXTP,        0x58
        .set P_DEV,          0x8000    /* device-check block, after the largest slot array */
        .set D_STATE,        0x00      /* 0 = bus not scanned yet, DEV_NONE, DEV_PRESENT */
        .set D_COUNT,        0x08      /* mtty devices found */
        .set D_NONCE,        0x10      /* per-boot key of the loop-back bytes */
        .set D_DEVS,         0x20      /* MAX_MTTY records of DV_SIZE */
        .set DV_PORT,        0x00      /* BAR0 UART base port */
        .set DV_SLOT,        0x08      /* PCI slot on bus 0 */
        .set DV_SEQ,         0x10      /* sequence the device holds now; 0 = not programmed yet */
        .set DV_SIZE,        0x20
        .set DEV_NONE,       1
        .set DEV_PRESENT,    2
        .set MAX_MTTY,       2
        .set MTTY_ID,        0x32534348 /* device 3253, vendor 4348 */
        .set MTTY_LCR,       0x1b      /* 8 data bits, 1 stop bit, even parity; DLAB off */
        .set MTTY_IER,       0x05      /* RX data + line status (IF stays 0: no interrupt taken) */
        .set MTTY_MCR,       0x0b      /* DTR, RTS, OUT2 */

        .set USER_SS,        0x1b      /* SYSRET's layout: user data, then user code */
        .set USER_CS,        0x23
        .set SYS_PRINT,      0
        .set SYS_POWER_OFF,  1
        .set SYS_PARK,       2
        .set SYS_DEVICE_CHECK, 3
        .set COM1,           0x3f8
        .set SLEEP_CTL,      0x3c0
        .set POWER_OFF,      0x34


/* Header read by tern (vmm/src/demo/payload.rs). */
header:
        .ascii "TERNDEMO"
        .quad entry64
        .quad exception_stubs
        .quad 0                         /* no SYSCALL entry: see the gate below */
        .quad 4                         /* header version */

/* ------------------------------------------------------------------ ring 0 */
entry64:
        mov rax, rsi
        shl rax, 7                      /* * SLOT_SIZE */
        lea rax, [rdi + rax + P_SLOTS]
        push USER_SS
        push qword ptr [rax + S_USTACK]
        push 0x0002                     /* IF=0: the demo needs no interrupts */
        push USER_CS
        lea rax, [rip + user_main]
        push rax
        iretq

/* #UD: the ring-3 call gate. Frame: [rsp] rip, [rsp+8] cs, [rsp+16] rflags, [rsp+24] rsp, [rsp+32] ss */
ud_gate:
        test byte ptr [rsp + 8], 3
        jz stub_6                       /* #UD in ring 0: a real fault */
        push rdi
        mov rdi, [rsp + 8]
        cmp word ptr [rdi], 0x0b0f      /* UD2 */
        pop rdi
        jne stub_6
        add qword ptr [rsp], 2          /* return past the UD2 */
        cmp eax, SYS_DEVICE_CHECK
        je device_check
        cmp eax, SYS_PRINT
        je 3f
        cmp eax, SYS_POWER_OFF
        jne 2f
        mov al, POWER_OFF
        mov dx, SLEEP_CTL
        out dx, al
2:      cli                             /* SYS_PARK, and after power-off: stop here */
1:      hlt
        jmp 1b
3:      test r8, r8
        jz 5f
4:      mov al, [rsi]
        call kputc
        inc rsi
        dec r8
        jnz 4b
5:      iretq

/* ring 0: al = byte to the UART (clobbers dx) */
kputc:
        mov ah, al
        mov dx, COM1 + 5
1:      in al, dx
        test al, 0x20
        jz 1b
        mov al, ah
        mov dx, COM1
        out dx, al
        ret

/* ring 0: NUL-terminated string at rsi to the UART */
kputs:
        mov al, [rsi]
        test al, al
        jz 1f
        call kputc
        inc rsi
        jmp kputs
1:      ret

/* ring 0: rax as 0x + 16 hex digits (clobbers rcx, rdx, rbx) */
kput_hex:
        mov rbx, rax
        mov al, '0'
        call kputc
        mov al, 'x'
        call kputc
        mov ecx, 16
1:      rol rbx, 4
        mov al, bl
        and al, 0xf
        add al, '0'
        cmp al, '9'
        jbe 2f
        add al, 'a' - '9' - 1
2:      call kputc
        dec ecx
        jnz 1b
        ret

/* ring 0: the low ecx hex digits of rax (clobbers rax, rdx) */
kput_hexn:
        push rbx
        push rcx
        push rsi
        mov rbx, rax
        mov esi, ecx
        shl ecx, 2
        ror rbx, cl                     /* the digits wanted to the top */
1:      rol rbx, 4
        mov al, bl
        and al, 0xf
        add al, '0'
        cmp al, '9'
        jbe 2f
        add al, 'a' - '9' - 1
2:      call kputc
        dec esi
        jnz 1b
        pop rsi
        pop rcx
        pop rbx
        ret

/* ring 0: rax in decimal (clobbers rax, rdx) */
kput_dec:
        push rbx
        push rsi
        sub rsp, 32
        lea rsi, [rsp + 31]
        mov byte ptr [rsi], 0
        mov ebx, 10
1:      xor edx, edx
        div rbx
        add dl, '0'
        dec rsi
        mov [rsi], dl
        test rax, rax
        jnz 1b
        call kputs
        add rsp, 32
        pop rsi
        pop rbx
        ret

/* ring 0: rsi = string, then a two-digit hex byte al (clobbers rax, rdx, rsi, rcx) */
kput_field:
        push rax
        call kputs
        pop rax
        movzx eax, al
        mov ecx, 2
        jmp kput_hexn

/* SYS_DEVICE_CHECK (rdi = parameter block): scan once, then program or check each mtty found. Keeps
 * every register: ring 3 calls it from the middle of its loop. */
device_check:
        push rax
        push rbx
        push rcx
        push rdx
        push rsi
        push rdi
        push rbp
        push r8
        push r9
        push r10
        push r11
        push r12
        push r13
        push r14
        push r15
        lea rbp, [rdi + P_DEV]
        cmp qword ptr [rbp + D_STATE], 0
        jne 1f
        call mtty_scan
1:      cmp qword ptr [rbp + D_STATE], DEV_PRESENT
        jne 3f
        lea rbx, [rbp + D_DEVS]
        xor r12d, r12d
2:      cmp r12, [rbp + D_COUNT]
        jae 3f
        call mtty_check
        add rbx, DV_SIZE
        inc r12
        jmp 2b
3:      pop r15
        pop r14
        pop r13
        pop r12
        pop r11
        pop r10
        pop r9
        pop r8
        pop rbp
        pop rdi
        pop rsi
        pop rdx
        pop rcx
        pop rbx
        pop rax
        iretq

/* rbp = device block: finds up to MAX_MTTY mtty devices with an I/O BAR0 on bus 0 */
mtty_scan:
        rdtsc
        mov [rbp + D_NONCE], rax
        lea rbx, [rbp + D_DEVS]
        xor r8d, r8d                    /* found */
        xor ecx, ecx                    /* slot */
1:      mov eax, ecx
        shl eax, 11
        or eax, 0x80000000
        mov dx, 0xcf8
        out dx, eax
        mov dx, 0xcfc
        in eax, dx
        cmp eax, MTTY_ID
        jne 2f
        mov eax, ecx
        shl eax, 11
        or eax, 0x80000010              /* BAR0 */
        mov dx, 0xcf8
        out dx, eax
        mov dx, 0xcfc
        in eax, dx
        test eax, 1                     /* an I/O BAR? */
        jz 2f
        and eax, 0xfffc
        jz 2f
        mov [rbx + DV_PORT], rax
        mov [rbx + DV_SLOT], rcx
        mov qword ptr [rbx + DV_SEQ], 0
        add rbx, DV_SIZE
        inc r8d
        cmp r8d, MAX_MTTY
        jae 3f
2:      inc ecx
        cmp ecx, 32
        jb 1b
3:      mov [rbp + D_COUNT], r8
        mov eax, DEV_NONE
        test r8d, r8d
        jz 4f
        mov eax, DEV_PRESENT
4:      mov [rbp + D_STATE], rax
        ret

/* rax = sequence -> eax = its two loop-back bytes (the first sent in al), keyed by the boot's nonce */
mtty_pattern:
        imul eax, eax, 0x9e37
        add eax, [rbp + D_NONCE]
        movzx eax, ax
        ret

/* rbx = device: SCR = low byte of DV_SEQ, then DV_SEQ's two bytes to THR (they loop back to RX) */
mtty_send:
        mov rdi, [rbx + DV_PORT]
        lea edx, [rdi + 7]
        mov al, [rbx + DV_SEQ]
        out dx, al
        mov rax, [rbx + DV_SEQ]
        call mtty_pattern
        mov ecx, eax
        mov edx, edi
        mov al, cl
        out dx, al
        mov al, ch
        out dx, al
        ret

/* rbx = device: I/O decode on, FIFOs cleared, LCR/IER/MCR programmed, then mtty_send */
mtty_program:
        mov eax, [rbx + DV_SLOT]
        shl eax, 11
        or eax, 0x80000004              /* command */
        mov dx, 0xcf8
        out dx, eax
        mov dx, 0xcfc
        mov ax, 0x0001                  /* I/O space */
        out dx, ax
        mov rdi, [rbx + DV_PORT]
        lea edx, [rdi + 3]              /* LCR first: DLAB off for what follows */
        mov al, MTTY_LCR
        out dx, al
        lea edx, [rdi + 2]              /* FCR: FIFO on, both FIFOs cleared */
        mov al, 0x07
        out dx, al
        lea edx, [rdi + 1]
        mov al, MTTY_IER
        out dx, al
        lea edx, [rdi + 4]
        mov al, MTTY_MCR
        out dx, al
        jmp mtty_send

/* rbx = device, r12 = its index, rbp = device block */
mtty_check:
        cmp qword ptr [rbx + DV_SEQ], 0
        jne 1f
        mov qword ptr [rbx + DV_SEQ], 1
        call mtty_program
        call mtty_put_name
        lea rsi, [rip + msg_mtty_at]
        call kputs
        mov rax, [rbx + DV_SLOT]
        mov ecx, 2
        call kput_hexn
        lea rsi, [rip + msg_mtty_port]
        call kputs
        mov rax, [rbx + DV_PORT]
        mov ecx, 4
        call kput_hexn
        lea rsi, [rip + msg_mtty_programmed]
        jmp kputs

1:      mov rdi, [rbx + DV_PORT]
        lea edx, [rdi + 3]
        in al, dx
        movzx r8d, al                   /* r8 = LCR */
        test al, 0x80                   /* DLAB on would turn RBR/IER into the divisor: clear it */
        jz 2f
        and al, 0x7f
        out dx, al
2:      lea edx, [rdi + 1]
        in al, dx
        movzx r9d, al                   /* r9 = IER */
        lea edx, [rdi + 4]
        in al, dx
        movzx r10d, al                  /* r10 = MCR */
        lea edx, [rdi + 7]
        in al, dx
        movzx r11d, al                  /* r11 = SCR */
        lea edx, [rdi + 5]
        in al, dx
        movzx r13d, al                  /* r13 = LSR before draining */
        xor r14d, r14d                  /* r14 = first 4 bytes drained (first in the low byte) */
        xor r15d, r15d                  /* r15 = bytes drained */
3:      lea edx, [rdi + 5]
        in al, dx
        test al, 1                      /* data ready */
        jz 4f
        mov edx, edi
        in al, dx
        cmp r15d, 4
        jae 5f
        movzx eax, al
        lea ecx, [r15 * 8]
        shl rax, cl
        or r14, rax
5:      inc r15d
        cmp r15d, 17                    /* a FIFO holds 16: stop on one that never runs dry */
        jb 3b
4:      cmp r8d, MTTY_LCR
        jne mtty_lost
        cmp r9d, MTTY_IER
        jne mtty_lost
        cmp r10d, MTTY_MCR
        jne mtty_lost
        mov rax, [rbx + DV_SEQ]
        cmp r11b, al
        jne mtty_lost
        test r13b, 1
        jz mtty_lost
        cmp r15d, 2
        jne mtty_lost
        call mtty_pattern
        cmp r14d, eax
        jne mtty_lost
        mov rax, [rbx + DV_SEQ]
        test al, 15
        jnz 6f
        call mtty_put_name
        lea rsi, [rip + msg_mtty_ok]
        call kputs
        mov rax, [rbx + DV_SEQ]
        call kput_dec
        mov al, 10
        call kputc
6:      inc qword ptr [rbx + DV_SEQ]
        jmp mtty_send

mtty_lost:
        call mtty_put_name
        lea rsi, [rip + msg_mtty_lcr]
        mov eax, r8d
        call kput_field
        lea rsi, [rip + msg_mtty_ier]
        mov eax, r9d
        call kput_field
        lea rsi, [rip + msg_mtty_mcr]
        mov eax, r10d
        call kput_field
        lea rsi, [rip + msg_mtty_scr]
        mov eax, r11d
        call kput_field
        lea rsi, [rip + msg_mtty_lsr]
        mov eax, r13d
        call kput_field
        lea rsi, [rip + msg_mtty_rx]
        call kputs
        test r15d, r15d
        jnz 1f
        lea rsi, [rip + msg_mtty_none]
        call kputs
        jmp 3f
1:      xor r8d, r8d
2:      mov rax, r14
        mov ecx, r8d
        shl ecx, 3
        shr rax, cl
        mov ecx, 2
        call kput_hexn
        inc r8d
        cmp r8d, r15d
        jae 3f
        cmp r8d, 4
        jb 2b
        mov al, '+'
        call kputc
3:      lea rsi, [rip + msg_mtty_want]
        mov rax, [rbx + DV_SEQ]
        call kput_field
        lea rsi, [rip + msg_mtty_rx]
        call kputs
        mov rax, [rbx + DV_SEQ]
        call mtty_pattern
        mov r8d, eax
        mov ecx, 2
        call kput_hexn
        mov eax, r8d
        shr eax, 8
        mov ecx, 2
        call kput_hexn
        mov al, 10
        call kputc
        inc qword ptr [rbx + DV_SEQ]
        jmp mtty_program

/* "MTTY: device N" for device r12 */
mtty_put_name:
        lea rsi, [rip + msg_mtty_device]
        call kputs
        mov rax, r12
        jmp kput_dec

        .macro STUB vec, has_err
stub_\vec:
        .if \has_err == 0
        push 0
        .endif
        push \vec
        jmp fault_common
        .endm

        .irp v, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31
        STUB \v, 0
        .endr
        .irp v, 8,10,11,12,13,14,17,21,29,30
        STUB \v, 1
        .endr

fault_common:
        /* [rsp] = vector, [rsp+8] = error code, [rsp+16] = faulting rip */
        lea rsi, [rip + msg_fault]
        call kputs
        mov rax, [rsp]
        call kput_hex
        lea rsi, [rip + msg_err]
        call kputs
        mov rax, [rsp + 8]
        call kput_hex
        lea rsi, [rip + msg_rip]
        call kputs
        mov rax, [rsp + 16]
        call kput_hex
        mov al, 10
        call kputc
        cli
1:      hlt
        jmp 1b

        .section .rodata
        .balign 8
exception_stubs:
        .quad stub_0, stub_1, stub_2, stub_3, stub_4, stub_5, ud_gate, stub_7
        .irp v, 8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        .quad stub_\v
        .endr
        .text

/* ------------------------------------------------------------------ ring 3 */
/* rdi = params, rsi = vcpu index (preserved across iretq) */
user_main:
        mov r15, rdi
        mov r13, rsi
        mov r14, rsi
        shl r14, 7
        lea r14, [r15 + r14 + P_SLOTS]
        mov r12, [r14 + S_FIRST]
        mov rbx, [r14 + S_COUNT]
        rdtsc
        shl rdx, 32
        or rax, rdx
        mov [r14 + S_START], rax
        mov [r14 + S_NEXTW], rax
        mov [r14 + S_NEXTP], rax
        test r13, r13
        jnz main_loop
        call lock_serial
        lea rsi, [rip + msg_start]
        call puts
        mov rax, [r15 + P_NCPUS]
        call put_u64
        lea rsi, [rip + msg_pages]
        call puts
        xor eax, eax
        mov rcx, [r15 + P_NCPUS]
        lea rdx, [r15 + P_SLOTS]
1:      add rax, [rdx + S_COUNT]
        add rdx, SLOT_SIZE
        dec rcx
        jnz 1b
        call put_u64
        mov al, 10
        call putc
        mov rdi, r15                    /* the one PCI scan (and mtty programming) */
        mov eax, SYS_DEVICE_CHECK
        ud2
        call unlock_serial

main_loop:
        cmp qword ptr [r15 + P_CORRUPT], 0
        jne park
        rdtsc
        shl rdx, 32
        or rax, rdx
        mov rbp, rax                    /* rbp = now */
        test rbx, rbx
        jz 3f                           /* empty partition: nothing to write or verify */

        /* write one page when due */
        mov rcx, [r14 + S_TPW]
        test rcx, rcx
        jz 2f
        cmp rbp, [r14 + S_NEXTW]
        jb 2f
        add [r14 + S_NEXTW], rcx
        /* after a long stall (e.g. migration downtime) do not try to catch up in a burst */
        mov rax, rbp
        sub rax, [r14 + S_NEXTW]
        jb 1f
        mov rdx, [r15 + P_TSC_HZ]
        shr rdx, 4
        cmp rax, rdx
        jb 1f
        mov [r14 + S_NEXTW], rbp
1:      mov rax, [r14 + S_WCUR]
        call write_page
        inc qword ptr [r14 + S_WRITTEN]
        mov rax, [r14 + S_WCUR]
        inc rax
        cmp rax, rbx
        jb 1f
        xor eax, eax
1:      mov [r14 + S_WCUR], rax

2:      /* verify one page */
        mov rax, [r14 + S_VCUR]
        call verify_page
        inc qword ptr [r14 + S_VERIFIED]
        mov rax, [r14 + S_VCUR]
        inc rax
        cmp rax, rbx
        jb 1f
        inc qword ptr [r14 + S_PASSES]
        xor eax, eax
1:      mov [r14 + S_VCUR], rax

3:      test r13, r13
        jnz main_loop
        /* vCPU 0: progress line once a second, exit when asked */
        cmp rbp, [r14 + S_NEXTP]
        jb main_loop
        mov rax, [r15 + P_TSC_HZ]
        add [r14 + S_NEXTP], rax
        call lock_serial
        lea rsi, [rip + msg_pass]
        call puts
        mov rax, [r14 + S_PASSES]
        call put_u64
        lea rsi, [rip + msg_verified]
        call puts
        mov rsi, S_VERIFIED
        call sum_slots
        call put_u64
        lea rsi, [rip + msg_written]
        call puts
        mov rsi, S_WRITTEN
        call sum_slots
        call put_u64
        lea rsi, [rip + msg_pages_nl]
        call puts
        cmp qword ptr [r15 + P_DEV + D_STATE], DEV_PRESENT
        jne 1f                          /* no device found at boot: nothing to check */
        mov rdi, r15
        mov eax, SYS_DEVICE_CHECK
        ud2
1:      call unlock_serial
        mov rcx, [r15 + P_EXIT_TICKS]
        test rcx, rcx
        jz main_loop
        mov rax, rbp
        sub rax, [r14 + S_START]
        cmp rax, rcx
        jb main_loop
        call lock_serial
        lea rsi, [rip + msg_done]
        call puts
        mov eax, SYS_POWER_OFF
        ud2
1:      pause
        jmp 1b

park:
        mov eax, SYS_PARK
        ud2
        jmp park

/* rax = partition-relative page; fills it with the next generation's pattern */
write_page:
        add rax, r12                    /* global page index */
        mov r8, [r15 + P_GEN_TABLE]
        mov edx, [r8 + rax*4]
        inc edx
        jnz 1f
        inc edx                         /* generation 0 is reserved for "never written" */
1:      mov r9, rax
        call page_addr                  /* rdi = page */
        mov rax, r9
        call pattern_base               /* rax = base, rdx preserved */
        movabs r10, 0x165667B19E3779F9
        mov ecx, 512
1:      mov [rdi], rax
        add rax, r10
        add rdi, 8
        dec ecx
        jnz 1b
        mov [r8 + r9*4], edx
        ret

/* rax = partition-relative page; checks it against its generation */
verify_page:
        add rax, r12
        mov r8, [r15 + P_GEN_TABLE]
        mov edx, [r8 + rax*4]
        mov r9, rax
        call page_addr
        xor ecx, ecx
        test edx, edx
        jz 2f
        mov rax, r9
        call pattern_base
        movabs r10, 0x165667B19E3779F9
1:      cmp [rdi + rcx*8], rax
        jne corrupt
        add rax, r10
        inc ecx
        cmp ecx, 512
        jb 1b
        ret
2:      xor eax, eax
1:      cmp [rdi + rcx*8], rax
        jne corrupt
        inc ecx
        cmp ecx, 512
        jb 1b
        ret

/* r9 = global page, edx = generation, rcx = qword index, rax = expected, rdi = page */
corrupt:
        mov qword ptr [r15 + P_CORRUPT], 1
        mov r10, [rdi + rcx*8]
        mov r11, rax
        push rcx
        call lock_serial
        lea rsi, [rip + msg_corrupt]
        call puts
        mov rax, r9
        call put_u64
        lea rsi, [rip + msg_gen]
        call puts
        mov eax, edx
        call put_u64
        lea rsi, [rip + msg_qword]
        call puts
        pop rax
        call put_u64
        lea rsi, [rip + msg_expected]
        call puts
        mov rax, r11
        call put_hex
        lea rsi, [rip + msg_got]
        call puts
        mov rax, r10
        call put_hex
        lea rsi, [rip + msg_cpu]
        call puts
        mov rax, r13
        call put_u64
        mov al, 10
        call putc
        call unlock_serial
        jmp park

/* rax = global page -> rdi = its address */
page_addr:
        mov rdi, rax
        shl rdi, 12
        add rdi, [r15 + P_WS_BASE]
        ret

/* rax = page, edx = generation -> rax = pattern base (clobbers r11) */
pattern_base:
        movabs r11, 0x9E3779B97F4A7C15
        imul rax, r11
        movabs r11, 0xC2B2AE3D27D4EB4F
        push rdx
        mov edx, edx
        imul r11, rdx
        pop rdx
        xor rax, r11
        ret

/* rsi = slot field offset -> rax = sum over vCPUs */
sum_slots:
        push rcx
        push rdx
        xor eax, eax
        mov rcx, [r15 + P_NCPUS]
        lea rdx, [r15 + P_SLOTS]
        add rdx, rsi
1:      add rax, [rdx]
        add rdx, SLOT_SIZE
        dec rcx
        jnz 1b
        pop rdx
        pop rcx
        ret

lock_serial:
        push rax
1:      mov eax, 1
        xchg [r15 + P_LOCK], rax
        test rax, rax
        jz 2f
        pause
        jmp 1b
2:      pop rax
        ret

unlock_serial:
        mov qword ptr [r15 + P_LOCK], 0
        ret

/* ------------------------------------------------------ ring-3 console */
/* al = byte, appended to the line buffer; a newline or a full buffer hands it to ring 0. */
putc:
        push rdx
        mov rdx, [r15 + P_LINE_LEN]
        mov [r15 + rdx + P_LINE], al
        inc rdx
        mov [r15 + P_LINE_LEN], rdx
        cmp al, 10
        je 1f
        cmp rdx, LINE_MAX
        jb 2f
1:      push rax
        push rsi
        push r8
        lea rsi, [r15 + P_LINE]
        mov r8, rdx
        mov eax, SYS_PRINT
        ud2
        mov qword ptr [r15 + P_LINE_LEN], 0
        pop r8
        pop rsi
        pop rax
2:      pop rdx
        ret

/* rsi = NUL-terminated string */
puts:
        push rax
1:      mov al, [rsi]
        test al, al
        jz 2f
        call putc
        inc rsi
        jmp 1b
2:      pop rax
        ret

/* rax = value, printed in decimal */
put_u64:
        push rbx
        push rcx
        push rdx
        sub rsp, 32
        mov rcx, 31
        mov byte ptr [rsp + rcx], 0
        mov rbx, 10
1:      xor edx, edx
        div rbx
        add dl, '0'
        dec rcx
        mov [rsp + rcx], dl
        test rax, rax
        jnz 1b
        lea rsi, [rsp + rcx]
        call puts
        add rsp, 32
        pop rdx
        pop rcx
        pop rbx
        ret

/* rax = value, printed as 0x + 16 hex digits */
put_hex:
        push rcx
        push rdx
        mov rdx, rax
        mov al, '0'
        call putc
        mov al, 'x'
        call putc
        mov ecx, 16
1:      rol rdx, 4
        mov al, dl
        and al, 0xf
        add al, '0'
        cmp al, '9'
        jbe 2f
        add al, 'a' - '9' - 1
2:      call putc
        dec ecx
        jnz 1b
        pop rdx
        pop rcx
        ret

        .section .rodata
msg_start:      .asciz "DEMO: start cpus="
msg_pages:      .asciz " pages="
msg_pass:       .asciz "DEMO: pass "
msg_verified:   .asciz " verified "
msg_written:    .asciz " pages written "
msg_pages_nl:   .asciz " pages\n"
msg_done:       .asciz "DEMO: done, powering off\n"
msg_corrupt:    .asciz "DEMO: CORRUPT page="
msg_gen:        .asciz " gen="
msg_qword:      .asciz " qword="
msg_expected:   .asciz " expected="
msg_got:        .asciz " got="
msg_cpu:        .asciz " cpu="
msg_fault:      .asciz "DEMO: FAULT vector="
msg_err:        .asciz " error="
msg_rip:        .asciz " rip="
msg_mtty_device: .asciz "MTTY: device "
msg_mtty_at:    .asciz " at 00:"
msg_mtty_port:  .asciz ".0 port "
msg_mtty_programmed: .asciz " programmed\n"
msg_mtty_ok:    .asciz " ok seq "
msg_mtty_lcr:   .asciz " LOST lcr="
msg_mtty_ier:   .asciz " ier="
msg_mtty_mcr:   .asciz " mcr="
msg_mtty_scr:   .asciz " scr="
msg_mtty_lsr:   .asciz " lsr="
msg_mtty_rx:    .asciz " rx="
msg_mtty_none:  .asciz "none"
msg_mtty_want:  .asciz " want scr="
