/*
 * The edu probe's loop mode (probe_edu.S with a command line starting "loop"): finds the first edu,
 * enables it, sets its liveness register (0x04, which reads back the bitwise NOT of what was
 * written) to a value of its own, enables MSI, then for ever: fills SRC with a pattern that changes
 * every round, has edu DMA it RAM -> device -> RAM (the second DMA raising the completion MSI),
 * compares, waits for the MSI and reads the liveness register back. One line per round:
 *     EDU: round XXXXXXXX dma ok msi ok live ok
 * or the same line with "dma BAD", "dma timeout", "msi NONE" or "live LOST" in place of what
 * failed (the loop goes on). The liveness register is written once, before the first round: a
 * device that was reset or re-initialised since then would read it back differently.
 * Shares probe_edu.S's helpers (dma, setup_msi, cfg_*, puts, hex) and its registers: r12 = BAR0,
 * ebx = slot.
 */
        .set LIVE, 0x04
        .set LIVE_VALUE, 0x1ee7c0de

loop_main:
        xor ebx, ebx
10:     mov eax, ebx
        shl eax, 11
        or eax, 0x80000000
        mov dx, 0xcf8
        out dx, eax
        mov dx, 0xcfc
        in eax, dx
        cmp eax, 0x11e81234
        je 11f
        inc ebx
        cmp ebx, 32
        jb 10b
        lea rsi, [rip + msg_nodev]
        call puts
        jmp poweroff
11:     mov eax, ebx                    /* command: memory space + bus master */
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
        mov r12d, eax
        mov dword ptr [r12 + LIVE], LIVE_VALUE
        call setup_msi
        lea rsi, [rip + msg_loop]
        call puts
        xor r15d, r15d                  /* round */

round:
        inc r15d
        mov dword ptr [rip + msi_count], 0
        xor ecx, ecx                    /* pattern (round-dependent) into SRC, zeros into DST */
1:      mov eax, ecx
        imul eax, eax, 7
        add eax, r15d
        mov [SRC + rcx], al
        mov byte ptr [DST + rcx], 0
        inc ecx
        cmp ecx, LEN
        jb 1b
        lea rsi, [rip + msg_round]
        call puts
        mov eax, r15d
        mov ecx, 8
        call hex

        mov esi, SRC
        mov edi, EDU_BUF
        mov eax, 1
        call dma
        jc 5f
        mov esi, EDU_BUF
        mov edi, DST
        mov eax, 7
        call dma
        jc 5f
        xor ecx, ecx
2:      mov al, [SRC + rcx]
        cmp al, [DST + rcx]
        jne 6f
        inc ecx
        cmp ecx, LEN
        jb 2b
        lea rsi, [rip + msg_l_dma_ok]
        jmp 7f
5:      lea rsi, [rip + msg_l_dma_timeout]
        jmp 7f
6:      lea rsi, [rip + msg_l_dma_bad]
7:      call puts

        mov ecx, 20000000               /* the MSI may trail the status bit a little */
3:      lea rsi, [rip + msg_l_msi_ok]
        cmp dword ptr [rip + msi_count], 0
        jne 4f
        pause
        dec ecx
        jnz 3b
        lea rsi, [rip + msg_l_msi_none]
4:      call puts

        lea rsi, [rip + msg_l_live_ok]
        cmp dword ptr [r12 + LIVE], ~LIVE_VALUE
        je 8f
        lea rsi, [rip + msg_l_live_lost]
8:      call puts
        jmp round

msg_loop:          .asciz "EDU: loop: liveness register set, MSI on\n"
msg_round:         .asciz "EDU: round "
msg_l_dma_ok:      .asciz " dma ok"
msg_l_dma_timeout: .asciz " dma timeout"
msg_l_dma_bad:     .asciz " dma BAD"
msg_l_msi_ok:      .asciz " msi ok"
msg_l_msi_none:    .asciz " msi NONE"
msg_l_live_ok:     .asciz " live ok\n"
msg_l_live_lost:   .asciz " live LOST\n"
